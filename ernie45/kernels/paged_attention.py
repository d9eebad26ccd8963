"""Decode attention that reads the engine's paged KV cache in place through block tables (`paged_attention.c`).

`attend(...)` runs the sequences of a step that have at most `MAX_QUERY_TOKENS` new tokens (decode rows,
speculative tokens), writing their rows of `out`; it returns False when it does not take the arguments (other
device or dtype, autograd, kernels disabled or not built) and the caller runs torch's attention. The fused decode
step calls the same C function through `entry_address()`. Built like every kernel here (kernels/build.py: one build
per ISA target, `ERNIE45_DISABLE_KERNELS=1`). Legend: R query rows of the step, N query heads, K kv heads, D head
dim, S sequences, B block size, X slots (num_blocks * B).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import build

SOURCE_PATH = Path(__file__).with_name("paged_attention.c")
EXTRA_FLAGS: tuple[str, ...] = ()
MAX_QUERY_TOKENS = 16
"""Most new tokens of one sequence the kernel takes (MAX_QUERY_TOKENS in paged_attention.c)."""

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # scalar_types.h
_ERRORS = {1: "unsupported dtype", 2: "bad shape or block table entry", 3: "out of memory"}


@dataclass(frozen=True)
class _Library:
    attend: Callable[..., int]
    address: int


def _bind(lib: ctypes.CDLL) -> _Library:
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    fn = ctypes.CFUNCTYPE(i32, p, p, i32, p, p, i64, i64, i64, i64, i64, i64, i64, p, i64, p, p, p, f32, i32)(
        ("ernie45_paged_attention", lib)
    )
    return _Library(attend=fn, address=ctypes.cast(fn, ctypes.c_void_p).value)


@build.cached_loader
def _library() -> _Library | None:
    return build.load_kernel(SOURCE_PATH, _bind, "paged attention kernel", "using torch's attention", EXTRA_FLAGS)


def available() -> bool:
    """Whether the kernel is enabled and built (the first call compiles it; never raises)."""
    return _library() is not None


def entry_address() -> int | None:
    """The C entry point's address (for models/fused_decode.py), None when unavailable."""
    lib = _library()
    return None if lib is None else lib.address


def takes(q_RND: torch.Tensor, k_cache_XKD: torch.Tensor) -> bool:
    """CPU fp32/bf16, q in the cache's dtype, both contiguous, no autograd, kernel built (cheap checks)."""
    return (
        q_RND.dtype in _DTYPE_CODES and q_RND.dtype == k_cache_XKD.dtype and q_RND.is_cpu and k_cache_XKD.is_cpu
        and q_RND.is_contiguous() and k_cache_XKD.is_contiguous()
        and not (torch.is_grad_enabled() and q_RND.requires_grad) and _library() is not None
    )  # fmt: skip


def attend(
    q_RND: torch.Tensor,
    k_cache_XKD: torch.Tensor,
    v_cache_XKD: torch.Tensor,
    block_size: int,
    block_tables_SM: torch.Tensor,
    context_lens_S: torch.Tensor,
    q_starts_S: torch.Tensor | None,
    q_lens_S: torch.Tensor | None,
    scale: float,
    out_RND: torch.Tensor,
) -> bool:
    """Sequence s's query rows q_starts[s] .. + q_lens[s] (its last positions, causal among themselves) attend its
    first context_lens[s] tokens, found in blocks block_tables[s] (int32 [S, max blocks]; context_lens, q_starts,
    q_lens int32 [S]; q_starts / q_lens None: row s is sequence s's single new token). Writes those rows of out
    (same dtype and shape as q); other rows are untouched. False when not taken (`takes`)."""
    if not takes(q_RND, k_cache_XKD) or v_cache_XKD.dtype != q_RND.dtype or not v_cache_XKD.is_contiguous():
        return False
    index = [block_tables_SM, context_lens_S] + [t for t in (q_starts_S, q_lens_S) if t is not None]
    if any(t.dtype != torch.int32 or not t.is_contiguous() or not t.is_cpu for t in index):
        return False
    if not out_RND.is_contiguous() or out_RND.shape != q_RND.shape or out_RND.dtype != q_RND.dtype:
        return False
    R, N, D = q_RND.shape
    X, K, Dk = k_cache_XKD.shape
    S, max_blocks = block_tables_SM.shape
    if Dk != D or v_cache_XKD.shape != k_cache_XKD.shape or N % K or X % block_size:
        return False
    status = _library().attend(
        q_RND.data_ptr(), out_RND.data_ptr(), _DTYPE_CODES[q_RND.dtype], k_cache_XKD.data_ptr(),
        v_cache_XKD.data_ptr(), X // block_size, block_size, R, S, N, K, D, block_tables_SM.data_ptr(), max_blocks,
        context_lens_S.data_ptr(), None if q_starts_S is None else q_starts_S.data_ptr(),
        None if q_lens_S is None else q_lens_S.data_ptr(), scale, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"paged attention kernel failed: {_ERRORS.get(status, status)}")
    return True
