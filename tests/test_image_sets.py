"""The published image-edit sets through `synth lift`: UltraEdit, OmniEdit, GPT-Image-Edit-1.5M and
Pico-Banana-400K in their own layouts, their shipped scores as filters."""

from __future__ import annotations

import collections
import json
import tarfile
from pathlib import Path

import pytest
from test_lift import encode, lift_config, scene, with_patch

from synth.cli import main
from synth.writer import read_attempts


def lifted(folder: Path) -> list[dict]:
    metas = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return metas


def pair(i: int) -> tuple[bytes, bytes]:
    source = scene(seed=i)
    return encode(source), encode(with_patch(source)[0])


def ultraedit(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(4):
        src, tgt = pair(i)
        rows.append({"source_image": {"bytes": src, "path": None}, "edited_image": {"bytes": tgt, "path": None},
                     "edit_prompt": f"paint a red square {i}", "source_caption": "a picture",
                     "target_caption": "a picture with a red square", "clip_sim_dir": 0.1 * i, "clip_sim_source": 0.3,
                     "dinov2_sim": 0.9, "ssim": 0.5 + 0.1 * i})
    pq.write_table(pa.Table.from_pylist(rows), root / "ultraedit.parquet")
    return root / "ultraedit.parquet"


def omniedit(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(3):
        src, tgt = pair(10 + i)
        rows.append({"src_img": {"bytes": src, "path": None}, "edited_img": {"bytes": tgt, "path": None},
                     "edited_prompt_list": [f"add a red square {i}", f"put a red block in the middle {i}"],
                     "o_score": [9.0, 4.0, 8.0][i], "sc_score_1": 8.0, "sc_score_2": 7.0, "pq_score": 9.0})
    pq.write_table(pa.Table.from_pylist(rows), root / "omniedit.parquet")
    return root / "omniedit.parquet"


def gpt_image_edit(root: Path) -> Path:
    records = []
    for i in range(3):
        src, tgt = pair(20 + i)
        (root / "images").mkdir(exist_ok=True)
        (root / f"images/{i}_src.png").write_bytes(src)
        (root / f"images/{i}_tgt.png").write_bytes(tgt)
        records.append({"id": i, "image": [f"images/{i}_src.png", f"images/{i}_tgt.png"],
                        "conversations": [{"from": "human", "value": f"<image>\nPaint a red square {i}."},
                                          {"from": "gpt", "value": "<image>"}]})
    records.append({"id": 9, "image": ["../../escape.png", "images/0_tgt.png"],
                    "conversations": [{"from": "human", "value": "<image> escape"}]})
    (root / "gpt_edit.json").write_text(json.dumps(records))
    return root / "gpt_edit.json"


def pico_banana(root: Path) -> tuple[Path, Path]:
    (root / "openimages").mkdir()
    (root / "edits").mkdir()
    lines = []
    for i in range(3):
        src, tgt = pair(30 + i)
        (root / f"openimages/{i:016x}.jpg").write_bytes(src)
        (root / f"edits/{i}.png").write_bytes(tgt)
        lines.append({"open_image_input_url": f"https://example.org/train/{i:016x}.jpg", "text": f"add a red square {i}",
                      "output_image": f"edits/{i}.png", "edit_type": "Add a new object"})
    lines.append({"open_image_input_url": "https://example.org/train/ffffffffffffffff.jpg", "text": "missing source",
                  "output_image": "edits/0.png", "edit_type": "Add a new object"})
    (root / "sft.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "sft.jsonl", root / "openimages"


def run_lift(tmp_path: Path, images: Path, *extra: str) -> int:
    return main(["lift", "--images", str(images), "--out", str(tmp_path / "out"), "--config", str(lift_config(tmp_path)),
                 "--quiet", *extra])


def test_ultraedit_lifts_with_its_scores_as_filters(tmp_path):
    images = ultraedit(tmp_path)
    assert run_lift(tmp_path, images, "--min-score", "clip_sim_dir=0.15", "--min-score", "ssim=0.55") == 0
    attempts = read_attempts(tmp_path / "out")
    assert [(a["row"], a["kept"], a["reason"]) for a in attempts][:2] == [(0, False, "score clip_sim_dir below 0.15"),
                                                                          (1, False, "score clip_sim_dir below 0.15")]
    metas = lifted(tmp_path / "out")
    assert [m["instruction"] for m in metas] == ["paint a red square 2", "paint a red square 3"]
    assert metas[0]["input_caption"] == "a picture" and metas[0]["generator"]["shipped_scores"]["dinov2_sim"] == 0.9


def test_omniedit_draws_one_instruction_per_pair_and_filters_on_o_score(tmp_path):
    images = omniedit(tmp_path)
    assert run_lift(tmp_path, images, "--min-score", "o_score=7") == 0
    metas = lifted(tmp_path / "out")
    assert len(metas) == 2 and all(m["generator"]["shipped_scores"]["o_score"] >= 7 for m in metas)
    for meta in metas:  # one of the row's instructions, the same on every run
        i = meta["instruction"][-1]
        assert meta["instruction"] in (f"add a red square {i}", f"put a red block in the middle {i}")
    (tmp_path / "again").mkdir()
    assert run_lift(tmp_path / "again", images, "--min-score", "o_score=7") == 0
    assert [m["instruction"] for m in lifted(tmp_path / "again" / "out")] == [m["instruction"] for m in metas]


def test_gpt_image_edit_json_lifts_with_paths_kept_inside(tmp_path):
    images = gpt_image_edit(tmp_path)
    assert run_lift(tmp_path, images) == 0
    metas = lifted(tmp_path / "out")
    assert [m["instruction"] for m in metas] == [f"Paint a red square {i}." for i in range(3)]
    reasons = [a["reason"] for a in read_attempts(tmp_path / "out") if not a["kept"]]
    assert len(reasons) == 1 and "outside the JSON's folder" in reasons[0]


def test_pico_banana_reads_its_sources_from_local_open_images(tmp_path, capsys):
    images, open_images = pico_banana(tmp_path)
    assert run_lift(tmp_path, images) == 2  # without the Open Images folder: one line, nothing written
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--open-images" in err[0] and not (tmp_path / "out").exists()
    assert run_lift(tmp_path, images, "--open-images", str(open_images)) == 0
    assert [m["instruction"] for m in lifted(tmp_path / "out")] == [f"add a red square {i}" for i in range(3)]
    rejected = collections.Counter(a["reason"].split(":")[0] for a in read_attempts(tmp_path / "out") if not a["kept"])
    assert sum(rejected.values()) == 1 and "unreadable" in next(iter(rejected))


@pytest.mark.parametrize("flag,message", [("clip_sim_dir", "FIELD=VALUE"), ("nope=1", "ships no such score"),
                                          ("ssim=high", "FIELD=VALUE")])
def test_a_bad_min_score_is_one_line(tmp_path, capsys, flag, message):
    images = ultraedit(tmp_path)
    assert run_lift(tmp_path, images, "--min-score", flag) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "out").exists()
