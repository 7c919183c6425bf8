"""Shard samples decoded into model-ready (source, target, instruction) clip pairs, for training and caching."""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import warnings
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from .augment import apply_windows, crop_windows
from .camera import CameraBounds, lift_pair
from .pipeline import to_model_frames
from .video import VideoError, decode_video

log = logging.getLogger(__name__)


def expand_shards(pattern: str) -> list[str]:
    """Shard paths from a file, a folder (its ``*.tar``), a glob or a brace pattern ``a-{000..009}.tar``."""
    if not pattern:
        raise ValueError("no shards given: set data.shards to a path, glob or brace pattern of .tar files")
    urls: list[str] = []
    for part in wds.shardlists.expand_urls(pattern):
        if os.path.isdir(part):
            urls += sorted(glob.glob(os.path.join(part, "*.tar")))
        elif any(c in part for c in "*?["):
            urls += sorted(glob.glob(part))
        elif os.path.isfile(part) or "://" in part or part.startswith("pipe:"):
            urls.append(part)
    if not urls:
        raise ValueError(f"no shards match {pattern!r}")
    return urls


IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


# Bounds on what one shard member may decode to, checked before the memory is taken.
MAX_ARRAY_BYTES = 2 << 30


def read_npy(data: bytes, max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
    """An ``.npy`` file's array, its header checked before anything is allocated: no pickled
    objects, and a shape whose size fits both ``max_bytes`` and the bytes actually there."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(buffer)
    except (ValueError, SyntaxError, TypeError, EOFError) as err:
        raise ValueError(f"not a readable .npy ({err})") from None
    if dtype.hasobject:
        raise ValueError("a .npy of Python objects is not read")
    size = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if size > max_bytes:
        raise ValueError(f"its header claims {size:,} bytes, over the {max_bytes:,}-byte limit")
    if size > len(data) - buffer.tell():
        raise ValueError(f"its header claims {size:,} bytes but {len(data) - buffer.tell():,} follow it")
    array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=buffer.tell())
    return array.reshape(shape, order="F" if fortran else "C").copy()  # writable, and free of ``data``


def read_image(data: bytes) -> np.ndarray:
    """An encoded image as RGB ``(H, W, 3)``; over Pillow's pixel limit (a decompression bomb) is an error, not a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return np.asarray(image.convert("RGB"))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ValueError(f"too many pixels ({str(err).split(' could')[0]})") from None
        except (UnidentifiedImageError, OSError, EOFError) as err:
            raise ValueError(f"not a readable image ({type(err).__name__})") from None


def shard_frames(sample: dict[str, Any], stem: str, max_frames: int | None = None) -> np.ndarray:
    """A shard member's frames: an image (one frame), an mp4 (decoded up to ``max_frames``) or an ``.npy``."""
    for ext in IMAGE_EXTS:  # an image-edit pair: one frame
        if f"{stem}.{ext}" in sample:
            try:
                return read_image(sample[f"{stem}.{ext}"])[None]
            except ValueError as err:
                raise ValueError(f"{stem}.{ext}: {err}") from None
    if f"{stem}.mp4" in sample:
        return decode_video(sample[f"{stem}.mp4"], max_frames=max_frames)
    if f"{stem}.npy" in sample:
        try:
            array = read_npy(sample[f"{stem}.npy"])
        except ValueError as err:
            raise ValueError(f"{stem}.npy: {err}") from None
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"{stem}.npy must be uint8 (F, H, W, 3), got {array.dtype} {array.shape}")
        return array
    raise KeyError(f"no {stem}.mp4, {stem}.npy or {stem} image")


IMAGE_CLIPS = ("camera", "repeat")


def image_pair_clip(source: np.ndarray, target: np.ndarray, num_frames: int, how: str, rng: np.random.Generator,
                    bounds: CameraBounds = CameraBounds()) -> tuple[np.ndarray, np.ndarray]:
    """A single-frame pair (an image edit) as a ``num_frames`` clip pair: the frame repeated
    (``repeat``: a clip without motion), or filmed by one random camera path shared by source and
    target (``camera``: the lifting of ``synth lift``, drawn anew each time the sample is read)."""
    if how == "repeat":
        return np.repeat(source[:1], num_frames, 0), np.repeat(target[:1], num_frames, 0)
    size = min(source.shape[1:3])
    clip_source, clip_target, _ = lift_pair(source[0], target[0], bounds, num_frames, size, rng)
    return clip_source, clip_target


def sample_frames(num_available: int, num_frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``num_frames`` frames ``stride`` apart from a random start; a clip too short
    repeats its last frame (so every clip trains, at its native motion)."""
    span = (num_frames - 1) * stride + 1
    start = int(rng.integers(0, num_available - span + 1)) if num_available >= span else 0
    return np.minimum(start + np.arange(num_frames) * stride, num_available - 1)


class PairDecoder:
    """Turn a raw shard sample into training tensors; a broken sample becomes ``None`` (counted)."""

    def __init__(self, num_frames: int, frame_stride: int, resolution: int, augment: dict[str, float] | None,
                 image_clips: str = "camera"):
        if image_clips not in IMAGE_CLIPS:
            raise ValueError(f"image_clips must be one of {', '.join(IMAGE_CLIPS)}, got {image_clips!r}")
        self.num_frames, self.frame_stride, self.resolution = num_frames, frame_stride, resolution
        self.augment, self.image_clips = augment, image_clips
        self.skipped = 0

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
        """``rng`` draws the frames and the crop."""
        key = sample.get("__key__", "?")
        index = None
        try:
            meta = json.loads(sample["json"])
            instruction = str(meta["instruction"])
            stated = meta.get("num_frames")
            if isinstance(stated, int) and stated > 1 and "src.mp4" in sample:
                # the frames to train on are drawn from the stated count, and the clips decoded only that far
                index = sample_frames(stated, self.num_frames, self.frame_stride, rng)
                source, target = (shard_frames(sample, stem, int(index.max()) + 1) for stem in ("src", "tgt"))
            else:
                source, target = shard_frames(sample, "src"), shard_frames(sample, "tgt")
            if source.shape != target.shape:
                raise ValueError(f"source {source.shape} and target {target.shape} differ")
        except (KeyError, ValueError, VideoError, json.JSONDecodeError, UnicodeDecodeError, MemoryError) as err:
            self.skipped += 1
            log.warning("skipping corrupt sample %s (%s); %d skipped so far", key, err, self.skipped)
            return None
        if len(source) == 1 and self.num_frames > 1:
            source, target = image_pair_clip(source, target, self.num_frames, self.image_clips, rng)
            index = None
        if index is None or index.max() >= len(source):  # fewer frames than stated: drawn from those there
            index = sample_frames(len(source), self.num_frames, self.frame_stride, rng)
        source, target = source[index], target[index]
        h, w = source.shape[1:3]
        if self.augment:
            boxes = crop_windows(self.num_frames, h, w, rng, **self.augment)
        else:  # centred square
            side = min(h, w)
            x0, y0 = (w - side) / 2, (h - side) / 2
            boxes = np.tile([x0, y0, x0 + side, y0 + side], (self.num_frames, 1))
        return {
            "source": to_model_frames(apply_windows(source, boxes, self.resolution))[0],
            "target": to_model_frames(apply_windows(target, boxes, self.resolution))[0],
            "instruction": instruction,
            "key": key,
        }
