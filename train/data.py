"""WebDataset DataModule: (source, target, instruction) clips from shards of the SPEC §3 schema."""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds

from infer.pipeline import to_model_frames
from infer.video import VideoError, decode_video

from .augment import apply_windows, crop_windows

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


def _frames(sample: dict[str, Any], stem: str) -> np.ndarray:
    if f"{stem}.mp4" in sample:
        return decode_video(sample[f"{stem}.mp4"])
    if f"{stem}.npy" in sample:
        array = np.load(io.BytesIO(sample[f"{stem}.npy"]), allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"{stem}.npy must be uint8 (F, H, W, 3), got {array.dtype} {array.shape}")
        return array
    raise KeyError(f"no {stem}.mp4 or {stem}.npy")


def sample_frames(num_available: int, num_frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``num_frames`` frames ``stride`` apart from a random start; a clip too short
    repeats its last frame (so every clip trains, at its native motion)."""
    span = (num_frames - 1) * stride + 1
    start = int(rng.integers(0, num_available - span + 1)) if num_available >= span else 0
    return np.minimum(start + np.arange(num_frames) * stride, num_available - 1)


class PairDecoder:
    """Turn a raw shard sample into training tensors; a broken sample becomes ``None`` (counted)."""

    def __init__(self, num_frames: int, frame_stride: int, resolution: int, augment: dict[str, float] | None,
                 seed: int | None = None):
        self.num_frames, self.frame_stride, self.resolution = num_frames, frame_stride, resolution
        self.augment = augment
        self.seed = seed
        self.skipped = 0
        self._rng: np.random.Generator | None = None

    @property
    def rng(self) -> np.random.Generator:
        """Frame and crop draws; made on first use, inside the worker, so each rank and worker differ."""
        if self._rng is None:
            entropy = None if self.seed is None else [self.seed, wds.utils.pytorch_worker_seed()]
            self._rng = np.random.default_rng(entropy)
        return self._rng

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = sample.get("__key__", "?")
        try:
            meta = json.loads(sample["json"])
            instruction = str(meta["instruction"])
            source, target = _frames(sample, "src"), _frames(sample, "tgt")
            if source.shape != target.shape:
                raise ValueError(f"source {source.shape} and target {target.shape} differ")
        except (KeyError, ValueError, VideoError, json.JSONDecodeError, UnicodeDecodeError) as err:
            self.skipped += 1
            log.warning("skipping corrupt sample %s (%s); %d skipped so far", key, err, self.skipped)
            return None
        index = sample_frames(len(source), self.num_frames, self.frame_stride, self.rng)
        source, target = source[index], target[index]
        h, w = source.shape[1:3]
        if self.augment:
            boxes = crop_windows(self.num_frames, h, w, self.rng, **self.augment)
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


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "source": torch.stack([s["source"] for s in samples]),
        "target": torch.stack([s["target"] for s in samples]),
        "instruction": [s["instruction"] for s in samples],
        "key": [s["key"] for s in samples],
    }


class ShardDataModule(L.LightningDataModule):
    """Clip pairs streamed from WebDataset shards.

    Args:
        shards: training shards: a path, folder, glob or brace pattern.
        val_shards: optional validation shards (no augmentation).
        num_frames: frames per training clip; frame_stride: step between them.
        resolution: square training size in pixels.
        batch_size: clips per batch (per device).
        num_workers: decoding processes.
        shuffle_buffer: samples mixed in the shuffle buffer.
        batches_per_epoch: batches that make an epoch (the stream is resampled, endless).
        val_batches: validation batches per validation run.
        augment: identical moving-crop/zoom augmentation of source and target.
        translate_prob, max_translate, zoom_prob, max_zoom: its parameters (SPEC §5).
        stream_seed: makes the stream replayable (shard draws, shuffle, frames, crops; each rank and
            worker its own). ``None`` takes Lightning's global seed (``seed_everything``) when one
            is set, else the stream is fresh on every run. A resumed run starts the stream afresh.
    """

    def __init__(
        self,
        shards: str = "",
        val_shards: str | None = None,
        num_frames: int = 8,
        frame_stride: int = 1,
        resolution: int = 32,
        batch_size: int = 2,
        num_workers: int = 0,
        shuffle_buffer: int = 64,
        batches_per_epoch: int = 100,
        val_batches: int = 2,
        augment: bool = True,
        translate_prob: float = 0.7,
        max_translate: float = 0.2,
        zoom_prob: float = 0.2,
        max_zoom: float = 1.25,
        stream_seed: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.decoders: list[PairDecoder] = []

    def _augment(self) -> dict[str, float] | None:
        hp = self.hparams
        if not hp.augment:
            return None
        return dict(
            translate_prob=hp.translate_prob, max_translate=hp.max_translate, zoom_prob=hp.zoom_prob, max_zoom=hp.max_zoom
        )

    def _seed(self) -> int | None:
        if self.hparams.stream_seed is not None:
            return int(self.hparams.stream_seed)
        global_seed = os.environ.get("PL_GLOBAL_SEED")  # written by lightning.seed_everything
        return int(global_seed) if global_seed is not None else None

    def _loader(self, pattern: str, augment: dict[str, float] | None, batches: int) -> wds.WebLoader:
        hp = self.hparams
        seed = self._seed()
        decoder = PairDecoder(hp.num_frames, hp.frame_stride, hp.resolution, augment, seed)
        self.decoders.append(decoder)
        dataset = wds.DataPipeline(
            # endless draws of shards; seeded per rank and worker, and per pass over the loader
            wds.ResampledShards(expand_shards(pattern), seed=seed or 0, deterministic=seed is not None, empty_check=False),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),  # an unreadable tar member is skipped
            wds.shuffle(hp.shuffle_buffer, rng=None if seed is None else random.Random(seed)),
            wds.map(decoder),
            wds.select(lambda sample: sample is not None),
            wds.batched(hp.batch_size, collation_fn=collate, partial=False),
        )
        # persistent workers keep their stream's position: a respawned worker would replay it
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=hp.num_workers,
                               persistent_workers=hp.num_workers > 0)
        return loader.with_epoch(batches)

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped in this process (each worker process warns for its own)."""
        return sum(d.skipped for d in self.decoders)

    def setup(self, stage: str | None = None) -> None:
        expand_shards(self.hparams.shards)  # fail early with a clear message
        if self.hparams.val_shards:
            expand_shards(self.hparams.val_shards)

    def train_dataloader(self):
        return self._loader(self.hparams.shards, self._augment(), self.hparams.batches_per_epoch)

    def val_dataloader(self):
        if not self.hparams.val_shards:
            return []
        return self._loader(self.hparams.val_shards, None, self.hparams.val_batches)
