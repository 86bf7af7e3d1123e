/* Shared by the glue files (csrc/module.c and csrc/py_*.c), the only files that include Python.h:
 * the NumPy C API set-up, the Python object types, and the functions one glue file offers another.
 * The engine behind them never sees a PyObject. */
#ifndef VAD_PY_GLUE_H
#define VAD_PY_GLUE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
/* one NumPy C-API table for the whole extension, filled by import_array() in module.c */
#define PY_ARRAY_UNIQUE_SYMBOL visualad_engine_ARRAY_API
#ifndef VAD_GLUE_IMPORTS_NUMPY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>
#include <pythread.h>

#include <stddef.h>

#include "encode.h"
#include "head.h"
#include "ops.h"
#include "vad_limits.h"
#include "vit.h"





/* The read-only model (configuration + weights) over a float32 buffer it keeps alive, or bf16-only
 * (its own bf16 packs and small tensors); shared by every Backbone state made from it, across threads. */
typedef struct {
    PyObject_HEAD
    vad_vit_model *model;
    PyArrayObject *params; /* keeps the weight buffer alive (NULL for a bf16-only model) */
} BackboneModelObject;



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


typedef struct {
    PyObject_HEAD
    vad_head *head;
    vad_head_config cfg;
    PyArrayObject *params;
    PyThread_type_lock lock;
} HeadObject;

/* The PyTypeObject of one of the extension's plain types (visualad._engine.<name>): an object struct
 * with dealloc and init, a docstring and the method entries (the macro ends the table), created by
 * PyType_GenericNew; no other slots. */
#define VAD_PLAIN_TYPE(name, object, dealloc, init, doc, ...)                \
    {                                                                        \
        PyVarObject_HEAD_INIT(NULL, 0)                                       \
        .tp_name = "visualad._engine." name,                                 \
        .tp_basicsize = sizeof(object),                                      \
        .tp_dealloc = (destructor)(dealloc),                                 \
        .tp_flags = Py_TPFLAGS_DEFAULT,                                      \
        .tp_doc = (doc),                                                     \
        .tp_methods = (PyMethodDef[]){__VA_ARGS__, {NULL, NULL, 0, NULL}},   \
        .tp_init = (initproc)(init),                                         \
        .tp_new = PyType_GenericNew,                                         \
    }

/* ---- py_convert.c */
PyObject *raise_status(int rc);
PyArrayObject *as_float_array(PyObject *obj, const char *what, int ndim);
int all_finite(const float *x, size_t n);
PyObject *new_float_array(int nd, npy_intp *dims);
int thread_count(PyObject *v, void *out);
int read_int_list(PyObject *seq, int *out, int max, const char *what);
int parse_layer_inputs(int L, int D, PyObject *feats_obj, PyObject *ta_obj, PyObject *tn_obj,
                              PyArrayObject **feats, const float **fptr, PyArrayObject **ta, PyArrayObject **tn,
                              int *B, int *N);
int dict_int(PyObject *d, const char *key, int *out, int required);
PyObject *py_limits(PyObject *self, PyObject *unused);
PyArrayObject *check_vector(PyObject *obj, const char *what, int D);
/* A parameter layout (vad_vit_layout, vad_head_layout) as ([(name, shape, offset, panel), ...], total). */
typedef int (*vad_layout_fn)(const void *cfg, vad_tensor_entry *entries, int max, size_t *total);
PyObject *layout_to_python(vad_layout_fn layout, const void *cfg);
/* The float32 weight buffer of an engine object whose layout needs `total` floats. in_place: the
 * engine updates it (training), so it must be the caller's own writeable array, never a copy.
 * New reference, or NULL with an exception set. */
PyArrayObject *weight_buffer(PyObject *params, size_t total, const char *what, int in_place);
int parse_precision(const char *name);
PyArrayObject *train_array(PyObject *obj, const char *what, int type, int nd, const npy_intp *dims);
int inplace_vector_nd(PyObject *obj, const char *what, int ndim);
int inplace_vector(PyObject *obj, const char *what);

/* ---- py_backbone.c */
PyObject *py_vit_layout(PyObject *self, PyObject *arg);
extern PyTypeObject BackboneModelType;
extern PyTypeObject BackboneType;
PyObject *py_set_simd_gemm(PyObject *self, PyObject *arg);
PyObject *py_simd_gemm_active(PyObject *self, PyObject *unused);
PyObject *py_cpu_features(PyObject *self, PyObject *unused);
PyObject *py_precision_kernel(PyObject *self, PyObject *args);
PyObject *py_set_fused_attention(PyObject *self, PyObject *arg);

/* ---- py_head.c */
/* The grid side g of N patch features (N = g * g) and a top-k count in 1..S*S for maps of side S;
 * -1 with ValueError set otherwise. */
int head_grid(int N, int S, int topk, int *g);
PyObject *py_head_layout(PyObject *self, PyObject *arg);
extern PyTypeObject HeadType;

/* ---- py_training.c */
PyObject *Head_loss_and_grad(HeadObject *self, PyObject *args, PyObject *kwds);
PyObject *py_adamw_step(PyObject *self, PyObject *args, PyObject *kwds);
PyObject *py_clip_grad_norm(PyObject *self, PyObject *args);
PyObject *py_cosine_annealing_lr(PyObject *self, PyObject *args);

/* ---- py_metrics.c */
PyObject *py_binary_metrics(PyObject *self, PyObject *args);
PyObject *py_aupro(PyObject *self, PyObject *args);
PyObject *py_aupro_anomalyclip(PyObject *self, PyObject *args);

/* ---- py_testing.c */
PyObject *vad_testing_module(void);

#endif
