"""Backbone weights in canonical naming -> the C engine's configuration and weight buffer.

Two canonical namings are accepted (docs/api.md): OpenAI CLIP (``visual.*``) and DINOv2 hub
(``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ...). The engine stores all weights
in one float32 buffer whose layout it defines itself (``_engine.vit_layout``): most tensors
row-major, the blocks' linear weights in column panels (``write_tensor`` / ``read_tensor``)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from . import _engine

# the engine's enums (csrc/ops.h, csrc/vit.h), exported by the extension
ACTIVATIONS = {"quick_gelu": _engine.ACT_QUICK_GELU, "gelu": _engine.ACT_GELU, "swiglu": _engine.ACT_SWIGLU}
POS_BILINEAR, POS_BICUBIC_SCALE = _engine.POS_BILINEAR, _engine.POS_BICUBIC_SCALE
POS_BICUBIC_AA, POS_BICUBIC_SIZE = _engine.POS_BICUBIC_AA, _engine.POS_BICUBIC_SIZE
#: position-resize rules a checkpoint reader may name in its hints (``pos_resize``), see csrc/vit.h
POS_RULES = {"bilinear": POS_BILINEAR, "bicubic_scale": POS_BICUBIC_SCALE, "bicubic_aa": POS_BICUBIC_AA,
             "bicubic_size": POS_BICUBIC_SIZE}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EngineBackbone:
    """A backbone ready for the engine: family, config dict, packed weights, preprocessing.

    ``params`` is the float32 buffer of the engine's layout; None in the backbone of a bf16-only
    load (:mod:`visualad.model_cache`), whose engine model holds the weights as bf16 packs."""

    family: str
    config: dict
    params: np.ndarray | None
    mean: tuple
    std: tuple
    default_ln_post: tuple = field(default=(None, None))

    @property
    def width(self) -> int:
        return self.config["width"]

    @property
    def depth(self) -> int:
        return self.config["depth"]


def detect_family(tensors: dict) -> str:
    if "visual.conv1.weight" in tensors:
        return "clip"
    if "patch_embed.proj.weight" in tensors:
        return "dinov2"
    raise ValueError(
        "cannot tell the backbone naming: expected OpenAI CLIP keys ('visual.conv1.weight', ...) "
        "or DINOv2 hub keys ('patch_embed.proj.weight', ...)")


def _get(tensors: dict, key: str, shape: tuple | None = None) -> np.ndarray:
    if key not in tensors:
        raise ValueError(f"backbone weights are missing '{key}'")
    arr = np.asarray(tensors[key])
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"backbone weight '{key}' must be a float array, got {arr.dtype}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(f"backbone weight '{key}' has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    return arr


def _count_blocks(tensors: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in tensors for m in [rx.match(k)] if m}
    if not idx:
        raise ValueError("backbone weights contain no transformer blocks")
    depth = max(idx) + 1
    missing = sorted(set(range(depth)) - idx)
    if missing:
        raise ValueError(f"backbone weights are missing transformer block(s) {missing}")
    return depth


def _patch_and_grid(t: dict, conv_key: str, pos_key: str, batched: bool) -> tuple[int, int, int]:
    """(width D, patch side P, native grid G0) from the patch convolution (D, 3, P, P) and the
    positions (1 + G0^2, D); batched: the positions are stored as (1, 1 + G0^2, D) (DINOv2 hub)."""
    w = _get(t, conv_key)
    if w.ndim != 4 or w.shape[1] != 3 or w.shape[2] != w.shape[3]:
        raise ValueError(f"'{conv_key}' must have shape (D, 3, P, P), got {w.shape}")
    D, P = w.shape[0], w.shape[2]
    pos = _get(t, pos_key)
    rows = pos.reshape(-1, pos.shape[-1]) if batched and pos.ndim == 3 and pos.shape[0] == 1 else pos
    if rows.ndim != 2 or rows.shape[1] != D:
        expected = f"(1, 1+G*G, {D})" if batched else f"(1+G*G, {D})"
        raise ValueError(f"'{pos_key}' must have shape {expected}, got {pos.shape}")
    grid = math.isqrt(rows.shape[0] - 1)
    if grid * grid != rows.shape[0] - 1:
        raise ValueError(f"'{pos_key}' has {rows.shape[0]} rows: expected 1 + grid*grid")
    return D, P, grid


def _pos_rule(hints: dict, default: int) -> int:
    """The position-resize rule the checkpoint's own code uses (hints['pos_resize']), else the
    family's default (CLIP: bilinear as VisualAD; DINOv2: the hub's rules)."""
    rule = hints.get("pos_resize")
    if rule is None:
        return default
    if rule not in POS_RULES:
        raise ValueError(f"unknown position-resize rule {rule!r} (known: {sorted(POS_RULES)})")
    return POS_RULES[rule]


#: the engine's name of each block tensor -> its name in an OpenAI CLIP block
#: (``visual.transformer.resblocks.{i}.``)
CLIP_BLOCK_NAMES = {"ln1.weight": "ln_1.weight", "ln1.bias": "ln_1.bias", "qkv.weight": "attn.in_proj_weight",
                    "qkv.bias": "attn.in_proj_bias", "proj.weight": "attn.out_proj.weight",
                    "proj.bias": "attn.out_proj.bias", "ln2.weight": "ln_2.weight", "ln2.bias": "ln_2.bias",
                    "fc1.weight": "mlp.c_fc.weight", "fc1.bias": "mlp.c_fc.bias",
                    "fc2.weight": "mlp.c_proj.weight", "fc2.bias": "mlp.c_proj.bias"}


def dinov2_block_names(swiglu: bool, layerscale: bool) -> dict:
    """The engine's name of each block tensor -> its name in a DINOv2 hub block (``blocks.{i}.``):
    SwiGLU MLPs name their layers ``mlp.w12`` / ``mlp.w3``; LayerScale adds ``ls1`` / ``ls2``."""
    fc1, fc2 = ("mlp.w12", "mlp.w3") if swiglu else ("mlp.fc1", "mlp.fc2")
    names = {"ln1.weight": "norm1.weight", "ln1.bias": "norm1.bias", "qkv.weight": "attn.qkv.weight",
             "qkv.bias": "attn.qkv.bias", "proj.weight": "attn.proj.weight", "proj.bias": "attn.proj.bias",
             "ln2.weight": "norm2.weight", "ln2.bias": "norm2.bias", "fc1.weight": f"{fc1}.weight",
             "fc1.bias": f"{fc1}.bias", "fc2.weight": f"{fc2}.weight", "fc2.bias": f"{fc2}.bias"}
    if layerscale:
        names.update({"ls1": "ls1.gamma", "ls2": "ls2.gamma"})
    return names


def _clip_sources(t: dict, hints: dict) -> tuple[dict, dict]:
    D, P, grid = _patch_and_grid(t, "visual.conv1.weight", "visual.positional_embedding", batched=False)
    depth = _count_blocks(t, r"visual\.transformer\.resblocks\.(\d+)\.")
    hidden = _get(t, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]
    heads = int(hints.get("heads") or max(1, D // 64))
    cfg = dict(width=D, depth=depth, heads=heads, patch=P, grid=grid, mlp_hidden=hidden, registers=0,
               patch_bias=0, ln_pre=1, layerscale=0,
               activation=ACTIVATIONS[hints.get("activation") or "quick_gelu"],
               pos_resize=_pos_rule(hints, POS_BILINEAR), ln_eps=float(hints.get("ln_eps") or 1e-5))
    if "pos_cubic_a" in hints:
        cfg["pos_cubic_a"] = float(hints["pos_cubic_a"])
    src = {"patch.weight": "visual.conv1.weight", "cls": "visual.class_embedding",
           "pos": "visual.positional_embedding", "ln_pre.weight": "visual.ln_pre.weight",
           "ln_pre.bias": "visual.ln_pre.bias", "ln_post.weight": "visual.ln_post.weight",
           "ln_post.bias": "visual.ln_post.bias"}
    for i in range(depth):
        for k, v in CLIP_BLOCK_NAMES.items():
            src[f"blocks.{i}.{k}"] = f"visual.transformer.resblocks.{i}.{v}"
    return cfg, src


def _dinov2_sources(t: dict, hints: dict) -> tuple[dict, dict]:
    D, P, grid = _patch_and_grid(t, "patch_embed.proj.weight", "pos_embed", batched=True)
    depth = _count_blocks(t, r"blocks\.(\d+)\.")
    swiglu = "blocks.0.mlp.w12.weight" in t
    if swiglu:
        hidden = _get(t, "blocks.0.mlp.w3.weight").shape[1]
    else:
        hidden = _get(t, "blocks.0.mlp.fc1.weight").shape[0]
    registers = 0
    if "register_tokens" in t:
        registers = int(np.asarray(t["register_tokens"]).reshape(-1, D).shape[0])
    layerscale = int("blocks.0.ls1.gamma" in t)
    heads = int(hints.get("heads") or max(1, D // 64))
    act = "swiglu" if swiglu else (hints.get("activation") or "gelu")
    cfg = dict(width=D, depth=depth, heads=heads, patch=P, grid=grid, mlp_hidden=hidden,
               registers=registers, patch_bias=1, ln_pre=0, layerscale=layerscale,
               activation=ACTIVATIONS[act],
               pos_resize=_pos_rule(hints, POS_BICUBIC_AA if registers else POS_BICUBIC_SCALE),
               ln_eps=float(hints.get("ln_eps") or 1e-6))
    if "pos_cubic_a" in hints:
        cfg["pos_cubic_a"] = float(hints["pos_cubic_a"])
    src = {"patch.weight": "patch_embed.proj.weight", "patch.bias": "patch_embed.proj.bias",
           "cls": "cls_token", "pos": "pos_embed", "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias"}
    if registers:
        src["registers"] = "register_tokens"
    per_block = dinov2_block_names(swiglu, layerscale)
    for i in range(depth):
        for k, v in per_block.items():
            src[f"blocks.{i}.{k}"] = f"blocks.{i}.{v}"
    return cfg, src


def build_backbone(tensors: dict, family: str | None = None, hints: dict | None = None) -> EngineBackbone:
    """Validates canonical-named weights and packs them into the engine's single buffer."""
    if not isinstance(tensors, dict):
        raise TypeError(f"backbone weights must be a dict of arrays, got {type(tensors).__name__}")
    hints = dict(hints or {})
    family = family or detect_family(tensors)
    if family == "clip":
        cfg, src = _clip_sources(tensors, hints)
    elif family == "dinov2":
        cfg, src = _dinov2_sources(tensors, hints)
    else:
        raise ValueError(f"unknown backbone family {family!r}")
    layout, total = _engine.vit_layout(cfg)
    params = new_params(total)
    for entry in layout:
        name, shape = entry[0], entry[1]
        key = src[name]
        arr = _get(tensors, key)
        size = int(np.prod(shape))
        if arr.size != size:
            raise ValueError(f"backbone weight '{key}' has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if arr.ndim > 1 and name not in ("cls", "pos", "registers") and tuple(arr.shape) != tuple(shape):
            raise ValueError(f"backbone weight '{key}' has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        flat = np.asarray(arr, dtype=np.float32).reshape(-1)
        if not np.isfinite(flat).all():
            raise ValueError(f"backbone weight '{key}' contains NaN or Inf")
        write_tensor(params, entry, flat)
    return engine_backbone(family, cfg, params, layout)


def engine_backbone(family: str, cfg: dict, params: np.ndarray, layout: list) -> EngineBackbone:
    """The EngineBackbone of a filled buffer: the family's preprocessing and the tower's ln_post."""
    mean, std = (CLIP_MEAN, CLIP_STD) if family == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    entries = {entry[0]: entry for entry in layout}
    ln_post = (read_tensor(params, entries["ln_post.weight"]).copy(),
               read_tensor(params, entries["ln_post.bias"]).copy())
    return EngineBackbone(family, cfg, params, mean, std, ln_post)


def new_params(total: int) -> np.ndarray:
    """A zeroed float32 buffer of `total` floats starting on a 64-byte boundary (the engine's
    weight panels are laid out on cache-line boundaries relative to the buffer's start)."""
    raw = np.zeros(total + 16, dtype=np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start:start + total]


def write_tensor(params: np.ndarray, entry: tuple, values: np.ndarray) -> None:
    """Stores `values` (any shape with the entry's number of elements) at a layout entry
    (name, shape, offset, panel): row-major, or for panel > 0 the weight [N, K] as ceil(N/panel)
    panels [K, panel] (panel j, row k = W[j*panel : (j+1)*panel, k], zero past N)."""
    _, shape, offset, panel = entry
    size = int(np.prod(shape))
    if not panel:
        params[offset:offset + size] = np.asarray(values, np.float32).reshape(-1)
        return
    n, k = shape
    full, rem = divmod(n, panel)
    w = np.asarray(values, np.float32).reshape(n, k)
    dst = params[offset:offset + (full + (rem > 0)) * panel * k].reshape(-1, k, panel)
    dst[:full] = w[:full * panel].reshape(full, panel, k).transpose(0, 2, 1)
    if rem:
        dst[full, :, :rem] = w[full * panel:].T
        dst[full, :, rem:] = 0.0


def read_tensor(params: np.ndarray, entry: tuple) -> np.ndarray:
    """The tensor at a layout entry in its canonical shape: a view of `params`, or for a
    panel-stored weight an unpacked copy."""
    _, shape, offset, panel = entry
    if not panel:
        return params[offset:offset + int(np.prod(shape))].reshape(shape)
    n, k = shape
    stored = params[offset:offset + -(-n // panel) * panel * k].reshape(-1, k, panel)
    return np.ascontiguousarray(stored.transpose(0, 2, 1).reshape(-1, k)[:n])
