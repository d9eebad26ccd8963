"""Paged attention on the CPU: the attention backend the engine passes to the model as `attn_metadata`.

The KV cache is one tensor per K and V: [layers, num_blocks * block_size, kv_heads, head_dim] (token slots; slot =
block * block_size + offset). A step's new K/V are written to their slots (`slot_mapping`); each sequence then
attends its context through its row of the block tables (int32 [S, max blocks]) and its context length.
Sequences with few new tokens (decode, up to `kernels.paged_attention.MAX_QUERY_TOKENS`) read the blocks in place
in one C call for all of them; prefill chunks run torch's attention, on the chunk's own K/V when it is the whole
context (no cache read at all) and otherwise on a copy of just their blocks. Legend: N flattened tokens of the
step, S sequences, M blocks per table row, C context length, K kv heads, G query heads per kv head, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import paged_attention as kernel
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


class PagedAttentionMetadata:
    """Where each token of a step goes in the cache and what each sequence attends.

    Sequence s owns the step's rows query_starts[s] .. + query_lens[s] (the last query_lens[s] of its
    context_lens[s] positions) and its context lies in the blocks block_tables_SM[s] (entries past its context are
    padding, never read). Built once per step and used by every layer.
    """

    def __init__(self, cache: KVCache, slot_mapping_N: torch.Tensor, block_tables_SM: torch.Tensor,
                 context_lens: list[int], query_lens: list[int]):
        self.cache = cache
        self.slot_mapping_N = slot_mapping_N
        self.block_tables_SM = block_tables_SM
        self.context_lens = context_lens
        self.query_lens = query_lens
        self.query_starts = [0] * len(query_lens)
        for s in range(1, len(query_lens)):
            self.query_starts[s] = self.query_starts[s - 1] + query_lens[s - 1]
        short = [s for s, T in enumerate(query_lens) if T <= kernel.MAX_QUERY_TOKENS]
        self._long = [s for s, T in enumerate(query_lens) if T > kernel.MAX_QUERY_TOKENS]
        # The C kernel reads CPU caches; elsewhere (CUDA) every row takes torch's path.
        self._kernel_args = self._subset_args(short) if short and cache.k.is_cpu else None

    def _subset_args(self, rows: list[int]) -> tuple:
        """The kernel's (block tables, context lens, q starts, q lens) for the sequences `rows`; q starts / lens
        None when the step is one decode token per sequence (row s is sequence s)."""
        i32 = dict(dtype=torch.int32)
        lens = torch.tensor([self.context_lens[s] for s in rows], **i32)
        if len(rows) == len(self.query_lens) and all(T == 1 for T in self.query_lens):
            return self.block_tables_SM, lens, None, None
        tables = self.block_tables_SM[rows] if len(rows) < len(self.query_lens) else self.block_tables_SM
        starts = torch.tensor([self.query_starts[s] for s in rows], **i32)
        return tables, lens, starts, torch.tensor([self.query_lens[s] for s in rows], **i32)

    def attend(self, layer_idx, q_BTND, k_BTKD, v_BTKD, scale):
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_cache.index_copy_(0, self.slot_mapping_N, k_BTKD[0])
        v_cache.index_copy_(0, self.slot_mapping_N, v_BTKD[0])
        q_NHD = q_BTND[0].contiguous()
        out = torch.empty_like(q_NHD)
        torch_rows = range(len(self.query_lens))
        if self._kernel_args is not None and kernel.attend(q_NHD, k_cache, v_cache, self.cache.block_size,
                                                            *self._kernel_args, scale, out):
            torch_rows = self._long
        decode = [s for s in torch_rows if self.query_lens[s] == 1]
        if len(decode) > 1:  # without the kernel (disabled, CUDA): the decode rows batched in a few torch ops
            _torch_decode(q_NHD, k_cache, v_cache, self.cache.block_size, self.block_tables_SM[decode],
                          [self.context_lens[s] for s in decode], [self.query_starts[s] for s in decode], scale, out)
            torch_rows = [s for s in torch_rows if self.query_lens[s] != 1]
        for s in torch_rows:
            q0, T, C = self.query_starts[s], self.query_lens[s], self.context_lens[s]
            if T == C:  # the chunk is the whole context: its own K/V, nothing read from the cache
                k, v = k_BTKD[0, q0 : q0 + T], v_BTKD[0, q0 : q0 + T]
            else:
                k, v = (_gather_blocks(c, self.cache.block_size, self.block_tables_SM[s], C) for c in (k_cache, v_cache))
            out[q0 : q0 + T] = _attend_one(q_NHD[q0 : q0 + T], k, v, scale)
        return out[None]

    def run_fused_layers(self, model, x_1NH: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """A step in which every sequence decodes one token: all decoder layers in one C call
        (`models.fused_decode`); None when the step or the model does not qualify (mixed prefill, MoE, ...)."""
        if x_1NH.shape[0] != 1 or any(T != 1 for T in self.query_lens) or self._kernel_args is None:
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
        tables, lens, _, _ = self._kernel_args
        attention = fused_decode.paged_attention(self.slot_mapping_N, tables, lens, self.cache.block_size,
                                                 self.cache.num_blocks)
        if attention is None:
            return None
        x = x_1NH.contiguous().clone()
        plan(x, attention, cos.contiguous(), sin.contiguous())
        return x


def _gather_blocks(cache_XKD: torch.Tensor, block_size: int, table_M: torch.Tensor, C: int) -> torch.Tensor:
    """The first C tokens of one sequence's blocks as a contiguous [C, K, D] copy (only the blocks it uses)."""
    X, K, D = cache_XKD.shape
    blocks = table_M[: -(-C // block_size)].to(torch.long)
    return cache_XKD.view(X // block_size, block_size, K, D).index_select(0, blocks).view(-1, K, D)[:C]


def _torch_decode(q_NHD, k_cache, v_cache, block_size, tables_SM, lens, rows, scale, out):
    """S single-token rows attended at once over their blocks padded to the longest context (masked)."""
    S, M = tables_SM.shape
    N, D = q_NHD.shape[1:]
    K = k_cache.shape[1]
    k = _gather_blocks(k_cache, block_size, tables_SM.reshape(-1), S * M * block_size).view(S, -1, K, D).float()
    v = _gather_blocks(v_cache, block_size, tables_SM.reshape(-1), S * M * block_size).view(S, -1, K, D).float()
    C = k.shape[1]
    lens_S = torch.tensor(lens, device=q_NHD.device)
    bias_S1C = torch.zeros(S, C, device=q_NHD.device).masked_fill_(
        torch.arange(C, device=q_NHD.device)[None, :] >= lens_S[:, None], float("-inf"))[:, None, :]
    rows_S = torch.tensor(rows, device=q_NHD.device)
    q = q_NHD.index_select(0, rows_S).view(S, K, N // K, D).float()
    o = torch.empty(S, K, N // K, D, device=q_NHD.device)
    for h in range(K):
        # Per kv head: [S, G, D] x [S, D, C] on strided views (one 4-D matmul would copy the permuted K).
        scores = torch.baddbmm(bias_S1C, q[:, h], k[:, :, h].transpose(1, 2), alpha=scale)
        o[:, h] = torch.bmm(scores.softmax(-1), v[:, :, h])
    out.index_copy_(0, rows_S, o.view(S, N, D).to(out.dtype))


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
