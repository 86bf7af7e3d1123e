#include "head.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "errors.h"
#include "maps.h"
#include "vad_limits.h"
#include "ops.h"
#include "resize.h"

struct vad_head {
    vad_head_config cfg;
    vad_head_weights w;
    vad_pool *pool;
    int ws_N;
    float *ws; /* K, V, tmp, phat, att, Q, U, grid, gate, vec */
    float *K, *V, *tmp, *phat, *att, *Q, *U, *grid, *vec, *up;
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
    if (c->width <= 0 || c->n_layers < 1 || c->n_layers > VAD_HEAD_MAX_LAYERS || c->n_anchors < 1 ||
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

static int ensure_ws(vad_head *h, int N) {
    if (h->ws && h->ws_N == N) return VAD_OK;
    free(h->ws);
    const vad_head_config *c = &h->cfg;
    size_t D = (size_t)c->width, m = (size_t)c->n_anchors;
    size_t wide = (size_t)(c->saf_hidden > c->width ? c->saf_hidden : c->width);
    size_t total = 2 * N * D + N * wide + N * D + m * N + 2 * m * D + N + 4 * D + m;
    h->ws = (float *)malloc(total * sizeof(float));
    if (!h->ws) {
        h->ws_N = 0;
        return vad_fail(VAD_ERR_MEMORY, "out of memory for the head workspace");
    }
    float *p = h->ws;
    h->K = p; p += N * D;
    h->V = p; p += N * D;
    h->tmp = p; p += N * wide;
    h->phat = p; p += N * D;
    h->att = p; p += m * N;
    h->Q = p; p += m * D;
    h->U = p; p += m * D;
    h->grid = p; p += N;
    h->vec = p; /* 4*D + m: gated sum, projected out, gate values */
    h->ws_N = N;
    return VAD_OK;
}

/* token' = token + res_scale * (sum_i sigmoid(token . Wg_i + bg_i) U_i) Wo^T + bo */
static void sca_token(const vad_head *h, const vad_head_layer *L, const float *U, const float *token,
                      float *out, float *work) {
    int D = h->cfg.width, m = h->cfg.n_anchors;
    float *agg = work, *proj = work + D, *gate = work + 2 * D;
    for (int i = 0; i < m; i++) {
        double s = L->gate_b[i];
        const float *wg = L->gate_w + (size_t)i * D;
        for (int k = 0; k < D; k++) s += (double)wg[k] * token[k];
        gate[i] = 1.0f / (1.0f + expf(-(float)s));
    }
    for (int k = 0; k < D; k++) {
        float s = 0.0f;
        for (int i = 0; i < m; i++) s += gate[i] * U[(size_t)i * D + k];
        agg[k] = s;
    }
    vad_linear(NULL, proj, D, agg, D, L->wo, L->bo, 1, D, D, 0.0f);
    float rs = L->res_scale[0];
    for (int k = 0; k < D; k++) out[k] = token[k] + rs * proj[k];
}

void vad_sca_attention(vad_pool *pool, const vad_head_layer *L, const float *Q, const float *P, int N, int D, int m,
                       float *xk, float *kpre, float *K, float *V, float *att) {
    for (size_t r = 0; r < (size_t)N * D; r++) xk[r] = P[r] + L->pos[r];
    vad_linear(pool, kpre, D, xk, D, L->wk, NULL, N, D, D, 0.0f);
    vad_layernorm(pool, K, D, kpre, D, L->kn_w, L->kn_b, N, D, 1e-5f);
    vad_linear(pool, V, D, P, D, L->wv, NULL, N, D, D, 0.0f);
    vad_linear(pool, att, N, Q, D, K, NULL, m, N, D, 0.0f);
    vad_softmax_rows_serial(att, m, N, N, 1.0f / sqrtf((float)D));
}

int vad_head_maps(vad_head *h, const float *const *feats, const float *ta, const float *tn, int B,
                  int g, int S, double sigma, int topk, float *final_maps, float *scores,
                  float *layer_maps, float *tokens_out) {
    const vad_head_config *c = &h->cfg;
    int D = c->width, m = c->n_anchors, Hs = c->saf_hidden, N = g * g;
    if (B < 1 || g < 1 || S < 1) return vad_fail(VAD_ERR_VALUE, "batch, grid and size must be positive");
    for (int i = 0; i < c->n_layers; i++)
        if (c->has_sca[i] && N > c->pos_rows)
            return vad_fail(VAD_ERR_VALUE, "%d patches (grid %dx%d) exceed the %d rows of the SCA position "
                            "encoding: use a smaller image size", N, g, g, c->pos_rows);
    int rc = ensure_ws(h, N);
    if (rc) return rc;
    vad_pool *pool = h->pool;
    size_t SS = (size_t)S * S;
    memset(final_maps, 0, (size_t)B * SS * sizeof(float));
    float *work = h->vec;
    for (int li = 0; li < c->n_layers; li++) {
        const vad_head_layer *L = &h->w.layers[li];
        if (c->has_sca[li]) {
            /* Q = LN_q(A Wq^T): independent of the image */
            vad_linear(pool, h->Q, D, L->anchors, D, L->wq, NULL, m, D, D, 0.0f);
            vad_layernorm(NULL, h->Q, D, h->Q, D, L->qn_w, L->qn_b, m, D, 1e-5f);
        }
        for (int b = 0; b < B; b++) {
            const float *P = feats[li] + (size_t)b * N * D;
            const float *tab = ta + (size_t)b * D, *tnb = tn + (size_t)b * D;
            float *ta2 = tokens_out ? tokens_out + (((size_t)li * 2 + 0) * B + b) * D : work + 2 * D + m;
            float *tn2 = tokens_out ? tokens_out + (((size_t)li * 2 + 1) * B + b) * D : work + 3 * D + m;
            if (c->has_sca[li]) {
                vad_sca_attention(pool, L, h->Q, P, N, D, m, h->tmp, h->K, h->K, h->V, h->att);
                /* U = Att V */
                vad_sgemm(0, 0, m, D, N, 1.0f, h->att, N, h->V, D, 0.0f, h->U, D);
                sca_token(h, L, h->U, tab, ta2, work);
                sca_token(h, L, h->U, tnb, tn2, work);
            } else {
                memcpy(ta2, tab, (size_t)D * sizeof(float));
                memcpy(tn2, tnb, (size_t)D * sizeof(float));
            }
            const float *feat = P;
            if (c->has_saf[li]) {
                vad_linear(pool, h->tmp, Hs, P, D, L->saf_w1, L->saf_b1, N, Hs, D, 0.0f);
                vad_activation_inplace(pool, h->tmp, (int64_t)N * Hs, VAD_ACT_GELU);
                vad_linear(pool, h->phat, D, h->tmp, Hs, L->saf_w2, L->saf_b2, N, D, Hs, 0.0f);
                feat = h->phat;
            }
            if ((rc = vad_cosine_contrast(pool, h->grid, feat, ta2, tn2, N, D))) return rc;
            /* upsample g x g -> S x S and accumulate */
            float *dst = layer_maps ? layer_maps + ((size_t)li * B + b) * SS : NULL;
            float *acc = final_maps + (size_t)b * SS;
            if (dst) {
                vad_resize_bilinear(dst, h->grid, 1, g, g, S, S);
                for (size_t k = 0; k < SS; k++) acc[k] += dst[k];
            } else {
                vad_resize_bilinear_add(acc, h->grid, g, g, S, S);
            }
        }
    }
    if ((rc = vad_gaussian_filter(pool, final_maps, B, S, S, sigma))) return rc;
    return vad_topk_mean(pool, scores, final_maps, B, (int)SS, topk);
}
