/* Row reductions in LANES independent lanes (cross_entropy.c, causal_attention.c): a single running max or sum is
 * a dependency chain the compiler may not reorder in strict fp32, while each LANES-wide loop below becomes vector
 * code. The build cache key hashes this header with each kernel that includes it (kernels/gemv.py). */
#ifndef ERNIE45_LANE_REDUCE_H
#define ERNIE45_LANE_REDUCE_H

#include <stdint.h>

#ifndef INLINE
#define INLINE static inline __attribute__((always_inline))
#endif

#define LANES 16

INLINE void lanes_fill(float *lanes, float value) {
    for (int j = 0; j < LANES; ++j) lanes[j] = value;
}

/* lanes <- max(lanes, x[0..n)), lane by lane. */
INLINE void lanes_max(float *lanes, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; ++j) lanes[j] = x[i + j] > lanes[j] ? x[i + j] : lanes[j];
    for (; i < n; ++i) lanes[0] = x[i] > lanes[0] ? x[i] : lanes[0];
}

INLINE float lanes_top(const float *lanes) {
    float top = lanes[0];
    for (int j = 1; j < LANES; ++j) top = lanes[j] > top ? lanes[j] : top;
    return top;
}

INLINE float lanes_total(const float *lanes) {
    float total = 0.0f;
    for (int j = 0; j < LANES; ++j) total += lanes[j];
    return total;
}

#endif
