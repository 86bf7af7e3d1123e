#include "bf16_gemm.h"

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "errors.h"
#include "ops.h"
#include "panel_gemm.h"

#define MR 6                      /* rows of C per kernel call (6 x 64 accumulators = 24 zmm) */
#define KC2_MAX 512               /* input pairs per pass over K */
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
    vad_bf16 *abuf;
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

/* C[0:mr, 0:64 (masked)] (+)= A[0:mr, pairs 0:kc2] * b (kc2 pair rows of one panel) (+ bias). */
VAD_TARGET_BF16 static inline __attribute__((always_inline)) void kernel(int kc2, const vad_bf16 *a, size_t lda,
                                                                         const vad_bf16 *b, float *C, int ldc,
                                                                         int mr, const __mmask16 *mk, int load_c,
                                                                         const float *bias) {
    __m512 acc[MR][4];
    const vad_bf16 *ar[MR];
    for (int r = 0; r < MR; r++) ar[r] = a + (size_t)(r < mr ? r : 0) * lda;
    for (int v = 0; v < 4; v++) {
        __m512 bv = bias ? _mm512_maskz_loadu_ps(mk[v], bias + 16 * v) : _mm512_setzero_ps();
        for (int r = 0; r < MR; r++)
            acc[r][v] = load_c && r < mr
                            ? _mm512_add_ps(_mm512_maskz_loadu_ps(mk[v], C + (size_t)r * ldc + 16 * v), bv)
                            : bv;
    }
    for (int p = 0; p < kc2; p++) {
        __m512i b0 = _mm512_loadu_si512((const void *)b), b1 = _mm512_loadu_si512((const void *)(b + 32)),
                b2 = _mm512_loadu_si512((const void *)(b + 64)), b3 = _mm512_loadu_si512((const void *)(b + 96));
        for (int r = 0; r < MR; r++) {
            __m512i av = vad_bcast_pair(ar[r] + 2 * p);
            acc[r][0] = vad_dp_bf16(acc[r][0], av, b0);
            acc[r][1] = vad_dp_bf16(acc[r][1], av, b1);
            acc[r][2] = vad_dp_bf16(acc[r][2], av, b2);
            acc[r][3] = vad_dp_bf16(acc[r][3], av, b3);
        }
        b += 2 * VAD_PANEL;
    }
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16 * v, mk[v], acc[r][v]);
}

/* Panels [j0, j1): K in passes of <= KC2_MAX pairs, rows in blocks that fit in L2, each panel's
 * slice of W reused over all row groups of the block (as panel_gemm.c). */
VAD_TARGET_BF16 static void panels_task(void *vctx, int64_t j0, int64_t j1, int tid) {
    (void)tid;
    const bf16_ctx *c = (const bf16_ctx *)vctx;
    int K2 = (int)pairs_of(c->K), passes = (K2 + KC2_MAX - 1) / KC2_MAX, kc_step = (K2 + passes - 1) / passes;
    size_t lda = 2 * (size_t)K2;
    for (int p0 = 0; p0 < K2; p0 += kc_step) {
        int kc2 = K2 - p0 < kc_step ? K2 - p0 : kc_step;
        int mc_max = BLOCK_BYTES / (kc2 * 4) / MR * MR, blocks;
        if (mc_max < MR) mc_max = MR;
        blocks = (c->M + mc_max - 1) / mc_max;
        int mc_step = ((c->M + blocks - 1) / blocks + MR - 1) / MR * MR;
        int load_c = p0 > 0 || c->beta != 0.0f, last_pass = p0 + kc2 == K2;
        for (int m0 = 0; m0 < c->M; m0 += mc_step) {
            int mb = c->M - m0 < mc_step ? c->M - m0 : mc_step;
            for (int64_t j = j0; j < j1; j++) {
                int n0 = (int)j * VAD_PANEL, left = c->N - n0;
                __mmask16 mk[4];
                for (int v = 0; v < 4; v++) {
                    int q = left - 16 * v;
                    mk[v] = q >= 16 ? (__mmask16)0xffff : q <= 0 ? (__mmask16)0 : (__mmask16)((1u << q) - 1);
                }
                const vad_bf16 *bp = c->packed + ((size_t)j * K2 + p0) * 2 * VAD_PANEL;
                const float *bias = p0 == 0 && c->bias ? c->bias + n0 : NULL;
                for (int i = 0; i < mb; i += MR) {
                    float *tile = c->C + (size_t)(m0 + i) * c->ldc + n0;
                    int rows = mb - i < MR ? mb - i : MR;
                    kernel(kc2, c->abuf + (size_t)(m0 + i) * lda + 2 * (size_t)p0, lda, bp, tile, c->ldc, rows, mk,
                           load_c, bias);
                    if (last_pass && c->act >= 0)
                        vad_activation_rows(tile, c->ldc, rows, left < VAD_PANEL ? left : VAD_PANEL, c->act);
                }
            }
        }
    }
}

void vad_bf16_linear(vad_pool *pool, float *C, int ldc, const float *A, int lda, const vad_bf16 *packed,
                     const float *bias, int M, int N, int K, float beta, int act, vad_bf16 *abuf) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    bf16_ctx c = {C, A, bias, packed, abuf, ldc, lda, M, N, K, beta, act};
    vad_parallel_for(pool, M, 16, round_rows_task, &c);
    vad_parallel_for(pool, (N + VAD_PANEL - 1) / VAD_PANEL, 1, panels_task, &c);
}
#else
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
