#include "ops.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "bf16.h"
#include "blas.h"
#include "errors.h"
#include "mathfun.h"

#define VAD_HOT __attribute__((target_clones("avx512f", "avx2", "default")))

/* ---------------------------------------------------------------- GEMM over the pool */

typedef struct {
    int ta, tb, M, N, K, lda, ldb, ldc, split_rows;
    float alpha, beta;
    const float *A, *B, *bias;
    float *C;
} gemm_ctx;

/* C is cut into blocks of VAD_GEMM_BLOCK rows (or columns when M is small: each call then packs
 * only its share of B, usually the weights), one sgemm per block, the bias added per block. The
 * blocks are fixed by the shape alone, never by the thread count: OpenBLAS may round a row
 * differently inside calls of different sizes, so results stay independent of the thread count. */
#define VAD_GEMM_BLOCK 128

static void gemm_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    const gemm_ctx *c = (const gemm_ctx *)vctx;
    for (int64_t blk = begin; blk < end; blk++) {
        int lo = (int)blk * VAD_GEMM_BLOCK;
        int m0 = 0, m1 = c->M, n0 = 0, n1 = c->N;
        if (c->split_rows) {
            m0 = lo;
            m1 = lo + VAD_GEMM_BLOCK < c->M ? lo + VAD_GEMM_BLOCK : c->M;
            const float *A = c->ta ? c->A + m0 : c->A + (size_t)m0 * c->lda;
            vad_sgemm(c->ta, c->tb, m1 - m0, c->N, c->K, c->alpha, A, c->lda, c->B, c->ldb, c->beta,
                      c->C + (size_t)m0 * c->ldc, c->ldc);
        } else {
            n0 = lo;
            n1 = lo + VAD_GEMM_BLOCK < c->N ? lo + VAD_GEMM_BLOCK : c->N;
            const float *Bp = c->tb ? c->B + (size_t)n0 * c->ldb : c->B + n0;
            vad_sgemm(c->ta, c->tb, c->M, n1 - n0, c->K, c->alpha, c->A, c->lda, Bp, c->ldb, c->beta, c->C + n0,
                      c->ldc);
        }
        if (c->bias)
            for (int m = m0; m < m1; m++) {
                float *o = c->C + (size_t)m * c->ldc;
                for (int n = n0; n < n1; n++) o[n] += c->bias[n];
            }
    }
}

static void gemm_bias(vad_pool *pool, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                      int lda, const float *B, int ldb, float beta, float *C, int ldc, const float *bias) {
    if (M <= 0 || N <= 0) return;
    gemm_ctx c = {trans_a, trans_b, M, N, K, lda, ldb, ldc, M > N, alpha, beta, A, B, bias, C};
    vad_parallel_for(pool, ((c.split_rows ? M : N) + VAD_GEMM_BLOCK - 1) / VAD_GEMM_BLOCK, 1, gemm_task, &c);
}

void vad_gemm(vad_pool *pool, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
              int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    gemm_bias(pool, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL);
}

void vad_linear(vad_pool *pool, float *out, int ldc, const float *in, int lda, const float *W,
                const float *bias, int M, int N, int K, float beta) {
    gemm_bias(pool, 0, 1, M, N, K, 1.0f, in, lda, W, K, beta, out, ldc, bias);
}

void vad_linear_backward_input(vad_pool *pool, float *din, int ldd, const float *dout, int ldo, const float *W,
                               int M, int N, int K, float beta) {
    gemm_bias(pool, 0, 0, M, K, N, 1.0f, dout, ldo, W, K, beta, din, ldd, NULL);
}

/* out[c] += sum_r x[r, c] (bias gradients); parallel over blocks of columns, each summed in row
 * order (independent of the thread count). */
#define COL_BLOCK 64

typedef struct {
    float *out;
    const float *x;
    int rows, cols;
} colsum_ctx;

static void colsum_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    const colsum_ctx *c = (const colsum_ctx *)vctx;
    for (int64_t blk = begin; blk < end; blk++) {
        int c0 = (int)blk * COL_BLOCK, n = c->cols - c0 < COL_BLOCK ? c->cols - c0 : COL_BLOCK;
        double acc[COL_BLOCK] = {0};
        for (int r = 0; r < c->rows; r++) {
            const float *xr = c->x + (size_t)r * c->cols + c0;
            for (int j = 0; j < n; j++) acc[j] += xr[j];
        }
        for (int j = 0; j < n; j++) c->out[c0 + j] += (float)acc[j];
    }
}

void vad_linear_backward(vad_pool *pool, float *dx, float dx_beta, float *dW, float *db, const float *dy,
                         const float *x, const float *W, int M, int N, int K) {
    if (dx) vad_linear_backward_input(pool, dx, K, dy, N, W, M, N, K, dx_beta);
    if (dW) vad_gemm(pool, 1, 0, N, K, M, 1.0f, dy, N, x, K, 1.0f, dW, K);
    if (db) {
        colsum_ctx c = {db, dy, M, N};
        vad_parallel_for(pool, (N + COL_BLOCK - 1) / COL_BLOCK, 1, colsum_task, &c);
    }
}

/* ---------------------------------------------------------------- layernorm */

typedef struct {
    float *out;
    const float *in, *w, *b;
    int ld_out, ld_in, C;
    float eps;
} ln_ctx;

/* Sums with VAD_LANES independent accumulators: vectorises without -ffast-math (a plain
 * `s += x[i]` loop may not be reassociated, so it would stay scalar). */
#define VAD_LANES 16

static inline __attribute__((always_inline)) float lane_sum(const float *acc) {
    float s = 0.0f;
    for (int j = 0; j < VAD_LANES; j++) s += acc[j];
    return s;
}

/* mean and 1/sqrt(biased variance + eps) of one row, both passes vectorised. */
static inline __attribute__((always_inline)) void row_stats(const float *x, int C, float eps, float *mean_out,
                                                            float *rstd_out) {
    float acc[VAD_LANES] = {0};
    int i = 0;
    for (; i + VAD_LANES <= C; i += VAD_LANES)
        for (int j = 0; j < VAD_LANES; j++) acc[j] += x[i + j];
    float mean = lane_sum(acc);
    for (; i < C; i++) mean += x[i];
    mean /= (float)C;
    float acc2[VAD_LANES] = {0};
    for (i = 0; i + VAD_LANES <= C; i += VAD_LANES)
        for (int j = 0; j < VAD_LANES; j++) {
            float d = x[i + j] - mean;
            acc2[j] += d * d;
        }
    float var = lane_sum(acc2);
    for (; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= (float)C;
    *mean_out = mean;
    *rstd_out = 1.0f / sqrtf(var + eps);
}

VAD_HOT static void ln_row(float *o, const float *x, const float *w, const float *b, int C, float eps) {
    float mean, rstd;
    row_stats(x, C, eps, &mean, &rstd);
    for (int i = 0; i < C; i++) o[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

static void ln_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    ln_ctx *c = (ln_ctx *)vctx;
    for (int64_t r = begin; r < end; r++)
        ln_row(c->out + r * c->ld_out, c->in + r * c->ld_in, c->w, c->b, c->C, c->eps);
}

void vad_layernorm(vad_pool *pool, float *out, int ld_out, const float *in, int ld_in,
                   const float *w, const float *b, int rows, int C, float eps) {
    ln_ctx c = {out, in, w, b, ld_out, ld_in, C, eps};
    vad_parallel_for(pool, rows, 8, ln_task, &c);
}

#ifdef VAD_HAVE_BF16_KERNELS
typedef struct {
    vad_bf16 *out;
    const float *in, *w, *b;
    int ld_in, C;
    float eps;
} ln_bf16_ctx;

/* (x - mean) * rstd * w + b for the 16 columns from i (masked by m: zero elsewhere), as ln_row. */
VAD_TARGET_BF16 static inline __attribute__((always_inline)) __m512 ln_lanes(const float *x, const float *w,
                                                                            const float *b, int i, int n, __m512 vm,
                                                                            __m512 vr) {
    __mmask16 m = n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
    __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vm), vr);
    return _mm512_maskz_add_ps(m, _mm512_mul_ps(t, _mm512_maskz_loadu_ps(m, w + i)), _mm512_maskz_loadu_ps(m, b + i));
}

/* ln_row's values (the same row_stats, the same operations) rounded to bf16 as vad_store_bf16x32
 * rounds, 2 * ceil(C/2) per row (a zero past C). */
VAD_TARGET_BF16 static void ln_bf16_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    const ln_bf16_ctx *c = (const ln_bf16_ctx *)vctx;
    int C = c->C, Cp = C + (C & 1);
    for (int64_t r = begin; r < end; r++) {
        const float *x = c->in + r * c->ld_in;
        vad_bf16 *o = c->out + r * Cp;
        float mean, rstd;
        row_stats(x, C, c->eps, &mean, &rstd);
        __m512 vm = _mm512_set1_ps(mean), vr = _mm512_set1_ps(rstd);
        for (int i = 0; i < C; i += 32) {
            __m512 lo = ln_lanes(x, c->w, c->b, i, C - i, vm, vr), hi = ln_lanes(x, c->w, c->b, i + 16, C - i - 16, vm, vr);
            int n = Cp - i;
            _mm512_mask_storeu_epi16(o + i, n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1),
                                     (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

void vad_layernorm_bf16(vad_pool *pool, vad_bf16 *out, const float *in, int ld_in, const float *w, const float *b,
                        int rows, int C, float eps) {
    ln_bf16_ctx c = {out, in, w, b, ld_in, C, eps};
    vad_parallel_for(pool, rows, 8, ln_bf16_task, &c);
}
#else
void vad_layernorm_bf16(vad_pool *pool, vad_bf16 *out, const float *in, int ld_in, const float *w, const float *b,
                        int rows, int C, float eps) {
    (void)pool, (void)out, (void)in, (void)ld_in, (void)w, (void)b, (void)rows, (void)C, (void)eps;
}
#endif


/* LayerNorm backward for rows of x (stride ld_x): dx (+=, stride ld_dx) from dout (stride ld_o);
 * dw/db (+=, may be NULL) reduced over rows: one partial sum per block of LN_BACK_BLOCK rows, the
 * blocks then added in order, so the sum does not depend on the thread count. */
#define LN_BACK_BLOCK 64

typedef struct {
    float *dx, *dw_part;
    const float *dout, *x, *w;
    int ld_dx, ld_o, ld_x, C, rows;
    float eps;
} ln_back_ctx;

VAD_HOT static void ln_back_row(float *dx, float *dw, float *db, const float *dy, const float *x, const float *w,
                                int C, float eps) {
    float mean, rstd;
    row_stats(x, C, eps, &mean, &rstd);
    int i;
    float s1 = 0.0f, s2 = 0.0f; /* mean of dxhat and of dxhat * xhat */
    for (i = 0; i < C; i++) {
        float xh = (x[i] - mean) * rstd, g = dy[i] * w[i];
        s1 += g;
        s2 += g * xh;
        if (dw) {
            dw[i] += dy[i] * xh;
            db[i] += dy[i];
        }
    }
    s1 /= (float)C;
    s2 /= (float)C;
    for (i = 0; i < C; i++) {
        float xh = (x[i] - mean) * rstd;
        dx[i] += rstd * (dy[i] * w[i] - s1 - xh * s2);
    }
}

static void ln_back_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    ln_back_ctx *c = (ln_back_ctx *)vctx;
    for (int64_t blk = begin; blk < end; blk++) {
        float *dw = c->dw_part ? c->dw_part + (size_t)blk * 2 * c->C : NULL;
        int64_t r1 = (blk + 1) * LN_BACK_BLOCK < c->rows ? (blk + 1) * LN_BACK_BLOCK : c->rows;
        for (int64_t r = blk * LN_BACK_BLOCK; r < r1; r++)
            ln_back_row(c->dx + r * c->ld_dx, dw, dw ? dw + c->C : NULL, c->dout + r * c->ld_o, c->x + r * c->ld_x,
                        c->w, c->C, c->eps);
    }
}

int vad_layernorm_backward(vad_pool *pool, float *dx, int ld_dx, const float *dout, int ld_o, const float *x,
                           int ld_x, const float *w, float *dw, float *db, int rows, int C, float eps) {
    if (rows <= 0) return VAD_OK;
    int nblocks = (rows + LN_BACK_BLOCK - 1) / LN_BACK_BLOCK;
    float *part = NULL;
    if (dw) {
        part = (float *)calloc((size_t)nblocks * 2 * C, sizeof(float));
        if (!part) return vad_fail(VAD_ERR_MEMORY, "out of memory in the layer-norm backward");
    }
    ln_back_ctx c = {dx, part, dout, x, w, ld_dx, ld_o, ld_x, C, rows, eps};
    vad_parallel_for(pool, nblocks, 1, ln_back_task, &c);
    if (dw) {
        for (int t = 0; t < nblocks; t++)
            for (int i = 0; i < C; i++) {
                dw[i] += part[(size_t)t * 2 * C + i];
                db[i] += part[(size_t)t * 2 * C + C + i];
            }
        free(part);
    }
    return VAD_OK;
}

/* ---------------------------------------------------------------- activations */

typedef struct {
    float *x;
    const float *in, *scale;
    int act, C, hidden;
} act_ctx;

VAD_HOT static void quick_gelu_span(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = vad_quick_gelu(x[i]);
}
VAD_HOT static void gelu_span(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = vad_gelu_erf(x[i]);
}

static void act_span(float *x, int64_t n, int act) {
    if (act == VAD_ACT_GELU)
        gelu_span(x, n);
    else
        quick_gelu_span(x, n);
}

static void act_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    act_ctx *c = (act_ctx *)vctx;
    act_span(c->x + begin, end - begin, c->act);
}

void vad_activation_rows(float *x, int ld, int rows, int cols, int act) {
    for (int r = 0; r < rows; r++) act_span(x + (size_t)r * ld, cols, act);
}

void vad_activation_inplace(vad_pool *pool, float *x, int64_t n, int act) {
    act_ctx c = {x, NULL, NULL, act, 0, 0};
    vad_parallel_for(pool, n, 4096, act_task, &c);
}

VAD_HOT static void swiglu_row(float *o, const float *x, int hidden) {
    for (int j = 0; j < hidden; j++) {
        float a = x[j];
        o[j] = a * vad_sigmoidf(a) * x[hidden + j];
    }
}

static void swiglu_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    act_ctx *c = (act_ctx *)vctx;
    for (int64_t r = begin; r < end; r++)
        swiglu_row(c->x + r * c->hidden, c->in + r * 2 * (int64_t)c->hidden, c->hidden);
}

void vad_swiglu(vad_pool *pool, float *out, const float *in, int rows, int hidden) {
    act_ctx c = {out, in, NULL, VAD_ACT_SWIGLU, 0, hidden};
    vad_parallel_for(pool, rows, 8, swiglu_task, &c);
}


/* d[i] *= act'(f[i]) for QuickGELU / exact GELU (f: pre-activation). */
VAD_HOT static void quick_gelu_back_span(float *d, const float *f, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float s = vad_sigmoidf(1.702f * f[i]);
        d[i] *= s + 1.702f * f[i] * s * (1.0f - s);
    }
}
VAD_HOT static void gelu_back_span(float *d, const float *f, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float x = f[i];
        float cdf = 0.5f * (1.0f + vad_erff(x * 0.70710678118654752f));
        float pdf = 0.39894228040143268f * vad_expf(-0.5f * x * x);
        d[i] *= cdf + x * pdf;
    }
}

static void act_back_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    act_ctx *c = (act_ctx *)vctx;
    if (c->act == VAD_ACT_GELU)
        gelu_back_span(c->x + begin, c->in + begin, end - begin);
    else
        quick_gelu_back_span(c->x + begin, c->in + begin, end - begin);
}

void vad_activation_backward(vad_pool *pool, float *d, const float *f, int64_t n, int act) {
    act_ctx c = {d, f, NULL, act, 0, 0};
    vad_parallel_for(pool, n, 4096, act_back_task, &c);
}

/* SwiGLU backward: f [rows, 2*hidden] (a | b), dy [rows, hidden] -> df [rows, 2*hidden]. */
VAD_HOT static void swiglu_back_row(float *df, const float *dy, const float *f, int hidden) {
    for (int j = 0; j < hidden; j++) {
        float a = f[j], b = f[hidden + j], s = vad_sigmoidf(a);
        df[j] = dy[j] * b * s * (1.0f + a * (1.0f - s));
        df[hidden + j] = dy[j] * a * s;
    }
}

static void swiglu_back_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    act_ctx *c = (act_ctx *)vctx;
    for (int64_t r = begin; r < end; r++)
        swiglu_back_row(c->x + r * 2 * (int64_t)c->hidden, c->scale + r * (int64_t)c->hidden,
                        c->in + r * 2 * (int64_t)c->hidden, c->hidden);
}

void vad_swiglu_backward(vad_pool *pool, float *df, const float *dy, const float *f, int rows, int hidden) {
    act_ctx c = {df, f, dy, VAD_ACT_SWIGLU, 0, hidden};
    vad_parallel_for(pool, rows, 8, swiglu_back_task, &c);
}

/* ---------------------------------------------------------------- residual */

VAD_HOT static void residual_row(float *x, const float *y, const float *s, int C) {
    if (s)
        for (int i = 0; i < C; i++) x[i] += s[i] * y[i];
    else
        for (int i = 0; i < C; i++) x[i] += y[i];
}

static void residual_task(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    act_ctx *c = (act_ctx *)vctx;
    for (int64_t r = begin; r < end; r++) residual_row(c->x + r * c->C, c->in + r * c->C, c->scale, c->C);
}

void vad_residual_add(vad_pool *pool, float *x, const float *y, const float *scale, int rows, int C) {
    act_ctx c = {x, y, scale, 0, C, 0};
    vad_parallel_for(pool, rows, 16, residual_task, &c);
}

/* ---------------------------------------------------------------- softmax */

/* exp((x - mx) * scale) over one VAD_LANES chunk, summed into acc. */
static inline __attribute__((always_inline)) void exp_chunk(float *x, float mx, float scale, float *acc) {
    for (int j = 0; j < VAD_LANES; j++) {
        float e = vad_expf((x[j] - mx) * scale);
        x[j] = e;
        acc[j] += e;
    }
}

VAD_HOT static void softmax_row(float *x, int n, float scale) {
    int full = n - n % VAD_LANES, rest = n - full;
    /* the ragged tail runs through the same vector code, padded with -inf (exp -> ~0) */
    float tail[VAD_LANES];
    for (int j = 0; j < VAD_LANES; j++) tail[j] = j < rest ? x[full + j] : -INFINITY;
    float mx_lane[VAD_LANES];
    for (int j = 0; j < VAD_LANES; j++) mx_lane[j] = tail[j];
    for (int i = 0; i < full; i += VAD_LANES)
        for (int j = 0; j < VAD_LANES; j++) mx_lane[j] = x[i + j] > mx_lane[j] ? x[i + j] : mx_lane[j];
    float mx = -INFINITY;
    for (int j = 0; j < VAD_LANES; j++) mx = mx_lane[j] > mx ? mx_lane[j] : mx;
    float acc[VAD_LANES] = {0};
    for (int i = 0; i < full; i += VAD_LANES) exp_chunk(x + i, mx, scale, acc);
    if (rest) {
        float tacc[VAD_LANES] = {0};
        exp_chunk(tail, mx, scale, tacc);
        for (int j = 0; j < rest; j++) {
            x[full + j] = tail[j];
            acc[j] += tacc[j];
        }
    }
    float inv = 1.0f / lane_sum(acc);
    for (int i = 0; i < n; i++) x[i] *= inv;
}

void vad_softmax_rows_serial(float *x, int rows, int cols, int ld, float scale) {
    for (int r = 0; r < rows; r++) softmax_row(x + (size_t)r * ld, cols, scale);
}

/* dl = scale * p * (dp - sum(dp * p)) over one row; dl may alias dp. */
VAD_HOT static void softmax_grad_row(float *dl, const float *dp, const float *p, int n, float scale) {
    float acc[VAD_LANES] = {0};
    int i = 0;
    for (; i + VAD_LANES <= n; i += VAD_LANES)
        for (int j = 0; j < VAD_LANES; j++) acc[j] += p[i + j] * dp[i + j];
    float dot = lane_sum(acc);
    for (; i < n; i++) dot += p[i] * dp[i];
    for (i = 0; i < n; i++) dl[i] = scale * p[i] * (dp[i] - dot);
}

void vad_softmax_rows_backward(float *dlogits, const float *dprob, const float *prob, int rows, int cols, int ld,
                               float scale) {
    for (int r = 0; r < rows; r++)
        softmax_grad_row(dlogits + (size_t)r * ld, dprob + (size_t)r * ld, prob + (size_t)r * ld, cols, scale);
}

/* ---------------------------------------------------------------- attention */

typedef struct {
    float *out;
    const float *qkv;
    float *scratch;
    int T, D, heads;
} attn_ctx;

static void attention_task(void *vctx, int64_t begin, int64_t end, int tid) {
    attn_ctx *c = (attn_ctx *)vctx;
    int T = c->T, D = c->D, dh = D / c->heads, rows = T < VAD_ATTN_ROWS ? T : VAD_ATTN_ROWS;
    float *S = c->scratch + (size_t)tid * rows * T;
    for (int64_t job = begin; job < end; job++) {
        int b = (int)(job / c->heads), h = (int)(job % c->heads);
        const float *base = c->qkv + (size_t)b * T * 3 * D;
        const float *Q = base + h * dh, *K = base + D + h * dh, *V = base + 2 * D + h * dh;
        float *O = c->out + (size_t)b * T * D + h * dh;
        /* query rows in blocks so the score block stays in cache; scale folded into the softmax */
        for (int r0 = 0; r0 < T; r0 += rows) {
            int rc = T - r0 < rows ? T - r0 : rows;
            vad_sgemm(0, 1, rc, T, dh, 1.0f, Q + (size_t)r0 * 3 * D, 3 * D, K, 3 * D, 0.0f, S, T);
            vad_softmax_rows_serial(S, rc, T, T, 1.0f / sqrtf((float)dh));
            vad_sgemm(0, 0, rc, dh, T, 1.0f, S, T, V, 3 * D, 0.0f, O + (size_t)r0 * D, D);
        }
    }
}

size_t vad_attention_scratch(int T, int nthreads) {
    return (size_t)nthreads * (size_t)(T < VAD_ATTN_ROWS ? T : VAD_ATTN_ROWS) * (size_t)T;
}

void vad_attention(vad_pool *pool, float *out, const float *qkv, float *scratch, int B, int T,
                   int D, int heads) {
    attn_ctx c = {out, qkv, scratch, T, D, heads};
    vad_parallel_for(pool, (int64_t)B * heads, 1, attention_task, &c);
}


/* Attention backward: recomputes each head's probabilities P from qkv, then
 * dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(P dP)), dQ = s dS K, dK = s dS^T Q.
 * dout [B, T, D]; dqkv [B, T, 3D] written. Query rows in blocks of VAD_ATTN_ROWS. */
typedef struct {
    float *dqkv, *scratch;
    const float *dout, *qkv;
    int T, D, heads;
} attn_back_ctx;

static void attention_back_task(void *vctx, int64_t begin, int64_t end, int tid) {
    attn_back_ctx *c = (attn_back_ctx *)vctx;
    int T = c->T, D = c->D, dh = D / c->heads, rows = T < VAD_ATTN_ROWS ? T : VAD_ATTN_ROWS;
    float scale = 1.0f / sqrtf((float)dh);
    float *P = c->scratch + (size_t)tid * 2 * rows * T, *dS = P + (size_t)rows * T;
    for (int64_t job = begin; job < end; job++) {
        int b = (int)(job / c->heads), h = (int)(job % c->heads);
        const float *base = c->qkv + (size_t)b * T * 3 * D;
        const float *Q = base + h * dh, *K = base + D + h * dh, *V = base + 2 * D + h * dh;
        const float *dO = c->dout + (size_t)b * T * D + h * dh;
        float *dbase = c->dqkv + (size_t)b * T * 3 * D;
        float *dQ = dbase + h * dh, *dK = dbase + D + h * dh, *dV = dbase + 2 * D + h * dh;
        for (int r0 = 0; r0 < T; r0 += rows) {
            int rc = T - r0 < rows ? T - r0 : rows;
            float acc = r0 == 0 ? 0.0f : 1.0f; /* dK, dV sum over the query blocks */
            const float *Qc = Q + (size_t)r0 * 3 * D, *dOc = dO + (size_t)r0 * D;
            vad_sgemm(0, 1, rc, T, dh, 1.0f, Qc, 3 * D, K, 3 * D, 0.0f, P, T);
            vad_softmax_rows_serial(P, rc, T, T, scale);
            vad_sgemm(1, 0, T, dh, rc, 1.0f, P, T, dOc, D, acc, dV, 3 * D);
            vad_sgemm(0, 1, rc, T, dh, 1.0f, dOc, D, V, 3 * D, 0.0f, dS, T);
            vad_softmax_rows_backward(dS, dS, P, rc, T, T, 1.0f);
            vad_sgemm(0, 0, rc, dh, T, scale, dS, T, K, 3 * D, 0.0f, dQ + (size_t)r0 * 3 * D, 3 * D);
            vad_sgemm(1, 0, T, dh, rc, scale, dS, T, Qc, 3 * D, acc, dK, 3 * D);
        }
    }
}

size_t vad_attention_backward_scratch(int T, int nthreads) { return 2 * vad_attention_scratch(T, nthreads); }

void vad_attention_backward(vad_pool *pool, float *dqkv, const float *dout, const float *qkv, float *scratch,
                            int B, int T, int D, int heads) {
    attn_back_ctx c = {dqkv, scratch, dout, qkv, T, D, heads};
    vad_parallel_for(pool, (int64_t)B * heads, 1, attention_back_task, &c);
}
