"""Perceptual hashes of video frames, and the index of benchmark videos that keeps them out of training sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shards.schema import IMAGE_EXTS

HASH_SIDE = 32  # frames are hashed from a 32x32 grey thumbnail
HASH_BITS = 8  # the 8x8 lowest DCT frequencies: 64 bits
# two frames match when their hashes differ in at most this many of 64 bits: re-encoded, resized
# copies measured 2-18 here, unrelated clips 20-38 (random hashes differ in 32 +- 4)
MATCH_BITS = 14
FLAT_STD = 2.0  # a near-uniform frame (a fade, a black frame) says nothing about which video it is


def frame_hash(frame: np.ndarray) -> int | None:
    """A 64-bit perceptual hash of an RGB frame (pHash): the signs of its lowest 8x8 DCT
    frequencies against their median, on a 32x32 grey thumbnail,

        h_k = [D(g)_k > median_j D(g)_j],   D = 2D DCT-II,  g = grey(resize(frame, 32x32)).

    Re-encoding, resizing and small colour shifts move few bits. ``None`` for a near-uniform frame."""
    grey = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    if float(grey.std()) < FLAT_STD:
        return None
    thumb = cv2.resize(grey, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(thumb)[:HASH_BITS, :HASH_BITS].flatten()
    bits = low > np.median(low[1:])  # the DC term is the mean brightness: left out of the median
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: np.ndarray, b: int) -> np.ndarray:
    """Bits that differ between each hash of ``a`` (uint64) and ``b``."""
    x = np.bitwise_xor(a, np.uint64(b))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)


def sampled_hashes(frames: list[np.ndarray]) -> list[int]:
    """The hashes of ``frames`` that are not near-uniform."""
    return [h for h in map(frame_hash, frames) if h is not None]


@dataclass
class LeakageIndex:
    """Every frame hash of a set of reference videos (a benchmark's sources), by video."""

    hashes: np.ndarray  # uint64, one per hashed frame
    owners: np.ndarray  # the index into ``names`` of each hash's video
    names: list[str]

    @classmethod
    def from_frames(cls, videos: dict[str, list[np.ndarray]]) -> "LeakageIndex":
        hashes, owners, names = [], [], []
        for name, frames in videos.items():
            found = sampled_hashes(frames)
            hashes += found
            owners += [len(names)] * len(found)
            names.append(name)
        return cls(np.array(hashes, np.uint64), np.array(owners, np.int64), names)

    def match(self, frames: list[np.ndarray], share: float = 0.5) -> str | None:
        """The reference video that ``frames`` (a few frames sampled across a clip) come from: the
        one holding a near copy (:data:`MATCH_BITS`) of more than ``share`` of them. Sampling
        frames across the clip and comparing each with every frame of the reference makes a match
        survive trimming, frame-rate changes, re-encoding and resizing."""
        probes = sampled_hashes(frames)
        if not probes or not len(self.hashes):
            return None
        votes = np.zeros(len(self.names), np.int64)
        for probe in probes:
            near = np.unique(self.owners[hamming(self.hashes, probe) <= MATCH_BITS])
            votes[near] += 1
        best = int(votes.argmax())
        return self.names[best] if votes[best] > share * len(probes) else None


MAX_REFERENCE_FRAMES = 256  # frames hashed per reference video, spread over its length


def spread(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames, first and last included."""
    return np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int)).tolist() if total else []


IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTS)


def video_frames(path: Path, count: int, total: int | None = None) -> list[np.ndarray]:
    """``count`` frames spread over a video's first ``total`` frames (default: all), decoded in one
    pass; a folder of frame images, or one image (its one frame)."""
    from infer.video import iter_frames, probe_video
    from shards.schema import read_image

    if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
        return [read_image(path.read_bytes())]
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [np.asarray(Image.open(files[i]).convert("RGB")) for i in spread(len(files), count)]
    total = total or probe_video(path).num_frames
    if total <= 0:  # the container does not say: read it all, then pick
        frames = list(iter_frames(path))
        return [frames[i] for i in spread(len(frames), count)]
    picks = set(spread(total, count))
    return [f for i, f in enumerate(iter_frames(path, max_frames=max(picks) + 1)) if i in picks]


def benchmark_index(paths: list[Path], frames_per_video: int = MAX_REFERENCE_FRAMES) -> LeakageIndex:
    """The leakage index of benchmark files ``infer eval --benchmark`` reads (every format it
    knows): each source video's frames, hashed."""
    from infer.benchmarks import read_benchmark

    videos = {}
    for path in paths:
        for item in read_benchmark(path)[1]:
            if str(item.video) not in videos:
                videos[str(item.video)] = video_frames(Path(item.video), frames_per_video)
    return LeakageIndex.from_frames(videos)
