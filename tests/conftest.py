"""Shared fixtures: tiny, offline, randomly initialised components."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# chat clients refuse an unset key; the test servers take any (tests that check the key set their own)
os.environ.setdefault("OPENAI_API_KEY", "sk-test-placeholder")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_unet2d(in_channels: int = 8, out_channels: int = 4, seed: int = 0, sample_size: int = 16):
    """A small UNet2DConditionModel with every weight (biases included) random."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    with torch.no_grad():
        for p in unet.parameters():  # diffusers zero-inits some layers; make everything matter
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


@pytest.fixture
def unet2d():
    return tiny_unet2d()


@pytest.fixture
def editor():
    from model import load_editor

    return load_editor("tiny")
