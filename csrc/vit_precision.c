/* The backbone's precision: which kernels its products run on, and the bf16 copies of its
 * weights. fp32 runs the panel kernel on the fp32 buffer as before; bf16 packs the blocks' linear
 * weights and the patch embedding once into bf16 panels (bf16_gemm.h) and, on the first backward,
 * their transposes for the input gradients. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_gemm.h"
#include "blas.h"
#include "cpu_features.h"
#include "errors.h"
#include "ops.h"
#include "panel_gemm.h"
#include "vit_internal.h"

/* out / in widths of one block linear layer */
static void linear_shape(const vad_vit_config *c, int which, int *N, int *K) {
    int D = c->width, Hm = c->mlp_hidden, fc1_out = c->activation == VAD_ACT_SWIGLU ? 2 * Hm : Hm;
    static const int n_of[4] = {3, 1, 0, 1};
    *N = which == VAD_LIN_FC1 ? fc1_out : n_of[which] * D;
    *K = which == VAD_LIN_FC2 ? Hm : D;
}

static const float *linear_panels(const vad_block_weights *bw, int which) {
    const float *p[4] = {bw->qkv_w, bw->proj_w, bw->fc1_w, bw->fc2_w};
    return p[which];
}

static const float *linear_bias(const vad_block_weights *bw, int which) {
    const float *p[4] = {bw->qkv_b, bw->proj_b, bw->fc1_b, bw->fc2_b};
    return p[which];
}

/* Packs every block's linear weights (transposed: the input-gradient products) into one buffer. */
static vad_bf16 *pack_blocks(vad_vit *m, int transposed, vad_bf16 *(*slots)[VAD_LIN_COUNT]) {
    const vad_vit_config *c = &m->model->cfg;
    size_t total = 0, largest = 0;
    for (int which = 0; which < VAD_LIN_COUNT; which++) {
        int N, K;
        linear_shape(c, which, &N, &K);
        total += (transposed ? vad_bf16_panel_elems(K, N) : vad_bf16_panel_elems(N, K)) + 32;
        if ((size_t)N * K > largest) largest = (size_t)N * K;
    }
    vad_bf16 *buf = (vad_bf16 *)malloc(total * (size_t)c->depth * sizeof(vad_bf16));
    float *w = (float *)malloc(largest * sizeof(float));
    if (!buf || !w) {
        free(buf);
        free(w);
        return NULL;
    }
    vad_bf16 *p = buf;
    for (int l = 0; l < c->depth; l++)
        for (int which = 0; which < VAD_LIN_COUNT; which++) {
            int N, K;
            linear_shape(c, which, &N, &K);
            vad_panel_unpack(w, linear_panels(&m->model->w.blocks[l], which), N, K);
            p += (32 - ((uintptr_t)p / sizeof(vad_bf16)) % 32) % 32; /* 64-byte boundary */
            slots[l][which] = p;
            if (transposed) {
                vad_bf16_pack(p, w, K, N, 1, (size_t)K);
                p += vad_bf16_panel_elems(K, N);
            } else {
                vad_bf16_pack(p, w, N, K, (size_t)K, 1);
                p += vad_bf16_panel_elems(N, K);
            }
        }
    free(w);
    return buf;
}

int vad_vit_set_precision(vad_vit *m, int precision) {
    int rc = vad_precision_check(precision);
    if (rc) return rc;
    if (precision == m->precision) return VAD_OK;
    vad_vit_free_precision(m);
    m->precision = precision;
    if (precision == VAD_FP32) return VAD_OK;
    const vad_vit_config *c = &m->model->cfg;
    int D = c->width, Kp = 3 * c->patch * c->patch;
    m->bf16_fwd_slots = calloc((size_t)c->depth, sizeof *m->bf16_fwd_slots);
    m->bf16_bwd_slots = calloc((size_t)c->depth, sizeof *m->bf16_bwd_slots);
    m->bf16_patch = (vad_bf16 *)malloc(vad_bf16_panel_elems(D, Kp) * sizeof(vad_bf16));
    if (m->bf16_fwd_slots && m->bf16_bwd_slots && m->bf16_patch)
        m->bf16_fwd = pack_blocks(m, 0, m->bf16_fwd_slots);
    if (!m->bf16_fwd) {
        vad_vit_free_precision(m);
        return vad_fail(VAD_ERR_MEMORY, "out of memory packing the backbone's weights to bf16");
    }
    vad_bf16_pack(m->bf16_patch, m->model->w.patch_w, D, Kp, (size_t)Kp, 1);
    return VAD_OK;
}

void vad_vit_free_precision(vad_vit *m) {
    free(m->bf16_fwd);
    free(m->bf16_bwd);
    free(m->bf16_fwd_slots);
    free(m->bf16_bwd_slots);
    free(m->bf16_patch);
    free(m->bf16_in);
    m->bf16_fwd = m->bf16_bwd = m->bf16_patch = m->bf16_in = NULL;
    m->bf16_fwd_slots = m->bf16_bwd_slots = NULL;
    m->bf16_in_elems = 0;
    m->precision = VAD_FP32;
}

int vad_vit_ensure_bf16_inputs(vad_vit *m, int rows) {
    if (m->precision != VAD_BF16) return VAD_OK;
    const vad_vit_config *c = &m->model->cfg;
    int N1, K1, depth = 3 * c->width; /* the widest product input: qkv's gradient, fc1's, fc2's, patches */
    linear_shape(c, VAD_LIN_FC1, &N1, &K1);
    if (N1 > depth) depth = N1;
    if (c->mlp_hidden > depth) depth = c->mlp_hidden;
    if (3 * c->patch * c->patch > depth) depth = 3 * c->patch * c->patch;
    size_t need = vad_bf16_input_elems(rows, depth);
    if (need <= m->bf16_in_elems) return VAD_OK;
    free(m->bf16_in);
    m->bf16_in = (vad_bf16 *)malloc(need * sizeof(vad_bf16));
    m->bf16_in_elems = m->bf16_in ? need : 0;
    if (!m->bf16_in) return vad_fail(VAD_ERR_MEMORY, "out of memory: bf16 inputs need %.1f MB", (double)need * 2 / 1e6);
    return VAD_OK;
}

void vad_vit_block_linear(vad_vit *m, const vad_block_weights *bw, int which, float *C, int ldc, const float *A,
                          int lda, int M, float beta, int act) {
    int N, K;
    linear_shape(&m->model->cfg, which, &N, &K);
    if (m->precision == VAD_FP32) {
        vad_panel_linear(m->pool, C, ldc, A, lda, linear_panels(bw, which), linear_bias(bw, which), M, N, K, beta, act);
        return;
    }
    vad_bf16_linear(m->pool, C, ldc, A, lda, m->bf16_fwd_slots[bw - m->model->w.blocks][which], linear_bias(bw, which), M, N,
                    K, beta, act, m->bf16_in);
}

void vad_vit_norm_linear(vad_vit *m, const vad_block_weights *bw, int which, float *C, int ldc, const float *x,
                         const float *ln_w, const float *ln_b, int M, float beta, int act) {
    const vad_vit_config *c = &m->model->cfg;
    int N, K;
    linear_shape(c, which, &N, &K);
    if (m->precision == VAD_FP32) {
        vad_layernorm(m->pool, m->h, K, x, K, ln_w, ln_b, M, K, c->ln_eps);
        vad_vit_block_linear(m, bw, which, C, ldc, m->h, K, M, beta, act);
        return;
    }
    vad_layernorm_bf16(m->pool, m->bf16_in, x, K, ln_w, ln_b, M, K, c->ln_eps);
    vad_bf16_linear_rounded(m->pool, C, ldc, m->bf16_in, m->bf16_fwd_slots[bw - m->model->w.blocks][which],
                            linear_bias(bw, which), M, N, K, beta, act);
}

int vad_vit_block_linear_input_grad(vad_vit *m, const vad_block_weights *bw, int which, float *din,
                                    const float *dout, int M) {
    int N, K;
    linear_shape(&m->model->cfg, which, &N, &K);
    if (m->precision == VAD_FP32) {
        vad_panel_unpack(m->wtmp, linear_panels(bw, which), N, K);
        vad_linear_backward_input(m->pool, din, K, dout, N, m->wtmp, M, N, K, 0.0f);
        return VAD_OK;
    }
    if (!m->bf16_bwd && !(m->bf16_bwd = pack_blocks(m, 1, m->bf16_bwd_slots)))
        return vad_fail(VAD_ERR_MEMORY, "out of memory packing the backbone's weights for the bf16 backward");
    /* din = dout W: a linear layer of depth N on the transpose W^T [K, N] */
    vad_bf16_linear(m->pool, din, K, dout, N, m->bf16_bwd_slots[bw - m->model->w.blocks][which], NULL, M, K, N, 0.0f, -1,
                    m->bf16_in);
    return VAD_OK;
}

void vad_vit_patch_linear(vad_vit *m, float *out, const float *cols, int M) {
    int D = m->model->cfg.width, Kp = 3 * m->model->cfg.patch * m->model->cfg.patch;
    if (m->precision == VAD_FP32) {
        vad_linear(m->pool, out, D, cols, Kp, m->model->w.patch_w, m->model->w.patch_b, M, D, Kp, 0.0f);
        return;
    }
    vad_bf16_linear(m->pool, out, D, cols, Kp, m->bf16_patch, m->model->w.patch_b, M, D, Kp, 0.0f, -1, m->bf16_in);
}
