"""The zip container of ``torch.save`` (PyTorch >= 1.6) and ``torch.jit.save``.

Layout: one top-level folder (named after the file, ``archive`` or anything else) holding
``data.pkl`` (the pickled object), ``data/<key>`` (one uncompressed member per storage, raw
little-endian elements), ``byteorder`` (optional) and bookkeeping members. Storage members are
located through their local zip headers and read straight from the file, never decompressed or
copied whole. ``data.pkl`` (stored or deflated only: bzip2 and lzma members can expand without
bound inside one decompression call) is read once, after its declared size has been checked
against :data:`visualad.limits.MAX_PICKLE_BYTES`, and unpickled from that buffer without a copy.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile

from ..errors import CheckpointError
from ..limits import MAX_PICKLE_BYTES, MAX_SMALL_MEMBER_BYTES
from .describe import describe
from .dtypes import ElementType
from .lazy import Storage
from .unpickler import unpickle

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... name length, extra length
_STREAMABLE = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # decompressed in bounded steps by zipfile


def _top_folder(names: list[str], path: str) -> str:
    """The prefix ('<folder>/') under which data.pkl lives."""
    if "data.pkl" in names:
        return ""
    tops = sorted({n.split("/", 1)[0] for n in names if "/" in n})
    if len(tops) != 1:
        raise CheckpointError(f"{path}: a torch archive has one top-level folder, found {describe(tops) if tops else 'none'}")
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


def _open_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path: str):
    """A stream of a small member, refused before decompression when its declared size exceeds
    ``limit`` or its compression could expand without bound."""
    if info.file_size > limit:
        raise CheckpointError(f"{path}: member '{info.filename}' declares {info.file_size} bytes, "
                              f"more than the {limit} a torch archive needs")
    if info.compress_type not in _STREAMABLE or info.flag_bits & 1:
        raise CheckpointError(f"{path}: member '{info.filename}' is encrypted or uses an unsupported "
                              f"compression ({info.compress_type}); torch archives are stored")
    try:
        return zf.open(info)
    except Exception as exc:  # unsupported features, bad local header
        raise CheckpointError(f"{path}: cannot open member '{info.filename}' ({exc})") from None


def _byteorder(zf: zipfile.ZipFile, top: str, path: str) -> str:
    try:
        info = zf.getinfo(top + "byteorder")
    except KeyError:
        return "<"  # archives from before the member existed are little-endian
    try:
        with _open_member(zf, info, MAX_SMALL_MEMBER_BYTES, path) as member:
            text = member.read(MAX_SMALL_MEMBER_BYTES + 1).decode("ascii", "replace").strip()
    except CheckpointError:
        raise
    except Exception as exc:  # CRC errors, truncated or corrupt deflate data
        raise CheckpointError(f"{path}: cannot read '{top}byteorder' ({exc})") from None
    if text not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byteorder {describe(text)}")
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
        order = _byteorder(zf, top, path)
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:

            def resolve(etype: ElementType, key: str, numel: int, extra: tuple) -> Storage:
                name = f"{top}data/{key}"
                if extra:
                    raise CheckpointError(f"{path}: unexpected storage view {describe(extra)} for '{name}'")
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

            where = f"{path}:{top}data.pkl"
            try:  # one bounded read (zipfile stops at the declared size), then unpickled in place
                with _open_member(zf, info, MAX_PICKLE_BYTES, path) as member:
                    pickled = member.read(info.file_size)
            except CheckpointError:
                raise
            except Exception as exc:  # CRC errors, truncated or corrupt deflate data
                raise CheckpointError(f"{where}: cannot read the member ({exc})") from None
            return unpickle(io.BytesIO(pickled), where, resolve)
