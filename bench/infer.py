"""Inference benchmark: seconds per frame, memory against video length, and on a GPU the cost of
batched guidance, half precision and LVSC at SD 1.5 size.

    python bench/infer.py                       # tiny editor on CPU: s/frame, peak RSS 32 vs 320 frames
    python bench/infer.py --dit                 # the same for the tiny DiT editor (causal VAE, 9-frame clips)
    python bench/infer.py --sd --device cuda    # SD 1.5 size, 16 frames at 384², 20 steps
    python bench/infer.py --sd-flops            # SD 1.5 size: FLOPs of an edit's parts (meta device: any machine)
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infer import EditSettings, InsV2VPipeline, iter_frames, write_video  # noqa: E402
from model import build_editor, shipped_config  # noqa: E402


def synthetic_video(frames: int, size: int = 128) -> np.ndarray:
    """A square drifting over a gradient: cheap to make, real motion for the flow."""
    ys, xs = np.mgrid[0:size, 0:size]
    base = np.stack([xs * 255 // size, ys * 255 // size, np.full_like(xs, 96)], -1).astype(np.uint8)
    video = np.repeat(base[None], frames, 0)
    for i in range(frames):
        x = (i * 3) % (size - 24)
        video[i, 40:64, x : x + 24] = (230, 40, 40)
    return video


def edit_file(pipe, path, settings, device) -> int:
    """Decode, edit and count frames, streaming, as `infer edit` does (no encode)."""
    frames = 0
    for _ in pipe.edit_stream(iter_frames(path), settings, generator=torch.Generator().manual_seed(0), progress=False):
        frames += 1
    return frames


def memory_run(num_frames: int, steps: int, model: str = "tiny") -> None:
    """Child process: edit a num_frames-long video; print the process's peak RSS in MiB."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_video(Path(tmp) / "in.mp4", synthetic_video(num_frames), 10)
        pipe = InsV2VPipeline.from_pretrained(model)
        settings = pipe.settings("make it red", num_inference_steps=steps, resolution=32, motion_compensation=True)
        assert edit_file(pipe, path, settings, "cpu") == num_frames
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def tiny_cpu(args) -> None:
    model = "wan-tiny" if args.dit else "tiny"
    pipe = InsV2VPipeline.from_pretrained(model)
    video = synthetic_video(args.frames)
    settings = dict(num_inference_steps=args.steps, resolution=32, progress=False)
    pipe(video[:16], "make it red", **{**settings, "num_inference_steps": 1})  # warm-up
    print(f"{model}: clips of {pipe.settings('x').clip_frames} frames, {pipe.settings('x').reference_frames} references")
    for label, extra in (("LVSC", {}), ("LVSC+MC", {"motion_compensation": True}), ("no LVSC", {"lvsc": 0.0})):
        start = time.perf_counter()
        pipe(video, "make it red", generator=torch.Generator().manual_seed(0), **settings, **extra)
        per_frame = (time.perf_counter() - start) / args.frames
        print(f"{model} CPU {label:8s} {args.frames} frames at 32px, {args.steps} steps: {per_frame:.3f} s/frame")
    peaks = {}
    for n in (32, 320):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-run", str(n), "--steps", "2", *(["--dit"] if args.dit else [])],
            capture_output=True, text=True, check=True
        )
        peaks[n] = float(out.stdout.strip().splitlines()[-1])
    growth = peaks[320] / peaks[32] - 1
    print(f"peak RSS (decode+edit, streaming): 32 frames {peaks[32]:.0f} MiB, 320 frames {peaks[320]:.0f} MiB ({growth:+.1%})")


def sd_gpu(args) -> None:
    device = torch.device(args.device)
    editor = build_editor(shipped_config("model/sd15-random.yaml"))
    pipe = InsV2VPipeline.from_editor(editor).to(device)
    clip = synthetic_video(args.sd_frames + 4, size=args.sd_resolution)  # one clip + a second with references
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(dtype, batched, lvsc, frames):
        pipe.to(device, dtype)
        settings = EditSettings(
            prompt="make it snowy",
            num_inference_steps=args.sd_steps,
            clip_frames=args.sd_frames,
            reference_frames=4,
            lvsc=lvsc,
            resolution=args.sd_resolution,
            batched_guidance=batched,
        )
        gen = torch.Generator().manual_seed(0)
        list(pipe.edit_stream(iter(frames[: args.sd_frames]), settings, generator=gen, progress=False))  # warm-up
        sync()
        start = time.perf_counter()
        list(pipe.edit_stream(iter(frames), settings, generator=gen, progress=False))
        sync()
        return time.perf_counter() - start

    base = timed(torch.float32, False, 0.5, clip)
    rows = [("unbatched fp32", base)]
    half = torch.bfloat16 if args.half == "bfloat16" else torch.float16
    rows.append(("batched fp32", timed(torch.float32, True, 0.5, clip)))
    rows.append((f"batched {args.half}", timed(half, True, 0.5, clip)))
    no_lvsc = timed(half, True, 0.0, clip)
    rows.append((f"batched {args.half}, no LVSC", no_lvsc))
    n = len(clip)
    print(f"SD 1.5 size, {n} frames ({args.sd_frames}-frame clips, 4 refs) at {args.sd_resolution}², {args.sd_steps} steps, {device}")
    for label, seconds in rows:
        print(f"  {label:28s} {seconds:7.2f} s  {seconds / n:.3f} s/frame  speed-up x{base / seconds:.2f}")
    print(f"  LVSC overhead: {rows[2][1] / no_lvsc - 1:+.1%}")


def sd_flops(args) -> None:
    """FLOPs of editing one SD 1.5-size clip, counted on the meta device (no memory, any machine)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        editor = build_editor(shipped_config("model/sd15-random.yaml"))
    f, r, steps = args.sd_frames, args.sd_resolution, args.sd_steps
    side = r // editor.vae_scale_factor

    def count(run) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run()
        return counter.get_total_flops()

    step = count(lambda: editor.unet(torch.empty(3, 8, f, side, side, device="meta"),  # 3-way guidance batch
                                     torch.zeros(3, dtype=torch.long, device="meta"),
                                     encoder_hidden_states=torch.empty(3 * f, 77, 768, device="meta")))
    encode = count(lambda: editor.vae.encode(torch.empty(f, 3, r, r, device="meta")))
    decode = count(lambda: editor.vae.decode(torch.empty(f, 4, side, side, device="meta")))
    total = steps * step + encode + decode
    print(f"SD 1.5 size, one clip of {f} frames at {r}², {steps} steps, text + video guidance (U-Net batch 3):")
    for name, value in (("U-Net, all steps", steps * step), ("VAE encode", encode), ("VAE decode", decode)):
        print(f"  {name:18s} {value / 1e12:8.2f} TFLOP  {value / total:6.1%}")
    print(f"  per frame {total / f / 1e12:.2f} TFLOP; at 40 % of an H100's 989 bf16 TFLOP/s: "
          f"{total / f / (0.4 * 989e12):.3f} s/frame")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--memory-run", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dit", action="store_true", help="the tiny DiT editor (wan-tiny) instead of the tiny U-Net editor")
    ap.add_argument("--sd", action="store_true", help="SD 1.5-size comparisons (meant for a GPU)")
    ap.add_argument("--sd-flops", action="store_true", help="SD 1.5 size: FLOPs of an edit's parts, on the meta device")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--half", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--sd-frames", type=int, default=16)
    ap.add_argument("--sd-resolution", type=int, default=384)
    ap.add_argument("--sd-steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.memory_run:
        memory_run(args.memory_run, args.steps, "wan-tiny" if args.dit else "tiny")
    elif args.sd_flops:
        sd_flops(args)
    elif args.sd:
        sd_gpu(args)
    else:
        tiny_cpu(args)


if __name__ == "__main__":
    main()
