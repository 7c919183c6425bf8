"""The editor checkpoint: tokenizer, text encoder, VAE (or pixel space), video U-Net, scheduler."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import diffusers
import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .animatediff import motion_adapter_from_original
from .inflate import MIN_TEMPORAL_POSITIONS, inflate, skipping_identity_motion_modules
from .norm_layout import NORM_LAYOUTS, norm_layout_of, set_norm_layout
from .weights import EditorLoadError, load_component, require_files

COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
INDEX_FILE = "model_index.json"
# How diffusers finds the pipeline class of a folder: ``_class_name`` names a module file in the
# folder and a class in it; the file only imports the installed class.
PIPELINE_CLASS = ("pipeline", "InsV2VPipeline")
PIPELINE_MODULE = "from infer.pipeline import InsV2VPipeline  # noqa: F401  (the class this folder loads as)\n"


def write_pipeline_module(directory: Path) -> None:
    """The module file ``DiffusionPipeline.from_pretrained`` reads this folder's class from."""
    (Path(directory) / f"{PIPELINE_CLASS[0]}.py").write_text(PIPELINE_MODULE)


def write_folder_staged(directory: str | os.PathLike, write) -> None:
    """``write(folder)`` into a folder beside ``directory``, then renamed into place: a reader (or
    a crash) never sees half a folder, and an editor already there is replaced whole, not mixed
    with the new one. A non-empty folder that is not an editor is refused, never deleted."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not (directory / INDEX_FILE).is_file():
        raise FileExistsError(f"{directory} exists and is not an editor folder: choose another folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.staging-", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; the editor is as readable as any file made here
    try:
        write(staging)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{staging.name.rsplit('-', 1)[-1]}")
            directory.rename(old)
        try:
            staging.rename(directory)
        except OSError:
            if old is not None:
                old.rename(directory)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
# File suffixes of original-format (non-diffusers) checkpoints.
ORIGINAL_CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
# The weights file each saved component folder must hold (safetensors only, never pickles).
WEIGHT_FILES = {
    "text_encoder": "model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "unet": "diffusion_pytorch_model.safetensors",
}
CONFIG_FILES = {
    "tokenizer": "tokenizer_config.json",
    "text_encoder": "config.json",
    "vae": "config.json",
    "unet": "config.json",
    "scheduler": "scheduler_config.json",
}

def write_components(directory: Path, components: Mapping[str, Any]) -> dict[str, Any]:
    """Each component in a sub-folder of its name (weights as safetensors) and the start of the
    folder's ``model_index.json``: the pipeline class, and ``[library, class]`` per component
    (``[null, null]`` for an absent one)."""
    index: dict[str, Any] = {"_class_name": list(PIPELINE_CLASS), "_diffusers_version": diffusers.__version__}
    for name, component in components.items():
        if component is None:
            index[name] = [None, None]
            continue
        library = "transformers" if name in ("tokenizer", "text_encoder") else "diffusers"
        index[name] = [library, type(component).__name__]
        if name in ("tokenizer", "scheduler"):
            component.save_pretrained(directory / name)
        else:
            component.save_pretrained(directory / name, safe_serialization=True)
    return index


@dataclass
class Editor:
    """The five components of an instruction video editor.

    ``vae is None`` means pixel space: latents are the frames themselves in [-1, 1] (3 channels,
    scaling 1), which lets a tiny model learn without a pretrained autoencoder.

    ``source_prior_std`` (x0 prediction only) makes the U-Net predict a correction to
    :func:`source_prior_estimate`, the best linear guess of the edited clip from the noisy one and
    the source. Unchanged pixels then cost nothing to learn, which is what lets a from-scratch
    editor learn in minutes.

    ``preconditioned`` (with ``source_prior_std``) scales that correction by the prior's posterior
    standard deviation (:func:`source_prior_posterior_std`, EDM's ``c_out``): the U-Net's own output
    then has unit scale at every noise level, and at low noise it can no longer add more than the
    noise that is left. Trained with ``loss_weighting: preconditioned`` it regresses a unit-variance
    target at every timestep, which is what a many-step sampler needs.

    A U-Net built with ``time_cond_proj_dim`` also receives the prompt as one vector
    (:func:`pooled_text`) in its timestep embedding.

    ``sampling`` holds the editor's own defaults for editing (any of :data:`SAMPLING_KEYS`, e.g.
    the guidance scales it was tuned with); ``infer edit`` and the pipeline use them unless told
    otherwise.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL | None
    unet: UNetMotionModel
    scheduler: SchedulerMixin
    source_prior_std: float | None = None
    preconditioned: bool = False
    sampling: dict[str, Any] | None = None

    denoiser_name = "unet"  # the denoiser's component name (the DiT editor's is "transformer")
    temporal_compression = 1  # one latent frame per frame
    size_multiple = 8  # frame sides are multiples of this

    # ---------------------------------------------------------------- properties
    @property
    def denoiser(self) -> UNetMotionModel:
        return self.unet

    @property
    def text_length(self) -> int:
        """Tokens per prompt in the text states."""
        return self.tokenizer.model_max_length

    @property
    def latent_channels(self) -> int:
        return self.unet.config.out_channels

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return 1.0 if self.vae is None else float(self.vae.config.scaling_factor)

    @property
    def resolution(self) -> int:
        """The frame size (short side, pixels) the U-Net was configured for."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def sampling_defaults(self) -> dict[str, Any]:
        """The editor's own edit settings (:data:`SAMPLING_KEYS`), over the pipeline's defaults."""
        return dict(self.sampling or {})

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"text_encoder": self.text_encoder, "unet": self.unet}
        if self.vae is not None:
            mods["vae"] = self.vae
        return mods

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Editor":
        for module in self.modules().values():
            module.to(device=device)
            if dtype is not None and module.dtype != dtype:  # diffusers warns on no-op casts
                module.to(dtype=dtype)
        return self

    # ---------------------------------------------------------------- computation
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """CLIP text states ``(B, seq, dim)`` for a list of prompts, padded to the model length
        (differentiable: wrap in ``torch.no_grad()`` when the encoder is frozen)."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids).last_hidden_state.to(self.dtype)

    def encode_distribution(self, video: torch.Tensor, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of frames ``(B, 3, F, H, W)`` in [-1, 1]: its mean and log-variance,
        each ``(B, c, F, h, w)``, **unscaled**, in float32. Frames are encoded ``chunk`` at a time
        to bound memory."""
        b, _, f, h, w = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w).to(self.vae.device, self.vae.dtype)
        means, logvars = [], []
        for part in frames.split(chunk):
            dist = self.vae.encode(part).latent_dist
            means.append(dist.mean.float())
            logvars.append(dist.logvar.float())

        def video_layout(parts: list[torch.Tensor]) -> torch.Tensor:
            flat = torch.cat(parts)
            return flat.reshape(b, f, *flat.shape[1:]).permute(0, 2, 1, 3, 4)

        return video_layout(means), video_layout(logvars)

    def encode_video(
        self,
        video: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        chunk: int = 16,
    ) -> torch.Tensor:
        """Latents ``(B, c, F, h, w)`` of frames ``(B, 3, F, H, W)`` in [-1, 1], **unscaled**.

        ``sample=True`` draws from the VAE posterior (:func:`posterior_sample`: the training
        target, to be multiplied by :attr:`scaling_factor`); ``False`` takes its mode (the source
        condition, InstructPix2Pix convention).
        """
        if self.vae is None:
            return video.to(self.dtype)
        mean, logvar = self.encode_distribution(video, chunk)
        return (posterior_sample(mean, logvar, generator) if sample else mean).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Frames ``(B, 3, F, H, W)`` in [-1, 1] from **scaled** latents ``(B, c, F, h, w)``."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w) / self.scaling_factor
        flat = flat.to(self.vae.device, self.vae.dtype)
        frames = torch.cat([self.vae.decode(part).sample for part in flat.split(chunk)])
        frames = frames.reshape(b, f, *frames.shape[1:]).permute(0, 2, 1, 3, 4)
        return frames.clamp(-1, 1)

    def predict(
        self,
        noisy: torch.Tensor,
        condition: torch.Tensor,
        text_states: torch.Tensor,
        timestep: torch.Tensor | int,
    ) -> torch.Tensor:
        """U-Net output for ``cat([z_t, c], channels)``; video tensors are ``(B, C, F, h, w)``.

        The U-Net runs in its own dtype; the output (and the source prior added to it) comes back
        in ``noisy``'s, so a sampler can keep float32 latents around a half-precision U-Net.

        ``text_states`` ``(B, seq, dim)`` are repeated per frame to ``(B*F, seq, dim)``, as the
        video U-Net attends to text frame by frame. ``timestep`` is one value per clip. With
        :attr:`source_prior_std` the output is ``source_prior_estimate(...) + U-Net(...)``.
        """
        frames = noisy.shape[2]
        dtype = self.unet.dtype  # the U-Net runs in its own precision; what follows in noisy's
        states = text_states.repeat_interleave(frames, dim=0).to(dtype)
        # a U-Net built with time_cond_proj_dim also takes the prompt as one vector in its time embedding
        pooled = pooled_text(text_states).to(dtype) if self.unet.config.get("time_cond_proj_dim") else None
        # without gradients, identity temporal layers (a 2D editor's zeroed ones) are left out: same output
        skipping = contextlib.nullcontext() if torch.is_grad_enabled() else skipping_identity_motion_modules(self.unet)
        with skipping:
            out = self.unet(torch.cat([noisy, condition.to(noisy.dtype)], dim=1).to(dtype), timestep,
                            encoder_hidden_states=states, timestep_cond=pooled).sample.to(noisy.dtype)
        condition = condition.to(noisy.dtype)
        if self.source_prior_std is not None:
            alpha_bar = self.alpha_bar(timestep, out)
            prior = source_prior_estimate(noisy, self.scaling_factor * condition, alpha_bar, self.source_prior_std)
            out = prior + self.output_scale(timestep, out) * out
        return out

    def alpha_bar(self, timestep: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``alpha_bar_t`` per clip, shaped ``(B, 1, 1, 1, 1)`` to broadcast over ``like``."""
        t = torch.as_tensor(timestep, device=self.scheduler.alphas_cumprod.device).long().reshape(-1)
        return self.scheduler.alphas_cumprod[t].to(like.device, like.dtype).reshape(-1, 1, 1, 1, 1)

    def output_scale(self, timestep: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """What the U-Net's raw output is multiplied by in :meth:`predict`: ``c_out`` when
        :attr:`preconditioned`, else 1 (per clip, broadcastable over ``like``)."""
        if not self.preconditioned or self.source_prior_std is None:
            return torch.ones((), device=like.device, dtype=like.dtype)
        return source_prior_posterior_std(self.alpha_bar(timestep, like), self.source_prior_std)

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write a diffusers pipeline folder (``DiffusionPipeline.from_pretrained`` loads it as an
        ``InsV2VPipeline``): ``model_index.json``, one sub-folder a component, safetensors
        weights; written whole or not at all (:func:`write_folder_staged`)."""
        write_folder_staged(directory, self._write_folder)

    def _write_folder(self, directory: Path) -> None:
        index = write_components(directory, {name: getattr(self, name) for name in COMPONENTS})
        index["source_prior_std"] = self.source_prior_std
        index["preconditioned"] = self.preconditioned
        index["sampling"] = self.sampling
        index["norm_layout"] = norm_layout_of(self.unet)
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        write_pipeline_module(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        vae_weights: bool = True) -> "Editor":
        """Load a folder written by :meth:`save_pretrained`; a missing or unreadable part is named.
        ``vae_weights=False`` builds the VAE from its config alone (:func:`vae_without_weights`)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise EditorLoadError(f"editor folder not found: {directory}")
        index_path = directory / INDEX_FILE
        if not index_path.is_file():
            raise EditorLoadError(f"{directory} is not an editor folder: missing {INDEX_FILE}")
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as err:
            raise EditorLoadError(f"{index_path} is not valid JSON: {err}") from None
        missing = [name for name in COMPONENTS if name not in index]
        if missing:
            raise EditorLoadError(f"{index_path} lists no {', '.join(missing)}")
        pixel_space = index["vae"] == [None, None]
        for name in COMPONENTS:
            if name == "vae" and pixel_space:
                continue
            require_files(directory / name, CONFIG_FILES[name], WEIGHT_FILES.get(name))
        unet_class = index["unet"][1]
        if unet_class != "UNetMotionModel":
            raise EditorLoadError(f"{index_path}: unet is {unet_class}, expected UNetMotionModel")
        layout = index.get("norm_layout", "diffusers")
        if layout not in NORM_LAYOUTS:
            raise EditorLoadError(f"{index_path}: norm_layout must be one of {', '.join(NORM_LAYOUTS)}, got {layout!r}")
        editor = cls(
            tokenizer=load_component("tokenizer", lambda: CLIPTokenizer.from_pretrained(directory / "tokenizer")),
            text_encoder=load_component(
                "text_encoder",
                lambda: CLIPTextModel.from_pretrained(directory / "text_encoder", use_safetensors=True, dtype=torch_dtype),
            ),
            vae=None if pixel_space else load_vae_folder(directory / "vae", torch_dtype, vae_weights),
            unet=load_component(
                "unet",
                lambda: UNetMotionModel.from_pretrained(directory / "unet", use_safetensors=True, torch_dtype=torch_dtype),
            ),
            scheduler=load_component("scheduler", lambda: scheduler_class(index["scheduler"][1]).from_pretrained(directory / "scheduler")),
            source_prior_std=index.get("source_prior_std"),
            preconditioned=bool(index.get("preconditioned", False)),
            sampling=check_sampling(index.get("sampling"), str(index_path)),
        )
        set_norm_layout(editor.unet, layout)
        return editor

    @classmethod
    def from_stable_diffusion(
        cls,
        base_model: str | os.PathLike,
        motion_adapter: str | os.PathLike | None = None,
        scheduler: str = "DDPMScheduler",
        torch_dtype: torch.dtype | None = None,
        min_temporal_positions: int = MIN_TEMPORAL_POSITIONS,
        norm_layout: str = "diffusers",
        vae_weights: bool = True,
    ) -> "Editor":
        """The paper's initialisation: a Stable Diffusion 1.5 or InstructPix2Pix folder, inflated.

        ``base_model`` is a diffusers pipeline folder (``tokenizer/``, ``text_encoder/``, ``vae/``,
        ``unet/``, ``scheduler/``); ``motion_adapter`` an optional AnimateDiff motion adapter: a
        diffusers ``MotionAdapter`` folder or an original-format file (``mm_sd_v15.ckpt``,
        ``.safetensors``). The base's noise schedule is kept, under the ``scheduler`` class named.
        ``norm_layout`` picks the GroupNorm layout (:data:`model.norm_layout.NORM_LAYOUTS`).
        """
        base = Path(base_model)
        if not base.is_dir():
            raise EditorLoadError(f"base model folder not found: {base}")
        for name in COMPONENTS:
            require_files(base / name, CONFIG_FILES[name], WEIGHT_FILES.get(name))
        adapter = None
        if motion_adapter is not None and Path(motion_adapter).suffix in ORIGINAL_CHECKPOINT_SUFFIXES:
            adapter = motion_adapter_from_original(motion_adapter, torch_dtype=torch_dtype)
        elif motion_adapter is not None:
            adapter_dir = Path(motion_adapter)
            require_files(adapter_dir, "config.json", "diffusion_pytorch_model.safetensors", what="motion adapter")
            adapter = load_component(
                "motion adapter",
                lambda: MotionAdapter.from_pretrained(adapter_dir, use_safetensors=True, torch_dtype=torch_dtype),
            )
        unet2d = load_component(
            "unet",
            lambda: UNet2DConditionModel.from_pretrained(base / "unet", use_safetensors=True, torch_dtype=torch_dtype),
        )
        schedule = load_component("scheduler", lambda: scheduler_class(scheduler).from_pretrained(base / "scheduler"))
        return cls(
            tokenizer=load_component("tokenizer", lambda: CLIPTokenizer.from_pretrained(base / "tokenizer")),
            text_encoder=load_component(
                "text_encoder",
                lambda: CLIPTextModel.from_pretrained(base / "text_encoder", use_safetensors=True, dtype=torch_dtype),
            ),
            vae=load_vae_folder(base / "vae", torch_dtype, vae_weights),
            unet=set_norm_layout(inflate(unet2d, adapter, min_temporal_positions=min_temporal_positions), norm_layout),
            scheduler=schedule,
        )

def posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw from the VAE's diagonal Gaussian posterior: ``z = mean + exp(logvar / 2) * n``,
    ``n ~ N(0, I)`` of ``mean``'s shape, with ``logvar`` clamped to [-30, 20] as the VAE does.
    The training target is drawn this way both from freshly encoded clips and from cached
    posteriors, so the two consume ``generator`` identically."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise

def pooled_text(text_states: torch.Tensor) -> torch.Tensor:
    """One vector per prompt, ``(B, seq, dim) -> (B, dim)``: the state at the last position.

    Prompts are right-padded to the model length and CLIP's text attention is causal, so the last
    position has attended to every token of the prompt (as in Imagen, the pooled prompt is added
    to the timestep embedding: a global path that needs no spatial attention to learn).
    """
    return text_states[:, -1]

def source_prior_estimate(noisy: torch.Tensor, source: torch.Tensor, alpha_bar: torch.Tensor, std: float) -> torch.Tensor:
    """The posterior mean of the clean clip under the prior ``x0 ~ N(source, std^2)``, given
    ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` (``a = alpha_bar``)::

        E[x0 | x_t] = source + c_skip (x_t - sqrt(a) source),  c_skip = sqrt(a) std^2 / (a std^2 + 1 - a)

    At high noise it is the source (an edit is a small change of it); at low noise it is ``x_t``.
    ``std = 0`` gives the source at every step.
    """
    c_skip = alpha_bar.sqrt() * std**2 / (alpha_bar * std**2 + 1 - alpha_bar)
    return source + c_skip * (noisy - alpha_bar.sqrt() * source)

SAMPLING_KEYS = ("num_inference_steps", "text_guidance", "video_guidance", "clip_frames", "reference_frames")
INTEGER_SAMPLING_KEYS = ("num_inference_steps", "clip_frames", "reference_frames")

def check_sampling(sampling: Mapping[str, Any] | None, where: str) -> dict[str, Any] | None:
    """An editor's sampling defaults, checked: only :data:`SAMPLING_KEYS`, positive numbers."""
    if sampling is None:
        return None
    if not isinstance(sampling, Mapping):
        raise EditorLoadError(f"{where}: sampling must be a mapping of {', '.join(SAMPLING_KEYS)}")
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise EditorLoadError(f"{where}: unknown sampling keys {sorted(unknown)}; known: {', '.join(SAMPLING_KEYS)}")
    for key, value in sampling.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise EditorLoadError(f"{where}: sampling.{key} must be a positive number, got {value!r}")
    return {k: (int(v) if k in INTEGER_SAMPLING_KEYS else float(v)) for k, v in sampling.items()}

def source_prior_posterior_std(alpha_bar: torch.Tensor, std: float) -> torch.Tensor:
    """The posterior standard deviation of the clean clip under the prior ``x0 ~ N(source, std^2)``
    given ``x_t`` (EDM's ``c_out`` for a Gaussian of scale ``std``)::

        sqrt(Var[x0 | x_t]) = std sqrt(1 - a) / sqrt(a std^2 + 1 - a)

    ``std`` at pure noise (``a = 0``), 0 at no noise (``a = 1``).
    """
    return std * (1 - alpha_bar).sqrt() / (alpha_bar * std**2 + 1 - alpha_bar).sqrt()

def scheduler_class(name: str) -> type[SchedulerMixin]:
    """A diffusers scheduler class by name (``"DDPMScheduler"``, ``"DDIMScheduler"``, ...)."""
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler"))
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(known)}")
    return cls

def load_vae_folder(folder: Path, torch_dtype: torch.dtype | None = None, weights: bool = True) -> AutoencoderKL:
    """A VAE folder's autoencoder; with ``weights=False`` only its config is read (:func:`vae_without_weights`)."""
    if not weights:
        return load_component("vae", lambda: vae_without_weights(AutoencoderKL.load_config(folder), torch_dtype))
    return load_component("vae", lambda: AutoencoderKL.from_pretrained(folder, use_safetensors=True, torch_dtype=torch_dtype))

def vae_without_weights(config: Mapping[str, Any], torch_dtype: torch.dtype | None = None) -> AutoencoderKL:
    """The autoencoder of ``config`` on the meta device: no memory and no weights read, only what its
    config says (scaling factor, channels, downsampling). Training on cached latents needs no more."""
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    return vae.to(dtype=torch_dtype) if torch_dtype not in (None, vae.dtype) else vae

def build_text_encoder(tokenizer: CLIPTokenizer, config: Mapping[str, Any]) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_position_embeddings=tokenizer.model_max_length,
            **config,
        )
    )
