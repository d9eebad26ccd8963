"""Grouped-query self-attention with a swappable backend.

The module computes q/k/v, applies RoPE and projects the output; *how* keys and values are stored and attended
(dense causal for training, a static KV cache for `generate`, a paged cache for the engine) is the backend's job,
passed in explicitly as `attn_metadata`. Legend: B batch, T tokens, N query heads, K kv heads, D head dim.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import causal_attention, decode_ops
from .config import Ernie45Config
from .layers import Linear, apply_rotary, shared_input_projections


class AttentionBackend(Protocol):
    """What a decoder layer needs from attention metadata: attend one layer's rotated q/k/v."""

    def attend(
        self, layer_idx: int, q_BTND: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Returns the attention output [B, T, N, D]."""
        ...


class CausalAttention:
    """Cache-free causal attention over the whole sequence; optional packing segments.

    `segment_ids_BT` (packed training): token i attends token j only if j <= i and both lie in the same segment.
    """

    def __init__(self, segment_ids_BT: torch.Tensor | None = None):
        self.segment_ids_BT = segment_ids_BT
        self._mask: torch.Tensor | None = None

    def _packing_mask(self, T: int, device: torch.device) -> torch.Tensor:
        if self._mask is None:  # built once, shared by every layer of the forward
            seg = self.segment_ids_BT.to(device)
            same = seg[:, :, None] == seg[:, None, :]
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            self._mask = (same & causal)[:, None]  # [B, 1, T, T]
        return self._mask

    def attend(self, layer_idx, q_BTND, k_BTKD, v_BTKD, scale):
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_BTND, k_BTKD, v_BTKD))
        if self.segment_ids_BT is None and needs_grad and causal_attention.takes(q_BTND, k_BTKD, v_BTKD):
            # Training on the CPU: block products on OpenBLAS, query heads stacked per kv head (~1.5x torch's flash
            # attention forward and backward at the 0.3B shape).
            return causal_attention.attention(q_BTND, k_BTKD, v_BTKD, scale)
        q, k, v = (t.transpose(1, 2) for t in (q_BTND, k_BTKD, v_BTKD))
        gqa = q.shape[1] != k.shape[1]
        if self.segment_ids_BT is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            mask = self._packing_mask(q.shape[2], q.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2)


class SegmentAttention:
    """Non-causal attention inside each segment of a packed sequence, never across (the vision tower: each image or
    video frame attends only to its own patches). `lengths`: tokens per segment, in order."""

    def __init__(self, lengths: list[int]):
        self.lengths = lengths

    def attend(self, layer_idx, q_BTND, k_BTKD, v_BTKD, scale):
        q, k, v = (t.transpose(1, 2) for t in (q_BTND, k_BTKD, v_BTKD))
        outs = [
            F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
            for qs, ks, vs in zip(*(t.split(self.lengths, dim=2) for t in (q, k, v)))
        ]
        return torch.cat(outs, dim=2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, config: Ernie45Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        H, D, bias = config.hidden_size, config.head_dim, config.use_bias
        self.q_proj = Linear(H, self.num_heads * D, bias=bias)
        self.k_proj = Linear(H, self.num_kv_heads * D, bias=bias)
        self.v_proj = Linear(H, self.num_kv_heads * D, bias=bias)
        self.o_proj = Linear(self.num_heads * D, H, bias=bias)

    def forward(
        self,
        x_BTH: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: AttentionBackend,
    ) -> torch.Tensor:
        B, T, _ = x_BTH.shape
        q, k, v = shared_input_projections(x_BTH, (self.q_proj, self.k_proj, self.v_proj))
        # Head counts come from the projections' outputs, not the config: a tensor-parallel rank holds a slice.
        q = q.view(B, T, -1, self.head_dim)
        k = k.view(B, T, -1, self.head_dim)
        v = v.view(B, T, -1, self.head_dim)
        cos, sin = rope
        if not decode_ops.rotary_(q, k, cos, sin):  # in place, one C call where it applies (no autograd, CPU)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = attn_metadata.attend(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(o.reshape(B, T, -1))
