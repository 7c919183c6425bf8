"""The vision-language judge: reply parsing, and the real client against a misbehaving server on loopback."""

from __future__ import annotations

import base64
import csv
import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from fake_openai import FakeOpenAI, completion
from infer.judge import MalformedJudgment, VisionJudge, judged_frames, parse_judgment
from synth.cli import main as synth_main
from synth.writer import read_attempts
from test_lift import lift_config, members, write_parquet

SECRET = "sk-judge-DO-NOT-LEAK-0987654321"


def verdict(instruction=3, preservation=2, quality=1, reason="ok") -> str:
    return json.dumps({"instruction": instruction, "preservation": preservation, "quality": quality, "reason": reason})


def test_parse_judgment_accepts_json_and_rejects_the_rest():
    assert parse_judgment(verdict()).total == 6
    assert parse_judgment("```json\n" + verdict(3, 3, 3) + "\n```").to_json()["total"] == 9
    assert parse_judgment(json.dumps({"instruction": 2.0, "preservation": 0, "quality": 1})).scores["instruction"] == 2
    for bad in ["The edit looks great, 8/10.", verdict(4, 2, 1), verdict(-1, 2, 1), verdict(2.5, 1, 1),
                json.dumps({"instruction": True, "preservation": 1, "quality": 1}), json.dumps([1, 2, 3]),
                json.dumps({"instruction": 1, "quality": 1})]:
        with pytest.raises(MalformedJudgment):
            parse_judgment(bad)
    assert judged_frames(16, 3) == [0, 8, 15] and judged_frames(2, 3) == [0, 1]


def data_url_image(url: str) -> np.ndarray:
    head, _, body = url.partition(",")
    assert head == "data:image/jpeg;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body))))


class Judge(FakeOpenAI):
    """Checks every request's images and instruction, then replies from a script."""

    def __init__(self, script, frames: int, size: int):
        self.script, self.frames, self.size, self.problems = list(script), frames, size, []
        super().__init__(self._respond)

    def _respond(self, body, n):
        user = body["messages"][-1]["content"]
        images = [part["image_url"]["url"] for part in user if part["type"] == "image_url"]
        texts = " ".join(part["text"] for part in user if part["type"] == "text")
        if len(images) != 2 * self.frames or "Instruction: paint a red square" not in texts:
            self.problems.append(f"request {n}: {len(images)} images, text {texts[:60]!r}")
        for url in images:
            if data_url_image(url).shape != (self.size, self.size, 3):
                self.problems.append(f"request {n}: image of shape {data_url_image(url).shape}")
        return self.script.pop(0) if self.script else (200, completion(verdict(3, 3, 3)))


def test_judge_filter_in_synth_lift_against_a_misbehaving_server(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", SECRET)
    server = Judge([
        (500, {"error": {"message": "overloaded"}}),                     # retried
        (200, completion("```json\n" + verdict(3, 2, 2, "good") + "\n```")),  # row 0: 7, kept
        (200, completion("I think this edit is quite good.")),            # row 1: prose, malformed
        (200, completion(verdict(3, 7, 1))),                              # row 2: out of range, malformed
        (429, {"error": {"message": "slow down"}}),                       # retried
        (200, completion(verdict(1, 1, 1, "barely"))),                    # row 3: 3 < 5, rejected
    ], frames=2, size=32)
    try:
        write_parquet(tmp_path / "pairs.parquet", rows=5, bad_row=None)
        config = yaml.safe_load(lift_config(tmp_path).read_text())
        config["filter"]["judge"] = {"base_url": server.url, "model": "fake-vlm", "api_key_env": "JUDGE_API_KEY",
                                     "threshold": 5, "frames": 2, "backoff": 0.01}
        path = tmp_path / "judged.yaml"
        path.write_text(yaml.safe_dump(config))
        out = tmp_path / "out"
        assert synth_main(["lift", "--images", str(tmp_path / "pairs.parquet"), "--out", str(out), "--config", str(path),
                           "--quiet"]) == 0
    finally:
        server.close()
    assert not server.problems, server.problems
    assert len(server.requests) == 7 and all(r["auth"] == f"Bearer {SECRET}" for r in server.requests)
    assert {r["body"]["model"] for r in server.requests} == {"fake-vlm"}
    attempts = {a["row"]: a for a in read_attempts(out)}
    assert attempts[0]["kept"] and attempts[0]["judge"] == {"instruction": 3, "preservation": 2, "quality": 2,
                                                           "total": 7, "reason": "good"}
    assert attempts[1]["reason"] == attempts[2]["reason"] == "judge: malformed reply"
    assert attempts[3]["reason"] == "judge=3<5" and attempts[3]["judge"]["reason"] == "barely"
    assert attempts[4]["kept"] and attempts[4]["judge"]["total"] == 9
    metas = [json.loads(v) for k, v in members(out).items() if k.endswith(".json")]
    assert sorted(m["judge"]["total"] for m in metas) == [7, 9]
    from synth.report import report

    text = report(out)
    assert "judge (0-9)       mean 6.33  min 3  max 9  (3 judged)" in text
    assert "judge: malformed reply: 2" in text and "judge: 1" in text
    for file in out.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


def test_judge_gives_up_after_its_retries(tmp_path, monkeypatch):
    server = FakeOpenAI(lambda body, n: (503, {"error": {"message": "down"}}))
    try:
        judge = VisionJudge(server.url, "fake-vlm", frames=1, max_retries=2, backoff=0.01)
        clip = np.zeros((2, 8, 8, 3), np.uint8)
        with pytest.raises(ConnectionError, match="judge server failed 3 times"):
            judge(clip, clip, "make it red")
    finally:
        server.close()
    assert len(server.requests) == 3 and judge.stats.retries == 2


def test_infer_eval_reports_the_judge_and_never_writes_the_key(tmp_path, monkeypatch):
    from infer import encode_video
    from infer.cli import main as infer_main

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    ys, xs = np.mgrid[0:24, 0:24]
    frames = np.stack([np.stack([(xs + 2 * t) * 10 % 256, ys * 10, np.full_like(xs, 80)], -1) for t in range(6)])
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos/clip.mp4").write_bytes(encode_video(frames.astype(np.uint8), 8))
    (tmp_path / "edits.json").write_text(json.dumps({"clip": {"style": "paint a red square", "bg": "paint a red square"}}))
    replies = iter([completion(verdict(2, 2, 2)), completion("no idea"), completion(verdict(3, 1, 0))])
    server = Judge([], frames=3, size=16)
    server.script = [(200, r) for r in replies]
    try:
        code = infer_main(["eval", "--videos", str(tmp_path / "videos"), "--instructions", str(tmp_path / "edits.json"),
                           "--out", str(tmp_path / "report"), "--resolution", "16", "--steps", "1", "--quiet",
                           "--setting", "plain:lvsc=0", "--judge-base-url", server.url, "--judge-model", "fake-vlm"])
    finally:
        server.close()
    assert code == 0 and not server.problems, server.problems
    rows = list(csv.DictReader(open(tmp_path / "report/per_video.csv")))
    assert [r["judge"] for r in rows] == ["6.0", "nan"]
    assert rows[0]["judge_instruction"] == "2" and rows[1]["judge_reason"] == ""
    summary = json.loads((tmp_path / "report/summary.json").read_text())
    assert summary["settings"]["plain"]["judge"] == 6.0
    assert any("1 of 2 edits scored, 1 malformed" in n for n in summary["notes"])
    assert "judge ↑" in (tmp_path / "report/summary.md").read_text()
    for file in (tmp_path / "report").rglob("*"):
        assert SECRET not in file.read_text(), file


def _eval_inputs(tmp_path):
    from infer import encode_video

    ys, xs = np.mgrid[0:24, 0:24]
    frames = np.stack([np.stack([(xs + 2 * t) * 10 % 256, ys * 10, np.full_like(xs, 80)], -1) for t in range(6)])
    (tmp_path / "videos").mkdir(exist_ok=True)
    (tmp_path / "videos/clip.mp4").write_bytes(encode_video(frames.astype(np.uint8), 8))
    (tmp_path / "edits.json").write_text(json.dumps({"clip": {"a": "paint a red square", "b": "make it snowy",
                                                              "c": "make it dark"}}))
    return ["eval", "--videos", str(tmp_path / "videos"), "--instructions", str(tmp_path / "edits.json"),
            "--out", str(tmp_path / "report"), "--resolution", "16", "--steps", "1", "--quiet", "--setting", "plain:lvsc=0"]


@pytest.mark.parametrize("status", [401, 403, 400])
def test_a_judge_that_refuses_is_dropped_with_one_line_and_the_edits_are_reported(tmp_path, monkeypatch, capsys, status):
    from infer.cli import main as infer_main

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server = FakeOpenAI(lambda body, n: (status, {"error": {"message": "no", "type": "invalid_request_error"}}))
    try:
        code = infer_main(_eval_inputs(tmp_path) + ["--judge-base-url", server.url, "--judge-model", "fake-vlm"])
    finally:
        server.close()
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err and SECRET not in err
    warnings = [line for line in err.splitlines() if "judge stopped" in line]
    assert len(warnings) == 1 and f"HTTP {status}" in warnings[0]
    assert len(server.requests) == 1  # asked once, then never again
    rows = list(csv.DictReader(open(tmp_path / "report/per_video.csv")))
    assert len(rows) == 3 and all(r["judge"] == "nan" and float(r["clip_t"]) == float(r["clip_t"]) for r in rows)
    notes = json.loads((tmp_path / "report/summary.json").read_text())["notes"]
    assert any(f"judge stopped: judge server answered HTTP {status}" in n for n in notes)


def test_infer_eval_keeps_finished_rows_and_resumes(tmp_path, monkeypatch, capsys):
    import infer.evaluate as evaluate_module
    from infer.cli import main as infer_main

    args = _eval_inputs(tmp_path)
    real, calls = evaluate_module.clip_text_score, []

    def interrupted(*a, **k):  # Ctrl-C while scoring the second edit
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate_module, "clip_text_score", interrupted)
    assert infer_main(args) == 130
    rows = list(csv.DictReader(open(tmp_path / "report/per_video.csv")))
    assert [r["edit"] for r in rows] == ["a"]  # the finished row is on disk
    assert "1 rows finished" in (tmp_path / "report/summary.md").read_text()
    monkeypatch.setattr(evaluate_module, "clip_text_score", real)
    capsys.readouterr()
    assert infer_main(args) == 2  # an earlier run's rows are not overwritten without --resume
    assert "pass --resume" in capsys.readouterr().err
    with open(tmp_path / "report/per_video.csv", "a") as f:
        f.write("clip,b,plain,6,0.1")  # a row torn by a kill mid-write is dropped, not trusted
    first = rows[0]
    assert infer_main(args + ["--resume"]) == 0
    again = list(csv.DictReader(open(tmp_path / "report/per_video.csv")))
    assert [r["edit"] for r in again] == ["a", "b", "c"] and again[0] == first  # kept as it was, not redone
