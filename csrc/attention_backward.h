/* Attention backward in bf16 (AVX512-BF16): the products of ops.h vad_attention_backward (the
 * probabilities recomputed from Q K^T, dV = P^T dO, dP = dO V^T, dQ = s dS K, dK = s dS^T Q) with
 * bf16 operands (q, k, v, dO, P and dS rounded to bf16) and fp32 accumulation; the softmax (the
 * fused kernel's exponential) and its backward (ops.h vad_softmax_rows_backward) run in fp32. Each
 * (image, head) is computed by one worker in a fixed order: results do not depend on the thread
 * count. Needs AVX512-BF16 (vad_attention_fused_available(VAD_BF16); callers check). */
#ifndef VAD_ATTENTION_BACKWARD_H
#define VAD_ATTENTION_BACKWARD_H

#include <stddef.h>

#include "threadpool.h"

/* Floats of scratch vad_attention_backward_bf16 needs. */
size_t vad_attention_backward_bf16_scratch(int T, int head_dim, int nthreads);

/* dqkv [B, T, 3D] (written) from dout [B, T, D] and the packed qkv [B, T, 3D] of the forward. */
void vad_attention_backward_bf16(vad_pool *pool, float *dqkv, const float *dout, const float *qkv, float *scratch,
                                 int B, int T, int D, int heads);

#endif
