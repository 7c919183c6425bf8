"""Sampling math as small pure functions: guidance, parametrisations, clip plan, LVSC, warping."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F


def guided_noise(
    e_uu: torch.Tensor, e_vu: torch.Tensor, e_vt: torch.Tensor, text_guidance: float, video_guidance: float
) -> torch.Tensor:
    """Two-scale classifier-free guidance (InstructPix2Pix)::

        eps = e_uu + s_V * (e_vu - e_uu) + s_T * (e_vt - e_vu)

    ``e_uu`` = eps(z, no video, no text), ``e_vu`` = eps(z, video, no text),
    ``e_vt`` = eps(z, video, text); ``s_T`` = ``text_guidance``, ``s_V`` = ``video_guidance``.
    With ``s_T = s_V = 1`` it returns ``e_vt``.
    """
    return e_uu + video_guidance * (e_vu - e_uu) + text_guidance * (e_vt - e_vu)


def guidance_weights(text_guidance: float, video_guidance: float) -> tuple[float, float, float]:
    """The weights of ``(e_uu, e_vu, e_vt)`` in :func:`guided_noise`, which is a weighted sum::

        eps = (1 - s_V) * e_uu + (s_V - s_T) * e_vu + s_T * e_vt

    The weights sum to 1. A prediction whose weight is 0 need not be made: at ``s_V = 1`` (the
    usual video guidance) ``e_uu`` drops out, a third of each step's U-Net work.
    """
    return 1.0 - video_guidance, video_guidance - text_guidance, text_guidance


def to_epsilon(output: torch.Tensor, z_t: torch.Tensor, alpha_bar_t: torch.Tensor | float, prediction_type: str):
    """The noise implied by a model output, for ``z_t = sqrt(a) z0 + sqrt(1 - a) eps``::

        epsilon:       eps = output
        v_prediction:  eps = sqrt(a) v + sqrt(1 - a) z_t
        sample:        eps = (z_t - sqrt(a) x0) / sqrt(1 - a)
    """
    a = torch.as_tensor(alpha_bar_t, dtype=z_t.dtype, device=z_t.device)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * z_t
    if prediction_type == "sample":
        return (z_t - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def from_epsilon(eps: torch.Tensor, z_t: torch.Tensor, alpha_bar_t: torch.Tensor | float, prediction_type: str):
    """Inverse of :func:`to_epsilon`: express ``eps`` in the scheduler's parametrisation::

        epsilon:       eps
        v_prediction:  v  = (eps - sqrt(1 - a) z_t) / sqrt(a)
        sample:        x0 = (z_t - sqrt(1 - a) eps) / sqrt(a)
    """
    a = torch.as_tensor(alpha_bar_t, dtype=z_t.dtype, device=z_t.device)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return (eps - (1 - a).sqrt() * z_t) / a.sqrt()
    if prediction_type == "sample":
        return (z_t - (1 - a).sqrt() * eps) / a.sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def predicted_sample(eps: torch.Tensor, z_t: torch.Tensor, alpha_bar_t: torch.Tensor | float) -> torch.Tensor:
    """``x0 = (z_t - sqrt(1 - a) eps) / sqrt(a)``: the clean latent a noise prediction implies."""
    return from_epsilon(eps, z_t, alpha_bar_t, "sample")


def reference_noise(z_t: torch.Tensor, z_ref: torch.Tensor, alpha_bar_t: torch.Tensor | float) -> torch.Tensor:
    """``eps_ref = (z_t[:N] - sqrt(a) z_ref) / sqrt(1 - a)`` over the frame axis (dim 2).

    The noise whose x0-prediction for the first ``N = z_ref.shape[2]`` frames is exactly ``z_ref``.
    """
    return to_epsilon(z_ref, z_t[:, :, : z_ref.shape[2]], alpha_bar_t, "sample")


def lvsc_correct(
    eps: torch.Tensor, z_t: torch.Tensor, z_ref: torch.Tensor, alpha_bar_t: torch.Tensor | float
) -> torch.Tensor:
    """Long Video Sampling Correction on ``(B, C, F, h, w)`` tensors; references lead the clip::

        eps_ref  = (z_t[:N] - sqrt(a) z_ref) / sqrt(1 - a)
        delta_n  = eps_ref_n - eps_n                       n < N
        eps'[:N] = eps_ref                                 (x0-prediction of a reference == z_ref)
        eps'[N:] = eps[N:] + mean_n delta_n                (one shared correction for new frames)
    """
    return lvsc_blend(eps, reference_noise(z_t, z_ref, alpha_bar_t))


def lvsc_blend(prediction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """LVSC in any parametrisation in which the prediction is linear in the clean latents (noise
    or velocity): the ``N`` leading reference frames take ``reference`` (the prediction whose
    clean estimate is the known reference latents), and every new frame is shifted by the mean
    correction ``mean_n (reference_n - prediction_n)``."""
    n = reference.shape[2]
    delta = reference - prediction[:, :, :n]
    return torch.cat([reference, prediction[:, :, n:] + delta.mean(dim=2, keepdim=True)], dim=2)


def flow_reference_velocity(z_sigma: torch.Tensor, z_ref: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The velocity under which the reference frames' clean estimate is exactly ``z_ref``::

        v_ref = (z_sigma[:N] - z_ref) / sigma        (from x0 = z_sigma - sigma v)
    """
    return (z_sigma[:, :, : z_ref.shape[2]] - z_ref) / sigma


def warp(values: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Bilinear backward warp: ``out(x) = values(x + flow(x))``, zero outside the grid.

    ``values`` ``(B, C, h, w)``; ``flow`` ``(B, 2, h, w)`` in grid cells, channel 0 = x, 1 = y.
    Warping a tensor of ones gives the validity (coverage) of each output cell.
    """
    _, _, h, w = values.shape
    # positions in float32 whatever the values' dtype: in bfloat16 a normalised coordinate near 1
    # is off by up to 2^-8, i.e. (w - 1) / 512 cells
    flow = flow.float()
    ys, xs = torch.meshgrid(
        torch.arange(h, device=flow.device, dtype=torch.float32),
        torch.arange(w, device=flow.device, dtype=torch.float32),
        indexing="ij",
    )
    x = (xs + flow[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0
    y = (ys + flow[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack([x, y], dim=-1)
    out = F.grid_sample(values.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.to(values.dtype)


def lvsc_correct_warped(
    eps: torch.Tensor,
    z_t: torch.Tensor,
    z_ref: torch.Tensor,
    alpha_bar_t: torch.Tensor | float,
    flows: torch.Tensor,
    min_coverage: float = 0.5,
) -> torch.Tensor:
    """LVSC with motion compensation: each new frame gets the reference deltas moved along flow::

        eps'[:N]  = eps_ref
        eps'[N+j] = eps[N+j] + sum_n warp(delta_n, f_jn) / sum_n warp(1, f_jn)   where the sum > 0.5
        eps'[N+j] = eps[N+j] + mean_n delta_n                                  elsewhere

    ``flows`` ``(B, F-N, N, 2, h, w)``: flow from new frame ``j`` to reference frame ``n`` on the
    latent grid (estimated on the source video), so ``frame_j(x) ~ frame_n(x + f_jn(x))``.
    """
    return lvsc_blend_warped(eps, reference_noise(z_t, z_ref, alpha_bar_t), flows, min_coverage)


def lvsc_blend_warped(prediction: torch.Tensor, reference: torch.Tensor, flows: torch.Tensor,
                      min_coverage: float = 0.5) -> torch.Tensor:
    """:func:`lvsc_blend` with each new frame's correction moved along ``flows`` from the
    reference frames (the mean where the warped references cover less than ``min_coverage``)."""
    b, c, frames, h, w = prediction.shape
    n = reference.shape[2]
    new = frames - n
    if flows.shape[:3] != (b, new, n) or flows.shape[-2:] != (h, w):
        raise ValueError(f"flows must be {(b, new, n, 2, h, w)}, got {tuple(flows.shape)}")
    delta = reference - prediction[:, :, :n]  # (B, C, N, h, w)
    # every (new frame, reference) pair as one batch of warps
    values = delta.permute(0, 2, 1, 3, 4).unsqueeze(1).expand(b, new, n, c, h, w)
    values = torch.cat([values, torch.ones_like(values[:, :, :, :1])], dim=3).reshape(b * new * n, c + 1, h, w)
    warped = warp(values, flows.reshape(b * new * n, 2, h, w)).reshape(b, new, n, c + 1, h, w)
    summed = warped.sum(dim=2)  # (B, new, C+1, h, w)
    coverage = summed[:, :, c:]
    moved = summed[:, :, :c] / coverage.clamp_min(1e-6)
    mean = delta.mean(dim=2).unsqueeze(1)  # (B, 1, C, h, w)
    correction = torch.where(coverage > min_coverage, moved, mean).permute(0, 2, 1, 3, 4)
    return torch.cat([reference, prediction[:, :, n:] + correction], dim=2)


@dataclass(frozen=True)
class Clip:
    """Frames ``start .. stop-1`` of the video; the first ``num_reference`` repeat the previous clip.
    ``padding`` copies of the last frame follow ``stop`` (a causal clip's length is ``1 + T k``)."""

    start: int
    stop: int
    num_reference: int
    padding: int = 0

    @property
    def new_start(self) -> int:
        return self.start + self.num_reference

    def __len__(self) -> int:
        return self.stop - self.start


def clip_plan(num_frames: int, clip_frames: int = 16, reference_frames: int = 4) -> list[Clip]:
    """Cut ``num_frames`` into clips of ``clip_frames`` that overlap by reference frames.

    The first clip is frames ``0..F-1``; each later one starts with the last ``N`` frames of the
    previous clip, then up to ``F - N`` new frames; the last clip takes ``F - remaining`` references
    so it too has ``F`` frames. Every frame is *new* in exactly one clip.
    """
    if clip_frames < 1 or reference_frames < 0:
        raise ValueError("clip_frames must be >= 1 and reference_frames >= 0")
    if num_frames > clip_frames and reference_frames >= clip_frames:
        raise ValueError(f"reference_frames ({reference_frames}) must be smaller than clip_frames ({clip_frames})")
    if num_frames <= 0:
        return []
    first = min(clip_frames, num_frames)
    plan, done = [Clip(0, first, 0)], first
    while done < num_frames:
        new = min(clip_frames - reference_frames, num_frames - done)
        refs = clip_frames - new
        plan.append(Clip(done - refs, done + new, refs))
        done += new
    return plan


def check_causal_clip(clip_frames: int, reference_frames: int, temporal: int) -> None:
    """A causal VAE packs ``temporal`` frames into a latent frame after a first frame of its own:
    clips and their references are ``1 + temporal k`` frames long, so consecutive clips share whole
    latent frames."""
    if temporal > 1 and ((clip_frames - 1) % temporal or reference_frames < 1 or (reference_frames - 1) % temporal):
        raise ValueError(f"this editor's VAE packs {temporal} frames into one latent frame after the first: "
                         f"clip_frames and reference_frames must be 1 + {temporal}k (e.g. {1 + 4 * temporal} and "
                         f"{1 + temporal}), got {clip_frames} and {reference_frames}")


def fitting_reference_frames(clip_frames: int, preferred: int, temporal: int = 1) -> int:
    """The reference count of a clip of ``clip_frames`` frames when none is given: ``preferred`` if
    it is legal there, else the largest legal count below it (fewer than the clip's frames; ``1 + T
    k`` under a causal VAE packing T frames, at least one). ``preferred`` is returned as it is when
    the clip length itself is illegal, so that its check (:func:`check_causal_clip`) says so."""
    if temporal > 1:
        if clip_frames < 1 + temporal or (clip_frames - 1) % temporal:
            return preferred
        fit = max(1, min(preferred, clip_frames - 1))
        return 1 + temporal * ((fit - 1) // temporal)
    return max(0, min(preferred, clip_frames - 1)) if clip_frames >= 1 else preferred


def stream_clips(frames, clip_frames: int = 16, reference_frames: int = 4, temporal: int = 1):
    """Walk a frame iterator of unknown length clip by clip, yielding ``(Clip, frames)``.

    ``frames`` of each clip is the list of its source frames, references first; the result is
    :func:`clip_plan` of the total length, found without knowing that length in advance: the final
    clip is recognised when the iterator runs dry. At most one clip of frames is held at a time.

    For a causal VAE (``temporal`` T > 1) clips are ``1 + T K`` frames with ``1 + T R`` references
    (:func:`check_causal_clip`), every clip starts on a multiple of T, and the last clip (or a
    video shorter than a clip) is padded with copies of the last frame to ``1 + T k`` frames
    (``Clip.padding``): latent frame ``i >= 1`` of a clip starting at ``T a`` covers the frames
    ``T (a + i - 1) + 1 .. T (a + i)``, which the previous clip's latent frame covering them matches.
    """
    check_causal_clip(clip_frames, reference_frames, temporal)
    it = iter(frames)
    window = [f for _, f in zip(range(clip_frames), it)]
    if not window:
        return
    if len(window) == clip_frames and reference_frames >= clip_frames:
        raise ValueError(f"reference_frames ({reference_frames}) must be smaller than clip_frames ({clip_frames})")
    pad = -(len(window) - 1) % temporal
    yield Clip(0, len(window), 0, pad), window + [window[-1]] * pad
    done = len(window)
    while True:
        new = [f for _, f in zip(range(clip_frames - reference_frames), it)]
        if not new:
            return
        pad = -len(new) % temporal
        refs = clip_frames - len(new) - pad
        window = window[len(window) - refs :] + new
        yield Clip(done - refs, done + len(new), refs, pad), window + [new[-1]] * pad
        done += len(new)


def latent_count(frames: int, temporal: int) -> int:
    """Latent frames of ``frames`` frames: one each (``temporal`` 1), or ``1 + (F - 1) / T`` for a
    causal VAE (0 frames: 0)."""
    return frames if temporal == 1 or frames == 0 else 1 + (frames - 1) // temporal


def scheduler_step(scheduler, output: torch.Tensor, t, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One scheduler step from ``z``; the seeded generator goes to the schedulers that draw noise
    (DDPM, ancestral ones), deterministic ones (DDIM, UniPC, Heun) take none."""
    if "generator" in inspect.signature(scheduler.step).parameters:
        return scheduler.step(output, t, z, generator=generator).prev_sample
    return scheduler.step(output, t, z).prev_sample


def is_flow_scheduler(scheduler) -> bool:
    """Whether ``scheduler`` integrates a velocity along the straight path (``sigma = t / T``):
    diffusers' flow-matching schedulers, or a multistep one in flow mode (``use_flow_sigmas``)."""
    return type(scheduler).__name__.startswith("FlowMatch") or bool(scheduler.config.get("use_flow_sigmas"))


def flow_shift_of(scheduler) -> float:
    """The time shift a flow scheduler samples at, ``sigma' = s sigma / (1 + (s - 1) sigma)``: the
    ``shift`` of diffusers' flow-matching schedulers, the ``flow_shift`` of a multistep one in flow
    mode (UniPC, DPM-Solver: Wan's and Lucy Edit's own folders)."""
    key = "shift" if type(scheduler).__name__.startswith("FlowMatch") else "flow_shift"
    return float(scheduler.config.get(key, 1.0) or 1.0)


def step_sigma(scheduler, t) -> float:
    """The noise level ``sigma`` of the step the scheduler is about to take at timestep ``t``, read
    from its own ``sigmas`` (a multistep scheduler's timesteps are rounded to integers, so
    ``t / T`` is not its sigma); ``t / T`` for a scheduler that keeps no sigmas."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or not hasattr(scheduler, "index_for_timestep"):
        return float(t) / scheduler.config.num_train_timesteps
    index = scheduler.step_index
    if index is None:  # before the first step: where t lies in the schedule
        index = scheduler.index_for_timestep(t)
    return float(sigmas[index])


def flow_scheduler(current, shift: float = 1.0, keep_own: bool = False):
    """The sampler of a flow-matching editor: ``current`` itself when ``keep_own`` and it is a flow
    scheduler (a saved folder's own sampler, e.g. Lucy Edit's UniPC at ``flow_shift`` 5, which the
    folder's users sample with), else diffusers' flow Euler scheduler over ``current``'s number of
    training timesteps with the training's time shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if keep_own and is_flow_scheduler(current):
        return current
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=current.config.num_train_timesteps, shift=shift)


def denoise_clip(
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    condition: torch.Tensor,
    text_states: torch.Tensor,
    noise: torch.Tensor,
    text_guidance: float,
    video_guidance: float,
    num_inference_steps: int,
    lvsc: float = 0.0,
    z_ref: torch.Tensor | None = None,
    flows: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    batched_guidance: bool = True,
    on_step_end: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    steps: Callable[[Iterable], Iterable] = lambda timesteps: timesteps,
) -> torch.Tensor:
    """One clip's clean latents sampled from ``noise`` by ``scheduler``, given the source latents.

    Each step weighs the predictions ``predict(z, c, text, t)`` that two-scale guidance needs
    (:func:`guidance_weights`: no video/no text, video/no text, video/text; ``text_states`` is
    ``[negative, prompt]``), in one batch with ``batched_guidance``. While ``i < lvsc * steps``, on
    a clip with reference latents ``z_ref``, the prediction is corrected by LVSC (warped along
    ``flows`` when given). ``on_step_end(i, t, z)`` sees the latents after each step and returns
    the ones to go on with; ``steps`` wraps the timesteps (a progress bar).

    A flow-matching scheduler (:func:`is_flow_scheduler`) gets velocities: the guidance weighs
    them alike, and LVSC gives the reference frames ``v_ref = (z - z_ref) / sigma``
    (:func:`flow_reference_velocity`), so their clean estimate ``z - sigma v`` is exactly ``z_ref``.
    """
    flow = is_flow_scheduler(scheduler)
    scheduler.set_timesteps(num_inference_steps, device=condition.device)
    uncond, cond = text_states[:1], text_states[1:]
    zero = torch.zeros_like(condition)
    # only the predictions guidance weighs (at video guidance 1 the unconditional one has weight 0)
    weighted = [(w, c, s) for w, c, s in zip(guidance_weights(text_guidance, video_guidance),
                                              (zero, condition, condition), (uncond, uncond, cond)) if w]
    # one U-Net batch a step: its conditions are the same at every step
    conditions, texts = torch.cat([c for _, c, _ in weighted]), torch.cat([s for _, _, s in weighted])
    correct_until = lvsc * len(scheduler.timesteps) if z_ref is not None else 0
    z = noise.clone() if flow else noise * scheduler.init_noise_sigma  # flow schedulers start at sigma 1
    for i, t in enumerate(steps(scheduler.timesteps)):
        # flow schedulers take the latents as they are and a timestep per clip (sigma * T)
        z_in, t_in = (z, t.expand(1).to(z.dtype)) if flow else (scheduler.scale_model_input(z, t), t)
        if batched_guidance:
            outs = predict(torch.cat([z_in] * len(weighted)), conditions, texts, t_in).chunk(len(weighted))
        else:
            outs = [predict(z_in, c, s, t_in) for _, c, s in weighted]
        output = sum(w * o for (w, _, _), o in zip(weighted, outs))
        if i < correct_until:
            output = _lvsc_step(output, z_in, z_ref, flows, scheduler, t, flow)
        z = scheduler_step(scheduler, output, t, z, generator)
        if on_step_end is not None:
            z = on_step_end(i, t, z)
    return z


def _lvsc_step(output: torch.Tensor, z_in: torch.Tensor, z_ref: torch.Tensor, flows: torch.Tensor | None,
               scheduler, t, flow: bool) -> torch.Tensor:
    """One step's LVSC, in the parametrisation the scheduler samples: velocities against
    ``v_ref = (z - z_ref) / sigma``, else noise against ``eps_ref`` through the prediction type."""
    if flow:
        sigma = step_sigma(scheduler, t)
        if sigma <= 0:
            return output
        reference = flow_reference_velocity(z_in, z_ref, sigma)
        return lvsc_blend_warped(output, reference, flows) if flows is not None else lvsc_blend(output, reference)
    prediction_type = scheduler.config.prediction_type
    a = scheduler.alphas_cumprod.to(z_in.device)[int(t)]
    eps = to_epsilon(output, z_in, a, prediction_type)
    eps = lvsc_correct_warped(eps, z_in, z_ref, a, flows) if flows is not None else lvsc_correct(eps, z_in, z_ref, a)
    return from_epsilon(eps, z_in, a, prediction_type)
