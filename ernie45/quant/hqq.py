"""2-bit (and 4-bit) quantization by HQQ-style optimisation of each group's scale and zero point.

HQQ (Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023) fits the zero point
to minimise an l_p (p < 1) norm of the weight error by half-quadratic splitting: the sparsity-promoting loss
ignores a few outlier weights instead of stretching every group's grid to cover them, which is what costs RTN and
GPTQ (whose grids come from min/max) most at 2 bits, where a group has only 4 levels.

Two additions, both measured in benchmarks/eval_quant_quality.py:
- a clipping search first (as AWQ/OmniQuant do for the range): per group, the min/max range shrunk by the ratio
  that minimises the weighted error, then HQQ refines the zero point;
- optional per-input weights (diag of the calibration Hessian, i.e. mean x_k^2): errors on inputs with large
  activations count more. Without calibration data every input weighs the same (HQQ is data-free).
Legend: N rows, G groups per row, S group size.
"""

from __future__ import annotations

import torch

from .packing import PackedWeight, round_zeros
from .rtn import codes_for, group_params, pack
from .spec import QuantSpec

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal operator of |x|^p (HQQ's eq. for W_e)."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp(min=1e-8).pow(p - 1))


def _dequant(q, s, z):
    return (q - z[..., None]) * s[..., None]


def hqq_group_params(
    W_NGS: torch.Tensor,
    spec: QuantSpec,
    input_weights_GS: torch.Tensor | None = None,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (clip search) and zero points (HQQ) [..., G] for groups W [..., G, S]; weights [G, S] per input.

    Symmetric formats have no zero point to fit: only the clipping search applies.
    """
    W = W_NGS.float()
    cw = torch.ones(W.shape[-2:]) if input_weights_GS is None else input_weights_GS.float()

    best_err = scale = zero = None
    for ratio in CLIP_RATIOS:
        s, z = group_params(W * ratio, spec)
        err = (cw * (W - _dequant(codes_for(W, s, z, spec), s, _zero_or_sym(z, spec, s))).pow(2)).sum(-1)
        if best_err is None:
            best_err, scale, zero = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, s, scale)
            zero = None if z is None else torch.where(better, z, zero)
    if zero is None:
        return scale, None

    # Half-quadratic splitting on the zero point (scale fixed): W_e = shrink(W - dequant), z = weighted mean.
    best_zero = zero.clone()
    for _ in range(iters):
        q = codes_for(W, scale, zero, spec)
        W_e = _shrink_lp(W - _dequant(q, scale, zero), beta, p)
        zero = round_zeros((cw * (q - (W - W_e) / scale[..., None])).sum(-1) / cw.sum(-1), spec.bits)
        beta *= kappa
        err = (cw * (W - _dequant(codes_for(W, scale, zero, spec), scale, zero)).pow(2)).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_zero = torch.where(better, zero, best_zero)
    return scale, best_zero


def normalised_input_weights(input_weights_K: torch.Tensor | None, K: int, S: int) -> torch.Tensor | None:
    """Per-input error weights [G, S] with mean 1 (None: all equal)."""
    if input_weights_K is None:
        return None
    cw = input_weights_K.float().clamp(min=1e-12)
    return (cw / cw.mean()).view(K // S, S)


def hqq_quantize(
    w_NK: torch.Tensor, spec: QuantSpec, input_weights_K: torch.Tensor | None = None, name: str = "weight"
) -> PackedWeight:
    """Quantize [..., N, K] with clipped min/max scales and HQQ-optimised (fractional) zero points."""
    *lead, K = w_NK.shape
    S = spec.group_size_for(K, name)
    W = w_NK.detach().float().reshape(*lead, K // S, S)
    scale, zero = hqq_group_params(W, spec, normalised_input_weights(input_weights_K, K, S))
    return pack(codes_for(W, scale, zero, spec).reshape(*lead, K), scale, zero, spec, S)


def _zero_or_sym(z: torch.Tensor | None, spec: QuantSpec, s: torch.Tensor) -> torch.Tensor:
    return torch.full_like(s, float(1 << (spec.bits - 1))) if z is None else z
