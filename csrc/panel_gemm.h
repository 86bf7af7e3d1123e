/* Linear layers over weights stored in column panels (the frozen backbone's layout).
 *
 * A weight W[N,K] (row-major, as a linear layer stores it: out = in W^T + b) is held as
 * ceil(N / VAD_PANEL) panels, each [K][VAD_PANEL]: panel j, row k = W[j*VAD_PANEL + c][k] for
 * c = 0..VAD_PANEL-1, zero past N. The weights are packed once when the model is loaded, so the
 * product never re-packs them (a BLAS sgemm re-packs its operands on every call).
 *
 * On CPUs with AVX-512F the product runs an AVX-512 register-blocked kernel; elsewhere (or when
 * disabled with vad_panel_set_simd(0)) every panel goes through BLAS sgemm. */
#ifndef VAD_PANEL_GEMM_H
#define VAD_PANEL_GEMM_H

#include <stddef.h>

#include "threadpool.h"

#define VAD_PANEL 64

/* Floats needed to hold W[N,K] in panels. */
size_t vad_panel_floats(int N, int K);
/* W[N,K] (row-major) from its panels. */
void vad_panel_unpack(float *W, const float *panels, int N, int K);

/* C[M,N] (stride ldc) = act(A[M,K] (stride lda) W^T + bias (may be NULL) + beta * C), beta 0 or 1;
 * act: VAD_ACT_QUICK_GELU or VAD_ACT_GELU (ops.h), or -1 for none.
 * Every element of C is computed by one worker in a fixed order: the result does not depend
 * on the number of threads or on M. */
void vad_panel_linear(vad_pool *pool, float *C, int ldc, const float *A, int lda, const float *panels,
                      const float *bias, int M, int N, int K, float beta, int act);

/* 1: use the AVX-512 kernel when the CPU has it (the default); 0: BLAS for every panel.
 * Returns the previous setting. */
int vad_panel_set_simd(int enable);
/* 1 when the AVX-512 kernel is in use. */
int vad_panel_simd_active(void);

#endif
