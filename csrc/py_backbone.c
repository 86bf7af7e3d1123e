/* The BackboneModel type (a loaded tower's weights, shared and read-only) and the Backbone type (a
 * per-call state: workspaces, encoder; csrc/vit.h, csrc/encode.h); the backbone's kernel switches and
 * the CPU probe (csrc/panel_gemm.h, csrc/attention_fused.h, csrc/cpu_features.h). */
#include "py_glue.h"

#include "attention_fused.h"
#include "cpu_features.h"
#include "encode.h"
#include "errors.h"
#include "panel_gemm.h"
#include "vit.h"

static PyObject *BackboneModel_state(BackboneModelObject *self, PyObject *args, PyObject *kwds);

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

static int vit_layout(const void *cfg, vad_tensor_entry *entries, int max, size_t *total) {
    return vad_vit_layout((const vad_vit_config *)cfg, entries, max, total);
}

PyObject *py_vit_layout(PyObject *self, PyObject *arg) {
    (void)self;
    vad_vit_config cfg;
    if (parse_vit_config(arg, &cfg)) return NULL;
    return layout_to_python(vit_layout, &cfg);
}

static void BackboneModel_dealloc(BackboneModelObject *self) {
    vad_vit_model_free(self->model);
    Py_XDECREF(self->params);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* BackboneModel(config, params, precision="fp32"): "fp32" keeps params (and points into it); "bf16"
 * packs the model now and lets params go (a bf16-only model). */
static int BackboneModel_init(BackboneModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"config", "params", "precision", NULL};
    PyObject *config, *params;
    const char *prec_name = "fp32";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|s", kwlist, &config, &params, &prec_name)) return -1;
    if (self->model) {
        PyErr_SetString(PyExc_RuntimeError, "BackboneModel is already initialised");
        return -1;
    }
    int precision = parse_precision(prec_name);
    if (precision < 0) return -1;
    vad_vit_config cfg;
    if (parse_vit_config(config, &cfg)) return -1;
    size_t total = 0;
    vad_vit_layout(&cfg, NULL, 0, &total);
    PyArrayObject *p = weight_buffer(params, total, "params", 0);
    if (!p) return -1;
    Py_BEGIN_ALLOW_THREADS
    self->model = vad_vit_model_create(&cfg, (const float *)PyArray_DATA(p), precision);
    Py_END_ALLOW_THREADS
    if (!self->model || precision != VAD_FP32) Py_DECREF(p);
    if (!self->model) {
        raise_status(VAD_ERR_MEMORY);
        return -1;
    }
    if (precision == VAD_FP32) self->params = p;
    return 0;
}

static PyObject *BackboneModel_weight_bytes(BackboneModelObject *self, PyObject *unused) {
    (void)unused;
    if (!self->model) {
        PyErr_SetString(PyExc_RuntimeError, "BackboneModel is not initialised");
        return NULL;
    }
    size_t fp32 = 0, bf16 = 0;
    vad_vit_model_weight_bytes(self->model, &fp32, &bf16);
    return Py_BuildValue("{s:n,s:n}", "fp32", (Py_ssize_t)fp32, "bf16", (Py_ssize_t)bf16);
}

PyTypeObject BackboneModelType = VAD_PLAIN_TYPE(
    "BackboneModel", BackboneModelObject, BackboneModel_dealloc, BackboneModel_init,
    "BackboneModel(config, params, precision='fp32'): a frozen ViT tower's configuration over a float32\n"
    "weight buffer, read-only and shared by the Backbone states made from it (state()), across threads.\n"
    "precision='bf16' makes a bf16-only model: the linear weights packed to bf16 now, the small tensors\n"
    "copied, and params no longer used.",
    {"state", (PyCFunction)(void (*)(void))BackboneModel_state, METH_VARARGS | METH_KEYWORDS,
     "state(num_threads=1, precision='fp32') -> a new Backbone over this model (its own threads and\n"
     "workspaces; the weights are shared, not copied: bf16 states share the model's one bf16 pack).\n"
     "A bf16-only model (precision='bf16') makes bf16 states only."},
    {"weight_bytes", (PyCFunction)BackboneModel_weight_bytes, METH_NOARGS,
     "weight_bytes() -> {'fp32': bytes, 'bf16': bytes}: the weights this model uses (an fp32 model's\n"
     "buffer, or a bf16-only model's own small tensors; its bf16 packs made so far)."});

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

static PyObject *Backbone_forward(BackboneObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"images", "layers", "inserted", "final_norm", NULL};
    PyObject *images_obj, *layers_obj, *ins_obj = Py_None;
    int final_norm = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|Op", kwlist, &images_obj, &layers_obj, &ins_obj, &final_norm))
        return NULL;
    if (check_ready(self)) return NULL;
    const vad_vit_config *cfg = vad_vit_get_config(self->vit);
    int layers[VAD_MAX_LAYERS];
    int n_layers = read_int_list(layers_obj, layers, VAD_MAX_LAYERS, "layers");
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
    float *ptrs[VAD_MAX_LAYERS];
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

static PyObject *encode_impl(BackboneObject *self, PyObject *args, PyObject *kwds, int train) {
    static char *kwlist[] = {"images", "layers", "tokens", "ln_weight", "ln_bias", NULL};
    PyObject *images_obj, *layers_obj, *tok_obj, *lnw_obj, *lnb_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO", kwlist, &images_obj, &layers_obj, &tok_obj,
                                     &lnw_obj, &lnb_obj))
        return NULL;
    if (check_ready(self)) return NULL;
    const vad_vit_config *cfg = vad_vit_get_config(self->vit);
    int D = cfg->width;
    int layers[VAD_MAX_LAYERS];
    int n_layers = read_int_list(layers_obj, layers, VAD_MAX_LAYERS, "layers");
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
    float *ptrs[VAD_MAX_LAYERS];
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
    PyArrayObject *dfeats[VAD_MAX_LAYERS] = {0}, *dta = NULL, *dtn = NULL;
    PyObject *dtok = NULL, *dlnw = NULL, *dlnb = NULL, *result = NULL;
    const float *fptr[VAD_MAX_LAYERS];
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

PyTypeObject BackboneType = VAD_PLAIN_TYPE(
    "Backbone", BackboneObject, Backbone_dealloc, Backbone_init,
    "Backbone(config, params, num_threads=1, precision='fp32'): a frozen ViT tower in C over a float32 weight buffer:\n"
    "one caller's state (threads, workspaces) over a BackboneModel (BackboneModel.state() shares one).",
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
     "for the last encode_train() call (gradients through the frozen backbone)."});

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

PyObject *py_set_simd_gemm(PyObject *self, PyObject *arg) {
    (void)self;
    int enable = PyObject_IsTrue(arg);
    if (enable < 0) return NULL;
    return PyBool_FromLong(vad_panel_set_simd(enable));
}

PyObject *py_simd_gemm_active(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(vad_panel_simd_active());
}

static int add_flag(PyObject *d, const char *key, int value) {
    PyObject *v = PyBool_FromLong(value);
    int rc = v ? PyDict_SetItemString(d, key, v) : -1;
    Py_XDECREF(v);
    return rc;
}

PyObject *py_cpu_features(PyObject *self, PyObject *unused) {
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

PyObject *py_precision_kernel(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    int precision = parse_precision(name);
    if (precision < 0) return NULL;
    return PyUnicode_FromString(vad_kernel_name(vad_precision_kernel(precision)));
}

PyObject *py_set_fused_attention(PyObject *self, PyObject *arg) {
    (void)self;
    int enable = PyObject_IsTrue(arg);
    if (enable < 0) return NULL;
    return PyBool_FromLong(vad_attention_fused_set_fp32(enable));
}
