"""An MoE layer's routed experts (+ its shared experts) for a few tokens in one C call (`moe_experts.c`): decode.

Each active expert's weights are read once for all the tokens routed to it, by every thread (each takes the same
share of every expert), with gemv.c's row kernels; run op by op from Python the per-expert calls cost as much as
the weights' streaming (models/moe.py measures where the C call wins). `experts(...)` returns None when it does not
take its arguments (other device or dtype, autograd, non-contiguous weights, kernels disabled or not built): the
caller then runs the grouped torch path. Built like `gemv.c` (same cache, same `ERNIE45_DISABLE_KERNELS=1`).
Legend: N tokens, H hidden, K experts per token, E experts, I expert width, S shared width.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import torch

from . import build

SOURCE_PATH = Path(__file__).with_name("moe_experts.c")
EXTRA_FLAGS: tuple[str, ...] = ()

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # scalar_types.h; fp16 weights (F16C builds only) not wired
_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)
_ERRORS = {1: "unsupported dtype", 2: "bad shape", 3: "out of memory", 4: "expert id out of range"}


def _bind(lib: ctypes.CDLL) -> Callable[..., int]:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    return ctypes.CFUNCTYPE(
        i32, p, i32, p, i64, i64, p, p, i64, p, p, i32, i64, i64, p, p, p, i32, p, p, p, i32, i64, i32
    )(("ernie45_moe_experts", lib))


@build.cached_loader
def _library() -> Callable[..., int] | None:
    return build.load_kernel(SOURCE_PATH, _bind, "MoE experts kernel", "using the grouped torch path", EXTRA_FLAGS)


def available() -> bool:
    """Whether the kernel is enabled and built (the first call compiles it; never raises)."""
    return _library() is not None


def _weight_ok(t: torch.Tensor | None) -> bool:
    return t is None or (t.is_cpu and t.dtype in _DTYPE_CODES and t.is_contiguous()
                         and not (t.requires_grad and torch.is_grad_enabled()))  # fmt: skip


def experts(
    x_NH: torch.Tensor,
    ids_NK: torch.Tensor,
    weights_NK: torch.Tensor,
    gate_up_E2IH: torch.Tensor,
    down_EHI: torch.Tensor,
    shared: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor | None:
    """sum_k weights[n, k] * expert_{ids[n, k]}(x[n]) (+ shared(x[n])) [N, H] in x's dtype, or None if not taken.

    expert_e(x) = down[e] @ (silu(gate[e] @ x) * (up[e] @ x)), gate[e] / up[e] the first / last I rows of
    gate_up[e]. `shared` = (gate [S, H], up [S, H], down [H, S], gate bias, up bias, down bias), biases None or
    [S] / [H], in one dtype. ids must lie in [0, E) (RuntimeError otherwise)."""
    if x_NH.dtype not in _ACTIVATION_DTYPES or not x_NH.is_cpu or x_NH.dim() != 2 or ids_NK.dim() != 2:
        return None
    if x_NH.requires_grad and torch.is_grad_enabled():
        return None
    N, H = x_NH.shape
    if N == 0:  # e.g. a VL step with no vision tokens: that modality's experts get nothing
        return torch.empty_like(x_NH)
    E, two_I, _ = gate_up_E2IH.shape
    if gate_up_E2IH.shape[2] != H or down_EHI.shape != (E, H, two_I // 2) or down_EHI.dtype != gate_up_E2IH.dtype:
        return None
    if not (_weight_ok(gate_up_E2IH) and _weight_ok(down_EHI)) or ids_NK.shape[0] != N:
        return None
    shared_args: list = [None, None, None, 0, None, None, None, 0, 0]
    if shared is not None:
        gate, up, down, gate_bias, up_bias, down_bias = shared
        S = gate.shape[0]
        biases = [b for b in (gate_bias, up_bias, down_bias) if b is not None]
        if gate.shape != (S, H) or up.shape != (S, H) or down.shape != (H, S):
            return None
        if len({t.dtype for t in (gate, up, down)}) != 1 or len({b.dtype for b in biases}) > 1:
            return None
        if not all(_weight_ok(t) for t in (gate, up, down, *biases)):
            return None
        bias_code = _DTYPE_CODES[biases[0].dtype] if biases else 0
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        shared_args = [gate.data_ptr(), up.data_ptr(), down.data_ptr(), _DTYPE_CODES[gate.dtype],
                       ptr(gate_bias), ptr(up_bias), ptr(down_bias), bias_code, S]  # fmt: skip
    lib = _library()
    if lib is None:
        return None
    x = x_NH.contiguous()
    ids = ids_NK.to(torch.int64).contiguous()
    w = weights_NK.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    status = lib(
        x.data_ptr(), _DTYPE_CODES[x.dtype], out.data_ptr(), N, H, ids.data_ptr(), w.data_ptr(), ids.shape[1],
        gate_up_E2IH.data_ptr(), down_EHI.data_ptr(), _DTYPE_CODES[gate_up_E2IH.dtype], E, two_I // 2,
        *shared_args, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"moe_experts kernel failed: {_ERRORS.get(status, status)}")
    return out
