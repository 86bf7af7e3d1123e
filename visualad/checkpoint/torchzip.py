"""The zip container of ``torch.save`` (PyTorch >= 1.6) and ``torch.jit.save``.

Layout: one top-level folder (named after the file, ``archive`` or anything else) holding
``data.pkl`` (the pickled object), ``data/<key>`` (one uncompressed member per storage, raw
little-endian elements), ``byteorder`` (optional) and bookkeeping members. Storage members are
located through their local zip headers and read straight from the file, never decompressed or
copied whole.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile

from ..errors import CheckpointError
from .dtypes import ElementType
from .lazy import Storage
from .unpickler import unpickle

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... name length, extra length
_MAX_PICKLE_BYTES = 1 << 30


def _top_folder(names: list[str], path: str) -> str:
    """The prefix ('<folder>/') under which data.pkl lives."""
    if "data.pkl" in names:
        return ""
    tops = sorted({n.split("/", 1)[0] for n in names if "/" in n})
    if len(tops) != 1:
        raise CheckpointError(f"{path}: a torch archive has one top-level folder, found {tops or 'none'}")
    if f"{tops[0]}/data.pkl" not in names:
        raise CheckpointError(f"{path}: torch archive has no '{tops[0]}/data.pkl'")
    return tops[0] + "/"


def _data_offset(f, info: zipfile.ZipInfo, path: str) -> int:
    """File offset of the first byte of a stored member, from its local header."""
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: bad local zip header for member '{info.filename}'")
    fields = _LOCAL_HEADER.unpack(header)
    return info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]


def _byteorder(zf: zipfile.ZipFile, top: str, path: str) -> str:
    try:
        text = zf.read(top + "byteorder").decode("ascii", "replace").strip()
    except KeyError:
        return "<"  # archives from before the member existed are little-endian
    if text not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byteorder {text!r}")
    return "<" if text == "little" else ">"


def read_torch_zip(path: str):
    """Unpickles the object of a torch zip archive; tensors come back as :class:`LazyTensor`.
    A TorchScript archive gives its root module as a :class:`TorchScriptObject`."""
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:  # BadZipFile, OSError, ... on truncated or garbage files
        raise CheckpointError(f"{path}: not a readable zip archive ({exc})") from None
    with zf:
        names = zf.namelist()
        top = _top_folder(names, path)
        info = zf.getinfo(top + "data.pkl")
        if info.file_size > _MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: '{top}data.pkl' declares {info.file_size} bytes, too large")
        try:
            pickled = zf.read(info)
            order = _byteorder(zf, top, path)
        except CheckpointError:
            raise
        except Exception as exc:  # CRC errors, truncated members, unsupported compression
            raise CheckpointError(f"{path}: cannot read '{top}data.pkl' ({exc})") from None
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:

            def resolve(etype: ElementType, key: str, numel: int, extra: tuple) -> Storage:
                name = f"{top}data/{key}"
                if extra:
                    raise CheckpointError(f"{path}: unexpected storage view {extra!r} for '{name}'")
                try:
                    member = zf.getinfo(name)
                except KeyError:
                    raise CheckpointError(f"{path}: storage member '{name}' is missing") from None
                if member.compress_type != zipfile.ZIP_STORED or member.flag_bits & 1:
                    raise CheckpointError(f"{path}: storage member '{name}' is compressed or encrypted; "
                                          "torch stores storages uncompressed")
                nbytes = numel * etype.itemsize
                if member.file_size < nbytes:
                    raise CheckpointError(f"{path}: storage member '{name}' has {member.file_size} bytes, "
                                          f"the pickle declares {numel} x {etype.name} = {nbytes}")
                offset = _data_offset(f, member, path)
                if offset + nbytes > file_size:
                    raise CheckpointError(f"{path}: storage member '{name}' runs past the end of the file")
                storage = Storage(nbytes, f"{path}:{name}", order)
                storage.attach(path, offset)
                return storage

            return unpickle(io.BytesIO(pickled), f"{path}:{top}data.pkl", resolve)
