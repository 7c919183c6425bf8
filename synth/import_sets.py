"""`synth import`: published pair sets checked pair by pair and written as resumable shards."""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
from tqdm.auto import tqdm

from infer.video import VideoError, VideoInfo, encode_video, iter_frames, probe_video, read_video_exact
from shards.schema import IMAGE_EXTS, META, SOURCE, TARGET, VIDEO_EXT, read_image, sample_key

from .build import BuildResult, config_hash
from .pair_sets import PAIR_SETS, PairSet, PublishedPair, detect_format
from .video_hash import LeakageIndex, video_frames
from .writer import Outcome, ShardWriter, write_outcomes

ARCHIVE_PATTERNS = ("*.tar.gz.*", "*.tar.gz", "*.tgz", "*.tar", "*.zip")
MAX_MEDIA_BYTES = 4 << 30  # one published video file
FRAMES_FPS = 8.0  # a set of frame files carries no rate (the InsV2V authors' pairs are 8 fps)
PROBE_FRAMES = 8  # frames sampled across a source for the benchmark check


@dataclass
class ImportOptions:
    """How pairs are checked and written."""

    max_side: int | None = None  # re-encode so that the longer side is at most this
    max_frames: int | None = None  # re-encode keeping at most this many frames
    fps: float | None = None  # re-encode at (about) this rate, dropping frames
    frame_tolerance: float = 0.02  # source and edit frame counts (and durations) may differ by this share
    aspect_tolerance: float = 0.02  # and their aspect ratios
    exclude_categories: frozenset[str] = frozenset()
    leakage: LeakageIndex | None = None

    @property
    def reencodes(self) -> bool:
        return any(v is not None for v in (self.max_side, self.max_frames, self.fps))

    def hashed(self) -> dict[str, Any]:
        """What shapes the written samples (a resume must keep it)."""
        return {"max_side": self.max_side, "max_frames": self.max_frames, "fps": self.fps,
                "frame_tolerance": self.frame_tolerance, "aspect_tolerance": self.aspect_tolerance,
                "exclude_categories": sorted(self.exclude_categories),
                "leakage": None if self.leakage is None else hashlib.sha256(self.leakage.hashes.tobytes()).hexdigest()[:16]}


class Rejected(Exception):
    """A pair that is not written; ``reason`` is its counted category, ``detail`` the rest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- paths
def inside(base: Path, relative: str | None, what: str) -> Path:
    """``base / relative``, refused when it is missing or leaves ``base`` (``..``, absolute paths, links out)."""
    if not relative:
        raise Rejected("missing path", f"no {what} path in the metadata")
    path = (base / relative).resolve()
    if not path.is_relative_to(base.resolve()):
        raise Rejected("outside the set's folder", f"{what} {relative}")
    return path


def unextracted_archive(base: Path, path: Path) -> Path | None:
    """The archive that would hold the missing ``path`` once extracted: one lying in its folder or
    a folder above it, up to ``base`` (Ditto-1M ships ``videos/<category>/<category>.tar.gz.NN``)."""
    folder = path.parent
    base = base.resolve()
    while folder.is_relative_to(base):
        if folder.is_dir():
            for pattern in ARCHIVE_PATTERNS:
                found = sorted(folder.glob(pattern))
                if found:
                    return found[0]
        if folder == base:
            break
        folder = folder.parent
    return None


def extract_command(archive: Path) -> str:
    """The command that extracts ``archive`` (every part of a split one) where it lies."""
    folder = archive.parent
    name = archive.name
    if ".tar.gz." in name:
        stem = name[: name.index(".tar.gz.") + len(".tar.gz")]
        return f"cat '{folder}/{stem}'.* | tar -xz -C '{folder}'"
    if name.endswith((".tar.gz", ".tgz")):
        return f"tar -xzf '{archive}' -C '{folder}'"
    if name.endswith(".zip"):
        return f"unzip -q '{archive}' -d '{folder}'"
    return f"tar -xf '{archive}' -C '{folder}'"


# ---------------------------------------------------------------- media checks
def is_image(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTS


def probe(path: Path, what: str) -> VideoInfo:
    """The file's video facts; an unreadable one is a rejection, not an error."""
    if not path.is_file():
        raise Rejected("missing file", f"{what} {path.name}")
    if path.stat().st_size > MAX_MEDIA_BYTES:
        raise Rejected("unreadable file", f"{what} {path.name} is over {MAX_MEDIA_BYTES:,} bytes")
    if is_image(path):
        try:
            image = read_image(path.read_bytes())
        except ValueError as err:
            raise Rejected("unreadable file", f"{what} {path.name}: {err}") from None
        return VideoInfo(path, image.shape[1], image.shape[0], Fraction(1), 1, False)
    try:
        info = probe_video(path)
    except (VideoError, OSError) as err:
        raise Rejected("unreadable file", f"{what} {path.name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if info.num_frames <= 0:
        try:
            count = sum(1 for _ in iter_frames(path))
        except (VideoError, OSError) as err:
            raise Rejected("unreadable file", f"{what} {path.name}: {err}") from None
        info = VideoInfo(info.path, info.width, info.height, info.fps, count, info.has_audio, info.rotation, info.duration)
    return info


def shape_mismatch(source: VideoInfo, edited: VideoInfo, options: ImportOptions, trim_source: bool) -> Rejected | None:
    """Why the two clips cannot be a pair: frame counts, rates (so durations) or aspect ratios
    differing beyond the tolerances. A set that cut its edits from the sources' first frames
    (``trim_source``) may have longer sources."""
    if (source.num_frames == 1) != (edited.num_frames == 1):
        return Rejected("frame count differs", f"{source.num_frames} and {edited.num_frames} frames (an image and a video)")
    frames_off = abs(source.num_frames - edited.num_frames) / max(source.num_frames, edited.num_frames)
    if frames_off > options.frame_tolerance and not (trim_source and source.num_frames > edited.num_frames):
        return Rejected("frame count differs", f"{source.num_frames} and {edited.num_frames} frames")
    if source.num_frames > 1 and abs(float(source.fps) - float(edited.fps)) > options.frame_tolerance * float(source.fps):
        return Rejected("duration differs", f"{float(source.fps):.3g} and {float(edited.fps):.3g} fps")
    ratio = (source.width / source.height) / (edited.width / edited.height)
    if abs(ratio - 1) > options.aspect_tolerance:
        return Rejected("aspect ratio differs", f"{source.width}x{source.height} and {edited.width}x{edited.height}")
    return None


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes (``png`` when unknown)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            name = (image.format or "png").lower()
    except (UnidentifiedImageError, OSError):
        return "png"
    return {"jpeg": "jpg"}.get(name, name) if name in ("jpeg", "png", "webp") else "png"


IDENTICAL_MEAN = 3.0  # levels: two H.264 encodes of the same frames differ by about 2 on average
IDENTICAL_LEVELS, IDENTICAL_SHARE = 24, 0.005  # and few pixels by more than 24 levels; an edit moves more


def identical(source: Path, edited: Path, frames: int) -> bool:
    """Whether the edit is its source: the same bytes, or the same pictures within codec noise at
    frames spread over the clip (mean difference under 3 levels, under 0.5 % of pixels off by more
    than 24: a re-encoded copy passes, an edit of 2 % of the frame does not)."""
    if source.stat().st_size == edited.stat().st_size and source.read_bytes() == edited.read_bytes():
        return True
    a, b = video_frames(source, 4, frames), video_frames(edited, 4, frames)
    b = [y if y.shape == x.shape else cv2.resize(y, (x.shape[1], x.shape[0]), interpolation=cv2.INTER_AREA)
         for x, y in zip(a, b)]
    diff = np.abs(np.stack(a).astype(np.int16) - np.stack(b).astype(np.int16))
    return float(diff.mean()) < IDENTICAL_MEAN and float((diff > IDENTICAL_LEVELS).mean()) < IDENTICAL_SHARE


# ---------------------------------------------------------------- writing
def reencoded(path: Path, options: ImportOptions, num_frames: int, fps: float, size: tuple[int, int] | None = None
              ) -> tuple[bytes, int, int, int, float]:
    """The clip's first ``num_frames`` frames re-encoded once: every ``stride``-th for ``--fps``, at
    most ``--max-frames``, the longer side at most ``--max-side`` (or exactly ``size`` = (w, h)).
    Returns ``(bytes, frames, height, width, fps)``."""
    stride = max(1, round(fps / options.fps)) if options.fps else 1
    kept = -(-num_frames // stride)  # frames 0, stride, 2 stride, ... below num_frames
    # decoded and encoded the same way on every run (libswscale's SIMD colour paths are not)
    frames = list(read_video_exact(path, max_frames=num_frames)[::stride][: min(kept, options.max_frames or kept)])
    h, w = frames[0].shape[:2]
    if size is None:
        scale = min(1.0, options.max_side / max(h, w)) if options.max_side else 1.0
        size = (max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2))  # H.264 wants even sides
    if size != (w, h):
        frames = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]
    rate = fps / stride
    return (encode_video(np.stack(frames), Fraction(rate).limit_denominator(1001), exact=True), len(frames), size[1],
            size[0], rate)


def frame_files_clip(base: Path, files: list[str], what: str, fps: float, options: ImportOptions
                     ) -> tuple[bytes, int, int, int]:
    """A clip published as frame files, encoded (H.264) once: ``(bytes, frames, height, width)``."""
    if not files:
        raise Rejected("missing file", f"no {what} frames")
    frames = []
    for name in files[: options.max_frames or None]:
        path = inside(base, name, what)
        if not path.is_file():
            raise Rejected("missing file", f"{what} frame {name}")
        try:
            frames.append(read_image(path.read_bytes()))
        except ValueError as err:
            raise Rejected("unreadable file", f"{what} frame {name}: {err}") from None
    if len({f.shape for f in frames}) != 1:
        raise Rejected("unreadable file", f"{what} frames differ in size")
    h, w = frames[0].shape[:2]
    if options.max_side and max(h, w) > options.max_side:
        scale = options.max_side / max(h, w)
        w, h = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
        frames = [cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames]
    elif h % 2 or w % 2:
        h, w = h - h % 2, w - w % 2
        frames = [f[:h, :w] for f in frames]
    return encode_video(np.stack(frames), Fraction(fps).limit_denominator(1001), exact=True), len(frames), h, w


@dataclass
class ImportStats:
    """What one run met: rejections by reason, archives still packed, clips copied or re-encoded."""

    rejections: collections.Counter = field(default_factory=collections.Counter)
    archives: dict[str, str] = field(default_factory=dict)
    copied: int = 0
    reencoded: int = 0


class PairImporter:
    """Checks one published pair and makes it a shard sample."""

    def __init__(self, fmt: str, pair_set: PairSet, root: Path, media: Path, options: ImportOptions,
                 warn: Callable[[str], None]):
        self.fmt, self.set, self.root, self.media, self.options, self.warn = fmt, pair_set, root, media, options, warn
        self.stats = ImportStats()

    def dataset(self, pair: PublishedPair) -> dict[str, Any]:
        return {"name": self.set.name, "format": self.fmt, "licence": self.set.licence,
                "non_commercial": self.set.non_commercial, "category": pair.category, "direction": pair.direction,
                "ids": pair.ids, "paths": {"source": pair.source, "edited": pair.edited}}

    def sample(self, key: str, pair: PublishedPair) -> dict[str, Any]:
        """The sample's members; :class:`Rejected` says why there is none."""
        if pair.error:
            raise Rejected("unreadable metadata", pair.error)
        if not pair.instruction:
            raise Rejected("no instruction")
        if pair.category in self.options.exclude_categories:
            raise Rejected("excluded category", pair.category)
        if pair.frames is not None:
            return self._frames_sample(key, pair)
        source, edited = inside(self.media, pair.source, "source"), inside(self.media, pair.edited, "edit")
        for path in (source, edited):
            if not path.exists():
                archive = unextracted_archive(self.media, path)
                if archive is not None:
                    name = str(archive.relative_to(self.media.resolve()))
                    if name not in self.stats.archives:
                        self.stats.archives[name] = extract_command(archive)
                        self.warn(f"{name} is not extracted: its pairs are skipped; extract it with: "
                                  f"{self.stats.archives[name]}")
                    raise Rejected("archive not extracted", name)
        src_info, tgt_info = probe(source, "source"), probe(edited, "edit")
        problem = shape_mismatch(src_info, tgt_info, self.options, pair.trim_source)
        if problem is not None:
            raise problem
        frames = min(src_info.num_frames, tgt_info.num_frames)
        if identical(source, edited, frames):
            raise Rejected("edit identical to source")
        if self.options.leakage is not None:
            match = self.options.leakage.match(video_frames(source, PROBE_FRAMES, src_info.num_frames))
            if match is not None:
                raise Rejected("benchmark video", Path(match).name)
        return self._media_sample(key, pair, source, edited, src_info, tgt_info, frames)

    def _media_sample(self, key, pair, source, edited, src_info, tgt_info, frames) -> dict[str, Any]:
        """The files as published where they can be (H.264-ready ``.mp4`` at the source's size and no
        re-encoding asked for), else re-encoded once: the edit at the source's size, both cut to
        the frames they share."""
        members: dict[str, bytes] = {}
        if frames == 1:  # an image pair: the images as published
            for stem, path in ((SOURCE, source), (TARGET, edited)):
                members[f"{stem}.{path.suffix.lower().lstrip('.')}"] = path.read_bytes()
            return self._finish(key, pair, members, 1, src_info.height, src_info.width, 1.0, True)
        fps, options = float(src_info.fps), self.options

        def as_published(path: Path, info: VideoInfo) -> bool:
            return not options.reencodes and path.suffix.lower() == f".{VIDEO_EXT}" and not info.rotation

        try:
            if as_published(source, src_info):
                members[f"{SOURCE}.{VIDEO_EXT}"] = source.read_bytes()
                height, width, out_frames, out_fps = src_info.height, src_info.width, frames, fps
            else:
                data, out_frames, height, width, out_fps = reencoded(source, options, frames, fps)
                members[f"{SOURCE}.{VIDEO_EXT}"] = data
            if as_published(edited, tgt_info) and (tgt_info.width, tgt_info.height) == (width, height):
                members[f"{TARGET}.{VIDEO_EXT}"] = edited.read_bytes()
            else:  # the source's frame choice and size
                members[f"{TARGET}.{VIDEO_EXT}"] = reencoded(edited, options, frames, fps, size=(width, height))[0]
        except (VideoError, OSError) as err:
            raise Rejected("unreadable file", str(err).splitlines()[0]) from None
        copied = as_published(source, src_info) and as_published(edited, tgt_info) and \
            (tgt_info.width, tgt_info.height) == (width, height)
        if pair.ref_image is not None:  # Kiwi-Edit's reference image, kept beside the pair
            members[f"ref.{image_extension(pair.ref_image)}"] = pair.ref_image
        return self._finish(key, pair, members, out_frames, height, width, out_fps, copied)

    def _frames_sample(self, key: str, pair: PublishedPair) -> dict[str, Any]:
        fps = self.options.fps or FRAMES_FPS
        src, n_src, h, w = frame_files_clip(self.media, pair.frames[0], "source", fps, self.options)
        tgt, n_tgt, h2, w2 = frame_files_clip(self.media, pair.frames[1], "edit", fps, self.options)
        if (n_src, h, w) != (n_tgt, h2, w2):
            raise Rejected("frame count differs", f"{n_src} frames {w}x{h} and {n_tgt} frames {w2}x{h2}")
        members = {f"{SOURCE}.{VIDEO_EXT}": src, f"{TARGET}.{VIDEO_EXT}": tgt}
        return self._finish(key, pair, members, n_src, h, w, fps, False)

    def _finish(self, key, pair, members, frames, height, width, fps, copied) -> dict[str, Any]:
        if copied:
            self.stats.copied += 1
        else:
            self.stats.reencoded += 1
        meta = {"input_caption": pair.input_caption, "instruction": pair.instruction,
                "output_caption": pair.output_caption, "num_frames": frames, "height": height, "width": width,
                "fps": fps, "seed": None, "source": f"import:{self.fmt}",
                "generator": {"backbone": "import", "copied": copied}, "clip": pair.scores,
                "dataset": self.dataset(pair)}
        return {"__key__": key, **members, META: json.dumps(meta).encode()}


def import_set(source: Path, out: Path, fmt: str | None = None, media_root: Path | None = None,
               options: ImportOptions = ImportOptions(), num_samples: int | None = None,
               samples_per_shard: int = 64, resume: bool = False, rank: int = 0, world: int = 1,
               progress: bool = True, warn: Callable[[str], None] | None = None) -> tuple[BuildResult, ImportStats]:
    """Import this rank's pairs (every ``world``-th) of the set at ``source`` into shards (the
    format of docs/shards.md), continuing an earlier run with ``resume``; at most ``num_samples``
    kept pairs (``None``: all). A rejected pair is counted and logged with its reason in the
    attempts log; a resumed run writes what an uninterrupted one would."""
    if not source.exists():
        raise FileNotFoundError(f"no pair set at {source}")
    fmt = fmt or detect_format(source)
    if fmt not in PAIR_SETS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {', '.join(PAIR_SETS)}")
    pair_set = PAIR_SETS[fmt]
    media = media_root or pair_set.media_folder(source)
    if not media.is_dir():
        raise FileNotFoundError(f"no media folder at {media} (--media-root names another)")
    say = warn or (lambda line: tqdm.write(line))
    importer = PairImporter(fmt, pair_set, source, media, options, say)
    settings = {"format": fmt, "source": str(source.resolve()), "media": str(media.resolve()), **options.hashed()}
    writer = ShardWriter(out, rank, "import", config_hash(settings), resume, world)
    start = writer.state["next"][0]

    def outcomes() -> Iterator[Outcome]:
        local = -1
        for index, pair in enumerate(pair_set.read(source)):
            if index % world != rank:
                continue
            local += 1
            if local < start:  # committed by an earlier run
                continue
            key = sample_key(rank, index)
            record = {"key": key, "row": index, "set": pair_set.name, "category": pair.category,
                      "direction": pair.direction, "source_path": pair.source, "edited_path": pair.edited}
            try:
                sample = importer.sample(key, pair)
                yield Outcome({**record, "kept": True, "reason": None, "scores": pair.scores}, sample, (local + 1, 0))
            except Rejected as rejected:
                importer.stats.rejections[rejected.reason] += 1
                yield Outcome({**record, "kept": False, "reason": rejected.reason, "detail": rejected.detail,
                               "scores": None}, None, (local + 1, 0))

    bar = tqdm(total=num_samples, initial=writer.samples, unit="pair", desc=f"import {fmt} rank {rank}", disable=not progress)
    shards, _ = write_outcomes(writer, outcomes(), num_samples, samples_per_shard, bar)
    bar.close()
    rejected = sum(importer.stats.rejections.values())
    return BuildResult(writer.samples, writer.state["attempts"], shards, rejected), importer.stats
