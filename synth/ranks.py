"""Which slice of a build this process owns, and which device and precision it renders on."""

from __future__ import annotations

import os

import torch

from infer.placement import DTYPES, compute_device, dtype_named  # noqa: F401  (DTYPES: synth's commands name them)


def rank_and_world(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    """This process's slice: explicit flags, else torchrun's RANK/WORLD_SIZE, else SLURM's."""
    if shard_index is not None or num_shards is not None:
        rank, world = shard_index or 0, num_shards or 1
    else:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world:
        raise ValueError(f"shard index {rank} is outside 0..{world - 1}")
    return rank, world


def local_rank() -> int:
    """This process's index on its node: torchrun's LOCAL_RANK, else SLURM_LOCALID, else 0."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def render_device(requested: str | None = None) -> torch.device:
    """``requested``, else this rank's GPU (``cuda:<local rank>``) when CUDA is there, else the CPU."""
    return compute_device(requested, local_rank())


def render_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The configured precision (``generator.dtype`` / ``--dtype``), else float16 on CUDA and
    float32 elsewhere."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return dtype_named(name, "generator.dtype")
