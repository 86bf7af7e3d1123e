/* The trainable VisualAD head: per used layer a Spatial Cross-Attention (SCA) on the two tokens
 * and a Spatial Adaptive Feature transform (SAF) on the patches, the cosine-contrast maps,
 * their S x S fusion, the gaussian filter and the top-k image score (SPEC §1 items 7-12).
 * Weights live in one caller-owned float buffer (layout: vad_head_layout). */
#ifndef VAD_HEAD_H
#define VAD_HEAD_H

#include <stddef.h>

#include "vit.h"

#define VAD_HEAD_MAX_LAYERS 64

typedef struct {
    int width;      /* D */
    int n_layers;   /* used layers, in the order of the feature list */
    int n_anchors;  /* m */
    int pos_rows;   /* rows of each SCA pos_encoding (max patches) */
    int saf_hidden; /* hidden width of each SAF */
    unsigned char has_sca[VAD_HEAD_MAX_LAYERS], has_saf[VAD_HEAD_MAX_LAYERS];
} vad_head_config;

typedef struct {
    const float *saf_w1, *saf_b1, *saf_w2, *saf_b2;
    const float *anchors, *pos, *wq, *wk, *wv, *qn_w, *qn_b, *kn_w, *kn_b;
    const float *gate_w, *gate_b, *wo, *bo, *res_scale;
} vad_head_layer;

typedef struct {
    const float *ta, *tn, *ln_w, *ln_b;
    vad_head_layer layers[VAD_HEAD_MAX_LAYERS];
} vad_head_weights;

int vad_head_config_check(const vad_head_config *cfg);
int vad_head_layout(const vad_head_config *cfg, vad_tensor_entry *entries, int max, size_t *total);

typedef struct vad_head vad_head;

vad_head *vad_head_create(const vad_head_config *cfg, const float *params, int nthreads);
void vad_head_free(vad_head *h);
const vad_head_weights *vad_head_get_weights(const vad_head *h);
const vad_head_config *vad_head_get_config(const vad_head *h);
vad_pool *vad_head_pool(vad_head *h);
/* Named pointers into any buffer laid out like the parameters (e.g. gradients, Adam moments). */
void vad_head_weights_at(const vad_head_config *cfg, const float *base, vad_head_weights *out);

/* SCA's attention over one image's patches P [N, D] for the layer's queries Q [m, D]:
 * xk = P + pos[:N], kpre = xk Wk^T, K = LN_k(kpre) (kpre may be K), V = P Wv^T,
 * att = softmax_N(Q K^T / sqrt(D)) [m, N]. Shared by inference and training (which keeps xk, kpre). */
void vad_sca_attention(vad_pool *pool, const vad_head_layer *L, const float *Q, const float *P, int N, int D, int m,
                       float *xk, float *kpre, float *K, float *V, float *att);

/* feats[i]: [B, N, D] patch features of layer i (N = g*g), ta/tn: [B, D] final tokens.
 * final_maps [B, S, S]: fused + filtered maps; scores [B]: top-k mean of final_maps.
 * Optional (NULL to skip): layer_maps [n_layers, B, S, S] unfiltered per-layer maps;
 * tokens_out [n_layers, 2, B, D] SCA-enhanced (t_a', t_n'). */
int vad_head_maps(vad_head *h, const float *const *feats, const float *ta, const float *tn, int B,
                  int g, int S, double sigma, int topk, float *final_maps, float *scores,
                  float *layer_maps, float *tokens_out);

#endif
