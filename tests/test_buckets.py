"""Aspect and length buckets: each clip its nearest bucket without upscaling, one bucket per batch,
landscape, portrait and image clips trained in one run that resumes exactly."""

from __future__ import annotations

import io
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image

from shards.augment import crop_windows
from shards.buckets import Bucket, nearest_bucket, parse_buckets
from shards.schema import pair_sample, sample_key, shard_name, tar_bytes
from train import EditorModule, ShardDataModule

BUCKETS = [[9, 32, 48], [9, 48, 32], [5, 32, 32], [1, 32, 32]]


def test_each_clip_takes_its_nearest_bucket_without_upscaling():
    buckets = [Bucket(81, 480, 832), Bucket(81, 832, 480), Bucket(33, 480, 832), Bucket(1, 480, 480)]
    assert nearest_bucket(buckets, 101, 720, 1280) == 0  # Ditto-1M landscape: Lucy's 480x832, the longest
    assert nearest_bucket(buckets, 101, 1280, 720) == 1  # portrait
    assert nearest_bucket(buckets, 65, 720, 1280) == 2  # too short for 81 frames: the 33-frame bucket
    assert nearest_bucket(buckets, 101, 360, 640) is None  # every bucket would upscale it
    assert nearest_bucket(buckets, 1, 512, 512) == 3 and nearest_bucket(buckets, None, 720, 1280) == 0  # images
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        parse_buckets([[8, 32, 32]], temporal=4)
    with pytest.raises(ValueError, match="multiples of 16"):
        parse_buckets([[9, 40, 32]], temporal=4, multiple=16)


def test_a_window_of_the_buckets_shape_and_the_square_as_before():
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    boxes = crop_windows(5, 72, 128, rng(), aspect=48 / 32)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert np.allclose(widths / heights, 1.5) and (boxes[:, 0] >= -1e-9).all() and (boxes[:, 2] <= 128 + 1e-9).all()
    assert np.array_equal(crop_windows(5, 72, 128, rng()), crop_windows(5, 72, 128, rng(), aspect=1.0))


def clip(frames: int, height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // width), (y * 255 // height), np.full_like(x, 90)], -1).astype(np.uint8)
    src = np.stack([np.roll(base, 2 * t + int(rng.integers(5)), axis=1) for t in range(frames)])
    tgt = src.copy()
    tgt[..., 2] = 200
    return src, tgt


def write_mixed_shards(folder: Path) -> Path:
    """Landscape and portrait 9-frame clips, 5-frame clips and single image pairs, mixed in shards."""
    folder.mkdir(parents=True)
    samples = []
    shapes = [(9, 40, 64), (9, 64, 40), (5, 36, 36), (1, 40, 40)] * 4
    for index, (frames, h, w) in enumerate(shapes):
        src, tgt = clip(frames, h, w, index)
        meta = {"input_caption": None, "instruction": f"edit {index}", "output_caption": None, "num_frames": frames,
                "height": h, "width": w, "fps": 8, "seed": index, "source": "test", "generator": {}, "clip": None}
        if frames == 1:
            def png(a):
                buffer = io.BytesIO()
                Image.fromarray(a[0]).save(buffer, format="PNG")
                return buffer.getvalue()
            sample = {"__key__": sample_key(0, index), "src.png": png(src), "tgt.png": png(tgt), "json": json.dumps(meta).encode()}
        else:
            sample = pair_sample(sample_key(0, index), src, tgt, meta, "mp4", 8)
        samples.append(sample)
    for shard in range(4):
        (folder / shard_name("pairs", 0, shard)).write_bytes(tar_bytes(samples[shard * 4:(shard + 1) * 4]))
    return folder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return write_mixed_shards(tmp_path_factory.mktemp("buckets") / "shards")


def test_every_batch_is_one_bucket_and_every_bucket_is_used(mixed):
    dm = ShardDataModule(shards=str(mixed), buckets=BUCKETS, batch_size=2, batches_per_epoch=24, augment=True,
                         image_clips="single", stream_seed=0, shuffle_buffer=8)
    shapes = [tuple(batch["source"].shape[1:]) for batch in dm.train_dataloader()]
    assert len(shapes) == 24
    assert set(shapes) == {(3, 9, 32, 48), (3, 9, 48, 32), (3, 5, 32, 32), (3, 1, 32, 32)}


def fit(root: Path, shards: Path, steps: int, ckpt_path: str | None = None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    module = EditorModule(editor="wan-tiny", trainable="lora", lora_rank=4, objective="flow", lr=1e-3)
    seen = []
    real = module.loss
    module.loss = lambda batch, generator: seen.append((tuple(batch["source"].shape), batch["key"])) or real(batch, generator)
    dm = ShardDataModule(shards=str(shards), buckets=BUCKETS, batch_size=2, batches_per_epoch=3, augment=True,
                         image_clips="single", shuffle_buffer=8)
    L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=root, callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True,
                                                                every_n_train_steps=1)]).fit(module, dm, ckpt_path=ckpt_path)
    return module, seen


def test_landscape_portrait_and_image_clips_train_in_one_run_that_resumes_exactly(tmp_path, mixed):
    straight, batches = fit(tmp_path / "a", mixed, 6)
    assert len({shape[2:] for shape, _ in batches}) >= 3  # several buckets within six steps
    _, first = fit(tmp_path / "b", mixed, 3)
    resumed, then = fit(tmp_path / "b", mixed, 6, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    # resumed exactly at an epoch's end (3 batches an epoch): the next epoch's data, not the one after it
    assert first + then == batches
    a = {k: p for k, p in straight.transformer.named_parameters() if p.requires_grad}
    b = dict(resumed.transformer.named_parameters())
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_a_bucket_the_editor_cannot_take_is_refused_before_training(tmp_path, mixed):
    module = EditorModule(editor="wan-tiny", trainable="lora", lora_rank=4, objective="flow")
    dm = ShardDataModule(shards=str(mixed), buckets=[[8, 32, 32]], batch_size=2)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                  default_root_dir=tmp_path).fit(module, dm)


def test_a_cache_records_each_clips_bucket_and_trains_in_them(tmp_path, mixed):
    from synth.cache import cache
    from synth.cli import main

    cache(str(mixed), "wan-tiny", tmp_path / "latents", image_clips="single", buckets=BUCKETS, samples_per_shard=4,
          progress=False)
    info = json.loads((tmp_path / "latents" / "cache.json").read_text())
    assert info["buckets"] == BUCKETS
    dm = ShardDataModule(cached=str(tmp_path / "latents"), batch_size=2, batches_per_epoch=8, stream_seed=0)
    shapes = {tuple(batch["tgt_mean"].shape[2:]) for batch in dm.train_dataloader()}
    # latents of 9 frames at 32x48 and 48x32, 5 frames at 32x32 and images (VAE: 4x in time, 8x in space)
    assert shapes == {(3, 4, 6), (3, 6, 4), (2, 4, 4), (1, 4, 4)}
    module = EditorModule(editor="wan-tiny", trainable="lora", lora_rank=4, objective="flow", cached_latents=True)
    L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(module, dm)
    with pytest.raises(ValueError, match="differ from the buckets"):
        ShardDataModule(cached=str(tmp_path / "latents"), buckets=[[9, 32, 48]])
    assert main(["cache", str(mixed), "--editor", "wan-tiny", "--out", str(tmp_path / "bad"), "--buckets", "[[8, 32, 32]]",
                 "--quiet"]) == 2
