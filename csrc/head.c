#include "head.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "dropout.h"
#include "errors.h"
#include "maps.h"
#include "vad_limits.h"
#include "ops.h"
#include "resize.h"

struct vad_head {
    vad_head_config cfg;
    vad_head_weights w;
    vad_pool *pool;
    int ws_N;       /* patches the inference workspace is carved for (0: none yet) */
    void *ws;       /* the block behind acts */
    vad_head_acts acts;
};

/* ------------------------------------------------------------------ layout */

typedef struct {
    vad_tensor_entry *entries;
    int max, count;
    size_t total;
    const float *base;
} builder;

static const float *emit(builder *lb, const char *name, int ndim, int d0, int d1) {
    size_t size = (size_t)d0 * (ndim > 1 ? (size_t)d1 : 1);
    if (lb->entries && lb->count < lb->max) {
        vad_tensor_entry *e = &lb->entries[lb->count];
        snprintf(e->name, VAD_NAME_LEN, "%s", name);
        e->ndim = ndim;
        e->shape[0] = d0;
        e->shape[1] = ndim > 1 ? d1 : 0;
        e->shape[2] = e->shape[3] = 0;
        e->offset = lb->total;
        e->size = size;
    }
    const float *p = lb->base ? lb->base + lb->total : NULL;
    lb->count++;
    lb->total += size;
    return p;
}

static void walk(const vad_head_config *c, builder *lb, vad_head_weights *w) {
    int D = c->width, m = c->n_anchors, Hs = c->saf_hidden;
    char name[VAD_NAME_LEN];
    w->ta = emit(lb, "anomaly_token", 1, D, 0);
    w->tn = emit(lb, "normal_token", 1, D, 0);
    w->ln_w = emit(lb, "ln_post.weight", 1, D, 0);
    w->ln_b = emit(lb, "ln_post.bias", 1, D, 0);
    for (int i = 0; i < c->n_layers; i++) {
        vad_head_layer *L = &w->layers[i];
        memset(L, 0, sizeof *L);
#define T(field, suffix, nd, a, b)                              \
    snprintf(name, sizeof name, "layers.%d.%s", i, suffix);   \
    L->field = emit(lb, name, nd, a, b)
        if (c->has_saf[i]) {
            T(saf_w1, "saf.w1", 2, Hs, D);
            T(saf_b1, "saf.b1", 1, Hs, 0);
            T(saf_w2, "saf.w2", 2, D, Hs);
            T(saf_b2, "saf.b2", 1, D, 0);
        }
        if (c->has_sca[i]) {
            T(anchors, "sca.anchors", 2, m, D);
            T(pos, "sca.pos", 2, c->pos_rows, D);
            T(wq, "sca.wq", 2, D, D);
            T(wk, "sca.wk", 2, D, D);
            T(wv, "sca.wv", 2, D, D);
            T(qn_w, "sca.q_norm.weight", 1, D, 0);
            T(qn_b, "sca.q_norm.bias", 1, D, 0);
            T(kn_w, "sca.k_norm.weight", 1, D, 0);
            T(kn_b, "sca.k_norm.bias", 1, D, 0);
            T(gate_w, "sca.gate.weight", 2, m, D);
            T(gate_b, "sca.gate.bias", 1, m, 0);
            T(wo, "sca.out.weight", 2, D, D);
            T(bo, "sca.out.bias", 1, D, 0);
            T(res_scale, "sca.res_scale", 1, 1, 0);
        }
#undef T
    }
}

int vad_head_config_check(const vad_head_config *c) {
    if (c->width <= 0 || c->n_layers < 1 || c->n_layers > VAD_MAX_LAYERS || c->n_anchors < 1 ||
        c->pos_rows < 1 || c->saf_hidden < 1 || c->width > VAD_MAX_WIDTH || c->n_anchors > 4096 ||
        c->pos_rows > 1 << 20 || c->saf_hidden > 1 << 16)
        return vad_fail(VAD_ERR_VALUE, "head config out of range (width=%d layers=%d anchors=%d "
                        "pos_rows=%d saf_hidden=%d)", c->width, c->n_layers, c->n_anchors,
                        c->pos_rows, c->saf_hidden);
    return VAD_OK;
}

int vad_head_layout(const vad_head_config *cfg, vad_tensor_entry *entries, int max, size_t *total) {
    builder lb = {entries, max, 0, 0, NULL};
    vad_head_weights w;
    walk(cfg, &lb, &w);
    if (total) *total = lb.total;
    return lb.count;
}

vad_head *vad_head_create(const vad_head_config *cfg, const float *params, int nthreads) {
    if (vad_head_config_check(cfg) != VAD_OK) return NULL;
    vad_head *h = (vad_head *)calloc(1, sizeof(vad_head));
    if (!h) goto oom;
    h->cfg = *cfg;
    builder lb = {NULL, 0, 0, 0, params};
    walk(cfg, &lb, &h->w);
    h->pool = vad_pool_create(nthreads);
    if (!h->pool) goto oom;
    return h;
oom:
    vad_head_free(h);
    vad_fail(VAD_ERR_MEMORY, "out of memory creating the head");
    return NULL;
}

void vad_head_free(vad_head *h) {
    if (!h) return;
    vad_pool_free(h->pool);
    free(h->ws);
    free(h);
}

const vad_head_weights *vad_head_get_weights(const vad_head *h) { return &h->w; }
const vad_head_config *vad_head_get_config(const vad_head *h) { return &h->cfg; }
vad_pool *vad_head_pool(vad_head *h) { return h->pool; }

void vad_head_weights_at(const vad_head_config *cfg, const float *base, vad_head_weights *out) {
    builder lb = {NULL, 0, 0, 0, base};
    walk(cfg, &lb, out);
}

/* ------------------------------------------------------------------ forward */

void vad_head_acts_walk(vad_carver *c, const vad_head_config *cfg, int N, int keep, vad_head_acts *a) {
    size_t D = (size_t)cfg->width, m = (size_t)cfg->n_anchors, Hs = (size_t)cfg->saf_hidden, n = (size_t)N;
    a->Q = vad_take_floats(c, m * D);
    a->Qpre = keep ? vad_take_floats(c, m * D) : a->Q;
    a->xk = vad_take_floats(c, n * D);
    a->K = vad_take_floats(c, n * D);
    a->kpre = keep ? vad_take_floats(c, n * D) : a->K;
    a->V = vad_take_floats(c, n * D);
    a->att = vad_take_floats(c, m * n);
    a->att2 = vad_take_floats(c, 2 * m * n);
    a->U2 = vad_take_floats(c, 2 * m * D);
    a->T2 = vad_take_floats(c, 2 * D);
    a->gate2 = vad_take_floats(c, 2 * m);
    a->agg2 = vad_take_floats(c, 2 * D);
    a->proj2 = vad_take_floats(c, 2 * D);
    a->tok2 = vad_take_floats(c, 2 * D);
    a->h1 = vad_take_floats(c, n * Hs);
    a->g = keep ? vad_take_floats(c, n * Hs) : a->h1;
    a->phat = vad_take_floats(c, n * D);
    a->grid = vad_take_floats(c, n);
}

void vad_sca_query(vad_pool *pool, const vad_head_layer *L, int m, int D, vad_head_acts *a) {
    vad_linear(pool, a->Qpre, D, L->anchors, D, L->wq, NULL, m, D, D, 0.0f);
    vad_layernorm(pool, a->Q, D, a->Qpre, D, L->qn_w, L->qn_b, m, D, 1e-5f);
}

/* Token k of SCA given U_k = att_k V [m, D] (in a->U2): gate, gated sum, output projection,
 * dropout and the residual: a->tok2[k] = t + res_scale * drop(agg Wo^T + bo). */
static void sca_token(const vad_head_layer *L, int D, int m, int k, float p, uint64_t stream, vad_head_acts *a) {
    const float *t = a->T2 + (size_t)k * D, *U = a->U2 + (size_t)k * m * D;
    float *gate = a->gate2 + (size_t)k * m, *agg = a->agg2 + (size_t)k * D, *proj = a->proj2 + (size_t)k * D;
    for (int i = 0; i < m; i++) {
        double s = L->gate_b[i];
        const float *wg = L->gate_w + (size_t)i * D;
        for (int d = 0; d < D; d++) s += (double)wg[d] * t[d];
        gate[i] = 1.0f / (1.0f + expf(-(float)s));
    }
    for (int d = 0; d < D; d++) {
        float s = 0.0f;
        for (int i = 0; i < m; i++) s += gate[i] * U[(size_t)i * D + d];
        agg[d] = s;
    }
    vad_linear(NULL, proj, D, agg, D, L->wo, L->bo, 1, D, D, 0.0f);
    vad_dropout_forward(NULL, proj, D, p, stream);
    float rs = L->res_scale[0], *out = a->tok2 + (size_t)k * D;
    for (int d = 0; d < D; d++) out[d] = t[d] + rs * proj[d];
}

static void sca_forward(vad_pool *pool, const vad_head_layer *L, int li, int b, const float *P, int N, int D, int m,
                        float p, uint64_t seed, vad_head_acts *a) {
    size_t mN = (size_t)m * N, mD = (size_t)m * D;
    for (size_t r = 0; r < (size_t)N * D; r++) a->xk[r] = P[r] + L->pos[r];
    vad_linear(pool, a->kpre, D, a->xk, D, L->wk, NULL, N, D, D, 0.0f);
    vad_layernorm(pool, a->K, D, a->kpre, D, L->kn_w, L->kn_b, N, D, 1e-5f);
    vad_linear(pool, a->V, D, P, D, L->wv, NULL, N, D, D, 0.0f);
    vad_linear(pool, a->att, N, a->Q, D, a->K, NULL, m, N, D, 0.0f);
    vad_softmax_rows_serial(a->att, m, N, N, 1.0f / sqrtf((float)D));
    for (int k = 0; k < 2; k++) {
        float *ak = a->att2 + (size_t)k * mN;
        memcpy(ak, a->att, mN * sizeof(float));
        vad_dropout_forward(pool, ak, (int64_t)mN, p, vad_dropout_stream(seed, li, b, VAD_DROP_SCA_ATT, k));
        if (k == 1 && !(p > 0.0f)) /* the same attention for both tokens: the same U */
            memcpy(a->U2 + mD, a->U2, mD * sizeof(float));
        else
            vad_sgemm(0, 0, m, D, N, 1.0f, ak, N, a->V, D, 0.0f, a->U2 + (size_t)k * mD, D);
    }
    for (int k = 0; k < 2; k++) sca_token(L, D, m, k, p, vad_dropout_stream(seed, li, b, VAD_DROP_SCA_OUT, k), a);
}

static void saf_forward(vad_pool *pool, const vad_head_layer *L, int li, int b, const float *P, int N, int D, int Hs,
                        float p, uint64_t seed, vad_head_acts *a) {
    vad_linear(pool, a->h1, Hs, P, D, L->saf_w1, L->saf_b1, N, Hs, D, 0.0f);
    if (a->g != a->h1) memcpy(a->g, a->h1, (size_t)N * Hs * sizeof(float));
    vad_activation_inplace(pool, a->g, (int64_t)N * Hs, VAD_ACT_GELU);
    vad_dropout_forward(pool, a->g, (int64_t)N * Hs, p, vad_dropout_stream(seed, li, b, VAD_DROP_SAF_HIDDEN, 0));
    vad_linear(pool, a->phat, D, a->g, Hs, L->saf_w2, L->saf_b2, N, D, Hs, 0.0f);
    vad_dropout_forward(pool, a->phat, (int64_t)N * D, p, vad_dropout_stream(seed, li, b, VAD_DROP_SAF_OUT, 0));
}

int vad_head_layer_forward(vad_pool *pool, const vad_head_config *cfg, const vad_head_layer *L, int li, int b,
                           const float *P, const float *ta, const float *tn, int N, float p, uint64_t seed,
                           vad_head_acts *a, const float **feat) {
    int D = cfg->width;
    memcpy(a->T2, ta, (size_t)D * sizeof(float));
    memcpy(a->T2 + D, tn, (size_t)D * sizeof(float));
    if (cfg->has_sca[li])
        sca_forward(pool, L, li, b, P, N, D, cfg->n_anchors, p, seed, a);
    else
        memcpy(a->tok2, a->T2, 2 * (size_t)D * sizeof(float));
    *feat = P;
    if (cfg->has_saf[li]) {
        saf_forward(pool, L, li, b, P, N, D, cfg->saf_hidden, p, seed, a);
        *feat = a->phat;
    }
    return vad_cosine_contrast(pool, a->grid, *feat, a->tok2, a->tok2 + D, N, D);
}

int vad_head_forward(vad_head *h, vad_head_acts *a, const vad_head_batch *in, float p, uint64_t seed, float *fused,
                     float *layer_maps, float *tokens_out) {
    const vad_head_config *c = &h->cfg;
    int D = c->width, B = in->B, g = in->g, S = in->S, N = g * g;
    if (B < 1 || g < 1 || S < 1) return vad_fail(VAD_ERR_VALUE, "batch, grid and size must be positive");
    for (int i = 0; i < c->n_layers; i++)
        if (c->has_sca[i] && N > c->pos_rows)
            return vad_fail(VAD_ERR_VALUE, "%d patches (grid %dx%d) exceed the %d rows of the SCA position "
                            "encoding: use a smaller image size", N, g, g, c->pos_rows);
    size_t SS = (size_t)S * S;
    memset(fused, 0, (size_t)B * SS * sizeof(float));
    for (int li = 0; li < c->n_layers; li++) {
        const vad_head_layer *L = &h->w.layers[li];
        if (c->has_sca[li]) vad_sca_query(h->pool, L, c->n_anchors, D, a);
        for (int b = 0; b < B; b++) {
            const float *feat;
            int rc = vad_head_layer_forward(h->pool, c, L, li, b, in->feats[li] + (size_t)b * N * D,
                                            in->ta + (size_t)b * D, in->tn + (size_t)b * D, N, p, seed, a, &feat);
            if (rc) return rc;
            if (tokens_out)
                for (int k = 0; k < 2; k++)
                    memcpy(tokens_out + (((size_t)li * 2 + k) * B + b) * D, a->tok2 + (size_t)k * D,
                           (size_t)D * sizeof(float));
            /* upsample g x g -> S x S and accumulate */
            float *acc = fused + (size_t)b * SS;
            if (layer_maps) {
                float *dst = layer_maps + ((size_t)li * B + b) * SS;
                vad_resize_bilinear(dst, a->grid, 1, g, g, S, S);
                for (size_t k = 0; k < SS; k++) acc[k] += dst[k];
            } else {
                vad_resize_bilinear_add(acc, a->grid, g, g, S, S);
            }
        }
    }
    return VAD_OK;
}

/* The inference workspace: the forward's activations for N patches, without the training copies. */
static int ensure_ws(vad_head *h, int N) {
    if (h->ws && h->ws_N == N) return VAD_OK;
    free(h->ws);
    h->ws_N = 0;
    vad_carver carve = {NULL, 0};
    vad_head_acts_walk(&carve, &h->cfg, N, 0, &h->acts);
    if (!(h->ws = vad_carve_begin(&carve))) return vad_fail(VAD_ERR_MEMORY, "out of memory for the head workspace");
    vad_head_acts_walk(&carve, &h->cfg, N, 0, &h->acts);
    h->ws_N = N;
    return VAD_OK;
}

vad_maps_params vad_maps_default_params(void) {
    vad_maps_params p = {4.0, 0, NULL, NULL};
    return p;
}

int vad_topk_count(int topk, int S) {
    if (topk != 0) return topk;
    int64_t SS = (int64_t)S * S;
    return (int)((SS + 99) / 100);
}

int vad_head_maps(vad_head *h, const vad_head_batch *in, const vad_maps_params *p, float *final_maps,
                  float *scores) {
    if (in->B < 1 || in->g < 1 || in->S < 1) return vad_fail(VAD_ERR_VALUE, "batch, grid and size must be positive");
    int rc = ensure_ws(h, in->g * in->g);
    if (rc) return rc;
    rc = vad_head_forward(h, &h->acts, in, 0.0f, 0, final_maps, p->layer_maps, p->tokens_out);
    if (rc) return rc;
    if ((rc = vad_gaussian_filter(h->pool, final_maps, in->B, in->S, in->S, p->sigma))) return rc;
    return vad_topk_mean(h->pool, scores, final_maps, in->B, in->S * in->S, vad_topk_count(p->topk, in->S));
}
