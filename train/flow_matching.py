"""Flow matching (rectified flow) as a training objective: the noisy point, the velocity target and the shifted time density."""

from __future__ import annotations

import torch


def shifted_sigma(u: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """A noise level per clip from ``u ~ U(0, 1)``, with the time shift Wan and SD3 use::

        sigma = shift * u / (1 + (shift - 1) * u)

    ``shift = 1`` is uniform; ``shift > 1`` moves the density towards high noise (where a larger
    frame, having more pixels that agree, needs more steps to lose its content).
    """
    return shift * u / (1 + (shift - 1) * u)


def flow_noisy(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The point on the straight path from data to noise at ``sigma`` (per sample)::

        z_sigma = (1 - sigma) * x0 + sigma * eps
    """
    s = sigma.reshape(-1, *([1] * (clean.ndim - 1))).to(clean.dtype)
    return (1 - s) * clean + s * noise


def flow_velocity(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target, the path's velocity ``d z_sigma / d sigma``::

        v = eps - x0

    The loss is ``|v_hat(z_sigma, sigma) - v|^2``, minimised by ``v_hat = E[eps - x0 | z_sigma]``.
    """
    return noise - clean


def flow_clean_estimate(noisy: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The clean sample a velocity implies: ``x0 = z_sigma - sigma * v``."""
    s = sigma.reshape(-1, *([1] * (noisy.ndim - 1))).to(noisy.dtype) if torch.is_tensor(sigma) else sigma
    return noisy - s * velocity


def flow_timestep(sigma: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timestep a network is conditioned on, ``t = sigma * T`` (as diffusers' flow schedulers give it)."""
    return sigma * num_train_timesteps

