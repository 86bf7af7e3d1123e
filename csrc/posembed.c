#include "posembed.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "vad_limits.h"
#include "resize.h"
#include "vit.h"

/* One axis of a separable resampling: out[i] = sum_k w[i*taps + k] * in[idx[i*taps + k]]. */
typedef struct {
    int taps;
    int *idx;
    float *w;
} axis_weights;

static double cubic_a(double x, double a) {
    x = fabs(x);
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
    return 0.0;
}

/* PyTorch upsample_bicubic2d (align_corners=False, no antialias; PyTorch's A is -0.75) and ONNX
 * Resize cubic half_pixel: source coordinate scale*(dst+0.5)-0.5 without clamping, 4 taps at
 * floor(src)-1..+2 clamped to the border. */
static int bicubic_weights(axis_weights *aw, int in, int out, float scale, float A) {
    aw->taps = 4;
    aw->idx = (int *)malloc((size_t)out * 4 * sizeof(int));
    aw->w = (float *)malloc((size_t)out * 4 * sizeof(float));
    if (!aw->idx || !aw->w) return VAD_ERR_MEMORY;
    for (int i = 0; i < out; i++) {
        float src = (float)((double)scale * ((double)i + 0.5) - 0.5);
        int x0 = (int)floorf(src);
        float t = src - (float)x0;
        float x1 = t + 1.0f, x2 = 1.0f - t, x3 = 2.0f - t;
        float c[4] = {((A * x1 - 5.0f * A) * x1 + 8.0f * A) * x1 - 4.0f * A,
                      ((A + 2.0f) * t - (A + 3.0f)) * t * t + 1.0f,
                      ((A + 2.0f) * x2 - (A + 3.0f)) * x2 * x2 + 1.0f,
                      ((A * x3 - 5.0f * A) * x3 + 8.0f * A) * x3 - 4.0f * A};
        for (int k = 0; k < 4; k++) {
            int j = x0 - 1 + k;
            aw->idx[i * 4 + k] = j < 0 ? 0 : (j > in - 1 ? in - 1 : j);
            aw->w[i * 4 + k] = c[k];
        }
    }
    return VAD_OK;
}

/* PyTorch antialiased bicubic (PIL's filter, a=-0.5): support 2*scale when downsampling, taps
 * inside the input only, weights normalised to sum 1. */
static int bicubic_aa_weights(axis_weights *aw, int in, int out) {
    double scale = (double)((float)in / (float)out);
    double support = scale >= 1.0 ? 2.0 * scale : 2.0;
    double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
    int taps = (int)ceil(support) * 2 + 1;
    aw->taps = taps;
    aw->idx = (int *)calloc((size_t)out * taps, sizeof(int));
    aw->w = (float *)calloc((size_t)out * taps, sizeof(float));
    if (!aw->idx || !aw->w) return VAD_ERR_MEMORY;
    for (int i = 0; i < out; i++) {
        double center = scale * (i + 0.5);
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in) xmax = in;
        int n = xmax - xmin;
        if (n > taps) n = taps;
        double total = 0.0;
        for (int j = 0; j < n; j++) total += cubic_a((j + xmin - center + 0.5) * invscale, -0.5);
        for (int j = 0; j < n; j++) {
            double wj = cubic_a((j + xmin - center + 0.5) * invscale, -0.5);
            aw->idx[i * taps + j] = xmin + j;
            aw->w[i * taps + j] = (float)(total != 0.0 ? wj / total : 0.0);
        }
    }
    return VAD_OK;
}

/* out[oy, ox, :] = sum_y wy sum_x wx in[y, x, :], applied along x first, then y. */
static int apply_separable(float *out, const float *in, int D, int G0, int g, const axis_weights *ax,
                           const axis_weights *ay) {
    float *tmp = (float *)calloc((size_t)G0 * g * D, sizeof(float));
    if (!tmp) return VAD_ERR_MEMORY;
    for (int y = 0; y < G0; y++)
        for (int ox = 0; ox < g; ox++) {
            float *dst = tmp + ((size_t)y * g + ox) * D;
            for (int k = 0; k < ax->taps; k++) {
                float w = ax->w[ox * ax->taps + k];
                if (w == 0.0f) continue;
                const float *src = in + ((size_t)y * G0 + ax->idx[ox * ax->taps + k]) * D;
                for (int c = 0; c < D; c++) dst[c] += w * src[c];
            }
        }
    memset(out, 0, (size_t)g * g * D * sizeof(float));
    for (int oy = 0; oy < g; oy++)
        for (int k = 0; k < ay->taps; k++) {
            float w = ay->w[oy * ay->taps + k];
            if (w == 0.0f) continue;
            const float *src = tmp + (size_t)ay->idx[oy * ay->taps + k] * g * D;
            float *dst = out + (size_t)oy * g * D;
            for (size_t c = 0; c < (size_t)g * D; c++) dst[c] += w * src[c];
        }
    free(tmp);
    return VAD_OK;
}

int vad_resize_positions(float *out, const float *in, int D, int G0, int g, int mode, float cubic_a) {
    /* the largest buffer formed below is the G0 x g x D intermediate; every index stays in int */
    size_t tmp_floats;
    if (D < 1 || D > VAD_MAX_WIDTH || G0 < 1 || G0 > VAD_MAX_GRID || g < 1 || g > VAD_MAX_IMAGE_SIDE ||
        !vad_mul_size((size_t)G0 * (size_t)g, (size_t)D, &tmp_floats) || tmp_floats > SIZE_MAX / sizeof(float))
        return vad_fail(VAD_ERR_VALUE, "position resize %d -> %d (width %d) is out of range", G0, g, D);
    if (g == G0) { /* every rule returns the table unchanged at the native grid */
        memcpy(out, in, (size_t)G0 * G0 * D * sizeof(float));
        return VAD_OK;
    }
    if (mode == VAD_POS_BILINEAR) {
        vad_resize_bilinear(out, in, D, G0, G0, g, g);
        return VAD_OK;
    }
    if (mode != VAD_POS_BICUBIC_SCALE && mode != VAD_POS_BICUBIC_AA && mode != VAD_POS_BICUBIC_SIZE)
        return vad_fail(VAD_ERR_VALUE, "unknown position resize mode %d", mode);
    axis_weights aw = {0, NULL, NULL};
    int rc;
    if (mode == VAD_POS_BICUBIC_SCALE) {
        /* DINOv2 without registers: scale_factor (g + 0.1) / G0, so the kernel maps with
         * 1 / scale_factor = G0 / (g + 0.1) */
        float scale = (float)((double)G0 / ((double)g + 0.1));
        rc = bicubic_weights(&aw, G0, g, scale, -0.75f);
    } else if (mode == VAD_POS_BICUBIC_SIZE) {
        rc = bicubic_weights(&aw, G0, g, (float)G0 / (float)g, cubic_a); /* size given: scale in/out */
    } else {
        rc = bicubic_aa_weights(&aw, G0, g);
    }
    if (rc == VAD_OK) rc = apply_separable(out, in, D, G0, g, &aw, &aw);
    free(aw.idx);
    free(aw.w);
    return rc ? vad_fail(rc, "out of memory resizing positions") : VAD_OK;
}
