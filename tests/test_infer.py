"""InsV2VPipeline and `infer edit`: determinism, streaming, LVSC, video I/O, bad input."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from infer import EditSettings, InsV2VPipeline, guided_noise, probe_video, read_video, write_video
from infer.cli import main
from model import load_editor, motion_modules

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "videos"
FAST = dict(num_inference_steps=2, clip_frames=6, reference_frames=2, progress=False)


@pytest.fixture(scope="module")
def pipe():
    editor = load_editor("tiny")
    torch.manual_seed(0)
    for module in motion_modules(editor.unet):  # a trained-looking editor: frames interact
        torch.nn.init.normal_(module.proj_out.weight, std=0.05)
    return InsV2VPipeline.from_editor(editor)


def moving_square(frames=14, size=32):
    video = np.zeros((frames, size, size, 3), np.uint8)
    for i in range(frames):
        video[i, 8:16, i : i + 8] = (200, 60, 30)
    return video


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_output_and_frame_count(pipe):
    video = moving_square()
    a = pipe(video, "make it red", generator=gen(0), **FAST).frames
    b = pipe(video, "make it red", generator=gen(0), **FAST).frames
    c = pipe(video, "make it red", generator=gen(1), **FAST).frames
    assert a.dtype == np.uint8 and a.shape == video.shape
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batched_guidance_equals_three_calls(pipe):
    video = moving_square(8)
    a = pipe(video, "make it red", generator=gen(), **FAST).frames
    b = pipe(video, "make it red", generator=gen(), batched_guidance=False, **FAST).frames
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize("batched", [True, False])
def test_video_guidance_one_skips_the_unconditional_prediction(pipe, batched):
    """At video guidance 1 the no-video/no-text prediction weighs nothing: each step makes two
    predictions instead of three (the next test: with the same result)."""
    video = moving_square(6)
    editor = pipe.editor
    calls, rows = [], []
    predict = editor.predict

    def counting(noisy, *args, **kwargs):
        calls.append(1)
        rows.append(noisy.shape[0])
        return predict(noisy, *args, **kwargs)

    settings = dict(FAST, reference_frames=0, text_guidance=2.0, batched_guidance=batched)
    editor.predict = counting
    try:
        pipe(video, "make it red", generator=gen(), video_guidance=1.0, **settings)
        assert sum(rows) == 2 * FAST["num_inference_steps"]
        assert len(calls) == FAST["num_inference_steps"] * (1 if batched else 2)
        rows.clear()
        pipe(video, "make it red", generator=gen(), video_guidance=1.2, **settings)
        assert sum(rows) == 3 * FAST["num_inference_steps"]
    finally:
        del editor.predict


@torch.no_grad()
def test_two_prediction_steps_equal_the_three_prediction_formula(pipe):
    """The sampler with the unconditional prediction skipped (video guidance 1) ends where the
    three predictions combined by guided_noise end, step for step."""
    editor, sch = pipe.editor, pipe.scheduler
    source = torch.rand(1, 3, 6, 32, 32, generator=gen(7)) * 2 - 1
    condition, text = editor.encode_video(source), editor.encode_text(["", "make it red"])
    noise = torch.randn(condition.shape, generator=gen(3))
    settings = EditSettings(prompt="make it red", num_inference_steps=4, text_guidance=2.5, video_guidance=1.0)
    got = pipe.denoise(condition, text, noise, settings, generator=gen(4))
    sch.set_timesteps(4)
    z, zero, g = noise * sch.init_noise_sigma, torch.zeros_like(condition), gen(4)
    for t in sch.timesteps:
        z_in = sch.scale_model_input(z, t)
        e = [editor.predict(z_in, c, s, t) for c, s in ((zero, text[:1]), (condition, text[:1]), (condition, text[1:]))]
        z = sch.step(guided_noise(*e, 2.5, 1.0), t, z, generator=g).prev_sample
    assert torch.allclose(got, z, atol=1e-4)


def test_iterable_input_is_consumed_clip_by_clip(pipe):
    pulled = []

    def frames():
        for i, frame in enumerate(moving_square(20)):
            pulled.append(i)
            yield frame

    settings = EditSettings(prompt="make it red", num_inference_steps=1, clip_frames=6, reference_frames=2)
    stream = pipe.edit_stream(frames(), settings, generator=gen(), progress=False)
    next(stream)
    assert len(pulled) <= 6  # only the first clip has been read
    rest = list(stream)
    assert len(rest) == 19 and len(pulled) == 20


def _sample_clip(pipe, lvsc, z_ref, seed=0):
    editor = pipe.editor
    source = torch.rand(1, 3, 6, 32, 32, generator=gen(7)) * 2 - 1
    condition = editor.encode_video(source)
    text = editor.encode_text(["", "make it red"])
    noise = torch.randn(condition.shape, generator=gen(seed))
    settings = EditSettings(prompt="make it red", num_inference_steps=4, clip_frames=6, reference_frames=2, lvsc=lvsc)
    return pipe.denoise(condition, text, noise, settings, z_ref=z_ref, generator=gen(seed))


@torch.no_grad()
def test_lvsc_zero_is_no_correction_and_full_lvsc_pins_references(pipe):
    z_ref = torch.randn(1, 4, 2, 16, 16, generator=gen(5))
    plain = _sample_clip(pipe, 0.5, None)
    assert torch.equal(_sample_clip(pipe, 0.0, z_ref), plain)
    assert not torch.allclose(_sample_clip(pipe, 0.5, z_ref), plain)
    # corrected at every step, DDPM's last step returns the x0-prediction: exactly z_ref
    pinned = _sample_clip(pipe, 1.0, z_ref)
    assert torch.allclose(pinned[:, :, :2], z_ref, atol=1e-4)


def test_lvsc_and_motion_compensation_change_later_clips_only(pipe):
    video = moving_square(14)
    base = pipe(video, "make it red", generator=gen(), lvsc=0.0, **FAST).frames
    lvsc = pipe(video, "make it red", generator=gen(), lvsc=1.0, **FAST).frames
    mc = pipe(video, "make it red", generator=gen(), lvsc=1.0, motion_compensation=True, **FAST).frames
    assert np.array_equal(base[:6], lvsc[:6]) and np.array_equal(base[:6], mc[:6])  # first clip: no refs
    assert not np.array_equal(base[6:], lvsc[6:])
    assert not np.array_equal(lvsc[6:], mc[6:])


def test_bfloat16_edit_with_lvsc_and_motion_compensation_stays_near_float32(pipe):
    """A half-precision U-Net with float32 latents, flows, warp grids and LVSC: the same edit as
    float32 within a mean of 3/255 (measured: 1.5/255 at guidance 7.5 and 1.2, 0.2/255 at 1 and 1)."""
    import copy

    half = InsV2VPipeline.from_editor(copy.deepcopy(pipe.editor)).to("cpu", torch.bfloat16)
    assert half.editor.unet.dtype == torch.bfloat16
    captured = []
    real = half.denoise

    def spy(condition, text_states, noise, settings, z_ref=None, flows=None, *args):
        captured.append((condition.dtype, noise.dtype, None if flows is None else flows.dtype))
        out = real(condition, text_states, noise, settings, z_ref, flows, *args)
        captured.append(out.dtype)
        return out

    half.denoise = spy
    video = moving_square(14)
    options = dict(lvsc=1.0, motion_compensation=True, **FAST)
    low = half(video, "make it red", generator=gen(), **options).frames
    full = pipe(video, "make it red", generator=gen(), **options).frames
    assert captured[2] == (torch.float32, torch.float32, torch.float32) and captured[3] == torch.float32
    assert low.shape == full.shape and np.abs(low.astype(float) - full).mean() < 3


def test_warp_positions_stay_float32_for_bfloat16_values():
    from infer.sampling import warp

    values = torch.randn(1, 4, 8, 200, generator=gen(1))
    flow = torch.zeros(1, 2, 8, 200)
    flow[:, 0] = 0.3  # a third of a cell to the right, near the far edge where bfloat16 is coarsest
    exact = warp(values, flow)
    half = warp(values.bfloat16(), flow)
    assert half.dtype == torch.bfloat16
    # the only error left is rounding the values: positions are exact
    assert (half.float() - exact).abs()[..., :190].max() < 0.02 * values.abs().max()


def test_scheduler_by_name_and_round_trip(pipe, tmp_path):
    video = moving_square(6)
    pipe.save_pretrained(tmp_path / "p")
    loaded = InsV2VPipeline.from_pretrained(tmp_path / "p")
    a = pipe(video, "make it red", generator=gen(), **FAST).frames
    assert np.array_equal(a, loaded(video, "make it red", generator=gen(), **FAST).frames)
    loaded.set_scheduler("DDIMScheduler")
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded(video, "make it red", generator=gen(), **FAST).frames.shape == video.shape
    with pytest.raises(ValueError, match="unknown scheduler"):
        loaded.set_scheduler("NoSuchScheduler")
    # a deterministic scheduler takes no generator and samples; one for the other objective is
    # refused when chosen, not at the first step of an edit
    loaded.set_scheduler("HeunDiscreteScheduler")
    assert loaded(video, "make it red", generator=gen(), **FAST).frames.shape == video.shape
    with pytest.raises(ValueError, match="scheduler FlowMatchEulerDiscreteScheduler cannot sample this editor: "
                                         "it was trained for noise prediction"):
        loaded.set_scheduler("FlowMatchEulerDiscreteScheduler")
    assert type(loaded.scheduler).__name__ == "HeunDiscreteScheduler"  # the one in use is kept


def test_scheduler_is_refused_for_a_prediction_type_it_cannot_take():
    from diffusers import DDIMScheduler

    from infer.pipeline import sampling_scheduler

    x0_editor = DDIMScheduler(prediction_type="sample", timestep_spacing="trailing")
    with pytest.raises(ValueError, match=r"EulerAncestralDiscreteScheduler cannot sample this editor \(sample prediction\)"):
        sampling_scheduler("EulerAncestralDiscreteScheduler", x0_editor)
    ddpm = sampling_scheduler("DDPMScheduler", x0_editor)
    assert type(ddpm).__name__ == "DDPMScheduler" and ddpm.config.prediction_type == "sample"
    assert ddpm.num_inference_steps is None  # a fresh scheduler, not the probe that took a step


def test_from_checkpoint_loads_trained_weights(pipe, tmp_path):
    from infer.pipeline import CHECKPOINT_KEY

    editor = pipe.editor
    state = {f"unet.{k}": v for k, v in editor.unet.state_dict().items() if "motion_modules" in k}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, CHECKPOINT_KEY: {"editor": "tiny"}}, path)
    loaded = InsV2VPipeline.from_checkpoint(path)
    video = moving_square(6)
    assert np.array_equal(
        pipe(video, "make it red", generator=gen(), **FAST).frames,
        loaded(video, "make it red", generator=gen(), **FAST).frames,
    )
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not an editor training checkpoint"):
        InsV2VPipeline.from_checkpoint(tmp_path / "other.ckpt")


def test_video_round_trip_keeps_fps_and_frames(tmp_path):
    video = moving_square(9)
    out = write_video(tmp_path / "v.mp4", video, Fraction(30000, 1001))
    info = probe_video(out)
    assert info.fps == Fraction(30000, 1001) and info.num_frames == 9 and not info.has_audio
    back = read_video(out)
    assert back.shape == video.shape and np.abs(back.astype(int) - video).mean() < 8


def run_cli(*args, capsys):
    code = main(["edit", *map(str, args)])
    err = capsys.readouterr().err
    return code, err


def test_cli_edits_car_turn_in_several_clips(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(FIXTURES / "car-turn.mp4", "--prompt", "make it snowy", "--steps", "1", "--resolution", "16", "--quiet", capsys=capsys)
    assert code == 0, err
    assert "embedded tiny editor" in err
    out = tmp_path / "car-turn.edited.mp4"
    info = probe_video(out)
    assert info.num_frames == 80 and info.fps == 10 and (info.width, info.height) == (16, 16)
    assert len(read_video(out)) == 80


def test_cli_keeps_audio_and_ntsc_fps(tmp_path, capsys):
    from test_video_io import pattern, write_input

    source = write_input(tmp_path / "ntsc.mp4", [pattern(i, 48, 64) for i in range(40)], rate=Fraction(30000, 1001),
                         audio="aac")  # a camera's NTSC rate with an AAC track
    out = tmp_path / "ski.mp4"
    code, err = run_cli(
        source, "--prompt", "make it sunset", "-o", out, "--steps", "1",
        "--resolution", "16", "--max-frames", "24", "--clip-frames", "8", "--reference-frames", "2", "--quiet",
        capsys=capsys,
    )
    assert code == 0, err
    info = probe_video(out)
    assert info.fps == Fraction(30000, 1001) and info.num_frames == 24 and info.has_audio
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac"
        assert float(audio.duration * audio.time_base) == pytest.approx(24 * 1001 / 30000, abs=0.05)


def _corrupt(tmp_path):
    data = bytearray((FIXTURES / "car-turn.mp4").read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 200_000, 7):
        data[i] = (data[i] * 31 + 7) % 256
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(bytes(data))
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        container.start_encoding()  # header only: a video stream that holds no frame
    assert path.is_file()
    return path


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("missing", ["{tmp}/nope.mp4", "--prompt", "x"], "no such file"),
        ("not a video", ["{readme}", "--prompt", "x"], "not a readable video"),
        ("zero frames", ["{empty}", "--prompt", "x"], "no video stream"),
        ("corrupt", ["{corrupt}", "--prompt", "x", "--resolution", "16", "--steps", "1"], "corrupt video stream"),
        ("empty prompt", ["{car}", "--prompt", "  "], "--prompt is empty"),
        ("clip <= refs", ["{car}", "--prompt", "x", "--clip-frames", "4", "--reference-frames", "4"], "must be larger"),
        ("zero steps", ["{car}", "--prompt", "x", "--steps", "0"], "--steps: must be a positive integer"),
        ("negative guidance", ["{car}", "--prompt", "x", "--text-guidance", "-1"], "must be positive"),
        ("zero resolution", ["{car}", "--prompt", "x", "--resolution", "0"], "must be a positive integer"),
        ("bad lvsc", ["{car}", "--prompt", "x", "--lvsc", "2"], "must be in [0, 1]"),
        ("no prompt", ["{car}"], "required: --prompt"),
        ("bad model", ["{car}", "--prompt", "x", "--model", "{tmp}/nomodel"], "no editor at"),
        ("unknown scheduler", ["{car}", "--prompt", "x", "--scheduler", "NoSuchScheduler"], "unknown scheduler"),
        ("scheduler unfit", ["{car}", "--prompt", "x", "--scheduler", "FlowMatchEulerDiscreteScheduler"], "cannot sample this editor"),
    ],
)
def test_cli_bad_input_one_line_exit_2_no_output(tmp_path, capsys, monkeypatch, case, args, message):
    monkeypatch.chdir(tmp_path)
    names = {
        "tmp": tmp_path,
        "readme": Path(__file__).resolve().parents[1] / "README.md",
        "empty": _empty(tmp_path) if case == "zero frames" else "",
        "corrupt": _corrupt(tmp_path) if case == "corrupt" else "",
        "car": FIXTURES / "car-turn.mp4",
    }
    before = set(tmp_path.iterdir())
    code, err = run_cli(*[a.format(**names) for a in args], "-o", tmp_path / "out.mp4", "--quiet", capsys=capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if not line.startswith("infer: no --model")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    # no output and no temporary file left, except the frames edited before a mid-stream failure,
    # which are kept under a name the message gives
    left = set(tmp_path.iterdir()) - before
    assert all(str(path) in lines[0] for path in left)
    assert bool(left) == (case == "corrupt") and all(path.name == "out.partial.mp4" for path in left)


def test_console_script_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "infer", "edit", "missing.mp4", "--prompt", "x"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "infer: error: no such file: missing.mp4"


def test_unreadable_checkpoint_is_named(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("junk")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*bad\.ckpt: not a PyTorch checkpoint \(\w+"):
        InsV2VPipeline.from_checkpoint(bad)


def test_checkpoint_that_no_longer_fits_its_spec_is_named(tmp_path):
    from infer.pipeline import CHECKPOINT_KEY

    # a tiny editor trained when its vocabulary had two tokens fewer than the code builds now
    embedding = load_editor("tiny").text_encoder.embeddings.token_embedding.weight
    checkpoint = {"state_dict": {"text_encoder.embeddings.token_embedding.weight": embedding[:-2].clone()},
                  CHECKPOINT_KEY: {"format": 1, "editor": "tiny", "trainable": "all", "ema": None}}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"old\.ckpt: text_encoder weights do not fit .*token_embedding\.weight \(\d+, \d+\) vs"):
        InsV2VPipeline.from_checkpoint(tmp_path / "old.ckpt")
