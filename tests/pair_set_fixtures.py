"""Tiny copies of the published pair sets' layouts, quirks included, written from generated clips."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from infer import write_video


def clip(seed: int, frames: int = 9, height: int = 36, width: int = 64) -> np.ndarray:
    """A smooth moving pattern of its own per seed, uint8 ``(F, H, W, 3)``."""
    rng = np.random.default_rng(seed)
    fx, fy, phase = rng.uniform(3, 12, 3)
    y, x = np.mgrid[0:height, 0:width]
    out = [np.stack([np.sin(x / fx + 0.3 * t + phase), np.cos(y / fy - 0.2 * t), np.sin((x + y) / (fx + fy) + 0.25 * t)], -1)
           for t in range(frames)]
    return ((np.stack(out) + 1) * 127.5).astype(np.uint8)


def edited(frames: np.ndarray) -> np.ndarray:
    """An 'edit': the colours turned."""
    return np.ascontiguousarray(frames[..., ::-1])


def video(path: Path, frames: np.ndarray, fps: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames, fps=fps)
    return path


def image(path: Path, frame: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def ditto(root: Path) -> dict:
    """Ditto-1M: videos under videos/, metadata lists in training_metadata/, a category still in its
    split archive, a sim2real list at the root, captions, a pair whose edit is its source and one
    whose path leaves the set. Landscape and portrait clips."""
    v = root / "videos"
    for i, (h, w) in enumerate([(36, 64), (64, 36), (36, 64)]):
        src = clip(i, height=h, width=w)
        video(v / f"source/h{i}.mp4", src)
        video(v / f"local/h{i}_1.mp4", edited(src))
        video(v / f"global_style1/h{i}_2.mp4", edited(src)[:, ::-1].copy())
    video(v / "local/h0_3.mp4", clip(0))  # "edited" = the source again
    (v / "global_freeform1").mkdir(parents=True)
    for part in ("00", "01"):
        (v / f"global_freeform1/global_freeform1.tar.gz.{part}").write_bytes(b"\x1f\x8b not extracted")
    write_json(root / "training_metadata/local.json", [
        {"source_path": "source/h0.mp4", "instruction": "make the sky red", "edited_path": "local/h0_1.mp4"},
        {"source_path": "videos/source/h1.mp4", "instruction": "add a hat", "edited_path": "videos/local/h1_1.mp4"},
        {"source_path": "source/h0.mp4", "instruction": "do nothing", "edited_path": "local/h0_3.mp4"},
        {"source_path": "../../outside.mp4", "instruction": "escape", "edited_path": "local/h0_1.mp4"},
    ])
    write_json(root / "training_metadata/global_style1.json", [
        {"source_path": f"source/h{i}.mp4", "instruction": "in watercolour", "edited_path": f"global_style1/h{i}_2.mp4"}
        for i in range(3)])
    write_json(root / "training_metadata/global_freeform1.json", [
        {"source_path": f"source/h{i}.mp4", "instruction": "a winter scene", "edited_path": f"global_freeform1/h{i}_4.mp4"}
        for i in range(3)])
    write_json(root / "sim2real.json", [{"source_path": "local/h2_1.mp4", "instruction": "make it real",
                                         "edited_path": "source/h2.mp4"}])
    write_json(root / "source_video_captions/captions.json", [{"path": "source/h0.mp4", "caption": "a field at noon"}])
    return {"kept": 6, "rejected": {"archive not extracted": 3, "edit identical to source": 1, "outside the set's folder": 1}}


def senorita(root: Path) -> dict:
    """Señorita-2M: task folders with numbered subfolders, ./-prefixed paths, a task list that names
    a folder by its old name, and additions written as removals reversed."""
    for i in range(2):
        src = clip(10 + i)
        video(root / f"obj_swap_upload/6{i}/v{i}_org.mp4", src)
        video(root / f"obj_swap_upload/6{i}/v{i}_swap.mp4", edited(src))
        video(root / f"obj_removal_videos_upload/7{i}/r{i}_org.mp4", src)
        video(root / f"obj_removal_videos_upload/7{i}/r{i}_rm.mp4", edited(src)[:, :, ::-1].copy())
    write_json(root / "updated_data_obj_swap_videos.json", [
        {"source_video_path": f"./obj_swap_videos/6{i}/v{i}_org.mp4", "target_video_path": f"./obj_swap_videos/6{i}/v{i}_swap.mp4",
         "enhanced_instruction": "swap the ball for a cube"} for i in range(2)])
    write_json(root / "updated_data_obj_removal_videos.json", [
        {"source_video_path": f"./obj_removal_videos_upload/7{i}/r{i}_org.mp4",
         "target_video_path": f"./obj_removal_videos_upload/7{i}/r{i}_rm.mp4", "enhanced_instruction": "remove the ball"}
        for i in range(2)])
    write_json(root / "updated_data_obj_addition_videos.json", [
        {"source_video_path": "./obj_removal_videos_upload/70/r0_rm.mp4",
         "target_video_path": "./obj_removal_videos_upload/70/r0_org.mp4", "enhanced_instruction": "add a ball"}])
    return {"kept": 5, "rejected": {}}


def openve(root: Path) -> dict:
    """OpenVE-3M: per-category CSVs of original_video, video, prompt relative to videos/, one row
    listed the wrong way round and one whose edit is shorter than its source."""
    v = root / "videos"
    for i in range(3):
        src = clip(20 + i, frames=13)
        video(v / f"original/o{i}.mp4", src)
        video(v / f"edited/o{i}_bg.mp4", edited(src))
    video(v / "edited/o2_short.mp4", edited(clip(22, frames=5)))
    write_csv(root / "background_change.csv", [
        ["original_video", "video", "prompt"],
        ["original/o0.mp4", "edited/o0_bg.mp4", "put it on a beach"],
        ["edited/o1_bg.mp4", "original/o1.mp4", "put it in a forest"],  # the wrong way round
    ])
    write_csv(root / "local_change.csv", [
        ["original_video", "video", "prompt"],
        ["original/o2.mp4", "edited/o2_bg.mp4", "make the car blue"],
        ["original/o2.mp4", "edited/o2_short.mp4", "make the car green"],
    ])
    return {"kept": 3, "rejected": {"frame count differs": 1}}


def insvie(root: Path) -> dict:
    """InsViE-1M: one positional CSV (no header); the edit under its subfolder and the source under
    the same name in the source folder; edits are the sources' first 4k + 1 frames."""
    for i in range(2):
        src = clip(30 + i, frames=13)
        video(root / f"source_videos/clip{i}.mp4", src)
        video(root / f"{'style' if i == 0 else 'object'}_edit/clip{i}.mp4", edited(src[:9]))
    write_csv(root / "train_insvie_align.csv", [
        ["clip0.mp4", "a river", "turn it into a painting", "a painted river", "style_edit"],
        ["clip1.mp4", "a road", "add a red car", "a road with a red car", "object_edit"],
        ["clip2.mp4", "missing", "anything", "x", "object_edit"],
        ["only", "two"],
    ])
    return {"kept": 2, "rejected": {"missing file": 1, "unreadable metadata": 1}}


def kiwi(root: Path) -> dict:
    """Kiwi-Edit: metadata CSVs (video and image rows, a reference image column) and a RefVIE
    Parquet chunk with reference image bytes, over the user's own downloads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = clip(40)
    video(root / "ditto/source/k0.mp4", src)
    video(root / "ditto/local/k0_1.mp4", edited(src))
    image(root / "images/a.png", src[0])
    image(root / "images/a_edit.png", edited(src)[0])
    image(root / "images/ref.png", src[3])
    write_csv(root / "kiwi_mix.csv", [
        ["prompt", "src_video", "tgt_video", "ref_image"],
        ["make it red", "ditto/source/k0.mp4", "ditto/local/k0_1.mp4", ""],
        ["make it red", "images/a.png", "images/a_edit.png", "images/ref.png"],
    ])
    buffer = io.BytesIO()
    Image.fromarray(src[2]).save(buffer, format="JPEG")
    (root / "refvie_477k").mkdir(parents=True)
    pq.write_table(pa.table({"iid": ["x1"], "prompt": ["like the reference"], "src_video": ["ditto/source/k0.mp4"],
                             "tgt_video": ["ditto/local/k0_1.mp4"], "ref_image_bytes": [buffer.getvalue()]}),
                   root / "refvie_477k/chunk_000.parquet")
    return {"kept": 3, "rejected": {}}


def insv2v(root: Path) -> dict:
    """The InsV2V authors' layout: per-prompt folders of frames per seed, prompt.json and metadata.jsonl."""
    src = clip(50, frames=4)
    folder = root / "0000001"
    write_json(folder / "prompt.json", {"input": "a dog runs", "output": "a cat runs", "edit": "turn the dog into a cat"})
    lines = []
    for seed in (11, 12):
        for side, frames in ((0, src), (1, edited(src) if seed == 11 else src[:, ::-1].copy())):
            for i, frame in enumerate(frames):
                image(folder / f"image/{seed}_{side}_{i:04d}.jpg", frame)
        lines.append(json.dumps({"seed": seed, "guidance_scale": 7.5, "sa_end_time": 0.4, "ca_end_time": 0.8,
                                 "edit_weight": 1.0, "sim_0": 0.3, "sim_1": 0.31, "sim_dir": 0.25, "sim_image": 0.9}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    write_json(root / "0000002/prompt.json", {"input": "x"})  # no metadata.jsonl: an unreadable row
    return {"kept": 2, "rejected": {"unreadable metadata": 1}}


def pairs(root: Path) -> dict:
    """The generic list: JSONL of source, edited, instruction relative to the file."""
    src = clip(60)
    video(root / "a.mp4", src)
    video(root / "a_red.mp4", edited(src))
    (root / "pairs.jsonl").write_text(
        json.dumps({"source": "a.mp4", "edited": "a_red.mp4", "instruction": "make it red", "category": "colour"}) + "\n"
        + json.dumps({"source": "a.mp4", "edited": "nope.mp4", "instruction": "x"}) + "\n" + "{not json\n")
    return {"kept": 1, "rejected": {"missing file": 1, "unreadable metadata": 1}}


LAYOUTS = {"ditto": ditto, "senorita": senorita, "openve": openve, "insvie": insvie, "kiwi": kiwi, "insv2v": insv2v,
           "pairs": pairs}
