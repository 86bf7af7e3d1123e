"""Unpickling torch checkpoints through an allow-list, executing nothing from the file.

A torch pickle names a handful of globals: ``collections.OrderedDict``, the tensor-rebuilding
functions of ``torch._utils``, storage classes (``torch.FloatStorage`` ...), dtypes, ``torch.Size``,
and in TorchScript archives the list builders of ``torch.jit._pickle`` and the module classes
``__torch__.*``. Each is replaced here by a harmless stand-in that builds :class:`LazyTensor` s or
plain containers; any other global raises :class:`CheckpointError` before anything runs.
Storages arrive as persistent ids ``('storage', StorageClass, key, location, numel[, view])``
and are resolved by the container (zip archive or legacy file) through a callback.
"""
from __future__ import annotations

import collections
import pickle
from typing import BinaryIO, Callable

from ..errors import CheckpointError
from .dtypes import TORCH_DTYPES, TORCH_STORAGES, ElementType
from .lazy import LazyTensor, Storage


class _BadContent(Exception):
    """A stand-in got arguments no torch pickle would give it (reported with the file's name)."""


class TorchScriptObject:
    """An instance of a TorchScript class (``__torch__.*``, e.g. a scripted ``nn.Module``),
    kept only as the dict of its attributes."""

    attributes: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _BadContent(f"TorchScript object state must be a dict, got {type(state).__name__}")
        self.attributes = dict(state)


class StorageClass:
    """Stand-in for ``torch.FloatStorage`` and friends: only records the element type."""

    def __init__(self, etype: ElementType):
        self.etype = etype


class TypedStorage:
    """A storage as seen by the pickle: the bytes plus the element type the pickle gave them."""

    def __init__(self, storage: Storage, etype: ElementType):
        self.storage, self.etype = storage, etype

    @property
    def numel(self) -> int:
        return self.storage.nbytes // self.etype.itemsize


def _typed(storage, fn: str) -> TypedStorage:
    if not isinstance(storage, TypedStorage):
        raise _BadContent(f"{fn} expects a storage, got {type(storage).__name__}")
    return storage


def _no_metadata(metadata) -> None:
    if metadata:
        raise _BadContent(f"tensors with conjugate/negative bits are not supported ({metadata!r})")


def _rebuild_tensor(storage, offset, size, stride):
    s = _typed(storage, "_rebuild_tensor")
    return LazyTensor(s.storage, s.etype, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    _no_metadata(metadata)
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _no_metadata(metadata)
    if not isinstance(dtype, ElementType):
        raise _BadContent(f"_rebuild_tensor_v3 expects a dtype, got {type(dtype).__name__}")
    return LazyTensor(_typed(storage, "_rebuild_tensor_v3").storage, dtype, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, LazyTensor):
        raise _BadContent(f"_rebuild_parameter expects a tensor, got {type(data).__name__}")
    return data


def _latin1_bytes(text, encoding):
    # protocol-2 pickles write bytes objects as _codecs.encode(str, 'latin1')
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _BadContent(f"_codecs.encode is only allowed for latin1 text, got {encoding!r}")
    return text.encode("latin1")


def _as_list(data):
    return list(data)


def _restore_type_tag(value, type_str):
    return value


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("torch.jit._pickle", "build_intlist"): _as_list,
    ("torch.jit._pickle", "build_doublelist"): _as_list,
    ("torch.jit._pickle", "build_boollist"): _as_list,
    ("torch.jit._pickle", "build_tensorlist"): _as_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("_codecs", "encode"): _latin1_bytes,
}
_ALLOWED.update({("torch", name): StorageClass(et) for name, et in TORCH_STORAGES.items()})
_ALLOWED[("torch.storage", "UntypedStorage")] = _ALLOWED[("torch", "UntypedStorage")]  # v3 tensors
_ALLOWED.update({("torch", name): et for name, et in TORCH_DTYPES.items()})

# resolve(etype, key, numel, extra) -> Storage; extra is what follows numel in the persistent id
StorageResolver = Callable[[ElementType, str, int, tuple], Storage]


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, stream: BinaryIO, where: str, resolve: StorageResolver | None):
        super().__init__(stream, encoding="utf-8")  # str of Python 2 pickles, as torch.load
        self._where, self._resolve = where, resolve
        self._storages: dict[str, TypedStorage] = {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return TorchScriptObject
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._where}: refusing to unpickle global '{module}.{name}': only tensor-rebuilding "
                "globals are allowed, a checkpoint must never run code") from None

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
                or not isinstance(pid[1], StorageClass) or not isinstance(pid[2], (str, int))
                or not isinstance(pid[4], int) or pid[4] < 0):
            raise CheckpointError(f"{self._where}: malformed storage reference {pid!r}")
        if self._resolve is None:
            raise CheckpointError(f"{self._where}: unexpected storage reference {pid!r}")
        etype, key, numel = pid[1].etype, str(pid[2]), pid[4]
        if key not in self._storages:
            self._storages[key] = TypedStorage(self._resolve(etype, key, numel, pid[5:]), etype)
        return self._storages[key]


def unpickle(stream: BinaryIO, where: str, resolve: StorageResolver | None = None):
    """Unpickles one pickle from the binary file ``stream`` (left just after it) through the
    allow-list. Tensors become :class:`LazyTensor`, TorchScript
    objects :class:`TorchScriptObject`. Every failure is a :class:`CheckpointError` naming ``where``."""
    try:
        return _RestrictedUnpickler(stream, where, resolve).load()
    except CheckpointError:
        raise
    except _BadContent as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{where}: pickle is nested too deeply") from None
    except Exception as exc:  # any malformed pickle: EOFError, UnpicklingError, TypeError, ...
        raise CheckpointError(f"{where}: corrupt pickle ({type(exc).__name__}: {exc})") from None
