"""Training that survives what clusters do: non-finite steps, preemption signals, exceptions, and
resumes that continue exactly, any number of times, with loader workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file
from shard_fixtures import write_shards

from train import EditorModule, ShardDataModule
from train.guards import NonFiniteError
from guards import HANG_GUARD

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, 12, per_shard=3, frames=4, size=16)
    return folder


def config(tmp_path: Path, shards: Path, model: dict | None = None, **data) -> Path:
    """A tiny run as a user writes it: no periodic checkpoint, 3 batches an epoch, 2 loader workers."""
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 10, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True, "every_n_train_steps": 1000}}]},
        "model": {"editor": "tiny", "trainable": "all", "lr": 1e-3, "seed": 3, **(model or {})},
        "data": {"shards": f"{shards}/*.tar", "num_frames": 4, "resolution": 16, "batch_size": 2, "shuffle_buffer": 4,
                 "batches_per_epoch": 3, "num_workers": 2, **data},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(cfg: Path, *args: str, timeout: int = HANG_GUARD) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "train", "fit", "--config", str(cfg), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cfg.parent, env=env)


def stop_at(log: Path, step: int = -1, how: str = "signal") -> list[str]:
    spec = {"class_path": "stop_at.StopAt", "init_args": {"log": str(log), "step": step, "how": how}}
    return ["--trainer.callbacks+", json.dumps(spec)]


def steps(log: Path) -> list[tuple[int, int, list[str]]]:
    return [(r["step"], r["epoch"], r["keys"]) for r in map(json.loads, log.read_text().splitlines())]


def denoiser(folder: Path) -> dict[str, torch.Tensor]:
    """The exported editor's U-Net or DiT weights."""
    return load_file(next(p for name in ("unet", "transformer") for p in folder.rglob(f"{name}/*.safetensors")))


@pytest.mark.slow
@pytest.mark.parametrize("editor", ["tiny", "wan-tiny"])
def test_three_segments_with_workers_equal_one_run(tmp_path, shards, editor):
    """Stopped by SIGTERM after step 2 (mid-epoch), resumed, stopped by an exception inside step 7
    (mid-epoch, two epochs later), resumed to the end: the same batches, in the same order, each in
    the same epoch, and the same weights as one uninterrupted run; for the U-Net editor and the DiT
    (5-frame causal clips, flow matching)."""
    model, data = ({}, {}) if editor == "tiny" else ({"editor": "wan-tiny", "objective": "flow"}, {"num_frames": 5})
    straight = tmp_path / "straight"
    straight.mkdir()
    proc = fit(config(straight, shards, model, **data), *stop_at(straight / "steps.jsonl"), "--model.export_dir", str(straight / "editor"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = steps(straight / "steps.jsonl")
    assert [e for _, e, _ in expected] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]

    split = tmp_path / "split"
    split.mkdir()
    cfg, log = config(split, shards, model, **data), split / "steps.jsonl"
    first = fit(cfg, *stop_at(log, 2, "signal"))
    assert first.returncode == 143, first.stderr[-3000:]
    assert "Traceback" not in first.stderr and "preempted.ckpt" in first.stderr.strip().splitlines()[-1]
    checkpoints = split / "run" / "checkpoints"
    assert torch.load(checkpoints / "preempted.ckpt", weights_only=True)["global_step"] == 2
    second = fit(cfg, *stop_at(log, 7, "raise"), "--ckpt_path", "last")
    assert second.returncode != 0 and "injected failure inside step 7" in second.stderr
    saved = torch.load(checkpoints / "preempted.ckpt", weights_only=True)
    assert saved["global_step"] == 7 and saved["ShardDataModule"]["batches"] == 1  # the failed step's batch is not counted
    third = fit(cfg, *stop_at(log), "--ckpt_path", "last", "--model.export_dir", str(split / "editor"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert steps(log) == expected
    a, b = denoiser(straight / "editor"), denoiser(split / "editor")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert not (checkpoints / "preempted.ckpt").exists()  # superseded once the run finished


def test_sigusr1_stops_at_a_step_boundary_and_resumes(tmp_path, shards):
    cfg, log = config(tmp_path, shards, num_workers=0), tmp_path / "steps.jsonl"
    first = fit(cfg, *stop_at(log, 4, "SIGUSR1"), "--trainer.max_steps", "6")
    assert first.returncode == 143 and "Traceback" not in first.stderr, first.stderr[-3000:]
    assert torch.load(tmp_path / "run/checkpoints/preempted.ckpt", weights_only=True)["global_step"] == 4
    second = fit(cfg, *stop_at(log), "--trainer.max_steps", "6", "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-3000:]
    assert [s for s, _, _ in steps(log)] == [1, 2, 3, 4, 5, 6]


def finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_a_diverging_run_stops_with_one_line_and_keeps_finite_weights(tmp_path, shards):
    cfg = config(tmp_path, shards, num_workers=0)
    every_step = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": 1}}
    proc = fit(cfg, "--model.lr", "1e12", "--trainer.max_steps", "40", "--trainer.callbacks", json.dumps([every_step]),
               "--model.export_dir", str(tmp_path / "editor"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("lightning: error: training stopped at step ") and "the loss is nan" in lines[-1]
    step = int(lines[-1].split("at step ")[1].split(":")[0])
    assert 0 < step < 40
    folder = tmp_path / "run" / "checkpoints"
    for path in folder.glob("*.ckpt"):  # the periodic ones and the one saved as it stopped
        state = torch.load(path, weights_only=True)
        assert finite(state["state_dict"].values()) and state["global_step"] <= step, path.name
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == step
    assert not (tmp_path / "editor").exists()  # nothing exported

    # allowing skips: each further step is non-finite too, so it stops after the allowance
    again = fit(cfg, "--model.lr", "1e12", "--trainer.max_steps", "40", "--model.max_nonfinite_steps", "2",
                "--trainer.default_root_dir", str(tmp_path / "again"))
    assert again.returncode == 1 and "after 2 skipped step(s)" in again.stderr.strip().splitlines()[-1]


def test_skipped_non_finite_steps_leave_the_weights_and_training_goes_on(tmp_path, shards):
    L.seed_everything(0)
    module = EditorModule(editor="tiny", trainable="all", lr=1e-3, max_nonfinite_steps=1,
                          export_dir=str(tmp_path / "editor"))
    real, weights = module.loss, []

    def loss(batch, generator):
        weights.append({k: v.detach().clone() for k, v in module.unet.state_dict().items()})
        value = real(batch, generator)
        return value * float("nan") if module.global_step == 1 else value

    module.loss = loss
    dm = ShardDataModule(shards=str(shards), num_frames=4, resolution=16, batch_size=2, augment=False, batches_per_epoch=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="step 1: the loss is nan; step skipped"):
        trainer.fit(module, dm)
    assert trainer.global_step == 4 and module.nonfinite.skipped == 1
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # the NaN step changed nothing
    assert not all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # the next one trained
    assert finite(denoiser(tmp_path / "editor").values())


def test_non_finite_weights_are_never_written(tmp_path):
    module = EditorModule(editor="tiny", trainable="all")
    with torch.no_grad():
        next(module.unet.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="refusing to write the editor: non-finite values in unet"):
        module.export(tmp_path / "editor")
    assert not (tmp_path / "editor").exists()
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})
