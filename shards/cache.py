"""The latent cache: what `synth cache` stores per clip pair (VAE posteriors, source latents, text states) and how training reads it back."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .pairs import sample_frames
from .schema import (DAMAGED, ARRAY_EXT, SampleSkips, CACHE_INFO, EMPTY_TEXT, EMPTY_TEXT_STATES, META, SOURCE_LATENT, TARGET_LOGVAR,
                     TARGET_MEAN, TEXT_STATES, read_npy)

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}

@dataclass
class CacheInfo:
    """A cache folder's settings (``cache.json``): what was encoded, how, and by which editor."""

    editor: Any
    num_frames: int
    frame_stride: int
    resolution: int
    image_clips: str
    latent_channels: int
    scaling_factor: float
    text_states: bool
    text_shape: list[int]
    dtype: str
    format: int = 1
    temporal_compression: int = 1  # frames per latent frame after the first (a causal VAE's 4)
    buckets: list[list[int]] | None = None  # each clip cached at its bucket (recorded in its json), or one size

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def read(cls, folder: str | Path) -> "CacheInfo":
        path = Path(folder) / CACHE_INFO
        if not path.is_file():
            raise ValueError(f"{folder} is not a latent cache (no {CACHE_INFO}; make one with `synth cache`)")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path} is not a readable cache description ({err})") from None

    def check_editor(self, latent_channels: int, scaling_factor: float, text_dim: int, seq_len: int) -> None:
        """Refuse an editor whose latents or text states differ in shape or scale from the cached ones."""
        problems = []
        if latent_channels != self.latent_channels:
            problems.append(f"{self.latent_channels} latent channels, the editor has {latent_channels}")
        if abs(scaling_factor - self.scaling_factor) > 1e-9:
            problems.append(f"VAE scaling {self.scaling_factor}, the editor's is {scaling_factor}")
        if self.text_states and list(self.text_shape) != [seq_len, text_dim]:
            problems.append(f"text states {tuple(self.text_shape)}, the editor's are {(seq_len, text_dim)}")
        if problems:
            raise ValueError(f"the latent cache was made by another kind of editor: {'; '.join(problems)}")

def to_npy(array: torch.Tensor, dtype: str) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.detach().float().cpu().numpy().astype(STORAGE_DTYPES[dtype]), allow_pickle=False)
    return buffer.getvalue()

def from_npy(data: bytes) -> np.ndarray:
    """A cached array, its header checked against what the file holds before allocating."""
    return read_npy(data)

@torch.no_grad()
def encode_pair(editor, source: torch.Tensor, target: torch.Tensor, instructions: list[str] | None) -> dict[str, torch.Tensor]:
    """The cached form of clip pairs ``(B, 3, F, H, W)`` in [-1, 1]: the target's posterior mean and
    log-variance, the source's mode (all unscaled, float32) and, given ``instructions``, their text
    states: exactly what a training step would compute from the raw clips before drawing noise."""
    mean, logvar = editor.encode_distribution(target)
    condition, _ = editor.encode_distribution(source)
    out = {TARGET_MEAN: mean, TARGET_LOGVAR: logvar, SOURCE_LATENT: condition}
    if instructions is not None:
        out[TEXT_STATES] = editor.encode_text(instructions).float()
    return out

class CachedDecoder:
    """A cached shard sample as training tensors: a random window of ``num_frames`` cached frames
    (drawn by ``rng``), the text states when cached, and the empty prompt's states (text dropout)."""

    def __init__(self, folder: str | Path, num_frames: int):
        self.info = CacheInfo.read(folder)
        if self.info.buckets is not None:  # each sample trains at its bucket's frames
            num_frames = self.info.num_frames
        if num_frames > self.info.num_frames:
            raise ValueError(f"data.num_frames {num_frames} exceeds the {self.info.num_frames} frames cached in {folder}")
        temporal = self.info.temporal_compression
        if temporal > 1 and (num_frames - 1) % temporal:
            raise ValueError(f"data.num_frames must be 1 + {temporal}k for a cache of causal latents, got {num_frames}")
        self.num_frames = num_frames
        self.empty_text = torch.from_numpy(np.load(Path(folder) / EMPTY_TEXT)).float() if self.info.text_states else None
        self.skips = SampleSkips("cached sample")

    @property
    def skipped(self) -> int:
        return self.skips.count

    def bucket_of(self, sample: dict[str, Any], buckets: list) -> int | None:
        """The index in ``buckets`` of the bucket a sample was cached at (its json says), or ``None``."""
        try:
            cached = json.loads(sample[META]).get("bucket")
        except (KeyError, ValueError):
            return None
        return next((i for i, b in enumerate(buckets) if cached == [b.frames, b.height, b.width]), None)

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator, bucket=None) -> dict[str, Any] | None:
        """A window of ``num_frames`` (a ``bucket``'s frames) of the cached latents."""
        key = sample.get("__key__", "?")
        num_frames = self.num_frames if bucket is None else bucket.frames
        try:
            instruction = str(json.loads(sample[META])["instruction"])
            arrays = {name: from_npy(sample[f"{name}.{ARRAY_EXT}"]) for name in (TARGET_MEAN, TARGET_LOGVAR, SOURCE_LATENT)}
            if self.empty_text is not None:
                arrays[TEXT_STATES] = from_npy(sample[f"{TEXT_STATES}.{ARRAY_EXT}"])
            frames = arrays[TARGET_MEAN].shape[1]
            if any(arrays[name].shape != arrays[TARGET_MEAN].shape for name in (TARGET_LOGVAR, SOURCE_LATENT)):
                raise ValueError("cached latents differ in shape")
        except DAMAGED as err:
            self.skips.skip(key, err)
            return None
        temporal = self.info.temporal_compression
        if temporal > 1:  # causal latents: the first 1 + k latent frames are exactly those of the first 1 + Tk frames
            index = torch.arange(min(frames, 1 + (num_frames - 1) // temporal))
        else:
            index = torch.from_numpy(sample_frames(frames, num_frames, 1, rng))
        item = {
            TARGET_MEAN: torch.from_numpy(arrays[TARGET_MEAN]).float()[:, index],
            TARGET_LOGVAR: torch.from_numpy(arrays[TARGET_LOGVAR]).float()[:, index],
            SOURCE_LATENT: torch.from_numpy(arrays[SOURCE_LATENT]).float()[:, index],
            "instruction": instruction,
            "key": key,
        }
        if self.empty_text is not None:
            item[TEXT_STATES] = torch.from_numpy(arrays[TEXT_STATES]).float()
            item[EMPTY_TEXT_STATES] = self.empty_text
        return item
