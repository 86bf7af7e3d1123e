/* AdamW with per-segment learning rates, and gradient-norm clipping (docs/method.md §11).
 *
 * Parameters, gradients and the two moment buffers share one layout (e.g. the head layout of
 * head.h); a segment table gives each tensor (or group of tensors) its own lr and weight decay.
 * The update follows torch.optim.AdamW (single-tensor path), element by element:
 *   p -= lr * wd * p
 *   m  = beta1 m + (1 - beta1) g ;  v = beta2 v + (1 - beta2) g^2
 *   p -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 * Elementwise, so results do not depend on the thread count. */
#ifndef VAD_ADAMW_H
#define VAD_ADAMW_H

#include <stddef.h>

#include "threadpool.h"

typedef struct {
    size_t offset, size; /* floats [offset, offset + size) of the buffers */
    double lr, weight_decay;
} vad_adamw_segment;

typedef struct {
    double beta1, beta2, eps;
} vad_adamw_params;

vad_adamw_params vad_adamw_default_params(void); /* (0.9, 0.999), eps 1e-8 */

/* One step (t = step >= 1, counted from 1 like torch's state["step"]) on every segment.
 * Segments must lie inside the buffers (the caller checks); elements outside every segment are
 * left untouched. */
void vad_adamw_step(vad_pool *pool, float *params, const float *grads, float *m, float *v,
                    const vad_adamw_segment *segs, int n_segs, const vad_adamw_params *hp, int step);

/* torch.nn.utils.clip_grad_norm_ on one tensor: norm = ||g||_2, g *= min(1, max_norm / (norm + 1e-6)).
 * Returns the norm before clipping (NaN/Inf if g holds any, and g is then left as is). */
double vad_clip_grad_norm(float *g, size_t n, double max_norm);

/* CosineAnnealingLR closed form: eta_min + (base - eta_min) (1 + cos(pi epoch / t_max)) / 2. */
double vad_cosine_annealing_lr(double base_lr, double eta_min, int epoch, int t_max);

#endif
