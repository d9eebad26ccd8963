"""Causal grouped-query attention for training on the CPU (`causal_attention.c`): forward and backward in blocks
whose products run on OpenBLAS (kernels/blas.py), the query heads sharing a kv head stacked into one GEMM.

`attention(q, k, v, scale)` is an autograd function equal to
`F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)` on [B, H, T, D]
transposes, up to fp32 summation order. Taken (`takes`) for CPU fp32 [B, T, H, D] tensors whose head rows are
contiguous, when OpenBLAS is enabled (`blas.enabled`: ERNIE45_BLAS) and the kernel builds; callers use torch's
attention otherwise. Packed sequences (segment masks) are not taken. Legend: B batch, T tokens, N query heads,
K kv heads, D head dim.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import blas
from . import build

EXTRA_FLAGS: tuple[str, ...] = ()
SOURCE_PATH = Path(__file__).with_name("causal_attention.c")
_ERRORS = {1: "bad arguments", 2: "out of memory"}
_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class _Library:
    forward: Callable[..., int]
    backward: Callable[..., int]


def _bind(lib: ctypes.CDLL) -> _Library:
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    shape = (p, i32, i32, i32, i32, i32, f32, p, i64, i64, p, i64, i64, p, i64, i64)
    return _Library(
        forward=ctypes.CFUNCTYPE(i32, *shape, p, p, i32)(("ernie45_causal_attention_forward", lib)),
        backward=ctypes.CFUNCTYPE(i32, *shape, p, p, p, p, p, p, i32)(("ernie45_causal_attention_backward", lib)),
    )


@build.cached_loader
def _library() -> _Library | None:
    return build.load_kernel(SOURCE_PATH, _bind, "causal attention kernel", "using torch's", EXTRA_FLAGS)


def takes(q_BTND: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor) -> bool:
    """CPU fp32 plain [B, T, N, D] / [B, T, K, D] tensors, N a multiple of K, each head's row contiguous, no
    autocast (torch's attention would compute in its dtype), and the kernel enabled and built."""
    ts = (q_BTND, k_BTKD, v_BTKD)
    if torch.is_autocast_enabled("cpu") or not all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32 and t.is_cpu
               and t.dim() == 4 for t in ts):  # fmt: skip
        return False
    (B, T, N, D), (Bk, Tk, K, Dk) = q_BTND.shape, k_BTKD.shape
    return (
        v_BTKD.shape == k_BTKD.shape and (B, T, D) == (Bk, Tk, Dk) and B * T * N * D > 0 and K > 0 and N % K == 0
        and all(t.stride(3) == 1 and t.stride(2) == D and t.stride(1) <= _INT_MAX for t in ts)
        and blas.enabled() and _library() is not None
    )  # fmt: skip


def _geometry(t: torch.Tensor) -> tuple[int, int, int]:
    return t.data_ptr(), t.stride(0), t.stride(1)


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"causal attention {what} failed: {_ERRORS.get(status, status)}")


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BTND, k_BTKD, v_BTKD, scale: float):
        B, T, N, D = q_BTND.shape
        K = k_BTKD.shape[2]
        o_BTND, lse_BNT = torch.empty(B, T, N, D), torch.empty(B, N, T)
        status = _library().forward(blas.sgemm_address(), B, T, N, K, D, scale, *_geometry(q_BTND),
                                    *_geometry(k_BTKD), *_geometry(v_BTKD), o_BTND.data_ptr(), lse_BNT.data_ptr(),
                                    torch.get_num_threads())
        _check(status, "forward")
        ctx.save_for_backward(q_BTND, k_BTKD, v_BTKD, o_BTND, lse_BNT)
        ctx.scale = scale
        return o_BTND

    @staticmethod
    def backward(ctx, grad_o_BTND):
        q_BTND, k_BTKD, v_BTKD, o_BTND, lse_BNT = ctx.saved_tensors
        B, T, N, D = q_BTND.shape
        K = k_BTKD.shape[2]
        grad_o_BTND = grad_o_BTND.contiguous()
        dq, dk, dv = torch.empty(B, T, N, D), torch.empty(B, T, K, D), torch.empty(B, T, K, D)
        status = _library().backward(blas.sgemm_address(), B, T, N, K, D, ctx.scale, *_geometry(q_BTND),
                                     *_geometry(k_BTKD), *_geometry(v_BTKD), o_BTND.data_ptr(),
                                     grad_o_BTND.data_ptr(), lse_BNT.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                                     dv.data_ptr(), torch.get_num_threads())
        _check(status, "backward")
        return dq, dk, dv, None


def attention(q_BTND: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention output [B, T, N, D], with autograd. Check `takes` first."""
    return _CausalAttention.apply(q_BTND, k_BTKD, v_BTKD, scale)
