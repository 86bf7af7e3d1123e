#include "attention_pack.h"

#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define VAD_AVX512 __attribute__((target("avx512f")))
#define VAD_INLINE static inline __attribute__((always_inline))
#define KB VAD_KEY_BLOCK

/* 16 x 16 transpose of 32-bit elements: r[i] lane j <-> r[j] lane i. */
VAD_AVX512 VAD_INLINE void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i + k], 128-bit lane L: column 4L + k of rows 4i .. 4i + 3 */
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; k++) { /* 4 x 4 transpose of 128-bit lanes among r[k], r[4 + k], r[8 + k], r[12 + k] */
        __m512 u0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), u1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xdd);
        __m512 u2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88), u3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xdd);
        t[k] = _mm512_shuffle_f32x4(u0, u2, 0x88);
        t[8 + k] = _mm512_shuffle_f32x4(u0, u2, 0xdd);
        t[4 + k] = _mm512_shuffle_f32x4(u1, u3, 0x88);
        t[12 + k] = _mm512_shuffle_f32x4(u1, u3, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Prefetches the first cols floats of rows t .. t + 15 below n. */
static void prefetch_rows(const float *x, int ld, int t, int n, int cols) {
    for (int i = t; i < t + 16 && i < n; i++)
        for (int d = 0; d < cols; d += 16) __builtin_prefetch(x + (size_t)i * ld + d);
}

/* Columns c .. c + 15 of row t (zero past n rows and cols columns). */
VAD_AVX512 VAD_INLINE __m512 row16(const float *x, int ld, int t, int n, int c, int cols) {
    return t < n ? _mm512_maskz_loadu_ps(vad_lanes16(cols - c), x + (size_t)t * ld + c) : _mm512_setzero_ps();
}

VAD_AVX512 void vad_pack_keys_f32(float *dst, const float *x, int ld, int n, int cols) {
    for (int t0 = 0; t0 < (n + KB - 1) / KB * KB; t0 += 16) {
        prefetch_rows(x, ld, t0 + 16, n, cols);
        float *kt = dst + (size_t)(t0 / KB) * cols * KB + t0 % KB;
        for (int d0 = 0; d0 < cols; d0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = row16(x, ld, t0 + i, n, d0, cols);
            transpose16(r);
            for (int j = 0; j < 16 && d0 + j < cols; j++) _mm512_storeu_ps(kt + (size_t)(d0 + j) * KB, r[j]);
        }
    }
}

VAD_AVX512 void vad_pack_rows_f32(float *dst, const float *x, int ld, int n, int np, int cols, int colsp) {
    for (int t = 0; t < np; t++) {
        if (t % 16 == 0) prefetch_rows(x, ld, t + 16, n, cols);
        for (int d = 0; d < colsp; d += 16) _mm512_storeu_ps(dst + (size_t)t * colsp + d, row16(x, ld, t, n, d, cols));
    }
}

#ifdef VAD_HAVE_BF16_KERNELS

/* 32 columns of row t from column d0 as 16 bf16 pairs (columns d0 + 2i, d0 + 2i + 1). */
VAD_TARGET_BF16 VAD_INLINE __m512i row_pairs(const float *x, int ld, int t, int n, int d0, int cols) {
    return (__m512i)_mm512_cvtne2ps_pbh(row16(x, ld, t, n, d0 + 16, cols), row16(x, ld, t, n, d0, cols));
}

VAD_TARGET_BF16 void vad_pack_keys_bf16(vad_bf16 *dst, const float *x, int ld, int n, int cols) {
    int c2 = (cols + 1) / 2;
    for (int t0 = 0; t0 < (n + KB - 1) / KB * KB; t0 += 16) {
        prefetch_rows(x, ld, t0 + 16, n, cols);
        vad_bf16 *kp = dst + ((size_t)(t0 / KB) * c2 * KB + t0 % KB) * 2;
        for (int d0 = 0; d0 < 2 * c2; d0 += 32) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_castsi512_ps(row_pairs(x, ld, t0 + i, n, d0, cols));
            transpose16(r);
            for (int j = 0; j < 16 && d0 / 2 + j < c2; j++)
                _mm512_storeu_si512((void *)(kp + (size_t)(d0 / 2 + j) * KB * 2), _mm512_castps_si512(r[j]));
        }
    }
}

VAD_TARGET_BF16 void vad_pack_rows_bf16(vad_bf16 *dst, const float *x, int ld, int n, int cols) {
    int w = (cols + 1) / 2 * 2;
    for (int t = 0; t < n; t++) {
        if (t % 16 == 0) prefetch_rows(x, ld, t + 16, n, cols);
        for (int d0 = 0; d0 < w; d0 += 32) {
            int left = w - d0;
            __mmask32 mk = left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1);
            _mm512_mask_storeu_epi16(dst + (size_t)t * w + d0, mk, row_pairs(x, ld, t, n, d0, cols));
        }
    }
}

VAD_TARGET_BF16 void vad_pack_pairs_bf16(vad_bf16 *dst, const float *x, int ld, int n, int np, int cols, int colsp) {
    /* interleaves the low and high 16 bf16 of a vector: a0 b0 a1 b1 ... */
    static const uint16_t zip[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    __m512i zipv = _mm512_loadu_si512((const void *)zip);
    for (int t = 0; t < np; t += 2) {
        if (t % 16 == 0) prefetch_rows(x, ld, t + 16, n, cols);
        vad_bf16 *q = dst + (size_t)(t / 2) * colsp * 2;
        for (int d = 0; d < colsp; d += 16) {
            __m512bh w = _mm512_cvtne2ps_pbh(row16(x, ld, t + 1, n, d, cols), row16(x, ld, t, n, d, cols));
            _mm512_storeu_si512((void *)(q + (size_t)d * 2), _mm512_permutexvar_epi16(zipv, (__m512i)w));
        }
    }
}

#endif
#endif
