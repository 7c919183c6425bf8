"""`infer eval`: edit a set of videos under several settings and tabulate quality metrics."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from .clip_scorer import ClipScorer
from .judge import CRITERIA, VisionJudge
from .metrics import (clip_directional, clip_frame_consistency, clip_text_score, pick_score, seam_error,
                      source_pair_flows, warp_error)
from .pipeline import EditSettings, InsV2VPipeline, working_size
from .sampling import stream_clips
from .video import atomic_write, read_video

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".gif")
DEFAULT_SETTINGS = {"no-lvsc": {"lvsc": 0.0}, "lvsc": {"lvsc": 0.5}, "lvsc+mc": {"lvsc": 0.5, "motion_compensation": True}}
METRICS = ("clip_t", "clip_f", "clip_d", "pickscore", "judge", "warp_error", "seam_error")
JUDGE_COLUMNS = tuple(f"judge_{name}" for name in CRITERIA) + ("judge_reason",)
NEUTRAL_TEXT = "a video"  # the caption end point of the instruction's CLIP direction


def read_instructions(path: Path) -> list[tuple[str, str, str]]:
    """``(video, edit name, instruction)`` from LOVEU-TGVE JSON ``{video: {edit: instruction}}`` or
    a CSV with columns ``video,instruction``."""
    if not path.is_file():
        raise FileNotFoundError(f"no instructions file at {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"{path} must map each video to {{edit name: instruction}}")
        return [(video, name, str(instr)) for video, edits in data.items() for name, instr in edits.items()]
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"video", "instruction"} <= set(rows[0]):
        raise ValueError(f"{path} must be a CSV with columns video,instruction")
    return [(r["video"], r.get("edit") or f"edit{i}", r["instruction"]) for i, r in enumerate(rows)]


_FIELDS = {f.name: f.type for f in fields(EditSettings)}
_ALIASES = {"steps": "num_inference_steps", "mc": "motion_compensation"}


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VAL,KEY=VAL`` -> (name, EditSettings overrides); values are numbers or booleans."""
    name, _, body = text.partition(":")
    if not name:
        raise ValueError(f"setting {text!r} has no name (NAME:KEY=VAL,...)")
    options: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        key = _ALIASES.get(key.strip().replace("-", "_"), key.strip().replace("-", "_"))
        if not eq or key not in _FIELDS or key in ("prompt", "negative_prompt", "resolution"):
            raise ValueError(f"setting {name}: unknown or malformed option {item!r}")
        low = value.strip().lower()
        options[key] = True if low == "true" else False if low == "false" else (int(low) if low.lstrip("-").isdigit() else float(low))
    return name, options


def find_video(folder: Path, name: str) -> Path | None:
    for suffix in VIDEO_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return None


@dataclass
class Scorers:
    clip: ClipScorer
    pick: ClipScorer | None
    clip_is_tiny: bool
    judge: VisionJudge | None = None
    judge_failure: str | None = None  # set when the judge server gave up: later rows are not judged


def judge_columns(scorers: Scorers, source: np.ndarray, edited: np.ndarray, instruction: str) -> dict[str, Any]:
    """The judge's total (0–9) and criteria for one edit; NaN when there is no judge, its reply was
    malformed, or its server failed (then the failure is kept, said once, and the judge not asked again)."""
    row: dict[str, Any] = {"judge": float("nan"), **dict.fromkeys(JUDGE_COLUMNS, "")}
    if scorers.judge is None or scorers.judge_failure is not None:
        return row
    try:
        judgment = scorers.judge(source, edited, instruction)
    except ConnectionError as err:
        scorers.judge_failure = str(err)
        print(f"infer: warning: judge stopped, the rest is not judged: {err}", file=sys.stderr)
        return row
    if judgment is not None:
        row.update({"judge": float(judgment.total), "judge_reason": judgment.reason,
                    **{f"judge_{k}": v for k, v in judgment.scores.items()}})
    return row


COLUMNS = ["video", "edit", "setting", "frames", *METRICS, *JUDGE_COLUMNS]
ROWS_FILE = "per_video.csv"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The finished rows of an earlier run's ``per_video.csv`` (numbers as numbers); a torn last
    line (a run killed mid-write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(path.read_text())):
        if None in row or any(row.get(c) is None for c in COLUMNS):
            continue
        try:
            rows.append({**row, "frames": int(row["frames"]), **{m: float(row[m]) for m in METRICS}})
        except ValueError:
            continue
    return rows


class RowLog:
    """``per_video.csv`` grown one finished row at a time (flushed and synced), so an interrupted
    run keeps every row it finished and ``--resume`` knows what to skip."""

    def __init__(self, path: Path, kept: list[dict[str, Any]]):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
        atomic_write(path, buffer.getvalue().encode())  # the kept rows, whole (a torn line dropped)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow(row)
            f.flush()
            os.fsync(f.fileno())


def evaluate(pipe: InsV2VPipeline, videos: Path, instructions: list[tuple[str, str, str]], settings: dict[str, dict],
             scorers: Scorers, base: dict[str, Any], max_frames: int | None, resolution: int | None, seed: int,
             progress: bool = True, log: RowLog | None = None, done: list[dict[str, Any]] | None = None,
             rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per (video, edit, setting), every setting on the same frames and seed. Rows in
    ``done`` are kept, not edited again; each new row is appended to ``log`` as it is finished and
    to ``rows`` (so a caller interrupted midway still holds them)."""
    rows = [] if rows is None else rows
    finished = {(r["video"], r["edit"], r["setting"]) for r in done or []}
    rows.extend(done or [])
    jobs = [(v, e, i) for v, e, i in instructions if find_video(videos, v) is not None]
    jobs = [(v, e, i) for v, e, i in jobs if any((v, e, name) not in finished for name in settings)]
    bar = tqdm(total=len(jobs) * len(settings), desc="evaluating", disable=not progress)
    cache: dict[str, tuple[np.ndarray, torch.Tensor, list]] = {}
    for video, edit, instruction in jobs:
        if video not in cache:
            frames = read_video(find_video(videos, video), max_frames=max_frames)
            h, w = working_size(*frames.shape[1:3], resolution or pipe.editor.resolution, pipe.editor.size_multiple)
            frames = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])
            # the source's embeddings and optical flow serve every edit and setting of this video
            cache = {video: (frames, scorers.clip.image_embeds(frames), source_pair_flows(frames))}
        source, source_emb, flows = cache[video]
        texts = scorers.clip.text_embeds([instruction, NEUTRAL_TEXT])
        for name, options in settings.items():
            if (video, edit, name) in finished:
                bar.update(1)
                continue
            setting = pipe.settings(instruction, **{**base, **options})
            edited = pipe(source, instruction, generator=torch.Generator().manual_seed(seed), progress=False,
                          **{k: v for k, v in vars(setting).items() if k != "prompt"}).frames
            emb = scorers.clip.image_embeds(edited)
            plan = [clip for clip, _ in stream_clips(range(len(source)), setting.clip_frames, setting.reference_frames,
                                                     pipe.editor.temporal_compression)]
            row = {
                "video": video, "edit": edit, "setting": name, "frames": len(source),
                "clip_t": clip_text_score(emb, texts[0]),
                "clip_f": clip_frame_consistency(emb),
                "clip_d": clip_directional(source_emb, emb, texts[1], texts[0]),
                "pickscore": float("nan"),
                **judge_columns(scorers, source, edited, instruction),
                "warp_error": warp_error(source, edited, flows=flows),
                "seam_error": seam_error(source, edited, [c.new_start for c in plan[1:]], flows=flows)
                if len(plan) > 1 else float("nan"),
            }
            if scorers.pick is not None:
                pick_text = scorers.pick.text_embeds([instruction])[0]
                scale = float(scorers.pick.model.logit_scale.exp())
                row["pickscore"] = pick_score(scorers.pick.image_embeds(edited), pick_text, scale)
            rows.append(row)
            if log is not None:
                log.append(row)
            bar.update(1)
    bar.close()
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of each metric per setting (NaN entries ignored)."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["setting"] for r in rows):
        picked = [r for r in rows if r["setting"] == name]
        out[name] = {"rows": len(picked)}
        for metric in METRICS:
            values = [r[metric] for r in picked if not np.isnan(r[metric])]
            out[name][metric] = float(np.mean(values)) if values else None
    return out


def write_reports(out: Path, rows: list[dict[str, Any]], summary: dict, notes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / ROWS_FILE, buffer.getvalue().encode())
    atomic_write(out / "summary.json", (json.dumps({"settings": summary, "notes": notes}, indent=2) + "\n").encode())
    arrows = {"clip_t": "↑", "clip_f": "↑", "clip_d": "↑", "pickscore": "↑", "judge": "↑ (0–9)", "warp_error": "↓",
              "seam_error": "↓"}
    lines = ["| setting | rows | " + " | ".join(f"{m} {arrows[m]}" for m in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for name, values in summary.items():
        cells = ["–" if values[m] is None else (f"{values[m]:.5f}" if "error" in m else f"{values[m]:.4f}") for m in METRICS]
        lines.append(f"| {name} | {values['rows']} | " + " | ".join(cells) + " |")
    atomic_write(out / "summary.md", ("\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n").encode())
