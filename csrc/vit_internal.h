/* Private to the ViT implementation files (vit.c, vit_backward.c): the model struct and the
 * block pieces shared by the forward pass and the backward's recomputation. */
#ifndef VAD_VIT_INTERNAL_H
#define VAD_VIT_INTERNAL_H

#include "vit.h"

struct vad_vit_model {
    vad_vit_config cfg;
    const float *params;
    vad_vit_weights w; /* pointers into params; w.blocks is owned by the model */
};

struct vad_vit {
    const vad_vit_model *model; /* shared, read-only */
    vad_pool *pool;
    /* patch positions resized to the current grid */
    int pos_grid;
    float *pos_patch;
    /* workspace for the current (B, T) */
    int ws_B, ws_S, ws_T;
    float *ws;
    float *x, *h, *proj, *qkv, *mlp, *mlp2, *scratch, *cols;
    /* training (allocated on the first backward for the current (B, T)) */
    int tws_B, tws_T;
    float *tws;
    float *dx1, *dtmp, *dqkv, *dg, *f, *x1, *scratch2;
    float *wtmp; /* one block weight unpacked from its panels */
};

int vad_vit_ensure_workspace(vad_vit *m, int B, int S, int T);
int vad_vit_ensure_positions(vad_vit *m, int g);
/* x += ls1 * proj(attention(LN1(x))); leaves LN1(x) -> qkv in m->qkv (needed by the backward). */
void vad_vit_attention_sublayer(vad_vit *m, const vad_block_weights *bw, float *x, int B, int T);
/* f = act(fc1(LN2(x))) ([B*T, fc1 width]); act -1 keeps the pre-activation (the backward needs it),
 * else VAD_ACT_QUICK_GELU / VAD_ACT_GELU. */
void vad_vit_mlp_in(vad_vit *m, const vad_block_weights *bw, const float *x, float *f, int B, int T, int act);

#endif
