/* Argument conversion shared by the glue files: NumPy arrays in, status codes out. */
#include "py_glue.h"

#include <limits.h>
#include <math.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cpu_features.h"
#include "errors.h"
#include "vit.h"

PyObject *raise_status(int rc) {
    PyErr_SetString(rc == VAD_ERR_MEMORY ? PyExc_MemoryError : PyExc_ValueError, vad_last_error());
    return NULL;
}

/* Borrow a C-contiguous float32 array with the given rank (-1 = any) from obj. New reference. */
PyArrayObject *as_float_array(PyObject *obj, const char *what, int ndim) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy array, got %s", what, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "%s must be float32, got %s", what, PyArray_DESCR(a)->typeobj->tp_name);
        return NULL;
    }
    if (ndim >= 0 && PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d", what, ndim, PyArray_NDIM(a));
        return NULL;
    }
    return (PyArrayObject *)PyArray_FROM_OTF(obj, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
}

int all_finite(const float *x, size_t n) {
    int ok = 1;
    for (size_t i = 0; i < n; i++) ok &= isfinite(x[i]) ? 1 : 0;
    return ok;
}

PyObject *new_float_array(int nd, npy_intp *dims) {
    return PyArray_SimpleNew(nd, dims, NPY_FLOAT32);
}

/* An exact Python int (not bool, not float) in [lo, hi] as a C int; -1 with ValueError/TypeError set
 * otherwise (never truncated: 2**32 + 16 is refused, not read as 16). */
static int exact_int(PyObject *v, long lo, long hi, const char *what, int *out) {
    if (!PyLong_Check(v) || PyBool_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %s", what, Py_TYPE(v)->tp_name);
        return -1;
    }
    int overflow = 0;
    long x = PyLong_AsLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (overflow || x < lo || x > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be in [%ld, %ld], got %R", what, lo, hi, v);
        return -1;
    }
    *out = (int)x;
    return 0;
}

/* Cores this process may run on (>= 1). */
static int usable_cores(void) {
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)(n < INT_MAX ? n : INT_MAX) : 1;
}

/* "O&" converter for num_threads: an int in [1, VAD_MAX_THREADS] (else ValueError), capped at the
 * number of usable cores so that no pool ever has more threads than the machine can run. */
int thread_count(PyObject *v, void *out) {
    int n;
    if (exact_int(v, 1, VAD_MAX_THREADS, "num_threads", &n)) return 0;
    int cores = usable_cores();
    *(int *)out = n < cores ? n : cores;
    return 1;
}

/* Reads a sequence of ints (layers) in [lo, hi]. Returns count or -1 with an exception set. */
int read_int_list(PyObject *seq, int *out, int max, const char *what) {
    PyObject *fast = PySequence_Fast(seq, "layers must be a sequence of ints");
    if (!fast) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > max) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "at most %d %s are supported", max, what);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (exact_int(PySequence_Fast_GET_ITEM(fast, i), INT_MIN, INT_MAX, what, &out[i])) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return (int)n;
}

/* Per-layer features (L arrays (B, N, D)) and two token arrays (B, D), all float32 and consistent.
 * New references in feats/ta/tn (cleared on failure); returns 0 or -1 with an exception set. */
int parse_layer_inputs(int L, int D, PyObject *feats_obj, PyObject *ta_obj, PyObject *tn_obj,
                              PyArrayObject **feats, const float **fptr, PyArrayObject **ta, PyArrayObject **tn,
                              int *B, int *N) {
    PyObject *fast = PySequence_Fast(feats_obj, "feats must be a sequence of arrays");
    if (!fast) return -1;
    if (PySequence_Fast_GET_SIZE(fast) != L) {
        PyErr_Format(PyExc_ValueError, "feats must hold %d layers", L);
        goto fail;
    }
    for (int i = 0; i < L; i++) {
        feats[i] = as_float_array(PySequence_Fast_GET_ITEM(fast, i), "feats[i]", 3);
        if (!feats[i]) goto fail;
        npy_intp *d = PyArray_DIMS(feats[i]);
        if (i == 0) {
            *B = (int)d[0];
            *N = (int)d[1];
        }
        if (d[0] != *B || d[1] != *N || d[2] != D || d[0] < 1 || d[1] < 1) {
            PyErr_Format(PyExc_ValueError, "feats[%d] must have shape (%d, %d, %d)", i, *B, *N, D);
            goto fail;
        }
        fptr[i] = (const float *)PyArray_DATA(feats[i]);
    }
    *ta = as_float_array(ta_obj, "anomaly_token", 2);
    *tn = *ta ? as_float_array(tn_obj, "normal_token", 2) : NULL;
    if (!*ta || !*tn) goto fail;
    if (PyArray_DIM(*ta, 0) != *B || PyArray_DIM(*ta, 1) != D || PyArray_DIM(*tn, 0) != *B ||
        PyArray_DIM(*tn, 1) != D) {
        PyErr_Format(PyExc_ValueError, "tokens must have shape (%d, %d)", *B, D);
        goto fail;
    }
    Py_DECREF(fast);
    return 0;
fail:
    Py_DECREF(fast);
    for (int i = 0; i < L; i++) Py_CLEAR(feats[i]);
    Py_CLEAR(*ta);
    Py_CLEAR(*tn);
    return -1;
}

/* d[key] as an int in [0, INT_MAX] (the engine's config checks apply the real bounds). A missing
 * required key is a ValueError, a non-int a TypeError, an out-of-range int a ValueError. */
int dict_int(PyObject *d, const char *key, int *out, int required) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) {
        if (required) {
            PyErr_Format(PyExc_ValueError, "config is missing '%s'", key);
            return -1;
        }
        return 0;
    }
    char what[80];
    snprintf(what, sizeof what, "config '%s'", key);
    if (PyBool_Check(v)) { /* flags (patch_bias, ln_pre, layerscale) may be given as bools */
        *out = v == Py_True;
        return 0;
    }
    return exact_int(v, 0, INT_MAX, what, out);
}

PyObject *py_limits(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("{sisisisisisisisisisi}", "width", VAD_MAX_WIDTH, "depth", VAD_MAX_DEPTH, "heads",
                         VAD_MAX_HEADS, "patch", VAD_MAX_PATCH, "grid", VAD_MAX_GRID, "registers",
                         VAD_MAX_REGISTERS, "mlp_hidden", VAD_MAX_MLP_HIDDEN, "image_side", VAD_MAX_IMAGE_SIDE,
                         "threads", VAD_MAX_THREADS, "layers", VAD_MAX_LAYERS);
}

PyArrayObject *check_vector(PyObject *obj, const char *what, int D) {
    PyArrayObject *a = as_float_array(obj, what, 1);
    if (a && PyArray_DIM(a, 0) != D) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%d,)", what, D);
        Py_CLEAR(a);
    }
    return a;
}

static PyObject *layout_to_list(vad_tensor_entry *entries, int n, size_t total) {
    PyObject *list = PyList_New(n);
    for (int i = 0; list && i < n; i++) {
        PyObject *shape = PyTuple_New(entries[i].ndim);
        for (int k = 0; shape && k < entries[i].ndim; k++)
            PyTuple_SET_ITEM(shape, k, PyLong_FromLong(entries[i].shape[k]));
        PyObject *item = shape ? Py_BuildValue("(sNni)", entries[i].name, shape, (Py_ssize_t)entries[i].offset,
                                               entries[i].panel)
                               : NULL;
        if (!item) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, item);
    }
    if (!list) return NULL;
    return Py_BuildValue("(Nn)", list, (Py_ssize_t)total);
}

/* "fp32" / "bf16" -> enum vad_precision; -1 with an exception set. */
int parse_precision(const char *name) {
    if (!strcmp(name, "fp32")) return VAD_FP32;
    if (!strcmp(name, "bf16")) return VAD_BF16;
    PyErr_Format(PyExc_ValueError, "precision must be 'fp32' or 'bf16', got '%s'", name);
    return -1;
}

/* Head inputs: feats (L arrays (B, N, D), square N), anomaly/normal tokens (B, D). On success the
 * arrays are new references the caller releases (feats[0..L), *ta, *tn). */

/* obj converted (any numeric dtype) to a C-contiguous array of `type` with the given number of
 * elements along each of its nd dims. New reference. */
PyArrayObject *train_array(PyObject *obj, const char *what, int type, int nd, const npy_intp *dims) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(obj, type, nd, nd, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!a) return NULL;
    for (int k = 0; k < nd; k++)
        if (PyArray_DIM(a, k) != dims[k]) {
            PyErr_Format(PyExc_ValueError, "%s has the wrong shape (dimension %d is %zd, expected %zd)", what, k,
                         (Py_ssize_t)PyArray_DIM(a, k), (Py_ssize_t)dims[k]);
            Py_DECREF(a);
            return NULL;
        }
    if (type == NPY_FLOAT32 && !all_finite((const float *)PyArray_DATA(a), (size_t)PyArray_SIZE(a))) {
        PyErr_Format(PyExc_ValueError, "%s contains NaN or Inf values", what);
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

/* An ndim-D float32 C-contiguous array the engine may update in place (no copy is made). */
int inplace_vector_nd(PyObject *obj, const char *what, int ndim) {
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != NPY_FLOAT32 ||
        PyArray_NDIM((PyArrayObject *)obj) != ndim || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)obj) ||
        !PyArray_ISWRITEABLE((PyArrayObject *)obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a writeable %d-D C-contiguous float32 numpy array", what, ndim);
        return -1;
    }
    return 0;
}

int inplace_vector(PyObject *obj, const char *what) { return inplace_vector_nd(obj, what, 1); }

PyObject *layout_to_python(vad_layout_fn layout, const void *cfg) {
    size_t total = 0;
    int n = layout(cfg, NULL, 0, &total);
    vad_tensor_entry *entries = (vad_tensor_entry *)PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(vad_tensor_entry));
    if (!entries) return PyErr_NoMemory();
    layout(cfg, entries, n, &total);
    PyObject *res = layout_to_list(entries, n, total);
    PyMem_Free(entries);
    return res;
}

PyArrayObject *weight_buffer(PyObject *params, size_t total, const char *what, int in_place) {
    PyArrayObject *p = as_float_array(params, what, 1);
    if (!p) return NULL;
    if ((size_t)PyArray_SIZE(p) != total) {
        PyErr_Format(PyExc_ValueError, "%s has %zd floats, the configuration needs %zu", what,
                     (Py_ssize_t)PyArray_SIZE(p), total);
        Py_DECREF(p);
        return NULL;
    }
    if (in_place && (!PyArray_ISWRITEABLE(p) || (PyObject *)p != params)) {
        Py_DECREF(p);
        PyErr_Format(PyExc_ValueError, "%s must be a writeable C-contiguous float32 array", what);
        return NULL;
    }
    return p;
}
