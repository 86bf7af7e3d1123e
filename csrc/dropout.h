/* Counter-based dropout for the head's training forward (SCA and SAF), and its backward.
 * With p = 0 every function here is a no-op, which is how inference runs the same forward. */
#ifndef VAD_DROPOUT_H
#define VAD_DROPOUT_H

#include <stdint.h>

#include "threadpool.h"

enum vad_dropout_site {
    VAD_DROP_SAF_HIDDEN = 0, /* SAF, after the GELU: [N, Hs] */
    VAD_DROP_SAF_OUT = 1,    /* SAF, after W2: [N, D] */
    VAD_DROP_SCA_ATT = 2,    /* SCA attention weights: [m, N], one draw per token */
    VAD_DROP_SCA_OUT = 3,    /* SCA output projection: [D], one draw per token */
};

/* Element i of the tensor identified by (seed, layer, image, site, token) is dropped iff the top
 * 24 bits of splitmix64(stream + i) / 2^24 < p, where stream = vad_dropout_stream(...). Kept
 * elements are scaled by 1/(1-p) (as torch.nn.Dropout does). The mask depends only on these
 * indices, never on the thread count or the order of computation. layer = index in the
 * used-layer list, image = index in the batch, token 0 = t_a, 1 = t_n (0 for SAF sites).
 * Callers vary `seed` per training step. */
uint64_t vad_dropout_stream(uint64_t seed, int layer, int image, int site, int token);
/* x[i] *= mask_i (0 or 1/(1-p)) for i in [0, n). */
void vad_dropout_forward(vad_pool *pool, float *x, int64_t n, float p, uint64_t stream);
/* dx[i] *= mask_i: the same mask as the forward (gradient of y = mask * x). */
void vad_dropout_backward(vad_pool *pool, float *dx, int64_t n, float p, uint64_t stream);

#endif
