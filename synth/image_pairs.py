"""Image-edit pair datasets: InstructPix2Pix-style Parquet, `datasets` folders and JSONL, read row by row."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_COLUMNS = ("input_image", "edited_image")
REQUIRED = (*IMAGE_COLUMNS, "edit_prompt")
OPTIONAL = ("original_prompt", "edited_prompt")
SCORES = "_scores"  # a row's shipped quality scores, by their published names (``--min-score``)


@dataclass(frozen=True)
class ImageLayout:
    """A published image-edit set's columns: which hold the images, the instruction (a list of
    them for OmniEdit) and the captions, and which are its shipped scores."""

    name: str
    columns: dict[str, str]  # published name -> InstructPix2Pix name
    score_columns: tuple[str, ...] = ()
    score_prefixes: tuple[str, ...] = ()


IMAGE_LAYOUTS = (
    ImageLayout("instructpix2pix", {c: c for c in (*REQUIRED, *OPTIONAL)}),
    ImageLayout("ultraedit", {"source_image": "input_image", "edited_image": "edited_image", "edit_prompt": "edit_prompt",
                              "source_caption": "original_prompt", "target_caption": "edited_prompt"},
                ("dinov2_sim", "ssim"), ("clip_sim",)),
    ImageLayout("omniedit", {"src_img": "input_image", "edited_img": "edited_image", "edited_prompt_list": "edit_prompt"},
                ("o_score", "sc_score_1", "sc_score_2", "pq_score")),
)


def image_layout(names: list[str], where: Path) -> tuple[ImageLayout, list[str], list[str]]:
    """The layout whose image and instruction columns ``names`` hold, the columns to read and the
    score columns present."""
    for layout in IMAGE_LAYOUTS:
        needed = [k for k, v in layout.columns.items() if v in REQUIRED]
        if all(c in names for c in needed):
            scores = [c for c in names if c in layout.score_columns or c.startswith(layout.score_prefixes or ("\0",))]
            return layout, [c for c in layout.columns if c in names] + scores, scores
    raise ValueError(f"{where} lacks the column(s) {', '.join(c for c in REQUIRED if c not in names)} (InstructPix2Pix "
                     f"layout: {', '.join(REQUIRED)}, optional {', '.join(OPTIONAL)}; UltraEdit: source_image, "
                     f"edited_image, edit_prompt; OmniEdit: src_img, edited_img, edited_prompt_list)")


def canonical_row(row: dict[str, Any], layout: ImageLayout, scores: list[str], index: int) -> dict[str, Any]:
    """A row under InstructPix2Pix's names with its scores under :data:`SCORES`; a list of
    instructions (OmniEdit) gives one, drawn by the row's index."""
    out = {new: row.get(old) for old, new in layout.columns.items() if old in row}
    prompts = out.get("edit_prompt")
    if isinstance(prompts, (list, tuple)):
        usable = [p for p in prompts if isinstance(p, str) and p.strip()]
        out["edit_prompt"] = usable[int(np.random.default_rng(index).integers(len(usable)))] if usable else None
    out[SCORES] = {c: float(row[c]) for c in scores if isinstance(row.get(c), (int, float))}
    return out


class UnreadableRow(ValueError):
    """A row whose images or instruction cannot be used (counted and skipped)."""


@dataclass
class ImagePair:
    """One decoded row: the two images (uint8 RGB, one size) and the texts."""

    source: np.ndarray
    edited: np.ndarray
    instruction: str
    input_caption: str | None
    output_caption: str | None


def _parquet_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Parquet files in {path}")
    return files


def _parquet_rows(files: list[Path]) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for path in files:  # every file's columns are checked before any row is read
        try:
            table = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{path} is not a readable Parquet file ({str(err).splitlines()[0]})") from None
        tables.append((table, image_layout(table.schema_arrow.names, path)))

    def rows():
        index = 0
        for (table, (layout, columns, scores)), path in zip(tables, files):
            for group in range(table.num_row_groups):
                try:
                    data = table.read_row_group(group, columns=columns)
                except (pa.ArrowException, OSError) as err:  # one damaged group: one unreadable row, counted
                    index += 1
                    yield {"_error": f"{path.name} row group {group} is unreadable ({str(err).splitlines()[0][:120]})"}
                    continue
                for batch in data.to_batches(max_chunksize=16):
                    for row in batch.to_pylist():
                        yield canonical_row(row, layout, scores, index)
                        index += 1

    return rows()


def _datasets_rows(path: Path) -> Iterator[dict[str, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{path} holds splits {', '.join(loaded)}; point --images at one of them")
        loaded = loaded["train"]
    layout, columns, scores = image_layout(loaded.column_names, path)
    # the arrow view leaves image columns as {"bytes", "path"} structs instead of decoding them
    batches = loaded.select_columns(columns).with_format("arrow").iter(batch_size=16)
    rows = (row for table in batches for row in table.to_pylist())
    return (canonical_row(row, layout, scores, index) for index, row in enumerate(rows))


def _resolver(folder: Path, allow_absolute: bool, kind: str):
    folder = folder.resolve()

    def resolve(image: Any, where: str) -> Any:
        if not isinstance(image, str):
            return image
        path = (folder / image).resolve()
        if not allow_absolute and not path.is_relative_to(folder):
            return {"_outside": f"{where}: {image} is outside the {kind}'s folder (--allow-absolute allows it)"}
        return {"path": str(path)}

    return resolve


PICO_SOURCE = "open_image_input_url"


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except ValueError:
                yield number, None


def _jsonl_rows(path: Path, allow_absolute: bool = False, open_images: Path | None = None) -> Iterator[dict[str, Any]]:
    """JSON lines: this project's ``{input, edited, instruction}``, or Pico-Banana-400K's
    ``{open_image_input_url, text, output_image, edit_type}`` (its sources are Open Images files:
    ``open_images`` is the folder holding them by file name)."""
    resolve = _resolver(path.parent, allow_absolute, "JSONL")
    for number, record in _jsonl_records(path):
        if not isinstance(record, dict):
            yield {"_error": f"line {number} is not a JSON object"}
            continue
        where = f"line {number}"
        if PICO_SOURCE in record:
            name = str(record.get(PICO_SOURCE) or "").rsplit("/", 1)[-1]
            source = {"path": str(open_images / name)} if name and open_images is not None else None
            yield {"input_image": source, "edited_image": resolve(record.get("output_image"), where),
                   "edit_prompt": record.get("text"), "category": record.get("edit_type"), SCORES: {}}
            continue
        yield {"input_image": resolve(record.get("input"), where), "edited_image": resolve(record.get("edited"), where),
               "edit_prompt": record.get("instruction"), "original_prompt": record.get("input_caption"),
               "edited_prompt": record.get("output_caption"), SCORES: {}}


def conversation_instruction(conversations: Any) -> str | None:
    """The instruction of a LLaVA-style conversation: the first human turn, image tokens removed."""
    for turn in conversations if isinstance(conversations, list) else []:
        if isinstance(turn, dict) and turn.get("from") == "human" and isinstance(turn.get("value"), str):
            return re.sub(r"<image>", " ", turn["value"]).strip() or None
    return None


def _llava_rows(path: Path, allow_absolute: bool = False) -> Iterator[dict[str, Any]]:
    """GPT-Image-Edit-1.5M's JSON: a list of ``{"image": [source, edited], "conversations":
    [{"from": "human", "value": "<image>..."}, ...]}``, image paths relative to the file."""
    try:
        records = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({type(err).__name__})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {{image, conversations}} records")
    resolve = _resolver(path.parent, allow_absolute, "JSON")
    for index, record in enumerate(records):
        images = record.get("image") if isinstance(record, dict) else None
        if not isinstance(images, list) or len(images) != 2:
            yield {"_error": f"record {index} has no [source, edited] image pair"}
            continue
        where = f"record {index}"
        yield {"input_image": resolve(images[0], where), "edited_image": resolve(images[1], where),
               "edit_prompt": conversation_instruction(record.get("conversations")), SCORES: {}}


def pair_rows(path: str | Path, allow_absolute: bool = False, open_images: str | Path | None = None
              ) -> Iterator[dict[str, Any]]:
    """The raw rows of an image-pair dataset, in a fixed order: a Parquet file or folder of them
    (InstructPix2Pix's, UltraEdit's or OmniEdit's columns), a ``datasets.save_to_disk`` folder, a
    JSONL of ``{"input", "edited", "instruction"}`` or Pico-Banana-400K's records, or
    GPT-Image-Edit-1.5M's JSON list (image paths relative to the file). Images stay encoded until
    :func:`decode_row`; a row's shipped scores are under :data:`SCORES`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no image pairs at {path}")
    if path.is_file() and path.suffix.lower() == ".json" and path.read_bytes()[:64].lstrip()[:1] == b"[":
        return _llava_rows(path, allow_absolute)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        first = next((r for _, r in _jsonl_records(path)), None)
        if isinstance(first, dict) and PICO_SOURCE in first and open_images is None:
            raise ValueError(f"{path} is Pico-Banana-400K's layout, whose sources are Open Images files: "
                             "pass --open-images DIR (the folder holding them)")
        return _jsonl_rows(path, allow_absolute, Path(open_images) if open_images else None)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _datasets_rows(path)
    if path.is_file() and path.suffix.lower() != ".parquet":
        raise ValueError(f"{path}: --images takes a .parquet file, a folder of them, a datasets folder or a .jsonl")
    return _parquet_rows(_parquet_files(path))


def source_name(path: str | Path) -> str:
    """The dataset's name in ``source: "lift:<name>"``: the file's stem or the folder's name."""
    path = Path(path)
    return path.stem if path.is_file() else path.name


MAX_IMAGE_FILE_BYTES = 256 << 20  # one encoded image of a pair


def _image(cell: Any, column: str) -> np.ndarray:
    if isinstance(cell, dict):
        if "_outside" in cell:
            raise UnreadableRow(cell["_outside"])
        data, where = cell.get("bytes"), cell.get("path")
        if data is None and where:
            try:
                if Path(where).exists() and not Path(where).is_file():  # a device (/dev/zero), a folder
                    raise UnreadableRow(f"{column}: not a regular file: {Path(where).name}")
                if Path(where).stat().st_size > MAX_IMAGE_FILE_BYTES:
                    raise UnreadableRow(f"{column}: {Path(where).name} is over {MAX_IMAGE_FILE_BYTES:,} bytes")
                data = Path(where).read_bytes()
            except OSError as err:
                raise UnreadableRow(f"{column}: {err.strerror}: {where}") from None
        cell = data
    if not isinstance(cell, (bytes, bytearray)) or not cell:
        raise UnreadableRow(f"{column} holds no image bytes")
    try:
        with Image.open(io.BytesIO(cell)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableRow(f"{column} is not a readable image ({type(err).__name__})") from None


def _text(value: Any) -> str | None:
    return " ".join(value.split()) if isinstance(value, str) and value.strip() else None


def decode_row(row: dict[str, Any]) -> ImagePair:
    """The row's images and texts; ``UnreadableRow`` says why a row cannot be used. The edited image
    is resized (area filter) to the source's size when the two differ."""
    if "_error" in row:
        raise UnreadableRow(row["_error"])
    instruction = _text(row.get("edit_prompt"))
    if instruction is None:
        raise UnreadableRow("edit_prompt is empty")
    source, edited = (_image(row.get(c), c) for c in IMAGE_COLUMNS)
    if edited.shape != source.shape:
        import cv2

        edited = cv2.resize(edited, (source.shape[1], source.shape[0]), interpolation=cv2.INTER_AREA)
    return ImagePair(source, edited, instruction, _text(row.get("original_prompt")), _text(row.get("edited_prompt")))
