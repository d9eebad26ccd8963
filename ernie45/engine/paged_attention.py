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

from ..models import fused_decode


class KVCache:
    """The engine's KV memory, allocated once."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.fused_plans: dict = {}
        """(model, rows, dtype) -> its fused decode plan, or None: not fusable (models/fused_decode.py). Planned
        once for the engine's lifetime: the engine does not swap modules while it serves."""

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
    """Where each token of a step goes in the cache and what each sequence attends.

    Decode rows (one new query each) of several sequences are attended together: their contexts are gathered into
    one zero-padded [S, Cmax] block and masked, so a step costs a few ops per layer instead of a Python loop over
    the batch. Prefill chunks keep the per-sequence path (their causal masks differ per sequence).
    """

    def __init__(self, cache: KVCache, slot_mapping_N: torch.Tensor, sequences: list[SequenceSlice]):
        self.cache = cache
        self.slot_mapping_N = slot_mapping_N
        self.sequences = sequences
        decode = [s for s in sequences if s.q_len == 1] if len(sequences) > 1 else []
        self.batched_decode = _BatchedDecode(decode) if len(decode) > 1 else None
        self.per_sequence = [s for s in sequences if s.q_len != 1] if self.batched_decode else sequences

    def attend(self, layer_idx, q_BTND, k_BTKD, v_BTKD, scale):
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_cache.index_copy_(0, self.slot_mapping_N, k_BTKD[0])
        v_cache.index_copy_(0, self.slot_mapping_N, v_BTKD[0])
        q_NHD = q_BTND[0]
        if len(self.sequences) == 1 and self.sequences[0].q_len == q_NHD.shape[0]:
            seq = self.sequences[0]  # batch 1: no output buffer to fill
            k = k_cache.index_select(0, seq.context_slots)
            v = v_cache.index_select(0, seq.context_slots)
            return _attend_one(q_NHD, k, v, scale)[None]
        out = torch.empty_like(q_NHD)
        if self.batched_decode is not None:
            self.batched_decode.attend(q_NHD, k_cache, v_cache, scale, out)
        for seq in self.per_sequence:
            k = k_cache.index_select(0, seq.context_slots)  # [C, K, D]
            v = v_cache.index_select(0, seq.context_slots)
            q = q_NHD[seq.q_start : seq.q_start + seq.q_len]  # [T, N, D]
            out[seq.q_start : seq.q_start + seq.q_len] = _attend_one(q, k, v, scale)
        return out[None]


    def run_fused_layers(self, model, x_1NH: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """A step in which every sequence decodes one token: all decoder layers in one C call
        (`models.fused_decode`); None when the step or the model does not qualify (mixed prefill, MoE, ...)."""
        if x_1NH.shape[0] != 1 or any(seq.q_len != 1 for seq in self.sequences):
            return None
        M = x_1NH.shape[1]
        cos, sin = rope
        if cos.numel() != M * cos.shape[-1] or not fused_decode.fusable_step(x_1NH):
            return None
        key = (model, M, x_1NH.dtype)
        if key not in self.cache.fused_plans:
            self.cache.fused_plans[key] = fused_decode.plan_for(model, self.cache.k, self.cache.v, x_1NH)
        plan = self.cache.fused_plans[key]
        if plan is None:
            return None
        lengths = torch.tensor([seq.context_len for seq in self.sequences])
        offsets = torch.zeros(M + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        context = torch.cat([seq.context_slots[: seq.context_len] for seq in self.sequences])
        write = self.slot_mapping_N.to(torch.long).contiguous()
        x = x_1NH.contiguous().clone()
        plan(x, fused_decode.paged_attention(write, context, offsets), cos.contiguous(), sin.contiguous())
        return x


class _BatchedDecode:
    """S decode rows attended at once over their contexts padded to the longest (Cmax); built once per step and
    reused by every layer."""

    def __init__(self, decode: list[SequenceSlice]):
        slots_SC = torch.nn.utils.rnn.pad_sequence([s.context_slots for s in decode], batch_first=True)
        self.shape = tuple(slots_SC.shape)
        self.slots = slots_SC.reshape(-1)  # padding gathers slot 0: harmless, masked below
        self.rows = torch.tensor([s.q_start for s in decode])
        lengths = torch.tensor([s.context_len for s in decode])
        if bool((lengths == self.shape[1]).all()):
            self.bias_S1C = None
        else:
            padded = torch.arange(self.shape[1])[None, :] >= lengths[:, None]
            self.bias_S1C = torch.zeros(self.shape).masked_fill_(padded, float("-inf"))[:, None, :]

    def attend(self, q_NHD, k_cache, v_cache, scale, out):
        S, C = self.shape
        N, D = q_NHD.shape[1:]
        K = k_cache.shape[1]
        k = k_cache.index_select(0, self.slots).view(S, C, K, D).float()
        v = v_cache.index_select(0, self.slots).view(S, C, K, D).float()
        q = q_NHD.index_select(0, self.rows).view(S, K, N // K, D).float()
        o = torch.empty(S, K, N // K, D)
        for h in range(K):
            # Per kv head: [S, G, D] x [S, D, C] on strided views (one 4-D matmul would copy the permuted K).
            k_SDC = k[:, :, h].transpose(1, 2)
            if self.bias_S1C is None:
                scores = torch.bmm(q[:, h], k_SDC).mul_(scale)
            else:
                scores = torch.baddbmm(self.bias_S1C, q[:, h], k_SDC, alpha=scale)
            o[:, h] = torch.bmm(scores.softmax(-1), v[:, :, h])
        out.index_copy_(0, self.rows, o.view(S, N, D).to(out.dtype))


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
