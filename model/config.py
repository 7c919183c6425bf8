"""Editor specs: a YAML/dict that says how to build or load an editor, and the tiny defaults."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Union

import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel

from .editor import (
    INDEX_FILE,
    Editor,
    EditorLoadError,
    build_text_encoder,
    check_sampling,
    load_vae_folder,
    scheduler_class,
    vae_without_weights,
)
from .inflate import MIN_TEMPORAL_POSITIONS, inflate, random_motion_adapter, zero_motion_outputs
from .norm_layout import set_norm_layout
from .tokenizer import tiny_clip_tokenizer
from .wan_editor import WanEditor, build_wan_editor, is_dit_folder, wan_vae

EditorSpec = Union[str, os.PathLike, Mapping[str, Any], None]

TINY = "model/tiny.yaml"
TINY_PIXEL = "model/tiny-pixel.yaml"
WAN_TINY = "model/wan-tiny.yaml"
# specs naming a shipped configuration
SHIPPED = {"tiny": TINY, "tiny-pixel": TINY_PIXEL, "wan-tiny": WAN_TINY}


def shipped_config(name: str) -> dict[str, Any]:
    """A YAML file from the installed ``configs`` package, e.g. ``"model/tiny.yaml"``."""
    return yaml.safe_load(resources.files("configs").joinpath(name).read_text())


def tiny_config(pixel_space: bool = False) -> dict[str, Any]:
    return shipped_config(TINY_PIXEL if pixel_space else TINY)


def build_editor(config: Mapping[str, Any]) -> Editor:
    """A randomly initialised editor from component configs (the layout of ``configs/model/*.yaml``).
    ``motion_adapter`` (``MotionAdapter`` arguments, e.g. ``use_motion_mid_block: false`` for the
    AnimateDiff v1 layout) inflates with a random adapter of that layout instead of the default
    one with zeroed outputs; ``zero_motion_outputs: true`` zeroes that adapter's outputs too, so a
    custom layout (e.g. fewer temporal heads) still starts as the 2D U-Net applied per frame.

    The U-Net is built 2D and inflated exactly as a pretrained one would be, so the tiny editor
    starts as its 2D U-Net applied per frame.
    """
    config = dict(config)
    config.pop("backbone", None)  # "unet", the default
    unknown = set(config) - {"seed", "tokenizer", "text_encoder", "vae", "unet", "scheduler", "min_temporal_positions",
                            "source_prior_std", "preconditioned", "sampling", "norm_layout", "motion_adapter",
                            "zero_motion_outputs"}
    if unknown:
        raise ValueError(f"unknown editor config keys: {sorted(unknown)}")
    for key in ("tokenizer", "text_encoder", "unet", "scheduler"):
        if key not in config:
            raise ValueError(f"editor config is missing '{key}'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.get("seed", 0)))
        tokenizer = tiny_clip_tokenizer(**config["tokenizer"])
        text_encoder = build_text_encoder(tokenizer, config["text_encoder"])
        vae = AutoencoderKL(**config["vae"]) if config.get("vae") else None
        unet_cfg = dict(config["unet"])
        latent = vae.config.latent_channels if vae is not None else 3
        if unet_cfg.get("out_channels", latent) != latent:
            raise ValueError(f"unet.out_channels must be {latent} (the latent channels)")
        pooled_dim = unet_cfg.get("time_cond_proj_dim")
        if pooled_dim is not None and pooled_dim != text_encoder.config.hidden_size:
            raise ValueError(f"unet.time_cond_proj_dim ({pooled_dim}) must equal the text encoder's hidden_size "
                             f"({text_encoder.config.hidden_size}): it takes the pooled prompt")
        unet2d = UNet2DConditionModel(**unet_cfg)
        adapter = None
        if config.get("motion_adapter") is not None:  # a random adapter of a given layout (AnimateDiff v1: no mid block)
            adapter = random_motion_adapter(unet_cfg, config["motion_adapter"])
        unet = inflate(unet2d, adapter,
                       min_temporal_positions=int(config.get("min_temporal_positions", MIN_TEMPORAL_POSITIONS)))
        if adapter is not None and config.get("zero_motion_outputs", False):
            zero_motion_outputs(unet)
        set_norm_layout(unet, config.get("norm_layout", "diffusers"))
    sched_cfg = dict(config["scheduler"])
    scheduler = scheduler_class(sched_cfg.pop("class", "DDPMScheduler"))(**sched_cfg)
    prior_std = config.get("source_prior_std")
    if prior_std is not None:
        prior_std = float(prior_std)
        if scheduler.config.prediction_type != "sample" or prior_std <= 0:
            raise ValueError("source_prior_std (> 0) needs scheduler.prediction_type: sample (x0 prediction)")
        with torch.no_grad():  # start as the prior's estimate: the source, denoised
            unet.conv_out.weight.zero_()
            unet.conv_out.bias.zero_()
    preconditioned = bool(config.get("preconditioned", False))
    if preconditioned and prior_std is None:
        raise ValueError("preconditioned: true scales the correction to the source prior: set source_prior_std")
    text_encoder.eval()
    if vae is not None:
        vae.eval()
    return Editor(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler,
                  source_prior_std=prior_std, preconditioned=preconditioned,
                  sampling=check_sampling(config.get("sampling"), "editor config"))


def load_editor(spec: EditorSpec = None, torch_dtype: torch.dtype | None = None,
                vae_weights: bool = True) -> Editor | WanEditor:
    """Build or load an editor from a spec.

    * ``None`` or ``"tiny"`` / ``"tiny-pixel"`` / ``"wan-tiny"``: an embedded tiny configuration;
    * a folder with ``model_index.json``: :meth:`Editor.from_pretrained`, or
      :meth:`WanEditor.from_pretrained` when it names a transformer (a DiT editor, a diffusers
      ``LucyEditPipeline`` or ``WanPipeline`` folder);
    * a mapping with ``backbone: wan``: :func:`model.wan_editor.build_wan_editor`;
    * ``{extends: FILE.yaml, key: value, ...}``: that config with the keys given replaced;
    * a YAML file or a mapping: ``{pretrained: DIR}``, ``{base_model: DIR, motion_adapter:
      DIR|FILE|null, scheduler: NAME, norm_layout: diffusers|insv2v}`` (Stable Diffusion /
      InstructPix2Pix + AnimateDiff; FILE is an original-format motion-module checkpoint) or
      component configs (random initialisation, as ``configs/model/tiny.yaml``).

    ``vae_weights=False`` leaves the VAE's weights unread (it is built on the meta device, from its
    config): for training on cached latents, where only its scaling factor and shapes are used.
    :func:`load_vae` loads it in full from the same spec.
    """
    if not vae_weights and _vae_folder(spec) is None:  # built from configs: the real VAE costs nothing to build
        editor = load_editor(spec, torch_dtype)
        if isinstance(editor, WanEditor) and editor.vae is not None:
            with torch.device("meta"):
                editor.vae = type(editor.vae).from_config(editor.vae.config)
        elif editor.vae is not None:
            editor.vae = vae_without_weights(editor.vae.config, editor.vae.dtype)
        return editor
    if spec is None:
        spec = "tiny"
    if isinstance(spec, str) and spec in SHIPPED:
        config = shipped_config(SHIPPED[spec])
        return build_wan_editor(config) if config.get("backbone") == "wan" else build_editor(config)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.is_dir():
            return _from_folder(path, torch_dtype, vae_weights)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            spec = yaml.safe_load(path.read_text())
            if not isinstance(spec, Mapping):
                raise EditorLoadError(f"{path} does not hold a mapping")
        else:
            raise EditorLoadError(f"no editor at {path}: expected a folder or a .yaml file")
    spec = dict(spec)
    if "extends" in spec:  # another config with some keys replaced (e.g. an ablation's one switch)
        base = _path_value(spec, "extends")
        if not base.is_file():
            raise EditorLoadError(f"extends: no editor config at {base}")
        spec = {**yaml.safe_load(base.read_text()), **{k: v for k, v in spec.items() if k != "extends"}}
    if "pretrained" in spec:
        return _from_folder(_path_value(spec, "pretrained"), torch_dtype, vae_weights)
    if spec.get("backbone") == "wan":
        return build_wan_editor(spec)
    if "backbone" in spec and spec["backbone"] != "unet":
        raise EditorLoadError(f"backbone must be 'unet' or 'wan', got {spec['backbone']!r}")
    if "base_model" in spec:
        return Editor.from_stable_diffusion(
            _path_value(spec, "base_model"),
            motion_adapter=_path_value(spec, "motion_adapter") if spec.get("motion_adapter") else None,
            scheduler=spec.get("scheduler", "DDPMScheduler"),
            torch_dtype=torch_dtype,
            min_temporal_positions=int(spec.get("min_temporal_positions", MIN_TEMPORAL_POSITIONS)),
            norm_layout=spec.get("norm_layout", "diffusers"),
            vae_weights=vae_weights,
        )
    return build_editor(spec)


def _from_folder(path: Path, torch_dtype: torch.dtype | None, vae_weights: bool):
    """An editor folder: a U-Net editor's, or one with a transformer (a DiT editor, a diffusers
    ``LucyEditPipeline`` or ``WanPipeline`` folder)."""
    if not path.is_dir():
        raise EditorLoadError(f"editor folder not found: {path}")
    if is_dit_folder(path):
        return WanEditor.from_pretrained(path, torch_dtype=torch_dtype, vae_weights=vae_weights)
    return Editor.from_pretrained(path, torch_dtype=torch_dtype, vae_weights=vae_weights)


def pretrained_folder(spec: EditorSpec) -> Path | None:
    """The saved editor folder a spec loads as it is (a folder, or ``{pretrained: DIR}``); ``None``
    for a spec built from configs or from a Stable Diffusion base."""
    if isinstance(spec, (str, os.PathLike)) and spec not in SHIPPED and Path(spec).is_dir():
        return Path(spec)
    mapping = _spec_mapping(spec)
    if mapping is not None and mapping.get("pretrained"):
        return _path_value(mapping, "pretrained")
    return None


def _spec_mapping(spec: EditorSpec) -> Mapping[str, Any] | None:
    if isinstance(spec, Mapping):
        return spec
    if isinstance(spec, (str, os.PathLike)) and Path(spec).suffix in (".yaml", ".yml") and Path(spec).is_file():
        loaded = yaml.safe_load(Path(spec).read_text())
        return loaded if isinstance(loaded, Mapping) else None
    return None


def _vae_folder(spec: EditorSpec) -> Path | None:
    """Where a spec's VAE weights are read from (``None``: the spec builds it from a config, or has none)."""
    folder = pretrained_folder(spec)
    if folder is not None:
        return folder / "vae"
    mapping = _spec_mapping(spec)
    if mapping is not None and mapping.get("base_model"):
        return _path_value(mapping, "base_model") / "vae"
    return None


def load_vae(spec: EditorSpec = None, torch_dtype: torch.dtype | None = None) -> AutoencoderKL | None:
    """The VAE of an editor spec alone (``None`` for a pixel-space editor), read from its folder
    without the other components; a spec of configs is built whole, as :func:`load_editor` would."""
    folder = _vae_folder(spec)
    if folder is None:
        return load_editor(spec, torch_dtype).vae
    if folder.parent.joinpath(INDEX_FILE).is_file() and not folder.is_dir():
        return None  # a pixel-space editor folder
    if is_dit_folder(folder.parent):
        return wan_vae(folder)
    return load_vae_folder(folder, torch_dtype)


PLACEHOLDER_PREFIX = "FILL_ME"


def _path_value(spec: Mapping[str, Any], key: str) -> Path:
    value = spec.get(key)
    if not value or str(value).startswith(PLACEHOLDER_PREFIX):
        raise EditorLoadError(f"set '{key}' to a local folder (it is {value!r})")
    return Path(os.path.expanduser(str(value)))
