/* Anomaly-map post-processing: the cosine contrast of patch features with the two tokens,
 * SciPy-compatible gaussian filtering, and the top-k mean image score. */
#ifndef VAD_MAPS_H
#define VAD_MAPS_H

#include <stddef.h>

#include "threadpool.h"

/* s[i] = cos(P[i], ta) - cos(P[i], tn) for P [N, D]; tokens are L2-normalised (eps 1e-8) and
 * the cosine follows torch.cosine_similarity (each side divided by max(norm, 1e-8)). */
int vad_cosine_contrast(vad_pool *pool, float *s, const float *P, const float *ta, const float *tn,
                        int N, int D);

/* Backward of vad_cosine_contrast: dP [N, D] written, dta / dtn [D] accumulated (+=), from ds [N]
 * (through both normalisations of each token). scratch: vad_cosine_contrast_backward_bytes(N, D). */
size_t vad_cosine_contrast_backward_bytes(int N, int D);
void vad_cosine_contrast_backward(vad_pool *pool, float *dP, float *dta, float *dtn, const float *ds,
                                  const float *P, const float *ta, const float *tn, int N, int D, void *scratch);

/* SciPy gaussian_filter(mode='reflect', truncate=4.0) on each [H, W] map of x [B, H, W], in
 * place: axis 0 then axis 1, double accumulation, float32 between passes (as SciPy stores its
 * float32 output between axes). Kernel radius int(4*sigma + 0.5). sigma <= 0 is a no-op. */
int vad_gaussian_filter(vad_pool *pool, float *x, int B, int H, int W, double sigma);

/* The k-th largest value of a[0..n) (quickselect; a is reordered so that a[0..k) holds the k
 * largest values). */
float vad_kth_largest(float *a, int n, int k);

/* scores[b] = mean of the k largest values of maps[b] ([B, n] each). */
int vad_topk_mean(vad_pool *pool, float *scores, const float *maps, int B, int n, int k);

#endif
