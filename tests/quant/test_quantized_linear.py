"""The fused kernel and the reference dequantize path compute x @ dequant(W)^T; experts as the dense grouped path."""

import pytest
import torch

from ernie45.kernels import qgemv
from ernie45.models.layers import shared_input_projections
from ernie45.quant.packing import PackedWeight, pack_codes
from ernie45.quant.quantize import stack
from ernie45.quant.quantized_linear import QuantizedExperts, QuantizedLinear
from ernie45.quant.rtn import rtn_quantize
from ernie45.quant.spec import QuantSpec

from .tiny_experts import tiny_experts

SPECS = [
    QuantSpec(8, -1, True),
    QuantSpec(8, 32, False),
    QuantSpec(8, 128, False),
    QuantSpec(4, 32, False),
    QuantSpec(4, 16, True),
    QuantSpec(4, 64, False),
    QuantSpec(4, 128, True),
    QuantSpec(2, 16, False),
    QuantSpec(2, 64, False),
]


def build(spec: QuantSpec, N=40, K=128, bias=True, seed=0) -> tuple[QuantizedLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    packed = rtn_quantize(torch.randn(N, K, generator=g), spec)
    b = torch.randn(N, generator=g) if bias else None
    module = QuantizedLinear.from_packed(packed, spec, b)
    return module, packed.dequantize()


def test_kernel_builds():
    assert qgemv.available()


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 40])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_matches_dequantized_reference(spec, rows, path):
    module, w = build(spec)
    module.use_kernel = path == "kernel"
    x = torch.randn(rows, 128)
    with torch.no_grad():
        y = module(x)
    expected = x @ w.T + module.bias
    assert_within_kernel_error(y, expected, x, w, spec, kernel=path == "kernel")


def assert_within_kernel_error(y, expected, x, w, spec, kernel):
    """fp32-close, except that the integer path may also move each output by its documented rounding bound."""
    atol = torch.full_like(expected, 1e-4)
    group_size = spec.group_size_for(x.shape[-1])
    if kernel and qgemv.uses_integer_path(spec.bits, group_size):
        atol = atol + qgemv.integer_path_error_bound(x, w, group_size) * 1.001
    assert ((y - expected).abs() <= atol + 1e-4 * expected.abs()).all(), (y - expected).abs().max()


def test_kernel_matches_dequantized_reference_on_every_isa(kernel_isa):
    """Every build the CPU runs (generic: the float path only; AVX2: vpmaddubsw integer path, 8-lane float path;
    AVX-512; VNNI: vpdpbusd), for every format, at decode and prefill row counts."""
    for spec in SPECS:
        packed = rtn_quantize(torch.randn(40, 256, generator=torch.Generator().manual_seed(1)), spec)
        w = packed.dequantize()
        for rows in (1, 2, 3, 16, 64):
            x = torch.randn(rows, 256)
            y = qgemv.qgemv(x, packed.qweight, packed.scales, packed.zeros, packed.bits, packed.group_size)
            assert_within_kernel_error(y, x @ w.T, x, w, spec, kernel=True)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_integer_path_sums_stay_inside_int32_at_the_largest_group(kernel_isa, bits):
    """The worst case of the int32 sums (qgemv.c, rows_int): every code at its maximum and every x at its group's
    maximum |x|, in one group of 4096 (the largest the integer path takes), of both signs. An overflow would wrap
    by 2^32 * scale: far outside the rounding bound."""
    K, top = 4096, (1 << bits) - 1
    packed = rtn_quantize(torch.randn(4, K, generator=torch.Generator().manual_seed(4)), QuantSpec(bits, K, False))
    codes = torch.full((4, K), top, dtype=torch.uint8)
    codes[1] = 0  # the most negative code on the signed (AVX2 8-bit) path
    codes[2, ::2] = 0
    packed.qweight.copy_(pack_codes(codes, bits))
    w = packed.dequantize()
    for sign in (1.0, -1.0):
        x = torch.full((1, K), sign * 3.0)
        y = qgemv.qgemv(x, packed.qweight, packed.scales, packed.zeros, bits, K)
        assert qgemv.uses_integer_path(bits, K)
        assert_within_kernel_error(y, x @ w.T, x, w, QuantSpec(bits, K, False), kernel=True)


def test_integer_path_error_is_small_next_to_bf16_rounding():
    """The integer path's x rounding (16-bit per group) is far finer than running the product with x in bf16."""
    spec = QuantSpec(4, 128, False)
    packed = rtn_quantize(torch.randn(256, 1024, generator=torch.Generator().manual_seed(2)), spec)
    w = packed.dequantize()
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(3))
    y = qgemv.qgemv(x, packed.qweight, packed.scales, packed.zeros, 4, 128)
    exact = x.double() @ w.double().T
    bf16 = x.bfloat16().double() @ w.double().T
    assert (y.double() - exact).abs().max() < 0.05 * (bf16 - exact).abs().max()


def test_kernel_takes_bf16_activations_and_leading_dims():
    module, w = build(QuantSpec(4, 32))
    x = torch.randn(2, 3, 128).bfloat16()
    with torch.no_grad():
        y = module(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ w.T + module.bias, rtol=2e-2, atol=5e-2)


def test_prefill_rows_use_reference_path_and_grad_flows_to_input():
    module, w = build(QuantSpec(4, 32), bias=False)
    x = torch.randn(100, 128, requires_grad=True)
    module(x).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(100, 128), rtol=1e-4, atol=1e-4)


def test_quantized_experts_equal_dense_experts_with_dequantized_weights():
    dense = tiny_experts()
    spec = QuantSpec(4, 16)
    gate_up: PackedWeight = stack([rtn_quantize(dense.gate_up_proj[e].detach(), spec) for e in range(4)])
    down: PackedWeight = stack([rtn_quantize(dense.down_proj[e].detach(), spec) for e in range(4)])
    quantized = QuantizedExperts(QuantizedLinear.from_packed(gate_up, spec), QuantizedLinear.from_packed(down, spec))
    with torch.no_grad():
        dense.gate_up_proj.copy_(gate_up.dequantize())
        dense.down_proj.copy_(down.dequantize())
    for tokens in (1, 5, 200):  # decode rows hit the kernel, prefill the reference path
        x = torch.randn(tokens, 32)
        idx = torch.randint(0, 4, (tokens, 2))
        w = torch.rand(tokens, 2)
        with torch.no_grad():
            torch.testing.assert_close(quantized(x, idx, w), dense(x, idx, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 5, 100])
def test_shared_input_projections_in_one_call_equal_separate_calls(rows):
    """q/k/v-like linears (different widths, one with bias, symmetric and not) through one grouped kernel call."""
    specs = [QuantSpec(4, 64, False), QuantSpec(4, 64, True), QuantSpec(4, 64, False)]
    modules = tuple(build(spec, N=n, K=128, bias=b, seed=i)[0]
                    for i, (spec, n, b) in enumerate(zip(specs, (48, 16, 16), (False, True, False))))
    x = torch.randn(rows, 128)
    with torch.no_grad():
        grouped = shared_input_projections(x, modules)
        separate = tuple(m(x) for m in modules)
    assert len(grouped) == 3
    for g, s in zip(grouped, separate):
        assert torch.equal(g, s)
    assert (len(modules[0]._group_calls) == 1) == (rows <= qgemv.MAX_ROWS)


def test_shared_input_projections_call_hooked_modules_one_by_one():
    modules = tuple(build(QuantSpec(4, 64, False), N=16, seed=i)[0] for i in range(2))
    seen = []
    modules[1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        shared_input_projections(torch.randn(1, 128), modules)
    assert seen == [torch.Size([1, 16])] and not modules[0]._group_calls


def test_mixed_formats_are_not_grouped():
    modules = (build(QuantSpec(4, 64, False), N=16)[0], build(QuantSpec(2, 64, False), N=16)[0])
    x = torch.randn(1, 128)
    with torch.no_grad():
        assert QuantizedLinear.forward_group(x, modules) is None
        outputs = shared_input_projections(x, modules)
    assert [o.shape for o in outputs] == [torch.Size([1, 16])] * 2


def test_grouped_call_refuses_too_many_weights():
    module = build(QuantSpec(4, 64, False), N=16)[0]
    weights = [(module.qweight, module.scales, module.qzeros, None)] * (qgemv.MAX_WEIGHTS + 1)
    with pytest.raises(ValueError, match="1..8 weights"):
        qgemv.PreparedQgemv(weights, 4, 64)


def test_prepared_kernel_call_follows_replaced_tensors():
    """Assigning new scales / zero points (not loading in place) must not leave the kernel reading the old ones."""
    module, _ = build(QuantSpec(4, 64, False), N=16, seed=0)
    other, _ = build(QuantSpec(4, 64, False), N=16, seed=1)
    x = torch.randn(1, 128)
    with torch.no_grad():
        before = module(x)  # prepares the call on the first tensors
        module.scales = other.scales
        module.qzeros = other.qzeros
        y = module(x)
        w = module.dequantized_weight()
    assert not torch.allclose(y, before)
    assert_within_kernel_error(y, x @ w.T + module.bias, x, w, QuantSpec(4, 64, False), kernel=True)
