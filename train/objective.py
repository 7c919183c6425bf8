"""The training objective's math: per-sample conditioning dropout and the regression target."""

from __future__ import annotations

import torch


def dropout_masks(
    u: torch.Tensor, text_only: float = 0.05, both: float = 0.05, video_only: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples lose their text and which their source video, from ``u ~ U(0, 1)`` per sample::

        drop_text  = u < p_t + p_b
        drop_video = p_t <= u < p_t + p_b + p_v

    so a fraction ``p_t`` loses only the text, ``p_b`` both, ``p_v`` only the video (the InsV2V recipe:
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


def edit_balanced_weights(clean: torch.Tensor, source: torch.Tensor, balance: float, threshold: float = 0.05) -> torch.Tensor:
    """Per-element weights of the squared error that give a clip's edited region as much weight as
    the rest, however few pixels the edit touches. With ``m = mean_c |z0 - s| > threshold`` (the
    elements the edit changes; ``z0`` the target, ``s`` the source, both ``(B, C, F, H, W)``) and
    ``f`` the fraction of ``m`` in each clip::

        balanced = m / (2 f) + (1 - m) / (2 (1 - f))     (1 where f is 0 or 1)
        w        = (1 - balance) + balance * balanced

    so every clip's weights still average to 1. Without it a recolour that changes 5 % of the
    pixels weighs a twentieth of a background edit in the loss.
    """
    changed = ((clean - source).abs().mean(dim=1, keepdim=True) > threshold).to(clean.dtype)
    frac = changed.flatten(1).mean(dim=1).reshape(-1, *([1] * (clean.ndim - 1)))
    mixed = (frac > 0) & (frac < 1)
    safe = frac.clamp(1e-6, 1 - 1e-6)
    balanced = torch.where(mixed, changed / (2 * safe) + (1 - changed) / (2 * (1 - safe)), torch.ones_like(changed))
    return (1 - balance) + balance * balanced


def edit_size_weights(clean: torch.Tensor, source: torch.Tensor, power: float, floor: float = 1e-3) -> torch.Tensor:
    """Per-clip weights that let small edits count as much as large ones. With ``d`` each clip's
    edit size, the mean squared difference of target ``z0`` and source ``s`` (``(B, C, F, H, W)``)::

        w_i = (d_i + floor)^(-power) / mean_j (d_j + floor)^(-power)

    so the batch's weights average to 1. ``power = 1`` gives every clip the same loss for copying
    its source: a recolour that changes 5 % of the pixels then pulls as hard as a background edit.
    ``floor`` keeps near-identity pairs from taking over the batch.
    """
    size = (clean - source).pow(2).flatten(1).mean(dim=1)
    raw = (size + floor).pow(-power)
    return raw / raw.mean()


LOSS_WEIGHTINGS = ("uniform", "min_snr", "preconditioned")


def loss_weights(
    scheme: str,
    alpha_bar: torch.Tensor,
    prediction_type: str,
    output_scale: torch.Tensor | None = None,
    gamma: float = 5.0,
) -> torch.Tensor:
    """Per-sample weights of the squared error, with ``SNR = a / (1 - a)``::

        uniform:         1
        min_snr:         min(SNR, gamma) / SNR        (epsilon; Hang et al. 2023)
                         min(SNR, gamma) / (SNR + 1)  (v_prediction)
                         min(SNR, gamma)              (sample)
        preconditioned:  1 / c_out^2                  (EDM: the U-Net's own output regresses a
                                                       unit-variance target at every timestep)

    ``output_scale`` is ``c_out`` per sample (:meth:`model.Editor.output_scale`).
    """
    if scheme == "uniform":
        return torch.ones_like(alpha_bar)
    if scheme == "preconditioned":
        if output_scale is None:
            raise ValueError("loss_weighting 'preconditioned' needs the editor's output scale")
        return output_scale.reshape(-1).to(alpha_bar.dtype).pow(-2).expand_as(alpha_bar)
    if scheme == "min_snr":
        snr = alpha_bar / (1 - alpha_bar)
        capped = snr.clamp(max=gamma)
        if prediction_type == "epsilon":
            return capped / snr
        if prediction_type == "v_prediction":
            return capped / (snr + 1)
        if prediction_type == "sample":
            return capped
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    raise ValueError(f"unknown loss_weighting {scheme!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
