"""Which GroupNorms of the video U-Net pool their statistics over the clip and which over one frame."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNetMotionModel
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

# "diffusers": diffusers' UNetMotionModel as it is. ResNet blocks and the output norm normalise
#   each frame alone; each motion module normalises over all frames of the clip.
# "insv2v": the InsV2V authors' network (their ResnetBlock3D / conv_norm_out see the 5-D clip,
#   their temporal transformer folds frames into the batch before its norm): the reverse.
NORM_LAYOUTS = ("diffusers", "insv2v")


class ClipGroupNorm(torch.nn.GroupNorm):
    """A GroupNorm that is fed ``(B*F, C, H, W)`` frames but pools statistics over the whole clip.

    ``y = GN(x.view(B, F, C, H, W).transpose(1, 2))``: each group's mean and variance run over
    ``F*H*W*C/G`` values instead of ``H*W*C/G``. The frame count ``F`` is not in the tensor; the
    U-Net's forward pre-hook (:func:`set_norm_layout`) writes it into :attr:`frames` before
    every call. Same parameters and state-dict keys as ``torch.nn.GroupNorm``.
    """

    frames: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bf, c, h, w = x.shape
        if bf % self.frames:
            raise ValueError(f"{bf} frames in the batch do not split into clips of {self.frames}")
        clip = x.reshape(bf // self.frames, self.frames, c, h, w).transpose(1, 2)
        out = F.group_norm(clip, self.num_groups, self.weight, self.bias, self.eps)
        return out.transpose(1, 2).reshape(bf, c, h, w)


class FrameGroupNorm(torch.nn.GroupNorm):
    """A GroupNorm that is fed a clip ``(B, C, F, H, W)`` but normalises each frame alone.

    ``y[:, :, f] = GN(x[:, :, f])`` for every ``f``. Same parameters and state-dict keys as
    ``torch.nn.GroupNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * f, c, h, w)
        out = F.group_norm(frames, self.num_groups, self.weight, self.bias, self.eps)
        return out.reshape(b, f, c, h, w).transpose(1, 2)


def _as(norm: torch.nn.GroupNorm, cls: type[torch.nn.GroupNorm]) -> torch.nn.GroupNorm:
    """``norm`` re-classed as ``cls``: the same parameter tensors (trainable state, device and
    dtype kept), only the statistics change."""
    if type(norm) is cls:
        return norm
    swapped = cls.__new__(cls)
    swapped.__dict__.update(norm.__dict__)
    return swapped


def _record_frames(unet: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    sample = args[0] if args else kwargs["sample"]
    for module in unet.modules():
        if isinstance(module, ClipGroupNorm):
            module.frames = sample.shape[2]


def _norm_sites(unet: UNetMotionModel):
    """``(owner, attribute, kind)`` for every GroupNorm whose layout differs between the two."""
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            yield module, "norm1", "resnet"
            yield module, "norm2", "resnet"
        elif isinstance(module, AnimateDiffTransformer3D):
            yield module, "norm", "motion"
    if unet.conv_norm_out is not None:
        yield unet, "conv_norm_out", "resnet"


def set_norm_layout(unet: UNetMotionModel, layout: str) -> UNetMotionModel:
    """Make ``unet`` normalise as ``layout`` says (see :data:`NORM_LAYOUTS`), in place.

    ``"insv2v"``: every ResNet norm and ``conv_norm_out`` become :class:`ClipGroupNorm`, every
    motion module's norm a :class:`FrameGroupNorm`; ``"diffusers"`` restores plain GroupNorms.
    Weights are untouched, so the state dict (and ``save_pretrained``) is the same either way.
    """
    if layout not in NORM_LAYOUTS:
        raise ValueError(f"norm_layout must be one of {', '.join(NORM_LAYOUTS)}, got {layout!r}")
    faithful = layout == "insv2v"
    for owner, name, kind in _norm_sites(unet):
        norm = getattr(owner, name)
        if faithful:
            target = ClipGroupNorm if kind == "resnet" else FrameGroupNorm
        else:
            target = torch.nn.GroupNorm
        setattr(owner, name, _as(norm, target))
    # found by identity, not by a stored handle, so a deep copy of the U-Net (EMA) keeps working
    for key, hook in list(unet._forward_pre_hooks.items()):
        if hook is _record_frames:
            del unet._forward_pre_hooks[key]
            unet._forward_pre_hooks_with_kwargs.pop(key, None)
    if faithful:
        unet.register_forward_pre_hook(_record_frames, with_kwargs=True)
    return unet


def norm_layout_of(unet: UNetMotionModel) -> str:
    """The layout ``unet`` currently computes (``"insv2v"`` or ``"diffusers"``)."""
    kinds = {type(getattr(owner, name)) for owner, name, _ in _norm_sites(unet)}
    if kinds & {ClipGroupNorm, FrameGroupNorm}:
        return "insv2v"
    return "diffusers"
