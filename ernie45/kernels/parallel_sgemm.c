/* fp32 GEMM run in the caller's OpenMP thread pool: each thread calls a single-threaded BLAS sgemm on its share
 * of the output (kernels/blas.py passes OpenBLAS's cblas_sgemm).
 *
 * Why not the BLAS's own threads: its pool and torch's OpenMP pool both spin-wait between calls, and a training
 * step alternates GEMMs with torch's elementwise ops, so on a machine with as many cores as threads the two pools
 * take turns stealing each other's cores (measured: a GEMM + SwiGLU loop ran 1.5x slower with OpenBLAS threaded
 * than with torch's GEMM; split here, 1.2x faster). This file links the same libgomp.so.1 as torch (see gemv.py),
 * so these threads are torch's.
 *
 * C[M, N] = op(A) op(B) + beta * C, row-major, op = transposed or not (cblas conventions; lda/ldb/ldc are the
 * row strides of the stored matrices). The split is along the output dimension whose other operand is cheaper to
 * pack twice: along N when N >= M (each thread packs all of A, M x K), else along M (each packs all of B). Split
 * points are multiples of 16 columns / 8 rows, so every thread's block keeps the BLAS's full-width micro-tiles.
 */

#include <omp.h>
#include <stdint.h>

typedef void (*cblas_sgemm_fn)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                               const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

/* The [begin, end) share of `total` for thread `t` of `n`, in multiples of `align`. */
static void share(int total, int align, int t, int n, int *begin, int *end) {
  int per = ((total + n - 1) / n + align - 1) / align * align;
  int64_t b = (int64_t)t * per, e = b + per;
  *begin = b < total ? (int)b : total;
  *end = e < total ? (int)e : total;
}

int ernie45_parallel_sgemm(cblas_sgemm_fn sgemm, int trans_a, int trans_b, int m, int n, int k, const float *a,
                           int lda, const float *b, int ldb, float beta, float *c, int ldc, int threads) {
  if (sgemm == 0 || m < 0 || n < 0 || k < 0 || threads < 1) return 1;
  if ((trans_a != NO_TRANS && trans_a != TRANS) || (trans_b != NO_TRANS && trans_b != TRANS)) return 1;
  int split_n = n >= m;
#pragma omp parallel num_threads(threads)
  {
    int begin, end;
    share(split_n ? n : m, split_n ? 16 : 8, omp_get_thread_num(), omp_get_num_threads(), &begin, &end);
    if (end > begin) {
      if (split_n) {
        const float *b_part = trans_b == NO_TRANS ? b + begin : b + (int64_t)begin * ldb;
        sgemm(ROW_MAJOR, trans_a, trans_b, m, end - begin, k, 1.0f, a, lda, b_part, ldb, beta, c + begin, ldc);
      } else {
        const float *a_part = trans_a == NO_TRANS ? a + (int64_t)begin * lda : a + begin;
        sgemm(ROW_MAJOR, trans_a, trans_b, end - begin, n, k, 1.0f, a_part, lda, b, ldb, beta,
              c + (int64_t)begin * ldc, ldc);
      }
    }
  }
  return 0;
}
