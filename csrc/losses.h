/* The VisualAD training losses (docs/method.md §10), each forward beside its backward.
 *
 * Maps are per-pixel logits m (the unfiltered S x S layer maps); p = sigmoid(m). Ground truth
 * gt is a {0,1} float mask of the same size (a value > 0.5 counts as anomalous), or NULL for an
 * all-normal mask. Forwards return sums in double so callers can average over any set of
 * images; backwards ACCUMULATE (+=) scale * d(sum)/d(logit) into dlogits. */
#ifndef VAD_LOSSES_H
#define VAD_LOSSES_H

#include <stdint.h>

/* Focal loss on the two-class probabilities [1-p, p] (gamma 2, alpha 1, smooth 1e-5): one-hot
 * target clamped to [1e-5, 1-1e-5], pt = sum_c onehot_c prob_c + 1e-5. Returns
 * sum over the n pixels of -(1-pt)^2 log(pt) (the loss is this sum / number of pixels). */
double vad_focal_sum_forward(const float *logits, const float *gt, int64_t n);
void vad_focal_sum_backward(float *dlogits, const float *logits, const float *gt, int64_t n, double scale);

/* Dice pieces of one image: sums[0] = sum p g, sums[1] = sum p, sums[2] = sum g. The image's dice
 * coefficient is (2 sums[0] + 1) / (sums[1] + sums[2] + 1); the loss is 1 - mean_b dice_b. */
void vad_dice_forward(double sums[3], const float *logits, const float *gt, int64_t n);
double vad_dice_coefficient(const double sums[3]);
/* dlogits += scale * d dice_b / d logit */
void vad_dice_backward(float *dlogits, const float *logits, const float *gt, int64_t n, const double sums[3],
                       double scale);

/* Mean of the k largest values of map[0..n). idx [k] receives the chosen positions (the k-th value's
 * ties are taken in index order); scratch holds n floats. Returns the mean (double). */
double vad_topk_mean_forward(int *idx, const float *map, int n, int k, float *scratch);
/* dmap[idx[j]] += dscore / k */
void vad_topk_mean_backward(float *dmap, const int *idx, int k, double dscore);

/* Binary cross-entropy with logits for one example: max(x,0) - x y + log(1 + exp(-|x|)). */
double vad_bce_logits_forward(double x, double y);
/* d loss / d x = sigmoid(x) - y */
double vad_bce_logits_backward(double x, double y);

/* Contrastive margin of one pair: max(0, cos(a, b) + margin), a and b normalised first
 * (F.normalize, eps 1e-8) as the official training code does. */
double vad_contrastive_forward(const float *a, const float *b, int D, double margin);
/* da += scale * dloss/da, db += scale * dloss/db */
void vad_contrastive_backward(float *da, float *db, const float *a, const float *b, int D, double margin,
                              double scale);

#endif
