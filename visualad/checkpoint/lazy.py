"""Tensors that stay in their file until asked for.

Readers describe every tensor as a :class:`LazyTensor` (element type, shape, strides, offset into a
:class:`Storage`, i.e. a byte run of the file). Name conversion builds :class:`Reshaped` and
:class:`Concatenated` on top of them. Reading a tensor reads exactly its bytes from the file straight
into the array it returns (``readinto``), so loading a checkpoint holds one copy of the weights plus
one tensor in transit, never the whole file a second time.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import CheckpointError
from ..limits import MAX_TENSOR_DIMS, MAX_TENSOR_ELEMENTS
from .describe import describe
from .dtypes import ElementType


class Storage:
    """A run of ``nbytes`` bytes of a checkpoint file holding one torch storage or one safetensors
    tensor, stored in ``byteorder``. ``where`` names it in error messages. The file position may be
    attached after creation (the legacy torch format stores data after the pickle)."""

    def __init__(self, nbytes: int, where: str, byteorder: str = "<"):
        self.nbytes = int(nbytes)
        self.where = where
        self.byteorder = byteorder
        self.path: str | None = None
        self.offset = 0

    def attach(self, path: str, offset: int) -> None:
        """Places the storage at byte ``offset`` of ``path``; the caller has checked the file is
        long enough."""
        self.path, self.offset = path, int(offset)

    def read_into(self, byte_start: int, out: np.ndarray) -> None:
        """Fills the C-contiguous array ``out`` with the bytes starting at ``byte_start``."""
        view = memoryview(out).cast("B")
        if self.path is None:
            raise CheckpointError(f"{self.where}: storage has no data in the file")
        if byte_start < 0 or byte_start + view.nbytes > self.nbytes:
            raise CheckpointError(f"{self.where}: read of {view.nbytes} bytes at {byte_start} "
                                  f"exceeds the storage size {self.nbytes}")
        with open(self.path, "rb") as f:
            f.seek(self.offset + byte_start)
            got = f.readinto(view)
        if got != view.nbytes:
            raise CheckpointError(f"{self.where}: file {self.path} is truncated "
                                  f"(wanted {view.nbytes} bytes at {self.offset + byte_start}, got {got})")


def _ints(values, what: str, where: str) -> tuple:
    if not isinstance(values, (tuple, list)) or len(values) > MAX_TENSOR_DIMS or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TENSOR_ELEMENTS for v in values):
        raise CheckpointError(f"{where}: tensor {what} must be a sequence of non-negative ints (at most "
                              f"{MAX_TENSOR_DIMS}, each <= {MAX_TENSOR_ELEMENTS}), got {describe(values)}")
    return tuple(values)


class LazyTensor:
    """A strided view of elements of type ``etype`` into a :class:`Storage` (torch semantics:
    ``offset`` and ``strides`` count elements). Checked on creation to lie inside the storage."""

    def __init__(self, storage: Storage, etype: ElementType, offset: int, shape, strides):
        where = storage.where
        self.storage, self.etype = storage, etype
        self.shape = _ints(shape, "shape", where)
        self.strides = _ints(strides, "strides", where)
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_TENSOR_ELEMENTS:
            raise CheckpointError(f"{where}: tensor storage offset must be an int in [0, {MAX_TENSOR_ELEMENTS}], "
                                  f"got {describe(offset)}")
        if len(self.strides) != len(self.shape):
            raise CheckpointError(f"{where}: tensor has {len(self.shape)} dims but {len(self.strides)} strides")
        self.offset = offset
        capacity = storage.nbytes // etype.itemsize
        if self.size and offset + self._extent() > capacity:
            raise CheckpointError(
                f"{where}: tensor of shape {self.shape} (strides {self.strides}, offset {offset}) needs "
                f"{offset + self._extent()} elements of {etype.name} but its storage holds {capacity}")
        if self.size > capacity:  # overlapping (e.g. stride-0) views would be materialised much larger
            raise CheckpointError(
                f"{where}: tensor of shape {self.shape} (strides {self.strides}) has {self.size} elements but "
                f"its storage holds only {capacity}; overlapping views are not supported")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def _extent(self) -> int:
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.strides))

    def _contiguous(self) -> bool:
        expected = 1
        for n, s in zip(reversed(self.shape), reversed(self.strides)):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True

    def numpy(self) -> np.ndarray:
        """The tensor as a new C-contiguous array in native byte order (bfloat16 -> float32)."""
        stored = self.etype.stored.newbyteorder(self.storage.byteorder)
        start = self.offset * self.etype.itemsize
        if self.size == 0:
            raw = np.empty(self.shape, stored)
        elif self._contiguous():
            raw = np.empty(self.shape, stored)
            self.storage.read_into(start, raw)
        else:
            span = np.empty(self._extent(), stored)
            self.storage.read_into(start, span)
            strides = tuple(s * self.etype.itemsize for s in self.strides)
            raw = np.lib.stride_tricks.as_strided(span, self.shape, strides).copy()
        return self.etype.decode(raw)


class Reshaped:
    """``source`` with another shape of the same size (e.g. timm's [1,1,D] class token -> [D])."""

    def __init__(self, source, shape: tuple):
        if math.prod(shape) != math.prod(shape_of(source)):
            raise CheckpointError(f"cannot view a tensor of shape {shape_of(source)} as {shape}")
        self.source, self.shape = source, tuple(shape)

    def numpy(self) -> np.ndarray:
        return to_numpy(self.source).reshape(self.shape)


class Concatenated:
    """Tensors joined along ``axis`` (e.g. separate q, k, v projections packed into one)."""

    def __init__(self, parts: list, axis: int, where: str):
        shapes = [shape_of(p) for p in parts]
        rest = {s[:axis] + s[axis + 1:] for s in shapes}
        if len(rest) != 1 or any(len(s) <= axis for s in shapes):
            raise CheckpointError(f"{where}: cannot concatenate tensors of shapes {shapes} along axis {axis}")
        first = shapes[0]
        self.parts, self.axis = parts, axis
        self.shape = first[:axis] + (sum(s[axis] for s in shapes),) + first[axis + 1:]

    def numpy(self) -> np.ndarray:
        return np.concatenate([to_numpy(p) for p in self.parts], axis=self.axis)


def shape_of(x) -> tuple:
    """Shape of an array or a lazy tensor."""
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def is_floating(x) -> bool:
    """True when ``x`` (array or lazy tensor) holds floating-point numbers."""
    if isinstance(x, LazyTensor):
        return x.etype.is_float
    if isinstance(x, Reshaped):
        return is_floating(x.source)
    if isinstance(x, Concatenated):
        return all(is_floating(p) for p in x.parts)
    return np.asarray(x).dtype.kind == "f"


def to_numpy(x) -> np.ndarray:
    """Reads a lazy tensor (native element type); arrays pass through."""
    return x.numpy() if isinstance(x, (LazyTensor, Reshaped, Concatenated)) else np.asarray(x)


def to_float32(x) -> np.ndarray:
    """A float32 C-contiguous array of ``x`` (array or lazy tensor; float16/bfloat16 widen exactly).
    Raises :class:`CheckpointError` for non-floating tensors."""
    arr = to_numpy(x)
    if arr.dtype.kind != "f":
        raise CheckpointError(f"expected a floating-point tensor, got {arr.dtype}")
    return np.asarray(arr, dtype=np.float32, order="C")
