"""The public video-editing benchmarks: their files read as edit items, their output layouts, their scales and published rows."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .evaluate import VIDEO_SUFFIXES

FORMATS = ("editverse", "openve", "five", "v2vbench", "tgve")
TGVE_EDITS = ("style", "object", "background", "multiple")
# OpenVE-Bench's categories with a published rubric; the others (creative, camera, subtitle edits)
# are left out of its published overall and read only when asked for with --categories
OPENVE_RATED = ("global_style", "background_change", "local_change", "local_remove", "local_add")


@dataclass(frozen=True)
class BenchmarkItem:
    """One (video, instruction) of a benchmark, in its own terms."""

    key: str                        # the item's id in its benchmark (EditVerse's "0", FiVE's "edit1/0001_bus/...")
    video: Path                     # the source video: a file, or a folder of frames
    instruction: str                # what the editor is asked
    category: str                   # the benchmark's edit type
    target_prompt: str | None = None   # a caption of the wanted result (CLIP text alignment, PickScore)
    source_prompt: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)  # questions, masks, layout names


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read as its format says: one line naming the file and why."""


def detect_format(path: Path) -> str:
    """The format of a benchmark file or folder, from its layout and fields."""
    path = Path(path)
    if path.is_dir():
        if list(path.glob("edit_prompt/edit*_FiVE.json")):
            return "five"
        for name in ("test.json", "benchmark_videos.csv"):
            if (path / name).is_file():
                return detect_format(path / name)
        if any(_is_tgve_yaml(p) for p in sorted(path.glob("*.yaml"))):
            return "tgve"
        raise BenchmarkError(f"{path}: no benchmark file found (test.json, benchmark_videos.csv, edit_prompt/edit*_FiVE.json, "
                             f"a V2VBench or LOVEU-TGVE YAML): name it or pass --format")
    if not path.is_file():
        raise BenchmarkError(f"no benchmark at {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "openve"
    if suffix == ".json":
        data = _load_json(path)
        if isinstance(data, dict) and data and all(isinstance(v, dict) and "<text>" in v for v in data.values()):
            return "editverse"
        if isinstance(data, list) and data and all(isinstance(v, dict) and "video_name" in v for v in data):
            return "five"
    if suffix in (".yaml", ".yml"):
        data = _load_yaml(path)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            return "v2vbench"
        if _is_tgve_yaml(path):
            return "tgve"
    raise BenchmarkError(f"{path}: not a file of a known benchmark format ({', '.join(FORMATS)}): pass --format")


def read_benchmark(path: Path, fmt: str | None = None) -> tuple[str, list[BenchmarkItem]]:
    """``(format, items)`` of a benchmark file or folder (format detected unless given); video
    paths are resolved relative to the benchmark's own file."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise BenchmarkError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    readers = {"editverse": _editverse, "openve": _openve, "five": _five, "v2vbench": _v2vbench, "tgve": _tgve}
    items = readers[fmt](path)
    if not items:
        raise BenchmarkError(f"{path}: no items")
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise BenchmarkError(f"{path}: item ids repeat")
    return fmt, items


def select(items: list[BenchmarkItem], categories: list[str] | None = None, limit: int | None = None,
           fmt: str | None = None) -> list[BenchmarkItem]:
    """The items of ``categories`` (default: all, or OpenVE's rated ones), the first ``limit`` of them."""
    if categories:
        known = {item.category for item in items}
        unknown = set(categories) - known
        if unknown:
            raise BenchmarkError(f"--categories: no items of {', '.join(sorted(unknown))}; the benchmark has "
                                 f"{', '.join(sorted(known))}")
        items = [item for item in items if item.category in categories]
    elif fmt == "openve":
        items = [item for item in items if item.category in OPENVE_RATED]
    return items[:limit] if limit else items


# ---------------------------------------------------------------- output layouts
def output_video(fmt: str, out: Path, item: BenchmarkItem) -> Path:
    """Where the edit goes in the benchmark's own output layout, so its official scripts read it:
    EditVerse ``<id>/generate.mp4`` (with the source as ``<id>/video1.mp4``), OpenVE
    ``<name>_edited.mp4``, FiVE ``<video_name>/<save_dir>/`` frames, V2VBench
    ``<video_id>/<edit index>.mp4``, LOVEU-TGVE ``<video>/<edit>.mp4``."""
    if fmt == "editverse":
        return out / item.key / "generate.mp4"
    if fmt == "openve":
        return out / f"{Path(item.extra['original_video']).stem}_edited.mp4"
    if fmt == "five":
        return out / item.extra["video_name"] / item.extra["save_dir"]
    if fmt == "v2vbench":
        return out / item.extra["video_id"] / f"{item.extra['edit_id']}.mp4"
    return out / item.extra["video_stem"] / f"{item.category}.mp4"


def source_copy(fmt: str, out: Path, item: BenchmarkItem) -> Path | None:
    """Where the layout wants the source video beside the edit (EditVerse's ``video1.mp4``), else ``None``."""
    return out / item.key / "video1.mp4" if fmt == "editverse" else None


# ---------------------------------------------------------------- scales and published rows
@dataclass(frozen=True)
class Published:
    model: str
    score: float
    source: str


SCALES = {
    "editverse": "VLM editing score, 0–9 (three 0–3 criteria on sampled frame pairs, mean over pairs)",
    "openve": "VLM score, 1–5 (mean of three 1–5 criteria; overall: mean over the rated categories)",
    "five": "FiVE-Acc, 0–1 (mean of yes/no, multiple-choice, their union and intersection accuracies)",
    "v2vbench": "CLIP text alignment and temporal consistency (no VLM score defined)",
    "tgve": "CLIP text alignment and temporal consistency, PickScore (no VLM score defined)",
}
PUBLISHED = {
    "editverse": [Published("InsV2V", 5.21, "EditVerse-Bench VLM score, EditVerse paper"),
                  Published("Lucy Edit", 5.89, "EditVerse-Bench VLM score, EasyV2V paper"),
                  Published("Señorita-2M", 6.97, "EditVerse-Bench VLM score, EditVerse paper"),
                  Published("EditVerse", 7.65, "EditVerse-Bench VLM score, EditVerse paper"),
                  Published("EasyV2V", 7.73, "EditVerse-Bench VLM score, EasyV2V paper")],
    "openve": [Published("VACE", 1.57, "OpenVE-Bench overall, Kiwi-Edit paper"),
               Published("InsViE", 1.45, "OpenVE-Bench overall, Kiwi-Edit paper"),
               Published("Ditto", 2.13, "OpenVE-Bench overall, Kiwi-Edit paper"),
               Published("Lucy Edit", 2.22, "OpenVE-Bench overall, Kiwi-Edit paper"),
               Published("OpenVE-Edit", 2.50, "OpenVE-Bench overall, Kiwi-Edit paper"),
               Published("Kiwi-Edit", 3.02, "OpenVE-Bench overall, Kiwi-Edit paper")],
    "five": [], "v2vbench": [], "tgve": [],
}


# ---------------------------------------------------------------- readers
def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchmarkError(f"{path} is not readable JSON ({err})") from None


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise BenchmarkError(f"{path} is not readable YAML ({str(err).splitlines()[0]})") from None


def _media(base: Path, name: str, what: str) -> Path:
    """A benchmark's video ``name`` resolved against its file's folder (and that folder's parent,
    where layouts name paths from the benchmark's root), with or without a video suffix."""
    name = str(name).strip()
    if not name:
        raise BenchmarkError(f"{what}: an empty video path")
    candidates = []
    for root in (base, base.parent):
        for stem in (Path(name), Path("videos") / name):
            candidates.append(root / stem)
            candidates += [root / stem.with_name(stem.name + s) for s in VIDEO_SUFFIXES if not stem.suffix]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise BenchmarkError(f"{what}: video {name!r} not found beside {base}")


def _editverse(path: Path) -> list[BenchmarkItem]:
    path = path / "test.json" if path.is_dir() else path
    data = _load_json(path)
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: EditVerse's test.json maps ids to items")
    items = []
    for key, entry in data.items():
        where = f"{path.name} item {key}"
        if not isinstance(entry, dict) or "<text>" not in entry or "<video1>" not in entry:
            raise BenchmarkError(f"{where}: needs <text> and <video1>")
        text = str(entry["<text>"])
        if re.search(r"<(image|video)[2-9]>|<image1>", text):
            continue  # a reference image or second video: not an instruction edit of one video
        instruction = re.sub(r"\s+", " ", text.replace("<video1>", " ")).strip()
        items.append(BenchmarkItem(str(key), _media(path.parent, entry["<video1>"], where), instruction,
                                   str(entry.get("type", "edit")), entry.get("target_prompt"), entry.get("source_prompt"),
                                   {"text": text, "direction": entry.get("direction")}))
    return items


def _openve(path: Path) -> list[BenchmarkItem]:
    path = path / "benchmark_videos.csv" if path.is_dir() else path
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BenchmarkError(f"{path} is not a readable CSV ({err})") from None
    if not rows or not {"original_video", "prompt", "edited_type"} <= set(rows[0]):
        raise BenchmarkError(f"{path}: OpenVE-Bench's CSV has columns original_video, prompt, edited_type")
    return [BenchmarkItem(f"{i:04d}", _media(path.parent, row["original_video"], f"{path.name} row {i + 2}"),
                          row["prompt"].strip(), row["edited_type"].strip(), extra={"original_video": row["original_video"]})
            for i, row in enumerate(rows)]


def five_instruction(source_prompt: str, target_prompt: str) -> str:
    """An instruction from FiVE's bracketed prompt pair: ``a [red] bus`` → ``a [blue] bus`` gives
    ``change red to blue``; without brackets, the target caption itself."""
    source = re.findall(r"\[([^\]]+)\]", source_prompt)
    target = re.findall(r"\[([^\]]+)\]", target_prompt)
    if source and target:
        return f"change {' '.join(source)} to {' '.join(target)}"
    if target:
        return f"add {' '.join(target)}"
    return target_prompt.replace("[", "").replace("]", "")


def _five(path: Path) -> list[BenchmarkItem]:
    files = sorted(path.glob("edit_prompt/edit*_FiVE.json")) if path.is_dir() else [path]
    root = path if path.is_dir() else (path.parent.parent if path.parent.name == "edit_prompt" else path.parent)
    items = []
    for file in files:
        data = _load_json(file)
        if not isinstance(data, list):
            raise BenchmarkError(f"{file}: FiVE's edit files are lists of items")
        for i, entry in enumerate(data):
            where = f"{file.name} item {i}"
            if not isinstance(entry, dict) or not {"video_name", "source_prompt", "target_prompt"} <= set(entry):
                raise BenchmarkError(f"{where}: needs video_name, source_prompt and target_prompt")
            name = str(entry["video_name"])
            frames = root / "images" / name
            video = frames if frames.is_dir() else _media(root, name, where)
            source, target = str(entry["source_prompt"]), str(entry["target_prompt"])
            questions = {k: entry.get(k) for k in ("source_yes_no_question", "target_yes_no_question",
                                                     "multiple_choice_question") if entry.get(k)}
            masks = root / "bmasks" / name
            save_dir = str(entry.get("save_dir") or f"{file.stem.split('_')[0]}_{i:03d}")
            items.append(BenchmarkItem(f"{file.stem.split('_')[0]}/{name}/{save_dir}", video,
                                       str(entry.get("instruction") or five_instruction(source, target)),
                                       str(entry.get("editing_type_id", file.stem.split("_")[0])),
                                       target.replace("[", "").replace("]", ""), source.replace("[", "").replace("]", ""),
                                       {"video_name": name, "save_dir": save_dir, "questions": questions,
                                        "masks": str(masks) if masks.is_dir() else None}))
    return items


def _v2vbench(path: Path) -> list[BenchmarkItem]:
    data = _load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BenchmarkError(f"{path}: V2VBench's YAML has a data list of {{video_id, edit: [{{prompt}}]}}")
    items = []
    for entry in data["data"]:
        if not isinstance(entry, dict) or "video_id" not in entry or not isinstance(entry.get("edit"), list):
            raise BenchmarkError(f"{path}: each data entry needs video_id and an edit list")
        video_id = str(entry["video_id"])
        video = _media(path.parent, video_id, f"{path.name} {video_id}")
        for edit_id, edit in enumerate(entry["edit"]):
            prompt = edit.get("prompt") if isinstance(edit, dict) else edit
            if not prompt:
                raise BenchmarkError(f"{path}: {video_id} edit {edit_id} has no prompt")
            items.append(BenchmarkItem(f"{video_id}/{edit_id}", video, str(prompt), str(edit.get("type", "edit"))
                                       if isinstance(edit, dict) else "edit", str(prompt), entry.get("prompt"),
                                       {"video_id": video_id, "edit_id": edit_id}))
    return items


def _is_tgve_yaml(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and bool(set(data) & set(TGVE_EDITS)) and "data" not in data


def _tgve(path: Path) -> list[BenchmarkItem]:
    files = sorted(p for p in path.glob("*.yaml") if _is_tgve_yaml(p)) if path.is_dir() else [path]
    items = []
    for file in files:
        data = _load_yaml(file)
        if not isinstance(data, dict):
            raise BenchmarkError(f"{file}: a LOVEU-TGVE prompt file maps edit kinds to prompts")
        video = _media(file.parent, str(data.get("video") or file.stem), file.name)
        for kind in TGVE_EDITS:
            if data.get(kind):
                items.append(BenchmarkItem(f"{file.stem}/{kind}", video, str(data[kind]).strip(), kind,
                                           str(data[kind]).strip(), data.get("caption"), {"video_stem": file.stem}))
    return items
