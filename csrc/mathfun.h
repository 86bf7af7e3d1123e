/* Branch-free, auto-vectorisable elementwise math (exp, sigmoid, erf, GELU variants).
 * vad_expf: Cephes-style range reduction + degree-6 polynomial, ~1 ulp on [-87, 88]. */
#ifndef VAD_MATHFUN_H
#define VAD_MATHFUN_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline __attribute__((always_inline)) float vad_expf(float x) {
    /* ternaries, not fminf/fmaxf: they compile to min/max instructions and keep loops vectorised */
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    /* round to nearest with the 1.5 * 2^23 trick: exact for |t| < 2^22, vectorises (no floorf call) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static inline __attribute__((always_inline)) float vad_sigmoidf(float x) { return 1.0f / (1.0f + vad_expf(-x)); }

/* erf with max abs error ~1.2e-7 (Numerical Recipes erfc Chebyshev fit, evaluated branch-free). */
static inline __attribute__((always_inline)) float vad_erff(float x) {
    float z = fabsf(x);
    float t = 1.0f / (1.0f + 0.5f * z);
    float p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    float erfc_z = t * vad_expf(-z * z + p);
    float r = 1.0f - erfc_z;
    return copysignf(r, x);
}

static inline __attribute__((always_inline)) float vad_quick_gelu(float x) { return x * vad_sigmoidf(1.702f * x); }
static inline __attribute__((always_inline)) float vad_gelu_erf(float x) { return 0.5f * x * (1.0f + vad_erff(x * 0.70710678118654752f)); }

#endif
