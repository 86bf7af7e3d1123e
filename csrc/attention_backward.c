#include "attention_backward.h"

#include <math.h>
#include <stdint.h>

#include "attention_pack.h"
#include "bf16.h"
#include "ops.h"

#define RB 96 /* query rows per block: the worker holds two RB x T fp32 blocks (P, dS) */
#define MR 6  /* rows per register block of the product kernel (6 x 64 accumulators = 24 zmm) */

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }
static size_t halves(size_t bf16s) { return round16((bf16s + 1) / 2); } /* floats holding bf16s values */

/* The sizes of one head's buffers (in bf16 or fp32 elements, see head_buffers). */
typedef struct {
    int rb, dh2, dhv, t2, tp, nkb;
} dims;

static dims dims_of(int T, int dh) {
    dims d;
    d.rb = T < RB ? T + (T & 1) : RB;
    d.dh2 = (dh + 1) / 2;
    d.dhv = (int)round16((size_t)dh);
    d.t2 = (T + 1) / 2;
    d.tp = (int)round16((size_t)T);
    d.nkb = (T + VAD_KEY_BLOCK - 1) / VAD_KEY_BLOCK;
    return d;
}

/* One worker's buffers for a head: Q and dO as bf16 rows, K and V as bf16 key blocks (the B of Q K^T
 * and dO V^T), K as row pairs (the B of dS K); per query block: S then P and dP then dS in fp32, dS as
 * bf16 rows (the A of dS K), P and dS as row pairs (the A of P^T dO, dS^T Q), dO and Q as row pairs
 * (their B). */
typedef struct {
    vad_bf16 *qr, *dor, *kt, *vt, *kpair, *dsr, *ppair, *dspair, *dopair, *qpair;
    float *p, *ds;
} head_buffers;

static size_t carve(head_buffers *hb, float *w, int T, int dh) {
    dims d = dims_of(T, dh);
    size_t n = 0, keys = (size_t)d.nkb * d.dh2 * VAD_KEY_BLOCK * 2, r2 = (size_t)d.rb / 2;
    /* w NULL: sizes only */
#define TAKE_BF16(field, count) (hb->field = w ? (vad_bf16 *)(w + n) : NULL, n += halves(count))
#define TAKE_F32(field, count) (hb->field = w ? w + n : NULL, n += round16(count))
    TAKE_BF16(qr, (size_t)T * 2 * d.dh2);
    TAKE_BF16(dor, (size_t)T * 2 * d.dh2);
    TAKE_BF16(kt, keys);
    TAKE_BF16(vt, keys);
    TAKE_BF16(kpair, (size_t)d.t2 * d.dhv * 2);
    TAKE_F32(p, (size_t)d.rb * T);
    TAKE_F32(ds, (size_t)d.rb * T);
    TAKE_BF16(dsr, (size_t)d.rb * 2 * d.t2);
    TAKE_BF16(ppair, r2 * d.tp * 2);
    TAKE_BF16(dspair, r2 * d.tp * 2);
    TAKE_BF16(dopair, r2 * d.dhv * 2);
    TAKE_BF16(qpair, r2 * d.dhv * 2);
#undef TAKE_BF16
#undef TAKE_F32
    return n;
}

size_t vad_attention_backward_bf16_scratch(int T, int head_dim, int nthreads) {
    head_buffers hb;
    return (size_t)nthreads * carve(&hb, NULL, T, head_dim);
}

/* A product operand: A(m, k) = the bf16 pair at a + m * rs + k * ps; B(k, n) = the 32 bits at
 * b + (n / 64) * bs + k * ps + 2 (n % 64) (bf16 elements). */
typedef struct {
    const vad_bf16 *p;
    size_t rs, ps;
} operand_a;

typedef struct {
    const vad_bf16 *p;
    size_t bs, ps;
} operand_b;

typedef struct {
    float *out, *scratch;
    const float *dout, *qkv;
    int T, D, heads;
} back_ctx;

#if defined(VAD_HAVE_BF16_KERNELS)

/* x [rows, n] (stride ld) <- softmax of each row of scale x, by the fused kernel's base-2
 * exponential (attention_pack.h). */
VAD_TARGET_BF16 static void softmax_rows(float *x, int rows, int n, int ld, float scale) {
    __m512 c = _mm512_set1_ps(scale * 1.4426950408889634f);
    for (int r = 0; r < rows; r++) {
        float *row = x + (size_t)r * ld;
        __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 16) mx = _mm512_mask_max_ps(mx, vad_lanes16(n - i), mx, _mm512_maskz_loadu_ps(vad_lanes16(n - i), row + i));
        __m512 mc = _mm512_mul_ps(_mm512_set1_ps(_mm512_reduce_max_ps(mx)), c);
        for (int i = 0; i < n; i += 16) {
            __mmask16 mk = vad_lanes16(n - i);
            __m512 p = _mm512_maskz_mov_ps(mk, vad_exp2_16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, row + i), c, mc)));
            _mm512_mask_storeu_ps(row + i, mk, p);
            sum = _mm512_add_ps(sum, p);
        }
        __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int i = 0; i < n; i += 16)
            _mm512_mask_storeu_ps(row + i, vad_lanes16(n - i), _mm512_mul_ps(_mm512_maskz_loadu_ps(vad_lanes16(n - i), row + i), inv));
    }
}

/* C[M, N] (stride ldc) = alpha A B over K2 pairs, plus C when accumulate; fp32 accumulation. */
VAD_TARGET_BF16 static void product(float *C, int ldc, operand_a A, operand_b B, int M, int N, int K2, float alpha,
                                    int accumulate) {
    __m512 al = _mm512_set1_ps(alpha);
    for (int n0 = 0; n0 < N; n0 += 64) {
        __mmask16 mk[4];
        for (int v = 0; v < 4; v++) mk[v] = vad_lanes16(N - n0 - 16 * v);
        const vad_bf16 *bp = B.p + (size_t)(n0 / 64) * B.bs;
        for (int m0 = 0; m0 < M; m0 += MR) {
            int mr = M - m0 < MR ? M - m0 : MR;
            const vad_bf16 *a[MR];
            __m512 acc[MR][4];
            for (int r = 0; r < MR; r++) {
                a[r] = A.p + (size_t)(m0 + (r < mr ? r : 0)) * A.rs; /* rows past mr repeat row m0, dropped */
                for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_ps();
            }
            for (int k = 0; k < K2; k++) {
                __m512i b[4];
                for (int v = 0; v < 4; v++) b[v] = _mm512_maskz_loadu_epi32(mk[v], (const void *)(bp + k * B.ps + 32 * v));
                for (int r = 0; r < MR; r++) {
                    __m512i x = vad_bcast_pair(a[r] + k * A.ps);
                    for (int v = 0; v < 4; v++) acc[r][v] = vad_dp_bf16(acc[r][v], x, b[v]);
                }
            }
            for (int r = 0; r < MR; r++) { /* constant indices keep acc in registers */
                if (r >= mr) break;
                float *c = C + (size_t)(m0 + r) * ldc + n0;
                for (int v = 0; v < 4; v++) {
                    __m512 old = accumulate ? _mm512_maskz_loadu_ps(mk[v], c + 16 * v) : _mm512_setzero_ps();
                    _mm512_mask_storeu_ps(c + 16 * v, mk[v], _mm512_fmadd_ps(acc[r][v], al, old));
                }
            }
        }
    }
}

/* dQ, dK, dV [T, dh] (stride ld3) of one head from its Q, K, V (stride ld3) and dO (stride ldo). */
static void head_backward(float *dQ, float *dK, float *dV, const float *Q, const float *K, const float *V, int ld3,
                          const float *dO, int ldo, int T, int dh, float *w) {
    dims d = dims_of(T, dh);
    head_buffers hb;
    carve(&hb, w, T, dh);
    float scale = 1.0f / sqrtf((float)dh);
    size_t kbs = (size_t)d.dh2 * VAD_KEY_BLOCK * 2; /* one key block of kt, vt */
    vad_pack_rows_bf16(hb.qr, Q, ld3, T, dh);
    vad_pack_rows_bf16(hb.dor, dO, ldo, T, dh);
    vad_pack_keys_bf16(hb.kt, K, ld3, T, dh);
    vad_pack_keys_bf16(hb.vt, V, ld3, T, dh);
    vad_pack_pairs_bf16(hb.kpair, K, ld3, T, 2 * d.t2, dh, d.dhv);
    for (int r0 = 0; r0 < T; r0 += d.rb) {
        int rc = T - r0 < d.rb ? T - r0 : d.rb, rc2 = (rc + 1) / 2, acc = r0 > 0; /* dK, dV sum over the blocks */
        operand_a qa = {hb.qr + (size_t)r0 * 2 * d.dh2, 2 * (size_t)d.dh2, 2};
        operand_a doa = {hb.dor + (size_t)r0 * 2 * d.dh2, 2 * (size_t)d.dh2, 2};
        operand_b kb = {hb.kt, kbs, 2 * VAD_KEY_BLOCK}, vb = {hb.vt, kbs, 2 * VAD_KEY_BLOCK};
        product(hb.p, T, qa, kb, rc, T, d.dh2, 1.0f, 0);
        softmax_rows(hb.p, rc, T, T, scale);
        product(hb.ds, T, doa, vb, rc, T, d.dh2, 1.0f, 0);
        vad_softmax_rows_backward(hb.ds, hb.ds, hb.p, rc, T, T, 1.0f);
        /* dQ = s dS K */
        vad_pack_rows_bf16(hb.dsr, hb.ds, T, rc, T);
        operand_a dsa = {hb.dsr, 2 * (size_t)d.t2, 2};
        operand_b kpb = {hb.kpair, 128, 2 * (size_t)d.dhv};
        product(dQ + (size_t)r0 * ld3, ld3, dsa, kpb, rc, dh, d.t2, scale, 0);
        /* dV += P^T dO, dK += s dS^T Q: reduced over this block's query pairs */
        vad_pack_pairs_bf16(hb.ppair, hb.p, T, rc, 2 * rc2, T, d.tp);
        vad_pack_pairs_bf16(hb.dspair, hb.ds, T, rc, 2 * rc2, T, d.tp);
        vad_pack_pairs_bf16(hb.dopair, dO + (size_t)r0 * ldo, ldo, rc, 2 * rc2, dh, d.dhv);
        vad_pack_pairs_bf16(hb.qpair, Q + (size_t)r0 * ld3, ld3, rc, 2 * rc2, dh, d.dhv);
        operand_a pa = {hb.ppair, 2, 2 * (size_t)d.tp}, dsta = {hb.dspair, 2, 2 * (size_t)d.tp};
        operand_b dob = {hb.dopair, 128, 2 * (size_t)d.dhv}, qb = {hb.qpair, 128, 2 * (size_t)d.dhv};
        product(dV, ld3, pa, dob, T, dh, rc2, 1.0f, acc);
        product(dK, ld3, dsta, qb, T, dh, rc2, scale, acc);
    }
}

static void back_task(void *vctx, int64_t begin, int64_t end, int tid) {
    const back_ctx *c = (const back_ctx *)vctx;
    int T = c->T, D = c->D, dh = D / c->heads;
    float *w = c->scratch + (size_t)tid * (vad_attention_backward_bf16_scratch(T, dh, 1));
    for (int64_t job = begin; job < end; job++) {
        int b = (int)(job / c->heads), h = (int)(job % c->heads);
        const float *base = c->qkv + (size_t)b * T * 3 * D + (size_t)h * dh;
        float *dbase = c->out + (size_t)b * T * 3 * D + (size_t)h * dh;
        head_backward(dbase, dbase + D, dbase + 2 * D, base, base + D, base + 2 * D, 3 * D,
                      c->dout + (size_t)b * T * D + (size_t)h * dh, D, T, dh, w);
    }
}

void vad_attention_backward_bf16(vad_pool *pool, float *dqkv, const float *dout, const float *qkv, float *scratch,
                                 int B, int T, int D, int heads) {
    back_ctx c = {dqkv, scratch, dout, qkv, T, D, heads};
    vad_parallel_for(pool, (int64_t)B * heads, 1, back_task, &c);
}
#else
void vad_attention_backward_bf16(vad_pool *pool, float *dqkv, const float *dout, const float *qkv, float *scratch,
                                 int B, int T, int D, int heads) {
    (void)pool, (void)dqkv, (void)dout, (void)qkv, (void)scratch, (void)B, (void)T, (void)D, (void)heads;
}
#endif
