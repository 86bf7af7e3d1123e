#include "attention_fused.h"

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "attention_pack.h"
#include "bf16.h"
#include "cpu_features.h"

#define QR 6  /* query rows per register block (6 x 64 scores = 24 zmm) */
#define KB VAD_KEY_BLOCK

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

/* Per-worker scratch in floats: packed K and V of one head, the query rows (bf16), the output,
 * probability and row-sum blocks. Sized for the larger of the two precisions. */
static size_t worker_floats(int T, int dh) {
    size_t nkb = (size_t)(T + KB - 1) / KB, dhv = round16((size_t)dh), dh2 = ((size_t)dh + 1) / 2;
    size_t f32 = round16(nkb * dh * KB) + round16(nkb * KB * dhv);
    size_t b16 = round16(nkb * dh2 * KB) + round16(nkb * (KB / 2) * dhv) + round16((size_t)T * dh2);
    return (f32 > b16 ? f32 : b16) + round16(QR * dhv) + round16(QR * KB) + QR * 16;
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

/* One block of QR query rows against one key block: the inputs of block_f32 / block_bf16. */
typedef struct {
    const void *q[QR];    /* the query rows: fp32 rows of Q (stride ld) or bf16 rows of the packed Q */
    const void *k, *v;    /* this key block of the packed K and V */
    float *acc, *P, *lsum; /* output rows [QR][dhv], probabilities [QR][KB], row sums [QR][16] */
    float *m;             /* running row maxima [QR] */
    int dh, dhv, nk;      /* head size, padded to 16, valid keys in this block */
    float c;              /* 1 / sqrt(dh) * log2(e): scores to base-2 exponents */
} block_args;

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define VAD_AVX512 __attribute__((target("avx512f")))
#define VAD_INLINE static inline __attribute__((always_inline))

/* Online-softmax step for QR rows of scores s (nv vectors of 16 keys each, nk valid) against the
 * running maxima m: s becomes the probabilities 2^(c (s - m_new)) (0 past nk), the lane-wise row
 * sums lsum and the output rows acc (dhv floats each) are rescaled by 2^(c (m_old - m_new)) and
 * the sums accumulate the new probabilities. Shared by both precisions. */
VAD_AVX512 VAD_INLINE void softmax_rows(__m512 s[QR][4], int nv, const block_args *a) {
    __mmask16 km[4];
    for (int v = 0; v < nv; v++) km[v] = vad_lanes16(a->nk - 16 * v);
    for (int r = 0; r < QR; r++) {
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int v = 0; v < nv; v++) mx = _mm512_mask_max_ps(mx, km[v], mx, s[r][v]);
        float m_old = a->m[r], bm = _mm512_reduce_max_ps(mx), m_new = bm > m_old ? bm : m_old;
        __m512 sum = _mm512_loadu_ps(a->lsum + 16 * r), mc = _mm512_set1_ps(m_new * a->c), cv = _mm512_set1_ps(a->c);
        /* the factor is exactly 1 when the maximum did not grow (most blocks after the first) */
        if (m_new != m_old) {
            float alpha = m_old == -INFINITY ? 0.0f : _mm512_cvtss_f32(vad_exp2_16(_mm512_set1_ps((m_old - m_new) * a->c)));
            __m512 al = _mm512_set1_ps(alpha);
            float *o = a->acc + (size_t)r * a->dhv;
            for (int d = 0; d < a->dhv; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), al));
            sum = _mm512_mul_ps(sum, al);
            a->m[r] = m_new;
        }
        for (int v = 0; v < nv; v++) {
            s[r][v] = _mm512_maskz_mov_ps(km[v], vad_exp2_16(_mm512_fmsub_ps(s[r][v], cv, mc)));
            sum = _mm512_add_ps(sum, s[r][v]);
        }
        _mm512_storeu_ps(a->lsum + 16 * r, sum);
    }
}

/* The output accumulator rows [QR][dhv], columns g .. g + 63 (masked past dhv), into / from o. */
VAD_AVX512 VAD_INLINE void load_acc(__m512 o[QR][4], const float *acc, int dhv, int g, const __mmask16 *mk) {
    for (int r = 0; r < QR; r++)
        for (int v = 0; v < 4; v++) o[r][v] = _mm512_maskz_loadu_ps(mk[v], acc + (size_t)r * dhv + g + 16 * v);
}

VAD_AVX512 VAD_INLINE void store_acc(float *acc, const __m512 o[QR][4], int dhv, int g, const __mmask16 *mk) {
    for (int r = 0; r < QR; r++)
        for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(acc + (size_t)r * dhv + g + 16 * v, mk[v], o[r][v]);
}

VAD_AVX512 VAD_INLINE void col_masks(__mmask16 mk[4], int dhv, int g) {
    for (int v = 0; v < 4; v++) mk[v] = vad_lanes16(dhv - g - 16 * v);
}

/* ---------------------------------------------------------------- fp32 */

/* Scores of the QR rows against nv x 16 keys (fp32 FMA), the softmax step, acc += P V. */
VAD_AVX512 VAD_INLINE void block_f32_nv(const block_args *a, int nv) {
    const float *q[QR], *kt = (const float *)a->k;
    __m512 s[QR][4];
    for (int r = 0; r < QR; r++) {
        q[r] = (const float *)a->q[r];
        for (int v = 0; v < nv; v++) s[r][v] = _mm512_setzero_ps();
    }
    for (int d = 0; d < a->dh; d++, kt += KB) {
        __m512 b[4];
        for (int v = 0; v < nv; v++) b[v] = _mm512_loadu_ps(kt + 16 * v);
        for (int r = 0; r < QR; r++) {
            __m512 x = _mm512_set1_ps(q[r][d]);
            for (int v = 0; v < nv; v++) s[r][v] = _mm512_fmadd_ps(x, b[v], s[r][v]);
        }
    }
    softmax_rows(s, nv, a);
    for (int r = 0; r < QR; r++)
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(a->P + r * KB + 16 * v, s[r][v]);
    const float *vb = (const float *)a->v;
    for (int g = 0; g < a->dhv; g += 64) {
        __mmask16 mk[4];
        __m512 o[QR][4];
        col_masks(mk, a->dhv, g);
        load_acc(o, a->acc, a->dhv, g, mk);
        for (int j = 0; j < a->nk; j++) {
            const float *vr = vb + (size_t)j * a->dhv + g;
            __m512 b[4];
            for (int v = 0; v < 4; v++) b[v] = _mm512_maskz_loadu_ps(mk[v], vr + 16 * v);
            for (int r = 0; r < QR; r++) {
                __m512 x = _mm512_set1_ps(a->P[r * KB + j]);
                for (int v = 0; v < 4; v++) o[r][v] = _mm512_fmadd_ps(x, b[v], o[r][v]);
            }
        }
        store_acc(a->acc, o, a->dhv, g, mk);
    }
}

/* block_f32_nv with the key vectors a (last, short) block needs. */
VAD_AVX512 static void block_f32(const block_args *a) {
    switch ((a->nk + 15) / 16) {
    case 1: block_f32_nv(a, 1); break;
    case 2: block_f32_nv(a, 2); break;
    case 3: block_f32_nv(a, 3); break;
    default: block_f32_nv(a, 4);
    }
}

/* ---------------------------------------------------------------- bf16 */
#ifdef VAD_HAVE_BF16_KERNELS

/* block_f32_nv with bf16 operands: Q K^T and P V by vdpbf16ps over pairs, P rounded to bf16. */
VAD_TARGET_BF16 VAD_INLINE void block_bf16_nv(const block_args *a, int nv) {
    const vad_bf16 *q[QR], *kp = (const vad_bf16 *)a->k;
    int dh2 = (a->dh + 1) / 2;
    __m512 s[QR][4];
    for (int r = 0; r < QR; r++) {
        q[r] = (const vad_bf16 *)a->q[r];
        for (int v = 0; v < nv; v++) s[r][v] = _mm512_setzero_ps();
    }
    for (int p = 0; p < dh2; p++, kp += 2 * KB) {
        __m512i b[4];
        for (int v = 0; v < nv; v++) b[v] = _mm512_loadu_si512((const void *)(kp + 32 * v));
        for (int r = 0; r < QR; r++) {
            __m512i x = vad_bcast_pair(q[r] + 2 * p);
            for (int v = 0; v < nv; v++) s[r][v] = vad_dp_bf16(s[r][v], x, b[v]);
        }
    }
    softmax_rows(s, nv, a);
    vad_bf16 *P = (vad_bf16 *)a->P;
    for (int r = 0; r < QR; r++)
        for (int v = 0; v < nv; v += 2) vad_store_bf16x32(P + r * KB + 16 * v, s[r][v], v + 1 < nv ? s[r][v + 1] : _mm512_setzero_ps());
    const vad_bf16 *vb = (const vad_bf16 *)a->v;
    int npairs = (a->nk + 1) / 2;
    for (int g = 0; g < a->dhv; g += 64) {
        __mmask16 mk[4];
        __m512 o[QR][4];
        col_masks(mk, a->dhv, g);
        load_acc(o, a->acc, a->dhv, g, mk);
        for (int j = 0; j < npairs; j++) {
            const vad_bf16 *vr = vb + ((size_t)j * a->dhv + g) * 2;
            __m512i b[4];
            for (int v = 0; v < 4; v++) b[v] = _mm512_maskz_loadu_epi32(mk[v], (const void *)(vr + 32 * v));
            for (int r = 0; r < QR; r++) {
                __m512i x = vad_bcast_pair(P + r * KB + 2 * j);
                for (int v = 0; v < 4; v++) o[r][v] = vad_dp_bf16(o[r][v], x, b[v]);
            }
        }
        store_acc(a->acc, o, a->dhv, g, mk);
    }
}

VAD_TARGET_BF16 static void block_bf16(const block_args *a) {
    switch ((a->nk + 15) / 16) {
    case 1: block_bf16_nv(a, 1); break;
    case 2: block_bf16_nv(a, 2); break;
    case 3: block_bf16_nv(a, 3); break;
    default: block_bf16_nv(a, 4);
    }
}

#endif

/* One head: out [T, dh] (stride ldo) from Q, K, V [T, dh] (stride ld). w: worker scratch. next: the
 * Q of the head this worker computes next (its K, V at the same offsets as K, V from Q), or NULL:
 * each row block prefetches that head's rows into L2 while it computes. */
static void head(float *out, int ldo, const float *Q, const float *K, const float *V, int ld, int T, int dh,
                 float *w, int precision, const float *next) {
    int nkb = (T + KB - 1) / KB, dhv = (int)round16((size_t)dh), dh2 = (dh + 1) / 2;
    int bf16 = 0;
    block_args a;
    a.dh = dh;
    a.dhv = dhv;
    a.c = 1.4426950408889634f / sqrtf((float)dh);
    /* K, V (bf16: and Q) in the layouts of attention_pack.h; key block kb of the packed K and V starts
     * at kbase + kb * kstep, vbase + kb * vstep bytes */
    const char *kbase = (const char *)w, *vbase;
    size_t kstep, vstep;
    (void)precision;
#ifdef VAD_HAVE_BF16_KERNELS
    vad_bf16 *Qb = NULL;
    if (precision == VAD_BF16) {
        bf16 = 1;
        vad_bf16 *Kp = (vad_bf16 *)w, *Vp = (vad_bf16 *)(w + round16((size_t)nkb * dh2 * KB));
        Qb = (vad_bf16 *)(w + round16((size_t)nkb * dh2 * KB) + round16((size_t)nkb * (KB / 2) * dhv));
        a.acc = (float *)Qb + round16((size_t)T * dh2);
        vad_pack_keys_bf16(Kp, K, ld, T, dh);
        vad_pack_pairs_bf16(Vp, V, ld, T, nkb * KB, dh, dhv);
        vad_pack_rows_bf16(Qb, Q, ld, T, dh);
        vbase = (const char *)Vp;
        kstep = (size_t)dh2 * KB * 2 * sizeof(vad_bf16);
        vstep = (size_t)(KB / 2) * dhv * 2 * sizeof(vad_bf16);
    } else
#endif
    {
        float *Kt = w, *Vp = Kt + round16((size_t)nkb * dh * KB);
        a.acc = Vp + round16((size_t)nkb * KB * dhv);
        vad_pack_keys_f32(Kt, K, ld, T, dh);
        vad_pack_rows_f32(Vp, V, ld, T, nkb * KB, dh, dhv);
        vbase = (const char *)Vp;
        kstep = (size_t)dh * KB * sizeof(float);
        vstep = (size_t)KB * dhv * sizeof(float);
    }
    a.P = a.acc + round16((size_t)QR * dhv);
    a.lsum = a.P + round16((size_t)QR * KB);
    for (int r0 = 0; r0 < T; r0 += QR) {
        int mr = T - r0 < QR ? T - r0 : QR;
        float m[QR];
        for (int r = 0; r < QR; r++) {
            int t = r0 + (r < mr ? r : 0); /* rows past mr repeat row r0 and are dropped */
#ifdef VAD_HAVE_BF16_KERNELS
            if (bf16) a.q[r] = Qb + (size_t)t * 2 * dh2;
            else
#endif
                a.q[r] = Q + (size_t)t * ld;
            if (!bf16 && r0 + QR + r < T) /* the next row block's queries (bf16 reads the packed Qb) */
                for (int d = 0; d < dh; d += 16) __builtin_prefetch(Q + (size_t)(r0 + QR + r) * ld + d);
            m[r] = -INFINITY;
            if (next && r < mr)
                for (int d = 0; d < dh; d += 16) {
                    const float *x = next + (size_t)(r0 + r) * ld + d;
                    __builtin_prefetch(x, 0, 2);
                    __builtin_prefetch(x + (K - Q), 0, 2);
                    __builtin_prefetch(x + (V - Q), 0, 2);
                }
        }
        a.m = m;
        memset(a.acc, 0, (size_t)QR * dhv * sizeof(float));
        memset(a.lsum, 0, (size_t)QR * 16 * sizeof(float));
        for (int kb = 0; kb < nkb; kb++) {
            a.nk = T - kb * KB < KB ? T - kb * KB : KB;
            a.k = kbase + kb * kstep;
            a.v = vbase + kb * vstep;
#ifdef VAD_HAVE_BF16_KERNELS
            if (bf16) {
                block_bf16(&a);
                continue;
            }
#endif
            block_f32(&a);
        }
        for (int r = 0; r < mr; r++) { /* out = acc / row sum */
            float l = 0.0f;
            for (int i = 0; i < 16; i++) l += a.lsum[16 * r + i];
            float inv = 1.0f / l;
            for (int d = 0; d < dh; d++) out[(size_t)(r0 + r) * ldo + d] = a.acc[(size_t)r * dhv + d] * inv;
        }
    }
}

static void fused_task(void *vctx, int64_t begin, int64_t end, int tid) {
    const fused_ctx *c = (const fused_ctx *)vctx;
    int T = c->T, D = c->D, dh = D / c->heads;
    float *w = c->scratch + (size_t)tid * worker_floats(T, dh);
    for (int64_t job = begin; job < end; job++) {
        int b = (int)(job / c->heads), h = (int)(job % c->heads);
        const float *base = c->qkv + (size_t)b * T * 3 * D + (size_t)h * dh;
        const float *next = job + 1 < end ? (h + 1 < c->heads ? base + dh : base + (size_t)T * 3 * D - (size_t)h * dh) : NULL;
        head(c->out + (size_t)b * T * D + (size_t)h * dh, D, base, base + D, base + 2 * D, 3 * D, T, dh, w, c->precision,
             next);
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
