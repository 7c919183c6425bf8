"""Aspect and length buckets: which training shape ``(frames, height, width)`` each clip takes, decided from its description alone."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .schema import IMAGE_EXTS, META, SOURCE


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


def parse_buckets(spec: Any, temporal: int = 1, multiple: int = 1) -> list[Bucket]:
    """``data.buckets``: a list of ``[frames, height, width]``. Under a causal VAE packing
    ``temporal`` frames, frames are ``1 + temporal k``; sides are multiples of ``multiple``."""
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"data.buckets must be a list of [frames, height, width], got {spec!r}")
    out = []
    for item in spec:
        if not isinstance(item, (list, tuple)) or len(item) != 3 or not all(isinstance(v, int) and v > 0 for v in item):
            raise ValueError(f"data.buckets: each bucket is [frames, height, width] of positive integers, got {item!r}")
        bucket = Bucket(*item)
        if temporal > 1 and (bucket.frames - 1) % temporal:
            raise ValueError(f"data.buckets: {bucket} has {bucket.frames} frames; this editor's causal VAE takes "
                             f"1 + {temporal}k")
        if bucket.height % multiple or bucket.width % multiple:
            raise ValueError(f"data.buckets: {bucket}'s sides must be multiples of {multiple}")
        out.append(bucket)
    return out


def nearest_bucket(buckets: list[Bucket], frames: int, height: int, width: int) -> int | None:
    """The bucket a clip of ``frames`` frames (``None``: any number, an image filmed into a clip)
    at ``height`` x ``width`` trains in, without upscaling: among the buckets no larger than the
    clip on either side and no longer than it, the one nearest in aspect ratio
    (``|log(a_bucket / a_clip)|``), then the longest, then the largest. A one-frame clip (an
    image pair kept single) goes to the one-frame buckets, a clip to the others. ``None`` when
    none fits."""
    aspect = width / height
    fitting = [i for i, b in enumerate(buckets)  # images to one-frame buckets, clips to the others
               if b.height <= height and b.width <= width and (frames is None or b.frames <= frames)
               and (b.frames == 1) == (frames == 1)]
    if not fitting:
        return None
    return min(fitting, key=lambda i: (round(abs(math.log(buckets[i].aspect / aspect)), 9), -buckets[i].frames,
                                       -buckets[i].height * buckets[i].width))


def described_shape(sample: dict[str, Any], frame_stride: int = 1, image_clips: str = "camera"
                    ) -> tuple[int | None, int, int] | None:
    """A raw pair sample's ``(frames usable, height, width)`` from its ``json`` alone (no decoding):
    an image pair is one frame with ``image_clips: single``, else any number (it is filmed into a
    clip); ``None`` when the description does not say."""
    try:
        meta = json.loads(sample[META])
        height, width = int(meta["height"]), int(meta["width"])
    except (KeyError, TypeError, ValueError):
        return None
    image = any(f"{SOURCE}.{ext}" in sample for ext in IMAGE_EXTS)
    if image:
        return (1 if image_clips == "single" else None), height, width
    frames = int(meta.get("num_frames") or 0)
    if frames < 1:
        return None
    return 1 + (frames - 1) // frame_stride, height, width
