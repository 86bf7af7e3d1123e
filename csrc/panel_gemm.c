#include "panel_gemm.h"

#include <stdatomic.h>
#include <stdint.h>

#include "blas.h"
#include "ops.h"
#include "panel_tile.h"

#define MR VAD_TILE_ROWS
#define KC_MAX 1024               /* depth of one pass over K */
#define BLOCK_BYTES (1024 * 1024) /* rows of A one pass keeps in L2: half an L2 */

static atomic_int simd_enabled = 1;

size_t vad_panel_floats(int N, int K) {
    return (size_t)((N + VAD_PANEL - 1) / VAD_PANEL) * VAD_PANEL * (size_t)K;
}

void vad_panel_unpack(float *W, const float *panels, int N, int K) {
    for (int n = 0; n < N; n++) {
        const float *src = panels + (size_t)(n / VAD_PANEL) * K * VAD_PANEL + n % VAD_PANEL;
        float *dst = W + (size_t)n * K;
        for (int k = 0; k < K; k++) dst[k] = src[(size_t)k * VAD_PANEL];
    }
}

typedef struct {
    float *C;
    const float *A, *panels, *bias;
    int ldc, lda, M, N, K;
    float beta;
    int act;
} panel_ctx;

/* Every panel through BLAS: C[:, 64j : 64j+w] = A P_j (P_j is [K][64], row-major). */
static void blas_task(void *vctx, int64_t j0, int64_t j1, int tid) {
    (void)tid;
    const panel_ctx *c = (const panel_ctx *)vctx;
    for (int64_t j = j0; j < j1; j++) {
        int n0 = (int)j * VAD_PANEL, w = c->N - n0 < VAD_PANEL ? c->N - n0 : VAD_PANEL;
        vad_sgemm(0, 0, c->M, w, c->K, 1.0f, c->A, c->lda, c->panels + (size_t)j * c->K * VAD_PANEL, VAD_PANEL,
                  c->beta, c->C + n0, c->ldc);
        if (c->bias)
            for (int m = 0; m < c->M; m++) {
                float *o = c->C + (size_t)m * c->ldc + n0;
                for (int n = 0; n < w; n++) o[n] += c->bias[n0 + n];
            }
        if (c->act >= 0) vad_activation_rows(c->C + n0, c->ldc, c->M, w, c->act);
    }
}

#if defined(__x86_64__) || defined(__i386__)
static int cpu_has_avx512(void) { return __builtin_cpu_supports("avx512f"); }

/* The fp32 vad_tile_kernel: a steps are floats, b rows 64 floats. A is read in place: each k step
 * broadcasts one value from each of the mr rows (six sequential streams the hardware prefetcher
 * follows), so A needs no packing. */
VAD_TARGET_AVX512 static void kernel(int kc, const char *a, size_t a_row_bytes, const char *bb, float *C, int ldc,
                                     int mr, const __mmask16 *mk, int load_c, const float *bias, const char *pf,
                                     int pf_mask) {
    __m512 acc[MR][4];
    const float *ar[MR], *b = (const float *)bb;
    for (int r = 0; r < MR; r++) ar[r] = (const float *)(a + (size_t)(r < mr ? r : 0) * a_row_bytes);
    vad_tile_load(acc, C, ldc, mr, mk, load_c, bias);
    for (int k = 0; k < kc; k++) {
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32),
               b3 = _mm512_loadu_ps(b + 48);
        if (pf_mask >= 0 && (k & pf_mask) == 0) {
            _mm_prefetch(pf, _MM_HINT_T1);
            pf += 64;
        }
        for (int r = 0; r < MR; r++) {
            __m512 av = _mm512_set1_ps(ar[r][k]);
            acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(av, b3, acc[r][3]);
        }
        b += VAD_PANEL;
    }
    vad_tile_store(C, ldc, mr, mk, acc);
}

/* Panels [j0, j1) of C (vad_panel_run); passes of <= KC_MAX, row blocks of half an L2. */
VAD_TARGET_AVX512 static void simd_task(void *vctx, int64_t j0, int64_t j1, int tid) {
    const panel_ctx *c = (const panel_ctx *)vctx;
    (void)tid;
    vad_panel_job job = {c->C, (const char *)c->A, (const char *)c->panels, c->bias, (size_t)c->lda * 4, BLOCK_BYTES,
                         c->ldc, c->M, c->N, c->K, KC_MAX, c->beta, c->act};
    vad_panel_run(&job, j0, j1, kernel);
}
#else
static int cpu_has_avx512(void) { return 0; }
#endif

int vad_panel_simd_active(void) { return atomic_load(&simd_enabled) && cpu_has_avx512(); }

int vad_panel_set_simd(int enable) {
    int prev = vad_panel_simd_active();
    atomic_store(&simd_enabled, enable ? 1 : 0);
    return prev;
}

void vad_panel_linear(vad_pool *pool, float *C, int ldc, const float *A, int lda, const float *panels,
                      const float *bias, int M, int N, int K, float beta, int act) {
    if (M <= 0 || N <= 0) return;
    panel_ctx c = {C, A, panels, bias, ldc, lda, M, N, K, beta, act};
    int64_t n_panels = (N + VAD_PANEL - 1) / VAD_PANEL;
#if defined(__x86_64__) || defined(__i386__)
    if (vad_panel_simd_active() && K > 0) {
        vad_parallel_for(pool, n_panels, 1, simd_task, &c);
        return;
    }
#endif
    vad_parallel_for(pool, n_panels, 1, blas_task, &c);
}
