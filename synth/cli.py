"""The `synth` command: `synth build`, `synth lift`, `synth import`, `synth cache`, `synth prompts`, `synth report`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from infer.arguments import USAGE_ERROR, OneLineParser, UsageError, positive_int, quiet_libraries

DEFAULT_CONFIG = "configs/synth/tiny.yaml"


def _load(args) -> dict:
    from .build import load_config

    if args.config is None:
        from model import shipped_config

        config = shipped_config("synth/tiny.yaml")
    else:
        config = load_config(args.config)
    if getattr(args, "llm_base_url", None):
        config["prompts"].update(source="openai", base_url=args.llm_base_url)
    if getattr(args, "llm_model", None):
        config["prompts"].update(source="openai", model=args.llm_model)
    if getattr(args, "dtype", None):
        config["generator"]["dtype"] = args.dtype
    return config


def cmd_build(args) -> None:
    from .build import build
    from .ranks import rank_and_world

    config = _load(args)
    rank, world = rank_and_world(args.shard_index, args.num_shards)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    for name in ("sources", "captions"):
        if getattr(args, name) is not None and not Path(getattr(args, name)).exists():
            raise UsageError(f"--{name}: nothing at {getattr(args, name)}")
    result = build(config, out, args.num_samples, args.samples_per_shard, args.resume, rank, world,
                   progress=not args.quiet, device=args.device,
                   sources=Path(args.sources) if args.sources else None,
                   captions=Path(args.captions) if args.captions else None)
    if not args.quiet:
        print(f"rank {rank}/{world}: {result.kept} kept pairs in {out} ({len(result.shards)} new shards)", file=sys.stderr)


def cmd_lift(args) -> None:
    from model import shipped_config

    from .build import load_config
    from .lift import LIFT_SECTIONS, lift
    from .ranks import rank_and_world

    if args.config is None:
        config = shipped_config("synth/lift.yaml")
    else:
        config = load_config(args.config, LIFT_SECTIONS)
    for key, value in (("num_frames", args.num_frames), ("size", args.size)):
        if value is not None:
            config["camera"][key] = value
    rank, world = rank_and_world(args.shard_index, args.num_shards)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    minimum = {}
    for item in args.min_score or []:
        field, _, value = item.partition("=")
        try:
            minimum[field.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--min-score takes FIELD=VALUE (a number), got {item!r}") from None
        if not field.strip():
            raise UsageError(f"--min-score takes FIELD=VALUE, got {item!r}")
    if args.open_images is not None and not Path(args.open_images).is_dir():
        raise UsageError(f"--open-images: no folder at {args.open_images}")
    result = lift(config, args.images, out, args.num_samples, args.samples_per_shard, args.resume, rank, world,
                  progress=not args.quiet, name=args.name, allow_absolute=args.allow_absolute, min_scores=minimum,
                  open_images=args.open_images)
    if not args.quiet:
        print(f"rank {rank}/{world}: {result.kept} lifted pairs in {out} ({len(result.shards)} new shards, "
              f"{result.unreadable} unreadable rows skipped)", file=sys.stderr)


def cmd_import(args) -> None:
    from .import_sets import ImportOptions, import_set
    from .ranks import rank_and_world
    from .video_hash import benchmark_index

    rank, world = rank_and_world(args.shard_index, args.num_shards)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    for name, value in (("--frame-tolerance", args.frame_tolerance), ("--aspect-tolerance", args.aspect_tolerance)):
        if not 0 <= value < 1:
            raise UsageError(f"{name} must be in [0, 1), got {value}")
    if args.fps is not None and args.fps <= 0:
        raise UsageError(f"--fps must be positive, got {args.fps}")
    benchmarks = [Path(p) for p in args.exclude_benchmark or []]
    for path in benchmarks:
        if not path.exists():
            raise UsageError(f"--exclude-benchmark: no benchmark file at {path}")
    leakage = benchmark_index(benchmarks) if benchmarks else None
    options = ImportOptions(max_side=args.max_side, max_frames=args.max_frames, fps=args.fps,
                            frame_tolerance=args.frame_tolerance, aspect_tolerance=args.aspect_tolerance,
                            exclude_categories=frozenset(c.strip() for c in (args.exclude_categories or "").split(",")
                                                         if c.strip()),
                            leakage=leakage)
    from tqdm.auto import tqdm

    warn = (lambda line: None) if args.quiet else (lambda line: tqdm.write(f"synth import: {line}", file=sys.stderr))
    result, stats = import_set(Path(args.source), out, args.format, Path(args.media_root) if args.media_root else None,
                               options, args.num_samples, args.samples_per_shard, args.resume, rank, world,
                               progress=not args.quiet, warn=warn)
    if not args.quiet:
        rejected = ", ".join(f"{k}: {v}" for k, v in stats.rejections.most_common()) or "none"
        print(f"rank {rank}/{world}: {result.kept} pairs in {out} ({len(result.shards)} new shards; this run "
              f"{stats.copied} copied, {stats.reencoded} re-encoded; rejected: {rejected})", file=sys.stderr)


def cmd_cache(args) -> None:
    from .cache import cache
    from .ranks import DTYPES, rank_and_world, render_device, render_dtype

    rank, world = rank_and_world(args.shard_index, args.num_shards)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    device = render_device(args.device)
    compute = render_dtype(args.compute_dtype, device) if args.compute_dtype else DTYPES["float32"]
    buckets = None
    if args.buckets is not None:
        try:
            buckets = json.loads(args.buckets)
        except ValueError:
            raise UsageError(f"--buckets takes a JSON list of [frames, height, width], got {args.buckets!r}") from None
    result = cache(args.shards, args.editor, out, args.num_frames, args.frame_stride, args.resolution,
                   args.image_clips, not args.no_text_states, args.dtype, args.samples_per_shard, args.resume,
                   rank, world, device, compute, args.num_samples, progress=not args.quiet, buckets=buckets)
    if not args.quiet:
        print(f"rank {rank}/{world}: {result.cached} cached clips in {out} ({len(result.shards)} new shards, "
              f"{result.skipped} unreadable samples skipped)", file=sys.stderr)


def cmd_prompts(args) -> None:
    import itertools

    from .build import make_source
    from .writer import atomic_write

    config = _load(args)
    source = make_source(config["prompts"], int(config.get("seed", 0)))
    triplets = list(itertools.islice(iter(source), args.num))
    if len(triplets) < args.num:
        raise UsageError(f"the source gave only {len(triplets)} of {args.num} triplets; nothing written")
    atomic_write(Path(args.out), "".join(json.dumps(t.to_json()) + "\n" for t in triplets).encode())
    stats = getattr(source, "stats", None)
    extra = f" (requests {stats.requests}, retries {stats.retries}, malformed {stats.malformed}, duplicates {stats.duplicates})" if stats else ""
    print(f"wrote {len(triplets)} triplets to {args.out}{extra}", file=sys.stderr)


def cmd_report(args) -> None:
    from .report import report

    print(report(Path(args.dir)))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="synth", description="Manufacture paired editing videos.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    b = sub.add_parser("build", help="render, filter and shard pairs")
    b.add_argument("--config", default=None, help=f"synth YAML (default: the embedded {DEFAULT_CONFIG})")
    b.add_argument("--out", required=True, help="output folder of shards")
    b.add_argument("--num-samples", type=positive_int, default=32, help="kept pairs this rank writes (default 32)")
    b.add_argument("--samples-per-shard", type=positive_int, default=None)
    b.add_argument("--resume", action="store_true", help="continue a build in --out")
    b.add_argument("--shard-index", type=int, default=None, help="this rank (default: $RANK or $SLURM_PROCID)")
    b.add_argument("--num-shards", type=positive_int, default=None, help="ranks in all (default: $WORLD_SIZE)")
    b.add_argument("--llm-base-url", default=None, help="OpenAI-compatible server (sets prompts.source: openai)")
    b.add_argument("--llm-model", default=None)
    b.add_argument("--device", default=None, help="render device (default: cuda:$LOCAL_RANK when CUDA is there, else cpu)")
    b.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="renderer and CLIP precision (generator.dtype; default float16 on CUDA, float32 on CPU)")
    b.add_argument("--sources", default=None,
                   help="real clips to edit by FlowEdit (a Wan backbone): a folder of videos or pair shards "
                        "(their sources); each triplet is applied to the next clip")
    b.add_argument("--captions", default=None,
                   help="JSONL of {video, caption}: the triplet source edits each listed clip's own caption")
    b.add_argument("--quiet", action="store_true")
    lf = sub.add_parser("lift", help="lift image-edit pairs to video pairs by a shared camera path")
    lf.add_argument("--images", required=True,
                    help="image pairs: a .parquet file or folder of them (InstructPix2Pix, UltraEdit or OmniEdit "
                         "columns), a datasets folder, a .jsonl of {input, edited, instruction} or Pico-Banana-400K's, "
                         "or GPT-Image-Edit-1.5M's .json")
    lf.add_argument("--out", required=True, help="output folder of shards")
    lf.add_argument("--config", default=None, help="lift YAML (default: the embedded configs/synth/lift.yaml)")
    lf.add_argument("--num-frames", type=positive_int, default=None, help="frames per clip (camera.num_frames, default 16)")
    lf.add_argument("--size", type=positive_int, default=None, help="square clip side in pixels (camera.size, default 256)")
    lf.add_argument("--num-samples", type=positive_int, default=None, help="stop after this many kept pairs (default: all rows)")
    lf.add_argument("--samples-per-shard", type=positive_int, default=None)
    lf.add_argument("--name", default=None, help='the dataset\'s name in source: "lift:<name>" (default: file or folder name)')
    lf.add_argument("--resume", action="store_true", help="continue a lift in --out")
    lf.add_argument("--allow-absolute", action="store_true",
                    help="let a .jsonl name images outside its own folder (absolute or ../ paths)")
    lf.add_argument("--min-score", action="append", default=None, metavar="FIELD=VALUE",
                    help="keep rows whose shipped score FIELD (UltraEdit's clip_sim_*, dinov2_sim, ssim; OmniEdit's "
                         "o_score, sc_score_1/2, pq_score) is at least VALUE; repeatable")
    lf.add_argument("--open-images", default=None,
                    help="Pico-Banana-400K: the folder holding its Open Images source files (by file name)")
    lf.add_argument("--shard-index", type=int, default=None, help="this rank (default: $RANK or $SLURM_PROCID)")
    lf.add_argument("--num-shards", type=positive_int, default=None, help="ranks in all (default: $WORLD_SIZE)")
    lf.add_argument("--quiet", action="store_true")
    im = sub.add_parser("import", help="a published pair set (Ditto-1M, Señorita-2M, OpenVE-3M, ...) as shards")
    im.add_argument("source", help="the set's folder as downloaded (or a pairs .csv/.jsonl)")
    im.add_argument("--out", required=True, help="output folder of shards")
    im.add_argument("--format", choices=["ditto", "senorita", "openve", "insvie", "kiwi", "insv2v", "pairs"], default=None,
                    help="the set's layout (default: detected)")
    im.add_argument("--media-root", default=None,
                    help="where the metadata's paths start (default: the set's own: videos/ for Ditto and OpenVE, "
                         "the folder otherwise)")
    im.add_argument("--max-side", type=positive_int, default=None, help="re-encode: longer side at most this")
    im.add_argument("--max-frames", type=positive_int, default=None, help="re-encode: at most this many frames")
    im.add_argument("--fps", type=float, default=None, help="re-encode at about this rate (frames dropped)")
    im.add_argument("--frame-tolerance", type=float, default=0.02,
                    help="share by which source and edit frame counts and rates may differ (default 0.02)")
    im.add_argument("--aspect-tolerance", type=float, default=0.02, help="likewise their aspect ratios (default 0.02)")
    im.add_argument("--exclude-categories", default=None, help="comma-separated categories to leave out")
    im.add_argument("--exclude-benchmark", action="append", default=None, metavar="PATH",
                    help="a benchmark file infer eval --benchmark reads: pairs whose source is one of its videos "
                         "(re-encoded, resized or trimmed) are left out; repeatable")
    im.add_argument("--num-samples", type=positive_int, default=None, help="stop after this many kept pairs (default: all)")
    im.add_argument("--samples-per-shard", type=positive_int, default=64)
    im.add_argument("--resume", action="store_true", help="continue an import in --out")
    im.add_argument("--shard-index", type=int, default=None, help="this rank (default: $RANK or $SLURM_PROCID)")
    im.add_argument("--num-shards", type=positive_int, default=None, help="ranks in all (default: $WORLD_SIZE)")
    im.add_argument("--quiet", action="store_true")
    c = sub.add_parser("cache", help="encode training shards once: latents and text states for lightning fit --data.cached")
    c.add_argument("shards", help="training shards: a .tar, a folder of them, a glob or a brace pattern")
    c.add_argument("--editor", default="tiny",
                   help="the editor whose VAE and text encoder encode (a spec as model.editor; default: tiny)")
    c.add_argument("--out", required=True, help="output folder of latent shards")
    c.add_argument("--num-frames", type=positive_int, default=16, help="frames cached per clip (training draws a window of them)")
    c.add_argument("--frame-stride", type=positive_int, default=1)
    c.add_argument("--resolution", type=positive_int, default=256, help="square training size in pixels (default 256)")
    c.add_argument("--buckets", default=None,
                   help='cache each clip at its bucket, as data.buckets: a JSON list, e.g. "[[81, 480, 832], [81, 832, 480]]" '
                        "(replaces --num-frames and --resolution)")
    c.add_argument("--image-clips", choices=["camera", "repeat", "single"], default="camera",
                   help="how a single-frame pair becomes a clip (as data.image_clips)")
    c.add_argument("--no-text-states", action="store_true", help="leave out text states (runs that train the text encoder)")
    c.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage precision (default float32)")
    c.add_argument("--compute-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="encoder precision (default float32)")
    c.add_argument("--samples-per-shard", type=positive_int, default=64)
    c.add_argument("--num-samples", type=positive_int, default=None, help="stop after this many clips on this rank")
    c.add_argument("--resume", action="store_true", help="continue a cache in --out")
    c.add_argument("--shard-index", type=int, default=None, help="this rank (default: $RANK or $SLURM_PROCID)")
    c.add_argument("--num-shards", type=positive_int, default=None, help="ranks in all (default: $WORLD_SIZE)")
    c.add_argument("--device", default=None, help="encoding device (default: cuda:$LOCAL_RANK when CUDA is there, else cpu)")
    c.add_argument("--quiet", action="store_true")
    p = sub.add_parser("prompts", help="only write triplets")
    p.add_argument("--config", default=None)
    p.add_argument("--out", required=True, help="triplets.jsonl to write")
    p.add_argument("--num", type=positive_int, default=100)
    p.add_argument("--llm-base-url", default=None)
    p.add_argument("--llm-model", default=None)
    r = sub.add_parser("report", help="summarise a build folder")
    r.add_argument("dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    from openai import OpenAIError


    quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        {"build": cmd_build, "lift": cmd_lift, "import": cmd_import, "cache": cmd_cache, "prompts": cmd_prompts, "report": cmd_report}[args.command](args)
        return 0
    except UsageError as err:
        print(f"synth: error: {err}", file=sys.stderr)
    except (ValueError, OSError, ConnectionError, OpenAIError) as err:
        if isinstance(err, OSError) and err.strerror:
            message = err.strerror + (f": {err.filename}" if err.filename else "")
        else:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"synth: error: {message}", file=sys.stderr)
    except KeyboardInterrupt:
        print("synth: interrupted (finished shards are kept; --resume continues)", file=sys.stderr)
        return 130
    return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
