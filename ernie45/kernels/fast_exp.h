/* A vectorizable e^x for the kernels (decode_ops.c's SiLU and attention softmax, cross_entropy.c). The build cache
 * key hashes it with each kernel that includes it (kernels/gemv.py). */
#ifndef ERNIE45_FAST_EXP_H
#define ERNIE45_FAST_EXP_H

#include <stdint.h>
#include <string.h>

#ifndef INLINE
#define INLINE static inline __attribute__((always_inline))
#endif

/* e^x in fp32, in straight-line arithmetic the compiler vectorizes (libm's expf is a call per element: 3,072 of
 * them were most of a decode step's SiLU): e^x = 2^n * e^r, r = x - n ln2 in [-ln2/2, ln2/2], e^r by its
 * degree-6 Taylor polynomial (relative error < 2e-7, ~1 ulp); 0 below -87.3 and +inf above 88.7, as expf. */
INLINE float exp_f32(float x) {
    const float lo = -87.33654f, hi = 88.72283f;
    const float cx = x < lo ? lo : (x > hi ? hi : x);
    const float n = __builtin_rintf(cx * 1.44269504f);
    const float r = (cx - n * 0.693145752f) - n * 1.42860677e-6f; /* ln2 split in two for an exact n * ln2_hi */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    const float y = p * scale;
    return x < lo ? 0.0f : (x > hi ? __builtin_inff() : y);
}

#endif
