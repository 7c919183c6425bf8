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
