"""Calibrated methods beat RTN where they should: on a layer whose inputs are correlated and unevenly scaled."""

import pytest
import torch

from ernie45.quant.gptq import gptq_quantize, refit_group_params
from ernie45.quant.hqq import hqq_group_params, hqq_quantize
from ernie45.quant.rtn import rtn_quantize
from ernie45.quant.spec import QuantSpec


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    K, n = 128, 1024
    mixing = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    X = (torch.randn(n, K, generator=g) @ mixing) * (torch.rand(K, generator=g) * 3 + 0.1)
    W = torch.randn(48, K, generator=g)
    return W, X, 2 * X.T @ X / n


def output_error(W, X, packed) -> float:
    return float((X @ W.T - X @ packed.dequantize().T).pow(2).mean() / (X @ W.T).pow(2).mean())


@pytest.mark.parametrize(
    "spec", [QuantSpec(8, -1, True), QuantSpec(4, 32), QuantSpec(4, -1), QuantSpec(2, 32)], ids=str
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstructs_layer_outputs_better_than_rtn(layer, spec, act_order):
    W, X, H = layer
    rtn = output_error(W, X, rtn_quantize(W, spec))
    gptq = output_error(W, X, gptq_quantize(W, H, spec, act_order=act_order))
    if spec.bits == 2 and not act_order:
        # At 2 bits in order, GPTQ's min/max grids chase the error-updated weights: no better than RTN here.
        assert gptq < rtn * 1.2
    else:
        assert gptq < rtn * 0.9, (rtn, gptq)


def test_hqq_beats_rtn_at_2_bits_without_data(layer):
    W, _X, _ = layer
    spec = QuantSpec(2, 32)
    weight_error = lambda p: float((p.dequantize() - W).pow(2).mean())
    assert weight_error(hqq_quantize(W, spec)) < 0.8 * weight_error(rtn_quantize(W, spec))


def test_gptq_with_hqq_grids_beats_gptq_at_2_bits(layer):
    W, X, H = layer
    spec = QuantSpec(2, 32)
    for act_order in (False, True):
        gptq = output_error(W, X, gptq_quantize(W, H, spec, act_order=act_order))
        combined = output_error(
            W, X, gptq_quantize(W, H, spec, act_order=act_order, choose_group_params=hqq_group_params)
        )
        assert combined < 0.9 * gptq, (act_order, gptq, combined)


@pytest.mark.parametrize("spec", [QuantSpec(2, 32), QuantSpec(4, 32)], ids=str)
def test_grid_refit_never_worsens_gptq(layer, spec):
    W, X, H = layer
    gptq = gptq_quantize(W, H, spec, act_order=True)
    refit = refit_group_params(W, H, gptq, spec)
    assert torch.equal(refit.qweight, gptq.qweight)  # same codes, new grids
    assert output_error(W, X, refit) <= output_error(W, X, gptq) * 1.001
    if spec.bits == 2:
        assert output_error(W, X, refit) < 0.95 * output_error(W, X, gptq)


def test_unseen_inputs_do_not_break_gptq(layer):
    W, _X, H = layer
    H = H.clone()
    H[:, :16] = 0
    H[:16, :] = 0  # 16 inputs never active in calibration
    packed = gptq_quantize(W, H, QuantSpec(4, 32))
    assert torch.isfinite(packed.dequantize()).all()
