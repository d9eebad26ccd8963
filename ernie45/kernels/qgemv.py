"""Decode-time product with weight-only quantized weights on the CPU: y = x @ dequant(Wq)^T (+ bias), W read once
in its packed form (1, 1/2 or 1/4 byte per weight).

Built from `qgemv.c` at first use with the system C compiler and loaded through ctypes, exactly as `gemv.py`
builds `gemv.c` (same cache directory, same `ERNIE45_DISABLE_KERNELS=1` switch). Callers check `supports(...)`
and fall back to the reference dequantize path otherwise. Legend: M rows of x, N output features, K input features.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from . import gemv as gemv_build

logger = logging.getLogger(__name__)

SOURCE_PATH = Path(__file__).with_name("qgemv.c")
MAX_ROWS = 64
"""Most rows of x worth a call: beyond this the product is compute-bound and dequantize + GEMM wins."""

# Must match the enums in qgemv.c.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ERRORS = {
    1: "unsupported dtype",
    2: "bad shape (K or group size not a multiple of 16, or short rows)",
    3: "out of memory",
}


@functools.cache
def _library() -> Callable[..., int] | None:
    """The kernel's entry point, built on first use; None (logged once) if disabled or the build fails."""
    if os.environ.get("ERNIE45_DISABLE_KERNELS") == "1":
        return None
    try:
        lib = ctypes.CDLL(str(gemv_build.build(source=SOURCE_PATH)))
        ptr, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
        prototype = ctypes.CFUNCTYPE(
            i32, ptr, i32, ptr, i32, i64, ptr, ptr, f32, i64, ptr, i32, ptr, i32, i64, i64, i64, i32
        )
        return prototype(("ernie45_qgemv", lib))
    except (RuntimeError, OSError, AttributeError) as e:
        logger.warning("ernie45 quantized gemv kernel unavailable, using the dequantize path: %s", e)
        return None


def available() -> bool:
    """Whether the kernel is enabled and built (the first call compiles it; never raises)."""
    return _library() is not None


def supports(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `qgemv` takes these: kernel available, CPU, x fp32/bf16/fp16 with 1..MAX_ROWS rows, no autograd."""
    if not (x.is_cpu and qweight.is_cpu and x.dtype in _DTYPE_CODES and x.dim() >= 1 and x.shape[-1] > 0):
        return False
    if bias is not None and bias.dtype not in _DTYPE_CODES:
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    rows = x.numel() // x.shape[-1]
    return 1 <= rows <= MAX_ROWS and available()


def qgemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequant(qweight [N, row_bytes], scales fp16 / zeros uint8 [N, K/group_size])^T + bias, in
    x's dtype.

    Symmetric weights pass zeros=None (zero point 2^(bits-1)). Raises RuntimeError if the kernel is unavailable or
    rejects the shapes. The result carries no autograd history.
    """
    fn = _library()
    if fn is None:
        raise RuntimeError("the quantized gemv kernel is unavailable (disabled or failed to build)")
    K = x.shape[-1]
    N = qweight.shape[0]
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"qgemv: {name} must be contiguous")
    if scales.dtype != torch.float16 or (zeros is not None and zeros.dtype != torch.uint8):
        raise ValueError(
            f"qgemv: scales must be fp16 and zeros uint8, got {scales.dtype} and {getattr(zeros, 'dtype', None)}"
        )
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype)
    code = _DTYPE_CODES[x.dtype]
    status = fn(
        x.data_ptr(), code, qweight.data_ptr(), bits, qweight.shape[-1], scales.data_ptr(),
        None if zeros is None else zeros.data_ptr(), float(1 << (bits - 1)), group_size,
        None if bias is None else bias.data_ptr(), 0 if bias is None else _DTYPE_CODES[bias.dtype],
        y.data_ptr(), code, x.numel() // K, N, K, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"qgemv kernel failed: {_ERRORS.get(status, status)}")
    return y
