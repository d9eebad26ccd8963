"""Training's CPU causal attention (kernels/causal_attention.c + .py) against torch's scaled_dot_product_attention,
forward and backward. Every test forces `ERNIE45_BLAS=openblas` (the kernel's block products run on OpenBLAS).
Legend: B batch, T tokens, N query heads, K kv heads, D head dim."""

import pytest
import torch
import torch.nn.functional as F

from ernie45.kernels import causal_attention
from ernie45.models.attention import CausalAttention


@pytest.fixture(autouse=True)
def force_openblas(monkeypatch):
    monkeypatch.setenv("ERNIE45_BLAS", "openblas")
    monkeypatch.delenv("ERNIE45_DISABLE_KERNELS", raising=False)


def sdpa(q_BTND, k_BTKD, v_BTKD, scale):
    q, k, v = (t.transpose(1, 2) for t in (q_BTND, k_BTKD, v_BTKD))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)


def fused_projection_views(B, T, N, K, D, seed=0):
    """q, k, v as the model gets them from one fused projection: views into [B, T, (N + 2K) * D] (token stride
    (N + 2K) * D, not N * D), leaves that need gradients."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (N + 2 * K) * D, generator=g, requires_grad=True)
    q, k, v = qkv.split([N * D, K * D, K * D], dim=-1)
    return qkv, q.view(B, T, N, D), k.view(B, T, K, D), v.view(B, T, K, D)


def run(attend, B, T, N, K, D, seed=0):
    """(output, gradient of the fused projection output) for sum(output * fixed weights)."""
    qkv, q, k, v = fused_projection_views(B, T, N, K, D, seed)
    out = attend(q, k, v, D**-0.5)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    (out * weights).sum().backward()
    return out.detach(), qkv.grad


# Odd lengths cross the 64-query / 128-key block edges; G = N / K of 1, 2, 3, 8.
SHAPES = [(2, 37, 4, 2, 16), (1, 200, 8, 1, 32), (2, 130, 3, 3, 8), (1, 129, 16, 2, 64), (3, 64, 4, 4, 64),
          (1, 1, 2, 1, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-N{}-K{}-D{}".format(*s))
def test_equals_torch_forward_and_backward(kernel_isa, shape):
    out, grad = run(causal_attention.attention, *shape)
    out_ref, grad_ref = run(sdpa, *shape)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=2e-5)


def test_results_do_not_depend_on_the_thread_count(kernel_isa):
    """Each task writes its own outputs with no atomics: bitwise equal on 1 and 3 threads."""
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(causal_attention.attention, 2, 150, 4, 2, 16)
        torch.set_num_threads(3)
        three = run(causal_attention.attention, 2, 150, 4, 2, 16)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


def test_takes_only_what_the_kernel_handles(monkeypatch):
    _, q, k, v = fused_projection_views(1, 8, 4, 2, 16)
    assert causal_attention.takes(q, k, v)
    assert not causal_attention.takes(q.double(), k.double(), v.double())
    assert not causal_attention.takes(q[..., ::2], k[..., ::2], v[..., ::2])  # head rows not contiguous
    assert not causal_attention.takes(q[:, :, :3], k, v)  # 3 query heads on 2 kv heads
    assert not causal_attention.takes(q, k[:, :4], v[:, :4])  # lengths differ
    monkeypatch.setenv("ERNIE45_BLAS", "torch")
    assert not causal_attention.takes(q, k, v)


def test_causal_attention_backend_routes_training_without_packing_only():
    _, q, k, v = fused_projection_views(1, 8, 4, 2, 16)
    assert type(CausalAttention().attend(0, q, k, v, 0.25).grad_fn).__name__ == "_CausalAttentionBackward"
    packed = CausalAttention(torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    assert type(packed.attend(0, q, k, v, 0.25).grad_fn).__name__ != "_CausalAttentionBackward"
    with torch.no_grad():
        assert CausalAttention().attend(0, q, k, v, 0.25).grad_fn is None


def test_autocast_keeps_torch_attention():
    _, q, k, v = fused_projection_views(1, 8, 4, 2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not causal_attention.takes(q, k, v)
