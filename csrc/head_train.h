/* Training of the VisualAD head (docs/method.md §10, §12): the loss of a batch and its gradient with respect to
 * the SCA / SAF weights and to the head inputs (the ln_post'd patch features and final tokens,
 * whose gradients the backbone backward carries on to t_a, t_n and ln_post).
 *
 * Forward: vad_head_layer_forward (csrc/head.h), the same code as inference, with dropout p.
 * Losses: see vad_head_loss_and_grad.
 *
 * Memory: the per-layer S x S maps of the batch (n_layers * B * S * S floats) plus the
 * activations of ONE (layer, image) pair (about 8 N D + 3 N Hs floats): the backward pass
 * recomputes each pair's SCA/SAF activations instead of keeping them for the whole batch.
 * Nothing N x N is ever formed.
 *
 * Threading: uses the head's pool (vad_head_pool); like every head call, one caller at a time. */
#ifndef VAD_HEAD_TRAIN_H
#define VAD_HEAD_TRAIN_H

#include <stdint.h>

#include "head.h"
#include "dropout.h"
#include "threadpool.h"

/* What a training step needs besides the batch (vad_head_batch: feats are the ln_post'd patch
 * features of the used layers, ta / tn the ln_post'd final-block tokens before SCA):
 *   labels [B] (0/1), required.
 *   masks [B,S,S] ({0,1}; > 0.5 = anomalous) or NULL (all-normal masks).
 *   has_mask [B] or NULL (all 1): 1 = the image takes part in the segmentation loss; a good image
 *     without a mask is passed with has_mask = 1 and a zero mask; a defective image without a mask
 *     has has_mask = 0 and contributes only to the classification and contrastive terms.
 *   topk in 1..S*S (0: ceil(S*S / 100)); dropout p in [0, 1) (vad_dropout_stream), seed = the
 *     step's dropout seed.
 *   layer_maps [n_layers, B, S, S] or NULL: receives the forward's unfiltered per-layer maps (with
 *     dropout 0 they are vad_head_maps' layer maps, bit for bit: the same function computes both). */
typedef struct {
    const float *labels;
    const float *masks;
    const unsigned char *has_mask;
    int topk;
    float dropout;
    uint64_t seed;
    float *layer_maps;
} vad_train_params;

/* No labels (the caller sets them), no masks (all normal), the top 1 %, no dropout. */
vad_train_params vad_train_default_params(void);

/* Losses (written to losses[4] = {cls, seg, contrastive, total}):
 *   seg  = sum_l [ Focal(p_l) + Dice(p_l) ], p_l = sigmoid(m_l), computed on the images with
 *          has_mask = 1 only (Focal = mean over their pixels, Dice = 1 - mean of their dice
 *          coefficients); 0 when no image has a mask. With every has_mask = 1 this is docs/method.md §10.
 *   cls  = mean_b BCE-with-logits(top-k mean of sum_l m_l (unfiltered), label_b)
 *   contrastive = mean_b max(0, cos(t_a'_b, t_n'_b) + 0.5), tokens of the last used layer
 *   total = cls + seg + contrastive
 * Gradients of total:
 *   grad: ACCUMULATED (+=) into a buffer with the head parameter layout (vad_head_layout); only
 *         the SAF and SCA tensors are touched (nothing for anomaly/normal token or ln_post:
 *         those come from the backbone backward through dfeats/dta/dtn). Rows >= N of each
 *         pos_encoding get no gradient.
 *   dfeats[i] [B,N,D], dta, dtn [B,D]: gradients w.r.t. the inputs, WRITTEN (not accumulated).
 * Returns VAD_OK or an error code (vad_last_error has the message). */
int vad_head_loss_and_grad(vad_head *h, const vad_head_batch *in, const vad_train_params *p, double losses[4],
                           float *grad, float *const *dfeats, float *dta, float *dtn);

#endif
