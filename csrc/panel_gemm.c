#include "panel_gemm.h"

#include <stdatomic.h>
#include <stdint.h>

#include "blas.h"
#include "ops.h"

#define MR 6                      /* rows of C per kernel call (6 x 64 accumulators = 24 zmm) */
#define KC_MAX 1024               /* depth of one pass over K */
#define BLOCK_FLOATS (256 * 1024) /* rows of A one pass keeps in L2: 1 MB, half an L2 */

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
#include <immintrin.h>

#define VAD_AVX512 __attribute__((target("avx512f")))

static int cpu_has_avx512(void) { return __builtin_cpu_supports("avx512f"); }

/* C[0:mr, 0:64 (masked)] (+)= A[0:mr, 0:kc] (rows lda apart) * b (kc x 64 panel rows) (+ bias).
 * A is read in place: each k step broadcasts one value from each of the mr rows (six sequential
 * streams the hardware prefetcher follows), so A needs no packing.
 * Every k step with (k & pf_mask) == 0 also asks for the next cache line from pf to be brought
 * into L2 (pf_mask < 0: none): the caller points pf at the weights it will need next. */
VAD_AVX512 static inline __attribute__((always_inline)) void kernel(int kc, const float *a, size_t lda,
                                                                    const float *b, float *C, int ldc, int mr,
                                                                    const __mmask16 *mk, int load_c, const float *bias,
                                                                    const char *pf, int pf_mask) {
    __m512 acc[MR][4];
    const float *ar[MR];
    for (int r = 0; r < MR; r++) ar[r] = a + (size_t)(r < mr ? r : 0) * lda;
    for (int v = 0; v < 4; v++) {
        __m512 bv = bias ? _mm512_maskz_loadu_ps(mk[v], bias + 16 * v) : _mm512_setzero_ps();
        for (int r = 0; r < MR; r++)
            acc[r][v] = load_c && r < mr
                            ? _mm512_add_ps(_mm512_maskz_loadu_ps(mk[v], C + (size_t)r * ldc + 16 * v), bv)
                            : bv;
    }
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
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16 * v, mk[v], acc[r][v]);
}

/* Panels [j0, j1) of C. Loops: K in passes of <= KC_MAX, rows in blocks that fit half an L2,
 * then each panel over all MR-row groups of the block, so one panel's rows of W stay in L2 while
 * the block of A (also in L2) streams past them. The weights come from memory once per call (a
 * model's weights do not fit in cache): while a panel is in use, its kernel calls prefetch the
 * panel that comes next, spread evenly over them (bursts would outrun the memory bandwidth). */
VAD_AVX512 static void simd_task(void *vctx, int64_t j0, int64_t j1, int tid) {
    const panel_ctx *c = (const panel_ctx *)vctx;
    (void)tid;
    int K = c->K, passes = (K + KC_MAX - 1) / KC_MAX, kc_step = (K + passes - 1) / passes;
    for (int k0 = 0; k0 < K; k0 += kc_step) {
        int kc = K - k0 < kc_step ? K - k0 : kc_step;
        /* row blocks of equal size (in whole micro-panels), each fitting BLOCK_FLOATS */
        int mc_max = BLOCK_FLOATS / kc / MR * MR, blocks = (c->M + mc_max - 1) / mc_max;
        int mc_step = ((c->M + blocks - 1) / blocks + MR - 1) / MR * MR;
        int load_c = k0 > 0 || c->beta != 0.0f, last_pass = k0 + kc == K;
        for (int m0 = 0; m0 < c->M; m0 += mc_step) {
            int mb = c->M - m0 < mc_step ? c->M - m0 : mc_step;
            for (int64_t j = j0; j < j1; j++) {
                int n0 = (int)j * VAD_PANEL, left = c->N - n0;
                __mmask16 mk[4];
                for (int v = 0; v < 4; v++) {
                    int q = left - 16 * v;
                    mk[v] = q >= 16 ? (__mmask16)0xffff : q <= 0 ? (__mmask16)0 : (__mmask16)((1u << q) - 1);
                }
                const float *bp = c->panels + ((size_t)j * K + k0) * VAD_PANEL;
                const float *bias = k0 == 0 && c->bias ? c->bias + n0 : NULL;
                /* next: the following panel, else the first one again for the next row block or pass */
                int64_t jn = j + 1 < j1 ? j + 1 : j0;
                int kn = j + 1 < j1 || m0 + mb < c->M ? k0 : k0 + kc;
                const char *next = (const char *)(c->panels + ((size_t)jn * K + kn) * VAD_PANEL);
                /* the next panel's kc rows are 4*kc lines: each of the n_calls kernel calls takes
                 * one line every `every` k steps (a power of two), `per_call` lines in all */
                int n_calls = (mb + MR - 1) / MR, every = 1;
                while (every * 2 * 4 <= n_calls) every *= 2;
                size_t per_call = (size_t)((kc + every - 1) / every), lines = (size_t)4 * kc;
                for (int i = 0; i < mb; i += MR) {
                    size_t first = (size_t)(i / MR) * per_call;
                    int pf_mask = kn < K && first < lines ? every - 1 : -1;
                    float *tile = c->C + (size_t)(m0 + i) * c->ldc + n0;
                    int rows = mb - i < MR ? mb - i : MR;
                    kernel(kc, c->A + (size_t)(m0 + i) * c->lda + k0, (size_t)c->lda, bp, tile, c->ldc, rows, mk,
                           load_c, bias, next + first * 64, pf_mask);
                    if (last_pass && c->act >= 0)
                        vad_activation_rows(tile, c->ldc, rows, left < VAD_PANEL ? left : VAD_PANEL, c->act);
                }
            }
        }
    }
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
