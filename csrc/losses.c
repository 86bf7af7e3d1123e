#include "losses.h"

#include "maps.h"

#include <math.h>
#include <string.h>

#define SMOOTH 1e-5

/* p = sigmoid(x) and q = 1 - p, both without cancellation */
static inline void sigmoid_pair(double x, double *p, double *q) {
    if (x >= 0) {
        double e = exp(-x);
        *p = 1.0 / (1.0 + e);
        *q = e / (1.0 + e);
    } else {
        double e = exp(x);
        *p = e / (1.0 + e);
        *q = 1.0 / (1.0 + e);
    }
}

static inline int is_anomalous(const float *gt, int64_t i) { return gt && gt[i] > 0.5f; }

/* ------------------------------------------------------------------ focal */

/* pt for one pixel and dpt/dp */
static inline double focal_pt(double p, double q, int anomalous, double *dpt_dp) {
    double w1 = anomalous ? 1.0 - SMOOTH : SMOOTH; /* clamped one-hot weight of class 1 (= p) */
    double w0 = anomalous ? SMOOTH : 1.0 - SMOOTH; /* ... of class 0 (= 1 - p) */
    if (dpt_dp) *dpt_dp = w1 - w0;
    return w0 * q + w1 * p + SMOOTH;
}

double vad_focal_sum_forward(const float *logits, const float *gt, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double p, q;
        sigmoid_pair(logits[i], &p, &q);
        double pt = focal_pt(p, q, is_anomalous(gt, i), NULL);
        s += -(1.0 - pt) * (1.0 - pt) * log(pt);
    }
    return s;
}

void vad_focal_sum_backward(float *dlogits, const float *logits, const float *gt, int64_t n, double scale) {
    for (int64_t i = 0; i < n; i++) {
        double p, q, dpt_dp;
        sigmoid_pair(logits[i], &p, &q);
        double pt = focal_pt(p, q, is_anomalous(gt, i), &dpt_dp);
        /* d/dpt of -(1-pt)^2 log pt */
        double dl_dpt = 2.0 * (1.0 - pt) * log(pt) - (1.0 - pt) * (1.0 - pt) / pt;
        dlogits[i] += (float)(scale * dl_dpt * dpt_dp * p * q);
    }
}

/* ------------------------------------------------------------------ dice */

void vad_dice_forward(double sums[3], const float *logits, const float *gt, int64_t n) {
    double inter = 0.0, sp = 0.0, sg = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double p, q;
        sigmoid_pair(logits[i], &p, &q);
        double g = is_anomalous(gt, i) ? 1.0 : 0.0;
        inter += p * g;
        sp += p;
        sg += g;
    }
    sums[0] = inter;
    sums[1] = sp;
    sums[2] = sg;
}

double vad_dice_coefficient(const double sums[3]) { return (2.0 * sums[0] + 1.0) / (sums[1] + sums[2] + 1.0); }

void vad_dice_backward(float *dlogits, const float *logits, const float *gt, int64_t n, const double sums[3],
                       double scale) {
    double den = sums[1] + sums[2] + 1.0, num = 2.0 * sums[0] + 1.0;
    double a = 2.0 / den, c = num / (den * den); /* d dice / dp_i = a g_i - c */
    for (int64_t i = 0; i < n; i++) {
        double p, q;
        sigmoid_pair(logits[i], &p, &q);
        double dd_dp = (is_anomalous(gt, i) ? a : 0.0) - c;
        dlogits[i] += (float)(scale * dd_dp * p * q);
    }
}

/* ------------------------------------------------------------------ top-k mean */

double vad_topk_mean_forward(int *idx, const float *map, int n, int k, float *scratch) {
    memcpy(scratch, map, (size_t)n * sizeof(float));
    float thr = vad_kth_largest(scratch, n, k);
    int above = 0;
    for (int i = 0; i < n; i++) above += map[i] > thr;
    int ties = k - above, c = 0;
    double s = 0.0;
    for (int i = 0; i < n && c < k; i++) {
        if (map[i] > thr || (map[i] == thr && ties-- > 0)) {
            idx[c++] = i;
            s += map[i];
        }
    }
    return s / k;
}

void vad_topk_mean_backward(float *dmap, const int *idx, int k, double dscore) {
    float g = (float)(dscore / k);
    for (int j = 0; j < k; j++) dmap[idx[j]] += g;
}

/* ------------------------------------------------------------------ BCE with logits */

double vad_bce_logits_forward(double x, double y) { return fmax(x, 0.0) - x * y + log1p(exp(-fabs(x))); }

double vad_bce_logits_backward(double x, double y) {
    double p, q;
    sigmoid_pair(x, &p, &q);
    return p - y;
}

/* ------------------------------------------------------------------ contrastive margin */

static double norm_clamped(const float *x, int D) {
    double s = 0.0;
    for (int i = 0; i < D; i++) s += (double)x[i] * x[i];
    return fmax(sqrt(s), 1e-8);
}

static double cosine(const float *a, const float *b, int D, double *na, double *nb) {
    *na = norm_clamped(a, D);
    *nb = norm_clamped(b, D);
    double dot = 0.0;
    for (int i = 0; i < D; i++) dot += (double)a[i] * b[i];
    return dot / (*na * *nb);
}

double vad_contrastive_forward(const float *a, const float *b, int D, double margin) {
    double na, nb;
    return fmax(0.0, cosine(a, b, D, &na, &nb) + margin);
}

void vad_contrastive_backward(float *da, float *db, const float *a, const float *b, int D, double margin,
                              double scale) {
    double na, nb, c = cosine(a, b, D, &na, &nb);
    if (c + margin <= 0.0) return; /* clamped: no gradient */
    /* d cos / da = (b^ - cos a^) / |a| */
    for (int i = 0; i < D; i++) {
        double ah = a[i] / na, bh = b[i] / nb;
        da[i] += (float)(scale * (bh - c * ah) / na);
        db[i] += (float)(scale * (ah - c * bh) / nb);
    }
}
