"""A preallocated contiguous KV cache: the attention backend of the model core's `generate`.

Every row of the batch has the same length (the engine, not this cache, handles ragged batches). Decode steps
attend with grouped query heads against the cached K/V directly, so GQA never copies the cache.
Legend: L layers, B batch, K kv heads, G query heads per kv head, S cache slots, T new tokens, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import decode_ops
from ..models import fused_decode
from ..models.config import Ernie45Config


class StaticKVCache:
    def __init__(
        self,
        config: Ernie45Config,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        extra_layers: int = 0,
    ):
        shape = (config.num_hidden_layers + extra_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k_LBKSD = torch.zeros(shape, dtype=dtype, device=device)
        self.v_LBKSD = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # tokens stored so far (same for every row)
        self._pending = 0  # tokens of the forward in flight
        self._fused_plan = None  # ((model, rows, dtype), its FusedDecode plan or None: not fusable)

    def attend(self, layer_idx, q_BTND, k_BTKD, v_BTKD, scale):
        B, T, N, D = q_BTND.shape
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens needed, the cache holds {self.max_len}")
        self._pending = T
        if T == 1:  # decode: the cache write and the attention in one C call where it applies
            o = decode_ops.decode_attention(
                q_BTND.view(B, N, D), k_BTKD.view(B, -1, D), v_BTKD.view(B, -1, D),
                self.k_LBKSD[layer_idx], self.v_LBKSD[layer_idx], start, scale,
            )  # fmt: skip
            if o is not None:
                return o.view(B, 1, N, D)
        self.k_LBKSD[layer_idx, :, :, start:end] = k_BTKD.transpose(1, 2)
        self.v_LBKSD[layer_idx, :, :, start:end] = v_BTKD.transpose(1, 2)
        k = self.k_LBKSD[layer_idx, :, :, :end]
        v = self.v_LBKSD[layer_idx, :, :, :end]
        K = k.shape[1]
        if T == 1:
            # [B, K, G, D] x [B, K, D, S]: each kv head serves its G query heads without repeating K/V. In fp32:
            # CPU half-precision batched matmuls at these sizes are ~4x slower than upcasting the few rows read.
            q = q_BTND.view(B, K, N // K, D).float()
            scores = torch.matmul(q, k.float().transpose(-1, -2)) * scale
            o = torch.matmul(scores.softmax(-1), v.float())
            return o.view(B, 1, N, D).to(q_BTND.dtype)
        q = q_BTND.transpose(1, 2)
        if start == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=K != N)
        else:
            rows = torch.arange(start, end, device=q.device)[:, None]
            mask = torch.arange(end, device=q.device)[None, :] <= rows
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=K != N)
        return o.transpose(1, 2)

    def run_fused_layers(self, model, x_BTH: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Every decoder layer of a one-token decode step in one C call (`models.fused_decode`), or None when this
        step or model does not qualify (the model then runs layer by layer). Returns the hidden states [B, 1, H]."""
        B, T, _ = x_BTH.shape
        cos, sin = rope
        if T != 1 or self.length >= self.max_len or cos.numel() != cos.shape[-1]:
            return None
        if not fused_decode.fusable_step(x_BTH):
            return None
        key = (model, B, x_BTH.dtype)
        if self._fused_plan is None or self._fused_plan[0] != key:  # planned once per cache (one generation)
            plan = fused_decode.plan_for(model, self.k_LBKSD, self.v_LBKSD, x_BTH, static_slots=self.max_len)
            self._fused_plan = (key, plan)
        plan = self._fused_plan[1]
        if plan is None:
            return None
        x = x_BTH.contiguous().clone()
        plan(x, fused_decode.static_attention(self.length), cos.contiguous(), sin.contiguous())
        self._pending = 1
        return x

    def advance(self) -> None:
        """Commit the tokens of the last forward (call once per model forward, after all layers ran)."""
        self.length += self._pending
        self._pending = 0
