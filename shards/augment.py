"""Motion augmentation: one moving crop window per clip, applied identically to source and target."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Augmentation:
    """The motion augmentation's parameters; the defaults are the InsV2V reference recipe's."""

    translate_prob: float = 0.7  # a crop window sliding linearly over the clip
    max_translate: float = 0.2  # by up to this fraction of height and width
    zoom_prob: float = 0.2  # a linear zoom
    max_zoom: float = 1.25  # to a scale in [1, max_zoom]


AUGMENTATION = Augmentation()


def crop_windows(
    num_frames: int,
    height: int,
    width: int,
    rng: np.random.Generator,
    translate_prob: float = AUGMENTATION.translate_prob,
    max_translate: float = AUGMENTATION.max_translate,
    zoom_prob: float = AUGMENTATION.zoom_prob,
    max_zoom: float = AUGMENTATION.max_zoom,
    aspect: float = 1.0,
) -> np.ndarray:
    """Per-frame crop boxes ``(F, 4)`` as ``(x0, y0, x1, y1)`` in pixels.

    The window starts as the largest centred window of width / height ``aspect`` (a square by
    default; a training bucket's shape otherwise). With ``translate_prob`` it slides linearly
    over the clip by up to ``max_translate`` of H and W (shrunk just enough to stay inside); with
    ``zoom_prob`` its size changes linearly to ``1/z`` of the start, ``z ~ U[1, max_zoom]``, zooming
    in or out. Same boxes for source and target keep the pair aligned.
    """
    side = float(min(height, width / aspect))  # the window's height; its width is aspect times it
    shift = np.zeros(2)
    if rng.random() < translate_prob:
        shift = rng.uniform(-max_translate, max_translate, size=2) * np.array([width, height])
    scales = np.ones(num_frames)
    if rng.random() < zoom_prob:
        z = rng.uniform(1.0, max_zoom)
        scales = np.linspace(1.0, 1.0 / z, num_frames)
        if rng.random() < 0.5:
            scales = scales[::-1]
    # the window must fit at both ends of the slide: shrink it if needed
    side = min(side, (width - abs(shift[0])) / aspect, height - abs(shift[1]))
    progress = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    cx = (width - shift[0]) / 2 + progress * shift[0]
    cy = (height - shift[1]) / 2 + progress * shift[1]
    half_h = side * scales / 2
    half_w = half_h * aspect
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)


def apply_windows(frames: np.ndarray, boxes: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Crop each frame ``(F, H, W, 3)`` to its box and resize to ``size x size`` or ``(height,
    width)`` (sub-pixel exact)."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    out = np.empty((len(frames), out_h, out_w, 3), dtype=frames.dtype)
    for i, (frame, (x0, y0, x1, y1)) in enumerate(zip(frames, boxes)):
        sx, sy = (x1 - x0) / out_w, (y1 - y0) / out_h
        # maps output pixel centres into the box (affine, no intermediate rounding)
        matrix = np.array([[sx, 0, x0 + 0.5 * sx - 0.5], [0, sy, y0 + 0.5 * sy - 0.5]], dtype=np.float64)
        interpolation = cv2.INTER_AREA if sx > 1.5 else cv2.INTER_LINEAR
        if interpolation == cv2.INTER_AREA:  # area filter: crop then resize
            crop = frame[int(round(y0)) : int(round(y1)), int(round(x0)) : int(round(x1))]
            out[i] = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA)
        else:
            out[i] = cv2.warpAffine(
                frame, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT
            )
    return out
