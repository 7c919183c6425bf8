"""InsV2VPipeline: edit a video of any length clip by clip with two-scale guidance and LVSC."""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import cv2
import numpy as np
import torch
from diffusers import DiffusionPipeline, SchedulerMixin
from tqdm.auto import tqdm

from model import Editor, WanEditor, load_editor, norm_layout_of, pretrained_folder, scheduler_class, set_norm_layout
from model.editor import INDEX_FILE, PIPELINE_CLASS, check_sampling, write_folder_staged, write_pipeline_module
from model.lora import add_lora, load_lora, merge_lora
from model.wan_editor import cast_keeping_float32
from model.weights import own_memory

from .flow import clip_flows
from .sampling import (
    denoise_clip,
    fitting_reference_frames,
    flow_scheduler,
    flow_shift_of,
    is_flow_scheduler,
    latent_count,
    scheduler_step,
    stream_clips,
)


# The entry a training checkpoint keeps its editor spec (and EMA weights) under.
CHECKPOINT_KEY = "insv2v"


@dataclass
class EditOutput:
    frames: np.ndarray  # uint8 (F, H, W, 3)


@dataclass(frozen=True)
class EditSettings:
    """Everything that shapes one edit besides the video and the model."""

    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int = 20
    text_guidance: float = 7.5
    video_guidance: float = 1.2
    clip_frames: int = 16
    reference_frames: int = 4
    lvsc: float = 0.5
    motion_compensation: bool = False
    flow_method: str = "dis"
    resolution: int | None = None
    batched_guidance: bool = True

    def validate(self) -> None:
        if not self.prompt or not self.prompt.strip():
            raise ValueError("the prompt is empty")
        positive = {
            "num_inference_steps": self.num_inference_steps,
            "clip_frames": self.clip_frames,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.resolution is not None and self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if self.reference_frames < 0:
            raise ValueError(f"reference_frames must be >= 0, got {self.reference_frames}")
        if self.clip_frames <= self.reference_frames:
            raise ValueError(
                f"clip_frames ({self.clip_frames}) must be larger than reference_frames ({self.reference_frames})"
            )
        if not 0.0 <= self.lvsc <= 1.0:
            raise ValueError(f"lvsc must be in [0, 1], got {self.lvsc}")


def working_size(height: int, width: int, resolution: int | None, multiple: int = 8) -> tuple[int, int]:
    """Frame size for editing: short side ``resolution`` (default: as is), both sides rounded to
    ``multiple``, aspect kept."""
    short = min(height, width)
    target = short if resolution is None else resolution
    scale = target / short
    return (
        max(multiple, int(round(height * scale / multiple)) * multiple),
        max(multiple, int(round(width * scale / multiple)) * multiple),
    )


# The largest working frame the commands and the page edit at (a 16:9 frame of about 1920x1080):
# the size is chosen by the short side, so a thin video would otherwise become an enormous frame.
MAX_WORKING_PIXELS = 1920 * 1088
MAX_WORKING_SIDE = 4096


def check_working_size(height: int, width: int, max_pixels: int = MAX_WORKING_PIXELS,
                       max_side: int = MAX_WORKING_SIDE) -> None:
    """Refuse a working frame over ``max_pixels`` or with a side over ``max_side``: one line that says why."""
    if height * width > max_pixels or max(height, width) > max_side:
        raise ValueError(f"the working frame would be {width}x{height} ({width * height:,} pixels); the limit is "
                         f"{max_pixels:,} pixels and {max_side} on the long side: choose a lower resolution")


def to_model_frames(frames, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` frames -> float ``(1, 3, F, height, width)`` in [-1, 1] (default: their size)."""
    height, width = height or frames[0].shape[0], width or frames[0].shape[1]
    resized = [
        f if f.shape[:2] == (height, width) else cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA)
        for f in frames
    ]
    video = torch.from_numpy(np.stack(resized)).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    return video.unsqueeze(0)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """float ``(1, 3, F, H, W)`` in [-1, 1] -> uint8 ``(F, H, W, 3)``."""
    return ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def clip_noise(latents: torch.Tensor, start: int, shape: torch.Size) -> torch.Tensor:
    """A clip's slice ``latents[:, :, start : start + f]`` of a whole video's initial noise, checked
    against the clip's latent shape ``shape`` (one clip of ``(1, c, f, h, w)``)."""
    if latents.dim() != 5 or latents.shape[1] != shape[1] or latents.shape[-2:] != shape[-2:] or \
            latents.shape[2] < start + shape[2]:
        raise ValueError(f"latents must be (1, {shape[1]}, F, {shape[3]}, {shape[4]}) with F covering the video's "
                         f"latent frames (at least {start + shape[2]}), got {tuple(latents.shape)}")
    return latents[:, :, start: start + shape[2]]


def editor_from_weights(spec: Any, lora: dict[str, Any] | None, weights: dict[str, torch.Tensor],
                        where: str = "checkpoint") -> Editor:
    """The editor a spec builds, with trained weights (``unet.*``, ``text_encoder.*``) loaded over it
    and, given a LoRA spec (rank, alpha, targets), the adapters they belong to (unmerged)."""
    editor = load_editor(spec)
    if lora:
        add_lora(editor.denoiser, lora["rank"], lora["alpha"], tuple(lora["targets"]))
    for prefix, module in ((f"{editor.denoiser_name}.", editor.denoiser), ("text_encoder.", editor.text_encoder)):
        part = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        shapes = module.state_dict()
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(shapes[k].shape)}" for k, v in part.items()
                 if k in shapes and v.shape != shapes[k].shape]
        if wrong:  # e.g. a tiny vocabulary that has grown since the checkpoint was written
            raise ValueError(f"{where}: {prefix[:-1]} weights do not fit the editor its spec builds "
                             f"(checkpoint vs built: {wrong[0]}); export editors with save_pretrained to keep them")
        _, unexpected = module.load_state_dict(part, strict=False)
        if unexpected:
            raise ValueError(f"{where}: weights for unknown {prefix[:-1]} parameters, e.g. {unexpected[:3]}")
    return editor


def sampling_scheduler(name: str, current: SchedulerMixin) -> SchedulerMixin:
    """Scheduler ``name`` on ``current``'s noise schedule and prediction type, after one trial step
    on a tiny tensor: a scheduler that cannot take the editor's prediction type, or that samples
    the other objective (flow matching against noise prediction), fails here with one ValueError,
    not in the middle of an edit."""
    cls = scheduler_class(name)
    config = dict(current.config)
    takes = inspect.signature(cls.__init__).parameters
    flow_mode = "use_flow_sigmas" in takes
    if is_flow_scheduler(current):
        # the same time shift under the name the class takes: Euler's `shift`, a multistep one's `flow_shift`
        config.update({key: flow_shift_of(current) for key in ("shift", "flow_shift") if key in takes})
    if is_flow_scheduler(current) and flow_mode:
        # a multistep scheduler (UniPC, DPM-Solver) in flow mode, on the editor's time shift
        config.update(use_flow_sigmas=True, prediction_type="flow_prediction")
    if is_flow_scheduler(current) != (cls.__name__.startswith("FlowMatch") or (flow_mode and is_flow_scheduler(current))):
        trained = "flow matching (velocity)" if is_flow_scheduler(current) else "noise prediction (DDPM)"
        raise ValueError(f"scheduler {name} cannot sample this editor: it was trained for {trained}")
    try:
        probe = cls.from_config(config)
        probe.set_timesteps(2)
        x = torch.zeros(1, 1, 1, 1)
        scheduler_step(probe, x, probe.timesteps[0], x, torch.Generator().manual_seed(0))
    except Exception as err:  # diffusers raises NotImplementedError, ValueError or TypeError here
        kind = "flow" if is_flow_scheduler(current) else current.config.get("prediction_type", "epsilon")
        raise ValueError(f"scheduler {name} cannot sample this editor ({kind} prediction): "
                         f"{type(err).__name__}: {err}") from None
    return cls.from_config(config)  # a fresh one: the trial step moved the probe's state


class InsV2VPipeline(DiffusionPipeline):
    """An editor as a diffusers pipeline: call it on frames with an instruction.

    Its components are an editor's: a U-Net editor's (tokenizer, CLIP text encoder, VAE or none
    for pixel space, video U-Net) or a DiT editor's (UMT5, causal Wan VAE, ``transformer``,
    :class:`model.WanEditor`), and the scheduler it samples with; its config the editor's own settings
    (``source_prior_std``, ``preconditioned``, ``sampling`` defaults, ``norm_layout``). So it saves
    and loads through diffusers (``save_pretrained``; ``DiffusionPipeline.from_pretrained(folder)``
    returns one) and has diffusers' pipeline features: ``enable_model_cpu_offload``,
    ``set_progress_bar_config``, ``callback_on_step_end``. ``editor`` is the same components as an
    :class:`model.Editor` (what training and the sampling math use).
    """

    model_cpu_offload_seq = "text_encoder->unet->transformer->vae"
    _optional_components = ["vae", "unet", "transformer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, tokenizer, text_encoder, vae, scheduler, unet=None, transformer=None,
                 source_prior_std: float | None = None, preconditioned: bool = False,
                 sampling: dict[str, Any] | None = None, norm_layout: str = "diffusers", max_sequence_length: int = 512,
                 expand_timesteps: bool = False, resolution: int = 480):
        super().__init__()
        # diffusers hands an absent optional component over as its index entry, [null, null]
        unet, transformer = (None if isinstance(m, (list, tuple)) else m for m in (unet, transformer))
        if (unet is None) == (transformer is None):
            raise ValueError("an editor pipeline has a unet or a transformer, not both or neither")
        if unet is not None:
            set_norm_layout(unet, norm_layout)  # a loaded U-Net is in diffusers' layout until told otherwise
        for module in (text_encoder, vae, unet, transformer):
            if module is not None:
                own_memory(module)  # out of the weights file's mapping: aligned, and the file stays rewritable
        sampling = check_sampling(sampling, "pipeline sampling")
        if transformer is not None:
            editor = WanEditor(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler, max_sequence_length=max_sequence_length,
                               expand_timesteps=expand_timesteps, sampling=sampling, resolution=resolution)
        else:
            editor = Editor(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler,
                            source_prior_std=source_prior_std, preconditioned=bool(preconditioned), sampling=sampling)
        self._register_editor(editor, scheduler)

    def _register_editor(self, editor: Editor | WanEditor, scheduler: SchedulerMixin) -> None:
        """The editor's modules and settings as this pipeline's components and config."""
        denoiser = {"unet": None, "transformer": None, editor.denoiser_name: editor.denoiser}
        self.register_modules(tokenizer=editor.tokenizer, text_encoder=editor.text_encoder, vae=editor.vae,
                              scheduler=scheduler, **denoiser)
        if isinstance(editor, WanEditor):
            self.register_to_config(sampling=editor.sampling, max_sequence_length=editor.max_sequence_length,
                                    expand_timesteps=editor.expand_timesteps, resolution=editor.resolution)
        else:
            self.register_to_config(source_prior_std=editor.source_prior_std, preconditioned=editor.preconditioned,
                                    sampling=editor.sampling, norm_layout=norm_layout_of(editor.unet))
        self.editor = editor
        self.scheduler = sampling_scheduler(type(scheduler).__name__, scheduler)  # checked: it can sample this editor

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_editor(cls, editor: Editor, scheduler: str | None = None) -> "InsV2VPipeline":
        """A pipeline over ``editor``'s own modules (shared, not copied), sampling with ``scheduler``
        (a diffusers scheduler class name; default: the editor's own)."""
        pipe = cls.__new__(cls)
        DiffusionPipeline.__init__(pipe)
        pipe._register_editor(editor, sampling_scheduler(scheduler or type(editor.scheduler).__name__, editor.scheduler))
        return pipe

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, scheduler: str | None = None, torch_dtype=None,
                        **kwargs) -> "InsV2VPipeline":
        """An editor folder (today's, or one written before editors were diffusers pipelines), or
        any spec :func:`model.load_editor` takes (``tiny``, a model YAML); a missing or unreadable
        part is one ``EditorLoadError`` line."""
        if kwargs:
            raise TypeError(f"InsV2VPipeline.from_pretrained takes no {', '.join(kwargs)}; "
                            "DiffusionPipeline.from_pretrained(folder, ...) loads through diffusers")
        return cls.from_editor(load_editor(path, torch_dtype=torch_dtype), scheduler=scheduler)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, scheduler: str | None = None, use_ema: bool = True
    ) -> "InsV2VPipeline":
        """Rebuild the editor a training checkpoint (``lightning fit``) describes and load its weights.

        The checkpoint holds the editor spec (base folder or tiny config) and only the trained
        weights (``unet.*``, ``text_encoder.*``; EMA ones when present and ``use_ema``); the frozen
        rest comes from the base.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            detail = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(f"cannot read checkpoint {path}: not a PyTorch checkpoint ({type(err).__name__}: {detail})") from None
        meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
        if not isinstance(meta, dict) or "editor" not in meta:
            raise ValueError(f"{path} is not an editor training checkpoint (no '{CHECKPOINT_KEY}' entry)")
        weights = dict(checkpoint.get("state_dict", {}))
        if use_ema and meta.get("ema"):
            weights.update(meta["ema"])
        lora = meta.get("lora")
        editor = editor_from_weights(meta["editor"], lora, weights, where=str(path))
        objective = meta.get("objective") or {}
        if objective.get("kind") == "flow":  # trained for velocities: a folder's own flow sampler, else flow Euler
            editor.scheduler = flow_scheduler(editor.scheduler, objective.get("flow_shift", 1.0),
                                              keep_own=pretrained_folder(meta["editor"]) is not None)
        if lora:
            merge_lora(editor.denoiser)  # sampling then costs what the base network costs
        return cls.from_editor(editor, scheduler=scheduler)

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> "InsV2VPipeline":
        """Apply a LoRA adapter (diffusers' LoRA safetensors, as ``export_lora_only`` writes it) to
        this editor's U-Net at ``scale``."""
        load_lora(self.editor.denoiser, path, scale, prefix=self.editor.denoiser_name)
        return self

    @classmethod
    def load(cls, model: str | os.PathLike | None, scheduler: str | None = None) -> "InsV2VPipeline":
        """What the commands' ``--model`` names: a training checkpoint (``.ckpt``), an editor
        folder, or ``None`` for the embedded tiny editor (random weights)."""
        if model is None:
            return cls.from_pretrained("tiny", scheduler=scheduler)
        if str(model).endswith(".ckpt"):
            return cls.from_checkpoint(model, scheduler=scheduler)
        return cls.from_pretrained(model, scheduler=scheduler)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the pipeline through diffusers (safetensors), whole or not at all: the folder
        ``DiffusionPipeline.from_pretrained`` and ``InsV2VPipeline.from_pretrained`` load."""
        if isinstance(self.editor, WanEditor):
            from dataclasses import replace

            replace(self.editor, scheduler=self.scheduler).save_pretrained(save_directory)
            return

        def write(folder: Path) -> None:
            DiffusionPipeline.save_pretrained(self, folder, safe_serialization=True, **kwargs)
            index_path = folder / INDEX_FILE
            index = json.loads(index_path.read_text())
            index["_class_name"] = list(PIPELINE_CLASS)  # where diffusers finds this class
            index_path.write_text(json.dumps(index, indent=2) + "\n")
            write_pipeline_module(folder)

        write_folder_staged(save_directory, write)

    def set_scheduler(self, name: str) -> None:
        """Sample with another diffusers scheduler (same noise schedule)."""
        self.scheduler = sampling_scheduler(name, self.scheduler)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **kwargs) -> "InsV2VPipeline":
        """Move to ``device``; run the text encoder and U-Net in ``dtype`` (the VAE stays float32,
        whose half-precision decode overflows)."""
        if device is not None:
            super().to(device, **kwargs)
        if dtype is not None:
            for module in (self.text_encoder, self.editor.denoiser):
                cast_keeping_float32(module, dtype)
        return self

    # ---------------------------------------------------------------- editing
    def settings(self, prompt: str, **options) -> EditSettings:
        """The settings of one edit: :class:`EditSettings`' defaults, overridden by the editor's own
        sampling defaults (``editor.sampling``), overridden by every option given that is not ``None``.
        A clip length given without a reference count takes the default count made legal for it
        (:func:`infer.sampling.fitting_reference_frames`); a pair given explicitly is kept as it is."""
        given = {k: v for k, v in options.items() if v is not None}
        merged = {**self.editor.sampling_defaults(), **given}
        if "clip_frames" in given and "reference_frames" not in given:
            preferred = merged.get("reference_frames", EditSettings.reference_frames)
            merged["reference_frames"] = fitting_reference_frames(given["clip_frames"], preferred,
                                                                  self.editor.temporal_compression)
        return EditSettings(prompt=prompt, **merged)

    def __call__(
        self,
        video: np.ndarray | Iterable[np.ndarray],
        prompt: str,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        text_guidance: float | None = None,
        video_guidance: float | None = None,
        clip_frames: int | None = None,
        reference_frames: int | None = None,
        lvsc: float = 0.5,
        motion_compensation: bool = False,
        generator: torch.Generator | None = None,
        progress: bool = True,
        resolution: int | None = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        **options,
    ) -> EditOutput:
        """Edit ``video`` (uint8 ``(F, H, W, 3)`` or an iterable of frames) by ``prompt``.

        Steps, guidance scales and clip lengths left ``None`` take the editor's defaults
        (:meth:`settings`). ``latents`` is the initial noise of the whole video, ``(1, c, f, h, w)``
        with ``f`` its latent frames (a causal VAE's: ``1 + ceil((F - 1) / T)``); each clip takes
        its slice, so references share their noise with the clip before, as drawn noise does.
        ``callback_on_step_end(pipe, step, timestep, {"latents": z})`` runs after every denoising
        step of every clip (diffusers' convention); the ``latents`` it returns, if any, replace them.
        """
        settings = self.settings(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            text_guidance=text_guidance,
            video_guidance=video_guidance,
            clip_frames=clip_frames,
            reference_frames=reference_frames,
            lvsc=lvsc,
            motion_compensation=motion_compensation,
            resolution=resolution,
            **options,
        )
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got {sorted(unknown)}")
        frames = list(self.edit_stream(video, settings, generator=generator, progress=progress,
                                       callback_on_step_end=callback_on_step_end, latents=latents))
        return EditOutput(frames=np.stack(frames))

    @torch.no_grad()
    def edit_stream(
        self,
        frames: Iterable[np.ndarray],
        settings: EditSettings,
        generator: torch.Generator | None = None,
        progress: bool = True,
        total_frames: int | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        latents: torch.Tensor | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield edited uint8 frames while reading source frames, one clip at a time.

        Memory holds one clip (frames, latents, noise), whatever the video's length. A clip's
        reference latent frames (:func:`infer.sampling.stream_clips`) are the previous clip's
        latents for the frames both hold; under a causal VAE the clip's first latent frame holds
        its first frame alone, and its reference is that frame of the previous clip's edit,
        encoded alone (:meth:`_anchor_latent`). Motion compensation estimates flow between the
        last frames of the latent frames.
        """
        settings.validate()
        ed = self.editor
        temporal = ed.temporal_compression
        device = self._execution_device
        text_states = ed.encode_text([settings.negative_prompt or "", settings.prompt])
        prev = None  # (clip, latents, noise, decoded frames) of the previous clip
        size = None
        bar = self._bar(progress, total=total_frames, unit="frame", desc="editing")
        for clip, window in stream_clips(frames, settings.clip_frames, settings.reference_frames, temporal):
            if size is None:
                h, w = window[0].shape[:2]
                size = working_size(h, w, settings.resolution or None, multiple=ed.size_multiple)
            source = to_model_frames(window, *size).to(device)
            # latents, noise, flows and LVSC stay float32 whatever the denoiser's precision
            condition = ed.encode_video(source).float()
            refs = latent_count(clip.num_reference, temporal)
            new = condition.shape[2] - refs
            if latents is not None:
                noise = clip_noise(latents, clip.start // temporal, condition.shape).to(device, torch.float32)
            else:
                noise = torch.randn((1, condition.shape[1], new, *condition.shape[-2:]), generator=generator,
                                    device=generator.device if generator is not None else device,
                                    dtype=torch.float32).to(device)
                if refs:
                    noise = torch.cat([prev[2][:, :, -refs:], noise], dim=2)
            z_ref, flows = None, None
            if refs:
                z_ref = prev[1][:, :, -refs:]
                if temporal > 1:  # the first latent frame holds one frame: the previous edit of it, encoded alone
                    z_ref = torch.cat([self._anchor_latent(prev, clip), prev[1][:, :, prev[1].shape[2] - refs + 1:]], 2)
                if settings.motion_compensation and settings.lvsc > 0:
                    small = [cv2.resize(f, (size[1], size[0]), interpolation=cv2.INTER_AREA) for f in window]
                    small = small[::temporal]  # the last frame of each latent frame (every frame when T = 1)
                    flows = clip_flows(np.stack(small), refs, *condition.shape[-2:], method=settings.flow_method)
                    flows = flows.to(device)
            clean = self.denoise(condition, text_states, noise, settings, z_ref, flows, generator, progress,
                                 callback_on_step_end)
            if temporal == 1:  # frame by frame: only the new latent frames are decoded
                edited = ed.decode_latents(clean[:, :, refs:])
            else:  # the causal decoder reads a clip whole
                decoded = ed.decode_latents(clean)
                edited = decoded[:, :, clip.num_reference: decoded.shape[2] - clip.padding]
            for frame in to_uint8_frames(edited):
                yield frame
            bar.update(len(clip) - clip.num_reference)
            prev = (clip, clean, noise, decoded if temporal > 1 else None)
        bar.close()

    def _anchor_latent(self, prev: tuple, clip) -> torch.Tensor:
        """The latent of a causal clip's first frame as the previous clip edited it, encoded alone
        (a causal VAE's first latent frame is one frame's)."""
        prev_clip, _, _, decoded = prev
        frame = decoded[:, :, clip.start - prev_clip.start: clip.start - prev_clip.start + 1]
        return self.editor.encode_video(frame).float()

    def denoise(
        self,
        condition: torch.Tensor,
        text_states: torch.Tensor,
        noise: torch.Tensor,
        settings: EditSettings,
        z_ref: torch.Tensor | None = None,
        flows: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """One clip's clean (scaled) latents from ``noise``: :func:`infer.sampling.denoise_clip`
        with this pipeline's editor and scheduler."""
        on_step_end = None if callback_on_step_end is None else partial(self._step_end, callback_on_step_end)
        return denoise_clip(
            self.editor.predict, self.scheduler, condition, text_states, noise, settings.text_guidance,
            settings.video_guidance, settings.num_inference_steps, lvsc=settings.lvsc, z_ref=z_ref, flows=flows,
            generator=generator, batched_guidance=settings.batched_guidance, on_step_end=on_step_end,
            steps=lambda timesteps: self._bar(progress, timesteps, desc="steps", leave=False),
        )

    def _step_end(self, callback: Callable[..., dict[str, Any]], i: int, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """diffusers' step callback: ``callback(pipe, step, timestep, {"latents": z})``; latents it returns replace ``z``."""
        returned = callback(self, i, t, {"latents": z}) or {}
        return returned.get("latents", z)

    def _bar(self, progress: bool, iterable=None, **options):
        """A progress bar that ``set_progress_bar_config`` configures, off when ``progress`` is False."""
        config = {**options, **getattr(self, "_progress_bar_config", {})}
        if not progress:
            config["disable"] = True
        return tqdm(iterable, **config)
