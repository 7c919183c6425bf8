"""The training objective's math: per-sample conditioning dropout and the regression target."""

from __future__ import annotations

import torch


def dropout_masks(
    u: torch.Tensor, text_only: float = 0.05, both: float = 0.05, video_only: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples lose their text and which their source video, from ``u ~ U(0, 1)`` per sample::

        drop_text  = u < p_t + p_b
        drop_video = p_t <= u < p_t + p_b + p_v

    so a fraction ``p_t`` loses only the text, ``p_b`` both, ``p_v`` only the video (SPEC §5:
    ``p_t = p_b = p_v = 0.05``). This teaches the three predictions two-scale guidance needs.
    """
    drop_text = u < text_only + both
    drop_video = (u >= text_only) & (u < text_only + both + video_only)
    return drop_text, drop_video


def regression_target(
    prediction_type: str, clean: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """What the U-Net regresses for ``z_t = sqrt(a) z0 + sqrt(1 - a) eps`` (``a`` per sample)::

        epsilon:       eps
        v_prediction:  v = sqrt(a) eps - sqrt(1 - a) z0
        sample:        z0
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return clean
    if prediction_type == "v_prediction":
        a = alpha_bar.reshape(-1, *([1] * (clean.ndim - 1))).to(clean.dtype)
        return a.sqrt() * noise - (1 - a).sqrt() * clean
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def sample_timesteps(u: torch.Tensor, num_train_timesteps: int, bias: float = 1.0) -> torch.Tensor:
    """One timestep per clip from ``u ~ U(0, 1)``::

        t = floor(T * u^(1 / bias))

    ``bias = 1`` is uniform; ``bias > 1`` favours high noise (density grows as ``t^(bias - 1)``),
    where the edit itself must be decided from the source and the instruction alone.
    """
    t = (num_train_timesteps * u.pow(1.0 / bias)).long()
    return t.clamp(0, num_train_timesteps - 1)
