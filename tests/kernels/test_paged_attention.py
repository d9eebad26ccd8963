"""The paged decode attention kernel against plain attention over each sequence's own K/V (float64), on caches
whose blocks are scattered and shuffled, for every ISA build this CPU runs.

Tolerance, from the kernel's fp32 arithmetic (u = 2^-24). An n-term fp32 sum of terms t_i is off by at most
g(n) sum |t_i|; the worst case is g(n) = n u, but rounding errors are independent enough that
g(n) = LAMBDA sqrt(n) u holds except with probability below n * 2 exp(-LAMBDA^2 / 2) (Higham & Mary, SIAM J. Sci.
Comput. 2019, thm. 2.8; ~1e-13 at LAMBDA = 8): the worst case would be ~100x looser and let a dropped key at
thousands of tokens pass. Per query row: a score q.k * scale is off by g(D + 1) scale sum_d |q_d k_d|, exp_f32 adds
< 4u relative and the subtraction of the running max u |s - m|; that relative error delta of each weight p_j
makes o = sum p_j v_j / sum p_j off by 2 delta max|v|, plus the two C-term sums and the online rescaling (one
multiply per block, a few per partition merge): 2 g(C + C / B + 16) max|v|. bf16 caches hold exactly
representable values (widened without error), so the same bound holds before the output's rounding to bf16,
which adds at most 2^-8 |o| (8 significant bits). `test_uniform_weights_average_exactly_the_context` checks with
a tolerance free of the scores that each row reads exactly its keys: no more, no fewer.
"""

import pytest
import torch

from ernie45.kernels import paged_attention

U32 = 2.0**-24
LAMBDA = 8.0


def g(n):
    """Probabilistic bound on an n-term fp32 sum's relative error (module doc)."""
    return LAMBDA * n**0.5 * U32


def scattered_cache(num_blocks, B, K, D, dtype, gen):
    k = torch.randn(num_blocks * B, K, D, generator=gen).to(dtype)
    v = torch.randn(num_blocks * B, K, D, generator=gen).to(dtype)
    return k, v


def reference_and_bound(q_TND, k_CKD, v_CKD, scale, B):
    """float64 causal attention of the last T of C positions, and the per-element error bound (module doc)."""
    T, N, D = q_TND.shape
    C, K, _ = k_CKD.shape
    q, k, v = q_TND.double(), k_CKD.double().repeat_interleave(N // K, 1), v_CKD.double().repeat_interleave(N // K, 1)
    scores = torch.einsum("tnd,cnd->ntc", q, k) * scale  # [N, T, C]
    mask = torch.arange(C)[None, :] <= torch.arange(C - T, C)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    o = torch.einsum("ntc,cnd->tnd", scores.softmax(-1), v)
    abs_dot = torch.einsum("tnd,cnd->ntc", q.abs(), k.abs()) * scale
    spread = (scores.amax(-1, keepdim=True) - scores).masked_fill(~mask, 0)
    delta = (g(D + 1) * abs_dot + U32 * spread).masked_fill(~mask, 0).amax(-1) + 4 * U32  # [N, T]
    vmax = v.abs().amax(0)[None].amax(-1)  # [1, N]: max |v| of each query head's kv head
    bound = (2 * delta.T + 2 * g(C + C / B + 16)) * vmax  # [T, N]
    return o, bound[..., None].expand(T, N, D)


def run_and_check(context_lens, q_lens, N, K, D, B, dtype, seed=0, subset_rows=False):
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-c // B) for c in context_lens]
    num_blocks = sum(blocks_needed) + 3
    k_cache, v_cache = scattered_cache(num_blocks, B, K, D, dtype, gen)
    order = torch.randperm(num_blocks, generator=gen)  # blocks in random order: no context is contiguous
    max_blocks = max(blocks_needed) + 1  # one spare column: padding must never be read
    tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks_needed):
        tables[s, :n] = order[used : used + n].to(torch.int32)
        used += n
    # Query rows: each sequence's rows in order, with a spare row between sequences when subset_rows (rows no
    # sequence owns stay untouched).
    gap = 1 if subset_rows else 0
    starts = [sum(q_lens[:s]) + gap * (s + 1) for s in range(len(q_lens))]
    R = starts[-1] + q_lens[-1] + gap
    q = torch.randn(R, N, D, generator=gen).to(dtype)
    out = torch.full_like(q, 7.0)
    taken = paged_attention.attend(
        q, k_cache, v_cache, B, tables, torch.tensor(context_lens, dtype=torch.int32),
        torch.tensor(starts, dtype=torch.int32), torch.tensor(q_lens, dtype=torch.int32), D**-0.5, out,
    )  # fmt: skip
    assert taken
    covered = torch.zeros(R, dtype=torch.bool)
    for s, (C, T) in enumerate(zip(context_lens, q_lens)):
        slots = (tables[s, : blocks_needed[s]].long()[:, None] * B + torch.arange(B)).reshape(-1)[:C]
        ref, bound = reference_and_bound(q[starts[s] : starts[s] + T], k_cache[slots], v_cache[slots], D**-0.5, B)
        got = out[starts[s] : starts[s] + T].double()
        if dtype == torch.bfloat16:
            bound = bound * (1 + 2**-8) + 2**-8 * ref.abs()
        excess = (got - ref).abs() - bound
        assert excess.max() <= 0, f"sequence {s} (C={C}, T={T}): error above bound by {excess.max():.3g}"
        covered[starts[s] : starts[s] + T] = True
    assert bool((out[~covered] == 7.0).all())


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K", [(4, 4), (8, 4), (8, 2), (16, 2)])  # GQA ratios 1, 2, 4, 8
def test_decode_rows_of_mixed_lengths_equal_reference(kernel_isa, dtype, N, K):
    run_and_check([1, 17, 40, 100, 33], [1] * 5, N, K, D=64, B=16, dtype=dtype, seed=N * K)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_contexts_split_into_partitions_equal_reference(kernel_isa, dtype):
    """Batch 1 and 2 at > 512 tokens: the context is split across threads and merged (MIN_PARTITION_TOKENS)."""
    run_and_check([4000], [1], 16, 2, D=128, B=16, dtype=dtype, seed=1)
    run_and_check([1300, 517], [1, 1], 16, 2, D=128, B=16, dtype=dtype, seed=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_new_tokens_are_causal_among_themselves(kernel_isa, dtype):
    """Speculative / short chunks: token i of T sees positions <= C - T + i, also across a partition edge."""
    run_and_check([9, 30, 700, 16], [2, 4, 16, 16], 8, 2, D=32, B=16, dtype=dtype, seed=3, subset_rows=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, B", [(40, 5), (128, 7), (16, 1)])  # head dims off the register path, odd blocks
def test_odd_head_dims_and_block_sizes_equal_reference(kernel_isa, dtype, D, B):
    run_and_check([1, 6, 23, 64], [1, 1, 3, 1], 4, 2, D=D, B=B, dtype=dtype, seed=D + B)


@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_weights_average_exactly_the_context(kernel_isa, dtype):
    """q = 0: every score is 0 and every weight exactly 1 (exp(0), sums of ones exact), so row i of a sequence is
    the mean of its first C - T + i + 1 values (in [1, 2]), off by the value sum's rounding g(C) max|v| (+ the
    bf16 output rounding), while in fp32 one key too many or too few would move some of its D lanes by ~0.5 / C:
    more than that at these lengths."""
    gen = torch.Generator().manual_seed(5)
    B, K, N, D = 16, 2, 8, 32
    lens, q_lens = [2000, 1, 530, 47], [1, 1, 3, 16]
    nb = [-(-c // B) for c in lens]
    k_cache, v_cache = scattered_cache(sum(nb), B, K, D, dtype, gen)
    v_cache.copy_(torch.rand(v_cache.shape, generator=gen).to(dtype) + 1)  # in [1, 2]: no cancellation
    order = torch.randperm(sum(nb), generator=gen).to(torch.int32)
    tables = torch.zeros(len(lens), max(nb), dtype=torch.int32)
    for s, n in enumerate(nb):
        tables[s, :n] = order[sum(nb[:s]) : sum(nb[: s + 1])]
    starts = [sum(q_lens[:s]) for s in range(len(lens))]
    q = torch.zeros(sum(q_lens), N, D, dtype=dtype)
    out = torch.empty_like(q)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    assert paged_attention.attend(q, k_cache, v_cache, B, tables, i32(lens), i32(starts), i32(q_lens), 1.0, out)
    for s, (C, T) in enumerate(zip(lens, q_lens)):
        slots = (tables[s, : nb[s]].long()[:, None] * B + torch.arange(B)).reshape(-1)[:C]
        v = v_cache[slots].double().repeat_interleave(N // K, 1)  # [C, N, D]
        for i in range(T):
            seen = C - T + i + 1
            mean = v[:seen].mean(0)
            tol = 2 * g(seen + 16) + U32 * 2 + (2**-8 * 2 if dtype == torch.bfloat16 else 0)
            assert (out[starts[s] + i].double() - mean).abs().max() <= tol
            assert dtype == torch.bfloat16 or tol < 0.25 / seen  # a key too many or too few would show


def test_rows_default_to_one_token_per_sequence(kernel_isa):
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache = scattered_cache(8, 4, 2, 16, torch.float32, gen)
    tables = torch.tensor([[5, 2], [0, 7]], dtype=torch.int32)
    lens = torch.tensor([6, 3], dtype=torch.int32)
    q = torch.randn(2, 4, 16, generator=gen)
    a, b = torch.empty_like(q), torch.empty_like(q)
    assert paged_attention.attend(q, k_cache, v_cache, 4, tables, lens, None, None, 0.25, a)
    ones, rows = torch.ones(2, dtype=torch.int32), torch.arange(2, dtype=torch.int32)
    assert paged_attention.attend(q, k_cache, v_cache, 4, tables, lens, rows, ones, 0.25, b)
    assert torch.equal(a, b)


def test_bad_block_tables_and_lengths_are_refused(kernel_isa):
    k_cache, v_cache = scattered_cache(4, 4, 1, 16, torch.float32, torch.Generator().manual_seed(0))
    q, out = torch.randn(1, 2, 16), torch.empty(1, 2, 16)

    def call(table, length, q_len=1):
        return paged_attention.attend(q if q_len == 1 else torch.randn(q_len, 2, 16), k_cache, v_cache, 4,
                                      torch.tensor([table], dtype=torch.int32), torch.tensor([length], dtype=torch.int32),
                                      torch.tensor([0], dtype=torch.int32), torch.tensor([q_len], dtype=torch.int32),
                                      1.0, out if q_len == 1 else torch.empty(q_len, 2, 16))  # fmt: skip

    for table, length, q_len in [([4, 0], 5, 1), ([-1, 0], 2, 1), ([0, 1], 9, 1), ([0, 1, 2, 3, 0], 20, 17)]:
        with pytest.raises(RuntimeError, match="bad shape or block table entry"):
            call(table, length, q_len)
    assert call([3, 4], 4)  # entries past the context are not read


def test_declines_what_it_does_not_take():
    k_cache, v_cache = torch.zeros(8, 1, 16), torch.zeros(8, 1, 16)
    table, lens = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    q = torch.randn(1, 2, 16)
    assert not paged_attention.attend(q.double(), k_cache, v_cache, 4, table, lens, None, None, 1.0, q.double())
    assert not paged_attention.attend(q, k_cache, v_cache, 4, table.long(), lens, None, None, 1.0, q.clone())
    assert not paged_attention.attend(q.bfloat16(), k_cache, v_cache, 4, table, lens, None, None, 1.0, q.bfloat16())
