"""`infer eval --benchmark`: edit a public benchmark's items, judge them as published, report in its own scale; resumable, by ranks."""

from __future__ import annotations

import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from .benchmark_judges import HEADLINE, JUDGED_FIELDS, BenchmarkJudge
from .benchmarks import PUBLISHED, SCALES, BenchmarkItem, output_video, source_copy
from .clip_scorer import ClipScorer
from .llm import RefusedRequest
from .metrics import clip_frame_consistency, clip_text_score, masked_psnr, masked_ssim, pick_score
from .pipeline import InsV2VPipeline, working_size
from .video import atomic_write, read_video_exact
from .video_writer import write_video

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
AUTOMATIC = ("clip_text", "clip_temporal", "pickscore", "background_psnr", "background_ssim")
REPORT = "benchmark.json"
FPS = 8  # the frame rate edits are written at (frames, not time, are what every benchmark scores)
# edits are encoded exactly (write_video(exact=True)): the same frames always give the same file, so a
# resumed or split run scores exactly what one run would


def rows_file(out: Path, index: int, count: int) -> Path:
    return out / f"rows-{index:03d}-of-{count:03d}.jsonl"


def shard(items: list[BenchmarkItem], index: int, count: int) -> list[BenchmarkItem]:
    """Rank ``index`` of ``count``'s items: every ``count``-th from ``index``, in benchmark order."""
    if not 0 <= index < count:
        raise ValueError(f"--shard-index must be in 0..{count - 1}, got {index}")
    return items[index::count]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows a run appended (one JSON object a line); a torn last line is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "key" in row:
            rows.append(row)
    return rows


class RowLog:
    """One rank's rows, each appended, flushed and synced as it finishes (from any thread)."""

    def __init__(self, path: Path, kept: list[dict[str, Any]]):
        self.path, self.lock = path, threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())  # a torn line dropped

    def append(self, row: dict[str, Any]) -> None:
        with self.lock, open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_frames(path: Path, max_frames: int | None = None) -> np.ndarray:
    """A video file, or a folder of frame images (sorted by name), as uint8 ``(F, H, W, 3)``, the
    same bits on every read (:func:`infer.video.read_video_exact`)."""
    if path.is_dir():
        names = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_frames]
        if not names:
            raise ValueError(f"{path} holds no frame images")
        return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in names])
    return read_video_exact(path, max_frames=max_frames)


def write_frames(folder: Path, frames: np.ndarray) -> None:
    """Frames as ``00001.jpg``… in ``folder``, written beside it and renamed into place (whole or not at all)."""
    staging = folder.with_name(f".{folder.name}.partial")
    staging.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(staging / f"{i + 1:05d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    staging.rename(folder)


def read_masks(folder: str | None, count: int, size: tuple[int, int]) -> np.ndarray | None:
    """FiVE's per-frame binary edit masks at ``size`` (h, w), ``(F, H, W)`` bool; ``None`` without them."""
    if not folder:
        return None
    names = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if len(names) < count:
        return None
    return np.stack([cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (size[1], size[0]),
                                interpolation=cv2.INTER_NEAREST) > 0 for p in names])


@dataclass
class BenchmarkRun:
    """Everything one rank's run needs besides the items."""

    fmt: str
    out: Path
    pipe: InsV2VPipeline
    options: dict[str, Any]
    clip: ClipScorer
    pick: ClipScorer | None = None
    judge: BenchmarkJudge | None = None
    seed: int = 0
    resolution: int | None = None
    max_frames: int | None = None
    concurrency: int = 4
    progress: bool = True
    judge_stopped: str | None = field(default=None, init=False)

    def edit(self, item: BenchmarkItem) -> tuple[np.ndarray, np.ndarray]:
        """The item's source frames (at the working size) and its edit, written in the benchmark's
        layout and read back. An edit already there (a run stopped before judging it) is read back,
        not redone."""
        frames = read_frames(item.video, self.max_frames)
        h, w = working_size(*frames.shape[1:3], self.resolution or self.pipe.editor.resolution,
                            self.pipe.editor.size_multiple)
        source = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])
        target, copy = output_video(self.fmt, self.out, item), source_copy(self.fmt, self.out, item)
        if not (target.exists() and (copy is None or copy.exists())):
            edited = self.pipe(source, item.instruction, generator=torch.Generator().manual_seed(self.seed),
                               progress=False, **self.options).frames
            if self.fmt == "five":
                write_frames(target, edited)
            else:
                write_video(target, edited, FPS, exact=True)
            if copy is not None:
                write_video(copy, source, FPS, exact=True)
        # what is scored is what was written, as the official scripts read it (a resumed run's too)
        edited = read_frames(target)
        if copy is not None:
            source = read_frames(copy)
        if len(edited) != len(source):
            raise ValueError(f"{target} holds {len(edited)} frames, the source {len(source)}: remove it and rerun")
        return source, edited

    def measure(self, item: BenchmarkItem, source: np.ndarray, edited: np.ndarray) -> dict[str, Any]:
        """The automatic metrics the benchmark defines that can be computed here."""
        emb = self.clip.image_embeds(edited)
        text = self.clip.text_embeds([item.target_prompt or item.instruction])[0]
        row: dict[str, Any] = {"clip_text": clip_text_score(emb, text), "clip_temporal": clip_frame_consistency(emb),
                               "pickscore": None, "background_psnr": None, "background_ssim": None}
        if self.pick is not None:
            scale = float(self.pick.model.logit_scale.exp())
            row["pickscore"] = pick_score(self.pick.image_embeds(edited),
                                          self.pick.text_embeds([item.target_prompt or item.instruction])[0], scale)
        masks = read_masks(item.extra.get("masks"), len(source), source.shape[1:3])
        if masks is not None:
            background = ~masks
            row["background_psnr"] = masked_psnr(source, edited, background)
            row["background_ssim"] = masked_ssim(source, edited, background)
        return row

    def judged(self, item: BenchmarkItem, source: np.ndarray, edited: np.ndarray) -> dict[str, Any]:
        """The judge's fields for one edit; empty once the judge has refused for good."""
        fields = dict.fromkeys(JUDGED_FIELDS[self.fmt])
        if self.judge is None or self.judge_stopped:
            return fields
        try:
            return {**fields, **self.judge.score(item, source, edited), **self.judge.settings.record()}
        except ConnectionError as err:  # RefusedRequest at once, or retries spent: no point asking again
            if self.judge_stopped is None:
                self.judge_stopped = str(err)
                kind = "refused" if isinstance(err, RefusedRequest) else "failed"
                print(f"infer: warning: the judge {kind} ({err}); the remaining edits are kept unjudged",
                      file=sys.stderr)
            return fields


def run_benchmark(run: BenchmarkRun, items: list[BenchmarkItem], log: RowLog, done: set[str]) -> list[dict[str, Any]]:
    """Edit each item not in ``done`` (in order, on this process's device) while up to
    ``run.concurrency`` judge requests are in flight; each row is appended to ``log`` when its
    judgment is in."""
    todo = [item for item in items if item.key not in done]
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(todo), desc=f"{run.fmt}", disable=not run.progress)

    def finish(item: BenchmarkItem, source: np.ndarray, edited: np.ndarray, measured: dict[str, Any]) -> None:
        row = {"key": item.key, "category": item.category, "instruction": item.instruction, "frames": len(edited),
               "output": str(output_video(run.fmt, run.out, item).relative_to(run.out)), **measured,
               **run.judged(item, source, edited)}
        log.append(row)
        rows.append(row)
        bar.update(1)

    with ThreadPoolExecutor(max_workers=max(1, run.concurrency)) as pool:
        futures = []
        for item in todo:
            source, edited = run.edit(item)
            futures.append(pool.submit(finish, item, source, edited, run.measure(item, source, edited)))
        for future in futures:
            future.result()
    bar.close()
    return rows


def _mean(values: list[Any]) -> float | None:
    clean = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(clean)) if clean else None


def summarize(fmt: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per category and overall, in the benchmark's scale: the judge's fields and the automatic
    metrics. OpenVE's overall is the mean of its category means (as published); the others are
    means over items."""
    fields = (*JUDGED_FIELDS[fmt], *AUTOMATIC)
    categories = {}
    for category in sorted({r["category"] for r in rows}):
        picked = [r for r in rows if r["category"] == category]
        categories[category] = {"items": len(picked), **{f: _mean([r.get(f) for r in picked]) for f in fields}}
    overall = {"items": len(rows), **{f: _mean([r.get(f) for r in rows]) for f in fields}}
    if fmt == "openve":
        overall.update({f: _mean([c[f] for c in categories.values()]) for f in fields})
    headline = HEADLINE.get(fmt)
    judges = sorted({(r.get("judge_model"), r.get("judge_temperature")) for r in rows if r.get("judge_model")})
    return {"format": fmt, "scale": SCALES[fmt], "headline": headline, "overall": overall, "categories": categories,
            "judges": [{"model": m, "temperature": t} for m, t in judges],
            "published": [vars(p) for p in PUBLISHED[fmt]]}


def table(summary: dict[str, Any], label: str = "this editor") -> str:
    """The report as Markdown: per category and overall in the benchmark's scale, then the
    published rows beside ours, labelled as published."""
    headline = summary["headline"]
    fields = [f for f in (headline, "clip_text", "clip_temporal", "pickscore", "background_psnr", "background_ssim")
              if f and any(v.get(f) is not None for v in (summary["overall"], *summary["categories"].values()))]

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = [f"**{summary['format']}**: {summary['scale']}", "",
             "| category | items | " + " | ".join(fields) + " |", "|---|---|" + "---|" * len(fields)]
    for name, values in summary["categories"].items():
        lines.append(f"| {name} | {values['items']} | " + " | ".join(cell(values[f]) for f in fields) + " |")
    lines.append(f"| **overall** | {summary['overall']['items']} | "
                 + " | ".join(f"**{cell(summary['overall'][f])}**" for f in fields) + " |")
    judges = ", ".join(f"{j['model']} (temperature {j['temperature']})" for j in summary["judges"]) or "none"
    lines += ["", f"Judge: {judges}."]
    if summary["published"]:
        lines += ["", "| model | score | source |", "|---|---|---|",
                  f"| **{label} (measured here)** | {cell(summary['overall'].get(headline))} | this run |"]
        lines += [f"| {p['model']} | {p['score']:.2f} | published, not re-measured: {p['source']} |"
                  for p in summary["published"]]
    return "\n".join(lines) + "\n"


def write_report(out: Path, fmt: str, rows: list[dict[str, Any]], notes: list[str]) -> str:
    summary = summarize(fmt, rows)
    summary["notes"] = notes
    atomic_write(out / REPORT, (json.dumps(summary, indent=2) + "\n").encode())
    text = table(summary) + "".join(f"\n- {n}" for n in notes) + "\n"
    atomic_write(out / "benchmark.md", text.encode())
    return text


def merge(out: Path, items: list[BenchmarkItem]) -> list[dict[str, Any]]:
    """Every rank's rows of one benchmark run, in benchmark order; an item no rank finished is an error."""
    rows = {r["key"]: r for path in sorted(out.glob("rows-*-of-*.jsonl")) for r in read_rows(path)}
    missing = [item.key for item in items if item.key not in rows]
    if missing:
        raise ValueError(f"{len(missing)} of {len(items)} items have no row in {out} yet (first: {missing[0]}): "
                         "finish the ranks (rerun them; finished items are kept) before --merge")
    return [rows[item.key] for item in items]
