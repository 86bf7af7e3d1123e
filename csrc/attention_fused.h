/* Fused (flash-style) multi-head self-attention: per block of query rows, the scores against one
 * block of keys at a time, a running row maximum and sum in fp32, and the output accumulated
 * and rescaled as the maximum grows, so no T x T score matrix exists per head.
 *
 * fp32: AVX-512F. bf16: AVX512-BF16, Q K^T and P V with bf16 operands (Q, K, V and the
 * probabilities rounded to bf16) and fp32 accumulation; maximum, exp and sums in fp32.
 * Each (image, head) is computed by one worker in a fixed order: results do not depend on the
 * thread count. */
#ifndef VAD_ATTENTION_FUSED_H
#define VAD_ATTENTION_FUSED_H

#include <stddef.h>

#include "threadpool.h"

/* 1 when the fused kernel of this precision (enum vad_precision) can run on this CPU. */
int vad_attention_fused_available(int precision);

/* 1 (the default): fp32 attention uses the fused kernel where AVX-512F exists; 0: the per-head
 * BLAS path (ops.h vad_attention), for comparisons. Returns the previous setting. */
int vad_attention_fused_set_fp32(int enable);

/* Floats of scratch vad_attention_fused needs (either precision). */
size_t vad_attention_fused_scratch(int T, int head_dim, int nthreads);

/* out [B, T, D] from the packed qkv [B, T, 3D] (q | k | v, heads contiguous inside each). */
void vad_attention_fused(vad_pool *pool, float *out, const float *qkv, float *scratch, int B, int T, int D,
                         int heads, int precision);

#endif
