"""Token cross-entropy in C for training's LM head (`cross_entropy.c`): per-row loss and log-sum-exp in one pass
over the logits, and the gradient written over the logits in a second, where torch's log_softmax + nll_loss read
and write the [M, V] logits five times (benchmarks/results/2026-11-28-train.md).

Both functions take CPU fp32/bf16 logits [M, V] (contiguous) and int64 targets [M], and return None / False when
they do not take their arguments (other device or dtype, kernels disabled or not built): the caller then runs
`F.cross_entropy`. Built like `gemv.c` (same cache, same `ERNIE45_DISABLE_KERNELS=1` switch). Legend: M rows, V
vocabulary.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import build

EXTRA_FLAGS: tuple[str, ...] = ()
SOURCE_PATH = Path(__file__).with_name("cross_entropy.c")

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # must match scalar_types.h
_BAD_TARGET = 3


@dataclass(frozen=True)
class _Library:
    forward: Callable[..., int]
    backward: Callable[..., int]


def _bind(lib: ctypes.CDLL) -> _Library:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    signature = ctypes.CFUNCTYPE(i32, p, i32, i64, i64, p, i64, p, p, i32)
    return _Library(forward=signature(("ernie45_cross_entropy_forward", lib)),
                    backward=signature(("ernie45_cross_entropy_backward", lib)))


@build.cached_loader
def _library() -> _Library | None:
    return build.load_kernel(SOURCE_PATH, _bind, "cross-entropy kernel", "using torch's", EXTRA_FLAGS)


def available() -> bool:
    """Whether the kernel is enabled and built (the first call compiles it; never raises)."""
    return _library() is not None


def takes(logits_MV: torch.Tensor, targets_M: torch.Tensor) -> bool:
    """CPU fp32/bf16 contiguous [M, V] logits with int64 [M] targets, and the kernel built."""
    return (
        logits_MV.dtype in _DTYPE_CODES and logits_MV.dim() == 2 and logits_MV.is_cpu and logits_MV.is_contiguous()
        and targets_M.dtype == torch.int64 and targets_M.shape == logits_MV.shape[:1] and targets_M.is_cpu
        and targets_M.is_contiguous() and logits_MV.shape[1] > 0 and available()
    )  # fmt: skip


def _check(status: int, targets_M: torch.Tensor, V: int, ignore_index: int) -> None:
    if status == _BAD_TARGET:
        bad = targets_M[(targets_M != ignore_index) & ((targets_M < 0) | (targets_M >= V))]
        raise IndexError(f"cross-entropy target {int(bad[0])} is out of bounds for a vocabulary of {V} "
                         f"(targets must be in [0, {V}) or {ignore_index} to ignore)")
    if status != 0:
        raise RuntimeError(f"cross_entropy kernel failed (status {status})")


def forward(logits_MV: torch.Tensor, targets_M: torch.Tensor, ignore_index: int
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(loss [M] fp32, 0 where ignored; logsumexp [M] fp32 for `backward_`), or None when not taken."""
    if not takes(logits_MV, targets_M):
        return None
    M, V = logits_MV.shape
    loss, lse = torch.empty(M), torch.empty(M)
    status = _library().forward(logits_MV.data_ptr(), _DTYPE_CODES[logits_MV.dtype], M, V, targets_M.data_ptr(),
                                ignore_index, loss.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    _check(status, targets_M, V, ignore_index)
    return loss, lse


def backward_(logits_MV: torch.Tensor, targets_M: torch.Tensor, ignore_index: int, lse_M: torch.Tensor,
              grad_M: torch.Tensor) -> None:
    """Overwrites the logits with d(sum_m grad[m] * loss[m]) / d logits (rows of ignored targets: zeros). The
    logits must be the unmodified ones `forward` saw, and must take (`takes`)."""
    if not takes(logits_MV, targets_M):
        raise ValueError("cross_entropy.backward_ needs the logits and targets `forward` took")
    M, V = logits_MV.shape
    lse_M, grad_M = lse_M.float().contiguous(), grad_M.float().contiguous()
    if lse_M.shape != (M,) or grad_M.shape != (M,):
        raise ValueError(f"lse and grad must be [{M}], got {list(lse_M.shape)} and {list(grad_M.shape)}")
    status = _library().backward(logits_MV.data_ptr(), _DTYPE_CODES[logits_MV.dtype], M, V, targets_M.data_ptr(),
                                 ignore_index, lse_M.data_ptr(), grad_M.data_ptr(), torch.get_num_threads())
    _check(status, targets_M, V, ignore_index)
