/* The Head type: inference maps and scores (csrc/head.h); its loss_and_grad lives in py_training.c. */
#include "py_glue.h"

#include <math.h>

#include "errors.h"
#include "head.h"

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

static int head_layout(const void *cfg, vad_tensor_entry *entries, int max, size_t *total) {
    return vad_head_layout((const vad_head_config *)cfg, entries, max, total);
}

PyObject *py_head_layout(PyObject *self, PyObject *arg) {
    (void)self;
    vad_head_config cfg;
    if (parse_head_config(arg, &cfg)) return NULL;
    return layout_to_python(head_layout, &cfg);
}

static void Head_dealloc(HeadObject *self) {
    vad_head_free(self->head);
    Py_XDECREF(self->params);
    if (self->lock) PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

int head_grid(int N, int S, int topk, int *g) {
    *g = (int)lround(sqrt((double)N));
    if (*g * *g != N) {
        PyErr_Format(PyExc_ValueError, "feats hold %d patches: expected a square grid", N);
        return -1;
    }
    if (topk < 1 || (int64_t)topk > (int64_t)S * S) {
        PyErr_Format(PyExc_ValueError, "topk %d is outside 1..%d", topk, S * S);
        return -1;
    }
    return 0;
}

static int Head_init(HeadObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"config", "params", "num_threads", NULL};
    PyObject *config, *params;
    int nthreads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O&", kwlist, &config, &params, thread_count, &nthreads))
        return -1;
    if (self->head) {
        PyErr_SetString(PyExc_RuntimeError, "Head is already initialised");
        return -1;
    }
    if (parse_head_config(config, &self->cfg)) return -1;
    size_t total = 0;
    vad_head_layout(&self->cfg, NULL, 0, &total);
    PyArrayObject *p = weight_buffer(params, total, "head params", 1); /* trained in place */
    if (!p) return -1;
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
    PyArrayObject *feats[VAD_MAX_LAYERS] = {0};
    PyArrayObject *ta = NULL, *tn = NULL;
    PyObject *final_maps = NULL, *scores = NULL, *layer_maps = NULL, *tokens = NULL, *result = NULL;
    const float *fptr[VAD_MAX_LAYERS];
    int B = -1, N = -1;
    if (parse_layer_inputs(L, D, feats_obj, ta_obj, tn_obj, feats, fptr, &ta, &tn, &B, &N)) return NULL;
    int g;
    if (head_grid(N, S, topk, &g)) goto done;
    npy_intp mdims[3] = {B, S, S}, sdims[1] = {B}, ldims[4] = {L, B, S, S}, tdims[4] = {L, 2, B, D};
    final_maps = new_float_array(3, mdims);
    scores = new_float_array(1, sdims);
    if (!final_maps || !scores) goto done;
    if (want_layers && !(layer_maps = new_float_array(4, ldims))) goto done;
    if (want_tokens && !(tokens = new_float_array(4, tdims))) goto done;
    vad_head_batch batch = {fptr, (const float *)PyArray_DATA(ta), (const float *)PyArray_DATA(tn), B, g, S};
    vad_maps_params mp = vad_maps_default_params();
    mp.sigma = sigma;
    mp.topk = topk;
    mp.layer_maps = layer_maps ? (float *)PyArray_DATA((PyArrayObject *)layer_maps) : NULL;
    mp.tokens_out = tokens ? (float *)PyArray_DATA((PyArrayObject *)tokens) : NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    rc = vad_head_maps(self->head, &batch, &mp, (float *)PyArray_DATA((PyArrayObject *)final_maps),
                       (float *)PyArray_DATA((PyArrayObject *)scores));
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

PyTypeObject HeadType = VAD_PLAIN_TYPE(
    "Head", HeadObject, Head_dealloc, Head_init,
    "Head(config, params, num_threads=1): the VisualAD head (SCA, SAF, maps, score) in C.",
    {"maps", (PyCFunction)(void (*)(void))Head_maps, METH_VARARGS | METH_KEYWORDS,
     "maps(feats, anomaly_token, normal_token, image_size, sigma, topk, layer_maps=False, tokens=False)\n"
     "-> (final (B,S,S), scores (B,), layer maps (L,B,S,S) or None, SCA tokens (L,2,B,D) or None)"},
    {"loss_and_grad", (PyCFunction)(void (*)(void))Head_loss_and_grad, METH_VARARGS | METH_KEYWORDS,
     "loss_and_grad(feats, anomaly_token, normal_token, image_size, labels, masks, has_mask, topk, dropout=0.0,\n"
     "seed=0, grad=None, layer_maps=None) -> ({'cls', 'seg', 'contrastive', 'total'}, grad (head layout,\n"
     "accumulated into `grad` when given: SAF/SCA entries only), dfeats [(B,N,D)] per layer,\n"
     "d anomaly_token (B,D), d normal_token (B,D)). masks (B,S,S) or None (all normal); has_mask (B,) or\n"
     "None (all 1): images with has_mask 0 skip the segmentation loss. layer_maps: a float32 (L,B,S,S)\n"
     "array that receives the forward's unfiltered per-layer maps. See csrc/head_train.h."});
