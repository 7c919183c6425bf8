"""Synthesis benchmark: kept pairs per minute, and the cost of Prompt-to-Prompt control.

    python bench/synth.py                      # tiny config on CPU
    python bench/synth.py --modelscope-size --device cuda   # ModelScope size, 16x256², 30 steps
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synth.build import build  # noqa: E402
from synth.render import PairParams, VideoRenderer  # noqa: E402
from synth.ranks import DTYPES  # noqa: E402

# ModelScope text-to-video (damo-vilab/text-to-video-ms-1.7b) U-Net layout, random weights
MODELSCOPE_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=1024, attention_head_dim=64, norm_num_groups=32,
)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              latent_channels=4, norm_num_groups=32, sample_size=256)
OPENCLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, projection_dim=1024)


def tiny_cpu(args) -> None:
    config = yaml.safe_load((ROOT / "configs/synth/tiny.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = build(config, Path(tmp), args.num_samples, progress=False, device="cpu")
        minutes = (time.perf_counter() - start) / 60
    g = config["generator"]
    print(f"tiny CPU ({g['backbone']}, {g['num_frames']}x{g['height']}², {g['steps']} steps): "
          f"{result.kept} kept of {result.attempts} attempts, {result.kept / minutes:.1f} kept pairs/min")


def render_costs(args) -> None:
    tiny = yaml.safe_load((ROOT / "configs/synth/tiny.yaml").read_text())["generator"]["tiny"]
    config = copy.deepcopy(tiny)
    if args.modelscope_size:
        config.update(unet=MODELSCOPE_UNET, vae=SD_VAE, text_encoder=OPENCLIP_H_TEXT)
    dtype = DTYPES[args.dtype]
    renderer = VideoRenderer.tiny("modelscope", config).to(args.device, dtype)
    frames, size, steps = (16, 256, 30) if args.modelscope_size else (8, 32, 6)
    noise = torch.randn(renderer.latent_shape(frames, size, size), generator=torch.Generator().manual_seed(0))
    params = PairParams(guidance=9.0, self_attn_end=0.4, cross_attn_end=0.8, edit_weight=2.0, steps=steps)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(fn):
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    src, tgt = "a cat walking on the road", "a dog walking on the road"
    p2p = timed(lambda: renderer.render_pair(src, tgt, noise, params))
    plain = timed(lambda: renderer.render([src, tgt], noise, params))
    label = "ModelScope size" if args.modelscope_size else "tiny"
    print(f"{label}, {frames}x{size}², {steps} DDIM steps on {args.device} in {args.dtype}: P2P pair {p2p:.2f} s, "
          f"plain pair {plain:.2f} s, P2P overhead {p2p / plain - 1:+.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--modelscope-size", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="renderer precision (default: float16 on CUDA, float32 on CPU, as synth build)")
    args = ap.parse_args()
    if args.dtype is None:
        args.dtype = "float16" if args.device.startswith("cuda") else "float32"
    if not args.modelscope_size:
        tiny_cpu(args)
    render_costs(args)


if __name__ == "__main__":
    main()
