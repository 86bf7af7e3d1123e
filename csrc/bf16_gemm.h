/* Linear layers in bf16 (AVX512-BF16 vdpbf16ps) over weights packed once into bf16 panels.
 *
 * A weight W[N,K] (out = in W^T + b) is held as ceil(N / VAD_PANEL) panels; panel j holds, for each
 * pair of input positions p = 0 .. ceil(K/2)-1, the 64 output columns' pairs
 * (W[64j + c][2p], W[64j + c][2p + 1]) for c = 0..63: the pair-interleaved order vdpbf16ps (and the
 * AMX tile product) reads. Zero past N and past K.
 * The input rows are rounded to bf16 once per call (into a caller-provided buffer); the products
 * accumulate in fp32; bias, accumulation into C and the activation are applied in fp32. */
#ifndef VAD_BF16_GEMM_H
#define VAD_BF16_GEMM_H

#include <stddef.h>

#include "bf16.h"
#include "threadpool.h"

/* bf16 elements of a packed W[N,K]. */
size_t vad_bf16_panel_elems(int N, int K);
/* bf16 elements of the rounded-input buffer for M rows of depth K. */
size_t vad_bf16_input_elems(int M, int K);

/* Packs W[N,K] whose element (n, k) is src[n * stride_n + k * stride_k] (row-major W: K, 1; the
 * transpose of a row-major [K, N] matrix: 1, N). */
void vad_bf16_pack(vad_bf16 *dst, const float *src, int N, int K, size_t stride_n, size_t stride_k);

/* C[M,N] (stride ldc) = act(bf16(A)[M,K] (stride lda) W^T + bias (may be NULL) + beta * C), beta 0 or 1;
 * act as vad_panel_linear (-1 none). abuf: vad_bf16_input_elems(M, K) elements of scratch.
 * Each element of C is computed by one worker in a fixed order: the result does not depend on the
 * number of threads or on M. Needs AVX512-BF16 (cpu_features.h; callers check). */
void vad_bf16_linear(vad_pool *pool, float *C, int ldc, const float *A, int lda, const vad_bf16 *packed,
                     const float *bias, int M, int N, int K, float beta, int act, vad_bf16 *abuf);

/* The same product on input rows already rounded to bf16: A holds M rows of vad_bf16_input_elems(1, K)
 * elements (zero past K), as vad_layernorm_bf16 writes them. */
void vad_bf16_linear_rounded(vad_pool *pool, float *C, int ldc, const vad_bf16 *A, const vad_bf16 *packed,
                             const float *bias, int M, int N, int K, float beta, int act);

/* Best wall time (seconds) of one [M,K] x [K,N] vad_bf16_linear (input rounding included, weight
 * packing not) over `repeats` runs with a fresh pool of nthreads: the bf16 reference rate for benchmarks. */
int vad_bf16_gemm_benchmark(int M, int N, int K, int repeats, int nthreads, double *best_seconds);

#endif
