/* What the two panel products share (panel_gemm.c in fp32, bf16_gemm.c in bf16 pairs): a tile of
 * VAD_TILE_ROWS x VAD_PANEL outputs held in 24 zmm accumulators, set up from the bias and the
 * current C and stored back under the panel's column masks, and the loops that run a kernel over
 * the tiles of a range of panels. Both products step along K in units of 4 bytes of A (one float,
 * or one bf16 pair) and 256 bytes of a panel (64 floats, or 64 pairs).
 * The helpers are AVX-512F and always inlined; the bf16 code (a superset target) inlines them too. */
#ifndef VAD_PANEL_TILE_H
#define VAD_PANEL_TILE_H

#include <stddef.h>
#include <stdint.h>

#include "ops.h"
#include "panel_gemm.h"

#define VAD_TILE_ROWS 6 /* rows of C per kernel call (6 x 64 accumulators = 24 zmm) */

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define VAD_TARGET_AVX512 __attribute__((target("avx512f")))

/* Column masks of a panel starting `left` columns before the end of C (all ones for a full panel). */
VAD_TARGET_AVX512 static inline __attribute__((always_inline)) void vad_tile_masks(__mmask16 mk[4], int left) {
    for (int v = 0; v < 4; v++) {
        int q = left - 16 * v;
        mk[v] = q >= 16 ? (__mmask16)0xffff : q <= 0 ? (__mmask16)0 : (__mmask16)((1u << q) - 1);
    }
}

/* acc[r][v] = bias (NULL: 0) + (load_c and r < mr ? C[r, 16v : 16v+16] : 0), masked by mk. */
VAD_TARGET_AVX512 static inline __attribute__((always_inline)) void vad_tile_load(__m512 acc[VAD_TILE_ROWS][4],
                                                                                 const float *C, int ldc, int mr,
                                                                                 const __mmask16 *mk, int load_c,
                                                                                 const float *bias) {
    for (int v = 0; v < 4; v++) {
        __m512 bv = bias ? _mm512_maskz_loadu_ps(mk[v], bias + 16 * v) : _mm512_setzero_ps();
        for (int r = 0; r < VAD_TILE_ROWS; r++)
            acc[r][v] = load_c && r < mr
                            ? _mm512_add_ps(_mm512_maskz_loadu_ps(mk[v], C + (size_t)r * ldc + 16 * v), bv)
                            : bv;
    }
}

/* C[0:mr, masked columns] = acc. */
VAD_TARGET_AVX512 static inline __attribute__((always_inline)) void vad_tile_store(float *C, int ldc, int mr,
                                                                                  const __mmask16 *mk,
                                                                                  __m512 acc[VAD_TILE_ROWS][4]) {
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16 * v, mk[v], acc[r][v]);
}
/* C[0:mr, 0:64 (masked)] (+)= A[0:mr, steps 0:steps] (rows a_row_bytes apart) * b (steps rows of
 * 256 bytes of one panel) (+ bias), C loaded first when load_c; every step with (k & pf_mask) == 0
 * also asks for the next cache line from pf to be brought into L2 (pf_mask < 0: none). */
typedef void (*vad_tile_kernel)(int steps, const char *a, size_t a_row_bytes, const char *b, float *C, int ldc, int mr,
                                const __mmask16 *mk, int load_c, const float *bias, const char *pf, int pf_mask);

typedef struct {
    float *C;
    const char *A, *panels; /* A: M rows a_row_bytes apart; panels: 256 * steps bytes each */
    const float *bias;
    size_t a_row_bytes, block_bytes; /* block_bytes: A rows one pass keeps in L2 */
    int ldc, M, N, steps, max_steps; /* steps: K steps in all; max_steps: per pass */
    float beta;
    int act; /* ops.h activation, -1 none */
} vad_panel_job;

/* Panels [j0, j1) of C. Loops: K in equal passes of <= max_steps, rows in blocks of block_bytes
 * of A, then each panel over all row tiles of the block, so one panel's slice stays in L2 while the
 * block of A (also in L2) streams past it. The weights come from memory once per call (a model's
 * weights do not fit in cache): while a panel is in use, its kernel calls prefetch the panel that
 * comes next, spread evenly over them (bursts would outrun the memory bandwidth). The activation is
 * applied to each tile after its last pass. */
VAD_TARGET_AVX512 static inline __attribute__((always_inline)) void vad_panel_run(const vad_panel_job *c, int64_t j0,
                                                                                 int64_t j1, vad_tile_kernel kernel) {
    const int MR = VAD_TILE_ROWS;
    int K = c->steps, passes = (K + c->max_steps - 1) / c->max_steps, kc_step = (K + passes - 1) / passes;
    for (int k0 = 0; k0 < K; k0 += kc_step) {
        int kc = K - k0 < kc_step ? K - k0 : kc_step;
        /* row blocks of equal size (in whole tiles), each fitting block_bytes */
        int mc_max = (int)(c->block_bytes / ((size_t)kc * 4)) / MR * MR, blocks;
        if (mc_max < MR) mc_max = MR;
        blocks = (c->M + mc_max - 1) / mc_max;
        int mc_step = ((c->M + blocks - 1) / blocks + MR - 1) / MR * MR;
        int load_c = k0 > 0 || c->beta != 0.0f, last_pass = k0 + kc == K;
        for (int m0 = 0; m0 < c->M; m0 += mc_step) {
            int mb = c->M - m0 < mc_step ? c->M - m0 : mc_step;
            for (int64_t j = j0; j < j1; j++) {
                int n0 = (int)j * VAD_PANEL, left = c->N - n0;
                __mmask16 mk[4];
                vad_tile_masks(mk, left);
                const char *bp = c->panels + ((size_t)j * K + k0) * 256;
                const float *bias = k0 == 0 && c->bias ? c->bias + n0 : NULL;
                /* next: the following panel, else the first one again for the next row block or pass */
                int64_t jn = j + 1 < j1 ? j + 1 : j0;
                int kn = j + 1 < j1 || m0 + mb < c->M ? k0 : k0 + kc;
                const char *next = c->panels + ((size_t)jn * K + kn) * 256;
                /* the next panel's kc steps are 4*kc lines: each of the n_calls kernel calls takes
                 * one line every `every` steps (a power of two), `per_call` lines in all */
                int n_calls = (mb + MR - 1) / MR, every = 1;
                while (every * 2 * 4 <= n_calls) every *= 2;
                size_t per_call = (size_t)((kc + every - 1) / every), lines = (size_t)4 * kc;
                for (int i = 0; i < mb; i += MR) {
                    size_t first = (size_t)(i / MR) * per_call;
                    int pf_mask = kn < K && first < lines ? every - 1 : -1;
                    float *tile = c->C + (size_t)(m0 + i) * c->ldc + n0;
                    int rows = mb - i < MR ? mb - i : MR;
                    kernel(kc, c->A + (size_t)(m0 + i) * c->a_row_bytes + (size_t)k0 * 4, c->a_row_bytes, bp, tile,
                           c->ldc, rows, mk, load_c, bias, next + first * 64, pf_mask);
                    if (last_pass && c->act >= 0)
                        vad_activation_rows(tile, c->ldc, rows, left < VAD_PANEL ? left : VAD_PANEL, c->act);
                }
            }
        }
    }
}
#endif

#endif
