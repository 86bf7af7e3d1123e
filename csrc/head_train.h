/* Training of the VisualAD head (SPEC §3): the loss of a batch and its gradient with respect to
 * the SCA / SAF weights and to the head inputs (the ln_post'd patch features and final tokens,
 * whose gradients the backbone backward carries on to t_a, t_n and ln_post).
 *
 * Forward (dropout p, SPEC §1 items 7-10): per used layer l
 *   SCA (applied to t_a and t_n separately, as the official module is called twice):
 *     Q = LN_q(A Wq^T); K = LN_k((P + E[:N]) Wk^T); V = P Wv^T
 *     Att = drop(softmax(Q K^T / sqrt(D)))        (one dropout draw per token)
 *     t' = t + res_scale * drop((sum_i sigmoid(t Wg^T + bg)_i (Att V)_i) Wo^T + bo)
 *   SAF: P^ = drop(drop(GELU(P W1^T + b1)) W2^T + b2)
 *   m_l = upsample_bilinear(cos(P^, t_a') - cos(P^, t_n'))  (g x g -> S x S)
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
#include "threadpool.h"

enum vad_dropout_site {
    VAD_DROP_SAF_HIDDEN = 0, /* SAF, after the GELU: [N, Hs] */
    VAD_DROP_SAF_OUT = 1,    /* SAF, after W2: [N, D] */
    VAD_DROP_SCA_ATT = 2,    /* SCA attention weights: [m, N], one draw per token */
    VAD_DROP_SCA_OUT = 3,    /* SCA output projection: [D], one draw per token */
};

/* Counter-based dropout: element i of the tensor identified by (seed, layer, image, site, token)
 * is dropped iff the top 24 bits of splitmix64(stream + i) / 2^24 < p, where stream =
 * vad_dropout_stream(...). Kept elements are scaled by 1/(1-p) (as torch.nn.Dropout does). The
 * mask depends only on these indices, never on the thread count or the order of computation.
 * layer = index in the used-layer list, image = index in the batch, token 0 = t_a, 1 = t_n
 * (0 for SAF sites). Callers vary `seed` per training step. */
uint64_t vad_dropout_stream(uint64_t seed, int layer, int image, int site, int token);
/* x[i] *= mask_i (0 or 1/(1-p)) for i in [0, n). */
void vad_dropout_forward(vad_pool *pool, float *x, int64_t n, float p, uint64_t stream);
/* dx[i] *= mask_i: the same mask as the forward (gradient of y = mask * x). */
void vad_dropout_backward(vad_pool *pool, float *dx, int64_t n, float p, uint64_t stream);

/* feats[i]: [B,N,D] ln_post'd patch features of used layer i (N = g*g); ta, tn: [B,D] ln_post'd
 * final-block tokens (before SCA).
 * labels [B] (0/1). masks [B,S,S] ({0,1}; > 0.5 = anomalous) or NULL (all-normal masks).
 * has_mask [B] or NULL (all 1): 1 = the image takes part in the segmentation loss; a good
 * image without a mask is passed with has_mask = 1 and a zero mask; a defective image without
 * a mask has has_mask = 0 and contributes only to the classification and contrastive terms.
 * topk in 1..S*S (ceil(S*S*ratio)). dropout p in [0, 1) (see vad_dropout_stream), seed = the
 * step's dropout seed.
 *
 * Losses (written to losses[4] = {cls, seg, contrastive, total}):
 *   seg  = sum_l [ Focal(p_l) + Dice(p_l) ], p_l = sigmoid(m_l), computed on the images with
 *          has_mask = 1 only (Focal = mean over their pixels, Dice = 1 - mean of their dice
 *          coefficients); 0 when no image has a mask. With every has_mask = 1 this is SPEC §3.
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
int vad_head_loss_and_grad(vad_head *h, const float *const *feats, const float *ta, const float *tn, int B,
                           int g, int S, const float *labels, const float *masks, const unsigned char *has_mask,
                           int topk, float dropout, uint64_t seed, double losses[4], float *grad,
                           float *const *dfeats, float *dta, float *dtn);

#endif
