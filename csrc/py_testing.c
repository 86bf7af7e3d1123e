/* The test-only submodule visualad._engine.testing: single engine kernels and probes that tests and
 * benchmarks call directly (none of them is part of the package's API). */
#include "py_glue.h"

#include <math.h>
#include <stdlib.h>
#include <time.h>

#include "attention_backward.h"
#include "attention_fused.h"
#include "bf16_gemm.h"
#include "cpu_features.h"
#include "dropout.h"
#include "errors.h"
#include "maps.h"
#include "ops.h"
#include "panel_gemm.h"
#include "resize.h"

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Best wall time (seconds) of an n x n x n vad_linear over `repeats` runs (after one warm-up run)
 * with a fresh pool of nthreads: the reference peak the benchmarks compare against. */
static int sgemm_best_seconds(int n, int repeats, int nthreads, double *best_seconds) {
    size_t nn = (size_t)n * n;
    float *a = (float *)malloc(3 * nn * sizeof(float));
    vad_pool *pool = vad_pool_create(nthreads);
    if (!a || !pool) {
        free(a);
        vad_pool_free(pool);
        return vad_fail(VAD_ERR_MEMORY, "out of memory in the SGEMM probe");
    }
    for (size_t i = 0; i < 2 * nn; i++) a[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
    double best = 1e30;
    for (int r = 0; r <= repeats; r++) {
        double t0 = now_seconds();
        vad_linear(pool, a + 2 * nn, n, a, n, a + nn, NULL, n, n, n, 0.0f);
        double dt = now_seconds() - t0;
        if (r > 0 && dt < best) best = dt;
    }
    *best_seconds = best;
    free(a);
    vad_pool_free(pool);
    return VAD_OK;
}

static PyObject *py_gaussian_filter(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *obj;
    double sigma;
    int nthreads = 1;
    if (!PyArg_ParseTuple(args, "Od|O&", &obj, &sigma, thread_count, &nthreads)) return NULL;
    if (!isfinite(sigma) || sigma < 0 || sigma > 1000) {
        PyErr_SetString(PyExc_ValueError, "sigma must be a finite number in [0, 1000]");
        return NULL;
    }
    PyArrayObject *in = as_float_array(obj, "maps", 3);
    if (!in) return NULL;
    PyArrayObject *out = (PyArrayObject *)PyArray_NewCopy(in, NPY_CORDER);
    Py_DECREF(in);
    if (!out) return NULL;
    npy_intp *d = PyArray_DIMS(out);
    if (PyArray_SIZE(out) == 0) return (PyObject *)out;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    vad_pool *pool = vad_pool_create(nthreads);
    rc = pool ? vad_gaussian_filter(pool, (float *)PyArray_DATA(out), (int)d[0], (int)d[1], (int)d[2], sigma)
              : vad_fail(VAD_ERR_MEMORY, "out of memory");
    vad_pool_free(pool);
    Py_END_ALLOW_THREADS
    if (rc) {
        Py_DECREF(out);
        return raise_status(rc);
    }
    return (PyObject *)out;
}

static PyObject *py_resize_bilinear(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *obj;
    int Hout, Wout;
    if (!PyArg_ParseTuple(args, "Oii", &obj, &Hout, &Wout)) return NULL;
    PyArrayObject *in = as_float_array(obj, "grid", 3);
    if (!in) return NULL;
    npy_intp *d = PyArray_DIMS(in);
    if (Hout < 1 || Wout < 1 || Hout > 1 << 14 || Wout > 1 << 14 || d[0] < 1 || d[1] < 1 || d[2] < 1) {
        Py_DECREF(in);
        PyErr_SetString(PyExc_ValueError, "sizes must be positive (and at most 16384)");
        return NULL;
    }
    npy_intp odims[3] = {Hout, Wout, d[2]};
    PyObject *out = new_float_array(3, odims);
    if (out) {
        Py_BEGIN_ALLOW_THREADS
        vad_resize_bilinear((float *)PyArray_DATA((PyArrayObject *)out), (const float *)PyArray_DATA(in), (int)d[2],
                            (int)d[0], (int)d[1], Hout, Wout);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(in);
    return out;
}

static PyObject *py_sgemm_seconds(PyObject *self, PyObject *args) {
    (void)self;
    int n, repeats, nthreads;
    if (!PyArg_ParseTuple(args, "iiO&", &n, &repeats, thread_count, &nthreads)) return NULL;
    if (n < 1 || n > 16384 || repeats < 1 || repeats > 1000) {
        PyErr_SetString(PyExc_ValueError, "need 1 <= n <= 16384, 1 <= repeats <= 1000");
        return NULL;
    }
    double best = -1.0;
    int rc = VAD_OK;
    Py_BEGIN_ALLOW_THREADS
    rc = sgemm_best_seconds(n, repeats, nthreads, &best);
    Py_END_ALLOW_THREADS
    if (rc) return raise_status(rc);
    return PyFloat_FromDouble(best);
}

/* The optional bias [N] and out [M, N] of a linear-layer probe: *o is `out` (accumulated into,
 * *beta = 1) or a new array (*beta = 0). New references; -1 with an exception set. */
static int linear_bias_out(PyObject *b_obj, PyObject *o_obj, npy_intp M, npy_intp N, PyArrayObject **b,
                           PyArrayObject **o, float *beta) {
    *beta = 0.0f;
    if (b_obj != Py_None) {
        if (!(*b = as_float_array(b_obj, "bias", 1))) return -1;
        if (PyArray_DIM(*b, 0) != N) {
            PyErr_Format(PyExc_ValueError, "bias has %zd values, expected %zd", (Py_ssize_t)PyArray_DIM(*b, 0),
                         (Py_ssize_t)N);
            return -1;
        }
    }
    if (o_obj == Py_None) {
        npy_intp dims[2] = {M, N};
        *o = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        return *o ? 0 : -1;
    }
    PyArrayObject *a = (PyArrayObject *)o_obj;
    if (!PyArray_Check(o_obj) || PyArray_TYPE(a) != NPY_FLOAT32 || PyArray_NDIM(a) != 2 || PyArray_DIM(a, 0) != M ||
        PyArray_DIM(a, 1) != N || !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "out must be a writeable C-contiguous float32 array of shape (%zd, %zd)",
                     (Py_ssize_t)M, (Py_ssize_t)N);
        return -1;
    }
    Py_INCREF(a);
    *o = a;
    *beta = 1.0f;
    return 0;
}

/* The backbone's linear layer on its own: out (new, or given and accumulated) = act(x W^T + bias)
 * with W stored in panels (visualad.backbone.write_tensor's layout). */
static PyObject *py_panel_linear(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    static char *kwlist[] = {"x", "panels", "n_out", "bias", "out", "activation", "num_threads", NULL};
    PyObject *x_obj, *p_obj, *b_obj = Py_None, *o_obj = Py_None;
    int N, act = -1, nthreads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOi|OOiO&", kwlist, &x_obj, &p_obj, &N, &b_obj, &o_obj, &act,
                                     thread_count, &nthreads))
        return NULL;
    if (N < 1 || act < -1 || act > VAD_ACT_GELU) {
        PyErr_SetString(PyExc_ValueError, "need n_out >= 1, activation in {-1, 0, 1}");
        return NULL;
    }
    PyArrayObject *x = as_float_array(x_obj, "x", 2), *p = NULL, *b = NULL, *o = NULL;
    PyObject *result = NULL;
    if (!x) return NULL;
    int M = (int)PyArray_DIM(x, 0), K = (int)PyArray_DIM(x, 1);
    if (!(p = as_float_array(p_obj, "panels", 1))) goto done;
    if (K < 1 || (size_t)PyArray_SIZE(p) != vad_panel_floats(N, K)) {
        PyErr_Format(PyExc_ValueError, "panels has %zd floats, a [%d, %d] weight needs %zu", PyArray_SIZE(p), N, K,
                     vad_panel_floats(N, K));
        goto done;
    }
    float beta;
    if (linear_bias_out(b_obj, o_obj, M, N, &b, &o, &beta)) goto done;
    vad_pool *pool = vad_pool_create(nthreads);
    if (!pool) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    vad_panel_linear(pool, (float *)PyArray_DATA(o), N, (const float *)PyArray_DATA(x), K,
                     (const float *)PyArray_DATA(p), b ? (const float *)PyArray_DATA(b) : NULL, M, N, K, beta, act);
    Py_END_ALLOW_THREADS
    vad_pool_free(pool);
    result = (PyObject *)o;
    o = NULL;
done:
    Py_XDECREF(x);
    Py_XDECREF(p);
    Py_XDECREF(b);
    Py_XDECREF(o);
    return result;
}

static PyObject *py_allow_bf16(PyObject *self, PyObject *arg) {
    (void)self;
    int allow = PyObject_IsTrue(arg);
    if (allow < 0) return NULL;
    return PyBool_FromLong(vad_precision_allow_bf16(allow));
}

/* The checked qkv [B, T, 3D] of the attention entries (precision and thread count checked too), or
 * NULL with the exception set. */
static PyArrayObject *attention_qkv(PyObject *q_obj, int heads, const char *prec_name, int nthreads, int *precision) {
    if ((*precision = parse_precision(prec_name)) < 0) return NULL;
    if (vad_precision_check(*precision)) return (PyArrayObject *)raise_status(VAD_ERR_VALUE);
    if (nthreads < 1 || nthreads > 256 || heads < 1) {
        PyErr_SetString(PyExc_ValueError, "need heads >= 1 and 1 <= num_threads <= 256");
        return NULL;
    }
    PyArrayObject *q = as_float_array(q_obj, "qkv", 3);
    if (!q) return NULL;
    npy_intp B = PyArray_DIM(q, 0), T = PyArray_DIM(q, 1), D3 = PyArray_DIM(q, 2);
    if (B < 1 || T < 1 || D3 < 3 || D3 % 3 || (D3 / 3) % heads || B * T * D3 > ((npy_intp)1 << 31)) {
        PyErr_Format(PyExc_ValueError, "qkv must have shape (B, T, 3D) with D divisible by heads=%d, got (%zd, %zd, %zd)",
                     heads, (Py_ssize_t)B, (Py_ssize_t)T, (Py_ssize_t)D3);
        Py_DECREF(q);
        return NULL;
    }
    if (!all_finite((const float *)PyArray_DATA(q), (size_t)PyArray_SIZE(q))) {
        PyErr_SetString(PyExc_ValueError, "qkv contains NaN or Inf values");
        Py_DECREF(q);
        return NULL;
    }
    return q;
}

/* The output array (dims), n_scr floats of scratch and a pool of nthreads for an attention entry;
 * -1 with MemoryError set (and nothing left allocated) when one of them fails. */
static int attention_buffers(npy_intp *dims, size_t n_scr, int nthreads, PyObject **out, float **scratch,
                             vad_pool **pool) {
    *out = new_float_array(3, dims);
    *scratch = (float *)malloc(n_scr * sizeof(float));
    *pool = vad_pool_create(nthreads);
    if (*out && *scratch && *pool) return 0;
    Py_XDECREF(*out);
    free(*scratch);
    vad_pool_free(*pool);
    PyErr_NoMemory();
    return -1;
}

/* The backbone's attention core on its own: qkv [B, T, 3D] -> out [B, T, D]. */
static PyObject *py_attention(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    static char *kwlist[] = {"qkv", "heads", "precision", "num_threads", NULL};
    PyObject *q_obj;
    const char *prec_name = "fp32";
    int heads, nthreads = 1, precision;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oi|si", kwlist, &q_obj, &heads, &prec_name, &nthreads)) return NULL;
    PyArrayObject *q = attention_qkv(q_obj, heads, prec_name, nthreads, &precision);
    if (!q) return NULL;
    npy_intp B = PyArray_DIM(q, 0), T = PyArray_DIM(q, 1);
    int D = (int)(PyArray_DIM(q, 2) / 3);
    npy_intp dims[3] = {B, T, D};
    int fused = vad_attention_fused_available(precision);
    size_t n_scr = fused ? vad_attention_fused_scratch((int)T, D / heads, nthreads) : vad_attention_scratch((int)T, nthreads);
    PyObject *out;
    float *scratch;
    vad_pool *pool;
    if (attention_buffers(dims, n_scr, nthreads, &out, &scratch, &pool)) {
        Py_DECREF(q);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (fused)
        vad_attention_fused(pool, (float *)PyArray_DATA((PyArrayObject *)out), (const float *)PyArray_DATA(q), scratch,
                            (int)B, (int)T, D, heads, precision);
    else
        vad_attention(pool, (float *)PyArray_DATA((PyArrayObject *)out), (const float *)PyArray_DATA(q), scratch,
                      (int)B, (int)T, D, heads);
    Py_END_ALLOW_THREADS
    vad_pool_free(pool);
    free(scratch);
    Py_DECREF(q);
    return out;
}

/* The backbone's attention backward on its own: (qkv [B, T, 3D], dout [B, T, D]) -> dqkv [B, T, 3D]. */
static PyObject *py_attention_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    static char *kwlist[] = {"qkv", "dout", "heads", "precision", "num_threads", NULL};
    PyObject *q_obj, *d_obj;
    const char *prec_name = "fp32";
    int heads, nthreads = 1, precision;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOi|si", kwlist, &q_obj, &d_obj, &heads, &prec_name, &nthreads))
        return NULL;
    PyArrayObject *q = attention_qkv(q_obj, heads, prec_name, nthreads, &precision);
    if (!q) return NULL;
    npy_intp B = PyArray_DIM(q, 0), T = PyArray_DIM(q, 1);
    int D = (int)(PyArray_DIM(q, 2) / 3);
    PyArrayObject *dout = as_float_array(d_obj, "dout", 3);
    if (!dout || PyArray_DIM(dout, 0) != B || PyArray_DIM(dout, 1) != T || PyArray_DIM(dout, 2) != D ||
        !all_finite((const float *)PyArray_DATA(dout), (size_t)PyArray_SIZE(dout))) {
        if (dout) PyErr_SetString(PyExc_ValueError, "dout must be a finite (B, T, D) array matching qkv");
        Py_XDECREF(dout);
        Py_DECREF(q);
        return NULL;
    }
    npy_intp dims[3] = {B, T, 3 * D};
    int bf16 = precision == VAD_BF16;
    size_t n_scr = bf16 ? vad_attention_backward_bf16_scratch((int)T, D / heads, nthreads)
                        : vad_attention_backward_scratch((int)T, nthreads);
    PyObject *out;
    float *scratch;
    vad_pool *pool;
    if (attention_buffers(dims, n_scr, nthreads, &out, &scratch, &pool)) {
        Py_DECREF(dout);
        Py_DECREF(q);
        return NULL;
    }
    float *o = (float *)PyArray_DATA((PyArrayObject *)out);
    const float *qp = (const float *)PyArray_DATA(q), *dp = (const float *)PyArray_DATA(dout);
    Py_BEGIN_ALLOW_THREADS
    if (bf16)
        vad_attention_backward_bf16(pool, o, dp, qp, scratch, (int)B, (int)T, D, heads);
    else
        vad_attention_backward(pool, o, dp, qp, scratch, (int)B, (int)T, D, heads);
    Py_END_ALLOW_THREADS
    vad_pool_free(pool);
    free(scratch);
    Py_DECREF(dout);
    Py_DECREF(q);
    return out;
}

/* LayerNorm of x [M, C] on its own: fp32 (vad_layernorm) or its bf16-rounded rows
 * (vad_layernorm_bf16, returned as float32 values). */
static PyObject *py_layernorm(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    static char *kwlist[] = {"x", "weight", "bias", "eps", "precision", "num_threads", NULL};
    PyObject *x_obj, *w_obj, *b_obj;
    const char *prec_name = "fp32";
    float eps;
    int nthreads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOf|si", kwlist, &x_obj, &w_obj, &b_obj, &eps, &prec_name,
                                     &nthreads))
        return NULL;
    int precision = parse_precision(prec_name);
    if (precision < 0) return NULL;
    if (precision == VAD_BF16 && vad_precision_check(VAD_BF16)) return raise_status(VAD_ERR_VALUE);
    if (nthreads < 1 || nthreads > 256) {
        PyErr_SetString(PyExc_ValueError, "need 1 <= num_threads <= 256");
        return NULL;
    }
    PyArrayObject *x = as_float_array(x_obj, "x", 2), *w = NULL, *b = NULL;
    PyObject *out = NULL;
    vad_bf16 *rows16 = NULL;
    vad_pool *pool = NULL;
    if (!x) return NULL;
    if (!(w = as_float_array(w_obj, "weight", 1)) || !(b = as_float_array(b_obj, "bias", 1))) goto done;
    npy_intp M = PyArray_DIM(x, 0), C = PyArray_DIM(x, 1);
    if (M < 1 || C < 1 || C > (1 << 20) || M > (1 << 24) || PyArray_DIM(w, 0) != C || PyArray_DIM(b, 0) != C) {
        PyErr_SetString(PyExc_ValueError, "x (M, C) needs M, C >= 1 and weight, bias of length C");
        goto done;
    }
    npy_intp dims[2] = {M, C};
    if (!(out = PyArray_SimpleNew(2, dims, NPY_FLOAT32))) goto done;
    size_t Cp = vad_bf16_input_elems(1, (int)C);
    if (precision == VAD_BF16 && !(rows16 = (vad_bf16 *)malloc((size_t)M * Cp * sizeof(vad_bf16)))) {
        Py_CLEAR(out);
        PyErr_NoMemory();
        goto done;
    }
    if (!(pool = vad_pool_create(nthreads))) {
        Py_CLEAR(out);
        PyErr_NoMemory();
        goto done;
    }
    float *o = (float *)PyArray_DATA((PyArrayObject *)out);
    const float *xd = (const float *)PyArray_DATA(x), *wd = (const float *)PyArray_DATA(w),
                *bd = (const float *)PyArray_DATA(b);
    Py_BEGIN_ALLOW_THREADS
    if (precision == VAD_BF16) {
        vad_layernorm_bf16(pool, rows16, xd, (int)C, wd, bd, (int)M, (int)C, eps);
        for (npy_intp r = 0; r < M; r++)
            for (npy_intp i = 0; i < C; i++) o[r * C + i] = vad_from_bf16(rows16[(size_t)r * Cp + (size_t)i]);
    } else {
        vad_layernorm(pool, o, (int)C, xd, (int)C, wd, bd, (int)M, (int)C, eps);
    }
    Py_END_ALLOW_THREADS
done:
    vad_pool_free(pool);
    free(rows16);
    Py_DECREF(x);
    Py_XDECREF(w);
    Py_XDECREF(b);
    return out;
}

/* The bf16 linear layer on its own: W [n_out, K] float32 is packed to bf16 panels here, then
 * out (new, or given and accumulated) = act(bf16(x) bf16(W)^T + bias) with fp32 accumulation. */
static PyObject *py_bf16_linear(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    static char *kwlist[] = {"x", "weight", "bias", "out", "activation", "num_threads", NULL};
    PyObject *x_obj, *w_obj, *b_obj = Py_None, *o_obj = Py_None;
    int act = -1, nthreads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|OOii", kwlist, &x_obj, &w_obj, &b_obj, &o_obj, &act, &nthreads))
        return NULL;
    if (vad_precision_check(VAD_BF16)) return raise_status(VAD_ERR_VALUE);
    if (act < -1 || act > VAD_ACT_GELU || nthreads < 1 || nthreads > 256) {
        PyErr_SetString(PyExc_ValueError, "need activation in {-1, 0, 1}, 1 <= num_threads <= 256");
        return NULL;
    }
    PyArrayObject *x = as_float_array(x_obj, "x", 2), *w = NULL, *b = NULL, *o = NULL;
    PyObject *result = NULL;
    vad_bf16 *packed = NULL, *abuf = NULL;
    vad_pool *pool = NULL;
    if (!x) return NULL;
    if (!(w = as_float_array(w_obj, "weight", 2))) goto done;
    npy_intp M = PyArray_DIM(x, 0), K = PyArray_DIM(x, 1), N = PyArray_DIM(w, 0);
    if (M < 1 || K < 1 || N < 1 || PyArray_DIM(w, 1) != K || M > (1 << 24) || K > (1 << 20) || N > (1 << 20)) {
        PyErr_Format(PyExc_ValueError, "x (M, K) and weight (N, K) need matching K >= 1, got (%zd, %zd) and (%zd, %zd)",
                     (Py_ssize_t)M, (Py_ssize_t)K, (Py_ssize_t)N, (Py_ssize_t)PyArray_DIM(w, 1));
        goto done;
    }
    float beta;
    if (linear_bias_out(b_obj, o_obj, M, N, &b, &o, &beta)) goto done;
    packed = (vad_bf16 *)malloc(vad_bf16_panel_elems((int)N, (int)K) * sizeof(vad_bf16));
    abuf = (vad_bf16 *)malloc(vad_bf16_input_elems((int)M, (int)K) * sizeof(vad_bf16));
    pool = vad_pool_create(nthreads);
    if (!packed || !abuf || !pool) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    vad_bf16_pack(packed, (const float *)PyArray_DATA(w), (int)N, (int)K, (size_t)K, 1);
    vad_bf16_linear(pool, (float *)PyArray_DATA(o), (int)N, (const float *)PyArray_DATA(x), (int)K, packed,
                    b ? (const float *)PyArray_DATA(b) : NULL, (int)M, (int)N, (int)K, beta, act, abuf);
    Py_END_ALLOW_THREADS
    result = (PyObject *)o;
    o = NULL;
done:
    vad_pool_free(pool);
    free(packed);
    free(abuf);
    Py_XDECREF(x);
    Py_XDECREF(w);
    Py_XDECREF(b);
    Py_XDECREF(o);
    return result;
}

static PyObject *py_bf16_gemm_seconds(PyObject *self, PyObject *args) {
    (void)self;
    int M, N, K, repeats, nthreads;
    if (!PyArg_ParseTuple(args, "iiiii", &M, &N, &K, &repeats, &nthreads)) return NULL;
    if (vad_precision_check(VAD_BF16)) return raise_status(VAD_ERR_VALUE);
    if (M < 1 || N < 1 || K < 1 || M > 16384 || N > 16384 || K > 16384 || repeats < 1 || repeats > 1000 ||
        nthreads < 1 || nthreads > 256) {
        PyErr_SetString(PyExc_ValueError, "need 1 <= M, N, K <= 16384, 1 <= repeats <= 1000, 1 <= num_threads <= 256");
        return NULL;
    }
    double best = -1.0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vad_bf16_gemm_benchmark(M, N, K, repeats, nthreads, &best);
    Py_END_ALLOW_THREADS
    if (rc) return raise_status(rc);
    return PyFloat_FromDouble(best);
}

static PyObject *py_dropout_mask(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t n;
    double p;
    unsigned long long seed;
    int layer, image, site, token;
    if (!PyArg_ParseTuple(args, "ndKiiii", &n, &p, &seed, &layer, &image, &site, &token)) return NULL;
    if (n < 0 || !(p >= 0.0 && p < 1.0) || site < 0 || site > 3 || token < 0 || token > 1) {
        PyErr_SetString(PyExc_ValueError, "need n >= 0, 0 <= p < 1, site in 0..3, token in 0..1");
        return NULL;
    }
    npy_intp dims[1] = {n};
    PyObject *out = new_float_array(1, dims);
    if (!out) return NULL;
    float *x = (float *)PyArray_DATA((PyArrayObject *)out);
    for (Py_ssize_t i = 0; i < n; i++) x[i] = 1.0f;
    vad_dropout_forward(NULL, x, n, (float)p, vad_dropout_stream(seed, layer, image, site, token));
    return out;
}

static PyMethodDef testing_methods[] = {
    {"sgemm_seconds", py_sgemm_seconds, METH_VARARGS,
     "sgemm_seconds(n, repeats, num_threads) -> best wall time of one n x n x n SGEMM through the engine's\n"
     "BLAS and thread pool (for peak-FLOP/s references in benchmarks)."},
    {"panel_linear", (PyCFunction)(void (*)(void))py_panel_linear, METH_VARARGS | METH_KEYWORDS,
     "panel_linear(x (M,K) float32, panels, n_out, bias=None, out=None, activation=-1, num_threads=1) -> out:\n"
     "act(x W^T + bias (+ out when given, accumulated in place)) with W [n_out, K] stored in panels\n"
     "(visualad.backbone.write_tensor); activation -1 none, 0 QuickGELU, 1 GELU (erf)."},
    {"allow_bf16", py_allow_bf16, METH_O,
     "allow_bf16(allow) -> previous: False makes the engine behave as on a CPU without AVX512-BF16 (bf16 is\n"
     "then refused with the error such a CPU gives; process-wide, for tests); True (the default) as probed."},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_VARARGS | METH_KEYWORDS,
     "attention(qkv (B,T,3D) float32, heads, precision='fp32', num_threads=1) -> (B,T,D): softmax(q k^T /\n"
     "sqrt(D/heads)) v per head, on the kernel the backbone uses for that precision."},
    {"attention_backward", (PyCFunction)(void (*)(void))py_attention_backward, METH_VARARGS | METH_KEYWORDS,
     "attention_backward(qkv (B,T,3D) float32, dout (B,T,D) float32, heads, precision='fp32', num_threads=1)\n"
     "-> dqkv (B,T,3D): the input gradient of attention(qkv, heads) for the output gradient dout, on the\n"
     "kernel the training backward uses for that precision."},
    {"layernorm", (PyCFunction)(void (*)(void))py_layernorm, METH_VARARGS | METH_KEYWORDS,
     "layernorm(x (M,C) float32, weight (C,), bias (C,), eps, precision='fp32', num_threads=1) -> (M,C): the\n"
     "backbone's LayerNorm; precision 'bf16' returns its rows rounded to bf16 as the next bf16 product reads\n"
     "them (as float32 values)."},
    {"bf16_linear", (PyCFunction)(void (*)(void))py_bf16_linear, METH_VARARGS | METH_KEYWORDS,
     "bf16_linear(x (M,K) float32, weight (N,K) float32, bias=None, out=None, activation=-1, num_threads=1)\n"
     "-> out: act(bf16(x) bf16(weight)^T + bias (+ out, accumulated in place)), fp32 accumulation, on the\n"
     "backbone's bf16 kernel (weight packed to bf16 panels first)."},
    {"bf16_gemm_seconds", py_bf16_gemm_seconds, METH_VARARGS,
     "bf16_gemm_seconds(M, N, K, repeats, num_threads) -> best wall time of one (M,K) x (K,N) bf16 linear\n"
     "layer on pre-packed weights (the bf16 reference rate for benchmarks)."},
    {"gaussian_filter", py_gaussian_filter, METH_VARARGS,
     "gaussian_filter(maps (B,H,W) float32, sigma, num_threads=1) -> filtered copy (SciPy 'reflect', truncate 4)."},
    {"dropout_mask", py_dropout_mask, METH_VARARGS,
     "dropout_mask(n, p, seed, layer, image, site, token) -> float32 (n,) multipliers (0 or 1/(1-p)) the\n"
     "training dropout uses (site 0 SAF hidden, 1 SAF out, 2 SCA attention, 3 SCA out)."},
    {"resize_bilinear", py_resize_bilinear, METH_VARARGS,
     "resize_bilinear(grid (H,W,C) float32, H_out, W_out) -> (H_out, W_out, C) (align_corners=False)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef testing_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "visualad._engine.testing",
    .m_doc = "Test-only entry points: single engine kernels and probes for the tests and benchmarks.",
    .m_size = -1,
    .m_methods = testing_methods,
};

PyObject *vad_testing_module(void) { return PyModule_Create(&testing_module); }
