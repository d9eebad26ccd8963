"""The routed-experts seam (`Experts.forward`): the C decode kernel (kernels/moe_experts.c) on every ISA target
against a float64 reference, and the kernel path against the grouped torch path through the module.

Tolerances: each output element is a sum over experts of down (K = I) of products of gate/up dots (K = H), all in
fp32, so its error is at most about (H + I + 2) * 2^-24 times the same expression evaluated on absolute values
(`magnitude`, SiLU's slope bounded by 1.1), doubled for exp_f32's own 2e-7; bf16 outputs add their rounding
(2^-8 relative). Legend: N tokens, H hidden, E experts, K experts per token, I expert width, S shared width.
"""

import pytest
import torch
import torch.nn.functional as F

from ernie45.kernels import moe_experts
from ernie45.models.config import Ernie45Config
from ernie45.models.moe import KERNEL_MAX_TOKENS, MoeBlock

U = 2.0**-24


def random_case(N, H, E, K, I, S, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: (torch.randn(*shape, generator=g) * s).to(dtype)  # noqa: E731
    x = r(N, H, s=1.0)
    gate_up, down = r(E, 2 * I, H), r(E, H, I)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    weights = torch.rand(N, K, generator=g)
    shared = None
    if S:
        shared = (r(S, H), r(S, H), r(H, S)) + ((r(S), r(S), r(H)) if bias else (None, None, None))
    return x, ids, weights, gate_up, down, shared


def swiglu64(x, gate, up, down, biases=(None, None, None), absolute=False):
    """down(silu(gate x + b) * (up x + b)) + b in float64; with `absolute`, the bound's magnitude instead."""
    f = (lambda t: None if t is None else t.double().abs()) if absolute else (lambda t: None if t is None else t.double())
    x, gate, up, down = f(x), f(gate), f(up), f(down)
    gb, ub, db = (f(b) for b in biases)
    g = x @ gate.T + (0 if gb is None else gb)
    u = x @ up.T + (0 if ub is None else ub)
    a = g * 1.1 * u if absolute else F.silu(g) * u
    return a @ down.T + (0 if db is None else db)


def reference(x, ids, weights, gate_up, down, shared, absolute=False):
    out = torch.zeros(x.shape, dtype=torch.float64)
    I = gate_up.shape[1] // 2
    for n in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[n, k])
            y = swiglu64(x[n : n + 1], gate_up[e, :I], gate_up[e, I:], down[e], absolute=absolute)[0]
            out[n] += weights[n, k].double() * y
    if shared is not None:
        out += swiglu64(x, *shared[:3], shared[3:], absolute=absolute)
    return out


CASES = {
    "decode_1_token": (1, 64, 8, 2, 16, 32, False),
    "odd_sizes": (5, 40, 6, 3, 20, 0, False),  # H, I not multiples of the vector width
    "shared_with_bias": (7, 64, 8, 2, 24, 40, True),
    "every_expert_many_rows": (33, 96, 4, 3, 32, 48, False),  # > 8 rows per expert: several row tiles
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_float64_reference(kernel_isa, case, dtype):
    N, H, E, K, I, S, bias = CASES[case]
    x, ids, weights, gate_up, down, shared = random_case(N, H, E, K, I, S, bias, dtype)
    with torch.inference_mode():
        y = moe_experts.experts(x, ids, weights, gate_up, down, shared)
    assert y is not None and y.dtype == dtype and y.shape == (N, H)
    ref = reference(x, ids, weights, gate_up, down, shared)
    bound = 2 * (H + max(I, S) + 2) * U * reference(x, ids, weights, gate_up, down, shared, absolute=True)
    if dtype == torch.bfloat16:
        bound += 2.0**-8 * ref.abs()  # bf16 keeps 8 significant bits: unit roundoff 2^-8
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def test_kernel_declines_what_it_does_not_take():
    x, ids, weights, gate_up, down, _ = random_case(2, 32, 4, 2, 8, 0, False, torch.float32)
    assert moe_experts.experts(x.half(), ids, weights, gate_up, down) is None
    assert moe_experts.experts(x, ids, weights, gate_up.transpose(1, 2).contiguous(), down) is None  # shapes
    with torch.enable_grad():
        assert moe_experts.experts(x.requires_grad_(), ids, weights, gate_up, down) is None
    with pytest.raises(RuntimeError, match="expert id out of range"):
        moe_experts.experts(x.detach(), ids + 4, weights, gate_up, down)


def tiny_block(shared_experts: int, use_bias: bool = False) -> MoeBlock:
    config = Ernie45Config(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=12, moe_num_experts=8, moe_k=3,
                           moe_intermediate_size=16, moe_num_shared_experts=shared_experts, use_bias=use_bias,
                           moe_layer_start_index=0)  # fmt: skip
    block = MoeBlock(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


@pytest.mark.parametrize("tokens", [1, 5, KERNEL_MAX_TOKENS])
@pytest.mark.parametrize("shared_experts,use_bias", [(0, False), (2, False), (1, True)])
def test_kernel_path_equals_grouped_torch_path(tokens, shared_experts, use_bias):
    block = tiny_block(shared_experts, use_bias)
    x = torch.randn(tokens, 48)
    with torch.inference_mode():
        _, w, idx = block.gate(x, block.moe_statics.e_score_correction_bias)
        fused = block.experts(x, idx, w, block.shared_experts)
        grouped = block.experts.grouped_forward(x, idx, w)
        if block.shared_experts is not None:
            grouped = grouped + block.shared_experts(x)
    # Both fp32 sums of the same terms in different orders: a few units of the last place of the magnitudes.
    torch.testing.assert_close(fused, grouped, rtol=1e-5, atol=1e-5)


def test_hooked_shared_experts_still_run_as_modules():
    """Calibration records the shared experts' linear inputs through hooks: the kernel must not skip them."""
    block = tiny_block(1)
    seen = []
    block.shared_experts.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.inference_mode():
        block(torch.randn(1, 3, 48))
    assert seen == [torch.Size([3, 16])]
