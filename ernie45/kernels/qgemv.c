/* y[M, N] = x[M, K] @ dequant(Wq)[N, K]^T (+ bias[N]) for small M: decode with weight-only quantized weights.
 *
 * Decode is bound by memory bandwidth, so reading 1, 0.5 or 0.25 bytes per weight instead of 4 (fp32) is the
 * whole point; the kernel unpacks the codes in registers and never writes a dequantized weight to memory (M <= 2)
 * or only into a per-thread L1/L2 buffer reused by every row of x (M > 2).
 *
 * Format (ernie45/quant/packing.py is the Python side and must match):
 * - codes q in [0, 2^bits) along K, packed into bytes in blocks of 16 bytes per row. A block holds 16 * (8 / bits)
 *   consecutive weights: byte j's bits [s*bits, (s+1)*bits) hold weight (s * 16 + j) of the block. So one 16-byte
 *   load gives 16 consecutive weights per shift, with no cross-lane shuffle (llama.cpp's Q4_0 idea, generalised).
 *   Rows are padded to whole blocks (row_bytes); weights past K are never read.
 * - per group of `group_size` weights along K: a scale s (fp16) and a zero point z; w = (q - z) * s. z is stored
 *   as uint8 in steps of 2^bits / 256 (integral zero points exactly, fitted fractional ones to 1/64 at 2 bits);
 *   symmetric formats pass zeros = NULL and a constant zero point (2^(bits-1)).
 * So dot(w, x) = sum_g s_g * (dot(q_g, x_g) - z_g * sum(x_g)): the scale and zero are applied once per group.
 *
 * Two ways to form dot(q_g, x_g):
 * - integer (8-, 4- and 2-bit codes, group size a multiple of 64 up to 4096, any rows of x; AVX-512 VNNI
 *   or AVX2): x is rounded once per call to 16-bit integers per group, x_g ~ sx_g * (256 * hi + lo) with hi, lo
 *   int8 (base 255 for 8-bit codes on AVX2, see SIGNED_8BIT_CODES; |error| <= sx_g / 2 <= max|x_g| / 64770: far
 *   finer than bf16's 2^-9 relative), and the codes are multiplied by hi and lo with u8 x s8 integer dot products
 *   (vpdpbusd, or vpmaddubsw + vpmaddwd on AVX2), 64 or 32 products per instruction, exact in int32. This is
 *   llama.cpp's idea (q8_0 activations against quantized weights) at 16 bits of x instead of 8.
 *   Widening every code to fp32 instead (the float way) made int4 decode bound by the conversions at ~9 GB/s, and
 *   int8 decode slower than fp32's on AVX2.
 * - float (other group sizes, other CPUs): codes widened to fp32 and multiplied with x in fp32.
 *
 * Plain C with GCC vector extensions (one code path for AVX-512 and AVX2; -march=native picks the widths).
 * Shares torch's OpenMP runtime (loaded after torch) and takes the thread count as an argument, as gemv.c does.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "scalar_types.h"

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { QGEMV_OK = 0, QGEMV_BAD_DTYPE = 1, QGEMV_BAD_SHAPE = 2, QGEMV_NO_MEMORY = 3 };

/* One weight of a call (ernie45_qgemv_many: several weights sharing x, e.g. q/k/v; ctypes mirrors this layout). */
typedef struct {
    const uint8_t *qweight; /* [N, row_bytes] */
    int64_t row_bytes;
    const uint16_t *scales; /* fp16 [N, K / group_size] */
    const uint8_t *zeros;   /* uint8 [N, K / group_size], or NULL: every zero point is zero_const */
    float zero_const;
    const void *bias;       /* [N] or NULL */
    int bias_dtype;
    void *y;                /* [M, N] in y_dtype */
    int64_t N;
} QgemvWeight;

/* Most weights per call. */
#define MAX_WEIGHTS 8

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x16_u __attribute__((vector_size(16), aligned(1), may_alias));
typedef float f32x16_u __attribute__((vector_size(64), aligned(1), may_alias));


/* An empty asm claiming to modify v, as in gemv.c: without it gcc folds each load into every FMA that uses it,
 * doubling the loads, which then bind before the FMAs do. */
#if defined(__AVX512F__) /* a 64-byte vector fits one register only with AVX-512 */
#define KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define KEEP_IN_REGISTER(v) ((void)0)
#endif

/* Rows of W per tile: independent FMA chains (M <= 2) and a tile small enough to stay in L1 (M > 2). */
#define TILE_R 4
/* Rows of x per step of the dequantize-then-dot path: TILE_R * TILE_M accumulators + TILE_R weights + 1 x. */
#define TILE_M 4
#define MIN_PARALLEL_BYTES (1 << 15)
/* Software prefetch this far ahead in each weight row stream (prefetcht2, once per 64-byte line), as gemv.c
 * does: the hardware prefetcher alone loses the tile's interleaved row streams at page boundaries. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES (64 * 1024)
#endif
/* Weights per row dequantized at a time (M > 2): TILE_R rows of it (4 KiB) and TILE_M rows of x (16 KiB) stay in
 * L1. Without the chunking every tile streamed all of x from L2 and M = 16 ran at a quarter of the FMA rate. */
#define K_CHUNK 256
/* Rows of x whose accumulators are kept per tile (16 KiB of vectors); more rows are done in passes. */
#define MAX_M_ACC 16

INLINE float hsum(f32x16 v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.0f;
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) s += v[j];
    return s;
#endif
}

/* Bit field `shift` of 16 packed bytes, widened to fp32 (shift is a constant at every call site). */
INLINE f32x16 widen_codes(u8x16 bytes, int shift, int BITS) {
#if defined(__AVX2__)
    __m128i q = (__m128i)bytes;
    if (BITS != 8) q = _mm_and_si128(_mm_srli_epi16(q, shift), _mm_set1_epi8((char)((1u << BITS) - 1)));
#if defined(__AVX512F__)
    return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
#else
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
    f32x16 out;
    memcpy(&out, &lo, sizeof lo);
    memcpy((char *)&out + sizeof lo, &hi, sizeof hi);
    return out;
#endif
#else
    u8x16 q = BITS == 8 ? bytes : (u8x16)((bytes >> shift) & (uint8_t)((1u << BITS) - 1));
    f32x16 out;
    for (int j = 0; j < 16; ++j) out[j] = (float)q[j];
    return out;
#endif
}

/* The 16 codes of weights [16 v, 16 v + 16) of a packed row, widened to fp32. BITS is a compile-time constant at
 * every call site. */
INLINE f32x16 codes16(const uint8_t *row, int64_t v, int BITS) {
    const int per = 8 / BITS;
    const u8x16 bytes = *(const u8x16_u *)(row + (v / per) * 16);
    return widen_codes(bytes, (int)(v % per) * BITS, BITS);
}

INLINE float zero_point(const uint8_t *zeros, int64_t at, float zero_const, int BITS) {
    return zeros ? (float)zeros[at] * ((float)(1 << BITS) / 256.0f) : zero_const;
}

/* M <= 2: for TILE_R weight rows and MT rows of x, accumulate dot(q_g, x_g) per group in vectors, fold each
 * group into a running vector total scaled by the group's scale (one broadcast FMA), and subtract the zero-point
 * term s * z * sum(x_g) as a scalar; one horizontal sum per row at the end. xsum[m][g] = sum(x_g) precomputed. */
INLINE void rows_direct(const uint8_t *qw, int64_t row_bytes, const uint16_t *scales, const uint8_t *zeros,
                        float zero_const, int64_t n0, int R, const float *x, const float *xsum, int MT, int64_t K,
                        int64_t G, int BITS, float out[TILE_R][2]) {
    const int64_t groups = K / G, vecs_per_group = G / 16;
    f32x16 total[TILE_R][2];
    float zero_term[TILE_R][2];
#pragma GCC unroll 4
    for (int r = 0; r < TILE_R; ++r) {
        total[r][0] = total[r][1] = (f32x16){0};
        zero_term[r][0] = zero_term[r][1] = 0.0f;
    }
    for (int64_t g = 0; g < groups; ++g) {
        f32x16 acc[TILE_R][2];
#pragma GCC unroll 4
        for (int r = 0; r < TILE_R; ++r) acc[r][0] = acc[r][1] = (f32x16){0};
        if (BITS != 8 && vecs_per_group % (8 / BITS) == 0) {
            /* Whole blocks: one 16-byte load per row feeds 8/BITS vectors, each cut with a constant shift. */
            const int per = 8 / BITS;
            for (int64_t b = g * vecs_per_group / per; b < (g + 1) * vecs_per_group / per; ++b) {
                if (((b * 16) & 63) == 0)
#pragma GCC unroll 4
                    for (int r = 0; r < R; ++r)
                        __builtin_prefetch(qw + (n0 + r) * row_bytes + b * 16 + PREFETCH_BYTES, 0, 1);
                u8x16 bytes[TILE_R];
#pragma GCC unroll 4
                for (int r = 0; r < R; ++r) bytes[r] = *(const u8x16_u *)(qw + (n0 + r) * row_bytes + b * 16);
#pragma GCC unroll 4
                for (int f = 0; f < per; ++f) {
                    f32x16 xv[2] = {{0}, {0}};
#pragma GCC unroll 2
                    for (int m = 0; m < MT; ++m) {
                        xv[m] = *(const f32x16_u *)(x + m * K + (b * per + f) * 16);
                        KEEP_IN_REGISTER(xv[m]);
                    }
#pragma GCC unroll 4
                    for (int r = 0; r < R; ++r) {
                        const f32x16 w = widen_codes(bytes[r], f * BITS, BITS);
#pragma GCC unroll 2
                        for (int m = 0; m < MT; ++m) acc[r][m] += w * xv[m];
                    }
                }
            }
        } else
        for (int64_t v = g * vecs_per_group; v < (g + 1) * vecs_per_group; ++v) {
            if (((v * 16 * BITS / 8) & 63) == 0)
#pragma GCC unroll 4
                for (int r = 0; r < R; ++r)
                    __builtin_prefetch(qw + (n0 + r) * row_bytes + (v / (8 / BITS)) * 16 + PREFETCH_BYTES, 0, 1);
            f32x16 xv[2];
#pragma GCC unroll 2
            for (int m = 0; m < MT; ++m) {
                xv[m] = *(const f32x16_u *)(x + m * K + v * 16);
                KEEP_IN_REGISTER(xv[m]);
            }
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                const f32x16 w = codes16(qw + (n0 + r) * row_bytes, v, BITS);
#pragma GCC unroll 2
                for (int m = 0; m < MT; ++m) acc[r][m] += w * xv[m];
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            const int64_t at = (n0 + r) * groups + g;
            const float s = f16_to_f32(scales[at]);
            const float sz = s * zero_point(zeros, at, zero_const, BITS);
#pragma GCC unroll 2
            for (int m = 0; m < MT; ++m) {
                total[r][m] += s * acc[r][m];
                zero_term[r][m] += sz * xsum[m * groups + g];
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MT; ++m) out[r][m] = hsum(total[r][m]) - zero_term[r][m];
}


/* ---- integer dot products (see the header): 64 weights of codes per "unit" ---- */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define INT_DOT 1
typedef __m512i ivec;
#define UNIT_VECS 1 /* vectors of codes (and of x) per 64-weight unit */
INLINE ivec ivec_zero(void) { return _mm512_setzero_si512(); }
INLINE ivec ivec_load(const int8_t *x) { return _mm512_loadu_si512(x); }
INLINE ivec idot(ivec acc, ivec codes, ivec x) { return _mm512_dpbusd_epi32(acc, codes, x); }
/* The 64 codes of unit u of a packed row, in weight order, one byte each. */
INLINE void unit_codes(const uint8_t *row, int64_t u, int BITS, ivec out[UNIT_VECS]) {
    if (BITS == 8) {
        out[0] = _mm512_loadu_si512(row + u * 64); /* 64 consecutive codes, one byte each */
    } else if (BITS == 4) {
        /* Blocks A, B (weights 0-31, 32-63; low nibbles then high nibbles) -> [lo A, lo B, 16 hi A, 16 hi B]:
         * weights 0-15, 32-47, 16-31, 48-63, the order quantize_x writes x in (unit_slot). The 32 bytes loaded into
         * both halves and masked with 0x0f / 0xf0 at once: the high nibbles stay in place, 16x their value, and
         * the upper 8 int32 lanes of every sum are 16x too: HI_NIBBLE_LANES undoes it once per row, exactly (a
         * power of two). One op instead of four per 64 weights (shift, two masks, insert). */
        const __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(row + u * 32)));
        const __m512i masks = _mm512_inserti64x4(_mm512_set1_epi8(0x0f), _mm256_set1_epi8((char)0xf0), 1);
        out[0] = _mm512_and_si512(q, masks);
    } else {
        /* One block of 64 weights: lane s holds the bit field s. */
        const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(row + u * 16)));
        const __m512i shifts = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
        out[0] = _mm512_and_si512(_mm512_srlv_epi32(b, shifts), _mm512_set1_epi8(0x03));
    }
}
/* acc += the unit's dot products (int32 lanes). */
INLINE ivec unit_dot(ivec acc, const ivec codes[UNIT_VECS], const ivec x[UNIT_VECS], int BITS) {
    (void)BITS;
    return idot(acc, codes[0], x[0]);
}
/* Float vectors as wide as ivec, for the per-group totals. */
typedef float fvec __attribute__((vector_size(64)));
INLINE fvec ivec_to_fvec(ivec v) { return (fvec)_mm512_cvtepi32_ps(v); }
INLINE float fvec_sum(fvec v) { return _mm512_reduce_add_ps((__m512)v); }
/* Per-lane factor of a row's float total: 4-bit codes' upper lanes hold 16x their dot products (unit_codes). */
INLINE fvec unit_lane_scale(int BITS) {
    const float h = BITS == 4 ? 1.0f / 16.0f : 1.0f;
    return (fvec){1, 1, 1, 1, 1, 1, 1, 1, h, h, h, h, h, h, h, h};
}
/* Where weight j of a 64-weight unit sits in unit_codes' vector: 4-bit swaps the middle two quarters. */
INLINE int64_t unit_slot(int64_t j, int BITS) { return BITS == 4 ? (j & ~48) | ((j & 16) << 1) | ((j & 32) >> 1) : j; }
#elif defined(__AVX2__)
#define INT_DOT 1
typedef __m256i ivec;
#define UNIT_VECS 2
INLINE ivec ivec_zero(void) { return _mm256_setzero_si256(); }
/* Code x x pairs are at most 2 * 15 * 128 in magnitude: vpmaddubsw's int16 saturation is never reached. */
INLINE ivec ivec_load(const int8_t *x) { return _mm256_loadu_si256((const __m256i *)x); }
INLINE ivec idot(ivec acc, ivec codes, ivec x) {
    const __m256i pairs = _mm256_maddubs_epi16(codes, x);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
/* 8-bit codes are signed here (q - 128, SIGNED_8BIT_CODES): vpmaddubsw's u8 x s8 pairs of a u8 code (<= 255) and
 * x (<= 127) would saturate int16; |q - 128| x (x * sign(q - 128)) stays within 2 * 128 * 127. */
#define SIGNED_8BIT_CODES 1
/* acc += the unit's dot products. 4- and 2-bit: the two vectors' int16 pair sums are added before one widening
 * vpmaddwd (|pair| <= 2 * 15 * 128, two of them far inside int16): 5 instructions per unit instead of 6. 8-bit
 * codes' pairs may reach 2 * 128 * 127, so each vector widens on its own. */
INLINE ivec unit_dot(ivec acc, const ivec codes[UNIT_VECS], const ivec x[UNIT_VECS], int BITS) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (BITS == 8) {
#pragma GCC unroll 2
        for (int v = 0; v < UNIT_VECS; ++v) {
            const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(codes[v], codes[v]),
                                                       _mm256_sign_epi8(x[v], codes[v]));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
        }
        return acc;
    }
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(codes[0], x[0]), _mm256_maddubs_epi16(codes[1], x[1]));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
}
INLINE void unit_codes(const uint8_t *row, int64_t u, int BITS, ivec out[UNIT_VECS]) {
    if (BITS == 8) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h)
            out[h] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(row + u * 64 + h * 32)),
                                      _mm256_set1_epi8((char)0x80));
    } else if (BITS == 4) {
        /* Blocks A, B (weights 0-31, 32-63): low nibbles [lo A, lo B] = weights 0-15, 32-47, high nibbles 16-31,
         * 48-63: unit_slot's order, as with AVX-512. One load and three ops per 64 weights. */
        const __m256i q = _mm256_loadu_si256((const __m256i *)(row + u * 32));
        out[0] = _mm256_and_si256(q, _mm256_set1_epi8(0x0f));
        out[1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), _mm256_set1_epi8(0x0f));
    } else {
        const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(row + u * 16)));
        const __m256i mask = _mm256_set1_epi8(0x03);
        out[0] = _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_set_epi32(2, 2, 2, 2, 0, 0, 0, 0)), mask);
        out[1] = _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_set_epi32(6, 6, 6, 6, 4, 4, 4, 4)), mask);
    }
}
INLINE int64_t unit_slot(int64_t j, int BITS) { return BITS == 4 ? (j & ~48) | ((j & 16) << 1) | ((j & 32) >> 1) : j; }
/* Float vectors as wide as ivec (8 lanes, not f32x16's 16: two registers each, half of them zeros, spilled the
 * totals of a 4-row tile out of AVX2's 16 registers). */
typedef float fvec __attribute__((vector_size(32)));
INLINE fvec ivec_to_fvec(ivec v) { return (fvec)_mm256_cvtepi32_ps(v); }
INLINE float fvec_sum(fvec v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
INLINE fvec unit_lane_scale(int BITS) {
    (void)BITS;
    return (fvec){1, 1, 1, 1, 1, 1, 1, 1};
}
#endif

#ifdef INT_DOT
typedef int32_t i32vec __attribute__((vector_size(sizeof(ivec))));

/* x as integers per group: x_g ~ sx_g * (X_BASE * hi + lo), |X_BASE * hi + lo| <= X_RANGE. hi in [-127, 127] and
 * lo in [-128, 127] (base 256), or both in [-127, 127] (base 255) where the sign trick of SIGNED_8BIT_CODES
 * needs x != -128. Either way the rounding error is at most max|x_g| / (2 * 32385) = max|x_g| / 64770. */
#ifdef SIGNED_8BIT_CODES
#define X_BASE(BITS) ((BITS) == 8 ? 255 : 256)
#define X_RANGE(BITS) ((BITS) == 8 ? 32385 : 32512)
#define CODE_OFFSET(BITS) ((BITS) == 8 ? 128.0f : 0.0f) /* the codes' dot products are with q - CODE_OFFSET */
#else
#define X_BASE(BITS) 256
#define X_RANGE(BITS) 32512
#define CODE_OFFSET(BITS) 0.0f
#endif

/* Groups whose per-row factors are prepared at a time (stack arrays of TILE_R * 2 * GROUP_CHUNK floats). */
#define GROUP_CHUNK 64

/* Integer analogue of rows_direct for TILE_R weight rows and MT <= 2 rows of x: xhi/xlo [M, K] int8 and
 * xscale [M, groups] from quantize_x. Per group, the int32 sums X_BASE * dot(q, hi) + dot(q, lo) are scaled once
 * by s * sx. They stay inside int32 (2^31 = 2.147e9) up to the largest group size callers allow, 4096: per lane
 * at most max|q| * X_RANGE * (products per lane) = 240 * 32512 * G / 16 (AVX-512 4-bit, high nibbles 16x) =
 * 2.00e9, 255 * 32512 * G / 16 (AVX-512 8-bit) = 2.12e9, 128 * 32385 * G / 8 (AVX2 8-bit, q - 128) = 2.12e9,
 * and X_BASE * dot(q, hi) alone no more. The per-group
 * scalars (scale s times sx; the zero-point term s * z * sum(x_g)) are computed for a chunk of groups ahead of
 * the dot products, in loops the compiler vectorizes: done per group inside the loop they cost as much as the
 * dot products themselves at 2 bits. */
INLINE void rows_int(const uint8_t *qw, int64_t row_bytes, const uint16_t *scales, const uint8_t *zeros,
                     float zero_const, int64_t n0, int R, const int8_t *xhi, const int8_t *xlo, const float *xscale,
                     const float *xsum, int MT, int64_t K, int64_t G, int BITS, float out[TILE_R][2]) {
    const int64_t groups = K / G, units_per_group = G / 64, unit_bytes = 8 * BITS;
    const float zero_step = (float)(1 << BITS) / 256.0f;
    fvec total[TILE_R][2];
    float zero_term[TILE_R][2];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
        total[r][0] = total[r][1] = (fvec){0};
        zero_term[r][0] = zero_term[r][1] = 0.0f;
    }
    float factor[TILE_R][2][GROUP_CHUNK];
    for (int64_t g0 = 0; g0 < groups; g0 += GROUP_CHUNK) {
        const int64_t gn = groups - g0 < GROUP_CHUNK ? groups - g0 : GROUP_CHUNK;
        for (int r = 0; r < R; ++r) {
            const uint16_t *s_row = scales + (n0 + r) * groups + g0;
            const uint8_t *z_row = zeros ? zeros + (n0 + r) * groups + g0 : NULL;
            for (int m = 0; m < MT; ++m) {
                const float *sx = xscale + m * groups + g0, *xs = xsum + m * groups + g0;
                float zt = 0.0f;
                int64_t j = 0;
#if defined(__AVX2__) && defined(__F16C__)
                /* 8 groups at a time (the compiler does not vectorize the fp16 conversions); a scalar tail. */
                __m256 zt8 = _mm256_setzero_ps();
                for (; j + 8 <= gn; j += 8) {
                    const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s_row + j)));
                    _mm256_storeu_ps(&factor[r][m][j], _mm256_mul_ps(s8, _mm256_loadu_ps(sx + j)));
                    const __m256 z8 = z_row ? _mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                                                _mm_loadl_epi64((const __m128i *)(z_row + j)))),
                                                            _mm256_set1_ps(zero_step)), _mm256_set1_ps(CODE_OFFSET(BITS)))
                                            : _mm256_set1_ps(zero_const - CODE_OFFSET(BITS));
                    zt8 = _mm256_fmadd_ps(_mm256_mul_ps(s8, z8), _mm256_loadu_ps(xs + j), zt8);
                }
                /* horizontal sum in registers (storing the vector and reading its lanes back stalls on store
                 * forwarding, once per row: a tenth of a K = 1024 row's time) */
                __m128 zt4 = _mm_add_ps(_mm256_castps256_ps128(zt8), _mm256_extractf128_ps(zt8, 1));
                zt4 = _mm_add_ps(zt4, _mm_movehl_ps(zt4, zt4));
                zt += _mm_cvtss_f32(_mm_add_ss(zt4, _mm_movehdup_ps(zt4)));
#endif
                for (; j < gn; ++j) {
                    const float s = f16_to_f32(s_row[j]);
                    factor[r][m][j] = s * sx[j];
                    zt += s * ((z_row ? (float)z_row[j] * zero_step : zero_const) - CODE_OFFSET(BITS)) * xs[j];
                }
                zero_term[r][m] += zt;
            }
        }
        for (int64_t g = g0; g < g0 + gn; ++g) {
            ivec hi[TILE_R][2], lo[TILE_R][2];
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) hi[r][0] = hi[r][1] = lo[r][0] = lo[r][1] = ivec_zero();
            for (int64_t u = g * units_per_group; u < (g + 1) * units_per_group; ++u) {
                if (((u * unit_bytes) & 63) == 0)
#pragma GCC unroll 4
                    for (int r = 0; r < R; ++r)
                        __builtin_prefetch(qw + (n0 + r) * row_bytes + u * unit_bytes + PREFETCH_BYTES, 0, 1);
                /* x's vectors for this unit, loaded once for all TILE_R rows. */
                ivec xh[2][UNIT_VECS], xl[2][UNIT_VECS];
#pragma GCC unroll 2
                for (int m = 0; m < MT; ++m)
#pragma GCC unroll 2
                    for (int v = 0; v < UNIT_VECS; ++v) {
                        const int64_t at = m * K + u * 64 + v * (64 / UNIT_VECS);
                        xh[m][v] = ivec_load(xhi + at);
                        xl[m][v] = ivec_load(xlo + at);
                    }
#pragma GCC unroll 4
                for (int r = 0; r < R; ++r) {
                    ivec codes[UNIT_VECS];
                    unit_codes(qw + (n0 + r) * row_bytes, u, BITS, codes);
#pragma GCC unroll 2
                    for (int m = 0; m < MT; ++m) {
                        hi[r][m] = unit_dot(hi[r][m], codes, xh[m], BITS);
                        lo[r][m] = unit_dot(lo[r][m], codes, xl[m], BITS);
                    }
                }
            }
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
                for (int m = 0; m < MT; ++m) {
                    const ivec sum = (ivec)((i32vec)hi[r][m] * X_BASE(BITS) + (i32vec)lo[r][m]);
                    total[r][m] += factor[r][m][g - g0] * ivec_to_fvec(sum);
                }
        }
    }
    const fvec lane_scale = unit_lane_scale(BITS);
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MT; ++m) out[r][m] = fvec_sum(total[r][m] * lane_scale) - zero_term[r][m];
}

/* x [M, K] (fp32) -> per group of G: scale sx = max|x_g| / X_RANGE and x_g / sx rounded to an integer
 * X_BASE * hi + lo (ranges at X_BASE), each 64 values in unit_codes' order. */
static void quantize_x(const float *x, int64_t M, int64_t K, int64_t G, int BITS, int8_t *xhi, int8_t *xlo,
                       float *xscale) {
    /* Vectorized 8 values at a time (INT_DOT implies AVX2): at ~130 calls per decode step, a scalar version of
     * this preparation was ~3 us of each call. G is a multiple of 64, so runs of 8 stay within a unit quarter. */
    const int64_t groups = K / G;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < groups; ++g) {
            const float *xg = x + m * K + g * G;
            __m256 amax8 = _mm256_setzero_ps();
            for (int64_t k = 0; k < G; k += 8)
                amax8 = _mm256_max_ps(amax8, _mm256_and_ps(_mm256_loadu_ps(xg + k), abs_mask));
            float lanes[8], amax = 0.0f;
            _mm256_storeu_ps(lanes, amax8);
            for (int l = 0; l < 8; ++l) amax = lanes[l] > amax ? lanes[l] : amax;
            const float range = (float)X_RANGE(BITS);
            const float sx = amax / range, inv = amax > 0.0f ? range / amax : 0.0f;
            xscale[m * groups + g] = sx;
            const __m256 inv8 = _mm256_set1_ps(inv);
            for (int64_t k = 0; k < G; k += 8) {
                /* round to nearest (|v| <= X_RANGE), then v = 256 * hi + lo with hi = floor((v + 128) / 256), or
                 * v = 255 * hi + lo with hi = round(v / 255) (|lo| <= 127: v / 255 is never a half, 255 is odd) */
                const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k), inv8));
                __m256i h, l;
                if (X_BASE(BITS) == 256) {
                    h = _mm256_srai_epi32(_mm256_add_epi32(v, _mm256_set1_epi32(128)), 8);
                    l = _mm256_sub_epi32(v, _mm256_slli_epi32(h, 8));
                } else {
                    h = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(1.0f / 255.0f)));
                    l = _mm256_sub_epi32(v, _mm256_sub_epi32(_mm256_slli_epi32(h, 8), h));
                }
                const __m128i h16 = _mm_packs_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
                const __m128i l16 = _mm_packs_epi32(_mm256_castsi256_si128(l), _mm256_extracti128_si256(l, 1));
                const int64_t at = m * K + g * G + (k & ~63) + unit_slot(k & 63, BITS);
                _mm_storel_epi64((__m128i *)(xhi + at), _mm_packs_epi16(h16, h16));
                _mm_storel_epi64((__m128i *)(xlo + at), _mm_packs_epi16(l16, l16));
            }
        }
}
#endif

/* Dequantize weights [k0, k0 + kc) of rows [n0, n0 + R) into wbuf [R][kc] fp32. */
INLINE void dequantize_chunk(const uint8_t *qw, int64_t row_bytes, const uint16_t *scales, const uint8_t *zeros,
                             float zero_const, int64_t n0, int R, int64_t K, int64_t G, int64_t k0, int64_t kc,
                             int BITS, float *wbuf) {
    const int64_t groups = K / G;
    for (int r = 0; r < R; ++r) {
        const uint8_t *row = qw + (n0 + r) * row_bytes;
        int64_t g = k0 / G, group_end = (g + 1) * G;
        float s = f16_to_f32(scales[(n0 + r) * groups + g]);
        float offset = -zero_point(zeros, (n0 + r) * groups + g, zero_const, BITS) * s;
        for (int64_t k = k0; k < k0 + kc; k += 16) {
            if (k == group_end) {
                ++g;
                group_end += G;
                s = f16_to_f32(scales[(n0 + r) * groups + g]);
                offset = -zero_point(zeros, (n0 + r) * groups + g, zero_const, BITS) * s;
            }
            *(f32x16_u *)(wbuf + r * kc + (k - k0)) = codes16(row, k / 16, BITS) * s + offset;
        }
    }
}

/* acc[r][m] += wbuf[r] . x[m] over kc weights, for an R x MT tile whose accumulators live in memory between
 * chunks (loaded and stored once per chunk, from L1). */
INLINE void dot_chunk(const float *wbuf, const float *x, int64_t K, int64_t kc, int R, int MT, f32x16 *acc_mem) {
    f32x16 acc[TILE_R][TILE_M];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int m = 0; m < MT; ++m) acc[r][m] = acc_mem[r * TILE_M + m];
    for (int64_t k = 0; k < kc; k += 16) {
        f32x16 w[TILE_R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            w[r] = *(const f32x16_u *)(wbuf + r * kc + k);
            KEEP_IN_REGISTER(w[r]);
        }
#pragma GCC unroll 4
        for (int m = 0; m < MT; ++m) {
            f32x16 xv = *(const f32x16_u *)(x + m * K + k);
            KEEP_IN_REGISTER(xv);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) acc[r][m] += w[r] * xv;
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int m = 0; m < MT; ++m) acc_mem[r * TILE_M + m] = acc[r][m];
}

static void store_row_outputs(void *y, int y_dtype, const void *bias, int bias_dtype, int64_t N, int64_t n, int64_t m,
                              float value) {
    if (bias) value += load_scalar(bias, bias_dtype, n);
    store_scalar(y, y_dtype, m * N + n, value);
}

#ifdef INT_DOT
/* Weight rows the integer path reads side by side (a thread's tile). Each row is its own stream: rows of 8-bit
 * codes are K bytes, so at K = 1024 a 4-row tile reads 4 streams 1 KiB apart, and stalls on them; one row reads a
 * single sequential stream. Packed 4- and 2-bit rows are shorter, the tile's loads of x are amortised over more
 * codes, and 4 rows win. Zen 5, 2 threads, the 0.3B shape's 127 weights, M = 1, A/B in one process: 8-bit 1 / 2 /
 * 4 rows 41 / 30 / 28 GB/s (AVX-512 VNNI), 40 / 33 / 34 (AVX2); 4-bit 4 rows 1.03-1.12x of 2 and 1; 2-bit 4 rows
 * 1.01-1.19x of 2 and 1. (-DINT_ROWS_8=... overrides are for such experiments.) */
#ifndef INT_ROWS_8
#define INT_ROWS_8 1
#endif
#ifndef INT_ROWS_4
#define INT_ROWS_4 4
#endif
#ifndef INT_ROWS_2
#define INT_ROWS_2 4
#endif
#define INT_ROWS(BITS) ((BITS) == 8 ? INT_ROWS_8 : (BITS) == 4 ? INT_ROWS_4 : INT_ROWS_2)

/* A tile of R <= INT_ROWS(BITS) weight rows, rows of x two at a time. */
#define INT_TILE(BITS)                                                                                            \
    const int64_t groups_ = K / G;                                                                                \
    for (int64_t m0 = 0; m0 < M; m0 += 2) {                                                                       \
        const int MT = M - m0 < 2 ? (int)(M - m0) : 2;                                                            \
        const int8_t *hi_ = xhi + m0 * K, *lo_ = xlo + m0 * K;                                                    \
        const float *xs_ = xscale + m0 * groups_, *xsum_ = xsum + m0 * groups_;                                   \
        float out[TILE_R][2];                                                                                     \
        if (R == INT_ROWS(BITS) && MT == 1)                                                                       \
            rows_int(qw, row_bytes, scales, zeros, zero_const, n0, INT_ROWS(BITS), hi_, lo_, xs_, xsum_, 1, K, G, \
                     BITS, out);                                                                                  \
        else if (R == INT_ROWS(BITS))                                                                             \
            rows_int(qw, row_bytes, scales, zeros, zero_const, n0, INT_ROWS(BITS), hi_, lo_, xs_, xsum_, 2, K, G, \
                     BITS, out);                                                                                  \
        else                                                                                                      \
            rows_int(qw, row_bytes, scales, zeros, zero_const, n0, R, hi_, lo_, xs_, xsum_, MT, K, G, BITS, out); \
        for (int r = 0; r < R; ++r)                                                                               \
            for (int m = 0; m < MT; ++m) store_row_outputs(y, y_dtype, bias, bias_dtype, N, n0 + r, m0 + m, out[r][m]); \
    }
#else
#define INT_ROWS(BITS) TILE_R
#define INT_TILE(BITS)
#endif

/* One instantiation per bit width, so codes16's shifts and masks are constants. */
#define DEFINE_QGEMV(BITS)                                                                                        \
    static void qgemv_##BITS(const float *x, const float *xsum, const QgemvWeight *weights,                      \
                             const int64_t *tile_end, int64_t tile_rows, int count, int y_dtype, int64_t M,      \
                             int64_t K, int64_t G, int threads, float *wbufs, const int8_t *xhi,                  \
                             const int8_t *xlo, const float *xscale) {                                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                         \
        for (int64_t t = 0; t < tile_end[count - 1]; ++t) {                                                       \
            int i = 0;                                                                                            \
            while (t >= tile_end[i]) ++i;                                                                         \
            const QgemvWeight *w = weights + i;                                                                   \
            const uint8_t *qw = w->qweight, *zeros = w->zeros;                                                    \
            const uint16_t *scales = w->scales;                                                                   \
            const int64_t row_bytes = w->row_bytes, N = w->N;                                                     \
            const float zero_const = w->zero_const;                                                               \
            const void *bias = w->bias;                                                                           \
            const int bias_dtype = w->bias_dtype;                                                                 \
            void *y = w->y;                                                                                       \
            const int64_t n0 = (t - (i ? tile_end[i - 1] : 0)) * tile_rows;                                       \
            const int R = (int)(N - n0 < tile_rows ? N - n0 : tile_rows);                                         \
            if (xhi) { /* integer dot products, rows of x two at a time (the tile's codes stay in L1) */          \
                INT_TILE(BITS)                                                                                    \
                continue;                                                                                         \
            }                                                                                                     \
            if (M <= 2) {                                                                                         \
                float out[TILE_R][2];                                                                             \
                if (R == TILE_R && M == 1)                                                                        \
                    rows_direct(qw, row_bytes, scales, zeros, zero_const, n0, TILE_R, x, xsum, 1, K, G, BITS, out); \
                else if (R == TILE_R)                                                                             \
                    rows_direct(qw, row_bytes, scales, zeros, zero_const, n0, TILE_R, x, xsum, 2, K, G, BITS, out); \
                else                                                                                              \
                    rows_direct(qw, row_bytes, scales, zeros, zero_const, n0, R, x, xsum, (int)M, K, G, BITS, out); \
                for (int r = 0; r < R; ++r)                                                                       \
                    for (int64_t m = 0; m < M; ++m)                                                               \
                        store_row_outputs(y, y_dtype, bias, bias_dtype, N, n0 + r, m, out[r][m]);                 \
                continue;                                                                                         \
            }                                                                                                     \
            /* Per K chunk, the tile's weights are dequantized once into the thread's buffer and reused by every  \
             * row of x while both sit in L1; accumulators persist across chunks in acc_mem. */                   \
            float *wbuf = wbufs + (int64_t)omp_thread_index() * (TILE_R * K_CHUNK + 16 * TILE_R * MAX_M_ACC);             \
            f32x16 *acc_mem = (f32x16 *)(wbuf + TILE_R * K_CHUNK);                                               \
            for (int64_t m0 = 0; m0 < M; m0 += MAX_M_ACC) {                                                       \
                const int64_t mend = M - m0 < MAX_M_ACC ? M : m0 + MAX_M_ACC;                                     \
                memset(acc_mem, 0, sizeof(f32x16) * TILE_R * MAX_M_ACC);                                                  \
                for (int64_t k0 = 0; k0 < K; k0 += K_CHUNK) {                                                     \
                    const int64_t kc = K - k0 < K_CHUNK ? K - k0 : K_CHUNK;                                       \
                    dequantize_chunk(qw, row_bytes, scales, zeros, zero_const, n0, R, K, G, k0, kc, BITS, wbuf);  \
                    for (int64_t m = m0; m < mend; m += TILE_M) {                                                 \
                        const int MT = (int)(mend - m < TILE_M ? mend - m : TILE_M);                              \
                        f32x16 *acc = acc_mem + ((m - m0) / TILE_M) * TILE_R * TILE_M;                           \
                        if (R == TILE_R && MT == TILE_M)                                                          \
                            dot_chunk(wbuf, x + m * K + k0, K, kc, TILE_R, TILE_M, acc);                          \
                        else                                                                                      \
                            dot_chunk(wbuf, x + m * K + k0, K, kc, R, MT, acc);                                   \
                    }                                                                                             \
                }                                                                                                 \
                for (int64_t m = m0; m < mend; ++m)                                                               \
                    for (int r = 0; r < R; ++r) {                                                                 \
                        const f32x16 *acc = acc_mem + ((m - m0) / TILE_M) * TILE_R * TILE_M;                     \
                        store_row_outputs(y, y_dtype, bias, bias_dtype, N, n0 + r, m,                             \
                                          hsum(acc[r * TILE_M + (m - m0) % TILE_M]));                             \
                    }                                                                                             \
            }                                                                                                     \
        }                                                                                                         \
    }

#ifdef _OPENMP
#include <omp.h>
INLINE int omp_thread_index(void) { return omp_get_thread_num(); }
#else
INLINE int omp_thread_index(void) { return 0; }
#endif

DEFINE_QGEMV(8)
DEFINE_QGEMV(4)
DEFINE_QGEMV(2)

/* y_i = x @ dequant(W_i)^T (+ bias_i) for `count` weights sharing x (same bits and group size), in one parallel
 * region: one call for q/k/v or gate/up instead of three or two, each of which costs a thread wake-up and x's
 * preparation. Returns QGEMV_OK or an error code. x, biases and ys: fp32/bf16/fp16 by their dtype codes; scales
 * fp16, zeros uint8; K and group_size must be multiples of 16, group_size must divide K, and row_bytes must cover
 * K rounded up to whole 16-byte blocks. */
int ernie45_qgemv_many(const void *x, int x_dtype, int bits, int64_t group_size, const QgemvWeight *weights,
                       int count, int y_dtype, int64_t M, int64_t K, int threads) {
    if (x_dtype < 0 || x_dtype > 2 || y_dtype < 0 || y_dtype > 2) return QGEMV_BAD_DTYPE;
    const int per = bits == 8 ? 1 : bits == 4 ? 2 : bits == 2 ? 4 : 0;
    if (!per || count < 1 || count > MAX_WEIGHTS || M <= 0 || K <= 0 || K % 16 || group_size <= 0 ||
        group_size % 16 || K % group_size)
        return QGEMV_BAD_SHAPE;
    int64_t tile_end[MAX_WEIGHTS], total_bytes = 0;
    for (int i = 0; i < count; ++i) {
        const QgemvWeight *w = weights + i;
        if (w->bias && (w->bias_dtype < 0 || w->bias_dtype > 2)) return QGEMV_BAD_DTYPE;
        if (w->N <= 0 || w->row_bytes < (K + 16 * per - 1) / (16 * per) * 16) return QGEMV_BAD_SHAPE;
        total_bytes += w->N * w->row_bytes;
    }
    if (threads < 1) threads = 1;
    if (total_bytes < MIN_PARALLEL_BYTES) threads = 1;
    const int64_t groups = K / group_size;
    /* The integer path: whole 64-weight units per group, int32 sums that cannot overflow; any number of rows of x
     * (two at a time, the tile's codes re-read from L1): on the 0.3B weights (Zen 5) it beat the
     * dequantize-then-FMA path 1.2-2.3x at 4-64 rows with AVX-512 VNNI, 4.6-6.2x with AVX2. */
#ifdef INT_DOT
    const int use_int = group_size % 64 == 0 && group_size <= 4096;
#else
    const int use_int = 0;
#endif
    /* A thread's unit of work: one tile of weight rows. */
    const int64_t tile_rows = !use_int ? TILE_R : bits == 8 ? INT_ROWS(8) : bits == 4 ? INT_ROWS(4) : INT_ROWS(2);
    for (int i = 0; i < count; ++i)
        tile_end[i] = (i ? tile_end[i - 1] : 0) + (weights[i].N + tile_rows - 1) / tile_rows;
    /* x widened to fp32 once, and per-group sums of x for the zero-point term (+ x as integers for use_int). */
    float *xf = malloc(sizeof(float) * (M * K + M * groups));
    const size_t wbuf_floats = (size_t)(TILE_R * K_CHUNK + 16 * TILE_R * MAX_M_ACC) * threads;
    float *wbufs = M > 2 ? aligned_alloc(64, sizeof(float) * wbuf_floats) : NULL;
    int8_t *xq = use_int ? malloc(2 * M * K + sizeof(float) * M * groups) : NULL;
    if (!xf || (M > 2 && !wbufs) || (use_int && !xq)) {
        free(xf);
        free(wbufs);
        free(xq);
        return QGEMV_NO_MEMORY;
    }
    float *xsum = xf + M * K;
    int8_t *xhi = xq, *xlo = use_int ? xq + M * K : NULL;
    float *xscale = use_int ? (float *)(xq + 2 * M * K) : NULL;
    /* fp32 x is used in place; bf16/fp16 x is widened into xf. */
    const float *x32 = x_dtype == DTYPE_F32 ? (const float *)x : xf;
    if (x_dtype != DTYPE_F32)
        for (int64_t i = 0; i < M * K; ++i) xf[i] = load_scalar(x, x_dtype, i);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < groups; ++g) {
            f32x16 acc = {0};
            for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 16)
                acc += *(const f32x16_u *)(x32 + m * K + k);
            xsum[m * groups + g] = hsum(acc);
        }
#ifdef INT_DOT
    if (use_int) quantize_x(x32, M, K, group_size, bits, xhi, xlo, xscale);
#endif
    if (bits == 8)
        qgemv_8(x32, xsum, weights, tile_end, tile_rows, count, y_dtype, M, K, group_size, threads, wbufs, xhi, xlo, xscale);
    else if (bits == 4)
        qgemv_4(x32, xsum, weights, tile_end, tile_rows, count, y_dtype, M, K, group_size, threads, wbufs, xhi, xlo, xscale);
    else
        qgemv_2(x32, xsum, weights, tile_end, tile_rows, count, y_dtype, M, K, group_size, threads, wbufs, xhi, xlo, xscale);
    free(xf);
    free(wbufs);
    free(xq);
    return QGEMV_OK;
}
