/* y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]) for small M: the decode-time matrix-vector product.
 *
 * Decode on a CPU is bound by memory bandwidth: every weight byte is read once per token while x is tiny. So the
 * kernel streams W exactly once for all M rows of x: each thread takes one contiguous slice of W's rows. For one
 * or two rows of x it reads the slice front to back, one weight row at a time, a single sequential stream; for
 * more it computes, for a tile of R weight rows, the dot products with every row of x while those R rows are still
 * in L1/L2, prefetching far ahead so DRAM stays busy while it computes.
 *
 * W is row-major fp32, bf16 or fp16 (16-bit types as raw uint16 bits); x, bias and y may each be any of the three.
 * Products and sums are fp32: W and x are widened, except that bf16 W with bf16 x uses AVX512-BF16 pair dot
 * products where the CPU has them (exact products, fp32 sums: the same up to summation order and denormals).
 * fp16 needs F16C (see ernie45_gemv_supports_fp16).
 *
 * Plain C with GCC vector extensions (gcc and clang), so one code path serves AVX-512, AVX2 and anything else; the
 * vector width and tile shape follow the ISA the compiler targets (-march=native). Intrinsics appear only where
 * the extensions have no good spelling (widening 16-bit floats, horizontal sums, bf16 dot products).
 *
 * The library links libgomp.so.1 and is meant to be loaded after torch, so it shares torch's OpenMP runtime (one
 * thread pool, no oversubscription). The thread count is an argument, never omp_set_num_threads, so the kernel
 * follows torch.get_num_threads() without touching global OpenMP state.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "scalar_types.h"

#if defined(__AVX512F__) || defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { GEMV_OK = 0, GEMV_BAD_DTYPE = 1, GEMV_BAD_SHAPE = 2, GEMV_NO_MEMORY = 3 };

/* Vector width in floats and how many registers the tile may use; tiles must fit the register file or the
 * accumulators spill and the kernel becomes load-bound. */
#if defined(__AVX512F__)
#define VEC 16
#define NUM_VREGS 32
#elif defined(__AVX__)
#define VEC 8
#define NUM_VREGS 16
#else
#define VEC 4
#define NUM_VREGS 16
#endif

/* Tile shapes for three or more rows of x: R weight rows x MT rows of x, needing R*MT accumulators + R weight
 * vectors + 1 x vector registers; a wide tile does the most FMAs per load. Rows of x beyond MT re-read the tile's
 * weights from L1/L2. Measured on Zen 4 (2 threads, 103424 x 1024): wide 3 x 8 beat 4 x 4 by 10-35% at M = 8,
 * tied at M = 16. (-D overrides are for such experiments.) */
#if NUM_VREGS >= 32
#ifndef WIDE_R
#define WIDE_R 3
#define WIDE_MT 8 /* 24 + 3 + 1 = 28 registers */
#endif
#else
#ifndef WIDE_R
#define WIDE_R 4
#define WIDE_MT 2 /* 8 + 4 + 1 = 13 registers */
#endif
#endif
#define MAX_R WIDE_R
#define MAX_MT (WIDE_MT > 2 ? WIDE_MT : 2)

/* Software prefetch into the weight stream. The hardware prefetcher alone stops at every 4 KiB page and loses
 * track of the tile's interleaved row streams; prefetching far ahead into L2 keeps enough misses in flight to reach
 * DRAM bandwidth while the core computes (+10% fp32 and +25% bf16 at M = 1, +20-50% at M = 8, on Zen 4).
 * Distances from 32 KiB to 1 MiB measured the same; prefetcht0 and prefetchnta were 10-25% slower, and one
 * prefetch per 128 or 256 bytes instead of per 64-byte line 3-10% slower. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES (256 * 1024)
#endif
#ifndef PREFETCH_STRIDE
#define PREFETCH_STRIDE 64 /* bytes of each weight row per prefetch: one cache line */
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 1 /* prefetcht2: into L2, not L1, where it would evict the tile being reused */
#endif

/* Below this many weight elements one thread finishes before a parallel region would even start. */
#define MIN_PARALLEL_ELEMENTS (1 << 16)

typedef float vfloat __attribute__((vector_size(VEC * 4)));
typedef uint32_t vuint __attribute__((vector_size(VEC * 4)));
/* Unaligned, aliasing views for loads from arbitrary tensor storage. */
typedef float vfloat_u __attribute__((vector_size(VEC * 4), aligned(1), may_alias));
typedef uint16_t vhalf_u __attribute__((vector_size(VEC * 2), aligned(1), may_alias));


/* An empty asm that claims to modify v: without it gcc re-loads each weight and x vector once per FMA (folding the
 * load into the FMA) instead of once per tile step, doubling the loads, which then bind before the FMAs do
 * (fp32 M=8 went from 27 to 20 ms). "v" is x86's any-vector-register constraint. */
#if defined(__x86_64__) || defined(__i386__)
#define KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define KEEP_IN_REGISTER(v) ((void)0)
#endif

#if defined(__F16C__)
#define HAVE_FP16 1
#else
#define HAVE_FP16 0 /* the entry point rejects fp16: its vector paths need F16C */
#endif

/* ---- vector helpers ---- */

/* VEC consecutive weights starting at element i, widened to fp32. */
INLINE vfloat load_vec(const void *base, int dtype, int64_t i) {
    if (dtype == DTYPE_F32) return *(const vfloat_u *)((const float *)base + i);
    vhalf_u bits = *(const vhalf_u *)((const uint16_t *)base + i);
    if (dtype == DTYPE_BF16) {
        /* gcc lowers a 16-lane __builtin_convertvector as two 8-lane halves plus shuffles; name the one
         * instruction instead where we can. */
#if defined(__AVX512F__)
        return (vfloat)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)bits), 16);
#elif defined(__AVX2__) && VEC == 8
        return (vfloat)_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)bits), 16);
#else
        return (vfloat)(__builtin_convertvector(bits, vuint) << 16);
#endif
    }
#if defined(__AVX512F__)
    return _mm512_cvtph_ps((__m256i)bits);
#elif defined(__F16C__) && VEC == 8
    return _mm256_cvtph_ps((__m128i)bits);
#elif defined(__F16C__) && VEC == 4
    return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((const uint16_t *)base + i)));
#else
    vfloat out;
    for (int j = 0; j < VEC; ++j) out[j] = f16_to_f32(bits[j]);
    return out;
#endif
}

INLINE float horizontal_sum(vfloat v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps(v);
#elif defined(__AVX__) && VEC == 8
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
#else
    float sum = 0.0f;
    for (int j = 0; j < VEC; ++j) sum += v[j];
    return sum;
#endif
}

/* The inner loops, by weight format and x format; each is its own compiled copy of the tile code. */
enum {
    KERNEL_F32 = DTYPE_F32,   /* fp32 W, fp32 x */
    KERNEL_BF16 = DTYPE_BF16, /* bf16 W widened to fp32, fp32 x */
    KERNEL_F16 = DTYPE_F16,   /* fp16 W widened to fp32, fp32 x */
    KERNEL_BF16_DOT = 3,      /* bf16 W, bf16 x: AVX512-BF16 pair dot products (exact products, fp32 sums) */
};

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_BF16_DOT 1
#else
#define HAVE_BF16_DOT 0
#endif

INLINE int weight_bytes(int kernel) { return kernel == KERNEL_F32 ? 4 : 2; }

/* acc[r][m] += W[r, k:k+VEC] * x[m, k:k+VEC] */
INLINE void fma_step(vfloat acc[MAX_R][MAX_MT], const void *w, int kernel, const float *x, int64_t K, int64_t k,
                     int R, int MT) {
    vfloat w_vec[MAX_R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        w_vec[r] = load_vec(w, kernel, r * K + k);
        KEEP_IN_REGISTER(w_vec[r]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
        vfloat x_vec = *(const vfloat_u *)(x + m * K + k);
        KEEP_IN_REGISTER(x_vec);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][m] += w_vec[r] * x_vec;
    }
}

/* sums[r][m] = dot(W[r, :], x[m, :]) for an R x MT tile, widening W to fp32. R, MT and the kernel are
 * compile-time constants at every call site, so the loops unroll and the accumulators live in registers. Issues
 * one prefetch per weight row per 64-byte line at `prefetch` (same offsets, further on) unless it is NULL. */
INLINE void dot_tile_fma(const void *w, int kernel, const float *x, int64_t K, int R, int MT, const char *prefetch,
                         float sums[MAX_R][MAX_MT]) {
    const int chunk = PREFETCH_STRIDE / weight_bytes(kernel); /* weights per row per prefetch */
    vfloat acc[MAX_R][MAX_MT];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) acc[r][m] = (vfloat){0};

    int64_t k = 0;
    if (prefetch)
        for (; k + chunk <= K; k += chunk) {
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r)
                __builtin_prefetch(prefetch + (r * K + k) * weight_bytes(kernel), 0, PREFETCH_LOCALITY);
#pragma GCC unroll 16
            for (int v = 0; v < chunk; v += VEC) fma_step(acc, w, kernel, x, K, k + v, R, MT);
        }
    for (; k + VEC <= K; k += VEC) fma_step(acc, w, kernel, x, K, k, R, MT);

#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) sums[r][m] = horizontal_sum(acc[r][m]);

    for (; k < K; ++k)
        for (int r = 0; r < R; ++r) {
            const float w_k = load_scalar(w, kernel, r * K + k);
            for (int m = 0; m < MT; ++m) sums[r][m] += w_k * x[m * K + k];
        }
}

#if HAVE_BF16_DOT
/* acc[r][m] += pairwise dot of 32 bf16 of W[r] and x[m] from element k; lanes outside `mask` read as zero. */
INLINE void bf16_dot_step(__m512 acc[MAX_R][MAX_MT], const uint16_t *w, const uint16_t *x, int64_t K, int64_t k,
                          int R, int MT, __mmask32 mask) {
    __m512i w_vec[MAX_R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        w_vec[r] = _mm512_maskz_loadu_epi16(mask, w + r * K + k);
        KEEP_IN_REGISTER(w_vec[r]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
        __m512i x_vec = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
        KEEP_IN_REGISTER(x_vec);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w_vec[r], (__m512bh)x_vec);
    }
}

/* dot_tile_fma for bf16 W and bf16 x: one instruction per 32 products instead of widen + 2 FMAs per 32, which
 * makes several rows of x cheap enough to stay memory-bound. Products of two bf16 are exact in fp32, so this
 * matches widening both to fp32 except that denormals are flushed to zero. */
INLINE void dot_tile_bf16_dot(const uint16_t *w, const uint16_t *x, int64_t K, int R, int MT, const char *prefetch,
                              float sums[MAX_R][MAX_MT]) {
    __m512 acc[MAX_R][MAX_MT];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();

    const __mmask32 all = 0xffffffffu;
    int64_t k = 0;
    if (prefetch)
        for (; k + PREFETCH_STRIDE / 2 <= K; k += PREFETCH_STRIDE / 2) {
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) __builtin_prefetch(prefetch + (r * K + k) * 2, 0, PREFETCH_LOCALITY);
#pragma GCC unroll 8
            for (int v = 0; v < PREFETCH_STRIDE / 2; v += 32) bf16_dot_step(acc, w, x, K, k + v, R, MT, all);
        }
    for (; k + 32 <= K; k += 32) bf16_dot_step(acc, w, x, K, k, R, MT, all);
    if (k < K) bf16_dot_step(acc, w, x, K, k, R, MT, (__mmask32)(all >> (32 - (K - k))));

#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) sums[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}
#endif

/* ---- one or two rows of x: one weight row at a time, one sequential stream per thread ----
 *
 * With so few rows of x there is no reuse to tile for, and what counts is how fast DRAM delivers W. A tile of 8
 * weight rows reads 8 streams 4 KiB apart (rows of 1024 fp32 are each a page); one sequential stream is what the
 * hardware prefetchers follow best: a plain read of 1 GiB in 8 such interleaved streams reached 32 GB/s where one
 * stream reached 45 (Zen 5, 2 threads). Row by row, the ERNIE 0.3B decode step's weights went from 42 to 48 GB/s
 * in fp32 and 39 to 46 in bf16 with AVX-512 (+8-17%), and from 49 to 61 and 39 to 54 GB/s with AVX2 (+26-39%). */

/* Independent accumulators per row of x along K: FMA chains in flight while each iteration reads 4 whole cache
 * lines (memory binds long before the chains' latency does). */
#define STREAM_UNROLL 4
/* A short software prefetch ahead of the stream: 8-64 KiB measured alike (0 lost up to 30% in bf16 with AVX2;
 * 128 KiB and more lost 5-10%). */
#ifndef STREAM_PREFETCH_BYTES
#define STREAM_PREFETCH_BYTES (16 * 1024)
#endif

/* sums[m] = dot(W[row, :], x[m, :]) for MT <= 2 rows of x (a constant at every call site), W's row read front
 * to back; prefetches STREAM_PREFETCH_BYTES further along W (which, rows being contiguous, runs on into the next
 * rows) until `prefetch_end`. */
INLINE void dot_row_fma(const void *w, int kernel, const float *x, int64_t K, int MT, const char *prefetch_end,
                        float sums[2]) {
    const int64_t step = STREAM_UNROLL * VEC;
    const int bytes = weight_bytes(kernel);
    vfloat acc[STREAM_UNROLL][2];
#pragma GCC unroll 4
    for (int u = 0; u < STREAM_UNROLL; ++u) acc[u][0] = acc[u][1] = (vfloat){0};
    int64_t k = 0;
    for (; k + step <= K; k += step) {
        const char *ahead = (const char *)w + k * bytes + STREAM_PREFETCH_BYTES;
        if (STREAM_PREFETCH_BYTES > 0 && ahead + step * bytes <= prefetch_end)
            for (int line = 0; line < step * bytes; line += 64) __builtin_prefetch(ahead + line, 0, PREFETCH_LOCALITY);
#pragma GCC unroll 4
        for (int u = 0; u < STREAM_UNROLL; ++u) {
            vfloat w_vec = load_vec(w, kernel, k + u * VEC);
            KEEP_IN_REGISTER(w_vec);
            acc[u][0] += w_vec * *(const vfloat_u *)(x + k + u * VEC);
            if (MT == 2) acc[u][1] += w_vec * *(const vfloat_u *)(x + K + k + u * VEC);
        }
    }
    for (; k + VEC <= K; k += VEC) {
        vfloat w_vec = load_vec(w, kernel, k);
        acc[0][0] += w_vec * *(const vfloat_u *)(x + k);
        if (MT == 2) acc[0][1] += w_vec * *(const vfloat_u *)(x + K + k);
    }
    for (int m = 0; m < MT; ++m) {
        vfloat total = (acc[0][m] + acc[1][m]) + (acc[2][m] + acc[3][m]);
        sums[m] = horizontal_sum(total);
    }
    for (; k < K; ++k) {
        const float w_k = load_scalar(w, kernel, k);
        for (int m = 0; m < MT; ++m) sums[m] += w_k * x[m * K + k];
    }
}

#if HAVE_BF16_DOT
/* dot_row_fma for bf16 W and bf16 x (pair dot products, 32 per instruction). */
INLINE void dot_row_bf16_dot(const uint16_t *w, const uint16_t *x, int64_t K, int MT, const char *prefetch_end,
                             float sums[2]) {
    const int64_t step = STREAM_UNROLL * 32;
    __m512 acc[STREAM_UNROLL][2];
#pragma GCC unroll 4
    for (int u = 0; u < STREAM_UNROLL; ++u) acc[u][0] = acc[u][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + step <= K; k += step) {
        const char *ahead = (const char *)(w + k) + STREAM_PREFETCH_BYTES;
        if (STREAM_PREFETCH_BYTES > 0 && ahead + step * 2 <= prefetch_end)
            for (int line = 0; line < step * 2; line += 64) __builtin_prefetch(ahead + line, 0, PREFETCH_LOCALITY);
#pragma GCC unroll 4
        for (int u = 0; u < STREAM_UNROLL; ++u) {
            __m512i w_vec = _mm512_loadu_si512(w + k + u * 32);
            KEEP_IN_REGISTER(w_vec);
            acc[u][0] = _mm512_dpbf16_ps(acc[u][0], (__m512bh)w_vec, (__m512bh)_mm512_loadu_si512(x + k + u * 32));
            if (MT == 2)
                acc[u][1] = _mm512_dpbf16_ps(acc[u][1], (__m512bh)w_vec,
                                             (__m512bh)_mm512_loadu_si512(x + K + k + u * 32));
        }
    }
    for (; k < K; k += 32) {
        const __mmask32 mask = K - k >= 32 ? 0xffffffffu : (__mmask32)(0xffffffffu >> (32 - (K - k)));
        __m512i w_vec = _mm512_maskz_loadu_epi16(mask, w + k);
        acc[0][0] = _mm512_dpbf16_ps(acc[0][0], (__m512bh)w_vec, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k));
        if (MT == 2)
            acc[0][1] = _mm512_dpbf16_ps(acc[0][1], (__m512bh)w_vec,
                                         (__m512bh)_mm512_maskz_loadu_epi16(mask, x + K + k));
    }
    for (int m = 0; m < MT; ++m)
        sums[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]),
                                                        _mm512_add_ps(acc[2][m], acc[3][m])));
}
#endif

INLINE void dot_tile(const void *w, int kernel, const void *x, int64_t K, int R, int MT, const char *prefetch,
                     float sums[MAX_R][MAX_MT]) {
#if HAVE_BF16_DOT
    if (kernel == KERNEL_BF16_DOT) {
        dot_tile_bf16_dot(w, x, K, R, MT, prefetch, sums);
        return;
    }
#endif
    dot_tile_fma(w, kernel, x, K, R, MT, prefetch, sums);
}

/* One case per tile shape so each gets its own unrolled, register-allocated copy of dot_tile. */
INLINE void dot_tile_dispatch(const void *w, int kernel, const void *x, int64_t K, int R, int MT,
                              const char *prefetch, float sums[MAX_R][MAX_MT]) {
#define TILE(r, mt)                                                \
    if (R == (r) && MT == (mt)) {                                  \
        dot_tile(w, kernel, x, K, (r), (mt), prefetch, sums);      \
        return;                                                    \
    }
    TILE(1, 1) /* the last N % R weight rows, one row of x at a time: too few to be worth more copies */
    /* Every MT up to WIDE_MT: the last tile of x's rows may be partial. */
    TILE(WIDE_R, 1)
    TILE(WIDE_R, 2)
#if WIDE_MT >= 3
    TILE(WIDE_R, 3)
#endif
#if WIDE_MT >= 4
    TILE(WIDE_R, 4)
#endif
#if WIDE_MT >= 5
    TILE(WIDE_R, 5)
#endif
#if WIDE_MT >= 6
    TILE(WIDE_R, 6)
#endif
#if WIDE_MT >= 7
    TILE(WIDE_R, 7)
#endif
#if WIDE_MT >= 8
    TILE(WIDE_R, 8)
#endif
#undef TILE
}

typedef struct {
    const void *x; /* [M, K]: fp32, or bf16 for KERNEL_BF16_DOT */
    const void *w; /* [N, K] */
    const void *bias;
    void *y; /* [M, N] */
    int bias_dtype, y_dtype;
    int64_t M, N, K;
} GemvArgs;

/* Output rows [n_begin, n_end) for every row of x: one thread's contiguous slice of W. */
INLINE void gemv_rows(const GemvArgs *a, int kernel, int64_t n_begin, int64_t n_end) {
    const int64_t M = a->M, N = a->N, K = a->K;
    const int64_t row_bytes = K * weight_bytes(kernel);
    const int x_bytes = kernel == KERNEL_BF16_DOT ? 2 : 4;
    /* Prefetches stay inside the slice: the next thread's rows would only be evicted before it reads them. */
    const char *slice_end = (const char *)a->w + n_end * row_bytes;

    if (M <= 2) {
        for (int64_t n = n_begin; n < n_end; ++n) {
            const char *w_row = (const char *)a->w + n * row_bytes;
            float sums[2];
#if HAVE_BF16_DOT
            if (kernel == KERNEL_BF16_DOT) {
                if (M == 1) dot_row_bf16_dot((const uint16_t *)w_row, a->x, K, 1, slice_end, sums);
                else dot_row_bf16_dot((const uint16_t *)w_row, a->x, K, 2, slice_end, sums);
            } else
#endif
            if (M == 1) dot_row_fma(w_row, kernel, a->x, K, 1, slice_end, sums);
            else dot_row_fma(w_row, kernel, a->x, K, 2, slice_end, sums);
            const float bias = a->bias ? load_scalar(a->bias, a->bias_dtype, n) : 0.0f;
            for (int m = 0; m < M; ++m) store_scalar(a->y, a->y_dtype, m * N + n, sums[m] + bias);
        }
        return;
    }
    for (int64_t n = n_begin; n < n_end;) {
        const int R = n_end - n >= WIDE_R ? WIDE_R : 1;
        const int row_tile = R == 1 ? 1 : WIDE_MT;
        const char *w_rows = (const char *)a->w + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += row_tile) {
            const int MT = M - m0 < row_tile ? (int)(M - m0) : row_tile;
            /* Later row tiles of x find the weights already cached. */
            const int prefetch_ok = m0 == 0 && w_rows + R * row_bytes + PREFETCH_BYTES <= slice_end;
            float sums[MAX_R][MAX_MT];
            dot_tile_dispatch(w_rows, kernel, (const char *)a->x + m0 * K * x_bytes, K, R, MT,
                              prefetch_ok ? w_rows + PREFETCH_BYTES : NULL, sums);
            for (int r = 0; r < R; ++r) {
                const float bias = a->bias ? load_scalar(a->bias, a->bias_dtype, n + r) : 0.0f;
                for (int m = 0; m < MT; ++m) store_scalar(a->y, a->y_dtype, (m0 + m) * N + n + r, sums[r][m] + bias);
            }
        }
        n += R;
    }
}

/* One copy per kernel: the format branches fold away inside the hot loops. */
static void gemv_rows_f32(const GemvArgs *a, int64_t b, int64_t e) { gemv_rows(a, KERNEL_F32, b, e); }
static void gemv_rows_bf16(const GemvArgs *a, int64_t b, int64_t e) { gemv_rows(a, KERNEL_BF16, b, e); }
#if HAVE_FP16
static void gemv_rows_f16(const GemvArgs *a, int64_t b, int64_t e) { gemv_rows(a, KERNEL_F16, b, e); }
#endif
#if HAVE_BF16_DOT
static void gemv_rows_bf16_dot(const GemvArgs *a, int64_t b, int64_t e) { gemv_rows(a, KERNEL_BF16_DOT, b, e); }
#endif

static int dtype_ok(int dtype) {
    return dtype == DTYPE_F32 || dtype == DTYPE_BF16 || (dtype == DTYPE_F16 && HAVE_FP16);
}

int ernie45_gemv_supports_fp16(void) { return HAVE_FP16; }

/* Returns GEMV_OK or an error code; bias may be NULL. All tensors contiguous. */
int ernie45_gemv(const void *x, int x_dtype, const void *w, int w_dtype, const void *bias, int bias_dtype, void *y,
                 int y_dtype, int64_t M, int64_t N, int64_t K, int num_threads) {
    if (!dtype_ok(x_dtype) || !dtype_ok(w_dtype) || !dtype_ok(y_dtype) || (bias && !dtype_ok(bias_dtype)))
        return GEMV_BAD_DTYPE;
    if (M < 1 || N < 1 || K < 1) return GEMV_BAD_SHAPE;

    int kernel = w_dtype;
    if (HAVE_BF16_DOT && w_dtype == DTYPE_BF16 && x_dtype == DTYPE_BF16) kernel = KERNEL_BF16_DOT;

    /* Otherwise x is widened to fp32 once up front (it is at most a few rows), so each kernel's hot loop handles
     * one weight format and no x format. */
    float *x_f32 = NULL;
    if (kernel != KERNEL_BF16_DOT && x_dtype != DTYPE_F32) {
        x_f32 = malloc((size_t)(M * K) * sizeof(float));
        if (!x_f32) return GEMV_NO_MEMORY;
        for (int64_t i = 0; i < M * K; ++i) x_f32[i] = load_scalar(x, x_dtype, i);
    }

    GemvArgs args = {x_f32 ? x_f32 : x, w, bias, y, bias_dtype, y_dtype, M, N, K};
    void (*rows_fn)(const GemvArgs *, int64_t, int64_t) = gemv_rows_f32;
    if (kernel == KERNEL_BF16) rows_fn = gemv_rows_bf16;
#if HAVE_FP16
    if (kernel == KERNEL_F16) rows_fn = gemv_rows_f16;
#endif
#if HAVE_BF16_DOT
    if (kernel == KERNEL_BF16_DOT) rows_fn = gemv_rows_bf16_dot;
#endif

    int threads = num_threads < 1 ? 1 : num_threads;
    if (N * K < MIN_PARALLEL_ELEMENTS) threads = 1;
    /* One contiguous slice of W per thread, a multiple of 8 rows: a single long stream per core is
     * what the prefetchers handle best. */
    const int64_t slice_rows = ((N + threads - 1) / threads + 7) / 8 * 8;
    threads = (int)((N + slice_rows - 1) / slice_rows);

#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int slice = 0; slice < threads; ++slice) {
        const int64_t n_begin = slice * slice_rows;
        const int64_t n_end = n_begin + slice_rows < N ? n_begin + slice_rows : N;
        rows_fn(&args, n_begin, n_end);
    }

    free(x_f32);
    return GEMV_OK;
}
