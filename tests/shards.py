"""A minimal writer of the shards of docs/shards.md, independent of `synth`, so the contract is tested both ways."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np

from infer import encode_video


def moving_pair(seed: int, frames: int = 8, size: int = 32):
    """A square moving over a gradient (source) and the same clip with the square recoloured (target)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size]
    background = np.stack([xs * 200 // size, ys * 200 // size, np.full_like(xs, 60)], -1).astype(np.uint8)
    src = np.repeat(background[None], frames, 0)
    tgt = src.copy()
    x, y = rng.integers(0, size // 2, 2)
    vx, vy = rng.integers(-2, 3, 2)
    for i in range(frames):
        px, py = int(np.clip(x + vx * i, 0, size - 8)), int(np.clip(y + vy * i, 0, size - 8))
        src[i, py : py + 8, px : px + 8] = (30, 200, 30)
        tgt[i, py : py + 8, px : px + 8] = (220, 30, 30)
    return src, tgt


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), int(time.time())
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, num_samples: int, per_shard: int = 4, video_format: str = "mp4", frames: int = 8,
                 size: int = 32, corrupt_keys: tuple[int, ...] = ()) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range((num_samples + per_shard - 1) // per_shard):
        path = folder / f"pairs-000-{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(shard * per_shard, min(num_samples, (shard + 1) * per_shard)):
                key = f"r000-{index:09d}-s0"
                src, tgt = moving_pair(index, frames, size)
                meta = {
                    "input_caption": "a green square moving over a gradient",
                    "instruction": "make the square red",
                    "output_caption": "a red square moving over a gradient",
                    "num_frames": frames, "height": size, "width": size, "fps": 8, "seed": index,
                    "source": "jsonl", "generator": {"backbone": "test"}, "clip": None,
                }
                if video_format == "mp4":
                    _add(tar, f"{key}.src.mp4", b"garbage" if index in corrupt_keys else encode_video(src, 8))
                    _add(tar, f"{key}.tgt.mp4", encode_video(tgt, 8))
                else:
                    for stem, array in (("src", src), ("tgt", tgt)):
                        buffer = io.BytesIO()
                        np.save(buffer, array)
                        _add(tar, f"{key}.{stem}.npy", buffer.getvalue())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        paths.append(path)
    return paths
