"""F.linear under autograd with every GEMM of forward and backward through `kernels.blas` (OpenBLAS in torch's
thread pool): y = x W^T (+ b), dx = dy W, dW = dy^T x, db = sum dy. Used by `layers.linear` when the product needs
gradients and `takes` says yes; the result equals F.linear's up to fp32 summation order.

Legend: M rows (all leading dims of x flattened), K in features, N out features.
"""

from __future__ import annotations

import torch

from ..kernels import blas


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """CPU fp32 plain tensors, a 2-D weight, at least one row, no autocast (F.linear would compute in its dtype),
    and OpenBLAS enabled (`kernels.blas.enabled`)."""
    return (
        not torch.is_autocast_enabled(x.device.type) and weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and x.numel() > 0
        and (bias is None or (bias.dtype == torch.float32 and type(bias) in (torch.Tensor, torch.nn.Parameter)))
        and blas.takes(x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x, weight.t())
    )  # fmt: skip


class _BlasLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_NK: torch.Tensor, bias_N: torch.Tensor | None) -> torch.Tensor:
        x_MK = x.reshape(-1, x.shape[-1])
        y_MN = blas.mm(x_MK, weight_NK.t())
        if bias_N is not None:
            y_MN += bias_N
        ctx.save_for_backward(x_MK, weight_NK)
        ctx.x_shape, ctx.has_bias = x.shape, bias_N is not None
        return y_MN.view(*x.shape[:-1], weight_NK.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_MK, weight_NK = ctx.saved_tensors
        grad_MN = grad_y.reshape(-1, weight_NK.shape[0])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm(grad_MN, weight_NK).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = _mm(grad_MN.t(), x_MK)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_MN.sum(0)
        return grad_x, grad_w, grad_b


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """OpenBLAS when it takes the operands (the incoming gradient is fp32 like the forward's), else torch."""
    out = blas.mm(a, b)
    return a @ b if out is None else out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through OpenBLAS, with autograd. Check `takes` first."""
    return _BlasLinear.apply(x, weight, bias)
