"""Writing ``torch.save``-compatible zip files without PyTorch (for the official head layout).

The file holds what ``torch.save`` writes for a dict of tensors: ``<name>/data.pkl`` (pickle
protocol 2; tensors as ``torch._utils._rebuild_tensor_v2`` over persistent storage ids
``('storage', torch.FloatStorage, key, 'cpu', numel)``), ``<name>/data/<key>`` (raw little-endian
bytes), ``<name>/version`` and ``<name>/byteorder``. Only globals that ``torch.load``'s
``weights_only`` mode accepts are used, so the default ``torch.load(path)`` reads it.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile

import numpy as np

from .._files import atomic_write

_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
            np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
            np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage"}


class _Global:
    """A module-level name written as a pickle GLOBAL without importing it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce only accepts callables; never called
        raise TypeError(f"{self.module}.{self.name} is a pickle reference, not a function")


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = _Global("collections", "OrderedDict")


class _Tensor:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us write GLOBALs by name
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, tensors: list):
        super().__init__(file, protocol=2)
        self.tensors = tensors

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _Global("torch", _STORAGE[obj.dtype]), obj.key, "cpu", obj.numel)
        return None

    def save_global(self, obj, name=None):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            arr = np.ascontiguousarray(obj)
            if arr.dtype not in _STORAGE:
                raise TypeError(f"cannot save arrays of dtype {arr.dtype} as torch tensors")
            key = str(len(self.tensors))
            self.tensors.append((key, arr))
            stride = tuple(s // arr.itemsize for s in arr.strides) if arr.ndim else ()
            storage = _Storage(key, arr.dtype, arr.size)
            return (_REBUILD, (storage, 0, tuple(arr.shape), stride, False, _EmptyOrderedDict()))
        if isinstance(obj, _EmptyOrderedDict):
            return (_ORDERED_DICT, ())
        return NotImplemented


_Pickler.dispatch[_Global] = lambda self, obj: self.save_global(obj)


class _Storage:
    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _EmptyOrderedDict:
    pass


def _plain(obj):
    """NumPy scalars -> Python scalars, tuples kept, dicts/lists walked (arrays left as arrays)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_torch_zip(path, obj) -> None:
    """Writes `obj` (dicts, lists, str, int, float, bool, None and NumPy arrays) so that
    ``torch.load(path)`` returns the same structure with tensors. Atomic (temp file + rename)."""
    tensors: list = []
    buf = io.BytesIO()
    _Pickler(buf, tensors).dump(_plain(obj))
    root = os.path.splitext(os.path.basename(os.fspath(path)))[0] or "archive"

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr(f"{root}/data.pkl", buf.getvalue())
            z.writestr(f"{root}/byteorder", "little")
            for key, arr in tensors:
                z.writestr(f"{root}/data/{key}", arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
            z.writestr(f"{root}/version", "3\n")

    atomic_write(path, write)

