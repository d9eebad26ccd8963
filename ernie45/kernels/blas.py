"""fp32 matrix products on the CPU through OpenBLAS (the `scipy-openblas32` package), run in torch's thread pool.

Why: torch's x86 wheels multiply fp32 matrices with Intel's MKL, which on AMD CPUs takes a generic code path. On this
project's machine (AMD EPYC, Zen 4) MKL's sgemm reaches 130-160 GFLOP/s at training shapes where OpenBLAS's
AVX-512 kernels reach 180-195 (benchmarks/results/2026-11-28-train.md), and training is ~75% GEMMs.

`parallel_sgemm.c` splits each product between torch's OpenMP threads, each calling OpenBLAS single-threaded
(OpenBLAS's own thread pool would fight torch's for the cores).

Which GEMM runs, by `ERNIE45_BLAS`:
- `auto` (default): OpenBLAS on x86-64 AMD CPUs with AVX-512 when torch's BLAS is MKL, torch's matmul elsewhere
  (on Intel CPUs MKL is tuned; other CPUs were not measured);
- `openblas`: OpenBLAS wherever it loads; `torch`: never OpenBLAS.
`ERNIE45_DISABLE_KERNELS=1` turns it off too. When OpenBLAS or the C compiler is missing, `mm` returns None and
callers use torch's matmul.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import build

logger = logging.getLogger(__name__)

SOURCE_PATH = Path(__file__).with_name("parallel_sgemm.c")
EXTRA_FLAGS: tuple[str, ...] = ()
CHOICES = ("auto", "openblas", "torch")

_NO_TRANS, _TRANS = 111, 112  # cblas
_INT_MAX = 2**31 - 1  # OpenBLAS's 32-bit integer interface


@dataclass(frozen=True)
class _Library:
    sgemm_address: int
    """OpenBLAS's `cblas_sgemm`, called by the C split."""
    parallel_sgemm: Callable[..., int]
    corename: str


def choice() -> str:
    """`ERNIE45_BLAS`, checked: auto, openblas or torch."""
    value = os.environ.get("ERNIE45_BLAS", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"ERNIE45_BLAS={value!r} is not one of {', '.join(CHOICES)}")
    return value


def _cpuinfo_field(name: str) -> str:
    """The first `name : value` of /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            line = next((line for line in f if line.startswith(name)), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


@functools.cache
def auto_prefers_openblas() -> bool:
    """The `auto` rule: an x86-64 AMD CPU with AVX-512 (Zen 4 and later: OpenBLAS's AVX-512 kernels, where MKL
    takes its generic path), and torch multiplying with MKL. The case measured; elsewhere torch's GEMM stays."""
    return (platform.machine() in ("x86_64", "AMD64") and _cpuinfo_field("vendor_id") == "AuthenticAMD"
            and "avx512f" in _cpuinfo_field("flags").split() and torch.backends.mkl.is_available())  # fmt: skip


@build.cached_loader
def _library() -> _Library | None:
    try:
        import scipy_openblas32
    except ImportError:
        logger.warning("ERNIE45_BLAS asks for OpenBLAS but the scipy-openblas32 package is not installed")
        return None
    try:
        openblas = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True)))
        # Single-threaded calls: the threads are torch's (parallel_sgemm.c).
        openblas.scipy_openblas_set_num_threads(1)
        openblas.scipy_openblas_get_corename.restype = ctypes.c_char_p
        split = build.load_library(build.build_for(SOURCE_PATH, extra_flags=EXTRA_FLAGS))
        i32, p, f32 = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        parallel_sgemm = ctypes.CFUNCTYPE(i32, p, i32, i32, i32, i32, i32, p, i32, p, i32, f32, p, i32, i32)(
            ("ernie45_parallel_sgemm", split))
        return _Library(sgemm_address=ctypes.cast(openblas.scipy_cblas_sgemm, p).value,
                        parallel_sgemm=parallel_sgemm,
                        corename=openblas.scipy_openblas_get_corename().decode())
    except (RuntimeError, OSError, AttributeError) as e:
        logger.warning("OpenBLAS GEMM unavailable, using torch's: %s", e)
        return None


def enabled() -> bool:
    """Whether `mm` multiplies with OpenBLAS in this process (by `ERNIE45_BLAS` and what loads). Cheap: called for
    every product (the CPU rule and the library are looked up once)."""
    if os.environ.get("ERNIE45_DISABLE_KERNELS") == "1":
        return False
    wanted = choice()
    if wanted == "torch" or (wanted == "auto" and not auto_prefers_openblas()):
        return False
    return _library() is not None


def sgemm_address() -> int:
    """The address of OpenBLAS's `cblas_sgemm` (single-threaded here) for C kernels that call it on blocks of their
    own inside torch's threads (kernels/causal_attention.c). Only when `enabled()`."""
    if not enabled():
        raise RuntimeError("OpenBLAS is not enabled in this process (ERNIE45_BLAS, or it failed to load)")
    return _library().sgemm_address


def describe() -> str:
    """One line for logs and benchmarks: which GEMM training's linear layers use."""
    if not enabled():
        return "torch"
    return f"openblas ({_library().corename} kernels, split over {torch.get_num_threads()} torch threads)"


def _operand(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(tensor, cblas transpose flag, row stride) for a 2-D fp32 matrix as stored: row-major as is, a transposed
    view as the transpose of its row-major storage; any other layout (broadcast, strided both ways) is copied."""
    rows, cols = t.shape
    if t.stride(1) == 1 and (rows == 1 or t.stride(0) >= cols):
        return t, _NO_TRANS, cols if rows == 1 else t.stride(0)
    if t.stride(0) == 1 and (cols == 1 or t.stride(1) >= rows):
        return t, _TRANS, rows if cols == 1 else t.stride(1)
    return t.contiguous(), _NO_TRANS, cols


def takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """CPU fp32 plain tensors [M, K] @ [K, N], non-empty, within OpenBLAS's 32-bit sizes, and OpenBLAS enabled."""
    return (
        type(a) in (torch.Tensor, torch.nn.Parameter) and type(b) in (torch.Tensor, torch.nn.Parameter)
        and a.dtype == torch.float32 and b.dtype == torch.float32 and a.is_cpu and b.is_cpu
        and a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0] and a.numel() > 0 and b.numel() > 0
        and max(*a.shape, *b.shape, *a.stride(), *b.stride()) <= _INT_MAX and enabled()
    )  # fmt: skip


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """a @ b for [M, K] and [K, N] (any strides; transposed views cost no copy), a new contiguous [M, N]; None when
    not taken (`takes`), for the caller to use torch's matmul. No autograd: callers wrap it (models.training_linear)."""
    if not takes(a, b):
        return None
    M, N, K = a.shape[0], b.shape[1], a.shape[1]
    a, trans_a, lda = _operand(a.detach())
    b, trans_b, ldb = _operand(b.detach())
    c = torch.empty(M, N)
    status = _library().parallel_sgemm(_library().sgemm_address, trans_a, trans_b, M, N, K, a.data_ptr(), lda,
                                       b.data_ptr(), ldb, 0.0, c.data_ptr(), N, torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"parallel_sgemm failed (status {status}) for [{M}, {K}] @ [{K}, {N}]")
    return c
