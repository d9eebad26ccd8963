"""Matrix-vector product for decode on the CPU: y = x @ W^T (+ bias) for 1..16 rows of x, W read once.

Decode is memory-bound and torch's small-M matmuls reach a fraction of the machine's read bandwidth, so this
module builds `gemv.c` with the system C compiler at first use (kernels/build.py: the ISA target, the cache,
`ERNIE45_DISABLE_KERNELS=1`) and calls it through ctypes. Callers check `supports(x, weight)` (which includes
`available()`) and fall back to `F.linear` otherwise. Legend: M rows of x, N output features, K input features.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import build

MAX_ROWS = 16
"""Most rows of x per call: beyond this the product is compute-bound and a real GEMM wins."""

SOURCE_PATH = Path(__file__).with_name("gemv.c")
EXTRA_FLAGS: tuple[str, ...] = ()
"""Flags this kernel adds to its target's."""

# Must match the enum in gemv.c.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ERRORS = {1: "unsupported dtype", 2: "empty shape", 3: "out of memory"}


@dataclass(frozen=True)
class GemvLibrary:
    """A built and loaded gemv.c."""

    gemv: Callable[..., int]
    dtype_codes: dict[torch.dtype, int]
    """The dtypes this build takes (fp16 only with F16C) and their codes in gemv.c."""


def bind(lib: ctypes.CDLL) -> GemvLibrary:
    """Declare a loaded gemv library's functions' signatures."""
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    # A prototype call converts its arguments ~30% faster than a CDLL attribute with argtypes set (~1.7 vs 2.5 us).
    prototype = ctypes.CFUNCTYPE(i32, ptr, i32, ptr, i32, ptr, i32, ptr, i32, i64, i64, i64, i32)
    gemv = prototype(("ernie45_gemv", lib))
    supports_fp16 = ctypes.CFUNCTYPE(i32)(("ernie45_gemv_supports_fp16", lib))()
    codes = dict(_DTYPE_CODES) if supports_fp16 else {d: c for d, c in _DTYPE_CODES.items() if d != torch.float16}
    return GemvLibrary(gemv=gemv, dtype_codes=codes)


@build.cached_loader
def _library() -> GemvLibrary | None:
    """The process's gemv library, built on first use for the active ISA target; None (logged once) if disabled
    or the build fails. The environment (ERNIE45_DISABLE_KERNELS, ERNIE45_KERNEL_ISA, CC, the cache dir) is read
    at that first use."""
    return build.load_kernel(SOURCE_PATH, bind, "gemv kernel", "falling back to F.linear", EXTRA_FLAGS)


def available() -> bool:
    """Whether the kernel is enabled and built (the first call compiles it; never raises)."""
    return _library() is not None


def _unsupported_reason(
    lib: GemvLibrary, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> str | None:
    """Why gemv cannot take these arguments, or None if it can. Cheap checks only: it runs on every call."""
    codes = lib.dtype_codes
    if not (x.is_cpu and weight.is_cpu and (bias is None or bias.is_cpu)):
        return f"CPU tensors only, got x on {x.device}, weight on {weight.device}" + (
            "" if bias is None else f", bias on {bias.device}"
        )
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in codes:
            return f"{name} dtype {t.dtype} is not one of {', '.join(map(str, codes))}"
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return f"need x [..., K] and weight [N, K], got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
    if weight.numel() == 0:
        return f"weight {tuple(weight.shape)} is empty"
    rows = x.numel() // x.shape[-1]
    if not 1 <= rows <= MAX_ROWS:
        return f"x has {rows} rows; gemv takes 1..{MAX_ROWS} (use F.linear for more)"
    if not weight.is_contiguous():
        return "weight must be contiguous (copying it every call would cost more than the product)"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0] or not bias.is_contiguous()):
        return f"bias must be a contiguous [{weight.shape[0]}] tensor, got {tuple(bias.shape)}"
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return "gemv has no backward; call it under torch.no_grad() or torch.inference_mode()"
    return None


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `gemv(x, weight, bias)` will run: kernel available, CPU tensors, fp32/bf16 (fp16 with F16C),
    1..16 rows of x, contiguous weight, no autograd needed."""
    lib = _library()
    return lib is not None and _unsupported_reason(lib, x, weight, bias) is None


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [..., K] with 1..16 rows, in x's dtype, accumulated in fp32.

    Raises ValueError for arguments it does not take (see `supports`), RuntimeError if the kernel is unavailable.
    The result carries no autograd history.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the gemv kernel is unavailable (disabled or failed to build); check available() first")
    reason = _unsupported_reason(lib, x, weight, bias)
    if reason is not None:
        raise ValueError(f"gemv: {reason}")
    if not x.is_contiguous():
        x = x.contiguous()
    if bias is None:
        bias_ptr, bias_code = None, 0
    else:
        bias_ptr, bias_code = bias.data_ptr(), lib.dtype_codes[bias.dtype]
    N, K = weight.shape
    x_code = lib.dtype_codes[x.dtype]
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype)
    status = lib.gemv(
        x.data_ptr(), x_code, weight.data_ptr(), lib.dtype_codes[weight.dtype], bias_ptr, bias_code,
        y.data_ptr(), x_code, x.numel() // K, N, K, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"gemv kernel failed: {_ERRORS.get(status, status)}")
    return y
