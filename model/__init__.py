"""The video editor's networks: inflation, norm layout, freezing, tiny configs, load and save."""

from .config import build_editor, load_editor, load_vae, pretrained_folder, shipped_config, tiny_config
from .editor import (
    SAMPLING_KEYS,
    Editor,
    EditorLoadError,
    pooled_text,
    posterior_sample,
    scheduler_class,
    source_prior_estimate,
    source_prior_posterior_std,
)
from .inflate import (
    inflate,
    is_identity_motion_module,
    motion_modules,
    skipping_identity_motion_modules,
    widened_conv_in,
    zero_motion_outputs,
)
from .norm_layout import NORM_LAYOUTS, norm_layout_of, set_norm_layout
from .tokenizer import tiny_clip_tokenizer
from .trainable import ParameterCount, count_parameters, set_trainable
from .wan_editor import WanEditor, build_wan_editor

__all__ = [
    "Editor",
    "WanEditor",
    "build_wan_editor",
    "EditorLoadError",
    "ParameterCount",
    "build_editor",
    "count_parameters",
    "inflate",
    "is_identity_motion_module",
    "load_editor",
    "load_vae",
    "motion_modules",
    "NORM_LAYOUTS",
    "norm_layout_of",
    "pooled_text",
    "posterior_sample",
    "pretrained_folder",
    "scheduler_class",
    "set_norm_layout",
    "set_trainable",
    "shipped_config",
    "skipping_identity_motion_modules",
    "source_prior_estimate",
    "source_prior_posterior_std",
    "SAMPLING_KEYS",
    "tiny_clip_tokenizer",
    "tiny_config",
    "widened_conv_in",
    "zero_motion_outputs",
]
