"""The shapes demo's evaluation: edit held-out clips with a trained editor and measure against the
exact targets; seam error of long clips with and without LVSC; a side-by-side picture.

    python -m synth.demo --editor outputs/demo/editor --out outputs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from infer import InsV2VPipeline, clip_plan
from infer.metrics import seam_error, warp_error

from .shapes import EDITS, ShapesWorld
from .writer import atomic_write

HELD_OUT = 10**7  # scene indices far beyond any training build: unseen clips


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error of uint8 videos, pixels scaled to [0, 1]."""
    return float(np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2))


def picture(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], scale: int = 4, frames: int = 4) -> np.ndarray:
    """Rows of ``source | edited | target`` (a few frames each), upscaled for viewing."""
    gap = np.full((rows[0][0].shape[1], 2, 3), 255, np.uint8)
    lines = []
    for videos in rows:
        step = max(1, len(videos[0]) // frames)
        parts = []
        for video in videos:
            parts += [np.concatenate(list(video[::step][:frames]), axis=1), gap, gap]
        lines.append(np.concatenate(parts[:-2], axis=1))
        lines.append(np.full((2, lines[-1].shape[1], 3), 255, np.uint8))
    image = np.concatenate(lines[:-1], axis=0)
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m synth.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", required=True, help="editor folder exported by lightning fit, or a training checkpoint (.ckpt)")
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--num-clips", type=int, default=32)
    ap.add_argument("--num-frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=16)
    # One DDIM step from pure noise returns the x0-prediction, the posterior mean: the estimate
    # with the least expected squared error. A many-step sample is a draw from the posterior,
    # whose expected error is up to twice as large wherever the editor is unsure.
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--text-guidance", type=float, default=1.5)
    ap.add_argument("--video-guidance", type=float, default=1.0)
    ap.add_argument("--sampled-steps", type=int, default=10, help="also report a many-step sample's error (0: skip)")
    ap.add_argument("--long-clips", type=int, default=2, help="64-frame clips for the LVSC seam test (0: skip)")
    ap.add_argument("--long-frames", type=int, default=64)
    ap.add_argument("--clip-frames", type=int, default=16)
    ap.add_argument("--reference-frames", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        load = InsV2VPipeline.from_checkpoint if args.editor.endswith(".ckpt") else InsV2VPipeline.from_pretrained
        pipe = load(args.editor)
    except (ValueError, FileNotFoundError) as err:
        print(f"synth.demo: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(seed=args.seed, num_frames=args.num_frames, size=args.size)
    guidance = dict(num_inference_steps=args.steps, text_guidance=args.text_guidance, video_guidance=args.video_guidance)

    start = time.perf_counter()
    held_out = [world.sample(HELD_OUT + i) for i in range(args.num_clips)]

    def edit_all(settings: dict, desc: str) -> list[np.ndarray]:
        return [
            pipe(source, triplet.edit, clip_frames=len(source), reference_frames=0, progress=False,
                 generator=torch.Generator().manual_seed(args.seed + i), **settings).frames
            for i, (triplet, source, _) in enumerate(tqdm(held_out, desc=desc, disable=args.quiet))
        ]

    edits = edit_all(guidance, "held-out clips")
    edit_errors = [mse(e, target) for e, (_, _, target) in zip(edits, held_out)]
    source_errors = [mse(source, target) for _, source, target in held_out]
    per_edit = {k: ([], []) for k in EDITS}
    for (triplet, _, _), e, s in zip(held_out, edit_errors, source_errors):
        kind_edit_errors, kind_source_errors = per_edit[_edit_kind(triplet.edit)]
        kind_edit_errors.append(e)
        kind_source_errors.append(s)
    rows = [(source, e, target) for e, (_, source, target) in zip(edits[:6], held_out)]
    metrics = {
        "mse_edit_target": float(np.mean(edit_errors)),
        "mse_source_target": float(np.mean(source_errors)),
        "num_clips": args.num_clips,
        "settings": guidance,
    }
    metrics["ratio"] = metrics["mse_edit_target"] / metrics["mse_source_target"]
    # per kind, the same ratio of means as the headline (a mean of per-clip ratios would be ruled
    # by the clips whose edit changes only a few pixels)
    metrics["by_edit"] = {
        k: {"clips": len(e), "mse_edit_target": float(np.mean(e)), "mse_source_target": float(np.mean(s)),
            "ratio": float(np.mean(e) / max(np.mean(s), 1e-12))}
        for k, (e, s) in per_edit.items() if e
    }
    if args.sampled_steps:
        sampled = edit_all({**guidance, "num_inference_steps": args.sampled_steps}, f"{args.sampled_steps}-step samples")
        error = float(np.mean([mse(e, target) for e, (_, _, target) in zip(sampled, held_out)]))
        metrics["sampled"] = {"num_inference_steps": args.sampled_steps, "mse_edit_target": error,
                              "ratio": error / metrics["mse_source_target"]}

    if args.long_clips:
        long_world = ShapesWorld(seed=args.seed, num_frames=args.long_frames, size=args.size)
        plan = clip_plan(args.long_frames, args.clip_frames, args.reference_frames)
        boundaries = [c.new_start for c in plan[1:]]
        seams = {"no-lvsc": [], "lvsc": [], "lvsc+mc": []}
        warps = {k: [] for k in seams}
        options = {"no-lvsc": dict(lvsc=0.0), "lvsc": dict(lvsc=0.5), "lvsc+mc": dict(lvsc=0.5, motion_compensation=True)}
        for i in tqdm(range(args.long_clips), desc="long clips", disable=args.quiet):
            triplet, source, _ = long_world.sample(HELD_OUT + 5000 + i)
            for name, extra in options.items():
                edited = pipe(source, triplet.edit, clip_frames=args.clip_frames, reference_frames=args.reference_frames,
                              progress=False, generator=torch.Generator().manual_seed(args.seed + i), **guidance, **extra).frames
                seams[name].append(seam_error(source, edited, boundaries))
                warps[name].append(warp_error(source, edited))
        metrics["long_clips"] = {
            "frames": args.long_frames, "clip_frames": args.clip_frames, "reference_frames": args.reference_frames,
            "seam_error": {k: float(np.mean(v)) for k, v in seams.items()},
            "warp_error": {k: float(np.mean(v)) for k, v in warps.items()},
        }
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    ok, png = cv2.imencode(".png", cv2.cvtColor(picture(rows), cv2.COLOR_RGB2BGR))
    atomic_write(out / "samples.png", png.tobytes())
    print(json.dumps({k: metrics[k] for k in ("mse_edit_target", "mse_source_target", "ratio")}))
    return 0


def _edit_kind(instruction: str) -> str:
    if "moving shape" in instruction:
        return "recolor_moving"
    if "background" in instruction:
        return "background"
    if " into a " in instruction or "replace the" in instruction:
        return "swap"
    return "recolor"


if __name__ == "__main__":
    sys.exit(main())
