#include "maps.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"

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
