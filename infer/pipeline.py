"""InsV2VPipeline: edit a video of any length clip by clip with two-scale guidance and LVSC."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
from diffusers import SchedulerMixin
import numpy as np
import torch
from tqdm.auto import tqdm

from model import Editor, load_editor, scheduler_class
from model.lora import add_lora, load_lora, merge_lora

from .flow import clip_flows
from .sampling import guidance_weights, lvsc_correct, lvsc_correct_warped, stream_clips, to_epsilon, from_epsilon


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


def editor_from_weights(spec: Any, lora: dict[str, Any] | None, weights: dict[str, torch.Tensor],
                        where: str = "checkpoint") -> Editor:
    """The editor a spec builds, with trained weights (``unet.*``, ``text_encoder.*``) loaded over it
    and, given a LoRA spec (rank, alpha, targets), the adapters they belong to (unmerged)."""
    editor = load_editor(spec)
    if lora:
        add_lora(editor.unet, lora["rank"], lora["alpha"], tuple(lora["targets"]))
    for prefix, module in (("unet.", editor.unet), ("text_encoder.", editor.text_encoder)):
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
    on a tiny tensor: a scheduler that cannot take the editor's prediction type, or the sampler's
    seeded ``step``, fails here with one ValueError, not in the middle of an edit."""
    cls = scheduler_class(name)
    probe = cls.from_config(current.config)
    try:
        probe.set_timesteps(2)
        x = torch.zeros(1, 1, 1, 1)
        probe.step(x, probe.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    except Exception as err:  # diffusers raises NotImplementedError, ValueError or TypeError here
        kind = current.config.get("prediction_type", "epsilon")
        raise ValueError(f"scheduler {name} cannot sample this editor ({kind} prediction): "
                         f"{type(err).__name__}: {err}") from None
    return cls.from_config(current.config)  # a fresh one: the trial step moved the probe's state


class InsV2VPipeline:
    """An editor plus a sampling scheduler; call it on frames with an instruction."""

    def __init__(self, editor: Editor, scheduler: str | None = None):
        self.editor = editor
        self.scheduler = sampling_scheduler(scheduler or type(editor.scheduler).__name__, editor.scheduler)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, scheduler: str | None = None, torch_dtype=None) -> "InsV2VPipeline":
        """Load an editor folder (or any spec :func:`model.load_editor` takes)."""
        return cls(load_editor(path, torch_dtype=torch_dtype), scheduler=scheduler)

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
        if lora:
            merge_lora(editor.unet)  # sampling then costs what the base U-Net costs
        return cls(editor, scheduler=scheduler)

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> "InsV2VPipeline":
        """Apply a LoRA adapter (diffusers' LoRA safetensors, as ``export_lora_only`` writes it) to
        this editor's U-Net at ``scale``."""
        load_lora(self.editor.unet, path, scale)
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

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        replace(self.editor, scheduler=self.scheduler).save_pretrained(directory)

    def set_scheduler(self, name: str) -> None:
        """Sample with another diffusers scheduler (same noise schedule)."""
        self.scheduler = sampling_scheduler(name, self.scheduler)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "InsV2VPipeline":
        """Move to ``device``; run the text encoder and U-Net in ``dtype`` (the VAE stays float32,
        whose half-precision decode overflows)."""
        self.editor.to(device=device)
        if dtype is not None:
            for module in (self.editor.text_encoder, self.editor.unet):
                if module.dtype != dtype:
                    module.to(dtype=dtype)
        return self

    # ---------------------------------------------------------------- editing
    def settings(self, prompt: str, **options) -> EditSettings:
        """The settings of one edit: :class:`EditSettings`' defaults, overridden by the editor's own
        sampling defaults (``editor.sampling``), overridden by every option given that is not ``None``."""
        given = {k: v for k, v in options.items() if v is not None}
        return EditSettings(prompt=prompt, **{**(self.editor.sampling or {}), **given})

    def __call__(
        self,
        video: np.ndarray | Iterable[np.ndarray],
        prompt: str,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        text_guidance: float | None = None,
        video_guidance: float | None = None,
        clip_frames: int = 16,
        reference_frames: int = 4,
        lvsc: float = 0.5,
        motion_compensation: bool = False,
        generator: torch.Generator | None = None,
        progress: bool = True,
        resolution: int | None = None,
        **options,
    ) -> EditOutput:
        """Edit ``video`` (uint8 ``(F, H, W, 3)`` or an iterable of frames) by ``prompt``.

        Steps and guidance scales left ``None`` take the editor's defaults (:meth:`settings`).
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
        frames = list(self.edit_stream(video, settings, generator=generator, progress=progress))
        return EditOutput(frames=np.stack(frames))

    @torch.no_grad()
    def edit_stream(
        self,
        frames: Iterable[np.ndarray],
        settings: EditSettings,
        generator: torch.Generator | None = None,
        progress: bool = True,
        total_frames: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield edited uint8 frames while reading source frames, one clip at a time.

        Memory holds one clip (frames, latents, noise), whatever the video's length.
        """
        settings.validate()
        ed = self.editor
        device = ed.device
        text_states = ed.encode_text([settings.negative_prompt or "", settings.prompt])
        prev = None  # (latents, noise, source frames) of the previous clip
        size = None
        bar = tqdm(total=total_frames, unit="frame", desc="editing", disable=not progress)
        for clip, window in stream_clips(frames, settings.clip_frames, settings.reference_frames):
            if size is None:
                h, w = window[0].shape[:2]
                size = working_size(h, w, settings.resolution or None, multiple=8)
            source = to_model_frames(window, *size).to(device)
            # latents, noise, flows and LVSC stay float32 whatever the U-Net's precision
            condition = ed.encode_video(source).float()
            refs = clip.num_reference
            new = len(window) - refs
            noise_new = torch.randn(
                (1, condition.shape[1], new, *condition.shape[-2:]),
                generator=generator,
                device=generator.device if generator is not None else device,
                dtype=torch.float32,
            ).to(device)
            if refs:
                noise = torch.cat([prev[1][:, :, -refs:], noise_new], dim=2)
                z_ref = prev[0][:, :, -refs:]
                flows = None
                if settings.motion_compensation and settings.lvsc > 0:
                    small = [cv2.resize(f, (size[1], size[0]), interpolation=cv2.INTER_AREA) for f in window]
                    flows = clip_flows(np.stack(small), refs, *condition.shape[-2:], method=settings.flow_method)
                    flows = flows.to(device)
            else:
                noise, z_ref, flows = noise_new, None, None
            latents = self.denoise(condition, text_states, noise, settings, z_ref, flows, generator, progress)
            edited = ed.decode_latents(latents[:, :, refs:])
            for frame in to_uint8_frames(edited):
                yield frame
            bar.update(new)
            prev = (latents, noise, window)
        bar.close()

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
    ) -> torch.Tensor:
        """Sample one clip's clean (scaled) latents from ``noise`` given the source latents.

        Each step makes the guidance predictions (no video/no text, video/no text, video/text)
        that :func:`guidance_weights` weighs, and while ``i < lvsc * steps`` on a clip with
        references applies LVSC.
        """
        ed, sch = self.editor, self.scheduler
        sch.set_timesteps(settings.num_inference_steps, device=condition.device)
        prediction_type = sch.config.prediction_type
        alphas = sch.alphas_cumprod.to(condition.device)
        uncond, cond = text_states[:1], text_states[1:]
        zero = torch.zeros_like(condition)
        z = noise * sch.init_noise_sigma
        correct_until = settings.lvsc * len(sch.timesteps) if z_ref is not None else 0
        # only the predictions guidance weighs (at video guidance 1 the unconditional one has weight 0)
        weighted = [(w, c, s) for w, c, s in zip(guidance_weights(settings.text_guidance, settings.video_guidance),
                                                  (zero, condition, condition), (uncond, uncond, cond)) if w]
        if settings.batched_guidance:  # one U-Net batch a step: its conditions are the same at every step
            conditions, texts = torch.cat([c for _, c, _ in weighted]), torch.cat([s for _, _, s in weighted])
        steps = tqdm(sch.timesteps, desc="steps", leave=False, disable=not progress)
        for i, t in enumerate(steps):
            z_in = sch.scale_model_input(z, t)
            if settings.batched_guidance:
                outs = ed.predict(torch.cat([z_in] * len(weighted)), conditions, texts, t).chunk(len(weighted))
            else:
                outs = [ed.predict(z_in, c, s, t) for _, c, s in weighted]
            output = sum(w * o for (w, _, _), o in zip(weighted, outs))
            if i < correct_until:
                a = alphas[int(t)]
                eps = to_epsilon(output, z_in, a, prediction_type)
                if flows is not None:
                    eps = lvsc_correct_warped(eps, z_in, z_ref, a, flows)
                else:
                    eps = lvsc_correct(eps, z_in, z_ref, a)
                output = from_epsilon(eps, z_in, a, prediction_type)
            z = sch.step(output, t, z, generator=generator).prev_sample
        return z
