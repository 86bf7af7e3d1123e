#include "attention_fused.h"

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "cpu_features.h"
#include "mathfun.h"

#define QR 6  /* query rows per register block (6 x 64 scores = 24 zmm) */
#define KB 64 /* keys per block */

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

/* Per-worker scratch in floats: packed K and V of one head, the query rows (bf16), the output
 * and probability blocks. Sized for the larger of the two precisions. */
static size_t worker_floats(int T, int dh) {
    size_t nkb = (size_t)(T + KB - 1) / KB, dhv = round16((size_t)dh), dh2 = ((size_t)dh + 1) / 2;
    size_t f32 = round16(nkb * dh * KB) + round16(nkb * KB * dhv);
    size_t b16 = round16(nkb * dh2 * KB) + round16(nkb * (KB / 2) * dhv) + round16((size_t)T * dh2);
    return (f32 > b16 ? f32 : b16) + round16(QR * dhv) + round16(QR * KB);
}

size_t vad_attention_fused_scratch(int T, int head_dim, int nthreads) {
    return (size_t)nthreads * worker_floats(T, head_dim);
}

static atomic_int fp32_enabled = 1;

int vad_attention_fused_available(int precision) {
    const vad_cpu_features *f = vad_cpu_features_get();
    if (precision == VAD_BF16) return vad_precision_kernel(VAD_BF16) == VAD_KERNEL_AVX512BF16;
    return f->avx512f && atomic_load(&fp32_enabled);
}

int vad_attention_fused_set_fp32(int enable) {
    int prev = atomic_load(&fp32_enabled);
    atomic_store(&fp32_enabled, enable ? 1 : 0);
    return prev;
}

typedef struct {
    float *out, *scratch;
    const float *qkv;
    int T, D, heads, precision;
} fused_ctx;

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define VAD_AVX512 __attribute__((target("avx512f")))

/* vad_expf (mathfun.h) on 16 lanes, the same operations in the same order. */
VAD_AVX512 static inline __attribute__((always_inline)) __m512 exp16(__m512 x) {
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), magic), magic);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_add_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
    __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}

static __mmask16 lanes(int n) { return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* Online-softmax step for one query row and one key block: s (4 x 16 raw scores, nk valid) ->
 * probabilities p (stored to prow, 0 past nk), running max *m and sum *l; returns the factor the
 * row's output accumulated so far must be multiplied by. */
VAD_AVX512 static inline __attribute__((always_inline)) float softmax_step(const __m512 *s, int nk, float scale,
                                                                           float *m, float *l, __m512 *p) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int v = 0; v < 4; v++) mx = _mm512_mask_max_ps(mx, lanes(nk - 16 * v), mx, s[v]);
    float bm = _mm512_reduce_max_ps(mx), m_new = bm > *m ? bm : *m;
    /* exp(0) is exactly 1: skip it when the maximum did not grow (most blocks after the first) */
    float alpha = *m == -INFINITY ? 0.0f : m_new == *m ? 1.0f : vad_expf((*m - m_new) * scale);
    __m512 sum = _mm512_setzero_ps(), mv = _mm512_set1_ps(m_new), sc = _mm512_set1_ps(scale);
    for (int v = 0; v < 4; v++) {
        p[v] = _mm512_maskz_mov_ps(lanes(nk - 16 * v), exp16(_mm512_mul_ps(_mm512_sub_ps(s[v], mv), sc)));
        sum = _mm512_add_ps(sum, p[v]);
    }
    *l = *l * alpha + _mm512_reduce_add_ps(sum);
    *m = m_new;
    return alpha;
}

/* o[r, :] *= alpha for one row of the output accumulator (dhv floats). */
VAD_AVX512 static void scale_row(float *o, int dhv, float alpha) {
    if (alpha == 1.0f) return;
    __m512 a = _mm512_set1_ps(alpha);
    for (int d = 0; d < dhv; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), a));
}

/* out rows r0.. (mr of them, stride ldo) = acc / l */
static void finish_rows(float *out, int ldo, const float *acc, int dhv, const float *l, int mr, int dh) {
    for (int r = 0; r < mr; r++) {
        float inv = 1.0f / l[r];
        for (int d = 0; d < dh; d++) out[(size_t)r * ldo + d] = acc[(size_t)r * dhv + d] * inv;
    }
}

/* ---------------------------------------------------------------- fp32 */

/* K as key blocks [kb][d][64] (transposed, zero past T); V as rows [t][dhv] (zero padded). */
static void pack_f32(const float *K, const float *V, int ld, int T, int dh, int dhv, float *Kt, float *Vp) {
    int nkb = (T + KB - 1) / KB;
    for (int t = 0; t < nkb * KB; t++) {
        float *kt = Kt + (size_t)(t / KB) * dh * KB + t % KB, *vp = Vp + (size_t)t * dhv;
        for (int d = 0; d < dh; d++) kt[(size_t)d * KB] = t < T ? K[(size_t)t * ld + d] : 0.0f;
        for (int d = 0; d < dhv; d++) vp[d] = t < T && d < dh ? V[(size_t)t * ld + d] : 0.0f;
    }
}

/* One head: out [T, dh] (stride ldo) from Q, K, V [T, dh] (stride ld). w: worker scratch. */
VAD_AVX512 static void head_f32(float *out, int ldo, const float *Q, const float *K, const float *V, int ld, int T,
                                int dh, float *w) {
    int nkb = (T + KB - 1) / KB, dhv = (int)round16((size_t)dh);
    float scale = 1.0f / sqrtf((float)dh);
    float *Kt = w, *Vp = Kt + round16((size_t)nkb * dh * KB), *acc = Vp + round16((size_t)nkb * KB * dhv);
    float *P = acc + round16((size_t)QR * dhv);
    pack_f32(K, V, ld, T, dh, dhv, Kt, Vp);
    for (int r0 = 0; r0 < T; r0 += QR) {
        int mr = T - r0 < QR ? T - r0 : QR;
        const float *q[QR];
        float m[QR], l[QR];
        for (int r = 0; r < QR; r++) {
            q[r] = Q + (size_t)(r0 + (r < mr ? r : 0)) * ld;
            m[r] = -INFINITY;
            l[r] = 0.0f;
        }
        memset(acc, 0, (size_t)QR * dhv * sizeof(float));
        for (int kb = 0; kb < nkb; kb++) {
            int nk = T - kb * KB < KB ? T - kb * KB : KB;
            const float *kt = Kt + (size_t)kb * dh * KB;
            __m512 s[QR][4];
            for (int r = 0; r < QR; r++)
                for (int v = 0; v < 4; v++) s[r][v] = _mm512_setzero_ps();
            for (int d = 0; d < dh; d++) {
                __m512 b0 = _mm512_loadu_ps(kt), b1 = _mm512_loadu_ps(kt + 16), b2 = _mm512_loadu_ps(kt + 32),
                       b3 = _mm512_loadu_ps(kt + 48);
                for (int r = 0; r < QR; r++) {
                    __m512 a = _mm512_set1_ps(q[r][d]);
                    s[r][0] = _mm512_fmadd_ps(a, b0, s[r][0]);
                    s[r][1] = _mm512_fmadd_ps(a, b1, s[r][1]);
                    s[r][2] = _mm512_fmadd_ps(a, b2, s[r][2]);
                    s[r][3] = _mm512_fmadd_ps(a, b3, s[r][3]);
                }
                kt += KB;
            }
            /* all QR rows (those past mr repeat row 0 and are dropped): constant indices keep s in registers */
            for (int r = 0; r < QR; r++) {
                __m512 p[4];
                scale_row(acc + (size_t)r * dhv, dhv, softmax_step(s[r], nk, scale, &m[r], &l[r], p));
                for (int v = 0; v < 4; v++) _mm512_storeu_ps(P + r * KB + 16 * v, p[v]);
            }
            /* acc += P V_block, up to 64 output columns at a time */
            const float *vb = Vp + (size_t)kb * KB * dhv;
            for (int g = 0; g < dhv; g += 64) {
                __mmask16 mk[4];
                __m512 o[QR][4];
                for (int v = 0; v < 4; v++) mk[v] = lanes(dhv - g - 16 * v);
                for (int r = 0; r < QR; r++)
                    for (int v = 0; v < 4; v++) o[r][v] = _mm512_maskz_loadu_ps(mk[v], acc + (size_t)r * dhv + g + 16 * v);
                for (int j = 0; j < nk; j++) {
                    const float *vr = vb + (size_t)j * dhv + g;
                    __m512 b[4];
                    for (int v = 0; v < 4; v++) b[v] = _mm512_maskz_loadu_ps(mk[v], vr + 16 * v);
                    for (int r = 0; r < QR; r++) {
                        __m512 a = _mm512_set1_ps(P[r * KB + j]);
                        for (int v = 0; v < 4; v++) o[r][v] = _mm512_fmadd_ps(a, b[v], o[r][v]);
                    }
                }
                for (int r = 0; r < QR; r++)
                    for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(acc + (size_t)r * dhv + g + 16 * v, mk[v], o[r][v]);
            }
        }
        finish_rows(out + (size_t)r0 * ldo, ldo, acc, dhv, l, mr, dh);
    }
}

/* ---------------------------------------------------------------- bf16 */
#ifdef VAD_HAVE_BF16_KERNELS

/* bf16 operands: K as key blocks [kb][pair p][64 keys][2] (dims 2p, 2p+1), V as key pairs
 * [q][dhv][2] (keys 2q, 2q+1), Q as rows [t][2 * dh2]; zero past T and past dh. */
static void pack_bf16(const float *Q, const float *K, const float *V, int ld, int T, int dh, int dhv, vad_bf16 *Kp,
                      vad_bf16 *Vp, vad_bf16 *Qb) {
    int nkb = (T + KB - 1) / KB, dh2 = (dh + 1) / 2;
    for (int t = 0; t < nkb * KB; t++) {
        vad_bf16 *kp = Kp + ((size_t)(t / KB) * dh2 * KB + t % KB) * 2;
        vad_bf16 *vp = Vp + ((size_t)(t / 2) * dhv) * 2 + t % 2;
        for (int d = 0; d < 2 * dh2; d++)
            kp[(size_t)(d / 2) * KB * 2 + d % 2] = t < T && d < dh ? vad_to_bf16(K[(size_t)t * ld + d]) : 0;
        for (int d = 0; d < dhv; d++) vp[(size_t)d * 2] = t < T && d < dh ? vad_to_bf16(V[(size_t)t * ld + d]) : 0;
        if (t < T)
            for (int d = 0; d < 2 * dh2; d++) Qb[(size_t)t * 2 * dh2 + d] = d < dh ? vad_to_bf16(Q[(size_t)t * ld + d]) : 0;
    }
}

VAD_TARGET_BF16 static void head_bf16(float *out, int ldo, const float *Q, const float *K, const float *V, int ld,
                                      int T, int dh, float *w) {
    int nkb = (T + KB - 1) / KB, dhv = (int)round16((size_t)dh), dh2 = (dh + 1) / 2;
    float scale = 1.0f / sqrtf((float)dh);
    vad_bf16 *Kp = (vad_bf16 *)w;
    vad_bf16 *Vp = (vad_bf16 *)(w + round16((size_t)nkb * dh2 * KB));
    vad_bf16 *Qb = (vad_bf16 *)(w + round16((size_t)nkb * dh2 * KB) + round16((size_t)nkb * (KB / 2) * dhv));
    float *acc = (float *)Qb + round16((size_t)T * dh2);
    vad_bf16 *P = (vad_bf16 *)(acc + round16((size_t)QR * dhv));
    pack_bf16(Q, K, V, ld, T, dh, dhv, Kp, Vp, Qb);
    for (int r0 = 0; r0 < T; r0 += QR) {
        int mr = T - r0 < QR ? T - r0 : QR;
        const vad_bf16 *q[QR];
        float m[QR], l[QR];
        for (int r = 0; r < QR; r++) {
            q[r] = Qb + (size_t)(r0 + (r < mr ? r : 0)) * 2 * dh2;
            m[r] = -INFINITY;
            l[r] = 0.0f;
        }
        memset(acc, 0, (size_t)QR * dhv * sizeof(float));
        for (int kb = 0; kb < nkb; kb++) {
            int nk = T - kb * KB < KB ? T - kb * KB : KB;
            const vad_bf16 *kp = Kp + (size_t)kb * dh2 * KB * 2;
            __m512 s[QR][4];
            for (int r = 0; r < QR; r++)
                for (int v = 0; v < 4; v++) s[r][v] = _mm512_setzero_ps();
            for (int p = 0; p < dh2; p++) {
                __m512i b[4];
                for (int v = 0; v < 4; v++) b[v] = _mm512_loadu_si512((const void *)(kp + 32 * v));
                for (int r = 0; r < QR; r++) {
                    __m512i a = vad_bcast_pair(q[r] + 2 * p);
                    for (int v = 0; v < 4; v++) s[r][v] = vad_dp_bf16(s[r][v], a, b[v]);
                }
                kp += 2 * KB;
            }
            for (int r = 0; r < QR; r++) { /* as in head_f32 */
                __m512 p[4];
                scale_row(acc + (size_t)r * dhv, dhv, softmax_step(s[r], nk, scale, &m[r], &l[r], p));
                vad_store_bf16x32(P + r * KB, p[0], p[1]);
                vad_store_bf16x32(P + r * KB + 32, p[2], p[3]);
            }
            /* acc += P V_block over key pairs, up to 64 output columns at a time */
            const vad_bf16 *vb = Vp + (size_t)kb * (KB / 2) * dhv * 2;
            int npairs = (nk + 1) / 2;
            for (int g = 0; g < dhv; g += 64) {
                __mmask16 mk[4];
                __m512 o[QR][4];
                for (int v = 0; v < 4; v++) mk[v] = lanes(dhv - g - 16 * v);
                for (int r = 0; r < QR; r++)
                    for (int v = 0; v < 4; v++) o[r][v] = _mm512_maskz_loadu_ps(mk[v], acc + (size_t)r * dhv + g + 16 * v);
                for (int j = 0; j < npairs; j++) {
                    const vad_bf16 *vr = vb + ((size_t)j * dhv + g) * 2;
                    __m512i b[4];
                    for (int v = 0; v < 4; v++) b[v] = _mm512_maskz_loadu_epi32(mk[v], (const void *)(vr + 32 * v));
                    for (int r = 0; r < QR; r++) {
                        __m512i a = vad_bcast_pair(P + r * KB + 2 * j);
                        for (int v = 0; v < 4; v++) o[r][v] = vad_dp_bf16(o[r][v], a, b[v]);
                    }
                }
                for (int r = 0; r < QR; r++)
                    for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(acc + (size_t)r * dhv + g + 16 * v, mk[v], o[r][v]);
            }
        }
        finish_rows(out + (size_t)r0 * ldo, ldo, acc, dhv, l, mr, dh);
    }
}

#endif

static void fused_task(void *vctx, int64_t begin, int64_t end, int tid) {
    const fused_ctx *c = (const fused_ctx *)vctx;
    int T = c->T, D = c->D, dh = D / c->heads;
    float *w = c->scratch + (size_t)tid * worker_floats(T, dh);
    for (int64_t job = begin; job < end; job++) {
        int b = (int)(job / c->heads), h = (int)(job % c->heads);
        const float *base = c->qkv + (size_t)b * T * 3 * D + (size_t)h * dh;
        float *o = c->out + (size_t)b * T * D + (size_t)h * dh;
#ifdef VAD_HAVE_BF16_KERNELS
        if (c->precision == VAD_BF16) {
            head_bf16(o, D, base, base + D, base + 2 * D, 3 * D, T, dh, w);
            continue;
        }
#endif
        head_f32(o, D, base, base + D, base + 2 * D, 3 * D, T, dh, w);
    }
}

void vad_attention_fused(vad_pool *pool, float *out, const float *qkv, float *scratch, int B, int T, int D,
                         int heads, int precision) {
    fused_ctx c = {out, scratch, qkv, T, D, heads, precision};
    vad_parallel_for(pool, (int64_t)B * heads, 1, fused_task, &c);
}
#else
void vad_attention_fused(vad_pool *pool, float *out, const float *qkv, float *scratch, int B, int T, int D,
                         int heads, int precision) {
    (void)pool, (void)out, (void)qkv, (void)scratch, (void)B, (void)T, (void)D, (void)heads, (void)precision;
}
#endif
