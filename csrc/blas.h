/* The one place that names the BLAS provider (scipy-openblas32: every symbol prefixed scipy_).
 * Everything else calls vad_sgemm / vad_blas_single_thread. */
#ifndef VAD_BLAS_H
#define VAD_BLAS_H

#include <cblas.h>

#define VAD_SGEMM scipy_cblas_sgemm

/* C[M,N] = alpha * op(A) op(B) + beta * C, row-major. */
static inline void vad_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                             const float *A, int lda, const float *B, int ldb, float beta,
                             float *C, int ldc) {
    VAD_SGEMM(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* BLAS runs single-threaded inside our own worker threads: the pool partitions the work. */
static inline void vad_blas_single_thread(void) { scipy_openblas_set_num_threads(1); }

#endif
