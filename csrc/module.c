/* The only file that talks to Python: argument conversion (NumPy C API, C-contiguous float32),
 * GIL release around compute, C status codes -> Python exceptions. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>
#include <pythread.h>

#include <limits.h>
#include <math.h>
#include <sched.h>
#include <unistd.h>

#include "attention_fused.h"
#include "bf16_gemm.h"
#include "cpu_features.h"
#include "encode.h"
#include "errors.h"
#include "metrics.h"
#include "head.h"
#include "vad_limits.h"
#include "maps.h"
#include "ops.h"
#include "panel_gemm.h"
#include "resize.h"
#include "vit.h"

/* ================================================================== helpers */

static PyObject *raise_status(int rc) {
    PyErr_SetString(rc == VAD_ERR_MEMORY ? PyExc_MemoryError : PyExc_ValueError, vad_last_error());
    return NULL;
}

/* Borrow a C-contiguous float32 array with the given rank (-1 = any) from obj. New reference. */
static PyArrayObject *as_float_array(PyObject *obj, const char *what, int ndim) {
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

static int all_finite(const float *x, size_t n) {
    int ok = 1;
    for (size_t i = 0; i < n; i++) ok &= isfinite(x[i]) ? 1 : 0;
    return ok;
}

static PyObject *new_float_array(int nd, npy_intp *dims) {
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
static int thread_count(PyObject *v, void *out) {
    int n;
    if (exact_int(v, 1, VAD_MAX_THREADS, "num_threads", &n)) return 0;
    int cores = usable_cores();
    *(int *)out = n < cores ? n : cores;
    return 1;
}

/* Reads a sequence of ints (layers) in [lo, hi]. Returns count or -1 with an exception set. */
static int read_int_list(PyObject *seq, int *out, int max, const char *what) {
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
static int parse_layer_inputs(int L, int D, PyObject *feats_obj, PyObject *ta_obj, PyObject *tn_obj,
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

/* ================================================================== backbone config */

/* d[key] as an int in [0, INT_MAX] (the engine's config checks apply the real bounds). A missing
 * required key is a ValueError, a non-int a TypeError, an out-of-range int a ValueError. */
static int dict_int(PyObject *d, const char *key, int *out, int required) {
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

static int parse_vit_config(PyObject *d, vad_vit_config *c) {
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "backbone config must be a dict");
        return -1;
    }
    memset(c, 0, sizeof *c);
    c->ln_eps = 1e-5f;
    c->pos_cubic_a = -0.75f;
    if (dict_int(d, "width", &c->width, 1) || dict_int(d, "depth", &c->depth, 1) ||
        dict_int(d, "heads", &c->heads, 1) || dict_int(d, "patch", &c->patch, 1) ||
        dict_int(d, "grid", &c->grid0, 1) || dict_int(d, "mlp_hidden", &c->mlp_hidden, 1) ||
        dict_int(d, "registers", &c->n_registers, 0) || dict_int(d, "patch_bias", &c->patch_bias, 0) ||
        dict_int(d, "ln_pre", &c->ln_pre, 0) || dict_int(d, "layerscale", &c->layerscale, 0) ||
        dict_int(d, "activation", &c->activation, 0) || dict_int(d, "pos_resize", &c->pos_resize, 0))
        return -1;
    PyObject *eps = PyDict_GetItemString(d, "ln_eps");
    if (eps) {
        double e = PyFloat_AsDouble(eps);
        if (e == -1.0 && PyErr_Occurred()) return -1;
        c->ln_eps = (float)e;
    }
    PyObject *cubic_a = PyDict_GetItemString(d, "pos_cubic_a");
    if (cubic_a) {
        double a = PyFloat_AsDouble(cubic_a);
        if (a == -1.0 && PyErr_Occurred()) return -1;
        c->pos_cubic_a = (float)a;
    }
    if (vad_vit_config_check(c) != VAD_OK) {
        raise_status(VAD_ERR_VALUE);
        return -1;
    }
    return 0;
}

static PyObject *layout_to_list(vad_tensor_entry *entries, int n, size_t total);

static PyObject *py_limits(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("{sisisisisisisisisi}", "width", VAD_MAX_WIDTH, "depth", VAD_MAX_DEPTH, "heads",
                         VAD_MAX_HEADS, "patch", VAD_MAX_PATCH, "grid", VAD_MAX_GRID, "registers",
                         VAD_MAX_REGISTERS, "mlp_hidden", VAD_MAX_MLP_HIDDEN, "image_side", VAD_MAX_IMAGE_SIDE,
                         "threads", VAD_MAX_THREADS);
}

static PyObject *py_vit_layout(PyObject *self, PyObject *arg) {
    (void)self;
    vad_vit_config cfg;
    if (parse_vit_config(arg, &cfg)) return NULL;
    size_t total = 0;
    int n = vad_vit_layout(&cfg, NULL, 0, &total);
    if (n < 0) return raise_status(VAD_ERR_VALUE);
    vad_tensor_entry *entries = (vad_tensor_entry *)PyMem_Calloc((size_t)n, sizeof(vad_tensor_entry));
    if (!entries) return PyErr_NoMemory();
    vad_vit_layout(&cfg, entries, n, &total);
    PyObject *res = layout_to_list(entries, n, total);
    PyMem_Free(entries);
    return res;
}

static int parse_precision(const char *name);

/* ================================================================== BackboneModel type */

/* The read-only model (configuration + weight pointers) over a float32 buffer it keeps alive;
 * shared by every Backbone state made from it, across threads. */
typedef struct {
    PyObject_HEAD
    vad_vit_model *model;
    PyArrayObject *params; /* keeps the weight buffer alive */
} BackboneModelObject;

static void BackboneModel_dealloc(BackboneModelObject *self) {
    vad_vit_model_free(self->model);
    Py_XDECREF(self->params);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int BackboneModel_init(BackboneModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"config", "params", NULL};
    PyObject *config, *params;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO", kwlist, &config, &params)) return -1;
    if (self->model) {
        PyErr_SetString(PyExc_RuntimeError, "BackboneModel is already initialised");
        return -1;
    }
    vad_vit_config cfg;
    if (parse_vit_config(config, &cfg)) return -1;
    PyArrayObject *p = as_float_array(params, "params", 1);
    if (!p) return -1;
    size_t total = 0;
    vad_vit_layout(&cfg, NULL, 0, &total);
    if ((size_t)PyArray_SIZE(p) != total) {
        PyErr_Format(PyExc_ValueError, "params has %zd floats, the configuration needs %zu",
                     (Py_ssize_t)PyArray_SIZE(p), total);
        Py_DECREF(p);
        return -1;
    }
    self->model = vad_vit_model_create(&cfg, (const float *)PyArray_DATA(p));
    if (!self->model) {
        Py_DECREF(p);
        raise_status(VAD_ERR_MEMORY);
        return -1;
    }
    self->params = p;
    return 0;
}

static PyObject *BackboneModel_state(BackboneModelObject *self, PyObject *args, PyObject *kwds);

static PyMethodDef BackboneModel_methods[] = {
    {"state", (PyCFunction)(void (*)(void))BackboneModel_state, METH_VARARGS | METH_KEYWORDS,
     "state(num_threads=1, precision='fp32') -> a new Backbone over this model (its own threads and\n"
     "workspaces; the weights are shared, not copied; bf16 packs this state's own bf16 copies)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BackboneModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "visualad._engine.BackboneModel",
    .tp_basicsize = sizeof(BackboneModelObject),
    .tp_dealloc = (destructor)BackboneModel_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "BackboneModel(config, params): a frozen ViT tower's configuration over a float32 weight buffer,\n"
              "read-only and shared by the Backbone states made from it (state()), across threads.",
    .tp_methods = BackboneModel_methods,
    .tp_init = (initproc)BackboneModel_init,
    .tp_new = PyType_GenericNew,
};

/* ================================================================== Backbone type */

/* One caller's state over a BackboneModel: thread pool, workspaces, the last training forward.
 * A lock makes concurrent calls on one state wait for each other. */
typedef struct {
    PyObject_HEAD
    vad_vit *vit;
    vad_encoder *encoder;
    BackboneModelObject *model; /* keeps the shared model alive */
    PyObject *train_refs;       /* ln_post arrays of the last training forward (used by the backward) */
    int train_layers, train_B, train_N;
    PyThread_type_lock lock;
} BackboneObject;

static void Backbone_dealloc(BackboneObject *self) {
    vad_encoder_free(self->encoder);
    vad_vit_free(self->vit);
    Py_XDECREF(self->model);
    Py_XDECREF(self->train_refs);
    if (self->lock) PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Makes self a state over model (new reference taken) in a precision given by name. 0 or -1 with
 * an exception set. */
static int backbone_attach(BackboneObject *self, BackboneModelObject *model, int nthreads, const char *prec_name) {
    int precision = parse_precision(prec_name);
    if (precision < 0) return -1;
    if (vad_precision_check(precision)) {
        raise_status(VAD_ERR_VALUE);
        return -1;
    }
    if (self->model) {
        PyErr_SetString(PyExc_RuntimeError, "Backbone is already initialised");
        return -1;
    }
    if (!model->model) {
        PyErr_SetString(PyExc_RuntimeError, "BackboneModel is not initialised");
        return -1;
    }
    if (nthreads < 1) nthreads = 1;
    Py_INCREF(model);
    self->model = model; /* before the state, which points into it */
    self->vit = vad_vit_create(model->model, nthreads);
    if (!self->vit) {
        raise_status(VAD_ERR_MEMORY);
        return -1;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vad_vit_set_precision(self->vit, precision);
    Py_END_ALLOW_THREADS
    if (rc) {
        raise_status(rc);
        return -1;
    }
    self->encoder = vad_encoder_create(self->vit);
    self->lock = PyThread_allocate_lock();
    if (!self->encoder || !self->lock) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Backbone(config, params, num_threads=1, precision="fp32"): a state over a private model of these weights. */
static int Backbone_init(BackboneObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"config", "params", "num_threads", "precision", NULL};
    PyObject *config, *params;
    int nthreads = 1;
    const char *prec_name = "fp32";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O&s", kwlist, &config, &params, thread_count, &nthreads, &prec_name)) return -1;
    if (parse_precision(prec_name) < 0) return -1; /* before the weights are looked at */
    PyObject *model = PyObject_CallFunctionObjArgs((PyObject *)&BackboneModelType, config, params, NULL);
    if (!model) return -1;
    int rc = backbone_attach(self, (BackboneModelObject *)model, nthreads, prec_name);
    Py_DECREF(model);
    return rc;
}

static int check_ready(BackboneObject *self) {
    if (!self->vit || !self->encoder || !self->lock) {
        PyErr_SetString(PyExc_RuntimeError, "Backbone is not initialised");
        return -1;
    }
    return 0;
}

/* images: float32 [B, 3, S, S], finite. New reference or NULL. */
static PyArrayObject *check_images(PyObject *obj, int *B, int *S) {
    PyArrayObject *a = as_float_array(obj, "images", 4);
    if (!a) return NULL;
    npy_intp *d = PyArray_DIMS(a);
    if (d[1] != 3 || d[2] != d[3] || d[0] < 1 || d[2] < 1 || d[0] > 1 << 20 || d[2] > VAD_MAX_IMAGE_SIDE) {
        PyErr_Format(PyExc_ValueError, "images must have shape (B, 3, S, S), got (%zd, %zd, %zd, %zd)",
                     (Py_ssize_t)d[0], (Py_ssize_t)d[1], (Py_ssize_t)d[2], (Py_ssize_t)d[3]);
        Py_DECREF(a);
        return NULL;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = all_finite((const float *)PyArray_DATA(a), (size_t)PyArray_SIZE(a));
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "images contain NaN or Inf values");
        Py_DECREF(a);
        return NULL;
    }
    *B = (int)d[0];
    *S = (int)d[2];
    return a;
}

#define MAX_LAYERS 64

static PyObject *Backbone_forward(BackboneObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"images", "layers", "inserted", "final_norm", NULL};
    PyObject *images_obj, *layers_obj, *ins_obj = Py_None;
    int final_norm = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|Op", kwlist, &images_obj, &layers_obj, &ins_obj, &final_norm))
        return NULL;
    if (check_ready(self)) return NULL;
    const vad_vit_config *cfg = vad_vit_get_config(self->vit);
    int layers[MAX_LAYERS];
    int n_layers = read_int_list(layers_obj, layers, MAX_LAYERS, "layers");
    if (n_layers < 0) return NULL;
    int B, S;
    PyArrayObject *images = check_images(images_obj, &B, &S);
    if (!images) return NULL;
    PyArrayObject *ins = NULL;
    int n_ins = 0;
    if (ins_obj != Py_None) {
        ins = as_float_array(ins_obj, "inserted", 2);
        if (!ins) goto fail;
        if (PyArray_DIM(ins, 1) != cfg->width || PyArray_DIM(ins, 0) > 16) {
            PyErr_Format(PyExc_ValueError, "inserted must have shape (k<=16, %d)", cfg->width);
            goto fail;
        }
        n_ins = (int)PyArray_DIM(ins, 0);
    }
    if (S % cfg->patch) {
        PyErr_Format(PyExc_ValueError, "image side %d is not divisible by the patch size %d", S, cfg->patch);
        goto fail;
    }
    int T = vad_vit_seq_len(self->vit, S, n_ins);
    npy_intp dims[3] = {B, T, cfg->width};
    PyObject *outs = PyList_New(n_layers);
    if (!outs) goto fail;
    float *ptrs[MAX_LAYERS];
    for (int i = 0; i < n_layers; i++) {
        PyObject *a = new_float_array(3, dims);
        if (!a) {
            Py_DECREF(outs);
            goto fail;
        }
        PyList_SET_ITEM(outs, i, a);
        ptrs[i] = (float *)PyArray_DATA((PyArrayObject *)a);
    }
    PyObject *final = NULL;
    if (final_norm && !(final = new_float_array(3, dims))) {
        Py_DECREF(outs);
        goto fail;
    }
    float *final_ptr = final ? (float *)PyArray_DATA((PyArrayObject *)final) : NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    rc = vad_vit_forward(self->vit, (const float *)PyArray_DATA(images), B, S,
                         ins ? (const float *)PyArray_DATA(ins) : NULL, n_ins, layers, n_layers, ptrs, final_ptr);
    if (!rc && final_ptr) rc = vad_vit_final_norm(self->vit, final_ptr, final_ptr, B * T);
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    Py_DECREF(images);
    Py_XDECREF(ins);
    if (rc) {
        Py_DECREF(outs);
        Py_XDECREF(final);
        return raise_status(rc);
    }
    if (!final) return outs;
    PyObject *pair = Py_BuildValue("(NN)", outs, final);
    return pair;
fail:
    Py_DECREF(images);
    Py_XDECREF(ins);
    return NULL;
}

static PyArrayObject *check_vector(PyObject *obj, const char *what, int D) {
    PyArrayObject *a = as_float_array(obj, what, 1);
    if (a && PyArray_DIM(a, 0) != D) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%d,)", what, D);
        Py_CLEAR(a);
    }
    return a;
}

static PyObject *encode_impl(BackboneObject *self, PyObject *args, PyObject *kwds, int train) {
    static char *kwlist[] = {"images", "layers", "tokens", "ln_weight", "ln_bias", NULL};
    PyObject *images_obj, *layers_obj, *tok_obj, *lnw_obj, *lnb_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO", kwlist, &images_obj, &layers_obj, &tok_obj,
                                     &lnw_obj, &lnb_obj))
        return NULL;
    if (check_ready(self)) return NULL;
    const vad_vit_config *cfg = vad_vit_get_config(self->vit);
    int D = cfg->width;
    int layers[MAX_LAYERS];
    int n_layers = read_int_list(layers_obj, layers, MAX_LAYERS, "layers");
    if (n_layers < 0) return NULL;
    PyArrayObject *images = NULL, *tok = NULL, *lnw = NULL, *lnb = NULL;
    PyObject *feats = NULL, *ta = NULL, *tn = NULL, *result = NULL;
    int B, S;
    images = check_images(images_obj, &B, &S);
    if (!images) goto done;
    tok = as_float_array(tok_obj, "tokens", 2);
    if (!tok) goto done;
    if (PyArray_DIM(tok, 0) != 2 || PyArray_DIM(tok, 1) != D) {
        PyErr_Format(PyExc_ValueError, "tokens must have shape (2, %d)", D);
        goto done;
    }
    if (!(lnw = check_vector(lnw_obj, "ln_weight", D)) || !(lnb = check_vector(lnb_obj, "ln_bias", D))) goto done;
    if (S % cfg->patch) {
        PyErr_Format(PyExc_ValueError, "image side %d is not divisible by the patch size %d", S, cfg->patch);
        goto done;
    }
    int g = S / cfg->patch;
    npy_intp fdims[3] = {B, (npy_intp)g * g, D}, tdims[2] = {B, D};
    feats = PyList_New(n_layers);
    if (!feats) goto done;
    float *ptrs[MAX_LAYERS];
    for (int i = 0; i < n_layers; i++) {
        PyObject *a = new_float_array(3, fdims);
        if (!a) goto done;
        PyList_SET_ITEM(feats, i, a);
        ptrs[i] = (float *)PyArray_DATA((PyArrayObject *)a);
    }
    ta = new_float_array(2, tdims);
    tn = new_float_array(2, tdims);
    if (!ta || !tn) goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    rc = (train ? vad_encode_train : vad_encode)(
        self->encoder, (const float *)PyArray_DATA(images), B, S, (const float *)PyArray_DATA(tok),
        (const float *)PyArray_DATA(lnw), (const float *)PyArray_DATA(lnb), layers, n_layers, ptrs,
        (float *)PyArray_DATA((PyArrayObject *)ta), (float *)PyArray_DATA((PyArrayObject *)tn));
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    if (rc) {
        raise_status(rc);
        goto done;
    }
    if (train) {
        Py_XDECREF(self->train_refs);
        self->train_refs = PyTuple_Pack(2, (PyObject *)lnw, (PyObject *)lnb);
        if (!self->train_refs) goto done;
        self->train_layers = n_layers;
        self->train_B = B;
        self->train_N = g * g;
    }
    result = Py_BuildValue("(OOO)", feats, ta, tn);
done:
    Py_XDECREF(images);
    Py_XDECREF(tok);
    Py_XDECREF(lnw);
    Py_XDECREF(lnb);
    Py_XDECREF(feats);
    Py_XDECREF(ta);
    Py_XDECREF(tn);
    return result;
}

static PyObject *Backbone_encode(BackboneObject *self, PyObject *args, PyObject *kwds) {
    return encode_impl(self, args, kwds, 0);
}

static PyObject *Backbone_encode_train(BackboneObject *self, PyObject *args, PyObject *kwds) {
    return encode_impl(self, args, kwds, 1);
}

static PyObject *Backbone_encode_backward(BackboneObject *self, PyObject *args) {
    PyObject *dfeats_obj, *dta_obj, *dtn_obj;
    if (!PyArg_ParseTuple(args, "OOO", &dfeats_obj, &dta_obj, &dtn_obj)) return NULL;
    if (check_ready(self)) return NULL;
    if (!self->train_refs) {
        PyErr_SetString(PyExc_RuntimeError, "encode_backward needs a preceding encode_train");
        return NULL;
    }
    int D = vad_vit_get_config(self->vit)->width, L = self->train_layers, B = self->train_B, N = self->train_N;
    PyArrayObject *dfeats[MAX_LAYERS] = {0}, *dta = NULL, *dtn = NULL;
    PyObject *dtok = NULL, *dlnw = NULL, *dlnb = NULL, *result = NULL;
    const float *fptr[MAX_LAYERS];
    int gB, gN;
    if (parse_layer_inputs(L, D, dfeats_obj, dta_obj, dtn_obj, dfeats, fptr, &dta, &dtn, &gB, &gN)) return NULL;
    if (gB != B || gN != N) {
        PyErr_Format(PyExc_ValueError, "gradients must have shape (%d, %d, %d) / (%d, %d) like the last encode_train",
                     B, N, D, B, D);
        goto done;
    }
    npy_intp tdims[2] = {2, D}, vdims[1] = {D};
    dtok = PyArray_ZEROS(2, tdims, NPY_FLOAT32, 0);
    dlnw = PyArray_ZEROS(1, vdims, NPY_FLOAT32, 0);
    dlnb = PyArray_ZEROS(1, vdims, NPY_FLOAT32, 0);
    if (!dtok || !dlnw || !dlnb) goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    rc = vad_encode_backward(self->encoder, fptr, (const float *)PyArray_DATA(dta), (const float *)PyArray_DATA(dtn),
                             (float *)PyArray_DATA((PyArrayObject *)dtok), (float *)PyArray_DATA((PyArrayObject *)dlnw),
                             (float *)PyArray_DATA((PyArrayObject *)dlnb));
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    if (rc) {
        raise_status(rc);
        goto done;
    }
    result = PyTuple_Pack(3, dtok, dlnw, dlnb);
done:
    for (int i = 0; i < L; i++) Py_XDECREF(dfeats[i]);
    Py_XDECREF(dta);
    Py_XDECREF(dtn);
    Py_XDECREF(dtok);
    Py_XDECREF(dlnw);
    Py_XDECREF(dlnb);
    return result;
}

static PyMethodDef Backbone_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))Backbone_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(images, layers, inserted=None, final_norm=False) -> list of float32 (B, T, D) residual\n"
     "streams after the given 1-based blocks (0 = input of block 1). inserted: (k, D) tokens placed\n"
     "before cls. final_norm=True returns (list, the tower's final norm of the last block's stream)."},
    {"encode", (PyCFunction)(void (*)(void))Backbone_encode, METH_VARARGS | METH_KEYWORDS,
     "encode(images, layers, tokens, ln_weight, ln_bias) -> (list of (B, N, D), t_a (B, D), t_n (B, D))"},
    {"encode_train", (PyCFunction)(void (*)(void))Backbone_encode_train, METH_VARARGS | METH_KEYWORDS,
     "encode_train(...): encode() that keeps the activations for encode_backward()."},
    {"encode_backward", (PyCFunction)Backbone_encode_backward, METH_VARARGS,
     "encode_backward(dfeats, d_anomaly_token, d_normal_token) -> (d tokens (2, D), d ln_weight, d ln_bias)\n"
     "for the last encode_train() call (gradients through the frozen backbone)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BackboneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "visualad._engine.Backbone",
    .tp_basicsize = sizeof(BackboneObject),
    .tp_dealloc = (destructor)Backbone_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Backbone(config, params, num_threads=1, precision='fp32'): a frozen ViT tower in C over a float32 weight buffer:\n"
              "one caller's state (threads, workspaces) over a BackboneModel (BackboneModel.state() shares one).",
    .tp_methods = Backbone_methods,
    .tp_init = (initproc)Backbone_init,
    .tp_new = PyType_GenericNew,
};

static PyObject *BackboneModel_state(BackboneModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"num_threads", "precision", NULL};
    int nthreads = 1;
    const char *prec_name = "fp32";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O&s", kwlist, thread_count, &nthreads, &prec_name)) return NULL;
    BackboneObject *state = (BackboneObject *)PyType_GenericNew(&BackboneType, NULL, NULL);
    if (!state) return NULL;
    if (backbone_attach(state, self, nthreads, prec_name)) {
        Py_DECREF(state);
        return NULL;
    }
    return (PyObject *)state;
}


/* ================================================================== Head type */

static int parse_flag_list(PyObject *d, const char *key, unsigned char *out, int n) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) {
        memset(out, 1, (size_t)n);
        return 0;
    }
    PyObject *fast = PySequence_Fast(v, "head flags must be a sequence");
    if (!fast) return -1;
    if (PySequence_Fast_GET_SIZE(fast) != n) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "head config '%s' must have %d entries", key, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        int t = PyObject_IsTrue(PySequence_Fast_GET_ITEM(fast, i));
        if (t < 0) {
            Py_DECREF(fast);
            return -1;
        }
        out[i] = (unsigned char)t;
    }
    Py_DECREF(fast);
    return 0;
}

static int parse_head_config(PyObject *d, vad_head_config *c) {
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "head config must be a dict");
        return -1;
    }
    memset(c, 0, sizeof *c);
    if (dict_int(d, "width", &c->width, 1) || dict_int(d, "n_layers", &c->n_layers, 1) ||
        dict_int(d, "n_anchors", &c->n_anchors, 1) || dict_int(d, "pos_rows", &c->pos_rows, 1) ||
        dict_int(d, "saf_hidden", &c->saf_hidden, 1))
        return -1;
    if (vad_head_config_check(c) != VAD_OK) {
        raise_status(VAD_ERR_VALUE);
        return -1;
    }
    if (parse_flag_list(d, "has_sca", c->has_sca, c->n_layers) ||
        parse_flag_list(d, "has_saf", c->has_saf, c->n_layers))
        return -1;
    return 0;
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

static PyObject *py_head_layout(PyObject *self, PyObject *arg) {
    (void)self;
    vad_head_config cfg;
    if (parse_head_config(arg, &cfg)) return NULL;
    size_t total = 0;
    int n = vad_head_layout(&cfg, NULL, 0, &total);
    vad_tensor_entry *entries = (vad_tensor_entry *)PyMem_Calloc((size_t)n, sizeof(vad_tensor_entry));
    if (!entries) return PyErr_NoMemory();
    vad_head_layout(&cfg, entries, n, &total);
    PyObject *res = layout_to_list(entries, n, total);
    PyMem_Free(entries);
    return res;
}

typedef struct {
    PyObject_HEAD
    vad_head *head;
    vad_head_config cfg;
    PyArrayObject *params;
    PyThread_type_lock lock;
} HeadObject;

static void Head_dealloc(HeadObject *self) {
    vad_head_free(self->head);
    Py_XDECREF(self->params);
    if (self->lock) PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Head_init(HeadObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"config", "params", "num_threads", NULL};
    PyObject *config, *params;
    int nthreads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O&", kwlist, &config, &params, thread_count, &nthreads)) return -1;
    if (self->head) {
        PyErr_SetString(PyExc_RuntimeError, "Head is already initialised");
        return -1;
    }
    if (parse_head_config(config, &self->cfg)) return -1;
    PyArrayObject *p = as_float_array(params, "params", 1);
    if (!p) return -1;
    size_t total = 0;
    vad_head_layout(&self->cfg, NULL, 0, &total);
    if ((size_t)PyArray_SIZE(p) != total) {
        PyErr_Format(PyExc_ValueError, "head params has %zd floats, the configuration needs %zu",
                     (Py_ssize_t)PyArray_SIZE(p), total);
        Py_DECREF(p);
        return -1;
    }
    if (!PyArray_ISWRITEABLE(p) || (PyObject *)p != params) {
        Py_DECREF(p);
        PyErr_SetString(PyExc_ValueError, "head params must be a writeable C-contiguous float32 array");
        return -1;
    }
    self->head = vad_head_create(&self->cfg, (const float *)PyArray_DATA(p), nthreads);
    self->lock = PyThread_allocate_lock();
    if (!self->head || !self->lock) {
        Py_DECREF(p);
        PyErr_NoMemory();
        return -1;
    }
    self->params = p;
    return 0;
}

static PyObject *Head_maps(HeadObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"feats", "anomaly_token", "normal_token", "image_size", "sigma", "topk",
                             "layer_maps", "tokens", NULL};
    PyObject *feats_obj, *ta_obj, *tn_obj;
    int S, topk, want_layers = 0, want_tokens = 0;
    double sigma;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOidi|pp", kwlist, &feats_obj, &ta_obj, &tn_obj, &S,
                                     &sigma, &topk, &want_layers, &want_tokens))
        return NULL;
    if (!self->head) {
        PyErr_SetString(PyExc_RuntimeError, "Head is not initialised");
        return NULL;
    }
    const vad_head_config *c = &self->cfg;
    int D = c->width, L = c->n_layers;
    if (!isfinite(sigma) || sigma < 0 || sigma > 1000) {
        PyErr_SetString(PyExc_ValueError, "sigma must be a finite number in [0, 1000]");
        return NULL;
    }
    if (S < 1 || S > VAD_MAX_IMAGE_SIDE) {
        PyErr_Format(PyExc_ValueError, "image_size %d is out of range", S);
        return NULL;
    }
    PyArrayObject *feats[VAD_HEAD_MAX_LAYERS] = {0};
    PyArrayObject *ta = NULL, *tn = NULL;
    PyObject *final_maps = NULL, *scores = NULL, *layer_maps = NULL, *tokens = NULL, *result = NULL;
    const float *fptr[VAD_HEAD_MAX_LAYERS];
    int B = -1, N = -1;
    if (parse_layer_inputs(L, D, feats_obj, ta_obj, tn_obj, feats, fptr, &ta, &tn, &B, &N)) return NULL;
    int g = (int)lround(sqrt((double)N));
    if (g * g != N) {
        PyErr_Format(PyExc_ValueError, "feats hold %d patches: expected a square grid", N);
        goto done;
    }
    if (topk < 1 || (int64_t)topk > (int64_t)S * S) {
        PyErr_Format(PyExc_ValueError, "topk %d is outside 1..%d", topk, S * S);
        goto done;
    }
    npy_intp mdims[3] = {B, S, S}, sdims[1] = {B}, ldims[4] = {L, B, S, S}, tdims[4] = {L, 2, B, D};
    final_maps = new_float_array(3, mdims);
    scores = new_float_array(1, sdims);
    if (!final_maps || !scores) goto done;
    if (want_layers && !(layer_maps = new_float_array(4, ldims))) goto done;
    if (want_tokens && !(tokens = new_float_array(4, tdims))) goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    rc = vad_head_maps(self->head, fptr, (const float *)PyArray_DATA(ta), (const float *)PyArray_DATA(tn), B, g, S,
                       sigma, topk, (float *)PyArray_DATA((PyArrayObject *)final_maps),
                       (float *)PyArray_DATA((PyArrayObject *)scores),
                       layer_maps ? (float *)PyArray_DATA((PyArrayObject *)layer_maps) : NULL,
                       tokens ? (float *)PyArray_DATA((PyArrayObject *)tokens) : NULL);
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    if (rc) {
        raise_status(rc);
        goto done;
    }
    result = PyTuple_Pack(4, final_maps, scores, layer_maps ? layer_maps : Py_None, tokens ? tokens : Py_None);
done:
    for (int i = 0; i < L; i++) Py_XDECREF(feats[i]);
    Py_XDECREF(ta);
    Py_XDECREF(tn);
    Py_XDECREF(final_maps);
    Py_XDECREF(scores);
    Py_XDECREF(layer_maps);
    Py_XDECREF(tokens);
    return result;
}

static PyObject *Head_loss_and_grad(HeadObject *self, PyObject *args, PyObject *kwds); /* head training */

static PyMethodDef Head_methods[] = {
    {"maps", (PyCFunction)(void (*)(void))Head_maps, METH_VARARGS | METH_KEYWORDS,
     "maps(feats, anomaly_token, normal_token, image_size, sigma, topk, layer_maps=False, tokens=False)\n"
     "-> (final (B,S,S), scores (B,), layer maps (L,B,S,S) or None, SCA tokens (L,2,B,D) or None)"},
    {"loss_and_grad", (PyCFunction)(void (*)(void))Head_loss_and_grad, METH_VARARGS | METH_KEYWORDS,
     "loss_and_grad(feats, anomaly_token, normal_token, image_size, labels, masks, has_mask, topk, dropout=0.0,\n"
     "seed=0, grad=None) -> ({'cls', 'seg', 'contrastive', 'total'}, grad (head layout, accumulated into\n"
     "`grad` when given: SAF/SCA entries only), dfeats [(B,N,D)] per layer, d anomaly_token (B,D),\n"
     "d normal_token (B,D)). masks (B,S,S) or None (all normal); has_mask (B,) or None (all 1): images\n"
     "with has_mask 0 skip the segmentation loss. See csrc/head_train.h."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HeadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "visualad._engine.Head",
    .tp_basicsize = sizeof(HeadObject),
    .tp_dealloc = (destructor)Head_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Head(config, params, num_threads=1): the VisualAD head (SCA, SAF, maps, score) in C.",
    .tp_methods = Head_methods,
    .tp_init = (initproc)Head_init,
    .tp_new = PyType_GenericNew,
};

/* ================================================================== map utilities */

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

/* ================================================================== BLAS peak probe */

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
    rc = vad_sgemm_benchmark(n, repeats, nthreads, &best);
    Py_END_ALLOW_THREADS
    if (rc) return raise_status(rc);
    return PyFloat_FromDouble(best);
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
    if (b_obj != Py_None) {
        if (!(b = as_float_array(b_obj, "bias", 1))) goto done;
        if (PyArray_DIM(b, 0) != N) {
            PyErr_Format(PyExc_ValueError, "bias has %zd values, expected %d", PyArray_DIM(b, 0), N);
            goto done;
        }
    }
    float beta = 0.0f;
    if (o_obj != Py_None) {
        if (!PyArray_Check(o_obj) || PyArray_TYPE((PyArrayObject *)o_obj) != NPY_FLOAT32 ||
            PyArray_NDIM((PyArrayObject *)o_obj) != 2 || PyArray_DIM((PyArrayObject *)o_obj, 0) != M ||
            PyArray_DIM((PyArrayObject *)o_obj, 1) != N || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)o_obj) ||
            !PyArray_ISWRITEABLE((PyArrayObject *)o_obj)) {
            PyErr_Format(PyExc_ValueError, "out must be a writeable C-contiguous float32 array of shape (%d, %d)", M, N);
            goto done;
        }
        o = (PyArrayObject *)o_obj;
        Py_INCREF(o);
        beta = 1.0f;
    } else {
        npy_intp dims[2] = {M, N};
        if (!(o = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32))) goto done;
    }
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

static PyObject *py_set_simd_gemm(PyObject *self, PyObject *arg) {
    (void)self;
    int enable = PyObject_IsTrue(arg);
    if (enable < 0) return NULL;
    return PyBool_FromLong(vad_panel_set_simd(enable));
}

static PyObject *py_simd_gemm_active(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(vad_panel_simd_active());
}

/* ================================================================== precision and kernels */

/* "fp32" / "bf16" -> enum vad_precision; -1 with an exception set. */
static int parse_precision(const char *name) {
    if (!strcmp(name, "fp32")) return VAD_FP32;
    if (!strcmp(name, "bf16")) return VAD_BF16;
    PyErr_Format(PyExc_ValueError, "precision must be 'fp32' or 'bf16', got '%s'", name);
    return -1;
}

static int add_flag(PyObject *d, const char *key, int value) {
    PyObject *v = PyBool_FromLong(value);
    int rc = v ? PyDict_SetItemString(d, key, v) : -1;
    Py_XDECREF(v);
    return rc;
}

static PyObject *py_cpu_features(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    const vad_cpu_features *f = vad_cpu_features_get();
    PyObject *d = PyDict_New();
    if (!d || add_flag(d, "avx512f", f->avx512f) || add_flag(d, "avx512bw", f->avx512bw) ||
        add_flag(d, "avx512bf16", f->avx512bf16) || add_flag(d, "amx_tile", f->amx_tile) ||
        add_flag(d, "amx_bf16", f->amx_bf16) || add_flag(d, "amx_int8", f->amx_int8) ||
        add_flag(d, "os_amx", f->os_amx) || add_flag(d, "amx_permitted", f->amx_permitted)) {
        Py_XDECREF(d);
        return NULL;
    }
    return d;
}

static PyObject *py_precision_kernel(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    int precision = parse_precision(name);
    if (precision < 0) return NULL;
    return PyUnicode_FromString(vad_kernel_name(vad_precision_kernel(precision)));
}

static PyObject *py_allow_bf16(PyObject *self, PyObject *arg) {
    (void)self;
    int allow = PyObject_IsTrue(arg);
    if (allow < 0) return NULL;
    return PyBool_FromLong(vad_precision_allow_bf16(allow));
}

static PyObject *py_set_fused_attention(PyObject *self, PyObject *arg) {
    (void)self;
    int enable = PyObject_IsTrue(arg);
    if (enable < 0) return NULL;
    return PyBool_FromLong(vad_attention_fused_set_fp32(enable));
}

/* The backbone's attention core on its own: qkv [B, T, 3D] -> out [B, T, D]. */
static PyObject *py_attention(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    static char *kwlist[] = {"qkv", "heads", "precision", "num_threads", NULL};
    PyObject *q_obj;
    const char *prec_name = "fp32";
    int heads, nthreads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oi|si", kwlist, &q_obj, &heads, &prec_name, &nthreads)) return NULL;
    int precision = parse_precision(prec_name);
    if (precision < 0) return NULL;
    if (vad_precision_check(precision)) return raise_status(VAD_ERR_VALUE);
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
    int D = (int)(D3 / 3);
    npy_intp dims[3] = {B, T, D};
    PyObject *out = new_float_array(3, dims);
    int fused = vad_attention_fused_available(precision);
    size_t n_scr = fused ? vad_attention_fused_scratch((int)T, D / heads, nthreads) : vad_attention_scratch((int)T, nthreads);
    float *scratch = (float *)malloc(n_scr * sizeof(float));
    vad_pool *pool = vad_pool_create(nthreads);
    if (!out || !scratch || !pool) {
        Py_XDECREF(out);
        free(scratch);
        vad_pool_free(pool);
        Py_DECREF(q);
        return PyErr_NoMemory();
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
    if (b_obj != Py_None) {
        if (!(b = as_float_array(b_obj, "bias", 1))) goto done;
        if (PyArray_DIM(b, 0) != N) {
            PyErr_Format(PyExc_ValueError, "bias has %zd values, expected %zd", (Py_ssize_t)PyArray_DIM(b, 0), (Py_ssize_t)N);
            goto done;
        }
    }
    float beta = 0.0f;
    if (o_obj != Py_None) {
        if (!PyArray_Check(o_obj) || PyArray_TYPE((PyArrayObject *)o_obj) != NPY_FLOAT32 ||
            PyArray_NDIM((PyArrayObject *)o_obj) != 2 || PyArray_DIM((PyArrayObject *)o_obj, 0) != M ||
            PyArray_DIM((PyArrayObject *)o_obj, 1) != N || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)o_obj) ||
            !PyArray_ISWRITEABLE((PyArrayObject *)o_obj)) {
            PyErr_Format(PyExc_ValueError, "out must be a writeable C-contiguous float32 array of shape (%zd, %zd)",
                         (Py_ssize_t)M, (Py_ssize_t)N);
            goto done;
        }
        o = (PyArrayObject *)o_obj;
        Py_INCREF(o);
        beta = 1.0f;
    } else {
        npy_intp dims[2] = {M, N};
        if (!(o = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32))) goto done;
    }
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

/* ====== metrics (begin) */

/* C-contiguous array of exactly the given NumPy type (visualad.metrics converts). New reference. */
static PyArrayObject *metrics_array(PyObject *obj, const char *what, int type) {
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != type) {
        PyArray_Descr *want = PyArray_DescrFromType(type);
        PyErr_Format(PyExc_TypeError, "%s must be a numpy array of dtype %s", what, want->typeobj->tp_name);
        Py_DECREF(want);
        return NULL;
    }
    return (PyArrayObject *)PyArray_FROM_OTF(obj, type, NPY_ARRAY_IN_ARRAY);
}

/* float32 or float64 scores; *is_f64 says which. New reference. */
static PyArrayObject *metrics_scores(PyObject *obj, const char *what, int *is_f64) {
    *is_f64 = PyArray_Check(obj) && PyArray_TYPE((PyArrayObject *)obj) == NPY_FLOAT64;
    return metrics_array(obj, what, *is_f64 ? NPY_FLOAT64 : NPY_FLOAT32);
}

/* A worker pool for large inputs (NULL: run on the calling thread). */
static vad_pool *metrics_pool(int num_threads, npy_intp n_points) {
    return num_threads > 1 && n_points >= (1 << 16) ? vad_pool_create(num_threads) : NULL;
}

static PyObject *py_binary_metrics(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *labels_obj, *scores_obj;
    int num_threads, f64;
    if (!PyArg_ParseTuple(args, "OOO&", &labels_obj, &scores_obj, thread_count, &num_threads)) return NULL;
    PyArrayObject *labels = metrics_array(labels_obj, "y_true", NPY_UINT8);
    if (!labels) return NULL;
    PyArrayObject *scores = metrics_scores(scores_obj, "y_score", &f64);
    if (!scores) {
        Py_DECREF(labels);
        return NULL;
    }
    npy_intp n = PyArray_SIZE(scores);
    if (PyArray_SIZE(labels) != n) {
        PyErr_Format(PyExc_ValueError, "y_true has %zd elements but y_score has %zd", (Py_ssize_t)PyArray_SIZE(labels),
                     (Py_ssize_t)n);
        Py_DECREF(labels);
        Py_DECREF(scores);
        return NULL;
    }
    vad_binary_result res;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    vad_pool *pool = metrics_pool(num_threads, n);
    rc = vad_binary_metrics((const uint8_t *)PyArray_DATA(labels), PyArray_DATA(scores), f64, n, &res, pool);
    vad_pool_free(pool);
    Py_END_ALLOW_THREADS
    Py_DECREF(labels);
    Py_DECREF(scores);
    if (rc) return raise_status(rc);
    return Py_BuildValue("(ddd)", res.auroc, res.ap, res.f1_max);
}

/* masks uint8 (N, H, W) and maps float32/float64 (N, H, W) of equal shapes. New references in *masks, *maps. */
static int metrics_masks_maps(PyObject *masks_obj, PyObject *maps_obj, PyArrayObject **masks, PyArrayObject **maps,
                              int *f64) {
    *maps = NULL;
    *masks = metrics_array(masks_obj, "masks", NPY_UINT8);
    if (!*masks) return -1;
    *maps = metrics_scores(maps_obj, "maps", f64);
    if (!*maps) goto fail;
    if (PyArray_NDIM(*masks) != 3 || PyArray_NDIM(*maps) != 3 ||
        !PyArray_CompareLists(PyArray_DIMS(*masks), PyArray_DIMS(*maps), 3)) {
        PyErr_SetString(PyExc_ValueError, "masks and maps must both have shape (N, H, W)");
        goto fail;
    }
    return 0;
fail:
    Py_CLEAR(*masks);
    Py_CLEAR(*maps);
    return -1;
}

static PyObject *py_aupro(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *masks_obj, *maps_obj;
    double fpr_limit, out = 0.0;
    int num_threads, f64, rc;
    if (!PyArg_ParseTuple(args, "OOdO&", &masks_obj, &maps_obj, &fpr_limit, thread_count, &num_threads)) return NULL;
    PyArrayObject *masks, *maps;
    if (metrics_masks_maps(masks_obj, maps_obj, &masks, &maps, &f64)) return NULL;
    npy_intp *d = PyArray_DIMS(maps);
    Py_BEGIN_ALLOW_THREADS
    vad_pool *pool = metrics_pool(num_threads, PyArray_SIZE(maps));
    rc = vad_aupro((const uint8_t *)PyArray_DATA(masks), PyArray_DATA(maps), f64, d[0], d[1], d[2], fpr_limit, &out, pool);
    vad_pool_free(pool);
    Py_END_ALLOW_THREADS
    Py_DECREF(masks);
    Py_DECREF(maps);
    if (rc) return raise_status(rc);
    return PyFloat_FromDouble(out);
}

static PyObject *py_aupro_anomalyclip(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *masks_obj, *maps_obj, *th_obj;
    double fpr_below, out = 0.0;
    int num_threads, f64, rc;
    if (!PyArg_ParseTuple(args, "OOOdO&", &masks_obj, &maps_obj, &th_obj, &fpr_below, thread_count, &num_threads)) return NULL;
    PyArrayObject *th = metrics_array(th_obj, "thresholds", NPY_FLOAT64);
    if (!th) return NULL;
    PyArrayObject *masks, *maps;
    if (metrics_masks_maps(masks_obj, maps_obj, &masks, &maps, &f64)) {
        Py_DECREF(th);
        return NULL;
    }
    npy_intp *d = PyArray_DIMS(maps);
    Py_BEGIN_ALLOW_THREADS
    vad_pool *pool = metrics_pool(num_threads, PyArray_SIZE(maps));
    rc = vad_aupro_anomalyclip((const uint8_t *)PyArray_DATA(masks), PyArray_DATA(maps), f64, d[0], d[1], d[2],
                               (const double *)PyArray_DATA(th), PyArray_SIZE(th), fpr_below, &out, pool);
    vad_pool_free(pool);
    Py_END_ALLOW_THREADS
    Py_DECREF(th);
    Py_DECREF(masks);
    Py_DECREF(maps);
    if (rc) return raise_status(rc);
    return PyFloat_FromDouble(out);
}

/* ====== metrics (end) */

/* ====== head training (begin) */
/* Head.loss_and_grad (SPEC §3 losses and the head's gradients, csrc/head_train.h), AdamW and
 * gradient-norm clipping (csrc/adamw.h), and the dropout mask (for tests). */
#include "adamw.h"
#include "head_train.h"

/* Head inputs: feats (L arrays (B, N, D), square N), anomaly/normal tokens (B, D). On success the
 * arrays are new references the caller releases (feats[0..L), *ta, *tn). */

/* obj converted (any numeric dtype) to a C-contiguous array of `type` with the given number of
 * elements along each of its nd dims. New reference. */
static PyArrayObject *train_array(PyObject *obj, const char *what, int type, int nd, const npy_intp *dims) {
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

/* A 1-D float32 C-contiguous array the engine may update in place (no copy is made). */
static int inplace_vector(PyObject *obj, const char *what) {
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != NPY_FLOAT32 ||
        PyArray_NDIM((PyArrayObject *)obj) != 1 || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)obj) ||
        !PyArray_ISWRITEABLE((PyArrayObject *)obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a writeable 1-D C-contiguous float32 numpy array", what);
        return -1;
    }
    return 0;
}

static PyObject *Head_loss_and_grad(HeadObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"feats", "anomaly_token", "normal_token", "image_size", "labels", "masks",
                             "has_mask", "topk", "dropout", "seed", "grad", NULL};
    PyObject *feats_obj, *ta_obj, *tn_obj, *labels_obj, *masks_obj, *has_obj, *grad_obj = Py_None;
    int S, topk;
    double dropout = 0.0;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOiOOOi|dKO", kwlist, &feats_obj, &ta_obj, &tn_obj, &S,
                                     &labels_obj, &masks_obj, &has_obj, &topk, &dropout, &seed, &grad_obj))
        return NULL;
    if (!self->head) {
        PyErr_SetString(PyExc_RuntimeError, "Head is not initialised");
        return NULL;
    }
    const vad_head_config *c = &self->cfg;
    int D = c->width, L = c->n_layers, B = 0, N = 0;
    if (S < 1 || S > VAD_MAX_IMAGE_SIDE) {
        PyErr_Format(PyExc_ValueError, "image_size %d is out of range", S);
        return NULL;
    }
    if (!(dropout >= 0.0 && dropout < 1.0)) {
        PyErr_SetString(PyExc_ValueError, "dropout must be in [0, 1)");
        return NULL;
    }
    PyArrayObject *feats[VAD_HEAD_MAX_LAYERS] = {0}, *ta = NULL, *tn = NULL, *labels = NULL, *masks = NULL,
                  *has = NULL;
    PyObject *grad = NULL, *dfeats = NULL, *dta = NULL, *dtn = NULL, *result = NULL;
    const float *fptr[VAD_HEAD_MAX_LAYERS];
    float *dptr[VAD_HEAD_MAX_LAYERS];
    if (parse_layer_inputs(c->n_layers, c->width, feats_obj, ta_obj, tn_obj, feats, fptr, &ta, &tn, &B, &N))
        return NULL;
    int g = (int)lround(sqrt((double)N));
    if (g * g != N) {
        PyErr_Format(PyExc_ValueError, "feats hold %d patches: expected a square grid", N);
        goto done;
    }
    if (topk < 1 || (int64_t)topk > (int64_t)S * S) {
        PyErr_Format(PyExc_ValueError, "topk %d is outside 1..%d", topk, S * S);
        goto done;
    }
    npy_intp bdim[1] = {B}, mdims[3] = {B, S, S};
    if (!(labels = train_array(labels_obj, "labels", NPY_FLOAT32, 1, bdim))) goto done;
    if (masks_obj != Py_None && !(masks = train_array(masks_obj, "masks", NPY_FLOAT32, 3, mdims))) goto done;
    if (has_obj != Py_None && !(has = train_array(has_obj, "has_mask", NPY_UINT8, 1, bdim))) goto done;
    size_t total = 0;
    vad_head_layout(c, NULL, 0, &total);
    if (grad_obj == Py_None) {
        npy_intp gdim[1] = {(npy_intp)total};
        grad = PyArray_ZEROS(1, gdim, NPY_FLOAT32, 0);
        if (!grad) goto done;
    } else {
        if (inplace_vector(grad_obj, "grad")) goto done;
        if ((size_t)PyArray_SIZE((PyArrayObject *)grad_obj) != total) {
            PyErr_Format(PyExc_ValueError, "grad must hold %zu floats (the head layout)", total);
            goto done;
        }
        grad = grad_obj;
        Py_INCREF(grad);
    }
    npy_intp fdims[3] = {B, N, D}, tdims[2] = {B, D};
    if (!(dfeats = PyList_New(L))) goto done;
    for (int i = 0; i < L; i++) {
        PyObject *a = new_float_array(3, fdims);
        if (!a) goto done;
        PyList_SET_ITEM(dfeats, i, a);
        dptr[i] = (float *)PyArray_DATA((PyArrayObject *)a);
    }
    if (!(dta = new_float_array(2, tdims)) || !(dtn = new_float_array(2, tdims))) goto done;
    double losses[4] = {0, 0, 0, 0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    rc = vad_head_loss_and_grad(self->head, fptr, (const float *)PyArray_DATA(ta), (const float *)PyArray_DATA(tn),
                                B, g, S, (const float *)PyArray_DATA(labels),
                                masks ? (const float *)PyArray_DATA(masks) : NULL,
                                has ? (const unsigned char *)PyArray_DATA(has) : NULL, topk, (float)dropout,
                                (uint64_t)seed, losses, (float *)PyArray_DATA((PyArrayObject *)grad), dptr,
                                (float *)PyArray_DATA((PyArrayObject *)dta),
                                (float *)PyArray_DATA((PyArrayObject *)dtn));
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    if (rc) {
        raise_status(rc);
        goto done;
    }
    result = Py_BuildValue("({s:d,s:d,s:d,s:d}OOOO)", "cls", losses[0], "seg", losses[1], "contrastive", losses[2],
                           "total", losses[3], grad, dfeats, dta, dtn);
done:
    for (int i = 0; i < L; i++) Py_XDECREF(feats[i]);
    Py_XDECREF(ta);
    Py_XDECREF(tn);
    Py_XDECREF(labels);
    Py_XDECREF(masks);
    Py_XDECREF(has);
    Py_XDECREF(grad);
    Py_XDECREF(dfeats);
    Py_XDECREF(dta);
    Py_XDECREF(dtn);
    return result;
}

static PyObject *py_adamw_step(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    static char *kwlist[] = {"params", "grads", "exp_avg", "exp_avg_sq", "segments", "step", "beta1", "beta2",
                             "eps", "num_threads", NULL};
    PyObject *p_obj, *g_obj, *m_obj, *v_obj, *seg_obj;
    int step, nthreads = 1;
    vad_adamw_params hp = vad_adamw_default_params();
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOi|dddO&", kwlist, &p_obj, &g_obj, &m_obj, &v_obj, &seg_obj,
                                     &step, &hp.beta1, &hp.beta2, &hp.eps, thread_count, &nthreads))
        return NULL;
    if (inplace_vector(p_obj, "params") || inplace_vector(m_obj, "exp_avg") || inplace_vector(v_obj, "exp_avg_sq"))
        return NULL;
    if (step < 1) {
        PyErr_SetString(PyExc_ValueError, "step counts from 1");
        return NULL;
    }
    if (!(hp.beta1 >= 0 && hp.beta1 < 1 && hp.beta2 >= 0 && hp.beta2 < 1 && hp.eps > 0 && isfinite(hp.eps))) {
        PyErr_SetString(PyExc_ValueError, "need 0 <= beta1, beta2 < 1 and eps > 0");
        return NULL;
    }
    PyArrayObject *grads = as_float_array(g_obj, "grads", 1);
    if (!grads) return NULL;
    npy_intp n = PyArray_SIZE((PyArrayObject *)p_obj);
    PyObject *fast = NULL, *result = NULL;
    vad_adamw_segment *segs = NULL;
    if (PyArray_SIZE(grads) != n || PyArray_SIZE((PyArrayObject *)m_obj) != n ||
        PyArray_SIZE((PyArrayObject *)v_obj) != n) {
        PyErr_SetString(PyExc_ValueError, "params, grads, exp_avg and exp_avg_sq must have the same length");
        goto done;
    }
    if (!(fast = PySequence_Fast(seg_obj, "segments must be a sequence of (offset, size, lr, weight_decay)")))
        goto done;
    Py_ssize_t ns = PySequence_Fast_GET_SIZE(fast);
    segs = (vad_adamw_segment *)PyMem_Calloc(ns ? (size_t)ns : 1, sizeof(vad_adamw_segment));
    if (!segs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < ns; i++) {
        Py_ssize_t off, size;
        double lr, wd;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "nndd;segments must hold (offset, size, lr, "
                              "weight_decay) tuples", &off, &size, &lr, &wd))
            goto done;
        if (off < 0 || size < 0 || off > n || size > n - off || !isfinite(lr) || !isfinite(wd)) {
            PyErr_Format(PyExc_ValueError, "segment %zd (offset %zd, size %zd) is outside the %zd parameters or has a "
                         "non-finite lr / weight decay", i, off, size, (Py_ssize_t)n);
            goto done;
        }
        segs[i].offset = (size_t)off;
        segs[i].size = (size_t)size;
        segs[i].lr = lr;
        segs[i].weight_decay = wd;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    vad_pool *pool = vad_pool_create(nthreads);
    ok = pool != NULL;
    if (ok)
        vad_adamw_step(pool, (float *)PyArray_DATA((PyArrayObject *)p_obj), (const float *)PyArray_DATA(grads),
                       (float *)PyArray_DATA((PyArrayObject *)m_obj), (float *)PyArray_DATA((PyArrayObject *)v_obj),
                       segs, (int)ns, &hp, step);
    vad_pool_free(pool);
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_DECREF(grads);
    Py_XDECREF(fast);
    PyMem_Free(segs);
    return result;
}

static PyObject *py_clip_grad_norm(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *obj;
    double max_norm;
    if (!PyArg_ParseTuple(args, "Od", &obj, &max_norm)) return NULL;
    if (inplace_vector(obj, "grad")) return NULL;
    if (!(max_norm > 0) || !isfinite(max_norm)) {
        PyErr_SetString(PyExc_ValueError, "max_norm must be a positive finite number");
        return NULL;
    }
    double norm;
    Py_BEGIN_ALLOW_THREADS
    norm = vad_clip_grad_norm((float *)PyArray_DATA((PyArrayObject *)obj), (size_t)PyArray_SIZE((PyArrayObject *)obj),
                              max_norm);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(norm);
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

static PyObject *py_cosine_annealing_lr(PyObject *self, PyObject *args) {
    (void)self;
    double base, eta_min;
    int epoch, t_max;
    if (!PyArg_ParseTuple(args, "ddii", &base, &eta_min, &epoch, &t_max)) return NULL;
    return PyFloat_FromDouble(vad_cosine_annealing_lr(base, eta_min, epoch, t_max));
}

/* ====== head training (end) */

/* ================================================================== module */

static PyMethodDef module_methods[] = {
    {"vit_layout", py_vit_layout, METH_O,
     "vit_layout(config) -> ([(name, shape, offset, panel), ...], total_floats): the weight buffer layout\n"
     "(panel 0: row-major; else a linear weight [N, K] stored as ceil(N/panel) panels of [K, panel])."},
    {"binary_metrics", py_binary_metrics, METH_VARARGS,
     "binary_metrics(y_true uint8, y_score float32/64, num_threads) -> (auroc, ap, f1_max)"},
    {"aupro", py_aupro, METH_VARARGS,
     "aupro(masks uint8 (N,H,W), maps float32/64 (N,H,W), fpr_limit, num_threads) -> MVTec AD AUPRO"},
    {"aupro_anomalyclip", py_aupro_anomalyclip, METH_VARARGS,
     "aupro_anomalyclip(masks, maps, thresholds float64, fpr_below, num_threads) -> AnomalyCLIP AUPRO"},
    {"sgemm_seconds", py_sgemm_seconds, METH_VARARGS,
     "sgemm_seconds(n, repeats, num_threads) -> best wall time of one n x n x n SGEMM through the engine's\n"
     "BLAS and thread pool (for peak-FLOP/s references in benchmarks)."},
    {"limits", py_limits, METH_NOARGS,
     "limits() -> {name: int}: the engine's size limits (csrc/vad_limits.h), mirrored by visualad.limits."},
    {"panel_linear", (PyCFunction)(void (*)(void))py_panel_linear, METH_VARARGS | METH_KEYWORDS,
     "panel_linear(x (M,K) float32, panels, n_out, bias=None, out=None, activation=-1, num_threads=1) -> out:\n"
     "act(x W^T + bias (+ out when given, accumulated in place)) with W [n_out, K] stored in panels\n"
     "(visualad.backbone.write_tensor); activation -1 none, 0 QuickGELU, 1 GELU (erf)."},
    {"set_simd_gemm", py_set_simd_gemm, METH_O,
     "set_simd_gemm(enable) -> previous: True runs the backbone's linear layers on the AVX-512 kernel when\n"
     "the CPU has it (the default), False sends them through BLAS sgemm panel by panel (process-wide)."},
    {"simd_gemm_active", py_simd_gemm_active, METH_NOARGS,
     "simd_gemm_active() -> True when the backbone's linear layers run on the AVX-512 kernel."},
    {"cpu_features", py_cpu_features, METH_NOARGS,
     "cpu_features() -> dict of the CPU / OS features the engine probed (CPUID, XGETBV, Linux AMX permission)."},
    {"precision_kernel", py_precision_kernel, METH_VARARGS,
     "precision_kernel('fp32' | 'bf16') -> the kernel family that precision runs on here ('none' if it cannot)."},
    {"allow_bf16", py_allow_bf16, METH_O,
     "allow_bf16(allow) -> previous: False makes the engine behave as on a CPU without AVX512-BF16 (bf16 is\n"
     "then refused with the error such a CPU gives; process-wide, for tests); True (the default) as probed."},
    {"set_fused_attention", py_set_fused_attention, METH_O,
     "set_fused_attention(enable) -> previous: True (the default) runs fp32 attention on the fused AVX-512\n"
     "kernel when the CPU has it, False on the per-head BLAS path (process-wide; for comparisons)."},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_VARARGS | METH_KEYWORDS,
     "attention(qkv (B,T,3D) float32, heads, precision='fp32', num_threads=1) -> (B,T,D): softmax(q k^T /\n"
     "sqrt(D/heads)) v per head, on the kernel the backbone uses for that precision."},
    {"bf16_linear", (PyCFunction)(void (*)(void))py_bf16_linear, METH_VARARGS | METH_KEYWORDS,
     "bf16_linear(x (M,K) float32, weight (N,K) float32, bias=None, out=None, activation=-1, num_threads=1)\n"
     "-> out: act(bf16(x) bf16(weight)^T + bias (+ out, accumulated in place)), fp32 accumulation, on the\n"
     "backbone's bf16 kernel (weight packed to bf16 panels first)."},
    {"bf16_gemm_seconds", py_bf16_gemm_seconds, METH_VARARGS,
     "bf16_gemm_seconds(M, N, K, repeats, num_threads) -> best wall time of one (M,K) x (K,N) bf16 linear\n"
     "layer on pre-packed weights (the bf16 reference rate for benchmarks)."},
    {"head_layout", py_head_layout, METH_O,
     "head_layout(config) -> ([(name, shape, offset, panel), ...], total_floats): the head buffer layout\n"
     "(every panel is 0: row-major)."},
    {"gaussian_filter", py_gaussian_filter, METH_VARARGS,
     "gaussian_filter(maps (B,H,W) float32, sigma, num_threads=1) -> filtered copy (SciPy 'reflect', truncate 4)."},
    {"adamw_step", (PyCFunction)(void (*)(void))py_adamw_step, METH_VARARGS | METH_KEYWORDS,
     "adamw_step(params, grads, exp_avg, exp_avg_sq, segments, step, beta1=0.9, beta2=0.999, eps=1e-8,\n"
     "num_threads=1) -> None. One torch.optim.AdamW step (t = step, from 1) in place on the 1-D float32\n"
     "buffers params / exp_avg / exp_avg_sq; segments = [(offset, size, lr, weight_decay), ...]."},
    {"clip_grad_norm", py_clip_grad_norm, METH_VARARGS,
     "clip_grad_norm(grad, max_norm) -> norm before clipping; grad (1-D float32, e.g. a slice of the\n"
     "gradient buffer) *= min(1, max_norm / (norm + 1e-6)) in place (left as is when norm is NaN/Inf)."},
    {"dropout_mask", py_dropout_mask, METH_VARARGS,
     "dropout_mask(n, p, seed, layer, image, site, token) -> float32 (n,) multipliers (0 or 1/(1-p)) the\n"
     "training dropout uses (site 0 SAF hidden, 1 SAF out, 2 SCA attention, 3 SCA out)."},
    {"cosine_annealing_lr", py_cosine_annealing_lr, METH_VARARGS,
     "cosine_annealing_lr(base_lr, eta_min, epoch, t_max) -> eta_min + (base-eta_min)(1+cos(pi epoch/t_max))/2"},
    {"resize_bilinear", py_resize_bilinear, METH_VARARGS,
     "resize_bilinear(grid (H,W,C) float32, H_out, W_out) -> (H_out, W_out, C) (align_corners=False)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT, "visualad._engine", "VisualAD C engine.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__engine(void) {
    import_array();
    if (PyType_Ready(&BackboneModelType) < 0 || PyType_Ready(&BackboneType) < 0 || PyType_Ready(&HeadType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&engine_module);
    if (!m) return NULL;
    Py_INCREF(&BackboneModelType);
    if (PyModule_AddObject(m, "BackboneModel", (PyObject *)&BackboneModelType) < 0) {
        Py_DECREF(&BackboneModelType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&BackboneType);
    if (PyModule_AddObject(m, "Backbone", (PyObject *)&BackboneType) < 0) {
        Py_DECREF(&BackboneType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&HeadType);
    if (PyModule_AddObject(m, "Head", (PyObject *)&HeadType) < 0) {
        Py_DECREF(&HeadType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
