/* The operand layouts of the attention kernels (attention_fused.c, attention_backward.c), packed
 * from row-major fp32 matrices x [n, cols] (row stride ld) with AVX-512: 16 x 16 register
 * transposes, and prefetches of the rows ahead (one head's rows sit a page or more apart, beyond
 * the hardware prefetchers' reach). Everything past n rows and past cols columns is zero, so
 * padded products add exact zeros. Callers check the CPU (cpu_features.h). */
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

#endif
