/* Multithreaded building blocks on row-major float arrays, each backward beside its forward.
 * Each op partitions rows over the pool; results do not depend on the thread count. */
#ifndef VAD_OPS_H
#define VAD_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "bf16.h"
#include "threadpool.h"

enum vad_activation { VAD_ACT_QUICK_GELU = 0, VAD_ACT_GELU = 1, VAD_ACT_SWIGLU = 2 };

/* C[M,N] = alpha op(A) op(B) + beta C (row-major), partitioned over the pool's workers by rows
 * of C (or by columns when M <= N, so each worker packs only its share of B). */
void vad_gemm(vad_pool *pool, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
              int lda, const float *B, int ldb, float beta, float *C, int ldc);

/* out[M,N] = in[M,K] . W[N,K]^T (+ bias[N]) (+ beta*out). Rows of `in` and `out` use strides
 * lda / ldc. GEMMs are partitioned over rows (or columns when M is small). */
void vad_linear(vad_pool *pool, float *out, int ldc, const float *in, int lda, const float *W,
                const float *bias, int M, int N, int K, float beta);

/* din[M,K] = dout[M,N] . W[N,K] (+ beta*din): the input gradient of vad_linear. */
void vad_linear_backward_input(vad_pool *pool, float *din, int ldd, const float *dout, int ldo, const float *W,
                               int M, int N, int K, float beta);

/* The whole backward of vad_linear (y[M,N] = x[M,K] W[N,K]^T + b): dx = dx_beta * dx + dy W,
 * dW += dy^T x, db += column sums of dy (double accumulation, rows in order). Each output may be
 * NULL. */
void vad_linear_backward(vad_pool *pool, float *dx, float dx_beta, float *dW, float *db, const float *dy,
                         const float *x, const float *W, int M, int N, int K);

/* LayerNorm over the last dim (biased variance). out may alias in. Rows have stride ld. */
void vad_layernorm(vad_pool *pool, float *out, int ld_out, const float *in, int ld_in,
                   const float *w, const float *b, int rows, int C, float eps);

/* The same LayerNorm with its rows rounded to bf16 (bf16.h) into out, 2 * ceil(C/2) elements per row
 * (a zero past C when C is odd): the input layout of vad_bf16_linear_rounded. The values are those
 * vad_layernorm writes, rounded as vad_bf16_linear rounds its input. Needs AVX512-BF16. */
void vad_layernorm_bf16(vad_pool *pool, vad_bf16 *out, const float *in, int ld_in, const float *w, const float *b,
                        int rows, int C, float eps);

/* LayerNorm backward (recomputes the statistics from x): dx += ..., dw/db += ... (NULL to skip). */
int vad_layernorm_backward(vad_pool *pool, float *dx, int ld_dx, const float *dout, int ld_o, const float *x,
                           int ld_x, const float *w, float *dw, float *db, int rows, int C, float eps);

/* x[i] = act(x[i]) over n elements (QuickGELU or exact GELU). */
void vad_activation_inplace(vad_pool *pool, float *x, int64_t n, int act);
/* The same over rows x cols of x (stride ld), in the calling thread. */
void vad_activation_rows(float *x, int ld, int rows, int cols, int act);

/* d[i] *= act'(f[i]) (f: the pre-activation values). */
void vad_activation_backward(vad_pool *pool, float *d, const float *f, int64_t n, int act);

/* SwiGLU: out[r, j] = silu(in[r, j]) * in[r, hidden + j], in has 2*hidden columns. */
void vad_swiglu(vad_pool *pool, float *out, const float *in, int rows, int hidden);

/* df [rows, 2*hidden] from dy [rows, hidden] and the pre-activation f [rows, 2*hidden]. */
void vad_swiglu_backward(vad_pool *pool, float *df, const float *dy, const float *f, int rows, int hidden);

/* x[r,:] += scale[:] (elementwise, may be NULL) * y[r,:] */
void vad_residual_add(vad_pool *pool, float *x, const float *y, const float *scale, int rows, int C);

/* Softmax of each row of x [rows, cols] (stride ld), in place, after multiplying by `scale`. */
void vad_softmax_rows_serial(float *x, int rows, int cols, int ld, float scale);

/* Backward of vad_softmax_rows_serial: dlogits = scale * p * (dprob - sum(dprob * p)) per row, from
 * the probabilities p (stride ld for all three). dlogits may alias dprob. */
void vad_softmax_rows_backward(float *dlogits, const float *dprob, const float *prob, int rows, int cols, int ld,
                               float scale);

/* Query rows per attention block: each worker holds one VAD_ATTN_ROWS x T score block. */
#define VAD_ATTN_ROWS 256

/* Multi-head self-attention core for a packed qkv [B, T, 3D] (q | k | v, heads contiguous
 * inside each), writing out [B, T, D]. scratch: vad_attention_scratch(T, pool size) floats. */
size_t vad_attention_scratch(int T, int nthreads);
void vad_attention(vad_pool *pool, float *out, const float *qkv, float *scratch, int B, int T,
                   int D, int heads);

/* Backward of vad_attention: dqkv [B, T, 3D] from dout [B, T, D] (probabilities recomputed).
 * scratch: vad_attention_backward_scratch(T, pool size) floats. */
size_t vad_attention_backward_scratch(int T, int nthreads);
void vad_attention_backward(vad_pool *pool, float *dqkv, const float *dout, const float *qkv, float *scratch,
                            int B, int T, int D, int heads);

#endif
