"""Shards of moving-square pairs for the tests, written through the shard format's own module (shards.schema)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.schema import SOURCE, pair_sample, sample_key, shard_name, tar_bytes


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


def write_shards(folder: Path, num_samples: int, per_shard: int = 4, video_format: str = "mp4", frames: int = 8,
                 size: int = 32, corrupt_keys: tuple[int, ...] = ()) -> list[Path]:
    """``num_samples`` moving-square pairs in shards of ``per_shard``; the samples in ``corrupt_keys``
    get a source member that is not a video."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range((num_samples + per_shard - 1) // per_shard):
        samples = []
        for index in range(shard * per_shard, min(num_samples, (shard + 1) * per_shard)):
            src, tgt = moving_pair(index, frames, size)
            meta = {
                "input_caption": "a green square moving over a gradient",
                "instruction": "make the square red",
                "output_caption": "a red square moving over a gradient",
                "num_frames": frames, "height": size, "width": size, "fps": 8, "seed": index,
                "source": "jsonl", "generator": {"backbone": "test"}, "clip": None,
            }
            sample = pair_sample(sample_key(0, index), src, tgt, meta, video_format, 8)
            if index in corrupt_keys:
                sample[next(k for k in sample if k.startswith(f"{SOURCE}."))] = b"garbage"
            samples.append(sample)
        path = folder / shard_name("pairs", 0, shard)
        path.write_bytes(tar_bytes(samples))
        paths.append(path)
    return paths
