"""Unpickling torch checkpoints through an allow-list, executing nothing from the file.

A torch pickle names a handful of globals: ``collections.OrderedDict``, the tensor-rebuilding
functions of ``torch._utils``, storage classes (``torch.FloatStorage`` ...), dtypes, ``torch.Size``,
and in TorchScript archives the list builders of ``torch.jit._pickle`` and the module classes
``__torch__.*``. Each is replaced here by a harmless stand-in that builds :class:`LazyTensor` s or
plain containers; any other global raises :class:`CheckpointError` before anything runs.
Storages arrive as persistent ids ``('storage', StorageClass, key, location, numel[, view])``
and are resolved by the container (zip archive or legacy file) through a callback.

The pickle machine is Python's own pure-Python one, restricted further: no opcode may change an
object it did not build as a plain container (BUILD only on TorchScript instances and OrderedDicts, SETITEM(S) only
on dicts, APPEND(S) only on lists, ADDITEMS only on sets), so nothing an allowed global returns can
be altered by one file and seen by the next; dict keys and set items must be plain scalars (no
hashing of hostile nested tuples); memo indices are dict keys (a huge index costs nothing); and no
read may ask for more bytes than the stream has left (checked before anything is allocated).
"""
from __future__ import annotations

import collections
import io
import pickle
import types
from typing import BinaryIO, Callable

from ..errors import CheckpointError
from .describe import describe
from .dtypes import TORCH_DTYPES, TORCH_STORAGES, ElementType
from .lazy import LazyTensor, Storage


class _BadContent(Exception):
    """A stand-in got arguments no torch pickle would give it (reported with the file's name)."""


class TorchScriptObject:
    """An instance of a TorchScript class (``__torch__.*``, e.g. a scripted ``nn.Module``),
    kept only as the dict of its attributes."""

    attributes = types.MappingProxyType({})  # read-only until the pickle's BUILD gives the state

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _BadContent(f"TorchScript object state must be a dict, got {type(state).__name__}")
        self.attributes = dict(state)


class StorageClass:
    """Stand-in for ``torch.FloatStorage`` and friends: only records the element type (shared by
    every file, so it is immutable)."""

    __slots__ = ("etype",)

    def __init__(self, etype: ElementType):
        object.__setattr__(self, "etype", etype)

    def __setattr__(self, name, value):
        raise AttributeError("storage classes are immutable")


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
        raise _BadContent(f"tensors with conjugate/negative bits are not supported ({describe(metadata)})")


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
        raise _BadContent(f"_codecs.encode is only allowed for latin1 text, got {describe(encoding)}")
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


_SCALARS = (str, int, float, bool, bytes, type(None))


class _Bounded:
    """``read`` / ``readline`` of a binary stream that refuse, before reading, to go more than
    ``limit`` bytes past where they started (a pickle cannot make the reader allocate more than
    its stream holds)."""

    def __init__(self, stream: BinaryIO, limit: int):
        self._stream, self._left = stream, int(limit)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._left
        if n > self._left:
            raise _BadContent(f"corrupt pickle (truncated: wants {n} bytes, only {self._left} remain)")
        data = self._stream.read(n)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._stream.readline(self._left)
        self._left -= len(line)
        return line


class _RestrictedUnpickler(pickle._Unpickler):
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, stream, where: str, resolve: StorageResolver | None):
        super().__init__(stream, encoding="utf-8")  # str of Python 2 pickles, as torch.load
        self._where, self._resolve = where, resolve
        self._storages: dict[str, TypedStorage] = {}

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise _BadContent("global names must be strings")
        if module == "__torch__" or module.startswith("__torch__."):
            return TorchScriptObject
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._where}: refusing to unpickle global '{module[:100]}.{name[:100]}': only "
                "tensor-rebuilding globals are allowed, a checkpoint must never run code") from None

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
                or not isinstance(pid[1], StorageClass) or not isinstance(pid[2], (str, int))
                or isinstance(pid[2], bool) or not isinstance(pid[4], int) or isinstance(pid[4], bool)
                or not 0 <= pid[4] < 1 << 62 or (isinstance(pid[2], int) and not 0 <= pid[2] < 1 << 62)):
            raise CheckpointError(f"{self._where}: malformed storage reference {describe(pid)}")
        if self._resolve is None:
            raise CheckpointError(f"{self._where}: unexpected storage reference {describe(pid)}")
        etype, key, numel = pid[1].etype, str(pid[2]), pid[4]
        if key not in self._storages:
            self._storages[key] = TypedStorage(self._resolve(etype, key, numel, pid[5:]), etype)
        return self._storages[key]

    # ---- opcodes that change an existing object: only on what the pickle built as a plain container
    def _target(self, kinds: tuple, op: str):
        target = self.stack[-1]
        if type(target) not in kinds:
            raise _BadContent(f"{op} on a {type(target).__name__} is not allowed")
        return target

    @staticmethod
    def _scalar(key, op: str):
        if type(key) not in _SCALARS:
            raise _BadContent(f"{op}: keys must be str, int, float, bytes, bool or None, got {type(key).__name__}")
        return key

    def load_build(self):
        state = self.stack.pop()
        target = self._target((TorchScriptObject, collections.OrderedDict), "BUILD")
        if type(target) is TorchScriptObject:
            target.__setstate__(state)
            return
        # torch state dicts carry their '_metadata' as instance attributes of the (fresh) OrderedDict
        if not isinstance(state, dict) or not all(type(k) is str for k in state):
            raise _BadContent(f"BUILD of an OrderedDict needs a dict of attributes, got {type(state).__name__}")
        target.__dict__.update(state)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._target((dict, collections.OrderedDict), "SETITEM")[self._scalar(key, "SETITEM")] = value

    def load_setitems(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise _BadContent("SETITEMS with an odd number of items")
        target = self._target((dict, collections.OrderedDict), "SETITEMS")
        for i in range(0, len(items), 2):
            target[self._scalar(items[i], "SETITEMS")] = items[i + 1]

    def load_append(self):
        value = self.stack.pop()
        self._target((list,), "APPEND").append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)

    def load_additems(self):
        items = self.pop_mark()
        self._target((set,), "ADDITEMS").update(self._scalar(v, "ADDITEMS") for v in items)

    def load_frozenset(self):
        items = self.pop_mark()
        self.append(frozenset(self._scalar(v, "FROZENSET") for v in items))

    def load_bytearray8(self):
        raise _BadContent("BYTEARRAY8 (pickle protocol 5 buffers) does not occur in torch files")

    for _name, _op in (("load_build", pickle.BUILD), ("load_setitem", pickle.SETITEM),
                       ("load_setitems", pickle.SETITEMS), ("load_append", pickle.APPEND),
                       ("load_appends", pickle.APPENDS), ("load_additems", pickle.ADDITEMS),
                       ("load_frozenset", pickle.FROZENSET), ("load_bytearray8", pickle.BYTEARRAY8)):
        dispatch[_op[0]] = locals()[_name]
    del _name, _op


def unpickle(stream: BinaryIO, where: str, resolve: StorageResolver | None = None):
    """Unpickles one pickle from the binary file ``stream`` (left just after it) through the
    allow-list; no read may go past the end of the stream. Tensors become :class:`LazyTensor`,
    TorchScript objects :class:`TorchScriptObject`. Every failure is a :class:`CheckpointError`
    naming ``where``."""
    if not isinstance(stream, io.BytesIO):  # an in-memory stream never returns more than it holds
        here = stream.tell()
        left = stream.seek(0, 2) - here
        stream.seek(here)
        stream = _Bounded(stream, left)
    try:
        return _RestrictedUnpickler(stream, where, resolve).load()
    except CheckpointError:
        raise
    except _BadContent as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{where}: pickle is nested too deeply") from None
    except MemoryError:
        raise CheckpointError(f"{where}: pickle needs more memory than is available") from None
    except Exception as exc:  # any malformed pickle: EOFError, UnpicklingError, TypeError, ...
        raise CheckpointError(f"{where}: corrupt pickle ({type(exc).__name__}: {_text(exc)})") from None


def _text(exc: BaseException) -> str:
    try:  # str() of an exception about a hostile value may itself fail (e.g. a 5000-digit int)
        return describe(str(exc))
    except Exception:
        return "?"
