"""Round-to-nearest (RTN) quantization: per-group min/max (asymmetric) or absmax (symmetric) scales, codes rounded.

Also the shared helpers every method ends with: codes from given scales/zeros, and packing into a PackedWeight.
Legend: N rows, K input features, G groups per row, S group size.
"""

from __future__ import annotations

import torch

from .packing import PackedWeight, encode_zeros, pack_codes, symmetric_zero
from .spec import QuantSpec

_MIN_SCALE = 1e-6
"""Floor for scales of all-zero (or constant) groups; fp16 still represents it (subnormal range starts at 6e-8)."""


def group_params(w_NGS: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales [N, G] (already rounded to fp16, in fp32) and zero points [N, G] (None if symmetric) by min/max."""
    w = w_NGS.float()
    if spec.symmetric:
        amax = w.abs().amax(dim=-1)
        scale = amax / ((1 << (spec.bits - 1)) - 1)
        return scale.clamp(min=_MIN_SCALE).half().float(), None
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    # The range includes 0 so that zero weights (and padding) stay exactly representable.
    scale = ((hi - lo) / spec.max_code).clamp(min=_MIN_SCALE).half().float()
    zero = (-lo / scale).round().clamp(0, spec.max_code)
    return scale, zero


def codes_for(
    w_NGS: torch.Tensor, scale_NG: torch.Tensor, zero_NG: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Nearest codes [N, G, S] (float, integral) for weights given each group's scale and zero point."""
    z = symmetric_zero(spec.bits) if zero_NG is None else zero_NG[..., None]
    return (w_NGS.float() / scale_NG[..., None] + z).round().clamp(0, spec.max_code)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, group_size: int) -> torch.Tensor:
    """quantize then dequantize with RTN (same shape and dtype); used by QAT and by error measurements."""
    *lead, K = w.shape
    w_NGS = w.float().reshape(*lead, K // group_size, group_size)
    scale, zero = group_params(w_NGS, spec)
    q = codes_for(w_NGS, scale, zero, spec)
    z = symmetric_zero(spec.bits) if zero is None else zero[..., None]
    return ((q - z) * scale[..., None]).reshape(w.shape).to(w.dtype)


def pack(
    codes_NK: torch.Tensor, scale_NG: torch.Tensor, zero_NG: torch.Tensor | None, spec: QuantSpec, group_size: int
) -> PackedWeight:
    """Codes and group parameters -> the stored format (fp16 scales, uint8 zero points: `zero_NG` must already be
    on the stored grid, as integral or `round_zeros`-ed zeros are)."""
    return PackedWeight(
        qweight=pack_codes(codes_NK.to(torch.uint8), spec.bits),
        scales=scale_NG.half().contiguous(),
        zeros=None if zero_NG is None else encode_zeros(zero_NG, spec.bits).contiguous(),
        bits=spec.bits,
        group_size=group_size,
        in_features=codes_NK.shape[-1],
    )


def rtn_quantize(w: torch.Tensor, spec: QuantSpec, name: str = "weight") -> PackedWeight:
    """RTN-quantize a weight [..., N, K] (a leading expert dim is quantized row by row like any other)."""
    *lead, K = w.shape
    G = spec.group_size_for(K, name)
    w_NGS = w.detach().float().reshape(*lead, K // G, G)
    scale, zero = group_params(w_NGS, spec)
    # Zero points are integral here, so their uint8 storage is exact; scales were rounded to fp16 before the codes.
    codes = codes_for(w_NGS, scale, zero, spec).reshape(*lead, K)
    return pack(codes, scale, zero, spec, G)
