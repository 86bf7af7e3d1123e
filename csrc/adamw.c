#include "adamw.h"

#include <math.h>
#include <stdint.h>

vad_adamw_params vad_adamw_default_params(void) {
    vad_adamw_params p = {0.9, 0.999, 1e-8};
    return p;
}

typedef struct {
    float *p, *m, *v;
    const float *g;
    float decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps;
} adamw_ctx;

/* Float arithmetic in torch's order: decay, lerp of m, v update, denom, addcdiv. */
static void adamw_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    const adamw_ctx *c = (const adamw_ctx *)vctx;
    for (int64_t i = begin; i < end; i++) {
        float g = c->g[i];
        float p = c->p[i] * c->decay;
        float m = c->m[i] + c->one_minus_beta1 * (g - c->m[i]);
        float v = c->v[i] * c->beta2 + c->one_minus_beta2 * g * g;
        float denom = sqrtf(v) / c->bc2_sqrt + c->eps;
        c->p[i] = p - c->step_size * (m / denom);
        c->m[i] = m;
        c->v[i] = v;
    }
}

void vad_adamw_step(vad_pool *pool, float *params, const float *grads, float *m, float *v,
                    const vad_adamw_segment *segs, int n_segs, const vad_adamw_params *hp, int step) {
    double bc1 = 1.0 - pow(hp->beta1, step), bc2 = 1.0 - pow(hp->beta2, step);
    for (int s = 0; s < n_segs; s++) {
        const vad_adamw_segment *sg = &segs[s];
        size_t o = sg->offset;
        adamw_ctx c = {params + o, m + o, v + o, grads + o,
                       (float)(1.0 - sg->lr * sg->weight_decay), (float)hp->beta1, (float)hp->beta2,
                       (float)(1.0 - hp->beta1), (float)(1.0 - hp->beta2), (float)(sg->lr / bc1),
                       (float)sqrt(bc2), (float)hp->eps};
        vad_parallel_for(pool, (int64_t)sg->size, 1 << 14, adamw_task, &c);
    }
}

double vad_clip_grad_norm(float *g, size_t n, double max_norm) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)g[i] * g[i];
    double norm = sqrt(s);
    if (!isfinite(norm)) return norm;
    double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) {
        float c = (float)coef;
        for (size_t i = 0; i < n; i++) g[i] *= c;
    }
    return norm;
}

double vad_cosine_annealing_lr(double base_lr, double eta_min, int epoch, int t_max) {
    if (t_max <= 0) return base_lr;
    return eta_min + (base_lr - eta_min) * (1.0 + cos(M_PI * (double)epoch / (double)t_max)) / 2.0;
}
