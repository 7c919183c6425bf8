"""The paper-size tier: the real architectures (random weights) built, trained a step, edited and rendered at small spatial size.

The SD-size editor is built last (module fixture): the ModelScope-size renderer is freed before it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from infer import InsV2VPipeline
from model import build_editor, shipped_config
from train import EditorModule
from guards import HANG_GUARD

ROOT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SD_V1, SD_V2 = "model/sd15-random-v1.yaml", "model/sd15-random.yaml"
VIT_L14 = "model/clip-vit-l14-random.yaml"


def motion_parameters(unet: torch.nn.Module) -> set[str]:
    """The names of the temporal layers' (AnimateDiff motion modules') weights."""
    return {n for n, _ in unet.named_parameters() if "motion_modules." in n}


def test_the_paper_size_layouts_have_the_real_shapes():
    """On the meta device (no memory): the AnimateDiff v1 layout has no mid-block motion module,
    v2 has one; ModelScope's UNet3D and its 1024-wide text encoder; AnimateDiff text-to-video; CLIP ViT-L/14."""
    counts = {}
    for name in (SD_V1, SD_V2):
        with torch.device("meta"):
            editor = build_editor(shipped_config(name))
        motion = motion_parameters(editor.unet)
        counts[name] = sum(p.numel() for n, p in editor.unet.named_parameters() if n in motion)
        assert editor.unet.config.in_channels == 8 and editor.text_encoder.config.hidden_size == 768
        assert any(n.startswith("mid_block.motion_modules") for n in motion) == (name == SD_V2)
    assert round(counts[SD_V1] / 1e6, 1) == 417.1 and round(counts[SD_V2] / 1e6, 1) == 453.2
    from synth.render import VideoRenderer

    generator = yaml.safe_load((ROOT_CONFIGS / "synth/modelscope-random.yaml").read_text())["generator"]
    with torch.device("meta"):
        renderer = VideoRenderer.tiny("modelscope", generator["tiny"])
    assert type(renderer.unet).__name__ == "UNet3DConditionModel"
    assert round(sum(p.numel() for p in renderer.unet.parameters()) / 1e9, 2) == 1.41
    assert renderer.text_encoder.config.hidden_size == 1024 == renderer.unet.config.cross_attention_dim
    generator = yaml.safe_load((ROOT_CONFIGS / "synth/animatediff-random.yaml").read_text())["generator"]
    with torch.device("meta"):
        renderer = VideoRenderer.tiny("animatediff", generator["tiny"])
    motion = sum(p.numel() for n, p in renderer.unet.named_parameters() if "motion_modules." in n)
    assert round(motion / 1e6, 1) == 417.1 and not renderer.unet.config.use_motion_mid_block
    from transformers import CLIPConfig, CLIPModel

    config = yaml.safe_load((ROOT_CONFIGS / VIT_L14).read_text())
    config.pop("seed")
    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig(**config))
    assert round(sum(p.numel() for p in clip.parameters()) / 1e6) == 428  # with the full 49,408-token vocabulary


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["modelscope", "animatediff"])
def test_a_real_size_p2p_pair_in_bfloat16(backbone):
    from synth.render import PairParams, VideoRenderer

    generator = yaml.safe_load((ROOT_CONFIGS / f"synth/{backbone}-random.yaml").read_text())["generator"]
    assert generator["backbone"] == backbone
    renderer = VideoRenderer.tiny(backbone, generator["tiny"]).to("cpu", torch.bfloat16)
    noise = torch.randn(renderer.latent_shape(2, 64, 64), generator=torch.Generator().manual_seed(0))
    params = PairParams(guidance=7.0, self_attn_end=0.4, cross_attn_end=0.8, edit_weight=3.0, steps=2)
    source, target = renderer.render_pair("a cat walking on the road", "a zebra walking on the road", noise, params)
    assert source.shape == target.shape == (2, 64, 64, 3)
    assert not np.array_equal(source, target)  # the edit's tokens change the second clip
    same = renderer.render_pair("a cat walking on the road", "a cat walking on the road", noise, params)
    assert np.array_equal(same[0], same[1])  # identical prompts: identical clips, in bfloat16 too


@pytest.mark.slow
def test_a_vit_l14_filter_from_its_config_and_from_a_folder(tmp_path):
    from infer.clip_scorer import ClipScorer
    from synth.filter import ClipFilter, Thresholds

    scorer = ClipScorer.load(ROOT_CONFIGS / VIT_L14)
    assert scorer.processor.crop_size["height"] == 224 and scorer.model.config.vision_config.patch_size == 14
    scorer.save_pretrained(tmp_path / "clip")
    loaded = ClipScorer.load(tmp_path / "clip")  # the real-weights path, on a folder written here
    frames = np.random.default_rng(0).integers(0, 255, (2, 120, 160, 3), dtype=np.uint8)
    scores, reason = ClipFilter(loaded, Thresholds(-1, -1, -1, -1))(frames, frames[::-1], "a cat", "a red cat")
    assert reason is None and all(np.isfinite(v) for v in scores.values())
    assert scores == ClipFilter(scorer, Thresholds(-1, -1, -1, -1))(frames, frames[::-1], "a cat", "a red cat")[0]


@pytest.fixture(scope="module")
def sd_module():
    """The paper's editor (IP2P U-Net + AnimateDiff v1 layout) at full size, random weights."""
    torch.manual_seed(0)
    return EditorModule(editor=shipped_config(SD_V1), trainable="motion", gradient_checkpointing=True)


@pytest.mark.slow
def test_a_bf16_mixed_sd_size_step_reaches_exactly_the_motion_modules(sd_module):
    generator = torch.Generator().manual_seed(0)
    clip = lambda: torch.rand(1, 3, 2, 64, 64, generator=generator) * 2 - 1  # noqa: E731
    batch = {"source": clip(), "target": clip(), "instruction": ["make it snowy"]}
    sd_module.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sd_module.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    motion = {f"unet.{n}" for n in motion_parameters(sd_module.unet)}
    with_grad = {n for n, p in sd_module.named_parameters() if p.grad is not None}
    assert with_grad == motion
    assert all(torch.isfinite(p.grad).all() for n, p in sd_module.named_parameters() if n in with_grad)
    reached = sum(1 for n, p in sd_module.named_parameters() if n in with_grad and p.grad.abs().sum() > 0)
    assert reached > 0.9 * len(motion)  # a random adapter: its gradients are not zero
    sd_module.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_an_sd_size_edit_with_lvsc_and_motion_compensation(sd_module):
    pipe = InsV2VPipeline.from_editor(sd_module.editor)
    sd_module.unet.eval()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    video = np.stack([np.roll(base, 2 * i, axis=1) for i in range(5)])  # a pan: flow to compensate
    edited = pipe(video, "make it snowy", num_inference_steps=2, clip_frames=3, reference_frames=1, lvsc=1.0,
                  motion_compensation=True, progress=False, generator=torch.Generator().manual_seed(0)).frames
    assert edited.shape == video.shape and edited.dtype == np.uint8
    assert len(np.unique(edited)) > 1


WAN_13B, WAN_5B = "model/wan2.1-t2v-1.3b-random.yaml", "model/wan2.2-ti2v-5b-random.yaml"


def test_the_dit_editor_layouts_have_the_wan_shapes():
    """On the meta device: the Wan repositories' transformer sizes with the source channels added,
    their VAEs' compression and UMT5-XXL's encoder."""
    from model import load_editor

    sizes = {}
    for name in (WAN_13B, WAN_5B):
        editor = load_editor(shipped_config(name))
        assert editor.transformer.device.type == "meta" and editor.temporal_compression == 4
        assert editor.transformer.config.in_channels == 2 * editor.vae.config.z_dim
        sizes[name] = (round(sum(p.numel() for p in editor.transformer.parameters()) / 1e6, 1), editor.size_multiple,
                       round(sum(p.numel() for p in editor.text_encoder.parameters()) / 1e9, 2))
    assert sizes == {WAN_13B: (1419.1, 16, 5.68), WAN_5B: (5000.4, 32, 5.68)}


def test_the_wan_1_3b_layout_trains_a_bf16_lora_step_and_edits_on_cpu():
    """The real transformer and VAE (random weights) at 5 x 64²: one bf16-mixed LoRA step moves only
    the adapters, Wan's float32 parts stay float32 in half precision, and the trained editor edits
    two causal clips. UMT5-XXL is cut to one layer. Run as `bench/train.py --dit-cpu` in a process
    of its own, so its 9 GiB are returned when it ends."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "train.py"
    proc = subprocess.run([sys.executable, str(bench), "--dit-cpu"], capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "all lora_: True" in out and "all adapters: True" in out and "lora_B moved only: True" in out
    assert "float32 parts kept: True" in out and "(9, 64, 64, 3)" in out
