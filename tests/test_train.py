"""Training: objective math, data pipeline, trainable-only updates, checkpoints, resume, CLI, DDP."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
from shard_fixtures import write_shards

from infer import InsV2VPipeline
from model import Editor, source_prior_estimate
from train import EditorModule, ShardDataModule, apply_windows, crop_windows, dropout_masks, regression_target
from train.callbacks import EditSamples
from train.objective import sample_timesteps
from guards import HANG_GUARD

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, 6, per_shard=3)
    return folder


def trainer(tmp_path, max_steps, **kw):
    from lightning.pytorch.callbacks import ModelCheckpoint

    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)]
        + kw.pop("callbacks", []),
        **kw,
    )


def test_dropout_rates_match_the_configuration():
    u = torch.rand(400_000, generator=torch.Generator().manual_seed(0))
    for p_t, p_b, p_v in [(0.05, 0.05, 0.05), (0.1, 0.0, 0.2)]:
        text, video = dropout_masks(u, p_t, p_b, p_v)
        rates = [
            (text & ~video).float().mean(),
            (text & video).float().mean(),
            (~text & video).float().mean(),
        ]
        for got, want in zip(rates, (p_t, p_b, p_v)):
            assert abs(got.item() - want) < 0.003


def test_v_prediction_target_matches_the_scheduler():
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    clean, noise = torch.randn(2, 3, 4, 2, 5, 5)
    t = torch.tensor([10, 900, 400])
    want = sch.get_velocity(clean, noise, t)
    assert torch.allclose(regression_target("v_prediction", clean, noise, sch.alphas_cumprod[t]), want, atol=1e-6)
    assert torch.equal(regression_target("epsilon", clean, noise, sch.alphas_cumprod[t]), noise)
    assert torch.equal(regression_target("sample", clean, noise, sch.alphas_cumprod[t]), clean)


def test_crop_windows_move_linearly_inside_the_frame():
    rng = np.random.default_rng(0)
    for _ in range(200):
        boxes = crop_windows(8, 48, 64, rng)
        assert boxes[:, :2].min() >= -1e-6 and boxes[:, 2].max() <= 64 + 1e-6 and boxes[:, 3].max() <= 48 + 1e-6
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        assert np.allclose(np.diff(centres, 2, axis=0), 0, atol=1e-6)  # linear motion
    moved = [np.abs(crop_windows(8, 48, 64, np.random.default_rng(s))[-1] - crop_windows(8, 48, 64, np.random.default_rng(s))[0]).max() > 1 for s in range(50)]
    assert 0.4 < np.mean(moved) < 1.0
    frames = np.random.default_rng(1).integers(0, 255, (8, 48, 64, 3), dtype=np.uint8)
    boxes = crop_windows(8, 48, 64, np.random.default_rng(3), translate_prob=1.0)
    assert apply_windows(frames, boxes, 32).shape == (8, 32, 32, 3)
    # identity box: output is the (resized) frame itself
    same = apply_windows(frames[:, :32, :32], np.tile([0, 0, 32, 32], (8, 1)).astype(float), 32)
    assert np.abs(same.astype(int) - frames[:, :32, :32]).max() <= 1


@pytest.mark.parametrize("video_format", ["mp4", "npy"])
def test_datamodule_decodes_schema_shards(tmp_path, video_format):
    write_shards(tmp_path, 3, video_format=video_format)
    dm = ShardDataModule(shards=str(tmp_path / "*.tar"), num_frames=6, frame_stride=1, resolution=16, batch_size=2,
                         batches_per_epoch=3)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    batch = batches[0]
    assert batch["source"].shape == (2, 3, 6, 16, 16) and batch["target"].shape == (2, 3, 6, 16, 16)
    assert batch["source"].min() >= -1 and batch["source"].max() <= 1
    assert batch["instruction"] == ["make the square red"] * 2
    # same crop on source and target: the background (unchanged by the edit) agrees
    diff = (batch["source"] - batch["target"]).abs().amax(dim=1)
    assert (diff < 0.1).float().mean() > 0.5


def test_corrupt_member_is_skipped_and_counted(tmp_path):
    write_shards(tmp_path, 4, corrupt_keys=(1,))
    (tmp_path / "pairs-000-000009.tar").write_bytes(b"not a tar at all")
    # no shuffle buffer: 12 decoded clips need four reads of the good shard (three good clips each), so
    # its corrupt member is met whatever order the shards come in; a 64-clip buffer could hand out 12
    # clips without it, (3/4)^12 = 3 % of unseeded runs
    dm = ShardDataModule(shards=str(tmp_path), num_frames=4, resolution=16, batch_size=2, batches_per_epoch=6,
                         shuffle_buffer=1)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 6
    assert dm.skipped >= 3
    assert all("r000-000000001-s0" not in b["key"] for b in batches)


def test_missing_shards_are_a_clear_error(tmp_path):
    dm = ShardDataModule(shards=str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match="no shards match"):
        dm.setup("fit")


def _stream(shards, epochs=1, **kw):
    dm = ShardDataModule(shards=str(shards), num_frames=4, resolution=16, batch_size=2, batches_per_epoch=5,
                         shuffle_buffer=8, **kw)
    dm.setup("fit")
    loader = dm.train_dataloader()
    return [[(b["key"], b["source"]) for b in loader] for _ in range(epochs)]


def _same(a, b):
    return all(ka == kb and torch.equal(xa, xb) for (ka, xa), (kb, xb) in zip(a, b))


def test_seeded_stream_replays_per_seed_and_moves_on_per_epoch(shards, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    first, second = _stream(shards, epochs=2, stream_seed=5)
    assert _same(first, _stream(shards, stream_seed=5)[0])  # crops included: augmentation is on by default
    assert not _same(first, _stream(shards, stream_seed=6)[0])
    assert not _same(first, second)  # a later pass draws on, it does not replay
    with_workers = _stream(shards, epochs=2, stream_seed=5, num_workers=2)
    assert _same(with_workers[0], _stream(shards, stream_seed=5, num_workers=2)[0])
    assert not _same(with_workers[0], with_workers[1])  # persistent workers keep their place
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # what seed_everything(5) writes
    assert _same(first, _stream(shards)[0])


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_step_changes_only_trainable_weights(shards):
    module = EditorModule(editor="tiny", trainable="motion", lr=1e-2)
    dm = ShardDataModule(shards=str(shards), num_frames=4, resolution=32, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    before = _state(module)
    optimizer = torch.optim.AdamW(module.trainable_parameters().values(), lr=1e-2)
    module.loss(batch, torch.Generator().manual_seed(0)).backward()
    optimizer.step()
    after = _state(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    motion = {k for k in before if "motion_modules." in k and k.startswith("unet.")}
    assert changed and changed <= motion
    assert not any(p.grad is not None for n, p in module.named_parameters() if "motion_modules." not in n)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_a_half_precision_training_step(tmp_path, one_sample, precision):
    """Lightning's bfloat16 precisions train the editor; the loss is reduced in float32."""
    L.seed_everything(0)
    module = EditorModule(editor="tiny", trainable="motion", lr=1e-2, export_dir=str(tmp_path / "export"))
    losses = []
    real = module.loss

    def spy(batch, generator):
        loss = real(batch, generator)
        losses.append(loss)
        return loss

    module.loss = spy
    before = {k: v.float().clone() for k, v in module.unet.state_dict().items()}
    dm = ShardDataModule(shards=str(one_sample), num_frames=4, resolution=32, batch_size=2, augment=False)
    trainer(tmp_path, 2, precision=precision).fit(module, dm)
    assert losses and all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    after = module.unet.state_dict()
    moved = {k for k in before if not torch.equal(before[k].to(after[k].dtype), after[k])}  # bf16-true rounds all
    assert moved and all("motion_modules." in k for k in moved)


def _fit(tmp_path, shards, steps, ckpt_path=None, **module_kw):
    L.seed_everything(0)
    module = EditorModule(editor="tiny", trainable="all", lr=1e-3, warmup_steps=2, seed=3, export_dir=str(tmp_path / "export"), **module_kw)
    dm = ShardDataModule(shards=str(shards), num_frames=8, resolution=32, batch_size=2, augment=False, batches_per_epoch=100)
    trainer(tmp_path, steps).fit(module, dm, ckpt_path=ckpt_path)
    return module


@pytest.fixture(scope="module")
def one_sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one")
    write_shards(folder, 1)
    return folder


def test_resume_gives_the_same_weights(tmp_path, one_sample):
    straight = _fit(tmp_path / "a", one_sample, 4, ema_decay=0.9)
    _fit(tmp_path / "b", one_sample, 2, ema_decay=0.9)
    resumed = _fit(tmp_path / "b", one_sample, 4, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"), ema_decay=0.9)
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((straight.ema[k] - resumed.ema[k]).abs().max().item() for k in straight.ema) < 1e-6
    fresh = EditorModule(editor="tiny").unet.state_dict()
    assert max((a[k] - fresh[k]).abs().max().item() for k in a) > 1e-4  # it did train


def test_resume_continues_the_shuffled_augmented_stream(tmp_path, shards):
    """Multi-sample shards, shuffle and augmentation on: 4 steps in one run equal 2 steps, a
    resume from the last checkpoint, and 2 more, across an epoch boundary (3 batches an epoch)."""
    def fit(root, steps, ckpt_path=None):
        L.seed_everything(0)
        module = EditorModule(editor="tiny", trainable="all", lr=1e-3, warmup_steps=2, seed=3)
        dm = ShardDataModule(shards=str(shards), num_frames=4, resolution=16, batch_size=2, augment=True,
                             shuffle_buffer=8, batches_per_epoch=3)
        seen = []
        real = module.loss
        module.loss = lambda batch, generator: seen.append(batch["key"]) or real(batch, generator)
        trainer(root, steps).fit(module, dm, ckpt_path=ckpt_path)
        return module, seen

    straight, keys = fit(tmp_path / "a", 4)
    _, first = fit(tmp_path / "b", 2)
    resumed, then = fit(tmp_path / "b", 4, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert first + then == keys
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    state = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["ShardDataModule"]["epoch"] == 1  # the stream's place is in the checkpoint


def test_checkpoint_is_small_loads_and_edits(tmp_path, one_sample):
    L.seed_everything(0)
    module = EditorModule(editor="tiny", trainable="motion", lr=1e-3, export_dir=str(tmp_path / "export"))
    dm = ShardDataModule(shards=str(one_sample), num_frames=8, resolution=32, batch_size=2, augment=False)
    trainer(tmp_path, 2).fit(module, dm)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert set(ckpt["state_dict"]) == {f"unet.{k}" for k, p in module.unet.named_parameters() if p.requires_grad}
    pipe = InsV2VPipeline.from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    trained = module.unet.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in pipe.editor.unet.state_dict().items())
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    assert pipe(frames, "make the square red", num_inference_steps=2, progress=False).frames.shape == frames.shape
    exported = Editor.from_pretrained(tmp_path / "export")
    assert all(torch.equal(v, trained[k]) for k, v in exported.unet.state_dict().items())


def test_ema_is_exported(tmp_path, one_sample):
    module = _fit(tmp_path, one_sample, 3, ema_decay=0.5)
    exported = Editor.from_pretrained(tmp_path / "export").unet.state_dict()
    ema = {k.removeprefix("unet."): v for k, v in module.ema.items()}
    assert set(ema) == {k for k, _ in module.unet.named_parameters()}
    assert all(torch.allclose(exported[k], v.to(exported[k].dtype)) for k, v in ema.items())
    live = module.unet.state_dict()
    assert any(not torch.equal(exported[k], live[k]) for k in ema)  # the live weights stay


def test_edit_samples_are_written(tmp_path, one_sample):
    from lightning.pytorch.loggers import CSVLogger

    module = EditorModule(editor="tiny", trainable="motion")
    dm = ShardDataModule(shards=str(one_sample), val_shards=str(one_sample), num_frames=4, resolution=32, batch_size=1,
                         batches_per_epoch=2, val_batches=1)
    t = trainer(tmp_path, 2, callbacks=[EditSamples(every_n_steps=1, num_inference_steps=2)])
    t.loggers = [CSVLogger(tmp_path, name="logs")]
    t.fit(module, dm)
    assert "val/loss" in t.callback_metrics  # the validation shards were used
    samples = sorted((tmp_path / "logs").rglob("samples/*.mp4"))
    from infer import read_video

    assert samples and read_video(samples[0]).shape == (4, 32, 96, 3)  # source | edited | target


def run(args, timeout=HANG_GUARD, **env):
    return subprocess.run(
        [sys.executable, "-m", "train", *args], capture_output=True, text=True, timeout=timeout, cwd=env.pop("cwd"),
        env={**os.environ, "WANDB_MODE": "offline", **env},
    )


def test_cli_fit_print_config_and_rerun(tmp_path, shards):
    config = str(ROOT / "configs" / "tiny.yaml")
    printed = run(["fit", "--config", config, "--print_config"], cwd=tmp_path)
    assert printed.returncode == 0 and "editor: tiny" in printed.stdout
    args = ["fit", "--config", config, "--data.shards", f"{shards}/*.tar", "--trainer.max_steps", "2",
            "--trainer.enable_progress_bar", "false", "--data.num_frames", "4"]
    proc = run(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "outputs/train-tiny/checkpoints/last.ckpt").is_file()
    # a second run into the same folder, resuming from the last checkpoint
    resumed = run(args + ["--trainer.max_steps", "3", "--ckpt_path", "last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(tmp_path / "outputs/train-tiny/checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    assert (tmp_path / "outputs/train-tiny/logs/version_1/editor/model_index.json").is_file()
    # another run, another root: its checkpoints and logs follow it, the first run's are untouched
    before = (tmp_path / "outputs/train-tiny/checkpoints/last.ckpt").read_bytes()
    other = run(args + ["--trainer.default_root_dir", "runs/b"], cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-2000:]
    assert torch.load(tmp_path / "runs/b/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    assert (tmp_path / "runs/b/logs/version_0/hparams.yaml").is_file()
    assert (tmp_path / "outputs/train-tiny/checkpoints/last.ckpt").read_bytes() == before


def test_cli_fit_with_missing_shards_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """Bad data paths fail before the trainer's logger makes the run's (empty) version folder."""
    from train.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning"])  # the args below, not pytest's own
    root = tmp_path / "run"
    code = main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.shards", str(tmp_path / "none-*.tar"),
                 "--trainer.default_root_dir", str(root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"lightning: error: no shards match '{tmp_path / 'none-*.tar'}'"
    assert not root.exists()


def test_cli_fit_stopped_by_sigterm_exits_non_zero(tmp_path, shards):
    """A preempted run (SIGTERM) must not exit 0 as if finished: nothing was exported, and a job
    chained after it (``make demo``) or a scheduler must see that it stopped."""
    import signal
    import time

    args = [sys.executable, "-m", "train", "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.shards",
            f"{shards}/*.tar", "--trainer.max_steps", "100000", "--trainer.enable_progress_bar", "false",
            "--data.num_frames", "4"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_MODE": "offline"})
    last = tmp_path / "outputs/train-tiny/checkpoints/last.ckpt"
    deadline = time.monotonic() + HANG_GUARD
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert last.is_file(), "no checkpoint within 300 s"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by a signal" in stderr and "--ckpt_path last" in stderr and "Traceback" not in stderr
    assert not list((tmp_path / "outputs").rglob("model_index.json"))  # nothing exported as if finished
    assert last.is_file()  # the periodic checkpoint is kept
    preempted = last.with_name("preempted.ckpt")  # and the step it stopped at is saved beside it
    assert str(preempted) in stderr.strip().splitlines()[-1]
    stopped = torch.load(preempted, weights_only=True)["global_step"]
    assert stopped >= torch.load(last, weights_only=True)["global_step"] > 0


def test_cli_placeholder_weights_fail_clearly(tmp_path):
    proc = run(["fit", "--config", str(ROOT / "configs" / "insv2v.yaml"), "--data.shards", "x.tar"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "model.editor: set 'base_model' to a local folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wandb_offline_logging(tmp_path, shards):
    args = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.shards", str(shards),
            "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--data.num_frames", "4",
            "--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.save_dir", str(tmp_path),
            "--trainer.logger.project", "test", "--trainer.callbacks+=train.EditSamples",
            "--trainer.callbacks.every_n_steps", "1", "--trainer.callbacks.num_inference_steps", "1"]
    proc = run(args, cwd=tmp_path, WANDB_API_KEY="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].rglob("*.wandb"))
    assert list(runs[0].rglob("media/videos/samples/*.mp4"))


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, shards):
    args = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.shards", f"{shards}/*.tar",
            "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false", "--data.num_frames", "4"]
    proc = run(args, cwd=tmp_path, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "outputs/train-tiny/checkpoints/last.ckpt").is_file()


@pytest.mark.slow
def test_fsdp_two_cpu_processes_shard_and_match_ddp(tmp_path, shards):
    """editor_fsdp (FSDP2 over the U-Net's blocks, gloo): the same 2 steps as DDP, and an editor export."""
    args = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.shards", f"{shards}/*.tar",
            "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.enable_progress_bar", "false", "--data.num_frames", "4", "--trainer.callbacks+",
            "train.Throughput"]
    weights = {}
    for strategy in ("ddp", "editor_fsdp"):
        proc = run(args + ["--trainer.strategy", strategy, "--trainer.default_root_dir", strategy], cwd=tmp_path,
                   timeout=HANG_GUARD)
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[strategy] = torch.load(tmp_path / strategy / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    initial = EditorModule(editor="tiny", trainable="all").trainable_parameters()
    ddp, fsdp = weights["ddp"], weights["editor_fsdp"]
    assert fsdp.keys() == ddp.keys() == initial.keys()  # whole tensors, only the trained ones
    assert all(fsdp[k].shape == initial[k].shape for k in initial)
    # AdamW's first steps move each weight by about lr whatever its gradient, so a reduction order
    # that differs in the last bit can flip a near-zero gradient's sign: compare the updates in bulk
    moved = torch.cat([(ddp[k] - initial[k]).flatten() for k in initial]).abs().mean()
    apart = torch.cat([(fsdp[k] - ddp[k]).flatten() for k in initial]).abs().mean()
    assert apart < 1e-3 * moved, (apart, moved)  # measured: 4e-6 of it; a single process lands at 0.5
    exported = InsV2VPipeline.from_pretrained(next((tmp_path / "editor_fsdp").rglob("editor/model_index.json")).parent)
    unet = exported.editor.unet.state_dict()
    assert all(torch.equal(unet[k[len("unet."):]], v) for k, v in fsdp.items())
    # a preempted sharded run resumes from its gathered checkpoint (weights and AdamW moments)
    resumed = run(args + ["--trainer.strategy", "editor_fsdp", "--trainer.default_root_dir", "editor_fsdp",
                          "--trainer.max_steps", "3", "--ckpt_path", "last"], cwd=tmp_path, timeout=HANG_GUARD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(tmp_path / "editor_fsdp/checkpoints/last.ckpt", weights_only=True)["global_step"] == 3


def test_timestep_bias_favours_high_noise():
    from train.objective import sample_timesteps

    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    uniform = sample_timesteps(u, 1000, 1.0)
    assert uniform.min() >= 0 and uniform.max() <= 999 and abs(uniform.float().mean().item() - 499.5) < 3
    high = sample_timesteps(u, 1000, 3.0)
    assert abs((high >= 900).float().mean().item() - (1 - 0.9**3)) < 0.005


def test_text_encoder_training_is_checkpointed(tmp_path, one_sample):
    L.seed_everything(0)
    module = EditorModule(editor="tiny", trainable="motion", train_text_encoder=True, lr=1e-2,
                          export_dir=str(tmp_path / "export"))
    before = {k: v.clone() for k, v in module.text_encoder.state_dict().items()}
    dm = ShardDataModule(shards=str(one_sample), num_frames=4, resolution=32, batch_size=2, augment=False)
    trainer(tmp_path, 2).fit(module, dm)
    after = module.text_encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert any(k.startswith("text_encoder.") for k in ckpt["state_dict"])
    pipe = InsV2VPipeline.from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.equal(v, after[k]) for k, v in pipe.editor.text_encoder.state_dict().items())


def test_text_encoder_lr_sets_the_text_encoders_step(tmp_path, one_sample):
    """Adam's first step moves each weight by its group's learning rate (times the sign of its
    gradient), so one step shows which rate each part trained with."""
    L.seed_everything(0)
    module = EditorModule(editor="tiny", trainable="all", train_text_encoder=True, lr=1e-4, text_encoder_lr=1e-2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    dm = ShardDataModule(shards=str(one_sample), num_frames=4, resolution=32, batch_size=2, augment=False)
    trainer(tmp_path, 1).fit(module, dm)
    moved = {k: (v - before[k]).abs().max().item() for k, v in module.state_dict().items() if v.is_floating_point()}
    text = max(v for k, v in moved.items() if k.startswith("text_encoder."))
    unet = max(v for k, v in moved.items() if k.startswith("unet."))
    assert text == pytest.approx(1e-2, rel=1e-3) and unet == pytest.approx(1e-4, rel=1e-3)
    for bad in (dict(train_text_encoder=True, text_encoder_lr=0.0), dict(train_text_encoder=False, text_encoder_lr=1e-3)):
        with pytest.raises(ValueError, match="text_encoder_lr"):
            EditorModule(editor="tiny", **bad)


def test_motion_frozen_steps_train_the_temporal_layers_only_after_them(tmp_path, one_sample):
    """The motion modules keep their initial weights for motion_frozen_steps optimizer steps while
    the spatial layers train, and train from the next step on. While frozen, the (identity) motion
    modules are left out of the forward pass, and the weights come out bit-identical to a run that
    computes them."""
    from model import motion_modules
    from model.trainable import MOTION_PATTERN
    import fnmatch
    import train.module

    def moved(steps, frozen, skip=True):
        L.seed_everything(0)
        module = EditorModule(editor="tiny", trainable="all", lr=1e-3, motion_frozen_steps=frozen)
        before = {k: v.clone() for k, v in module.unet.state_dict().items()}
        calls = []
        for m in motion_modules(module.unet):
            m.transformer_blocks[0].register_forward_hook(lambda *_: calls.append(module.global_step))
        dm = ShardDataModule(shards=str(one_sample), num_frames=4, resolution=32, batch_size=2, augment=False)
        with mock.patch.object(train.module, "skipping_identity_motion_modules",
                               train.module.skipping_identity_motion_modules if skip else lambda _: contextlib.nullcontext()):
            trainer(tmp_path / f"{steps}-{frozen}-{skip}", steps).fit(module, dm)
        change = {k: (v - before[k]).abs().max().item() for k, v in module.unet.state_dict().items() if v.is_floating_point()}
        motion = max(v for k, v in change.items() if fnmatch.fnmatchcase(k, MOTION_PATTERN))
        spatial = max(v for k, v in change.items() if not fnmatch.fnmatchcase(k, MOTION_PATTERN))
        return motion, spatial, sorted(set(calls)), module.unet.state_dict()

    motion, spatial, calls, skipped = moved(2, frozen=2)
    assert motion == 0.0 and spatial > 1e-4 and calls == []
    *_, computed = moved(2, frozen=2, skip=False)
    assert all(torch.equal(skipped[k], computed[k]) for k in computed)
    motion, spatial, calls, _ = moved(3, frozen=2)
    assert motion > 1e-4 and spatial > 1e-4 and calls == [2]
    for bad in (dict(trainable="all", motion_frozen_steps=-1), dict(trainable="spatial", motion_frozen_steps=10)):
        with pytest.raises(ValueError, match="motion_frozen_steps"):
            EditorModule(editor="tiny", **bad)


def test_loss_weightings():
    from model import tiny_config
    from train.objective import loss_weights

    a = torch.tensor([0.999, 0.5, 0.01])
    snr = a / (1 - a)
    assert torch.equal(loss_weights("uniform", a, "epsilon"), torch.ones(3))
    # min-SNR: the x0-error weight is min(SNR, gamma) whatever the parametrisation
    for kind, to_x0 in (("epsilon", snr), ("v_prediction", snr + 1), ("sample", torch.ones(3))):
        assert torch.allclose(loss_weights("min_snr", a, kind, gamma=5.0) * to_x0, snr.clamp(max=5.0))
    c_out = torch.tensor([0.01, 0.3, 0.5])
    assert torch.allclose(loss_weights("preconditioned", a, "sample", c_out), c_out.pow(-2))
    with pytest.raises(ValueError, match="unknown loss_weighting"):
        loss_weights("snr", a, "epsilon")

    # the preconditioned loss is the squared error of the U-Net's own output against its unit-scale target
    cfg = tiny_config(pixel_space=True)
    cfg["scheduler"]["prediction_type"] = "sample"
    module = EditorModule(editor={**cfg, "source_prior_std": 0.5, "preconditioned": True}, trainable="all",
                          loss_weighting="preconditioned", drop_text=0, drop_both=0, drop_video=0)
    torch.nn.init.normal_(module.unet.conv_out.weight, std=0.1)
    batch = {"source": torch.rand(2, 3, 3, 32, 32) * 2 - 1, "target": torch.rand(2, 3, 3, 32, 32) * 2 - 1,
             "instruction": ["make it red", "make it blue"]}
    with torch.no_grad():
        loss = module.loss(batch, torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(0)
        ed = module.editor
        torch.rand(2, generator=g)  # the dropout draw
        t = sample_timesteps(torch.rand(2, generator=g), 1000, 1.0)
        noise = torch.randn(batch["target"].shape, generator=g)
        noisy = ed.scheduler.add_noise(batch["target"], noise, t)
        a_t = ed.alpha_bar(t, noisy)
        prior = source_prior_estimate(noisy, batch["source"], a_t, 0.5)
        raw = (ed.predict(noisy, batch["source"], ed.encode_text(batch["instruction"]), t) - prior) / ed.output_scale(t, noisy)
        unit_target = (batch["target"] - prior) / ed.output_scale(t, noisy)
        assert loss.item() == pytest.approx((raw - unit_target).pow(2).mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="needs an editor built with preconditioned"):
        EditorModule(editor="tiny", loss_weighting="preconditioned")


def test_edit_balance_weighs_the_edited_pixels_as_much_as_the_rest():
    from train.objective import edit_balanced_weights

    source = torch.zeros(3, 3, 2, 4, 4)
    target = source.clone()
    target[0, :, :, :1, :1] = 1.0  # clip 0: 2 of 32 elements edited (a small recolour)
    target[1] = 0.5  # clip 1: everything edited (a background); clip 2: nothing
    w = edit_balanced_weights(target, source, balance=1.0)
    assert w.shape == (3, 1, 2, 4, 4)
    assert torch.allclose(w.flatten(1).mean(dim=1), torch.ones(3))  # each clip's weights still average to 1
    edited = (target - source).abs().mean(dim=1, keepdim=True) > 0.05
    assert w[0][edited[0]].sum() == pytest.approx(w[0][~edited[0]].sum())  # half the weight on 2 of 32 elements
    assert torch.equal(w[1:], torch.ones_like(w[1:]))  # all or nothing edited: plain mean
    half = edit_balanced_weights(target, source, balance=0.5)
    assert torch.allclose(half, 0.5 + 0.5 * w)
    assert torch.equal(edit_balanced_weights(target, source, balance=0.0), torch.ones_like(w))
    # small differences (codec noise, a VAE's jitter) are not edits
    assert torch.equal(edit_balanced_weights(source + 0.01, source, balance=1.0), torch.ones_like(w))
    with pytest.raises(ValueError, match="edit_balance must be in"):
        EditorModule(editor="tiny", edit_balance=1.5)


def test_edit_size_balance_gives_small_and_large_edits_the_same_pull():
    from train.objective import edit_size_weights

    source = torch.zeros(3, 3, 2, 4, 4)
    target = source.clone()
    target[0, :, :, :1, :1] = 1.0  # a small recolour: d = 2/32
    target[1] = 0.5  # a background: d = 0.25
    target[2, 0, 0, 0, 0] = 0.1  # a near-identity pair: d = 1e-2 / 96
    sizes = (target - source).pow(2).flatten(1).mean(dim=1)
    w = edit_size_weights(target, source, power=1.0, floor=1e-3)
    assert w.shape == (3,) and w.mean().item() == pytest.approx(1.0)
    copy_loss = w * (sizes + 1e-3)  # each clip's weighted loss for returning its source
    assert torch.allclose(copy_loss, copy_loss[0].expand(3))
    assert w[0] / w[1] == pytest.approx((0.25 + 1e-3) / (2 / 32 + 1e-3))
    assert w[2] / w[0] == pytest.approx((2 / 32 + 1e-3) / (sizes[2].item() + 1e-3))  # the floor caps it
    root = edit_size_weights(target, source, power=0.5, floor=1e-3)
    assert torch.allclose(root, (sizes + 1e-3).rsqrt() / (sizes + 1e-3).rsqrt().mean())
    assert torch.equal(edit_size_weights(target, source, power=0.0), torch.ones(3))
    with pytest.raises(ValueError, match="edit_size_balance must be >= 0"):
        EditorModule(editor="tiny", edit_size_balance=-1.0)
