/* Causal grouped-query attention for training on the CPU, forward and backward, in blocks whose products run on a
 * single-threaded BLAS sgemm (kernels/blas.py passes OpenBLAS's) inside torch's OpenMP threads.
 *
 * Why: torch's CPU flash attention computes its blocks with small per-head products; at the training shapes it ran
 * at ~30% of this machine's GEMM rate (backward ~0.2 s per 0.3B layer). Here the G = Hq / Hkv query heads that
 * share a kv head are stacked into one matrix (rows (t, g)), so every block product is one GEMM with G times more
 * rows against the shared keys and values.
 *
 *   forward:  S = scale * Q K^T (causal), P = softmax(S) by rows (online over key blocks), O = P V,
 *             lse = log sum e^S per row (saved for the backward)
 *   backward: P = e^(scale * Q K^T - lse); dV = P^T dO; dP = dO V^T; dS = P (dP - rowsum(dO o O)) scale;
 *             dK = dS^T Q; dQ = dS K
 *
 * Layout: q [B, T, Hq, D], k and v [B, T, Hkv, D] with element (b, t, h, d) at base + b * sb + t * st + h * D + d
 * (the projections' views, no copy); o, dout, dq [B, T, Hq, D], dk, dv [B, T, Hkv, D] contiguous; lse [B, Hq, T].
 * Forward tasks are (b, kv head, query block), backward tasks (b, kv head): each writes its own outputs only, so
 * no atomics, and the results do not depend on the thread count. Legend: R rows of a stacked block (positions x G).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"
#include "lane_reduce.h"

typedef void (*cblas_sgemm_fn)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                               const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { ATT_OK = 0, ATT_BAD_ARGS = 1, ATT_NO_MEMORY = 2 };

/* Query positions per block and key positions per block; BK is a multiple of BQ, so a key block's first query
 * block starts exactly at its first key. */
#define BQ 64
#define BK 128

typedef struct {
  const float *base;
  int64_t sb, st; /* strides of b and t, in floats; heads are D apart */
} View;

typedef struct {
  cblas_sgemm_fn sgemm;
  int B, T, Hq, Hkv, D, G;
  float scale;
} Shape;

INLINE const float *at(View v, int b, int t, int h, int D) { return v.base + b * v.sb + t * v.st + (int64_t)h * D; }

/* Copies the G heads of kv head `kvh` at positions [t0, t1) into rows ((t - t0) * G + g) of dst [R, D]. */
static void stack_heads(float *dst, View src, const Shape *s, int b, int kvh, int t0, int t1) {
  for (int t = t0; t < t1; ++t)
    memcpy(dst + (int64_t)(t - t0) * s->G * s->D, at(src, b, t, kvh * s->G, s->D), sizeof(float) * s->G * s->D);
}

/* The inverse of stack_heads into a contiguous [B, T, Hq, D] tensor. */
static void unstack_heads(float *dst, const float *src, const Shape *s, int b, int kvh, int t0, int t1) {
  for (int t = t0; t < t1; ++t)
    memcpy(dst + (((int64_t)b * s->T + t) * s->Hq + kvh * s->G) * s->D, src + (int64_t)(t - t0) * s->G * s->D,
           sizeof(float) * s->G * s->D);
}

/* Keys of [j0, j0 + nk) that query position t may attend (causal): 0..nk. */
INLINE int visible(int t, int j0, int nk) {
  const int n = t - j0 + 1;
  return n < 0 ? 0 : (n > nk ? nk : n);
}

static float row_max(const float *x, int n) {
  float lanes[LANES];
  lanes_fill(lanes, -INFINITY);
  lanes_max(lanes, x, n);
  return lanes_top(lanes);
}

/* x[c] <- e^(x[c] - top) for c < n; returns their sum. */
static float exp_and_sum(float *x, int n, float top) {
  float lanes[LANES] = {0};
  int c = 0;
  for (; c + LANES <= n; c += LANES)
    for (int j = 0; j < LANES; ++j) {
      x[c + j] = exp_f32(x[c + j] - top);
      lanes[j] += x[c + j];
    }
  for (; c < n; ++c) {
    x[c] = exp_f32(x[c] - top);
    lanes[0] += x[c];
  }
  return lanes_total(lanes);
}

/* One (b, kv head, query block) of the forward. Work buffers: q_blk [R, D], acc [R, D], p [R, BK], m, l [R]. */
static void forward_block(const Shape *s, View q, View k, View v, float *o, float *lse, int b, int kvh, int i0,
                          float *q_blk, float *acc, float *p, float *m, float *l) {
  const int G = s->G, D = s->D, i1 = i0 + BQ < s->T ? i0 + BQ : s->T, R = (i1 - i0) * G;
  stack_heads(q_blk, q, s, b, kvh, i0, i1);
  memset(acc, 0, sizeof(float) * R * D);
  for (int r = 0; r < R; ++r) m[r] = -INFINITY, l[r] = 0.0f;
  for (int j0 = 0; j0 < i1; j0 += BK) {
    const int nk = j0 + BK < i1 ? BK : i1 - j0;
    s->sgemm(ROW_MAJOR, NO_TRANS, TRANS, R, nk, D, s->scale, q_blk, D, at(k, b, j0, kvh, D), (int)k.st, 0.0f, p, BK);
    for (int r = 0; r < R; ++r) {
      float *row = p + (int64_t)r * BK, *out = acc + (int64_t)r * D;
      const int n = visible(i0 + r / G, j0, nk);
      if (n == 0) {
        memset(row, 0, sizeof(float) * nk);
        continue;
      }
      const float top = fmaxf(m[r], row_max(row, n));
      const float rescale = exp_f32(m[r] - top); /* 0 on the first visible block (m = -inf) */
      const float sum = exp_and_sum(row, n, top);
      for (int c = n; c < nk; ++c) row[c] = 0.0f;
      l[r] = l[r] * rescale + sum;
      m[r] = top;
      if (rescale != 1.0f)
        for (int d = 0; d < D; ++d) out[d] *= rescale;
    }
    s->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, R, D, nk, 1.0f, p, BK, at(v, b, j0, kvh, D), (int)v.st, 1.0f, acc, D);
  }
  for (int r = 0; r < R; ++r) {
    const float inv = 1.0f / l[r];
    for (int d = 0; d < D; ++d) acc[(int64_t)r * D + d] *= inv;
    const int t = i0 + r / G, h = kvh * G + r % G;
    lse[((int64_t)b * s->Hq + h) * s->T + t] = m[r] + logf(l[r]);
  }
  unstack_heads(o, acc, s, b, kvh, i0, i1);
}

static int check(const Shape *s) {
  return s->sgemm && s->B > 0 && s->T > 0 && s->Hkv > 0 && s->D > 0 && s->Hq % s->Hkv == 0 && s->Hq >= s->Hkv;
}

int ernie45_causal_attention_forward(cblas_sgemm_fn sgemm, int B, int T, int Hq, int Hkv, int D, float scale,
                                     const float *q, int64_t q_sb, int64_t q_st, const float *k, int64_t k_sb,
                                     int64_t k_st, const float *v, int64_t v_sb, int64_t v_st, float *o, float *lse,
                                     int threads) {
  const Shape s = {sgemm, B, T, Hq, Hkv, D, Hkv > 0 ? Hq / Hkv : 0, scale};
  if (!check(&s) || threads < 1) return ATT_BAD_ARGS;
  const View qv = {q, q_sb, q_st}, kv = {k, k_sb, k_st}, vv = {v, v_sb, v_st};
  const int blocks = (T + BQ - 1) / BQ, tasks = B * Hkv * blocks;
  const int64_t R = (int64_t)BQ * s.G;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    float *work = malloc(sizeof(float) * (2 * R * D + R * BK + 2 * R));
    if (!work) {
#pragma omp atomic write
      failed = 1;
    }
    /* Latest query blocks first: they attend the most keys, and dynamic scheduling then evens out the rest. */
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < tasks; ++task) {
      if (!work) continue;
      const int block = blocks - 1 - task / (B * Hkv), bh = task % (B * Hkv);
      forward_block(&s, qv, kv, vv, o, lse, bh / Hkv, bh % Hkv, block * BQ, work, work + R * D, work + 2 * R * D,
                    work + 2 * R * D + R * BK, work + 2 * R * D + R * BK + R);
    }
    free(work);
  }
  return failed ? ATT_NO_MEMORY : ATT_OK;
}

/* Work of one backward task (b, kv head): the G heads stacked over all T positions, and one block's products. */
typedef struct {
  float *q, *dout, *dq; /* [T * G, D] */
  float *delta, *lse;   /* [T * G] */
  float *p, *dp;        /* [BQ * G, BK] */
  float *dk, *dv;       /* [BK, D] */
} BackwardWork;

static void backward_task(const Shape *s, View q, View k, View v, const float *o, const float *dout,
                          const float *lse, float *dq, float *dk, float *dv, int b, int kvh, BackwardWork *w) {
  const int G = s->G, D = s->D, T = s->T;
  const View o_view = {o, (int64_t)T * s->Hq * D, (int64_t)s->Hq * D};
  const View do_view = {dout, o_view.sb, o_view.st};
  stack_heads(w->q, q, s, b, kvh, 0, T);
  stack_heads(w->dout, do_view, s, b, kvh, 0, T);
  for (int t = 0; t < T; ++t)
    for (int g = 0; g < G; ++g) {
      const int64_t r = (int64_t)t * G + g;
      const float *o_row = at(o_view, b, t, kvh * G + g, D), *do_row = w->dout + r * D;
      float sum = 0.0f;
      for (int d = 0; d < D; ++d) sum += o_row[d] * do_row[d];
      w->delta[r] = sum;
      w->lse[r] = lse[((int64_t)b * s->Hq + kvh * G + g) * T + t];
    }
  memset(w->dq, 0, sizeof(float) * (int64_t)T * G * D);
  for (int j0 = 0; j0 < T; j0 += BK) {
    const int nk = j0 + BK < T ? BK : T - j0;
    const float *k_blk = at(k, b, j0, kvh, D), *v_blk = at(v, b, j0, kvh, D);
    memset(w->dk, 0, sizeof(float) * BK * D);
    memset(w->dv, 0, sizeof(float) * BK * D);
    for (int i0 = j0; i0 < T; i0 += BQ) { /* query blocks from the key block's first position on (causal) */
      const int i1 = i0 + BQ < T ? i0 + BQ : T, R = (i1 - i0) * G;
      const float *q_blk = w->q + (int64_t)i0 * G * D, *do_blk = w->dout + (int64_t)i0 * G * D;
      s->sgemm(ROW_MAJOR, NO_TRANS, TRANS, R, nk, D, s->scale, q_blk, D, k_blk, (int)k.st, 0.0f, w->p, BK);
      s->sgemm(ROW_MAJOR, NO_TRANS, TRANS, R, nk, D, 1.0f, do_blk, D, v_blk, (int)v.st, 0.0f, w->dp, BK);
      for (int r = 0; r < R; ++r) {
        float *p_row = w->p + (int64_t)r * BK, *dp_row = w->dp + (int64_t)r * BK;
        const int64_t row = (int64_t)i0 * G + r;
        const int n = visible(i0 + r / G, j0, nk);
        const float row_lse = w->lse[row], row_delta = w->delta[row];
        for (int c = 0; c < n; ++c) {
          p_row[c] = exp_f32(p_row[c] - row_lse);
          dp_row[c] = p_row[c] * (dp_row[c] - row_delta) * s->scale;
        }
        for (int c = n; c < nk; ++c) p_row[c] = 0.0f, dp_row[c] = 0.0f;
      }
      s->sgemm(ROW_MAJOR, TRANS, NO_TRANS, nk, D, R, 1.0f, w->p, BK, do_blk, D, 1.0f, w->dv, D);
      s->sgemm(ROW_MAJOR, TRANS, NO_TRANS, nk, D, R, 1.0f, w->dp, BK, q_blk, D, 1.0f, w->dk, D);
      s->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, R, D, nk, 1.0f, w->dp, BK, k_blk, (int)k.st, 1.0f,
               w->dq + (int64_t)i0 * G * D, D);
    }
    for (int j = 0; j < nk; ++j) {
      const int64_t offset = (((int64_t)b * T + j0 + j) * s->Hkv + kvh) * D;
      memcpy(dk + offset, w->dk + (int64_t)j * D, sizeof(float) * D);
      memcpy(dv + offset, w->dv + (int64_t)j * D, sizeof(float) * D);
    }
  }
  unstack_heads(dq, w->dq, s, b, kvh, 0, T);
}

int ernie45_causal_attention_backward(cblas_sgemm_fn sgemm, int B, int T, int Hq, int Hkv, int D, float scale,
                                      const float *q, int64_t q_sb, int64_t q_st, const float *k, int64_t k_sb,
                                      int64_t k_st, const float *v, int64_t v_sb, int64_t v_st, const float *o,
                                      const float *dout, const float *lse, float *dq, float *dk, float *dv,
                                      int threads) {
  const Shape s = {sgemm, B, T, Hq, Hkv, D, Hkv > 0 ? Hq / Hkv : 0, scale};
  if (!check(&s) || threads < 1) return ATT_BAD_ARGS;
  const View qv = {q, q_sb, q_st}, kv = {k, k_sb, k_st}, vv = {v, v_sb, v_st};
  const int64_t rows = (int64_t)T * s.G, block_rows = (int64_t)BQ * s.G;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    float *work = malloc(sizeof(float) * (3 * rows * D + 2 * rows + 2 * block_rows * BK + 2 * BK * D));
    BackwardWork w = {0};
    if (work) {
      w.q = work, w.dout = w.q + rows * D, w.dq = w.dout + rows * D, w.delta = w.dq + rows * D;
      w.lse = w.delta + rows, w.p = w.lse + rows, w.dp = w.p + block_rows * BK, w.dk = w.dp + block_rows * BK;
      w.dv = w.dk + BK * D;
    } else {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < B * Hkv; ++task)
      if (work) backward_task(&s, qv, kv, vv, o, dout, lse, dq, dk, dv, task / Hkv, task % Hkv, &w);
    free(work);
  }
  return failed ? ATT_NO_MEMORY : ATT_OK;
}
