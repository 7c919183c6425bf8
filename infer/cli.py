"""The `infer` command: `infer edit INPUT --prompt TEXT` edits a video file; `eval`, `serve` and `convert-insv2v`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .arguments import (USAGE_ERROR, OneLineParser, UsageError, crf, non_negative_float, non_negative_int, positive_float,
                        positive_int, quiet_libraries, unit_float)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="infer", description="Edit videos with an InsV2V editor.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    edit = sub.add_parser("edit", help="edit a video by an instruction", description="Edit a video by an instruction.")
    edit.add_argument("input", help="video file (mp4, mov, mkv, webm, avi, gif, animated webp) or image sequence (frames/%%05d.png)")
    edit.add_argument("--prompt", required=True, help='the instruction, e.g. "make it snowy"')
    edit.add_argument("-o", "--output", help="output .mp4, .mov, .mkv, .webm or .gif (default: <input stem>.edited.mp4 here)")
    edit.add_argument("--model", help="editor folder or training checkpoint (default: the tiny editor)")
    edit.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the editor's, else 20)")
    edit.add_argument("--scheduler", default=None, help="diffusers scheduler class (default: the model's, DDPM)")
    edit.add_argument("--text-guidance", type=positive_float, default=None, help="s_T (default: the editor's, else 7.5)")
    edit.add_argument("--video-guidance", type=positive_float, default=None, help="s_V (default: the editor's, else 1.2)")
    edit.add_argument("--negative-prompt", default=None)
    edit.add_argument("--clip-frames", type=positive_int, default=None,
                      help="frames per clip (default: the editor's, else 16; 1 + 4k for a DiT editor)")
    edit.add_argument("--reference-frames", type=non_negative_int, default=None,
                      help="overlap (default: the editor's, else 4; 1 + 4k for a DiT editor)")
    edit.add_argument("--lvsc", type=unit_float, default=0.5, help="fraction of steps corrected (default 0.5)")
    edit.add_argument("--no-lvsc", action="store_true", help="no Long Video Sampling Correction")
    edit.add_argument("--motion-compensation", action="store_true", help="warp LVSC corrections along optical flow")
    edit.add_argument("--resolution", type=positive_int, default=None, help="short side in pixels (default: the model's)")
    edit.add_argument("--max-frames", type=positive_int, default=None, help="edit at most this many frames")
    edit.add_argument("--max-pixels", type=positive_int, default=None,
                      help="largest working frame in pixels (default 2,088,960, about 1920x1088; long side at most 4096)")
    edit.add_argument("--stride", type=positive_int, default=1, help="take every N-th frame (default 1)")
    edit.add_argument("--ignore-decode-errors", action="store_true",
                      help="edit a damaged video as FFmpeg conceals it instead of stopping at the first damaged frame")
    edit.add_argument("--start", type=non_negative_float, default=None, help="edit from this time (seconds)")
    edit.add_argument("--end", type=non_negative_float, default=None, help="edit up to this time (seconds)")
    edit.add_argument("--crf", type=crf, default=18, help="output quality for x264/x265/VP9, 0 (lossless) to 51 (default 18)")
    edit.add_argument("--codec", default=None, help="output video encoder (default: libx264; VP9 for .webm, gif for .gif)")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    edit.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    edit.add_argument("--quiet", action="store_true", help="no progress bars")

    ev = sub.add_parser("eval", help="edit a set of videos under several settings and tabulate metrics",
                        description="Compare settings on the same videos and seeds: CLIP-T/F/D, PickScore, warp and seam error.")
    ev.add_argument("--videos", help="folder of videos named <video>.mp4 (or mov, mkv, webm, gif)")
    ev.add_argument("--instructions", help="LOVEU-TGVE JSON {video: {edit: instruction}} or CSV video,instruction")
    ev.add_argument("--benchmark", metavar="PATH",
                    help="a public benchmark's file or folder instead of --videos/--instructions: EditVerse-Bench "
                         "test.json, OpenVE-Bench benchmark_videos.csv, FiVE-Bench edit*_FiVE.json, a V2VBench YAML, "
                         "LOVEU-TGVE prompt YAMLs")
    ev.add_argument("--format", choices=["editverse", "openve", "five", "v2vbench", "tgve"], default=None,
                    help="the benchmark's format (default: detected)")
    ev.add_argument("--categories", nargs="+", default=None, help="only these edit types of the benchmark")
    ev.add_argument("--limit", type=positive_int, default=None, help="only the first N items (after --categories)")
    ev.add_argument("--shard-index", type=non_negative_int, default=None,
                    help="this rank's share of the items (default: $RANK, else 0)")
    ev.add_argument("--num-shards", type=positive_int, default=None, help="ranks sharing the items (default: $WORLD_SIZE, else 1)")
    ev.add_argument("--merge", action="store_true", help="report the rows every rank wrote to --out (no editing)")
    ev.add_argument("--judge-concurrency", type=positive_int, default=4, help="judge requests in flight (default 4)")
    ev.add_argument("--judge-temperature", type=non_negative_float, default=0.0, help="the judge's temperature (default 0)")
    ev.add_argument("--judge-video", action="store_true",
                    help="OpenVE: send both videos whole as video_url parts (a server that takes video, e.g. vLLM), "
                         "not 8 frames of each")
    ev.add_argument("--out", required=True, help="folder for the rows, reports and (with --benchmark) the edits")
    ev.add_argument("--model", help="editor folder or training checkpoint (default: the tiny editor)")
    ev.add_argument("--clip-model", help="transformers CLIP folder (ViT-L/14); default: the tiny random CLIP")
    ev.add_argument("--pickscore-model", help="PickScore_v1 folder (a transformers CLIP model)")
    ev.add_argument("--judge-base-url", default=None,
                    help="OpenAI-compatible server of a vision-language judge (adds the 0-9 rubric score)")
    ev.add_argument("--judge-model", default=None, help="the judge's model name")
    ev.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                    help="environment variable holding the judge's key (default OPENAI_API_KEY)")
    ev.add_argument("--judge-frames", type=positive_int, default=3, help="frames of each video the judge sees (default 3)")
    ev.add_argument("--setting", action="append", default=[], metavar="NAME:KEY=VAL,...",
                    help="a named set of edit options, repeatable (default: no-lvsc, lvsc, lvsc+mc)")
    ev.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the editor's, else 20)")
    ev.add_argument("--clip-frames", type=positive_int, default=None, help="default: the editor's, else 16")
    ev.add_argument("--reference-frames", type=non_negative_int, default=None, help="default: the editor's, else 4")
    ev.add_argument("--max-frames", type=positive_int, default=None)
    ev.add_argument("--resolution", type=positive_int, default=None)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--resume", action="store_true", help="keep the rows already in --out/per_video.csv and edit only the rest")
    ev.add_argument("--quiet", action="store_true")

    srv = sub.add_parser("serve", help="a web page that edits uploaded videos (Gradio)",
                         description="Serve a page to edit videos in a browser; its HTTP API works from gradio_client.")
    srv.add_argument("--model", help="editor folder or training checkpoint (default: the tiny editor)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    srv.add_argument("--port", type=positive_int, default=7860)
    srv.add_argument("--max-seconds", type=positive_float, default=60.0, help="longest video the page accepts (default 60)")
    srv.add_argument("--max-frames", type=positive_int, default=1800, help="most frames a video may have (default 1800)")
    srv.add_argument("--max-pixels", type=positive_int, default=None,
                     help="largest working frame in pixels (default 2,088,960, about 1920x1088)")
    srv.add_argument("--max-file-size", default="200mb", help="largest upload (default 200mb)")
    srv.add_argument("--max-queue", type=positive_int, default=16, help="edits that may wait in the queue (default 16)")
    srv.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                     help="ask for this login (default: $INSV2V_SERVE_AUTH if set, else none)")
    srv.add_argument("--device", default=None)
    srv.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)

    conv = sub.add_parser(
        "convert-insv2v",
        help="turn an InsV2V authors' training checkpoint into an editor folder",
        description="Convert a checkpoint written by the InsV2V authors' code (unet.*, vae.*, text_model.transformer.* "
        "weights) into an editor folder that `infer edit --model` and training load.",
    )
    conv.add_argument("checkpoint", help="the authors' checkpoint (.ckpt/.pt/.pth/.bin read with weights_only, .safetensors, or a DeepSpeed checkpoint folder)")
    conv.add_argument("--base-model", required=True,
                      help="InstructPix2Pix (or SD 1.5) diffusers folder: tokenizer, schedule, and the VAE/text encoder when the checkpoint lacks them")
    conv.add_argument("--out", required=True, help="editor folder to write (must not exist yet)")
    conv.add_argument("--unet-config", help="YAML/JSON of the U-Net's constructor arguments (default: the paper's, configs/model/insv2v-reference-unet.yaml)")
    conv.add_argument("--scheduler", default="DDIMScheduler", help="diffusers scheduler class for the saved editor (default DDIMScheduler)")
    conv.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="dtype of the saved weights")
    conv.add_argument("--quiet", action="store_true")
    return parser


def convert_insv2v_command(args: argparse.Namespace) -> Path:
    import json
    import shutil
    import tempfile

    import yaml

    from model import EditorLoadError
    from model.insv2v import editor_from_insv2v_checkpoint

    from .placement import dtype_named

    out = Path(args.out)
    if out.exists():
        raise UsageError(f"--out {out} already exists: choose a new folder")
    unet_config = None
    if args.unet_config:
        path = Path(args.unet_config)
        try:
            unet_config = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text())
        except (OSError, ValueError, yaml.YAMLError) as err:
            raise UsageError(f"--unet-config {path}: {str(err).splitlines()[0]}") from None
        if not isinstance(unet_config, dict):
            raise UsageError(f"--unet-config {path} does not hold a mapping")
    try:
        editor = editor_from_insv2v_checkpoint(args.checkpoint, args.base_model, unet_config=unet_config,
                                               scheduler=args.scheduler, torch_dtype=dtype_named(args.dtype))
    except (EditorLoadError, ValueError) as err:
        raise UsageError(str(err)) from None
    # written beside the target and renamed, so an interrupted run leaves no half editor at --out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        editor.save_pretrained(staging)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not args.quiet:
        print(f"wrote {out} (U-Net from {args.checkpoint}, norm_layout insv2v)", file=sys.stderr)
    return out


def benchmark_command(args: argparse.Namespace) -> None:
    """``infer eval --benchmark``: one rank's edits and judgments, or ``--merge`` of every rank's rows."""
    import os

    from model import EditorLoadError

    from .benchmark_judges import JUDGES, JudgeSettings
    from .benchmark_run import BenchmarkRun, RowLog, merge, read_rows, rows_file, run_benchmark, shard, write_report
    from .benchmarks import BenchmarkError, read_benchmark, select
    from .clip_scorer import ClipScorer
    from .pipeline import InsV2VPipeline
    from .sampling import check_causal_clip
    from .video import VideoError

    out = Path(args.out)
    try:
        fmt, items = read_benchmark(Path(args.benchmark), args.format)
        items = select(items, args.categories, args.limit, fmt)
        if not items:
            raise ValueError(f"{args.benchmark}: no items left after --categories/--limit")
        notes = [f"{len(items)} items of {args.benchmark} ({fmt})"]
        if args.merge:
            rows = merge(out, items)
        else:
            index = args.shard_index if args.shard_index is not None else int(os.environ.get("RANK", 0))
            count = args.num_shards if args.num_shards is not None else int(os.environ.get("WORLD_SIZE", 1))
            mine = shard(items, index, count)
            path = rows_file(out, index, count)
            if path.is_file() and not args.resume:
                raise ValueError(f"{path} holds an earlier run's rows: pass --resume to continue it, or choose another --out")
            kept = read_rows(path) if args.resume else []
            log = RowLog(path, kept)
            pipe = InsV2VPipeline.load(args.model)
            options = {k: v for k, v in dict(num_inference_steps=args.steps, clip_frames=args.clip_frames,
                                             reference_frames=args.reference_frames).items() if v is not None}
            options.update(benchmark_setting(args.setting))
            probe = pipe.settings("x", **options)
            probe.validate()
            check_causal_clip(probe.clip_frames, probe.reference_frames, pipe.editor.temporal_compression)
            judge = None
            if args.judge_base_url or args.judge_model:
                if not (args.judge_base_url and args.judge_model):
                    raise ValueError("the judge needs both --judge-base-url and --judge-model")
                if fmt in JUDGES:
                    settings = JudgeSettings(args.judge_base_url, args.judge_model, args.judge_api_key_env,
                                             args.judge_temperature)
                    judge = JUDGES[fmt](settings, videos=True) if args.judge_video and fmt == "openve" else \
                        JUDGES[fmt](settings)
                else:
                    notes.append(f"judge: {fmt} defines no VLM score; only the automatic metrics are reported")
            run = BenchmarkRun(fmt, out, pipe, options, ClipScorer.load(args.clip_model),
                               ClipScorer.from_pretrained(args.pickscore_model) if args.pickscore_model else None,
                               judge, args.seed, args.resolution, args.max_frames, args.judge_concurrency,
                               not args.quiet)
            run_benchmark(run, mine, log, {r["key"] for r in kept})
            rows = read_rows(path)
            notes.append(f"rank {index} of {count}: {len(rows)} of {len(mine)} items" +
                         (f" ({len(kept)} kept from the earlier run)" if kept else ""))
            if run.judge_stopped:
                notes.append(f"judge stopped: {run.judge_stopped}")
            if judge is not None:
                notes.append(f"judge: {judge.stats.requests} requests, {judge.stats.retries} retries, "
                             f"{judge.stats.malformed} replies not readable")
        if not args.clip_model:
            notes.append("CLIP metrics use the embedded tiny CLIP (random weights): pass --clip-model for meaningful scores")
    except (BenchmarkError, ValueError, FileNotFoundError, EditorLoadError, VideoError) as err:
        raise UsageError(str(err)) from None
    text = write_report(out, fmt, rows, notes)
    if not args.quiet:
        print(text, file=sys.stderr)


def benchmark_setting(settings: list[str]) -> dict:
    """The edit options of ``--benchmark``'s one ``--setting`` (none given: no options)."""
    from .evaluate import parse_setting

    if len(settings) > 1:
        raise ValueError("--benchmark edits with one setting: give --setting once")
    return parse_setting(settings[0])[1] if settings else {}


def evaluate_command(args: argparse.Namespace) -> None:
    if args.benchmark:
        return benchmark_command(args)
    if not (args.videos and args.instructions):
        raise UsageError("infer eval needs --videos and --instructions, or --benchmark")
    from model import EditorLoadError

    import numpy as np

    from .clip_scorer import ClipScorer
    from .evaluate import (DEFAULT_SETTINGS, ROWS_FILE, RowLog, Scorers, evaluate, find_video, parse_setting, read_instructions,
                           read_rows, summarize, write_reports)
    from .judge import VisionJudge
    from .pipeline import InsV2VPipeline
    from .sampling import check_causal_clip
    from .video import VideoError

    videos = Path(args.videos)
    if not videos.is_dir():
        raise UsageError(f"--videos {videos} is not a folder")
    try:
        instructions = read_instructions(Path(args.instructions))
        settings = dict(parse_setting(s) for s in args.setting) or DEFAULT_SETTINGS
        found = [i for i in instructions if find_video(videos, i[0]) is not None]
        if not found:
            raise ValueError(f"none of the {len({i[0] for i in instructions})} videos named in {args.instructions} is in {videos}")
        notes = []
        pipe = InsV2VPipeline.load(args.model)
        notes.append(f"editor: {args.model}" if args.model else "editor: the embedded tiny editor (random weights)")
        clip = ClipScorer.load(args.clip_model)
        if not args.clip_model:
            notes.append("CLIP metrics use the embedded tiny CLIP (random weights): pass --clip-model for meaningful scores")
        pick = ClipScorer.from_pretrained(args.pickscore_model) if args.pickscore_model else None
        if pick is None:
            notes.append("PickScore: not computed (no --pickscore-model)")
        judge = None
        if args.judge_base_url or args.judge_model:
            if not (args.judge_base_url and args.judge_model):
                raise ValueError("the judge needs both --judge-base-url and --judge-model")
            judge = VisionJudge(args.judge_base_url, args.judge_model, args.judge_api_key_env, args.judge_frames)
        else:
            notes.append("judge: not computed (no --judge-base-url / --judge-model)")
        skipped = len({i[0] for i in instructions}) - len({i[0] for i in found})
        notes.append(f"{len(found)} edits on {len({i[0] for i in found})} videos; {skipped} listed videos not found")
        base = dict(num_inference_steps=args.steps, clip_frames=args.clip_frames, reference_frames=args.reference_frames)
        for name, options in settings.items():
            setting = pipe.settings("x", **{**base, **options})
            setting.validate()
            check_causal_clip(setting.clip_frames, setting.reference_frames, pipe.editor.temporal_compression)
        out = Path(args.out)
        if (out / ROWS_FILE).is_file() and not args.resume:
            raise ValueError(f"{out / ROWS_FILE} holds an earlier run's rows: pass --resume to continue it, or choose another --out")
        done = read_rows(out / ROWS_FILE) if args.resume else []
        done = [r for r in done if r["setting"] in settings]
        log = RowLog(out / ROWS_FILE, done)  # an unwritable --out fails now, not after the edits
        scorers = Scorers(clip, pick, args.clip_model is None, judge)
        rows: list = []
        try:
            evaluate(pipe, videos, found, settings, scorers, base, args.max_frames, args.resolution, args.seed,
                     progress=not args.quiet, log=log, done=done, rows=rows)
        except KeyboardInterrupt:  # what is finished is reported; a rerun with --resume does the rest
            notes.append(f"interrupted: {len(rows)} rows finished; rerun with --resume for the rest")
            write_reports(out, rows, summarize(rows), notes)
            raise
        if done:
            notes.append(f"resumed: {len(done)} rows kept from the earlier run")
    except (ValueError, FileNotFoundError, EditorLoadError, VideoError) as err:
        raise UsageError(str(err)) from None
    if judge is not None:
        judged = sum(not np.isnan(r["judge"]) for r in rows)
        notes.append(f"judge: {args.judge_model}, {judged} of {len(rows)} edits scored, {judge.stats.malformed} malformed "
                     f"replies skipped, {judge.stats.retries} retries")
        if scorers.judge_failure:
            notes.append(f"judge stopped: {scorers.judge_failure}")
    write_reports(Path(args.out), rows, summarize(rows), notes)
    if not args.quiet:
        print((Path(args.out) / "summary.md").read_text(), file=sys.stderr)


def edit(args: argparse.Namespace) -> Path:
    import av
    import torch

    from model import EditorLoadError

    from .edit_file import edit_file
    from .pipeline import MAX_WORKING_PIXELS, InsV2VPipeline, check_working_size, working_size
    from .placement import compute_device, dtype_named
    from .sampling import check_causal_clip
    from .video import VideoError, is_image_sequence, probe_video
    from .video_writer import ESTIMATED_BYTES_PER_PIXEL, check_output_path

    # No Python log callback: FFmpeg's chatter would drown the one-line errors, and a callback
    # that decoder threads call while a threaded decoder is being freed deadlocks on the GIL.
    av.logging.set_level(None)
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.clip_frames is not None and args.reference_frames is not None and args.clip_frames <= args.reference_frames:
        raise UsageError(
            f"--clip-frames ({args.clip_frames}) must be larger than --reference-frames ({args.reference_frames})"
        )
    if args.start is not None and args.end is not None and args.end <= args.start:
        raise UsageError(f"--end ({args.end}) must be after --start ({args.start})")
    source = Path(args.input)
    # an image-sequence pattern names no file
    stem = (source.stem.split("%")[0].rstrip("_-.") or "frames") if is_image_sequence(source) else source.stem
    output = Path(args.output) if args.output else Path.cwd() / f"{stem}.edited.mp4"
    try:
        info = probe_video(source, strict=not args.ignore_decode_errors)
        if output.resolve() == source.resolve():
            raise UsageError("output would overwrite the input")
        resolution = args.resolution
        # everything knowable before editing is checked before the model is even loaded
        seconds = info.seconds
        seconds = max(0.0, min(args.end or seconds, seconds) - (args.start or 0.0)) if seconds else 0.0
        expected = int(seconds * info.fps / args.stride) if seconds else 0
        if args.max_frames:
            expected = min(expected, args.max_frames) if expected else args.max_frames
        h, w = working_size(info.height, info.width, resolution or 256)
        check_output_path(output, int(expected * h * w * ESTIMATED_BYTES_PER_PIXEL))
    except VideoError as err:
        raise UsageError(str(err)) from None
    max_pixels = args.max_pixels or MAX_WORKING_PIXELS

    device = compute_device(args.device)
    try:
        if args.model is None:
            print("infer: no --model given; using the embedded tiny editor (random weights)", file=sys.stderr)
        pipe = InsV2VPipeline.load(args.model, scheduler=args.scheduler)
    except (EditorLoadError, ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    pipe.to(device, dtype_named(args.dtype))

    resolution = args.resolution or pipe.editor.resolution
    multiple = pipe.editor.size_multiple
    try:
        check_working_size(*working_size(info.height, info.width, resolution, multiple), max_pixels)
    except ValueError as err:
        raise UsageError(f"{err} (--resolution, --max-pixels)") from None
    settings = pipe.settings(
        args.prompt,
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
    try:
        settings.validate()
        check_causal_clip(settings.clip_frames, settings.reference_frames, pipe.editor.temporal_compression)
    except ValueError as err:
        raise UsageError(f"{err} (--clip-frames, --reference-frames)") from None
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    try:
        writer = edit_file(pipe, source, output, info, settings, generator, start=args.start, end=args.end,
                           max_frames=args.max_frames, stride=args.stride, strict=not args.ignore_decode_errors,
                           crf=args.crf, codec=args.codec, progress=not args.quiet, total_frames=expected or None)
    except VideoError as err:
        raise UsageError(str(err)) from None
    h, w = working_size(info.height, info.width, resolution, multiple)
    if not args.quiet:
        print(f"wrote {output} ({writer.frames_written} frames, {w}x{h}, {float(info.fps / args.stride):.3f} fps)", file=sys.stderr)
    return output


def serve_command(args: argparse.Namespace) -> None:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from model import EditorLoadError

    from .pipeline import MAX_WORKING_PIXELS
    from .serve import Limits, build_app, launch, load_pipeline, parse_auth

    try:
        auth = parse_auth(args.auth)
    except ValueError as err:
        raise UsageError(str(err)) from None
    limits = Limits(max_seconds=args.max_seconds, max_frames=args.max_frames,
                    max_working_pixels=args.max_pixels or MAX_WORKING_PIXELS, max_file_size=args.max_file_size,
                    max_queue=args.max_queue)
    try:
        pipe = load_pipeline(args.model, args.device, args.dtype)
    except (EditorLoadError, ValueError, FileNotFoundError) as err:
        raise UsageError(f"could not load the editor: {str(err).splitlines()[0]}") from None
    name = args.model or "the embedded tiny editor (random weights)"
    print(f"infer: serving {name} on http://{args.host}:{args.port}" + (" (login required)" if auth else ""),
          file=sys.stderr)
    launch(build_app(pipe, limits=limits), args.host, args.port, auth=auth)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "edit":
            edit(args)
        elif args.command == "eval":
            evaluate_command(args)
        elif args.command == "serve":
            serve_command(args)
        elif args.command == "convert-insv2v":
            convert_insv2v_command(args)
        return 0
    except UsageError as err:
        print(f"infer: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as err:  # a folder that cannot be created or written, a full disk
        print(f"infer: error: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""), file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt as err:  # an edit's interruption names the partial file it kept
        print(f"infer: {getattr(err, 'message', 'interrupted')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
