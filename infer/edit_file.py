"""A video file edited into a video file: frames streamed through the pipeline, audio carried over, partial output kept on failure."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

from .pipeline import EditSettings, InsV2VPipeline
from .video import VideoError, VideoInfo, VideoReader
from .video_writer import VideoWriter


class EditInterrupted(KeyboardInterrupt):
    """Ctrl-C during an edit; ``message`` names the partial file kept."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def edit_file(pipe: InsV2VPipeline, source: Path, output: Path, info: VideoInfo, settings: EditSettings,
              generator: torch.Generator, *, start: float | None = None, end: float | None = None,
              max_frames: int | None = None, stride: int = 1, strict: bool = True, crf: int = 18,
              codec: str | None = None, progress: bool = True, total_frames: int | None = None,
              warn: Callable[[str], None] = lambda w: print(f"infer: warning: {w}", file=sys.stderr)) -> VideoWriter:
    """Edit ``source`` into ``output`` (audio copied, transcoded or dropped with a warning). A
    failure once editing has begun keeps the frames edited so far as ``<stem>.partial<ext>`` and
    raises ``VideoError`` naming it (``EditInterrupted`` for Ctrl-C)."""
    reader = VideoReader(source, start=start, end=end, max_frames=max_frames, stride=stride, strict=strict)
    writer = VideoWriter(output, info.fps / stride, audio_from=source if info.has_audio else None, crf=crf,
                         codec=codec, audio_start=start or 0.0)
    for warning in writer.warnings:
        warn(warning)
    shown = len(writer.warnings)
    try:
        for frame in pipe.edit_stream(iter(reader), settings, generator=generator, progress=progress,
                                      total_frames=total_frames):
            if reader.start_time is not None and writer.frames_written == 0:
                writer.audio_start = reader.start_time  # the audio starts where the first edited frame does
            writer.write(frame, reader.times.popleft())
    except (VideoError, OSError, KeyboardInterrupt) as err:  # damaged input, a full disk, Ctrl-C
        kept = writer.abort(keep=True)
        saved = f"; the {writer.frames_written} frames edited before it are in {kept}" if kept else ""
        if isinstance(err, KeyboardInterrupt):
            raise EditInterrupted(f"interrupted{saved}") from None
        raise VideoError(f"{err}{saved}") from None
    except BaseException:
        kept = writer.abort(keep=True)
        if kept:
            print(f"infer: error after {writer.frames_written} frames; they are in {kept}", file=sys.stderr)
        raise
    writer.close()
    for warning in writer.warnings[shown:]:
        warn(warning)
    return writer
