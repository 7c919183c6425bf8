"""Pairs from a Wan text-to-video DiT: Prompt-to-Prompt control of its attention, and FlowEdit of real clips.

A render batch is ``[uncond_src, uncond_tgt, cond_src, cond_tgt]`` (batch-major, as the U-Net
renderer lays it out), sampled together by flow matching from one noise with the model's own
scheduler. While active, the edited branch's self-attention reads the source branch's keys and
values (DiTCtrl's sharing in a DiT's full attention), and its cross-attention maps to the UMT5
tokens are the source's, mapped token to token (:func:`synth.p2p.align_tokens`), edited tokens
re-weighted.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from infer.pipeline import to_model_frames, to_uint8_frames
from model import shipped_config
from model.wan_editor import WanEditor, build_wan_editor, clean_prompt

from .p2p import P2PControl, align_tokens
from .render import PairParams


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary position embedding on ``(B, L, H, D)``: each pair ``(x1, x2)`` of channels turned
    by its angle, ``(x1 cos - x2 sin, x1 sin + x2 cos)``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def shared_source_kv(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DiTCtrl's key-value sharing: the edited branches (blocks 1 and 3 of the four) take the
    source branches' (0 and 2) keys and values, so that

        Attn(Q_tgt, K_src, V_src) = softmax(Q_tgt K_src^T / sqrt(d)) V_src

    keeps the source's layout and motion while the edited queries still select what they need."""
    k, v = (t.view(4, t.shape[0] // 4, *t.shape[1:]).clone() for t in (key, value))
    k[1], k[3], v[1], v[3] = k[0], k[2], v[0], v[2]
    return k.flatten(0, 1), v.flatten(0, 1)


def mapped_cross_attention(probs: torch.Tensor, token_map: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """Prompt-to-Prompt's cross-attention edit on the four blocks of ``probs`` ``(4n, H, Lq, S)``:
    the conditional target's map to token ``j`` is the conditional source's map to ``M(j)`` (its
    own where ``M(j) = -1``, a new word), times ``w_j`` (``edit_weight`` on edited tokens, else 1),

        A_tgt[..., j] = w_j * (A_src[..., M(j)] if M(j) >= 0 else A_tgt[..., j])."""
    blocks = probs.view(4, probs.shape[0] // 4, *probs.shape[1:]).clone()
    mapping = token_map.to(probs.device)
    source = blocks[2][..., mapping.clamp(min=0)]
    blocks[3] = torch.where(mapping >= 0, source, blocks[3]) * token_weights.to(probs.device, probs.dtype)
    return blocks.flatten(0, 1)


class WanP2PAttnProcessor(WanAttnProcessor):
    """Wan attention with Prompt-to-Prompt control of the edited branch (see the module's docstring);
    outside the control's steps, or on a batch that is not four blocks, it is Wan's own attention."""

    def __init__(self, control: P2PControl):
        super().__init__()
        self.control = control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        control = self.control
        is_cross = encoder_hidden_states is not None
        active = control.cross_active if is_cross else control.self_active
        if attn.add_k_proj is not None or not active or hidden_states.shape[0] % 4:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, L, D)
        if not is_cross:
            key, value = shared_source_kv(key, value)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
            control.self_controlled += 1
        else:
            # float32 scores: half-precision logits lose the small differences the re-weighting acts on
            scores = query.float() @ key.float().transpose(-1, -2) / query.shape[-1] ** 0.5
            probs = mapped_cross_attention(scores.softmax(dim=-1), control.token_map, control.token_weights)
            out = (probs @ value.float()).to(value.dtype)
            control.cross_controlled += 1
        hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def set_processors(transformer: torch.nn.Module, control: P2PControl | None) -> None:
    """Every block's self- and cross-attention under ``control``, or Wan's own processor."""
    for block in transformer.blocks:
        for attn in (block.attn1, block.attn2):
            attn.set_processor(WanP2PAttnProcessor(control) if control is not None else WanAttnProcessor())


def flow_edit(x_source: torch.Tensor, velocity: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor],
              sigmas: list[float], timesteps: list[float], n_max: int, n_min: int = 0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """FlowEdit (Kulikov et al.): an edit of clean latents ``x_source`` without inversion.

    Over the steps ``i`` whose count from the end ``N - i`` is at most ``n_max`` and above
    ``n_min``, with fresh noise ``n`` each step,

        z_src = (1 - s_i) x_src + s_i n,     z_tgt = z_edit + z_src - x_src,
        z_edit <- z_edit + (s_{i+1} - s_i) (v(z_tgt, target) - v(z_src, source)),

    so the edit follows the difference of the two prompts' velocities at noised copies of the
    source. The last ``n_min`` steps then sample the target plainly from ``z_tgt``.
    ``velocity(z, t, which)`` is the guided velocity for ``which`` in ``("source", "target")``;
    ``sigmas`` has one more entry than ``timesteps`` (the last is 0). Identical prompts give
    ``x_source`` back exactly; an empty window (``n_max = 0``) too."""
    steps = len(timesteps)
    z_edit = x_source.clone()
    z_target = None
    for i, (t, s, s_next) in enumerate(zip(timesteps, sigmas[:-1], sigmas[1:])):
        if steps - i > n_max:
            continue
        if steps - i > n_min:
            noise = torch.randn(x_source.shape, generator=generator, dtype=x_source.dtype).to(x_source.device)
            z_source = (1 - s) * x_source + s * noise
            z_tgt = z_source + (z_edit - x_source)  # in this order: exactly z_source while z_edit is the source
            delta = velocity(z_tgt, t, "target") - velocity(z_source, t, "source")
            z_edit = z_edit + (s_next - s) * delta
            continue
        if z_target is None:  # the plain sampling of the target starts from its noised edit
            noise = torch.randn(x_source.shape, generator=generator, dtype=x_source.dtype).to(x_source.device)
            z_target = z_edit + s * (noise - x_source)
        z_target = z_target + (s_next - s) * velocity(z_target, t, "target")
    return z_edit if z_target is None else z_target


class WanRenderer:
    """A Wan text-to-video model rendering (source, edited) pairs: Prompt-to-Prompt under attention
    control (:meth:`render_pair`), or FlowEdit of a given clip (:meth:`flow_edit_pair`)."""

    backbone = "wan"

    def __init__(self, model: WanEditor):
        if model.source_channels:
            raise ValueError("the wan backbone renders with a text-to-video transformer (no source channels)")
        self.model = model
        for module in model.modules().values():
            module.requires_grad_(False).eval()
        self.last_control: P2PControl | None = None

    @classmethod
    def tiny(cls, config: dict[str, Any] | str) -> "WanRenderer":
        """A random text-to-video Wan from component configs: a mapping, or a shipped model config's
        name (an editor layout such as ``model/wan2.1-t2v-1.3b-random.yaml``, read without its
        source channels)."""
        config = shipped_config(config) if isinstance(config, str) else dict(config)
        transformer = {**config["transformer"], "in_channels": config["transformer"]["out_channels"]}
        return cls(build_wan_editor({**config, "transformer": transformer, "text_to_video": True}))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> "WanRenderer":
        """A diffusers ``WanPipeline`` folder as it is (Wan2.1-T2V-1.3B / 14B, Wan2.2-TI2V-5B), with its scheduler."""
        return cls(WanEditor.from_pretrained(Path(path), torch_dtype=torch_dtype, text_to_video=True))

    def to(self, device=None, dtype: torch.dtype | None = None) -> "WanRenderer":
        """The transformer and text encoder in ``dtype`` (Wan's float32 parts kept), the VAE in float32."""
        self.model.to(device, dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def temporal_compression(self) -> int:
        return self.model.temporal_compression

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        t, m = self.model.temporal_compression, self.model.size_multiple
        if (num_frames - 1) % t or height % m or width % m:
            raise ValueError(f"the wan backbone renders 1 + {t}k frames with sides that are multiples of {m}, "
                             f"got {num_frames} frames of {width}x{height} (generator.num_frames, height, width)")

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        self.check_size(num_frames, height, width)
        s = self.model.vae_scale_factor
        return (1, self.model.latent_channels, 1 + (num_frames - 1) // self.model.temporal_compression, height // s, width // s)

    def token_ids(self, prompt: str) -> list[int]:
        return self.model.tokenizer(clean_prompt(prompt), truncation=True, max_length=self.model.max_sequence_length,
                                    add_special_tokens=True).input_ids

    def scheduler(self, steps: int):
        """A fresh copy of the model's own scheduler (multistep ones keep state), set for ``steps``."""
        scheduler = copy.deepcopy(self.model.scheduler)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def velocity(self, latents: torch.Tensor, t, text: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity in float32 (it runs in its own dtype)."""
        empty = latents.new_zeros(latents.shape[0], 0, *latents.shape[2:])
        return self.model.predict(latents, empty, text, t).float()

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8_frames(self.model.decode_latents(latents))

    @torch.no_grad()
    def render(self, prompts: list[str], noise: torch.Tensor, params: PairParams, control: P2PControl | None = None,
               progress: bool = False) -> np.ndarray:
        """``len(prompts)`` clips from the same ``noise`` with classifier-free guidance; the batch is
        ``[uncond_1..n, cond_1..n]`` (with two prompts and ``control``: the P2P layout). Returns
        uint8 ``(n, F, H, W, 3)``."""
        from tqdm.auto import tqdm

        n = len(prompts)
        text = self.model.encode_text([""] * n + list(prompts))
        set_processors(self.model.transformer, control)
        scheduler = self.scheduler(params.steps)
        latents = noise.to(self.device, torch.float32).repeat(n, 1, 1, 1, 1)  # flow matching starts at sigma 1
        try:
            for i, t in enumerate(tqdm(scheduler.timesteps, leave=False, disable=not progress, desc="render")):
                if control is not None:
                    control.step = i
                uncond, cond = self.velocity(torch.cat([latents, latents]), t.expand(1), text).chunk(2)
                latents = scheduler.step(uncond + params.guidance * (cond - uncond), t, latents).prev_sample
        finally:
            set_processors(self.model.transformer, None)
        return np.stack([self.decode(latents[i : i + 1]) for i in range(n)])

    def control(self, source_prompt: str, target_prompt: str, params: PairParams) -> P2PControl:
        mapping, edited = align_tokens(self.token_ids(source_prompt), self.token_ids(target_prompt),
                                       self.model.max_sequence_length)
        weights = torch.where(edited, torch.tensor(float(params.edit_weight)), torch.tensor(1.0))
        return P2PControl(params.steps, params.self_attn_end, params.cross_attn_end, mapping, weights)

    def render_pair(self, source_prompt: str, target_prompt: str, noise: torch.Tensor, params: PairParams,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(source, edited) clips from the same noise, the edited one under attention control."""
        self.last_control = self.control(source_prompt, target_prompt, params)
        pair = self.render([source_prompt, target_prompt], noise, params, self.last_control, progress)
        return pair[0], pair[1]

    @torch.no_grad()
    def flow_edit_latents(self, latents: torch.Tensor, source_prompt: str, target_prompt: str, steps: int,
                          source_guidance: float, target_guidance: float, n_max: int, n_min: int = 0,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """:func:`flow_edit` of normalised latents on this model, on its scheduler's sigmas."""
        text = self.model.encode_text(["", source_prompt, "", target_prompt])
        guidance = {"source": (source_guidance, text[0:2]), "target": (target_guidance, text[2:4])}
        scheduler = self.scheduler(steps)

        def velocity(z: torch.Tensor, t, which: str) -> torch.Tensor:
            scale, states = guidance[which]
            uncond, cond = self.velocity(torch.cat([z, z]), torch.as_tensor(t).reshape(1), states).chunk(2)
            return uncond + scale * (cond - uncond)

        sigmas = [float(s) for s in scheduler.sigmas]
        timesteps = [float(t) for t in scheduler.timesteps]
        return flow_edit(latents.float(), velocity, sigmas, timesteps, n_max, n_min, generator)

    def flow_edit_pair(self, frames: np.ndarray, source_prompt: str, target_prompt: str, params: PairParams,
                       n_max: int, n_min: int = 0, source_guidance: float = 1.5,
                       generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A real clip (uint8 ``(F, H, W, 3)``) and its FlowEdit from ``source_prompt`` to ``target_prompt``."""
        self.check_size(*frames.shape[:3])
        with torch.no_grad():
            latents = self.model.encode_video(to_model_frames(frames).to(self.device)).float()
        edited = self.flow_edit_latents(latents, source_prompt, target_prompt, params.steps, source_guidance,
                                        params.guidance, n_max, n_min, generator)
        with torch.no_grad():
            return frames, self.decode(edited)
