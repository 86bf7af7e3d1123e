/* The engine's documented size limits and overflow-checked size arithmetic, in one place.
 *
 * Every size that reaches the engine from a file or an argument is checked against these bounds
 * before anything is allocated (the glue and the config checks), so that every product of sizes
 * the engine forms fits comfortably in size_t and int. visualad/limits.py holds the same values
 * for the Python side (a test checks they agree, through _engine.limits()). */
#ifndef VAD_VAD_LIMITS_H
#define VAD_VAD_LIMITS_H

#include <stddef.h>
#include <stdint.h>

#define VAD_MAX_WIDTH 16384      /* backbone width D (largest released ViT: 1536..1664) */
#define VAD_MAX_DEPTH 256        /* transformer blocks */
#define VAD_MAX_HEADS 1024       /* attention heads */
#define VAD_MAX_PATCH 64         /* patch side P */
#define VAD_MAX_GRID 1024        /* native position grid G0 (positions: 1 + G0^2) */
#define VAD_MAX_REGISTERS 64     /* DINOv2 register tokens */
#define VAD_MAX_MLP_HIDDEN 65536 /* MLP hidden width (each half for SwiGLU) */
#define VAD_MAX_IMAGE_SIDE 8192  /* input side S */
#define VAD_MAX_THREADS 256      /* no thread pool is ever larger */
#define VAD_MAX_LAYERS 64        /* layers one call may ask for (features, the head's used layers) */

/* *out = a * b; returns 0 on overflow (then *out is left unchanged). */
static inline int vad_mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}

/* *out = a + b; returns 0 on overflow. */
static inline int vad_add_size(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return 0;
    *out = a + b;
    return 1;
}

#endif
