"""Reading weight files and component folders: checkpoints read weights-only, every failure one EditorLoadError line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

# Keys behind these wrappers (Lightning's compiled module, DeepSpeed) are read without them.
WRAPPER_PREFIXES = ("_forward_module.", "module.")
DEEPSPEED_MODEL_STATES = "checkpoint/mp_rank_00_model_states.pt"
UNET_PREFIX = "unet."


class EditorLoadError(ValueError):
    """An editor (or base model) folder is missing a part or holds one that cannot be read."""


def require_files(folder: Path, config: str, weights: str | None, what: str | None = None) -> None:
    what = what or folder.name
    if not folder.is_dir():
        raise EditorLoadError(f"missing {what} folder: {folder}")
    for file in (config, weights):
        if file is not None and not (folder / file).is_file():
            raise EditorLoadError(f"{what} folder {folder} is missing {file}")


def load_component(what: str, load):
    """``load()``, its failure of any library error type as one EditorLoadError line naming ``what``."""
    try:
        loaded = load()
    except EditorLoadError:
        raise
    except Exception as err:  # corrupt weights or configs surface as many library error types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EditorLoadError(f"cannot load {what}: {first}") from err
    if isinstance(loaded, torch.nn.Module):
        own_memory(loaded)
    return loaded


@torch.no_grad()
def own_memory(module: torch.nn.Module) -> None:
    """Copy every tensor out of the memory-mapped weights file into fresh allocations.

    Mapped tensors are not SIMD-aligned, which changes CPU kernels' summation order (outputs then
    differ from the saved model's in the last bit), and they pin the file, which must stay
    rewritable (saving over the folder a model came from).
    """
    for tensor in (*module.parameters(), *module.buffers()):
        tensor.data = tensor.data.clone()


def module_state(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The flat state dict inside an authors' checkpoint.

    Accepts the state dict itself, one nested under ``state_dict`` (Lightning) or ``module``
    (DeepSpeed), and keys behind ``_forward_module.``/``module.`` wrappers.
    """
    state: Any = checkpoint
    for key in ("state_dict", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError("checkpoint holds no state dict")
    flat = {}
    for key, value in state.items():
        if not isinstance(key, str):
            continue
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        flat[key] = value
    return flat


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint file as a flat state dict: ``.safetensors``, or a pickle read with
    ``weights_only=True`` (``.ckpt``/``.pt``/``.pth``/``.bin``), or the folder DeepSpeed ZeRO-2
    writes for a Lightning checkpoint (its model states file). Unreadable files raise
    :class:`EditorLoadError` with one line."""
    path = Path(path)
    if path.is_dir() and (path / DEEPSPEED_MODEL_STATES).is_file():
        path = path / DEEPSPEED_MODEL_STATES
    if not path.is_file():
        raise EditorLoadError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return module_state(load_file(str(path)))
        return module_state(torch.load(path, map_location="cpu", weights_only=True))
    except EditorLoadError:
        raise
    except Exception as err:  # pickle, zip and safetensors errors have no common base
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EditorLoadError(f"{path} is not a readable checkpoint ({reason[:200]})") from None


def state_mismatches(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Every way ``state`` fails to fill ``module`` exactly: missing or unexpected keys and wrong
    shapes (the recomputed sinusoidal ``pos_embed.pe`` tables may be absent)."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state and not k.endswith("pos_embed.pe")]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"shape of {k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    return problems
