"""How the frozen base is held during training: half precision or fp8 storage, and the parts that stay float32."""

from __future__ import annotations

import functools

import torch

BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float8_e4m3fn": torch.float8_e4m3fn}
HALF_PRECISIONS = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16,
                   "16-true": torch.float16}


def base_dtype_for(base_dtype: str | None, precision: str | None) -> torch.dtype:
    """The frozen base's dtype: ``base_dtype`` when set, else the half precision a mixed-precision
    run computes in (its frozen weights need no float32 copy: they take no step), else float32."""
    if base_dtype is not None:
        if base_dtype not in BASE_DTYPES:
            raise ValueError(f"model.base_dtype must be one of {', '.join(BASE_DTYPES)} or null, got {base_dtype!r}")
        return BASE_DTYPES[base_dtype]
    return HALF_PRECISIONS.get(str(precision), torch.float32)


@torch.no_grad()
def hold_frozen(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Every frozen floating weight of ``module`` in ``dtype``, except the parts its class keeps in
    float32 (``_keep_in_fp32_modules``: Wan's time embedder, norms, modulation); trainable weights
    (and so their gradients and optimiser moments) stay float32. Returns the bytes now held."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    held = 0
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        trains = isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad
        if tensor.is_floating_point() and not trains:
            tensor.data = tensor.data.to(torch.float32 if keep.intersection(name.split(".")) else dtype)
        held += tensor.numel() * tensor.element_size()
    return held


def store_in_fp8(transformer: torch.nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Frozen linear and convolution weights stored in float8 (e4m3) and cast to ``compute_dtype``
    for each layer's forward: diffusers' layerwise casting, which leaves the model's norms,
    embeddings, patch embedding, its float32 parts and every LoRA adapter as they are."""
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def run_in_float32(module: torch.nn.Module) -> torch.nn.Module:
    """``module``'s forward in float32 with autocast off, as Wan's own code runs its time embedding
    (under bf16 autocast its linear layers would otherwise compute in bf16). Its weights and
    state-dict keys are unchanged."""
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device_type=device, enabled=False):
            args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            return inner(*args, **kwargs)

    module.forward = forward
    return module
