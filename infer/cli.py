"""The `infer` command: `infer edit INPUT --prompt TEXT` edits a video file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(message)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="infer", description="Edit videos with an InsV2V editor.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    edit = sub.add_parser("edit", help="edit a video by an instruction", description="Edit a video by an instruction.")
    edit.add_argument("input", help="video file (mp4, mov, mkv, webm, gif)")
    edit.add_argument("--prompt", required=True, help='the instruction, e.g. "make it snowy"')
    edit.add_argument("-o", "--output", help="output mp4 (default: <input stem>.edited.mp4 here)")
    edit.add_argument("--model", help="editor folder or training checkpoint (default: the tiny editor)")
    edit.add_argument("--steps", type=_positive_int, default=20, help="denoising steps (default 20)")
    edit.add_argument("--scheduler", default=None, help="diffusers scheduler class (default: the model's, DDPM)")
    edit.add_argument("--text-guidance", type=_positive_float, default=7.5, help="s_T (default 7.5)")
    edit.add_argument("--video-guidance", type=_positive_float, default=1.2, help="s_V (default 1.2)")
    edit.add_argument("--negative-prompt", default=None)
    edit.add_argument("--clip-frames", type=_positive_int, default=16, help="frames per clip (default 16)")
    edit.add_argument("--reference-frames", type=_non_negative_int, default=4, help="overlap (default 4)")
    edit.add_argument("--lvsc", type=_unit_float, default=0.5, help="fraction of steps corrected (default 0.5)")
    edit.add_argument("--no-lvsc", action="store_true", help="no Long Video Sampling Correction")
    edit.add_argument("--motion-compensation", action="store_true", help="warp LVSC corrections along optical flow")
    edit.add_argument("--resolution", type=_positive_int, default=None, help="short side in pixels (default: the model's)")
    edit.add_argument("--max-frames", type=_positive_int, default=None, help="edit at most this many frames")
    edit.add_argument("--stride", type=_positive_int, default=1, help="take every N-th frame (default 1)")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    edit.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    edit.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def edit(args: argparse.Namespace) -> Path:
    import av
    import torch

    from model import EditorLoadError

    from .pipeline import EditSettings, InsV2VPipeline, working_size
    from .video import VideoError, VideoWriter, iter_frames, probe_video

    av.logging.set_level(av.logging.PANIC)  # decoder chatter would drown the one-line errors
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.clip_frames <= args.reference_frames:
        raise UsageError(
            f"--clip-frames ({args.clip_frames}) must be larger than --reference-frames ({args.reference_frames})"
        )
    source = Path(args.input)
    output = Path(args.output) if args.output else Path.cwd() / f"{source.stem}.edited.mp4"
    if output.suffix.lower() != ".mp4":
        raise UsageError(f"output must be an .mp4 file, got {output}")
    try:
        info = probe_video(source)
    except VideoError as err:
        raise UsageError(str(err)) from None
    if output.resolve() == source.resolve():
        raise UsageError("output would overwrite the input")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if args.model is None:
            print("infer: no --model given; using the embedded tiny editor (random weights)", file=sys.stderr)
            pipe = InsV2VPipeline.from_pretrained("tiny", scheduler=args.scheduler)
        elif args.model.endswith(".ckpt"):
            pipe = InsV2VPipeline.from_checkpoint(args.model, scheduler=args.scheduler)
        else:
            pipe = InsV2VPipeline.from_pretrained(args.model, scheduler=args.scheduler)
    except (EditorLoadError, ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    pipe.to(device, getattr(torch, args.dtype) if args.dtype else None)

    resolution = args.resolution or pipe.editor.resolution
    settings = EditSettings(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        text_guidance=args.text_guidance,
        video_guidance=args.video_guidance,
        clip_frames=args.clip_frames,
        reference_frames=args.reference_frames,
        lvsc=0.0 if args.no_lvsc else args.lvsc,
        motion_compensation=args.motion_compensation,
        resolution=resolution,
    )
    total = info.num_frames and -(-info.num_frames // args.stride)
    if total and args.max_frames:
        total = min(total, args.max_frames)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    frames = iter_frames(source, max_frames=args.max_frames, stride=args.stride)
    writer = VideoWriter(output, info.fps / args.stride, audio_from=source if info.has_audio else None)
    try:
        for frame in pipe.edit_stream(frames, settings, generator=generator, progress=not args.quiet, total_frames=total or None):
            writer.write(frame)
    except VideoError as err:
        writer.abort()
        raise UsageError(str(err)) from None
    except BaseException:
        writer.abort()
        raise
    writer.close()
    h, w = working_size(info.height, info.width, resolution)
    if not args.quiet:
        print(f"wrote {output} ({writer.frames_written} frames, {w}x{h}, {float(info.fps / args.stride):.3f} fps)", file=sys.stderr)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "edit":
            edit(args)
        return 0
    except UsageError as err:
        print(f"infer: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("infer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
