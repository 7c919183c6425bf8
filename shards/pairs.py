"""Pair samples decoded into model-ready (source, target, instruction) training clips, for training and caching."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from infer.pipeline import to_model_frames

from .augment import apply_windows, crop_windows
from .buckets import described_shape, nearest_bucket
from .camera import CameraBounds, lift_pair
from .schema import DAMAGED, META, SOURCE, TARGET, VIDEO_EXT, SampleSkips, shard_frames

IMAGE_CLIPS = ("camera", "repeat", "single")

def image_pair_clip(source: np.ndarray, target: np.ndarray, num_frames: int, how: str, rng: np.random.Generator,
                    bounds: CameraBounds = CameraBounds()) -> tuple[np.ndarray, np.ndarray]:
    """A single-frame pair (an image edit) as a ``num_frames`` clip pair: the frame repeated
    (``repeat``: a clip without motion), or filmed by one random camera path shared by source and
    target (``camera``: the lifting of ``synth lift``, drawn anew each time the sample is read);
    ``single`` keeps the pair as the one-frame clip it is (an image, which a DiT's causal VAE
    encodes as one latent frame)."""
    if how == "single":
        return source[:1], target[:1]
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
        self.skips = SampleSkips("sample")

    @property
    def skipped(self) -> int:
        return self.skips.count

    def bucket_of(self, sample: dict[str, Any], buckets: list) -> int | None:
        """The index in ``buckets`` of the bucket a sample trains in, from its description alone
        (:func:`shards.buckets.nearest_bucket`), or ``None`` when none fits or it says no shape."""
        shape = described_shape(sample, self.frame_stride, self.image_clips)
        return None if shape is None else nearest_bucket(buckets, *shape)

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator, bucket=None) -> dict[str, Any] | None:
        """``rng`` draws the frames and the crop; ``bucket`` (a :class:`shards.buckets.Bucket`) gives
        the clip's frames and its height and width instead of ``num_frames`` and a square."""
        key = sample.get("__key__", "?")
        index = None
        num_frames = self.num_frames if bucket is None else bucket.frames
        out_size = self.resolution if bucket is None else (bucket.height, bucket.width)
        aspect = 1.0 if bucket is None else bucket.aspect
        try:
            meta = json.loads(sample[META])
            instruction = str(meta["instruction"])
            stated = meta.get("num_frames")
            if isinstance(stated, int) and stated > 1 and f"{SOURCE}.{VIDEO_EXT}" in sample:
                # the frames to train on are drawn from the stated count, and the clips decoded only that far
                index = sample_frames(stated, num_frames, self.frame_stride, rng)
                source, target = (shard_frames(sample, stem, int(index.max()) + 1) for stem in (SOURCE, TARGET))
            else:
                source, target = shard_frames(sample, SOURCE), shard_frames(sample, TARGET)
            if source.shape != target.shape:
                raise ValueError(f"source {source.shape} and target {target.shape} differ")
        except DAMAGED as err:
            self.skips.skip(key, err)
            return None
        frames = num_frames
        if len(source) == 1 and num_frames > 1:
            source, target = image_pair_clip(source, target, num_frames, self.image_clips, rng)
            frames, index = len(source), None
        if index is None or index.max() >= len(source):  # fewer frames than stated: drawn from those there
            index = sample_frames(len(source), frames, self.frame_stride, rng)
        source, target = source[index], target[index]
        h, w = source.shape[1:3]
        if self.augment:
            boxes = crop_windows(frames, h, w, rng, **self.augment, aspect=aspect)
        else:  # the largest centred window of the training shape (a square without buckets)
            box_h = min(h, w / aspect)
            box_w = box_h * aspect
            x0, y0 = (w - box_w) / 2, (h - box_h) / 2
            boxes = np.tile([x0, y0, x0 + box_w, y0 + box_h], (frames, 1))
        return {
            "source": to_model_frames(apply_windows(source, boxes, out_size))[0],
            "target": to_model_frames(apply_windows(target, boxes, out_size))[0],
            "instruction": instruction,
            "key": key,
        }
