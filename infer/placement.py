"""Where and in what precision models run: the one device and dtype policy of every command."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def compute_device(requested: str | None = None, local_rank: int = 0) -> torch.device:
    """``requested``, else ``cuda:<local_rank>`` (modulo the GPUs there) when CUDA is available,
    made the current device so each rank of a node runs on its own GPU, else the CPU."""
    if requested:
        device = torch.device(requested)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def dtype_named(name: str | None, what: str = "--dtype") -> torch.dtype | None:
    """The precision called ``name`` (None: leave the model's own)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]

