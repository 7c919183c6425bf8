"""`synth lift`: image-edit pairs lifted to video pairs by one shared virtual camera path, written as resumable shards."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from shards.camera import CameraBounds, lift_pair

from shards.schema import pair_sample, sample_key

from .build import BuildResult, config_hash, make_filter, make_judge
from .filter import check_pair
from .image_pairs import SCORES, UnreadableRow, decode_row, pair_rows, source_name
from .writer import Outcome, ShardWriter, write_outcomes


LIFT_SECTIONS = ("camera", "filter", "output")


def camera_bounds(camera: dict[str, Any]) -> CameraBounds:
    names = ("max_pan", "zoom", "max_rotate", "max_perspective")
    return CameraBounds(**{k: (tuple(camera[k]) if k == "zoom" else float(camera[k])) for k in names if k in camera})


def below_minimum(scores: dict[str, float], minimum: dict[str, float]) -> str | None:
    """The first shipped score under its minimum (or missing), as a rejection reason."""
    for field, floor in minimum.items():
        if field not in scores:
            return f"score {field} missing"
        if scores[field] < floor:
            return f"score {field} below {floor:g}"
    return None


def lift(config: dict[str, Any], images: str | Path, out: Path, num_samples: int | None = None,
         samples_per_shard: int | None = None, resume: bool = False, rank: int = 0, world: int = 1,
         progress: bool = True, name: str | None = None, allow_absolute: bool = False,
         min_scores: dict[str, float] | None = None, open_images: str | Path | None = None) -> BuildResult:
    """Lift this rank's rows of ``images`` (every ``world``-th) into shards (docs/shards.md), continuing a
    previous run with ``resume``; at most ``num_samples`` kept pairs (``None``: every row). A pair's
    camera path is a pure function of (seed, row index), so a resumed run writes what an
    uninterrupted one would. A JSONL's image paths must lie in its folder unless ``allow_absolute``.
    Rows whose shipped scores (UltraEdit's, OmniEdit's) fall under ``min_scores`` are rejected
    before they are decoded; ``open_images`` holds Pico-Banana-400K's source images."""
    camera, out_cfg = config["camera"], config["output"]
    bounds = camera_bounds(camera)
    num_frames, size, fps = int(camera["num_frames"]), int(camera["size"]), float(camera.get("fps", 8))
    per_shard = int(samples_per_shard or out_cfg.get("samples_per_shard", 16))
    video_format, seed = out_cfg.get("video_format", "mp4"), int(config.get("seed", 0))
    label = f"lift:{name or source_name(images)}"
    rows = pair_rows(images, allow_absolute, open_images)
    minimum = dict(min_scores or {})
    if minimum:  # a score the set does not ship is a usage error, not a rejection of every row
        first = next(rows, None)
        shipped = sorted((first or {}).get(SCORES) or {})
        unknown = [f for f in minimum if f not in shipped]
        if first is not None and "_error" not in first and unknown:
            raise ValueError(f"--min-score {unknown[0]}: this set ships no such score "
                             f"({', '.join(shipped) or 'it ships none'})")
        rows = itertools.chain([first] if first is not None else [], rows)
    clip_filter, judge = make_filter(config["filter"]), make_judge(config["filter"])
    hashed = {**config, "images": label, **({"min_scores": minimum} if minimum else {})}
    writer = ShardWriter(out, rank, out_cfg.get("prefix", "lift"), config_hash(hashed), resume, world)
    start = writer.state["next"][0]
    stats = {"unreadable": 0}

    def outcomes() -> Iterator[Outcome]:
        local = -1
        for index, row in enumerate(rows):
            if index % world != rank:
                continue
            local += 1
            if local < start:  # committed by an earlier run: not decoded again
                continue
            key = sample_key(rank, index)
            shipped = row.get(SCORES) or {}
            low = below_minimum(shipped, minimum) if "_error" not in row else None
            if low is not None:
                attempt = {"key": key, "row": index, "kept": False, "reason": low, "scores": None, "shipped_scores": shipped}
                yield Outcome(attempt, None, (local + 1, 0))
                continue
            try:
                pair = decode_row(row)
            except UnreadableRow as err:
                stats["unreadable"] += 1
                attempt = {"key": key, "row": index, "kept": False, "reason": f"unreadable: {err}", "scores": None}
                yield Outcome(attempt, None, (local + 1, 0))
                continue
            rng = np.random.default_rng([seed, index])
            source, edited, path = lift_pair(pair.source, pair.edited, bounds, num_frames, size, rng)
            generator = {"backbone": "lift", "camera": path, "row": index, "image_size": list(pair.source.shape[:2])}
            verdict = check_pair(source, edited, pair.instruction, (pair.input_caption, pair.output_caption),
                                 clip_filter, judge)
            texts = {"input": pair.input_caption, "edit": pair.instruction, "output": pair.output_caption}
            if shipped:
                generator["shipped_scores"] = shipped
            attempt = {"key": key, "row": index, **verdict.record(), "params": generator, **texts}
            sample = None
            if verdict.kept:
                meta = {
                    "input_caption": pair.input_caption, "instruction": pair.instruction,
                    "output_caption": pair.output_caption, "num_frames": num_frames, "height": size, "width": size,
                    "fps": fps, "seed": index, "source": label, "generator": generator, "clip": verdict.clip,
                    **({"judge": verdict.judge} if verdict.judge is not None else {}),
                }
                sample = pair_sample(key, source, edited, meta, video_format, fps)
            yield Outcome(attempt, sample, (local + 1, 0))

    bar = tqdm(total=num_samples, initial=writer.samples, unit="pair", desc=f"lift rank {rank}", disable=not progress)
    shards, _ = write_outcomes(writer, outcomes(), num_samples, per_shard, bar)
    bar.close()
    return BuildResult(writer.samples, writer.state["attempts"], shards, stats["unreadable"])
