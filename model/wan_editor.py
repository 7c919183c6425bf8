"""The DiT editor: UMT5 text encoder, causal Wan VAE and a WanTransformer3DModel fed cat([z_t, source], channels)."""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .editor import (
    INDEX_FILE,
    check_sampling,
    posterior_sample,
    scheduler_class,
    write_components,
    write_folder_staged,
    write_pipeline_module,
)
from .weights import EditorLoadError, load_component, require_files

# the pipelines whose folders load as a DiT editor as they are
LUCY_EDIT = "LucyEditPipeline"
WAN_TEXT_TO_VIDEO = "WanPipeline"
DIT_COMPONENTS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
# what a DiT editor edits with unless told otherwise (Lucy Edit's published settings: 81 frames, CFG 5)
DIT_SAMPLING = {"num_inference_steps": 50, "text_guidance": 5.0, "video_guidance": 1.0,
                "clip_frames": 81, "reference_frames": 9}


def clean_prompt(text: str) -> str:
    """The prompt as Wan's text encoder was trained on it: mojibake fixed (ftfy), HTML entities
    unescaped twice, runs of whitespace made one space."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs broken encodings; plain prompts are unchanged without it
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def normalise_latents(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``z = (x - mu_c) / sigma_c`` per latent channel: the Wan VAE's latents at unit scale."""
    return (latents - mean) / std


def denormalise_latents(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``x = z sigma_c + mu_c``: the inverse of :func:`normalise_latents`, what the decoder reads."""
    return latents * std + mean


def causal_latent_frames(frames: int, temporal: int) -> int:
    """A causal VAE keeps the first frame alone and packs every ``temporal`` later ones into one
    latent frame: ``1 + (F - 1) / temporal`` latent frames for ``F = 1 + temporal k`` frames."""
    if frames < 1 or (frames - 1) % temporal:
        raise ValueError(f"a causal clip has 1 + {temporal}k frames, got {frames}")
    return 1 + (frames - 1) // temporal


def widened_patch_embedding(conv: torch.nn.Conv3d, extra_channels: int) -> torch.nn.Conv3d:
    """``conv`` taking ``extra_channels`` more input channels whose weights are zero: its output is
    unchanged whatever they hold (InstructPix2Pix's initialisation of the source channels)."""
    wider = torch.nn.Conv3d(conv.in_channels + extra_channels, conv.out_channels, conv.kernel_size, conv.stride,
                            conv.padding, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        wider.weight.zero_()
        wider.weight[:, : conv.in_channels] = conv.weight
        if conv.bias is not None:
            wider.bias.copy_(conv.bias)
    return wider


@dataclass
class WanEditor:
    """A video DiT editor in Lucy Edit's layout.

    The transformer reads the noisy latents and the source clip's latents concatenated on
    channels; latents are the causal Wan VAE's (``1 + 4k`` frames give ``1 + k`` latent frames),
    normalised per channel by the VAE's ``latents_mean``/``latents_std``, so the scaling factor
    is 1 and the source condition is on the same scale as the target. Text is UMT5's last hidden
    state, zero past each prompt's tokens, ``max_sequence_length`` long.

    ``vae is None`` means pixel space (latents are the frames in [-1, 1], one per frame), as the
    shapes world's from-scratch editors use. ``per_frame_attention`` restricts self-attention to
    the tokens of each frame (:class:`PerFrameAttnProcessor`): the same parameters as a per-frame
    image editor, the temporal ablation of a DiT.

    It offers what the pipeline, the trainer and the cache call on an editor (the same names as
    :class:`model.Editor`): ``encode_text``, ``encode_distribution``, ``encode_video``,
    ``decode_latents``, ``predict``, ``denoiser``, ``temporal_compression``.
    """

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: AutoencoderKLWan | None
    transformer: WanTransformer3DModel
    scheduler: SchedulerMixin
    max_sequence_length: int = 512
    expand_timesteps: bool = False
    sampling: dict[str, Any] | None = None
    resolution: int = 480
    per_frame_attention: bool = False

    def __post_init__(self):
        set_per_frame_attention(self.transformer, self.per_frame_attention)

    source_prior_std = None  # the U-Net editor's x0 prior has no DiT counterpart
    preconditioned = False
    denoiser_name = "transformer"

    # ---------------------------------------------------------------- properties
    @property
    def denoiser(self) -> WanTransformer3DModel:
        return self.transformer

    @property
    def text_length(self) -> int:
        """Tokens per prompt in the text states."""
        return self.max_sequence_length

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.out_channels

    @property
    def source_channels(self) -> int:
        return self.transformer.config.in_channels - self.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else int(self.vae.config.scale_factor_spatial)

    @property
    def temporal_compression(self) -> int:
        return 1 if self.vae is None else int(self.vae.config.scale_factor_temporal)

    @property
    def size_multiple(self) -> int:
        """Frame sides must be multiples of this: the VAE's downsampling times the transformer's patch."""
        return self.vae_scale_factor * int(self.transformer.config.patch_size[1])

    @property
    def scaling_factor(self) -> float:
        return 1.0

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def unet(self):
        raise AttributeError("a DiT editor has no U-Net: its denoiser is editor.transformer")

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"text_encoder": self.text_encoder, "transformer": self.transformer}
        if self.vae is not None:
            mods["vae"] = self.vae
        return mods

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "WanEditor":
        for name, module in self.modules().items():
            module.to(device=device)
            if dtype is not None and name != "vae":
                cast_keeping_float32(module, dtype)
        return self

    def sampling_defaults(self) -> dict[str, Any]:
        return {**DIT_SAMPLING, **(self.sampling or {})}

    # ---------------------------------------------------------------- computation
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 states ``(B, max_sequence_length, dim)``: each prompt cleaned (:func:`clean_prompt`),
        its states kept for its own tokens and zero after them (as Wan was trained)."""
        tokens = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length",
                                max_length=self.max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device)
        states = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        return (states * mask.gt(0).unsqueeze(-1)).to(self.dtype)

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def encode_distribution(self, video: torch.Tensor, chunk: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of clips ``(B, 3, F, H, W)`` in [-1, 1], normalised: mean
        ``(m - mu) / sigma`` and log-variance ``logvar - 2 log sigma``, each ``(B, c, 1 + (F-1)/4, h, w)``,
        in float32. The causal VAE reads a clip whole; ``chunk`` clips are encoded at a time."""
        if self.vae is None:
            raise ValueError("a pixel-space editor has no VAE posterior to encode")
        means, logvars = [], []
        for part in video.split(chunk):
            dist = self.vae.encode(part.to(self.vae.device, self.vae.dtype)).latent_dist
            means.append(dist.mean.float())
            logvars.append(dist.logvar.float())
        mean, logvar = torch.cat(means), torch.cat(logvars)
        mu, sigma = self._statistics(mean)
        return normalise_latents(mean, mu, sigma), logvar - 2 * sigma.log()

    def encode_video(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
                     chunk: int = 1) -> torch.Tensor:
        """Normalised latents of clips ``(B, 3, F, H, W)``: the posterior's mode (the source
        condition, as Lucy Edit encodes it) or, with ``sample``, a draw (the training target)."""
        if self.vae is None:
            return video.to(self.dtype)
        mean, logvar = self.encode_distribution(video, chunk)
        return (posterior_sample(mean, logvar, generator) if sample else mean).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor, chunk: int = 1) -> torch.Tensor:
        """Frames ``(B, 3, F, H, W)`` in [-1, 1] from normalised latents ``(B, c, f, h, w)``."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        mu, sigma = self._statistics(latents.float())
        raw = denormalise_latents(latents.float(), mu, sigma).to(self.vae.device, self.vae.dtype)
        frames = torch.cat([self.vae.decode(part).sample for part in raw.split(chunk)])
        return frames.float().clamp(-1, 1)

    def predict(self, noisy: torch.Tensor, condition: torch.Tensor, text_states: torch.Tensor,
                timestep: torch.Tensor | float) -> torch.Tensor:
        """The transformer's velocity for ``cat([z_t, c], channels)`` (Lucy Edit's input layout),
        in ``noisy``'s dtype; ``timestep`` (``sigma * T``) is one value per clip or one for all."""
        dtype = self.transformer.dtype
        b, _, f, h, w = noisy.shape
        # one timestep per clip, also for a TI2V-style model (``expand_timesteps``): every token of an
        # edit shares its clip's timestep, and the per-clip path computes the same values without
        # running the time MLP once per token (a gigabyte of saved activations at 81x480x832)
        t = torch.as_tensor(timestep, device=noisy.device, dtype=torch.float32).reshape(-1).expand(b)
        if self.per_frame_attention:
            _, ph, pw = self.transformer.config.patch_size
            for module in self.transformer.modules():
                if isinstance(getattr(module, "processor", None), PerFrameAttnProcessor):
                    module.processor.tokens_per_frame = (h // ph) * (w // pw)
        hidden = torch.cat([noisy, condition.to(noisy.dtype)], dim=1).to(dtype)
        out = self.transformer(hidden_states=hidden, timestep=t, encoder_hidden_states=text_states.to(dtype),
                               return_dict=False)[0]
        return out.to(noisy.dtype)

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """An editor folder (loads as an ``InsV2VPipeline``), written whole or not at all."""
        write_folder_staged(directory, self._write_folder)

    def _write_folder(self, directory: Path) -> None:
        index = write_components(directory, {name: getattr(self, name) for name in DIT_COMPONENTS})
        index["unet"] = [None, None]
        index.update(sampling=self.sampling, max_sequence_length=self.max_sequence_length,
                     expand_timesteps=self.expand_timesteps, resolution=self.resolution,
                     per_frame_attention=self.per_frame_attention)
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        write_pipeline_module(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        vae_weights: bool = True, text_to_video: bool = False) -> "WanEditor":
        """An editor folder of this class, a diffusers ``LucyEditPipeline`` folder as it is, or a
        ``WanPipeline`` (text-to-video) folder, whose transformer gets zero-weighted source channels
        (:func:`widened_patch_embedding`): at first it predicts what the base model predicts.
        ``text_to_video`` keeps a ``WanPipeline`` folder's transformer as it is (no source
        channels: the text-to-video model that renders pairs)."""
        directory = Path(directory)
        index = json.loads((directory / INDEX_FILE).read_text())
        class_name = index.get("_class_name")
        class_name = class_name[-1] if isinstance(class_name, list) else class_name
        pixel_space = index.get("vae") == [None, None]
        for name in DIT_COMPONENTS:
            if name == "vae" and pixel_space:
                continue
            if not isinstance(index.get(name), list) or index[name][0] is None:
                raise EditorLoadError(f"{directory / INDEX_FILE} lists no {name}")
            weights = {"text_encoder": None, "vae": "diffusion_pytorch_model.safetensors" if vae_weights else None,
                       "transformer": None}.get(name)
            config = {"tokenizer": None, "scheduler": "scheduler_config.json"}.get(name, "config.json")
            require_files(directory / name, config, weights)
        for name in ("text_encoder", "transformer"):  # sharded weights carry an index file instead of one file
            folder = directory / name
            if not any(folder.glob("*.safetensors")):
                raise EditorLoadError(f"{name} folder {folder} holds no .safetensors weights")
        from transformers import AutoTokenizer, UMT5EncoderModel

        tokenizer = load_component("tokenizer", lambda: AutoTokenizer.from_pretrained(directory / "tokenizer"))
        text_encoder = load_component("text_encoder", lambda: UMT5EncoderModel.from_pretrained(
            directory / "text_encoder", use_safetensors=True, dtype=torch_dtype))
        if torch_dtype is not None and text_encoder.dtype != torch_dtype:  # older transformers ignore `dtype`
            text_encoder = text_encoder.to(torch_dtype)
        vae = None if pixel_space else load_component("vae", lambda: wan_vae(directory / "vae", vae_weights))
        transformer = load_component("transformer", lambda: WanTransformer3DModel.from_pretrained(
            directory / "transformer", use_safetensors=True, torch_dtype=torch_dtype))
        scheduler = load_component("scheduler", lambda: scheduler_class(index["scheduler"][1]).from_pretrained(
            directory / "scheduler"))
        latent = 3 if vae is None else vae.config.z_dim
        if class_name == WAN_TEXT_TO_VIDEO:
            if transformer.config.in_channels != latent:
                raise EditorLoadError(f"{directory}: a WanPipeline transformer must read {latent} channels")
            if not text_to_video:
                transformer = source_channels_added(transformer, latent)
        elif text_to_video:
            raise EditorLoadError(f"{directory}: not a WanPipeline (text-to-video) folder ({class_name})")
        elif transformer.config.in_channels != 2 * latent or transformer.config.out_channels != latent:
            raise EditorLoadError(f"{directory}: the transformer must read {2 * latent} channels (noisy and source "
                                  f"latents) and write {latent}, got {transformer.config.in_channels} -> "
                                  f"{transformer.config.out_channels}")
        if index.get("boundary_ratio") is not None or index.get("transformer_2", [None])[0] is not None:
            raise EditorLoadError(f"{directory}: two-expert folders (transformer_2) are not supported")
        return cls(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae if vae is None else vae.eval(),
                   transformer=transformer, scheduler=scheduler,
                   max_sequence_length=int(index.get("max_sequence_length", 512)),
                   expand_timesteps=bool(index.get("expand_timesteps", False)),
                   sampling=check_sampling(index.get("sampling"), str(directory / INDEX_FILE)),
                   resolution=int(index.get("resolution", 480)),
                   per_frame_attention=bool(index.get("per_frame_attention", False)))


@torch.no_grad()
def cast_keeping_float32(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module``'s floating weights in ``dtype``, except the submodules its class keeps in float32
    (``_keep_in_fp32_modules``: Wan's rotary table, time embedder, norms and modulation), as
    diffusers' ``from_pretrained(torch_dtype=...)`` leaves them."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keep.intersection(name.split(".")) else dtype)
    return module


class PerFrameAttnProcessor(WanAttnProcessor):
    """Wan self-attention restricted to the tokens of each frame: a block-diagonal mask over the
    frame-major token sequence (``tokens_per_frame`` long blocks, set by the editor before each
    forward). Same weights and shapes as the full processor; frames no longer see each other."""

    tokens_per_frame: int | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None and self.tokens_per_frame:
            frame = torch.arange(hidden_states.shape[1], device=hidden_states.device) // self.tokens_per_frame
            attention_mask = frame[:, None] == frame[None, :]
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def set_per_frame_attention(transformer: WanTransformer3DModel, per_frame: bool) -> None:
    """Every block's self-attention per frame (:class:`PerFrameAttnProcessor`) or over the whole clip."""
    for block in getattr(transformer, "blocks", ()):
        current = isinstance(block.attn1.processor, PerFrameAttnProcessor)
        if per_frame != current:
            block.attn1.set_processor(PerFrameAttnProcessor() if per_frame else WanAttnProcessor())


def source_channels_added(transformer: WanTransformer3DModel, channels: int) -> WanTransformer3DModel:
    """A text-to-video transformer made an editor's: its patch embedding takes ``channels`` more
    input channels (the source latents) with zero weights, and its config says so."""
    transformer.patch_embedding = widened_patch_embedding(transformer.patch_embedding, channels)
    transformer.register_to_config(in_channels=transformer.config.in_channels + channels)
    return transformer


def wan_vae(folder: Path, weights: bool = True) -> AutoencoderKLWan:
    """The Wan VAE of a folder, in float32 (its decoder overflows in half precision); without
    ``weights`` only its config is read, on the meta device (training on cached latents)."""
    if weights:
        return AutoencoderKLWan.from_pretrained(folder, use_safetensors=True, torch_dtype=torch.float32)
    with torch.device("meta"):
        return AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(folder))


def is_dit_folder(directory: Path) -> bool:
    """Whether an editor folder's index names a transformer (a DiT editor, Lucy Edit or Wan)."""
    try:
        index = json.loads((Path(directory) / INDEX_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    transformer = index.get("transformer")
    return isinstance(transformer, list) and transformer[0] is not None


def build_wan_editor(config: Mapping[str, Any]) -> WanEditor:
    """A randomly initialised DiT editor from component configs (``configs/model/wan-*.yaml``):
    ``tokenizer`` (the in-memory UMT5 vocabulary's arguments), ``text_encoder``
    (``transformers.UMT5Config``), ``vae`` (``AutoencoderKLWan``), ``transformer``
    (``WanTransformer3DModel``; ``in_channels`` is twice the latent channels, or the latent channels
    with ``text_to_video: true``) and ``scheduler``.
    ``meta: true`` builds the networks on the meta device (sizes and FLOPs, no memory)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from .tokenizer import tiny_umt5_tokenizer

    config = dict(config)
    unknown = set(config) - {"backbone", "seed", "tokenizer", "text_encoder", "vae", "transformer", "scheduler",
                             "max_sequence_length", "expand_timesteps", "sampling", "resolution", "meta",
                             "per_frame_attention", "text_to_video"}
    if unknown:
        raise ValueError(f"unknown DiT editor config keys: {sorted(unknown)}")
    for key in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler"):
        if key not in config:
            raise ValueError(f"DiT editor config is missing '{key}' (vae: null for pixel space)")
    device = torch.device("meta") if config.get("meta") else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.get("seed", 0)))
        tokenizer = tiny_umt5_tokenizer(**config["tokenizer"])
        with torch.device(device or "cpu"):
            # a real layout may state UMT5's own vocabulary size (its embedding is a fifth of the encoder)
            text_config = {"vocab_size": len(tokenizer), **config["text_encoder"]}
            if text_config["vocab_size"] < len(tokenizer):
                raise ValueError(f"text_encoder.vocab_size must be at least the tokenizer's {len(tokenizer)}")
            text_encoder = UMT5EncoderModel(UMT5Config(pad_token_id=tokenizer.pad_token_id,
                                                       eos_token_id=tokenizer.eos_token_id, **text_config))
            vae, z = None, 3  # pixel space: the frames are the latents
            if config["vae"]:
                vae_cfg = dict(config["vae"])
                z = int(vae_cfg.get("z_dim", 16))
                vae_cfg.setdefault("latents_mean", [0.0] * z)
                vae_cfg.setdefault("latents_std", [1.0] * z)
                vae = AutoencoderKLWan(**vae_cfg).eval()
            transformer_cfg = dict(config["transformer"])
            reads = z if config.get("text_to_video") else 2 * z  # a text-to-video model reads no source
            if transformer_cfg.get("in_channels") != reads or transformer_cfg.get("out_channels") != z:
                raise ValueError(f"transformer.in_channels must be {reads} and out_channels {z}"
                                 + ("" if config.get("text_to_video") else " (latents and source)"))
            if transformer_cfg.get("text_dim") != text_encoder.config.d_model:
                raise ValueError(f"transformer.text_dim must be the text encoder's d_model ({text_encoder.config.d_model})")
            transformer = WanTransformer3DModel(**transformer_cfg)
    sched_cfg = dict(config["scheduler"])
    scheduler = scheduler_class(sched_cfg.pop("class", "FlowMatchEulerDiscreteScheduler"))(**sched_cfg)
    return WanEditor(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae, transformer=transformer,
                     scheduler=scheduler, max_sequence_length=int(config.get("max_sequence_length", 512)),
                     expand_timesteps=bool(config.get("expand_timesteps", False)),
                     sampling=check_sampling(config.get("sampling"), "DiT editor config"),
                     resolution=int(config.get("resolution", 480)),
                     per_frame_attention=bool(config.get("per_frame_attention", False)))
