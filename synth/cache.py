"""`synth cache`: training shards encoded once (VAE posteriors, source latents, text states) into resumable per-rank latent shards."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from shards.buckets import parse_buckets
from shards.pairs import IMAGE_CLIPS, PairDecoder
from shards.schema import ARRAY_EXT, CACHE_INFO, EMPTY_TEXT, META, expand_shards
from model import load_editor
from shards.cache import STORAGE_DTYPES, CacheInfo, encode_pair, to_npy

from .writer import Outcome, ShardWriter, atomic_write, write_outcomes

PREFIX = "cache"


@dataclass
class CacheResult:
    cached: int
    skipped: int
    shards: list[Path]


def cache_settings(editor_spec: Any, urls: list[str], num_frames: int, frame_stride: int, resolution: int,
                   image_clips: str, text: bool, dtype: str, compute_dtype: torch.dtype) -> str:
    """The hash a resumed cache must match: same inputs, editor and encoding."""
    settings = {"editor": editor_spec, "inputs": [Path(u).name for u in urls], "num_frames": num_frames,
                "frame_stride": frame_stride, "resolution": resolution, "image_clips": image_clips, "text": text,
                "dtype": dtype, "compute_dtype": str(compute_dtype)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache(shards: str, editor_spec: Any, out: Path, num_frames: int = 16, frame_stride: int = 1,
          resolution: int = 256, image_clips: str = "camera", text: bool = True, dtype: str = "float32",
          samples_per_shard: int = 64, resume: bool = False, rank: int = 0, world: int = 1,
          device: torch.device | str = "cpu", compute_dtype: torch.dtype = torch.float32,
          num_samples: int | None = None, progress: bool = True,
          buckets: list[list[int]] | None = None) -> CacheResult:
    """Encode this rank's samples of ``shards`` (every ``world``-th, in shard order) into ``out``.

    Each clip pair is decoded as training decodes it without augmentation (a ``num_frames`` window
    ``frame_stride`` apart, centred square crop at ``resolution``; an image pair becomes a clip by
    ``image_clips``); frame windows and camera paths are functions of the sample's position, so a
    resumed run (``resume``) writes what an uninterrupted one would. ``num_samples`` stops after that
    many cached samples on this rank. ``text=False`` leaves out the text states (for runs that train
    the text encoder). With ``buckets`` (``[[frames, height, width], ...]``, as ``data.buckets``) each
    clip is cached at its own bucket (:func:`shards.buckets.nearest_bucket`), recorded in its json;
    a clip no bucket fits is skipped and logged."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if image_clips not in IMAGE_CLIPS:
        raise ValueError(f"--image-clips must be one of {', '.join(IMAGE_CLIPS)}, got {image_clips!r}")
    if image_clips == "single" and buckets is None:
        raise ValueError("--image-clips single caches image pairs as one-frame clips: it needs --buckets with one")
    urls = expand_shards(shards)
    editor = load_editor(editor_spec, torch_dtype=compute_dtype).to(device)
    if editor.vae is None:
        raise ValueError("the editor works in pixel space (no VAE): there are no latents to cache")
    temporal = editor.temporal_compression
    shapes = parse_buckets(buckets, temporal, editor.size_multiple) if buckets is not None else None
    if shapes is not None:  # the cache holds clips up to the longest bucket, each at its own size
        num_frames, resolution = max(b.frames for b in shapes), 0
    if temporal > 1 and (num_frames - 1) % temporal:
        raise ValueError(f"--num-frames must be 1 + {temporal}k for this editor's causal VAE, got {num_frames}")
    seq, width = editor.text_length, editor.text_encoder.config.hidden_size
    info = CacheInfo(editor=editor_spec, num_frames=num_frames, frame_stride=frame_stride, resolution=resolution,
                     image_clips=image_clips, latent_channels=editor.latent_channels,
                     scaling_factor=editor.scaling_factor, text_states=text, text_shape=[seq, width], dtype=dtype,
                     temporal_compression=editor.temporal_compression, buckets=buckets)
    hashed_spec = editor_spec if shapes is None else {"editor": editor_spec, "buckets": buckets}
    digest = cache_settings(hashed_spec, urls, num_frames, frame_stride, resolution, image_clips, text, dtype, compute_dtype)
    writer = ShardWriter(out, rank, PREFIX, digest, resume, world)
    if rank == 0:  # the folder's shared files: one writer (every rank would write the same bytes)
        atomic_write(out / CACHE_INFO, info.to_json().encode())
        if text:
            with torch.no_grad():
                empty = editor.encode_text([""])[0]
            atomic_write(out / EMPTY_TEXT, to_npy(empty, dtype))
    decoder = PairDecoder(num_frames, frame_stride, resolution, None, image_clips)
    start = writer.state["next"][0]

    def outcomes() -> Iterator[Outcome]:
        local = -1
        samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)({"url": u} for u in urls)
        for index, sample in enumerate(samples):
            if index % world != rank:
                continue
            local += 1
            if local < start:  # cached by an earlier run: read past, not decoded again
                continue
            key = sample["__key__"]
            bucket = None if shapes is None else decoder.bucket_of(sample, shapes)
            if shapes is not None and bucket is None:
                yield Outcome({"key": key, "index": index, "kept": False, "reason": "no bucket fits it"}, None,
                              (local + 1, 0))
                continue
            item = decoder(sample, np.random.default_rng([index]), None if bucket is None else shapes[bucket])
            if item is None:
                yield Outcome({"key": key, "index": index, "kept": False, "reason": "unreadable sample"}, None, (local + 1, 0))
                continue
            encoded = encode_pair(editor, item["source"][None].to(device), item["target"][None].to(device),
                                  [item["instruction"]] if text else None)
            meta = json.loads(sample[META])
            record = {k: meta[k] for k in ("input_caption", "output_caption", "source") if k in meta}
            if bucket is not None:
                record["bucket"] = list(buckets[bucket])
            out_sample = {"__key__": key, META: json.dumps({**record, "instruction": item["instruction"],
                                                              "index": index}).encode()}
            for name, tensor in encoded.items():
                out_sample[f"{name}.{ARRAY_EXT}"] = to_npy(tensor[0], dtype)
            yield Outcome({"key": key, "index": index, "kept": True}, out_sample, (local + 1, 0))

    bar = tqdm(total=num_samples, initial=writer.samples, unit="clip", desc=f"cache rank {rank}", disable=not progress)
    with torch.inference_mode():
        shards_written, _ = write_outcomes(writer, outcomes(), num_samples, samples_per_shard, bar)
    bar.close()
    return CacheResult(writer.samples, decoder.skipped, shards_written)
