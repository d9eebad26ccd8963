"""Paged attention on the CPU: the attention backend the engine passes to the model as `attn_metadata`.

The KV cache is one tensor per K and V: [layers, num_blocks * block_size, kv_heads, head_dim] (token slots). A
step's new K/V are written to their slots (`slot_mapping`); each sequence then gathers its context through its
block table and attends. Legend: N flattened tokens of the step, C context length, K kv heads, G query heads per
kv head, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class KVCache:
    """The engine's KV memory, allocated once."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class SequenceSlice:
    """One sequence's part of the step: its queries are rows [q_start, q_start + q_len) of the flattened batch and
    attend the first `context_len` slots listed in `context_slots`."""

    q_start: int
    q_len: int
    context_len: int
    context_slots: torch.Tensor  # [C] slot index of each context token


class PagedAttentionMetadata:
    def __init__(self, cache: KVCache, slot_mapping_N: torch.Tensor, sequences: list[SequenceSlice]):
        self.cache = cache
        self.slot_mapping_N = slot_mapping_N
        self.sequences = sequences

    def attend(self, layer_idx, q_BTND, k_BTKD, v_BTKD, scale):
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_cache.index_copy_(0, self.slot_mapping_N, k_BTKD[0])
        v_cache.index_copy_(0, self.slot_mapping_N, v_BTKD[0])
        q_NHD = q_BTND[0]
        out = torch.empty_like(q_NHD)
        for seq in self.sequences:
            k = k_cache.index_select(0, seq.context_slots)  # [C, K, D]
            v = v_cache.index_select(0, seq.context_slots)
            q = q_NHD[seq.q_start : seq.q_start + seq.q_len]  # [T, N, D]
            out[seq.q_start : seq.q_start + seq.q_len] = _attend_one(q, k, v, scale)
        return out[None]


def _attend_one(q_TND: torch.Tensor, k_CKD: torch.Tensor, v_CKD: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of T new queries (the last T of C context positions) over the context, fp32 inside."""
    T, N, D = q_TND.shape
    C, K, _ = k_CKD.shape
    q, k, v = q_TND.float(), k_CKD.float(), v_CKD.float()
    if T == 1:
        # [K, G, D] x [K, D, C]: each kv head serves its G query heads without repeating K/V.
        scores = torch.matmul(q.view(K, N // K, D), k.permute(1, 2, 0)) * scale
        o = torch.matmul(scores.softmax(-1), v.transpose(0, 1))  # [K, G, D]
        return o.reshape(1, N, D).to(q_TND.dtype)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if T == C:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=K != N)
    else:
        rows = torch.arange(C - T, C, device=q.device)[:, None]
        mask = torch.arange(C, device=q.device)[None, :] <= rows
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=K != N)
    return o.transpose(0, 1).to(q_TND.dtype)
