"""Synthesis benchmark: kept pairs per minute, and the cost of Prompt-to-Prompt control.

    python bench/synth.py                      # tiny config on CPU
    python bench/synth.py --modelscope-size --device cuda   # ModelScope size, 16x256², 30 steps
    python bench/synth.py --paper-flops        # the same, FLOPs per pair (meta device: any machine)
    python bench/synth.py --import-pairs 8     # synth import: pairs per minute copied and re-encoded
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

PAPER_SIZE = ROOT / "configs/synth/modelscope-random.yaml"  # ModelScope at its real size, random weights


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
        config = yaml.safe_load(PAPER_SIZE.read_text())["generator"]["tiny"]
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


def paper_flops(args) -> None:
    """FLOPs of one pair at the paper's settings, counted on the meta device (no memory, any machine)."""
    from torch.utils.flop_counter import FlopCounterMode

    from infer.clip_scorer import ClipScorer

    generator = yaml.safe_load(PAPER_SIZE.read_text())["generator"]
    frames, size, steps = generator["num_frames"], generator["height"], generator["steps"]
    with torch.device("meta"):
        renderer = VideoRenderer.tiny("modelscope", generator["tiny"])
        clip = ClipScorer.load(ROOT / "configs/model/clip-vit-l14-random.yaml").model
    side = size // 8

    def count(run) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run()
        return counter.get_total_flops()

    # P2P: [uncond_src, uncond_tgt, cond_src, cond_tgt] through the U-Net at every step
    step = count(lambda: renderer.unet(torch.empty(4, 4, frames, side, side, device="meta"),
                                       torch.zeros((), dtype=torch.long, device="meta"),
                                       encoder_hidden_states=torch.empty(4, 77, 1024, device="meta")))
    decode = count(lambda: renderer.vae.decode(torch.empty(2 * frames, 4, side, side, device="meta")))
    embed = count(lambda: clip.get_image_features(pixel_values=torch.empty(2 * frames, 3, 224, 224, device="meta")))
    total = steps * step + decode + embed
    print(f"ModelScope size, one P2P pair of {frames}x{size}², {steps} DDIM steps, ViT-L/14 filter:")
    for name, value in (("U-Net, all steps", steps * step), ("VAE decode", decode), ("CLIP ViT-L/14", embed)):
        print(f"  {name:18s} {value / 1e12:8.2f} TFLOP  {value / total:6.1%}")
    rate = 0.4 * 989e12 / total * 3600
    print(f"  {total / 1e12:.1f} TFLOP a pair: {rate:,.0f} rendered pairs per H100-hour at 40 % MFU "
          f"(kept pairs: times the filter's keep rate)")


def import_rates(args) -> None:
    """``synth import`` of a generated pairs list: pairs per minute copied as published, and
    re-encoded down once (--max-side 256 --max-frames 33)."""
    import json

    import numpy as np

    from infer import write_video
    from synth.import_sets import ImportOptions, import_set

    width, height = (int(v) for v in args.import_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "set"
        root.mkdir()
        y, x = np.mgrid[0:height, 0:width]
        lines = []
        for i in range(args.import_pairs):
            frames = np.stack([((np.stack([np.sin(x / (9 + i) + t / 5), np.cos(y / 13 - t / 7), np.sin((x + y) / 21)], -1)
                                 + 1) * 127.5).astype(np.uint8) for t in range(args.import_frames)])
            write_video(root / f"{i}.mp4", frames, fps=20)
            write_video(root / f"{i}_edit.mp4", np.ascontiguousarray(frames[..., ::-1]), fps=20)
            lines.append(json.dumps({"source": f"{i}.mp4", "edited": f"{i}_edit.mp4", "instruction": "swap colours"}))
        (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
        size = sum(p.stat().st_size for p in root.glob("*.mp4")) / 2**20
        for name, options in (("copied", ImportOptions()), ("re-encoded to 256 px, 33 frames",
                                                            ImportOptions(max_side=256, max_frames=33))):
            start = time.perf_counter()
            result, stats = import_set(root / "pairs.jsonl", Path(tmp) / name.split()[0], options=options, progress=False)
            minutes = (time.perf_counter() - start) / 60
            print(f"synth import, {args.import_pairs} pairs of {args.import_frames}x{height}x{width} ({size:.1f} MiB) "
                  f"{name}: {result.kept / minutes:.1f} pairs/min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--modelscope-size", action="store_true")
    ap.add_argument("--paper-flops", action="store_true", help="FLOPs of a pair at paper settings, on the meta device")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="renderer precision (default: float16 on CUDA, float32 on CPU, as synth build)")
    ap.add_argument("--import-pairs", type=int, default=0, help="measure synth import on this many generated pairs")
    ap.add_argument("--import-size", default="1280x720", help="their frame size, WxH (Ditto-1M's 1280x720)")
    ap.add_argument("--import-frames", type=int, default=101, help="their length (Ditto-1M's 101)")
    args = ap.parse_args()
    if args.import_pairs:
        import_rates(args)
        return
    if args.paper_flops:
        paper_flops(args)
        return
    if args.dtype is None:
        args.dtype = "float16" if args.device.startswith("cuda") else "float32"
    if not args.modelscope_size:
        tiny_cpu(args)
    render_costs(args)


if __name__ == "__main__":
    main()
