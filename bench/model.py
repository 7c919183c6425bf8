"""Model benchmark: parameter counts, forward+backward time and peak memory of the video U-Net.

    python bench/model.py                      # tiny config on CPU
    python bench/model.py --size sd --device cuda --frames 16 --resolution 256
    python bench/model.py --size sd --trainable lora --lora-rank 16 --sizes-only   # checkpoint sizes from shapes
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import build_editor, count_parameters, load_editor, set_trainable, shipped_config  # noqa: E402
from model.lora import add_lora  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "sd"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=None, help="frame size in pixels (default: the model's)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--trainable", default="motion", help="motion, all, spatial or lora")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--sizes-only", action="store_true",
                    help="only parameter counts and checkpoint sizes, computed on the meta device (no memory)")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with torch.device("meta" if args.sizes_only else "cpu"):
        editor = load_editor("tiny") if args.size == "tiny" else build_editor(shipped_config("model/sd15-random.yaml"))
    unet, latent, factor = editor.unet, editor.latent_channels, editor.vae_scale_factor
    text_dim = editor.text_encoder.config.hidden_size
    resolution = args.resolution or (editor.resolution if args.size == "tiny" else 256)
    if args.trainable == "lora":
        add_lora(unet, args.lora_rank)
        counts = count_parameters(unet)
    else:
        counts = set_trainable(unet, args.trainable)
    if args.sizes_only:
        motion = sum(p.numel() for n, p in unet.named_parameters() if "motion_modules." in n and "lora_" not in n)
        print(f"config            {args.size}, trainable {args.trainable}" + (f" (rank {args.lora_rank})" if args.trainable == "lora" else ""))
        print(f"parameters        total {counts.total / 1e6:.2f}M  trainable {counts.trainable / 1e6:.2f}M  motion {motion / 1e6:.1f}M")
        print(f"checkpoint        {counts.trainable * 4 / 2**20:.1f} MiB fp32 / {counts.trainable * 2 / 2**20:.1f} MiB bf16 "
              f"(a motion-module checkpoint: {motion * 4 / 2**20:.0f} MiB fp32)")
        # what a run holds besides activations: every weight, and per trainable weight a gradient and
        # AdamW's two moments (fp32); mixed precision keeps fp32 weights, "true" half keeps half ones
        others = sum(p.numel() for p in editor.text_encoder.parameters())
        vae = sum(p.numel() for p in editor.vae.parameters()) if editor.vae is not None else 0
        gib = 2**30
        for label, weight_bytes in (("fp32 / bf16-mixed", 4), ("bf16-true", 2)):
            state = counts.trainable * (4 + 8) + (counts.total + others) * weight_bytes
            print(f"training state    {label:17s} {(state + vae * weight_bytes) / gib:.2f} GiB "
                  f"(weights, grads, AdamW; before activations); on cached latents (no VAE) {state / gib:.2f} GiB")
        return
    unet.to(device=device).train()
    if dtype != unet.dtype:
        unet.to(dtype=dtype)
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    side = resolution // factor
    x = torch.randn(args.batch, 2 * latent, args.frames, side, side, device=device, dtype=dtype)
    text = torch.randn(args.batch * args.frames, 77, text_dim, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (args.batch,), device=device)

    def step() -> None:
        out = unet(x, t, encoder_hidden_states=text).sample
        out.float().square().mean().backward()
        unet.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()  # warm-up
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"
    total = count_parameters(unet).total
    print(f"config            {args.size}  ({args.batch}x{args.frames} frames at {resolution}px, latent {side}x{side})")
    print(f"device / dtype    {device} / {args.dtype}  checkpointing={args.checkpointing}")
    print(f"parameters        total {total / 1e6:.2f}M  trainable ({args.trainable}) {counts.trainable / 1e6:.2f}M")
    print(f"fwd+bwd           median {statistics.median(times) * 1e3:.1f} ms  (min {min(times) * 1e3:.1f}, {args.iters} iters)")
    print(f"peak memory       {peak}")


if __name__ == "__main__":
    main()
