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
import math
import os

import numpy as np

from .. import _engine
from .._files import atomic_write
from ..backbone import EngineBackbone, engine_backbone, new_params, read_tensor, write_tensor
from .describe import describe
from .safetensors import read_header, read_safetensors, save_safetensors
from ..engine_info import PRECISIONS
from ..errors import CheckpointError
from ..head import default_layers, head_engine_config, validate_head
from ..limits import MAX_DEPTH, MAX_IMAGE_SIDE, MAX_LAYERS, MAX_THREADS, check_int

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
            parts = name.split(".", 2)
            if len(parts) != 3:
                raise ValueError(f"head tensor '{name}' is not named layer_transforms.<layer>.<tensor>")
            head["layer_transforms"].setdefault(parts[1], {})[parts[2]] = arr
        elif name.startswith("cross_attn."):
            head["cross_attn"][name[len("cross_attn."):]] = arr
    head.update(info)
    return head


def is_visualad_file(path) -> bool:
    """True when `path` is a safetensors file written by :func:`save_detector_file` (False for anything
    else, including unreadable or malformed files)."""
    try:
        _, metadata, _, _ = read_header(os.fspath(path))
        meta = json.loads(metadata["visualad"])
        return isinstance(meta, dict) and meta.get("format") == FORMAT
    except (OSError, CheckpointError, KeyError, ValueError, TypeError, RecursionError):
        return False


def stored_precision(path) -> str:
    """The ``precision`` setting of a visualad file, from its header only: "fp32" when it has none or
    the file is malformed (reading the file then says what is wrong)."""
    try:
        _, metadata, _, _ = read_header(os.fspath(path))
        precision = json.loads(metadata["visualad"])["settings"]["precision"]
    except (OSError, CheckpointError, KeyError, ValueError, TypeError, RecursionError):
        return "fp32"
    return precision if precision in PRECISIONS else "fp32"


# Detector settings a file may carry, by kind (anything else is ignored by Detector.load)
_INT_SETTINGS = {"image_size": (1, MAX_IMAGE_SIDE), "num_threads": (1, MAX_THREADS), "batch_size": (1, None),
                 "epochs": (1, None), "random_state": (None, None)}
_FLOAT_SETTINGS = ("sigma", "topk_ratio", "threshold", "learning_rate", "head_learning_rate", "dropout")


def _check_settings(settings) -> dict:
    if not isinstance(settings, dict):
        raise ValueError(f"'settings' must be an object, got {type(settings).__name__}")
    for key, (low, high) in _INT_SETTINGS.items():
        if settings.get(key) is not None:
            check_int(settings[key], f"setting {key}", low, high)
    for key in _FLOAT_SETTINGS:
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"setting {key} must be a finite number, got {describe(value)}")
    layers = settings.get("layers")
    if layers is not None:
        if not isinstance(layers, list) or not layers or len(layers) > MAX_LAYERS:
            raise ValueError(f"setting layers must be a non-empty list of block indices, got {describe(layers)}")
        for layer in layers:
            check_int(layer, "setting layers[i]", 1, MAX_DEPTH)
    if settings.get("precision") is not None and settings["precision"] not in PRECISIONS:
        raise ValueError(f"setting precision must be one of {PRECISIONS}, got {describe(settings['precision'])}")
    if "progress" in settings and settings["progress"] not in (True, False, 0, 1):
        raise ValueError("setting progress must be true or false")
    return settings


def _backbone(path, meta: dict, arrays: dict) -> EngineBackbone:
    """The backbone stored in the file; every shape is checked before the weight buffer is
    allocated, so the buffer never exceeds what the file's tensors hold."""
    cfg = meta.get("backbone_config")
    if not isinstance(cfg, dict):
        raise ValueError("'backbone_config' must be an object")
    layout, total = _engine.vit_layout(cfg)  # ValueError / TypeError for out-of-range or non-int sizes
    stored = 0
    for name, shape, *_ in layout:
        arr = arrays.get(f"backbone.{name}")
        if arr is None:
            raise ValueError(f"backbone tensor '{name}' is missing")
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"backbone tensor '{name}' has shape {arr.shape}, expected {tuple(shape)}")
        if arr.dtype.kind != "f" or not np.isfinite(arr).all():
            raise ValueError(f"backbone tensor '{name}' is not floating-point or contains NaN or Inf")
        stored += arr.size
    if total > stored + 16 * len(layout) + (1 << 20):  # panel padding only
        raise ValueError(f"backbone config needs {total} floats but the file holds {stored}")
    params = new_params(total)
    for entry in layout:
        write_tensor(params, entry, np.asarray(arrays[f"backbone.{entry[0]}"], np.float32))
    return engine_backbone(meta["family"], dict(cfg), params, layout)


def _check_usable(head: dict, settings: dict, backbone: EngineBackbone) -> None:
    """The stored settings fit the stored backbone, and the head fits the engine's limits."""
    size = settings.get("image_size") or head.get("image_size")
    if size is not None and check_int(size, "image_size", 1, MAX_IMAGE_SIDE) % backbone.config["patch"]:
        raise ValueError(f"image_size {size} is not a multiple of the patch size {backbone.config['patch']}")
    layers = settings.get("layers") or head.get("features_list") or default_layers(backbone.depth)
    if not isinstance(layers, list) or not layers or not all(
            isinstance(l, int) and 1 <= l <= backbone.depth for l in layers):
        raise ValueError(f"layers {describe(layers)} are not blocks 1..{backbone.depth} of the backbone")
    _engine.head_layout(head_engine_config(head, layers, backbone.width))  # ValueError beyond the limits


def _check_meta(meta) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError("not a visualad detector file (no 'visualad' metadata)")
    if meta.get("version") != VERSION:
        raise ValueError(f"unsupported visualad file version {describe(meta.get('version'))}")
    if meta.get("family") not in ("clip", "dinov2"):
        raise ValueError(f"unknown backbone family {describe(meta.get('family'))}")
    backbone_path = meta.get("backbone_path")
    if backbone_path is not None and not isinstance(backbone_path, str):
        raise ValueError("'backbone_path' must be a string or null")
    info = meta.get("head_info", {})
    if not isinstance(info, dict) or set(info) & (set(HEAD_TENSORS) | {"layer_transforms", "cross_attn"}):
        raise ValueError("'head_info' must be an object of head settings (not tensors)")
    meta["settings"] = _check_settings(meta.get("settings", {}))
    return meta


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
    """(EngineBackbone or None, backbone_path or None, head dict, settings dict) from a saved file.
    The head is validated against the backbone (or, for a file that only references its backbone,
    against its own width). Raises :class:`CheckpointError` naming the file for anything malformed."""
    path = os.fspath(path)
    arrays, metadata = read_safetensors(path)
    try:
        if "visualad" not in metadata:
            raise ValueError("not a visualad detector file (no 'visualad' metadata)")
        try:
            meta = json.loads(metadata["visualad"])
        except RecursionError:
            raise ValueError("metadata is nested too deeply") from None
        except ValueError as exc:
            raise ValueError(f"'visualad' metadata is not valid JSON ({describe(str(exc))})") from None
        meta = _check_meta(meta)
        head_flat = {k[len("head."):]: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()
                     if k.startswith("head.")}
        head = unflatten_head(head_flat, meta.get("head_info", {}))
        backbone = _backbone(path, meta, arrays) if meta.get("backbone_path") is None else None
        token = head.get("anomaly_token")
        width = backbone.width if backbone is not None else (token.shape[-1] if token is not None else 0)
        head = validate_head(head, width)
        if backbone is not None:
            _check_usable(head, meta["settings"], backbone)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return backbone, meta.get("backbone_path"), head, meta["settings"]
