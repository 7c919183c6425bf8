"""`synth import`: each published pair set's layout with its quirks, bad rows counted, resume, ranks,
benchmark clips kept out, and training on the result."""

from __future__ import annotations

import collections
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from pair_set_fixtures import LAYOUTS, clip, edited, video

from guards import HANG_GUARD
from infer import read_video, write_video
from shards.schema import expand_shards
from synth.cli import main
from synth.writer import read_attempts, read_manifest

ROOT = Path(__file__).resolve().parents[1]


def samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a shard folder, by key: member suffix -> bytes."""
    out: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    for url in expand_shards(str(folder)):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                out[key][suffix] = tar.extractfile(member).read()
    return dict(out)


def layout(tmp_path: Path, name: str) -> tuple[Path, dict]:
    root = tmp_path / name
    root.mkdir()
    expected = LAYOUTS[name](root)
    return (root / "pairs.jsonl" if name == "pairs" else root), expected


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_imports_as_published_with_bad_rows_counted(tmp_path, capsys, name):
    source, expected = layout(tmp_path, name)
    assert main(["import", str(source), "--out", str(tmp_path / "out"), "--samples-per-shard", "2"]) == 0
    err = capsys.readouterr().err
    attempts = read_attempts(tmp_path / "out")
    rejected = collections.Counter(a["reason"] for a in attempts if not a["kept"])
    assert sum(a["kept"] for a in attempts) == expected["kept"] and rejected == expected["rejected"], attempts
    got = samples(tmp_path / "out")
    assert len(got) == expected["kept"] == read_manifest(tmp_path / "out")["total_samples"]
    metas = {key: json.loads(s["json"]) for key, s in got.items()}
    for meta in metas.values():
        assert meta["source"] == f"import:{name}" and meta["dataset"]["format"] == name and meta["dataset"]["licence"]
        assert meta["instruction"] and meta["dataset"]["ids"]
    media = {"ditto": source / "videos", "openve": source / "videos"}.get(name, source.parent if name == "pairs" else source)
    copied = [m for m in metas.values() if m["generator"]["copied"] and m["num_frames"] > 1]
    for key, meta in metas.items():  # a copied pair's members are the published files, byte for byte
        if meta in copied:
            paths = meta["dataset"]["paths"]
            assert got[key]["src.mp4"] == (media / paths["source"]).read_bytes()
            assert got[key]["tgt.mp4"] == (media / paths["edited"]).read_bytes()
    by_path = {(m["dataset"]["paths"]["source"], m["dataset"]["paths"]["edited"]): m for m in metas.values()}
    if name == "ditto":
        assert {m["dataset"]["category"] for m in metas.values()} == {"local", "global_style1"}
        assert by_path[("source/h0.mp4", "local/h0_1.mp4")]["input_caption"] == "a field at noon"
        assert by_path[("local/h2_1.mp4", "source/h2.mp4")]["dataset"]["direction"].startswith("sim2real")
        assert {(m["width"], m["height"]) for m in metas.values()} == {(64, 36), (36, 64)}  # landscape and portrait
        archive_lines = [line for line in err.splitlines() if "is not extracted" in line]
        assert len(archive_lines) == 1 and "global_freeform1.tar.gz.00" in archive_lines[0]
        assert "cat '" in archive_lines[0] and "| tar -xz" in archive_lines[0]
    if name == "senorita":
        assert all(m["dataset"]["paths"]["source"].startswith(("obj_swap_upload/", "obj_removal_videos_upload/"))
                   for m in metas.values())
        assert sum(m["dataset"]["ids"].get("renamed_from") == "obj_swap_videos" for m in metas.values()) == 2
        added = [m for m in metas.values() if m["dataset"]["category"] == "obj_addition"]
        assert len(added) == 1 and added[0]["dataset"]["direction"].startswith("reversed")
        assert added[0]["dataset"]["paths"]["edited"].endswith("_org.mp4")
    if name == "openve":
        turned = by_path[("original/o1.mp4", "edited/o1_bg.mp4")]
        assert turned["dataset"]["direction"].startswith("swapped back") and turned["dataset"]["category"] == "background_change"
    if name == "insvie":
        meta = by_path[("source_videos/clip0.mp4", "style_edit/clip0.mp4")]
        assert meta["num_frames"] == 9 and meta["output_caption"] == "a painted river"  # the edit's 4k + 1 frames
        key = next(k for k, m in metas.items() if m is meta)
        assert len(read_video(_file(tmp_path, got[key]["src.mp4"]))) == 13  # the source as published
    if name == "kiwi":
        suffixes = [set(s) for s in got.values()]
        assert {"src.png", "tgt.png", "json"} in suffixes and any("ref.jpg" in s for s in suffixes)
    if name == "insv2v":
        assert all(m["clip"]["sim_direction"] == 0.25 and not m["generator"]["copied"] for m in metas.values())
        assert {m["dataset"]["ids"]["seed"] for m in metas.values()} == {11, 12}
        assert all(m["num_frames"] == 4 and m["dataset"]["ids"]["settings"]["sa_end_time"] == 0.4 for m in metas.values())


def _file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"member-{len(data)}.mp4"
    path.write_bytes(data)
    return path


def test_report_counts_per_set_and_category_and_categories_can_be_left_out(tmp_path, capsys):
    source, _ = layout(tmp_path, "ditto")
    assert main(["import", str(source), "--out", str(tmp_path / "out"), "--exclude-categories", "global_style1",
                 "--quiet"]) == 0
    rejected = collections.Counter(a["reason"] for a in read_attempts(tmp_path / "out") if not a["kept"])
    assert rejected["excluded category"] == 3
    assert main(["report", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "per set           Ditto-1M: 3/11 kept" in text
    assert "local: 3/5 kept" in text and "global_style1: 0/3 kept" in text
    assert "excluded category: 3" in text and "archive not extracted: 3" in text


def test_an_interrupted_import_resumes_to_the_same_shards_and_ranks_split_it(tmp_path, monkeypatch):
    source, expected = layout(tmp_path, "ditto")
    args = ["import", str(source), "--samples-per-shard", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--num-samples", "3"]) == 0
    assert len(samples(tmp_path / "split")) == 3
    assert main([*args, "--out", str(tmp_path / "split")]) == 2  # a second run needs --resume
    assert main([*args, "--out", str(tmp_path / "split"), "--resume"]) == 0
    whole, split = samples(tmp_path / "whole"), samples(tmp_path / "split")
    assert split == whole and len(whole) == expected["kept"]
    assert [a["row"] for a in read_attempts(tmp_path / "split")] == [a["row"] for a in read_attempts(tmp_path / "whole")]
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main([*args, "--out", str(tmp_path / "ranks")]) == 0
    rows = [a["row"] for a in read_attempts(tmp_path / "ranks")]
    assert sorted(rows) == sorted(a["row"] for a in read_attempts(tmp_path / "whole")) and len(set(rows)) == len(rows)
    by_row = {json.loads(s["json"])["dataset"]["ids"]["index"]: s["src.mp4"] for s in samples(tmp_path / "ranks").values()}
    assert len(samples(tmp_path / "ranks")) == expected["kept"] and by_row


def test_a_benchmark_clip_is_kept_out_even_re_encoded_resized_and_trimmed(tmp_path, capsys):
    bench = tmp_path / "EditVerseBench"
    frames = clip(7, frames=24, height=72, width=128)
    video(bench / "videos/v0.mp4", frames, fps=8)
    video(bench / "videos/v1.mp4", clip(8, frames=24, height=72, width=128), fps=8)
    (bench / "test.json").write_text(json.dumps({
        str(i): {"<text>": "<video1> make it red", "<video1>": f"videos/v{i}.mp4", "type": "style"} for i in range(2)}))
    pairs = tmp_path / "set"
    leaked = np.stack([cv2.resize(f, (96, 54), interpolation=cv2.INTER_AREA) for f in frames[5:20]])  # trimmed, resized
    pairs.mkdir()
    write_video(pairs / "leaked.mp4", leaked, fps=12)  # another rate too
    write_video(pairs / "leaked_edit.mp4", edited(leaked), fps=12)
    for i in range(3):
        own = clip(100 + i, frames=15)
        write_video(pairs / f"own{i}.mp4", own, fps=12)
        write_video(pairs / f"own{i}_edit.mp4", edited(own), fps=12)
    lines = [{"source": "leaked.mp4", "edited": "leaked_edit.mp4", "instruction": "make it red"}]
    lines += [{"source": f"own{i}.mp4", "edited": f"own{i}_edit.mp4", "instruction": "make it red"} for i in range(3)]
    (pairs / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["import", str(pairs / "pairs.jsonl"), "--out", str(tmp_path / "out"), "--exclude-benchmark",
                 str(bench / "test.json"), "--quiet"]) == 0
    attempts = read_attempts(tmp_path / "out")
    assert [(a["source_path"], a["reason"]) for a in attempts if not a["kept"]] == [("leaked.mp4", "benchmark video")]
    assert [a["detail"] for a in attempts if not a["kept"]] == ["v0.mp4"]
    assert sum(a["kept"] for a in attempts) == 3
    assert main(["report", str(tmp_path / "out")]) == 0
    assert "benchmark video: 1" in capsys.readouterr().out


def test_re_encoding_takes_the_clips_down_once(tmp_path):
    source, _ = layout(tmp_path, "openve")
    assert main(["import", str(source), "--out", str(tmp_path / "out"), "--max-side", "32", "--max-frames", "5",
                 "--fps", "10", "--quiet"]) == 0
    for sample in samples(tmp_path / "out").values():
        meta = json.loads(sample["json"])
        src, tgt = (read_video(_file(tmp_path, sample[m])) for m in ("src.mp4", "tgt.mp4"))
        assert src.shape == tgt.shape == (5, 18, 32, 3) and meta["num_frames"] == 5 and meta["fps"] == 10.0
        assert (meta["width"], meta["height"]) == (32, 18) and not meta["generator"]["copied"]


@pytest.mark.parametrize("args,message", [
    (["{tmp}/nothing", "--out", "{tmp}/o"], "no pair set at"),
    (["{tmp}", "--out", "{tmp}/o"], "no known pair-set layout"),
    (["{tmp}/notes.txt", "--out", "{tmp}/o"], "a file imports as --format pairs"),
    (["{tmp}", "--out", "{tmp}/o", "--format", "nope"], "invalid choice"),
    (["{tmp}", "--out", "{tmp}/o", "--frame-tolerance", "2"], "--frame-tolerance must be in [0, 1)"),
    (["{tmp}", "--out", "{tmp}/o", "--exclude-benchmark", "{tmp}/none.json"], "no benchmark file"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    (tmp_path / "notes.txt").write_text("x")
    assert main(["import", *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o").exists()


def test_imported_sets_train_mixed_with_lifted_pairs(tmp_path):
    from shard_fixtures import write_shards

    for name in ("ditto", "openve"):
        source, _ = layout(tmp_path, name)
        assert main(["import", str(source), "--out", str(tmp_path / f"{name}-shards"), "--quiet"]) == 0
    write_shards(tmp_path / "lifted", 4, per_shard=2)
    sources = [{"shards": str(tmp_path / "ditto-shards"), "weight": 0.5, "name": "ditto"},
               {"shards": str(tmp_path / "openve-shards"), "weight": 0.3, "name": "openve"},
               {"shards": str(tmp_path / "lifted"), "weight": 0.2, "name": "lifted"}]
    config = tmp_path / "mix.yaml"
    config.write_text(json.dumps({"data": {"sources": sources}}))
    proc = subprocess.run([sys.executable, "-m", "train", "fit", "--config", str(ROOT / "configs/tiny.yaml"),
                           "--config", str(config), "--data.shards", "", "--trainer.max_steps", "4",
                           "--trainer.enable_progress_bar", "false", "--data.num_frames", "4",
                           "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=HANG_GUARD, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping corrupt" not in proc.stderr  # every imported pair decodes into a training clip
    assert (tmp_path / "run").rglob("last.ckpt")


def test_pair_decoder_reads_every_imported_pair(tmp_path):
    from shards.pairs import PairDecoder

    decoder = PairDecoder(num_frames=5, frame_stride=1, resolution=16, augment=None)
    for name in LAYOUTS:
        source, expected = layout(tmp_path, name)
        assert main(["import", str(source), "--out", str(tmp_path / f"{name}-out"), "--quiet"]) == 0
        for key, sample in samples(tmp_path / f"{name}-out").items():
            item = decoder({"__key__": key, **sample}, np.random.default_rng(0))
            assert item is not None, (name, key)
            assert tuple(item["source"].shape) == tuple(item["target"].shape) == (3, 5, 16, 16)
    assert decoder.skipped == 0


def test_image_extension_of_reference_bytes():
    from PIL import Image

    from synth.import_sets import image_extension

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")
    assert image_extension(buffer.getvalue()) == "jpg" and image_extension(b"not an image") == "png"


def test_an_import_killed_mid_run_resumes_to_what_one_run_writes(tmp_path):
    import os
    import signal
    import time

    root = tmp_path / "set"
    lines = []
    for i in range(30):
        own = clip(200 + i, frames=9)
        video(root / f"{i}.mp4", own)
        video(root / f"{i}_edit.mp4", edited(own))
        lines.append(json.dumps({"source": f"{i}.mp4", "edited": f"{i}_edit.mp4", "instruction": f"edit {i}"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    args = [sys.executable, "-m", "synth", "import", str(root / "pairs.jsonl"), "--samples-per-shard", "2",
            "--max-side", "32", "--quiet"]  # re-encoding: slow enough to be killed mid-run
    out = tmp_path / "out"
    proc = subprocess.Popen([*args, "--out", str(out)], stderr=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
    deadline = time.time() + HANG_GUARD
    while time.time() < deadline and len(list(out.glob("*.tar"))) < 2 and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(list(out.glob("*.tar"))) < 15, "the kill should land mid-run"
    assert subprocess.run([*args, "--out", str(out), "--resume"], capture_output=True, cwd=ROOT).returncode == 0
    assert subprocess.run([*args, "--out", str(tmp_path / "again")], capture_output=True, cwd=ROOT).returncode == 0
    resumed, again = samples(out), samples(tmp_path / "again")
    assert resumed == again and len(resumed) == 30  # re-encoded clips too: the same bytes
