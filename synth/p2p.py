"""Video Prompt-to-Prompt: attention control through diffusers attention processors.

A render batch is ``[uncond_src, uncond_tgt, cond_src, cond_tgt]`` (each a block of frames or of
pixel sequences, batch-major as every diffusers U-Net lays them out). While active, the target's
self-attention maps (spatial and temporal) are the source's, and its cross-attention maps are the
source's mapped token to token, with edited tokens re-weighted.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class P2PControl:
    """The state every processor of one render shares (diffusers drops unknown call kwargs, so the
    step counter lives here, on the processors' shared object)."""

    num_steps: int
    self_attn_end: float
    cross_attn_end: float
    token_map: torch.Tensor  # (S,) long: target token j takes source token token_map[j]; -1 = new token
    token_weights: torch.Tensor  # (S,) float: edit_weight on edited target tokens, 1 elsewhere
    step: int = 0
    self_controlled: int = 0  # attention calls whose target maps were the source's (self-attention)
    cross_controlled: int = 0  # and cross-attention calls mapped token to token

    @property
    def self_active(self) -> bool:
        return self.step < self.self_attn_end * self.num_steps

    @property
    def cross_active(self) -> bool:
        return self.step < self.cross_attn_end * self.num_steps


def align_tokens(source_ids: list[int], target_ids: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map each target token position to a source token position, on **tokens** (not words).

    ``*_ids`` are the prompts' token ids with BOS/EOS, unpadded; ``length`` the padded length.
    Equal counts: a word swap, position ``j`` maps to ``j``. Otherwise the longest common token
    blocks are matched (difflib) and unmatched target tokens map to ``-1``. Padding maps to padding,
    aligned from the end of each prompt. Returns the map and a mask of *edited* target tokens (new,
    or different from the source token they map to).
    """
    n_src, n_tgt = len(source_ids), len(target_ids)
    mapping = torch.full((length,), -1, dtype=torch.long)
    if n_src == n_tgt:
        mapping[:n_tgt] = torch.arange(n_tgt)
    else:
        matcher = difflib.SequenceMatcher(a=source_ids, b=target_ids, autojunk=False)
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                mapping[block.b + k] = block.a + k
    pad = torch.arange(n_tgt, length)
    mapping[n_tgt:] = (pad - n_tgt + n_src).clamp(max=length - 1)
    edited = torch.zeros(length, dtype=torch.bool)
    for j in range(n_tgt):
        edited[j] = mapping[j] < 0 or source_ids[mapping[j]] != target_ids[j]
    return mapping, edited


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """View a batch-major tensor as its four render blocks ``(4, B/4, ...)``."""
    return x.view(4, x.shape[0] // 4, *x.shape[1:])


class P2PAttnProcessor:
    """Scaled-dot-product attention with Prompt-to-Prompt control of the target's maps."""

    def __init__(self, control: P2PControl):
        self.control = control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch, seq_len, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if not is_cross else (
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        )
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        control = self.control
        if not is_cross and control.self_active and batch % 4 == 0:
            # same queries and keys as the source -> the source's maps, applied to the target's values
            query, key = _blocks(query).clone(), _blocks(key).clone()
            query[1], query[3], key[1], key[3] = query[0], query[2], key[0], key[2]
            query, key = query.flatten(0, 1), key.flatten(0, 1)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
            control.self_controlled += 1
        elif is_cross and control.cross_active and batch % 4 == 0:
            # scores and softmax in float32: half-precision logits lose the small differences
            # between tokens that the re-weighting of edited tokens acts on
            scores = query.float() @ key.float().transpose(-1, -2) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask.float()
            probs = _blocks(scores.softmax(dim=-1)).clone()  # (4, n, heads, Lq, S)
            mapping = control.token_map.to(probs.device)
            source = probs[2][..., mapping.clamp(min=0)]
            mapped = torch.where(mapping >= 0, source, probs[3])
            probs[3] = mapped * control.token_weights.to(probs.device, probs.dtype)
            out = probs.flatten(0, 1).to(value.dtype) @ value
            control.cross_controlled += 1
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
