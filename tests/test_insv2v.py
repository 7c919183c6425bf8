"""The InsV2V authors' checkpoints: their U-Net against their own outputs, whole-editor conversion,
original-format AnimateDiff motion modules, and the GroupNorm layout as a config option."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from folders import write_sd_folder
from safetensors.torch import load_file, save_file

from infer.cli import main as infer_main
from model import Editor, EditorLoadError, build_editor, load_editor, motion_modules, tiny_config
from model.animatediff import motion_adapter_from_original
from model.insv2v import (
    editor_from_insv2v_checkpoint,
    paper_unet_config,
    state_mismatches,
    unet_config_from_reference,
    unet_from_reference,
    unet_state_from_reference,
)
from model.norm_layout import ClipGroupNorm, FrameGroupNorm, norm_layout_of, set_norm_layout
from guards import HANG_GUARD

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "insv2v-reference"


# ---------------------------------------------------------------- writing the authors' format
def to_original_motion_keys(state: dict[str, torch.Tensor], max_len: int) -> dict[str, torch.Tensor]:
    """diffusers motion-module names -> AnimateDiff's original ones, with their position tables."""
    out = {}
    for key, value in state.items():
        if key.endswith("pos_embed.pe"):
            continue
        key = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
        for new, old in ((".attn1", ".attention_blocks.0"), (".attn2", ".attention_blocks.1"), (".norm1", ".norms.0"),
                         (".norm2", ".norms.1"), (".norm3", ".ff_norm")):
            if ".transformer_blocks." in key:
                key = key.replace(new + ".", old + ".")
        out[key] = value
        if key.endswith("attention_blocks.0.to_q.weight") or key.endswith("attention_blocks.1.to_q.weight"):
            dim = value.shape[1]
            out[key.replace("to_q.weight", "pos_encoder.pe")] = sinusoid(max_len, dim)
    return out


def sinusoid(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2) * (-torch.log(torch.tensor(10000.0)) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * div)
    pe[0, :, 1::2] = torch.cos(position * div)
    return pe


def to_ldm_vae_keys(vae) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's weights under the LDM names the authors' VAE uses."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        k = key
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        k = k.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
        for new, old in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k = k.replace(f"mid_block.attentions.0.{new}", f"mid.attn_1.{old}")
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".attn_1." in k and k.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[k] = value
    return out


def tiny_reference_config() -> dict:
    """A tiny U-Net in the authors' config format (their ``unet.params``)."""
    return {
        "in_channels": 8, "out_channels": 4, "act_fn": "silu", "attention_head_dim": 8, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "norm_eps": 1e-5, "use_motion_module": True,
        "motion_module_resolutions": [1, 2, 4, 8], "motion_module_mid_block": False, "motion_module_decoder_only": False,
        "motion_module_type": "Vanilla",
        "motion_module_kwargs": {"num_attention_heads": 8, "num_transformer_block": 1,
                                 "attention_block_types": ["Temporal_Self", "Temporal_Self"],
                                 "temporal_position_encoding": True, "temporal_position_encoding_max_len": 32,
                                 "temporal_attention_dim_div": 1},
        "block_out_channels": [32, 64], "cross_attention_dim": 32, "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"], "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
        "norm_num_groups": 8, "sample_size": 16,
    }


def write_authors_checkpoint(path: Path, base: Path, *, with_vae=True, with_text=True, seed=11) -> dict:
    """A Lightning checkpoint as the authors' trainer writes it (``state_dict`` of ``unet.*``,
    ``vae.*`` in LDM names, ``text_model.transformer.*``), random weights unlike ``base``'s."""
    from diffusers import AutoencoderKL, UNetMotionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNetMotionModel(**unet_config_from_reference(tiny_reference_config()))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {f"unet.{k}": v for k, v in to_original_motion_keys(unet.state_dict(), 32).items()}
    vae = AutoencoderKL.from_pretrained(base / "vae")
    text = CLIPTextModel.from_pretrained(base / "text_encoder")
    with torch.no_grad():
        for p in [*vae.parameters(), *text.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    if with_vae:
        state.update({f"vae.{k}": v for k, v in to_ldm_vae_keys(vae).items()})
    if with_text:
        state.update({f"text_model.transformer.{k}": v for k, v in text.state_dict().items()})
    torch.save({"epoch": 3, "global_step": 2048, "state_dict": {f"_forward_module.{k}": v for k, v in state.items()}}, path)
    return {"unet": unet, "vae": vae, "text": text}


# ---------------------------------------------------------------- the oracle
@pytest.mark.reference
def test_unet_matches_the_authors_network_within_1e4():
    data = load_file(REFERENCE / "unet_tiny.safetensors")
    config = json.loads((REFERENCE / "unet_tiny.json").read_text())
    weights = {k: v for k, v in data.items() if k.startswith("unet.")}
    sample, timestep = data["input.sample"], data["input.timestep"]
    text = data["input.encoder_hidden_states"].repeat_interleave(sample.shape[2], dim=0)
    expected = data["output.sample"]
    # plain, behind Lightning's wrapper prefix, and nested under state_dict: one network
    for checkpoint in (weights, {"state_dict": {f"_forward_module.{k}": v for k, v in weights.items()}}):
        unet = unet_from_reference(checkpoint, config).eval()
        with torch.no_grad():
            out = unet(sample, timestep, encoder_hidden_states=text).sample
        assert out.shape == expected.shape
        error = (out - expected).abs().max()
        assert error < 1e-4, f"{error:.2e} from the authors' output (allowed 1e-4: computed by another program on another CPU)"
    # each of the three norm differences matters on its own: diffusers' layout is another network
    with torch.no_grad():
        other = set_norm_layout(copy.deepcopy(unet), "diffusers")(sample, timestep, encoder_hidden_states=text).sample
    assert (other - expected).abs().max() > 0.1


@pytest.mark.reference
def test_paper_size_keys_land_on_every_parameter_of_the_paper_editor():
    from diffusers import UNetMotionModel

    reference = json.loads((REFERENCE / "unet_paper_keys.json").read_text())
    assert reference["config"] == paper_unet_config()
    state = {k: torch.empty(shape, device="meta") for k, shape in reference["keys"].items()}
    with torch.device("meta"):
        unet = UNetMotionModel(**unet_config_from_reference(reference["config"]))
    converted = unet_state_from_reference(state)
    assert state_mismatches(unet, converted) == []
    own = unet.state_dict()
    positions = [k for k in reference["keys"] if k.endswith("pos_encoder.pe")]
    assert len(state) == 1246 and len(converted) == 1246 - len(positions)
    assert {k for k in own if not k.endswith("pos_embed.pe")} == set(converted)
    assert sum(p.numel() for p in unet.parameters()) == sum(
        torch.Size(s).numel() for k, s in reference["keys"].items() if not k.endswith("pos_encoder.pe")
    )
    # the editor the paper recipe builds here (InstructPix2Pix inflated with mm_sd_v15-shaped motion
    # modules) has exactly these parameters, so their weights also fine-tune it in place
    from diffusers import MotionAdapter, UNet2DConditionModel

    from model import inflate, shipped_config

    with torch.device("meta"):
        unet2d = UNet2DConditionModel(**shipped_config("model/sd15-random.yaml")["unet"])
        adapter = MotionAdapter(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                                motion_max_seq_length=24, use_motion_mid_block=False)
        paper_editor_unet = inflate(unet2d, adapter)
    assert state_mismatches(paper_editor_unet, converted) == []


def test_unsupported_reference_configs_are_named():
    config = tiny_reference_config()
    with pytest.raises(ValueError, match="motion_module_decoder_only"):
        unet_config_from_reference({**config, "motion_module_decoder_only": True})
    with pytest.raises(ValueError, match="motion_module_resolutions"):
        unet_config_from_reference({**config, "motion_module_resolutions": [1]})
    with pytest.raises(ValueError, match="unknown InsV2V block type 'CrossAttnDownBlock2D'"):
        unet_config_from_reference({**config, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock3D"]})


# ---------------------------------------------------------------- the norm layout
def test_clip_and_frame_group_norms_compute_what_they_say():
    torch.manual_seed(0)
    b, c, f, h, w = 2, 8, 3, 4, 5
    clip = torch.randn(b, c, f, h, w) * torch.linspace(0.5, 3, f).view(1, 1, f, 1, 1)
    plain = torch.nn.GroupNorm(4, c)
    with torch.no_grad():
        plain.weight.normal_(), plain.bias.normal_()
    frames = clip.transpose(1, 2).reshape(b * f, c, h, w)
    pooled = ClipGroupNorm(4, c)
    pooled.load_state_dict(plain.state_dict())
    pooled.frames = f
    expected = plain(clip).transpose(1, 2).reshape(b * f, c, h, w)  # GroupNorm of the 5-D clip
    assert torch.allclose(pooled(frames), expected, atol=1e-6)
    per_frame = FrameGroupNorm(4, c)
    per_frame.load_state_dict(plain.state_dict())
    expected = plain(frames).reshape(b, f, c, h, w).transpose(1, 2)
    assert torch.allclose(per_frame(clip), expected, atol=1e-6)
    assert not torch.allclose(pooled(frames), plain(frames), atol=1e-3)


def faithful_tiny_editor() -> Editor:
    editor = build_editor({**tiny_config(), "norm_layout": "insv2v"})
    torch.manual_seed(2)
    with torch.no_grad():
        for module in motion_modules(editor.unet):  # make the temporal layers act
            module.proj_out.weight.normal_(std=0.2)
    return editor


@torch.no_grad()
def editor_output(editor: Editor, frames: int = 3) -> torch.Tensor:
    torch.manual_seed(3)
    cond = torch.randn(1, 4, frames, 8, 8)
    text = editor.encode_text(["make it snowy"])
    return editor.predict(torch.randn_like(cond), cond, text, torch.tensor([500]))


def test_norm_layout_is_saved_and_restored(tmp_path):
    editor = faithful_tiny_editor()
    assert norm_layout_of(editor.unet) == "insv2v"
    before = editor_output(editor)
    editor.save_pretrained(tmp_path / "ed")
    assert json.loads((tmp_path / "ed" / "model_index.json").read_text())["norm_layout"] == "insv2v"
    loaded = Editor.from_pretrained(tmp_path / "ed")
    assert norm_layout_of(loaded.unet) == "insv2v"
    assert torch.equal(editor_output(loaded), before)
    # the same weights under diffusers' layout are another function; and back again
    set_norm_layout(loaded.unet, "diffusers")
    assert not torch.allclose(editor_output(loaded), before, atol=1e-3)
    set_norm_layout(loaded.unet, "insv2v")
    assert torch.equal(editor_output(loaded), before)
    with pytest.raises(ValueError, match="norm_layout must be one of diffusers, insv2v"):
        build_editor({**tiny_config(), "norm_layout": "frames"})


def test_faithful_layout_trains_with_checkpointing_and_any_clip_length():
    editor = faithful_tiny_editor()
    unet = editor.unet.train()
    text = editor.encode_text(["make it snowy"]).detach()

    def grads(checkpointing: bool, frames: int) -> dict[str, torch.Tensor]:
        unet.zero_grad()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        torch.manual_seed(4)
        cond = torch.randn(2, 4, frames, 8, 8)
        editor.predict(torch.randn_like(cond), cond, text.repeat(2, 1, 1), torch.tensor([100, 700])).square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False, 4), grads(True, 4)
    assert plain.keys() == checkpointed.keys() and any("motion_modules" in n for n in plain)
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-5) for n in plain)
    assert all(g.isfinite().all() for g in grads(False, 7).values())  # a second clip length in the same module


def test_deep_copy_keeps_the_layout():
    editor = faithful_tiny_editor()
    twin = copy.deepcopy(editor.unet)
    assert norm_layout_of(twin) == "insv2v"
    torch.manual_seed(0)
    sample, text = torch.randn(1, 8, 5, 8, 8), torch.randn(5, 4, 32)
    with torch.no_grad():
        assert torch.equal(twin(sample, 10, encoder_hidden_states=text).sample,
                           editor.unet(sample, 10, encoder_hidden_states=text).sample)


# ---------------------------------------------------------------- the whole editor and the command
def test_convert_command_writes_an_editor_that_edits(tmp_path, capsys):
    from infer import InsV2VPipeline

    write_sd_folder(tmp_path / "ip2p", in_channels=8)
    made = write_authors_checkpoint(tmp_path / "insv2v.ckpt", tmp_path / "ip2p")
    config = tmp_path / "unet.yaml"
    config.write_text(json.dumps(tiny_reference_config()))
    code = infer_main(["convert-insv2v", str(tmp_path / "insv2v.ckpt"), "--base-model", str(tmp_path / "ip2p"),
                       "--out", str(tmp_path / "editor"), "--unet-config", str(config), "--quiet"])
    assert code == 0
    editor = Editor.from_pretrained(tmp_path / "editor")
    assert norm_layout_of(editor.unet) == "insv2v"
    assert type(editor.scheduler).__name__ == "DDIMScheduler"
    unet_state = editor.unet.state_dict()
    assert all(torch.equal(unet_state[k], v) for k, v in made["unet"].state_dict().items())
    # VAE and text encoder are the checkpoint's, not the base folder's
    assert all(torch.equal(editor.vae.state_dict()[k], v) for k, v in made["vae"].state_dict().items())
    text_state = editor.text_encoder.state_dict()
    assert all(torch.equal(text_state[k], v) for k, v in made["text"].state_dict().items() if k in text_state)
    # the folder is the same function as the in-memory conversion, and edits through the pipeline
    direct = editor_from_insv2v_checkpoint(tmp_path / "insv2v.ckpt", tmp_path / "ip2p", unet_config=tiny_reference_config())
    assert torch.equal(editor_output(editor), editor_output(direct))
    pipe = InsV2VPipeline.from_pretrained(tmp_path / "editor")
    frames = (np.random.default_rng(0).random((10, 32, 32, 3)) * 255).astype(np.uint8)
    settings = pipe.settings("make it snowy", num_inference_steps=2, clip_frames=6, reference_frames=2,
                             lvsc=0.5, motion_compensation=True)
    edited = list(pipe.edit_stream(iter(frames), settings, generator=torch.Generator().manual_seed(0), progress=False))
    assert len(edited) == 10 and all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in edited)


def test_convert_falls_back_to_the_base_vae_and_text_encoder(tmp_path):
    from diffusers import AutoencoderKL

    write_sd_folder(tmp_path / "ip2p", in_channels=8)
    made = write_authors_checkpoint(tmp_path / "unet-only.ckpt", tmp_path / "ip2p", with_vae=False, with_text=False)
    editor = editor_from_insv2v_checkpoint(tmp_path / "unet-only.ckpt", tmp_path / "ip2p", unet_config=tiny_reference_config())
    base_vae = AutoencoderKL.from_pretrained(tmp_path / "ip2p" / "vae")
    assert all(torch.equal(editor.vae.state_dict()[k], v) for k, v in base_vae.state_dict().items())
    # the same weights as DeepSpeed ZeRO-2 leaves them: a folder, the state under "module"
    flat = torch.load(tmp_path / "unet-only.ckpt", weights_only=True)["state_dict"]
    states = tmp_path / "epoch=0009.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt"
    states.parent.mkdir(parents=True)
    torch.save({"module": flat, "global_steps": 2048}, states)
    again = editor_from_insv2v_checkpoint(tmp_path / "epoch=0009.ckpt", tmp_path / "ip2p", unet_config=tiny_reference_config())
    assert all(torch.equal(again.unet.state_dict()[k], v) for k, v in made["unet"].state_dict().items())


class Opaque:
    """An arbitrary pickled object: ``weights_only`` refuses it rather than running its code."""


def run_convert(capsys, *argv) -> tuple[int, str]:
    code = infer_main(["convert-insv2v", *map(str, argv), "--quiet"])
    return code, capsys.readouterr().err.strip()


def test_convert_command_bad_input_gets_one_line_and_exit_2(tmp_path, capsys):
    write_sd_folder(tmp_path / "ip2p", in_channels=8)
    base = ["--base-model", tmp_path / "ip2p"]
    (tmp_path / "junk.ckpt").write_bytes(b"this is not a checkpoint")
    save_file({"vae.encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}, str(tmp_path / "no-unet.safetensors"))
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, tmp_path / "sd.ckpt")

    torch.save({"state_dict": {"unet.conv_in.weight": torch.zeros(1)}, "extra": Opaque()}, tmp_path / "pickled.ckpt")
    cases = [
        ([tmp_path / "missing.ckpt", *base], "checkpoint not found"),
        ([tmp_path / "junk.ckpt", *base], "is not a readable checkpoint"),
        ([tmp_path / "pickled.ckpt", *base], "is not a readable checkpoint"),
        ([tmp_path / "no-unet.safetensors", *base], "no 'unet.*' weights"),
        ([tmp_path / "sd.ckpt", *base], "no 'unet.*' weights"),
        ([tmp_path / "junk.ckpt", "--base-model", tmp_path / "nowhere"], "not a readable checkpoint|base model folder not found"),
    ]
    for argv, message in cases:
        code, err = run_convert(capsys, *argv, "--out", tmp_path / "out")
        assert code == 2, err
        assert len(err.splitlines()) == 1 and err.startswith("infer: error:") and re.search(message, err), err
        assert not (tmp_path / "out").exists()
    # a checkpoint whose U-Net is not the config's: named, nothing written
    write_authors_checkpoint(tmp_path / "tiny.ckpt", tmp_path / "ip2p")
    code, err = run_convert(capsys, tmp_path / "tiny.ckpt", *base, "--out", tmp_path / "out")
    assert code == 2 and "does not match its config" in err and not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("earlier work")
    code, err = run_convert(capsys, tmp_path / "tiny.ckpt", *base, "--out", tmp_path / "taken")
    assert code == 2 and "already exists" in err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "earlier work"


# ---------------------------------------------------------------- original AnimateDiff motion modules
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_original_format_motion_modules_load_as_the_motion_adapter(tmp_path, suffix):
    from diffusers import MotionAdapter

    write_sd_folder(tmp_path / "sd")
    torch.manual_seed(5)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=8,
                            motion_norm_num_groups=8, motion_max_seq_length=24, use_motion_mid_block=False)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    original = to_original_motion_keys(adapter.state_dict(), 24)
    path = tmp_path / f"mm_sd_v15{suffix}"
    torch.save(original, path) if suffix == ".ckpt" else save_file(original, str(path))
    loaded = motion_adapter_from_original(path)
    assert loaded.config.motion_max_seq_length == 24 and not loaded.config.use_motion_mid_block
    learned = {k: v for k, v in adapter.state_dict().items() if not k.endswith("pos_embed.pe")}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in learned.items())
    # as the editor's motion_adapter, next to the same adapter as a diffusers folder
    adapter.save_pretrained(tmp_path / "adapter")
    from_file = load_editor({"base_model": str(tmp_path / "sd"), "motion_adapter": str(path), "norm_layout": "insv2v"})
    from_folder = load_editor({"base_model": str(tmp_path / "sd"), "motion_adapter": str(tmp_path / "adapter"),
                               "norm_layout": "insv2v"})
    assert norm_layout_of(from_file.unet) == "insv2v"
    assert torch.equal(editor_output(from_file), editor_output(from_folder))


def test_motion_adapter_file_errors(tmp_path):
    write_sd_folder(tmp_path / "sd")
    save_file({"unet.conv_in.weight": torch.zeros(1)}, str(tmp_path / "not-motion.safetensors"))
    with pytest.raises(EditorLoadError, match="not an AnimateDiff motion-module checkpoint"):
        load_editor({"base_model": str(tmp_path / "sd"), "motion_adapter": str(tmp_path / "not-motion.safetensors")})
    with pytest.raises(EditorLoadError, match="checkpoint not found"):
        load_editor({"base_model": str(tmp_path / "sd"), "motion_adapter": str(tmp_path / "mm_sd_v15.ckpt")})


def test_a_converted_editor_fine_tunes_and_keeps_its_layout(tmp_path):
    import subprocess
    import sys

    from shard_fixtures import write_shards

    write_sd_folder(tmp_path / "ip2p", in_channels=8)
    write_authors_checkpoint(tmp_path / "insv2v.ckpt", tmp_path / "ip2p")
    editor = editor_from_insv2v_checkpoint(tmp_path / "insv2v.ckpt", tmp_path / "ip2p", unet_config=tiny_reference_config())
    editor.save_pretrained(tmp_path / "editor")
    write_shards(tmp_path / "shards", 2, per_shard=2)
    root = Path(__file__).resolve().parents[1]
    args = ["fit", "--config", str(root / "configs" / "tiny.yaml"), "--model.editor", str(tmp_path / "editor"),
            "--model.trainable", "motion", "--data.shards", str(tmp_path / "shards" / "*.tar"), "--data.num_frames", "4",
            "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "null"]
    proc = subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, timeout=HANG_GUARD, cwd=tmp_path,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = next((tmp_path / "outputs" / "train-tiny" / "logs").glob("version_*/editor"))
    trained = Editor.from_pretrained(exported)
    assert norm_layout_of(trained.unet) == "insv2v"
    before, after = editor.unet.state_dict(), trained.unet.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all("motion_modules" in k for k in moved)
