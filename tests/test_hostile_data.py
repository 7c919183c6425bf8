"""Poisoned or damaged shard members are skipped and counted, never decoded whole; shared files are
written whole by one writer at a time."""

from __future__ import annotations

import io
import json
import multiprocessing
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_fixtures import moving_pair, write_shards

from infer import encode_video
from shards.pairs import PairDecoder
from shards.schema import read_npy
from infer.video import atomic_write
from synth.cache import cache
from train import ShardDataModule
from guards import HANG_GUARD


def bomb_png() -> bytes:
    """A 14000x13000 image in a few KB: over twice Pillow's pixel limit."""
    buffer = io.BytesIO()
    Image.new("1", (14000, 13000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def lying_npy() -> bytes:
    """A 128-byte .npy header claiming a uint8 (2**20, 2**20, 1, 3) array (3 TiB), and no data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (1 << 20, 1 << 20, 1, 3)})
    return header.getvalue()


def poisoned_shard(path: Path) -> None:
    """Three good clip pairs and, between them, an image bomb and a lying .npy."""
    meta = {"instruction": "make the square red", "num_frames": 8, "height": 32, "width": 32, "fps": 8}
    members = []
    for i in range(3):
        src, tgt = moving_pair(i)
        members += [(f"good{i}.src.mp4", encode_video(src, 8)), (f"good{i}.tgt.mp4", encode_video(tgt, 8)),
                    (f"good{i}.json", json.dumps(meta).encode())]
        if i == 0:
            members += [("bomb.src.png", bomb_png()), ("bomb.tgt.png", bomb_png()),
                        ("bomb.json", json.dumps({**meta, "num_frames": 1}).encode())]
        if i == 1:
            members += [("liar.src.npy", lying_npy()), ("liar.tgt.npy", lying_npy()), ("liar.json", json.dumps(meta).encode())]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_lying_npy_headers_and_image_bombs_are_refused_before_allocation():
    data = lying_npy()
    assert len(data) < 200
    with pytest.raises(ValueError, match="claims 3,298,534,883,328 bytes"):
        read_npy(data)
    honest = io.BytesIO()
    np.save(honest, np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    assert read_npy(honest.getvalue()).tolist() == np.arange(12).reshape(2, 2, 3).tolist()
    with pytest.raises(ValueError, match="but 6 follow"):
        read_npy(honest.getvalue()[:-6])
    decoder = PairDecoder(4, 1, 16, None)
    assert decoder({"__key__": "bomb", "json": b'{"instruction": "x"}', "src.png": bomb_png(), "tgt.png": bomb_png()},
                   np.random.default_rng(0)) is None
    assert decoder.skipped == 1


def test_poisoned_shard_is_skipped_in_training_and_caching(tmp_path, caplog):
    poisoned_shard(tmp_path / "pairs-000-000000.tar")
    dm = ShardDataModule(shards=str(tmp_path), num_frames=4, resolution=16, batch_size=1, batches_per_epoch=6,
                         shuffle_buffer=1, augment=False)
    dm.setup("fit")
    keys = [b["key"][0] for b in dm.train_dataloader()]
    assert len(keys) == 6 and set(keys) <= {"good0", "good1", "good2"}
    assert dm.skipped >= 2 and "skipping corrupt sample bomb" in caplog.text and "skipping corrupt sample liar" in caplog.text
    result = cache(str(tmp_path), "tiny", tmp_path / "cached", num_frames=4, resolution=16, progress=False)
    assert (result.cached, result.skipped) == (3, 2)


def test_shard_videos_are_decoded_only_as_far_as_the_frames_drawn(monkeypatch):
    import shards.schema as schema

    src, tgt = moving_pair(0, frames=40)
    sample = {"__key__": "long", "json": json.dumps({"instruction": "x", "num_frames": 40}).encode(),
              "src.mp4": encode_video(src, 8), "tgt.mp4": encode_video(tgt, 8)}
    decoded = []
    real = schema.decode_video
    monkeypatch.setattr(schema, "decode_video", lambda data, max_frames=None: decoded.append(len(real(data, max_frames))) or real(data, max_frames))
    rng = np.random.default_rng(1)
    item = PairDecoder(4, 2, 16, None)(sample, rng)
    assert item["source"].shape == (3, 4, 16, 16)
    assert decoded and max(decoded) < 40  # never the whole clip
    # the frames are those a whole decode gives at the same draw
    whole = PairDecoder(4, 2, 16, None)({**sample, "json": b'{"instruction": "x"}'}, np.random.default_rng(1))
    assert (item["source"] - whole["source"]).abs().max() == 0


def _hammer(path: str, text: str, count: int) -> None:
    for _ in range(count):
        atomic_write(Path(path), text.encode())


def test_concurrent_atomic_writes_never_fail_or_tear(tmp_path):
    target = tmp_path / "shared.json"
    bodies = [json.dumps({"writer": i, "pad": "x" * 20000}) for i in range(2)]
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_hammer, args=(str(target), body, 150)) for body in bodies]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers):
        if target.exists():
            assert target.read_text() in bodies  # whole, never torn
            reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert reads > 0 and not list(tmp_path.glob(".*.tmp"))


def test_synth_cache_with_two_ranks_under_a_concurrent_reader(tmp_path):
    write_shards(tmp_path / "raw", 6, per_shard=2, frames=4, size=16)
    out = tmp_path / "cached"
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            path = out / "cache.json"
            if path.exists():
                seen.append(json.loads(path.read_text())["num_frames"])  # a torn file would not parse

    reader = threading.Thread(target=read)
    reader.start()
    procs = [subprocess.Popen([sys.executable, "-m", "synth", "cache", str(tmp_path / "raw"), "--out", str(out),
                               "--num-frames", "4", "--resolution", "16", "--shard-index", str(r), "--num-shards", "2",
                               "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    results = [p.communicate(timeout=HANG_GUARD) for p in procs]
    stop.set()
    reader.join()
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in results]
    assert seen and set(seen) == {4}
    assert len(list(out.glob("cache-*.tar"))) >= 2 and not list(out.glob(".*.tmp"))


# ---------------------------------------------------------------- the smaller ones
def test_a_file_whose_name_holds_a_percent_sign_is_that_file(tmp_path):
    from test_video_io import pattern, write_input

    video = write_input(tmp_path / "speed 50%.mp4", [pattern(i, 16, 16) for i in range(4)], rate=8)
    proc = subprocess.run([sys.executable, "-m", "infer", "edit", str(video), "--prompt", "make it red", "--steps", "1",
                           "--resolution", "16", "--quiet"], capture_output=True, text=True, timeout=HANG_GUARD, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "speed 50%.edited.mp4").is_file()


def test_the_key_variable_is_a_key_and_must_be_set(monkeypatch):
    from infer.llm import api_key, chat_client

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    with pytest.raises(ValueError, match="'AWS_SECRET_ACCESS_KEY' is not a key variable"):
        chat_client("http://127.0.0.1:9/v1", "AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("MY_LAB_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$MY_LAB_API_KEY is not set"):
        api_key("MY_LAB_API_KEY")
    monkeypatch.setenv("MY_LAB_API_KEY", "k")
    assert api_key("MY_LAB_API_KEY") == "k"


def test_lift_jsonl_paths_stay_in_their_folder(tmp_path):
    from PIL import Image as PILImage

    from shards.camera import CameraBounds  # noqa: F401  (the lift's own module loads)
    from synth.image_pairs import UnreadableRow, decode_row, pair_rows

    (tmp_path / "data").mkdir()
    image = np.zeros((16, 16, 3), np.uint8)
    PILImage.fromarray(image).save(tmp_path / "data/a.png")
    PILImage.fromarray(image).save(tmp_path / "outside.png")
    lines = [{"input": "a.png", "edited": "a.png", "instruction": "x"},
             {"input": "../outside.png", "edited": "a.png", "instruction": "x"},
             {"input": "/dev/zero", "edited": "a.png", "instruction": "x"}]
    jsonl = tmp_path / "data/pairs.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = list(pair_rows(jsonl))
    assert decode_row(rows[0]).source.shape == (16, 16, 3)
    for row in rows[1:]:
        with pytest.raises(UnreadableRow, match="outside the JSONL's folder"):
            decode_row(row)
    allowed = list(pair_rows(jsonl, allow_absolute=True))
    assert decode_row(allowed[1]).source.shape == (16, 16, 3)
    with pytest.raises(UnreadableRow, match="not a regular file"):
        decode_row(allowed[2])


def test_a_corrupt_parquet_row_group_is_one_unreadable_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synth.image_pairs import pair_rows

    good = {"input_image": [{"bytes": b"x" * 64, "path": None}] * 4, "edited_image": [{"bytes": b"y" * 64, "path": None}] * 4,
            "edit_prompt": ["a", "b", "c", "d"]}
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table(good), path, row_group_size=2, compression="none")
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(0).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data[start:start + 24] = b"\xff" * 24  # the first group's first page header is garbage
    path.write_bytes(bytes(data))
    rows = list(pair_rows(path))
    assert "_error" in rows[0] and "row group 0 is unreadable" in rows[0]["_error"]
    assert [r["edit_prompt"] for r in rows[1:]] == ["c", "d"]


def test_shards_without_a_manifest_are_never_deleted(tmp_path):
    from synth.writer import ShardWriter

    orphan = tmp_path / "pairs-000-000000.tar"
    orphan.write_bytes(b"a finished shard whose manifest was lost")
    with pytest.raises(ValueError, match="no manifest names them"):
        ShardWriter(tmp_path, 0, "pairs", "hash", resume=True)
    assert orphan.read_bytes().startswith(b"a finished shard")


def test_an_export_over_an_editor_is_staged_and_replaces_it_whole(tmp_path, monkeypatch):
    from model import Editor, load_editor

    editor = load_editor("tiny")
    folder = tmp_path / "editor"
    editor.save_pretrained(folder)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    (folder / "unet" / "stale.txt").write_text("from an older export")

    def broken(self, directory):
        (directory / "model_index.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Editor, "_write_folder", broken)
    with pytest.raises(OSError, match="No space left"):
        editor.save_pretrained(folder)
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "stale.txt"} == before
    assert [p.name for p in tmp_path.iterdir()] == ["editor"]  # no staging folder left behind
    monkeypatch.undo()
    editor.save_pretrained(folder)
    assert not (folder / "unet" / "stale.txt").exists()  # replaced whole, not mixed
    Editor.from_pretrained(folder)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an editor folder"):
        editor.save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
