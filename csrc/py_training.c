/* Training entry points: Head.loss_and_grad (csrc/head_train.h), AdamW, clipping, the schedule. */
#include "py_glue.h"

#include <math.h>

#include "adamw.h"
#include "errors.h"
#include "head_train.h"

PyObject *Head_loss_and_grad(HeadObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"feats", "anomaly_token", "normal_token", "image_size", "labels", "masks",
                             "has_mask", "topk", "dropout", "seed", "grad", "layer_maps", NULL};
    PyObject *feats_obj, *ta_obj, *tn_obj, *labels_obj, *masks_obj, *has_obj, *grad_obj = Py_None,
             *maps_obj = Py_None;
    int S, topk;
    double dropout = 0.0;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOiOOOi|dKOO", kwlist, &feats_obj, &ta_obj, &tn_obj, &S,
                                     &labels_obj, &masks_obj, &has_obj, &topk, &dropout, &seed, &grad_obj,
                                     &maps_obj))
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
    PyArrayObject *feats[VAD_MAX_LAYERS] = {0}, *ta = NULL, *tn = NULL, *labels = NULL, *masks = NULL,
                  *has = NULL;
    PyObject *grad = NULL, *dfeats = NULL, *dta = NULL, *dtn = NULL, *result = NULL;
    const float *fptr[VAD_MAX_LAYERS];
    float *dptr[VAD_MAX_LAYERS];
    if (parse_layer_inputs(c->n_layers, c->width, feats_obj, ta_obj, tn_obj, feats, fptr, &ta, &tn, &B, &N))
        return NULL;
    int g;
    if (head_grid(N, S, topk, &g)) goto done;
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
    float *layer_maps = NULL;
    if (maps_obj != Py_None) {
        if (inplace_vector_nd(maps_obj, "layer_maps", 4)) goto done;
        npy_intp *md = PyArray_DIMS((PyArrayObject *)maps_obj);
        if (md[0] != L || md[1] != B || md[2] != S || md[3] != S) {
            PyErr_Format(PyExc_ValueError, "layer_maps must have shape (%d, %d, %d, %d)", L, B, S, S);
            goto done;
        }
        layer_maps = (float *)PyArray_DATA((PyArrayObject *)maps_obj);
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
    vad_head_batch batch = {fptr, (const float *)PyArray_DATA(ta), (const float *)PyArray_DATA(tn), B, g, S};
    vad_train_params tp = vad_train_default_params();
    tp.labels = (const float *)PyArray_DATA(labels);
    tp.masks = masks ? (const float *)PyArray_DATA(masks) : NULL;
    tp.has_mask = has ? (const unsigned char *)PyArray_DATA(has) : NULL;
    tp.topk = topk;
    tp.dropout = (float)dropout;
    tp.seed = (uint64_t)seed;
    tp.layer_maps = layer_maps;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    rc = vad_head_loss_and_grad(self->head, &batch, &tp, losses, (float *)PyArray_DATA((PyArrayObject *)grad), dptr,
                                (float *)PyArray_DATA((PyArrayObject *)dta), (float *)PyArray_DATA((PyArrayObject *)dtn));
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

PyObject *py_adamw_step(PyObject *self, PyObject *args, PyObject *kwds) {
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

PyObject *py_clip_grad_norm(PyObject *self, PyObject *args) {
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

PyObject *py_cosine_annealing_lr(PyObject *self, PyObject *args) {
    (void)self;
    double base, eta_min;
    int epoch, t_max;
    if (!PyArg_ParseTuple(args, "ddii", &base, &eta_min, &epoch, &t_max)) return NULL;
    return PyFloat_FromDouble(vad_cosine_annealing_lr(base, eta_min, epoch, t_max));
}
