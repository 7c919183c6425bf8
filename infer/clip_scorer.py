"""CLIP embeddings of frames and captions, and the similarity scores built from them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from model.tokenizer import tiny_clip_tokenizer

TINY_CLIP = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8),
    projection_dim=32,
)


def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected features, 5 an output whose pooler holds them."""
    return output if torch.is_tensor(output) else output.pooler_output


def _processor_class():
    """The PIL-backed CLIP image processor: transformers 5 names it ``CLIPImageProcessorPil``
    (its default ``CLIPImageProcessor`` needs torchvision), transformers 4 ``CLIPImageProcessor``."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def clip_processor(image_size: int):
    """CLIP's preprocessing for a vision tower of ``image_size``: short side to ``image_size``
    (bicubic, antialiased), centre crop, OpenAI's mean and std (shared by ViT-L/14 and PickScore)."""
    return _processor_class()(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


class ClipScorer:
    """A transformers CLIP model (ViT-L/14, PickScore, or the tiny offline one) that embeds frames
    and texts as unit vectors."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, name: str = "clip", processor=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.processor = processor if processor is not None else clip_processor(model.config.vision_config.image_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ClipScorer":
        """A local folder holding a transformers CLIPModel and its tokenizer."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP model at {path} (missing config.json)")
        model = CLIPModel.from_pretrained(path, use_safetensors=True)
        processor = None
        if (path / "preprocessor_config.json").is_file():  # ViT-L/14 and PickScore ship theirs
            processor = _processor_class().from_pretrained(path)
        return cls(model, CLIPTokenizer.from_pretrained(path), name=str(path), processor=processor)

    @classmethod
    def load(cls, spec: str | os.PathLike | None) -> "ClipScorer":
        """What ``filter.clip_model`` names: a model folder, a YAML of CLIPConfig arguments (random
        weights at that size, e.g. ``configs/model/clip-vit-l14-random.yaml``), or ``None`` (tiny)."""
        if spec is None:
            return cls.tiny()
        path = Path(spec)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            import yaml

            config = yaml.safe_load(path.read_text())
            return cls.random(config, seed=int(config.pop("seed", 0)), name=f"{path.name} (random weights)")
        return cls.from_pretrained(path)

    @classmethod
    def tiny(cls, seed: int = 0) -> "ClipScorer":
        """Random-weight offline CLIP: scores are well defined but carry no meaning."""
        return cls.random(TINY_CLIP, seed, name="tiny-clip (random weights)")

    @classmethod
    def random(cls, config: dict, seed: int = 0, name: str = "clip (random weights)") -> "ClipScorer":
        """A CLIP of ``config`` (``CLIPConfig`` arguments) with random weights and the offline tokenizer."""
        tokenizer = tiny_clip_tokenizer()
        ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config = CLIPConfig(**{**config, "text_config": {**config["text_config"], **ids}})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(config)
        return cls(model, tokenizer, name=name)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.processor.save_pretrained(path)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ClipScorer":
        """Score on ``device`` in ``dtype`` (embeddings are returned in float32 either way)."""
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixel_values(self, frames: np.ndarray) -> torch.Tensor:
        """The model's input for uint8 frames ``(N, H, W, 3)``, exactly as ``CLIPImageProcessor``
        makes it: the short side resized (bicubic, antialiased), a centre crop, CLIP's normalisation."""
        return self.processor(images=list(frames), return_tensors="pt").pixel_values

    @torch.no_grad()
    def image_embeds(self, frames: np.ndarray, batch: int = 32) -> torch.Tensor:
        """Unit embeddings ``(N, d)`` of uint8 frames ``(N, H, W, 3)``."""
        out = []
        for start in range(0, len(frames), batch):
            x = self.pixel_values(frames[start : start + batch]).to(self.device, self.dtype)
            out.append(F.normalize(_features(self.model.get_image_features(pixel_values=x)).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        """Unit embeddings ``(T, d)`` of texts."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        features = self.model.get_text_features(
            input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
        )
        return F.normalize(_features(features).float(), dim=-1)


def pair_scores(
    source: torch.Tensor, edited: torch.Tensor, input_text: torch.Tensor | None, output_text: torch.Tensor | None
) -> dict[str, float | None]:
    """The four CLIP scores of a (source, edited) clip pair, each averaged over frames ``f``::

        sim_src_text  = mean_f cos(S_f, T_in)
        sim_tgt_text  = mean_f cos(E_f, T_out)
        sim_direction = mean_f cos(E_f - S_f, T_out - T_in)
        sim_frames    = mean_f cos(S_f, E_f)

    ``source``/``edited``: frame embeddings ``(F, d)``; ``input_text``/``output_text``: ``(d,)``,
    or ``None`` when the pair has no captions (then only ``sim_frames`` is defined, the rest ``None``).
    """
    cos = lambda a, b: F.cosine_similarity(a, b.expand_as(a), dim=-1).mean().item()  # noqa: E731
    captioned = input_text is not None and output_text is not None
    return {
        "sim_src_text": cos(source, input_text) if captioned else None,
        "sim_tgt_text": cos(edited, output_text) if captioned else None,
        "sim_direction": cos(edited - source, output_text - input_text) if captioned else None,
        "sim_frames": cos(source, edited),
    }
