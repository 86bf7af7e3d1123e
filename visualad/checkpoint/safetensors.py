"""safetensors files: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
data section, each tensor row-major little-endian at ``[begin, end)`` relative to its start.

Every header field is checked before any data is read: the header length against the file, the
dtype strings, shapes, and that offsets lie inside the data section, match the shape and do not
overlap.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from ..errors import CheckpointError
from ..limits import MAX_JSON_BYTES, MAX_TENSOR_DIMS
from .describe import describe
from .dtypes import SAFETENSORS_DTYPES, safetensors_name
from .lazy import LazyTensor, Storage, to_numpy

MAX_FILE_OFFSET = 1 << 62  # no file is larger
MAX_HEADER_BYTES = MAX_JSON_BYTES  # real headers are far smaller (ViT-g: ~0.1 MB)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_FILE_OFFSET


def read_header(path: str) -> tuple[dict, dict, int, int]:
    """``(entries, metadata, data_start, data_len)`` of a safetensors file, fully validated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: file too short for a safetensors header ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header length {n} exceeds {MAX_HEADER_BYTES} bytes")
        if 8 + n > size:
            raise CheckpointError(f"{path}: safetensors header length {n} runs past the end of the "
                                  f"file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({describe(str(exc))})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors '__metadata__' must be an object of strings")
    data_start, data_len = 8 + n, size - 8 - n
    entries = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: tensor '{name}' needs exactly dtype, shape and data_offsets")
        etype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if etype is None:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {describe(entry['dtype'])}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed shape {describe(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise CheckpointError(f"{path}: tensor '{name}' has malformed data_offsets {describe(offsets)}")
        begin, end = offsets
        if end > data_len:
            raise CheckpointError(f"{path}: tensor '{name}' data_offsets {offsets} lie outside the data "
                                  f"section of {data_len} bytes")
        if end - begin != math.prod(shape) * etype.itemsize:
            raise CheckpointError(f"{path}: tensor '{name}' of shape {shape} and dtype {entry['dtype']} needs "
                                  f"{math.prod(shape) * etype.itemsize} bytes, data_offsets span {end - begin}")
        entries[name] = (etype, tuple(shape), begin, end)
    spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointError(f"{path}: tensors '{prev}' and '{name}' overlap in the data section")
    return entries, metadata, data_start, data_len


def open_safetensors(path: str) -> tuple[OrderedDict, dict]:
    """``(tensors, metadata)``: the tensors of a safetensors file as :class:`LazyTensor` (in file
    order) and the ``__metadata__`` strings."""
    entries, metadata, data_start, _ = read_header(path)
    tensors = OrderedDict()
    for name, (etype, shape, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        storage = Storage(end - begin, f"{path}:{name}")
        storage.attach(path, data_start + begin)
        strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        tensors[name] = LazyTensor(storage, etype, 0, shape, strides)
    return tensors, metadata


def read_safetensors(path: str) -> tuple[dict, dict]:
    """``(arrays, metadata)``: every tensor of a safetensors file as a NumPy array in its own
    dtype (bfloat16 -> float32), and the ``__metadata__`` strings."""
    tensors, metadata = open_safetensors(path)
    return {name: t.numpy() for name, t in tensors.items()}, metadata


def save_safetensors(path: str, tensors: Mapping, metadata: Mapping | None = None) -> None:
    """Writes ``{name: array}`` (any NumPy numeric dtype, stored little-endian) and optional
    ``{str: str}`` metadata as a safetensors file readable by the reference library."""
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    arrays, offset = [], 0
    for name, value in tensors.items():
        arr = np.ascontiguousarray(to_numpy(value))
        dtype = safetensors_name(arr.dtype)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        header[str(name)] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        arrays.append(arr)
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for arr in arrays:
            f.write(memoryview(arr).cast("B"))
