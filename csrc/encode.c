#include "encode.h"

#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "ops.h"
#include "vad_limits.h"
#include "workspace.h"

struct vad_encoder {
    vad_vit *vit;
    size_t cap; /* floats in states */
    float *states;
    /* the last training forward: one block carved by train_walk */
    size_t train_bytes;
    void *train_block;
    float *train;        /* (depth + 1) residual streams: the input of block 1, then after each block */
    float *dfinal;       /* the gradient work state of the backward */
    float *saved_tokens; /* [2, D] the inserted tokens */
    int B, S, n_layers, layers[VAD_MAX_LAYERS];
    const float *ln_w, *ln_b;
};

/* The training forward's memory for states of per_state floats, one list for sizing and carving. */
static void train_walk(vad_carver *c, vad_encoder *e, size_t per_state, int depth, int D) {
    e->train = vad_take_floats(c, per_state * (size_t)(depth + 1));
    e->dfinal = vad_take_floats(c, per_state);
    e->saved_tokens = vad_take_floats(c, 2 * (size_t)D);
}

vad_encoder *vad_encoder_create(vad_vit *vit) {
    vad_encoder *e = (vad_encoder *)calloc(1, sizeof(vad_encoder));
    if (!e) {
        vad_fail(VAD_ERR_MEMORY, "out of memory");
        return NULL;
    }
    e->vit = vit;
    return e;
}

void vad_encoder_free(vad_encoder *e) {
    if (!e) return;
    free(e->states);
    free(e->train_block);
    free(e);
}

/* feats[i] = ln_post(states[i])[:, patches]; ta/tn = ln_post(final)[:, 0 | 1]. */
static void apply_ln_post(vad_encoder *e, const float *const *states, const float *final_state, int B, int T,
                          const float *ln_w, const float *ln_b, int n_layers, float *const *feats, float *ta,
                          float *tn) {
    const vad_vit_config *c = vad_vit_get_config(e->vit);
    int D = c->width, first_patch = 3 + c->n_registers, N = T - first_patch;
    vad_pool *pool = vad_vit_pool(e->vit);
    for (int i = 0; i < n_layers; i++)
        for (int b = 0; b < B; b++)
            vad_layernorm(pool, feats[i] + (size_t)b * N * D, D, states[i] + ((size_t)b * T + first_patch) * D, D,
                          ln_w, ln_b, N, D, c->ln_eps);
    /* t_a at row 0 and t_n at row 1 of each image: strided rows of the final state */
    vad_layernorm(pool, ta, D, final_state, T * D, ln_w, ln_b, B, D, c->ln_eps);
    vad_layernorm(pool, tn, D, final_state + D, T * D, ln_w, ln_b, B, D, c->ln_eps);
}

static int check_args(const vad_vit_config *c, int S, const int *layers, int n_layers) {
    if (n_layers < 1 || n_layers > VAD_MAX_LAYERS)
        return vad_fail(VAD_ERR_VALUE, "between 1 and %d layers are needed, got %d", VAD_MAX_LAYERS, n_layers);
    for (int i = 0; i < n_layers; i++)
        if (layers[i] < 1 || layers[i] > c->depth)
            return vad_fail(VAD_ERR_VALUE, "layer %d is outside 1..%d", layers[i], c->depth);
    if (S <= 0 || S % c->patch)
        return vad_fail(VAD_ERR_VALUE, "image side %d is not divisible by the patch size %d", S, c->patch);
    return VAD_OK;
}

int vad_encode(vad_encoder *e, const float *images, int B, int S, const float *tokens,
               const float *ln_w, const float *ln_b, const int *layers, int n_layers,
               float *const *feats, float *ta, float *tn) {
    const vad_vit_config *c = vad_vit_get_config(e->vit);
    int rc = check_args(c, S, layers, n_layers);
    if (rc) return rc;
    int D = c->width, T = vad_vit_seq_len(e->vit, S, 2);
    size_t per_state = (size_t)B * T * D, need = per_state * (size_t)(n_layers + 1);
    if (need > e->cap) {
        free(e->states);
        e->states = (float *)malloc(need * sizeof(float));
        if (!e->states) {
            e->cap = 0;
            return vad_fail(VAD_ERR_MEMORY, "out of memory for %d layer states", n_layers);
        }
        e->cap = need;
    }
    float *outs[VAD_MAX_LAYERS];
    for (int i = 0; i < n_layers; i++) outs[i] = e->states + per_state * (size_t)i;
    float *final_state = e->states + per_state * (size_t)n_layers;
    rc = vad_vit_forward(e->vit, images, B, S, tokens, 2, layers, n_layers, outs, final_state);
    if (rc) return rc;
    apply_ln_post(e, (const float *const *)outs, final_state, B, T, ln_w, ln_b, n_layers, feats, ta, tn);
    return VAD_OK;
}

int vad_encode_train(vad_encoder *e, const float *images, int B, int S, const float *tokens,
                     const float *ln_w, const float *ln_b, const int *layers, int n_layers,
                     float *const *feats, float *ta, float *tn) {
    const vad_vit_config *c = vad_vit_get_config(e->vit);
    int rc = check_args(c, S, layers, n_layers);
    if (rc) return rc;
    int D = c->width, L = c->depth, T = vad_vit_seq_len(e->vit, S, 2);
    size_t per_state = (size_t)B * T * D;
    vad_carver carve = {NULL, 0};
    train_walk(&carve, e, per_state, L, D);
    if (carve.bytes > e->train_bytes) {
        free(e->train_block);
        e->train_bytes = 0;
        e->B = 0; /* no training forward to go back through */
        size_t bytes = carve.bytes;
        if (!(e->train_block = vad_carve_begin(&carve)))
            return vad_fail(VAD_ERR_MEMORY, "out of memory: training keeps %d states (%.1f MB)", L + 2,
                            (double)bytes / 1e6);
        e->train_bytes = bytes;
    } else {
        carve.base = (char *)e->train_block;
        carve.bytes = 0;
    }
    train_walk(&carve, e, per_state, L, D);
    int all[VAD_MAX_DEPTH + 1];
    float *outs[VAD_MAX_DEPTH + 1];
    if (L > VAD_MAX_DEPTH) return vad_fail(VAD_ERR_VALUE, "too many blocks for training");
    for (int l = 0; l <= L; l++) {
        all[l] = l;
        outs[l] = e->train + per_state * (size_t)l;
    }
    if ((rc = vad_vit_forward(e->vit, images, B, S, tokens, 2, all, L + 1, outs, NULL))) return rc;
    const float *used[VAD_MAX_LAYERS];
    for (int i = 0; i < n_layers; i++) used[i] = outs[layers[i]];
    apply_ln_post(e, used, outs[L], B, T, ln_w, ln_b, n_layers, feats, ta, tn);
    memcpy(e->saved_tokens, tokens, 2 * (size_t)D * sizeof(float));
    e->B = B;
    e->S = S;
    e->n_layers = n_layers;
    memcpy(e->layers, layers, (size_t)n_layers * sizeof(int));
    e->ln_w = ln_w;
    e->ln_b = ln_b;
    return VAD_OK;
}

int vad_encode_backward(vad_encoder *e, const float *const *dfeats, const float *dta, const float *dtn,
                        float *dtokens, float *dln_w, float *dln_b) {
    if (!e->train_block || e->B <= 0) return vad_fail(VAD_ERR_VALUE, "backward called before a training forward");
    const vad_vit_config *c = vad_vit_get_config(e->vit);
    int B = e->B, D = c->width, L = c->depth, T = vad_vit_seq_len(e->vit, e->S, 2);
    int first_patch = 3 + c->n_registers, N = T - first_patch;
    size_t per_state = (size_t)B * T * D;
    vad_pool *pool = vad_vit_pool(e->vit);
    /* gradients w.r.t. the streams: one zeroed state per distinct used layer (the final one is the
     * work state passed to the tower backward) */
    float *dfinal = e->dfinal;
    float *inject_buf = NULL;
    const float *inject[VAD_MAX_DEPTH + 1] = {0};
    int n_inject = 0, slot[VAD_MAX_DEPTH + 1];
    for (int l = 0; l <= L; l++) slot[l] = -1;
    for (int i = 0; i < e->n_layers; i++)
        if (e->layers[i] < L && slot[e->layers[i]] < 0) slot[e->layers[i]] = n_inject++;
    if (n_inject) {
        inject_buf = (float *)calloc(per_state * (size_t)n_inject, sizeof(float));
        if (!inject_buf) return vad_fail(VAD_ERR_MEMORY, "out of memory for the layer gradients");
    }
    memset(dfinal, 0, per_state * sizeof(float));
    int rc = VAD_OK;
    for (int i = 0; i < e->n_layers && rc == VAD_OK; i++) {
        int l = e->layers[i];
        float *dst = l == L ? dfinal : inject_buf + per_state * (size_t)slot[l];
        const float *x = e->train + per_state * (size_t)l;
        for (int b = 0; b < B && rc == VAD_OK; b++)
            rc = vad_layernorm_backward(pool, dst + ((size_t)b * T + first_patch) * D, D, dfeats[i] + (size_t)b * N * D,
                                        D, x + ((size_t)b * T + first_patch) * D, D, e->ln_w, dln_w, dln_b, N, D,
                                        c->ln_eps);
    }
    const float *xL = e->train + per_state * (size_t)L;
    if (rc == VAD_OK)
        rc = vad_layernorm_backward(pool, dfinal, T * D, dta, D, xL, T * D, e->ln_w, dln_w, dln_b, B, D, c->ln_eps);
    if (rc == VAD_OK)
        rc = vad_layernorm_backward(pool, dfinal + D, T * D, dtn, D, xL + D, T * D, e->ln_w, dln_w, dln_b, B, D,
                                    c->ln_eps);
    for (int l = 0; l < L; l++)
        if (slot[l] >= 0) inject[l] = inject_buf + per_state * (size_t)slot[l];
    if (rc == VAD_OK)
        rc = vad_vit_backward_inserted(e->vit, e->train, B, e->S, e->saved_tokens, 2, dfinal, inject, dtokens);
    free(inject_buf);
    return rc;
}
