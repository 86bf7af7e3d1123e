#include "maps.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "errors.h"
#include "workspace.h"

/* ------------------------------------------------------------------ cosine contrast */

static double l2norm(const float *x, int D) {
    double s = 0.0;
    for (int i = 0; i < D; i++) s += (double)x[i] * x[i];
    return sqrt(s);
}

/* u = normalize(normalize(t)): F.normalize(eps=1e-8), then the division by the clamped norm that
 * cosine_similarity applies to its second argument. */
static void token_unit(float *u, const float *t, int D) {
    const double eps = 1e-8;
    double n1 = fmax(l2norm(t, D), eps);
    for (int i = 0; i < D; i++) u[i] = (float)(t[i] / n1);
    double n2 = fmax(l2norm(u, D), eps);
    for (int i = 0; i < D; i++) u[i] = (float)(u[i] / n2);
}

typedef struct {
    float *s;
    const float *P, *ua, *un;
    int D;
} cos_ctx;

static void cos_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    cos_ctx *c = (cos_ctx *)vctx;
    for (int64_t r = begin; r < end; r++) {
        const float *p = c->P + (size_t)r * c->D;
        double np_ = fmax(l2norm(p, c->D), 1e-8), da = 0.0, dn = 0.0;
        for (int i = 0; i < c->D; i++) {
            da += (double)p[i] * c->ua[i];
            dn += (double)p[i] * c->un[i];
        }
        c->s[r] = (float)((da - dn) / np_);
    }
}

int vad_cosine_contrast(vad_pool *pool, float *s, const float *P, const float *ta, const float *tn,
                        int N, int D) {
    float *u = (float *)malloc(2 * (size_t)D * sizeof(float));
    if (!u) return vad_fail(VAD_ERR_MEMORY, "out of memory in the cosine map");
    token_unit(u, ta, D);
    token_unit(u + D, tn, D);
    cos_ctx c = {s, P, u, u + D, D};
    vad_parallel_for(pool, N, 32, cos_task, &c);
    free(u);
    return VAD_OK;
}

/* The backward keeps the token units in double, with the first normalisation rounded to float as
 * the forward stores it; u = normalize(normalize(t)) and the two norms. */
typedef struct {
    double *u, *u1, n1, n2;
} token_units;

static void token_units_forward(token_units *tu, const float *t, int D) {
    tu->n1 = l2norm(t, D);
    double d1 = fmax(tu->n1, 1e-8), s = 0.0;
    for (int i = 0; i < D; i++) {
        tu->u1[i] = (double)(float)(t[i] / d1);
        s += tu->u1[i] * tu->u1[i];
    }
    tu->n2 = sqrt(s);
    double d2 = fmax(tu->n2, 1e-8);
    for (int i = 0; i < D; i++) tu->u[i] = tu->u1[i] / d2;
}

/* dx = backward of y = x / max(|x|, eps) given dy (x's norm n). */
static void normalize_backward(double *dx, const double *dy, const double *y, double n, int D) {
    const double eps = 1e-8;
    double dot = 0.0;
    for (int i = 0; i < D; i++) dot += dy[i] * y[i];
    if (n > eps)
        for (int i = 0; i < D; i++) dx[i] = (dy[i] - y[i] * dot) / n;
    else
        for (int i = 0; i < D; i++) dx[i] = dy[i] / eps;
}

/* dt += d/dt of u = normalize(normalize(t)) given du = sign * g; scratch holds 3 D doubles. */
static void token_units_backward(float *dt, const float *g, double sign, const token_units *tu, int D,
                                 double *scratch) {
    double *du = scratch, *du1 = scratch + D, *dtt = scratch + 2 * D;
    for (int i = 0; i < D; i++) du[i] = sign * (double)g[i];
    normalize_backward(du1, du, tu->u, tu->n2, D);
    normalize_backward(dtt, du1, tu->u1, tu->n1, D);
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

/* The scratch of the backward, one list walked to size it and to carve it. */
typedef struct {
    token_units a, n;
    double *tmp; /* 3 D */
    float *w;    /* [N]: ds_i / |p_i| */
    float *gu;   /* [D]: sum_i w_i p_i */
} cos_back_ws;

static void cos_back_walk(vad_carver *c, int N, int D, cos_back_ws *ws) {
    ws->a.u = vad_take_doubles(c, (size_t)D);
    ws->a.u1 = vad_take_doubles(c, (size_t)D);
    ws->n.u = vad_take_doubles(c, (size_t)D);
    ws->n.u1 = vad_take_doubles(c, (size_t)D);
    ws->tmp = vad_take_doubles(c, 3 * (size_t)D);
    ws->w = vad_take_floats(c, (size_t)N);
    ws->gu = vad_take_floats(c, (size_t)D);
}

size_t vad_cosine_contrast_backward_bytes(int N, int D) {
    vad_carver count = {NULL, 0};
    cos_back_ws ws;
    cos_back_walk(&count, N, D, &ws);
    return count.bytes;
}

void vad_cosine_contrast_backward(vad_pool *pool, float *dP, float *dta, float *dtn, const float *ds,
                                  const float *P, const float *ta, const float *tn, int N, int D, void *scratch) {
    vad_carver carve = {(char *)scratch, 0};
    cos_back_ws ws;
    cos_back_walk(&carve, N, D, &ws);
    token_units_forward(&ws.a, ta, D);
    token_units_forward(&ws.n, tn, D);
    cos_back_ctx cc = {dP, ws.w, P, ds, ws.a.u, ws.n.u, D};
    vad_parallel_for(pool, N, 16, cos_back_task, &cc);
    /* sum_i (ds_i / |p_i|) p_i = d s / d u_a = - d s / d u_n */
    vad_sgemm(0, 0, 1, D, N, 1.0f, ws.w, N, P, D, 0.0f, ws.gu, D);
    token_units_backward(dta, ws.gu, 1.0, &ws.a, D, ws.tmp);
    token_units_backward(dtn, ws.gu, -1.0, &ws.n, D, ws.tmp);
}

/* ------------------------------------------------------------------ gaussian filter */

static int reflect_index(int i, int n) {
    if (n == 1) return 0;
    int period = 2 * n;
    i %= period;
    if (i < 0) i += period;
    return i < n ? i : period - 1 - i;
}

typedef struct {
    float *x;
    const double *w;
    double *scratch; /* per worker: max(H, W) + 2 * radius doubles */
    size_t scratch_len;
    int radius, H, W, axis;
} gauss_ctx;

/* one 1-D pass: axis 0 runs down columns (task items = column index per map), axis 1 along rows */
static void gauss_task(void *vctx, int64_t begin, int64_t end, int tid) {
    gauss_ctx *c = (gauss_ctx *)vctx;
    int len = c->axis == 0 ? c->H : c->W;
    int lines = c->axis == 0 ? c->W : c->H;
    int r = c->radius;
    double *line = c->scratch + (size_t)tid * c->scratch_len;
    for (int64_t item = begin; item < end; item++) {
        int b = (int)(item / lines), j = (int)(item % lines);
        float *base = c->x + (size_t)b * c->H * c->W;
        size_t stride = c->axis == 0 ? (size_t)c->W : 1;
        float *start = c->axis == 0 ? base + j : base + (size_t)j * c->W;
        for (int i = -r; i < len + r; i++) line[i + r] = start[(size_t)reflect_index(i, len) * stride];
        for (int i = 0; i < len; i++) {
            const double *src = line + i + r;
            double acc = c->w[r] * src[0];
            for (int k = 1; k <= r; k++) acc += c->w[r + k] * (src[k] + src[-k]);
            start[(size_t)i * stride] = (float)acc;
        }
    }
}

int vad_gaussian_filter(vad_pool *pool, float *x, int B, int H, int W, double sigma) {
    if (!(sigma > 0.0)) return VAD_OK;
    int radius = (int)(4.0 * sigma + 0.5);
    size_t line_len = (size_t)(H > W ? H : W) + 2 * (size_t)radius;
    double *w = (double *)malloc((2 * (size_t)radius + 1) * sizeof(double));
    double *scratch = (double *)malloc((size_t)vad_pool_size(pool) * line_len * sizeof(double));
    if (!w || !scratch) {
        free(w);
        free(scratch);
        return vad_fail(VAD_ERR_MEMORY, "out of memory in the gaussian filter");
    }
    double sum = 0.0;
    for (int i = -radius; i <= radius; i++) {
        w[i + radius] = exp(-0.5 / (sigma * sigma) * (double)i * i);
        sum += w[i + radius];
    }
    for (int i = 0; i <= 2 * radius; i++) w[i] /= sum;
    gauss_ctx c = {x, w, scratch, line_len, radius, H, W, 0};
    vad_parallel_for(pool, (int64_t)B * W, 8, gauss_task, &c);
    c.axis = 1;
    vad_parallel_for(pool, (int64_t)B * H, 8, gauss_task, &c);
    free(w);
    free(scratch);
    return VAD_OK;
}

/* ------------------------------------------------------------------ top-k mean */

float vad_kth_largest(float *a, int n, int k) {
    int lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                float t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            return a[want]; /* between j and i every value equals the pivot */
    }
    return a[want];
}

typedef struct {
    float *scores;
    const float *maps;
    int n, k;
    float *scratch;
} topk_ctx;

static void topk_task(void *vctx, int64_t begin, int64_t end, int tid) {
    topk_ctx *c = (topk_ctx *)vctx;
    float *buf = c->scratch + (size_t)tid * c->n;
    for (int64_t b = begin; b < end; b++) {
        memcpy(buf, c->maps + (size_t)b * c->n, (size_t)c->n * sizeof(float));
        vad_kth_largest(buf, c->n, c->k);
        double s = 0.0;
        for (int i = 0; i < c->k; i++) s += buf[i];
        c->scores[b] = (float)(s / c->k);
    }
}

int vad_topk_mean(vad_pool *pool, float *scores, const float *maps, int B, int n, int k) {
    if (k < 1 || k > n) return vad_fail(VAD_ERR_VALUE, "top-k size %d is outside 1..%d", k, n);
    float *scratch = (float *)malloc((size_t)vad_pool_size(pool) * n * sizeof(float));
    if (!scratch) return vad_fail(VAD_ERR_MEMORY, "out of memory in the top-k score");
    topk_ctx c = {scores, maps, n, k, scratch};
    vad_parallel_for(pool, B, 1, topk_task, &c);
    free(scratch);
    return VAD_OK;
}
