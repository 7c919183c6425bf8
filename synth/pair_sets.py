"""The published video-editing pair sets: each set's own metadata read into pairs, paths resolved as its loaders do."""

from __future__ import annotations

import collections
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


@dataclass
class PublishedPair:
    """One pair as a set publishes it: file paths as written in its metadata (``frames`` instead for
    a set of frame files), the instruction, and what the set says about the pair. ``error`` marks a
    metadata row that cannot be used (counted, never fatal)."""

    source: str | None
    edited: str | None
    instruction: str | None
    category: str | None = None
    ids: dict[str, Any] = field(default_factory=dict)
    direction: str = "as published"
    input_caption: str | None = None
    output_caption: str | None = None
    frames: tuple[list[str], list[str]] | None = None  # (source frames, edited frames), relative paths
    ref_image: bytes | None = None
    scores: dict[str, float] | None = None
    trim_source: bool = False  # the edit covers the source's first frames (a set that cut its clips)
    error: str | None = None


@dataclass(frozen=True)
class PairSet:
    """A set's name and licence as its card states them, the folder its paths are relative to, and
    its reader."""

    name: str
    licence: str
    non_commercial: bool
    read: Callable[[Path], Iterator[PublishedPair]]
    media_folder: Callable[[Path], Path] = lambda root: root


def _text(value: Any) -> str | None:
    return " ".join(value.split()) if isinstance(value, str) and value.strip() else None


def _rel(path: Any, strip: tuple[str, ...] = ()) -> str | None:
    """A metadata path without a leading ``./`` (and the prefixes ``strip``), as the loaders join it."""
    if not isinstance(path, str) or not path.strip():
        return None
    path = path.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    for prefix in strip:
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path


def _json_list(path: Path) -> list[Any] | None:
    """A JSON file's list of records, or ``None`` when it is not one (the caller counts it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, list) else None


def _csv_rows(path: Path, header: bool = True) -> Iterator[dict[str, str] | list[str]]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        yield from (csv.DictReader(f) if header else csv.reader(f))


# ---------------------------------------------------------------- Ditto-1M
def _ditto(root: Path) -> Iterator[PublishedPair]:
    """``training_metadata/*.json``: lists of ``{source_path, instruction, edited_path}``, paths under
    ``videos/``; the category is the edit's first folder; ``sim2real*.json`` lists pairs whose source
    is a generated edit and whose target is real footage; captions from ``source_video_captions/``."""
    captions: dict[str, str] = {}
    for path in sorted((root / "source_video_captions").glob("*.json")):
        for record in _json_list(path) or []:
            if isinstance(record, dict) and _text(record.get("caption")):
                captions[_rel(record.get("path"), ("videos/",)) or ""] = _text(record["caption"])
    files = sorted((root / "training_metadata").glob("*.json")) + sorted(root.glob("sim2real*.json"))
    for path in files:
        records = _json_list(path)
        if records is None:
            yield PublishedPair(None, None, None, error=f"{path.name} is not a JSON list", ids={"metadata": path.name})
            continue
        flipped = path.name.startswith("sim2real")
        for index, record in enumerate(records):
            ids = {"metadata": path.name, "index": index}
            if not isinstance(record, dict):
                yield PublishedPair(None, None, None, ids=ids, error=f"{path.name} record {index} is not an object")
                continue
            source, edited = _rel(record.get("source_path"), ("videos/",)), _rel(record.get("edited_path"), ("videos/",))
            ids.update(source_path=record.get("source_path"), edited_path=record.get("edited_path"))
            # the category is the edit's folder (a sim2real pair's edit is its source side)
            folders = [p.split("/")[0] for p in (edited, source) if p and "/" in p]
            category = next((f for f in folders if f != "source"), None)
            yield PublishedPair(
                source, edited, _text(record.get("instruction")), category=category, ids=ids,
                direction="sim2real: the source is a generated edit, the target real footage" if flipped else "as published",
                input_caption=captions.get(source or ""))


# ---------------------------------------------------------------- Señorita-2M
SENORITA_RENAMES = {"_videos": "_upload"}  # older task lists name folders by their pre-release names


def senorita_folder(root: Path, path: str) -> tuple[str, str | None]:
    """``path`` with a renamed first folder replaced by the one on disk (``obj_swap_videos/`` was
    released as ``obj_swap_upload/``), and the old name when it was renamed."""
    first, _, rest = path.partition("/")
    if not rest or (root / first).is_dir():
        return path, None
    for old, new in SENORITA_RENAMES.items():
        if first.endswith(old):
            stem = first[: -len(old)]
            for candidate in (stem + new, first + new.replace("_videos", "")):
                if (root / candidate).is_dir():
                    return f"{candidate}/{rest}", first
    return path, None


def _senorita(root: Path) -> Iterator[PublishedPair]:
    """Task lists ``*.json`` at the root: ``{source_video_path, target_video_path,
    enhanced_instruction}`` with ``./task_folder/N/`` paths; an addition is a removal read backwards
    (its target is the removal's ``_org.mp4`` original)."""
    for path in sorted(root.glob("*.json")):
        records = _json_list(path)
        if records is None or not any(isinstance(r, dict) and "source_video_path" in r for r in records[:1]):
            continue
        for index, record in enumerate(records):
            ids = {"metadata": path.name, "index": index}
            if not isinstance(record, dict):
                yield PublishedPair(None, None, None, ids=ids, error=f"{path.name} record {index} is not an object")
                continue
            source, edited = _rel(record.get("source_video_path")), _rel(record.get("target_video_path"))
            ids.update(source_video_path=record.get("source_video_path"), target_video_path=record.get("target_video_path"))
            renamed = {}
            if source:
                source, old = senorita_folder(root, source)
                renamed.update({"renamed_from": old} if old else {})
            if edited:
                edited, old = senorita_folder(root, edited)
                renamed.update({"renamed_from": old} if old else {})
            ids.update(renamed)
            instruction = _text(record.get("enhanced_instruction")) or _text(record.get("instruction"))
            folder = (source or "").split("/")[0]
            category = re.sub(r"(_videos)?(_upload)?$", "", folder) or path.stem
            direction = "as published"
            if edited and Path(edited).stem.endswith("_org"):
                direction, category = "reversed: an addition, the removal read backwards", "obj_addition"
            yield PublishedPair(source, edited, instruction, category=category, ids=ids, direction=direction)


# ---------------------------------------------------------------- OpenVE-3M
OPENVE_COLUMNS = ("original_video", "video", "prompt")


def _openve(root: Path) -> Iterator[PublishedPair]:
    """Per-category CSVs of ``original_video, video, prompt``, paths relative to ``videos/``. Rows
    listed the wrong way round (the edit as the original) are turned back: a path that is another
    row's original is a source, wherever this row lists it."""
    tables = []
    for path in sorted(root.glob("*.csv")):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            header = next(csv.reader(f), [])
        if all(c in header for c in OPENVE_COLUMNS):
            tables.append((path, list(_csv_rows(path))))
    originals = {_rel(r.get("original_video"), ("videos/",)) for _, rows in tables for r in rows}
    parent = lambda p: str(Path(p).parent) if p else None  # noqa: E731
    as_source, as_edit = collections.Counter(), collections.Counter()
    for _, rows in tables:
        for r in rows:
            as_source[parent(_rel(r.get("original_video"), ("videos/",)))] += 1
            as_edit[parent(_rel(r.get("video"), ("videos/",)))] += 1

    def reversed_row(source: str | None, edited: str | None) -> bool:
        """The edit listed as the original: the 'edit' is another row's original, or each lies in
        a folder that holds mostly the other kind (where sources and edits are kept apart)."""
        if edited in originals and source not in originals:
            return True
        a, b = parent(source), parent(edited)
        return as_edit[a] > as_source[a] and as_source[b] > as_edit[b]

    for path, rows in tables:
        for index, row in enumerate(rows):
            source, edited = _rel(row.get("original_video"), ("videos/",)), _rel(row.get("video"), ("videos/",))
            ids = {"metadata": path.name, "index": index, "original_video": row.get("original_video"), "video": row.get("video")}
            direction = "as published"
            if reversed_row(source, edited):
                source, edited = edited, source
                direction = "swapped back: the row listed the edit as the original"
            yield PublishedPair(source, edited, _text(row.get("prompt")), category=path.stem, ids=ids, direction=direction)


# ---------------------------------------------------------------- InsViE-1M
INSVIE_CSV = "train_insvie_align.csv"


def _insvie(root: Path) -> Iterator[PublishedPair]:
    """``train_insvie_align.csv`` by position: source video name, source caption, instruction, edit
    caption, edit subfolder. The edit is ``<subfolder>/<name>``; the source is the file of the same
    name in the one other folder that holds it. Edits are the sources' first ``4k + 1`` frames."""
    rows = list(_csv_rows(root / INSVIE_CSV, header=False))
    if rows and rows[0] and rows[0][0].strip().lower() in ("video", "source", "source_video", "name", "video_name"):
        rows = rows[1:]  # a header line
    edit_folders = {r[4].strip().strip("/") for r in rows if len(r) >= 5}
    source_folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in edit_folders)
    for index, row in enumerate(rows):
        ids = {"metadata": INSVIE_CSV, "index": index}
        if len(row) < 5:
            yield PublishedPair(None, None, None, ids=ids, error=f"{INSVIE_CSV} row {index + 1} has {len(row)} of 5 columns")
            continue
        name, source_caption, instruction, edit_caption, folder = (c.strip() for c in row[:5])
        name = _rel(name) or ""
        source = next((f"{d}/{name}" for d in source_folders if (root / d / name).is_file()), f"{source_folders[0]}/{name}"
                      if source_folders else name)
        ids.update(video=name, edit_folder=folder)
        yield PublishedPair(source, f"{folder.strip('/')}/{name}", _text(instruction), category=folder.strip("/"), ids=ids,
                            input_caption=_text(source_caption), output_caption=_text(edit_caption), trim_source=True)


# ---------------------------------------------------------------- Kiwi-Edit
KIWI_COLUMNS = ("prompt", "src_video", "tgt_video")


def _kiwi(root: Path) -> Iterator[PublishedPair]:
    """Metadata CSVs ``prompt, src_video, tgt_video[, ref_image]`` (image rows name images in the same
    columns) and ``refvie_*/chunk_*.parquet`` (``iid, prompt, src_video, tgt_video,
    ref_image_bytes``); the media are the user's own downloads of the sets they come from, under
    the root."""
    for path in sorted(root.rglob("*.csv")):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            header = next(csv.reader(f), [])
        if not all(c in header for c in KIWI_COLUMNS):
            continue
        for index, row in enumerate(_csv_rows(path)):
            ids = {"metadata": str(path.relative_to(root)), "index": index, "src_video": row.get("src_video"),
                   "tgt_video": row.get("tgt_video"), **({"ref_image": row["ref_image"]} if row.get("ref_image") else {})}
            yield PublishedPair(_rel(row.get("src_video")), _rel(row.get("tgt_video")), _text(row.get("prompt")),
                                category=path.stem, ids=ids)
    for path in sorted(root.rglob("chunk_*.parquet")):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            yield PublishedPair(None, None, None, ids={"metadata": path.name}, error=f"{path.name}: {str(err).splitlines()[0]}")
            continue
        columns = [c for c in ("iid", *KIWI_COLUMNS, "ref_image_bytes") if c in table.schema_arrow.names]
        index = 0
        for group in range(table.num_row_groups):
            for row in table.read_row_group(group, columns=columns).to_pylist():
                ids = {"metadata": str(path.relative_to(root)), "index": index, "iid": row.get("iid"),
                       "src_video": row.get("src_video"), "tgt_video": row.get("tgt_video")}
                index += 1
                ref = row.get("ref_image_bytes")
                yield PublishedPair(_rel(row.get("src_video")), _rel(row.get("tgt_video")), _text(row.get("prompt")),
                                    category=path.parent.name, ids=ids,
                                    ref_image=bytes(ref) if isinstance(ref, (bytes, bytearray)) and ref else None)


# ---------------------------------------------------------------- the InsV2V authors' own layout
SCORE_NAMES = {"sim_0": "sim_src_text", "sim_1": "sim_tgt_text", "sim_dir": "sim_direction", "sim_image": "sim_frames"}


def _insv2v(root: Path) -> Iterator[PublishedPair]:
    """``<7-digit index>/prompt.json`` (``input``, ``output``, ``edit``), ``metadata.jsonl`` (one
    line per seed: ``seed``, ``guidance_scale``, P2P settings and CLIP scores ``sim_0``, ``sim_1``,
    ``sim_dir``, ``sim_image``) and frames ``image/<seed>_<0|1>_<i:04d>.jpg``: one pair per seed."""
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d{7}", p.name)):
        ids = {"index": folder.name}
        try:
            prompt = json.loads((folder / "prompt.json").read_text())
            seeds = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as err:
            yield PublishedPair(None, None, None, ids=ids, error=f"{folder.name}: {type(err).__name__}: {err}")
            continue
        frames = sorted(p.name for p in (folder / "image").glob("*.jpg")) if (folder / "image").is_dir() else []
        for record in seeds:
            seed = record.get("seed")
            side = [[f"{folder.name}/image/{n}" for n in frames if n.startswith(f"{seed}_{i}_")] for i in (0, 1)]
            scores = {new: float(record[old]) for old, new in SCORE_NAMES.items() if isinstance(record.get(old), (int, float))}
            yield PublishedPair(None, None, _text(prompt.get("edit")), ids={**ids, "seed": seed, "settings": {
                k: record[k] for k in ("guidance_scale", "sa_end_time", "ca_end_time", "edit_weight") if k in record}},
                input_caption=_text(prompt.get("input")), output_caption=_text(prompt.get("output")),
                frames=(side[0], side[1]), scores=scores or None)


# ---------------------------------------------------------------- a generic list of pairs
PAIRS_FIELDS = ("source", "edited", "instruction")


def _pairs(path: Path) -> Iterator[PublishedPair]:
    """A CSV (with a header) or JSONL of ``source, edited, instruction`` and optionally ``category,
    input_caption, output_caption``; paths relative to the file's folder."""
    if path.suffix.lower() == ".csv":
        records: Iterator[Any] = _csv_rows(path)
    else:
        def lines():
            with open(path, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError:
                            yield {"_error": f"line {number} is not JSON"}
        records = lines()
    for index, record in enumerate(records):
        ids = {"metadata": path.name, "index": index}
        if not isinstance(record, dict) or "_error" in record:
            yield PublishedPair(None, None, None, ids=ids, error=(record or {}).get("_error", f"record {index} is not an object"))
            continue
        yield PublishedPair(_rel(record.get("source")), _rel(record.get("edited")), _text(record.get("instruction")),
                            category=_text(record.get("category")), ids={**ids, "source": record.get("source"),
                                                                          "edited": record.get("edited")},
                            input_caption=_text(record.get("input_caption")), output_caption=_text(record.get("output_caption")))


PAIR_SETS: dict[str, PairSet] = {
    "ditto": PairSet("Ditto-1M", "CC-BY-NC-SA-4.0", True, _ditto, lambda root: root / "videos"),
    "senorita": PairSet("Señorita-2M", "CC-BY-NC-2.0", True, _senorita),
    "openve": PairSet("OpenVE-3M", "CC-BY-NC-4.0", True, _openve, lambda root: root / "videos"),
    "insvie": PairSet("InsViE-1M", "CC-BY-4.0", False, _insvie),
    "kiwi": PairSet("Kiwi-Edit", "the licences of the sets its videos come from (Ditto-1M, OpenVE-3M, ReCo: non-commercial)",
                    True, _kiwi),
    "insv2v": PairSet("InsV2V", "as released by the InsV2V authors (no licence stated with the data)", False, _insv2v),
    "pairs": PairSet("pairs", "the user's own", False, _pairs, lambda path: path.parent),
}


def detect_format(path: Path) -> str:
    """Which set's layout ``path`` holds, from what lies in it; ``ValueError`` when none fits."""
    if path.is_file():
        if path.suffix.lower() in (".csv", ".jsonl"):
            return "pairs"
        raise ValueError(f"{path}: a file imports as --format pairs (.csv or .jsonl); a set is imported from its folder")
    if (path / "training_metadata").is_dir():
        return "ditto"
    if (path / INSVIE_CSV).is_file():
        return "insvie"
    if any(re.fullmatch(r"\d{7}", p.name) and (p / "prompt.json").is_file() for p in path.iterdir() if p.is_dir()):
        return "insv2v"
    headers = []
    for csv_path in sorted(path.glob("*.csv")):
        with open(csv_path, newline="", encoding="utf-8", errors="replace") as f:
            headers.append(next(csv.reader(f), []))
    if any(all(c in h for c in OPENVE_COLUMNS) for h in headers):
        return "openve"
    if any(all(c in h for c in KIWI_COLUMNS) for h in headers) or any(path.rglob("chunk_*.parquet")):
        return "kiwi"
    for json_path in sorted(path.glob("*.json")):
        records = _json_list(json_path)
        if records and isinstance(records[0], dict) and "source_video_path" in records[0]:
            return "senorita"
    raise ValueError(f"{path}: no known pair-set layout (ditto, senorita, openve, insvie, kiwi, insv2v); "
                     "name one with --format, or list pairs in a CSV/JSONL (--format pairs)")
