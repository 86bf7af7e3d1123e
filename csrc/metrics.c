#include "metrics.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"

enum { BAD_LABEL = 1, BAD_SCORE = 2 };

/* ================================================================== score keys */

/* Order-preserving unsigned key of a score: a < b <=> key(a) < key(b), and -0.0 shares the key of
 * +0.0 (one threshold, as in NumPy comparisons). Keys of float32 scores have 32 bits, those of
 * float64 scores ("wide") 64; key arrays hold uint32_t or uint64_t accordingly, which halves the
 * sorting traffic for float32 maps. Returns 0 for NaN/Inf. */
static inline int score_key(const void *scores, int wide, int64_t i, uint64_t *key) {
    if (wide) {
        double x = ((const double *)scores)[i];
        if (x == 0.0) x = 0.0;
        uint64_t u;
        memcpy(&u, &x, sizeof u);
        *key = (u >> 63) ? ~u : (u | (UINT64_C(1) << 63));
        return isfinite(x);
    }
    float x = ((const float *)scores)[i];
    if (x == 0.0f) x = 0.0f;
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    *key = (u >> 31) ? ~u : (u | UINT32_C(0x80000000));
    return isfinite(x);
}

static inline uint64_t key_get(const void *keys, int wide, int64_t i) {
    return wide ? ((const uint64_t *)keys)[i] : ((const uint32_t *)keys)[i];
}

static inline void key_put(void *keys, int wide, int64_t i, uint64_t key) {
    if (wide)
        ((uint64_t *)keys)[i] = key;
    else
        ((uint32_t *)keys)[i] = (uint32_t)key;
}

static inline size_t key_size(int wide) { return wide ? sizeof(uint64_t) : sizeof(uint32_t); }

static inline double score_value(const void *scores, int wide, int64_t i) {
    return wide ? ((const double *)scores)[i] : (double)((const float *)scores)[i];
}

static int bad_input(int bad, const char *labels_name, const char *scores_name) {
    if (bad & BAD_LABEL) return vad_fail(VAD_ERR_VALUE, "%s must contain only 0 and 1", labels_name);
    return vad_fail(VAD_ERR_VALUE, "%s contain NaN or Inf values", scores_name);
}

/* ================================================================== slices */

/* Work over n items is split into S fixed slices [n*s/S, n*(s+1)/S), one per pool thread, so that
 * a counting pass and the pass that writes at the counted offsets agree on each slice's items. */
static int slice_count(vad_pool *pool, int64_t n) {
    int64_t s = n >> 16; /* at least 64K items per slice */
    int threads = vad_pool_size(pool);
    if (s > threads) s = threads;
    return s < 1 ? 1 : (int)s;
}

static inline int64_t slice_begin(int64_t n, int64_t s, int slices) { return n / slices * s + n % slices * s / slices; }

/* ================================================================== radix sort */

#define RADIX_MAX_BUCKETS 2048

/* Digits of a key, low to high: 10/11/11 bits per 32-bit half (three passes for a 32-bit key, six
 * for a 64-bit one, fewer when a digit is the same in every key). */
static const int digit_shift[6] = {0, 10, 21, 32, 42, 53};
static const int digit_bits[6] = {10, 11, 11, 10, 11, 11};

typedef struct {
    const void *keys;
    void *keys_out;
    int wide;
    const uint32_t *vals; /* NULL: keys only */
    uint32_t *vals_out;
    int64_t n;
    int slices, shift;
    uint64_t digit_mask;
    int64_t (*counts)[RADIX_MAX_BUCKETS]; /* per slice: bucket counts, then write cursors */
    uint64_t *bits_or, *bits_and;         /* per slice */
} radix_ctx;

static void radix_bits_task(void *p, int64_t s0, int64_t s1, int tid) {
    (void)tid;
    const radix_ctx *c = (const radix_ctx *)p;
    const int wide = c->wide;
    for (int64_t s = s0; s < s1; s++) {
        uint64_t o = 0, a = ~UINT64_C(0);
        for (int64_t i = slice_begin(c->n, s, c->slices), e = slice_begin(c->n, s + 1, c->slices); i < e; i++) {
            uint64_t k = key_get(c->keys, wide, i);
            o |= k;
            a &= k;
        }
        c->bits_or[s] = o;
        c->bits_and[s] = a;
    }
}

static void radix_count_task(void *p, int64_t s0, int64_t s1, int tid) {
    (void)tid;
    const radix_ctx *c = (const radix_ctx *)p;
    const int wide = c->wide, shift = c->shift;
    const uint64_t mask = c->digit_mask;
    for (int64_t s = s0; s < s1; s++) {
        int64_t *cnt = c->counts[s];
        memset(cnt, 0, sizeof c->counts[s]);
        for (int64_t i = slice_begin(c->n, s, c->slices), e = slice_begin(c->n, s + 1, c->slices); i < e; i++)
            cnt[(key_get(c->keys, wide, i) >> shift) & mask]++;
    }
}

static void radix_scatter_task(void *p, int64_t s0, int64_t s1, int tid) {
    (void)tid;
    const radix_ctx *c = (const radix_ctx *)p;
    const int wide = c->wide, shift = c->shift;
    const uint64_t mask = c->digit_mask;
    for (int64_t s = s0; s < s1; s++) {
        int64_t *cur = c->counts[s];
        int64_t b = slice_begin(c->n, s, c->slices), e = slice_begin(c->n, s + 1, c->slices);
        if (c->vals) {
            for (int64_t i = b; i < e; i++) {
                uint64_t k = key_get(c->keys, wide, i);
                int64_t j = cur[(k >> shift) & mask]++;
                key_put(c->keys_out, wide, j, k);
                c->vals_out[j] = c->vals[i];
            }
        } else {
            for (int64_t i = b; i < e; i++) {
                uint64_t k = key_get(c->keys, wide, i);
                key_put(c->keys_out, wide, cur[(k >> shift) & mask]++, k);
            }
        }
    }
}

/* Sorts the n keys of *keys ascending (stable LSD radix sort, digits constant over all keys
 * skipped), carrying (*vals) along when vals is not NULL. *keys_tmp / *vals_tmp are scratch
 * buffers of the same sizes; pointers are swapped so that on return *keys / *vals hold the result. */
static int radix_sort(void **keys, void **keys_tmp, int wide, uint32_t **vals, uint32_t **vals_tmp, int64_t n,
                      vad_pool *pool) {
    if (n < 2) return VAD_OK;
    radix_ctx c = {.wide = wide, .n = n, .slices = slice_count(pool, n)};
    c.counts = malloc(sizeof *c.counts * (size_t)c.slices);
    c.bits_or = malloc(sizeof(uint64_t) * 2 * (size_t)c.slices);
    if (!c.counts || !c.bits_or) {
        free(c.counts);
        free(c.bits_or);
        return vad_fail(VAD_ERR_MEMORY, "out of memory in the metrics sort");
    }
    c.bits_and = c.bits_or + c.slices;
    c.keys = *keys;
    vad_parallel_for(pool, c.slices, 1, radix_bits_task, &c);
    uint64_t all_and = ~UINT64_C(0), all_or = 0;
    for (int s = 0; s < c.slices; s++) {
        all_or |= c.bits_or[s];
        all_and &= c.bits_and[s];
    }
    uint64_t varying = all_or ^ all_and; /* bits that differ between some keys */
    for (int d = 0; d < (wide ? 6 : 3); d++) {
        c.shift = digit_shift[d];
        c.digit_mask = (UINT64_C(1) << digit_bits[d]) - 1;
        if (!((varying >> c.shift) & c.digit_mask)) continue;
        c.keys = *keys;
        c.keys_out = *keys_tmp;
        c.vals = vals ? *vals : NULL;
        c.vals_out = vals ? *vals_tmp : NULL;
        vad_parallel_for(pool, c.slices, 1, radix_count_task, &c);
        int64_t offset = 0;
        for (uint64_t b = 0; b <= c.digit_mask; b++)
            for (int s = 0; s < c.slices; s++) {
                int64_t k = c.counts[s][b];
                c.counts[s][b] = offset;
                offset += k;
            }
        vad_parallel_for(pool, c.slices, 1, radix_scatter_task, &c);
        void *kt = *keys;
        *keys = *keys_tmp;
        *keys_tmp = kt;
        if (vals) {
            uint32_t *vt = *vals;
            *vals = *vals_tmp;
            *vals_tmp = vt;
        }
    }
    free(c.counts);
    free(c.bits_or);
    return VAD_OK;
}

/* ================================================================== binary metrics */

typedef struct {
    const uint8_t *labels;
    const void *scores;
    int wide, slices;
    int64_t n;
    int64_t *n_pos; /* per slice: positives, then their write offset */
    int *bad;       /* per slice */
    void *pos, *neg;
} split_ctx;

static void split_count_task(void *p, int64_t s0, int64_t s1, int tid) {
    (void)tid;
    split_ctx *c = (split_ctx *)p;
    for (int64_t s = s0; s < s1; s++) {
        int64_t np = 0;
        uint8_t any = 0;
        for (int64_t i = slice_begin(c->n, s, c->slices), e = slice_begin(c->n, s + 1, c->slices); i < e; i++) {
            np += c->labels[i] == 1;
            any |= c->labels[i];
        }
        c->n_pos[s] = np;
        c->bad[s] = any > 1 ? BAD_LABEL : 0;
    }
}

static void split_fill_task(void *p, int64_t s0, int64_t s1, int tid) {
    (void)tid;
    split_ctx *c = (split_ctx *)p;
    const int wide = c->wide;
    for (int64_t s = s0; s < s1; s++) {
        int64_t b = slice_begin(c->n, s, c->slices), e = slice_begin(c->n, s + 1, c->slices);
        int64_t ip = c->n_pos[s], in = b - ip; /* negatives before this slice = items - positives */
        int ok = 1;
        for (int64_t i = b; i < e; i++) {
            uint64_t k;
            ok &= score_key(c->scores, wide, i, &k);
            if (c->labels[i])
                key_put(c->pos, wide, ip++, k);
            else
                key_put(c->neg, wide, in++, k);
        }
        if (!ok) c->bad[s] |= BAD_SCORE;
    }
}

/* The largest key not yet passed of two ascending arrays with [0, i) and [0, j) left (i + j > 0). */
static inline uint64_t next_key(const void *a, int64_t i, const void *b, int64_t j, int wide) {
    if (i == 0) return key_get(b, wide, j - 1);
    if (j == 0) return key_get(a, wide, i - 1);
    uint64_t ka = key_get(a, wide, i - 1), kb = key_get(b, wide, j - 1);
    return ka > kb ? ka : kb;
}

/* One walk over the distinct thresholds, highest first, of the ascending key arrays. */
static void binary_walk(const void *pos, int64_t n_pos, const void *neg, int64_t n_neg, int wide,
                        vad_binary_result *out) {
    int64_t i = n_pos, j = n_neg; /* [0, i) and [0, j) are not yet passed */
    uint64_t tp = 0, fp = 0, auc2 = 0; /* auc2 = 2 * n_pos * n_neg * AUROC, exact in integers */
    double ap = 0.0, f1 = 0.0;
    while (i > 0 || j > 0) {
        uint64_t key = next_key(pos, i, neg, j, wide);
        uint64_t tp0 = tp, fp0 = fp;
        while (i > 0 && key_get(pos, wide, i - 1) == key) i--, tp++;
        while (j > 0 && key_get(neg, wide, j - 1) == key) j--, fp++;
        auc2 += (fp - fp0) * (tp + tp0);
        if (tp > tp0) ap += (double)(tp - tp0) * ((double)tp / (double)(tp + fp));
        /* F1 = 2PR/(P+R) = 2 tp / (tp + fp + n_pos); points with tp = 0 have P = R = 0 */
        double f = 2.0 * (double)tp / (double)(tp + fp + (uint64_t)n_pos);
        if (tp > 0 && f > f1) f1 = f;
    }
    out->auroc = (double)auc2 / (2.0 * (double)n_pos * (double)n_neg);
    out->ap = ap / (double)n_pos;
    out->f1_max = f1;
}

int vad_binary_metrics(const uint8_t *labels, const void *scores, int scores_f64, int64_t n,
                       vad_binary_result *out, vad_pool *pool) {
    if (n < 1) return vad_fail(VAD_ERR_VALUE, "y_true and y_score are empty");
    if (n > (INT64_C(1) << 32)) return vad_fail(VAD_ERR_VALUE, "at most 2^32 points are supported, got %lld", (long long)n);
    split_ctx c = {.labels = labels, .scores = scores, .wide = scores_f64, .n = n, .slices = slice_count(pool, n)};
    char *buf = NULL, *tmp = NULL;
    size_t ks = key_size(scores_f64);
    c.n_pos = malloc(sizeof(int64_t) * (size_t)c.slices);
    c.bad = malloc(sizeof(int) * (size_t)c.slices);
    int rc = VAD_OK;
    if (!c.n_pos || !c.bad) {
        rc = vad_fail(VAD_ERR_MEMORY, "out of memory in binary metrics");
        goto done;
    }
    vad_parallel_for(pool, c.slices, 1, split_count_task, &c);
    int64_t n_pos = 0;
    int bad = 0;
    for (int s = 0; s < c.slices; s++) {
        int64_t k = c.n_pos[s];
        c.n_pos[s] = n_pos;
        n_pos += k;
        bad |= c.bad[s];
    }
    if (bad) {
        rc = bad_input(bad, "y_true", "y_score");
        goto done;
    }
    int64_t n_neg = n - n_pos;
    if (n_pos == 0 || n_neg == 0) {
        rc = vad_fail(VAD_ERR_VALUE, "only one class (%d) is present in y_true; the metric is not defined in that case",
                      n_pos ? 1 : 0);
        goto done;
    }
    buf = malloc(ks * (size_t)n);
    tmp = malloc(ks * (size_t)n);
    if (!buf || !tmp) {
        rc = vad_fail(VAD_ERR_MEMORY, "out of memory sorting %lld scores", (long long)n);
        goto done;
    }
    c.pos = buf;
    c.neg = buf + ks * (size_t)n_pos;
    vad_parallel_for(pool, c.slices, 1, split_fill_task, &c);
    for (int s = 0; s < c.slices; s++) bad |= c.bad[s];
    if (bad) {
        rc = bad_input(bad, "y_true", "y_score");
        goto done;
    }
    void *pos = c.pos, *neg = c.neg, *pos_tmp = tmp, *neg_tmp = tmp + ks * (size_t)n_pos;
    if ((rc = radix_sort(&pos, &pos_tmp, scores_f64, NULL, NULL, n_pos, pool)) ||
        (rc = radix_sort(&neg, &neg_tmp, scores_f64, NULL, NULL, n_neg, pool)))
        goto done;
    binary_walk(pos, n_pos, neg, n_neg, scores_f64, out);
done:
    free(buf);
    free(tmp);
    free(c.n_pos);
    free(c.bad);
    return rc;
}

/* ================================================================== connected components */

static inline uint32_t uf_find(uint32_t *parent, uint32_t x) {
    while (parent[x] != x) {
        parent[x] = parent[parent[x]];
        x = parent[x];
    }
    return x;
}

/* Joins two sets; the root is the smaller label, so parent[l] <= l holds for every label. */
static inline uint32_t uf_union(uint32_t *parent, uint32_t a, uint32_t b) {
    a = uf_find(parent, a);
    b = uf_find(parent, b);
    if (a < b) {
        parent[b] = a;
        return a;
    }
    parent[a] = b;
    return b;
}

/* 8-connected components of a binary mask (h, w) by a raster scan with union-find.
 * Scratch: labels (h*w), parent and sizes (h*w + 1 each). On return the region of a defect pixel p
 * is parent[labels[p]] in 1..R, sizes[r] its pixel count. Returns R. */
static uint32_t label_regions(const uint8_t *mask, int64_t h, int64_t w, uint32_t *labels, uint32_t *parent,
                              uint32_t *sizes) {
    uint32_t next = 1;
    parent[0] = 0;
    for (int64_t y = 0; y < h; y++) {
        const uint8_t *m = mask + y * w;
        uint32_t *lab = labels + y * w, *up = lab - w;
        for (int64_t x = 0; x < w; x++) {
            if (!m[x]) {
                lab[x] = 0;
                continue;
            }
            uint32_t l = y > 0 ? up[x] : 0;
            if (!l) { /* north is background: west, north-west and north-east may be separate regions */
                uint32_t west = x > 0 ? lab[x - 1] : 0, nw = y > 0 && x > 0 ? up[x - 1] : 0;
                uint32_t ne = y > 0 && x + 1 < w ? up[x + 1] : 0;
                l = west ? west : nw;
                if (l && ne)
                    l = uf_union(parent, l, ne);
                else if (!l)
                    l = ne;
                if (!l) {
                    l = next++;
                    parent[l] = l;
                }
            }
            lab[x] = l;
        }
    }
    /* Final ids 1..R in label order: parent[l] < l for non-roots, already final when l is reached. */
    uint32_t regions = 0;
    for (uint32_t l = 1; l < next; l++) parent[l] = parent[l] == l ? ++regions : parent[parent[l]];
    memset(sizes, 0, sizeof(uint32_t) * ((size_t)regions + 1));
    for (int64_t p = 0; p < h * w; p++)
        if (labels[p]) sizes[parent[labels[p]]]++;
    return regions;
}

/* Per-thread scratch for one (h, w) image: label_regions buffers and a pixel index list, carved
 * from one allocation of region_scratch(threads, hw). */
typedef struct {
    uint32_t *labels, *parent, *sizes, *index;
} region_buf;

static uint32_t *region_scratch(int threads, int64_t hw) { return malloc(sizeof(uint32_t) * (size_t)threads * (size_t)(4 * hw + 2)); }

static region_buf region_buf_of(uint32_t *scratch, int tid, int64_t hw) {
    region_buf r;
    r.labels = scratch + (size_t)tid * (size_t)(4 * hw + 2);
    r.parent = r.labels + hw;
    r.sizes = r.parent + hw + 1;
    r.index = r.sizes + hw + 1;
    return r;
}

static int check_images(int64_t n_images, int64_t h, int64_t w) {
    if (n_images < 1 || h < 1 || w < 1)
        return vad_fail(VAD_ERR_VALUE, "masks and maps must be non-empty (N, H, W) arrays, got (%lld, %lld, %lld)",
                        (long long)n_images, (long long)h, (long long)w);
    if (h * w >= (INT64_C(1) << 31))
        return vad_fail(VAD_ERR_VALUE, "images of %lld x %lld pixels are too large", (long long)h, (long long)w);
    return VAD_OK;
}

/* ================================================================== AUPRO (MVTec AD) */

#define SELECT_BITS 16 /* the collection threshold is the floor of a 16-bit key prefix */

typedef struct {
    const uint8_t *masks;
    const void *maps;
    int wide;
    int64_t h, w, hw;
    int shift;        /* key >> shift = the key's top SELECT_BITS bits */
    int64_t *hist;    /* [threads][1 << SELECT_BITS]: normal pixels by key prefix */
    int *bad;         /* per thread */
    uint64_t min_key; /* pixels with key >= min_key are collected */
    int64_t *img_defects, *img_neg, *img_pos; /* per image: defect pixels; collected pixels, then offsets */
    int64_t *img_regions;                     /* per image */
    void *neg_keys, *pos_keys;
    uint32_t *pos_sizes, *scratch;
} pro_ctx;

static void pro_scan_task(void *p, int64_t i0, int64_t i1, int tid) {
    pro_ctx *c = (pro_ctx *)p;
    const int wide = c->wide, shift = c->shift;
    int64_t *hist = c->hist + ((size_t)tid << SELECT_BITS);
    uint8_t any = 0;
    int ok = 1;
    for (int64_t i = i0; i < i1; i++) {
        int64_t defects = 0;
        for (int64_t q = i * c->hw; q < (i + 1) * c->hw; q++) {
            uint8_t m = c->masks[q];
            uint64_t k;
            ok &= score_key(c->maps, wide, q, &k);
            any |= m;
            defects += m;
            if (!m) hist[k >> shift]++;
        }
        c->img_defects[i] = defects;
    }
    c->bad[tid] |= (any > 1 ? BAD_LABEL : 0) | (ok ? 0 : BAD_SCORE);
}

static void pro_count_task(void *p, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    pro_ctx *c = (pro_ctx *)p;
    const int wide = c->wide;
    for (int64_t i = i0; i < i1; i++) {
        int64_t np = 0, nn = 0;
        for (int64_t q = i * c->hw; q < (i + 1) * c->hw; q++) {
            uint64_t k;
            score_key(c->maps, wide, q, &k);
            int64_t above = k >= c->min_key, m = c->masks[q];
            np += above & m;
            nn += above & !m;
        }
        c->img_pos[i] = np;
        c->img_neg[i] = nn;
    }
}

static void pro_fill_task(void *p, int64_t i0, int64_t i1, int tid) {
    pro_ctx *c = (pro_ctx *)p;
    const int wide = c->wide;
    region_buf r = region_buf_of(c->scratch, tid, c->hw);
    for (int64_t i = i0; i < i1; i++) {
        const uint8_t *mask = c->masks + i * c->hw;
        c->img_regions[i] = c->img_defects[i] ? label_regions(mask, c->h, c->w, r.labels, r.parent, r.sizes) : 0;
        int64_t ip = c->img_pos[i], in = c->img_neg[i], n_sel = 0;
        for (int64_t q = 0; q < c->hw; q++) { /* branch-free list of the collected pixels */
            uint64_t k;
            score_key(c->maps, wide, i * c->hw + q, &k);
            r.index[n_sel] = (uint32_t)q;
            n_sel += k >= c->min_key;
        }
        for (int64_t t = 0; t < n_sel; t++) {
            int64_t q = r.index[t];
            uint64_t k;
            score_key(c->maps, wide, i * c->hw + q, &k);
            if (mask[q]) {
                key_put(c->pos_keys, wide, ip, k);
                c->pos_sizes[ip++] = r.sizes[r.parent[r.labels[q]]];
            } else {
                key_put(c->neg_keys, wide, in++, k);
            }
        }
    }
}

/* Smallest count c of normal pixels with c / n_neg >= limit (as computed in double). */
static int64_t fpr_rank(int64_t n_neg, double limit) {
    int64_t c = (int64_t)ceil(limit * (double)n_neg);
    if (c < 1) c = 1;
    if (c > n_neg) c = n_neg;
    while (c > 1 && (double)(c - 1) / (double)n_neg >= limit) c--;
    while (c < n_neg && (double)c / (double)n_neg < limit) c++;
    return c;
}

/* Integrates the PRO curve (0, 0), (FPR_t, PRO_t) for the distinct thresholds t (highest first) over
 * FPR in [0, limit] by the trapezoid rule, interpolating linearly at limit; divides by limit. The
 * ascending key arrays hold every pixel whose score reaches the threshold where FPR >= limit. */
static double pro_integral(const void *neg, int64_t n_neg_sel, const void *pos, const uint32_t *pos_sizes,
                           int64_t n_pos_sel, int wide, int64_t n_neg, int64_t n_regions, double limit) {
    int64_t i = n_pos_sel, j = n_neg_sel, fp = 0; /* [0, i) and [0, j) are not yet passed */
    double inv_sum = 0.0, f0 = 0.0, p0 = 0.0, area = 0.0; /* inv_sum: sum of 1/size over covered pixels */
    while (i > 0 || j > 0) {
        uint64_t key = next_key(pos, i, neg, j, wide);
        while (i > 0 && key_get(pos, wide, i - 1) == key) i--, inv_sum += 1.0 / (double)pos_sizes[i];
        while (j > 0 && key_get(neg, wide, j - 1) == key) j--, fp++;
        double f = (double)fp / (double)n_neg, pro = inv_sum / (double)n_regions;
        if (f >= limit) {
            double pro_at = f > limit ? p0 + (pro - p0) * (limit - f0) / (f - f0) : pro;
            area += 0.5 * (limit - f0) * (p0 + pro_at);
            break;
        }
        area += 0.5 * (f - f0) * (p0 + pro);
        f0 = f;
        p0 = pro;
    }
    return area / limit;
}

int vad_aupro(const uint8_t *masks, const void *maps, int maps_f64, int64_t n_images, int64_t height,
              int64_t width, double fpr_limit, double *out, vad_pool *pool) {
    int rc = check_images(n_images, height, width);
    if (rc) return rc;
    if (!(fpr_limit > 0.0 && fpr_limit <= 1.0)) return vad_fail(VAD_ERR_VALUE, "fpr_limit must be in (0, 1], got %g", fpr_limit);
    int threads = vad_pool_size(pool);
    int64_t hw = height * width, n = n_images * hw;
    pro_ctx c = {.masks = masks, .maps = maps, .wide = maps_f64, .h = height, .w = width, .hw = hw};
    char *tmp = NULL;
    size_t ks = key_size(maps_f64);
    uint32_t *tmp_sizes = NULL;
    c.shift = (maps_f64 ? 64 : 32) - SELECT_BITS;
    c.hist = calloc((size_t)threads << SELECT_BITS, sizeof(int64_t));
    c.bad = calloc((size_t)threads, sizeof(int));
    c.img_defects = malloc(sizeof(int64_t) * 4 * (size_t)n_images);
    if (!c.hist || !c.bad || !c.img_defects) {
        rc = vad_fail(VAD_ERR_MEMORY, "out of memory in aupro");
        goto done;
    }
    c.img_neg = c.img_defects + n_images;
    c.img_pos = c.img_neg + n_images;
    c.img_regions = c.img_pos + n_images;

    /* 1. Collection threshold: the floor of the 16-bit key prefix holding the rank-th largest
     * normal score, where FPR first reaches fpr_limit. Everything the integral needs is at or above
     * it, with at most one prefix bucket of normal pixels in excess. */
    vad_parallel_for(pool, n_images, 1, pro_scan_task, &c);
    int bad = 0;
    for (int t = 0; t < threads; t++) bad |= c.bad[t];
    if (bad) {
        rc = bad_input(bad, "masks", "maps");
        goto done;
    }
    int64_t n_neg = n;
    for (int64_t i = 0; i < n_images; i++) n_neg -= c.img_defects[i];
    if (n_neg == 0 || n_neg == n) {
        rc = vad_fail(VAD_ERR_VALUE, "masks contain no %s pixel; AUPRO needs defect regions and normal pixels",
                      n_neg ? "defect" : "normal");
        goto done;
    }
    const int64_t n_buckets = INT64_C(1) << SELECT_BITS;
    for (int t = 1; t < threads; t++)
        for (int64_t b = 0; b < n_buckets; b++) c.hist[b] += c.hist[t * n_buckets + b];
    int64_t rank = fpr_rank(n_neg, fpr_limit), above = 0, top = n_buckets - 1;
    for (; top > 0 && above + c.hist[top] < rank; top--) above += c.hist[top];
    c.min_key = (uint64_t)top << c.shift;

    /* 2. Collect the pixels at or above that threshold (with their region sizes) and sort them. */
    vad_parallel_for(pool, n_images, 1, pro_count_task, &c);
    int64_t n_neg_sel = 0, n_pos_sel = 0;
    for (int64_t i = 0; i < n_images; i++) {
        int64_t a = c.img_neg[i], b = c.img_pos[i];
        c.img_neg[i] = n_neg_sel;
        c.img_pos[i] = n_pos_sel;
        n_neg_sel += a;
        n_pos_sel += b;
    }
    size_t n_sel = (size_t)(n_neg_sel + n_pos_sel);
    c.neg_keys = malloc(ks * n_sel);
    c.pos_sizes = malloc(sizeof(uint32_t) * ((size_t)n_pos_sel + 1));
    c.scratch = region_scratch(threads, hw);
    tmp = malloc(ks * n_sel);
    tmp_sizes = malloc(sizeof(uint32_t) * ((size_t)n_pos_sel + 1));
    if (!c.neg_keys || !c.pos_sizes || !c.scratch || !tmp || !tmp_sizes) {
        rc = vad_fail(VAD_ERR_MEMORY, "out of memory in aupro (%zu pixels above the FPR limit)", n_sel);
        goto done;
    }
    c.pos_keys = (char *)c.neg_keys + ks * (size_t)n_neg_sel;
    vad_parallel_for(pool, n_images, 1, pro_fill_task, &c);
    int64_t n_regions = 0;
    for (int64_t i = 0; i < n_images; i++) n_regions += c.img_regions[i];
    void *neg = c.neg_keys, *pos = c.pos_keys, *neg_tmp = tmp, *pos_tmp = tmp + ks * (size_t)n_neg_sel;
    uint32_t *sizes = c.pos_sizes, *sizes_tmp = tmp_sizes;
    if ((rc = radix_sort(&neg, &neg_tmp, maps_f64, NULL, NULL, n_neg_sel, pool)) ||
        (rc = radix_sort(&pos, &pos_tmp, maps_f64, &sizes, &sizes_tmp, n_pos_sel, pool)))
        goto done;
    /* 3. Walk the thresholds. */
    *out = pro_integral(neg, n_neg_sel, pos, sizes, n_pos_sel, maps_f64, n_neg, n_regions, fpr_limit);
done:
    free(c.hist);
    free(c.bad);
    free(c.img_defects);
    free(c.neg_keys);
    free(c.pos_sizes);
    free(c.scratch);
    free(tmp);
    free(tmp_sizes);
    return rc;
}

/* ================================================================== AUPRO (AnomalyCLIP) */

typedef struct {
    const uint8_t *masks;
    const void *maps;
    int wide;
    int64_t h, w, hw;
    const double *th;
    int64_t n_th;
    double inv_step; /* 1 / mean threshold spacing, for the first guess of a pixel's bin */
    int64_t *neg_hist; /* [threads][n_th + 1]: normal pixels by bin */
    double *pos_hist;  /* [threads][n_th + 1]: sum of 1/region size of defect pixels by bin */
    int64_t *n_regions, *n_neg; /* per thread */
    int *bad;
    uint32_t *scratch;
} clip_ctx;

/* Bin of score s: the number of thresholds t with t < s (s is positive at exactly those). */
static inline int64_t threshold_bin(const clip_ctx *c, double s) {
    double guess = (s - c->th[0]) * c->inv_step; /* NaN (0 * inf) falls to 0 */
    int64_t j = !(guess > 0.0) ? 0 : guess >= (double)c->n_th ? c->n_th : (int64_t)ceil(guess);
    while (j > 0 && c->th[j - 1] >= s) j--;
    while (j < c->n_th && c->th[j] < s) j++;
    return j;
}

static void clip_task(void *p, int64_t i0, int64_t i1, int tid) {
    clip_ctx *c = (clip_ctx *)p;
    region_buf r = region_buf_of(c->scratch, tid, c->hw);
    int64_t *neg_hist = c->neg_hist + (size_t)tid * (size_t)(c->n_th + 1);
    double *pos_hist = c->pos_hist + (size_t)tid * (size_t)(c->n_th + 1);
    uint8_t any = 0;
    int ok = 1;
    for (int64_t i = i0; i < i1; i++) {
        const uint8_t *mask = c->masks + i * c->hw;
        int64_t defects = 0;
        for (int64_t q = 0; q < c->hw; q++) any |= mask[q], defects += mask[q];
        if (any > 1) break;
        if (defects) c->n_regions[tid] += label_regions(mask, c->h, c->w, r.labels, r.parent, r.sizes);
        for (int64_t q = 0; q < c->hw; q++) {
            double s = score_value(c->maps, c->wide, i * c->hw + q);
            if (!isfinite(s)) {
                ok = 0;
                continue;
            }
            int64_t j = threshold_bin(c, s);
            if (mask[q])
                pos_hist[j] += 1.0 / (double)r.sizes[r.parent[r.labels[q]]];
            else
                neg_hist[j]++, c->n_neg[tid]++;
        }
    }
    c->bad[tid] |= (any > 1 ? BAD_LABEL : 0) | (ok ? 0 : BAD_SCORE);
}

int vad_aupro_anomalyclip(const uint8_t *masks, const void *maps, int maps_f64, int64_t n_images,
                          int64_t height, int64_t width, const double *thresholds, int64_t n_thresholds,
                          double fpr_below, double *out, vad_pool *pool) {
    int rc = check_images(n_images, height, width);
    if (rc) return rc;
    if (n_thresholds < 1) return vad_fail(VAD_ERR_VALUE, "at least one threshold is needed");
    for (int64_t k = 0; k < n_thresholds; k++)
        if (!isfinite(thresholds[k]) || (k > 0 && !(thresholds[k] > thresholds[k - 1])))
            return vad_fail(VAD_ERR_VALUE, "thresholds must be finite and strictly increasing");
    int threads = vad_pool_size(pool);
    int64_t hw = height * width, bins = n_thresholds + 1;
    clip_ctx c = {.masks = masks, .maps = maps, .wide = maps_f64, .h = height, .w = width, .hw = hw,
                  .th = thresholds, .n_th = n_thresholds};
    if (n_thresholds > 1) c.inv_step = (double)(n_thresholds - 1) / (thresholds[n_thresholds - 1] - thresholds[0]);
    double *fpr = NULL;
    c.neg_hist = calloc((size_t)threads * (size_t)bins, sizeof(int64_t));
    c.pos_hist = calloc((size_t)threads * (size_t)bins, sizeof(double));
    c.n_regions = calloc(2 * (size_t)threads, sizeof(int64_t));
    c.bad = calloc((size_t)threads, sizeof(int));
    c.scratch = region_scratch(threads, hw);
    fpr = malloc(sizeof(double) * 2 * (size_t)n_thresholds);
    if (!c.neg_hist || !c.pos_hist || !c.n_regions || !c.bad || !c.scratch || !fpr) {
        rc = vad_fail(VAD_ERR_MEMORY, "out of memory in aupro_anomalyclip");
        goto done;
    }
    c.n_neg = c.n_regions + threads;
    vad_parallel_for(pool, n_images, 1, clip_task, &c);
    int64_t n_regions = 0, n_neg = 0;
    int bad = 0;
    for (int t = 0; t < threads; t++) {
        n_regions += c.n_regions[t];
        n_neg += c.n_neg[t];
        bad |= c.bad[t];
        for (int64_t j = 0; t > 0 && j < bins; j++) {
            c.neg_hist[j] += c.neg_hist[t * bins + j];
            c.pos_hist[j] += c.pos_hist[t * bins + j];
        }
    }
    if (bad) {
        rc = bad_input(bad, "masks", "maps");
        goto done;
    }
    if (n_regions == 0 || n_neg == 0) {
        rc = vad_fail(VAD_ERR_VALUE, "masks contain no %s pixel; AUPRO needs defect regions and normal pixels",
                      n_neg ? "defect" : "normal");
        goto done;
    }
    /* Pixels positive at threshold k are those in bins j > k: suffix sums, highest threshold first. */
    double *pro = fpr + n_thresholds, pro_sum = 0.0;
    int64_t fp = 0;
    for (int64_t k = n_thresholds - 1; k >= 0; k--) {
        fp += c.neg_hist[k + 1];
        pro_sum += c.pos_hist[k + 1];
        fpr[k] = (double)fp / (double)n_neg;
        pro[k] = pro_sum / (double)n_regions;
    }
    double lo = INFINITY, hi = -INFINITY;
    int64_t kept = 0;
    for (int64_t k = 0; k < n_thresholds; k++)
        if (fpr[k] < fpr_below) {
            kept++;
            lo = fpr[k] < lo ? fpr[k] : lo;
            hi = fpr[k] > hi ? fpr[k] : hi;
        }
    if (kept < 2 || !(hi > lo)) {
        *out = NAN;
        goto done;
    }
    /* FPR falls as the threshold rises, so the kept rescaled FPRs run from high to low: the area is
     * the sum of (x_k - x_next) * (y_k + y_next) / 2 over consecutive kept points. */
    double area = 0.0, x0 = 0.0, y0 = 0.0;
    int first = 1;
    for (int64_t k = 0; k < n_thresholds; k++) {
        if (!(fpr[k] < fpr_below)) continue;
        double x = (fpr[k] - lo) / (hi - lo), y = pro[k];
        if (!first) area += (x0 - x) * (y0 + y) / 2.0;
        first = 0;
        x0 = x;
        y0 = y;
    }
    *out = area;
done:
    free(c.neg_hist);
    free(c.pos_hist);
    free(c.n_regions);
    free(c.bad);
    free(c.scratch);
    free(fpr);
    return rc;
}
