"""Paged attention against plain causal attention over each sequence's own K/V."""

import torch
import torch.nn.functional as F

from ernie45.engine.paged_attention import KVCache, PagedAttentionMetadata, SequenceSlice


def reference(q_TND, k_CKD, v_CKD, scale):
    """Causal attention of the last T of C positions, K/V repeated per query head."""
    T, N, _ = q_TND.shape
    C, K, _ = k_CKD.shape
    k = k_CKD.repeat_interleave(N // K, dim=1).transpose(0, 1)
    v = v_CKD.repeat_interleave(N // K, dim=1).transpose(0, 1)
    mask = torch.arange(C)[None, :] <= torch.arange(C - T, C)[:, None]
    return F.scaled_dot_product_attention(q_TND.transpose(0, 1), k, v, attn_mask=mask, scale=scale).transpose(0, 1)


def run_step(context_lens, q_lens, seed=0):
    """One layer's step for sequences whose contexts live in scattered slots; returns (paged out, reference out)."""
    g = torch.Generator().manual_seed(seed)
    N, K, D, block = 4, 2, 8, 4
    cache = KVCache(1, num_blocks=64, block_size=block, num_kv_heads=K, head_dim=D, dtype=torch.float32)
    free = torch.randperm(64 * block, generator=g)  # slots in random order: no sequence is contiguous
    sequences, slots, k_all, v_all, q_all, refs, used = [], [], [], [], [], [], 0
    q_start = 0
    for C, T in zip(context_lens, q_lens):
        ctx = free[used : used + C]
        used += C
        k = torch.randn(C, K, D, generator=g)
        v = torch.randn(C, K, D, generator=g)
        cache.k[0, ctx[: C - T]] = k[: C - T]  # the earlier tokens are already cached
        cache.v[0, ctx[: C - T]] = v[: C - T]
        q = torch.randn(T, N, D, generator=g)
        sequences.append(SequenceSlice(q_start, T, C, ctx))
        slots.append(ctx[C - T :])
        k_all.append(k[C - T :])
        v_all.append(v[C - T :])
        q_all.append(q)
        refs.append(reference(q, k, v, 0.3))
        q_start += T
    meta = PagedAttentionMetadata(cache, torch.cat(slots), sequences)
    out = meta.attend(0, torch.cat(q_all)[None], torch.cat(k_all)[None], torch.cat(v_all)[None], 0.3)[0]
    return out, torch.cat(refs)


def test_batched_decode_rows_of_different_context_lengths_match_reference():
    out, ref = run_step(context_lens=[5, 17, 1, 9], q_lens=[1, 1, 1, 1])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_batched_decode_rows_of_equal_lengths_take_the_unmasked_path():
    out, ref = run_step(context_lens=[6, 6, 6], q_lens=[1, 1, 1], seed=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_mixed_step_of_decode_rows_and_prefill_chunks_matches_reference():
    out, ref = run_step(context_lens=[12, 3, 20, 7, 4], q_lens=[1, 3, 5, 1, 1], seed=2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_single_sequence_prefill_and_decode_match_reference():
    for C, T in [(9, 9), (9, 1), (9, 4)]:
        out, ref = run_step(context_lens=[C], q_lens=[T], seed=C + T)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
