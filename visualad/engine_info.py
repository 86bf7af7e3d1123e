"""What the C engine found on this CPU and which kernels each precision runs on."""
from __future__ import annotations

from . import _engine

PRECISIONS = ("fp32", "bf16")

_LINEAR = {"avx512f": "AVX-512F 6x64 panel kernel (fp32 weights packed once)",
           "openblas": "OpenBLAS sgemm per weight panel",
           "avx512bf16": "AVX512-BF16 vdpbf16ps 6x64 panel kernel (bf16 weights packed once, fp32 accumulation)"}
_ATTENTION = {"avx512f": "fused flash-style attention, AVX-512F",
              "openblas": "OpenBLAS per head (query blocks of 256 rows)",
              "avx512bf16": "fused flash-style attention, AVX512-BF16 (bf16 QK^T and PV, fp32 softmax)"}


def engine_info() -> dict:
    """The CPU features the engine probed (CPUID, XGETBV and, on Linux, the AMX tile permission)
    and, per precision, the kernel family of the backbone's linear layers and attention, or why the
    precision cannot run here. AMX tiles are detected and reported but no AMX kernel is built yet:
    bf16 runs on AVX512-BF16 wherever it runs.

    >>> visualad.engine_info()["precisions"]["bf16"]["kernel"]   # e.g. 'avx512bf16' or 'none'
    """
    features = _engine.cpu_features()
    precisions = {}
    for name in PRECISIONS:
        kernel = _engine.precision_kernel(name)
        if kernel == "none":
            precisions[name] = {"kernel": "none", "available": False,
                                "reason": "needs AVX512-BF16 (vdpbf16ps), which this CPU or OS does not offer"}
        else:
            precisions[name] = {"kernel": kernel, "available": True, "linear": _LINEAR[kernel],
                                "attention": _ATTENTION[kernel]}
    return {"cpu_features": features, "amx_kernel": False, "precisions": precisions}
