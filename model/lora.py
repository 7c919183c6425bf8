"""LoRA adapters on the editor's U-Net (peft): adding, merging, and diffusers' LoRA safetensors layout."""

from __future__ import annotations

import os
from pathlib import Path

import torch

ADAPTER = "insv2v"
# the motion modules' and the spatial transformers' attention projections (diffusers' names)
DEFAULT_TARGETS = (r".*motion_modules\..*\.(to_q|to_k|to_v|to_out\.0)", r".*attentions\..*\.(to_q|to_k|to_v|to_out\.0)")
# a Wan DiT's self- and cross-attention projections
DIT_TARGETS = (r".*blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)",)
# and its feed-forward layers, as other Wan trainers also adapt them (``lora_targets: attention+ffn``)
DIT_FFN_TARGETS = (*DIT_TARGETS, r".*blocks\.\d+\.ffn\.(net\.0\.proj|net\.2)")
TARGET_PRESETS = {"attention": None, "attention+ffn": DIT_FFN_TARGETS}


def default_targets(denoiser_name: str) -> tuple[str, ...]:
    """The layers LoRA wraps unless told otherwise: the denoiser's attention projections."""
    return DIT_TARGETS if denoiser_name == "transformer" else DEFAULT_TARGETS


def lora_targets(given: str | list[str] | tuple[str, ...] | None, denoiser_name: str) -> tuple[str, ...]:
    """``model.lora_targets`` as regular expressions: ``None`` or ``attention`` (the default), the
    preset ``attention+ffn`` (a DiT's feed-forward layers too), or a list of expressions."""
    if given is None or isinstance(given, str):
        if given is not None and given not in TARGET_PRESETS:
            raise ValueError(f"lora_targets must be a list of patterns or one of {', '.join(TARGET_PRESETS)}, got {given!r}")
        if given == "attention+ffn" and denoiser_name != "transformer":
            raise ValueError("lora_targets attention+ffn is a DiT preset (Wan's ffn layers); list patterns for a U-Net")
        return TARGET_PRESETS.get(given) or default_targets(denoiser_name)
    return tuple(given)


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def add_lora(unet: torch.nn.Module, rank: int = 16, alpha: float | None = None,
             targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> int:
    """Freeze ``unet`` and add a LoRA adapter ``W + (alpha / rank) B A`` (``B`` zero at init, so the
    output is unchanged) on every linear layer whose name fully matches one of ``targets``
    (regular expressions). Returns the number of adapter parameters, the only trainable ones."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"lora_rank must be at least 1, got {rank}")
    unet.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        target_modules="|".join(f"(?:{t})" for t in targets), init_lora_weights=True)
    try:
        unet.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora_targets match no layer of the U-Net ({str(err).splitlines()[0][:120]})") from None
    return sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name and p.requires_grad)


def has_lora(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


def merge_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapter into the base weights and remove it: a plain U-Net that computes the same."""
    unet.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER])
    unet.unload_lora()
    return unet


def save_lora(unet: torch.nn.Module, directory: str | os.PathLike, prefix: str = "unet") -> Path:
    """The adapter alone, as diffusers writes it (``pytorch_lora_weights.safetensors``, keys
    ``<prefix>.<module>.lora_A.weight`` / ``lora_B.weight``; ``prefix`` is the network's component
    name: ``unet``, or ``transformer`` for a DiT, which ``LucyEditPipeline.load_lora_weights`` reads)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config[ADAPTER]
    metadata = {"format": "pt", "lora_rank": str(config.r), "lora_alpha": str(config.lora_alpha)}
    save_file({f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in state.items()}, directory / LORA_WEIGHTS,
              metadata=metadata)
    return directory / LORA_WEIGHTS


def load_lora(unet: torch.nn.Module, path: str | os.PathLike, scale: float = 1.0, name: str = ADAPTER,
              prefix: str = "unet") -> None:
    """Apply a LoRA file (or a folder holding ``pytorch_lora_weights.safetensors``) to ``unet`` at
    ``scale`` (0 turns it off)."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights at {path}")
    unet.load_lora_adapter(str(path), prefix=prefix, adapter_name=name)
    unet.set_adapters([name], weights=[float(scale)])
