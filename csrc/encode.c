#include "encode.h"

#include <stdlib.h>

#include "errors.h"
#include "ops.h"

#define VAD_MAX_LAYERS 64

struct vad_encoder {
    vad_vit *vit;
    size_t cap; /* floats in states */
    float *states;
};

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
    free(e);
}

int vad_encode(vad_encoder *e, const float *images, int B, int S, const float *tokens,
               const float *ln_w, const float *ln_b, const int *layers, int n_layers,
               float *const *feats, float *ta, float *tn) {
    const vad_vit_config *c = vad_vit_get_config(e->vit);
    if (n_layers < 1 || n_layers > VAD_MAX_LAYERS)
        return vad_fail(VAD_ERR_VALUE, "between 1 and %d layers are needed, got %d", VAD_MAX_LAYERS, n_layers);
    for (int i = 0; i < n_layers; i++)
        if (layers[i] < 1 || layers[i] > c->depth)
            return vad_fail(VAD_ERR_VALUE, "layer %d is outside 1..%d", layers[i], c->depth);
    if (S <= 0 || S % c->patch)
        return vad_fail(VAD_ERR_VALUE, "image side %d is not divisible by the patch size %d", S, c->patch);
    int D = c->width, T = vad_vit_seq_len(e->vit, S, 2);
    int first_patch = 3 + c->n_registers, N = T - first_patch;
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
    int rc = vad_vit_forward(e->vit, images, B, S, tokens, 2, layers, n_layers, outs, final_state);
    if (rc) return rc;
    vad_pool *pool = vad_vit_pool(e->vit);
    for (int i = 0; i < n_layers; i++)
        for (int b = 0; b < B; b++)
            vad_layernorm(pool, feats[i] + (size_t)b * N * D, D, outs[i] + ((size_t)b * T + first_patch) * D,
                          D, ln_w, ln_b, N, D, c->ln_eps);
    /* t_a at row 0 and t_n at row 1 of each image: strided rows of the final state */
    vad_layernorm(pool, ta, D, final_state, T * D, ln_w, ln_b, B, D, c->ln_eps);
    vad_layernorm(pool, tn, D, final_state + D, T * D, ln_w, ln_b, B, D, c->ln_eps);
    return VAD_OK;
}
