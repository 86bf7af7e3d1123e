"""The project's own single-file format (``Detector.save`` / ``visualad convert``).

A safetensors file whose ``__metadata__["visualad"]`` is a JSON document::

    {"format": "visualad", "version": 1, "family": "clip", "backbone_config": {...engine config...},
     "backbone_path": null | "path it was loaded from", "settings": {...Detector parameters...},
     "head_info": {features_list, image_size, cross_attn_config, ...}}

Tensors: ``backbone.<engine name>`` (the engine's weight layout, present unless the file only
references its backbone) and ``head.<flattened official name>`` (``head.anomaly_token``,
``head.layer_transforms.layer_6.mlp.0.weight``, ``head.cross_attn.layer_attentions.layer_6.q_proj.weight``).
"""
from __future__ import annotations

import json
import os

import numpy as np

from .. import _engine
from .._files import atomic_write
from ..backbone import EngineBackbone, engine_backbone, new_params, read_tensor, write_tensor
from .safetensors import read_safetensors, save_safetensors
from ..errors import CheckpointError

FORMAT, VERSION = "visualad", 1
HEAD_TENSORS = ("anomaly_token", "normal_token", "ln_post_weight", "ln_post_bias")


def flatten_head(head: dict) -> dict:
    """Official nested head -> {flattened name: array} (docs/api.md gradient naming)."""
    flat = {k: head[k] for k in HEAD_TENSORS}
    for lname, sd in head.get("layer_transforms", {}).items():
        for k, v in sd.items():
            flat[f"layer_transforms.{lname}.{k}"] = v
    for k, v in head.get("cross_attn", {}).items():
        flat[f"cross_attn.{k}"] = v
    return flat


def unflatten_head(flat: dict, info: dict) -> dict:
    head = {k: flat[k] for k in HEAD_TENSORS if k in flat}
    head["layer_transforms"], head["cross_attn"] = {}, {}
    for name, arr in flat.items():
        if name.startswith("layer_transforms."):
            _, lname, rest = name.split(".", 2)
            head["layer_transforms"].setdefault(lname, {})[rest] = arr
        elif name.startswith("cross_attn."):
            head["cross_attn"][name[len("cross_attn."):]] = arr
    head.update(info)
    return head


def is_visualad_file(path) -> bool:
    """True when `path` is a safetensors file written by :func:`save_detector_file`."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000:
                return False
            header = json.loads(f.read(n))
        meta = header.get("__metadata__", {}).get("visualad")
        return meta is not None and json.loads(meta).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_detector_file(path, backbone: EngineBackbone, head: dict, settings: dict, backbone_path=None,
              include_backbone: bool = True) -> None:
    """Writes the detector atomically (a temporary file renamed over `path`)."""
    info = {k: v for k, v in head.items() if k not in HEAD_TENSORS and k not in ("layer_transforms", "cross_attn")}
    meta = {"format": FORMAT, "version": VERSION, "family": backbone.family, "backbone_config": backbone.config,
            "backbone_path": None if include_backbone else (os.fspath(backbone_path) if backbone_path else None),
            "settings": settings, "head_info": info}
    if not include_backbone and not backbone_path:
        raise ValueError("include_backbone=False needs a backbone given as a path")
    tensors = {f"head.{k}": np.asarray(v, np.float32) for k, v in flatten_head(head).items()}
    if include_backbone:
        layout, _ = _engine.vit_layout(backbone.config)
        for entry in layout:
            tensors[f"backbone.{entry[0]}"] = read_tensor(backbone.params, entry)
    atomic_write(path, lambda tmp: save_safetensors(tmp, tensors, {"visualad": json.dumps(meta)}))


def read_detector_file(path):
    """(EngineBackbone or None, backbone_path or None, head dict, settings dict) from a saved file."""
    arrays, metadata = read_safetensors(os.fspath(path))
    try:
        meta = json.loads(metadata["visualad"])
        assert meta["format"] == FORMAT
    except (KeyError, ValueError, AssertionError, TypeError):
        raise CheckpointError(f"{path}: not a visualad detector file (no 'visualad' metadata)") from None
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported visualad file version {meta.get('version')!r}")
    head_flat = {k[len("head."):]: np.ascontiguousarray(v, np.float32) for k, v in arrays.items() if k.startswith("head.")}
    head = unflatten_head(head_flat, meta.get("head_info", {}))
    backbone = None
    if meta.get("backbone_path") is None:
        cfg = meta["backbone_config"]
        layout, total = _engine.vit_layout(cfg)
        params = new_params(total)
        for entry in layout:
            name, shape = entry[0], entry[1]
            key = f"backbone.{name}"
            if key not in arrays:
                raise CheckpointError(f"{path}: backbone tensor '{name}' is missing")
            arr = np.asarray(arrays[key], np.float32)
            if tuple(arr.shape) != tuple(shape):
                raise CheckpointError(f"{path}: backbone tensor '{name}' has shape {arr.shape}, expected {shape}")
            write_tensor(params, entry, arr)
        backbone = engine_backbone(meta["family"], dict(cfg), params, layout)
    return backbone, meta.get("backbone_path"), head, meta.get("settings", {})
