"""Every video a user has: generated phone, camera, screen-recorder and animated-image inputs in,
every output container out, audio kept, timing kept, upright, and nothing finished ever lost."""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from infer import VideoReader, probe_video
from infer.cli import main as infer_main
from infer.video_writer import OUTPUT_FORMATS, OutputFormat

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "videos"


def pattern(index: int, height: int = 24, width: int = 40) -> np.ndarray:
    """An asymmetric test card: a white square top-left, a green band on the right, and a lower
    half whose blue level counts frames."""
    card = np.full((height, width, 3), 40, np.uint8)
    card[: height // 4, : height // 4] = 255
    card[:, -width // 8 :, 1] = 220
    card[height // 2 :, :, 2] = (60 + 25 * index) % 256
    return card


def write_input(path: Path, frames: list[np.ndarray], *, codec="libx264", pix_fmt="yuv420p", fmt=None, rate=10,
                times=None, rotation=0, audio=None, audio_rate=16000) -> Path:
    """A video as a phone, camera or screen recorder would leave it (PyAV writes them all)."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        sound = None
        if audio is not None:
            sound = container.add_stream(audio, rate=audio_rate)
            sound.layout = "mono"
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if times is not None:
                video_frame.pts, video_frame.time_base = int(times[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            seconds = (times[-1] if times else len(frames) / rate) + 0.5
            samples = (np.sin(np.arange(int(seconds * audio_rate)) / 3) * 8000).astype(np.int16)
            for start in range(0, len(samples), 1024):
                chunk = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="s16", layout="mono")
                chunk.sample_rate, chunk.pts = audio_rate, start
                for packet in sound.encode(chunk):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path


def look(path: Path) -> dict:
    """What a player sees: frame count, size, frame times, audio codec and length."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = list(container.decode(video))
    with av.open(str(path)) as container:
        audio = container.streams.audio[0] if container.streams.audio else None
        seconds = None
        if audio is not None:
            last = 0.0
            for packet in container.demux(audio):
                if packet.pts is not None and packet.duration:
                    last = max(last, float((packet.pts + packet.duration) * packet.time_base))
            seconds = last
    return {
        "frames": len(frames),
        "size": (frames[0].width, frames[0].height),
        "times": [round(float(f.time), 3) for f in frames],
        "audio": audio.codec_context.name if audio is not None else None,
        "audio_seconds": seconds,
        "codec": video.codec_context.name,
    }


def edit(capsys, source, output, *extra) -> tuple[int, str]:
    code = infer_main(["edit", str(source), "--prompt", "make it red", "-o", str(output), "--steps", "1",
                       "--resolution", "16", "--clip-frames", "6", "--reference-frames", "2", "--quiet", *map(str, extra)])
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("infer: no --model"))
    return code, err


# ---------------------------------------------------------------- inputs
def test_rotated_phone_video_is_read_upright_and_written_upright(tmp_path, capsys):
    upright = [pattern(i, 40, 24) for i in range(5)]  # portrait
    stored = [np.ascontiguousarray(np.rot90(f, -1)) for f in upright]  # the sensor's landscape frames
    source = write_input(tmp_path / "phone.mp4", stored, rotation=90)
    info = probe_video(source)
    assert (info.width, info.height, info.rotation) == (24, 40, 90)
    frames = list(VideoReader(source))
    assert all(f.shape == (40, 24, 3) for f in frames)
    error = np.abs(frames[0].astype(int) - upright[0]).mean()
    flipped = np.abs(frames[0].astype(int) - np.rot90(upright[0], 2)).mean()
    assert error < 8 and flipped > 4 * error  # the marker is top-left again (chroma blur aside)
    code, err = edit(capsys, source, tmp_path / "out.mp4")
    assert code == 0, err
    seen = look(tmp_path / "out.mp4")
    assert seen["frames"] == 5 and seen["size"][0] < seen["size"][1]  # plays upright: portrait
    with av.open(str(tmp_path / "out.mp4")) as container:
        assert not next(container.decode(video=0)).rotation  # upright pixels, no rotation to apply


def test_variable_frame_rate_keeps_its_timing(tmp_path, capsys):
    times = [0.0, 0.1, 0.35, 0.4, 0.9, 1.0, 1.05]
    source = write_input(tmp_path / "screen.mp4", [pattern(i) for i in range(7)], times=times)
    code, err = edit(capsys, source, tmp_path / "out.mp4")
    assert code == 0, err
    assert look(tmp_path / "out.mp4")["times"] == times


@pytest.mark.parametrize(
    "name,options",
    [
        ("odd.mkv", dict(codec="ffv1", pix_fmt="yuv420p", fmt="matroska")),
        ("ten-bit.mkv", dict(codec="ffv1", pix_fmt="yuv420p10le", fmt="matroska")),
        ("ten-bit.mp4", dict(codec="libx264", pix_fmt="yuv420p10le")),
        ("full-chroma.mp4", dict(codec="libx264", pix_fmt="yuv444p")),
        ("camera.mov", dict(codec="mjpeg", pix_fmt="yuvj420p", fmt="mov")),
        ("anim.gif", dict(codec="gif", pix_fmt="rgb8", fmt="gif")),
    ],
)
def test_camera_and_codec_variants_are_edited_frame_for_frame(tmp_path, capsys, name, options):
    size = (23, 41) if name.startswith("odd") else (24, 40)
    source = write_input(tmp_path / name, [pattern(i, *size) for i in range(7)], **options)
    assert probe_video(source).width == size[1]
    code, err = edit(capsys, source, tmp_path / "out.mp4")
    assert code == 0, err
    seen = look(tmp_path / "out.mp4")
    assert seen["frames"] == 7 and seen["times"] == [round(i / 10, 3) for i in range(7)]


def test_image_sequences_and_animated_webp(tmp_path, capsys):
    (tmp_path / "frames").mkdir()
    for i in range(6):
        Image.fromarray(pattern(i)).save(tmp_path / "frames" / f"{i + 1:05d}.png")
    code, err = edit(capsys, tmp_path / "frames" / "%05d.png", tmp_path / "seq.mp4")
    assert code == 0, err
    assert look(tmp_path / "seq.mp4")["frames"] == 6
    cards = [Image.fromarray(pattern(i)) for i in range(5)]
    cards[0].save(tmp_path / "anim.webp", save_all=True, append_images=cards[1:], duration=[100, 100, 250, 50, 100], loop=0)
    code, err = edit(capsys, tmp_path / "anim.webp", tmp_path / "webp.mp4")
    assert code == 0, err
    assert look(tmp_path / "webp.mp4")["times"] == [0.0, 0.1, 0.2, 0.45, 0.5]
    code, err = edit(capsys, tmp_path / "frames" / "%04d.jpg", tmp_path / "none.mp4")
    assert code == 2 and "no images match" in err and not (tmp_path / "none.mp4").exists()


# ---------------------------------------------------------------- audio and outputs
def test_pcm_audio_in_mkv_is_transcoded_for_mp4_and_kept(tmp_path, capsys):
    source = write_input(tmp_path / "camera.mkv", [pattern(i) for i in range(10)], fmt="matroska", audio="pcm_s16le")
    code, err = edit(capsys, source, tmp_path / "out.mp4")
    assert code == 0 and err == "", err
    seen = look(tmp_path / "out.mp4")
    assert seen["frames"] == 10 and seen["audio"] == "aac" and abs(seen["audio_seconds"] - 1.0) < 0.1
    data = (tmp_path / "out.mp4").read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: playable while downloading


@pytest.mark.parametrize(
    "suffix,codec,audio",
    [(".mov", "h264", "pcm_s16le"), (".mkv", "h264", "pcm_s16le"), (".webm", "vp9", "opus"), (".gif", "gif", None)],
)
def test_output_container_follows_the_extension(tmp_path, capsys, suffix, codec, audio):
    source = write_input(tmp_path / "camera.mkv", [pattern(i) for i in range(8)], fmt="matroska", audio="pcm_s16le",
                         audio_rate=44100)
    code, err = edit(capsys, source, tmp_path / f"out{suffix}")
    assert code == 0
    assert ("holds no audio" in err) == (audio is None)  # the one warning when audio must go
    seen = look(tmp_path / f"out{suffix}")
    assert seen["frames"] == 8 and seen["codec"] == codec and seen["audio"] == audio


def test_codec_crf_and_time_range(tmp_path, capsys):
    source = write_input(tmp_path / "clip.mkv", [pattern(i) for i in range(20)], fmt="matroska", audio="pcm_s16le")
    code, err = edit(capsys, source, tmp_path / "hevc.mp4", "--codec", "libx265", "--crf", "30", "--start", "0.5", "--end", "1.5")
    assert code == 0, err
    seen = look(tmp_path / "hevc.mp4")
    assert seen["codec"] == "hevc" and seen["frames"] == 10 and seen["times"][0] == 0.0
    assert abs(seen["audio_seconds"] - 1.0) < 0.1  # the audio of that second, not of the start
    code, err = edit(capsys, source, tmp_path / "x.mp4", "--codec", "no-such-codec")
    assert code == 2 and "no video encoder named 'no-such-codec'" in err
    code, err = edit(capsys, source, tmp_path / "x.mp4", "--start", "3", "--end", "2")
    assert code == 2 and "--end (2.0) must be after --start (3.0)" in err
    code, err = edit(capsys, source, tmp_path / "x.avi")
    assert code == 2 and "output must end in .mp4, .mov, .mkv, .webm, .gif" in err
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "x.avi").exists()


def test_audio_that_cannot_be_converted_is_dropped_with_one_warning(tmp_path, capsys, monkeypatch):
    source = write_input(tmp_path / "camera.mkv", [pattern(i) for i in range(6)], fmt="matroska", audio="pcm_s16le")
    monkeypatch.setitem(OUTPUT_FORMATS, ".mp4", OutputFormat("mp4", "libx264", "yuv420p", "no-such-encoder"))
    code, err = edit(capsys, source, tmp_path / "out.mp4")
    assert code == 0
    assert len(err.splitlines()) == 1 and "could not be converted to no-such-encoder" in err and "dropped" in err
    seen = look(tmp_path / "out.mp4")
    assert seen["frames"] == 6 and seen["audio"] is None


# ---------------------------------------------------------------- nothing lost
def test_checks_before_editing_and_parent_folders(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    source = write_input(tmp_path / "clip.mp4", [pattern(i) for i in range(6)])
    code, err = edit(capsys, source, tmp_path / "new" / "deeper" / "out.mp4")
    assert code == 0 and look(tmp_path / "new" / "deeper" / "out.mp4")["frames"] == 6
    (tmp_path / "a-file").write_text("not a folder")
    code, err = edit(capsys, source, tmp_path / "a-file" / "out.mp4")
    assert code == 2 and "cannot create the output folder" in err and ".tmp" not in err
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    called = []
    monkeypatch.setattr("infer.pipeline.InsV2VPipeline.from_pretrained", lambda *a, **k: called.append(1))
    code, err = edit(capsys, source, tmp_path / "full.mp4")
    assert code == 2 and "not enough disk space" in err and not called and not (tmp_path / "full.mp4").exists()


def test_a_failure_mid_edit_keeps_the_edited_frames_under_a_named_file(tmp_path, capsys, monkeypatch):
    from infer.pipeline import InsV2VPipeline

    source = write_input(tmp_path / "clip.mp4", [pattern(i) for i in range(12)])
    real = InsV2VPipeline.edit_stream

    def breaks_after_eight(self, *args, **kwargs):
        for index, frame in enumerate(real(self, *args, **kwargs)):
            if index == 8:
                raise RuntimeError("device lost")
            yield frame

    monkeypatch.setattr(InsV2VPipeline, "edit_stream", breaks_after_eight)
    with pytest.raises(RuntimeError, match="device lost"):
        edit(capsys, source, tmp_path / "out.mp4")
    err = capsys.readouterr().err
    assert f"they are in {tmp_path / 'out.partial.mp4'}" in err
    assert not (tmp_path / "out.mp4").exists() and look(tmp_path / "out.partial.mp4")["frames"] == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden temporary file left


def test_a_full_disk_mid_edit_is_one_line_naming_the_partial_file(tmp_path, capsys, monkeypatch):
    import errno

    from infer.video_writer import VideoWriter

    source = write_input(tmp_path / "clip.mp4", [pattern(i) for i in range(12)])
    real = VideoWriter.write

    def disk_fills_after_five(self, frame, time=None):
        if self.frames_written == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, frame, time)

    monkeypatch.setattr(VideoWriter, "write", disk_fills_after_five)
    code, err = edit(capsys, source, tmp_path / "out.mp4")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and str(tmp_path / "out.partial.mp4") in err
    assert look(tmp_path / "out.partial.mp4")["frames"] == 5


def test_synth_prompts_creates_its_folder(tmp_path, capsys):
    from synth.cli import main as synth_main

    assert synth_main(["prompts", "--out", str(tmp_path / "new" / "triplets.jsonl"), "--num", "2"]) == 0
    assert len((tmp_path / "new" / "triplets.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    (tmp_path / "a-file").write_text("x")
    assert synth_main(["prompts", "--out", str(tmp_path / "a-file" / "t.jsonl"), "--num", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and ".tmp" not in err and "a-file/t.jsonl" in err


def damaged_copies(data: bytes) -> dict[str, bytes]:
    """Truncations, bytes flipped anywhere, and bytes flipped only in the middle of the media data
    (so the first frames decode and the damage is met mid-edit)."""
    rng = random.Random(0)
    variants = {f"cut{n}": data[: len(data) * n // 8] for n in (1, 3, 5, 7)}
    for n in range(6):
        flipped = bytearray(data)
        span = range(len(data)) if n < 3 else range(len(data) // 2, len(data) * 4 // 5)
        for position in rng.sample(span, 40 * (n % 3 + 1)):
            flipped[position] ^= 0xFF
        variants[f"flip{n}" if n < 3 else f"flip-middle{n - 3}"] = bytes(flipped)
    return variants


def test_damaged_files_exit_2_with_one_line_and_a_named_partial(tmp_path, capsys):
    """Truncated and byte-flipped copies of a real video: one line, exit 2, no traceback; the
    frames edited before damage met mid-way are kept in a partial file that the line names."""
    partial_frames = []
    for name, blob in damaged_copies((FIXTURES / "gold-fish.mp4").read_bytes()).items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "in.mp4").write_bytes(blob)
        code, err = edit(capsys, folder / "in.mp4", folder / "out.mp4")
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        left = {p.name for p in folder.iterdir()} - {"in.mp4"}
        assert left <= {"out.partial.mp4"} and all(str(folder / n) in err for n in left), (name, err)
        if left:
            partial_frames.append(look(folder / "out.partial.mp4")["frames"])
    assert partial_frames and min(partial_frames) > 0  # damage met mid-edit keeps what was edited


def test_ignore_decode_errors_edits_a_damaged_video_as_ffmpeg_conceals_it(tmp_path, capsys):
    damaged = damaged_copies((FIXTURES / "gold-fish.mp4").read_bytes())["flip-middle0"]
    (tmp_path / "in.mp4").write_bytes(damaged)
    code, err = edit(capsys, tmp_path / "in.mp4", tmp_path / "out.mp4", "--ignore-decode-errors")
    assert code == 0, err
    assert look(tmp_path / "out.mp4")["frames"] == look(FIXTURES / "gold-fish.mp4")["frames"]


def test_exact_writes_and_reads_give_the_same_bits_every_time(tmp_path):
    """write_video(exact=True) converts colour in numpy and encodes on one thread, and
    read_video_exact converts back the same way: the same frames always give the same file and the
    same decoded frames (libswscale's alignment-dependent SIMD paths and x264's threads do not)."""
    import hashlib

    import cv2

    from infer import write_video
    from infer.video import read_video, read_video_exact
    from infer.video_writer import rgb_to_yuv420

    rng = np.random.default_rng(0)
    frames = [cv2.GaussianBlur(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), (7, 7), 2) for _ in range(6)]
    digests, decoded = set(), []
    for i in range(4):
        path = write_video(tmp_path / f"v{i}.mp4", frames, 8, exact=True)
        digests.add(hashlib.md5(path.read_bytes()).hexdigest())
        decoded.append(read_video_exact(path))
    assert len(digests) == 1 and all(np.array_equal(d, decoded[0]) for d in decoded)
    # the same colours as libswscale's conversion, within a few levels
    assert np.abs(decoded[0].astype(int) - read_video(tmp_path / "v0.mp4").astype(int)).max() <= 4
    assert np.abs(decoded[0].astype(int) - np.stack(frames).astype(int)).mean() < 4
    assert rgb_to_yuv420(np.zeros((2, 2, 3), np.uint8)).ravel().tolist() == [16, 16, 16, 16, 128, 128]
