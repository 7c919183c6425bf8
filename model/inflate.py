"""Turning a 2D (InstructPix2Pix or Stable Diffusion) U-Net into the video editor's U-Net."""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from diffusers.utils import logging as diffusers_logging

MIN_TEMPORAL_POSITIONS = 32


def widened_conv_in(conv_in: torch.nn.Conv2d, in_channels: int) -> torch.nn.Conv2d:
    """A copy of ``conv_in`` taking ``in_channels`` inputs.

    ``W'[:, :c] = W``, ``W'[:, c:] = 0`` and ``b' = b``: with a zero extra input the layer computes
    exactly what it did before (InstructPix2Pix's initialisation; the bias is kept, not reset).
    """
    old = conv_in.in_channels
    if in_channels < old:
        raise ValueError(f"cannot narrow conv_in from {old} to {in_channels} channels")
    new = torch.nn.Conv2d(
        in_channels,
        conv_in.out_channels,
        kernel_size=conv_in.kernel_size,
        stride=conv_in.stride,
        padding=conv_in.padding,
        bias=conv_in.bias is not None,
        device=conv_in.weight.device,
        dtype=conv_in.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old].copy_(conv_in.weight)
        if conv_in.bias is not None:
            new.bias.copy_(conv_in.bias)
    return new


def motion_modules(unet: UNetMotionModel) -> list[torch.nn.Module]:
    """Every temporal transformer (AnimateDiff motion module) of ``unet``, in block order."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [m for block in blocks if hasattr(block, "motion_modules") for m in block.motion_modules]


def zero_motion_outputs(unet: UNetMotionModel) -> None:
    """Zero every motion module's ``proj_out`` so each temporal block is the identity map.

    A motion module computes ``h + proj_out(attn(h))``; with ``proj_out = 0`` it returns ``h`` and
    the video U-Net equals the 2D U-Net applied to each frame independently.
    """
    with torch.no_grad():
        for module in motion_modules(unet):
            module.proj_out.weight.zero_()
            module.proj_out.bias.zero_()


def is_identity_motion_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a motion module computing ``h + proj_out(attn(h))`` with a plain
    ``proj_out`` whose weight and bias are all zero, i.e. the identity map ``h``.

    A wrapped ``proj_out`` (LoRA) is never taken for the identity, whatever its base weight, nor is
    a sharded one (FSDP: each rank holds a part, and a local test could disagree across ranks).
    """
    proj_out = getattr(module, "proj_out", None)
    if not isinstance(module, AnimateDiffTransformer3D) or type(proj_out) is not torch.nn.Linear:
        return False
    if _is_sharded_tensor(proj_out.weight):
        return False
    return not proj_out.weight.any() and (proj_out.bias is None or not proj_out.bias.any())


def _is_sharded_tensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without torch.distributed
        return False
    return isinstance(tensor, DTensor)


def _skipped_forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


@contextlib.contextmanager
def skipping_identity_motion_modules(unet: torch.nn.Module):
    """Leave every motion module that is the identity map (:func:`is_identity_motion_module`) out of
    ``unet``'s forward pass while the context is open.

    ``h + 0 = h``: the output is bit-identical, at a fraction of the cost (on the shapes editor a
    training step takes about 430 ms instead of 680). Skipped modules get no gradient, so this is
    only for modules that do not train (frozen, or not yet unfrozen) or for inference.
    """
    skipped = [m for m in motion_modules(unet) if is_identity_motion_module(m)] if isinstance(unet, UNetMotionModel) else []
    for module in skipped:
        module.forward = _skipped_forward  # an instance attribute: the state dict is untouched
    try:
        yield len(skipped)
    finally:
        for module in skipped:
            del module.forward


def _with_positions(adapter: MotionAdapter, length: int) -> MotionAdapter:
    """``adapter`` with a temporal position table of at least ``length`` rows.

    The table is sinusoidal (fixed, not learned), so a longer one agrees with the shorter on the
    rows they share; every learned weight is copied unchanged.
    """
    if adapter.config.motion_max_seq_length >= length:
        return adapter
    longer = MotionAdapter.from_config({**adapter.config, "motion_max_seq_length": length})
    missing, unexpected = longer.load_state_dict(
        {k: v for k, v in adapter.state_dict().items() if not k.endswith("pos_embed.pe")}, strict=False
    )
    if unexpected or any(not k.endswith("pos_embed.pe") for k in missing):
        raise ValueError(f"motion adapter does not match its own config: {missing[:3]} {unexpected[:3]}")
    return longer.to(device=adapter.device, dtype=adapter.dtype)


@contextlib.contextmanager
def _quiet_diffusers():
    """Silence diffusers' warning about dtype casting inside ``from_unet2d`` (it casts to the
    2D U-Net's own dtype, which is harmless)."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def inflate(
    unet2d: UNet2DConditionModel,
    motion_adapter: MotionAdapter | None = None,
    *,
    min_temporal_positions: int = MIN_TEMPORAL_POSITIONS,
) -> UNetMotionModel:
    """Inflate a 2D U-Net into a video U-Net that also sees the source video.

    * ``conv_in``: a U-Net whose input has as many channels as its output (an SD U-Net, 4) is
      widened to twice that (noisy latent + source latent), see :func:`widened_conv_in`; one that
      already takes twice its output (InstructPix2Pix, 8) is kept.
    * Without ``motion_adapter`` every motion module's output projection is zero, so the result
      equals ``unet2d`` applied frame by frame; with one, its weights are loaded.
    * The temporal position table has at least ``min_temporal_positions`` rows.

    ``unet2d`` itself is left untouched. Attention runs through PyTorch SDPA.
    """
    latent = unet2d.config.out_channels
    in_channels = unet2d.config.in_channels
    if in_channels not in (latent, 2 * latent):
        raise ValueError(
            f"conv_in takes {in_channels} channels; expected {latent} (text-to-image U-Net) "
            f"or {2 * latent} (instruction U-Net) for {latent} output channels"
        )
    if motion_adapter is not None:
        motion_adapter = _with_positions(motion_adapter, min_temporal_positions)
    with _quiet_diffusers():
        video = UNetMotionModel.from_unet2d(unet2d, motion_adapter)
    if motion_adapter is None:
        if video.config.motion_max_seq_length < min_temporal_positions:
            raise ValueError(f"UNetMotionModel default position table is shorter than {min_temporal_positions}")
        zero_motion_outputs(video)
    if in_channels == latent:
        video.conv_in = widened_conv_in(video.conv_in, 2 * latent)
        video.register_to_config(in_channels=2 * latent)
    video.set_attn_processor(AttnProcessor2_0())
    return video


def random_motion_adapter(unet_config: Mapping[str, Any], adapter_config: Mapping[str, Any]) -> MotionAdapter:
    """A randomly initialised motion adapter for a 2D U-Net of ``unet_config``: its block widths,
    layers per block and norm groups, plus ``adapter_config`` (``MotionAdapter`` arguments, e.g.
    ``use_motion_mid_block: false`` for the AnimateDiff v1 layout)."""
    return MotionAdapter(block_out_channels=unet_config["block_out_channels"],
                         motion_layers_per_block=unet_config.get("layers_per_block", 2),
                         motion_norm_num_groups=unet_config.get("norm_num_groups", 32),
                         **adapter_config)
