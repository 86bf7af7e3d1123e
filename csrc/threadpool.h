/* A small fixed pool of worker threads for data-parallel loops.
 * Contract: one caller at a time per pool (the owning model serialises calls). */
#ifndef VAD_THREADPOOL_H
#define VAD_THREADPOOL_H

#include <stdint.h>

typedef struct vad_pool vad_pool;

/* fn processes items [begin, end); tid in [0, nthreads) identifies the worker (for scratch). */
typedef void (*vad_task_fn)(void *ctx, int64_t begin, int64_t end, int tid);

vad_pool *vad_pool_create(int nthreads); /* NULL on failure; nthreads <= 1 runs inline */
void vad_pool_free(vad_pool *pool);
int vad_pool_size(const vad_pool *pool);

/* Splits [0, n) into at most nthreads contiguous chunks (each >= min_chunk items) and runs
 * them in parallel; returns when all are done. pool may be NULL (runs inline). */
void vad_parallel_for(vad_pool *pool, int64_t n, int64_t min_chunk, vad_task_fn fn, void *ctx);

#endif
