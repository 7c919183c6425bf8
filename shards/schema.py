"""The shard format (docs/shards.md): member and field names, shard and key names, and writing and reading a sample's members."""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
import time
import warnings
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from infer.video import decode_video, encode_video

log = logging.getLogger(__name__)

# A pair sample's members: ``{SOURCE}.{ext}``, ``{TARGET}.{ext}`` and ``META``.
SOURCE, TARGET, META = "src", "tgt", "json"
VIDEO_EXT, ARRAY_EXT = "mp4", "npy"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
VIDEO_FORMATS = (VIDEO_EXT, ARRAY_EXT)
# The json fields every pair carries (``judge`` too when the judge filter ran).
META_FIELDS = ("input_caption", "instruction", "output_caption", "num_frames", "height", "width", "fps", "seed",
               "source", "generator", "clip")
# A latent-cache sample's members (``{name}.npy``), and the same names in a training batch: the
# target's VAE posterior (mean, log-variance), the source's latent mode, the instruction's text
# states; latents ``(c, F, h, w)`` unscaled, text states ``(seq, dim)``. The cache folder's own files:
TARGET_MEAN, TARGET_LOGVAR, SOURCE_LATENT, TEXT_STATES = "tgt_mean", "tgt_logvar", "src_latent", "text"
CACHE_INFO, EMPTY_TEXT = "cache.json", "empty_text.npy"
EMPTY_TEXT_STATES = "empty_text"  # the empty prompt's states, in a cached batch (text dropout)


def is_cached(batch: dict[str, Any]) -> bool:
    """Whether a training batch holds cached latents (else decoded ``source``/``target`` clips)."""
    return TARGET_MEAN in batch


# Bounds on what one member may decode to, checked before the memory is taken.
MAX_ARRAY_BYTES = 2 << 30


def shard_name(prefix: str, rank: int, index: int) -> str:
    """``{prefix}-{rank:03d}-{index:06d}.tar``: each rank's shards, numbered in the order written."""
    return f"{prefix}-{rank:03d}-{index:06d}.tar"


def sample_key(rank: int, index: int, slot: int = 0) -> str:
    """A sample's key, unique and stable across resumes: rank, triplet or row index, seed slot."""
    return f"r{rank:03d}-{index:09d}-s{slot}"


# ---------------------------------------------------------------- writing
def frames_member(frames: np.ndarray, video_format: str, fps: float) -> tuple[str, bytes]:
    """uint8 ``(F, H, W, 3)`` frames as a member: ``(extension, bytes)``, an H.264 mp4 or an ``.npy``."""
    if video_format == ARRAY_EXT:
        buffer = io.BytesIO()
        np.save(buffer, frames, allow_pickle=False)
        return ARRAY_EXT, buffer.getvalue()
    if video_format != VIDEO_EXT:
        raise ValueError(f"video_format must be one of {', '.join(VIDEO_FORMATS)}, got {video_format!r}")
    return VIDEO_EXT, encode_video(frames, fps)


def pair_sample(key: str, source: np.ndarray, edited: np.ndarray, meta: dict[str, Any], video_format: str,
                fps: float) -> dict[str, Any]:
    """One pair sample: the source and edited clips in ``video_format`` and the json ``meta``."""
    ext, source_bytes = frames_member(source, video_format, fps)
    _, edited_bytes = frames_member(edited, video_format, fps)
    return {"__key__": key, f"{SOURCE}.{ext}": source_bytes, f"{TARGET}.{ext}": edited_bytes,
            META: json.dumps(meta).encode()}


def tar_bytes(samples: list[dict[str, Any]]) -> bytes:
    """A tar of samples ``{"__key__": k, "src.mp4": bytes, ...}`` as WebDataset reads them."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# ---------------------------------------------------------------- reading
# What reading a damaged or hostile member raises (VideoError is a ValueError): the sample is skipped.
DAMAGED = (KeyError, IndexError, ValueError, UnicodeDecodeError, MemoryError)


class SampleSkips:
    """The damaged samples a decoder met: counted, each logged with the running count."""

    def __init__(self, what: str = "sample"):
        self.what, self.count = what, 0

    def skip(self, key: str, err: BaseException) -> None:
        self.count += 1
        log.warning("skipping corrupt %s %s (%s); %d skipped so far", self.what, key, err, self.count)


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
    if f"{stem}.{VIDEO_EXT}" in sample:
        return decode_video(sample[f"{stem}.{VIDEO_EXT}"], max_frames=max_frames)
    if f"{stem}.{ARRAY_EXT}" in sample:
        try:
            array = read_npy(sample[f"{stem}.{ARRAY_EXT}"])
        except ValueError as err:
            raise ValueError(f"{stem}.npy: {err}") from None
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"{stem}.npy must be uint8 (F, H, W, 3), got {array.dtype} {array.shape}")
        return array
    raise KeyError(f"no {stem}.mp4, {stem}.npy or {stem} image")
