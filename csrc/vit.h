/* Frozen ViT backbone (OpenAI CLIP vision tower or DINOv2) with optional inserted tokens.
 *
 * Sequence: [inserted_0 .. inserted_{k-1}, cls, registers, patches]. Inserted tokens and cls get
 * the class position; registers get none; patches get the (resized) patch positions.
 * Weights live in one float buffer owned by the caller (layout: vad_vit_layout; the block
 * linear weights are stored in column panels, see panel_gemm.h).
 *
 * Model apart from state: a vad_vit_model is the configuration and the weights, read-only once
 * created, so any number of states and threads share it (nothing is copied per state). A vad_vit
 * is one caller's state over a model: its thread pool, the positions resized to the current grid,
 * the workspaces and, in bf16, the rounded-input buffer; a state is used by one thread at a time.
 *
 * Weight memory: an fp32 model points into the caller's buffer; a bf16-only model holds the blocks'
 * linear weights and the patch embedding only as bf16 packs (half their fp32 size) and its own copy
 * of the small tensors (norms, biases, positions, tokens, LayerScale). The bf16 packs of a model
 * (forward, patch embedding and, from the first bf16 backward, the input-gradient transposes made
 * from the forward packs) exist once per model, whatever the number of bf16 states. */
#ifndef VAD_VIT_H
#define VAD_VIT_H

#include <stddef.h>

#include "threadpool.h"

enum vad_pos_resize {
    VAD_POS_BILINEAR = 0,       /* CLIP: bilinear, align_corners=False, no antialias */
    VAD_POS_BICUBIC_SCALE = 1,  /* DINOv2 (no registers): bicubic A=-0.75, scale (g+0.1)/G0 */
    VAD_POS_BICUBIC_AA = 2,     /* DINOv2 with registers: bicubic to size g, antialias */
    VAD_POS_BICUBIC_SIZE = 3,   /* transformers DINOv2, ONNX cubic Resize: bicubic to size g, no antialias */
};

typedef struct {
    int width, depth, heads, patch;
    int grid0;       /* native grid of the positional embedding (pos has 1 + grid0^2 rows) */
    int mlp_hidden;  /* hidden width of the MLP (SwiGLU: width of each half) */
    int n_registers; /* DINOv2 register tokens */
    int patch_bias, ln_pre, layerscale;
    int activation; /* enum vad_activation */
    int pos_resize; /* enum vad_pos_resize */
    float ln_eps;
    float pos_cubic_a; /* cubic coefficient of VAD_POS_BICUBIC_SIZE (PyTorch: -0.75) */
} vad_vit_config;

typedef struct {
    const float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *proj_w, *proj_b, *ls1;
    const float *ln2_w, *ln2_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b, *ls2;
} vad_block_weights;

typedef struct {
    const float *patch_w, *patch_b, *cls, *pos, *registers, *ln_pre_w, *ln_pre_b;
    const float *ln_post_w, *ln_post_b;
    vad_block_weights *blocks;
} vad_vit_weights;

#define VAD_NAME_LEN 48
typedef struct {
    char name[VAD_NAME_LEN];
    int ndim;
    int shape[4];
    size_t offset, size; /* in floats (size as stored) */
    int panel;           /* 0: row-major; else a linear weight stored in panels of this width (panel_gemm.h) */
} vad_tensor_entry;

/* Checks the configuration; VAD_OK or VAD_ERR_VALUE with a message. */
int vad_vit_config_check(const vad_vit_config *cfg);
/* Fills entries (if non-NULL, up to max) and returns the number of tensors; *total = floats. */
int vad_vit_layout(const vad_vit_config *cfg, vad_tensor_entry *entries, int max, size_t *total);

typedef struct vad_vit_model vad_vit_model;
typedef struct vad_vit vad_vit;

/* The read-only model of the weights in params (layout: vad_vit_layout). precision VAD_FP32: over
 * params (the caller keeps the buffer alive and unchanged while the model and its states exist);
 * fp32 and bf16 states (the bf16 packs are made at the first bf16 state). VAD_BF16: a bf16-only
 * model, packed now; params is not used after the call; bf16 states only. NULL with a message on a
 * bad config or no memory. */
vad_vit_model *vad_vit_model_create(const vad_vit_config *cfg, const float *params, int precision);
void vad_vit_model_free(vad_vit_model *model);
const vad_vit_config *vad_vit_model_config(const vad_vit_model *model);
/* Bytes of weights the model uses: fp32 (the caller's buffer, or a bf16-only model's own small
 * tensors) and bf16 (its packs made so far). Safe while states run. */
void vad_vit_model_weight_bytes(const vad_vit_model *model, size_t *fp32_bytes, size_t *bf16_bytes);

/* A state over a model (which must outlive it) with its own pool of nthreads threads; workspaces
 * are allocated on first use per batch shape and reused. It starts in the model's precision (fp32,
 * or bf16 for a bf16-only model: call vad_vit_set_precision(m, VAD_BF16), which checks the CPU). */
vad_vit *vad_vit_create(const vad_vit_model *model, int nthreads);
void vad_vit_free(vad_vit *m);
/* enum vad_precision (cpu_features.h). fp32 (the default): the weights as given. bf16: the products
 * take bf16-rounded inputs and the model's bf16 packs (made now if this is the model's first bf16
 * state, under the model's lock) with fp32 accumulation, attention runs the bf16 fused kernel;
 * LayerNorm, softmax, activations and the residual stream stay fp32. VAD_ERR_VALUE naming the missing
 * CPU feature when bf16 cannot run here, or asking fp32 of a bf16-only model. */
int vad_vit_set_precision(vad_vit *m, int precision);
const vad_vit_config *vad_vit_get_config(const vad_vit *m);
vad_pool *vad_vit_pool(vad_vit *m);

/* Runs the tower on images [B, 3, S, S] (already normalised).
 * inserted: [n_inserted, D] tokens placed before cls (NULL when n_inserted == 0).
 * layers: 1-based block indices (0 = the input of block 1, after ln_pre); layer_out[i] receives
 * the residual stream [B, T, D] after block layers[i]. final_out (may be NULL) receives the
 * stream after the last block. T = n_inserted + 1 + n_registers + (S/patch)^2. */
int vad_vit_forward(vad_vit *m, const float *images, int B, int S, const float *inserted,
                    int n_inserted, const int *layers, int n_layers, float *const *layer_out,
                    float *final_out);

/* Backward to the inserted tokens through every block (input gradients only).
 * states: [(depth+1), B, T, D] from vad_vit_forward with layers 0..depth (in that order).
 * dstate: [B, T, D], dL/dx_depth on entry; used as work space. inject (may be NULL): inject[l]
 * (NULL or [B, T, D]) is dL/dx_l coming from outside the tower, for l < depth (fold the final
 * layer's into dstate). dinserted: [n_inserted, D], accumulated (+=). */
int vad_vit_backward_inserted(vad_vit *m, const float *states, int B, int S, const float *inserted,
                              int n_inserted, float *dstate, const float *const *inject, float *dinserted);

/* out [rows, D] = the tower's own final norm (CLIP ln_post, DINOv2 norm) of x [rows, D]; out may be x. */
int vad_vit_final_norm(vad_vit *m, const float *x, float *out, int rows);

/* Number of sequence positions for a given input side. */
int vad_vit_seq_len(const vad_vit *m, int S, int n_inserted);

#endif
