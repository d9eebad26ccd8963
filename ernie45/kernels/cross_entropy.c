/* Token cross-entropy of the training LM head: fp32 or bf16 logits [M, V] against int64 targets, in two passes
 * over the logits where torch's log_softmax + nll_loss take five (log_softmax writes an [M, V] copy; the backward
 * of nll_loss zero-fills another [M, V] and scatters into it; the backward of log_softmax reads both and writes a
 * third). At the 0.3B shape's 103,424-token vocabulary those passes were 2-9% of a whole training step.
 *
 *   forward:  lse[m] = log sum_v e^x[m, v],  loss[m] = lse[m] - x[m, target[m]]  (0 where target is `ignore`)
 *   gradient: x[m, v] <- g[m] * (e^(x[m, v] - lse[m]) - [v == target[m]]), written over the logits in place
 *
 * The caller gives the logits up: the gradient is the only thing they are needed for after the loss. Arithmetic
 * is fp32 whatever the storage (as `F.cross_entropy(logits.float())`); the gradient is rounded once to the
 * logits' dtype, and its target entry is g * p - g exactly as torch's log_softmax backward rounds it. One row
 * (400 KB at V = 103,424) stays in L2 between its passes. Legend: M rows, V vocabulary.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "scalar_types.h"
#include "fast_exp.h"
#include "lane_reduce.h"

enum { CE_OK = 0, CE_BAD_DTYPE = 1, CE_BAD_SHAPE = 2, CE_BAD_TARGET = 3 };

/* Logits handled per step of a row pass (a bf16 block is widened into a stack buffer of this many floats). */
#define BLOCK 512

static int valid_dtype(int dtype) { return dtype == DTYPE_F32 || dtype == DTYPE_BF16; }

/* n (<= BLOCK) logits of a row from offset i0 as floats: a pointer into the row for fp32, else widened into buf. */
INLINE const float *row_block(const void *row, int dtype, int64_t i0, int64_t n, float *buf) {
    if (dtype == DTYPE_F32) return (const float *)row + i0;
    const uint16_t *h = (const uint16_t *)row + i0;
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_f32(h[i]);
    return buf;
}

/* max over the row; a NaN does not win the max but makes the sum of exponentials (and so the loss) NaN. */
static float row_max(const void *row, int dtype, int64_t V) {
    float buf[BLOCK], lanes[LANES];
    lanes_fill(lanes, -INFINITY);
    for (int64_t i0 = 0; i0 < V; i0 += BLOCK) {
        const int64_t n = V - i0 < BLOCK ? V - i0 : BLOCK;
        lanes_max(lanes, row_block(row, dtype, i0, n, buf), n);
    }
    return lanes_top(lanes);
}

/* log sum_v e^x[v], as max + log sum e^(x - max). */
static float row_logsumexp(const void *row, int dtype, int64_t V) {
    const float top = row_max(row, dtype, V);
    float buf[BLOCK], lanes[LANES] = {0};
    for (int64_t i0 = 0; i0 < V; i0 += BLOCK) {
        const int64_t n = V - i0 < BLOCK ? V - i0 : BLOCK;
        const float *x = row_block(row, dtype, i0, n, buf);
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES)
            for (int j = 0; j < LANES; ++j) lanes[j] += exp_f32(x[i + j] - top);
        for (; i < n; ++i) lanes[0] += exp_f32(x[i] - top);
    }
    return top + logf(lanes_total(lanes));
}

/* What both entry points refuse: another dtype, an empty vocabulary, a target outside [0, V) that is not `ignore`. */
static int check_arguments(int dtype, int64_t M, int64_t V, const int64_t *targets, int64_t ignore) {
    if (!valid_dtype(dtype)) return CE_BAD_DTYPE;
    if (M < 0 || V <= 0) return CE_BAD_SHAPE;
    for (int64_t m = 0; m < M; ++m)
        if (targets[m] != ignore && (targets[m] < 0 || targets[m] >= V)) return CE_BAD_TARGET;
    return CE_OK;
}

/* loss[m] and lse[m] (fp32) for M rows of V logits. */
int ernie45_cross_entropy_forward(const void *logits, int dtype, int64_t M, int64_t V, const int64_t *targets,
                                  int64_t ignore, float *loss, float *lse, int threads) {
    const int status = check_arguments(dtype, M, V, targets, ignore);
    if (status != CE_OK) return status;
    const size_t row_bytes = (size_t)V * (dtype == DTYPE_F32 ? 4 : 2);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; ++m) {
        const char *row = (const char *)logits + (size_t)m * row_bytes;
        lse[m] = row_logsumexp(row, dtype, V);
        const int64_t t = targets[m];
        if (t == ignore) {
            loss[m] = 0.0f;
        } else {
            const float xt = dtype == DTYPE_F32 ? ((const float *)row)[t] : bf16_to_f32(((const uint16_t *)row)[t]);
            loss[m] = lse[m] - xt;
        }
    }
    return CE_OK;
}

/* The gradient of sum_m g[m] * loss[m] with respect to the logits, written over them (rows whose target is
 * `ignore` become zeros). `lse` comes from the forward over the same, unmodified logits. */
int ernie45_cross_entropy_backward(void *logits, int dtype, int64_t M, int64_t V, const int64_t *targets,
                                   int64_t ignore, const float *lse, const float *grad, int threads) {
    const int status = check_arguments(dtype, M, V, targets, ignore);
    if (status != CE_OK) return status;
    const size_t row_bytes = (size_t)V * (dtype == DTYPE_F32 ? 4 : 2);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; ++m) {
        char *row = (char *)logits + (size_t)m * row_bytes;
        const int64_t t = targets[m];
        if (t == ignore) {
            memset(row, 0, row_bytes);  /* +0.0 in both dtypes */
            continue;
        }
        const float g = grad[m], shift = lse[m];
        float in[BLOCK], out[BLOCK];
        for (int64_t i0 = 0; i0 < V; i0 += BLOCK) {
            const int64_t n = V - i0 < BLOCK ? V - i0 : BLOCK;
            const float *x = row_block(row, dtype, i0, n, in);
            float *y = dtype == DTYPE_F32 ? (float *)row + i0 : out;
            for (int64_t i = 0; i < n; ++i) y[i] = g * exp_f32(x[i] - shift);
            if (t >= i0 && t < i0 + n) y[t - i0] -= g;
            if (dtype == DTYPE_BF16) {
                uint16_t *h = (uint16_t *)row + i0;
                for (int64_t i = 0; i < n; ++i) h[i] = f32_to_bf16(y[i]);
            }
        }
    }
    return CE_OK;
}
