#include "head_train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "dropout.h"
#include "errors.h"
#include "losses.h"
#include "maps.h"
#include "ops.h"
#include "resize.h"
#include "workspace.h"

/* ================================================================== the trainer */

typedef struct {
    vad_pool *pool;
    const vad_head_config *c;
    const vad_head_weights *w;
    vad_head_weights gw; /* named pointers into the gradient buffer */
    int B, N, g, S, D, m, Hs;
    float p;
    uint64_t seed;
    vad_head_acts a; /* the forward's activations of one (layer, image), kept for its backward */
    /* backward scratch */
    float *dQ, *dQpre;                          /* [m, D], per layer */
    float *dA, *dKpre, *dV;                     /* [N, D] */
    float *dG;                                  /* [N, Hs] */
    float *datt2, *dU2;                         /* [2, m, N], [2, m, D] */
    float *dlog;                                /* [m, N] */
    float *dT2, *dagg2, *dproj2, *dtok2, *dz;   /* [2, D] x4, [2, m] */
    float *dgrid, *dmap;                        /* [N], [S, S] */
    void *cos_scratch, *resize_scratch;
} trainer;

/* The trainer's workspace, one list for sizing and carving. */
static void trainer_walk(vad_carver *c, trainer *t) {
    size_t N = (size_t)t->N, D = (size_t)t->D, m = (size_t)t->m, Hs = (size_t)t->Hs, S = (size_t)t->S;
    vad_head_acts_walk(c, t->c, t->N, 1, &t->a);
    t->dQ = vad_take_floats(c, m * D);
    t->dQpre = vad_take_floats(c, m * D);
    t->dA = vad_take_floats(c, N * D);
    t->dKpre = vad_take_floats(c, N * D);
    t->dV = vad_take_floats(c, N * D);
    t->dG = vad_take_floats(c, N * Hs);
    t->datt2 = vad_take_floats(c, 2 * m * N);
    t->dU2 = vad_take_floats(c, 2 * m * D);
    t->dlog = vad_take_floats(c, m * N);
    t->dT2 = vad_take_floats(c, 2 * D);
    t->dagg2 = vad_take_floats(c, 2 * D);
    t->dproj2 = vad_take_floats(c, 2 * D);
    t->dtok2 = vad_take_floats(c, 2 * D);
    t->dz = vad_take_floats(c, 2 * m);
    t->dgrid = vad_take_floats(c, N);
    t->dmap = vad_take_floats(c, S * S);
    t->cos_scratch = vad_take(c, vad_cosine_contrast_backward_bytes(t->N, t->D), 1);
    t->resize_scratch = vad_take(c, vad_resize_bilinear_backward_bytes(t->g, t->g, t->S, t->S), 1);
}

static uint64_t stream(const trainer *t, int li, int b, int site, int token) {
    return vad_dropout_stream(t->seed, li, b, site, token);
}

/* ------------------------------------------------------------------ SCA backward */

/* Q = LN_q(A Wq^T): the layer's dQ (summed over the batch) -> anchor, Wq and q_norm gradients. */
static int sca_query_backward(trainer *t, const vad_head_layer *L, vad_head_layer *GL) {
    int D = t->D, m = t->m;
    memset(t->dQpre, 0, (size_t)m * D * sizeof(float));
    int rc = vad_layernorm_backward(t->pool, t->dQpre, D, t->dQ, D, t->a.Qpre, D, L->qn_w, (float *)GL->qn_w,
                                    (float *)GL->qn_b, m, D, 1e-5f);
    if (rc) return rc;
    vad_linear_backward(t->pool, (float *)GL->anchors, 1.0f, (float *)GL->wq, NULL, t->dQpre, L->anchors, L->wq, m,
                        D, D);
    return VAD_OK;
}

/* dtok2 [2, D] (gradients of t_a', t_n') -> dP += , dta/dtn += , weight gradients; dQ += */
static int sca_backward(trainer *t, int li, int b, const vad_head_layer *L, vad_head_layer *GL, const float *P,
                        float *dP, float *dta, float *dtn) {
    int N = t->N, D = t->D, m = t->m;
    vad_pool *pool = t->pool;
    const vad_head_acts *a = &t->a;
    float rs = L->res_scale[0];
    /* t' = t + rs * drop(agg Wo^T + bo) */
    double drs = 0.0;
    for (size_t i = 0; i < 2 * (size_t)D; i++) {
        drs += (double)t->dtok2[i] * a->proj2[i];
        t->dproj2[i] = rs * t->dtok2[i];
    }
    ((float *)GL->res_scale)[0] += (float)drs;
    for (int k = 0; k < 2; k++)
        vad_dropout_backward(NULL, t->dproj2 + (size_t)k * D, D, t->p, stream(t, li, b, VAD_DROP_SCA_OUT, k));
    vad_linear_backward(NULL, t->dagg2, 0.0f, (float *)GL->wo, (float *)GL->bo, t->dproj2, a->agg2, L->wo, 2, D, D);
    /* agg = sum_i gate_i U_i, gate = sigmoid(t Wg^T + bg) */
    for (int k = 0; k < 2; k++) {
        const float *da = t->dagg2 + (size_t)k * D;
        for (int i = 0; i < m; i++) {
            const float *u = a->U2 + ((size_t)k * m + i) * D;
            float *du = t->dU2 + ((size_t)k * m + i) * D;
            float gt = a->gate2[k * m + i];
            double dg = 0.0;
            for (int d = 0; d < D; d++) {
                dg += (double)da[d] * u[d];
                du[d] = gt * da[d];
            }
            t->dz[k * m + i] = (float)(dg * gt * (1.0 - gt));
        }
    }
    memcpy(t->dT2, t->dtok2, 2 * (size_t)D * sizeof(float));
    vad_linear_backward(NULL, t->dT2, 1.0f, (float *)GL->gate_w, (float *)GL->gate_b, t->dz, a->T2, L->gate_w, 2, m,
                        D);
    for (int d = 0; d < D; d++) {
        dta[d] += t->dT2[d];
        dtn[d] += t->dT2[D + d];
    }
    /* U2 = att2 V */
    vad_gemm(pool, 0, 1, 2 * m, N, D, 1.0f, t->dU2, D, a->V, D, 0.0f, t->datt2, N);
    vad_gemm(pool, 1, 0, N, D, 2 * m, 1.0f, a->att2, N, t->dU2, D, 0.0f, t->dV, D);
    for (int k = 0; k < 2; k++)
        vad_dropout_backward(pool, t->datt2 + (size_t)k * m * N, (int64_t)m * N, t->p,
                             stream(t, li, b, VAD_DROP_SCA_ATT, k));
    for (size_t i = 0; i < (size_t)m * N; i++) t->datt2[i] += t->datt2[(size_t)m * N + i];
    /* att = softmax(Q K^T / sqrt(D)) */
    vad_softmax_rows_backward(t->dlog, t->datt2, a->att, m, N, N, 1.0f / sqrtf((float)D));
    vad_gemm(pool, 0, 0, m, D, N, 1.0f, t->dlog, N, a->K, D, 1.0f, t->dQ, D);
    float *dK = t->dA;
    vad_gemm(pool, 1, 0, N, D, m, 1.0f, t->dlog, N, a->Q, D, 0.0f, dK, D);
    /* K = LN_k(Xk Wk^T), Xk = P + E[:N] */
    memset(t->dKpre, 0, (size_t)N * D * sizeof(float));
    int rc = vad_layernorm_backward(pool, t->dKpre, D, dK, D, a->kpre, D, L->kn_w, (float *)GL->kn_w,
                                    (float *)GL->kn_b, N, D, 1e-5f);
    if (rc) return rc;
    float *dXk = t->dA;
    vad_linear_backward(pool, dXk, 0.0f, (float *)GL->wk, NULL, t->dKpre, a->xk, L->wk, N, D, D);
    float *dpos = (float *)GL->pos;
    for (size_t r = 0; r < (size_t)N * D; r++) {
        dpos[r] += dXk[r];
        dP[r] += dXk[r];
    }
    /* V = P Wv^T */
    vad_linear_backward(pool, dP, 1.0f, (float *)GL->wv, NULL, t->dV, P, L->wv, N, D, D);
    return VAD_OK;
}

/* ------------------------------------------------------------------ SAF backward */

/* dPhat (consumed) -> dP written, weight gradients */
static void saf_backward(trainer *t, int li, int b, const vad_head_layer *L, vad_head_layer *GL, const float *P,
                         float *dPhat, float *dP) {
    int N = t->N, D = t->D, Hs = t->Hs;
    vad_pool *pool = t->pool;
    vad_dropout_backward(pool, dPhat, (int64_t)N * D, t->p, stream(t, li, b, VAD_DROP_SAF_OUT, 0));
    vad_linear_backward(pool, t->dG, 0.0f, (float *)GL->saf_w2, (float *)GL->saf_b2, dPhat, t->a.g, L->saf_w2, N, D,
                        Hs);
    vad_dropout_backward(pool, t->dG, (int64_t)N * Hs, t->p, stream(t, li, b, VAD_DROP_SAF_HIDDEN, 0));
    vad_activation_backward(pool, t->dG, t->a.h1, (int64_t)N * Hs, VAD_ACT_GELU);
    vad_linear_backward(pool, dP, 0.0f, (float *)GL->saf_w1, (float *)GL->saf_b1, t->dG, P, L->saf_w1, N, Hs, D);
}

/* ------------------------------------------------------------------ one (layer, image) */

/* After vad_head_layer_forward of image b at layer li (feat = the features its map used), given
 * dmap (S x S gradient of this layer's map of image b) and dtok2 holding any extra token gradient
 * (contrastive term): writes dP and adds into dta/dtn and the weight gradients. */
static int layer_backward(trainer *t, int li, int b, const float *P, const float *feat, float *dP, float *dta,
                          float *dtn) {
    const vad_head_layer *L = &t->w->layers[li];
    vad_head_layer *GL = &t->gw.layers[li];
    int D = t->D;
    vad_resize_bilinear_backward(t->dgrid, t->dmap, t->g, t->g, t->S, t->S, t->resize_scratch);
    float *dfeat = t->c->has_saf[li] ? t->dA : dP;
    vad_cosine_contrast_backward(t->pool, dfeat, t->dtok2, t->dtok2 + D, t->dgrid, feat, t->a.tok2, t->a.tok2 + D,
                                 t->N, D, t->cos_scratch);
    if (t->c->has_saf[li]) saf_backward(t, li, b, L, GL, P, t->dA, dP);
    if (t->c->has_sca[li]) return sca_backward(t, li, b, L, GL, P, dP, dta, dtn);
    for (int d = 0; d < D; d++) {
        dta[d] += t->dtok2[d];
        dtn[d] += t->dtok2[D + d];
    }
    return VAD_OK;
}

/* ------------------------------------------------------------------ losses over the batch */

typedef struct {
    const float *maps, *masks;
    const unsigned char *has_mask;
    double *focal, *dice; /* [L*B], [L*B*3] */
    int B;
    int64_t SS;
} seg_ctx;

static void seg_forward_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    const seg_ctx *c = (const seg_ctx *)vctx;
    for (int64_t item = begin; item < end; item++) {
        int b = (int)(item % c->B);
        if (c->has_mask && !c->has_mask[b]) continue;
        const float *m = c->maps + item * c->SS, *gt = c->masks ? c->masks + b * c->SS : NULL;
        c->focal[item] = vad_focal_sum_forward(m, gt, c->SS);
        vad_dice_forward(c->dice + 3 * item, m, gt, c->SS);
    }
}

typedef struct {
    float *dmap;
    const float *map, *gt;
    const double *dice_sums;
    double focal_scale, dice_scale;
} seg_back_ctx;

static void seg_backward_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    const seg_back_ctx *c = (const seg_back_ctx *)vctx;
    const float *gt = c->gt ? c->gt + begin : NULL;
    vad_focal_sum_backward(c->dmap + begin, c->map + begin, gt, end - begin, c->focal_scale);
    vad_dice_backward(c->dmap + begin, c->map + begin, gt, end - begin, c->dice_sums, c->dice_scale);
}

/* ================================================================== entry point */

vad_train_params vad_train_default_params(void) {
    vad_train_params p = {NULL, NULL, NULL, 0, 0.0f, 0, NULL};
    return p;
}

int vad_head_loss_and_grad(vad_head *h, const vad_head_batch *in, const vad_train_params *p, double losses[4],
                           float *grad, float *const *dfeats, float *dta, float *dtn) {
    const float *const *feats = in->feats, *ta = in->ta, *tn = in->tn, *labels = p->labels, *masks = p->masks;
    const unsigned char *has_mask = p->has_mask;
    int B = in->B, g = in->g, S = in->S, topk = vad_topk_count(p->topk, in->S);
    float dropout = p->dropout;
    uint64_t seed = p->seed;
    const vad_head_config *c = vad_head_get_config(h);
    int D = c->width, L = c->n_layers, N = g * g;
    if (!labels) return vad_fail(VAD_ERR_VALUE, "training needs the labels");
    if (B < 1 || g < 1 || S < 1 || (int64_t)S * S > (1 << 28))
        return vad_fail(VAD_ERR_VALUE, "batch, grid and size must be positive (and S*S < 2^28)");
    int64_t SS = (int64_t)S * S;
    if (topk < 1 || topk > SS) return vad_fail(VAD_ERR_VALUE, "top-k size %d is outside 1..%lld", topk, (long long)SS);
    if (!(dropout >= 0.0f && dropout < 1.0f))
        return vad_fail(VAD_ERR_VALUE, "dropout must be in [0, 1), got %g", (double)dropout);
    for (int i = 0; i < L; i++)
        if (c->has_sca[i] && N > c->pos_rows)
            return vad_fail(VAD_ERR_VALUE, "%d patches (grid %dx%d) exceed the %d rows of the SCA position "
                            "encoding: use a smaller image size", N, g, g, c->pos_rows);
    trainer t;
    memset(&t, 0, sizeof t);
    t.pool = vad_head_pool(h);
    t.c = c;
    t.w = vad_head_get_weights(h);
    vad_head_weights_at(c, grad, &t.gw);
    t.B = B, t.N = N, t.g = g, t.S = S, t.D = D, t.m = c->n_anchors, t.Hs = c->saf_hidden;
    t.p = dropout;
    t.seed = seed;

    /* the batch's maps, tokens and loss sums, then the per-(layer, image) workspace */
    float *maps, *fused, *tokens, *scratch;
    double *focal, *dice, *dscore;
    int *topidx;
    vad_carver carve = {NULL, 0};
    void *block = NULL;
    for (int pass = 0; pass < 2; pass++) {
        maps = vad_take_floats(&carve, (size_t)L * B * SS);
        fused = vad_take_floats(&carve, (size_t)B * SS);
        tokens = vad_take_floats(&carve, (size_t)L * 2 * B * D);
        scratch = vad_take_floats(&carve, (size_t)SS);
        focal = vad_take_doubles(&carve, (size_t)L * B);
        dice = vad_take_doubles(&carve, (size_t)L * B * 3);
        dscore = vad_take_doubles(&carve, (size_t)B);
        topidx = vad_take_ints(&carve, (size_t)B * topk);
        trainer_walk(&carve, &t);
        if (pass == 0 && !(block = vad_carve_begin(&carve)))
            return vad_fail(VAD_ERR_MEMORY, "out of memory for the head training workspace");
    }
    memset(focal, 0, (size_t)L * B * sizeof(double));
    memset(dice, 0, (size_t)L * B * 3 * sizeof(double));
    int rc;

    /* ---- pass 1: maps and SCA tokens of every (layer, image): the inference forward */
#define TOKEN(li, k, b) (tokens + (((size_t)(li) * 2 + (k)) * B + (b)) * D)
#define MAP(li, b) (maps + ((size_t)(li) * B + (b)) * SS)
    if ((rc = vad_head_forward(h, &t.a, in, dropout, seed, fused, maps, tokens))) goto done;
    if (p->layer_maps) memcpy(p->layer_maps, maps, (size_t)L * B * SS * sizeof(float));

    /* ---- losses */
    int n_seg = 0;
    for (int b = 0; b < B; b++) n_seg += has_mask ? (has_mask[b] != 0) : 1;
    seg_ctx sc = {maps, masks, has_mask, focal, dice, B, SS};
    vad_parallel_for(t.pool, (int64_t)L * B, 1, seg_forward_task, &sc);
    double seg = 0.0;
    if (n_seg > 0)
        for (int li = 0; li < L; li++) {
            double fs = 0.0, ds = 0.0;
            for (int b = 0; b < B; b++) {
                if (has_mask && !has_mask[b]) continue;
                fs += focal[(size_t)li * B + b];
                ds += vad_dice_coefficient(dice + 3 * ((size_t)li * B + b));
            }
            seg += fs / ((double)n_seg * SS) + 1.0 - ds / n_seg;
        }
    double cls = 0.0, ctr = 0.0;
    for (int b = 0; b < B; b++) {
        double score = vad_topk_mean_forward(topidx + (size_t)b * topk, fused + (size_t)b * SS, (int)SS, topk, scratch);
        cls += vad_bce_logits_forward(score, labels[b]) / B;
        dscore[b] = vad_bce_logits_backward(score, labels[b]) / B;
        ctr += vad_contrastive_forward(TOKEN(L - 1, 0, b), TOKEN(L - 1, 1, b), D, 0.5) / B;
    }
    losses[0] = cls;
    losses[1] = seg;
    losses[2] = ctr;
    losses[3] = cls + seg + ctr;

    /* ---- pass 2: recompute each (layer, image) and backpropagate */
    memset(dta, 0, (size_t)B * D * sizeof(float));
    memset(dtn, 0, (size_t)B * D * sizeof(float));
    for (int li = L - 1; li >= 0; li--) {
        const vad_head_layer *Lw = &t.w->layers[li];
        if (c->has_sca[li]) {
            vad_sca_query(t.pool, Lw, t.m, D, &t.a);
            memset(t.dQ, 0, (size_t)t.m * D * sizeof(float));
        }
        for (int b = 0; b < B; b++) {
            const float *P = feats[li] + (size_t)b * N * D, *feat;
            if ((rc = vad_head_layer_forward(t.pool, c, Lw, li, b, P, ta + (size_t)b * D, tn + (size_t)b * D, N,
                                             dropout, seed, &t.a, &feat)))
                goto done;
            /* d total / d map: segmentation (this layer) + classification (top-k of the fused map) */
            memset(t.dmap, 0, (size_t)SS * sizeof(float));
            if (n_seg > 0 && (!has_mask || has_mask[b])) {
                seg_back_ctx bc = {t.dmap, MAP(li, b), masks ? masks + (size_t)b * SS : NULL,
                                   dice + 3 * ((size_t)li * B + b), 1.0 / ((double)n_seg * SS), -1.0 / n_seg};
                vad_parallel_for(t.pool, SS, 1 << 14, seg_backward_task, &bc);
            }
            vad_topk_mean_backward(t.dmap, topidx + (size_t)b * topk, topk, dscore[b]);
            memset(t.dtok2, 0, 2 * (size_t)D * sizeof(float));
            if (li == L - 1)
                vad_contrastive_backward(t.dtok2, t.dtok2 + D, TOKEN(li, 0, b), TOKEN(li, 1, b), D, 0.5, 1.0 / B);
            rc = layer_backward(&t, li, b, P, feat, dfeats[li] + (size_t)b * N * D, dta + (size_t)b * D,
                                dtn + (size_t)b * D);
            if (rc) goto done;
        }
        if (c->has_sca[li] && (rc = sca_query_backward(&t, Lw, &t.gw.layers[li]))) goto done;
    }
#undef TOKEN
#undef MAP
done:
    free(block);
    return rc;
}
