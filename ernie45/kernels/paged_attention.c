/* Decode attention over the engine's paged KV cache, read where it lies through the block tables.
 *
 * Why: gathering each sequence's whole context into a contiguous copy every step (index_select on per-token slot
 * lists) reads the context twice and writes it once; at 4,096 tokens of the 0.3B shape that doubled the step's KV
 * traffic and its Python bookkeeping grew with the context. Here each (sequence, kv head, context partition) walks
 * its blocks in place with an online softmax: one pass over K and V, nothing written but the output.
 *
 * Layout: one layer's cache is [num_blocks * block_size, K, D] (token slots; slot = block * block_size + offset),
 * fp32 or bf16; q and out are [rows, N, D] in the cache's dtype. Sequence s owns query rows
 * q_starts[s] .. q_starts[s] + q_lens[s] (its last q_lens[s] positions, causal among themselves) and attends its
 * first context_lens[s] tokens, in the blocks block_tables[s][0 ..]. Query heads h*G .. h*G+G-1 share kv head h.
 * Arithmetic in fp32 (bf16 widened exactly; the output rounded once). The scale multiplies the scores after
 * the dot, as torch's attention does. Legend: S sequences, N query heads, K kv heads, G = N / K, D head dim,
 * Q = q_len * G query rows of one (sequence, kv head), B block size.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "scalar_types.h"
#include "vec16.h"
#include "fast_exp.h"

enum { PA_OK = 0, PA_BAD_DTYPE = 1, PA_BAD_SHAPE = 2, PA_NO_MEMORY = 3 };

/* Query tokens per sequence this kernel takes (decode, speculative tokens); longer chunks are GEMM work. */
#define MAX_QUERY_TOKENS 16
/* Below this many multiply-adds a parallel region costs more than it saves. */
#define MIN_PARALLEL_WORK (1 << 16)
/* A context partition spans at least this many tokens: shorter ones would spend more on merging than they save. */
#define MIN_PARTITION_TOKENS 512
/* Work items per thread the partitioning aims for, so that unequal sequences still balance. */
#define ITEMS_PER_THREAD 4
/* How many blocks ahead of the one being attended its rows are prefetched. */
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 2
#endif

#ifdef _OPENMP
#include <omp.h>
INLINE int thread_index(void) { return omp_get_thread_num(); }
#else
INLINE int thread_index(void) { return 0; }
#endif



typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

/* 16 elements at element i of a fp32 (bf16 = 0) or bf16 (bf16 = 1) array, widened exactly (bf16 is the top half of
 * a fp32). In the vector path the caches are read this way, in place: no widened copy. */
INLINE f32x16 load16_as(const void *p, int64_t i, const int bf16) {
    if (!bf16) return load16((const float *)p + i);
    u16x16 h;
    memcpy(&h, (const uint16_t *)p + i, sizeof h);
    return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
}



typedef int32_t i32x16 __attribute__((vector_size(64)));

INLINE f32x16 splat(float x) { return (f32x16){0} + x; }

/* mask ? a : b, lane by lane (mask lanes all ones or zeros, as vector comparisons give). */
INLINE f32x16 pick(i32x16 mask, f32x16 a, f32x16 b) { return (f32x16)(((i32x16)a & mask) | ((i32x16)b & ~mask)); }

INLINE float hmax16(f32x16 v) {
    f32x16 t = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v = pick(v > t, v, t);
    t = __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    v = pick(v > t, v, t);
    t = __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    v = pick(v > t, v, t);
    return v[0] > v[1] ? v[0] : v[1];
}

/* exp_f32 (fast_exp.h) on 16 lanes at once, with n rounded by the 1.5 * 2^23 trick (|x log2 e| < 2^22 after the
 * clamp); written in vector types because the scalar loop's rintf does not vectorize on every target. */
INLINE f32x16 exp16(f32x16 x) {
    const f32x16 lo = splat(-87.33654f), hi = splat(88.72283f), magic = splat(12582912.0f);
    const f32x16 cx = pick(x < lo, lo, pick(x > hi, hi, x));
    const f32x16 n = (cx * 1.44269504f + magic) - magic;
    const f32x16 r = (cx - n * 0.693145752f) - n * 1.42860677e-6f;
    f32x16 p = splat(1.0f / 720.0f);
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const f32x16 y = p * (f32x16)((__builtin_convertvector(n, i32x16) + 127) << 23);
    return pick(x < lo, splat(0.0f), pick(x > hi, splat(__builtin_inff()), y));
}

/* The 16 lane sums of a[0..16) in one vector, in 30 shuffles and 15 adds instead of 16 separate halvings: lane L
 * holds the sum of a[bitrev4(L)] (each level pairs vectors and halves the lanes each one keeps). */
INLINE f32x16 sum_lanes16(const f32x16 *a) {
    f32x16 r1[8], r2[4], r3[2];
    for (int i = 0; i < 8; ++i)
        r1[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                        30, 31);
    for (int i = 0; i < 4; ++i)
        r2[i] = __builtin_shufflevector(r1[2 * i], r1[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25,
                                        26, 27) +
                __builtin_shufflevector(r1[2 * i], r1[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29,
                                        30, 31);
    for (int i = 0; i < 2; ++i)
        r3[i] = __builtin_shufflevector(r2[2 * i], r2[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13,
                                        28, 29) +
                __builtin_shufflevector(r2[2 * i], r2[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15,
                                        30, 31);
    return __builtin_shufflevector(r3[0], r3[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           __builtin_shufflevector(r3[0], r3[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

/* Lane j < n: q . k_j for the key rows at elements k0 + j * ks of k (D = 16 * vecs, vecs <= 16); lanes >= n: 0. */
INLINE f32x16 scores16(const float *q, const void *k, int64_t k0, int64_t ks, int64_t n, const int vecs,
                       const int bf16) {
    static const int bitrev4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    f32x16 qv[16], a[16];
#pragma GCC unroll 16
    for (int v = 0; v < 16; ++v) qv[v] = v < vecs ? load16(q + 16 * v) : splat(0.0f);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
        f32x16 acc = {0};
        if (j < n)
#pragma GCC unroll 16
            for (int v = 0; v < 16; ++v)
                if (v < vecs) acc += qv[v] * load16_as(k, k0 + j * ks + 16 * v, bf16);
        a[bitrev4[j]] = acc; /* so that lane j of the result is key j's */
    }
    return sum_lanes16(a);
}

/* acc[D] = acc * keep + sum_j w[j] * rows[j * stride ..][0 .. D) for n rows (bf16 rows only with vecs > 0): with vecs = D / 16 (D a multiple of
 * 16 up to 256, every ERNIE 4.5 head dim) the accumulators stay in registers across the rows, else (vecs = 0)
 * they live in memory. vecs is a constant where this is inlined: the `v < vecs` tests fold away (as a variable
 * they cost more than the multiply-adds). */
INLINE void rescale_add_rows(float keep, const float *w, const void *rows, int64_t stride, int64_t n, int64_t D,
                             float *acc, const int vecs, const int bf16) {
    if (vecs > 0) {
        f32x16 a[16];
#pragma GCC unroll 16
        for (int v = 0; v < 16; ++v)
            if (v < vecs) a[v] = load16(acc + 16 * v) * keep;
        for (int64_t j = 0; j < n; ++j)
#pragma GCC unroll 16
            for (int v = 0; v < 16; ++v)
                if (v < vecs) a[v] += w[j] * load16_as(rows, j * stride + 16 * v, bf16);
#pragma GCC unroll 16
        for (int v = 0; v < 16; ++v)
            if (v < vecs) memcpy(acc + 16 * v, &a[v], sizeof a[v]);
        return;
    }
    for (int64_t d = 0; d < D; ++d) acc[d] *= keep;
    for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < D; ++d) acc[d] += w[j] * ((const float *)rows)[j * stride + d];
}

/* n rows of D for one kv head, starting at element `first` with `stride` between rows: in place for fp32, else
 * widened into buf (stride D). */
INLINE const float *rows_fp32(const void *cache, int dtype, int64_t first, int64_t stride, int64_t n, int64_t D,
                              float *buf, int64_t *row_stride) {
    if (dtype == DTYPE_F32) {
        *row_stride = stride;
        return (const float *)cache + first;
    }
    const uint16_t *h = (const uint16_t *)cache + first;
    for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < D; ++d) buf[j * D + d] = bf16_to_f32(h[j * stride + d]);
    *row_stride = D;
    return buf;
}

/* What one (sequence, kv head, partition) item needs besides its scratch. */
typedef struct {
    const void *k_cache, *v_cache;
    int dtype;
    const int32_t *table; /* this sequence's blocks */
    int64_t block_first, block_end; /* blocks of this partition */
    int64_t context_len, first_query_pos, q_len, G, D, B, head_offset, slot_stride;
    float scale;
} Item;

/* attend_item for any head dim, one dot product at a time. */
static void attend_item_any(const Item *it, const float *qf, float *m, float *l, float *acc, float *scores, float *kbuf,
                        float *vbuf) {
    const int64_t G = it->G, D = it->D, B = it->B, Q = it->q_len * G;
    for (int64_t r = 0; r < Q; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)(Q * D));
    for (int64_t b = it->block_first; b < it->block_end; ++b) {
        const int64_t t0 = b * B, n = it->context_len - t0 < B ? it->context_len - t0 : B;
        const int64_t first = (int64_t)it->table[b] * B * it->slot_stride + it->head_offset;
        int64_t ks, vs;
        const float *k = rows_fp32(it->k_cache, it->dtype, first, it->slot_stride, n, D, kbuf, &ks);
        /* Rows of query token i see n_i = clamp(first_query_pos + i + 1 - t0, 0, n) of the block's keys. */
        for (int64_t r = 0; r < Q; ++r) {
            int64_t seen = it->first_query_pos + r / G + 1 - t0;
            seen = seen < n ? seen : n;
            for (int64_t j = 0; j < seen; ++j) scores[r * B + j] = dot(qf + r * D, k + j * ks, D) * it->scale;
        }
        const float *v = rows_fp32(it->v_cache, it->dtype, first, it->slot_stride, n, D, vbuf, &vs);
        for (int64_t r = 0; r < Q; ++r) {
            int64_t seen = it->first_query_pos + r / G + 1 - t0;
            seen = seen < n ? seen : n;
            if (seen <= 0) continue;
            float *s = scores + r * B, top = m[r];
            for (int64_t j = 0; j < seen; ++j) top = s[j] > top ? s[j] : top;
            float total = 0.0f;
            for (int64_t j = 0; j < seen; ++j) {
                s[j] = exp_f32(s[j] - top);
                total += s[j];
            }
            const float keep = m[r] == -INFINITY ? 0.0f : exp_f32(m[r] - top);
            l[r] = l[r] * keep + total;
            m[r] = top;
            rescale_add_rows(keep, s, v, vs, seen, D, acc + r * D, 0, 0);
        }
    }
}

/* attend_item for D = 16 * vecs: 16 keys at a time in vector registers, the cache read in place in its dtype; the
 * block PREFETCH_BLOCKS ahead is prefetched meanwhile (blocks lie anywhere: the hardware prefetchers cannot guess
 * where the next one starts). */
INLINE void attend_blocks(const Item *it, const float *qf, float *m, float *l, float *acc, const int vecs,
                          const int bf16) {
    const int64_t G = it->G, D = it->D, B = it->B, Q = it->q_len * G;
    const i32x16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const int64_t elem = it->dtype == DTYPE_F32 ? 4 : 2, row_bytes = D * elem;
    for (int64_t r = 0; r < Q; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)(Q * D));
    for (int64_t b = it->block_first; b < it->block_end; ++b) {
        const int64_t t0 = b * B, n = it->context_len - t0 < B ? it->context_len - t0 : B;
        const int64_t first = (int64_t)it->table[b] * B * it->slot_stride + it->head_offset;
        if (b + PREFETCH_BLOCKS < it->block_end) {
            const int64_t next = (int64_t)it->table[b + PREFETCH_BLOCKS] * B * it->slot_stride + it->head_offset;
            for (int64_t j = 0; j < B; ++j)
                for (int64_t o = 0; o < row_bytes; o += 64) {
                    __builtin_prefetch((const char *)it->k_cache + (next + j * it->slot_stride) * elem + o);
                    __builtin_prefetch((const char *)it->v_cache + (next + j * it->slot_stride) * elem + o);
                }
        }
        const int64_t ks = it->slot_stride;
        for (int64_t c0 = 0; c0 < n; c0 += 16) {
            const int64_t cn = n - c0 < 16 ? n - c0 : 16;
            for (int64_t r = 0; r < Q; ++r) {
                int64_t seen = it->first_query_pos + r / G + 1 - t0 - c0;
                seen = seen < cn ? seen : cn;
                if (seen <= 0) continue;
                f32x16 s = scores16(qf + r * D, it->k_cache, first + c0 * ks, ks, seen, vecs, bf16) * it->scale;
                s = pick(iota < (i32x16){0} + (int32_t)seen, s, splat(-INFINITY));
                const float top = fmaxf(m[r], hmax16(s));
                const f32x16 p = exp16(s - top);
                const float keep = exp_f32(m[r] - top); /* 0 on the first keys (m = -inf) */
                l[r] = l[r] * keep + hsum16(p);
                m[r] = top;
                float w[16];
                memcpy(w, &p, sizeof w);
                const void *v = bf16 ? (const void *)((const uint16_t *)it->v_cache + first + c0 * ks)
                                     : (const void *)((const float *)it->v_cache + first + c0 * ks);
                rescale_add_rows(keep, w, v, ks, seen, D, acc + r * D, vecs, bf16);
            }
        }
    }
}

/* Online softmax over the item's blocks for its Q = q_len * G query rows qf [Q, D] (fp32): on return, per row, the
 * running max m, the sum of exp(score - m) l and the unnormalized output acc [Q, D]. Query token i sees positions
 * <= first_query_pos + i. Scratch for head dims off the vector path: scores [Q, B], kbuf / vbuf [B, D]. */
static void attend_item(const Item *it, const float *qf, float *m, float *l, float *acc, float *scores, float *kbuf,
                        float *vbuf) {
    switch (it->D % 16 ? 0 : it->D / 16) { /* one copy of attend_blocks per head dim and dtype, its loops unrolled */
#define HEAD_DIM_CASE(n) \
    case n:                                                                                                       \
        if (it->dtype == DTYPE_F32)                                                                               \
            attend_blocks(it, qf, m, l, acc, n, 0);                                                               \
        else                                                                                                      \
            attend_blocks(it, qf, m, l, acc, n, 1);                                                               \
        return;
        HEAD_DIM_CASE(1) HEAD_DIM_CASE(2) HEAD_DIM_CASE(3) HEAD_DIM_CASE(4) HEAD_DIM_CASE(5) HEAD_DIM_CASE(6)
        HEAD_DIM_CASE(7) HEAD_DIM_CASE(8) HEAD_DIM_CASE(9) HEAD_DIM_CASE(10) HEAD_DIM_CASE(11) HEAD_DIM_CASE(12)
        HEAD_DIM_CASE(13) HEAD_DIM_CASE(14) HEAD_DIM_CASE(15) HEAD_DIM_CASE(16)
#undef HEAD_DIM_CASE
    default: attend_item_any(it, qf, m, l, acc, scores, kbuf, vbuf);
    }
}

INLINE void store_row(void *out, int dtype, int64_t i0, const float *src, float mul, int64_t n) {
    if (dtype == DTYPE_F32) {
        float *o = (float *)out + i0;
        for (int64_t i = 0; i < n; ++i) o[i] = src[i] * mul;
    } else {
        uint16_t *o = (uint16_t *)out + i0;
        for (int64_t i = 0; i < n; ++i) o[i] = f32_to_bf16(src[i] * mul);
    }
}

/* out rows of S sequences (see the top of the file; q and out have R rows). q_starts / q_lens NULL: sequence s is
 * query row s, one token. Block table entries must lie in [0, num_blocks). Returns PA_OK, or an error before
 * touching out. */
int ernie45_paged_attention(const void *q, void *out, int dtype, const void *k_cache, const void *v_cache,
                            int64_t num_blocks, int64_t B, int64_t R, int64_t S, int64_t N, int64_t K, int64_t D,
                            const int32_t *block_tables, int64_t max_blocks, const int32_t *context_lens,
                            const int32_t *q_starts, const int32_t *q_lens, float scale, int threads) {
    if (dtype != DTYPE_F32 && dtype != DTYPE_BF16) return PA_BAD_DTYPE;
    if (S <= 0 || N <= 0 || K <= 0 || N % K || D <= 0 || B <= 0 || max_blocks <= 0) return PA_BAD_SHAPE;
    const int64_t G = N / K;
    int64_t longest = 0, most_tokens = 1, work = 0;
    for (int64_t s = 0; s < S; ++s) {
        const int64_t C = context_lens[s], T = q_lens ? q_lens[s] : 1, q0 = q_starts ? q_starts[s] : s;
        if (T < 1 || T > MAX_QUERY_TOKENS || C < T || C > max_blocks * B || q0 < 0 || q0 + T > R) return PA_BAD_SHAPE;
        for (int64_t b = 0; b < (C + B - 1) / B; ++b) {
            const int32_t block = block_tables[s * max_blocks + b];
            if (block < 0 || block >= num_blocks) return PA_BAD_SHAPE;
        }
        longest = C > longest ? C : longest;
        most_tokens = T > most_tokens ? T : most_tokens;
        work += C * T * N * D;
    }
    if (work < MIN_PARALLEL_WORK) threads = 1;
    if (threads < 1) threads = 1;
    /* Partitions of the context so that the items are several per thread (batch 1 has only K of them). */
    int64_t parts = (ITEMS_PER_THREAD * threads + S * K - 1) / (S * K);
    const int64_t most_parts = (longest + MIN_PARTITION_TOKENS - 1) / MIN_PARTITION_TOKENS;
    parts = parts < most_parts ? parts : most_parts;
    parts = parts < 1 ? 1 : parts;
    const int64_t blocks_longest = (longest + B - 1) / B;
    const int64_t part_blocks = (blocks_longest + parts - 1) / parts;
    parts = (blocks_longest + part_blocks - 1) / part_blocks;

    const int64_t Qmax = most_tokens * G;
    const int64_t scratch = 2 * Qmax * D + Qmax * B + 2 * B * D + 2 * Qmax; /* qf, acc, scores, kbuf, vbuf, m, l */
    const int64_t partial = Qmax * (D + 2);                                 /* acc, m, l of one item */
    float *buffers = malloc(sizeof(float) * (size_t)(scratch * threads + (parts > 1 ? partial * S * K * parts : 0)));
    if (!buffers) return PA_NO_MEMORY;
    float *partials = buffers + scratch * threads;
    const int64_t items = S * K * parts;

#pragma omp parallel num_threads(threads)
    {
        float *qf = buffers + scratch * thread_index(), *acc = qf + Qmax * D, *scores = acc + Qmax * D;
        float *kbuf = scores + Qmax * B, *vbuf = kbuf + B * D, *m = vbuf + B * D, *l = m + Qmax;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t s = item / (K * parts), h = item / parts % K, p = item % parts;
            const int64_t C = context_lens[s], T = q_lens ? q_lens[s] : 1, q0 = q_starts ? q_starts[s] : s;
            const int64_t blocks = (C + B - 1) / B, b0 = p * part_blocks;
            const int64_t b1 = b0 + part_blocks < blocks ? b0 + part_blocks : blocks;
            float *pm = partials + item * partial, *pl = pm + Qmax, *pacc = pl + Qmax;
            if (b0 >= b1) { /* past this sequence's context: an empty partial the merge skips */
                if (parts > 1)
                    for (int64_t r = 0; r < T * G; ++r) pl[r] = 0.0f;
                continue;
            }
            for (int64_t i = 0; i < T; ++i)
                for (int64_t g = 0; g < G; ++g) {
                    const int64_t src = ((q0 + i) * N + h * G + g) * D;
                    float *dst = qf + (i * G + g) * D;
                    if (dtype == DTYPE_F32)
                        memcpy(dst, (const float *)q + src, sizeof(float) * D);
                    else
                        for (int64_t d = 0; d < D; ++d) dst[d] = bf16_to_f32(((const uint16_t *)q)[src + d]);
                }
            const Item it = {k_cache, v_cache, dtype, block_tables + s * max_blocks, b0, b1, C, C - T, T, G, D, B,
                             h * D, K * D, scale};
            if (parts == 1) {
                attend_item(&it, qf, m, l, acc, scores, kbuf, vbuf);
                for (int64_t r = 0; r < T * G; ++r)
                    store_row(out, dtype, ((q0 + r / G) * N + h * G + r % G) * D, acc + r * D, 1.0f / l[r], D);
            } else {
                attend_item(&it, qf, pm, pl, pacc, scores, kbuf, vbuf);
            }
        }
        if (parts > 1) {
            /* Merge each (sequence, kv head)'s partitions: out = sum_p acc_p e^(m_p - M) / sum_p l_p e^(m_p - M). */
#pragma omp for schedule(static)
            for (int64_t sh = 0; sh < S * K; ++sh) {
                const int64_t s = sh / K, h = sh % K, T = q_lens ? q_lens[s] : 1, q0 = q_starts ? q_starts[s] : s;
                for (int64_t r = 0; r < T * G; ++r) {
                    float top = -INFINITY, total = 0.0f;
                    for (int64_t p = 0; p < parts; ++p) {
                        const float *pm = partials + (sh * parts + p) * partial;
                        if (pm[Qmax + r] > 0.0f && pm[r] > top) top = pm[r];
                    }
                    for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
                    for (int64_t p = 0; p < parts; ++p) {
                        const float *pm = partials + (sh * parts + p) * partial, *pacc = pm + 2 * Qmax + r * D;
                        if (!(pm[Qmax + r] > 0.0f)) continue;
                        const float w = exp_f32(pm[r] - top);
                        total += pm[Qmax + r] * w;
                        for (int64_t d = 0; d < D; ++d) acc[d] += w * pacc[d];
                    }
                    store_row(out, dtype, ((q0 + r / G) * N + h * G + r % G) * D, acc, 1.0f / total, D);
                }
            }
        }
    }
    free(buffers);
    return PA_OK;
}
