"""The InsV2V authors' checkpoint format: their video U-Net, VAE and text encoder as this project's editor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, UNetMotionModel
from diffusers.loaders.single_file_utils import (
    convert_animatediff_checkpoint_to_diffusers,
    convert_ldm_clip_checkpoint,
    convert_ldm_vae_checkpoint,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

from .config import shipped_config
from .editor import CONFIG_FILES, WEIGHT_FILES, Editor, scheduler_class
from .weights import (UNET_PREFIX, EditorLoadError, load_component, module_state, read_checkpoint, require_files,
                      state_mismatches)
from .norm_layout import set_norm_layout

# Their block names (modules/video_unet_temporal/unet_blocks.py) and diffusers' for the same block.
REFERENCE_BLOCKS = {
    "CrossAttnDownBlock3D": "CrossAttnDownBlockMotion",
    "DownBlock3D": "DownBlockMotion",
    "CrossAttnUpBlock3D": "CrossAttnUpBlockMotion",
    "UpBlock3D": "UpBlockMotion",
}
VAE_PREFIX = "vae."
TEXT_PREFIX = "text_model.transformer."
# Wrappers their trainer (Lightning, DeepSpeed) put around the module's own state dict.
PAPER_UNET_CONFIG = "model/insv2v-reference-unet.yaml"
# Their config trains with DeepSpeed ZeRO-2, whose Lightning "checkpoint" is a folder.

def paper_unet_config() -> dict[str, Any]:
    """The authors' ``unet.params`` of ``configs/instruct_v2v.yaml`` (the paper's U-Net), shipped here."""
    return shipped_config(PAPER_UNET_CONFIG)

def unet_config_from_reference(reference: Mapping[str, Any]) -> dict[str, Any]:
    """``UNetMotionModel`` constructor arguments for the authors' ``UNet3DConditionModel(**reference)``.

    Their ``attention_head_dim`` is, as in Stable Diffusion's config, the number of heads; their
    motion modules use ``in_channels // num_attention_heads`` channels per head, as diffusers'.
    Options their code has and diffusers' class cannot express are refused by name.
    """
    ref = dict(reference)
    motion = dict(ref.get("motion_module_kwargs") or {})
    unsupported = []
    if not ref.get("use_motion_module", True):
        unsupported.append("use_motion_module: false")
    if ref.get("motion_module_decoder_only", False):
        unsupported.append("motion_module_decoder_only: true")
    if ref.get("motion_module_type", "Vanilla") != "Vanilla":
        unsupported.append(f"motion_module_type: {ref['motion_module_type']}")
    levels = len(ref.get("block_out_channels", ()))
    if sorted(ref.get("motion_module_resolutions", (1, 2, 4, 8)))[:levels] != [2**i for i in range(levels)]:
        unsupported.append("motion_module_resolutions without every level")
    if list(motion.get("attention_block_types", ("Temporal_Self", "Temporal_Self"))) != ["Temporal_Self", "Temporal_Self"]:
        unsupported.append(f"attention_block_types: {motion['attention_block_types']}")
    if not motion.get("temporal_position_encoding", True):
        unsupported.append("temporal_position_encoding: false")
    if motion.get("temporal_attention_dim_div", 1) != 1:
        unsupported.append("temporal_attention_dim_div != 1")
    for key in ("resnet_time_scale_shift", "class_embed_type", "num_class_embeds", "dual_cross_attention"):
        if ref.get(key) not in (None, False, "default"):
            unsupported.append(f"{key}: {ref[key]}")
    if ref.get("use_linear_projection", False) or ref.get("only_cross_attention", False) or ref.get("upcast_attention", False):
        unsupported.append("use_linear_projection / only_cross_attention / upcast_attention")
    if unsupported:
        raise ValueError(f"this InsV2V U-Net config is not supported: {'; '.join(unsupported)}")
    try:
        down = [REFERENCE_BLOCKS[name] for name in ref["down_block_types"]]
        up = [REFERENCE_BLOCKS[name] for name in ref["up_block_types"]]
    except KeyError as err:
        raise ValueError(f"unknown InsV2V block type {err}") from None
    return {
        "sample_size": ref.get("sample_size"),
        "in_channels": ref.get("in_channels", 4),
        "out_channels": ref.get("out_channels", 4),
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": list(ref["block_out_channels"]),
        "layers_per_block": ref.get("layers_per_block", 2),
        "downsample_padding": ref.get("downsample_padding", 1),
        "mid_block_scale_factor": float(ref.get("mid_block_scale_factor", 1)),
        "act_fn": ref.get("act_fn", "silu"),
        "norm_num_groups": ref.get("norm_num_groups", 32),
        "norm_eps": float(ref.get("norm_eps", 1e-5)),  # YAML reads "1e-05" as a string
        "cross_attention_dim": ref.get("cross_attention_dim", 1280),
        "num_attention_heads": ref.get("attention_head_dim", 8),
        "motion_max_seq_length": motion.get("temporal_position_encoding_max_len", 24),
        "motion_num_attention_heads": motion.get("num_attention_heads", 8),
        "temporal_transformer_layers_per_block": motion.get("num_transformer_block", 2),
        "use_motion_mid_block": bool(ref.get("motion_module_mid_block", True)),
    }

def _with_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}

def unet_state_from_reference(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Their ``unet.*`` weights under ``UNetMotionModel``'s names.

    The 2D parts already carry diffusers' names (their U-Net was adapted from diffusers'); motion
    modules go through diffusers' own AnimateDiff key conversion (``attention_blocks.0/1`` ->
    ``attn1/2``, ``norms.0/1`` -> ``norm1/2``, ``ff_norm`` -> ``norm3``, no ``temporal_transformer``).
    Their sinusoidal position tables are dropped: diffusers recomputes the same table.
    """
    unet = _with_prefix(module_state(state), UNET_PREFIX)
    if not unet:
        raise ValueError("checkpoint has no 'unet.*' weights (not an InsV2V checkpoint?)")
    return convert_animatediff_checkpoint_to_diffusers(unet)

def unet_from_reference(state_dict: Mapping[str, Any], reference_config: Mapping[str, Any]) -> UNetMotionModel:
    """The authors' video U-Net as a diffusers ``UNetMotionModel`` computing the same function.

    ``state_dict``: their training checkpoint's weights (``unet.*``; with or without a
    ``_forward_module.`` prefix, or nested under ``state_dict``). ``reference_config``: their
    ``unet.params``. The result is called as every U-Net of this project: ``sample``
    ``(B, C, F, H, W)``, a timestep, text states repeated per frame ``(B*F, seq, dim)``.

    Loading their weights into diffusers' class as it is gives another network. The differences,
    each handled by swapping the smallest module (:func:`model.norm_layout.set_norm_layout` with
    ``"insv2v"``, which is recorded in the editor's config):

    1. ResNet GroupNorms (``norm1``/``norm2`` of every ResNet, mid block included): their
       ``ResnetBlock3D`` applies ``nn.GroupNorm`` to the 5-D clip, so statistics pool over all
       frames; diffusers folds frames into the batch first (per-frame statistics).
    2. ``conv_norm_out``: the same, applied by their U-Net to the 5-D output.
    3. Motion-module GroupNorm: their ``TemporalTransformer3DModel`` folds frames into the batch
       before its norm (per frame); diffusers' ``AnimateDiffTransformer3D`` normalises the clip.

    Everything else matches: spatial transformers normalise per frame in both, their
    ``InflatedConv3d``/``Upsample3D``/``Downsample3D`` are per-frame 2D ops, the motion modules'
    attention, position table and feed-forward are the same functions, and their mid block has
    no motion module (``motion_module_mid_block: false``) as set here. Measured on the tiny
    oracle: max |difference| 0.52 before, 3e-6 after.
    """
    config = unet_config_from_reference(reference_config)
    weights = unet_state_from_reference(state_dict)
    unet = UNetMotionModel(**config)
    problems = state_mismatches(unet, weights)
    if problems:
        shown = "; ".join(problems[:3])
        raise ValueError(f"the checkpoint's U-Net does not match its config ({len(problems)} problems: {shown})")
    unet.load_state_dict(weights, strict=False)
    unet.set_attn_processor(AttnProcessor2_0())
    return set_norm_layout(unet, "insv2v")

def vae_from_reference(state: Mapping[str, Any], like: AutoencoderKL) -> AutoencoderKL | None:
    """Their LDM-format ``vae.*`` weights in a diffusers ``AutoencoderKL`` shaped as ``like``
    (diffusers' own LDM conversion); ``None`` when the checkpoint has none."""
    ldm = _with_prefix(module_state(state), VAE_PREFIX)
    ldm = {k: v for k, v in ldm.items() if not k.startswith("loss.")}
    if not ldm:
        return None
    weights = convert_ldm_vae_checkpoint(ldm, dict(like.config))
    vae = AutoencoderKL.from_config(like.config)
    problems = state_mismatches(vae, weights)
    if problems:
        raise ValueError(f"the checkpoint's VAE does not match the base VAE ({len(problems)} problems: {problems[0]})")
    vae.load_state_dict(weights)
    return vae.to(dtype=like.dtype).eval()

def text_encoder_from_reference(state: Mapping[str, Any], like: CLIPTextModel) -> CLIPTextModel | None:
    """Their ``text_model.transformer.*`` weights (a Hugging Face ``CLIPTextModel`` inside their
    ``FrozenCLIPEmbedder``) in a text encoder shaped as ``like``; ``None`` when absent."""
    flat = module_state(state)
    if not any(k.startswith(TEXT_PREFIX) for k in flat):
        return None
    weights = convert_ldm_clip_checkpoint({k: v for k, v in flat.items() if k.startswith(TEXT_PREFIX)}, TEXT_PREFIX)
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    encoder = CLIPTextModel(like.config)
    problems = [p for p in state_mismatches(encoder, weights) if not p.endswith("position_ids")]
    if problems:
        raise ValueError(f"the checkpoint's text encoder does not match the base one ({len(problems)} problems: {problems[0]})")
    encoder.load_state_dict(weights, strict=False)
    return encoder.to(dtype=like.dtype).eval()

def editor_from_insv2v_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    base_model: str | os.PathLike,
    unet_config: Mapping[str, Any] | None = None,
    scheduler: str = "DDIMScheduler",
    torch_dtype: torch.dtype | None = None,
) -> Editor:
    """A whole editor from one authors' training checkpoint.

    U-Net from ``unet.*`` (:func:`unet_from_reference`, with ``unet_config`` or the paper's);
    VAE from ``vae.*`` and text encoder from ``text_model.transformer.*`` when the checkpoint has
    them, else the base folder's. ``base_model`` (an InstructPix2Pix / SD 1.5 diffusers folder)
    supplies the tokenizer, the noise schedule (under the ``scheduler`` class named) and the
    shapes of the VAE and text encoder; its U-Net is not read. Problems raise
    :class:`EditorLoadError` with one line.
    """
    state = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else module_state(checkpoint)
    base = Path(base_model)
    if not base.is_dir():
        raise EditorLoadError(f"base model folder not found: {base}")
    for name in ("tokenizer", "text_encoder", "vae", "scheduler"):
        require_files(base / name, CONFIG_FILES[name], WEIGHT_FILES.get(name))
    try:
        unet = unet_from_reference(state, unet_config if unet_config is not None else paper_unet_config())
    except ValueError as err:
        raise EditorLoadError(f"{checkpoint if not isinstance(checkpoint, Mapping) else 'checkpoint'}: {err}") from None
    base_vae = load_component("vae", lambda: AutoencoderKL.from_pretrained(base / "vae", use_safetensors=True, torch_dtype=torch_dtype))
    base_text = load_component(
        "text_encoder", lambda: CLIPTextModel.from_pretrained(base / "text_encoder", use_safetensors=True, dtype=torch_dtype)
    )
    try:
        vae = vae_from_reference(state, base_vae) or base_vae
        text_encoder = text_encoder_from_reference(state, base_text) or base_text
    except ValueError as err:
        raise EditorLoadError(str(err)) from None
    if torch_dtype is not None:
        unet = unet.to(dtype=torch_dtype)
    return Editor(
        tokenizer=load_component("tokenizer", lambda: CLIPTokenizer.from_pretrained(base / "tokenizer")),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler=load_component("scheduler", lambda: scheduler_class(scheduler).from_pretrained(base / "scheduler")),
    )
