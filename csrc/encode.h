/* VisualAD feature extraction: runs the tower with [t_a, t_n] inserted and applies the head's
 * ln_post to the requested layers' patch tokens and to the final-block tokens. */
#ifndef VAD_ENCODE_H
#define VAD_ENCODE_H

#include "vit.h"

typedef struct vad_encoder vad_encoder;

vad_encoder *vad_encoder_create(vad_vit *vit);
void vad_encoder_free(vad_encoder *e);

/* tokens: [2, D] (t_a, t_n); ln_w/ln_b: [D] (trainable ln_post). layers: 1-based, n_layers >= 1.
 * feats[i]: [B, N, D] = ln_post(x_layers[i])[:, patches]; ta, tn: [B, D] = ln_post(x_L)[:, 0|1]. */
int vad_encode(vad_encoder *e, const float *images, int B, int S, const float *tokens,
               const float *ln_w, const float *ln_b, const int *layers, int n_layers,
               float *const *feats, float *ta, float *tn);

/* Training forward: the same outputs as vad_encode, keeping every block's residual stream (memory
 * (depth + 1) * B * T * D floats) for vad_encode_backward. */
int vad_encode_train(vad_encoder *e, const float *images, int B, int S, const float *tokens,
                     const float *ln_w, const float *ln_b, const int *layers, int n_layers,
                     float *const *feats, float *ta, float *tn);

/* Backward of the last vad_encode_train: dfeats[i] [B, N, D], dta/dtn [B, D] (gradients of the
 * outputs) -> dtokens [2, D], dln_w, dln_b [D] (all accumulated +=). */
int vad_encode_backward(vad_encoder *e, const float *const *dfeats, const float *dta, const float *dtn,
                        float *dtokens, float *dln_w, float *dln_b);

#endif
