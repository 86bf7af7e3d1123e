#include "dropout.h"

static inline uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t vad_dropout_stream(uint64_t seed, int layer, int image, int site, int token) {
    uint64_t key = ((uint64_t)(uint32_t)layer << 40) ^ ((uint64_t)(uint32_t)image << 8) ^
                   (uint64_t)(uint32_t)(site * 2 + token);
    return splitmix64(splitmix64(seed) ^ splitmix64(key));
}

typedef struct {
    float *x;
    uint64_t stream;
    uint32_t threshold; /* drop iff 24-bit draw < threshold */
    float scale;
} dropout_ctx;

static void dropout_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    const dropout_ctx *c = (const dropout_ctx *)vctx;
    for (int64_t i = begin; i < end; i++) {
        uint32_t r = (uint32_t)(splitmix64(c->stream + (uint64_t)i) >> 40);
        c->x[i] *= r < c->threshold ? 0.0f : c->scale;
    }
}

static void mask_apply(vad_pool *pool, float *x, int64_t n, float p, uint64_t stream) {
    if (!(p > 0.0f)) return;
    dropout_ctx c = {x, stream, (uint32_t)((double)p * 16777216.0), 1.0f / (1.0f - p)};
    vad_parallel_for(pool, n, 1 << 14, dropout_task, &c);
}

void vad_dropout_forward(vad_pool *pool, float *x, int64_t n, float p, uint64_t stream) {
    mask_apply(pool, x, n, p, stream);
}

void vad_dropout_backward(vad_pool *pool, float *dx, int64_t n, float p, uint64_t stream) {
    mask_apply(pool, dx, n, p, stream);
}
