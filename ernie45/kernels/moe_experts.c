/* The routed experts of an MoE layer (and its shared experts) for a few tokens, in one call: decode.
 *
 * out[n] = sum_k w[n, k] * expert_{ids[n, k]}(x[n]) (+ shared(x[n])), expert(x) = down(silu(gate(x)) * up(x)).
 *
 * Why one call: at decode each active expert is a pair of small matrix-vector products over a few rows of x. Run
 * op by op from Python (gather, gate/up, SiLU, down, weight, index_add per expert) a 32-expert layer cost twice
 * its weights' streaming time at 32 tokens and ~30% more at one. Here the tokens are bucketed by expert, and
 * every active expert's weights are read once, by both threads at the same time: each thread takes the same
 * share of every expert's rows (gate/up rows in phase 1, down rows = output columns in phase 2), so the threads
 * stay balanced whatever the routing and no two threads ever write the same output element (phase 2 adds an
 * expert's rows into the output columns its thread owns, experts in ascending order: the order of the
 * grouped torch path's index_add_). The products are gemv.c's row kernels (included below), so an expert's
 * numbers are those of `gemv` on its rows.
 *
 * Activations fp32 or bf16 (x; out in the same dtype), widened to fp32 once; weights fp32, bf16 or fp16 (fp16
 * needs F16C), the shared experts' in their own dtype; gate/up results, the SiLU product and the sum stay fp32
 * until out is written (the torch path rounds each to the activation dtype: the same in fp32). Legend: N tokens,
 * H hidden, K experts per token, E experts, I expert width, A = N*K assignments (+ N for the shared experts).
 */

#include <omp.h>

#include "fast_exp.h"
#include "scalar_types.h"
/* The row kernels (gemv_rows_*, tiles, prefetch): one implementation of the decode products. This also exports
 * ernie45_gemv from this library, unused. */
#include "gemv.c"

enum { MOE_OK = 0, MOE_BAD_DTYPE = 1, MOE_BAD_SHAPE = 2, MOE_NO_MEMORY = 3, MOE_BAD_EXPERT = 4 };

typedef void (*RowsFn)(const GemvArgs *, int64_t, int64_t);

/* One expert's share of the call: its weights, and its rows of x (assignments), contiguous in the buffers. */
typedef struct {
    const void *gate, *up, *down;                 /* [I, H], [I, H] (row stride H), [H, I] */
    const void *gate_bias, *up_bias, *down_bias;  /* shared experts only; NULL otherwise */
    int bias_dtype;
    RowsFn rows_fn;
    int64_t I;
    int64_t first, count; /* rows [first, first + count) of the gathered x / the activation buffers */
    int64_t act_offset;   /* floats into the gate/up/activation buffers: rows are I wide */
} ExpertJob;

static RowsFn rows_fn_for(int w_dtype) {
    if (w_dtype == DTYPE_F32) return gemv_rows_f32;
    if (w_dtype == DTYPE_BF16) return gemv_rows_bf16;
#if HAVE_FP16
    if (w_dtype == DTYPE_F16) return gemv_rows_f16;
#endif
    return NULL;
}

/* Rows [b, e) of the (thread-shared) slice [0, total) for thread t of T: equal shares, multiples of 8 rows (whole
 * 3-row tiles would do; 8 keeps a thread's weight slice cache-line aligned for any row length). */
static void share(int64_t total, int t, int T, int64_t *b, int64_t *e) {
    const int64_t per = ((total + T - 1) / T + 7) / 8 * 8;
    *b = t * per < total ? t * per : total;
    *e = *b + per < total ? *b + per : total;
}

/* Returns MOE_OK or an error code. ids/weights [N, K] (int64, fp32); gate_up [E, 2I, H] (gate rows first),
 * down [E, H, I]; shared_gate/up [Is, H], shared_down [H, Is] or NULL (no shared experts), biases may be NULL. */
int ernie45_moe_experts(const void *x, int x_dtype, void *out, int64_t N, int64_t H,
                        const int64_t *ids, const float *weights, int64_t K,
                        const void *gate_up, const void *down, int w_dtype, int64_t E, int64_t I,
                        const void *shared_gate, const void *shared_up, const void *shared_down, int shared_dtype,
                        const void *shared_gate_bias, const void *shared_up_bias, const void *shared_down_bias,
                        int shared_bias_dtype, int64_t shared_I, int num_threads) {
    if ((x_dtype != DTYPE_F32 && x_dtype != DTYPE_BF16) || !rows_fn_for(w_dtype)) return MOE_BAD_DTYPE;
    const int has_shared = shared_gate != NULL;
    if (has_shared && (!rows_fn_for(shared_dtype) || (shared_gate_bias || shared_up_bias || shared_down_bias)
                                                         && !dtype_ok(shared_bias_dtype)))
        return MOE_BAD_DTYPE;
    if (N < 1 || H < 1 || K < 1 || E < 1 || I < 1 || (has_shared && shared_I < 1)) return MOE_BAD_SHAPE;
    for (int64_t a = 0; a < N * K; ++a)
        if (ids[a] < 0 || ids[a] >= E) return MOE_BAD_EXPERT;

    /* Bucket the assignments by expert, tokens ascending within an expert (a stable sort, as the torch path). */
    const int64_t A = N * K, rows = A + (has_shared ? N : 0);
    int64_t *start = calloc((size_t)(E + 1), sizeof(int64_t));
    int64_t *token_of = malloc((size_t)rows * sizeof(int64_t));
    float *weight_of = malloc((size_t)rows * sizeof(float));
    ExpertJob *jobs = malloc((size_t)(E + 1) * sizeof(ExpertJob));
    /* x gathered per row, gate (then activation) and up per row, each expert's down output per row */
    float *xg = malloc((size_t)(rows * H) * sizeof(float));
    float *gate_buf = malloc((size_t)(A * I + (has_shared ? N * shared_I : 0)) * sizeof(float));
    float *up_buf = malloc((size_t)(A * I + (has_shared ? N * shared_I : 0)) * sizeof(float));
    float *y = malloc((size_t)(rows * H) * sizeof(float));
    float *acc = malloc((size_t)(N * H) * sizeof(float));
    int status = MOE_OK;
    if (!start || !token_of || !weight_of || !jobs || !xg || !gate_buf || !up_buf || !y || !acc) {
        status = MOE_NO_MEMORY;
        goto done;
    }
    for (int64_t a = 0; a < A; ++a) start[ids[a] + 1]++;
    for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
    {
        int64_t *fill = malloc((size_t)E * sizeof(int64_t));
        if (!fill) {
            status = MOE_NO_MEMORY;
            goto done;
        }
        memcpy(fill, start, (size_t)E * sizeof(int64_t));
        for (int64_t a = 0; a < A; ++a) {
            const int64_t slot = fill[ids[a]]++;
            token_of[slot] = a / K;
            weight_of[slot] = weights[a];
        }
        free(fill);
    }
    const int weight_bytes_w = w_dtype == DTYPE_F32 ? 4 : 2;
    int n_jobs = 0;
    for (int64_t e = 0; e < E; ++e) {
        if (start[e + 1] == start[e]) continue;
        const char *gu = (const char *)gate_up + e * 2 * I * H * weight_bytes_w;
        jobs[n_jobs++] = (ExpertJob){gu, gu + I * H * weight_bytes_w, (const char *)down + e * H * I * weight_bytes_w,
                                     NULL, NULL, NULL, 0, rows_fn_for(w_dtype), I,
                                     start[e], start[e + 1] - start[e], start[e] * I};
    }
    if (has_shared) {
        for (int64_t n = 0; n < N; ++n) {
            token_of[A + n] = n;
            weight_of[A + n] = 1.0f;
        }
        jobs[n_jobs++] = (ExpertJob){shared_gate, shared_up, shared_down, shared_gate_bias, shared_up_bias,
                                     shared_down_bias, shared_bias_dtype, rows_fn_for(shared_dtype), shared_I,
                                     A, N, A * I};
    }

    int64_t weight_elements = 0;
    for (int j = 0; j < n_jobs; ++j) weight_elements += 3 * jobs[j].I * H;
    const int threads = num_threads < 1 || weight_elements < MIN_PARALLEL_ELEMENTS ? 1 : num_threads;

#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        int64_t b, e;
        /* Phase 0: gather x's rows, widened to fp32. */
        share(rows, t, T, &b, &e);
        for (int64_t r = b; r < e; ++r) {
            const int64_t n = token_of[r];
            if (x_dtype == DTYPE_F32) memcpy(xg + r * H, (const float *)x + n * H, (size_t)H * sizeof(float));
            else for (int64_t h = 0; h < H; ++h) xg[r * H + h] = bf16_to_f32(((const uint16_t *)x)[n * H + h]);
        }
#pragma omp barrier
        /* Phase 1: this thread's share of every expert's gate rows, then of its up rows (one weight stream at a
         * time), then SiLU(gate) * up in place of gate. */
        for (int j = 0; j < n_jobs; ++j) {
            const ExpertJob *job = &jobs[j];
            float *g = gate_buf + job->act_offset, *u = up_buf + job->act_offset;
            share(job->I, t, T, &b, &e);
            if (b >= e) continue;
            GemvArgs ga = {xg + job->first * H, job->gate, job->gate_bias, g, job->bias_dtype, DTYPE_F32,
                           job->count, job->I, H};
            job->rows_fn(&ga, b, e);
            GemvArgs ua = {xg + job->first * H, job->up, job->up_bias, u, job->bias_dtype, DTYPE_F32,
                           job->count, job->I, H};
            job->rows_fn(&ua, b, e);
            for (int64_t m = 0; m < job->count; ++m) {
                float *gm = g + m * job->I;
                const float *um = u + m * job->I;
                for (int64_t i = b; i < e; ++i) gm[i] = gm[i] / (1.0f + exp_f32(-gm[i])) * um[i];
            }
        }
#pragma omp barrier
        /* Phase 2: this thread's output columns [b, e) = its share of every expert's down rows; each expert's rows
         * are weighted and added into the tokens they came from, experts in ascending order, shared last. */
        share(H, t, T, &b, &e);
        if (b < e) {
            for (int64_t n = 0; n < N; ++n) memset(acc + n * H + b, 0, (size_t)(e - b) * sizeof(float));
            for (int j = 0; j < n_jobs; ++j) {
                const ExpertJob *job = &jobs[j];
                float *yj = y + job->first * H;
                GemvArgs da = {gate_buf + job->act_offset, job->down, job->down_bias, yj, job->bias_dtype, DTYPE_F32,
                               job->count, H, job->I};
                job->rows_fn(&da, b, e);
                for (int64_t m = 0; m < job->count; ++m) {
                    const int64_t r = job->first + m;
                    float *dst = acc + token_of[r] * H;
                    const float *src = yj + m * H, w = weight_of[r];
                    for (int64_t h = b; h < e; ++h) dst[h] += src[h] * w;
                }
            }
            for (int64_t n = 0; n < N; ++n) {
                if (x_dtype == DTYPE_F32) memcpy((float *)out + n * H + b, acc + n * H + b, (size_t)(e - b) * 4);
                else for (int64_t h = b; h < e; ++h) ((uint16_t *)out)[n * H + h] = f32_to_bf16(acc[n * H + h]);
            }
        }
    }

done:
    free(start);
    free(token_of);
    free(weight_of);
    free(jobs);
    free(xg);
    free(gate_buf);
    free(up_buf);
    free(y);
    free(acc);
    return status;
}
