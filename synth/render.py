"""Text-to-video backbones (ModelScope-style UNet3D, AnimateDiff) rendering P2P clip pairs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

from infer.pipeline import to_uint8_frames
from model.editor import build_text_encoder
from model.inflate import random_motion_adapter
from model.tokenizer import tiny_clip_tokenizer

from .p2p import P2PAttnProcessor, P2PControl, align_tokens

BACKBONES = ("modelscope", "animatediff")


@dataclass(frozen=True)
class PairParams:
    """The per-sample random draws of the InsV2V recipe, recorded in each shard's json."""

    guidance: float
    self_attn_end: float
    cross_attn_end: float
    edit_weight: float
    steps: int


class VideoRenderer:
    """A text-to-video model with Prompt-to-Prompt pair rendering.

    ``backbone`` is ``modelscope`` (``UNet3DConditionModel``, text states per clip) or
    ``animatediff`` (``UNetMotionModel``, text states repeated per frame).
    """

    def __init__(self, backbone: str, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                 vae: AutoencoderKL, unet: torch.nn.Module, scheduler: DDIMScheduler):
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        self.backbone, self.tokenizer, self.text_encoder, self.vae, self.unet = backbone, tokenizer, text_encoder, vae, unet
        self.scheduler = scheduler
        for module in (text_encoder, vae, unet):
            module.requires_grad_(False).eval()

    # ---------------------------------------------------------------- construction
    @classmethod
    def tiny(cls, backbone: str, config: dict[str, Any]) -> "VideoRenderer":
        """Random-weight offline backbone from component configs (``configs/synth/tiny.yaml``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(config.get("seed", 0)))
            tokenizer = tiny_clip_tokenizer()
            text_encoder = build_text_encoder(tokenizer, config["text_encoder"])
            vae = AutoencoderKL(**config["vae"])
            unet_cfg = dict(config["unet"])
            if backbone == "modelscope":
                unet_cfg["down_block_types"] = [t.replace("2D", "3D") for t in unet_cfg["down_block_types"]]
                unet_cfg["up_block_types"] = [t.replace("2D", "3D") for t in unet_cfg["up_block_types"]]
                unet = UNet3DConditionModel(**unet_cfg)
            elif backbone == "animatediff":
                unet2d = UNet2DConditionModel(**unet_cfg)
                adapter = random_motion_adapter(unet_cfg, config.get("motion_adapter", {}))
                unet = UNetMotionModel.from_unet2d(unet2d, adapter)
            else:
                raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        return cls(backbone, tokenizer, text_encoder, vae, unet, DDIMScheduler(**config["scheduler"]))

    @classmethod
    def from_pretrained(cls, backbone: str, path: str | os.PathLike, motion_adapter: str | os.PathLike | None = None,
                        torch_dtype: torch.dtype | None = None) -> "VideoRenderer":
        """ModelScope: a diffusers text-to-video folder; AnimateDiff: an SD 1.5 folder + adapter folder."""
        path = Path(path)
        for part in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"):
            if not (path / part).is_dir():
                raise FileNotFoundError(f"{path} has no {part}/ folder")
        kw = dict(use_safetensors=True, torch_dtype=torch_dtype)
        if backbone == "modelscope":
            unet = UNet3DConditionModel.from_pretrained(path / "unet", **kw)
        elif backbone == "animatediff":
            if motion_adapter is None:
                raise ValueError("the animatediff backbone needs generator.motion_adapter")
            unet = UNetMotionModel.from_unet2d(
                UNet2DConditionModel.from_pretrained(path / "unet", **kw), MotionAdapter.from_pretrained(motion_adapter, **kw)
            )
        else:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        return cls(
            backbone,
            CLIPTokenizer.from_pretrained(path / "tokenizer"),
            CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True, dtype=torch_dtype),
            AutoencoderKL.from_pretrained(path / "vae", **kw),
            unet,
            DDIMScheduler.from_pretrained(path / "scheduler"),
        )

    def to(self, device=None, dtype: torch.dtype | None = None) -> "VideoRenderer":
        """Move to ``device``; run the text encoder and U-Net in ``dtype``. The VAE stays float32
        (SD's VAE overflows in float16) and the sampler's latents are always float32."""
        for module in (self.text_encoder, self.vae, self.unet):
            module.to(device=device)
        if dtype is not None:
            for module in (self.text_encoder, self.unet):
                if module.dtype != dtype:
                    module.to(dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # ---------------------------------------------------------------- rendering
    def token_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, truncation=True, max_length=self.tokenizer.model_max_length).input_ids

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids).last_hidden_state.to(self.dtype)

    def _noise_prediction(self, latents: torch.Tensor, t, text: torch.Tensor) -> torch.Tensor:
        """The U-Net's noise prediction in float32; the U-Net itself runs in its own dtype."""
        if self.backbone == "animatediff":  # UNetMotionModel attends to text frame by frame
            text = text.repeat_interleave(latents.shape[2], dim=0)
        return self.unet(latents.to(self.dtype), t, encoder_hidden_states=text).sample.float()

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (1, self.unet.config.in_channels, num_frames, height // factor, width // factor)

    @torch.no_grad()
    def render(self, prompts: list[str], noise: torch.Tensor, params: PairParams, control: P2PControl | None = None,
               progress: bool = False) -> np.ndarray:
        """Sample ``len(prompts)`` clips from the same ``noise`` with classifier-free guidance.

        The U-Net batch is ``[uncond_1..n, cond_1..n]``; with two prompts and ``control`` that is
        the P2P layout ``[uncond_src, uncond_tgt, cond_src, cond_tgt]``. Returns uint8 ``(n, F, H, W, 3)``.
        """
        n = len(prompts)
        text = self.encode_text([""] * n + list(prompts))
        processor = P2PAttnProcessor(control) if control is not None else AttnProcessor2_0()
        self.unet.set_attn_processor(processor)
        self.scheduler.set_timesteps(params.steps, device=self.device)
        latents = noise.to(self.device, torch.float32).repeat(n, 1, 1, 1, 1) * self.scheduler.init_noise_sigma
        from tqdm.auto import tqdm

        for i, t in enumerate(tqdm(self.scheduler.timesteps, leave=False, disable=not progress, desc="render")):
            if control is not None:
                control.step = i
            model_in = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)
            uncond, cond = self._noise_prediction(model_in, t, text).chunk(2)
            eps = uncond + params.guidance * (cond - uncond)
            latents = self.scheduler.step(eps, t, latents).prev_sample
        self.unet.set_attn_processor(AttnProcessor2_0())
        return np.stack([self.decode(latents[i : i + 1]) for i in range(n)])

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w) / self.vae.config.scaling_factor
        frames = self.vae.decode(flat.to(self.vae.dtype)).sample.float().clamp(-1, 1)
        return to_uint8_frames(frames.reshape(b, f, *frames.shape[1:]).permute(0, 2, 1, 3, 4))

    def render_pair(self, source_prompt: str, target_prompt: str, noise: torch.Tensor, params: PairParams,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(source, edited) clips from the same noise, the edited one under P2P attention control."""
        mapping, edited = align_tokens(self.token_ids(source_prompt), self.token_ids(target_prompt),
                                       self.tokenizer.model_max_length)
        weights = torch.where(edited, torch.tensor(float(params.edit_weight)), torch.tensor(1.0))
        control = P2PControl(params.steps, params.self_attn_end, params.cross_attn_end, mapping, weights)
        self.last_control = control  # what the control did, for inspection
        pair = self.render([source_prompt, target_prompt], noise, params, control, progress)
        return pair[0], pair[1]
