/* bfloat16 storage (the upper 16 bits of an IEEE float) and the AVX512-BF16 helpers shared by
 * the bf16 kernels. Rounding is to nearest, ties to even, as vcvtne2ps2bf16 does (which also
 * flushes denormal inputs to zero; the scalar packer keeps them, they only occur in weights). */
#ifndef VAD_BF16_H
#define VAD_BF16_H

#include <stdint.h>
#include <string.h>

typedef uint16_t vad_bf16;

static inline vad_bf16 vad_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (vad_bf16)(u >> 16);
}

static inline float vad_from_bf16(vad_bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* The bf16 kernels need a compiler that knows AVX512-BF16 (GCC 10+, clang 9+); without one they are
 * left out and precision "bf16" is refused at run time (cpu_features.c). */
#if (defined(__x86_64__) || defined(__i386__)) && \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define VAD_HAVE_BF16_KERNELS 1
#include <immintrin.h>

#define VAD_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

/* One 32-bit lane holding the bf16 pair p[0], p[1], broadcast to all 16 lanes. */
VAD_TARGET_BF16 static inline __attribute__((always_inline)) __m512i vad_bcast_pair(const vad_bf16 *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

/* acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1] (fp32 accumulation of bf16 pairs). */
VAD_TARGET_BF16 static inline __attribute__((always_inline)) __m512 vad_dp_bf16(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

/* Rounds 32 floats (lo: first 16, hi: next 16) to bf16 and stores them at dst. */
VAD_TARGET_BF16 static inline __attribute__((always_inline)) void vad_store_bf16x32(vad_bf16 *dst, __m512 lo,
                                                                                    __m512 hi) {
    _mm512_storeu_si512((void *)dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}
#endif

#endif
