"""Original-format AnimateDiff motion-module files (``mm_sd_v15.ckpt`` and the like) read as diffusers MotionAdapters."""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from diffusers import MotionAdapter
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

from .weights import UNET_PREFIX, EditorLoadError, read_checkpoint, state_mismatches


def motion_adapter_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``MotionAdapter`` arguments read off an original AnimateDiff checkpoint's shapes.

    Channels per level from each down level's first motion module, modules per level, a mid-block
    module if present (v2), transformer depth and position-table length (24 in v1, 32 in v2).
    """
    levels: dict[int, int] = {}
    per_level: dict[int, set[int]] = {}
    depth = set()
    max_len = 24
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "down_blocks" and parts[2] == "motion_modules":
            level, index = int(parts[1]), int(parts[3])
            per_level.setdefault(level, set()).add(index)
            if key.endswith("temporal_transformer.proj_in.weight"):
                levels[level] = value.shape[1]
        if ".transformer_blocks." in key:
            depth.add(int(key.split(".transformer_blocks.")[1].split(".")[0]))
        if key.endswith("pos_encoder.pe"):
            max_len = value.shape[1]
    if not levels:
        raise ValueError("no 'down_blocks.N.motion_modules' weights: not an AnimateDiff motion-module checkpoint")
    return {
        "block_out_channels": [levels[i] for i in sorted(levels)],
        "motion_layers_per_block": max(len(v) for v in per_level.values()),
        "motion_mid_block_layers_per_block": 1,
        "motion_transformer_layers_per_block": max(depth) + 1 if depth else 1,
        "use_motion_mid_block": any(k.startswith("mid_block.motion_modules") for k in state),
        "motion_max_seq_length": max_len,
        "motion_num_attention_heads": 8,
    }


def motion_adapter_from_original(path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> MotionAdapter:
    """An original-format AnimateDiff motion-module file (``mm_sd_v15.ckpt``,
    ``mm_sd_v15_v2.ckpt``, or a ``.safetensors`` of the same keys) as a diffusers ``MotionAdapter``."""
    state = read_checkpoint(path)
    state = {k[len(UNET_PREFIX):] if k.startswith(UNET_PREFIX) else k: v for k, v in state.items()}
    try:
        config = motion_adapter_config(state)
    except ValueError as err:
        raise EditorLoadError(f"{path}: {err}") from None
    adapter = MotionAdapter(**config)
    weights = convert_animatediff_checkpoint_to_diffusers(state)
    problems = state_mismatches(adapter, weights)
    if problems:
        raise EditorLoadError(f"{path}: motion modules do not fit ({len(problems)} problems: {problems[0]})")
    adapter.load_state_dict(weights, strict=False)
    return adapter.to(dtype=torch_dtype) if torch_dtype is not None else adapter
