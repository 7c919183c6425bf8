"""Lifted pairs: the shared camera path, every input layout, resume after a kill, and mixed training."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shards.camera import CameraBounds, CameraPath, draw_path, film, fit_path, homographies, lift_pair
from synth.cli import main
from synth.writer import read_attempts, read_manifest
from guards import HANG_GUARD

ROOT = Path(__file__).resolve().parents[1]


def scene(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A textured image: smooth gradients plus a few shapes, so every camera motion shows."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 // width, ys * 255 // height, (xs * ys) % 200 + 30], -1).astype(np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, width - 20), rng.integers(0, height - 20)
        image[y : y + 16, x : x + 16] = rng.integers(0, 256, 3)
    return image


def with_patch(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image with a red square painted in its middle, and the square's mask."""
    h, w = image.shape[:2]
    mask = np.zeros((h, w), bool)
    mask[h // 3 : h // 2, w // 3 : w // 2] = True
    edited = image.copy()
    edited[mask] = (255, 0, 0)
    return edited, mask


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    return buffer.getvalue()


# ------------------------------------------------------------------ the camera
def test_one_camera_path_films_both_images_exactly():
    source = scene()
    edited, mask = with_patch(source)
    src_clip, tgt_clip, path = lift_pair(source, edited, CameraBounds(), 8, 48, np.random.default_rng(3))
    maps = homographies(CameraPath(**{k: tuple(v) if isinstance(v, list) else v for k, v in path.items()}), 8,
                        source.shape[:2], 48)
    # the recorded path reproduces both clips bit for bit: the edited clip is the camera's view of the edited image
    assert np.array_equal(film(edited, maps, 48), tgt_clip) and np.array_equal(film(source, maps, 48), src_clip)
    # outside the (warped, slightly grown) patch the two clips are the same pixels; inside they differ
    seen = film(np.repeat(mask[..., None] * np.uint8(255), 3, -1), maps, 48)[..., 0]
    grown = np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    grown[ys.min() - 3 : ys.max() + 4, xs.min() - 3 : xs.max() + 4] = True  # filters blur an edge by a pixel or two
    outside = film(np.repeat(grown[..., None] * np.uint8(255), 3, -1), maps, 48)[..., 0] == 0
    assert outside.mean() > 0.5
    assert np.array_equal(src_clip[outside], tgt_clip[outside])
    assert (np.abs(src_clip.astype(int) - tgt_clip.astype(int)).sum(-1)[seen == 255] > 100).all()
    assert (seen == 255).sum() > 50
    # the camera moves, and the patch moves with it
    assert np.abs(src_clip[0].astype(int) - src_clip[-1].astype(int)).mean() > 3
    centroids = [np.argwhere(frame == 255).mean(0) for frame in seen]
    assert np.linalg.norm(centroids[0] - centroids[-1]) > 0.5


def test_camera_paths_stay_inside_the_image_and_respect_bounds():
    rng = np.random.default_rng(0)
    bounds = CameraBounds(max_pan=0.3, zoom=(1.0, 1.5), max_rotate=20, max_perspective=0.1)
    for hw in [(96, 128), (300, 200), (64, 64)]:
        for _ in range(20):
            raw = draw_path(bounds, rng)
            path = fit_path(raw, 6, hw, 32)
            assert 0 < path.fit <= 1
            assert abs(raw.rotate_end - raw.rotate_start) <= bounds.max_rotate
            assert all(abs(a - b) <= bounds.max_pan for a, b in zip(raw.pan_start, raw.pan_end))
            assert bounds.zoom[0] <= raw.zoom_start <= bounds.zoom[1]
            maps = homographies(path, 6, hw, 32)
            corners = maps @ np.array([[0, 0, 1], [32, 0, 1], [0, 32, 1], [32, 32, 1]], float).T
            xy = corners[:, :2] / corners[:, 2:]
            assert (xy[:, 0] >= -1e-6).all() and (xy[:, 0] <= hw[1] + 1e-6).all()
            assert (xy[:, 1] >= -1e-6).all() and (xy[:, 1] <= hw[0] + 1e-6).all()
    with pytest.raises(ValueError, match="camera bounds"):
        CameraBounds(zoom=(0.5, 1.0))


# ------------------------------------------------------------------ synth lift end to end
def write_parquet(path: Path, rows: int = 6, bad_row: int | None = 2) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for i in range(rows):
        source = scene(seed=i)
        edited, _ = with_patch(source)
        if i == 1:  # an edited image at another size: resized to the source's
            edited = np.asarray(Image.fromarray(edited).resize((160, 120)))
        records.append({
            "input_image": {"bytes": encode(source), "path": None},
            "edited_image": {"bytes": encode(edited, "JPEG" if i % 2 else "PNG"), "path": None},
            "edit_prompt": f"paint a red square {i}",
            "original_prompt": "a colourful picture", "edited_prompt": "a colourful picture with a red square",
        })
    if bad_row is not None:
        records[bad_row]["edited_image"] = {"bytes": b"not an image", "path": None}
    pq.write_table(pa.Table.from_pylist(records), path)
    return records


def lift_config(tmp_path: Path, **camera) -> Path:
    import yaml

    config = yaml.safe_load((ROOT / "configs/synth/lift.yaml").read_text())
    config["camera"].update({"num_frames": 4, "size": 32, **camera})
    config["output"]["video_format"] = "npy"
    path = tmp_path / "lift.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def members(folder: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return out


def test_lift_parquet_to_shards_that_lightning_fit_trains_on(tmp_path, capsys):
    write_parquet(tmp_path / "pairs.parquet")
    out = tmp_path / "out"
    assert main(["lift", "--images", str(tmp_path / "pairs.parquet"), "--out", str(out),
                 "--config", str(lift_config(tmp_path)), "--samples-per-shard", "2"]) == 0
    err = capsys.readouterr().err
    assert "5 lifted pairs" in err and "1 unreadable rows skipped" in err
    files = members(out)
    metas = {k: json.loads(v) for k, v in files.items() if k.endswith(".json")}
    assert len(metas) == 5 and len(list(out.glob("*.tar"))) == 3
    for name, meta in metas.items():
        assert meta["source"] == "lift:pairs" and meta["generator"]["backbone"] == "lift"
        assert meta["instruction"].startswith("paint a red square") and meta["num_frames"] == 4
        src = np.load(io.BytesIO(files[name.replace(".json", ".src.npy")]))
        tgt = np.load(io.BytesIO(files[name.replace(".json", ".tgt.npy")]))
        assert src.shape == tgt.shape == (4, 32, 32, 3)
        # the stored camera path reproduces the clip from the row's image
        path = CameraPath(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["generator"]["camera"].items()})
        maps = homographies(path, 4, tuple(meta["generator"]["image_size"]), 32)
        assert np.array_equal(film(scene(seed=meta["generator"]["row"]), maps, 32), src)
    attempts = read_attempts(out)
    assert [a["row"] for a in attempts] == list(range(6))
    assert [a["reason"] for a in attempts if not a["kept"]] == ["unreadable: edited_image is not a readable image (UnidentifiedImageError)"]
    # lightning fit trains on them
    proc = subprocess.run([sys.executable, "-m", "train", "fit", "--config", str(ROOT / "configs/tiny.yaml"),
                           "--data.shards", str(out), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
                           "--data.num_frames", "4", "--trainer.default_root_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=HANG_GUARD, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2


def test_lift_reads_datasets_folders_and_jsonl(tmp_path):
    import datasets

    source = scene(seed=7)
    edited, _ = with_patch(source)
    table = {"input_image": [Image.fromarray(source)] * 2, "edited_image": [Image.fromarray(edited)] * 2,
             "edit_prompt": ["add a red square", "add a red square"]}
    features = datasets.Features({"input_image": datasets.Image(), "edited_image": datasets.Image(),
                                  "edit_prompt": datasets.Value("string")})
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "hf"))
    config = str(lift_config(tmp_path))
    assert main(["lift", "--images", str(tmp_path / "hf"), "--out", str(tmp_path / "a"), "--config", config, "--quiet"]) == 0
    (tmp_path / "img").mkdir()
    Image.fromarray(source).save(tmp_path / "img/s.png")
    Image.fromarray(edited).save(tmp_path / "img/e.png")
    lines = [{"input": "img/s.png", "edited": "img/e.png", "instruction": "add a red square"},
             {"input": "img/s.png", "edited": "img/missing.png", "instruction": "add a red square"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "{broken\n")
    assert main(["lift", "--images", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "b"), "--config", config,
                 "--quiet"]) == 0
    a, b = members(tmp_path / "a"), members(tmp_path / "b")
    assert len([k for k in a if k.endswith(".json")]) == 2 and len([k for k in b if k.endswith(".json")]) == 1
    # row 0 of both is the same image pair under the same (seed, row) camera: the same clips
    key = "r000-000000000-s0"
    assert a[f"{key}.tgt.npy"] == b[f"{key}.tgt.npy"] and a[f"{key}.src.npy"] == b[f"{key}.src.npy"]
    reasons = [x["reason"] for x in read_attempts(tmp_path / "b") if not x["kept"]]
    assert reasons[0].startswith("unreadable: edited_image: No such file") and "not a JSON object" in reasons[1]


def test_lift_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"image": b"x", "prompt": "y"}]), tmp_path / "wrong.parquet")
    for images, message in [(tmp_path / "wrong.parquet", "lacks the column(s) input_image, edited_image, edit_prompt"),
                            (tmp_path / "nothing", "no image pairs at"),
                            (ROOT / "README.md", "--images takes a .parquet file")]:
        assert main(["lift", "--images", str(images), "--out", str(tmp_path / "o"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written for input that cannot be read


@pytest.mark.slow
def test_lift_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    write_parquet(tmp_path / "pairs.parquet", rows=40, bad_row=5)
    config = lift_config(tmp_path, num_frames=8, size=64)
    args = [sys.executable, "-m", "synth", "lift", "--images", str(tmp_path / "pairs.parquet"), "--config", str(config),
            "--samples-per-shard", "2", "--quiet"]
    out = tmp_path / "out"
    proc = subprocess.Popen([*args, "--out", str(out)], stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + HANG_GUARD
    while time.time() < deadline and len(list(out.glob("*.tar"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= len(list(out.glob("*.tar"))) < 20, "the kill should land mid-run"
    assert subprocess.run([*args, "--out", str(out)], capture_output=True).returncode == 2  # no --resume: refused
    assert subprocess.run([*args, "--out", str(out), "--resume"], capture_output=True).returncode == 0
    again = tmp_path / "again"
    assert subprocess.run([*args, "--out", str(again)], capture_output=True).returncode == 0
    assert members(out) == members(again) and len(members(out)) == 39 * 3
    assert read_manifest(out)["total_samples"] == 39 and len(read_attempts(out)) == 40


def test_lift_ranks_take_disjoint_rows(tmp_path, monkeypatch):
    write_parquet(tmp_path / "pairs.parquet", rows=5, bad_row=None)
    config = str(lift_config(tmp_path))
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(["lift", "--images", str(tmp_path / "pairs.parquet"), "--out", str(tmp_path / "o"), "--config",
                     config, "--quiet"]) == 0
    rows = sorted(a["row"] for a in read_attempts(tmp_path / "o"))
    assert rows == [0, 1, 2, 3, 4] and read_manifest(tmp_path / "o")["world"] == 2


# ------------------------------------------------------------------ mixed training
def test_weighted_sources_mix_at_their_weights_and_are_counted(tmp_path):
    from shard_fixtures import write_shards

    from train import ShardDataModule

    for name in ("video", "lifted"):
        write_shards(tmp_path / name, 6, per_shard=3)
    sources = [{"shards": str(tmp_path / "video"), "weight": 0.7, "name": "video"},
               {"shards": str(tmp_path / "lifted"), "weight": 0.3, "name": "lifted"}]
    dm = ShardDataModule(sources=sources, num_frames=4, resolution=16, batch_size=4, batches_per_epoch=50,
                         stream_seed=1, augment=False, shuffle_buffer=4)
    dm.setup("fit")
    picked = torch.cat([batch["source_index"] for batch in dm.train_dataloader()])
    assert len(picked) == 200 and abs(picked.float().mean().item() - 0.3) < 0.08
    again = torch.cat([b["source_index"] for b in ShardDataModule(sources=sources, num_frames=4, resolution=16,
                       batch_size=4, batches_per_epoch=50, stream_seed=1, augment=False, shuffle_buffer=4).train_dataloader()])
    assert torch.equal(picked, again)  # replayable per seed
    for bad, message in [([{"weight": 1}], "must be a mapping with shards"),
                         ([{"shards": "x", "weight": 0}], "weight must be positive"),
                         ([{"shards": "x", "wieght": 1}], "unknown key")]:
        with pytest.raises(ValueError, match=message):
            ShardDataModule(sources=bad)
    # through lightning fit: the per-source counts are logged and add up to the samples trained on
    config = tmp_path / "mix.yaml"
    config.write_text(json.dumps({"data": {"sources": sources}}))
    proc = subprocess.run([sys.executable, "-m", "train", "fit", "--config", str(ROOT / "configs/tiny.yaml"),
                           "--config", str(config), "--data.shards", "", "--trainer.max_steps", "3",
                           "--trainer.enable_progress_bar", "false", "--data.num_frames", "4",
                           "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=HANG_GUARD, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    last = [r for r in rows if r.get("data/samples_video")][-1]
    batch_size = 2  # configs/tiny.yaml
    assert float(last["data/samples_video"]) + float(last["data/samples_lifted"]) == 3 * batch_size


def test_source_epoch_windows_make_a_curriculum(tmp_path):
    from shard_fixtures import write_shards

    from train import ShardDataModule

    for name in ("first", "rest"):
        write_shards(tmp_path / name, 6, per_shard=3)
    first, rest = str(tmp_path / "first"), str(tmp_path / "rest")

    def epochs(sources, count=3):
        dm = ShardDataModule(sources=sources, num_frames=4, resolution=16, batch_size=4, batches_per_epoch=10,
                             stream_seed=1, augment=False, shuffle_buffer=4)
        loader = dm.train_dataloader()
        return [torch.cat([b["source_index"] for b in loader]) for _ in range(count)]

    # one source only in epoch 0, the other from epoch 1 on
    picked = epochs([{"shards": first, "until_epoch": 1}, {"shards": rest, "from_epoch": 1}])
    assert picked[0].eq(0).all() and picked[1].eq(1).all() and picked[2].eq(1).all()
    # a source added to a mixture for the first epoch only: mixed, then the other alone
    picked = epochs([{"shards": first, "until_epoch": 1}, {"shards": rest}])
    assert 0 < picked[0].float().mean() < 1 and picked[1].eq(1).all()
    assert torch.equal(picked[1], epochs([{"shards": first, "until_epoch": 1}, {"shards": rest}])[1])  # replayable
    for bad, message in [([{"shards": first, "until_epoch": 1}], "no source is drawn in epoch 1"),
                         ([{"shards": first, "from_epoch": 1}], "no source is drawn in epoch 0"),
                         ([{"shards": first, "from_epoch": 2, "until_epoch": 2}, {"shards": rest}], "from_epoch < until_epoch")]:
        with pytest.raises(ValueError, match=message):
            ShardDataModule(sources=bad)


def write_image_pair_shard(path: Path, count: int) -> None:
    """Image-edit pairs as shards: ``src.png`` / ``tgt.png`` and the json, one frame each."""
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            source = scene(64, 80, seed=i)
            edited, _ = with_patch(source)
            meta = {"instruction": "paint a red square", "input_caption": None, "output_caption": None,
                    "num_frames": 1, "height": 64, "width": 80, "fps": 8, "seed": i, "source": "images"}
            for name, data in ((f"{i:04d}.src.png", encode(source)), (f"{i:04d}.tgt.png", encode(edited)),
                               (f"{i:04d}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("how", ["camera", "repeat"])
def test_image_pairs_become_clips_and_mix_with_video_pairs(tmp_path, how):
    from shard_fixtures import write_shards

    from train import ShardDataModule

    (tmp_path / "images").mkdir()
    write_image_pair_shard(tmp_path / "images/pairs-000.tar", 4)
    write_shards(tmp_path / "video", 4, per_shard=2)
    sources = [{"shards": str(tmp_path / "video"), "weight": 0.5, "name": "video"},
               {"shards": str(tmp_path / "images"), "weight": 0.5, "name": "images"}]
    dm = ShardDataModule(sources=sources, num_frames=6, resolution=32, batch_size=4, batches_per_epoch=6, stream_seed=0,
                         augment=False, shuffle_buffer=2, image_clips=how)
    dm.setup("fit")
    seen = 0
    for batch in dm.train_dataloader():
        assert batch["source"].shape == batch["target"].shape == (4, 3, 6, 32, 32)
        for source, target, origin in zip(batch["source"], batch["target"], batch["source_index"]):
            if origin != 1:
                continue
            seen += 1
            moves = (source[:, 0] - source[:, -1]).abs().mean().item()
            assert (moves > 0.02) if how == "camera" else (moves == 0)  # a camera moves; a repeat does not
            same = (source == target).all(0).float().mean().item()
            assert 0.4 < same < 1.0  # one shared view: only the painted square differs
    assert seen > 2
    with pytest.raises(ValueError, match="image_clips must be one of"):
        ShardDataModule(shards=str(tmp_path / "video"), image_clips="zoom")
