"""Video I/O with PyAV: probing, streaming decode, H.264 encode with the source's audio."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np


class VideoError(ValueError):
    """A file that cannot be read as a video (missing, not a video, empty or corrupt)."""


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: Fraction
    num_frames: int  # as the container reports it; 0 when unknown
    has_audio: bool


def _open(path: str | os.PathLike):
    path = Path(path)
    if not path.exists():
        raise VideoError(f"no such file: {path}")
    if not path.is_file():
        raise VideoError(f"not a file: {path}")
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as err:
        raise VideoError(f"not a readable video: {path} ({err.__class__.__name__})") from None


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Size, frame rate, frame count and audio presence of a video file."""
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(f"no video stream in {path}")
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate or Fraction(25)
        return VideoInfo(
            path=Path(path),
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=Fraction(fps),
            num_frames=int(stream.frames or 0),
            has_audio=bool(container.streams.audio),
        )


def iter_frames(path: str | os.PathLike, max_frames: int | None = None, stride: int = 1) -> Iterator[np.ndarray]:
    """Decode frames one at a time as uint8 RGB ``(H, W, 3)``: every ``stride``-th, at most ``max_frames``.

    Raises :class:`VideoError` for a file with no decodable frame or a stream that breaks mid-way.
    """
    if stride < 1:
        raise ValueError("stride must be >= 1")
    yielded = 0
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(f"no video stream in {path}")
        stream = container.streams.video[0]
        try:
            for index, frame in enumerate(container.decode(stream)):
                if max_frames is not None and yielded >= max_frames:
                    break
                if index % stride:
                    continue
                yield frame.to_ndarray(format="rgb24")
                yielded += 1
        except av.FFmpegError as err:
            raise VideoError(f"corrupt video stream in {path} after {yielded} frames: {err}") from None
    if yielded == 0:
        raise VideoError(f"no frames could be decoded from {path}")


def read_video(path: str | os.PathLike, max_frames: int | None = None, stride: int = 1) -> np.ndarray:
    """All frames as uint8 ``(F, H, W, 3)`` (for short clips; long videos: :func:`iter_frames`)."""
    return np.stack(list(iter_frames(path, max_frames=max_frames, stride=stride)))


class VideoWriter:
    """Write an H.264 mp4 atomically: frames go to a hidden temporary file beside ``path``, which
    replaces ``path`` only when :meth:`close` succeeds; on error nothing is left behind.

    ``audio_from`` copies that file's first audio stream (up to the video's duration).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: Fraction | float,
        audio_from: str | os.PathLike | None = None,
        crf: int = 18,
    ):
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001 * 1000)
        self.audio_from = audio_from
        self.crf = crf
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".tmp.mp4", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        self._stream = None
        self._audio = None  # (source container, source stream, output stream)
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        if self._stream is None:
            h, w = frame.shape[:2]
            if h % 2 or w % 2:
                raise ValueError(f"H.264 needs even frame sizes, got {w}x{h}")
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height = w, h
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf)}
            self._add_audio_stream()  # every stream must exist before the first packet is muxed
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self.frames_written += 1

    def write_all(self, frames: Iterable[np.ndarray]) -> None:
        for frame in frames:
            self.write(frame)

    def close(self) -> Path:
        """Finish the file and move it into place."""
        try:
            if self._stream is None:
                raise ValueError("no frames were written")
            for packet in self._stream.encode():
                self._container.mux(packet)
            if self._audio is not None:
                self._copy_audio(float(self.frames_written / self.fps))
            self._container.close()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp makes owner-only files
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        for container in (self._container, self._audio[0] if self._audio else None):
            try:
                if container is not None:
                    container.close()
            except Exception:  # already closed or half-written: the file is deleted anyway
                pass
        self._tmp.unlink(missing_ok=True)

    def _add_audio_stream(self) -> None:
        if self.audio_from is None:
            return
        source = av.open(str(self.audio_from))
        if not source.streams.audio:
            source.close()
            return
        src = source.streams.audio[0]
        self._audio = (source, src, self._container.add_stream_from_template(src))

    def _copy_audio(self, duration: float) -> None:
        """Remux (no re-encode) the source's audio packets that start before ``duration``."""
        source, src, out = self._audio
        with source:
            for packet in source.demux(src):
                if packet.dts is None:
                    continue
                if packet.pts is not None and float(packet.pts * src.time_base) >= duration:
                    break
                packet.stream = out
                self._container.mux(packet)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: Fraction | float, audio_from=None) -> Path:
    """Write uint8 ``(H, W, 3)`` frames as an H.264 mp4 (see :class:`VideoWriter`)."""
    with VideoWriter(path, fps, audio_from=audio_from) as writer:
        writer.write_all(frames)
    return Path(path)


def decode_video(data: bytes) -> np.ndarray:
    """Every frame of an in-memory video file as uint8 ``(F, H, W, 3)``."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoError("no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    except av.FFmpegError as err:
        raise VideoError(f"corrupt video: {err}") from None
    if not frames:
        raise VideoError("no frames could be decoded")
    return np.stack(frames)


def encode_video(frames: np.ndarray, fps: Fraction | float, crf: int = 18) -> bytes:
    """uint8 ``(F, H, W, 3)`` frames as the bytes of an H.264 mp4 (for shards)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001 * 1000))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()



def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
