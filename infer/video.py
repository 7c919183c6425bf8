"""Reading videos with PyAV: probing, streaming upright decode with frame times, and clip bytes for shards."""

from __future__ import annotations

import io
import os
import tempfile
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np


class VideoError(ValueError):
    """A file that cannot be read as a video (missing, not a video, empty or corrupt)."""


# Image sequences (``frames/%05d.png``) carry no frame rate; this one is assumed.
IMAGE_SEQUENCE_FPS = Fraction(25)
# Animated images FFmpeg's decoders cannot read (animated WebP) are read with Pillow.
PILLOW_SUFFIXES = (".webp",)
# Damaged packets raise instead of being concealed: an edit of silently smeared frames is worse
# than a clear error (``strict=False`` / ``infer edit --ignore-decode-errors`` accepts them).
STRICT_DECODING = {"err_detect": "explode"}


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int  # upright, after rotation metadata
    height: int
    fps: Fraction  # average rate; frame times follow the file's own timestamps
    num_frames: int  # as the container reports it; 0 when unknown
    has_audio: bool
    rotation: int = 0  # degrees counterclockwise the stored frames are turned for display
    duration: float | None = None  # seconds, when the container knows
    audio_codec: str | None = None

    @property
    def seconds(self) -> float | Fraction:
        """The video's length: the container's duration, else frames / rate (exact), else 0 (unknown)."""
        return self.duration or (self.num_frames / self.fps if self.num_frames else 0.0)


# The largest stored frame decoded (a 4096x4096 frame is 48 MiB as RGB); a larger one is a damaged
# or hostile file, refused from its header before any frame is decoded.
MAX_FRAME_PIXELS = 4096 * 4096


def is_image_sequence(path: str | os.PathLike) -> bool:
    """``frames/%05d.png``-style patterns (printf-style frame numbers); an existing file whose name
    holds a ``%`` (``speed 50%.mp4``) is that file, not a pattern."""
    return "%" in Path(path).name and not Path(path).exists()


def _open(path: str | os.PathLike):
    path = Path(path)
    if is_image_sequence(path):
        if not path.parent.is_dir():
            raise VideoError(f"no such folder: {path.parent}")
        try:
            return av.open(str(path), format="image2", options={"framerate": str(IMAGE_SEQUENCE_FPS)})
        except (av.FFmpegError, UnicodeDecodeError):
            raise VideoError(f"no images match {path}") from None
    if not path.exists():
        raise VideoError(f"no such file: {path}")
    if not path.is_file():
        raise VideoError(f"not a file: {path}")
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as err:
        raise VideoError(f"not a readable video: {path} ({err.__class__.__name__})") from None


def _frame_rotation(frame: av.VideoFrame, stream) -> int:
    """Degrees counterclockwise to turn ``frame`` for display: its display matrix, else the
    stream's legacy ``rotate`` tag (which counts clockwise)."""
    angle = int(round(frame.rotation or 0))
    if not angle and stream.metadata.get("rotate"):
        try:
            angle = -int(stream.metadata["rotate"])
        except ValueError:
            angle = 0
    return angle % 360


def upright(image: np.ndarray, rotation: int) -> np.ndarray:
    """``image`` turned ``rotation`` degrees counterclockwise (multiples of 90)."""
    turns = int(round(rotation / 90)) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def probe_video(path: str | os.PathLike, strict: bool = True, max_pixels: int = MAX_FRAME_PIXELS) -> VideoInfo:
    """Size (upright), frame rate, frame count, rotation and audio of a video; decodes the first
    frame, so a file that opens but cannot be decoded is reported here, before any editing. A
    stored frame size over ``max_pixels`` is refused before decoding."""
    if Path(path).suffix.lower() in PILLOW_SUFFIXES:
        return _probe_pillow(Path(path))
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(f"no video stream in {path}")
        stream = container.streams.video[0]
        if stream.width * stream.height > max_pixels:
            raise VideoError(f"its frames are {stream.width}x{stream.height}, over the {max_pixels:,}-pixel limit")
        if strict:
            stream.codec_context.options = STRICT_DECODING
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as err:
            raise VideoError(f"the first frame of {path} cannot be decoded (damaged data: "
                             f"{str(err).splitlines()[0]})") from None
        if first is None:
            raise VideoError(f"no frames could be decoded from {path}")
        rotation = _frame_rotation(first, stream)
        width, height = first.width, first.height
        if rotation % 180:
            width, height = height, width
        fps = stream.average_rate or stream.guessed_rate or (IMAGE_SEQUENCE_FPS if is_image_sequence(path) else Fraction(25))
        audio = container.streams.audio[0] if container.streams.audio else None
        duration = float(container.duration / av.time_base) if container.duration else None
        return VideoInfo(
            path=Path(path),
            width=width,
            height=height,
            fps=Fraction(fps),
            num_frames=int(stream.frames or 0),
            has_audio=audio is not None,
            rotation=rotation,
            duration=duration,
            audio_codec=audio.codec_context.name if audio is not None else None,
        )


def count_frames(path: str | os.PathLike, stop_after: int | None = None) -> tuple[int, float]:
    """``(frames, seconds)`` of a video read from its packets' timestamps (nothing is decoded): a
    container that states no duration (a raw H.264 stream) or states a false one is measured as it
    is. Counting stops once past ``stop_after`` frames. Packets without timestamps count at the
    stream's rate."""
    if Path(path).suffix.lower() in PILLOW_SUFFIXES:
        info = _probe_pillow(Path(path))
        return info.num_frames, float(info.seconds)
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or IMAGE_SEQUENCE_FPS)
        frames, first, last = 0, None, None
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's final flush packet
                    continue
                frames += 1
                if packet.pts is not None and packet.time_base is not None:
                    time = float(packet.pts * packet.time_base)
                    first = time if first is None else min(first, time)
                    last = time if last is None else max(last, time)
                if stop_after is not None and frames > stop_after:
                    break
        except av.FFmpegError as err:
            raise VideoError(f"corrupt video stream in {path} after {frames} packets: {str(err).splitlines()[0]}") from None
    timed = last - first + 1 / rate if first is not None else 0.0
    return frames, max(timed, frames / rate)


def _probe_pillow(path: Path) -> VideoInfo:
    frames = list(_pillow_frames(path))
    durations = np.diff([t for t, _ in frames]) if len(frames) > 1 else np.array([1 / 25])
    height, width = frames[0][1].shape[:2]
    return VideoInfo(path=path, width=width, height=height, fps=Fraction(1 / float(np.mean(durations))).limit_denominator(1000),
                     num_frames=len(frames), has_audio=False, duration=frames[-1][0] + float(durations[-1]))


def _pillow_frames(path: Path) -> Iterator[tuple[float, np.ndarray]]:
    """``(time, RGB frame)`` of an animated image read with Pillow (timing from each frame's duration)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise VideoError(f"no such file: {path}")
    try:
        image = Image.open(path)
        time = 0.0
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            yield time, np.asarray(image.convert("RGB"))
            time += (image.info.get("duration") or 40) / 1000
    except (UnidentifiedImageError, OSError, ValueError, EOFError) as err:
        raise VideoError(f"not a readable video: {path} ({err.__class__.__name__})") from None


class VideoReader:
    """Upright uint8 RGB frames ``(H, W, 3)`` of a video file, image sequence or animated image,
    decoded one at a time on several threads.

    ``start``/``end`` (seconds) select a range; then every ``stride``-th frame, at most
    ``max_frames``. :attr:`times` receives each yielded frame's presentation time (seconds after
    the first yielded frame), so variable frame rates keep their timing; :attr:`start_time` is
    the first yielded frame's time in the file's own timeline (where its audio is cut).
    Raises :class:`VideoError` for a file with no decodable frame or a stream that breaks mid-way;
    with ``strict`` (the default) also for damaged data the decoder would otherwise conceal.
    """

    def __init__(self, path: str | os.PathLike, *, start: float | None = None, end: float | None = None,
                 max_frames: int | None = None, stride: int = 1, strict: bool = True):
        if stride < 1:
            raise ValueError("stride must be >= 1")
        if start is not None and end is not None and end <= start:
            raise ValueError(f"end ({end}) must be after start ({start})")
        self.path, self.start, self.end, self.max_frames, self.stride = Path(path), start, end, max_frames, stride
        self.strict = strict
        self.times: deque[float] = deque()
        self.start_time: float | None = None
        self.frames_yielded = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        index = 0
        for time, frame in self._timed_frames():
            if self.start is not None and time < self.start - 1e-6:
                continue
            if self.end is not None and time >= self.end - 1e-6:
                break
            if self.max_frames is not None and self.frames_yielded >= self.max_frames:
                break
            index += 1
            if (index - 1) % self.stride:
                continue
            if self.start_time is None:
                self.start_time = time
            self.times.append(time - self.start_time)
            self.frames_yielded += 1
            yield frame
        if self.frames_yielded == 0:
            where = "" if self.start is None and self.end is None else f" in {self.start or 0:g}-{self.end or 'end'} s"
            raise VideoError(f"no frames could be decoded from {self.path}{where}")

    def _timed_frames(self) -> Iterator[tuple[float, np.ndarray]]:
        if self.path.suffix.lower() in PILLOW_SUFFIXES:
            yield from _pillow_frames(self.path)
            return
        with _open(self.path) as container:
            if not container.streams.video:
                raise VideoError(f"no video stream in {self.path}")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame- and slice-threaded decoding
            if self.strict:
                stream.codec_context.options = STRICT_DECODING
            rate = float(stream.average_rate or stream.guessed_rate or IMAGE_SEQUENCE_FPS)
            if self.start:
                try:  # to the keyframe before start; the frames up to start are decoded and skipped
                    container.seek(int(self.start * av.time_base), backward=True)
                except av.FFmpegError:
                    pass
            try:
                for number, frame in enumerate(container.decode(stream)):
                    time = frame.time if frame.time is not None else number / rate
                    rotation = _frame_rotation(frame, stream)
                    yield float(time), upright(frame.to_ndarray(format="rgb24"), rotation)
            except av.FFmpegError as err:
                raise VideoError(f"corrupt video stream in {self.path} after {self.frames_yielded} frames: "
                                 f"{str(err).splitlines()[0]}") from None


def iter_frames(path: str | os.PathLike, max_frames: int | None = None, stride: int = 1,
                start: float | None = None, end: float | None = None) -> Iterator[np.ndarray]:
    """Upright uint8 RGB frames one at a time (see :class:`VideoReader`)."""
    return iter(VideoReader(path, start=start, end=end, max_frames=max_frames, stride=stride))


def read_video(path: str | os.PathLike, max_frames: int | None = None, stride: int = 1) -> np.ndarray:
    """All frames as uint8 ``(F, H, W, 3)`` (for short clips; long videos: :func:`iter_frames`)."""
    return np.stack(list(iter_frames(path, max_frames=max_frames, stride=stride)))


def decode_video(data: bytes, max_frames: int | None = None, max_pixels: int = MAX_FRAME_PIXELS) -> np.ndarray:
    """The frames of an in-memory video file as uint8 ``(F, H, W, 3)``: all of them, or the first
    ``max_frames`` (decoding stops there). A frame size over ``max_pixels`` is refused unread."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoError("no video stream")
            stream = container.streams.video[0]
            if stream.width * stream.height > max_pixels:
                raise VideoError(f"frames of {stream.width}x{stream.height} exceed the {max_pixels:,}-pixel limit")
            frames = []
            for frame in container.decode(stream):
                if frame.width * frame.height > max_pixels:
                    raise VideoError(f"frames of {frame.width}x{frame.height} exceed the {max_pixels:,}-pixel limit")
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except av.FFmpegError as err:
        raise VideoError(f"corrupt video: {err}") from None
    if not frames:
        raise VideoError("no frames could be decoded")
    return np.stack(frames)


# x264 settings under which the same frames give the same bytes: one thread, and no lookahead
# (its SIMD analysis made two encodes of one clip differ on some CPUs)
EXACT_X264 = {"x264-params": "threads=1:rc-lookahead=0:no-mbtree=1"}


def encode_video(frames: np.ndarray, fps: Fraction | float, crf: int = 18, exact: bool = False) -> bytes:
    """uint8 ``(F, H, W, 3)`` frames as the bytes of an H.264 mp4 (for shards). ``exact``: the same
    frames always give the same bytes (colour converted in numpy, one encoder thread)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001 * 1000))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), **(EXACT_X264 if exact else {})}
        if exact:
            stream.codec_context.thread_count = 1
        for index, frame in enumerate(frames):
            if exact:
                picture = av.VideoFrame.from_ndarray(rgb_to_yuv420(frame), format="yuv420p")
                picture.pts = index  # stated, not guessed by the encoder
            else:
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()



def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (creating its folder) so that readers see the old file or the whole
    new one, never a part. The temporary file's name is unique to this call, so processes writing
    the same path at once each replace it whole."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # name the user's path, not the hidden temporary one
        try:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def rgb_to_yuv420(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, 3)`` RGB as one planar YUV 4:2:0 array ``(3H/2, W)`` (BT.601, limited range,
    chroma averaged over 2x2), as libswscale's default but computed the same way on every call:
    swscale's SIMD paths depend on buffer alignment, so the same frames can encode differently::

        Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255
        U = 128 + (-37.797 R - 74.203 G + 112 B) / 255,   V = 128 + (112 R - 93.786 G - 18.214 B) / 255
    """
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    h, w = r.shape
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255

    def quarter(plane: np.ndarray) -> np.ndarray:
        return plane.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [np.clip(np.round(p), 0, 255).astype(np.uint8).ravel() for p in (y, quarter(u), quarter(v))]
    return np.concatenate(planes).reshape(h * 3 // 2, w)


def yuv420_to_rgb(planes: np.ndarray) -> np.ndarray:
    """Planar YUV 4:2:0 ``(3H/2, W)`` (BT.601, limited range) as uint8 RGB ``(H, W, 3)``, chroma
    repeated over 2x2, computed the same way on every call (libswscale's SIMD paths depend on
    buffer alignment, so the same file can decode to frames a level apart)::

        R = 1.164 (Y - 16) + 1.596 (V - 128)
        G = 1.164 (Y - 16) - 0.392 (U - 128) - 0.813 (V - 128)
        B = 1.164 (Y - 16) + 2.017 (U - 128)
    """
    h, w = planes.shape[0] * 2 // 3, planes.shape[1]
    flat = planes.ravel()
    y = flat[: h * w].reshape(h, w).astype(np.float64) - 16
    u, v = (flat[h * w + i * (h * w // 4): h * w + (i + 1) * (h * w // 4)].reshape(h // 2, w // 2)
            .repeat(2, 0).repeat(2, 1).astype(np.float64) - 128 for i in range(2))
    rgb = np.stack([1.164 * y + 1.596 * v, 1.164 * y - 0.392 * u - 0.813 * v, 1.164 * y + 2.017 * u], -1)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def read_video_exact(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """All frames of a video as uint8 ``(F, H, W, 3)``, the same bits on every read: 4:2:0 frames
    (even sides, no rotation) are converted by :func:`yuv420_to_rgb`; any other video is read as
    :func:`read_video` reads it."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.codec_context.pix_fmt != "yuv420p" or stream.codec_context.width % 2 or stream.codec_context.height % 2:
            return read_video(path, max_frames=max_frames)
        frames = []
        for frame in container.decode(stream):
            if frame.format.name != "yuv420p" or int(round(frame.rotation or 0)):
                return read_video(path, max_frames=max_frames)
            frames.append(yuv420_to_rgb(frame.to_ndarray()))
            if max_frames and len(frames) >= max_frames:
                break
    if not frames:
        raise VideoError(f"{path} has no frames")
    return np.stack(frames)
