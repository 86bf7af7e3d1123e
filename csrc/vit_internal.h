/* Private to the ViT implementation files (vit.c, vit_backward.c): the model struct and the
 * block pieces shared by the forward pass and the backward's recomputation. */
#ifndef VAD_VIT_INTERNAL_H
#define VAD_VIT_INTERNAL_H

#include <pthread.h>

#include "bf16.h"
#include "vit.h"

/* the four linear layers of a block */
enum vad_block_linear { VAD_LIN_QKV = 0, VAD_LIN_PROJ = 1, VAD_LIN_FC1 = 2, VAD_LIN_FC2 = 3, VAD_LIN_COUNT = 4 };

/* The bf16 packs of a model's weights (bf16_gemm.h panels), made once and then shared read-only by
 * every bf16 state of the model: the blocks' linear weights for the forward (fwd_slots[l][which]
 * points into fwd), the patch embedding, and from the first bf16 backward of any state the
 * transposes for the input gradients (bwd_slots into bwd), made from the forward packs. */
typedef struct {
    pthread_mutex_t lock; /* guards making them (two states may ask at once) */
    vad_bf16 *fwd, *bwd, *patch;
    vad_bf16 *(*fwd_slots)[VAD_LIN_COUNT], *(*bwd_slots)[VAD_LIN_COUNT];
    size_t bytes; /* of fwd, bwd and patch */
} vad_vit_bf16_packs;

struct vad_vit_model {
    vad_vit_config cfg;
    int precision;     /* VAD_FP32: over the caller's fp32 buffer (fp32 and bf16 states); VAD_BF16: bf16 only */
    const float *params; /* the caller's buffer (NULL for a bf16-only model) */
    float *small;      /* bf16-only: the model's own copy of the tensors the packs do not hold */
    size_t fp32_floats; /* floats of params, or of small */
    vad_vit_weights w; /* pointers into params or small (bf16-only: NULL for the linear and patch weights);
                        * w.blocks is owned by the model */
    vad_vit_bf16_packs *bf16; /* owned by the model; its packs are filled on demand under its lock */
};

struct vad_vit {
    const vad_vit_model *model; /* shared, read-only */
    int precision; /* enum vad_precision (vit_precision.c) */
    int bf16_bwd_ready; /* the model's backward packs exist (this state asked for them under the lock) */
    vad_bf16 *bf16_in; /* bf16: the rounded-input buffer of the products (this state's own) */
    size_t bf16_in_elems;
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

/* vit_precision.c: products on the kernels of the model's precision (bf16: after
 * vad_vit_ensure_bf16_inputs for at least M rows, which vad_vit_ensure_workspace calls).
 * C = act(A W^T + b (+ C when beta is 1)) for one of the block's linear layers (M rows). */
int vad_vit_ensure_bf16_inputs(vad_vit *m, int rows);
void vad_vit_block_linear(vad_vit *m, const vad_block_weights *bw, int which, float *C, int ldc, const float *A,
                          int lda, int M, float beta, int act);
/* The same layer on LN(x) (x: [M, K], LayerNorm weights ln_w / ln_b): fp32 normalises into m->h,
 * bf16 straight into the rounded input rows m->bf16_in (m->h is then left as it was). */
void vad_vit_norm_linear(vad_vit *m, const vad_block_weights *bw, int which, float *C, int ldc, const float *x,
                         const float *ln_w, const float *ln_b, int M, float beta, int act);
/* din [M, K] = dout [M, N] W for the same layer. */
int vad_vit_block_linear_input_grad(vad_vit *m, const vad_block_weights *bw, int which, float *din,
                                    const float *dout, int M);
/* The patch embedding: out [M, D] = cols [M, 3 P P] W^T + b. */
void vad_vit_patch_linear(vad_vit *m, float *out, const float *cols, int M);
void vad_vit_free_precision(vad_vit *m);
/* The model's bf16 packs: vad_vit_bf16_packs_new (empty, NULL when out of memory), _forward (makes
 * the forward and patch packs from the fp32 weights, once, under the lock), _free. */
vad_vit_bf16_packs *vad_vit_bf16_packs_new(void);
int vad_vit_bf16_packs_forward(const vad_vit_model *model);
void vad_vit_bf16_packs_free(vad_vit_bf16_packs *packs);

#endif
