"""The shapes demo's evaluation: edit held-out clips with a trained editor exactly as ``infer edit``
would (the editor's scheduler, steps and guidance) and measure against the exact targets, per edit
kind, with the share of each object edit that lands on the right shape and how far the edit
follows the instruction's key word; seam and non-seam warp error of long clips without LVSC, with
LVSC and with motion compensation; a side-by-side picture.

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
from infer.metrics import pair_warp_errors, seam_pairs, source_pair_flows
from infer.pipeline import to_model_frames
from infer.sampling import is_flow_scheduler, predicted_sample, to_epsilon

from .build import load_config, shapes_world
from .shapes import ALL_EDITS, BACKGROUNDS, COLORS, EDITS, RADII, SHAPES, SPEEDS
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


def ratios(edit_errors: list[float], source_errors: list[float], kinds: list[str]) -> dict:
    """The headline ratio of means and the same ratio per edit kind (a mean of per-clip ratios would
    be ruled by the clips whose edit changes only a few pixels)."""
    out = {"mse_edit_target": float(np.mean(edit_errors)), "mse_source_target": float(np.mean(source_errors))}
    out["ratio"] = out["mse_edit_target"] / out["mse_source_target"]
    out["by_edit"] = {}
    for kind in ALL_EDITS:
        e = [x for x, k in zip(edit_errors, kinds) if k == kind]
        s = [x for x, k in zip(source_errors, kinds) if k == kind]
        if e:
            out["by_edit"][kind] = {"clips": len(e), "mse_edit_target": float(np.mean(e)),
                                    "mse_source_target": float(np.mean(s)), "ratio": float(np.mean(e) / max(np.mean(s), 1e-12))}
    return out


def region_changes(edit: np.ndarray, source: np.ndarray, regions: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Mean |edit - source| (pixels in [0, 1]) inside the pixels the instruction asks to change and
    inside the other shapes' pixels, which it does not."""
    change = np.abs(edit.astype(np.float64) - source.astype(np.float64)).mean(axis=-1) / 255
    right, wrong = regions
    return float(change[right].mean()), float(change[wrong].mean())


def right_shape_shares(changes: list[tuple[float, float] | None], kinds: list[str]) -> dict:
    """Per object-edit kind, over the clips with two shapes: the share of the edit's change that
    lands on the right shape, ``share = sum(right) / (sum(right) + sum(wrong))`` of the per-clip mean
    changes. 1 edits only the named shape; 0.5 edits both alike, which is all a per-frame editor
    can do when only the motion tells which shape is meant; ``None`` when nothing changed."""
    out = {}
    for kind in ALL_EDITS:
        pairs = [c for c, k in zip(changes, kinds) if k == kind and c is not None]
        if pairs:
            right, wrong = (float(np.sum(v)) for v in zip(*pairs))
            out[kind] = {"two_shape_clips": len(pairs), "change_right": right / len(pairs), "change_wrong": wrong / len(pairs),
                         "right_shape_share": right / (right + wrong) if right + wrong > 0 else None}
    return out


def other_word(instruction: str) -> str | None:
    """The instruction with its last word, the one its edit turns on (the new colour or shape),
    replaced by the next word of the same list (shapes, shape colours, backgrounds); ``None`` where
    the last word names neither (a trail, a removal)."""
    *head, last = instruction.split()
    for words in (SHAPES, tuple(COLORS), tuple(BACKGROUNDS)):
        if last in words:
            return " ".join([*head, words[(words.index(last) + 1) % len(words)]])
    return None


@torch.no_grad()
def word_effects(pipe: InsV2VPipeline, held_out: list, kinds: list[str], seed: int = 0, steps: int = 10) -> dict:
    """Per edit kind, how far the editor's first x0 estimate moves when the instruction's key word
    changes (:func:`other_word`), against how far the source is from the target::

        effect = mean_i mse(x0(s_i, w_i), x0(s_i, w'_i)) / mean_i mse(s_i, t_i)

    both estimates from the same noise at the first timestep of a ``steps``-step sampler, with the
    video and the text (no guidance). An editor that follows the word moves about as far as the edit (near 1 or
    more); 0 says it does not read the word at all, whatever its ratio.
    """
    ed, scheduler = pipe.editor, pipe.scheduler
    scheduler.set_timesteps(steps)  # where the user's sampler starts (timestep spacing varies by scheduler)
    t = scheduler.timesteps[0]
    flow = is_flow_scheduler(scheduler)
    alpha_bar = None if flow else scheduler.alphas_cumprod[int(t)]
    moved: dict[str, list[float]] = {}
    for i, ((triplet, source, target), kind) in enumerate(zip(held_out, kinds)):
        other = other_word(triplet.edit)
        if other is None:
            continue
        condition = ed.encode_video(to_model_frames(list(source)).to(ed.device)).float()
        noise = torch.randn(condition.shape, generator=torch.Generator().manual_seed(seed + i)).to(ed.device)
        # as the sampler's first step (a flow sampler starts from the noise itself, at sigma = t / T)
        z = noise if flow else scheduler.scale_model_input(noise * scheduler.init_noise_sigma, t)
        estimates = []
        for prompt in (triplet.edit, other):
            out = ed.predict(z, condition, ed.encode_text([prompt]), t)
            if flow:  # x0 = z - sigma v
                x0 = z - float(t) / scheduler.config.num_train_timesteps * out
            else:
                x0 = predicted_sample(to_epsilon(out, z, alpha_bar, scheduler.config.prediction_type), z, alpha_bar)
            estimates.append((ed.decode_latents(x0).float().clamp(-1, 1) + 1) / 2)  # pixels in [0, 1], unrounded
        moved.setdefault(kind, []).append((float((estimates[0] - estimates[1]).pow(2).mean()), mse(source, target)))
    return {kind: float(np.mean([m for m, _ in pairs]) / max(np.mean([d for _, d in pairs]), 1e-12))
            for kind, pairs in moved.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m synth.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", required=True, help="editor folder exported by lightning fit, or a training checkpoint (.ckpt)")
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--report", default="metrics.json", help="file name of the report in --out")
    ap.add_argument("--num-clips", type=int, default=64)
    ap.add_argument("--world", default=None, metavar="CONFIG",
                    help="the synth build config the editor's shards came from: the held-out clips follow its "
                         "prompts section (frames, size, speeds, radii, shape counts, edits); flags below override it")
    ap.add_argument("--num-frames", type=int, default=None, help="frames of a held-out clip (default 8)")
    ap.add_argument("--size", type=int, default=None, help="frame size in pixels (default 16)")
    ap.add_argument("--speeds", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                    help=f"the moving shapes' per-frame step (default {SPEEDS[0]} {SPEEDS[1]})")
    ap.add_argument("--edits", nargs="+", default=None, choices=ALL_EDITS, metavar="KIND",
                    help=f"edit kinds of the held-out clips (default: --world's, else {', '.join(EDITS)}; "
                         f"also: {', '.join(k for k in ALL_EDITS if k not in EDITS)})")
    ap.add_argument("--radii", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                    help=f"the shapes' radius (default {RADII[0]} {RADII[1]})")
    # What a user gets: infer edit's code path and the editor's own defaults (scheduler, steps,
    # guidance) unless overridden here.
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the editor's)")
    ap.add_argument("--scheduler", default=None, help="diffusers scheduler class (default: the editor's)")
    ap.add_argument("--text-guidance", type=float, default=None)
    ap.add_argument("--video-guidance", type=float, default=None)
    ap.add_argument("--one-step", action=argparse.BooleanOptionalAction, default=True,
                    help="also report the one-step x0-prediction, labelled as such")
    ap.add_argument("--long-clips", type=int, default=2, help="64-frame clips for the LVSC seam test (0: skip)")
    ap.add_argument("--long-frames", type=int, default=64)
    ap.add_argument("--clip-frames", type=int, default=16)
    ap.add_argument("--reference-frames", type=int, default=4)
    ap.add_argument("--picture", default="samples.png", help="file name of the side-by-side picture in --out ('' : none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        prompts = held_out_prompts(args)
        world = shapes_world(prompts, args.seed)  # a bad world fails before the editor loads
        load = InsV2VPipeline.from_checkpoint if args.editor.endswith(".ckpt") else InsV2VPipeline.from_pretrained
        pipe = load(args.editor, scheduler=args.scheduler)
        defaults = pipe.settings("x", num_inference_steps=args.steps, text_guidance=args.text_guidance,
                                 video_guidance=args.video_guidance)
        defaults.validate()
    except (ValueError, FileNotFoundError) as err:
        print(f"synth.demo: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    guidance = dict(num_inference_steps=defaults.num_inference_steps, text_guidance=defaults.text_guidance,
                    video_guidance=defaults.video_guidance)

    start = time.perf_counter()
    held_out = [world.sample(HELD_OUT + i) for i in range(args.num_clips)]
    kinds = [world.kind(HELD_OUT + i) for i in range(args.num_clips)]
    source_errors = [mse(source, target) for _, source, target in held_out]
    regions = [world.regions(HELD_OUT + i) for i in range(args.num_clips)]

    def measured(edited: list[np.ndarray]) -> dict:
        out = ratios([mse(e, target) for e, (_, _, target) in zip(edited, held_out)], source_errors, kinds)
        changes = [region_changes(e, source, r) if r is not None else None
                   for e, (_, source, _), r in zip(edited, held_out, regions)]
        for kind, shares in right_shape_shares(changes, kinds).items():
            out["by_edit"][kind].update(shares)
        return out

    def edit_all(settings: dict, desc: str) -> list[np.ndarray]:
        return [
            pipe(source, triplet.edit, clip_frames=len(source), reference_frames=0, progress=False,
                 generator=torch.Generator().manual_seed(args.seed + i), **settings).frames
            for i, (triplet, source, _) in enumerate(tqdm(held_out, desc=desc, disable=args.quiet))
        ]

    edits = edit_all(guidance, f"held-out clips ({guidance['num_inference_steps']} steps)")
    metrics = {
        "editor": str(args.editor),
        "num_clips": args.num_clips,
        "edits": list(world.edits),
        "steps": guidance["num_inference_steps"],
        "scheduler": type(pipe.scheduler).__name__,
        "text_guidance": guidance["text_guidance"],
        "video_guidance": guidance["video_guidance"],
        **measured(edits),
    }
    for kind, effect in word_effects(pipe, held_out, kinds, args.seed, guidance["num_inference_steps"]).items():
        metrics["by_edit"][kind]["word_effect"] = effect
    if args.one_step:
        single = edit_all({**guidance, "num_inference_steps": 1}, "one-step x0-predictions")
        metrics["one_step"] = {
            "what": "the x0-prediction from pure noise in one step (a posterior-mean estimate), not what infer edit gives",
            **measured(single),
        }
    if args.long_clips:
        metrics["seam_error"] = seam_study(pipe, guidance, prompts, args)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write(out / args.report, (json.dumps(metrics, indent=2) + "\n").encode())
    if args.picture:
        rows = [(source, e, target) for e, (_, source, target) in zip(edits[:6], held_out)]
        ok, png = cv2.imencode(".png", cv2.cvtColor(picture(rows), cv2.COLOR_RGB2BGR))
        atomic_write(out / args.picture, png.tobytes())
    summary = {k: metrics[k] for k in ("steps", "scheduler", "ratio")}
    summary["by_edit"] = {k: round(v["ratio"], 3) for k, v in metrics["by_edit"].items()}
    summary["right_shape_share"] = {k: round(v["right_shape_share"], 3) for k, v in metrics["by_edit"].items()
                                    if v.get("right_shape_share") is not None}
    summary["word_effect"] = {k: round(v["word_effect"], 3) for k, v in metrics["by_edit"].items() if "word_effect" in v}
    print(json.dumps(summary))
    return 0


def held_out_prompts(args: argparse.Namespace) -> dict:
    """The held-out world's ``prompts`` section, for :func:`synth.build.shapes_world` (whose defaults
    fill what is unset): ``--world``'s (the shards' own synth config, so a world is written down
    once) with each flag given on top of it."""
    prompts: dict = {}
    if args.world is not None:
        prompts = load_config(args.world, sections=("prompts",))["prompts"]
        if prompts.get("source") != "shapes":
            raise ValueError(f"{args.world} is not a shapes-world config (prompts.source: shapes)")
    flags = {"num_frames": args.num_frames, "size": args.size, "speeds": args.speeds, "radii": args.radii,
             "edits": args.edits}
    return {**prompts, **{key: value for key, value in flags.items() if value is not None}}


def seam_study(pipe: InsV2VPipeline, guidance: dict, prompts: dict, args: argparse.Namespace) -> dict:
    """Long held-out clips edited clip by clip without LVSC, with LVSC, and with LVSC and motion
    compensation: the warp error of the pairs that cross a clip boundary (seams) next to that of
    every other consecutive pair, on the same seeds."""
    # the default mix: a trail spans its whole clip, which clip-by-clip editing cannot keep
    long_world = shapes_world({**prompts, "num_frames": args.long_frames, "edits": EDITS}, args.seed)
    plan = clip_plan(args.long_frames, args.clip_frames, args.reference_frames)
    seams = set(seam_pairs([c.new_start for c in plan[1:]], args.long_frames))
    options = {"no-lvsc": dict(lvsc=0.0), "lvsc": dict(lvsc=0.5), "lvsc+mc": dict(lvsc=0.5, motion_compensation=True)}
    errors = {name: {"seam": [], "other": []} for name in options}
    for i in tqdm(range(args.long_clips), desc="long clips", disable=args.quiet):
        triplet, source, _ = long_world.sample(HELD_OUT + 5000 + i)
        flows = source_pair_flows(source)  # once per clip, for every setting
        for name, extra in options.items():
            edited = pipe(source, triplet.edit, clip_frames=args.clip_frames, reference_frames=args.reference_frames,
                          progress=False, generator=torch.Generator().manual_seed(args.seed + i), **guidance, **extra).frames
            pairs = pair_warp_errors(source, edited, flows=flows)
            errors[name]["seam"] += [e for t, e in enumerate(pairs) if t in seams]
            errors[name]["other"] += [e for t, e in enumerate(pairs) if t not in seams]
    return {
        "clips": args.long_clips, "frames": args.long_frames, "clip_frames": args.clip_frames,
        "reference_frames": args.reference_frames,
        **{name: {"seam": float(np.mean(e["seam"])), "non_seam": float(np.mean(e["other"]))} for name, e in errors.items()},
    }


if __name__ == "__main__":
    sys.exit(main())
