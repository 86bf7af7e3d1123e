"""Entry points: a backbone in canonical naming from any supported source, and generic reading.

``load_backbone`` = open (file, folder or dict) -> find the tower and rename it (naming.py) ->
check every shape (validate.py) -> hints from naming and config -> read each needed tensor as
float32. Only the tensors of the vision tower are ever read from disk.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import CheckpointError
from .files import read_file
from .hf import apply_config, read_folder
from .lazy import LazyTensor, to_float32
from .onnx import looks_like_onnx
from .naming import canonicalize
from .unpickler import TypedStorage
from .validate import check_tower


@dataclass
class BackboneWeights:
    """A vision backbone in canonical naming.

    ``family``: 'clip' or 'dinov2'. ``tensors``: ``{canonical name: float32 C-contiguous array}``.
    ``hints``: ``ln_eps`` (float), ``activation`` ('quick_gelu' | 'gelu' | 'swiglu'), ``heads``
    (int, or None when only the width is known), ``format`` (container: 'torch-zip', 'torchscript',
    'torch-legacy', 'safetensors', 'hf' (a folder with a transformers config), 'dict'), ``naming``
    (source naming, see naming.py) and ``source`` (path or 'dict'). ``arch``: width, depth, patch,
    grid, mlp_hidden, registers, layerscale, swiglu as read off the shapes.
    """

    family: str
    tensors: dict
    hints: dict
    arch: dict = field(default_factory=dict)


def _open_source(source) -> tuple[Mapping, str, dict | None, dict, str, dict]:
    """``(tensors, format, config, numbers, where, hints)`` of a path or a dict of arrays; hints are
    what an ONNX graph says about its tower (eps, activation, heads, position rule)."""
    if isinstance(source, Mapping):
        return {str(k): v for k, v in source.items()}, "dict", None, {}, "dict", {}
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"backbone must be a path or a dict of arrays, got {type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):
        tensors, fmt, config = read_folder(path)
        return tensors, "hf" if config is not None else fmt, config, {}, path, {}
    if looks_like_onnx(path):
        from .onnx import read_onnx  # needs the optional 'onnx' package
        tower = read_onnx(path)
        return tower.tensors, "onnx", None, {}, path, tower.hints
    contents = read_file(path)
    return contents.tensors(), contents.format, None, contents.numbers, path, {}


def load_backbone(source) -> BackboneWeights:
    """Loads a CLIP or DINOv2 vision backbone from a file (torch zip, TorchScript, legacy torch,
    safetensors), a folder (Hugging Face or sharded weights) or a dict ``{name: array}``, in any
    supported naming; returns it in canonical naming as float32 arrays.

    OpenAI-trained CLIP weights get QuickGELU whatever their container; only a transformers config
    can say otherwise. DINOv2 gets LayerNorm eps 1e-6 and exact GELU (SwiGLU when its weights have
    it) unless its config says otherwise. Raises :class:`CheckpointError` for unsafe, corrupt or
    inconsistent inputs.
    """
    tensors, fmt, config, numbers, where, graph_hints = _open_source(source)
    canon = canonicalize(tensors, where, numbers)
    arch = check_tower(canon.family, canon.tensors, where)
    if canon.family == "clip":
        hints = {"ln_eps": 1e-5, "activation": "quick_gelu", "heads": None}
    else:
        hints = {"ln_eps": 1e-6, "activation": "swiglu" if arch["swiglu"] else "gelu", "heads": None}
    if canon.heads is not None:
        if canon.heads <= 0 or arch["width"] % canon.heads:
            raise CheckpointError(f"{where}: {canon.heads} attention heads do not divide the width {arch['width']}")
        hints["heads"] = canon.heads
    if config is not None:
        apply_config(config, canon.family, arch, hints, where)
    hints.update(graph_hints)
    hints.update(format=fmt, naming=canon.naming, source=where)
    weights = {}
    for name, value in canon.tensors.items():
        weights[name] = to_float32(value)
    return BackboneWeights(canon.family, weights, hints, arch)


def _materialize(obj, memo: dict, float32: bool):
    """``obj`` with every lazy tensor (and bare storage) read into a NumPy array (floating ones as
    float32 if asked)."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, TypedStorage):
        obj = LazyTensor(obj.storage, obj.etype, 0, (obj.numel,), (1,))
    if isinstance(obj, LazyTensor):
        out = to_float32(obj) if float32 and obj.etype.is_float else obj.numpy()
    elif isinstance(obj, Mapping):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        memo[id(obj)] = out
        for key, value in obj.items():
            out[key] = _materialize(value, memo, float32)
    elif isinstance(obj, list):
        out = []
        memo[id(obj)] = out
        out.extend(_materialize(v, memo, float32) for v in obj)
    elif isinstance(obj, tuple):
        out = tuple(_materialize(v, memo, float32) for v in obj)
    else:
        out = obj
    memo[id(obj)] = out
    return out


def read_checkpoint(path, float32: bool = False):
    """The object saved in a checkpoint with every tensor as a NumPy array.

    A ``torch.save`` file (zip or legacy) gives the unpickled object (dicts, OrderedDicts, lists,
    numbers, strings); a TorchScript archive its state dict; a safetensors file or a folder of
    weights ``{name: array}``. Arrays keep their dtype (bfloat16, which NumPy lacks, becomes
    float32); ``float32=True`` converts every floating array to float32.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        obj = read_folder(path)[0]
    else:
        obj = read_file(path).obj
    try:
        return _materialize(obj, {}, float32)
    except RecursionError:
        raise CheckpointError(f"{path}: object is nested too deeply") from None


def load_head(path) -> dict:
    """A VisualAD head checkpoint (official ``CLIP.pth`` layout, SPEC §4) as nested dicts of
    float32 arrays and plain values."""
    obj = read_checkpoint(path, float32=True)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{os.fspath(path)}: a head checkpoint holds a dict, got {type(obj).__name__}")
    return obj
