/* The extension module visualad._engine: the method table and the module set-up. The functions
 * live in the glue files by concern (csrc/py_*.c); csrc/py_glue.h declares them. */
#define VAD_GLUE_IMPORTS_NUMPY
#include "py_glue.h"

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
    {"limits", py_limits, METH_NOARGS,
     "limits() -> {name: int}: the engine's size limits (csrc/vad_limits.h), mirrored by visualad.limits."},
    {"set_simd_gemm", py_set_simd_gemm, METH_O,
     "set_simd_gemm(enable) -> previous: True runs the backbone's linear layers on the AVX-512 kernel when\n"
     "the CPU has it (the default), False sends them through BLAS sgemm panel by panel (process-wide)."},
    {"simd_gemm_active", py_simd_gemm_active, METH_NOARGS,
     "simd_gemm_active() -> True when the backbone's linear layers run on the AVX-512 kernel."},
    {"cpu_features", py_cpu_features, METH_NOARGS,
     "cpu_features() -> dict of the CPU / OS features the engine probed (CPUID, XGETBV, Linux AMX permission)."},
    {"precision_kernel", py_precision_kernel, METH_VARARGS,
     "precision_kernel('fp32' | 'bf16') -> the kernel family that precision runs on here ('none' if it cannot)."},
    {"set_fused_attention", py_set_fused_attention, METH_O,
     "set_fused_attention(enable) -> previous: True (the default) runs fp32 attention on the fused AVX-512\n"
     "kernel when the CPU has it, False on the per-head BLAS path (process-wide; for comparisons)."},
    {"head_layout", py_head_layout, METH_O,
     "head_layout(config) -> ([(name, shape, offset, panel), ...], total_floats): the head buffer layout\n"
     "(every panel is 0: row-major)."},
    {"adamw_step", (PyCFunction)(void (*)(void))py_adamw_step, METH_VARARGS | METH_KEYWORDS,
     "adamw_step(params, grads, exp_avg, exp_avg_sq, segments, step, beta1=0.9, beta2=0.999, eps=1e-8,\n"
     "num_threads=1) -> None. One torch.optim.AdamW step (t = step, from 1) in place on the 1-D float32\n"
     "buffers params / exp_avg / exp_avg_sq; segments = [(offset, size, lr, weight_decay), ...]."},
    {"clip_grad_norm", py_clip_grad_norm, METH_VARARGS,
     "clip_grad_norm(grad, max_norm) -> norm before clipping; grad (1-D float32, e.g. a slice of the\n"
     "gradient buffer) *= min(1, max_norm / (norm + 1e-6)) in place (left as is when norm is NaN/Inf)."},
    {"cosine_annealing_lr", py_cosine_annealing_lr, METH_VARARGS,
     "cosine_annealing_lr(base_lr, eta_min, epoch, t_max) -> eta_min + (base-eta_min)(1+cos(pi epoch/t_max))/2"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "visualad._engine",
    .m_doc = "VisualAD C engine (the testing submodule holds the test-only entry points).",
    .m_size = -1,
    .m_methods = module_methods,
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
    /* the engine's enums, so that Python never restates their values */
    if (PyModule_AddIntConstant(m, "ACT_QUICK_GELU", VAD_ACT_QUICK_GELU) < 0 ||
        PyModule_AddIntConstant(m, "ACT_GELU", VAD_ACT_GELU) < 0 ||
        PyModule_AddIntConstant(m, "ACT_SWIGLU", VAD_ACT_SWIGLU) < 0 ||
        PyModule_AddIntConstant(m, "POS_BILINEAR", VAD_POS_BILINEAR) < 0 ||
        PyModule_AddIntConstant(m, "POS_BICUBIC_SCALE", VAD_POS_BICUBIC_SCALE) < 0 ||
        PyModule_AddIntConstant(m, "POS_BICUBIC_AA", VAD_POS_BICUBIC_AA) < 0 ||
        PyModule_AddIntConstant(m, "POS_BICUBIC_SIZE", VAD_POS_BICUBIC_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *testing = vad_testing_module();
    if (!testing || PyModule_AddObject(m, "testing", testing) < 0) {
        Py_XDECREF(testing);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
