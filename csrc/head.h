/* The trainable VisualAD head: per used layer a Spatial-Aware Cross-Attention (SCA) on the two
 * tokens and a Self-Alignment Function (SAF) on the patches, the cosine-contrast maps, their S x S
 * fusion, the gaussian filter and the top-k image score (docs/method.md §5-§8).
 * Weights live in one caller-owned float buffer (layout: vad_head_layout). */
#ifndef VAD_HEAD_H
#define VAD_HEAD_H

#include <stddef.h>
#include <stdint.h>

#include "vad_limits.h"
#include "vit.h"
#include "workspace.h"

typedef struct {
    int width;      /* D */
    int n_layers;   /* used layers, in the order of the feature list */
    int n_anchors;  /* m */
    int pos_rows;   /* rows of each SCA pos_encoding (max patches) */
    int saf_hidden; /* hidden width of each SAF */
    unsigned char has_sca[VAD_MAX_LAYERS], has_saf[VAD_MAX_LAYERS];
} vad_head_config;

typedef struct {
    const float *saf_w1, *saf_b1, *saf_w2, *saf_b2;
    const float *anchors, *pos, *wq, *wk, *wv, *qn_w, *qn_b, *kn_w, *kn_b;
    const float *gate_w, *gate_b, *wo, *bo, *res_scale;
} vad_head_layer;

typedef struct {
    const float *ta, *tn, *ln_w, *ln_b;
    vad_head_layer layers[VAD_MAX_LAYERS];
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

/* ------------------------------------------------------------------ the forward
 * One forward serves inference (dropout p = 0: no masks) and training (p > 0, and the
 * activations kept for the backward in csrc/head_train.c). Per used layer l and image b:
 *   SCA, applied to t_a and t_n separately (the official module is called once per token):
 *     Q = LN_q(A Wq^T); K = LN_k((P + E[:N]) Wk^T); V = P Wv^T
 *     Att = drop(softmax(Q K^T / sqrt(D)))                       (one dropout draw per token)
 *     t' = t + res_scale * drop((sum_i sigmoid(t . Wg_i + bg_i) (Att V)_i) Wo^T + bo)
 *   SAF: P^ = drop(drop(GELU(P W1^T + b1)) W2^T + b2)
 *   m_l = upsample_bilinear(cos(P^, t_a') - cos(P^, t_n'))      (g x g -> S x S) */

/* The activations of one (layer, image), i.e. what the backward reads. */
typedef struct {
    float *Qpre, *Q;      /* [m, D] A Wq^T and its LayerNorm (per layer; Qpre aliases Q for inference) */
    float *xk, *kpre, *K; /* [N, D] P + E[:N], its projection, LN_k of it (kpre aliases K for inference) */
    float *V;             /* [N, D] */
    float *att;           /* [m, N] softmax(Q K^T / sqrt(D)) */
    float *att2;          /* [2, m, N] per token, after dropout */
    float *U2;            /* [2, m, D] att2 V */
    float *T2;            /* [2, D] the input tokens (t_a, t_n) */
    float *gate2;         /* [2, m] */
    float *agg2, *proj2;  /* [2, D] gated sum, its projection (after dropout) */
    float *tok2;          /* [2, D] t_a', t_n' */
    float *h1, *g;        /* [N, Hs] SAF pre-activation, GELU (+ dropout); g aliases h1 for inference */
    float *phat;          /* [N, D] SAF output */
    float *grid;          /* [N] cosine contrast map */
} vad_head_acts;

/* The buffers of vad_head_acts for N patches, one list for sizing and carving (workspace.h);
 * keep != 0 gives the buffers the backward needs their own memory. */
void vad_head_acts_walk(vad_carver *c, const vad_head_config *cfg, int N, int keep, vad_head_acts *a);

/* Q (and Qpre) of layer L: once per layer, independent of the image. */
void vad_sca_query(vad_pool *pool, const vad_head_layer *L, int m, int D, vad_head_acts *a);

/* SCA and SAF of one image at used layer li (P [N, D], tokens ta, tn [D]) with dropout p drawn
 * from `seed` (vad_dropout_stream(seed, li, b, ...)): a->tok2 = (t_a', t_n'), a->grid = the
 * g x g contrast map; *feat = the patch features the map used (a->phat, or P without SAF). */
int vad_head_layer_forward(vad_pool *pool, const vad_head_config *cfg, const vad_head_layer *L, int li, int b,
                           const float *P, const float *ta, const float *tn, int N, float p, uint64_t seed,
                           vad_head_acts *a, const float **feat);

/* A batch of head inputs: the encoder's outputs. */
typedef struct {
    const float *const *feats; /* n_layers arrays [B, N, D] of patch features, N = g * g */
    const float *ta, *tn;      /* [B, D] final-block tokens (before SCA) */
    int B, g, S;               /* batch, patch grid side, map side */
} vad_head_batch;

/* The whole forward of a batch: fused [B, S, S] = sum over layers of the unfiltered maps.
 * Optional (NULL to skip): layer_maps [n_layers, B, S, S]; tokens_out [n_layers, 2, B, D]. */
int vad_head_forward(vad_head *h, vad_head_acts *a, const vad_head_batch *in, float p, uint64_t seed, float *fused,
                     float *layer_maps, float *tokens_out);

/* Inference settings and optional outputs. */
typedef struct {
    double sigma;      /* gaussian filter on the fused map (0: none) */
    int topk;          /* image score = mean of the topk largest values (0: ceil(S*S / 100)) */
    float *layer_maps; /* [n_layers, B, S, S] unfiltered per-layer maps, or NULL */
    float *tokens_out; /* [n_layers, 2, B, D] SCA-enhanced (t_a', t_n'), or NULL */
} vad_maps_params;

/* sigma 4, the top 1 %, no optional outputs (the published settings). */
vad_maps_params vad_maps_default_params(void);

/* The top-k count a params value stands for at side S (0: ceil(S*S / 100)). */
int vad_topk_count(int topk, int S);

/* Inference: final_maps [B, S, S] = fused + filtered maps; scores [B] = top-k mean of final_maps. */
int vad_head_maps(vad_head *h, const vad_head_batch *in, const vad_maps_params *p, float *final_maps,
                  float *scores);

#endif
