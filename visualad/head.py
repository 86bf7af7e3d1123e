"""The trainable VisualAD head in the official checkpoint layout (docs/checkpoints.md).

A head is a dict::

    {"anomaly_token": (D,), "normal_token": (D,), "ln_post_weight": (D,), "ln_post_bias": (D,),
     "features_list": [6, 12, 18, 24], "image_size": 518,
     "layer_transforms": {"layer_6": {"mlp.0.weight": (H, D), "mlp.0.bias": (H,),
                                      "mlp.3.weight": (D, H), "mlp.3.bias": (D,)}, ...},
     "cross_attn": {"layer_attentions.layer_6.anchor_queries": (m, D), ...},
     "cross_attn_config": {"num_anchors": m, "dropout": 0.1, "res_scale_init": 0.01}}

Layers without a ``layer_transforms`` entry use the patch features as they are; layers without
``cross_attn`` entries use the tokens as they are (both as the official test code does).
"""
from __future__ import annotations

import numpy as np

SCA_FIELDS = ("anchor_queries", "pos_encoding", "q_proj.weight", "k_proj.weight", "v_proj.weight",
              "q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias", "gate.0.weight",
              "gate.0.bias", "out_proj.weight", "out_proj.bias", "res_scale")
SAF_FIELDS = ("mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias")
MAX_PATCHES = 1536  # rows of the official SCA pos_encoding
NUM_ANCHORS = 4
RES_SCALE_INIT = 0.01


def default_layers(depth: int) -> list[int]:
    """Four evenly spaced 1-based blocks ({6,12,18,24} for 24 blocks, {3,6,9,12} for 12)."""
    return sorted({max(1, round(depth * k / 4)) for k in range(1, 5)})


def _xavier(rng: np.random.Generator, fan_out: int, fan_in: int) -> np.ndarray:
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=(fan_out, fan_in)).astype(np.float32)


def init_head(width: int, layers: list[int], ln_post: tuple, image_size: int, random_state: int = 111,
              num_anchors: int = NUM_ANCHORS, max_patches: int = MAX_PATCHES) -> dict:
    """A fresh head initialised as docs/method.md §11 says (seeded by random_state)."""
    D = int(width)
    rng = np.random.default_rng(random_state)
    f32 = np.float32
    head = {
        "anomaly_token": (rng.standard_normal(D) * D ** -0.5 * 0.1).astype(f32),
        "normal_token": (rng.standard_normal(D) * D ** -0.5 * 0.1).astype(f32),
        "ln_post_weight": np.array(ln_post[0], dtype=f32, copy=True),
        "ln_post_bias": np.array(ln_post[1], dtype=f32, copy=True),
        "features_list": [int(l) for l in layers],
        "image_size": int(image_size),
        "layer_transforms": {},
        "cross_attn": {},
        "cross_attn_config": {"num_anchors": num_anchors, "dropout": 0.1, "res_scale_init": RES_SCALE_INIT},
    }
    for l in layers:
        head["layer_transforms"][f"layer_{l}"] = {
            "mlp.0.weight": _xavier(rng, D, D), "mlp.0.bias": np.zeros(D, f32),
            "mlp.3.weight": _xavier(rng, D, D), "mlp.3.bias": np.zeros(D, f32),
        }
        p = f"layer_attentions.layer_{l}."
        bound = 1.0 / np.sqrt(D)
        head["cross_attn"].update({
            p + "anchor_queries": (rng.standard_normal((num_anchors, D)) * 0.02).astype(f32),
            p + "pos_encoding": (rng.standard_normal((1, max_patches, D)) * 0.02).astype(f32),
            p + "q_proj.weight": _xavier(rng, D, D),
            p + "k_proj.weight": _xavier(rng, D, D),
            p + "v_proj.weight": _xavier(rng, D, D),
            p + "q_norm.weight": np.ones(D, f32), p + "q_norm.bias": np.zeros(D, f32),
            p + "k_norm.weight": np.ones(D, f32), p + "k_norm.bias": np.zeros(D, f32),
            p + "gate.0.weight": rng.uniform(-bound, bound, (num_anchors, D)).astype(f32),
            p + "gate.0.bias": rng.uniform(-bound, bound, num_anchors).astype(f32),
            p + "out_proj.weight": _xavier(rng, D, D),
            p + "out_proj.bias": np.zeros(D, f32),
            p + "res_scale": np.full(1, RES_SCALE_INIT, f32),
        })
    return head


def _array(value, where: str, shape: tuple | None = None) -> np.ndarray:
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"head tensor {where} must be a float array, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"head tensor {where} has shape {arr.shape}, expected {tuple(shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"head tensor {where} contains NaN or Inf")
    return arr


def validate_head(head: dict, width: int) -> dict:
    """Checks every tensor of an official-layout head against the backbone width; returns a
    normalised copy (float32 contiguous arrays, int features_list)."""
    if not isinstance(head, dict):
        raise TypeError(f"head must be a dict in the official layout or a path, got {type(head).__name__}")
    D = int(width)
    out = {}
    for key in ("anomaly_token", "normal_token", "ln_post_weight", "ln_post_bias"):
        if key not in head:
            raise ValueError(f"head is missing '{key}'")
        out[key] = _array(head[key], f"'{key}'", (D,))
    if "features_list" in head and head["features_list"] is not None:
        out["features_list"] = [int(l) for l in np.asarray(head["features_list"]).reshape(-1)]
    if "image_size" in head and head["image_size"] is not None:
        out["image_size"] = int(np.asarray(head["image_size"]).reshape(()))
    for key in ("epoch", "backbone", "transform_type"):
        if key in head:
            out[key] = head[key]
    out["layer_transforms"] = {}
    for name, sd in (head.get("layer_transforms") or {}).items():
        missing = [f for f in SAF_FIELDS if f not in sd]
        if missing:
            raise ValueError(f"head layer_transforms['{name}'] is missing {missing}")
        hidden = np.asarray(sd["mlp.0.weight"]).shape[0]
        out["layer_transforms"][name] = {
            "mlp.0.weight": _array(sd["mlp.0.weight"], f"layer_transforms.{name}.mlp.0.weight", (hidden, D)),
            "mlp.0.bias": _array(sd["mlp.0.bias"], f"layer_transforms.{name}.mlp.0.bias", (hidden,)),
            "mlp.3.weight": _array(sd["mlp.3.weight"], f"layer_transforms.{name}.mlp.3.weight", (D, hidden)),
            "mlp.3.bias": _array(sd["mlp.3.bias"], f"layer_transforms.{name}.mlp.3.bias", (D,)),
        }
    cross = head.get("cross_attn") or {}
    out["cross_attn"] = {}
    layers_with_sca = sorted({k.split(".")[1] for k in cross if k.startswith("layer_attentions.")})
    for lname in layers_with_sca:
        p = f"layer_attentions.{lname}."
        missing = [f for f in SCA_FIELDS if p + f not in cross]
        if missing:
            raise ValueError(f"head cross_attn for '{lname}' is missing {missing}")
        m = np.asarray(cross[p + "anchor_queries"]).shape[0]
        rows = np.asarray(cross[p + "pos_encoding"]).reshape(-1, D).shape[0] if np.asarray(
            cross[p + "pos_encoding"]).size % D == 0 else -1
        shapes = {"anchor_queries": (m, D), "pos_encoding": (1, rows, D), "q_proj.weight": (D, D),
                  "k_proj.weight": (D, D), "v_proj.weight": (D, D), "q_norm.weight": (D,),
                  "q_norm.bias": (D,), "k_norm.weight": (D,), "k_norm.bias": (D,),
                  "gate.0.weight": (m, D), "gate.0.bias": (m,), "out_proj.weight": (D, D),
                  "out_proj.bias": (D,), "res_scale": (1,)}
        for f in SCA_FIELDS:
            val = np.asarray(cross[p + f])
            if f == "res_scale":
                val = val.reshape(-1)
            out["cross_attn"][p + f] = _array(val, f"cross_attn.{p}{f}", shapes[f])
    out["cross_attn_config"] = dict(head.get("cross_attn_config") or {})
    return out


def _engine_names(head: dict, layers: list[int]):
    """(engine tensor name, getter path) pairs mapping the engine layout to the official dict."""
    pairs = [("anomaly_token", ("anomaly_token",)), ("normal_token", ("normal_token",)),
             ("ln_post.weight", ("ln_post_weight",)), ("ln_post.bias", ("ln_post_bias",))]
    saf = {"saf.w1": "mlp.0.weight", "saf.b1": "mlp.0.bias", "saf.w2": "mlp.3.weight", "saf.b2": "mlp.3.bias"}
    sca = {"sca.anchors": "anchor_queries", "sca.pos": "pos_encoding", "sca.wq": "q_proj.weight",
           "sca.wk": "k_proj.weight", "sca.wv": "v_proj.weight", "sca.q_norm.weight": "q_norm.weight",
           "sca.q_norm.bias": "q_norm.bias", "sca.k_norm.weight": "k_norm.weight",
           "sca.k_norm.bias": "k_norm.bias", "sca.gate.weight": "gate.0.weight", "sca.gate.bias": "gate.0.bias",
           "sca.out.weight": "out_proj.weight", "sca.out.bias": "out_proj.bias", "sca.res_scale": "res_scale"}
    for i, l in enumerate(layers):
        for ours, theirs in saf.items():
            pairs.append((f"layers.{i}.{ours}", ("layer_transforms", f"layer_{l}", theirs)))
        for ours, theirs in sca.items():
            pairs.append((f"layers.{i}.{ours}", ("cross_attn", f"layer_attentions.layer_{l}.{theirs}")))
    return pairs


def head_engine_config(head: dict, layers: list[int], width: int) -> dict:
    """The C head configuration for a validated head and the layers in use."""
    has_saf = [f"layer_{l}" in head["layer_transforms"] for l in layers]
    has_sca = [f"layer_attentions.layer_{l}.anchor_queries" in head["cross_attn"] for l in layers]
    n_anchors, pos_rows, saf_hidden = 1, 1, 1
    for l, s in zip(layers, has_sca):
        if s:
            p = f"layer_attentions.layer_{l}."
            n_anchors = head["cross_attn"][p + "anchor_queries"].shape[0]
            pos_rows = head["cross_attn"][p + "pos_encoding"].shape[1]
    for l, s in zip(layers, has_saf):
        if s:
            saf_hidden = head["layer_transforms"][f"layer_{l}"]["mlp.0.weight"].shape[0]
    return dict(width=int(width), n_layers=len(layers), n_anchors=int(n_anchors), pos_rows=int(pos_rows),
                saf_hidden=int(saf_hidden), has_sca=has_sca, has_saf=has_saf)


def pack_head(head: dict, layers: list[int], width: int, layout: list, total: int) -> np.ndarray:
    """The head's tensors in the engine's single buffer (layout from _engine.head_layout)."""
    params = np.empty(total, dtype=np.float32)
    where = dict(_engine_names(head, layers))
    for name, shape, offset, _panel in layout:
        node = head
        for part in where[name]:
            node = node[part]
        arr = np.asarray(node, dtype=np.float32).reshape(-1)
        size = int(np.prod(shape))
        if arr.size != size:
            raise ValueError(f"head tensor for '{name}' has {arr.size} values, expected shape {shape} "
                             "(all layers must share the number of anchors, SCA positions and SAF width)")
        params[offset:offset + size] = arr
    return params


def official_head(head: dict, layers: list[int], image_size: int, backbone_name: str) -> dict:
    """The dict the official code saves (docs/checkpoints.md), ready for torch.save-compatible writing."""
    out = {k: np.asarray(head[k], np.float32) for k in ("anomaly_token", "normal_token", "ln_post_weight",
                                                         "ln_post_bias")}
    out.update(features_list=[int(l) for l in layers], image_size=int(image_size),
               epoch=int(head.get("epoch", 0) or 0), backbone=str(head.get("backbone", backbone_name)),
               transform_type="mlp",
               layer_transforms={k: {n: np.asarray(a, np.float32) for n, a in v.items()}
                                 for k, v in head["layer_transforms"].items()},
               cross_attn={k: np.asarray(v, np.float32) for k, v in head["cross_attn"].items()},
               cross_attn_config=dict(head.get("cross_attn_config") or {"num_anchors": NUM_ANCHORS, "dropout": 0.1,
                                                                         "res_scale_init": RES_SCALE_INIT}))
    return out
