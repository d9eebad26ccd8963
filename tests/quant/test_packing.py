"""Packing is an exact bijection per bit width; RTN's grid keeps zero exact and errors within half a step."""

import pytest
import torch

from ernie45.quant.packing import pack_codes, row_bytes, unpack_codes
from ernie45.quant.rtn import rtn_quantize
from ernie45.quant.spec import QuantSpec


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("K", [16, 48, 64, 160])
def test_pack_unpack_round_trip_is_exact(bits, K):
    codes = torch.randint(0, 1 << bits, (3, 7, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(K))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 7, row_bytes(K, bits))
    assert torch.equal(unpack_codes(packed, bits, K), codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packed_size_is_bits_per_weight(bits):
    assert row_bytes(4096, bits) == 4096 * bits // 8


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_about_half_a_step(bits, symmetric):
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    packed = rtn_quantize(w, QuantSpec(bits, 32, symmetric))
    step = packed.scales.float().repeat_interleave(32, dim=1)
    err = (packed.dequantize() - w).abs()
    # Inside the grid the error is at most half a step; the integral zero point (asymmetric) or the unused lowest
    # level (symmetric) may leave a group's extreme weight up to one step away.
    assert (err <= step / 2 + 1e-6).float().mean() > 0.97
    assert torch.all(err <= step + 1e-6)


def test_rtn_keeps_zero_exact():
    w = torch.randn(8, 64)
    w[:, :16] = 0.0
    assert torch.all(rtn_quantize(w, QuantSpec(4, 16)).dequantize()[:, :16] == 0)
