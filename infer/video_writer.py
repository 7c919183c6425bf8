"""Writing edited videos: the container by extension, the source's audio kept, nothing finished lost."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np

from .video import EXACT_X264, VideoError, rgb_to_yuv420


@dataclass(frozen=True)
class OutputFormat:
    container: str
    video_codec: str
    pix_fmt: str
    audio_codec: str | None  # what audio the container cannot hold as it is becomes; None: no audio
    time_base: Fraction = Fraction(1, 90000)
    options: dict[str, str] = field(default_factory=dict)


# The output container follows the -o extension.
OUTPUT_FORMATS = {
    ".mp4": OutputFormat("mp4", "libx264", "yuv420p", "aac", options={"movflags": "+faststart"}),
    ".mov": OutputFormat("mov", "libx264", "yuv420p", "aac", options={"movflags": "+faststart"}),
    ".mkv": OutputFormat("matroska", "libx264", "yuv420p", "aac", time_base=Fraction(1, 1000)),
    ".webm": OutputFormat("webm", "libvpx-vp9", "yuv420p", "libopus", time_base=Fraction(1, 1000)),
    ".gif": OutputFormat("gif", "gif", "rgb8", None, time_base=Fraction(1, 100)),
}
# Codecs whose quality is set by a constant rate factor.
CRF_CODECS = ("libx264", "libx265", "libvpx-vp9", "libvpx")
# Bytes per output pixel assumed when checking free disk space (generous for CRF 18 H.264).
ESTIMATED_BYTES_PER_PIXEL = 0.25
# Audio codecs copied as they are, per container (others are transcoded): what players of that
# container commonly play, not everything its muxer accepts (FFmpeg writes PCM into mp4, few play it).
# A container not listed copies whatever its muxer takes.
COPYABLE_AUDIO = {
    "mp4": ("aac", "mp3", "ac3", "eac3", "alac"),
    "mov": ("aac", "mp3", "ac3", "alac", "pcm"),
    "webm": ("opus", "vorbis"),
}
STANDARD_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def output_format(path: str | os.PathLike) -> OutputFormat:
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise VideoError(f"output must end in {', '.join(OUTPUT_FORMATS)}, got {Path(path).name}")
    return OUTPUT_FORMATS[suffix]


def partial_path(path: Path) -> Path:
    """Where the frames written before a failure are kept: ``clip.partial.mp4`` beside ``clip.mp4``."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


@dataclass(frozen=True)
class AudioPlan:
    mode: str  # "copy" (remux as is), "transcode" (to the container's codec) or "none"
    warning: str | None = None


def _layout(stream) -> str:
    return STANDARD_LAYOUTS.get(stream.channels, "stereo")


def _encoder_rate(codec: str, rate: int) -> int:
    """``rate`` if the encoder takes it, else the nearest higher rate it takes (Opus: 48 kHz)."""
    rates = av.codec.Codec(codec, "w").audio_rates
    if not rates or rate in rates:
        return rate
    higher = [r for r in rates if r >= rate]
    return min(higher) if higher else max(rates)


def _audio_encoder(container, codec: str, source_stream):
    """An output audio stream of ``codec`` for ``source_stream``, and the resampler feeding it."""
    out = container.add_stream(codec, rate=_encoder_rate(codec, source_stream.rate))
    out.layout = _layout(source_stream)
    return out, av.AudioResampler(format=out.format, layout=out.layout, rate=out.rate)


def _dry_run(fmt: OutputFormat, source: Path, transcode: bool) -> None:
    """Mux the first second of ``source``'s audio into an in-memory file of ``fmt``: raises what
    the real write would raise at its first audio packet (e.g. PCM in mp4)."""
    with av.open(str(source)) as src, av.open(io.BytesIO(), mode="w", format=fmt.container) as out:
        stream = src.streams.audio[0]
        if not transcode:
            target = out.add_stream_from_template(stream)
            for packet in src.demux(stream):
                if packet.dts is None:
                    continue
                packet.stream = target
                out.mux(packet)
                break
            return
        target, resampler = _audio_encoder(out, fmt.audio_codec, stream)
        for frame in src.decode(stream):
            frame.pts = None
            for part in resampler.resample(frame):
                for packet in target.encode(part):
                    out.mux(packet)
            if frame.time is not None and frame.time > (stream.start_time or 0) * stream.time_base + 1:
                break
        for packet in target.encode(None):
            out.mux(packet)


def plan_audio(source: str | os.PathLike | None, path: str | os.PathLike) -> AudioPlan:
    """How ``source``'s first audio stream gets into ``path``: copied if the container holds its
    codec, else transcoded (AAC for mp4/mov/mkv, Opus for webm), else dropped with a warning.
    Decided by trial muxing in memory, before any frame is edited."""
    fmt = output_format(path)
    if source is None:
        return AudioPlan("none")
    try:
        with av.open(str(source)) as src:
            if not src.streams.audio:
                return AudioPlan("none")
            codec = src.streams.audio[0].codec_context.name
    except av.FFmpegError:
        return AudioPlan("none", "the source's audio cannot be read: the output has none")
    if fmt.audio_codec is None:
        return AudioPlan("none", f"{Path(path).suffix} holds no audio: the source's {codec} audio is dropped")
    copyable = COPYABLE_AUDIO.get(fmt.container)
    if copyable is None or codec in copyable or (codec.startswith("pcm_") and "pcm" in copyable):
        try:
            _dry_run(fmt, Path(source), transcode=False)
            return AudioPlan("copy")
        except (av.FFmpegError, ValueError):
            pass
    try:
        _dry_run(fmt, Path(source), transcode=True)
        return AudioPlan("transcode", None)
    except (av.FFmpegError, ValueError) as err:
        return AudioPlan("none", f"the source's {codec} audio cannot go into {Path(path).suffix} "
                                 f"and could not be converted to {fmt.audio_codec} ({type(err).__name__}): dropped")


def check_output_path(path: str | os.PathLike, estimated_bytes: int = 0) -> Path:
    """Create ``path``'s folder (and its parents) and check it is writable with room for about
    ``estimated_bytes``; problems raise :class:`VideoError` naming the user's path."""
    path = Path(path)
    output_format(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VideoError(f"cannot create the output folder {folder}: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VideoError(f"the output folder {folder} is not writable")
    free = shutil.disk_usage(folder).free
    if estimated_bytes and free < estimated_bytes:
        raise VideoError(f"not enough disk space in {folder}: about {estimated_bytes / 1e6:.0f} MB needed, "
                         f"{free / 1e6:.0f} MB free")
    return path


class VideoWriter:
    """Write a video atomically, in the container the extension names (:data:`OUTPUT_FORMATS`).

    Frames go to a hidden temporary file beside ``path``, which replaces ``path`` only when
    :meth:`close` succeeds. ``audio_from``'s first audio stream, from ``audio_start`` seconds of
    its timeline, is copied, or transcoded when the container cannot hold it (decided before the
    first frame, :func:`plan_audio`), and interleaved as frames arrive. ``write(frame, time)``
    places each frame at its own time (variable frame rates keep their timing); without times,
    frames are ``1/fps`` apart. :meth:`abort` with ``keep=True`` finishes what was written as
    ``<name>.partial<ext>`` instead of deleting it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: Fraction | float,
        audio_from: str | os.PathLike | None = None,
        crf: int = 18,
        codec: str | None = None,
        audio_start: float = 0.0,
        exact: bool = False,
    ):
        self.path = check_output_path(path)
        self.exact = exact
        self.format = output_format(self.path)
        self.fps = Fraction(fps).limit_denominator(1001 * 1000)
        self.crf = crf
        self.codec = codec or self.format.video_codec
        try:
            av.codec.Codec(self.codec, "w")
        except (av.FFmpegError, ValueError):
            raise VideoError(f"no video encoder named {self.codec!r} in this FFmpeg build") from None
        self.audio_from = audio_from
        self.audio_start = float(audio_start)
        self.audio_plan = plan_audio(audio_from, self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".tmp{self.path.suffix}", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._container = av.open(str(self._tmp), mode="w", format=self.format.container,
                                  options=dict(self.format.options))
        self._stream = None
        self._audio = None  # (source container, source stream, output stream, packet/frame iterator, resampler)
        self._last_pts = -1
        self._last_time = 0.0
        self.frames_written = 0
        self.warnings = [self.audio_plan.warning] if self.audio_plan.warning else []

    # ------------------------------------------------------------------ video
    def write(self, frame: np.ndarray, time: float | None = None) -> None:
        if self._stream is None:
            self._open_streams(*frame.shape[:2])
        time = self.frames_written / self.fps if time is None else time
        pts = max(int(round(float(time) / self.format.time_base)), self._last_pts + 1)
        if self.exact and self.format.pix_fmt == "yuv420p":
            video_frame = av.VideoFrame.from_ndarray(rgb_to_yuv420(frame), format="yuv420p")
        else:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video_frame.pts, video_frame.time_base = pts, self.format.time_base
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self._last_pts, self._last_time = pts, float(pts * self.format.time_base)
        self.frames_written += 1
        self._pump_audio(self._last_time)

    def write_all(self, frames: Iterable[np.ndarray]) -> None:
        for frame in frames:
            self.write(frame)

    def _open_streams(self, h: int, w: int) -> None:
        if self.format.pix_fmt == "yuv420p" and (h % 2 or w % 2):
            raise ValueError(f"{self.codec} in yuv420p needs even frame sizes, got {w}x{h}")
        stream = self._container.add_stream(self.codec, rate=self.fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = self.format.pix_fmt
        stream.codec_context.time_base = self.format.time_base
        if self.exact:
            stream.codec_context.thread_count = 1
        if self.codec in CRF_CODECS:
            stream.options = {"crf": str(self.crf), **({"b": "0"} if self.codec.startswith("libvpx") else {}),
                              **({"x265-params": "log-level=error"} if self.codec == "libx265" else {}),
                              **(EXACT_X264 if self.exact and self.codec == "libx264" else {})}
        self._stream = stream
        self._add_audio_stream()  # every stream must exist before the first packet is muxed

    # ------------------------------------------------------------------ audio
    def _add_audio_stream(self) -> None:
        if self.audio_plan.mode == "none":
            return
        source = av.open(str(self.audio_from))
        src = source.streams.audio[0]
        if self.audio_plan.mode == "copy":
            out = self._container.add_stream_from_template(src)
            resampler = None
            items = source.demux(src)
        else:
            out, resampler = _audio_encoder(self._container, self.format.audio_codec, src)
            items = source.decode(src)
        if self.audio_start > 0:
            try:
                source.seek(int(self.audio_start * av.time_base), backward=True)
            except av.FFmpegError:
                pass
        self._audio = [source, src, out, iter(items), resampler, None]

    def _pump_audio(self, until: float) -> None:
        """Mux the source's audio up to ``until`` seconds of output time; a failure drops the rest
        of the audio with a warning (the video is what the user waited for)."""
        if self._audio is None:
            return
        source, src, out, items, resampler, _ = self._audio
        try:
            while True:
                item, self._audio[5] = self._audio[5], None  # a packet held back by the last call
                if item is None:
                    item = next(items, None)
                if item is None:
                    self._finish_audio()
                    return
                if getattr(item, "dts", 0) is None:  # flush packets of the demuxer
                    continue
                if item.pts is None or item.time_base is None:
                    continue
                start = float(item.pts * item.time_base) - self.audio_start
                if start >= until:
                    self._audio[5] = item  # keep it for the next call
                    return
                if start < 0:
                    continue
                if resampler is None:
                    shift = int(round(self.audio_start / item.time_base))
                    item.pts -= shift
                    if item.dts is not None:
                        item.dts -= shift
                    item.stream = out
                    self._container.mux(item)
                else:
                    item.pts = None
                    for part in resampler.resample(item):
                        for packet in out.encode(part):
                            self._container.mux(packet)
        except av.FFmpegError as err:
            self.warnings.append(f"audio stopped at {until:.1f} s ({str(err).splitlines()[0]}): the rest is silent")
            self._close_audio_source()

    def _finish_audio(self) -> None:
        source, src, out, items, resampler, _ = self._audio
        if resampler is not None:
            for part in resampler.resample(None):
                for packet in out.encode(part):
                    self._container.mux(packet)
            for packet in out.encode(None):
                self._container.mux(packet)
        self._close_audio_source()

    def _close_audio_source(self) -> None:
        if self._audio is not None:
            try:
                self._audio[0].close()
            except Exception:  # noqa: BLE001 (closing a half-read source)
                pass
            self._audio = None

    # ------------------------------------------------------------------ finish
    def close(self) -> Path:
        """Finish the file and move it into place."""
        try:
            if self._stream is None:
                raise ValueError("no frames were written")
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._pump_audio(self._last_time + float(1 / self.fps))
            if self._audio is not None:
                self._finish_audio()
            self._container.close()
            self._publish(self.path)
        except av.FFmpegError as err:
            kept = self.abort(keep=True)
            saved = f"; the {self.frames_written} frames written are in {kept}" if kept else ""
            raise VideoError(f"finishing {self.path} failed ({str(err).splitlines()[0]}){saved}") from None
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self, keep: bool = False) -> Path | None:
        """Stop writing. ``keep``: finish the frames written so far as ``<name>.partial<ext>`` and
        return that path (``None`` if nothing usable was written); else delete everything."""
        self._close_audio_source()
        kept = None
        if keep and self._stream is not None and self.frames_written:
            try:
                for packet in self._stream.encode():
                    self._container.mux(packet)
                self._container.close()
                kept = partial_path(self.path)
                self._publish(kept)
            except Exception:  # noqa: BLE001 (the partial file is a courtesy; the error is reported anyway)
                kept = None
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 (already closed or half-written: the file is deleted anyway)
            pass
        self._tmp.unlink(missing_ok=True)
        return kept

    def _publish(self, target: Path) -> None:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp makes owner-only files
        os.replace(self._tmp, target)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: Fraction | float, audio_from=None,
                exact: bool = False) -> Path:
    """Write uint8 ``(H, W, 3)`` frames as a video in the container ``path`` names (see :class:`VideoWriter`).
    ``exact``: the same frames always give the same file (:func:`rgb_to_yuv420`, one encoder thread)."""
    with VideoWriter(path, fps, audio_from=audio_from, exact=exact) as writer:
        writer.write_all(frames)
    return Path(path)
