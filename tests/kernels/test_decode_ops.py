"""The decode-step C ops (kernels/decode_ops.c) against the torch ops they replace (on every ISA target), their
refusals, and a whole model's decode with them against the torch path. Legend: B batch, T tokens, N query heads, K kv heads, D head dim,
S cache slots, H hidden.
"""

import pytest
import torch
import torch.nn.functional as F

from ernie45.generation.static_cache import StaticKVCache
from ernie45.kernels import decode_ops
from ernie45.models import Ernie45Config, Ernie45ForCausalLM
from ernie45.models.layers import RMSNorm, RotaryEmbedding, apply_rotary

DTYPES = [torch.float32, torch.bfloat16]


def test_kernels_build():
    assert decode_ops.available()


def torch_norm(x, weight, eps):
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 96), (70, 1024)])  # the last takes the parallel loop
def test_rms_norm_equals_torch(kernel_isa, dtype, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(dtype)
    weight = torch.randn(shape[-1]).to(dtype)
    with torch.no_grad():
        same, out = decode_ops.rms_norm(x, weight, 1e-6)
        ref = torch_norm(x, weight, 1e-6)
    assert same is x and out.dtype == ref.dtype
    # Sums of squares in another order: at most an ulp of the normalized value apart.
    torch.testing.assert_close(out, ref, rtol=2e-6 if dtype == torch.float32 else 2**-8, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual_adds_first(kernel_isa, dtype):
    torch.manual_seed(1)
    x, delta = torch.randn(2, 3, 64).to(dtype), torch.randn(2, 3, 64).to(dtype)
    weight = torch.randn(64).to(dtype)
    with torch.no_grad():
        total, out = decode_ops.rms_norm(x, weight, 1e-5, residual=delta)
    assert torch.equal(total, x + delta)  # the sum rounded to x's dtype, as torch's add
    rtol = 2e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(out, torch_norm(x + delta, weight, 1e-5), rtol=rtol, atol=0)


def test_rms_norm_promotes_like_the_module():
    """An fp32 weight on bf16 activations gives fp32 out (weight * normed.to(bf16)), as RMSNorm.forward."""
    x, weight = torch.randn(2, 32).bfloat16(), torch.randn(32)
    with torch.no_grad():
        _, out = decode_ops.rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch_norm(x, weight, 1e-5), rtol=2e-6, atol=0)


def test_refusals_leave_the_torch_path_in_charge():
    x, weight = torch.randn(2, 32), torch.randn(32)
    assert decode_ops.rms_norm(x.half(), weight, 1e-5) is None  # fp16: not a dtype of these ops
    assert decode_ops.rms_norm(torch.randn(32, 2).T, weight, 1e-5) is None  # not contiguous
    assert decode_ops.rms_norm(x, torch.randn(16), 1e-5) is None  # weight of another width
    assert decode_ops.rms_norm(x.requires_grad_(), weight, 1e-5) is None  # autograd needs the torch ops
    assert decode_ops.silu_mul(torch.randn(4), torch.randn(5)) is None
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8)
    cos, sin = RotaryEmbedding(8, 10000.0)(torch.tensor([3, 4]))  # tables for 2 tokens, q has 1
    assert not decode_ops.rotary_(q, k, cos, sin)
    cache = torch.zeros(1, 2, 4, 8)
    assert decode_ops.decode_attention(torch.randn(1, 4, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8),
                                       cache, cache.clone(), 4, 1.0) is None  # slot 4 of a 4-slot cache


def test_rms_norm_module_matches_torch_path_in_inference_and_training():
    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 48, requires_grad=True)
    trained = norm(x)  # autograd: the torch ops
    trained.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        inferred = norm(x)  # the C op
    torch.testing.assert_close(inferred, trained.detach(), rtol=2e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row_tables", [False, True])
def test_rotary_is_bit_identical_to_apply_rotary(kernel_isa, dtype, per_row_tables):
    torch.manual_seed(2)
    B, T, N, K, D = 2, 3, 4, 2, 16
    rope = RotaryEmbedding(D, 500000.0)
    positions = torch.tensor([[5, 6, 7], [11, 12, 13]]) if per_row_tables else torch.tensor([5, 6, 7])
    cos, sin = rope(positions)
    q, k = torch.randn(B, T, N, D).to(dtype), torch.randn(B, T, K, D).to(dtype)
    expect_q, expect_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    with torch.no_grad():
        assert decode_ops.rotary_(q, k, cos, sin)
    assert torch.equal(q, expect_q) and torch.equal(k, expect_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [7, 3072, 70_000])  # a tail, the decode size, the parallel loop
def test_silu_mul_equals_torch(kernel_isa, dtype, n):
    torch.manual_seed(3)
    gate = torch.cat([torch.tensor([-100.0, -88.0, -20.0, 0.0, 20.0, 90.0]), torch.randn(n) * 4])[:n].to(dtype)
    up = torch.randn(n).to(dtype)
    with torch.no_grad():
        out = decode_ops.silu_mul(gate, up)
    ref = F.silu(gate) * up
    # Our exp is within ~2 ulp of libm's: the fp32 result within a few ulp; bf16 results mostly equal.
    tol = {"rtol": 1e-6, "atol": 1e-30} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 0}
    torch.testing.assert_close(out, ref, **tol)


def reference_decode_attention(q_BND, k_cache, v_cache, pos, scale):
    """The static cache's torch path: grouped heads, fp32 softmax over slots 0..pos."""
    B, N, D = q_BND.shape
    K = k_cache.shape[1]
    q = q_BND.view(B, K, N // K, D).float()
    scores = q @ k_cache[:, :, : pos + 1].float().transpose(-1, -2) * scale
    return (scores.softmax(-1) @ v_cache[:, :, : pos + 1].float()).view(B, N, D).to(q_BND.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K,D", [(1, 4, 4, 8), (2, 16, 2, 128), (3, 6, 2, 36)])
@pytest.mark.parametrize("pos", [0, 9, 47])
def test_decode_attention_writes_the_cache_and_equals_torch(kernel_isa, dtype, B, N, K, D, pos):
    torch.manual_seed(4)
    S = 48
    k_cache, v_cache = torch.randn(B, K, S, D).to(dtype), torch.randn(B, K, S, D).to(dtype)
    q, k, v = torch.randn(B, N, D).to(dtype), torch.randn(B, K, D).to(dtype), torch.randn(B, K, D).to(dtype)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    expect_k[:, :, pos], expect_v[:, :, pos] = k, v
    with torch.no_grad():
        out = decode_ops.decode_attention(q, k, v, k_cache, v_cache, pos, D**-0.5)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)
    ref = reference_decode_attention(q, expect_k, expect_v, pos, D**-0.5)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-8}
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_decode_with_the_ops_equals_the_torch_path(kernel_isa, dtype, monkeypatch):
    """Prefill then 6 decode steps of a tiny dense model: the C ops (norm, rotary, cache attention, SiLU) against
    the same model with them switched off (every op then returns None)."""
    config = Ernie45Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(5)
    model = Ernie45ForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(5))
    model = model.to(dtype)
    model.tie_weights()

    def decode_logits():
        cache = StaticKVCache(config, 2, 16, dtype)
        ids = torch.randint(3, 97, (2, 4), generator=torch.Generator().manual_seed(6))
        steps = []
        with torch.inference_mode():
            hidden = model.forward_hidden(ids, torch.arange(4), cache)
            cache.advance()
            for _ in range(6):
                logits = model.compute_logits(hidden[:, -1])
                steps.append(logits.float())
                hidden = model.forward_hidden(logits.argmax(-1)[:, None], torch.tensor([cache.length]), cache)
                cache.advance()
        return torch.stack(steps)

    with_ops = decode_logits()
    monkeypatch.setattr(decode_ops, "_library", lambda: None)
    torch_path = decode_logits()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}
    torch.testing.assert_close(with_ops, torch_path, **tol)
