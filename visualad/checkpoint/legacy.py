"""The legacy (pre-zip) torch format: ``torch.save(..., _use_new_zipfile_serialization=False)``.

The file is a run of pickles followed by raw storage data:
magic number, protocol version (1001), system info (byte order), the object (storages as persistent
ids ``('storage', StorageClass, key, location, numel, view)``), the list of storage keys, then for
each key in that order an int64 element count and the elements. The much older tar-based format
and storage views (PyTorch < 1.0) are refused.
"""
from __future__ import annotations

import os
import struct

from ..errors import CheckpointError
from .dtypes import ElementType
from .lazy import Storage
from .unpickler import unpickle

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL = 1001


def read_torch_legacy(path: str):
    """Unpickles the object of a legacy torch file; tensors come back as :class:`LazyTensor`."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        if unpickle(f, path) != _MAGIC:
            raise CheckpointError(f"{path}: a pickle file, but not a torch checkpoint (bad magic number)")
        if unpickle(f, path) != _PROTOCOL:
            raise CheckpointError(f"{path}: unsupported legacy torch protocol version")
        info = unpickle(f, path)
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: malformed system info in legacy torch file")
        order = "<" if info.get("little_endian", True) else ">"
        declared: dict[str, tuple[Storage, ElementType, int]] = {}

        def resolve(etype: ElementType, key: str, numel: int, extra: tuple) -> Storage:
            if len(extra) != 1 or extra[0] is not None:
                raise CheckpointError(f"{path}: storage views of PyTorch < 1.0 files are not supported")
            storage = Storage(numel * etype.itemsize, f"{path}:storage {key}", order)
            declared[key] = (storage, etype, numel)
            return storage

        root = unpickle(f, path, resolve)
        keys = unpickle(f, path)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointError(f"{path}: malformed storage key list in legacy torch file")
        offset = f.tell()
        count = struct.Struct(order + "q")
        for key in keys:
            if key not in declared:
                raise CheckpointError(f"{path}: data for storage '{key}' that no tensor uses")
            storage, etype, numel = declared[key]
            f.seek(offset)
            header = f.read(count.size)
            if len(header) != count.size:
                raise CheckpointError(f"{path}: file is truncated before storage '{key}'")
            if count.unpack(header)[0] != numel:
                raise CheckpointError(f"{path}: storage '{key}' holds {count.unpack(header)[0]} elements, "
                                      f"the pickle declares {numel}")
            storage.attach(path, offset + count.size)
            offset += count.size + storage.nbytes
            if offset > file_size:
                raise CheckpointError(f"{path}: file is truncated inside storage '{key}' ({etype.name})")
        missing = sorted(set(declared) - set(keys))
        if missing:
            raise CheckpointError(f"{path}: no data for storage(s) {missing}")
    return root
