"""Edit-quality metrics as pure functions: CLIP-T, CLIP-F, CLIP-D, PickScore, warp and seam error."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .flow import optical_flow
from .sampling import warp


def clip_text_score(frames: torch.Tensor, text: torch.Tensor) -> float:
    """CLIP-T = mean_f cos(E_f, T): how well edited frames ``(F, d)`` match the text ``(d,)``."""
    return F.cosine_similarity(frames, text.expand_as(frames), dim=-1).mean().item()


def clip_frame_consistency(frames: torch.Tensor) -> float:
    """CLIP-F = mean_f cos(E_f, E_{f+1}) over consecutive edited frames ``(F, d)`` (1 for one frame)."""
    if len(frames) < 2:
        return 1.0
    return F.cosine_similarity(frames[:-1], frames[1:], dim=-1).mean().item()


def clip_directional(source: torch.Tensor, edited: torch.Tensor, source_text: torch.Tensor, edited_text: torch.Tensor) -> float:
    """CLIP-D = mean_f cos(E_f - S_f, T_out - T_in): the edit moves the frames the way the text moves."""
    direction = (edited_text - source_text).expand_as(edited)
    return F.cosine_similarity(edited - source, direction, dim=-1).mean().item()


def pick_score(frames: torch.Tensor, text: torch.Tensor, logit_scale: float) -> float:
    """PickScore = mean_f logit_scale * cos(E_f, T) with a PickScore-trained CLIP's own scale."""
    return logit_scale * clip_text_score(frames, text)


def consistent_flow(source: np.ndarray, target: np.ndarray, threshold: float = 1.0, method: str = "dis"):
    """Flow ``f`` with ``source(x) ~ target(x + f(x))`` and a mask where it is forward-backward
    consistent: ``|f(x) + b(x + f(x))| < threshold`` (pixels), ``b`` the flow back."""
    forward = optical_flow(source, target, method)
    backward = optical_flow(target, source, method)
    f = torch.from_numpy(forward).permute(2, 0, 1)[None]
    b = torch.from_numpy(backward).permute(2, 0, 1)[None]
    round_trip = f + warp(b, f)
    mask = (round_trip.norm(dim=1, keepdim=True) < threshold).float() * warp(torch.ones_like(f[:, :1]), f)
    return f, mask


def source_pair_flows(source: np.ndarray, threshold: float = 1.0, method: str = "dis") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each consecutive pair ``(t, t+1)`` of the **source** video: the flow from frame ``t+1``
    to frame ``t`` and its forward-backward mask (:func:`consistent_flow`). Computed once per
    video, it serves every edit, setting and metric of that video."""
    return [consistent_flow(source[t + 1], source[t], threshold, method) for t in range(len(source) - 1)]


def pair_warp_errors(source: np.ndarray, edited: np.ndarray, threshold: float = 1.0, method: str = "dis",
                     flows: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> np.ndarray:
    """For each consecutive pair ``(t, t+1)``: masked MSE between edited frame ``t+1`` and edited
    frame ``t`` warped along the **source** video's flow (pixels in [0, 1])::

        e_t = sum_x m(x) (E_{t+1}(x) - E_t(x + f(x)))^2 / (3 sum_x m(x)),  E_{t+1}(x) ~ E_t(x + f(x))

    with ``f`` the flow from source frame ``t+1`` to ``t`` and ``m`` its forward-backward mask
    (``flows``: :func:`source_pair_flows` of ``source``, computed here when not given).
    """
    if flows is None:
        flows = source_pair_flows(source, threshold, method)
    errors = np.zeros(max(len(edited) - 1, 0))
    for t in range(len(edited) - 1):
        flow, mask = flows[t]
        previous = torch.from_numpy(edited[t]).permute(2, 0, 1)[None].float() / 255
        current = torch.from_numpy(edited[t + 1]).permute(2, 0, 1)[None].float() / 255
        diff = (current - warp(previous, flow)) ** 2 * mask
        errors[t] = (diff.sum() / (3 * mask.sum()).clamp_min(1.0)).item()
    return errors


def warp_error(source: np.ndarray, edited: np.ndarray, **kw) -> float:
    """Motion-aware MSE: the mean of :func:`pair_warp_errors` over all consecutive pairs."""
    errors = pair_warp_errors(source, edited, **kw)
    return float(errors.mean()) if len(errors) else 0.0


def seam_pairs(boundaries: list[int], num_frames: int) -> list[int]:
    """Indices ``t`` of the consecutive pairs ``(t, t+1)`` that cross into a clip's first new frame."""
    return [b - 1 for b in boundaries if 0 < b < num_frames]


def seam_error(source: np.ndarray, edited: np.ndarray, boundaries: list[int], **kw) -> float:
    """Warp error restricted to pairs ``(b-1, b)`` that cross into a clip's first new frame ``b``."""
    errors = pair_warp_errors(source, edited, **kw)
    picked = [errors[t] for t in seam_pairs(boundaries, len(edited))]
    return float(np.mean(picked)) if picked else 0.0


def masked_psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    """PSNR over the pixels ``keep`` marks (``(F, H, W)`` bool) of uint8 videos ``(F, H, W, 3)``:
    ``10 log10(255^2 / MSE)``; FiVE's background preservation with ``keep`` = outside the edit mask."""
    if not keep.any():
        return float("nan")
    diff = (a.astype(np.float64) - b.astype(np.float64))[keep]
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def masked_ssim(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5, on grey levels) over the pixels ``keep`` marks."""
    import cv2

    if not keep.any():
        return float("nan")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for x, y, k in zip(a, b, keep):
        x = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float64)
        y = cv2.cvtColor(y, cv2.COLOR_RGB2GRAY).astype(np.float64)
        blur = lambda v: cv2.GaussianBlur(v, (11, 11), 1.5)  # noqa: E731
        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        ssim = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(ssim[k])
    return float(np.mean(np.concatenate(values)))
