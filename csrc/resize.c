#include "resize.h"

#include <stddef.h>

/* PyTorch area_pixel_compute_source_index for align_corners=False (non-cubic): the float scale
 * in/out, the source coordinate evaluated in double (int64 index + 0.5) and rounded to float,
 * clamped below at 0. */
static void bilinear_coeffs(int in, int out, int dst, int *i0, int *i1, float *l0, float *l1) {
    float scale = (float)in / (float)out;
    float src = (float)((double)scale * ((double)dst + 0.5) - 0.5);
    if (src < 0.0f) src = 0.0f;
    int i = (int)src;
    if (i > in - 1) i = in - 1;
    *i0 = i;
    *i1 = i + ((i < in - 1) ? 1 : 0);
    *l1 = src - (float)i;
    *l0 = 1.0f - *l1;
}

static void bilinear(float *out, const float *in, int C, int Hin, int Win, int Hout, int Wout, int add) {
    for (int y = 0; y < Hout; y++) {
        int y0, y1;
        float ly0, ly1;
        bilinear_coeffs(Hin, Hout, y, &y0, &y1, &ly0, &ly1);
        for (int x = 0; x < Wout; x++) {
            int x0, x1;
            float lx0, lx1;
            bilinear_coeffs(Win, Wout, x, &x0, &x1, &lx0, &lx1);
            const float *p00 = in + ((size_t)y0 * Win + x0) * C, *p01 = in + ((size_t)y0 * Win + x1) * C;
            const float *p10 = in + ((size_t)y1 * Win + x0) * C, *p11 = in + ((size_t)y1 * Win + x1) * C;
            float *o = out + ((size_t)y * Wout + x) * C;
            for (int c = 0; c < C; c++) {
                float v = ly0 * (lx0 * p00[c] + lx1 * p01[c]) + ly1 * (lx0 * p10[c] + lx1 * p11[c]);
                o[c] = add ? o[c] + v : v;
            }
        }
    }
}

void vad_resize_bilinear(float *out, const float *in, int C, int Hin, int Win, int Hout, int Wout) {
    bilinear(out, in, C, Hin, Win, Hout, Wout, 0);
}

void vad_resize_bilinear_add(float *out, const float *in, int Hin, int Win, int Hout, int Wout) {
    bilinear(out, in, 1, Hin, Win, Hout, Wout, 1);
}

/* One output coordinate's two taps along an axis, in the form the adjoint needs: when both taps
 * fall on the same input (the clamped border) their weights are merged into the first. */
typedef struct {
    int i0, i1;
    float w0, w1;
} bilinear_tap;

static bilinear_tap axis_tap(int in, int out, int dst) {
    bilinear_tap t;
    float l0, l1;
    bilinear_coeffs(in, out, dst, &t.i0, &t.i1, &l0, &l1);
    if (t.i0 == t.i1) {
        t.w0 = l0 + l1;
        t.w1 = 0.0f;
    } else if (l1 == 0.0f) {
        t.i1 = t.i0;
        t.w0 = l0;
        t.w1 = 0.0f;
    } else {
        t.w0 = l0;
        t.w1 = l1;
    }
    return t;
}

size_t vad_resize_bilinear_backward_bytes(int Hin, int Win, int Hout, int Wout) {
    (void)Hin;
    return (size_t)Wout * sizeof(bilinear_tap) + (size_t)Hout * Win * sizeof(float);
}

void vad_resize_bilinear_backward(float *din, const float *dout, int Hin, int Win, int Hout, int Wout,
                                  void *scratch) {
    bilinear_tap *xt = (bilinear_tap *)scratch;
    float *tmp = (float *)(xt + Wout); /* [Hout, Win]: dout summed along x */
    for (int x = 0; x < Wout; x++) xt[x] = axis_tap(Win, Wout, x);
    for (size_t i = 0; i < (size_t)Hout * Win; i++) tmp[i] = 0.0f;
    for (int y = 0; y < Hout; y++) {
        const float *d = dout + (size_t)y * Wout;
        float *t = tmp + (size_t)y * Win;
        for (int x = 0; x < Wout; x++) {
            t[xt[x].i0] += xt[x].w0 * d[x];
            t[xt[x].i1] += xt[x].w1 * d[x];
        }
    }
    for (size_t i = 0; i < (size_t)Hin * Win; i++) din[i] = 0.0f;
    for (int y = 0; y < Hout; y++) {
        bilinear_tap yt = axis_tap(Hin, Hout, y);
        const float *t = tmp + (size_t)y * Win;
        float *a = din + (size_t)yt.i0 * Win, *b = din + (size_t)yt.i1 * Win;
        for (int x = 0; x < Win; x++) {
            a[x] += yt.w0 * t[x];
            b[x] += yt.w1 * t[x];
        }
    }
}
