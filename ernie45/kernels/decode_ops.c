/* The small operations of a decode step, for fp32 or bf16 tensors on the CPU: RMSNorm, the interleaved rotary
 * embedding, SiLU(gate) * up, and single-token attention against a contiguous KV cache (which it also appends to).
 *
 * Why: at batch 1 a decoder layer runs ~50 torch ops besides its matmuls, each a few microseconds of dispatch for
 * a few kilobytes of work; at the 0.3B shape they cost ~6 ms a token, as much as reading half the int4 weights.
 * Each function here replaces one of those chains with one call. Numerics follow the torch ops they replace
 * (fp32 arithmetic, the same intermediate roundings to bf16); built with -ffp-contract=off so the rotary embedding,
 * elementwise, is bit-identical to torch's, while reductions (norm, attention) may differ in the last bits
 * because their summation order differs. Legend: M rows, H hidden, B batch, N query heads, K kv heads,
 * G = N / K, D head dim, S cache slots.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "scalar_types.h"
#include "vec16.h"
#include "fast_exp.h"

enum { OPS_OK = 0, OPS_BAD_DTYPE = 1, OPS_BAD_SHAPE = 2, OPS_NO_MEMORY = 3 };

/* Below this many elements of work a parallel region costs more than it saves. */
#define MIN_PARALLEL_WORK (1 << 16)

/* Elements per block of the SiLU loop (two fp32 blocks on the stack). */
#define SILU_CHUNK 512
/* Cached V rows summed per pass of the attention (64 x 128 fp32 = 32 KB: L1). */
#define PV_BLOCK 64

INLINE float load(const void *p, int dtype, int64_t i) {
    return dtype == DTYPE_F32 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

INLINE void store(void *p, int dtype, int64_t i, float v) {
    if (dtype == DTYPE_F32)
        ((float *)p)[i] = v;
    else
        ((uint16_t *)p)[i] = f32_to_bf16(v);
}

/* v rounded to `dtype` and read back: the rounding torch applies when an fp32 intermediate becomes a bf16 tensor. */
INLINE float round_to(int dtype, float v) { return dtype == DTYPE_F32 ? v : bf16_to_f32(f32_to_bf16(v)); }

#ifdef _OPENMP
#include <omp.h>
INLINE int thread_index(void) { return omp_get_thread_num(); }
#else
INLINE int thread_index(void) { return 0; }
#endif

static int valid_dtype(int dtype) { return dtype == DTYPE_F32 || dtype == DTYPE_BF16; }

/* n elements of a fp32/bf16 tensor from offset i0, widened into dst (a loop the compiler vectorizes per dtype). */
INLINE void load_row(const void *p, int dtype, int64_t i0, float *dst, int64_t n) {
    if (dtype == DTYPE_F32) {
        memcpy(dst, (const float *)p + i0, sizeof(float) * n);
    } else {
        const uint16_t *h = (const uint16_t *)p + i0;
        for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(h[i]);
    }
}

/* n floats narrowed into a fp32/bf16 tensor from offset i0. */
INLINE void store_row(void *p, int dtype, int64_t i0, const float *src, int64_t n) {
    if (dtype == DTYPE_F32) {
        memcpy((float *)p + i0, src, sizeof(float) * n);
    } else {
        uint16_t *h = (uint16_t *)p + i0;
        for (int64_t i = 0; i < n; ++i) h[i] = f32_to_bf16(src[i]);
    }
}






/* out[m] = weight * round(x[m] * rsqrt(mean(x[m]^2) + eps)) for M rows of H, as RMSNorm.forward: the normalized
 * row is rounded to x's dtype before the weight multiplies it, and the product to out's dtype. If `residual` is
 * given, x is first replaced by x + residual (rounded to x's dtype, written back into `sum_out`): the pre-norm
 * residual add fused with the norm that follows it. */
int ernie45_rms_norm(const void *x, const void *residual, void *sum_out, int x_dtype, const void *weight,
                     int w_dtype, void *out, int out_dtype, int64_t M, int64_t H, float eps, int threads) {
    if (!valid_dtype(x_dtype) || !valid_dtype(w_dtype) || !valid_dtype(out_dtype)) return OPS_BAD_DTYPE;
    if (M <= 0 || H <= 0 || (residual && !sum_out)) return OPS_BAD_SHAPE;
    if (M * H < MIN_PARALLEL_WORK) threads = 1;
    float *buffers = malloc(sizeof(float) * 3 * (size_t)H * (size_t)threads);
    if (!buffers) return OPS_NO_MEMORY;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; ++m) {
        float *row = buffers + 3 * H * (int64_t)thread_index(), *other = row + H, *w = other + H;
        load_row(x, x_dtype, m * H, row, H);
        if (residual) {
            load_row(residual, x_dtype, m * H, other, H);
            for (int64_t i = 0; i < H; ++i) row[i] = round_to(x_dtype, row[i] + other[i]);
            for (int64_t i = 0; i < H; ++i) store(sum_out, x_dtype, m * H + i, row[i]);
        }
        const float inv = 1.0f / sqrtf(dot(row, row, H) / (float)H + eps);
        load_row(weight, w_dtype, 0, w, H);
        for (int64_t i = 0; i < H; ++i) store(out, out_dtype, m * H + i, w[i] * round_to(x_dtype, row[i] * inv));
    }
    free(buffers);
    return OPS_OK;
}

/* In place on `rows` rows of `heads` x D (q: [tokens, N, D], k: [tokens, K, D]): pair (2i, 2i+1) rotated by
 * x * cos + swap_pairs(x) * sin with the interleaved tables (cos repeated per pair, sin signed (-s, +s)), fp32
 * [table_rows, D]; token t uses table row t % table_rows (a table shared by every row of the batch has T rows). */
static void rotate(void *x, int dtype, int64_t tokens, int64_t heads, int64_t D, const float *cos, const float *sin,
                   int64_t table_rows) {
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = cos + (t % table_rows) * D, *s = sin + (t % table_rows) * D;
        for (int64_t h = 0; h < heads; ++h) {
            const int64_t base = (t * heads + h) * D;
            for (int64_t i = 0; i < D; i += 2) {
                const float x0 = load(x, dtype, base + i), x1 = load(x, dtype, base + i + 1);
                const float a = x0 * c[i], b = x1 * s[i];
                const float e = x1 * c[i + 1], f = x0 * s[i + 1];
                store(x, dtype, base + i, a + b);
                store(x, dtype, base + i + 1, e + f);
            }
        }
    }
}

int ernie45_rotary(void *q, void *k, int dtype, int64_t tokens, int64_t N, int64_t K, int64_t D, const float *cos,
                   const float *sin, int64_t table_rows) {
    if (!valid_dtype(dtype)) return OPS_BAD_DTYPE;
    if (tokens <= 0 || D <= 0 || D % 2 || table_rows <= 0) return OPS_BAD_SHAPE;
    rotate(q, dtype, tokens, N, D, cos, sin, table_rows);
    rotate(k, dtype, tokens, K, D, cos, sin, table_rows);
    return OPS_OK;
}

/* out = round(silu(gate)) * up over n elements: F.silu(gate) * up, with silu rounded to the dtype first. */
int ernie45_silu_mul(const void *gate, const void *up, void *out, int dtype, int64_t n, int threads) {
    if (!valid_dtype(dtype)) return OPS_BAD_DTYPE;
    if (n <= 0) return OPS_BAD_SHAPE;
    if (n < MIN_PARALLEL_WORK) threads = 1;
    const int64_t chunks = (n + SILU_CHUNK - 1) / SILU_CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; ++c) {
        /* in fp32 chunks on the stack, so that each loop is a plain vectorizable loop over floats */
        float g[SILU_CHUNK], u[SILU_CHUNK];
        const int64_t i0 = c * SILU_CHUNK, len = n - i0 < SILU_CHUNK ? n - i0 : SILU_CHUNK;
        load_row(gate, dtype, i0, g, len);
        load_row(up, dtype, i0, u, len);
        for (int64_t i = 0; i < len; ++i) g[i] = g[i] / (1.0f + exp_f32(-g[i]));
        if (dtype == DTYPE_BF16)
            for (int64_t i = 0; i < len; ++i) g[i] = round_to(DTYPE_BF16, g[i]);
        for (int64_t i = 0; i < len; ++i) g[i] *= u[i];
        store_row(out, dtype, i0, g, len);
    }
    return OPS_OK;
}

/* acc[D] += sum_s w[s] * v[s][:] over n rows of D: accumulators in registers across the rows when D is a
 * multiple of 16 up to 256 (the head dims of every ERNIE 4.5 model), else in memory. */
INLINE void weighted_rows(const float *w, const float *v, int64_t n, int64_t D, float *acc) {
    if (D % 16 == 0 && D <= 256) {
        f32x16 a[16];
        const int64_t vecs = D / 16;
        for (int64_t j = 0; j < vecs; ++j) a[j] = load16(acc + 16 * j);
        for (int64_t s = 0; s < n; ++s)
#pragma GCC unroll 16
            for (int64_t j = 0; j < 16; ++j)
                if (j < vecs) a[j] += w[s] * load16(v + s * D + 16 * j);
        for (int64_t j = 0; j < vecs; ++j) memcpy(acc + 16 * j, &a[j], sizeof a[j]);
        return;
    }
    for (int64_t s = 0; s < n; ++s)
        for (int64_t d = 0; d < D; ++d) acc[d] += w[s] * v[s * D + d];
}

/* Where the cached rows of one (sequence, kv head) live: row s starts at element
 * base + (slots ? slots[s] * slot_stride : s * D). The static cache keeps a sequence's rows contiguous; the
 * engine's paged cache lists each sequence's slots ([slot, K, D] rows). */
typedef struct {
    const int64_t *slots;
    int64_t base, slot_stride;
} RowIndex;

INLINE int64_t row_at(const RowIndex *ix, int64_t s, int64_t D) {
    return ix->base + (ix->slots ? ix->slots[s] * ix->slot_stride : s * D);
}

/* G query heads (qs, fp32 [G, D]) attend L cached rows of their kv head into acc [G, D]. Scratch: p [G, L],
 * buf [PV_BLOCK, D]. Each cached row is read (and widened, for bf16) once for the G heads; V is summed in blocks
 * that stay in L1 while every head uses them. */
static void attend_group(const float *qs, int64_t G, int64_t D, int64_t L, const void *k_cache, const void *v_cache,
                         int dtype, const RowIndex *ix, float scale, float *p, float *acc, float *buf) {
    const int direct = dtype == DTYPE_F32 && !ix->slots; /* rows readable in place, contiguous */
    for (int64_t s = 0; s < L; ++s) {
        const float *krow = buf;
        if (dtype == DTYPE_F32)
            krow = (const float *)k_cache + row_at(ix, s, D);
        else
            load_row(k_cache, dtype, row_at(ix, s, D), buf, D);
        for (int64_t g = 0; g < G; ++g) p[g * L + s] = dot(qs + g * D, krow, D) * scale;
    }
    for (int64_t g = 0; g < G; ++g) {
        float *pg = p + g * L, top = -INFINITY, total = 0.0f;
        for (int64_t s = 0; s < L; ++s) top = pg[s] > top ? pg[s] : top;
        for (int64_t s = 0; s < L; ++s) {
            pg[s] = exp_f32(pg[s] - top);
            total += pg[s];
        }
        const float inv = 1.0f / total;
        for (int64_t s = 0; s < L; ++s) pg[s] *= inv;
    }
    for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.0f;
    for (int64_t s0 = 0; s0 < L; s0 += PV_BLOCK) {
        const int64_t sn = L - s0 < PV_BLOCK ? L - s0 : PV_BLOCK;
        const float *vblock = buf;
        if (direct)
            vblock = (const float *)v_cache + row_at(ix, s0, D);
        else
            for (int64_t s = 0; s < sn; ++s) load_row(v_cache, dtype, row_at(ix, s0 + s, D), buf + s * D, D);
        for (int64_t g = 0; g < G; ++g) weighted_rows(p + g * L + s0, vblock, sn, D, acc + g * D);
    }
}

/* One new token per sequence: k_new / v_new [B, K, D] are written into slot `pos` of the layer's cache
 * [B, K, S, D], then each query head [B, N, D] attends slots 0..pos of its kv head (softmax in fp32, as the
 * cache's torch path) into out [B, N, D]. All tensors in `dtype`; query heads h*G .. h*G+G-1 share kv head h.
 * One work item per (sequence, kv head). */
int ernie45_decode_attention(const void *q, const void *k_new, const void *v_new, void *k_cache, void *v_cache,
                             int dtype, int64_t B, int64_t N, int64_t K, int64_t D, int64_t S, int64_t pos,
                             float scale, void *out, int threads) {
    if (!valid_dtype(dtype)) return OPS_BAD_DTYPE;
    if (B <= 0 || N <= 0 || K <= 0 || N % K || D <= 0 || pos < 0 || pos >= S) return OPS_BAD_SHAPE;
    const size_t elem = dtype == DTYPE_F32 ? 4 : 2;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < K; ++h) {
            const int64_t slot = ((b * K + h) * S + pos) * D, src = (b * K + h) * D;
            memcpy((char *)k_cache + slot * elem, (const char *)k_new + src * elem, D * elem);
            memcpy((char *)v_cache + slot * elem, (const char *)v_new + src * elem, D * elem);
        }
    const int64_t L = pos + 1, G = N / K;
    const int64_t scratch = G * L + 2 * G * D + PV_BLOCK * D; /* p, acc, q widened, a block of rows */
    float *buffers = malloc(sizeof(float) * (size_t)(B * K) * (size_t)scratch);
    if (!buffers) return OPS_NO_MEMORY;
    if (B * N * L * D < MIN_PARALLEL_WORK) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < B * K; ++bh) {
        float *p = buffers + bh * scratch, *acc = p + G * L, *qs = acc + G * D, *buf = qs + G * D;
        load_row(q, dtype, bh * G * D, qs, G * D); /* heads of sequence bh / K, kv head bh % K: contiguous */
        const RowIndex ix = {NULL, bh * S * D, 0};
        attend_group(qs, G, D, L, k_cache, v_cache, dtype, &ix, scale, p, acc, buf);
        store_row(out, dtype, bh * G * D, acc, G * D);
    }
    free(buffers);
    return OPS_OK;
}

/* The engine's paged cache [slots, K, D]: row m's new k / v [M, K, D] go to slot write_slots[m] (the attention
 * that follows reads the cache in place: kernels/paged_attention.c). */
static void write_paged_rows(const void *k_new, const void *v_new, void *k_cache, void *v_cache, int dtype,
                             int64_t M, int64_t K, int64_t D, const int64_t *write_slots) {
    const size_t row_bytes = (size_t)(K * D) * (dtype == DTYPE_F32 ? 4 : 2);
    for (int64_t m = 0; m < M; ++m) {
        memcpy((char *)k_cache + write_slots[m] * row_bytes, (const char *)k_new + m * row_bytes, row_bytes);
        memcpy((char *)v_cache + write_slots[m] * row_bytes, (const char *)v_new + m * row_bytes, row_bytes);
    }
}

/* ---- all decoder layers of a decode step in one call ----
 * The layers' linears run through the GEMV kernels (qgemv.c for packed weights, gemv.c for fp32/bf16/fp16
 * weights), reached by function pointers the caller passes in; everything else runs through the functions above,
 * so each step equals the op-by-op path's bit for bit (same functions, same order). What it saves is the Python
 * between them: ~10 calls a layer, each a few microseconds of argument checks, allocations and ctypes. */

enum { LINEAR_QGEMV = 0, LINEAR_GEMV = 1 };

typedef int (*qgemv_many_fn)(const void *x, int x_dtype, int bits, int64_t group_size, const void *weights, int count,
                             int y_dtype, int64_t M, int64_t K, int threads);
typedef int (*gemv_fn)(const void *x, int x_dtype, const void *w, int w_dtype, const void *bias, int bias_dtype,
                       void *y, int y_dtype, int64_t M, int64_t N, int64_t K, int threads);

/* One kernel call: a group of packed weights sharing x (their outputs already point at the caller's buffers), or
 * one dense weight. ctypes mirrors this layout (kernels/decode_ops.py). */
typedef struct {
    void *fn;
    int kind;
    int count;           /* qgemv: weights in the group */
    int bits;            /* qgemv */
    int64_t group_size;  /* qgemv */
    const void *weights; /* qgemv: QgemvWeight[count] */
    const void *w;       /* gemv: [N, K] */
    int w_dtype;
    int bias_dtype;
    const void *bias;    /* gemv: [N] or NULL */
    void *y;             /* gemv: [M, N] */
    int64_t N, K;
} LinearOp;

#define MAX_GROUP_OPS 3

/* One dense decoder layer: x += o(attn(rope(qkv(norm(x))))); x += down(silu(gate(norm(x))) * up(norm(x))). */
typedef struct {
    const void *input_norm, *post_norm; /* [H], activation dtype */
    LinearOp qkv[MAX_GROUP_OPS];        /* one grouped call or q, k, v */
    int n_qkv;
    LinearOp gate_up[MAX_GROUP_OPS];    /* one grouped call or gate, up */
    int n_gate_up;
    LinearOp o, down;
    void *k_cache, *v_cache;            /* this layer's cache: static [B, K, S, D] or paged [slots, K, D] */
} DecodeLayer;

/* Sizes and the buffers every layer reuses (activation dtype; q/k/v, gate/up: the linears' outputs). */
typedef struct {
    int dtype;
    int64_t M, H, N, K, D, S, I;
    float eps, scale;
    void *normed, *q, *k, *v, *attn, *gate, *up, *act, *o, *down;
} DecodeScratch;

/* ernie45_paged_attention (kernels/paged_attention.c, its own library: the caller passes its address). */
typedef int (*paged_attention_fn)(const void *q, void *out, int dtype, const void *k_cache, const void *v_cache,
                                  int64_t num_blocks, int64_t B, int64_t R, int64_t S, int64_t N, int64_t K,
                                  int64_t D, const int32_t *block_tables, int64_t max_blocks,
                                  const int32_t *context_lens, const int32_t *q_starts, const int32_t *q_lens,
                                  float scale, int threads);

/* Where a step's attention reads and writes: the static cache (every row at slot `pos` of its own [S, D] rows per
 * kv head) or the engine's paged cache (per-row write slot; row m attends the first context_lens[m] tokens of its
 * blocks block_tables[m], read in place). ctypes mirrors it. */
typedef struct {
    int paged;
    int64_t pos;                   /* static */
    const int64_t *write_slots;    /* paged [M] */
    void *paged_attention;         /* paged: a paged_attention_fn */
    const int32_t *block_tables;   /* paged [M, max_blocks] */
    int64_t max_blocks, block_size, num_blocks;
    const int32_t *context_lens;   /* paged [M] */
    int64_t table_rows;            /* rotary tables: 1 (every row at one position) or M */
} DecodeAttention;

static int run_linear(const LinearOp *op, const void *x, int dtype, int64_t M, int threads) {
    if (op->kind == LINEAR_QGEMV)
        return ((qgemv_many_fn)op->fn)(x, dtype, op->bits, op->group_size, op->weights, op->count, dtype, M, op->K,
                                       threads);
    return ((gemv_fn)op->fn)(x, dtype, op->w, op->w_dtype, op->bias, op->bias_dtype, op->y, dtype, M, op->N, op->K,
                             threads);
}

static void add_in_place(void *x, const void *delta, int dtype, int64_t n) {
    float a[SILU_CHUNK], b[SILU_CHUNK];
    for (int64_t i0 = 0; i0 < n; i0 += SILU_CHUNK) {
        const int64_t len = n - i0 < SILU_CHUNK ? n - i0 : SILU_CHUNK;
        load_row(x, dtype, i0, a, len);
        load_row(delta, dtype, i0, b, len);
        for (int64_t i = 0; i < len; ++i) a[i] += b[i];
        store_row(x, dtype, i0, a, len);
    }
}

/* The layers in order on x [M, H] (in place) for one new token per row, with the rotary tables of the rows'
 * positions (cos / sin [table_rows, D], interleaved). Returns OPS_OK or the first failing call's status (a
 * linear's own code + 100, so the caller can tell the kernels' errors from these). */
int ernie45_decode_layers(const DecodeLayer *layers, int n_layers, const DecodeScratch *s, void *x,
                          const DecodeAttention *at, const float *cos, const float *sin, int threads) {
    const int dt = s->dtype;
    const int64_t M = s->M, H = s->H;
    int status;
#define CHECK(call)                                                                                               \
    if ((status = (call)) != OPS_OK) return status;
#define CHECK_LINEAR(call)                                                                                        \
    if ((status = (call)) != 0) return 100 + status;
    for (int l = 0; l < n_layers; ++l) {
        const DecodeLayer *layer = layers + l;
        CHECK(ernie45_rms_norm(x, NULL, NULL, dt, layer->input_norm, dt, s->normed, dt, M, H, s->eps, threads));
        for (int i = 0; i < layer->n_qkv; ++i) CHECK_LINEAR(run_linear(&layer->qkv[i], s->normed, dt, M, threads));
        CHECK(ernie45_rotary(s->q, s->k, dt, M, s->N, s->K, s->D, cos, sin, at->table_rows));
        if (at->paged) {
            write_paged_rows(s->k, s->v, layer->k_cache, layer->v_cache, dt, M, s->K, s->D, at->write_slots);
            CHECK(((paged_attention_fn)at->paged_attention)(s->q, s->attn, dt, layer->k_cache, layer->v_cache,
                                                            at->num_blocks, at->block_size, M, M, s->N, s->K, s->D,
                                                            at->block_tables, at->max_blocks, at->context_lens, NULL,
                                                            NULL, s->scale, threads));
        } else {
            CHECK(ernie45_decode_attention(s->q, s->k, s->v, layer->k_cache, layer->v_cache, dt, M, s->N, s->K,
                                           s->D, s->S, at->pos, s->scale, s->attn, threads));
        }
        CHECK_LINEAR(run_linear(&layer->o, s->attn, dt, M, threads));
        CHECK(ernie45_rms_norm(x, s->o, x, dt, layer->post_norm, dt, s->normed, dt, M, H, s->eps, threads));
        for (int i = 0; i < layer->n_gate_up; ++i)
            CHECK_LINEAR(run_linear(&layer->gate_up[i], s->normed, dt, M, threads));
        CHECK(ernie45_silu_mul(s->gate, s->up, s->act, dt, M * s->I, threads));
        CHECK_LINEAR(run_linear(&layer->down, s->act, dt, M, threads));
        add_in_place(x, s->down, dt, M * H);
    }
#undef CHECK
#undef CHECK_LINEAR
    return OPS_OK;
}
