"""Flow matching on a toy Gaussian: the loss's minimiser is the analytic velocity, and Euler steps of
diffusers' flow scheduler with that velocity carry noise to the data's mean and variance."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from train.flow_matching import flow_clean_estimate, flow_noisy, flow_velocity, shifted_sigma

MEAN, STD = 1.5, 0.4  # x0 ~ N(MEAN, STD^2), eps ~ N(0, 1)


def analytic_velocity(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[eps - x0 | z] for z = (1 - s) x0 + s eps, all Gaussian:
    E[x0 | z] = m + (1 - s) S^2 / V (z - (1 - s) m),  E[eps | z] = s / V (z - (1 - s) m),
    V = (1 - s)^2 S^2 + s^2."""
    s = sigma
    var = (1 - s) ** 2 * STD**2 + s**2
    centred = z - (1 - s) * MEAN
    return s / var * centred - (MEAN + (1 - s) * STD**2 / var * centred)


def test_the_loss_is_minimised_by_the_analytic_velocity():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    for sigma in (0.1, 0.5, 0.9):
        clean = MEAN + STD * torch.randn(n, generator=gen, dtype=torch.float64)
        noise = torch.randn(n, generator=gen, dtype=torch.float64)
        s = torch.full((n,), sigma, dtype=torch.float64)
        z, target = flow_noisy(clean, noise, s), flow_velocity(clean, noise)
        # the best predictor of the target from z is linear here: least squares on the loss itself
        design = torch.stack([z, torch.ones_like(z)], 1)
        a, b = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
        spread = ((1 - sigma) ** 2 * STD**2 + sigma**2) ** 0.5  # where z lies: its mean +- one deviation
        grid = (1 - sigma) * MEAN + spread * torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
        assert torch.allclose(a * grid + b, analytic_velocity(grid, sigma), atol=0.01), sigma
        # and x0 = z - sigma v recovers the posterior mean of the data
        posterior = MEAN + (1 - sigma) * STD**2 / ((1 - sigma) ** 2 * STD**2 + sigma**2) * (grid - (1 - sigma) * MEAN)
        assert torch.allclose(flow_clean_estimate(grid, analytic_velocity(grid, sigma), sigma), posterior, atol=1e-9)


def test_euler_with_the_analytic_velocity_carries_noise_to_the_data():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(200)
    z = torch.randn(100_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in scheduler.timesteps:
        sigma = float(t) / 1000  # the scheduler's sigma at this step (its timestep is sigma * T)
        z = scheduler.step(analytic_velocity(z, sigma), t, z).prev_sample
    assert abs(z.mean().item() - MEAN) < 0.01 and abs(z.std().item() - STD) < 0.01


def test_the_shifted_density_favours_high_noise():
    u = torch.linspace(0, 1, 101)
    assert torch.equal(shifted_sigma(u, 1.0), u)
    shifted = shifted_sigma(u, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > u[1:-1]).all()
    assert abs(shifted_sigma(torch.tensor(0.5), 3.0).item() - 0.75) < 1e-6  # the median moves from 0.5 to 0.75


# ---------------------------------------------------------------- a flow-matching editor
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from shard_fixtures import write_shards  # noqa: E402

from infer import InsV2VPipeline  # noqa: E402
from infer.sampling import denoise_clip, flow_reference_velocity, lvsc_blend  # noqa: E402
from train import EditorModule, ShardDataModule  # noqa: E402


def test_the_training_loss_regresses_the_straight_paths_velocity(tmp_path):
    """Given the clean clip, (z - x0) / sigma is the exact velocity of any point of the path: a
    predictor that returns it has zero loss (noisy point, target and timestep agree)."""
    write_shards(tmp_path, 2, frames=4, size=16)
    module = EditorModule(editor="tiny", trainable="all", objective="flow", flow_shift=3.0, drop_text=0, drop_both=0,
                          drop_video=0)
    dm = ShardDataModule(shards=str(tmp_path), num_frames=4, resolution=16, batch_size=2, augment=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    editor = module.editor
    clean = {}

    def exact(noisy, condition, text, t):
        sigma = (t / editor.scheduler.config.num_train_timesteps).reshape(-1, 1, 1, 1, 1)
        assert ((sigma > 0) & (sigma <= 1)).all()
        return (noisy - clean["x0"]) / sigma

    real_encode = editor.encode_video

    def encode(video, sample=False, generator=None):
        out = real_encode(video, sample=sample, generator=generator)
        if sample:
            clean["x0"] = out * editor.scaling_factor
        return out

    editor.encode_video, editor.predict = encode, exact
    assert module.loss(batch, torch.Generator().manual_seed(0)).item() < 1e-10


def test_a_flow_editor_trains_exports_and_samples_with_flow_schedulers(tmp_path):
    write_shards(tmp_path / "shards", 4, frames=4, size=16)
    L.seed_everything(0)
    module = EditorModule(editor="tiny", trainable="all", objective="flow", flow_shift=3.0, lr=1e-3,
                          export_dir=str(tmp_path / "editor"))
    dm = ShardDataModule(shards=str(tmp_path / "shards"), num_frames=4, resolution=16, batch_size=2, augment=False,
                         batches_per_epoch=3)
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(module, dm)
    frames = np.random.default_rng(0).integers(0, 255, (10, 16, 16, 3), dtype=np.uint8)
    for pipe in (InsV2VPipeline.from_pretrained(tmp_path / "editor"), InsV2VPipeline.from_checkpoint(tmp_path / "ckpt" / "last.ckpt")):
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
        edited = pipe(frames, "make it red", num_inference_steps=3, clip_frames=6, reference_frames=2, progress=False,
                      generator=torch.Generator().manual_seed(0)).frames
        assert edited.shape == frames.shape
    pipe.set_scheduler("UniPCMultistepScheduler")  # in flow mode, on the same shift
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.flow_shift == 3.0
    assert pipe(frames, "make it red", num_inference_steps=3, clip_frames=6, reference_frames=2, progress=False).frames.shape == frames.shape
    with pytest.raises(ValueError, match="trained for flow matching"):
        pipe.set_scheduler("DDPMScheduler")
    with pytest.raises(ValueError, match="trained for noise prediction"):
        InsV2VPipeline.from_pretrained("tiny", scheduler="FlowMatchEulerDiscreteScheduler")


def test_lvsc_in_velocity_space_pins_the_references_and_sampling_reaches_a_known_target():
    gen = torch.Generator().manual_seed(0)
    z, v = torch.randn(1, 4, 6, 8, 8, generator=gen), torch.randn(1, 4, 6, 8, 8, generator=gen)
    z_ref, sigma = torch.randn(1, 4, 2, 8, 8, generator=gen), 0.6
    blended = lvsc_blend(v, flow_reference_velocity(z, z_ref, sigma))
    assert torch.allclose(z[:, :, :2] - sigma * blended[:, :, :2], z_ref, atol=1e-6)  # x0 of the references
    shift = (blended - v)[:, :, 2:]
    assert torch.allclose(shift, shift[:, :, :1].expand_as(shift))  # one shared correction for new frames

    # a predictor that knows the clean clip x*: Euler lands on it, and LVSC keeps the references on z_ref = x*[:N]
    target = torch.randn(1, 4, 6, 8, 8, generator=gen)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

    def predict(z_in, condition, text, t):
        sigma = (t / 1000).reshape(-1, 1, 1, 1, 1)
        return (z_in - target.expand_as(z_in)) / sigma

    condition, text = torch.zeros(1, 4, 6, 8, 8), torch.zeros(2, 77, 32)
    out = denoise_clip(predict, scheduler, condition, text, torch.randn(1, 4, 6, 8, 8, generator=gen), 2.0, 1.5, 5,
                       lvsc=0.5, z_ref=target[:, :, :2])
    assert torch.allclose(out, target, atol=1e-5)
