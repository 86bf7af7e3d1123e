/* The backbone's precision: which kernels its products run on, and the model's bf16 packs of its
 * weights. fp32 runs the panel kernel on the fp32 buffer as before; bf16 runs on the blocks' linear
 * weights and the patch embedding packed into bf16 panels (bf16_gemm.h) once per model and, from the
 * first bf16 backward, their transposes for the input gradients, made from the forward packs. */
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

/* W [N, K] as floats from its bf16 pack (the panel order of bf16_gemm.h); exact, so packing it
 * again (e.g. transposed) gives the bits packing the fp32 weight would. */
static void unpack_bf16(float *w, const vad_bf16 *packed, int N, int K) {
    size_t K2 = ((size_t)K + 1) / 2;
    for (int n = 0; n < N; n++) {
        const vad_bf16 *panel = packed + (size_t)(n / VAD_PANEL) * K2 * VAD_PANEL * 2 + 2 * (n % VAD_PANEL);
        for (int k = 0; k < K; k++) w[(size_t)n * K + k] = vad_from_bf16(panel[(size_t)(k / 2) * VAD_PANEL * 2 + k % 2]);
    }
}

/* Packs every block's linear weights into one buffer (*elems bf16 elements), slots[l][which]
 * pointing into it: for the forward from the fp32 panels, or (transposed: the input-gradient
 * products) from the forward packs. */
static vad_bf16 *pack_blocks(const vad_vit_model *model, int transposed, vad_bf16 *(*slots)[VAD_LIN_COUNT],
                             size_t *elems) {
    const vad_vit_config *c = &model->cfg;
    size_t total = 0, largest = 0;
    for (int which = 0; which < VAD_LIN_COUNT; which++) {
        int N, K;
        linear_shape(c, which, &N, &K);
        total += (transposed ? vad_bf16_panel_elems(K, N) : vad_bf16_panel_elems(N, K)) + 32;
        if ((size_t)N * K > largest) largest = (size_t)N * K;
    }
    *elems = total * (size_t)c->depth;
    vad_bf16 *buf = (vad_bf16 *)malloc(*elems * sizeof(vad_bf16));
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
            p += (32 - ((uintptr_t)p / sizeof(vad_bf16)) % 32) % 32; /* 64-byte boundary */
            slots[l][which] = p;
            if (transposed) {
                unpack_bf16(w, model->bf16->fwd_slots[l][which], N, K);
                vad_bf16_pack(p, w, K, N, 1, (size_t)K);
                p += vad_bf16_panel_elems(K, N);
            } else {
                vad_panel_unpack(w, linear_panels(&model->w.blocks[l], which), N, K);
                vad_bf16_pack(p, w, N, K, (size_t)K, 1);
                p += vad_bf16_panel_elems(N, K);
            }
        }
    free(w);
    return buf;
}

vad_vit_bf16_packs *vad_vit_bf16_packs_new(void) {
    vad_vit_bf16_packs *packs = (vad_vit_bf16_packs *)calloc(1, sizeof *packs);
    if (packs && pthread_mutex_init(&packs->lock, NULL)) {
        free(packs);
        return NULL;
    }
    return packs;
}

void vad_vit_bf16_packs_free(vad_vit_bf16_packs *packs) {
    if (!packs) return;
    free(packs->fwd);
    free(packs->bwd);
    free(packs->patch);
    free(packs->fwd_slots);
    free(packs->bwd_slots);
    pthread_mutex_destroy(&packs->lock);
    free(packs);
}

/* The forward and patch packs, with the lock held. */
static int make_forward_packs(const vad_vit_model *model) {
    vad_vit_bf16_packs *b = model->bf16;
    const vad_vit_config *c = &model->cfg;
    int D = c->width, Kp = 3 * c->patch * c->patch;
    size_t fwd_elems = 0, patch_elems = vad_bf16_panel_elems(D, Kp);
    b->fwd_slots = calloc((size_t)c->depth, sizeof *b->fwd_slots);
    b->patch = (vad_bf16 *)malloc(patch_elems * sizeof(vad_bf16));
    if (b->fwd_slots && b->patch) b->fwd = pack_blocks(model, 0, b->fwd_slots, &fwd_elems);
    if (!b->fwd) {
        free(b->fwd_slots);
        free(b->patch);
        b->fwd_slots = NULL;
        b->patch = NULL;
        return vad_fail(VAD_ERR_MEMORY, "out of memory packing the backbone's weights to bf16");
    }
    vad_bf16_pack(b->patch, model->w.patch_w, D, Kp, (size_t)Kp, 1);
    b->bytes += (fwd_elems + patch_elems) * sizeof(vad_bf16);
    return VAD_OK;
}

int vad_vit_bf16_packs_forward(const vad_vit_model *model) {
    pthread_mutex_lock(&model->bf16->lock);
    int rc = model->bf16->fwd ? VAD_OK : make_forward_packs(model);
    pthread_mutex_unlock(&model->bf16->lock);
    return rc;
}

/* The input-gradient transposes (from the forward packs), made once per model. */
static int bf16_packs_backward(const vad_vit_model *model) {
    vad_vit_bf16_packs *b = model->bf16;
    int rc = VAD_OK;
    pthread_mutex_lock(&b->lock);
    if (!b->bwd) {
        size_t elems = 0;
        if (!b->bwd_slots) b->bwd_slots = calloc((size_t)model->cfg.depth, sizeof *b->bwd_slots);
        if (b->bwd_slots) b->bwd = pack_blocks(model, 1, b->bwd_slots, &elems);
        if (b->bwd)
            b->bytes += elems * sizeof(vad_bf16);
        else
            rc = vad_fail(VAD_ERR_MEMORY, "out of memory packing the backbone's weights for the bf16 backward");
    }
    pthread_mutex_unlock(&b->lock);
    return rc;
}

int vad_vit_set_precision(vad_vit *m, int precision) {
    int rc = vad_precision_check(precision);
    if (rc) return rc;
    if (precision == VAD_FP32 && m->model->precision == VAD_BF16)
        return vad_fail(VAD_ERR_VALUE, "this backbone model holds its linear weights in bf16 only: fp32 needs a "
                        "model over the fp32 weights");
    if (precision == m->precision) return VAD_OK;
    vad_vit_free_precision(m);
    if (precision == VAD_BF16 && (rc = vad_vit_bf16_packs_forward(m->model))) return rc;
    m->precision = precision;
    return VAD_OK;
}

void vad_vit_free_precision(vad_vit *m) {
    free(m->bf16_in);
    m->bf16_in = NULL;
    m->bf16_in_elems = 0;
    m->bf16_bwd_ready = 0;
    m->precision = m->model->precision;
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
    vad_bf16_linear(m->pool, C, ldc, A, lda, m->model->bf16->fwd_slots[bw - m->model->w.blocks][which],
                    linear_bias(bw, which), M, N, K, beta, act, m->bf16_in);
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
    vad_bf16_linear_rounded(m->pool, C, ldc, m->bf16_in, m->model->bf16->fwd_slots[bw - m->model->w.blocks][which],
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
    if (!m->bf16_bwd_ready) {
        int rc = bf16_packs_backward(m->model);
        if (rc) return rc;
        m->bf16_bwd_ready = 1;
    }
    /* din = dout W: a linear layer of depth N on the transpose W^T [K, N] */
    vad_bf16_linear(m->pool, din, K, dout, N, m->model->bf16->bwd_slots[bw - m->model->w.blocks][which], NULL, M, K, N,
                    0.0f, -1, m->bf16_in);
    return VAD_OK;
}

void vad_vit_patch_linear(vad_vit *m, float *out, const float *cols, int M) {
    int D = m->model->cfg.width, Kp = 3 * m->model->cfg.patch * m->model->cfg.patch;
    if (m->precision == VAD_FP32) {
        vad_linear(m->pool, out, D, cols, Kp, m->model->w.patch_w, m->model->w.patch_b, M, D, Kp, 0.0f);
        return;
    }
    vad_bf16_linear(m->pool, out, D, cols, Kp, m->model->bf16->patch, m->model->w.patch_b, M, D, Kp, 0.0f, -1, m->bf16_in);
}
