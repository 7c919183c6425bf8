"""Real clips for FlowEdit pairs: videos in a folder or the sources of pair shards, cut and sized for the renderer, with their captions."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from infer.video import VideoError, iter_frames
from shards.schema import SOURCE, shard_frames

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


@dataclass(frozen=True)
class SourceClip:
    """Where a clip comes from: a video file, or one sample of a shard (``member`` is its key)."""

    path: Path
    member: str | None = None
    caption: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.member}" if self.member else self.path.name


def list_clips(sources: Path, captions: Path | None = None) -> list[SourceClip]:
    """The clips of ``sources`` in a fixed order: video files (recursively) or the samples of
    ``.tar`` shards; with ``captions`` (JSONL of ``{"video", "caption"}``, paths relative to the
    captions file or to ``sources``) the clips it lists, in its order, with their captions."""
    if captions is not None:
        clips = []
        for number, line in enumerate(captions.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                video, caption = str(record["video"]), str(record["caption"]).strip()
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{captions} line {number}: expected {{\"video\": ..., \"caption\": ...}}") from None
            path = next((p for p in (captions.parent / video, sources / video) if p.is_file()), sources / video)
            clips.append(SourceClip(path, caption=caption or None))
        if not clips:
            raise ValueError(f"{captions} lists no clips")
        return clips
    if not sources.exists():
        raise FileNotFoundError(f"no source clips at {sources}")
    if sources.is_file() and sources.suffix.lower() != ".tar":
        return [SourceClip(sources)]
    shards = sorted(sources.glob("*.tar")) if sources.is_dir() else [sources]
    if shards:
        clips = []
        for shard in shards:
            with tarfile.open(shard) as tar:
                keys = sorted({m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.split(".", 1)[-1].startswith(SOURCE)})
            clips += [SourceClip(shard, key) for key in keys]
        return clips
    clips = [SourceClip(p) for p in sorted(sources.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()]
    if not clips:
        raise ValueError(f"{sources} holds no videos ({', '.join(VIDEO_SUFFIXES)}) and no .tar shards")
    return clips


def fit_frames(frames: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Frames resized to cover ``height`` x ``width`` and centre-cropped to it (no distortion)."""
    h, w = frames[0].shape[:2]
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    out = []
    for frame in frames:
        resized = cv2.resize(frame, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        y, x = (size[1] - height) // 2, (size[0] - width) // 2
        out.append(resized[y : y + height, x : x + width])
    return np.stack(out)


def read_clip(clip: SourceClip, num_frames: int, height: int, width: int) -> np.ndarray:
    """The clip's first ``num_frames`` frames, sized; ``ValueError`` when it is shorter or unreadable."""
    try:
        if clip.member is not None:
            with tarfile.open(clip.path) as tar:
                sample = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()
                          if m.name.split(".", 1)[0] == clip.member and m.isfile()}
            frames = list(shard_frames(sample, SOURCE, num_frames))
        else:
            frames = list(iter_frames(clip.path, max_frames=num_frames))
    except (VideoError, KeyError, OSError, tarfile.TarError) as err:
        raise ValueError(f"unreadable: {err}") from None
    if len(frames) < num_frames:
        raise ValueError(f"too short: {len(frames)} of {num_frames} frames")
    return fit_frames(frames, height, width)

