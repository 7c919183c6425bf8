"""Virtual camera paths over a still image (pan, zoom, rotation, mild perspective as per-frame homographies), filming image-edit pairs as clips."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class CameraBounds:
    """How far one clip's camera may move (``synth lift``'s ``camera`` section).

    ``max_pan``: the view centre travels at most this fraction of the image's short side, per axis;
    ``zoom``: start and end zoom are drawn from this range (1: the whole short side in view);
    ``max_rotate``: degrees turned over the clip; ``max_perspective``: keystone of the last frame
    (projective terms, in units of the half view)."""

    max_pan: float = 0.15
    zoom: tuple[float, float] = (1.0, 1.3)
    max_rotate: float = 6.0
    max_perspective: float = 0.06

    def __post_init__(self):
        lo, hi = self.zoom
        if not (1.0 <= lo <= hi) or self.max_pan < 0 or self.max_rotate < 0 or not 0 <= self.max_perspective < 0.5:
            raise ValueError(f"camera bounds out of range: {self}")


@dataclass(frozen=True)
class CameraPath:
    """One clip's camera: start and end of each motion; frames in between follow a smoothstep."""

    pan_start: tuple[float, float]
    pan_end: tuple[float, float]
    zoom_start: float
    zoom_end: float
    rotate_start: float
    rotate_end: float
    perspective_end: tuple[float, float]
    fit: float = 1.0  # the view's shrink factor that keeps every frame inside the image

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def draw_path(bounds: CameraBounds, rng: np.random.Generator) -> CameraPath:
    """A random path within ``bounds``: uniform draws of each motion's ends."""
    pan = lambda: tuple(float(v) for v in rng.uniform(-bounds.max_pan, bounds.max_pan, 2) / 2)  # noqa: E731
    half_turn = bounds.max_rotate / 2
    return CameraPath(
        pan_start=pan(), pan_end=pan(),
        zoom_start=float(rng.uniform(*bounds.zoom)), zoom_end=float(rng.uniform(*bounds.zoom)),
        rotate_start=float(rng.uniform(-half_turn, half_turn)), rotate_end=float(rng.uniform(-half_turn, half_turn)),
        perspective_end=tuple(float(v) for v in rng.uniform(-bounds.max_perspective, bounds.max_perspective, 2)),
    )


def smoothstep(num_frames: int) -> np.ndarray:
    """Progress ``s_t = 3x^2 - 2x^3`` at ``x = t / (F - 1)``: the camera eases in and out."""
    x = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    return 3 * x**2 - 2 * x**3


def homographies(path: CameraPath, num_frames: int, image_hw: tuple[int, int], size: int) -> np.ndarray:
    """``(F, 3, 3)`` maps from an output frame's pixel ``(u, v, 1)`` to image pixels::

        H_t = T(c_t) · S(side_t / 2) · R(θ_t) · P(p_t) · N

    ``N`` takes output pixels to [-1, 1]², ``P`` adds the keystone ``p_t = s_t p_end`` (projective
    row ``[p_x, p_y, 1]``), ``R`` turns by ``θ_t``, ``S`` scales to half the view side
    ``side_t = fit · min(H, W) / z_t`` and ``T`` moves to the view centre
    ``c_t = image centre + pan_t · min(H, W)``; each motion interpolates its ends by ``s_t``.
    """
    h, w = image_hw
    short = min(h, w)
    s = smoothstep(num_frames)
    normalise = np.array([[2 / size, 0, 1 / size - 1], [0, 2 / size, 1 / size - 1], [0, 0, 1]])
    out = np.empty((num_frames, 3, 3))
    for t, progress in enumerate(s):
        lerp = lambda a, b: a + (b - a) * progress  # noqa: E731
        px, py = (progress * v for v in path.perspective_end)
        theta = np.deg2rad(lerp(path.rotate_start, path.rotate_end))
        half = path.fit * short / lerp(path.zoom_start, path.zoom_end) / 2
        cx = w / 2 + lerp(path.pan_start[0], path.pan_end[0]) * short
        cy = h / 2 + lerp(path.pan_start[1], path.pan_end[1]) * short
        keystone = np.array([[1, 0, 0], [0, 1, 0], [px, py, 1]])
        rotate = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
        place = np.array([[half, 0, cx], [0, half, cy], [0, 0, 1]])
        out[t] = place @ rotate @ keystone @ normalise
    return out


def _corners_inside(maps: np.ndarray, image_hw: tuple[int, int], size: int) -> bool:
    h, w = image_hw
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], float).T
    mapped = maps @ corners
    xy = mapped[:, :2] / mapped[:, 2:]
    return bool((xy[:, 0] >= 0).all() and (xy[:, 0] <= w).all() and (xy[:, 1] >= 0).all() and (xy[:, 1] <= h).all())


def fit_path(path: CameraPath, num_frames: int, image_hw: tuple[int, int], size: int) -> CameraPath:
    """The path with the view shrunk (``fit`` lowered by 3 % steps) until every frame's corners
    lie inside the image, so no frame shows anything but the image."""
    fit = 1.0
    for _ in range(200):
        candidate = CameraPath(**{**path.to_json(), "fit": fit})
        if _corners_inside(homographies(candidate, num_frames, image_hw, size), image_hw, size):
            return candidate
        fit *= 0.97
    raise ValueError(f"no view of this camera path fits a {image_hw[1]}x{image_hw[0]} image")


def film(image: np.ndarray, maps: np.ndarray, size: int) -> np.ndarray:
    """The clip ``(F, size, size, 3)`` the camera ``maps`` (from :func:`homographies`) sees of a
    uint8 image. The image is first reduced (area filter) so the view spans about ``size`` pixels:
    warping then only magnifies, without aliasing."""
    h, w = image.shape[:2]
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1]], float).T
    view = maps @ corners
    view = view[:, :2] / view[:, 2:]
    span = max(np.linalg.norm(view[:, :, 1] - view[:, :, 0], axis=1).max(), 1e-6)
    scale = min(1.0, size / span)
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        sx, sy = image.shape[1] / w, image.shape[0] / h
        maps = np.diag([sx, sy, 1.0]) @ maps
    frames = [cv2.warpPerspective(image, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REFLECT_101) for m in maps]
    return np.stack(frames)


def lift_pair(source: np.ndarray, edited: np.ndarray, bounds: CameraBounds, num_frames: int, size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The (source, edited) clips one random camera path films of an image pair, and the path. The
    same per-frame homographies film both images, so the edited clip is exactly the camera's view
    of the edited image."""
    path = fit_path(draw_path(bounds, rng), num_frames, source.shape[:2], size)
    maps = homographies(path, num_frames, source.shape[:2], size)
    return film(source, maps, size), film(edited, maps, size), path.to_json()
