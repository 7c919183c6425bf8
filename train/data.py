"""WebDataset DataModule: (source, target, instruction) clips from shards of the format in docs/shards.md."""

from __future__ import annotations

import itertools
import logging
import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds

from shards.augment import AUGMENTATION
from shards.buckets import Bucket, parse_buckets
from shards.pairs import IMAGE_CLIPS, PairDecoder
from shards.schema import SampleSkips, expand_shards
from shards.cache import CachedDecoder

log = logging.getLogger(__name__)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch of decoded samples: tensors stacked, numbers as a tensor, texts as lists. Clips of
    different lengths (one-frame image pairs beside video clips, ``image_clips: single``) become
    ``groups``, one sub-batch per length, with the texts and numbers of the whole batch beside them."""
    lengths = {s["source"].shape[1] for s in samples if isinstance(s.get("source"), torch.Tensor)}
    if len(lengths) > 1:
        groups = [collate([s for s in samples if s["source"].shape[1] == n]) for n in sorted(lengths)]
        ordered = [s for n in sorted(lengths) for s in samples if s["source"].shape[1] == n]
        whole = collate([{k: v for k, v in s.items() if not isinstance(v, torch.Tensor)} for s in ordered])
        return {**whole, "groups": groups}
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch


def drawn_in(window: tuple[int, int | None], epoch: int) -> bool:
    """Whether a source with epoch window ``(from_epoch, until_epoch)`` is drawn in ``epoch``:
    from_epoch <= epoch < until_epoch (no upper bound when until_epoch is None)."""
    first, until = window
    return first <= epoch and (until is None or epoch < until)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


class PairStream(torch.utils.data.IterableDataset):
    """One epoch of batches of decoded pairs, drawn shard by shard through a shuffle buffer.

    The epoch's ``batches`` are split among the loader's workers as the loader takes them (batch
    ``i`` from worker ``i % workers``). Each worker's stream is a pure function of (seed, rank,
    worker, ``epoch``), and each sample's frame and crop draws a function of its position in it.
    A pass that starts after ``first_batch`` batches of its epoch (a resumed run) lets worker ``k``
    play worker ``(k + first_batch) % workers``, skipping the raw samples ``skip`` says that worker
    consumed (read, not decoded): it yields exactly the batches an uninterrupted pass would have
    yielded from there on. Every batch carries ``stream`` = (worker, epoch, raw samples consumed).
    The owner sets ``epoch``, ``first_batch`` and ``skip`` before each pass; workers are started
    anew for every pass, so they see them.
    """

    def __init__(self, sources: list[tuple[list[str], float, tuple[int, int | None]]], decoder: PairDecoder, batch_size: int,
                 shuffle_buffer: int, seed: int, batches: int, buckets: list[Bucket] | None = None):
        super().__init__()
        self.sources, self.decoder, self.batch_size, self.shuffle_buffer = sources, decoder, batch_size, shuffle_buffer
        self.seed, self.batches, self.buckets = seed, batches, buckets
        self.epoch, self.first_batch, self.skip = 0, 0, {}
        self.unbucketed = SampleSkips("sample (no bucket fits it)")

    def _source_samples(self, urls: list[str], worker: int, epoch: int, index: int):
        """One source's endless raw samples: shards drawn with replacement, then a shuffle buffer.
        (Source 0 keeps the seeds of a single-source stream.)"""
        tag = () if index == 0 else (index,)
        shard_rng = random.Random(wds.utils.make_seed(self.seed, worker, epoch, 0, *tag))
        shards = ({"url": urls[shard_rng.randrange(len(urls))]} for _ in itertools.count())
        samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)(shards)  # an unreadable member is skipped
        shuffle_rng = random.Random(wds.utils.make_seed(self.seed, worker, epoch, 1, *tag))
        return wds.shuffle(self.shuffle_buffer, rng=shuffle_rng)(samples)

    def _mixed(self, worker: int, epoch: int):
        """``(source index, raw sample)``: each sample's source drawn by weight, from its own stream,
        among the sources whose epoch window holds this epoch."""
        active = [i for i, (_, _, window) in enumerate(self.sources) if drawn_in(window, epoch)]
        streams = {i: self._source_samples(self.sources[i][0], worker, epoch, i) for i in active}
        if len(active) == 1:
            yield from ((active[0], sample) for sample in streams[active[0]])
            return
        weights = [self.sources[i][1] for i in active]
        pick = random.Random(wds.utils.make_seed(self.seed, worker, epoch, 2))
        while True:
            index = pick.choices(active, weights)[0]
            yield index, next(streams[index])

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        index, count = (info.id, info.num_workers) if info is not None else (0, 1)
        role = (index + self.first_batch) % count  # the worker whose batches this one continues
        worker, epoch = _rank() * 1000 + role, self.epoch
        limit = len(range(self.first_batch + index, self.batches, count))
        if limit == 0:
            return
        skip = self.skip.get(worker, 0)
        if self.buckets is not None:
            yield from self._bucketed(worker, epoch, skip, limit)
            return
        batch, made = [], 0
        for position, (source_index, sample) in enumerate(self._mixed(worker, epoch)):
            if position < skip:
                continue
            item = self.decoder(sample, np.random.default_rng([self.seed, worker, epoch, position]))
            if item is None:
                continue
            batch.append({**item, "source_index": source_index})
            if len(batch) == self.batch_size:
                yield {**collate(batch), "stream": torch.tensor([worker, epoch, position + 1])}
                batch, made = [], made + 1
                if made == limit:
                    return


    def _bucketed(self, worker: int, epoch: int, skip: int, limit: int):
        """Batches of one bucket each: raw samples wait in their bucket (chosen from their
        description: :func:`shards.buckets.nearest_bucket`) until it holds a batch, which is then
        decoded. A batch is a pure function of the descriptions before it, so a resumed pass
        rebuilds the waiting samples by reading (not decoding) those before ``skip``."""
        pending: dict[int, list] = {}
        made = 0
        decoder = self.decoder
        for position, (source_index, sample) in enumerate(self._mixed(worker, epoch)):
            bucket = decoder.bucket_of(sample, self.buckets)
            if bucket is None:
                if position >= skip:
                    self.unbucketed.skip(sample.get("__key__", "?"), ValueError("no bucket fits its shape"))
                continue
            group = pending.setdefault(bucket, [])
            group.append((position, source_index, sample))
            if len(group) < self.batch_size:
                continue
            pending[bucket] = []
            if position < skip:  # trained on before the resume
                continue
            items = []
            for at, index, raw in group:
                item = decoder(raw, np.random.default_rng([self.seed, worker, epoch, at]), self.buckets[bucket])
                if item is not None:
                    items.append({**item, "source_index": index})
            if not items:
                continue
            yield {**collate(items), "stream": torch.tensor([worker, epoch, position + 1])}
            made += 1
            if made == limit:
                return


class EpochLoader(torch.utils.data.DataLoader):
    """A loader of one epoch of a :class:`PairStream` per iteration: ``plan()`` gives the pass's
    ``(epoch, first_batch, skip)`` just before its workers start."""

    def __init__(self, stream: PairStream, plan, num_workers: int):
        # workers start anew each pass (not persistent) so they see the plan the main process set
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)
        self.plan = plan

    def __iter__(self):
        stream = self.dataset
        stream.epoch, stream.first_batch, stream.skip = self.plan()
        return super().__iter__()

    def __len__(self) -> int:
        return self.dataset.batches


class ShardDataModule(L.LightningDataModule):
    """Clip pairs streamed from WebDataset shards.

    Args:
        shards: training shards: a path, folder, glob or brace pattern.
        sources: several training shard sets mixed by weight instead of ``shards``:
            ``[{shards: ..., weight: 0.7, name: video}, {shards: ..., weight: 0.3}]`` (each sample's
            source is drawn by weight; names default to ``source0``, ``source1``...). The samples
            trained on per source are counted (``source_counts``, logged as ``data/samples_<name>``).
            A curriculum: ``from_epoch`` (default 0) and ``until_epoch`` (exclusive, default never)
            limit a source to those epochs of ``batches_per_epoch`` batches; every epoch needs one.
        val_shards: optional validation shards (no augmentation).
        num_frames: frames per training clip; frame_stride: step between them.
        resolution: square training size in pixels.
        batch_size: clips per batch (per device).
        num_workers: decoding processes.
        shuffle_buffer: samples mixed in the shuffle buffer.
        batches_per_epoch: batches that make an epoch (the stream is resampled, endless).
        val_batches: validation batches per validation run.
        augment: identical moving-crop/zoom augmentation of source and target.
        translate_prob, max_translate, zoom_prob, max_zoom: its parameters (defaults: the InsV2V reference recipe).
        image_clips: how a single-frame pair (an image edit: ``src.png``/``tgt.png``, or a one-frame
            clip) becomes a training clip: ``camera`` (a random camera path filming both, drawn
            per read), ``repeat`` (the frame repeated) or ``single`` (it stays a one-frame clip,
            trained beside the video clips of its batch: a DiT's causal VAE encodes it as one latent
            frame). Mix image and video shard sets with ``sources`` and their weights.
        cached: a latent cache folder made by ``synth cache`` to train on instead of ``shards``: the
            target's VAE posterior, the source latent and the text states of every clip, encoded
            once, so no step runs the VAE or the text encoder (and ``lightning fit`` does not load
            the VAE). Clips were cropped and sized when cached: ``resolution`` must be the cache's,
            ``num_frames`` at most its frames (a random window of them is drawn per read), and the
            motion augmentation (a pixel-space crop) does not apply.
        buckets: train in shapes ``[[frames, height, width], ...]`` instead of ``num_frames`` square
            ``resolution`` clips: each clip takes the bucket nearest its aspect ratio among those it
            fills without upscaling (the longest, then the largest, on a tie), is resized and
            centre-cropped to it (motion augmentation moves a window of its shape), and every batch
            is one bucket's. Image pairs kept single go to one-frame buckets. Frames are ``1 + 4k``
            for a causal VAE and sides multiples of the editor's grid (checked when training
            starts). A resumed run goes on with exactly the batches an uninterrupted one makes. A
            latent cache made with ``synth cache --buckets`` trains in its own buckets.
        stream_seed: makes the stream replayable (shard draws, shuffle, frames, crops; each rank and
            worker its own). ``None`` takes Lightning's global seed (``seed_everything``) when one
            is set, else the stream is fresh on every run. A run resumed from a checkpoint goes on
            where the stream stopped (the position is saved in the checkpoint), not from its start.
    """

    def __init__(
        self,
        shards: str = "",
        sources: list[dict[str, Any]] | None = None,
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
        translate_prob: float = AUGMENTATION.translate_prob,
        max_translate: float = AUGMENTATION.max_translate,
        zoom_prob: float = AUGMENTATION.zoom_prob,
        max_zoom: float = AUGMENTATION.max_zoom,
        image_clips: str = "camera",
        cached: str | None = None,
        stream_seed: int | None = None,
        buckets: list[list[int]] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.decoders: list[PairDecoder] = []
        self._consumed: dict[str, Any] = {}
        self._before_latest: dict[str, Any] | None = None
        self._resumed: dict[str, Any] | None = None
        self._passes = 0
        self.source_counts: dict[str, int] = {name: 0 for name, *_ in self._sources()}
        if image_clips not in IMAGE_CLIPS:
            raise ValueError(f"data.image_clips must be one of {', '.join(IMAGE_CLIPS)}, got {image_clips!r}")
        self.buckets = parse_buckets(buckets) if buckets is not None else None
        self.cache_info = self._check_cache() if cached else None

    def _check_cache(self):
        """The cache's settings, checked against this module's (one line for what does not fit)."""
        from shards.cache import CacheInfo

        hp = self.hparams
        if hp.shards or hp.sources or hp.val_shards:
            raise ValueError("data.cached replaces data.shards, data.sources and data.val_shards: set only data.cached")
        info = CacheInfo.read(hp.cached)
        if info.buckets is not None or hp.buckets is not None:  # a bucketed cache trains in its own buckets
            if hp.buckets is not None and [list(b) for b in hp.buckets] != info.buckets:
                raise ValueError(f"data.buckets {hp.buckets} differ from the buckets {hp.cached} was cached in "
                                 f"({info.buckets}): set data.buckets to them, or cache again")
            if self.buckets is None:
                self.buckets = parse_buckets(info.buckets)
            return info
        if hp.resolution != info.resolution:
            raise ValueError(f"data.resolution is {hp.resolution} but {hp.cached} was cached at {info.resolution}: "
                             f"set data.resolution {info.resolution}")
        if hp.num_frames > info.num_frames:
            raise ValueError(f"data.num_frames {hp.num_frames} exceeds the {info.num_frames} frames cached in {hp.cached}")
        if hp.augment:
            log.info("data.cached: clips were cropped when cached; motion augmentation does not apply")
        return info

    def _sources(self) -> list[tuple[str, str, float, tuple[int, int | None]]]:
        """``(name, shards, weight, (from_epoch, until_epoch))`` of each training source."""
        hp = self.hparams
        always = (0, None)
        if hp.cached:
            return [("cached", hp.cached, 1.0, always)]
        if not hp.sources:
            return [("shards", hp.shards, 1.0, always)]
        if hp.shards:
            raise ValueError("set data.shards or data.sources, not both")
        out = []
        for i, source in enumerate(hp.sources):
            if not isinstance(source, dict) or not source.get("shards"):
                raise ValueError(f"data.sources[{i}] must be a mapping with shards (and weight, name)")
            unknown = set(source) - {"shards", "weight", "name", "from_epoch", "until_epoch"}
            if unknown:
                raise ValueError(f"data.sources[{i}] has unknown key(s) {', '.join(sorted(unknown))}")
            weight = float(source.get("weight", 1.0))
            if not weight > 0:
                raise ValueError(f"data.sources[{i}].weight must be positive, got {weight}")
            first, until = int(source.get("from_epoch") or 0), source.get("until_epoch")
            if first < 0 or (until is not None and int(until) <= first):
                raise ValueError(f"data.sources[{i}] needs 0 <= from_epoch < until_epoch, got {first} and {until}")
            out.append((str(source.get("name") or f"source{i}"), source["shards"], weight,
                        (first, None if until is None else int(until))))
        if len({name for name, *_ in out}) != len(out):
            raise ValueError("data.sources names must differ")
        bounds = {0} | {b for *_, window in out for b in window if b is not None}
        for epoch in sorted(bounds):  # the active set changes only at a bound: check each
            if not any(drawn_in(window, epoch) for *_, window in out):
                raise ValueError(f"data.sources: no source is drawn in epoch {epoch} (from_epoch/until_epoch leave a gap)")
        return out

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

    def _loader(self, patterns: list[tuple[str, float, tuple[int, int | None]]], augment: dict[str, float] | None, batches: int,
                training: bool = False) -> EpochLoader:
        hp = self.hparams
        seed = self._seed()
        if seed is None:  # a fresh stream, still consistent across this run's workers and epochs
            seed = random.SystemRandom().randrange(2**31)
        if hp.cached:
            decoder = CachedDecoder(hp.cached, hp.num_frames)
        else:
            decoder = PairDecoder(hp.num_frames, hp.frame_stride, hp.resolution, augment, hp.image_clips)
        self.decoders.append(decoder)
        sources = [(expand_shards(pattern), weight, window) for pattern, weight, window in patterns]
        stream = PairStream(sources, decoder, hp.batch_size, hp.shuffle_buffer, seed, batches, self.buckets)
        # validation sees the same batches every time; training passes follow the trainer's epoch
        return EpochLoader(stream, self._plan if training else lambda: (0, 0, {}), hp.num_workers)

    def _plan(self) -> tuple[int, int, dict[int, int]]:
        """The next training pass: its epoch (the passes made so far, counted on from a resumed
        checkpoint's epoch) and, the first time after a resume, the batches of that epoch already
        trained on and each worker's consumed samples. The stream's epochs are counted here, not
        read from the trainer: resumed at the end of an epoch, Lightning makes an empty pass for
        it and then skips an epoch number, which would skip that epoch's data."""
        epoch = self._passes
        self._passes += 1
        resumed, self._resumed = self._resumed, None
        if resumed and resumed.get("epoch") == epoch:
            return epoch, int(resumed["batches"]), {int(w): int(p) for w, p in resumed["positions"].items()}
        return epoch, 0, {}

    # ------------------------------------------------------------ the stream's position
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if "stream" in batch and trainer is not None and trainer.training:
            worker, epoch, consumed = (int(v) for v in batch["stream"])
            self._before_latest = self._copy(self._consumed)
            if self._consumed.get("epoch") != epoch:
                self._consumed = {"epoch": epoch, "batches": 0, "positions": {}}
            self._consumed["positions"][str(worker)] = consumed
            self._consumed["batches"] += 1
            names = list(self.source_counts)
            for index in batch.get("source_index", torch.zeros(0, dtype=torch.long)).tolist():
                self.source_counts[names[index]] += 1
            self._consumed["source_counts"] = dict(self.source_counts)
        return batch

    @staticmethod
    def _copy(state: dict[str, Any]) -> dict[str, Any]:
        return {k: dict(v) if isinstance(v, dict) else v for k, v in state.items()}

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the epoch, its batches trained on, each worker's raw samples
        consumed in it, and the samples trained on per source. A checkpoint written while a batch is
        in flight (an exception inside a step) leaves that batch out: the resumed run trains on it."""
        trainer = getattr(self, "trainer", None)
        progress = trainer.fit_loop.epoch_loop.batch_progress.current if trainer is not None else None
        if progress is not None and progress.processed < progress.ready and self._before_latest is not None:
            return self._copy(self._before_latest)
        return self._copy(self._consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._consumed = self._copy(state)
        self._before_latest = None
        self.source_counts.update(state.get("source_counts", {}))
        self._resumed = self._copy(state)
        self._passes = int(state.get("epoch", 0))  # the first pass after a resume finishes the saved epoch

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped in this process (each worker process warns for its own)."""
        return sum(d.skipped for d in self.decoders)

    def setup(self, stage: str | None = None) -> None:
        for _, pattern, *_ in self._sources():  # fail early with a clear message
            expand_shards(pattern)
        if self.hparams.val_shards:
            expand_shards(self.hparams.val_shards)

    def train_dataloader(self):
        patterns = [(pattern, weight, window) for _, pattern, weight, window in self._sources()]
        return self._loader(patterns, self._augment(), self.hparams.batches_per_epoch, training=True)

    def val_dataloader(self):
        if not self.hparams.val_shards:
            return []
        return self._loader([(self.hparams.val_shards, 1.0, (0, None))], None, self.hparams.val_batches)
