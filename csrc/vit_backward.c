/* Input-gradient backward through the frozen ViT down to the inserted tokens (no weight
 * gradients). Activation memory is bounded by recomputation: only the residual stream between
 * blocks is kept (from vad_vit_forward with layers 0..depth); each block's internals are
 * recomputed from its input when the backward reaches it. */
#include <stdlib.h>
#include <string.h>

#include "attention_backward.h"
#include "attention_fused.h"
#include "cpu_features.h"
#include "errors.h"
#include "ops.h"
#include "vit_internal.h"
#include "workspace.h"

/* 1 when the attention backward runs its products in bf16 (bf16 mode on AVX512-BF16). */
static int bf16_attention(const vad_vit *m) {
    return m->precision == VAD_BF16 && vad_attention_fused_available(VAD_BF16);
}

/* The backward's buffers for batch B and sequence T: one list for sizing and carving. */
static void train_workspace_walk(vad_carver *cv, vad_vit *m, int B, int T) {
    const vad_vit_config *c = &m->model->cfg;
    size_t D = (size_t)c->width, BT = (size_t)B * T, Hm = (size_t)c->mlp_hidden;
    size_t fc1_out = c->activation == VAD_ACT_SWIGLU ? 2 * Hm : Hm;
    m->x1 = vad_take_floats(cv, BT * D);
    m->dx1 = vad_take_floats(cv, BT * D);
    m->dtmp = vad_take_floats(cv, BT * D);
    m->dqkv = vad_take_floats(cv, 3 * BT * D);
    m->f = vad_take_floats(cv, BT * fc1_out);
    m->dg = vad_take_floats(cv, BT * Hm);
    m->wtmp = vad_take_floats(cv, fc1_out * D > 3 * D * D ? fc1_out * D : 3 * D * D); /* the largest block weight */
    /* either attention backward: the precision may change between calls with the same B, T */
    size_t n_scr = vad_attention_backward_scratch(T, vad_pool_size(m->pool));
    size_t n_bf16 = vad_attention_fused_available(VAD_BF16)
                        ? vad_attention_backward_bf16_scratch(T, c->width / c->heads, vad_pool_size(m->pool))
                        : 0;
    m->scratch2 = vad_take_floats(cv, n_bf16 > n_scr ? n_bf16 : n_scr);
}

static int ensure_train_workspace(vad_vit *m, int B, int T) {
    if (m->tws && m->tws_B == B && m->tws_T == T) return VAD_OK;
    free(m->tws);
    m->tws_B = 0;
    vad_carver carve = {NULL, 0};
    train_workspace_walk(&carve, m, B, T);
    size_t bytes = carve.bytes;
    if (!(m->tws = (float *)vad_carve_begin(&carve)))
        return vad_fail(VAD_ERR_MEMORY, "out of memory: the backward workspace needs %.1f MB", (double)bytes / 1e6);
    train_workspace_walk(&carve, m, B, T);
    m->tws_B = B;
    m->tws_T = T;
    return VAD_OK;
}

/* dy [B*T, D] holds dL/d(block output) on entry and dL/d(block input) on exit. */
static int block_backward(vad_vit *m, const vad_block_weights *bw, const float *x_in, float *dy, int B, int T) {
    const vad_vit_config *c = &m->model->cfg;
    int D = c->width, BT = B * T, Hm = c->mlp_hidden;
    int swiglu = c->activation == VAD_ACT_SWIGLU;
    vad_pool *pool = m->pool;
    int rc;
    /* recompute: x1 = x + attention part, qkv, and the MLP pre-activation f */
    memcpy(m->x1, x_in, (size_t)BT * D * sizeof(float));
    vad_vit_attention_sublayer(m, bw, m->x1, B, T);
    vad_vit_mlp_in(m, bw, m->x1, m->f, B, T, -1);
    /* MLP branch */
    const float *dm = dy;
    if (bw->ls2) {
        for (size_t i = 0; i < (size_t)BT * D; i++) m->dtmp[i] = dy[i] * bw->ls2[i % D];
        dm = m->dtmp;
    }
    if ((rc = vad_vit_block_linear_input_grad(m, bw, VAD_LIN_FC2, m->dg, dm, BT))) return rc;
    float *df = m->dg;
    if (swiglu) {
        df = m->mlp; /* forward MLP buffer is free here and holds [BT, 2Hm] */
        vad_swiglu_backward(pool, df, m->dg, m->f, BT, Hm);
    } else {
        vad_activation_backward(pool, m->dg, m->f, (int64_t)BT * Hm, c->activation);
    }
    if ((rc = vad_vit_block_linear_input_grad(m, bw, VAD_LIN_FC1, m->dtmp, df, BT))) return rc;
    memcpy(m->dx1, dy, (size_t)BT * D * sizeof(float));
    if ((rc = vad_layernorm_backward(pool, m->dx1, D, m->dtmp, D, m->x1, D, bw->ln2_w, NULL, NULL, BT, D, c->ln_eps)))
        return rc;
    /* attention branch */
    const float *da = m->dx1;
    if (bw->ls1) {
        for (size_t i = 0; i < (size_t)BT * D; i++) m->dtmp[i] = m->dx1[i] * bw->ls1[i % D];
        da = m->dtmp;
    }
    if ((rc = vad_vit_block_linear_input_grad(m, bw, VAD_LIN_PROJ, m->h, da, BT))) return rc;
    if (bf16_attention(m))
        vad_attention_backward_bf16(pool, m->dqkv, m->h, m->qkv, m->scratch2, B, T, D, c->heads);
    else
        vad_attention_backward(pool, m->dqkv, m->h, m->qkv, m->scratch2, B, T, D, c->heads);
    if ((rc = vad_vit_block_linear_input_grad(m, bw, VAD_LIN_QKV, m->dtmp, m->dqkv, BT))) return rc;
    memcpy(dy, m->dx1, (size_t)BT * D * sizeof(float));
    return vad_layernorm_backward(pool, dy, D, m->dtmp, D, x_in, D, bw->ln1_w, NULL, NULL, BT, D, c->ln_eps);
}

int vad_vit_backward_inserted(vad_vit *m, const float *states, int B, int S, const float *inserted,
                              int n_inserted, float *dstate, const float *const *inject, float *dinserted) {
    const vad_vit_config *c = &m->model->cfg;
    const vad_vit_weights *w = &m->model->w;
    if (n_inserted < 1 || !inserted) return vad_fail(VAD_ERR_VALUE, "the backward needs inserted tokens");
    if (S <= 0 || S % c->patch) return vad_fail(VAD_ERR_VALUE, "image side %d is not divisible by %d", S, c->patch);
    int D = c->width, T = vad_vit_seq_len(m, S, n_inserted);
    size_t state = (size_t)B * T * D;
    int rc = vad_vit_ensure_workspace(m, B, S, T);
    if (rc || (rc = ensure_train_workspace(m, B, T))) return rc;
    for (int l = c->depth; l >= 1; l--) {
        if ((rc = block_backward(m, &w->blocks[l - 1], states + (size_t)(l - 1) * state, dstate, B, T))) return rc;
        if (inject && inject[l - 1])
            for (size_t i = 0; i < state; i++) dstate[i] += inject[l - 1][i];
    }
    /* x_0 = ln_pre(e) (CLIP) or e (DINOv2); e_i = inserted_i + class position, the same for every
     * image, so the batch sum of dx_0 can go through one LayerNorm backward per token. */
    float *sum = m->dtmp, *e = m->dtmp + D;
    for (int i = 0; i < n_inserted; i++) {
        memset(sum, 0, (size_t)D * sizeof(float));
        for (int b = 0; b < B; b++)
            for (int k = 0; k < D; k++) sum[k] += dstate[((size_t)b * T + i) * D + k];
        float *dst = dinserted + (size_t)i * D;
        if (c->ln_pre) {
            for (int k = 0; k < D; k++) e[k] = inserted[(size_t)i * D + k] + w->pos[k];
            if ((rc = vad_layernorm_backward(NULL, dst, D, sum, D, e, D, w->ln_pre_w, NULL, NULL, 1, D, c->ln_eps)))
                return rc;
        } else {
            for (int k = 0; k < D; k++) dst[k] += sum[k];
        }
    }
    return VAD_OK;
}
