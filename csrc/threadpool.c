#include "threadpool.h"

#include <pthread.h>
#include <stdlib.h>

#include "blas.h"
#include "vad_limits.h"

struct vad_pool {
    int nthreads; /* including the calling thread */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    uint64_t generation;
    int pending;
    int shutdown;
    /* current job */
    vad_task_fn fn;
    void *ctx;
    int64_t n, chunk;
};

typedef struct {
    vad_pool *pool;
    int tid;
} worker_arg;

static void run_chunk(vad_pool *p, int tid) {
    int64_t begin = (int64_t)tid * p->chunk;
    int64_t end = begin + p->chunk;
    if (end > p->n) end = p->n;
    if (begin < end) p->fn(p->ctx, begin, end, tid);
}

static void *worker_main(void *arg) {
    worker_arg *wa = (worker_arg *)arg;
    vad_pool *p = wa->pool;
    int tid = wa->tid;
    free(wa);
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->shutdown && p->generation == seen) pthread_cond_wait(&p->work_cv, &p->mu);
        if (p->shutdown) break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        run_chunk(p, tid);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->done_cv);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

vad_pool *vad_pool_create(int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > VAD_MAX_THREADS) nthreads = VAD_MAX_THREADS; /* the documented maximum */
    vad_blas_single_thread();
    vad_pool *p = (vad_pool *)calloc(1, sizeof(vad_pool));
    if (!p) return NULL;
    p->nthreads = 1;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work_cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    if (nthreads > 1) {
        p->threads = (pthread_t *)calloc((size_t)nthreads, sizeof(pthread_t));
        if (!p->threads) {
            vad_pool_free(p);
            return NULL;
        }
        for (int t = 1; t < nthreads; t++) {
            worker_arg *wa = (worker_arg *)malloc(sizeof(worker_arg));
            if (!wa) break;
            wa->pool = p;
            wa->tid = t;
            if (pthread_create(&p->threads[t], NULL, worker_main, wa) != 0) {
                free(wa);
                break;
            }
            p->nthreads = t + 1;
        }
    }
    return p;
}

void vad_pool_free(vad_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->shutdown = 1;
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    for (int t = 1; t < p->nthreads; t++) pthread_join(p->threads[t], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->work_cv);
    pthread_cond_destroy(&p->done_cv);
    free(p->threads);
    free(p);
}

int vad_pool_size(const vad_pool *p) { return p ? p->nthreads : 1; }

void vad_parallel_for(vad_pool *p, int64_t n, int64_t min_chunk, vad_task_fn fn, void *ctx) {
    if (n <= 0) return;
    if (min_chunk < 1) min_chunk = 1;
    int workers = p ? p->nthreads : 1;
    int64_t max_workers = (n + min_chunk - 1) / min_chunk;
    if (max_workers < workers) workers = (int)max_workers;
    if (workers <= 1) {
        fn(ctx, 0, n, 0);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    p->chunk = (n + workers - 1) / workers;
    /* workers beyond ceil(n/chunk) get empty ranges; all nthreads-1 helpers take part */
    p->pending = p->nthreads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    run_chunk(p, 0);
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0) pthread_cond_wait(&p->done_cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
