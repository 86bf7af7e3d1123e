"""One checkpoint file: recognise its container from its first bytes and open it.

``.safetensors`` files are read as safetensors whatever their bytes (so a damaged header gets a
precise message); other files are recognised by content: a zip archive is a torch / TorchScript
archive, a pickle is the legacy torch format, an 8-byte length followed by ``{`` is safetensors.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import CheckpointError
from .lazy import LazyTensor
from .legacy import read_torch_legacy
from .safetensors import open_safetensors
from .torchscript import is_torchscript, module_state
from .torchzip import read_torch_zip


@dataclass
class FileContents:
    """What a checkpoint file holds: ``obj`` is the unpickled object (tensors as
    :class:`LazyTensor`) or, for safetensors and TorchScript, an ordered ``{name: tensor}``;
    ``numbers`` are TorchScript module attributes by dotted path."""

    obj: object
    format: str
    numbers: dict = field(default_factory=dict)

    def tensors(self) -> OrderedDict:
        """Every tensor reachable through nested dicts, by dotted path (``{'model': {'w': t}}`` gives
        ``'model.w'``)."""
        out: OrderedDict = OrderedDict()
        seen: set[int] = set()
        stack = [("", self.obj)]
        while stack:
            prefix, obj = stack.pop()
            if not isinstance(obj, Mapping) or id(obj) in seen:
                continue
            seen.add(id(obj))
            children = []
            for key, value in obj.items():
                if isinstance(value, LazyTensor):
                    out.setdefault(prefix + str(key), value)
                elif isinstance(value, Mapping):
                    children.append((f"{prefix}{key}.", value))
            stack.extend(reversed(children))
        return out


def sniff(path: str) -> str:
    """The container of a file: 'zip', 'pickle' or 'safetensors'."""
    if path.endswith(".safetensors"):
        return "safetensors"
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CheckpointError(f"{path}: file is empty")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if head[257:262] == b"ustar":
        raise CheckpointError(f"{path}: tar-based torch checkpoint (PyTorch < 0.4) is not supported")
    raise CheckpointError(f"{path}: unrecognised checkpoint format (not a torch archive, torch pickle "
                          "or safetensors file)")


def read_file(path: str) -> FileContents:
    """Opens one checkpoint file of any supported container."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    kind = sniff(path)
    if kind == "safetensors":
        return FileContents(open_safetensors(path)[0], "safetensors")
    if kind == "pickle":
        return FileContents(read_torch_legacy(path), "torch-legacy")
    root = read_torch_zip(path)
    if is_torchscript(root):
        tensors, numbers = module_state(root)
        return FileContents(tensors, "torchscript", numbers)
    return FileContents(root, "torch-zip")
