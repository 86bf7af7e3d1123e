#include "bf16_gemm.h"

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "errors.h"
#include "ops.h"
#include "panel_gemm.h"
#include "panel_tile.h"

#define MR VAD_TILE_ROWS
#define KC2_MAX 1536              /* input pairs per pass over K (ViT-B/16 fc2, K 3072, in one) */
#define BLOCK_BYTES (512 * 1024)  /* rows of bf16 A one pass keeps in L2 */

static size_t pairs_of(int K) { return (size_t)(K + 1) / 2; }

size_t vad_bf16_panel_elems(int N, int K) {
    return (size_t)((N + VAD_PANEL - 1) / VAD_PANEL) * VAD_PANEL * 2 * pairs_of(K);
}

size_t vad_bf16_input_elems(int M, int K) { return (size_t)M * 2 * pairs_of(K); }

void vad_bf16_pack(vad_bf16 *dst, const float *src, int N, int K, size_t stride_n, size_t stride_k) {
    size_t K2 = pairs_of(K), panels = (size_t)(N + VAD_PANEL - 1) / VAD_PANEL;
    for (size_t j = 0; j < panels; j++)
        for (size_t p = 0; p < K2; p++) {
            vad_bf16 *row = dst + (j * K2 + p) * VAD_PANEL * 2;
            for (int c = 0; c < VAD_PANEL; c++) {
                size_t n = j * VAD_PANEL + (size_t)c;
                for (int e = 0; e < 2; e++) {
                    size_t k = 2 * p + (size_t)e;
                    row[2 * c + e] = n < (size_t)N && k < (size_t)K ? vad_to_bf16(src[n * stride_n + k * stride_k]) : 0;
                }
            }
        }
}

typedef struct {
    float *C;
    const float *A, *bias;
    const vad_bf16 *packed;
    const vad_bf16 *in16; /* the rounded input rows the product reads */
    vad_bf16 *abuf;       /* where round_rows_task writes them */
    int ldc, lda, M, N, K;
    float beta;
    int act;
} bf16_ctx;

#ifdef VAD_HAVE_BF16_KERNELS
/* abuf rows [r0, r1) = bf16(A rows), each 2 * pairs_of(K) long (zero past K). */
VAD_TARGET_BF16 static void round_rows_task(void *vctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const bf16_ctx *c = (const bf16_ctx *)vctx;
    int K = c->K, Kp = (int)(2 * pairs_of(K));
    for (int64_t r = r0; r < r1; r++) {
        const float *a = c->A + (size_t)r * c->lda;
        vad_bf16 *o = c->abuf + (size_t)r * Kp;
        int k = 0;
        for (; k + 32 <= K; k += 32) vad_store_bf16x32(o + k, _mm512_loadu_ps(a + k), _mm512_loadu_ps(a + k + 16));
        if (k < K) {
            int left = K - k;
            __mmask16 m0 = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            __mmask16 m1 = left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
            __m512i v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m1, a + k + 16), _mm512_maskz_loadu_ps(m0, a + k));
            int n = Kp - k; /* rounded values plus the zero pad, up to 32 */
            _mm512_mask_storeu_epi16(o + k, n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1), v);
        }
    }
}

/* The bf16 vad_tile_kernel: a steps are bf16 pairs, b rows 64 pairs. */
VAD_TARGET_BF16 static void kernel(int kc2, const char *a, size_t a_row_bytes, const char *bb, float *C, int ldc,
                                   int mr, const __mmask16 *mk, int load_c, const float *bias, const char *pf,
                                   int pf_mask) {
    __m512 acc[MR][4];
    const vad_bf16 *ar[MR], *b = (const vad_bf16 *)bb;
    for (int r = 0; r < MR; r++) ar[r] = (const vad_bf16 *)(a + (size_t)(r < mr ? r : 0) * a_row_bytes);
    vad_tile_load(acc, C, ldc, mr, mk, load_c, bias);
    for (int p = 0; p < kc2; p++) {
        __m512i b0 = _mm512_loadu_si512((const void *)b), b1 = _mm512_loadu_si512((const void *)(b + 32)),
                b2 = _mm512_loadu_si512((const void *)(b + 64)), b3 = _mm512_loadu_si512((const void *)(b + 96));
        if (pf_mask >= 0 && (p & pf_mask) == 0) {
            _mm_prefetch(pf, _MM_HINT_T1);
            pf += 64;
        }
        for (int r = 0; r < MR; r++) {
            __m512i av = vad_bcast_pair(ar[r] + 2 * p);
            acc[r][0] = vad_dp_bf16(acc[r][0], av, b0);
            acc[r][1] = vad_dp_bf16(acc[r][1], av, b1);
            acc[r][2] = vad_dp_bf16(acc[r][2], av, b2);
            acc[r][3] = vad_dp_bf16(acc[r][3], av, b3);
        }
        b += 2 * VAD_PANEL;
    }
    vad_tile_store(C, ldc, mr, mk, acc);
}

/* Panels [j0, j1) of C (vad_panel_run); passes of <= KC2_MAX pairs, row blocks of BLOCK_BYTES. */
VAD_TARGET_BF16 static void panels_task(void *vctx, int64_t j0, int64_t j1, int tid) {
    (void)tid;
    const bf16_ctx *c = (const bf16_ctx *)vctx;
    int K2 = (int)pairs_of(c->K);
    vad_panel_job job = {c->C, (const char *)c->in16, (const char *)c->packed, c->bias, (size_t)K2 * 4, BLOCK_BYTES,
                         c->ldc, c->M, c->N, K2, KC2_MAX, c->beta, c->act};
    vad_panel_run(&job, j0, j1, kernel);
}

void vad_bf16_linear_rounded(vad_pool *pool, float *C, int ldc, const vad_bf16 *A, const vad_bf16 *packed,
                             const float *bias, int M, int N, int K, float beta, int act) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    bf16_ctx c = {C, NULL, bias, packed, A, NULL, ldc, 0, M, N, K, beta, act};
    vad_parallel_for(pool, (N + VAD_PANEL - 1) / VAD_PANEL, 1, panels_task, &c);
}

void vad_bf16_linear(vad_pool *pool, float *C, int ldc, const float *A, int lda, const vad_bf16 *packed,
                     const float *bias, int M, int N, int K, float beta, int act, vad_bf16 *abuf) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    bf16_ctx c = {C, A, bias, packed, NULL, abuf, ldc, lda, M, N, K, beta, act};
    vad_parallel_for(pool, M, 16, round_rows_task, &c);
    vad_bf16_linear_rounded(pool, C, ldc, abuf, packed, bias, M, N, K, beta, act);
}
#else
void vad_bf16_linear_rounded(vad_pool *pool, float *C, int ldc, const vad_bf16 *A, const vad_bf16 *packed,
                             const float *bias, int M, int N, int K, float beta, int act) {
    (void)pool, (void)C, (void)ldc, (void)A, (void)packed, (void)bias, (void)M, (void)N, (void)K, (void)beta, (void)act;
}

void vad_bf16_linear(vad_pool *pool, float *C, int ldc, const float *A, int lda, const vad_bf16 *packed,
                     const float *bias, int M, int N, int K, float beta, int act, vad_bf16 *abuf) {
    (void)pool, (void)C, (void)ldc, (void)A, (void)lda, (void)packed, (void)bias, (void)M, (void)N, (void)K;
    (void)beta, (void)act, (void)abuf;
}
#endif

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int vad_bf16_gemm_benchmark(int M, int N, int K, int repeats, int nthreads, double *best_seconds) {
    size_t na = (size_t)M * K, nw = (size_t)N * K, nc = (size_t)M * N;
    float *a = (float *)malloc((na + nw + nc) * sizeof(float));
    vad_bf16 *w = (vad_bf16 *)malloc(vad_bf16_panel_elems(N, K) * sizeof(vad_bf16));
    vad_bf16 *abuf = (vad_bf16 *)malloc(vad_bf16_input_elems(M, K) * sizeof(vad_bf16));
    vad_pool *pool = vad_pool_create(nthreads);
    if (!a || !w || !abuf || !pool) {
        free(a), free(w), free(abuf);
        vad_pool_free(pool);
        return vad_fail(VAD_ERR_MEMORY, "out of memory in the bf16 GEMM probe");
    }
    for (size_t i = 0; i < na + nw; i++) a[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
    vad_bf16_pack(w, a + na, N, K, (size_t)K, 1);
    double best = 1e30;
    for (int r = 0; r <= repeats; r++) { /* first run is a warm-up */
        double t0 = now_seconds();
        vad_bf16_linear(pool, a + na + nw, N, a, K, w, NULL, M, N, K, 0.0f, -1, abuf);
        double dt = now_seconds() - t0;
        if (r > 0 && dt < best) best = dt;
    }
    *best_seconds = best;
    free(a), free(w), free(abuf);
    vad_pool_free(pool);
    return VAD_OK;
}
