/* Workspaces described by one list of buffers, walked twice ("count, then carve"), the way the
 * parameter layouts are: each object has one walk function that calls vad_take() once per
 * buffer. The first walk runs on a counting carver (base NULL) and only sums the sizes; the
 * second runs on the allocated block and hands out the pointers. The size and the layout can
 * therefore never disagree. Every buffer starts on a 64-byte boundary. */
#ifndef VAD_WORKSPACE_H
#define VAD_WORKSPACE_H

#include <stddef.h>
#include <stdlib.h>

#define VAD_WS_ALIGN 64

typedef struct {
    char *base;   /* NULL while counting */
    size_t bytes; /* bytes handed out so far (the block's size after a counting walk) */
} vad_carver;

/* The next buffer of n elements of elsize bytes (NULL while counting). */
static inline void *vad_take(vad_carver *c, size_t n, size_t elsize) {
    c->bytes = (c->bytes + VAD_WS_ALIGN - 1) / VAD_WS_ALIGN * VAD_WS_ALIGN;
    void *p = c->base ? c->base + c->bytes : NULL;
    c->bytes += n * elsize;
    return p;
}

static inline float *vad_take_floats(vad_carver *c, size_t n) { return (float *)vad_take(c, n, sizeof(float)); }
static inline double *vad_take_doubles(vad_carver *c, size_t n) { return (double *)vad_take(c, n, sizeof(double)); }
static inline int *vad_take_ints(vad_carver *c, size_t n) { return (int *)vad_take(c, n, sizeof(int)); }

/* Starts the carving walk on a freshly allocated block of the counted size (NULL when out of
 * memory). The block is freed with free(). */
static inline void *vad_carve_begin(vad_carver *c) {
    size_t bytes = c->bytes ? c->bytes : 1;
    c->base = (char *)aligned_alloc(VAD_WS_ALIGN, (bytes + VAD_WS_ALIGN - 1) / VAD_WS_ALIGN * VAD_WS_ALIGN);
    c->bytes = 0;
    return c->base;
}

#endif
