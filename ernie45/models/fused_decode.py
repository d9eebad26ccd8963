"""Every decoder layer of a decode step in one C call (`ernie45_decode_layers` in kernels/decode_ops.c).

At batch 1 the op-by-op decode spends ~2.5 ms a step of the 0.3B shape between kernels: ~10 Python-level calls
a layer, each a few microseconds of checks, allocations and ctypes. A `FusedDecode` plan is built once per
(model, KV cache, batch size): ctypes structs that point at the layers' weights, the cache's per-layer slices and
buffers it owns; a step then costs one call. With the static cache the numerics are the op-by-op path's bit for
bit: the same C functions run in the same order (norm, q/k/v, rotary, attention, o, add + norm, gate/up, SiLU,
down, add); in the engine the attention is the paged kernel the layer-by-layer engine step also runs
(kernels/paged_attention.c, reading the cache in place through the block tables).

It applies to dense decoder layers whose modules are exactly the model's own (`RMSNorm`, `Attention`, `SwiGLU`,
`Linear` with fp32/bf16/fp16 weights or `QuantizedLinear`) with no hooks, CPU fp32/bf16 activations, no autograd
and one new token per sequence: in a `StaticKVCache` (`generate`) or in the engine's paged cache when every
scheduled sequence decodes (`engine/paged_attention.py`); `plan_for` returns None otherwise and the model runs
layer by layer. A plan is checked when built and lives as long as its cache (one generation; the engine's
lifetime): modules swapped, re-quantized or hooked after that are not noticed (re-checking ~600 Python objects every
step cost ~200 us, as much as a fifth of the weights' streaming time, because the weights evict them from the
CPU caches); a new cache plans again. Global module hooks and autograd are checked every step. Legend: M rows
(sequences), H hidden, N query heads, K kv heads, D head dim, S cache slots, I intermediate.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules import module as _module_state  # the global forward hooks live here

from ..kernels import decode_ops, gemv
from ..kernels import paged_attention as paged_attention_kernel
from .attention import Attention
from .layers import Linear, RMSNorm, SwiGLU

if TYPE_CHECKING:
    from .ernie45 import Ernie45Model

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # decode_ops.c, gemv.c and qgemv.c agree
_LINEAR_QGEMV, _LINEAR_GEMV = 0, 1


class LinearOp(ctypes.Structure):
    _fields_ = [
        ("fn", ctypes.c_void_p),
        ("kind", ctypes.c_int),
        ("count", ctypes.c_int),
        ("bits", ctypes.c_int),
        ("group_size", ctypes.c_int64),
        ("weights", ctypes.c_void_p),
        ("w", ctypes.c_void_p),
        ("w_dtype", ctypes.c_int),
        ("bias_dtype", ctypes.c_int),
        ("bias", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
    ]


class DecodeLayer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qkv", LinearOp * 3),
        ("n_qkv", ctypes.c_int),
        ("gate_up", LinearOp * 3),
        ("n_gate_up", ctypes.c_int),
        ("o", LinearOp),
        ("down", LinearOp),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
    ]


class DecodeScratch(ctypes.Structure):
    _fields_ = [
        ("dtype", ctypes.c_int),
        *((name, ctypes.c_int64) for name in ("M", "H", "N", "K", "D", "S", "I")),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("normed", "q", "k", "v", "attn", "gate", "up", "act", "o", "down")),
    ]


class DecodeAttention(ctypes.Structure):
    """Where a step's attention reads and writes (`DecodeAttention` in decode_ops.c)."""

    _fields_ = [
        ("paged", ctypes.c_int),
        ("pos", ctypes.c_int64),
        ("write_slots", ctypes.c_void_p),
        ("paged_attention", ctypes.c_void_p),
        ("block_tables", ctypes.c_void_p),
        ("max_blocks", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("num_blocks", ctypes.c_int64),
        ("context_lens", ctypes.c_void_p),
        ("table_rows", ctypes.c_int64),
    ]


def static_attention(pos: int) -> DecodeAttention:
    """Every row writes and attends up to slot `pos` of the static cache; one rotary table row for all."""
    return DecodeAttention(0, pos, None, None, None, 0, 0, 0, None, 1)


def paged_attention(write_slots_M: torch.Tensor, block_tables_MB: torch.Tensor, context_lens_M: torch.Tensor,
                    block_size: int, num_blocks: int) -> DecodeAttention | None:
    """The engine's paged cache, read in place by kernels/paged_attention.c: row m writes its new k / v to slot
    write_slots[m] (int64) and attends the first context_lens[m] tokens of its blocks block_tables[m] (int32; the
    caller keeps the tensors alive during the call); one rotary table row per row. None when that kernel is
    unavailable."""
    entry = paged_attention_kernel.entry_address()
    if entry is None or write_slots_M.dtype != torch.int64 or block_tables_MB.dtype != torch.int32:
        return None
    return DecodeAttention(
        1, 0, write_slots_M.data_ptr(), entry, block_tables_MB.data_ptr(), block_tables_MB.shape[1], block_size,
        num_blocks, context_lens_M.data_ptr(), write_slots_M.numel(),
    )  # fmt: skip


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _no_hooks(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    return bool(_module_state._global_forward_hooks or _module_state._global_forward_pre_hooks)


class FusedDecode:
    """A plan for `ernie45_decode_layers`: build with `plan_for`, run with `__call__`."""

    def __init__(self, model: Ernie45Model, k_layers: torch.Tensor, v_layers: torch.Tensor, rows: int,
                 dtype: torch.dtype, static_slots: int = 0, layers: list[nn.Module] | None = None):
        """k_layers / v_layers [L, ...]: each layer's cache, static [B, K, S, D] (static_slots = S) or paged
        [slots, K, D] (static_slots = 0), indexed by the layers' `layer_idx`. `layers`: the decoder layers to run
        (default the model's stack; the MTP drafter passes its MTP block, whose KV is layer num_hidden_layers)."""
        config = model.config
        layers = list(model.layers) if layers is None else layers
        # Head counts and the MLP width from the weights this model holds (a tensor-parallel rank holds a slice).
        attn0, mlp0 = layers[0].self_attn, layers[0].mlp
        H, D = config.hidden_size, config.head_dim
        N, K = attn0.q_proj.out_features // D, attn0.k_proj.out_features // D
        I = mlp0.down_proj.in_features if hasattr(mlp0, "down_proj") else config.intermediate_size  # MoE: declined
        S = static_slots
        self.rows, self.dtype = rows, dtype
        self._keep: list = [k_layers, v_layers]  # every tensor and struct the C side points at

        def buffer(width: int) -> int:
            t = torch.empty(rows, width, dtype=dtype)
            self._keep.append(t)
            return t.data_ptr()

        self.scratch = DecodeScratch(
            _DTYPE_CODES[dtype], rows, H, N, K, D, S, I, config.rms_norm_eps, D**-0.5,
            buffer(H), buffer(N * D), buffer(K * D), buffer(K * D), buffer(N * D),
            buffer(I), buffer(I), buffer(I), buffer(H), buffer(H),
        )  # fmt: skip
        s = self.scratch
        self.layers = (DecodeLayer * len(layers))()
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            plan = self.layers[i]
            plan.input_norm = self._norm(layer.input_layernorm)
            plan.post_norm = self._norm(layer.post_attention_layernorm)
            plan.n_qkv = self._linears((attn.q_proj, attn.k_proj, attn.v_proj), (s.q, s.k, s.v), plan.qkv)
            plan.n_gate_up = self._linears((mlp.gate_proj, mlp.up_proj), (s.gate, s.up), plan.gate_up)
            self._linears((attn.o_proj,), (s.o,), (plan.o,))
            self._linears((mlp.down_proj,), (s.down,), (plan.down,))
            if attn.layer_idx >= k_layers.shape[0] or not all(map(_no_hooks, (layer, attn, mlp))):
                raise _NotFusable
            plan.k_cache = k_layers[attn.layer_idx].data_ptr()
            plan.v_cache = v_layers[attn.layer_idx].data_ptr()
        self._run = decode_ops.decode_layers_entry()

    def _norm(self, norm: RMSNorm) -> int:
        if norm.weight.dtype != self.dtype or not norm.weight.is_contiguous() or not _no_hooks(norm):
            raise _NotFusable
        return norm.weight.data_ptr()

    def _linears(self, modules: tuple[nn.Module, ...], outputs: tuple[int, ...], ops) -> int:
        """Fills `ops` for linears reading the same x: one grouped packed call, or one call per module."""
        from ..quant.quantized_linear import QuantizedLinear

        if not all(map(_no_hooks, modules)):
            raise _NotFusable
        if all(type(m) is QuantizedLinear for m in modules):
            first = modules[0]
            call = QuantizedLinear.prepare_group(modules)  # our own call: its outputs point at the plan's buffers
            if call is None:
                raise _NotFusable
            fn, weights = call.bind_outputs(outputs)
            self._keep.append(call)
            op = ops[0]
            op.fn, op.kind, op.count = fn, _LINEAR_QGEMV, len(modules)
            op.bits, op.group_size = first.spec.bits, first.group_size
            op.weights, op.K = weights, first.in_features
            return 1
        library = gemv._library()
        for m, y, op in zip(modules, outputs, ops):
            if type(m) is not Linear or library is None:
                raise _NotFusable
            w, b = m.weight, m.bias
            if w.dtype not in library.dtype_codes or not w.is_contiguous() or w.device.type != "cpu":
                raise _NotFusable
            if b is not None and (b.dtype not in library.dtype_codes or not b.is_contiguous()):
                raise _NotFusable
            op.fn, op.kind, op.w, op.w_dtype = _address(library.gemv), _LINEAR_GEMV, w.data_ptr(), _DTYPE_CODES[w.dtype]
            op.bias, op.bias_dtype = (None, 0) if b is None else (b.data_ptr(), _DTYPE_CODES[b.dtype])
            op.y, (op.N, op.K) = y, w.shape
        return len(modules)

    def __call__(self, x_MH: torch.Tensor, attention: DecodeAttention, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Runs every layer on x (in place) for one token per row; cos / sin: the rows' interleaved rotary tables
        (fp32, contiguous, `attention.table_rows` rows)."""
        status = self._run(
            ctypes.byref(self.layers), len(self.layers), ctypes.byref(self.scratch), x_MH.data_ptr(),
            ctypes.byref(attention), cos.data_ptr(), sin.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"fused decode failed with status {status} (>= 100: a linear kernel's error)")


class _NotFusable(Exception):
    """A module the fused step cannot run: the model runs layer by layer."""


def plan_for(model: Ernie45Model, k_layers: torch.Tensor, v_layers: torch.Tensor, x: torch.Tensor,
             static_slots: int = 0, layers: list[nn.Module] | None = None) -> FusedDecode | None:
    """A fused plan for these layers (default the model's stack), this cache (see `FusedDecode`) and x's rows and
    dtype, or None when any part is not eligible."""
    layers = list(model.layers) if layers is None else layers
    if not decode_ops.available() or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_cpu:
        return None
    rows = x.numel() // x.shape[-1]
    if not 1 <= rows <= gemv.MAX_ROWS or k_layers.dtype != x.dtype:
        return None
    for layer in layers:
        if not (type(layer.self_attn) is Attention and type(layer.mlp) is SwiGLU
                and type(layer.input_layernorm) is RMSNorm and type(layer.post_attention_layernorm) is RMSNorm):
            return None  # MoE layers, LoRA-wrapped or other substituted modules  # fmt: skip
    try:
        return FusedDecode(model, k_layers, v_layers, rows, x.dtype, static_slots, layers)
    except _NotFusable:
        return None


def fusable_step(x: torch.Tensor) -> bool:
    """Cheap per-step conditions: no autograd, no global module hooks."""
    return not (torch.is_grad_enabled() and x.requires_grad) and not _global_hooks()
