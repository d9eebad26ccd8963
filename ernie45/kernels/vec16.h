/* 16-lane fp32 vectors in GCC/Clang vector types (decode_ops.c, paged_attention.c): the compiler lowers them to
 * AVX-512, AVX2 or SSE registers for the target a build names. The build cache key hashes this header with each
 * kernel that includes it (kernels/build.py). */
#ifndef ERNIE45_VEC16_H
#define ERNIE45_VEC16_H

#include <stdint.h>
#include <string.h>

#ifndef INLINE
#define INLINE static inline __attribute__((always_inline))
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

INLINE f32x16 load16(const float *p) {
    f32x16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Sum of the 16 lanes by halving in registers (through memory, the wide store then narrow reloads stall on
 * store forwarding: that was half of the decode attention's time). */
INLINE float hsum16(f32x16 v) {
    f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    f32x4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* sum_i a[i] * b[i] in 16 lanes (a vector per 16 elements, one horizontal sum at the end). */
INLINE float dot(const float *a, const float *b, int64_t n) {
    f32x16 acc = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc += load16(a + i) * load16(b + i);
    float total = hsum16(acc);
    for (; i < n; ++i) total += a[i] * b[i];
    return total;
}

#endif
