/* Metrics entry points (csrc/metrics.h). */
#include "py_glue.h"

#include "metrics.h"

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

PyObject *py_binary_metrics(PyObject *self, PyObject *args) {
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

PyObject *py_aupro(PyObject *self, PyObject *args) {
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

PyObject *py_aupro_anomalyclip(PyObject *self, PyObject *args) {
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
