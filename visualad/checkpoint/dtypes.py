"""Element types of stored tensors, under the names torch and safetensors give them.

NumPy has no bfloat16: such tensors are read as their raw 16-bit patterns and widened to float32
exactly (a bfloat16 is the upper half of a float32).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ElementType:
    """One element type: its torch name and the little-endian NumPy dtype of its stored bytes."""

    name: str
    stored: np.dtype

    @property
    def itemsize(self) -> int:
        return self.stored.itemsize

    @property
    def is_float(self) -> bool:
        return self.name in ("float16", "bfloat16", "float32", "float64")

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """Turns an array of stored elements (any byte order) into a native-order NumPy array;
        bfloat16 becomes float32."""
        if self.name == "bfloat16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if raw.dtype.isnative:
            return raw
        return raw.astype(raw.dtype.newbyteorder("="))


def _et(name: str, stored: str) -> ElementType:
    return ElementType(name, np.dtype(stored))


FLOAT64, FLOAT32, FLOAT16, BFLOAT16 = _et("float64", "<f8"), _et("float32", "<f4"), _et("float16", "<f2"), \
    _et("bfloat16", "<u2")
INT64, INT32, INT16, INT8 = _et("int64", "<i8"), _et("int32", "<i4"), _et("int16", "<i2"), _et("int8", "i1")
UINT64, UINT32, UINT16, UINT8 = _et("uint64", "<u8"), _et("uint32", "<u4"), _et("uint16", "<u2"), _et("uint8", "u1")
BOOL = _et("bool", "?")
COMPLEX64, COMPLEX128 = _et("complex64", "<c8"), _et("complex128", "<c16")

# Typed storage classes named in torch pickles (``torch.FloatStorage`` ...); UntypedStorage holds bytes.
TORCH_STORAGES = {
    "DoubleStorage": FLOAT64, "FloatStorage": FLOAT32, "HalfStorage": FLOAT16, "BFloat16Storage": BFLOAT16,
    "LongStorage": INT64, "IntStorage": INT32, "ShortStorage": INT16, "CharStorage": INT8,
    "ByteStorage": UINT8, "BoolStorage": BOOL, "ComplexFloatStorage": COMPLEX64,
    "ComplexDoubleStorage": COMPLEX128, "UntypedStorage": UINT8,
}

# ``torch.<dtype>`` globals (``_rebuild_tensor_v3`` names the dtype of a tensor on an untyped storage).
TORCH_DTYPES = {
    "float64": FLOAT64, "double": FLOAT64, "float32": FLOAT32, "float": FLOAT32, "float16": FLOAT16,
    "half": FLOAT16, "bfloat16": BFLOAT16, "int64": INT64, "long": INT64, "int32": INT32, "int": INT32,
    "int16": INT16, "short": INT16, "int8": INT8, "uint8": UINT8, "uint16": UINT16, "uint32": UINT32,
    "uint64": UINT64, "bool": BOOL, "complex64": COMPLEX64, "cfloat": COMPLEX64, "complex128": COMPLEX128,
    "cdouble": COMPLEX128,
}

# dtype strings of the safetensors header.
SAFETENSORS_DTYPES = {
    "F64": FLOAT64, "F32": FLOAT32, "F16": FLOAT16, "BF16": BFLOAT16, "I64": INT64, "I32": INT32,
    "I16": INT16, "I8": INT8, "U64": UINT64, "U32": UINT32, "U16": UINT16, "U8": UINT8, "BOOL": BOOL,
    "C64": COMPLEX64,
}


def safetensors_name(dtype: np.dtype) -> str:
    """The safetensors dtype string for a NumPy dtype (bfloat16 cannot be a NumPy dtype)."""
    dtype = np.dtype(dtype)
    for name, et in SAFETENSORS_DTYPES.items():
        if et.name != "bfloat16" and et.stored.newbyteorder("=") == dtype.newbyteorder("="):
            return name
    raise TypeError(f"no safetensors dtype for NumPy dtype {dtype}")
