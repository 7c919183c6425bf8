"""Image-edit pair datasets: InstructPix2Pix-style Parquet, `datasets` folders and JSONL, read row by row."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_COLUMNS = ("input_image", "edited_image")
REQUIRED = (*IMAGE_COLUMNS, "edit_prompt")
OPTIONAL = ("original_prompt", "edited_prompt")


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


def _check_columns(names: list[str], where: Path) -> list[str]:
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise ValueError(f"{where} lacks the column(s) {', '.join(missing)} (InstructPix2Pix layout: "
                         f"{', '.join(REQUIRED)}, optional {', '.join(OPTIONAL)})")
    return [c for c in (*REQUIRED, *OPTIONAL) if c in names]


def _parquet_rows(files: list[Path]) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for path in files:  # every file's columns are checked before any row is read
        try:
            table = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{path} is not a readable Parquet file ({str(err).splitlines()[0]})") from None
        tables.append((table, _check_columns(table.schema_arrow.names, path)))

    def rows():
        for (table, columns), path in zip(tables, files):
            for group in range(table.num_row_groups):
                try:
                    data = table.read_row_group(group, columns=columns)
                except (pa.ArrowException, OSError) as err:  # one damaged group: one unreadable row, counted
                    yield {"_error": f"{path.name} row group {group} is unreadable ({str(err).splitlines()[0][:120]})"}
                    continue
                for batch in data.to_batches(max_chunksize=16):
                    yield from batch.to_pylist()

    return rows()


def _datasets_rows(path: Path) -> Iterator[dict[str, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{path} holds splits {', '.join(loaded)}; point --images at one of them")
        loaded = loaded["train"]
    columns = _check_columns(loaded.column_names, path)
    # the arrow view leaves image columns as {"bytes", "path"} structs instead of decoding them
    batches = loaded.select_columns(columns).with_format("arrow").iter(batch_size=16)
    return (row for table in batches for row in table.to_pylist())


def _jsonl_rows(path: Path, allow_absolute: bool = False) -> Iterator[dict[str, Any]]:
    folder = path.parent.resolve()

    def resolve(image: Any, number: int) -> Any:
        if not isinstance(image, str):
            return image
        where = (folder / image).resolve()
        if not allow_absolute and not where.is_relative_to(folder):
            return {"_outside": f"line {number}: {image} is outside the JSONL's folder (--allow-absolute allows it)"}
        return {"path": str(where)}

    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError
            except ValueError:
                yield {"_error": f"line {number} is not a JSON object"}
                continue
            yield {"input_image": resolve(record.get("input"), number), "edited_image": resolve(record.get("edited"), number),
                   "edit_prompt": record.get("instruction"), "original_prompt": record.get("input_caption"),
                   "edited_prompt": record.get("output_caption")}


def pair_rows(path: str | Path, allow_absolute: bool = False) -> Iterator[dict[str, Any]]:
    """The raw rows of an image-pair dataset, in a fixed order: a Parquet file or folder of them,
    a ``datasets.save_to_disk`` folder, or a JSONL of ``{"input", "edited", "instruction"}`` (image
    paths relative to the file). Images stay encoded until :func:`decode_row`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no image pairs at {path}")
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        return _jsonl_rows(path, allow_absolute)
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
