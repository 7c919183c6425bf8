"""The latent cache: `synth cache` shards, training on them without the VAE or text encoder, equal steps."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from shard_fixtures import write_shards

from infer import InsV2VPipeline
from shards.pairs import PairDecoder
from shards.cache import CacheInfo, CachedDecoder
from model import load_editor
from synth.cache import cache
from train import EditorModule, ShardDataModule
from train.data import collate
from guards import HANG_GUARD

ROOT = Path(__file__).resolve().parents[1]
FRAMES, SIZE = 6, 32


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    write_shards(folder, 7, per_shard=3, frames=FRAMES, size=SIZE, corrupt_keys=(4,))
    return folder


@pytest.fixture(scope="module")
def cached(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "latents"
    result = cache(str(raw), "tiny", out, num_frames=FRAMES, resolution=SIZE, samples_per_shard=4, progress=False)
    assert result.cached == 6 and result.skipped == 1  # the corrupt sample is skipped, not cached
    return out


def samples_of(folder: Path) -> dict[str, dict]:
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return {s["__key__"]: s for s in wds.tarfile_to_samples()({"url": u} for u in urls)}


def batches(raw: Path, cached: Path, keys: list[str]):
    """The same clips as raw frames (decoded as training decodes them, no augmentation) and cached."""
    raw_samples, cached_samples = samples_of(raw), samples_of(cached)
    decoder = PairDecoder(FRAMES, 1, SIZE, None)
    cached_decoder = CachedDecoder(cached, FRAMES)
    rng = np.random.default_rng(0)
    return (collate([decoder(raw_samples[k], rng) for k in keys]),
            collate([cached_decoder(cached_samples[k], rng) for k in keys]))


def test_a_step_on_cached_latents_equals_the_step_on_raw_clips(raw, cached):
    keys = sorted(samples_of(cached))[:3]
    raw_batch, cached_batch = batches(raw, cached, keys)
    assert "source" not in cached_batch and cached_batch["text"].shape == (3, 77, 32)
    # text dropout often, so the cached empty prompt is used too
    settings = dict(editor="tiny", trainable="all", drop_text=0.4, drop_both=0.2, drop_video=0.2, lr=1e-3)
    with_encoders = EditorModule(**settings)
    without = EditorModule(**settings, cached_latents=True)
    assert without.vae is None and without.editor.vae.device.type == "meta"  # no VAE weights were read
    grads, losses = {}, {}
    for module, batch in ((with_encoders, raw_batch), (without, cached_batch)):
        params = module.trainable_parameters()
        # SGD: AdamW's first steps move every weight by about lr whatever the gradient's size, so
        # they would turn float rounding (batched vs one-by-one encoding) into lr-sized differences
        optimizer = torch.optim.SGD(params.values(), lr=1e-2)
        losses[module], grads[module] = [], {}
        for seed in range(3):
            loss = module.loss(batch, torch.Generator().manual_seed(seed))
            loss.backward()
            if seed == 0:
                grads[module] = {k: p.grad.clone() for k, p in params.items()}
            optimizer.step()
            optimizer.zero_grad()
            losses[module].append(loss.item())
    assert np.allclose(losses[with_encoders], losses[without], rtol=0, atol=1e-5), losses
    a, b = grads[with_encoders], grads[without]
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    a, b = with_encoders.trainable_parameters(), without.trainable_parameters()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    # and the cache is not a copy of the raw step's inputs by accident: another clip gives another loss
    other, _ = batches(raw, cached, sorted(samples_of(cached))[3:6])
    assert abs(with_encoders.loss(other, torch.Generator().manual_seed(0)).item()
               - with_encoders.loss(raw_batch, torch.Generator().manual_seed(0)).item()) > 1e-6


def _arrays(folder: Path) -> dict[str, bytes]:
    """Every cached member's bytes, by name, across all shards."""
    out = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                out[member.name] = tar.extractfile(member).read()
    return out


def test_ranks_split_the_samples_and_a_resume_writes_what_one_run_would(raw, cached, tmp_path):
    whole = _arrays(cached)
    two = tmp_path / "two"
    for rank in (0, 1):
        cache(str(raw), "tiny", two, num_frames=FRAMES, resolution=SIZE, samples_per_shard=2, rank=rank, world=2,
              progress=False)
    assert _arrays(two) == whole  # disjoint slices, together every readable sample, bit for bit
    resumed = tmp_path / "resumed"
    first = cache(str(raw), "tiny", resumed, num_frames=FRAMES, resolution=SIZE, samples_per_shard=4, num_samples=2,
                  progress=False)
    assert first.cached == 2
    with pytest.raises(ValueError, match="pass --resume"):
        cache(str(raw), "tiny", resumed, num_frames=FRAMES, resolution=SIZE, samples_per_shard=4, progress=False)
    cache(str(raw), "tiny", resumed, num_frames=FRAMES, resolution=SIZE, samples_per_shard=4, resume=True, progress=False)
    assert _arrays(resumed) == whole
    with pytest.raises(ValueError, match="another config"):
        cache(str(raw), "tiny", resumed, num_frames=4, resolution=SIZE, resume=True, progress=False)
    with pytest.raises(ValueError, match="built by 1 ranks"):
        cache(str(raw), "tiny", resumed, num_frames=FRAMES, resolution=SIZE, samples_per_shard=4, resume=True,
              rank=0, world=2, progress=False)


def test_the_datamodule_reads_windows_of_the_cache_and_checks_its_settings(cached):
    dm = ShardDataModule(cached=str(cached), num_frames=4, resolution=SIZE, batch_size=2, batches_per_epoch=3,
                         stream_seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["tgt_mean"].shape == (2, 4, 4, SIZE // 2, SIZE // 2)  # (B, c, F, h, w): 4 of the 6 frames
    assert batch["empty_text"].shape == (2, 77, 32) and len(batch["instruction"]) == 2
    with pytest.raises(ValueError, match="set data.resolution 32"):
        ShardDataModule(cached=str(cached), resolution=64)
    with pytest.raises(ValueError, match="exceeds the 6 frames"):
        ShardDataModule(cached=str(cached), num_frames=8, resolution=SIZE)
    with pytest.raises(ValueError, match="set only data.cached"):
        ShardDataModule(cached=str(cached), shards="x.tar", resolution=SIZE, num_frames=4)
    with pytest.raises(ValueError, match="not a latent cache"):
        ShardDataModule(cached=str(cached.parent), resolution=SIZE)
    info = CacheInfo.read(cached)
    with pytest.raises(ValueError, match="another kind of editor: 8 latent channels"):
        CacheInfo(**{**info.__dict__, "latent_channels": 8}).check_editor(4, 0.18215, 32, 77)


def synth(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synth", *args], capture_output=True, text=True, timeout=HANG_GUARD, cwd=cwd)


@pytest.mark.parametrize("editor", ["tiny", "wan-tiny"])
def test_lightning_fit_on_the_cache_exports_an_editor_that_edits(raw, tmp_path, editor):
    """For the U-Net editor, and for the DiT (Wan VAE posteriors and UMT5 states, 5-frame causal clips)."""
    frames = "4" if editor == "tiny" else "5"
    model = [] if editor == "tiny" else ["--model.editor", editor, "--model.objective", "flow"]
    made = synth("cache", str(raw), "--out", "latents", "--editor", editor, "--num-frames", frames, "--resolution",
                 str(SIZE), "--quiet", cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "train", "fit", "--config", str(ROOT / "configs/tiny.yaml"), *model,
                           "--data.cached", "latents", "--data.num_frames", frames, "--trainer.max_steps", "2",
                           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "run"],
                          capture_output=True, text=True, timeout=HANG_GUARD, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and not any(k.startswith("vae.") for k in checkpoint["state_dict"])
    # the exported editor has the real VAE back (read from the spec at export), and edits from Python
    exported = next((tmp_path / "run").rglob("editor/model_index.json")).parent
    pipe = InsV2VPipeline.from_pretrained(exported)
    tiny_vae = load_editor(editor).vae.state_dict()
    assert all(torch.equal(v, tiny_vae[k]) for k, v in pipe.editor.vae.state_dict().items())
    frames = np.random.default_rng(0).integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8)
    edited = pipe(frames, "make the square red", num_inference_steps=2, progress=False).frames
    assert edited.shape == frames.shape
    from_checkpoint = InsV2VPipeline.from_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert from_checkpoint.editor.vae.device.type == "cpu"


def test_cache_input_errors_are_one_line(raw, tmp_path):
    pixel = synth("cache", str(raw), "--out", "x", "--editor", "tiny-pixel", cwd=tmp_path)
    assert pixel.returncode == 2 and "pixel space" in pixel.stderr and "Traceback" not in pixel.stderr
    missing = synth("cache", str(tmp_path / "nothing"), "--out", "x", cwd=tmp_path)
    assert missing.returncode == 2 and "no shards match" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "x").exists()  # nothing written
    cached = tmp_path / "c"
    assert synth("cache", str(raw), "--out", str(cached), "--num-frames", "4", "--resolution", str(SIZE), "--quiet",
                 cwd=tmp_path).returncode == 0
    fit = subprocess.run([sys.executable, "-m", "train", "fit", "--config", str(ROOT / "configs/tiny.yaml"),
                          "--data.cached", str(cached), "--data.resolution", "64", "--trainer.max_steps", "1"],
                         capture_output=True, text=True, timeout=HANG_GUARD, cwd=tmp_path)
    assert fit.returncode == 2 and "set data.resolution 32" in fit.stderr and "Traceback" not in fit.stderr
