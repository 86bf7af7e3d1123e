/* What the attention kernels (attention_fused.c, attention_backward.c) share: their operand layouts,
 * packed from row-major fp32 matrices x [n, cols] (row stride ld) with AVX-512 (16 x 16 register
 * transposes, and prefetches of the rows ahead: one head's rows sit a page or more apart, beyond
 * the hardware prefetchers' reach), and two AVX-512 helpers of their softmax (lane masks, the base-2
 * exponential). Everything past n rows and past cols columns is zero, so padded products add exact
 * zeros. Callers check the CPU (cpu_features.h). */
#ifndef VAD_ATTENTION_PACK_H
#define VAD_ATTENTION_PACK_H

#include "bf16.h"

#define VAD_KEY_BLOCK 64 /* keys per block of the transposed layouts */

/* Key blocks [ceil(n / 64)][cols][64]: x transposed, 64 rows at a time (fp32 Q K^T operand). */
void vad_pack_keys_f32(float *dst, const float *x, int ld, int n, int cols);
/* Rows [np][colsp] (np >= n, colsp >= cols, multiple of 16). */
void vad_pack_rows_f32(float *dst, const float *x, int ld, int n, int np, int cols, int colsp);

#ifdef VAD_HAVE_BF16_KERNELS
/* Key blocks [ceil(n / 64)][ceil(cols / 2)][64][2]: for every pair of columns (2p, 2p + 1) the 64
 * rows' pairs, the order vdpbf16ps reads a B operand reduced over columns. */
void vad_pack_keys_bf16(vad_bf16 *dst, const float *x, int ld, int n, int cols);
/* Rows [n][2 ceil(cols / 2)] in bf16: an A operand reduced over columns. */
void vad_pack_rows_bf16(vad_bf16 *dst, const float *x, int ld, int n, int cols);
/* Row pairs [np / 2][colsp][2] (np >= n even, colsp >= cols multiple of 16): element (q, c) holds
 * x[2q][c], x[2q + 1][c]; a B operand (or, read down a column, an A operand) reduced over rows. */
void vad_pack_pairs_bf16(vad_bf16 *dst, const float *x, int ld, int n, int np, int cols, int colsp);
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/* The mask of the first n of 16 lanes (none for n <= 0, all for n >= 16). */
static inline __mmask16 vad_lanes16(int n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}

/* 2^t on 16 lanes: t = n + f with n an integer and |f| <= 1/2, 2^f by a degree-6 polynomial
 * (relative error ~1e-7, the fp32 rounding), times 2^n by vscalefps. t below -126 gives 2^-126. */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) __m512 vad_exp2_16(__m512 t) {
    t = _mm512_max_ps(t, _mm512_set1_ps(-126.0f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5345810970757157e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399930903688073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618489071726799e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550328642129898e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022646248340607f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471824645996f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#endif
