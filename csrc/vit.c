#include "vit.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention_fused.h"
#include "cpu_features.h"
#include "errors.h"
#include "vad_limits.h"
#include "ops.h"
#include "panel_gemm.h"
#include "posembed.h"
#include "vit_internal.h"
#include "workspace.h"

/* ------------------------------------------------------------------ layout */

typedef struct {
    vad_tensor_entry *entries;
    int max, count;
    size_t total;
    int overflow; /* a size did not fit in size_t (impossible for a checked config) */
    /* compact: the pointers go to `small` (a bf16-only model's own buffer; NULL: sizing only), where the
     * tensors other than the bf16-held ones are copied from base, small_total floats in all; the
     * bf16-held ones get NULL */
    int compact;
    float *small;
    size_t small_total;
} layout_builder;

/* How a tensor is stored: row-major; row-major and, in a bf16-only model, held only as a bf16 pack
 * (the patch embedding); in column panels (a block linear weight, also held only as a bf16 pack). */
enum stored_kind { STORED_ROW = 0, STORED_ROW_BF16 = 1, STORED_PANEL = 2 };

/* Appends one tensor. Plain tensors are stored row-major; a STORED_PANEL linear weight [d0, d1] is
 * stored in column panels (panel_gemm.h) starting on a 64-byte boundary. */
static const float *emit_stored(layout_builder *lb, const float *base, const char *name, int kind, int ndim,
                                int d0, int d1, int d2, int d3) {
    size_t size = 1;
    int dims[4] = {d0, d1, d2, d3};
    for (int i = 0; i < ndim; i++)
        if (dims[i] < 0 || !vad_mul_size(size, (size_t)dims[i], &size)) lb->overflow = 1;
    if (kind == STORED_PANEL) {
        size = vad_panel_floats(d0, d1);
        if (!vad_add_size(lb->total, 15, &lb->total)) lb->overflow = 1;
        lb->total = lb->total / 16 * 16;
    }
    if (lb->entries && lb->count < lb->max) {
        vad_tensor_entry *e = &lb->entries[lb->count];
        snprintf(e->name, VAD_NAME_LEN, "%s", name);
        e->ndim = ndim;
        for (int i = 0; i < 4; i++) e->shape[i] = i < ndim ? dims[i] : 0;
        e->offset = lb->total;
        e->size = size;
        e->panel = kind == STORED_PANEL ? VAD_PANEL : 0;
    }
    const float *p = base ? base + lb->total : NULL;
    if (lb->compact) {
        p = NULL;
        if (kind == STORED_ROW) {
            if (lb->small) {
                memcpy(lb->small + lb->small_total, base + lb->total, size * sizeof(float));
                p = lb->small + lb->small_total;
            }
            lb->small_total += (size + 15) / 16 * 16; /* each on a 64-byte boundary */
        }
    }
    lb->count++;
    if (!vad_add_size(lb->total, size, &lb->total)) lb->overflow = 1;
    return p;
}

static const float *emit(layout_builder *lb, const float *base, const char *name, int ndim, int d0, int d1,
                         int d2, int d3) {
    return emit_stored(lb, base, name, STORED_ROW, ndim, d0, d1, d2, d3);
}

/* One walk over the tensors: names/shapes/offsets for the layout, pointers for the weights. */
static void walk_layout(const vad_vit_config *c, layout_builder *lb, const float *base,
                        vad_vit_weights *w) {
    int D = c->width, P = c->patch, Hm = c->mlp_hidden;
    int fc1_out = c->activation == VAD_ACT_SWIGLU ? 2 * Hm : Hm;
    char name[VAD_NAME_LEN];
    vad_vit_weights tmp;
    memset(&tmp, 0, sizeof tmp);
    if (!w) w = &tmp;
    w->patch_w = emit_stored(lb, base, "patch.weight", STORED_ROW_BF16, 4, D, 3, P, P);
    w->patch_b = c->patch_bias ? emit(lb, base, "patch.bias", 1, D, 0, 0, 0) : NULL;
    w->cls = emit(lb, base, "cls", 1, D, 0, 0, 0);
    w->pos = emit(lb, base, "pos", 2, 1 + c->grid0 * c->grid0, D, 0, 0);
    w->registers = c->n_registers ? emit(lb, base, "registers", 2, c->n_registers, D, 0, 0) : NULL;
    if (c->ln_pre) {
        w->ln_pre_w = emit(lb, base, "ln_pre.weight", 1, D, 0, 0, 0);
        w->ln_pre_b = emit(lb, base, "ln_pre.bias", 1, D, 0, 0, 0);
    }
    for (int i = 0; i < c->depth; i++) {
        vad_block_weights bw;
        memset(&bw, 0, sizeof bw);
#define BLK_STORED(field, suffix, panel, nd, a, b)              \
    snprintf(name, sizeof name, "blocks.%d.%s", i, suffix);     \
    bw.field = emit_stored(lb, base, name, panel, nd, a, b, 0, 0)
#define BLK(field, suffix, nd, a, b) BLK_STORED(field, suffix, STORED_ROW, nd, a, b)
#define LINEAR(field, suffix, a, b) BLK_STORED(field, suffix, STORED_PANEL, 2, a, b)
        BLK(ln1_w, "ln1.weight", 1, D, 0);
        BLK(ln1_b, "ln1.bias", 1, D, 0);
        LINEAR(qkv_w, "qkv.weight", 3 * D, D);
        BLK(qkv_b, "qkv.bias", 1, 3 * D, 0);
        LINEAR(proj_w, "proj.weight", D, D);
        BLK(proj_b, "proj.bias", 1, D, 0);
        if (c->layerscale) { BLK(ls1, "ls1", 1, D, 0); }
        BLK(ln2_w, "ln2.weight", 1, D, 0);
        BLK(ln2_b, "ln2.bias", 1, D, 0);
        LINEAR(fc1_w, "fc1.weight", fc1_out, D);
        BLK(fc1_b, "fc1.bias", 1, fc1_out, 0);
        LINEAR(fc2_w, "fc2.weight", D, Hm);
        BLK(fc2_b, "fc2.bias", 1, D, 0);
        if (c->layerscale) { BLK(ls2, "ls2", 1, D, 0); }
#undef LINEAR
#undef BLK
#undef BLK_STORED
        if (w->blocks) w->blocks[i] = bw;
    }
    w->ln_post_w = emit(lb, base, "ln_post.weight", 1, D, 0, 0, 0);
    w->ln_post_b = emit(lb, base, "ln_post.bias", 1, D, 0, 0, 0);
}

int vad_vit_config_check(const vad_vit_config *c) {
    if (c->width <= 0 || c->depth <= 0 || c->heads <= 0 || c->patch <= 0 || c->grid0 <= 0 ||
        c->mlp_hidden <= 0 || c->n_registers < 0)
        return vad_fail(VAD_ERR_VALUE, "backbone config: sizes must be positive (width=%d depth=%d "
                        "heads=%d patch=%d grid=%d mlp=%d registers=%d)", c->width, c->depth,
                        c->heads, c->patch, c->grid0, c->mlp_hidden, c->n_registers);
    if (c->width > VAD_MAX_WIDTH || c->depth > VAD_MAX_DEPTH || c->heads > VAD_MAX_HEADS ||
        c->patch > VAD_MAX_PATCH || c->grid0 > VAD_MAX_GRID || c->mlp_hidden > VAD_MAX_MLP_HIDDEN ||
        c->n_registers > VAD_MAX_REGISTERS)
        return vad_fail(VAD_ERR_VALUE, "backbone config: a size exceeds the engine's limits (width=%d <= %d, "
                        "depth=%d <= %d, heads=%d <= %d, patch=%d <= %d, grid=%d <= %d, mlp_hidden=%d <= %d, "
                        "registers=%d <= %d)", c->width, VAD_MAX_WIDTH, c->depth, VAD_MAX_DEPTH, c->heads,
                        VAD_MAX_HEADS, c->patch, VAD_MAX_PATCH, c->grid0, VAD_MAX_GRID, c->mlp_hidden,
                        VAD_MAX_MLP_HIDDEN, c->n_registers, VAD_MAX_REGISTERS);
    if (c->width % c->heads)
        return vad_fail(VAD_ERR_VALUE, "backbone config: width %d is not divisible by heads %d",
                        c->width, c->heads);
    if (c->activation < VAD_ACT_QUICK_GELU || c->activation > VAD_ACT_SWIGLU)
        return vad_fail(VAD_ERR_VALUE, "backbone config: unknown activation %d", c->activation);
    if (c->pos_resize < VAD_POS_BILINEAR || c->pos_resize > VAD_POS_BICUBIC_SIZE)
        return vad_fail(VAD_ERR_VALUE, "backbone config: unknown position resize mode %d", c->pos_resize);
    if (!(c->pos_cubic_a >= -2.0f && c->pos_cubic_a <= 0.0f))
        return vad_fail(VAD_ERR_VALUE, "backbone config: cubic coefficient must be in [-2, 0]");
    if (!(c->ln_eps > 0.0f && c->ln_eps < 1.0f))
        return vad_fail(VAD_ERR_VALUE, "backbone config: layer-norm eps must be in (0, 1)");
    if ((int64_t)c->width * c->mlp_hidden > (int64_t)1 << 30)
        return vad_fail(VAD_ERR_VALUE, "backbone config: model too large (width x mlp_hidden > 2^30)");
    return VAD_OK;
}

int vad_vit_layout(const vad_vit_config *cfg, vad_tensor_entry *entries, int max, size_t *total) {
    layout_builder lb = {entries, max, 0, 0, 0, 0, NULL, 0};
    walk_layout(cfg, &lb, NULL, NULL);
    if (total) *total = lb.total;
    if (lb.overflow) return vad_fail(-1, "backbone config: the weight layout overflows size_t");
    return lb.count;
}

/* ------------------------------------------------------------------ lifetime */

/* A bf16-only model: the bf16 packs from the fp32 weights, then the other tensors copied into the
 * model's own buffer; the weight pointers move there (NULL for the packed ones). */
static int make_bf16_only(vad_vit_model *model) {
    int rc = vad_vit_bf16_packs_forward(model);
    if (rc) return rc;
    layout_builder sizing = {NULL, 0, 0, 0, 0, 1, NULL, 0};
    walk_layout(&model->cfg, &sizing, model->params, NULL);
    if (!(model->small = (float *)malloc(sizing.small_total * sizeof(float))))
        return vad_fail(VAD_ERR_MEMORY, "out of memory creating the bf16 backbone");
    layout_builder lb = {NULL, 0, 0, 0, 0, 1, model->small, 0};
    walk_layout(&model->cfg, &lb, model->params, &model->w);
    model->params = NULL;
    model->fp32_floats = lb.small_total;
    return VAD_OK;
}

vad_vit_model *vad_vit_model_create(const vad_vit_config *cfg, const float *params, int precision) {
    if (vad_vit_config_check(cfg) != VAD_OK) return NULL;
    if (precision != VAD_FP32 && precision != VAD_BF16) {
        vad_fail(VAD_ERR_VALUE, "unknown precision %d", precision);
        return NULL;
    }
    vad_vit_model *model = (vad_vit_model *)calloc(1, sizeof(vad_vit_model));
    if (model) {
        model->cfg = *cfg;
        model->w.blocks = (vad_block_weights *)calloc((size_t)cfg->depth, sizeof(vad_block_weights));
        model->bf16 = vad_vit_bf16_packs_new();
    }
    if (!model || !model->w.blocks || !model->bf16) {
        vad_vit_model_free(model);
        vad_fail(VAD_ERR_MEMORY, "out of memory creating the backbone");
        return NULL;
    }
    model->precision = precision;
    model->params = params;
    layout_builder lb = {NULL, 0, 0, 0, 0, 0, NULL, 0};
    walk_layout(cfg, &lb, params, &model->w);
    model->fp32_floats = lb.total;
    if (precision == VAD_BF16 && make_bf16_only(model) != VAD_OK) {
        vad_vit_model_free(model);
        return NULL;
    }
    return model;
}

void vad_vit_model_free(vad_vit_model *model) {
    if (!model) return;
    vad_vit_bf16_packs_free(model->bf16);
    free(model->small);
    free(model->w.blocks);
    free(model);
}

void vad_vit_model_weight_bytes(const vad_vit_model *model, size_t *fp32_bytes, size_t *bf16_bytes) {
    *fp32_bytes = model->fp32_floats * sizeof(float);
    pthread_mutex_lock(&model->bf16->lock);
    *bf16_bytes = model->bf16->bytes;
    pthread_mutex_unlock(&model->bf16->lock);
}

const vad_vit_config *vad_vit_model_config(const vad_vit_model *model) { return &model->cfg; }

vad_vit *vad_vit_create(const vad_vit_model *model, int nthreads) {
    vad_vit *m = (vad_vit *)calloc(1, sizeof(vad_vit));
    if (m) {
        m->model = model;
        m->precision = model->precision; /* a bf16-only model's states run bf16 */
        m->pool = vad_pool_create(nthreads);
    }
    if (!m || !m->pool) {
        vad_vit_free(m);
        vad_fail(VAD_ERR_MEMORY, "out of memory creating the backbone state");
        return NULL;
    }
    return m;
}

void vad_vit_free(vad_vit *m) {
    if (!m) return;
    vad_vit_free_precision(m);
    vad_pool_free(m->pool);
    free(m->pos_patch);
    free(m->ws);
    free(m->tws);
    free(m);
}

const vad_vit_config *vad_vit_get_config(const vad_vit *m) { return &m->model->cfg; }
vad_pool *vad_vit_pool(vad_vit *m) { return m->pool; }

int vad_vit_final_norm(vad_vit *m, const float *x, float *out, int rows) {
    const vad_vit_config *c = &m->model->cfg;
    const vad_vit_weights *w = &m->model->w;
    if (rows <= 0) return vad_fail(VAD_ERR_VALUE, "final norm: rows must be positive");
    vad_layernorm(m->pool, out, c->width, x, c->width, w->ln_post_w, w->ln_post_b, rows, c->width, c->ln_eps);
    return VAD_OK;
}

int vad_vit_seq_len(const vad_vit *m, int S, int n_inserted) {
    int g = S / m->model->cfg.patch;
    return n_inserted + 1 + m->model->cfg.n_registers + g * g;
}

/* ------------------------------------------------------------------ workspace */

/* The forward's buffers for batch B, side S, sequence T: one list for sizing and carving. */
static void workspace_walk(vad_carver *cv, vad_vit *m, int B, int S, int T) {
    const vad_vit_config *c = &m->model->cfg;
    size_t D = (size_t)c->width, BT = (size_t)B * T, g = (size_t)(S / c->patch);
    size_t fc1_out = c->activation == VAD_ACT_SWIGLU ? 2 * (size_t)c->mlp_hidden : (size_t)c->mlp_hidden;
    size_t n_mlp = BT * fc1_out, n_cols = (size_t)B * g * g * 3 * c->patch * c->patch;
    size_t n_scr = vad_attention_scratch(T, vad_pool_size(m->pool));
    size_t n_fused = vad_attention_fused_scratch(T, c->width / c->heads, vad_pool_size(m->pool));
    m->x = vad_take_floats(cv, BT * D);
    m->h = vad_take_floats(cv, BT * D);
    m->proj = vad_take_floats(cv, BT * D);
    m->qkv = vad_take_floats(cv, BT * 3 * D);
    /* the im2col buffer is only live before the first block: it shares the MLP buffer */
    m->mlp = m->cols = vad_take_floats(cv, n_mlp > n_cols ? n_mlp : n_cols);
    m->mlp2 = c->activation == VAD_ACT_SWIGLU ? vad_take_floats(cv, BT * (size_t)c->mlp_hidden) : NULL;
    /* per-head BLAS attention or the fused kernel, whichever needs more */
    m->scratch = vad_take_floats(cv, n_fused > n_scr ? n_fused : n_scr);
}

int vad_vit_ensure_workspace(vad_vit *m, int B, int S, int T) {
    int rc = vad_vit_ensure_bf16_inputs(m, B * T);
    if (rc) return rc;
    if (m->ws && m->ws_B == B && m->ws_S == S && m->ws_T == T) return VAD_OK;
    free(m->ws);
    m->ws_B = 0;
    vad_carver carve = {NULL, 0};
    workspace_walk(&carve, m, B, S, T);
    size_t bytes = carve.bytes;
    if (!(m->ws = (float *)vad_carve_begin(&carve)))
        return vad_fail(VAD_ERR_MEMORY, "out of memory: the backbone workspace needs %.1f MB for "
                        "batch %d at %dx%d", (double)bytes / 1e6, B, S, S);
    workspace_walk(&carve, m, B, S, T);
    m->ws_B = B;
    m->ws_S = S;
    m->ws_T = T;
    return VAD_OK;
}

int vad_vit_ensure_positions(vad_vit *m, int g) {
    if (m->pos_patch && m->pos_grid == g) return VAD_OK;
    free(m->pos_patch);
    const vad_vit_config *c = &m->model->cfg;
    m->pos_patch = (float *)malloc((size_t)g * g * c->width * sizeof(float));
    if (!m->pos_patch) return vad_fail(VAD_ERR_MEMORY, "out of memory resizing positions");
    int rc = vad_resize_positions(m->pos_patch, m->model->w.pos + c->width, c->width, c->grid0, g, c->pos_resize,
                                  c->pos_cubic_a);
    if (rc) {
        free(m->pos_patch);
        m->pos_patch = NULL;
        return rc;
    }
    m->pos_grid = g;
    return VAD_OK;
}

/* ------------------------------------------------------------------ forward */

typedef struct {
    float *cols;
    const float *img;
    int S, P, g;
} im2col_ctx;

/* cols[(b*g + gy)*g + gx, (c*P + ky)*P + kx] = img[b, c, gy*P + ky, gx*P + kx] */
static void im2col_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    im2col_ctx *c = (im2col_ctx *)vctx;
    int S = c->S, P = c->P, g = c->g;
    size_t K = (size_t)3 * P * P;
    for (int64_t row = begin; row < end; row++) {
        int b = (int)(row / ((int64_t)g * g)), rem = (int)(row % ((int64_t)g * g));
        int gy = rem / g, gx = rem % g;
        float *dst = c->cols + (size_t)row * K;
        for (int ch = 0; ch < 3; ch++)
            for (int ky = 0; ky < P; ky++) {
                const float *src = c->img + (((size_t)b * 3 + ch) * S + (size_t)gy * P + ky) * S + (size_t)gx * P;
                memcpy(dst + ((size_t)ch * P + ky) * P, src, (size_t)P * sizeof(float));
            }
    }
}

typedef struct {
    float *x;
    const float *tokens, *inserted, *cls, *pos_cls, *pos_patch, *registers;
    int T, D, n_ins, n_reg, N;
} embed_ctx;

/* Assembles [inserted, cls, registers, patches] + positions for each image. */
static void embed_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    embed_ctx *c = (embed_ctx *)vctx;
    int D = c->D;
    for (int64_t r = begin; r < end; r++) {
        int b = (int)(r / c->T), t = (int)(r % c->T);
        float *dst = c->x + (size_t)r * D;
        if (t < c->n_ins) {
            for (int i = 0; i < D; i++) dst[i] = c->inserted[(size_t)t * D + i] + c->pos_cls[i];
        } else if (t == c->n_ins) {
            for (int i = 0; i < D; i++) dst[i] = c->cls[i] + c->pos_cls[i];
        } else if (t < c->n_ins + 1 + c->n_reg) {
            memcpy(dst, c->registers + (size_t)(t - c->n_ins - 1) * D, (size_t)D * sizeof(float));
        } else {
            int p = t - c->n_ins - 1 - c->n_reg;
            const float *tok = c->tokens + ((size_t)b * c->N + p) * D;
            const float *pp = c->pos_patch + (size_t)p * D;
            for (int i = 0; i < D; i++) dst[i] = tok[i] + pp[i];
        }
    }
}

void vad_vit_attention_sublayer(vad_vit *m, const vad_block_weights *bw, float *x, int B, int T) {
    const vad_vit_config *c = &m->model->cfg;
    int D = c->width, BT = B * T;
    vad_pool *pool = m->pool;
    vad_vit_norm_linear(m, bw, VAD_LIN_QKV, m->qkv, 3 * D, x, bw->ln1_w, bw->ln1_b, BT, 0.0f, -1);
    if (vad_attention_fused_available(m->precision))
        vad_attention_fused(pool, m->h, m->qkv, m->scratch, B, T, D, c->heads, m->precision);
    else
        vad_attention(pool, m->h, m->qkv, m->scratch, B, T, D, c->heads);
    if (bw->ls1) {
        vad_vit_block_linear(m, bw, VAD_LIN_PROJ, m->proj, D, m->h, D, BT, 0.0f, -1);
        vad_residual_add(pool, x, m->proj, bw->ls1, BT, D);
    } else {
        vad_vit_block_linear(m, bw, VAD_LIN_PROJ, x, D, m->h, D, BT, 1.0f, -1);
    }
}

void vad_vit_mlp_in(vad_vit *m, const vad_block_weights *bw, const float *x, float *f, int B, int T, int act) {
    const vad_vit_config *c = &m->model->cfg;
    int BT = B * T;
    int fc1_out = c->activation == VAD_ACT_SWIGLU ? 2 * c->mlp_hidden : c->mlp_hidden;
    vad_vit_norm_linear(m, bw, VAD_LIN_FC1, f, fc1_out, x, bw->ln2_w, bw->ln2_b, BT, 0.0f, act);
}

static void mlp_sublayer(vad_vit *m, const vad_block_weights *bw, float *x, int B, int T) {
    const vad_vit_config *c = &m->model->cfg;
    int D = c->width, BT = B * T, Hm = c->mlp_hidden;
    vad_pool *pool = m->pool;
    int swiglu = c->activation == VAD_ACT_SWIGLU;
    vad_vit_mlp_in(m, bw, x, m->mlp, B, T, swiglu ? -1 : c->activation); /* GELUs fused into fc1 */
    const float *hidden = m->mlp;
    if (swiglu) {
        vad_swiglu(pool, m->mlp2, m->mlp, BT, Hm);
        hidden = m->mlp2;
    }
    if (bw->ls2) {
        vad_vit_block_linear(m, bw, VAD_LIN_FC2, m->h, D, hidden, Hm, BT, 0.0f, -1);
        vad_residual_add(pool, x, m->h, bw->ls2, BT, D);
    } else {
        vad_vit_block_linear(m, bw, VAD_LIN_FC2, x, D, hidden, Hm, BT, 1.0f, -1);
    }
}

int vad_vit_forward(vad_vit *m, const float *images, int B, int S, const float *inserted,
                    int n_inserted, const int *layers, int n_layers, float *const *layer_out,
                    float *final_out) {
    const vad_vit_config *c = &m->model->cfg;
    if (B <= 0 || S <= 0) return vad_fail(VAD_ERR_VALUE, "batch and image size must be positive");
    if (S % c->patch)
        return vad_fail(VAD_ERR_VALUE, "image side %d is not divisible by the patch size %d", S, c->patch);
    if (n_inserted < 0 || (n_inserted > 0 && !inserted))
        return vad_fail(VAD_ERR_VALUE, "inserted tokens missing");
    for (int i = 0; i < n_layers; i++)
        if (layers[i] < 0 || layers[i] > c->depth)
            return vad_fail(VAD_ERR_VALUE, "layer %d is outside 0..%d", layers[i], c->depth);
    int g = S / c->patch, N = g * g, D = c->width, P = c->patch;
    int T = vad_vit_seq_len(m, S, n_inserted);
    int rc = vad_vit_ensure_workspace(m, B, S, T);
    if (rc) return rc;
    if ((rc = vad_vit_ensure_positions(m, g))) return rc;
    vad_pool *pool = m->pool;
    const vad_vit_weights *w = &m->model->w;

    /* patch embedding: im2col + GEMM into h (as [B*N, D]) */
    im2col_ctx ic = {m->cols, images, S, P, g};
    vad_parallel_for(pool, (int64_t)B * N, 16, im2col_task, &ic);
    vad_vit_patch_linear(m, m->h, m->cols, B * N);

    embed_ctx ec = {m->x, m->h, inserted, w->cls, w->pos, m->pos_patch, w->registers,
                    T, D, n_inserted, c->n_registers, N};
    vad_parallel_for(pool, (int64_t)B * T, 16, embed_task, &ec);
    if (c->ln_pre) vad_layernorm(pool, m->x, D, m->x, D, w->ln_pre_w, w->ln_pre_b, B * T, D, c->ln_eps);

    size_t state = (size_t)B * T * D * sizeof(float);
    for (int l = 0; l <= c->depth; l++) {
        if (l > 0) {
            vad_vit_attention_sublayer(m, &w->blocks[l - 1], m->x, B, T);
            mlp_sublayer(m, &w->blocks[l - 1], m->x, B, T);
        }
        for (int i = 0; i < n_layers; i++)
            if (layers[i] == l) memcpy(layer_out[i], m->x, state);
    }
    if (final_out) memcpy(final_out, m->x, state);
    return VAD_OK;
}
