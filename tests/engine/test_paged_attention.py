"""Paged attention against plain causal attention over each sequence's own K/V: the engine's metadata with
shuffled block tables, decode rows (the C kernel, or torch's batched path without it) mixed with prefill chunks.

Tolerances: fp32 results are compared with fp32 torch attention on the same values, which rounds in another order;
both are within a few hundred fp32 ulps of the exact result at these lengths (tests/kernels/test_paged_attention.py
derives the kernel's bound), so rtol = atol = 1e-5. bf16 outputs are rounded once to 8 significant bits: 2^-8
relative on either side, plus that fp32 difference.
"""

import pytest
import torch
import torch.nn.functional as F

from ernie45.engine.paged_attention import KVCache, PagedAttentionMetadata
from ernie45.kernels import paged_attention as kernel


def reference(q_TND, k_CKD, v_CKD, scale):
    """Causal attention of the last T of C positions, K/V repeated per query head, in fp32."""
    T, N, _ = q_TND.shape
    C, K, _ = k_CKD.shape
    k = k_CKD.float().repeat_interleave(N // K, dim=1).transpose(0, 1)
    v = v_CKD.float().repeat_interleave(N // K, dim=1).transpose(0, 1)
    mask = torch.arange(C)[None, :] <= torch.arange(C - T, C)[:, None]
    q = q_TND.float().transpose(0, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)


def run_step(context_lens, q_lens, seed=0, N=4, K=2, dtype=torch.float32, block=4):
    """One layer's step for sequences whose blocks are scattered over the pool; returns (paged out, reference)."""
    g = torch.Generator().manual_seed(seed)
    D, num_blocks = 16, 96
    cache = KVCache(1, num_blocks=num_blocks, block_size=block, num_kv_heads=K, head_dim=D, dtype=dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()  # blocks in random order: no sequence is contiguous
    tables, slots, k_all, v_all, q_all, refs = [], [], [], [], [], []
    for C, T in zip(context_lens, q_lens):
        table = [free.pop() for _ in range(-(-C // block))]
        ctx = (torch.tensor(table)[:, None] * block + torch.arange(block)).reshape(-1)[:C]
        k, v = torch.randn(C, K, D, generator=g).to(dtype), torch.randn(C, K, D, generator=g).to(dtype)
        cache.k[0, ctx[: C - T]] = k[: C - T]  # the earlier tokens are already cached
        cache.v[0, ctx[: C - T]] = v[: C - T]
        q = torch.randn(T, N, D, generator=g).to(dtype)
        tables.append(table + [free[0]] * 2)  # a block table may hold more blocks than the context uses
        slots.append(ctx[C - T :])
        k_all.append(k[C - T :])
        v_all.append(v[C - T :])
        q_all.append(q)
        refs.append(reference(q, k, v, 0.3))
    width = max(map(len, tables))
    tables_SM = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    meta = PagedAttentionMetadata(cache, torch.cat(slots), tables_SM, list(context_lens), list(q_lens))
    out = meta.attend(0, torch.cat(q_all)[None], torch.cat(k_all)[None], torch.cat(v_all)[None], 0.3)[0]
    return out, torch.cat(refs)


def close(out, ref):
    if out.dtype == torch.bfloat16:
        torch.testing.assert_close(out.float(), ref, rtol=2**-8 + 1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["kernel", "torch"])
def backend(request, monkeypatch):
    """Each test with the C kernel and with torch's path (kernels disabled, or CUDA)."""
    if request.param == "torch":
        monkeypatch.setattr(kernel, "_library", lambda: None)
    elif not kernel.available():
        pytest.skip("the paged attention kernel did not build")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K", [(4, 4), (4, 2), (8, 2)])
def test_batched_decode_rows_of_different_context_lengths_match_reference(backend, dtype, N, K):
    close(*run_step(context_lens=[5, 17, 1, 9, 40], q_lens=[1] * 5, N=N, K=K, dtype=dtype))


def test_batched_decode_rows_of_equal_lengths(backend):
    close(*run_step(context_lens=[8, 8, 8], q_lens=[1, 1, 1], seed=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_step_of_decode_rows_and_prefill_chunks_matches_reference(backend, dtype):
    """Decode rows, a 3-token chunk on a cached prefix, a whole 20-token prompt and a 30-token chunk (past the
    kernel's 16 new tokens: torch's path) in one step."""
    close(*run_step(context_lens=[12, 7, 20, 41, 4, 50], q_lens=[1, 3, 20, 30, 1, 1], seed=2, dtype=dtype))


def test_single_sequence_prefill_and_decode_match_reference(backend):
    for C, T in [(9, 9), (9, 1), (9, 4), (40, 40), (40, 20)]:
        close(*run_step(context_lens=[C], q_lens=[T], seed=C + T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_step_equals_layer_by_layer(dtype):
    """A decode step of three sequences on scattered blocks: every layer in one C call (models/fused_decode.py)
    equals the layer-by-layer step bit for bit (the same C functions in the same order, the paged kernel in both)."""
    from ernie45.models import Ernie45Config, Ernie45ForCausalLM

    config = Ernie45Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    model = Ernie45ForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(5))
    model = model.to(dtype)
    model.tie_weights()
    block, lens = 4, [5, 23, 40]
    outs = []
    for fused in (True, False):
        cache = KVCache(2, num_blocks=32, block_size=block, num_kv_heads=2, head_dim=16, dtype=dtype)
        cache.k.copy_(torch.randn(cache.k.shape, generator=torch.Generator().manual_seed(1)))
        cache.v.copy_(torch.randn(cache.v.shape, generator=torch.Generator().manual_seed(2)))
        order = torch.randperm(32, generator=torch.Generator().manual_seed(3)).tolist()
        tables = [order[:2], order[2:8], order[8:18]]
        width = max(map(len, tables))
        tables_SM = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        slots = torch.tensor([t[(c - 1) // block] * block + (c - 1) % block for t, c in zip(tables, lens)])
        meta = PagedAttentionMetadata(cache, slots, tables_SM, lens, [1, 1, 1])
        if not fused:
            meta.run_fused_layers = lambda *args: None
        ids = torch.randint(3, 97, (1, 3), generator=torch.Generator().manual_seed(4))
        with torch.inference_mode():
            outs.append(model.forward_hidden(ids, torch.tensor([[c - 1 for c in lens]]), meta))
        assert bool(cache.fused_plans) == fused and all(p is not None for p in cache.fused_plans.values())
    assert torch.equal(outs[0], outs[1])
