"""Checkpoint folders: Hugging Face model folders and plain folders of (sharded) weights.

A folder's weights are, in order of preference: ``model.safetensors.index.json`` (shards),
``model.safetensors``, ``pytorch_model.bin.index.json``, ``pytorch_model.bin``, else its only shard
index, its only safetensors file, or its only weight file. An index's ``weight_map`` names the
shard of every tensor; shards must lie in the folder.
``config.json`` of transformers (``model_type`` clip, clip_vision_model, dinov2,
dinov2_with_registers) gives the LayerNorm eps, activation and heads, and must agree with the
architecture the weights imply; a DINOv2 folder also gets transformers' position-resize rule.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict

from ..errors import CheckpointError
from ..limits import MAX_JSON_BYTES
from .describe import describe
from .files import read_file

_PREFERRED = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
              "pytorch_model.bin")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
_FAMILIES = {"clip": "clip", "clip_vision_model": "clip", "dinov2": "dinov2", "dinov2_with_registers": "dinov2"}
_ACTIVATIONS = ("quick_gelu", "gelu")  # the engine's activations a config may name


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: JSON file larger than {MAX_JSON_BYTES} bytes")
        value = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable JSON file ({describe(str(exc))})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON is nested too deeply") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _weights_file(folder: str) -> str:
    for name in _PREFERRED:
        if os.path.isfile(os.path.join(folder, name)):
            return name
    candidates = sorted(n for n in os.listdir(folder) if n.endswith(_WEIGHT_SUFFIXES + _INDEX_SUFFIXES))
    if not candidates:
        raise CheckpointError(f"{folder}: folder holds no weights (expected model.safetensors, "
                              "pytorch_model.bin, a shard index or one weight file)")
    indexes = [n for n in candidates if n.endswith(_INDEX_SUFFIXES)]
    safetensors = [n for n in candidates if n.endswith(".safetensors")]
    for group in (indexes, safetensors, candidates):  # an index covers its shards; safetensors beat pickles
        if len(group) == 1:
            return group[0]
    raise CheckpointError(f"{folder}: several weight files {candidates}; pass the one to load")


def _read_sharded(folder: str, index_name: str) -> tuple[OrderedDict, str]:
    index_path = os.path.join(folder, index_name)
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
    shards: dict[str, OrderedDict] = {}
    formats = set()
    tensors: OrderedDict = OrderedDict()
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: shard {describe(shard)} of '{name}' is not a file in the folder")
        if shard not in shards:
            contents = read_file(os.path.join(folder, shard))
            shards[shard] = contents.tensors()
            formats.add(contents.format)
        if name not in shards[shard]:
            raise CheckpointError(f"{index_path}: tensor '{name}' is not in shard '{shard}'")
        tensors[name] = shards[shard][name]
    return tensors, "/".join(sorted(formats))


def read_hf_folder(folder: str) -> tuple[OrderedDict, str, dict | None]:
    """``(tensors, container format, transformers config or None)`` of a checkpoint folder."""
    name = _weights_file(folder)
    if name.endswith(".index.json"):
        tensors, fmt = _read_sharded(folder, name)
    else:
        contents = read_file(os.path.join(folder, name))
        tensors, fmt = contents.tensors(), contents.format
    config_path = os.path.join(folder, "config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else None
    if config is not None and "model_type" not in config:
        config = None  # not a transformers config (e.g. timm's): nothing it says is used
    return tensors, fmt, config


def apply_config(config: dict, family: str, arch: dict, hints: dict, where: str) -> None:
    """Checks a transformers ``config.json`` against the architecture of the weights and takes
    eps, activation and heads from it into ``hints``."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in _FAMILIES:
        raise CheckpointError(f"{where}: config.json model_type {describe(model_type)} is not a CLIP or DINOv2 model")
    if model_type == "clip":
        config = config.get("vision_config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{where}: CLIP config.json has no vision_config")
    if _FAMILIES[model_type] != family:
        raise CheckpointError(f"{where}: config.json describes a {model_type} model but the weights are {family}")
    expected = {"hidden_size": arch["width"], "num_hidden_layers": arch["depth"], "patch_size": arch["patch"]}
    if family == "clip":
        expected["intermediate_size"] = arch["mlp_hidden"]
    else:
        expected["use_swiglu_ffn"] = arch["swiglu"]
        if model_type == "dinov2_with_registers":
            expected["num_register_tokens"] = arch["registers"]
    for key, value in expected.items():
        if key in config and config[key] != value:
            raise CheckpointError(f"{where}: config.json {key}={describe(config[key])} but the weights imply {value!r}")
    size = config.get("image_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                             or size // arch["patch"] != arch["grid"]):
        raise CheckpointError(f"{where}: config.json image_size={describe(size)} does not give the weights' grid of "
                              f"{arch['grid']} patches of {arch['patch']}")
    heads = config.get("num_attention_heads")
    if heads is not None:
        if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0 or arch["width"] % heads:
            raise CheckpointError(f"{where}: config.json num_attention_heads={describe(heads)} does not divide "
                                  f"the width {arch['width']}")
        hints["heads"] = heads
    eps = config.get("layer_norm_eps")
    if eps is not None:
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise CheckpointError(f"{where}: config.json layer_norm_eps={describe(eps)} is not a small positive number")
        hints["ln_eps"] = float(eps)
    act = config.get("hidden_act")
    if act is not None and not arch["swiglu"]:
        if act not in _ACTIVATIONS or (family == "dinov2" and act != "gelu"):
            raise CheckpointError(f"{where}: config.json hidden_act={describe(act)} is not supported")
        hints["activation"] = act
    if family == "dinov2":
        # transformers resizes DINOv2 positions its own way: bicubic to the grid size, antialiased
        # only for the register models (Dinov2Embeddings / Dinov2WithRegistersEmbeddings)
        hints["pos_resize"] = "bicubic_aa" if model_type == "dinov2_with_registers" else "bicubic_size"
