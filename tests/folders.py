"""Folders and files as a real download would hold them: an SD 1.5 pipeline, a motion adapter."""

from __future__ import annotations

import json

import torch
from conftest import tiny_unet2d

from model import tiny_config


def write_sd_folder(root, in_channels=4):
    """A tiny Stable Diffusion 1.5-layout pipeline folder, as a real download would look."""
    from diffusers import PNDMScheduler

    from model.editor import build_text_encoder
    from model.tokenizer import tiny_clip_tokenizer

    cfg = tiny_config()
    tokenizer = tiny_clip_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    build_text_encoder(tokenizer, cfg["text_encoder"]).save_pretrained(root / "text_encoder")
    from diffusers import AutoencoderKL

    AutoencoderKL(**cfg["vae"]).save_pretrained(root / "vae")
    unet = tiny_unet2d(in_channels=in_channels)
    unet.save_pretrained(root / "unet")
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True).save_pretrained(
        root / "scheduler"
    )
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return unet


def write_adapter(root, max_seq_length=24):
    from diffusers import MotionAdapter

    torch.manual_seed(5)
    adapter = MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=max_seq_length,
        use_motion_mid_block=True,
    )
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter.save_pretrained(root)
    return adapter
