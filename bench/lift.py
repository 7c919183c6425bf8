"""Lifting benchmark: image-edit pairs lifted to video pairs per minute (decode, camera, encode, shard).

    python bench/lift.py                       # 48 pairs of 512² JPEGs -> 16x256² mp4 clips
    python bench/lift.py --pairs 96 --num-frames 16 --size 256 --video-format npy
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synth.lift import lift  # noqa: E402


def photo_like(seed: int, side: int) -> np.ndarray:
    """Smooth colour fields with noise: JPEG sizes like photographs' (InstructPix2Pix images are 512²)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:side, 0:side] / side
    channels = [np.sin(xs * rng.uniform(2, 9) + ys * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    image = (np.stack(channels, -1) * 90 + 128 + rng.normal(0, 12, (side, side, 3))).clip(0, 255)
    return image.astype(np.uint8)


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--video-format", choices=["mp4", "npy"], default="mp4")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for i in range(args.pairs):
            source = photo_like(i, args.image_size)
            edited = source.copy()
            edited[args.image_size // 4 : args.image_size // 2, args.image_size // 4 : args.image_size // 2] = (200, 30, 30)
            rows.append({"input_image": {"bytes": jpeg(source), "path": None},
                         "edited_image": {"bytes": jpeg(edited), "path": None}, "edit_prompt": "add a red square"})
        pq.write_table(pa.Table.from_pylist(rows), Path(tmp) / "pairs.parquet")
        config = yaml.safe_load((ROOT / "configs/synth/lift.yaml").read_text())
        config["camera"].update(num_frames=args.num_frames, size=args.size)
        config["output"]["video_format"] = args.video_format
        start = time.perf_counter()
        result = lift(config, Path(tmp) / "pairs.parquet", Path(tmp) / "out", progress=False)
        seconds = time.perf_counter() - start
    print(f"lift: {result.kept} pairs of {args.image_size}² images -> {args.num_frames}x{args.size}² "
          f"{args.video_format} clips in {seconds:.1f} s: {60 * result.kept / seconds:.0f} pairs/min")


if __name__ == "__main__":
    main()
