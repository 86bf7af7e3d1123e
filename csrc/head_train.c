#include "head_train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "errors.h"
#include "losses.h"
#include "maps.h"
#include "mathfun.h"
#include "ops.h"
#include "resize.h"

/* ================================================================== dropout */

static inline uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t vad_dropout_stream(uint64_t seed, int layer, int image, int site, int token) {
    uint64_t key = ((uint64_t)(uint32_t)layer << 40) ^ ((uint64_t)(uint32_t)image << 8) ^
                   (uint64_t)(uint32_t)(site * 2 + token);
    return splitmix64(splitmix64(seed) ^ splitmix64(key));
}

typedef struct {
    float *x;
    uint64_t stream;
    uint32_t threshold; /* drop iff 24-bit draw < threshold */
    float scale;
} dropout_ctx;

static void dropout_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    const dropout_ctx *c = (const dropout_ctx *)vctx;
    for (int64_t i = begin; i < end; i++) {
        uint32_t r = (uint32_t)(splitmix64(c->stream + (uint64_t)i) >> 40);
        c->x[i] *= r < c->threshold ? 0.0f : c->scale;
    }
}

static void dropout_mask_apply(vad_pool *pool, float *x, int64_t n, float p, uint64_t stream) {
    if (!(p > 0.0f)) return;
    dropout_ctx c = {x, stream, (uint32_t)((double)p * 16777216.0), 1.0f / (1.0f - p)};
    vad_parallel_for(pool, n, 1 << 14, dropout_task, &c);
}

void vad_dropout_forward(vad_pool *pool, float *x, int64_t n, float p, uint64_t stream) {
    dropout_mask_apply(pool, x, n, p, stream);
}

void vad_dropout_backward(vad_pool *pool, float *dx, int64_t n, float p, uint64_t stream) {
    dropout_mask_apply(pool, dx, n, p, stream);
}

/* ================================================================== small building blocks */

/* out[c] += sum_r x[r, c] (bias gradients); parallel over blocks of columns, each summed in row
 * order (independent of the thread count). */
#define COL_BLOCK 64

typedef struct {
    float *out;
    const float *x;
    int rows, cols;
} colsum_ctx;

static void colsum_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    const colsum_ctx *c = (const colsum_ctx *)vctx;
    for (int64_t blk = begin; blk < end; blk++) {
        int c0 = (int)blk * COL_BLOCK, n = c->cols - c0 < COL_BLOCK ? c->cols - c0 : COL_BLOCK;
        double acc[COL_BLOCK] = {0};
        for (int r = 0; r < c->rows; r++) {
            const float *xr = c->x + (size_t)r * c->cols + c0;
            for (int j = 0; j < n; j++) acc[j] += xr[j];
        }
        for (int j = 0; j < n; j++) c->out[c0 + j] += (float)acc[j];
    }
}

static void colsum_add(vad_pool *pool, float *out, const float *x, int rows, int cols) {
    colsum_ctx c = {out, x, rows, cols};
    vad_parallel_for(pool, (cols + COL_BLOCK - 1) / COL_BLOCK, 1, colsum_task, &c);
}

/* Linear y[M,Nout] = x[M,K] W[Nout,K]^T + b (forward: vad_linear).
 * Backward: dx = dx_beta * dx + dy W; dW += dy^T x; db += colsum(dy). Any output may be NULL. */
static void linear_backward(vad_pool *pool, float *dx, float dx_beta, float *dW, float *db, const float *dy,
                            const float *x, const float *W, int M, int Nout, int K) {
    if (dx) vad_linear_backward_input(pool, dx, K, dy, Nout, W, M, Nout, K, dx_beta);
    if (dW) vad_gemm(pool, 1, 0, Nout, K, M, 1.0f, dy, Nout, x, K, 1.0f, dW, K);
    if (db) colsum_add(pool, db, dy, M, Nout);
}

/* Softmax over each row of scale * logits (forward: vad_softmax_rows_serial). Backward:
 * dlogits = scale * att * (datt - sum(datt * att)). */
static void softmax_backward(float *dlogits, const float *datt, const float *att, int rows, int cols, float scale) {
    for (int r = 0; r < rows; r++) {
        const float *a = att + (size_t)r * cols, *da = datt + (size_t)r * cols;
        float *dl = dlogits + (size_t)r * cols;
        double s = 0.0;
        for (int j = 0; j < cols; j++) s += (double)da[j] * a[j];
        for (int j = 0; j < cols; j++) dl[j] = scale * a[j] * (da[j] - (float)s);
    }
}

/* Bilinear g x g -> S x S upsampling, align_corners=False (forward: vad_resize_bilinear). Its
 * weights along one axis are read off the forward itself by resizing the g x g identity (as a
 * g-channel g x 1 image), so forward and backward can never disagree. Each output coordinate
 * mixes at most two inputs: (i0, w0) and (i1, w1). */
typedef struct {
    int *i0, *i1;
    float *w0, *w1;
} axis_weights;

static void upsample_weights(axis_weights *aw, float *dense /* S*g */, float *eye /* g*g */, int g, int S) {
    memset(eye, 0, (size_t)g * g * sizeof(float));
    for (int i = 0; i < g; i++) eye[(size_t)i * g + i] = 1.0f;
    vad_resize_bilinear(dense, eye, g, g, 1, S, 1);
    for (int y = 0; y < S; y++) {
        const float *row = dense + (size_t)y * g;
        int first = -1, second = -1;
        for (int j = 0; j < g; j++) {
            if (row[j] == 0.0f) continue;
            if (first < 0)
                first = j;
            else
                second = j;
        }
        if (first < 0) first = 0; /* cannot happen: rows sum to 1 */
        aw->i0[y] = first;
        aw->w0[y] = row[first];
        aw->i1[y] = second < 0 ? first : second;
        aw->w1[y] = second < 0 ? 0.0f : row[second];
    }
}

/* ds [g*g] = adjoint of the upsampling applied to dmap [S*S]; tmp holds S*g floats. */
static void upsample_backward(float *ds, const float *dmap, const axis_weights *aw, int g, int S, float *tmp) {
    memset(tmp, 0, (size_t)S * g * sizeof(float));
    for (int y = 0; y < S; y++) {
        const float *d = dmap + (size_t)y * S;
        float *t = tmp + (size_t)y * g;
        for (int x = 0; x < S; x++) {
            t[aw->i0[x]] += aw->w0[x] * d[x];
            t[aw->i1[x]] += aw->w1[x] * d[x];
        }
    }
    memset(ds, 0, (size_t)g * g * sizeof(float));
    for (int y = 0; y < S; y++) {
        const float *t = tmp + (size_t)y * g;
        float *a = ds + (size_t)aw->i0[y] * g, *b = ds + (size_t)aw->i1[y] * g;
        float wa = aw->w0[y], wb = aw->w1[y];
        for (int x = 0; x < g; x++) {
            a[x] += wa * t[x];
            b[x] += wb * t[x];
        }
    }
}

/* Cosine contrast map s_i = cos(P_i, t_a) - cos(P_i, t_n) (forward: vad_cosine_contrast, tokens
 * normalised twice as the official code does, eps 1e-8). */
static double l2norm(const float *x, int D) {
    double s = 0.0;
    for (int i = 0; i < D; i++) s += (double)x[i] * x[i];
    return sqrt(s);
}

/* dx += backward of y = x / max(|x|, eps) given dy (x's norm n). */
static void normalize_backward(double *dx, const double *dy, const double *y, double n, int D) {
    const double eps = 1e-8;
    double dot = 0.0;
    for (int i = 0; i < D; i++) dot += dy[i] * y[i];
    if (n > eps)
        for (int i = 0; i < D; i++) dx[i] = (dy[i] - y[i] * dot) / n;
    else
        for (int i = 0; i < D; i++) dx[i] = dy[i] / eps;
}

/* u = normalize(normalize(t)); keeps u1 (first result) and the two norms for the backward. */
static void token_unit(double *u, double *u1, double *n1, double *n2, const float *t, int D) {
    *n1 = l2norm(t, D);
    double d1 = fmax(*n1, 1e-8);
    double s = 0.0;
    for (int i = 0; i < D; i++) {
        u1[i] = (double)(float)(t[i] / d1);
        s += u1[i] * u1[i];
    }
    *n2 = sqrt(s);
    double d2 = fmax(*n2, 1e-8);
    for (int i = 0; i < D; i++) u[i] = u1[i] / d2;
}

/* dt += d/dt given du for u = normalize(normalize(t)); scratch holds 2*D doubles. */
static void token_unit_backward(float *dt, const double *du, const double *u, const double *u1, double n1,
                                double n2, int D, double *scratch) {
    double *du1 = scratch, *dtt = scratch + D;
    normalize_backward(du1, du, u, n2, D);
    normalize_backward(dtt, du1, u1, n1, D);
    for (int i = 0; i < D; i++) dt[i] += (float)dtt[i];
}

typedef struct {
    float *dP, *w;
    const float *P, *ds;
    const double *ua, *un;
    int D;
} cos_back_ctx;

static void cos_back_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    const cos_back_ctx *c = (const cos_back_ctx *)vctx;
    int D = c->D;
    for (int64_t r = begin; r < end; r++) {
        const float *p = c->P + (size_t)r * D;
        float *dp = c->dP + (size_t)r * D;
        double np_ = fmax(l2norm(p, D), 1e-8), da = 0.0, dn = 0.0;
        for (int i = 0; i < D; i++) {
            da += (double)p[i] * c->ua[i];
            dn += (double)p[i] * c->un[i];
        }
        double s = (da - dn) / np_, g = c->ds[r];
        /* d s / d p = (ua - un) / |p| - s p / |p|^2 */
        for (int i = 0; i < D; i++) dp[i] = (float)(g * ((c->ua[i] - c->un[i]) - s * p[i] / np_) / np_);
        c->w[r] = (float)(g / np_);
    }
}

/* ================================================================== the trainer */

typedef struct {
    vad_pool *pool;
    const vad_head_config *c;
    const vad_head_weights *w;
    vad_head_weights gw; /* named pointers into the gradient buffer */
    int B, N, g, S, D, m, Hs;
    float p;
    uint64_t seed;
    /* activations of one (layer, image) */
    float *Xk, *Kpre, *K, *V, *att, *att2, *U2, *T2, *gate2, *agg2, *proj2, *tok2;
    float *H1, *G, *Phat, *grid;
    /* per layer */
    float *Qpre, *Q, *dQ, *dQpre;
    /* backward scratch */
    float *dA, *dKpre, *dV, *dG, *datt2, *dlog, *dU2, *dT2, *dagg2, *dproj2, *dz, *dtok2, *wrow;
    float *dmap, *up_tmp, *up_dense, *eye;
    double *units; /* ua, ua1, un, un1, du, scratch: 7 D */
    axis_weights aw;
} trainer;

static int trainer_alloc(trainer *t, void **block) {
    size_t N = (size_t)t->N, D = (size_t)t->D, m = (size_t)t->m, Hs = (size_t)t->Hs, S = (size_t)t->S;
    size_t g = (size_t)t->g;
    size_t nd = 5 * N * D + 3 * N * D; /* Xk Kpre K V Phat | dA dKpre dV */
    size_t nh = 3 * N * Hs;                       /* H1 G dG */
    size_t small = m * N * 6 + m * D * 4 + 2 * m * D * 2 + 2 * D * 6 + 2 * m * 2 + 2 * D * 2 + 2 * N;
    size_t maps = S * S + S * g * 2 + g * g + 2 * S;
    size_t floats = nd + nh + small + maps;
    size_t bytes = floats * sizeof(float) + 7 * D * sizeof(double) + 2 * S * sizeof(int) + 64;
    char *mem = (char *)malloc(bytes);
    if (!mem) return vad_fail(VAD_ERR_MEMORY, "out of memory for the head training workspace");
    *block = mem;
    t->units = (double *)mem;
    t->aw.i0 = (int *)(mem + 7 * D * sizeof(double));
    t->aw.i1 = t->aw.i0 + S;
    float *q = (float *)(t->aw.i1 + S);
#define TAKE(ptr, n) (t->ptr = q, q += (n))
    TAKE(Xk, N * D);
    TAKE(Kpre, N * D);
    TAKE(K, N * D);
    TAKE(V, N * D);
    TAKE(Phat, N * D);
    TAKE(dA, N * D);
    TAKE(dKpre, N * D);
    TAKE(dV, N * D);
    TAKE(H1, N * Hs);
    TAKE(G, N * Hs);
    TAKE(dG, N * Hs);
    TAKE(att, m * N);
    TAKE(att2, 2 * m * N);
    TAKE(datt2, 2 * m * N);
    TAKE(dlog, m * N);
    TAKE(Qpre, m * D);
    TAKE(Q, m * D);
    TAKE(dQ, m * D);
    TAKE(dQpre, m * D);
    TAKE(U2, 2 * m * D);
    TAKE(dU2, 2 * m * D);
    TAKE(T2, 2 * D);
    TAKE(agg2, 2 * D);
    TAKE(proj2, 2 * D);
    TAKE(tok2, 2 * D);
    TAKE(dT2, 2 * D);
    TAKE(dagg2, 2 * D);
    TAKE(gate2, 2 * m);
    TAKE(dz, 2 * m);
    TAKE(dproj2, 2 * D);
    TAKE(dtok2, 2 * D);
    TAKE(grid, N);
    TAKE(wrow, N);
    TAKE(dmap, S * S);
    TAKE(up_tmp, S * g);
    TAKE(up_dense, S * g);
    TAKE(eye, g * g);
    TAKE(aw.w0, S);
    TAKE(aw.w1, S);
#undef TAKE
    return VAD_OK;
}

static uint64_t stream(const trainer *t, int li, int b, int site, int token) {
    return vad_dropout_stream(t->seed, li, b, site, token);
}

/* ------------------------------------------------------------------ SCA */

/* Q = LN_q(A Wq^T): once per layer */
static void sca_query_forward(trainer *t, const vad_head_layer *L) {
    int D = t->D, m = t->m;
    vad_linear(t->pool, t->Qpre, D, L->anchors, D, L->wq, NULL, m, D, D, 0.0f);
    vad_layernorm(t->pool, t->Q, D, t->Qpre, D, L->qn_w, L->qn_b, m, D, 1e-5f);
}

static int sca_query_backward(trainer *t, const vad_head_layer *L, vad_head_layer *GL) {
    int D = t->D, m = t->m;
    memset(t->dQpre, 0, (size_t)m * D * sizeof(float));
    int rc = vad_layernorm_backward(t->pool, t->dQpre, D, t->dQ, D, t->Qpre, D, L->qn_w, (float *)GL->qn_w,
                                    (float *)GL->qn_b, m, D, 1e-5f);
    if (rc) return rc;
    linear_backward(t->pool, (float *)GL->anchors, 1.0f, (float *)GL->wq, NULL, t->dQpre, L->anchors, L->wq, m, D, D);
    return VAD_OK;
}

/* tokens t_a, t_n of image b -> tok2 [2, D] (t_a', t_n'); keeps the activations in t. */
static void sca_forward(trainer *t, int li, int b, const vad_head_layer *L, const float *P, const float *ta,
                        const float *tn) {
    int N = t->N, D = t->D, m = t->m;
    vad_pool *pool = t->pool;
    vad_sca_attention(pool, L, t->Q, P, N, D, m, t->Xk, t->Kpre, t->K, t->V, t->att);
    /* the module runs once per token: each token has its own attention dropout draw */
    for (int k = 0; k < 2; k++) {
        float *a = t->att2 + (size_t)k * m * N;
        memcpy(a, t->att, (size_t)m * N * sizeof(float));
        vad_dropout_forward(pool, a, (int64_t)m * N, t->p, stream(t, li, b, VAD_DROP_SCA_ATT, k));
    }
    vad_gemm(pool, 0, 0, 2 * m, D, N, 1.0f, t->att2, N, t->V, D, 0.0f, t->U2, D);
    memcpy(t->T2, ta, (size_t)D * sizeof(float));
    memcpy(t->T2 + D, tn, (size_t)D * sizeof(float));
    vad_linear(NULL, t->gate2, m, t->T2, D, L->gate_w, L->gate_b, 2, m, D, 0.0f);
    for (int i = 0; i < 2 * m; i++) t->gate2[i] = 1.0f / (1.0f + expf(-t->gate2[i]));
    for (int k = 0; k < 2; k++) {
        float *agg = t->agg2 + (size_t)k * D;
        for (int d = 0; d < D; d++) {
            float s = 0.0f;
            for (int i = 0; i < m; i++) s += t->gate2[k * m + i] * t->U2[((size_t)k * m + i) * D + d];
            agg[d] = s;
        }
    }
    vad_linear(NULL, t->proj2, D, t->agg2, D, L->wo, L->bo, 2, D, D, 0.0f);
    float rs = L->res_scale[0];
    for (int k = 0; k < 2; k++) {
        float *pr = t->proj2 + (size_t)k * D;
        vad_dropout_forward(NULL, pr, D, t->p, stream(t, li, b, VAD_DROP_SCA_OUT, k));
        for (int d = 0; d < D; d++) t->tok2[(size_t)k * D + d] = t->T2[(size_t)k * D + d] + rs * pr[d];
    }
}

/* dtok2 [2, D] (gradients of t_a', t_n') -> dP += , dta/dtn += , weight gradients; dQ += */
static int sca_backward(trainer *t, int li, int b, const vad_head_layer *L, vad_head_layer *GL, const float *P,
                        float *dP, float *dta, float *dtn) {
    int N = t->N, D = t->D, m = t->m;
    vad_pool *pool = t->pool;
    float rs = L->res_scale[0];
    /* t' = t + rs * drop(agg Wo^T + bo) */
    double drs = 0.0;
    for (size_t i = 0; i < 2 * (size_t)D; i++) {
        drs += (double)t->dtok2[i] * t->proj2[i];
        t->dproj2[i] = rs * t->dtok2[i];
    }
    ((float *)GL->res_scale)[0] += (float)drs;
    for (int k = 0; k < 2; k++)
        vad_dropout_backward(NULL, t->dproj2 + (size_t)k * D, D, t->p, stream(t, li, b, VAD_DROP_SCA_OUT, k));
    linear_backward(NULL, t->dagg2, 0.0f, (float *)GL->wo, (float *)GL->bo, t->dproj2, t->agg2, L->wo, 2, D, D);
    /* agg = sum_i gate_i U_i, gate = sigmoid(t Wg^T + bg) */
    for (int k = 0; k < 2; k++) {
        const float *da = t->dagg2 + (size_t)k * D;
        for (int i = 0; i < m; i++) {
            const float *u = t->U2 + ((size_t)k * m + i) * D;
            float *du = t->dU2 + ((size_t)k * m + i) * D;
            float gt = t->gate2[k * m + i];
            double dg = 0.0;
            for (int d = 0; d < D; d++) {
                dg += (double)da[d] * u[d];
                du[d] = gt * da[d];
            }
            t->dz[k * m + i] = (float)(dg * gt * (1.0 - gt));
        }
    }
    memcpy(t->dT2, t->dtok2, 2 * (size_t)D * sizeof(float));
    linear_backward(NULL, t->dT2, 1.0f, (float *)GL->gate_w, (float *)GL->gate_b, t->dz, t->T2, L->gate_w, 2, m, D);
    for (int d = 0; d < D; d++) {
        dta[d] += t->dT2[d];
        dtn[d] += t->dT2[D + d];
    }
    /* U2 = att2 V */
    vad_gemm(pool, 0, 1, 2 * m, N, D, 1.0f, t->dU2, D, t->V, D, 0.0f, t->datt2, N);
    vad_gemm(pool, 1, 0, N, D, 2 * m, 1.0f, t->att2, N, t->dU2, D, 0.0f, t->dV, D);
    for (int k = 0; k < 2; k++)
        vad_dropout_backward(pool, t->datt2 + (size_t)k * m * N, (int64_t)m * N, t->p,
                             stream(t, li, b, VAD_DROP_SCA_ATT, k));
    for (size_t i = 0; i < (size_t)m * N; i++) t->datt2[i] += t->datt2[(size_t)m * N + i];
    /* att = softmax(Q K^T / sqrt(D)) */
    softmax_backward(t->dlog, t->datt2, t->att, m, N, 1.0f / sqrtf((float)D));
    vad_gemm(pool, 0, 0, m, D, N, 1.0f, t->dlog, N, t->K, D, 1.0f, t->dQ, D);
    float *dK = t->dA;
    vad_gemm(pool, 1, 0, N, D, m, 1.0f, t->dlog, N, t->Q, D, 0.0f, dK, D);
    /* K = LN_k(Xk Wk^T), Xk = P + E[:N] */
    memset(t->dKpre, 0, (size_t)N * D * sizeof(float));
    int rc = vad_layernorm_backward(pool, t->dKpre, D, dK, D, t->Kpre, D, L->kn_w, (float *)GL->kn_w,
                                    (float *)GL->kn_b, N, D, 1e-5f);
    if (rc) return rc;
    float *dXk = t->dA;
    linear_backward(pool, dXk, 0.0f, (float *)GL->wk, NULL, t->dKpre, t->Xk, L->wk, N, D, D);
    float *dpos = (float *)GL->pos;
    for (size_t r = 0; r < (size_t)N * D; r++) {
        dpos[r] += dXk[r];
        dP[r] += dXk[r];
    }
    /* V = P Wv^T */
    linear_backward(pool, dP, 1.0f, (float *)GL->wv, NULL, t->dV, P, L->wv, N, D, D);
    return VAD_OK;
}

/* ------------------------------------------------------------------ SAF */

static void saf_forward(trainer *t, int li, int b, const vad_head_layer *L, const float *P) {
    int N = t->N, D = t->D, Hs = t->Hs;
    vad_pool *pool = t->pool;
    vad_linear(pool, t->H1, Hs, P, D, L->saf_w1, L->saf_b1, N, Hs, D, 0.0f);
    memcpy(t->G, t->H1, (size_t)N * Hs * sizeof(float));
    vad_activation_inplace(pool, t->G, (int64_t)N * Hs, VAD_ACT_GELU);
    vad_dropout_forward(pool, t->G, (int64_t)N * Hs, t->p, stream(t, li, b, VAD_DROP_SAF_HIDDEN, 0));
    vad_linear(pool, t->Phat, D, t->G, Hs, L->saf_w2, L->saf_b2, N, D, Hs, 0.0f);
    vad_dropout_forward(pool, t->Phat, (int64_t)N * D, t->p, stream(t, li, b, VAD_DROP_SAF_OUT, 0));
}

/* dPhat (consumed) -> dP written, weight gradients */
static void saf_backward(trainer *t, int li, int b, const vad_head_layer *L, vad_head_layer *GL, const float *P,
                         float *dPhat, float *dP) {
    int N = t->N, D = t->D, Hs = t->Hs;
    vad_pool *pool = t->pool;
    vad_dropout_backward(pool, dPhat, (int64_t)N * D, t->p, stream(t, li, b, VAD_DROP_SAF_OUT, 0));
    linear_backward(pool, t->dG, 0.0f, (float *)GL->saf_w2, (float *)GL->saf_b2, dPhat, t->G, L->saf_w2, N, D, Hs);
    vad_dropout_backward(pool, t->dG, (int64_t)N * Hs, t->p, stream(t, li, b, VAD_DROP_SAF_HIDDEN, 0));
    vad_activation_backward(pool, t->dG, t->H1, (int64_t)N * Hs, VAD_ACT_GELU);
    linear_backward(pool, dP, 0.0f, (float *)GL->saf_w1, (float *)GL->saf_b1, t->dG, P, L->saf_w1, N, Hs, D);
}

/* ------------------------------------------------------------------ one (layer, image) */

/* Runs SCA and SAF of image b at layer li: tok2 = (t_a', t_n'), grid = the g x g contrast map,
 * *feat = the patch features the map used (P^ or P). */
static int layer_forward(trainer *t, int li, int b, const float *P, const float *ta, const float *tn,
                         const float **feat) {
    const vad_head_layer *L = &t->w->layers[li];
    int D = t->D;
    if (t->c->has_sca[li]) {
        sca_forward(t, li, b, L, P, ta, tn);
    } else {
        memcpy(t->tok2, ta, (size_t)D * sizeof(float));
        memcpy(t->tok2 + D, tn, (size_t)D * sizeof(float));
    }
    *feat = P;
    if (t->c->has_saf[li]) {
        saf_forward(t, li, b, L, P);
        *feat = t->Phat;
    }
    return vad_cosine_contrast(t->pool, t->grid, *feat, t->tok2, t->tok2 + D, t->N, D);
}

/* Given dmap (S x S gradient of this layer's map of image b) and dtok2 holding any extra token
 * gradient (contrastive term), writes dP and adds into dta/dtn and the weight gradients. */
static int layer_backward(trainer *t, int li, int b, const float *P, const float *feat, float *dP, float *dta,
                          float *dtn) {
    const vad_head_layer *L = &t->w->layers[li];
    vad_head_layer *GL = &t->gw.layers[li];
    int N = t->N, D = t->D;
    /* upsampling */
    float *ds = t->grid; /* the forward map values are no longer needed */
    upsample_backward(ds, t->dmap, &t->aw, t->g, t->S, t->up_tmp);
    /* cosine map: dP^ rows, then the token gradients through the double normalisation */
    double *ua = t->units, *ua1 = ua + D, *un = ua1 + D, *un1 = un + D, *du = un1 + D, *scr = du + D;
    double na1, na2, nn1, nn2;
    token_unit(ua, ua1, &na1, &na2, t->tok2, D);
    token_unit(un, un1, &nn1, &nn2, t->tok2 + D, D);
    float *dfeat = t->c->has_saf[li] ? t->dA : dP;
    cos_back_ctx cc = {dfeat, t->wrow, feat, ds, ua, un, D};
    vad_parallel_for(t->pool, N, 16, cos_back_task, &cc);
    /* sum_i (ds_i / |p_i|) p_i = d s / d u_a = - d s / d u_n */
    float *gu = t->dT2; /* scratch */
    vad_sgemm(0, 0, 1, D, N, 1.0f, t->wrow, N, feat, D, 0.0f, gu, D);
    for (int d = 0; d < D; d++) du[d] = gu[d];
    token_unit_backward(t->dtok2, du, ua, ua1, na1, na2, D, scr);
    for (int d = 0; d < D; d++) du[d] = -(double)gu[d];
    token_unit_backward(t->dtok2 + D, du, un, un1, nn1, nn2, D, scr);
    /* SAF */
    if (t->c->has_saf[li]) saf_backward(t, li, b, L, GL, P, t->dA, dP);
    /* SCA */
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

int vad_head_loss_and_grad(vad_head *h, const float *const *feats, const float *ta, const float *tn, int B,
                           int g, int S, const float *labels, const float *masks, const unsigned char *has_mask,
                           int topk, float dropout, uint64_t seed, double losses[4], float *grad,
                           float *const *dfeats, float *dta, float *dtn) {
    const vad_head_config *c = vad_head_get_config(h);
    int D = c->width, L = c->n_layers, N = g * g;
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

    void *block = NULL;
    size_t n_maps = (size_t)L * B * SS, n_tok = (size_t)L * 2 * B * D;
    float *maps = (float *)malloc((n_maps + (size_t)B * SS + n_tok + (size_t)SS) * sizeof(float));
    double *sums = (double *)calloc((size_t)L * B * 4 + (size_t)B, sizeof(double));
    int *topidx = (int *)malloc((size_t)B * topk * sizeof(int));
    int rc = maps && sums && topidx ? trainer_alloc(&t, &block)
                                    : vad_fail(VAD_ERR_MEMORY, "out of memory for the head training maps");
    if (rc) goto done;
    float *fused = maps + n_maps, *tokens = fused + (size_t)B * SS, *scratch = tokens + n_tok;
    double *focal = sums, *dice = focal + (size_t)L * B, *dscore = dice + (size_t)L * B * 3;
    upsample_weights(&t.aw, t.up_dense, t.eye, g, S);

    /* ---- pass 1: maps and SCA tokens of every (layer, image) */
#define TOKEN(li, k, b) (tokens + (((size_t)(li) * 2 + (k)) * B + (b)) * D)
#define MAP(li, b) (maps + ((size_t)(li) * B + (b)) * SS)
    for (int li = 0; li < L; li++) {
        if (c->has_sca[li]) sca_query_forward(&t, &t.w->layers[li]);
        for (int b = 0; b < B; b++) {
            const float *P = feats[li] + (size_t)b * N * D, *feat;
            if ((rc = layer_forward(&t, li, b, P, ta + (size_t)b * D, tn + (size_t)b * D, &feat))) goto done;
            memcpy(TOKEN(li, 0, b), t.tok2, (size_t)D * sizeof(float));
            memcpy(TOKEN(li, 1, b), t.tok2 + D, (size_t)D * sizeof(float));
            vad_resize_bilinear(MAP(li, b), t.grid, 1, g, g, S, S);
        }
    }

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
    memset(fused, 0, (size_t)B * SS * sizeof(float));
    for (int li = 0; li < L; li++)
        for (int b = 0; b < B; b++) {
            const float *m = MAP(li, b);
            float *f = fused + (size_t)b * SS;
            for (int64_t i = 0; i < SS; i++) f[i] += m[i];
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
            sca_query_forward(&t, Lw);
            memset(t.dQ, 0, (size_t)t.m * D * sizeof(float));
        }
        for (int b = 0; b < B; b++) {
            const float *P = feats[li] + (size_t)b * N * D, *feat;
            if ((rc = layer_forward(&t, li, b, P, ta + (size_t)b * D, tn + (size_t)b * D, &feat))) goto done;
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
    free(maps);
    free(sums);
    free(topidx);
    return rc;
}
