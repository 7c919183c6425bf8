"""`synth build`: triplets -> P2P pairs -> CLIP filter -> shards, one rank's slice, resumable."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from infer.clip_scorer import ClipScorer
from infer.judge import VisionJudge
from shards.schema import pair_sample, sample_key

from .filter import ClipFilter, JudgeFilter, Thresholds, check_pair
from .ranks import render_device, render_dtype
from .render import PairParams, VideoRenderer
from .triplets import JsonlSource, OpenAISource, TemplateSource, Triplet, validate
from .writer import Outcome, ShardWriter, read_jsonl, write_outcomes


BUILD_SECTIONS = ("prompts", "generator", "filter", "output")


def load_config(path: str | os.PathLike, sections: tuple[str, ...] = BUILD_SECTIONS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config at {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    missing = [k for k in sections if not isinstance((config or {}).get(k), dict)]
    if missing:
        raise ValueError(f"{path} lacks the section(s): {', '.join(missing)}")
    return config


def config_hash(config: dict[str, Any]) -> str:
    """What must not change across a resume: everything that shapes the samples."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_source(prompts: dict[str, Any], seed: int, rank: int = 0):
    """The configured triplet source; template and jsonl are indexed globally (each rank takes its
    slice), an LLM is sampled per rank (different few-shot orders)."""
    kind = prompts.get("source", "template")
    if kind == "template":
        return TemplateSource(seed=seed)
    if kind == "shapes":
        from .shapes import ShapesSource

        return ShapesSource(shapes_world(prompts, seed))
    if kind == "jsonl":
        if not prompts.get("path"):
            raise ValueError("prompts.path must name the triplet file for source: jsonl")
        return JsonlSource(prompts["path"])
    if kind == "openai":
        return OpenAISource(
            model=prompts.get("model", "gpt-4o-mini"), base_url=prompts.get("base_url"),
            api_key_env=prompts.get("api_key_env", "OPENAI_API_KEY"), per_request=int(prompts.get("per_request", 8)),
            max_retries=int(prompts.get("max_retries", 5)), backoff=float(prompts.get("backoff", 1.0)),
            max_requests=int(prompts.get("max_requests", 1000)), seed=seed + rank,
        )
    raise ValueError(f"prompts.source must be template, jsonl or openai, got {kind!r}")


def shapes_world(prompts: dict[str, Any], seed: int):
    from .shapes import EDITS, RADII, SHAPE_COUNTS, SHAPES, SPEEDS, ShapesWorld

    return ShapesWorld(seed=seed, num_frames=int(prompts.get("num_frames", 8)), size=int(prompts.get("size", 16)),
                       edits=tuple(prompts.get("edits", EDITS)), speeds=prompts.get("speeds", SPEEDS),
                       radii=prompts.get("radii", RADII), counts=prompts.get("counts", SHAPE_COUNTS),
                       swap_into=prompts.get("swap_into", SHAPES),
                       draw_order=prompts.get("draw_order", "listed"))


def source_label(prompts: dict[str, Any]) -> str:
    kind = prompts.get("source", "template")
    return f"openai:{prompts.get('model')}" if kind == "openai" else kind


def rank_triplets(source, rank: int, world: int, cache: Path | None) -> Iterator[tuple[int, Triplet]]:
    """``(global index, triplet)`` of this rank's slice: every ``world``-th triplet.

    LLM triplets are not reproducible, so each one is appended to ``cache`` before use and a
    resumed build reads the cache first.
    """
    if isinstance(source, OpenAISource):
        cached = [validate(record) for record in read_jsonl(cache, repair=True)] if cache is not None else []
        fresh = (t for t in source)

        def stream():
            yield from cached
            for triplet in fresh:
                if cache is not None:
                    with open(cache, "a") as f:
                        f.write(json.dumps(triplet.to_json()) + "\n")
                        f.flush()
                        os.fsync(f.fileno())
                yield triplet

        for local, triplet in enumerate(stream()):
            yield rank + local * world, triplet
        return
    for index, triplet in enumerate(source):
        if index % world == rank:
            yield index, triplet


def draw_params(generator: dict[str, Any], rng: np.random.Generator) -> PairParams:
    """Per-sample random P2P settings (the InsV2V recipe): integer guidance and edit weight, uniform ends."""
    g, s, c, w = (generator[k] for k in ("guidance", "self_attn_end", "cross_attn_end", "edit_weight"))
    return PairParams(
        guidance=float(rng.integers(int(g[0]), int(g[1]) + 1)),
        self_attn_end=float(rng.uniform(*s)),
        cross_attn_end=float(rng.uniform(*c)),
        edit_weight=float(rng.integers(int(w[0]), int(w[1]) + 1)),
        steps=int(generator["steps"]),
    )


def _folder(section: str, key: str, value: Any) -> str:
    if str(value).startswith("FILL_ME"):
        raise ValueError(f"set {section}.{key} to a local folder (it is {value!r})")
    return str(value)


def make_renderer(generator: dict[str, Any]):
    """The configured text-to-video renderer: a U-Net one (:class:`VideoRenderer`) or a Wan DiT
    (:class:`synth.wan_render.WanRenderer`), from a folder or the tiny random config."""
    backbone = generator.get("backbone", "modelscope")
    for key in ("pretrained", "motion_adapter"):
        if generator.get(key):
            _folder("generator", key, generator[key])
    if backbone == "wan":
        from .wan_render import WanRenderer

        if generator.get("pretrained"):
            return WanRenderer.from_pretrained(generator["pretrained"])
        return WanRenderer.tiny(generator["tiny"])
    if generator.get("pretrained"):
        return VideoRenderer.from_pretrained(backbone, generator["pretrained"], generator.get("motion_adapter"))
    return VideoRenderer.tiny(backbone, generator["tiny"])


def make_filter(filter_cfg: dict[str, Any]) -> ClipFilter | None:
    if not filter_cfg.get("enabled", True):
        return None
    clip_model = filter_cfg.get("clip_model")
    scorer = ClipScorer.load(_folder("filter", "clip_model", clip_model) if clip_model else None)
    names = ("sim_src_text", "sim_tgt_text", "sim_direction", "sim_frames")
    return ClipFilter(scorer, Thresholds(**{k: float(filter_cfg[k]) for k in names if k in filter_cfg}))


def make_judge(filter_cfg: dict[str, Any]) -> JudgeFilter | None:
    """``filter.judge: {base_url, model, api_key_env, threshold, frames}``, or ``None`` when unset."""
    cfg = filter_cfg.get("judge")
    if not cfg:
        return None
    if not isinstance(cfg, dict) or "threshold" not in cfg:
        raise ValueError("filter.judge must be a mapping with base_url, model and threshold (0-9)")
    return JudgeFilter(VisionJudge.from_config(cfg), cfg["threshold"])


class SourceExhausted(ValueError):
    """The triplet source ended before enough pairs were kept (what was made is committed)."""


@dataclass
class BuildResult:
    kept: int
    attempts: int
    shards: list[Path]
    unreadable: int = 0  # input rows that could not be used, this run


def draw_flow_edit(flow_cfg: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Per-sample FlowEdit settings: the step window ``n_max`` (an integer drawn uniformly), ``n_min``
    and the source prompt's guidance."""
    n_max = flow_cfg.get("n_max", [20, 24])
    n_max = int(rng.integers(int(n_max[0]), int(n_max[1]) + 1)) if isinstance(n_max, list) else int(n_max)
    return {"n_max": n_max, "n_min": int(flow_cfg.get("n_min", 0)),
            "source_guidance": float(flow_cfg.get("source_guidance", 1.5))}


def build(config: dict[str, Any], out: Path, num_samples: int, samples_per_shard: int | None = None,
          resume: bool = False, rank: int = 0, world: int = 1, progress: bool = True, device: str | None = None,
          sources: Path | None = None, captions: Path | None = None) -> BuildResult:
    """Write ``num_samples`` kept pairs for this rank (shards of docs/shards.md), continuing a previous run
    with ``resume``. Samples are a pure function of (config, triplet, seed slot), so a resumed
    build writes exactly what an uninterrupted one would.

    With ``sources`` (a Wan backbone) the pairs are FlowEdits of real clips: triplet ``i`` is applied
    to clip ``i`` (modulo their number), its input caption the source prompt; with ``captions``
    each listed clip's own caption is edited by the triplet source instead."""
    gen, out_cfg = config["generator"], config["output"]
    per_shard = int(samples_per_shard or out_cfg.get("samples_per_shard", 16))
    video_format = out_cfg.get("video_format", "mp4")
    seed = int(config.get("seed", 0))
    source = make_source(config["prompts"], seed, rank)
    shapes = config["prompts"].get("source") == "shapes"
    if shapes:  # exact pairs from the procedural world: no renderer, nothing to filter
        scenes, renderer, clip_filter, slots = shapes_world(config["prompts"], seed), None, None, 1
        frames, height, width = scenes.num_frames, scenes.size, scenes.size
    else:
        where = render_device(device)
        precision = render_dtype(gen.get("dtype"), where)
        renderer = make_renderer(gen).to(where, precision)
        clip_filter = make_filter(config["filter"])
        if clip_filter is not None:  # the filter scores on the render device, in its precision
            clip_filter.scorer.to(where, precision)
        frames, height, width = int(gen["num_frames"]), int(gen["height"]), int(gen["width"])
        slots = int(gen.get("seeds_per_triplet", 1))
        if hasattr(renderer, "check_size"):
            renderer.check_size(frames, height, width)
    clips = None
    if sources is not None or captions is not None:
        from .source_clips import list_clips

        if shapes or getattr(renderer, "backbone", None) != "wan":
            raise ValueError("--sources edits real clips by FlowEdit on a Wan backbone (generator.backbone: wan)")
        if sources is None:
            sources = captions.parent
        clips = list_clips(sources, captions)
        if captions is not None and not hasattr(source, "edit_caption"):
            raise ValueError("--captions asks the triplet source for an edit of each caption: prompts.source must be "
                             "template or openai")
        slots = 1
    fps = float(gen.get("fps", 8))
    judge = make_judge(config["filter"])
    # the folder is touched only once the config has proven loadable
    hashed = config if clips is None else {**config, "sources": [c.name for c in clips],
                                           "captions": [c.caption for c in clips]}
    writer = ShardWriter(out, rank, out_cfg.get("prefix", "pairs"), config_hash(hashed), resume, world)
    if writer.samples >= num_samples:
        return BuildResult(writer.samples, 0, [])
    start_triplet, start_slot = writer.state["next"]
    label = source_label(config["prompts"])

    def judged(record: dict[str, Any], key: str, triplet: Triplet, source_frames: np.ndarray, edited: np.ndarray,
               generator_info: dict[str, Any], noise_seed: int, source_name: str) -> tuple[dict[str, Any], dict | None]:
        """A rendered pair through the filters: its attempt record and, when kept, its shard sample."""
        verdict = check_pair(source_frames, edited, triplet.edit, (triplet.input, triplet.output), clip_filter, judge)
        attempt = {**record, **verdict.record(), "params": generator_info, **triplet.to_json()}
        if not verdict.kept:
            return attempt, None
        meta = {
            "input_caption": triplet.input, "instruction": triplet.edit, "output_caption": triplet.output,
            "num_frames": frames, "height": height, "width": width, "fps": fps, "seed": noise_seed,
            "source": source_name, "generator": generator_info, "clip": verdict.clip,
            **({"judge": verdict.judge} if verdict.judge is not None else {}),
        }
        return attempt, pair_sample(key, source_frames, edited, meta, video_format, fps)

    def flow_edit_outcomes() -> Iterator[Outcome]:
        from .source_clips import read_clip

        if captions is not None:  # each listed clip, its own caption edited
            triplets = ((i, None) for i in range(len(clips)) if i % world == rank)
        else:
            triplets = rank_triplets(source, rank, world, out / f"triplets-r{rank:03d}.jsonl")
        for local, (index, triplet) in enumerate(triplets):
            if local < start_triplet:
                continue
            clip = clips[index % len(clips)]
            rng = np.random.default_rng([seed, index, 0])
            params, edit = draw_params(gen, rng), draw_flow_edit(config.get("flow_edit", {}), rng)
            noise_seed = int(rng.integers(0, 2**63 - 1))
            key = sample_key(rank, index, 0)
            base = {"key": key, "triplet": index, "slot": 0, "clip": clip.name}
            try:
                source_frames = read_clip(clip, frames, height, width)
                if triplet is None:
                    triplet = source.edit_caption(clip.caption or "", index) if clip.caption else None
                    if triplet is None:
                        raise ValueError("no caption")
            except ValueError as err:
                yield Outcome({**base, "kept": False, "reason": f"source clip {err}", "scores": None}, None,
                              (local + 1, 0))
                continue
            source_frames, edited = renderer.flow_edit_pair(
                source_frames, triplet.input, triplet.output, params, edit["n_max"], edit["n_min"],
                edit["source_guidance"], torch.Generator().manual_seed(noise_seed))
            generator_info = {"backbone": "wan", "mode": "flowedit", "dtype": str(precision).removeprefix("torch."),
                              **vars(params), **edit, "source_clip": clip.name}
            attempt, sample = judged(base, key, triplet, source_frames, edited, generator_info, noise_seed,
                                     f"flowedit:{label}")
            yield Outcome(attempt, sample, (local + 1, 0))

    def outcomes() -> Iterator[Outcome]:
        triplets = rank_triplets(source, rank, world, out / f"triplets-r{rank:03d}.jsonl")
        for local, (index, triplet) in enumerate(triplets):
            if local < start_triplet:
                continue
            for slot in range(start_slot if local == start_triplet else 0, slots):
                rng = np.random.default_rng([seed, index, slot])
                if shapes:
                    params, noise_seed = None, index
                    _, source_frames, edited = scenes.sample(index)
                else:
                    params = draw_params(gen, rng)
                    noise_seed = int(rng.integers(0, 2**63 - 1))
                    noise = torch.randn(renderer.latent_shape(frames, height, width),
                                        generator=torch.Generator().manual_seed(noise_seed))
                    source_frames, edited = renderer.render_pair(triplet.input, triplet.output, noise, params)
                generator_info = ({"backbone": "shapes"} if shapes else
                                  {"backbone": renderer.backbone, "dtype": str(precision).removeprefix("torch."), **vars(params)})
                key = sample_key(rank, index, slot)
                attempt, sample = judged({"key": key, "triplet": index, "slot": slot}, key, triplet, source_frames,
                                         edited, generator_info, noise_seed, label)
                yield Outcome(attempt, sample, (local, slot + 1) if slot + 1 < slots else (local + 1, 0))

    bar = tqdm(total=num_samples, initial=writer.samples, unit="pair", desc=f"rank {rank}", disable=not progress)
    shards, reached = write_outcomes(writer, outcomes() if clips is None else flow_edit_outcomes(), num_samples,
                                     per_shard, bar)
    bar.close()
    if reached:
        return BuildResult(writer.samples, writer.state["attempts"], shards)
    what = "the captioned clips" if captions is not None else "the triplet source"
    raise SourceExhausted(f"{what} ran out after {writer.samples} kept pairs (asked for {num_samples})")
