"""The small operations of a decode step in C (`decode_ops.c`): RMSNorm (optionally fused with the residual add
before it), the interleaved rotary embedding, SiLU(gate) * up, and one-token attention against a contiguous KV
cache. At batch 1 these chains of small torch ops cost as much as the matmuls of a quantized model
(benchmarks/results/2026-11-28-decode-ops.md); each function here is one C call instead.

Every function takes CPU fp32/bf16 tensors that need no autograd and returns None when it does not take its
arguments (other device or dtype, autograd, kernels disabled or not built): the caller then runs the torch ops.
Built like `gemv.c` (same cache, same `ERNIE45_DISABLE_KERNELS=1` switch). Legend: B batch, T tokens, N query
heads, K kv heads, D head dim, S cache slots, H hidden.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import build

SOURCE_PATH = Path(__file__).with_name("decode_ops.c")
# No fused multiply-adds: the rotary embedding then rounds exactly as torch's separate multiplies and add.
EXTRA_FLAGS = ("-ffp-contract=off",)

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # must match decode_ops.c
_ERRORS = {1: "unsupported dtype", 2: "bad shape", 3: "out of memory"}


@dataclass(frozen=True)
class _Library:
    rms_norm: Callable[..., int]
    rotary: Callable[..., int]
    silu_mul: Callable[..., int]
    decode_attention: Callable[..., int]
    decode_layers: Callable[..., int]


def _bind(lib: ctypes.CDLL) -> _Library:
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    return _Library(
        rms_norm=ctypes.CFUNCTYPE(i32, p, p, p, i32, p, i32, p, i32, i64, i64, f32, i32)(
            ("ernie45_rms_norm", lib)
        ),
        rotary=ctypes.CFUNCTYPE(i32, p, p, i32, i64, i64, i64, i64, p, p, i64)(("ernie45_rotary", lib)),
        silu_mul=ctypes.CFUNCTYPE(i32, p, p, p, i32, i64, i32)(("ernie45_silu_mul", lib)),
        decode_attention=ctypes.CFUNCTYPE(
            i32, p, p, p, p, p, i32, i64, i64, i64, i64, i64, i64, f32, p, i32
        )(("ernie45_decode_attention", lib)),
        decode_layers=ctypes.CFUNCTYPE(i32, p, i32, p, p, p, p, p, i32)(("ernie45_decode_layers", lib)),
    )


@build.cached_loader
def _library() -> _Library | None:
    return build.load_kernel(SOURCE_PATH, _bind, "decode-op kernels", "using torch ops", EXTRA_FLAGS)


def available() -> bool:
    """Whether the kernels are enabled and built (the first call compiles them; never raises)."""
    return _library() is not None


def _takes(*tensors: torch.Tensor) -> bool:
    """CPU, fp32/bf16, one dtype, contiguous, no autograd (cheap: runs on every call)."""
    dtype = tensors[0].dtype
    if dtype not in _DTYPE_CODES:
        return False
    for t in tensors:
        if t.dtype != dtype or not t.is_cpu or not t.is_contiguous() or (t.requires_grad and torch.is_grad_enabled()):
            return False
    return _library() is not None


def _check(status: int, op: str) -> None:
    if status != 0:
        raise RuntimeError(f"decode_ops.{op} failed: {_ERRORS.get(status, status)}")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x + residual, weight * norm(x + residual)) (without residual: (x, weight * norm(x))), with `RMSNorm`'s
    roundings: the normalized row in x's dtype times the weight, the result in their promoted dtype."""
    if residual is None:
        if not _takes(x):
            return None
    elif not _takes(x, residual) or residual.shape != x.shape:
        return None
    H = x.shape[-1]
    if weight.dtype not in _DTYPE_CODES or weight.shape != (H,) or not weight.is_cpu or not weight.is_contiguous():
        return None
    if weight.requires_grad and torch.is_grad_enabled():
        return None
    if weight.dtype == x.dtype:
        out = torch.empty_like(x)
    else:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    total = None if residual is None else torch.empty_like(x)
    code = _DTYPE_CODES[x.dtype]
    status = _library().rms_norm(
        x.data_ptr(), None if residual is None else residual.data_ptr(), None if total is None else total.data_ptr(),
        code, weight.data_ptr(), _DTYPE_CODES[weight.dtype], out.data_ptr(), _DTYPE_CODES[out.dtype],
        x.numel() // H, H, eps, torch.get_num_threads(),
    )  # fmt: skip
    _check(status, "rms_norm")
    return (x if total is None else total), out


def rotary_(q_BTND: torch.Tensor, k_BTKD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotates q and k in place with the interleaved tables (`models.layers.interleaved_tables`, fp32 [..., T, D],
    shared by the batch or one row per sequence); bit-identical to `apply_rotary`. False when not taken."""
    if not _takes(q_BTND, k_BTKD) or cos.dtype != torch.float32 or not _takes(cos, sin) or cos.shape != sin.shape:
        return False
    B, T, N, D = q_BTND.shape
    table_rows = cos.numel() // D
    if cos.shape[-1] != D or k_BTKD.shape[:2] != (B, T) or k_BTKD.shape[-1] != D or table_rows not in (T, B * T):
        return False
    status = _library().rotary(
        q_BTND.data_ptr(), k_BTKD.data_ptr(), _DTYPE_CODES[q_BTND.dtype], B * T, N, k_BTKD.shape[2], D,
        cos.data_ptr(), sin.data_ptr(), table_rows,
    )  # fmt: skip
    _check(status, "rotary")
    return True


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """F.silu(gate) * up."""
    if not _takes(gate, up) or gate.shape != up.shape:
        return None
    out = torch.empty_like(gate)
    status = _library().silu_mul(
        gate.data_ptr(), up.data_ptr(), out.data_ptr(), _DTYPE_CODES[gate.dtype], gate.numel(), torch.get_num_threads()
    )
    _check(status, "silu_mul")
    return out


def decode_attention(
    q_BND: torch.Tensor,
    k_BKD: torch.Tensor,
    v_BKD: torch.Tensor,
    k_cache_BKSD: torch.Tensor,
    v_cache_BKSD: torch.Tensor,
    pos: int,
    scale: float,
) -> torch.Tensor | None:
    """Writes the new token's k / v into cache slot `pos`, then attends each query head over slots 0..pos of its
    kv head (grouped-query: N / K query heads per kv head): [B, N, D] out, in q's dtype."""
    if not _takes(q_BND, k_BKD, v_BKD, k_cache_BKSD, v_cache_BKSD):
        return None
    B, N, D = q_BND.shape
    _, K, S, _ = k_cache_BKSD.shape
    if k_BKD.shape != (B, K, D) or v_BKD.shape != (B, K, D) or v_cache_BKSD.shape != k_cache_BKSD.shape:
        return None
    if k_cache_BKSD.shape[0] != B or k_cache_BKSD.shape[-1] != D or N % K or not 0 <= pos < S:
        return None
    out = torch.empty_like(q_BND)
    status = _library().decode_attention(
        q_BND.data_ptr(), k_BKD.data_ptr(), v_BKD.data_ptr(), k_cache_BKSD.data_ptr(), v_cache_BKSD.data_ptr(),
        _DTYPE_CODES[q_BND.dtype], B, N, K, D, S, pos, scale, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _check(status, "decode_attention")
    return out


def decode_layers_entry() -> Callable[..., int]:
    """`ernie45_decode_layers` (all decoder layers of a decode step; its structs live in models/fused_decode.py).
    Raises RuntimeError when the kernels are unavailable."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the decode-op kernels are unavailable (disabled or failed to build)")
    return lib.decode_layers
