"""A training config's memory plan: weights by dtype, trainable state, and activations measured by running the step on the meta device.

    python -m train.memory --config configs/lucy-lora.yaml --editor configs/model/wan2.2-ti2v-5b-random.yaml --gpu-gib 24
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from infer.arguments import USAGE_ERROR, OneLineParser, UsageError

GIB = 2**30
ADAM_BYTES = 16  # per trainable float32 parameter: the weight, its gradient and AdamW's two moments


@dataclass
class Activations:
    """What autograd holds for backward in one training step, in bytes."""

    outside_blocks: int  # saved outside the checkpointed blocks: embeddings, head, loss, and each block's inputs
    one_block: int  # one block's own saved tensors, held while it is recomputed (0 without checkpointing)
    checkpointed: bool

    @property
    def total(self) -> int:
        return self.outside_blocks + self.one_block


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@contextlib.contextmanager
def counting_saved(counter: dict[int, int], exclude: set[int]):
    """Count the bytes of every distinct storage autograd saves (views share one; weights excluded)."""
    def pack(t: torch.Tensor):
        key = storage_key(t)
        if key not in exclude:
            counter[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


@contextlib.contextmanager
def fused_attention():
    """Attention as a fused kernel keeps it for backward (queries, keys, values, output and the
    log-sum-exp: no L x L matrix), as a GPU's flash or memory-efficient attention does; the meta
    device would otherwise take the unfused path, which saves the whole attention matrix."""
    import torch.nn.functional as F

    plain = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or kwargs.get("enable_gqa"):
            return plain(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                          scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


def measure_activations(editor, batch_size: int, frames: int, height: int, width: int, dtype: torch.dtype,
                        device: torch.device | str = "meta") -> Activations:
    """Run one flow-matching training step's forward and backward of ``editor``'s denoiser on
    ``device`` (the meta device: shapes only, attention as a GPU's fused kernel keeps it:
    :func:`fused_attention`) and add up what autograd saves, under the
    denoiser's configured gradient checkpointing: the tensors the step saves (outside the
    checkpointed blocks, and each block's inputs, kept to recompute it) and one block's own saved
    tensors (held while that block is recomputed in backward)."""
    denoiser = editor.denoiser
    # held until the end: a weight's storage freed mid-step (fp8 layerwise casting swaps a layer's weight for a
    # cast copy and back) would lend its address to an activation, which would then be left out
    held = [t.untyped_storage() for t in (*denoiser.parameters(), *denoiser.buffers())]
    weights = {s._cdata for s in held}
    t = editor.temporal_compression
    latent_frames = frames if t == 1 else 1 + (frames - 1) // t
    s = editor.vae_scale_factor
    shape = (batch_size, editor.latent_channels, latent_frames, height // s, width // s)
    text_shape = (batch_size, editor.text_length, editor.text_encoder.config.d_model
                  if hasattr(editor.text_encoder.config, "d_model") else editor.text_encoder.config.hidden_size)
    make = lambda size: torch.randn(size, device=device, dtype=dtype)  # noqa: E731
    noisy, condition, target, text = make(shape), make(shape), make(shape), make(text_shape)
    timestep = torch.full((batch_size,), 500.0, device=device)
    blocks = list(getattr(denoiser, "blocks", None) or [])
    checkpointed = bool(getattr(denoiser, "gradient_checkpointing", False)) and bool(blocks)
    captured: list[tuple] = []

    def keep_input(module, args, kwargs):
        if not captured:  # the first block's call, to measure one block on its own
            captured.append((module, args, kwargs))

    hooks = [b.register_forward_pre_hook(keep_input, with_kwargs=True) for b in blocks]
    outside: dict[int, int] = {}
    fused = fused_attention() if str(device) == "meta" else contextlib.nullcontext()
    try:
        with fused:  # the backward's recomputation must take the forward's path too
            with counting_saved(outside, weights):
                prediction = editor.predict(noisy, condition, text, timestep)
                loss = (prediction.float() - target.float()).pow(2).mean()
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    one_block: dict[int, int] = {}
    if checkpointed and captured:  # the block's own saved tensors, as its recomputation holds them
        module, args, kwargs = captured[0]
        with fused_attention() if str(device) == "meta" else contextlib.nullcontext(), \
                counting_saved(one_block, weights | {storage_key(a) for a in args if isinstance(a, torch.Tensor)}):
            module(*[a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                     for a in args], **kwargs)
    for p in denoiser.parameters():
        p.grad = None
    del held
    return Activations(sum(outside.values()), sum(one_block.values()), checkpointed)


@dataclass
class MemoryPlan:
    """One configuration's memory, in bytes, with the settings it was computed for. The cache,
    activation offload and blocks swapped change no measurement: :meth:`with_settings` derives
    them from one measured plan."""

    settings: dict[str, Any]
    denoiser_weights: dict[str, int] = field(default_factory=dict)  # "component dtype" -> bytes
    encoder_weights: dict[str, int] = field(default_factory=dict)  # the text encoder and VAE, off the device on a cache
    trainable: int = 0  # parameters
    measured: Activations | None = None  # what the step saves, before any offload
    block_weights: list[int] = field(default_factory=list)  # each block's frozen bytes, in forward order
    block_trainable: list[int] = field(default_factory=list)  # each block's trained parameters
    cached: bool = False
    activation_offload: bool = False
    blocks_to_swap: int = 0

    def with_settings(self, cached: bool | None = None, activation_offload: bool | None = None,
                      blocks_to_swap: int | None = None) -> MemoryPlan:
        """This plan on a latent cache or not, with activation offload or not, and with its first
        ``blocks_to_swap`` blocks held in CPU memory (FSDP2's CPU offload): their frozen weights
        leave the device but for the two largest, in flight (the running block and the one
        prefetched), and their adapters' state takes its step on the CPU."""
        changed = {k: v for k, v in dict(cached=cached, activation_offload=activation_offload,
                                         blocks_to_swap=blocks_to_swap).items() if v is not None}
        return replace(self, **changed, settings={**self.settings, **changed})

    @property
    def weights(self) -> dict[str, int]:
        """Weights on the device by component and dtype: without a cache the encoders run there every step."""
        return {**self.denoiser_weights, **({} if self.cached else self.encoder_weights)}

    @property
    def activations(self) -> Activations | None:
        """The measured activations; with offload the saved tensors wait in CPU memory and the
        device holds the block being recomputed."""
        a = self.measured
        if a is None or not self.activation_offload:
            return a
        return Activations(0, a.one_block or a.outside_blocks, a.checkpointed)

    @property
    def swapped(self) -> int:
        """Frozen bytes held in CPU memory instead of on the device, net of the blocks in flight."""
        frozen = self.block_weights[: self.blocks_to_swap]
        return sum(frozen) - sum(sorted(frozen)[-2:])

    @property
    def trainable_state(self) -> int:
        """The trained parameters on the device, with their gradients and AdamW's moments."""
        return (self.trainable - sum(self.block_trainable[: self.blocks_to_swap])) * ADAM_BYTES

    @property
    def total(self) -> int:
        return (sum(self.weights.values()) - self.swapped + self.trainable_state
                + (self.activations.total if self.activations else 0))


def plan(model: dict[str, Any], data: dict[str, Any], precision: str, editor_spec: Any | None = None,
         cached: bool | None = None, base_dtype: str | None = "config", activation_offload: bool | None = None,
         blocks_to_swap: int | None = None, frames: int | None = None, height: int | None = None,
         width: int | None = None) -> MemoryPlan:
    """The plan of a config's ``model``/``data`` sections at ``precision`` for its largest bucket
    (or its ``num_frames`` x ``resolution``²), its editor built on the meta device; the keyword
    arguments override the config's settings."""
    from model import load_editor, shipped_config
    from model.lora import add_lora, lora_targets
    from model.trainable import set_trainable

    from .precision import base_dtype_for, hold_frozen, store_in_fp8
    from .strategies import swappable_blocks

    from model.config import SHIPPED

    spec = editor_spec if editor_spec is not None else model.get("editor")
    if isinstance(spec, str) and spec in SHIPPED:
        spec = shipped_config(SHIPPED[spec])
    if isinstance(spec, (str, Path)) and str(spec).endswith((".yaml", ".yml")):
        spec = yaml.safe_load(Path(spec).read_text())
    if isinstance(spec, dict) and spec.get("backbone") == "wan":
        spec = {**spec, "meta": True}  # a DiT layout of any size costs no memory on the meta device
    editor = load_editor(spec)
    base = model.get("base_dtype") if base_dtype == "config" else base_dtype
    offload = bool(model.get("activation_offload", False)) if activation_offload is None else activation_offload
    cached = bool(data.get("cached")) if cached is None else cached
    trainable = model.get("trainable", "motion")
    denoiser = editor.denoiser
    if trainable == "lora":
        targets = lora_targets(model.get("lora_targets"), editor.denoiser_name)
        add_lora(denoiser, int(model.get("lora_rank", 64)), int(model.get("lora_alpha", model.get("lora_rank", 64))), targets)
    else:
        set_trainable(denoiser, trainable)
    if model.get("gradient_checkpointing"):
        denoiser.enable_gradient_checkpointing()
    dtype = base_dtype_for(base, precision)
    compute = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype
    if dtype != torch.float32:
        hold_frozen(denoiser, compute)
    if dtype == torch.float8_e4m3fn:
        store_in_fp8(denoiser, compute)
    largest = max(data.get("buckets") or [[int(data.get("num_frames", 16)), int(data.get("resolution", 256)),
                                            int(data.get("resolution", 256))]], key=lambda b: b[0] * b[1] * b[2])
    frames, height, width = frames or int(largest[0]), height or int(largest[1]), width or int(largest[2])
    result = MemoryPlan({"base_dtype": str(dtype).removeprefix("torch."), "clip": f"{frames}x{height}x{width}",
                         "batch": int(data.get("batch_size", 1)), "checkpointing": bool(model.get("gradient_checkpointing"))})
    for name, param in denoiser.named_parameters():
        if param.requires_grad:
            result.trainable += param.numel()
        else:
            key = f"{editor.denoiser_name} {str(param.dtype).removeprefix('torch.')}"
            result.denoiser_weights[key] = result.denoiser_weights.get(key, 0) + param.numel() * param.element_size()
    swap = int(model.get("blocks_to_swap", 0) or 0) if blocks_to_swap is None else blocks_to_swap
    for block in swappable_blocks(denoiser, swap):
        params = list(block.parameters())
        result.block_weights.append(sum(p.numel() * p.element_size() for p in params if not p.requires_grad))
        result.block_trainable.append(sum(p.numel() for p in params if p.requires_grad))
    # without a cache the encoders run on the device every step (bf16 under mixed precision, the VAE float32)
    encoder_dtype = compute if dtype != torch.float32 else torch.float32
    size = sum(p.numel() for p in editor.text_encoder.parameters())
    result.encoder_weights[f"text_encoder {str(encoder_dtype).removeprefix('torch.')}"] = size * encoder_dtype.itemsize
    if editor.vae is not None:
        result.encoder_weights["vae float32"] = sum(p.numel() for p in editor.vae.parameters()) * 4
    if dtype != torch.float32:  # autocast computes the trained layers in half precision too (peft's adapters
        for name, param in denoiser.named_parameters():  # stay float32: it casts their inputs itself)
            if param.requires_grad and "lora_" not in name:
                param.data = param.data.to(compute)
    result.measured = measure_activations(editor, result.settings["batch"], frames, height, width,
                                          compute if dtype != torch.float32 else torch.float32,
                                          device=next(denoiser.parameters()).device)
    return result.with_settings(cached=cached, activation_offload=offload, blocks_to_swap=swap)


def describe(p: MemoryPlan) -> list[str]:
    s = p.settings
    lines = [f"clip {s['clip']}, batch {s['batch']}: base {s['base_dtype']}, "
             f"{'latent cache' if p.cached else 'encoders on the device'}, "
             f"checkpointing {'on' if s['checkpointing'] else 'off'}, activation offload {'on' if p.activation_offload else 'off'}, "
             f"blocks swapped {p.blocks_to_swap}"]
    for key, size in sorted(p.weights.items()):
        lines.append(f"  weights {key:28s} {size / GIB:7.2f} GiB")
    if p.blocks_to_swap:
        lines.append(f"  swapped to CPU ({p.blocks_to_swap} blocks, 2 in flight) {-p.swapped / GIB:7.2f} GiB")
    lines.append(f"  trainable state ({p.trainable / 1e6:,.1f} M params x {ADAM_BYTES} B) {p.trainable_state / GIB:7.2f} GiB")
    a = p.activations
    lines.append(f"  activations (measured)             {a.total / GIB:7.2f} GiB "
                 f"(the step's saved tensors {a.outside_blocks / GIB:.2f}, one block recomputed {a.one_block / GIB:.2f})")
    return lines


def read_config(paths: list[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"--config: no file at {path}")
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        for section, values in loaded.items():
            if isinstance(values, dict) and isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], **values}
            else:
                merged[section] = values
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m train.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="a lightning fit config (repeatable, merged)")
    parser.add_argument("--editor", default=None, help="the editor layout to plan for (default: the config's model.editor)")
    parser.add_argument("--gpu-gib", type=float, default=None, help="say which settings bring the total under this")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        config = read_config(args.config)
        model, data = dict(config.get("model") or {}), dict(config.get("data") or {})
        precision = str((config.get("trainer") or {}).get("precision", "32-true"))
        spec = args.editor if args.editor is not None else model.get("editor")
        if isinstance(spec, dict) and str(spec.get("pretrained", "")).startswith("FILL_ME"):
            raise UsageError("model.editor is a FILL_ME placeholder: plan a layout with --editor "
                             "(e.g. configs/model/wan2.2-ti2v-5b-random.yaml for Lucy Edit)")
        size = dict(frames=args.frames, height=args.height, width=args.width)
        given = plan(model, data, precision, spec, **size)
        print("\n".join(describe(given)))
        if args.gpu_gib is not None:
            print(f"settings under {args.gpu_gib:g} GiB (blocks_to_swap: the fewest that fit; it needs "
                  f"--trainer.strategy editor_fsdp):")
            fits = 0
            for base in ("bfloat16", "float8_e4m3fn"):
                measured = plan(model, data, "bf16-mixed", spec, base_dtype=base, blocks_to_swap=0, **size)
                for cached in (False, True):
                    for offload in (False, True):
                        swaps = [measured.with_settings(cached=cached, activation_offload=offload, blocks_to_swap=n)
                                 for n in range(len(measured.block_weights) + 1)]
                        other = next((s for s in swaps if s.total <= args.gpu_gib * GIB), swaps[-1])
                        ok = other.total <= args.gpu_gib * GIB
                        fits += ok
                        print(f"  {'fits' if ok else 'over'} {other.total / GIB:6.1f} GiB  model.base_dtype {base}, "
                              f"{'data.cached' if cached else 'raw clips'}, activation_offload {offload}, "
                              f"blocks_to_swap {other.blocks_to_swap}")
            if not fits:
                print("  no combination fits: lower the clip size or the batch")
        print(f"total {given.total / GIB:.1f} GiB")
        return 0
    except UsageError as err:
        print(f"train.memory: error: {err}", file=sys.stderr)
    except (ValueError, OSError) as err:
        print(f"train.memory: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
    return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
