"""`infer eval --benchmark`: the five public formats read from their own layouts, edited into their output
layouts, judged as published by a real loopback server, reported in their scales; resumable and by ranks."""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from fake_openai import FakeOpenAI, completion

from infer import write_video
from infer.benchmark_judges import editverse_pairs, five_accuracies
from infer.benchmarks import detect_format, read_benchmark, select
from infer.cli import main
from infer.video import probe_video


def clip(seed: int, frames: int = 8, size: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    out = [np.stack([np.sin((x + 2 * t + seed) / 4), np.cos((y - t + seed) / 5), np.sin((x + y + 3 * t) / 6)], -1)
           for t in range(frames)]
    return ((np.stack(out) + 1) * 127.5).astype(np.uint8)


def editverse(root: Path, count: int = 3) -> Path:
    (root / "videos").mkdir(parents=True)
    items = {}
    for i in range(count):
        write_video(root / "videos" / f"v{i}.mp4", clip(i), 8)
        items[str(i)] = {"<text>": f"<video1> Make the sky {['red', 'blue', 'green'][i % 3]}", "<video1>": f"videos/v{i}.mp4",
                         "direction": "edit", "target_prompt": "a red sky", "type": ["style", "add", "style"][i % 3],
                         "source_prompt": "a sky"}
    items["9"] = {"<text>": "<video1> Put <image1> in the sky", "<video1>": "videos/v0.mp4", "type": "reference"}
    (root / "test.json").write_text(json.dumps(items))
    return root / "test.json"


def openve(root: Path) -> Path:
    (root / "OpenVE-Bench" / "videos").mkdir(parents=True)
    rows = [("global_style", "Make it a watercolor"), ("local_add", "Add a hat"), ("local_add", "Add a dog"),
            ("creative_edit", "Make it dreamy")]
    with open(root / "OpenVE-Bench" / "benchmark_videos.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["original_video", "prompt", "edited_type"])
        for i, (kind, prompt) in enumerate(rows):
            write_video(root / "OpenVE-Bench" / "videos" / f"c{i}.mp4", clip(i), 8)
            writer.writerow([f"OpenVE-Bench/videos/c{i}.mp4", prompt, kind])
    return root / "OpenVE-Bench" / "benchmark_videos.csv"


def five(root: Path) -> Path:
    (root / "edit_prompt").mkdir(parents=True)
    entries = []
    for i, name in enumerate(["0001_bus", "0002_dog"]):
        frames, masks = root / "images" / name, root / "bmasks" / name
        frames.mkdir(parents=True)
        masks.mkdir(parents=True)
        for t, frame in enumerate(clip(i)):
            cv2.imwrite(str(frames / f"{t + 1:05d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            mask = np.zeros((32, 32), np.uint8)
            mask[8:20, 8:20] = 255
            cv2.imwrite(str(masks / f"{t + 1:05d}.jpg"), mask)
        entries.append({"video_name": name, "save_dir": f"edit1_{i}", "source_prompt": "a [red] bus on a road",
                        "target_prompt": "a [blue] bus on a road", "editing_type_id": 1,
                        "source_yes_no_question": "Is the bus red?", "target_yes_no_question": "Is the bus blue?",
                        "multiple_choice_question": "What colour is the bus?\na) red\nb) blue"})
    (root / "edit_prompt" / "edit1_FiVE.json").write_text(json.dumps(entries))
    return root


def v2vbench(root: Path) -> Path:
    (root / "videos").mkdir(parents=True)
    write_video(root / "videos" / "hike.mp4", clip(0), 8)
    (root / "config.yaml").write_text(yaml.safe_dump({"data": [{"video_id": "hike", "edit": [
        {"prompt": "a superman hikes through the desert"}, {"prompt": "a man hikes, pixel art"}]}]}))
    return root / "config.yaml"


def tgve(root: Path) -> Path:
    root.mkdir(parents=True)
    write_video(root / "car-turn.mp4", clip(3), 8)
    (root / "car-turn.yaml").write_text(yaml.safe_dump({"caption": "a car turns", "style": "a car turns, van gogh style",
                                                         "object": "a truck turns", "background": "a car turns in snow",
                                                         "multiple": "a truck turns in snow, cartoon"}))
    return root


BUILDERS = {"editverse": editverse, "openve": openve, "five": five, "v2vbench": v2vbench, "tgve": tgve}


@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_each_format_is_detected_and_read_with_paths_relative_to_its_file(tmp_path, fmt):
    path = BUILDERS[fmt](tmp_path / "bench")
    assert detect_format(path) == fmt
    found, items = read_benchmark(path)
    expected = {"editverse": 3, "openve": 4, "five": 2, "v2vbench": 2, "tgve": 4}[fmt]
    assert found == fmt and len(items) == expected and all(item.video.exists() for item in items)
    assert all(item.instruction and "<video1>" not in item.instruction for item in items)
    if fmt == "openve":  # the creative edit has no published rubric: out of the default selection
        assert {i.category for i in select(items, fmt="openve")} == {"global_style", "local_add"}
    if fmt == "five":
        assert items[0].instruction == "change red to blue" and items[0].extra["masks"]


def frames_of(url: str) -> int:
    """Frames of a ``data:video/mp4;base64`` URL."""
    import base64
    import tempfile

    assert url.startswith("data:video/mp4;base64,")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mp4"
        path.write_bytes(base64.b64decode(url.split(",", 1)[1]))
        return probe_video(path).num_frames


class Judge:
    """A loopback judge server that checks each request as the benchmark's judge must send it."""

    def __init__(self, refuse: bool = False, delay: float = 0.0, malformed_every: int = 0):
        self.checked: list[str] = []
        self.video_frames: list[int] = []
        self.in_flight, self.most_in_flight, self.lock = 0, 0, threading.Lock()
        self.refuse, self.delay, self.malformed_every = refuse, delay, malformed_every
        self.server = FakeOpenAI(self.respond)

    def respond(self, body: dict, n: int):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            if self.refuse:
                return 401, {"error": {"message": "invalid key", "type": "invalid_request_error"}}
            assert body["temperature"] == 0 and body["model"] == "judge-1"
            system = body["messages"][0]["content"]
            content = body["messages"][1]["content"]
            images = [c for c in content if c["type"] == "image_url"]
            assert all(c["image_url"]["url"].startswith("data:image/jpeg;base64,") for c in images)
            if self.malformed_every and n % self.malformed_every == 0:
                return 200, completion("I think it is fine.")
            if "prompt_following" in system:
                assert len(images) == 2 and "Editing prompt:" in content[0]["text"]
                self.checked.append("editverse")
                return 200, completion('{"prompt_following": 2, "edit_quality": 3, "background_consistency": 1}')
            if "instruction_compliance" in system:
                videos = [c for c in content if c["type"] == "video_url"]
                if videos:  # whole videos: two mp4 data URLs with every frame
                    assert not images and len(videos) == 2
                    self.video_frames += [frames_of(v["video_url"]["url"]) for v in videos]
                else:
                    assert len(images) == 16  # 8 frames of each video
                self.checked.append("openve:" + ("watercolor" if "style is absent" in system else "add"))
                return 200, completion('```json\n{"instruction_compliance": 4, "consistency_detail_fidelity": 3, '
                                       '"visual_quality_stability": 2}\n```')
            question = content[0]["text"]
            self.checked.append("five")
            assert len(images) == 4
            if "letter" in question:
                return 200, completion("b")
            return 200, completion("No." if "red" in question else "Yes")
        finally:
            with self.lock:
                self.in_flight -= 1

    def args(self) -> list[str]:
        return ["--judge-base-url", self.server.url, "--judge-model", "judge-1"]


def evaluate(path: Path, out: Path, *extra: str, capsys=None) -> tuple[int, str]:
    code = main(["eval", "--benchmark", str(path), "--out", str(out), "--steps", "1", "--quiet", *extra])
    return code, capsys.readouterr().err if capsys else ""


def test_editverse_writes_its_layout_and_scores_three_frame_pairs_0_to_9(tmp_path, capsys):
    judge = Judge()
    path = editverse(tmp_path / "bench")
    code, err = evaluate(path, tmp_path / "out", *judge.args(), capsys=capsys)
    assert code == 0, err
    for key in ("0", "1", "2"):  # what the official evaluation reads: <id>/generate.mp4 beside <id>/video1.mp4
        generated, source = probe_video(tmp_path / "out" / key / "generate.mp4"), probe_video(tmp_path / "out" / key / "video1.mp4")
        assert generated.num_frames == source.num_frames == 8
    assert not (tmp_path / "out" / "9").exists()  # a reference-image item is not an instruction edit of one video
    assert judge.checked == ["editverse"] * 9 and editverse_pairs(8) == [0, 2, 4]
    report = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert report["overall"]["editverse_score"] == 6.0 and report["overall"]["items"] == 3
    assert set(report["categories"]) == {"style", "add"} and report["judges"] == [{"model": "judge-1", "temperature": 0.0}]
    table = (tmp_path / "out" / "benchmark.md").read_text()
    assert "| **this editor (measured here)** | 6.000 |" in table
    assert "| InsV2V | 5.21 | published, not re-measured" in table and "| EasyV2V | 7.73 |" in table


def test_openve_rubrics_by_category_on_whole_videos_and_the_macro_overall(tmp_path, capsys):
    judge = Judge()
    code, err = evaluate(openve(tmp_path / "bench"), tmp_path / "out", *judge.args(), "--max-frames", "8", capsys=capsys)
    assert code == 0, err
    assert sorted(judge.checked) == ["openve:add", "openve:add", "openve:watercolor"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*_edited.mp4")) == ["c0_edited.mp4", "c1_edited.mp4",
                                                                               "c2_edited.mp4"]
    report = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert report["overall"]["openve_score"] == pytest.approx(3.0) and report["categories"]["local_add"]["items"] == 2
    assert "| Kiwi-Edit | 3.02 |" in (tmp_path / "out" / "benchmark.md").read_text()


def test_openve_whole_videos_for_a_server_that_takes_video(tmp_path, capsys):
    judge = Judge()
    code, err = evaluate(openve(tmp_path / "bench"), tmp_path / "out", *judge.args(), "--judge-video", capsys=capsys)
    assert code == 0, err
    assert len(judge.checked) == 3 and judge.video_frames == [8] * 6  # before and after, every frame, per item


def test_five_questions_as_accuracy_and_masked_background_fidelity(tmp_path, capsys):
    judge = Judge()
    code, err = evaluate(five(tmp_path / "bench"), tmp_path / "out", *judge.args(), capsys=capsys)
    assert code == 0, err
    assert judge.checked == ["five"] * 6  # source and target yes/no, multiple choice: per item
    frames = sorted((tmp_path / "out" / "0001_bus" / "edit1_0").glob("*.jpg"))
    assert len(frames) == 8  # FiVE's layout: <video_name>/<save_dir>/ frames
    report = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert report["overall"]["five_acc"] == 1.0
    assert report["overall"]["background_psnr"] > 5 and 0 < report["overall"]["background_ssim"] <= 1
    assert five_accuracies("yes", "yes", "b", True) == {"five_yn": 0.0, "five_mc": 1.0, "five_union": 1.0,
                                                        "five_inter": 0.0, "five_acc": 0.5}


@pytest.mark.parametrize("fmt,layout", [("v2vbench", ["hike/0.mp4", "hike/1.mp4"]),
                                        ("tgve", [f"car-turn/{k}.mp4" for k in ("style", "object", "background",
                                                                                  "multiple")])])
def test_prompt_benchmarks_write_their_layouts_with_automatic_metrics(tmp_path, capsys, fmt, layout):
    code, err = evaluate(BUILDERS[fmt](tmp_path / "bench"), tmp_path / "out", capsys=capsys)
    assert code == 0, err
    assert all((tmp_path / "out" / name).is_file() for name in layout)
    report = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert report["overall"]["items"] == len(layout) and -1 <= report["overall"]["clip_text"] <= 1


def test_a_resumed_run_equals_an_uninterrupted_one_and_redoes_no_edit(tmp_path, capsys):
    path = editverse(tmp_path / "bench")
    whole = Judge()
    assert evaluate(path, tmp_path / "whole", *whole.args(), capsys=capsys)[0] == 0
    rows = (tmp_path / "whole" / "rows-000-of-001.jsonl").read_text().splitlines()
    # an interrupted run: its first row finished, the second half-written, the third edit on disk but not judged
    part = tmp_path / "part"
    assert evaluate(path, part, "--limit", "1", *whole.args(), capsys=capsys)[0] == 0
    first = (part / "rows-000-of-001.jsonl").read_text()
    (part / "rows-000-of-001.jsonl").write_text(first + rows[1][:25])
    (part / "2").mkdir()
    for name in ("generate.mp4", "video1.mp4"):
        (part / "2" / name).write_bytes((tmp_path / "whole" / "2" / name).read_bytes())
    stamp = (part / "2" / "generate.mp4").stat().st_mtime_ns
    code, err = evaluate(path, part, *whole.args(), capsys=capsys)
    assert code == 2 and "pass --resume" in err  # finished rows are never overwritten by accident
    resumed = Judge()
    assert evaluate(path, part, "--resume", *resumed.args(), capsys=capsys)[0] == 0
    assert resumed.checked == ["editverse"] * 6  # items 1 and 2 only
    assert (part / "2" / "generate.mp4").stat().st_mtime_ns == stamp  # read back, not edited again
    by_key = lambda text: {r["key"]: r for r in map(json.loads, text.splitlines())}  # noqa: E731
    # exactly: edit files are written and read the same way every time (write_video(exact=True),
    # read_video_exact), so an item edited again or read back scores the same bits
    assert by_key((part / "rows-000-of-001.jsonl").read_text()) == by_key("\n".join(rows))
    assert json.loads((part / "benchmark.json").read_text())["overall"] == \
        json.loads((tmp_path / "whole" / "benchmark.json").read_text())["overall"]


def test_ranks_split_the_items_and_merge_into_the_single_run_report(tmp_path, capsys, monkeypatch):
    path = editverse(tmp_path / "bench")
    judge = Judge()
    assert evaluate(path, tmp_path / "one", *judge.args(), capsys=capsys)[0] == 0
    code, err = evaluate(path, tmp_path / "ranks", "--shard-index", "0", "--num-shards", "2", *judge.args(), capsys=capsys)
    assert code == 0, err
    code, err = evaluate(path, tmp_path / "ranks", "--merge", capsys=capsys)
    assert code == 2 and "have no row" in err  # rank 1 has not run
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert evaluate(path, tmp_path / "ranks", *judge.args(), capsys=capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "ranks").glob("rows-*.jsonl")) == ["rows-000-of-002.jsonl",
                                                                                 "rows-001-of-002.jsonl"]
    assert evaluate(path, tmp_path / "ranks", "--merge", capsys=capsys)[0] == 0
    merged, single = (json.loads((tmp_path / d / "benchmark.json").read_text()) for d in ("ranks", "one"))
    assert merged["overall"] == single["overall"] and merged["categories"] == single["categories"]


def test_a_refusing_judge_is_asked_once_and_the_edits_are_kept(tmp_path, capsys):
    judge = Judge(refuse=True)
    code, err = evaluate(editverse(tmp_path / "bench"), tmp_path / "out", *judge.args(), capsys=capsys)
    assert code == 0
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "HTTP 401" in warnings[0] and len(judge.server.requests) == 1
    rows = [json.loads(r) for r in (tmp_path / "out" / "rows-000-of-001.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["editverse_score"] is None for r in rows)
    assert all((tmp_path / "out" / k / "generate.mp4").is_file() for k in ("0", "1", "2"))


def test_judge_requests_run_concurrently_and_unreadable_replies_are_counted(tmp_path, capsys):
    judge = Judge(delay=1.0, malformed_every=4)
    code, err = evaluate(openve(tmp_path / "bench"), tmp_path / "out", "--categories", "local_add", "global_style",
                         "creative_edit", "--judge-concurrency", "4", *judge.args(), capsys=capsys)
    assert code == 0, err
    assert judge.most_in_flight >= 2
    report = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert "1 replies not readable" in " ".join(report["notes"])
    assert report["categories"]["creative_edit"]["items"] == 1  # asked for by name: judged on the generic rubric


def test_benchmark_input_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "x.json").write_text("[1, 2]")
    code, err = evaluate(tmp_path / "x.json", tmp_path / "out", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "known benchmark format" in err
    path = editverse(tmp_path / "bench")
    code, err = evaluate(path, tmp_path / "out", "--categories", "nosuch", capsys=capsys)
    assert code == 2 and "no items of nosuch" in err
