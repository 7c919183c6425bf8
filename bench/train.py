"""Training benchmark: clips/s and peak memory of a training step, data-loader throughput, raw clips
against a latent cache (`synth cache`), and on a GPU the SD 1.5-size step time and MFU against the
reference recipe.

    python bench/train.py                      # tiny editor on CPU + loaders with 2 workers, raw vs cached
    python bench/train.py --sd-flops           # SD 1.5 size, FLOPs of a step's parts (meta device: any machine)
    python bench/train.py --sd --device cuda   # SD 1.5 size, 16x256², bf16 vs the reference recipe, cached
    python bench/train.py --shapes-heads 8 2 1 # the shapes demo's step against its temporal attention heads
    python bench/train.py --dit-flops          # Wan2.1-1.3B / Wan2.2-TI2V-5B editor layouts: parameters, FLOPs per step
    python bench/train.py --dit-cpu            # the Wan2.1-1.3B-layout editor on CPU: a bf16-mixed LoRA step, an edit, peak RSS
    python bench/train.py --dit-cpu --layout wan2.2-ti2v-5b --cached   # Lucy Edit's 5B layout: a LoRA step from a cache
    python bench/train.py --dit-memory         # on a GPU: Lucy's LoRA step per setting, peak memory beside the plan
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from shards.cache import encode_pair  # noqa: E402
from shards.schema import EMPTY_TEXT_STATES  # noqa: E402
from model import build_editor, set_trainable, shipped_config, skipping_identity_motion_modules  # noqa: E402
from train import EditorModule, ShardDataModule  # noqa: E402


def cached_batch(module: EditorModule, batch: dict) -> dict:
    """``batch`` as a latent cache holds it (what `synth cache` writes for these clips)."""
    encoded = encode_pair(module.editor, batch["source"], batch["target"], batch["instruction"])
    empty = module.editor.encode_text([""]).float().detach().expand(len(batch["instruction"]), -1, -1)
    return {**encoded, EMPTY_TEXT_STATES: empty, "instruction": batch["instruction"]}


def fake_batch(batch: int, frames: int, resolution: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    video = lambda: (torch.rand(batch, 3, frames, resolution, resolution, generator=g) * 2 - 1).to(device)  # noqa: E731
    return {"source": video(), "target": video(), "instruction": ["make it snowy"] * batch}


def time_steps(module: EditorModule, batch: dict, iters: int, precision: str, device) -> tuple[float, float]:
    """Median seconds per optimizer step (forward, backward, AdamW) and total FLOPs of one step."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with autocast:
            loss = module.loss(batch, torch.Generator(device=device).manual_seed(0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    sync()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), counter.get_total_flops()


def loader_throughput(workers: int, batches: int, frames: int, resolution: int) -> tuple[float, float]:
    """Clips/s of the raw loader (mp4 decode + motion augmentation) and of the cached one."""
    from shards import write_shards

    from synth.cache import cache

    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp) / "raw", 16, per_shard=4, frames=16, size=64)
        cache(str(Path(tmp) / "raw"), "tiny", Path(tmp) / "cached", num_frames=16, resolution=resolution, progress=False)
        for source in ({"shards": str(Path(tmp) / "raw")}, {"cached": str(Path(tmp) / "cached")}):
            dm = ShardDataModule(**source, num_frames=frames, resolution=resolution, batch_size=4, num_workers=workers,
                                 batches_per_epoch=batches, shuffle_buffer=8)
            dm.setup("fit")
            it = iter(dm.train_dataloader())
            next(it)  # worker start-up
            start = time.perf_counter()
            clips = sum(len(b["instruction"]) for b in it)
            rates.append(clips / (time.perf_counter() - start))
    return rates[0], rates[1]


def tiny_cpu(args) -> None:
    device = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    module = EditorModule(editor="tiny", trainable="all")
    batch = fake_batch(args.batch, args.frames, args.resolution, device)
    seconds, flops = time_steps(module, batch, args.iters, "32-true", device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_rate = args.batch / seconds
    print(f"tiny CPU train step: batch {args.batch} x {args.frames} frames at {args.resolution}px: "
          f"{seconds * 1e3:.0f} ms/step, {step_rate:.2f} clips/s, {flops / 1e9:.1f} GFLOP/step, peak RSS {rss:.0f} MiB")
    with torch.no_grad():
        latents = cached_batch(module, batch)
    cached = EditorModule(editor="tiny", trainable="all", cached_latents=True)
    cached_seconds, cached_flops = time_steps(cached, latents, args.iters, "32-true", device)
    print(f"  on a latent cache: {cached_seconds * 1e3:.0f} ms/step, {args.batch / cached_seconds:.2f} clips/s, "
          f"{cached_flops / 1e9:.1f} GFLOP/step: x{seconds / cached_seconds:.2f} the raw step")
    raw_rate, cached_rate = loader_throughput(args.workers, 10, args.frames, args.resolution)
    print(f"data loader ({args.workers} workers): raw (mp4 decode + motion augmentation) {raw_rate:.1f} clips/s "
          f"= {raw_rate / step_rate:.1f}x what a raw step consumes; cached {cached_rate:.1f} clips/s "
          f"= {cached_rate / (args.batch / cached_seconds):.1f}x what a cached step consumes")


def sd_flops(args) -> None:
    """FLOPs of one SD 1.5-size training step's parts, counted on the meta device (no memory, any machine)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        editor = build_editor(shipped_config("model/sd15-random.yaml"))
    set_trainable(editor.unet, "motion")
    b, f, r = args.batch, 16, 256
    parts = {}
    with FlopCounterMode(display=False) as counter:
        editor.vae.encode(torch.empty(2 * b * f, 3, r, r, device="meta"))  # target and source clips
    parts["VAE encode (source + target)"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        editor.text_encoder(torch.zeros(b + 1, 77, dtype=torch.long, device="meta"))  # prompts + the empty one
    parts["text encoder"] = counter.get_total_flops()
    noisy = torch.empty(b, 8, f, r // 8, r // 8, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = editor.unet(noisy, torch.zeros(b, dtype=torch.long, device="meta"),
                          encoder_hidden_states=torch.empty(b * f, 77, 768, device="meta")).sample
        out.float().pow(2).mean().backward()
    parts["U-Net forward + backward (motion grads)"] = counter.get_total_flops()
    total = sum(parts.values())
    print(f"SD 1.5 size, batch {b} x {f} frames at {r}², FLOPs per training step:")
    for name, value in parts.items():
        print(f"  {name:42s} {value / 1e12:7.2f} TFLOP  {value / total:6.1%}")
    unet = parts["U-Net forward + backward (motion grads)"]
    print(f"  a latent cache leaves the U-Net alone: at most x{total / unet:.2f} fewer FLOPs per step")
    # the reference recipe: gradients for the frozen 2D weights too, and a VAE decode every step
    set_trainable(editor.unet, "all")
    with FlopCounterMode(display=False) as counter:
        out = editor.unet(noisy, torch.zeros(b, dtype=torch.long, device="meta"),
                          encoder_hidden_states=torch.empty(b * f, 77, 768, device="meta")).sample
        out.float().pow(2).mean().backward()
        editor.vae.decode(torch.empty(b * f, 4, r // 8, r // 8, device="meta"))
    reference = counter.get_total_flops() + parts["VAE encode (source + target)"] + parts["text encoder"]
    print(f"  the reference recipe (grads on frozen 2D weights, a VAE decode every step): {reference / 1e12:.2f} TFLOP "
          f"= x{reference / total:.2f} this recipe's")


DIT_LAYOUTS = {"Wan2.1-T2V-1.3B": "configs/model/wan2.1-t2v-1.3b-random.yaml",
               "Wan2.2-TI2V-5B": "configs/model/wan2.2-ti2v-5b-random.yaml"}


def dit_flops(args) -> None:
    """Parameters of the DiT editor layouts and FLOPs of one training step's parts, on the meta
    device. A causal clip is 1 + 4k frames: "16 frames" is 17 (16 after the first)."""
    from torch.utils.flop_counter import FlopCounterMode

    from model import load_editor

    def millions(module) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e6

    for name, config in DIT_LAYOUTS.items():
        editor = load_editor(str(ROOT / config))  # meta: true in the layout
        print(f"{name} editor layout: transformer {millions(editor.transformer):,.1f}M (in {editor.transformer.config.in_channels} "
              f"channels: noisy + source), VAE {millions(editor.vae):,.1f}M, UMT5-XXL encoder {millions(editor.text_encoder):,.1f}M")
        for frames, height, width in ((17, 256, 256), (81, 480, 832)):
            b, spatial = args.batch, editor.vae_scale_factor
            latent_frames = 1 + (frames - 1) // editor.temporal_compression
            parts = {}
            with FlopCounterMode(display=False) as counter:
                for _ in range(2 * b):  # target and source clips, one at a time as the causal VAE reads them
                    editor.vae.encode(torch.empty(1, 3, frames, height, width, device="meta"))
            parts["VAE encode (source + target)"] = counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                editor.text_encoder(torch.zeros(b + 1, editor.max_sequence_length, dtype=torch.long, device="meta"))
            parts["UMT5 encoder (prompts + empty)"] = counter.get_total_flops()
            hidden = torch.empty(b, editor.transformer.config.in_channels, latent_frames, height // spatial,
                                 width // spatial, device="meta")
            text = torch.empty(b, editor.max_sequence_length, editor.transformer.config.text_dim, device="meta")
            with FlopCounterMode(display=False) as counter:
                out = editor.transformer(hidden, torch.zeros(b, device="meta"), text).sample
                out.float().pow(2).mean().backward()
            parts["transformer forward + backward"] = counter.get_total_flops()
            editor.transformer.zero_grad(set_to_none=True)
            total = sum(parts.values())
            patch = editor.transformer.config.patch_size
            tokens = latent_frames * (height // spatial // patch[1]) * (width // spatial // patch[2])
            print(f"  batch {b} x {frames} x {height}x{width} ({tokens:,} tokens a clip): {total / 1e12:,.1f} TFLOP a step")
            for part, value in parts.items():
                print(f"    {part:34s} {value / 1e12:9.2f} TFLOP  {value / total:6.1%}")


LAYOUT_NAMES = {"wan2.1-t2v-1.3b": "Wan2.1-T2V-1.3B", "wan2.2-ti2v-5b": "Wan2.2-TI2V-5B"}


def random_cached_batch(editor, frames: int, height: int, width: int) -> dict:
    """One clip as a latent cache with text states holds it, drawn at random (batch 1)."""
    from shards.schema import SOURCE_LATENT, TARGET_LOGVAR, TARGET_MEAN, TEXT_STATES

    g = torch.Generator().manual_seed(0)
    latent = (1, editor.latent_channels, 1 + (frames - 1) // editor.temporal_compression,
              height // editor.vae_scale_factor, width // editor.vae_scale_factor)
    text = (1, editor.text_length, editor.text_encoder.config.d_model)
    return {TARGET_MEAN: torch.randn(latent, generator=g), TARGET_LOGVAR: torch.full(latent, -4.0),
            SOURCE_LATENT: torch.randn(latent, generator=g), TEXT_STATES: torch.randn(text, generator=g),
            EMPTY_TEXT_STATES: torch.zeros(text), "instruction": ["make it red"]}


def cached_lora_module(layout: dict, **module_args) -> EditorModule:
    """An EditorModule that trains from a latent cache on ``layout`` (a DiT editor config, random
    weights): the frozen base built in bf16 (never a float32 copy of it), the trained weights in
    float32, no VAE weights and a one-layer text encoder of the layout's width (a cache never calls
    either)."""
    config = {**layout, "meta": False, "max_sequence_length": 64}
    config["text_encoder"] = {k: v for k, v in {**layout["text_encoder"], "num_layers": 1, "vocab_size": None}.items()
                              if v is not None}
    torch.set_default_dtype(torch.bfloat16)
    try:
        module = EditorModule(**{**module_args, "editor": config, "cached_latents": True,
                                 "export_dir": tempfile.mkdtemp()})
    finally:
        torch.set_default_dtype(torch.float32)
    for param in module.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # the adapters and their AdamW state in float32
    return module


def dit_cpu_cached(args) -> None:
    """A DiT layout's real transformer (random weights) trains one bf16-mixed LoRA step on CPU from
    cached latents and text states, as `lightning fit --data.cached` does: the frozen base built and
    held in bf16, the adapters in float32, no VAE weights and a one-layer text encoder (a cache
    never calls either). Prints the process's peak RSS last."""
    import lightning as L
    import yaml

    from shards.schema import TARGET_MEAN
    from train.precision import hold_frozen

    name = LAYOUT_NAMES[args.layout]
    start = time.perf_counter()
    module = cached_lora_module(yaml.safe_load((ROOT / DIT_LAYOUTS[name]).read_text()), trainable="lora", lora_rank=32,
                                objective="flow", flow_shift=5.0, export_lora_only=True)
    hold_frozen(module.transformer, torch.bfloat16)  # Wan's float32 parts back to float32
    total = sum(p.numel() for p in module.transformer.parameters())
    print(f"{name}: transformer {total / 1e6:,.1f}M built in bf16 in {time.perf_counter() - start:.0f} s, "
          f"LoRA {module.counts.trainable / 1e6:.1f}M trainable")
    frames, side = 5, 64  # 1 + 4k frames; Wan2.2's VAE packs 16x16 pixels, its patch 2x2 latents
    batch = random_cached_batch(module.editor, frames, side, side)
    latent = tuple(batch[TARGET_MEAN].shape)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, precision="bf16-mixed", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    grads = [n for n, p in module.named_parameters() if p.grad is not None]
    print(f"one bf16-mixed LoRA step from a cache of 1 x {frames} x {side}² (latents {tuple(latent)}): "
          f"{time.perf_counter() - start:.1f} s; gradients on {len(grads)} tensors, all adapters: "
          f"{all('lora_' in n for n in grads)}; frozen base dtypes "
          f"{sorted({str(p.dtype).removeprefix('torch.') for p in module.transformer.parameters() if not p.requires_grad})}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


def dit_cpu(args) -> None:
    """The Wan2.1-1.3B-layout editor (real transformer and VAE, random weights) at 5 x 64² on CPU:
    one bf16-mixed LoRA step and a 2-step edit, with the process's peak RSS. The frozen UMT5-XXL
    encoder is replaced by one layer of its width (its 5.7 B weights would not change the step)."""
    import lightning as L
    import numpy as np
    import yaml

    from infer import InsV2VPipeline

    config = yaml.safe_load((ROOT / DIT_LAYOUTS["Wan2.1-T2V-1.3B"]).read_text())
    config.update(meta=False, max_sequence_length=64)
    config["text_encoder"].update(num_layers=1, vocab_size=None)
    config["text_encoder"] = {k: v for k, v in config["text_encoder"].items() if v is not None}
    start = time.perf_counter()
    export = tempfile.mkdtemp()
    module = EditorModule(editor=config, trainable="lora", lora_rank=16, objective="flow", flow_shift=5.0,
                          export_dir=export, export_lora_only=True)
    built = time.perf_counter() - start
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    print(f"built in {built:.0f} s: transformer {sum(p.numel() for p in module.transformer.parameters()) / 1e6:,.0f}M, "
          f"LoRA {module.counts.trainable / 1e6:.1f}M trainable ({len(trained)} tensors, all lora_: "
          f"{all('lora_' in n for n in trained)})")
    batch = {"source": torch.rand(1, 3, 5, 64, 64) * 2 - 1, "target": torch.rand(1, 3, 5, 64, 64) * 2 - 1,
             "instruction": ["make it red"]}
    trainer = L.Trainer(accelerator="cpu", max_steps=1, precision="bf16-mixed", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    start = time.perf_counter()
    # values, not storage: under bf16-mixed the frozen base is then held in bf16 (a cast is no update)
    before = {n: p.detach().clone() for n, p in module.transformer.named_parameters() if "blocks.0." in n}
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    step = time.perf_counter() - start
    grads = [n for n, p in module.named_parameters() if p.grad is not None]
    after = dict(module.transformer.named_parameters())
    moved = [n for n, p in before.items() if not torch.equal(p.to(after[n].dtype), after[n].detach())]
    print(f"one bf16-mixed LoRA step on 1 x 5 x 64²: {step:.1f} s; gradients on {len(grads)} tensors, "
          f"all adapters: {all('lora_' in n for n in grads)}; lora_B moved only: "
          f"{bool(moved) and all('lora_B' in n for n in moved)}")
    pipe = InsV2VPipeline.from_editor(module.editor).to(dtype=torch.bfloat16)
    block = pipe.editor.transformer.blocks[0]
    print(f"bf16 editor, float32 parts kept: {block.scale_shift_table.dtype == torch.float32 and block.attn1.to_q.weight.dtype == torch.bfloat16}")
    video = (np.random.default_rng(0).random((9, 64, 64, 3)) * 255).astype(np.uint8)
    start = time.perf_counter()
    out = pipe(video, "make it red", num_inference_steps=2, clip_frames=5, reference_frames=1, progress=False).frames
    print(f"a 2-step edit of 9 x 64² (two causal clips) in bf16: {time.perf_counter() - start:.1f} s, {out.shape}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


def dit_memory(args) -> None:
    """The LoRA step of ``--config`` (Lucy Edit's recipe) from a latent cache, per setting (base
    dtype, activation offload, blocks swapped): the peak memory the device allocated during two
    steps beside ``python -m train.memory``'s plan for the same setting, and the second step's
    seconds. The editor layout is built with random weights (``--editor``) and a one-layer text
    encoder, which a cache never calls. On a GPU the peaks are the measured figures; on CPU
    (a tiny layout) it checks that every setting trains."""
    import logging

    import lightning as L
    import yaml

    from train.memory import GIB, plan
    from train.strategies import EditorFSDPStrategy

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    config = yaml.safe_load(Path(args.config).read_text())
    layout = yaml.safe_load(Path(args.editor).read_text())
    frames, height, width = args.clip
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    class SecondStep(L.Callback):
        def on_train_batch_start(self, trainer, *_):
            torch.cuda.synchronize() if cuda else None
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, *_):
            torch.cuda.synchronize() if cuda else None
            self.seconds = time.perf_counter() - self.start

    print(f"{Path(args.editor).stem}, LoRA as {Path(args.config).name}, from a cache, clip {frames}x{height}x{width}, "
          f"batch 1, bf16-mixed, {device}")
    for setting in args.settings:
        base, offload, swap = setting.split(",")
        overrides = dict(base_dtype=None if base == "bf16" else "float8_e4m3fn", activation_offload=offload == "offload",
                         blocks_to_swap=int(swap))
        planned = plan(config["model"], config["data"], "bf16-mixed", args.editor, cached=True,
                       base_dtype=overrides["base_dtype"], activation_offload=overrides["activation_offload"],
                       blocks_to_swap=overrides["blocks_to_swap"], frames=frames, height=height, width=width)
        model = {k: v for k, v in config["model"].items() if k != "editor"}
        module = cached_lora_module(layout, **{**model, **overrides, "gradient_checkpointing": True})
        del module._modules["text_encoder"]  # a cache with text states never calls it (as `lightning fit` does)
        batch = random_cached_batch(module.editor, frames, height, width)
        timer = SecondStep()
        trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=2, precision="bf16-mixed",
                            strategy=EditorFSDPStrategy() if int(swap) else "auto", logger=False,
                            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                            callbacks=[timer])
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(module, torch.utils.data.DataLoader([batch, batch], batch_size=None))
        peak = f"{torch.cuda.max_memory_allocated() / GIB:6.1f} GiB" if cuda else "   n/a"
        print(f"  {setting:22s} planned {planned.total / GIB:6.1f} GiB  peak allocated {peak}  "
              f"second step {timer.seconds:.2f} s", flush=True)
        del module, trainer


def sd_gpu(args) -> None:
    device = torch.device(args.device)
    config = shipped_config("model/sd15-random.yaml")
    batch = fake_batch(args.batch, 16, 256, device)
    rows = []
    for label, precision, trainable, checkpointing, frozen_grads in (
        ("this recipe: bf16-mixed, motion only", "bf16-mixed", "motion", args.checkpointing, False),
        ("reference: fp32, grads on frozen 2D", "32-true", "motion", False, True),
    ):
        module = EditorModule(editor=config, trainable=trainable, gradient_checkpointing=checkpointing).to(device)
        if frozen_grads:  # the reference left requires_grad on the 2D weights but only stepped motion
            set_trainable(module.unet, "all")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, flops = time_steps(module, batch, args.iters, precision, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append((label, seconds, flops, peak))
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"SD 1.5 size, batch {args.batch} x 16 frames at 256², {device}")
    for label, seconds, flops, peak in rows:
        mfu = flops / seconds / (args.peak_tflops * 1e12)
        print(f"  {label:40s} {seconds * 1e3:8.0f} ms/step  {args.batch / seconds:6.2f} clips/s  "
              f"MFU {mfu:.1%}  peak {peak:.1f} GiB")
    print(f"  speed-up over the reference: x{rows[1][1] / rows[0][1]:.2f}")
    module = EditorModule(editor=config, trainable="motion", gradient_checkpointing=args.checkpointing,
                          cached_latents=True).to(device)
    with torch.no_grad():
        full = EditorModule(editor=config, trainable="motion").to(device)
        latents = cached_batch(full, batch)
        del full
    seconds, _ = time_steps(module, latents, args.iters, "bf16-mixed", device)
    print(f"  this recipe on a latent cache: {seconds * 1e3:.0f} ms/step, {args.batch / seconds:.2f} clips/s, "
          f"x{rows[0][1] / seconds:.2f} the raw bf16 step")


def shapes_heads(args) -> None:
    """The shapes demo's training step (batch 8 x 4 frames x 16 px) with each number of temporal
    attention heads: same parameters and FLOPs, but at 32-64 channels 8 heads are 4-8 wide, and the
    fused attention kernel's cost follows the number of (tiny) heads, not the FLOPs."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    batch = fake_batch(8, 4, 16, device)
    for heads in args.shapes_heads:
        config = shipped_config("model/shapes-pixel.yaml")
        config["motion_adapter"] = {**(config.get("motion_adapter") or {}), "motion_num_attention_heads": heads}
        module = EditorModule(editor=config, trainable="all", loss_weighting="preconditioned")
        seconds, flops = time_steps(module, batch, args.iters, "32-true", device)
        print(f"shapes editor, {heads} temporal head(s): {seconds * 1e3:.0f} ms/step, {flops / 1e9:.1f} GFLOP/step")
    # the demo's first motion_frozen_steps steps (and the 2D ablation's every step): the identity
    # temporal layers take no step, so the trainer leaves them out of the forward pass
    module = EditorModule(editor=shipped_config("model/shapes-pixel.yaml"), trainable="all",
                          loss_weighting="preconditioned")
    with skipping_identity_motion_modules(module.unet) as skipped:
        seconds, flops = time_steps(module, batch, args.iters, "32-true", device)
    print(f"shapes editor, {skipped} identity temporal layers left out (while frozen): {seconds * 1e3:.0f} ms/step, "
          f"{flops / 1e9:.1f} GFLOP/step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=32, help="tiny run: frame size in pixels")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sd", action="store_true")
    ap.add_argument("--sd-flops", action="store_true", help="SD 1.5 size: FLOPs of a step's parts, on the meta device")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak bf16 dense TFLOP/s (H100 SXM: 989)")
    ap.add_argument("--shapes-heads", type=int, nargs="+", default=None, metavar="N",
                    help="time the shapes demo's training step with N temporal attention heads (each N given)")
    ap.add_argument("--dit-flops", action="store_true", help="DiT editor layouts: parameters and FLOPs (meta device)")
    ap.add_argument("--dit-cpu", action="store_true", help="Wan2.1-1.3B-layout editor: a bf16-mixed LoRA step and an edit")
    ap.add_argument("--layout", choices=list(LAYOUT_NAMES), default="wan2.1-t2v-1.3b", help="--dit-cpu's layout")
    ap.add_argument("--cached", action="store_true",
                    help="--dit-cpu from cached latents and text states (the frozen base built in bf16)")
    ap.add_argument("--dit-memory", action="store_true",
                    help="--config's LoRA step from a cache per --settings: peak device memory beside the plan")
    ap.add_argument("--config", default=str(ROOT / "configs/lucy-lora.yaml"), help="--dit-memory's training config")
    ap.add_argument("--editor", default=str(ROOT / "configs/model/wan2.2-ti2v-5b-random.yaml"),
                    help="--dit-memory's editor layout (random weights)")
    ap.add_argument("--clip", type=int, nargs=3, default=[81, 480, 832], metavar=("F", "H", "W"))
    ap.add_argument("--settings", nargs="+", metavar="BASE,OFFLOAD,SWAP",
                    default=["bf16,plain,0", "bf16,offload,0", "bf16,plain,11", "fp8,plain,0", "fp8,offload,0"],
                    help="--dit-memory's settings: bf16|fp8, plain|offload, blocks to swap")
    args = ap.parse_args()
    if args.dit_memory:
        for setting in args.settings:
            parts = setting.split(",")
            if len(parts) != 3 or parts[0] not in ("bf16", "fp8") or parts[1] not in ("plain", "offload") \
                    or not parts[2].isdigit():
                ap.error(f"--settings: {setting!r} is not BASE,OFFLOAD,SWAP (e.g. bf16,offload,11)")
        for name in ("config", "editor"):
            if not Path(getattr(args, name)).is_file():
                ap.error(f"--{name}: no file at {getattr(args, name)}")
        dit_memory(args)
    elif args.dit_flops:
        dit_flops(args)
    elif args.dit_cpu and (args.cached or args.layout != "wan2.1-t2v-1.3b"):
        if not args.cached:
            ap.error("--layout wan2.2-ti2v-5b runs from a cache on CPU: add --cached")
        dit_cpu_cached(args)
    elif args.dit_cpu:
        dit_cpu(args)
    elif args.shapes_heads:
        widths = shipped_config("model/shapes-pixel.yaml")["unet"]["block_out_channels"]
        if any(n < 1 or any(w % n for w in widths) for n in args.shapes_heads):
            ap.error(f"--shapes-heads: each N must divide the shapes editor's block widths {widths}")
        shapes_heads(args)
    elif args.sd_flops:
        sd_flops(args)
    elif args.sd:
        sd_gpu(args)
    else:
        tiny_cpu(args)


if __name__ == "__main__":
    main()
