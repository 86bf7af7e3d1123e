"""Independent PyTorch reference for VisualAD (docs/method.md).

This module is the yardstick the C engine is tested against.  It is written
from docs/method.md, plainly and in float32, using torch.nn.functional
ops wherever docs/method.md names a PyTorch behaviour (layer_norm, interpolate,
cosine_similarity, normalize, softmax, gelu, ...).  It deliberately does not
import anything from the `visualad` package.

Weights are plain dicts {name: torch.Tensor float32}:
  * CLIP backbones in OpenAI naming ("visual.*"),
  * DINOv2 backbones in torch-hub naming ("patch_embed.proj.weight", ...),
  * VisualAD heads in the official head-checkpoint layout (docs/checkpoints.md):
    {"anomaly_token", "normal_token", "ln_post_weight", "ln_post_bias",
     "features_list", "image_size", "layer_transforms": {"layer_6": {...}},
     "cross_attn": {"layer_attentions.layer_6.q_proj.weight": ...},
     "cross_attn_config": {...}, ...}

Facts checked against public sources (beyond docs/method.md) are marked "VERIFIED"
in comments; points docs/method.md leaves open are marked "AMBIGUITY".

Notes on the public release (7HHHHH/VisualAD), read to settle open points:
  * train.py builds SCA with apply_to_layer24=True (a module for every used layer, saved
    in the checkpoint); test.py builds it with the default apply_to_layer24=False.  Here a
    layer uses SCA iff the head has its keys, otherwise its tokens pass unchanged.
  * Patch tokens are collected in block order and zipped with features_list, so the
    official code assumes an ascending features_list; this reference assumes it too
    (the contrastive loss uses the tokens of layers[-1]).
  * anomaly_pos / normal_pos are copies of the class position and frozen
    (setup_model_training freezes every backbone parameter, they are not in the optimizer).
  * utils/scoring.py (top-k), utils/loss.py (Focal/Dice/Contrastive) and
    utils/analysis.py (test-time image score) are not public: those follow docs/method.md.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "DINOV2_MEAN", "DINOV2_STD",
    "random_clip_state", "random_dinov2_state", "random_head", "head_to_torch",
    "flatten_head", "head_grads",
    "clip_tower", "dinov2_tower", "visualad_encode", "visualad_maps", "visualad_losses",
    "head_forward", "visualad_head_losses", "losses_from_maps",
    "sca", "saf", "layer_map", "gaussian_filter_ref", "gaussian_kernel1d", "topk_mean",
    "focal_loss", "dice_loss", "preprocess_reference", "preprocess_mask_reference",
    "make_optimizer", "make_scheduler", "clip_token_grads", "train_step",
    "swiglu_hidden", "clip_to_hf", "dinov2_to_hf",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINOV2_MEAN = (0.485, 0.456, 0.406)
DINOV2_STD = (0.229, 0.224, 0.225)

F32 = torch.float32


# =====================================================================================
# small helpers
# =====================================================================================

def _t(x) -> torch.Tensor:
    """Tensor view of x as float32 (numpy arrays are converted; torch tensors kept as is
    when already float32, so autograd leaves survive)."""
    if isinstance(x, torch.Tensor):
        return x if x.dtype == F32 else x.to(F32)
    return torch.as_tensor(np.asarray(x), dtype=F32)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _randn(gen, *shape, std=1.0, mean=0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=F32) * std + mean).to(F32)


def _ln_params(gen, d):
    """Random (not 1/0) LayerNorm parameters."""
    return _randn(gen, d, std=0.3, mean=1.0), _randn(gen, d, std=0.2)


def _count_blocks(state: dict, prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state):
        n += 1
    return n


def _isqrt_exact(n: int, what: str) -> int:
    r = math.isqrt(n)
    if r * r != n:
        raise ValueError(f"{what}: {n} positions are not a square grid")
    return r


def swiglu_hidden(width: int, mlp_ratio: float = 4) -> int:
    """Hidden width of DINOv2's SwiGLU MLP.

    VERIFIED: facebookresearch/dinov2 dinov2/layers/swiglu_ffn.py (SwiGLUFFNFused):
        hidden_features = (int(hidden_features * 2 / 3) + 7) // 8 * 8, hidden_features = mlp_ratio*D
    and transformers (installed 5.24) models/dinov2/modeling_dinov2.py Dinov2SwiGLUFFN:
        hidden_features = int(config.hidden_size * config.mlp_ratio)
        hidden_features = (int(hidden_features * 2 / 3) + 7) // 8 * 8
    (ViT-g: D=1536 -> 4096).  Both rules agree.
    """
    h = int(width * mlp_ratio)
    return (int(h * 2 / 3) + 7) // 8 * 8


# =====================================================================================
# random weights with the real architectures
# =====================================================================================

def random_clip_state(width, depth, patch, grid, heads=None, mlp_ratio=4, seed=0, out_dim=None) -> dict:
    """Random OpenAI-CLIP vision tower ("visual.*" names), activations O(1).

    `heads` does not change any weight shape (it is only used by the towers, default
    width//64), it is accepted for symmetry with the towers' signature."""
    del heads
    g = _gen(seed)
    D, P = int(width), int(patch)
    Hd = int(mlp_ratio * D)
    s = {}
    s["visual.conv1.weight"] = _randn(g, D, 3, P, P, std=(3 * P * P) ** -0.5)
    s["visual.class_embedding"] = _randn(g, D)
    s["visual.positional_embedding"] = _randn(g, 1 + grid * grid, D, std=0.5)
    s["visual.ln_pre.weight"], s["visual.ln_pre.bias"] = _ln_params(g, D)
    for i in range(depth):
        p = f"visual.transformer.resblocks.{i}."
        s[p + "ln_1.weight"], s[p + "ln_1.bias"] = _ln_params(g, D)
        s[p + "attn.in_proj_weight"] = _randn(g, 3 * D, D, std=D ** -0.5)
        s[p + "attn.in_proj_bias"] = _randn(g, 3 * D, std=0.1)
        s[p + "attn.out_proj.weight"] = _randn(g, D, D, std=0.7 * D ** -0.5)
        s[p + "attn.out_proj.bias"] = _randn(g, D, std=0.1)
        s[p + "ln_2.weight"], s[p + "ln_2.bias"] = _ln_params(g, D)
        s[p + "mlp.c_fc.weight"] = _randn(g, Hd, D, std=D ** -0.5)
        s[p + "mlp.c_fc.bias"] = _randn(g, Hd, std=0.1)
        s[p + "mlp.c_proj.weight"] = _randn(g, D, Hd, std=0.7 * Hd ** -0.5)
        s[p + "mlp.c_proj.bias"] = _randn(g, D, std=0.1)
    s["visual.ln_post.weight"], s["visual.ln_post.bias"] = _ln_params(g, D)
    s["visual.proj"] = _randn(g, D, out_dim or max(1, D // 2), std=D ** -0.5)
    return s


def random_dinov2_state(width, depth, patch=14, grid=37, heads=None, registers=0, swiglu=False,
                        seed=0, mlp_ratio=4) -> dict:
    """Random DINOv2 ViT in torch-hub naming, activations O(1)."""
    del heads
    g = _gen(seed)
    D, P = int(width), int(patch)
    s = {}
    s["patch_embed.proj.weight"] = _randn(g, D, 3, P, P, std=(3 * P * P) ** -0.5)
    s["patch_embed.proj.bias"] = _randn(g, D, std=0.1)
    s["cls_token"] = _randn(g, 1, 1, D)
    s["pos_embed"] = _randn(g, 1, 1 + grid * grid, D, std=0.5)
    if registers:
        s["register_tokens"] = _randn(g, 1, int(registers), D)
    s["mask_token"] = torch.zeros(1, D, dtype=F32)
    for i in range(depth):
        p = f"blocks.{i}."
        s[p + "norm1.weight"], s[p + "norm1.bias"] = _ln_params(g, D)
        s[p + "attn.qkv.weight"] = _randn(g, 3 * D, D, std=D ** -0.5)
        s[p + "attn.qkv.bias"] = _randn(g, 3 * D, std=0.1)
        s[p + "attn.proj.weight"] = _randn(g, D, D, std=D ** -0.5)
        s[p + "attn.proj.bias"] = _randn(g, D, std=0.1)
        s[p + "ls1.gamma"] = _randn(g, D, std=0.2, mean=0.5)
        s[p + "norm2.weight"], s[p + "norm2.bias"] = _ln_params(g, D)
        if swiglu:
            h = swiglu_hidden(D, mlp_ratio)
            s[p + "mlp.w12.weight"] = _randn(g, 2 * h, D, std=D ** -0.5)
            s[p + "mlp.w12.bias"] = _randn(g, 2 * h, std=0.1)
            s[p + "mlp.w3.weight"] = _randn(g, D, h, std=h ** -0.5)
            s[p + "mlp.w3.bias"] = _randn(g, D, std=0.1)
        else:
            h = int(D * mlp_ratio)
            s[p + "mlp.fc1.weight"] = _randn(g, h, D, std=D ** -0.5)
            s[p + "mlp.fc1.bias"] = _randn(g, h, std=0.1)
            s[p + "mlp.fc2.weight"] = _randn(g, D, h, std=h ** -0.5)
            s[p + "mlp.fc2.bias"] = _randn(g, D, std=0.1)
        s[p + "ls2.gamma"] = _randn(g, D, std=0.2, mean=0.5)
    s["norm.weight"], s["norm.bias"] = _ln_params(g, D)
    return s


def random_head(width, layers, num_anchors=4, max_patches=1536, seed=0, image_size=518,
                sca_layers=None, res_scale=0.5) -> dict:
    """Random VisualAD head in the OFFICIAL head-checkpoint layout (docs/checkpoints.md).

    sca_layers: layers that get an SCA module (default: all of `layers`, which is what the
    published train.py builds with apply_to_layer24=True).  Pass e.g. layers[:-1] to get
    the test.py-style layout where the last layer has no SCA (tokens pass unchanged)."""
    g = _gen(seed)
    D = int(width)
    layers = [int(l) for l in layers]
    sca_layers = layers if sca_layers is None else [int(l) for l in sca_layers]
    ln_w, ln_b = _ln_params(g, D)
    head = {
        "anomaly_token": _randn(g, D),
        "normal_token": _randn(g, D),
        "token_insert_layer": 0,
        "ln_post_weight": ln_w,
        "ln_post_bias": ln_b,
        "features_list": list(layers),
        "image_size": int(image_size),
        "epoch": 1,
        "backbone": "random",
        "transform_type": "mlp",
        "layer_transforms": {},
        "cross_attn": {},
        "cross_attn_config": {"num_anchors": int(num_anchors), "dropout": 0.1,
                              "res_scale_init": 0.01, "apply_to_layer24": True},
    }
    for l in layers:
        head["layer_transforms"][f"layer_{l}"] = {
            "mlp.0.weight": _randn(g, D, D, std=D ** -0.5),
            "mlp.0.bias": _randn(g, D, std=0.1),
            "mlp.3.weight": _randn(g, D, D, std=D ** -0.5),
            "mlp.3.bias": _randn(g, D, std=0.1),
        }
    for l in sca_layers:
        p = f"layer_attentions.layer_{l}."
        ca = head["cross_attn"]
        ca[p + "anchor_queries"] = _randn(g, num_anchors, D)
        ca[p + "pos_encoding"] = _randn(g, 1, max_patches, D, std=0.3)
        ca[p + "q_proj.weight"] = _randn(g, D, D, std=D ** -0.5)
        ca[p + "k_proj.weight"] = _randn(g, D, D, std=D ** -0.5)
        ca[p + "v_proj.weight"] = _randn(g, D, D, std=D ** -0.5)
        ca[p + "q_norm.weight"], ca[p + "q_norm.bias"] = _ln_params(g, D)
        ca[p + "k_norm.weight"], ca[p + "k_norm.bias"] = _ln_params(g, D)
        ca[p + "gate.0.weight"] = _randn(g, num_anchors, D, std=D ** -0.5)
        ca[p + "gate.0.bias"] = _randn(g, num_anchors, std=0.5)
        ca[p + "out_proj.weight"] = _randn(g, D, D, std=D ** -0.5)
        ca[p + "out_proj.bias"] = _randn(g, D, std=0.1)
        ca[p + "res_scale"] = _randn(g, 1, std=0.1, mean=float(res_scale))
    return head


def head_to_torch(head: dict, requires_grad: bool = True) -> dict:
    """Copy of `head` where every array/tensor is a fresh float32 leaf tensor
    (requires_grad on the trainable ones when asked).  Non-tensor entries are copied."""
    def conv(v):
        if isinstance(v, (torch.Tensor, np.ndarray)):
            t = _t(v).detach().clone()
            if requires_grad:
                t.requires_grad_(True)
            return t
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(x for x in v)
        return v
    return {k: conv(v) for k, v in head.items()}


def flatten_head(head: dict) -> Dict[str, torch.Tensor]:
    """The trainable head tensors keyed by the flattened official names used by
    docs/api.md loss_and_grad: anomaly_token, normal_token, ln_post_weight, ln_post_bias,
    layer_transforms.layer_6.mlp.0.weight, cross_attn.layer_attentions.layer_6.q_proj.weight, ..."""
    out = {}
    for k in ("anomaly_token", "normal_token", "ln_post_weight", "ln_post_bias"):
        out[k] = head[k]
    for lname, sd in head.get("layer_transforms", {}).items():
        for k, v in sd.items():
            out[f"layer_transforms.{lname}.{k}"] = v
    for k, v in head.get("cross_attn", {}).items():
        out[f"cross_attn.{k}"] = v
    return out


def head_grads(head_t: dict) -> Dict[str, torch.Tensor]:
    """Gradients of a head_to_torch() head after backward(), flattened like flatten_head
    (zeros where a tensor received no gradient, e.g. pos_encoding rows >= N)."""
    out = {}
    for k, v in flatten_head(head_t).items():
        out[k] = v.grad.detach().clone() if v.grad is not None else torch.zeros_like(v)
    return out


# =====================================================================================
# building blocks
# =====================================================================================

def _ln(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), _t(w), _t(b), eps)


def _linear(x, w, b=None):
    return F.linear(x, _t(w), None if b is None else _t(b))


def _mha(x, w_qkv, b_qkv, w_out, b_out, heads):
    """Plain multi-head self-attention, packed qkv rows [q; k; v], scale dh^-1/2, no mask."""
    B, T, D = x.shape
    H = int(heads)
    dh = D // H
    qkv = _linear(x, w_qkv, b_qkv)                       # [B,T,3D]
    q, k, v = qkv.split(D, dim=-1)
    q = q.reshape(B, T, H, dh).transpose(1, 2)           # [B,H,T,dh]
    k = k.reshape(B, T, H, dh).transpose(1, 2)
    v = v.reshape(B, T, H, dh).transpose(1, 2)
    att = torch.softmax((q @ k.transpose(-1, -2)) * (dh ** -0.5), dim=-1)
    o = (att @ v).transpose(1, 2).reshape(B, T, D)
    return _linear(o, w_out, b_out)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _check_layers(layers, depth):
    layers = [int(l) for l in layers]
    for l in layers:
        if l < 0 or l > depth:
            raise ValueError(f"layer {l} outside 0..{depth}")
    return layers


# =====================================================================================
# CLIP tower (docs/method.md §2-§3)
# =====================================================================================

def clip_patch_positions(pos: torch.Tensor, g: int) -> torch.Tensor:
    """Patch rows of the positional embedding for a g x g grid: [g*g, D].
    docs/method.md §2: bilinear, align_corners=False, no antialias (F.interpolate with size=)."""
    pos = _t(pos)
    G0 = _isqrt_exact(pos.shape[0] - 1, "visual.positional_embedding")
    patch = pos[1:]
    if g == G0:
        return patch
    D = pos.shape[1]
    grid = patch.reshape(1, G0, G0, D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g, g), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(g * g, D)


def _tower_sizes(state, images, layers, heads, conv_key: str, block_prefix: str):
    """(images as a tensor, patch conv weight, width D, patch P, depth, heads H, checked layers) of a
    tower whose patch convolution is ``conv_key`` and whose blocks are named ``block_prefix{i}.``."""
    w = _t(state[conv_key])
    D, P = w.shape[0], w.shape[-1]
    depth = _count_blocks(state, block_prefix)
    H = int(heads) if heads else max(1, D // 64)
    return _t(images), w, D, P, depth, H, _check_layers(layers, depth)


def clip_tower(state, images, layers, inserted=None, heads=None, eps=1e-5) -> dict:
    """OpenAI CLIP vision tower, optionally with `inserted` [k,D] tokens placed before
    the class token, each with the class position (docs/method.md §2-§3).

    Returns {"hidden": {l: [B,T,D]} for each l in `layers` (0 = after ln_pre, l = residual
    stream after block l, 1-based), "final": [B,T,D] stream after the last block,
    "num_prefix": number of tokens before the patches}.  `visual.proj` is never used."""
    images, w, D, P, depth, H, layers = _tower_sizes(state, images, layers, heads, "visual.conv1.weight",
                                                     "visual.transformer.resblocks.")
    B = images.shape[0]

    x = F.conv2d(images, w, bias=None, stride=P)           # [B,D,g,g]
    g = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)                       # [B,N,D], row-major (y,x)
    pos = _t(state["visual.positional_embedding"])
    cls_pos = pos[0]
    patch_pos = clip_patch_positions(pos, g)

    cls = _t(state["visual.class_embedding"]) + cls_pos    # [D]
    prefix = [cls]
    if inserted is not None:
        ins = _t(inserted)
        prefix = [ins[i] + cls_pos for i in range(ins.shape[0])] + prefix
    pre = torch.stack(prefix, 0).unsqueeze(0).expand(B, -1, -1)
    x = torch.cat([pre, x + patch_pos], dim=1)

    x = _ln(x, state["visual.ln_pre.weight"], state["visual.ln_pre.bias"], eps)
    hidden = {}
    if 0 in layers:
        hidden[0] = x
    for i in range(depth):
        p = f"visual.transformer.resblocks.{i}."
        h = _ln(x, state[p + "ln_1.weight"], state[p + "ln_1.bias"], eps)
        x = x + _mha(h, state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"],
                     state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"], H)
        h = _ln(x, state[p + "ln_2.weight"], state[p + "ln_2.bias"], eps)
        h = quick_gelu(_linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
        x = x + _linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
        if (i + 1) in layers:
            hidden[i + 1] = x
    return {"hidden": hidden, "final": x, "num_prefix": len(prefix), "grid": g}


# =====================================================================================
# DINOv2 tower (docs/method.md §9)
# =====================================================================================

def dinov2_patch_positions(pos_embed: torch.Tensor, g: int, registers: int, mode=None) -> torch.Tensor:
    """Patch rows of DINOv2's pos_embed for a g x g grid: [g*g, D].

    VERIFIED (facebookresearch/dinov2, dinov2/models/vision_transformer.py
    interpolate_pos_encoding, and dinov2/hub/backbones.py):
      * nothing is resized when the grid already matches (518 px -> 37x37),
      * models without registers are built with interpolate_offset=0.1,
        interpolate_antialias=False -> F.interpolate(bicubic, scale_factor=(g+0.1)/G0),
        (PyTorch then samples with src = (dst+0.5)*G0/(g+0.1) - 0.5, A = -0.75),
      * the *_reg models are built with interpolate_offset=0.0, interpolate_antialias=True
        -> F.interpolate(bicubic, size=(g,g), antialias=True).
        NOTE: PyTorch's antialiased bicubic uses the PIL kernel A = -0.5 (checked in
        tests/test_reference.py), even when upsampling.
      * interpolation runs in float32 (pos_embed.float()).
    AMBIGUITY: transformers' Dinov2Model resizes with size=(g,g) without antialias (not the
    hub rule); only Dinov2WithRegistersModel matches the hub rule.  We follow the hub code
    as docs/method.md §9 asks.
    mode: None (by registers), "offset" or "size_aa" to force a rule."""
    pos_embed = _t(pos_embed)
    D = pos_embed.shape[-1]
    pe = pos_embed.reshape(-1, D)
    G0 = _isqrt_exact(pe.shape[0] - 1, "pos_embed")
    patch = pe[1:]
    if g == G0:
        return patch
    grid = patch.reshape(1, G0, G0, D).permute(0, 3, 1, 2)
    if mode is None:
        mode = "size_aa" if registers > 0 else "offset"
    if mode == "size_aa":
        grid = F.interpolate(grid, size=(g, g), mode="bicubic", antialias=True)
    elif mode == "offset":
        sf = float(g + 0.1) / G0
        grid = F.interpolate(grid, scale_factor=(sf, sf), mode="bicubic", antialias=False)
    else:
        raise ValueError(mode)
    assert grid.shape[-2:] == (g, g)
    return grid.permute(0, 2, 3, 1).reshape(g * g, D)


def dinov2_tower(state, images, layers, inserted=None, eps=1e-6, heads=None, pos_mode=None) -> dict:
    """DINOv2 ViT: sequence [inserted..., cls, reg_1..reg_R, patches] (docs/method.md §9).
    cls and inserted tokens get the cls position, registers none.

    Returns {"hidden": {l: [B,T,D]} (0 = embeddings), "final": [B,T,D] (before `norm`),
    "num_prefix": tokens before the patches (= k + 1 + R)}."""
    images, w, D, P, depth, H, layers = _tower_sizes(state, images, layers, heads, "patch_embed.proj.weight",
                                                     "blocks.")
    B = images.shape[0]
    R = state["register_tokens"].shape[1] if "register_tokens" in state else 0

    x = F.conv2d(images, w, bias=_t(state["patch_embed.proj.bias"]), stride=P)
    g = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    pe = _t(state["pos_embed"]).reshape(-1, D)
    cls_pos = pe[0]
    patch_pos = dinov2_patch_positions(state["pos_embed"], g, R, pos_mode)

    cls = _t(state["cls_token"]).reshape(D) + cls_pos
    prefix = [cls]
    if inserted is not None:
        ins = _t(inserted)
        prefix = [ins[i] + cls_pos for i in range(ins.shape[0])] + prefix
    parts = [torch.stack(prefix, 0).unsqueeze(0).expand(B, -1, -1)]
    if R:
        parts.append(_t(state["register_tokens"]).reshape(1, R, D).expand(B, -1, -1))
    parts.append(x + patch_pos)
    x = torch.cat(parts, dim=1)

    swiglu = "blocks.0.mlp.w12.weight" in state
    hidden = {}
    if 0 in layers:
        hidden[0] = x
    for i in range(depth):
        p = f"blocks.{i}."
        g1 = _t(state[p + "ls1.gamma"]) if (p + "ls1.gamma") in state else None
        g2 = _t(state[p + "ls2.gamma"]) if (p + "ls2.gamma") in state else None
        h = _ln(x, state[p + "norm1.weight"], state[p + "norm1.bias"], eps)
        a = _mha(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"],
                 state[p + "attn.proj.weight"], state[p + "attn.proj.bias"], H)
        x = x + (a * g1 if g1 is not None else a)
        h = _ln(x, state[p + "norm2.weight"], state[p + "norm2.bias"], eps)
        if swiglu:
            x12 = _linear(h, state[p + "mlp.w12.weight"], state[p + "mlp.w12.bias"])
            x1, x2 = x12.chunk(2, dim=-1)             # first half -> silu, second half gates
            m = _linear(F.silu(x1) * x2, state[p + "mlp.w3.weight"], state[p + "mlp.w3.bias"])
        else:
            m = _linear(F.gelu(_linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                        state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        x = x + (m * g2 if g2 is not None else m)
        if (i + 1) in layers:
            hidden[i + 1] = x
    return {"hidden": hidden, "final": x, "num_prefix": len(prefix) + R, "grid": g}


# =====================================================================================
# VisualAD head (docs/method.md §4-§8)
# =====================================================================================

def _default_eps(family):
    return 1e-5 if family == "clip" else 1e-6


def _tower(family, state, images, layers, inserted, eps, heads):
    if family == "clip":
        return clip_tower(state, images, layers, inserted=inserted, heads=heads, eps=eps)
    if family == "dinov2":
        return dinov2_tower(state, images, layers, inserted=inserted, eps=eps, heads=heads)
    raise ValueError(f"unknown family {family!r}")


def visualad_encode(family, state, head, images, layers, eps=None, heads=None) -> dict:
    """docs/api.md encode(): {"layers": {l: [B,N,D] = ln_post(x_l) patch tokens},
    "anomaly_token", "normal_token": [B,D] = ln_post(x_L)[:,0], [:,1] (before SCA),
    "grid": g}.  ln_post is the head's (trained) one, applied to the whole sequence
    (it is per-token, so slicing first is equivalent).  Tokens come from the FINAL block
    whatever `layers` is (docs/method.md §4).  eps: backbone LayerNorm eps (CLIP 1e-5,
    DINOv2 1e-6), also used for ln_post (it replaces the backbone's own final norm)."""
    eps = _default_eps(family) if eps is None else eps
    layers = [int(l) for l in layers]
    inserted = torch.stack([_t(head["anomaly_token"]).reshape(-1), _t(head["normal_token"]).reshape(-1)], 0)
    out = _tower(family, state, images, layers, inserted, eps, heads)
    lw, lb = head["ln_post_weight"], head["ln_post_bias"]
    start = out["num_prefix"]                     # CLIP: 3, DINOv2: 3 + R
    res = {"layers": {}, "grid": out["grid"], "patch_start": start}
    for l in layers:
        res["layers"][l] = _ln(out["hidden"][l], lw, lb, eps)[:, start:]
    fin = _ln(out["final"], lw, lb, eps)
    res["anomaly_token"] = fin[:, 0]
    res["normal_token"] = fin[:, 1]
    return res


def _sca_params(head, layer):
    p = f"layer_attentions.layer_{layer}."
    ca = head.get("cross_attn") or {}
    if (p + "q_proj.weight") not in ca:
        return None
    return {k[len(p):]: v for k, v in ca.items() if k.startswith(p)}


def sca(params: dict, token: torch.Tensor, patches: torch.Tensor, att_mask=None, out_mask=None) -> torch.Tensor:
    """Spatial-Aware Cross-Attention, SCA (docs/method.md §5).  token [B,D], patches [B,N,D].
    Param names as in the official checkpoint, minus the 'layer_attentions.layer_l.' prefix.
    VERIFIED against 7HHHHH/VisualAD utils/spatial_cross_attention.py
    (SpatialBottleneckAttention): LayerNorms are nn.LayerNorm defaults (eps 1e-5), scale is
    C**-0.5 with C the full width, softmax over the patches.
    Dropout (training): att_mask [B,m,N] multiplies the softmax weights and out_mask [B,D] the
    output projection (multipliers 0 or 1/(1-p), i.e. what nn.Dropout applies; VERIFIED there:
    self.dropout after F.softmax and after out_proj).  None = no dropout."""
    B, N, D = patches.shape
    E = _t(params["pos_encoding"]).reshape(-1, D)
    if N > E.shape[0]:
        raise ValueError(f"{N} patches exceed the SCA pos_encoding rows ({E.shape[0]})")
    A = _t(params["anchor_queries"])                                      # [m,D]
    Q = _ln(_linear(A, params["q_proj.weight"]), params["q_norm.weight"], params["q_norm.bias"], 1e-5)
    K = _ln(_linear(patches + E[:N], params["k_proj.weight"]),
            params["k_norm.weight"], params["k_norm.bias"], 1e-5)          # [B,N,D]
    V = _linear(patches, params["v_proj.weight"])                         # [B,N,D]
    att = torch.softmax(torch.matmul(Q, K.transpose(1, 2)) * (D ** -0.5), dim=-1)  # [B,m,N]
    if att_mask is not None:
        att = att * _t(att_mask)
    U = torch.matmul(att, V)                                              # [B,m,D]
    gate = torch.sigmoid(_linear(token, params["gate.0.weight"], params["gate.0.bias"]))  # [B,m]
    agg = (U * gate.unsqueeze(-1)).sum(dim=1)                             # [B,D]
    out = _linear(agg, params["out_proj.weight"], params["out_proj.bias"])
    if out_mask is not None:
        out = out * _t(out_mask)
    return token + _t(params["res_scale"]).reshape(()) * out


def saf(params: dict, patches: torch.Tensor, hidden_mask=None, out_mask=None) -> torch.Tensor:
    """Self-Alignment Function, SAF (docs/method.md §6): mlp.3(GELU_erf(mlp.0(P))), no residual.  Dropout (training, docs/method.md §11:
    after the GELU and after W2): hidden_mask [B,N,H], out_mask [B,N,D] multipliers; None = none."""
    h = F.gelu(_linear(patches, params["mlp.0.weight"], params["mlp.0.bias"]))
    if hidden_mask is not None:
        h = h * _t(hidden_mask)
    out = _linear(h, params["mlp.3.weight"], params["mlp.3.bias"])
    return out * _t(out_mask) if out_mask is not None else out


def layer_map(patches_hat, ta, tn, grid, S) -> torch.Tensor:
    """docs/method.md §7: per-patch cos(P, ta) - cos(P, tn), g x g -> S x S bilinear.

    Follows the official generate_anomaly_map_from_tokens (VERIFIED, 7HHHHH/VisualAD
    train.py/test.py): tokens are F.normalize(eps=1e-8)'d (test.py normalises once and the
    map function once more), patches are F.normalize(eps=1e-8)'d, then
    torch.cosine_similarity (eps 1e-8).  Mathematically this is the plain cosine."""
    B = patches_hat.shape[0]
    ta_n = F.normalize(F.normalize(ta, dim=1, eps=1e-8), dim=1, eps=1e-8)
    tn_n = F.normalize(F.normalize(tn, dim=1, eps=1e-8), dim=1, eps=1e-8)
    p_n = F.normalize(patches_hat, dim=2, eps=1e-8)
    sa = F.cosine_similarity(p_n, ta_n.unsqueeze(1), dim=2, eps=1e-8)
    sn = F.cosine_similarity(p_n, tn_n.unsqueeze(1), dim=2, eps=1e-8)
    s = (sa - sn).reshape(B, 1, grid, grid)
    return F.interpolate(s, size=(S, S), mode="bilinear", align_corners=False).squeeze(1)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """SciPy's kernel: radius int(truncate*sigma+0.5), exp(-x^2/(2 sigma^2)) / sum, float64."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 / (float(sigma) ** 2) * x * x)
    return k / k.sum()


def _reflect_index(n: int, radius: int) -> torch.Tensor:
    """Indices for SciPy mode 'reflect' (half-sample symmetric, d c b a | a b c d | d c b a),
    valid for any radius (repeats the reflection when radius >= n)."""
    i = torch.arange(-radius, n + radius)
    period = 2 * n
    j = torch.remainder(i, period)
    return torch.where(j >= n, period - 1 - j, j)


def _filter_axis(x64: torch.Tensor, k: torch.Tensor, axis: int) -> torch.Tensor:
    """Correlate a float64 [..., H, W] array with the symmetric kernel k along axis (-2 or -1)."""
    radius = (k.numel() - 1) // 2
    x = x64.movedim(axis, -1)
    n = x.shape[-1]
    xp = x.index_select(-1, _reflect_index(n, radius))
    shp = xp.shape
    y = F.conv1d(xp.reshape(-1, 1, shp[-1]), k.view(1, 1, -1)).reshape(*shp[:-1], n)
    return y.movedim(-1, axis)


def gaussian_filter_ref(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(map, sigma) on each [.., H, W] map, mode 'reflect'.

    Like SciPy on a float32 input: each axis pass is computed in float64 and stored into
    the float32 output array, axis 0 (rows index) first, then axis 1.  sigma 0 = identity."""
    maps = _t(maps)
    if not sigma or sigma <= 0:
        return maps.clone()
    k = gaussian_kernel1d(sigma, truncate)
    y = _filter_axis(maps.double(), k, -2).to(F32)
    y = _filter_axis(y.double(), k, -1).to(F32)
    return y


def topk_count(S: int, topk_ratio: float) -> int:
    """k = ceil(S*S*ratio) (docs/method.md §8), at least 1.
    AMBIGUITY: the official utils/scoring.py is not public; ceil() is what docs/method.md §8 states.  The
    product is a Python float; e.g. 518*518*0.01 = 2683.24 -> 2684."""
    return max(1, int(math.ceil(S * S * float(topk_ratio))))


def topk_mean(maps: torch.Tensor, topk_ratio: float = 0.01) -> torch.Tensor:
    """Mean of the top ceil(S*S*ratio) values of each [B,S,S] map -> [B]."""
    B, H, W = maps.shape
    k = topk_count(H, topk_ratio) if H == W else max(1, int(math.ceil(H * W * float(topk_ratio))))
    return torch.topk(maps.reshape(B, -1), k, dim=1).values.mean(dim=1)


def head_forward(head, feats, ta0, tn0, layers, S, dropout_masks=None):
    """SCA, SAF and the per-layer S x S maps from the encode outputs: feats {l: [B,N,D]}
    (ln_post'd patch tokens), ta0/tn0 [B,D] (ln_post'd final tokens, before SCA).
    Returns (maps {l: [B,S,S]}, tokens {l: (ta', tn')}).

    dropout_masks: None (no dropout) or a callable (site, i, token) -> multiplier tensor for
    used-layer index i: site "saf_hidden" [B,N,H], "saf_out" [B,N,D] (token 0), "sca_att"
    [B,m,N], "sca_out" [B,D] (token 0 = t_a, 1 = t_n: the official module is called once per
    token, so each call draws its own masks)."""
    layers = [int(l) for l in layers]
    dm = dropout_masks or (lambda site, i, token: None)
    maps, tokens = {}, {}
    for i, l in enumerate(layers):
        P = feats[l]
        g = math.isqrt(P.shape[1])
        prm = _sca_params(head, l)
        if prm is not None:
            ta = sca(prm, ta0, P, dm("sca_att", i, 0), dm("sca_out", i, 0))
            tn = sca(prm, tn0, P, dm("sca_att", i, 1), dm("sca_out", i, 1))
        else:                                         # no SCA module for this layer
            ta, tn = ta0, tn0
        tokens[l] = (ta, tn)
        lt = head["layer_transforms"].get(f"layer_{l}")
        # AMBIGUITY: no SAF -> raw P_l (official code)
        Ph = saf(lt, P, dm("saf_hidden", i, 0), dm("saf_out", i, 0)) if lt is not None else P
        maps[l] = layer_map(Ph, ta, tn, g, S)
    return maps, tokens


def _forward(family, state, head, images, layers, eps=None, heads=None):
    images = _t(images)
    S = images.shape[-1]
    enc = visualad_encode(family, state, head, images, layers, eps=eps, heads=heads)
    maps, tokens = head_forward(head, enc["layers"], enc["anomaly_token"], enc["normal_token"], layers, S)
    return enc, maps, tokens


def visualad_maps(family, state, head, images, layers, sigma=4.0, topk_ratio=0.01, eps=None, heads=None) -> dict:
    """docs/method.md §5-§8.  Returns {"layer_maps": {l: [B,S,S]} unfiltered per-layer maps,
    "fused": [B,S,S] their sum, "final": gaussian-filtered fused map, "scores": [B] top-k
    mean of "final", "tokens": {l: (ta', tn')}}."""
    enc, maps, tokens = _forward(family, state, head, images, layers, eps, heads)
    layers = [int(l) for l in layers]
    # official: torch.stack(anomaly_map_list).sum(dim=0), list in `layers` order
    fused = torch.stack([maps[l] for l in layers]).sum(dim=0)
    final = gaussian_filter_ref(fused, sigma)
    return {"layer_maps": maps, "fused": fused, "final": final,
            "scores": topk_mean(final, topk_ratio), "tokens": tokens, "encode": enc}


# =====================================================================================
# losses (docs/method.md §10)
# =====================================================================================

def focal_loss(p: torch.Tensor, gt: torch.Tensor, gamma=2.0, smooth=1e-5) -> torch.Tensor:
    """AnomalyCLIP-style FocalLoss on probs [1-p, p] (alpha=1): one-hot target clamped to
    [smooth, 1-smooth], pt = sum_c onehot_c*prob_c + smooth, mean of -(1-pt)^gamma*log(pt)."""
    probs = torch.stack([1 - p, p], dim=-1).reshape(-1, 2)
    idx = gt.reshape(-1).long()
    onehot = F.one_hot(idx, 2).to(F32).clamp(smooth, 1.0 - smooth)
    pt = (onehot * probs).sum(dim=1) + smooth
    return (-(1 - pt) ** gamma * torch.log(pt)).mean()


def dice_loss(p: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """1 - (1/B) sum_b (2 sum p g + 1) / (sum p + sum g + 1)."""
    B = p.shape[0]
    pf, gf = p.reshape(B, -1), gt.reshape(B, -1).to(F32)
    dice = (2 * (pf * gf).sum(1) + 1) / (pf.sum(1) + gf.sum(1) + 1)
    return 1 - dice.sum() / B


def visualad_losses(family, state, head, images, labels, masks, layers, topk_ratio=0.01,
                    eps=None, heads=None, has_mask=None) -> dict:
    """The docs/method.md §10 losses with dropout 0: {"cls", "seg", "contrastive", "total"} (torch scalars).

    Use head = head_to_torch(head, requires_grad=True) and call total.backward(): the
    gradient reaches every trainable head tensor, t_a and t_n through the frozen backbone.
    labels [B] (0/1), masks [B,S,S] (0/1) or None (all normal), has_mask: see losses_from_maps."""
    layers = [int(l) for l in layers]
    images = _t(images)
    _, maps, tokens = _forward(family, state, head, images, layers, eps, heads)
    return losses_from_maps(maps, tokens, layers, labels, masks, topk_ratio, has_mask)


def visualad_head_losses(head, feats, ta, tn, labels, masks, layers, S, topk_ratio=0.01, has_mask=None,
                         dropout_masks=None) -> dict:
    """The docs/method.md §10 losses from the encode outputs alone (feats {l: [B,N,D]}, ta/tn [B,D]: pass
    leaf tensors with requires_grad to get their gradients), so the head can be checked apart
    from the backbone.  dropout_masks: see head_forward."""
    layers = [int(l) for l in layers]
    maps, tokens = head_forward(head, feats, _t(ta), _t(tn), layers, S, dropout_masks)
    return losses_from_maps(maps, tokens, layers, labels, masks, topk_ratio, has_mask)


def losses_from_maps(maps, tokens, layers, labels, masks, topk_ratio=0.01, has_mask=None) -> dict:
    """The docs/method.md §10 losses from the per-layer unfiltered maps {l: [B,S,S]} and SCA tokens.

    has_mask [B] (default all true): the segmentation loss (Focal + Dice per layer) is computed
    on the sub-batch of images whose mask counts, exactly as if only they were in the batch
    (Focal = mean over their pixels, Dice = 1 - mean of their coefficients); 0 when none counts.
    This is how a defective image without a ground-truth mask is handled (it contributes only
    the classification and contrastive terms); a good image without a mask should be passed
    with has_mask true and a zero mask.  With every has_mask true this is docs/method.md §10 verbatim."""
    layers = [int(l) for l in layers]
    first = maps[layers[0]]
    B = first.shape[0]
    gt = torch.zeros_like(first) if masks is None else (_t(masks) > 0.5).to(F32)
    keep = torch.ones(B, dtype=torch.bool) if has_mask is None else torch.as_tensor(
        np.asarray(has_mask).reshape(-1).astype(bool))
    seg = torch.zeros((), dtype=F32)
    if bool(keep.any()):
        for l in layers:
            p = torch.sigmoid(maps[l][keep])
            seg = seg + focal_loss(p, gt[keep]) + dice_loss(p, gt[keep])
    fused = torch.stack([maps[l] for l in layers]).sum(dim=0)   # unfiltered fused map
    cls = F.binary_cross_entropy_with_logits(topk_mean(fused, topk_ratio), _t(labels).reshape(-1))
    # contrastive: SCA-enhanced tokens of the last used layer (official: features_list[-1]),
    # normalised with F.normalize(eps=1e-8) first as train.py does.
    ta, tn = tokens[layers[-1]]
    cos = F.cosine_similarity(F.normalize(ta, dim=1, eps=1e-8), F.normalize(tn, dim=1, eps=1e-8), dim=1)
    ctr = torch.clamp(cos + 0.5, min=0).mean()
    return {"cls": cls, "seg": seg, "contrastive": ctr, "total": cls + seg + ctr}


# =====================================================================================
# preprocessing (docs/method.md §1)
# =====================================================================================

def preprocess_reference(pil_image, S, family) -> np.ndarray:
    """[3,S,S] float32: RGB, PIL bicubic resize to (S,S), /255, (x-mean)/std — the
    torchvision Resize((S,S), BICUBIC) + ToTensor + Normalize semantics with torch ops."""
    from PIL import Image
    img = pil_image.convert("RGB").resize((int(S), int(S)), Image.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    x = x.to(F32).div(255)
    mean, std = (CLIP_MEAN, CLIP_STD) if family == "clip" else (DINOV2_MEAN, DINOV2_STD)
    mean = torch.as_tensor(mean, dtype=F32).view(3, 1, 1)
    std = torch.as_tensor(std, dtype=F32).view(3, 1, 1)
    return x.sub(mean).div(std).numpy()


def preprocess_mask_reference(pil_mask, S) -> np.ndarray:
    """[S,S] float32 in {0,1}: binarise (>0), resize (S,S) PIL bilinear, pixel >= 128."""
    from PIL import Image
    m = np.array(pil_mask.convert("L")) > 0
    m = Image.fromarray(m.astype(np.uint8) * 255, mode="L").resize((int(S), int(S)), Image.BILINEAR)
    return (np.array(m) >= 128).astype(np.float32)


# =====================================================================================
# training step reference (docs/method.md §11) — plain torch.optim.AdamW
# =====================================================================================

def make_optimizer(head_t: dict, lr: float = 1e-3, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW groups as the official create_optimizer (VERIFIED, 7HHHHH/VisualAD
    utils/training_utils.py): [t_a] lr, [t_n] lr, [ln_post w,b] lr/10, one group per SAF
    lr/10, one group for all SCA lr/10; weight decay 0.01 everywhere, betas (0.9,0.999),
    eps 1e-8 (default)."""
    groups = [
        {"params": [head_t["anomaly_token"]], "lr": lr, "weight_decay": weight_decay},
        {"params": [head_t["normal_token"]], "lr": lr, "weight_decay": weight_decay},
        {"params": [head_t["ln_post_weight"], head_t["ln_post_bias"]], "lr": lr * 0.1,
         "weight_decay": weight_decay},
    ]
    for name in sorted(head_t["layer_transforms"], key=lambda s: int(s.split("_")[-1])):
        sd = head_t["layer_transforms"][name]
        groups.append({"params": [sd[k] for k in ("mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias")],
                       "lr": lr * 0.1, "weight_decay": weight_decay})
    ca = list(head_t.get("cross_attn", {}).values())
    if ca:
        groups.append({"params": ca, "lr": lr * 0.1, "weight_decay": weight_decay})
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


def make_scheduler(opt, epochs: int, lr: float = 1e-3):
    """CosineAnnealingLR(T_max=epochs, eta_min=lr*0.1), stepped once per epoch."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=lr * 0.1)


def clip_token_grads(head_t: dict, max_norm: float = 1.0) -> bool:
    """Clip the gradient norms of t_a and of t_n separately (torch clip_grad_norm_:
    coef = max_norm/(norm+1e-6) capped at 1).  Returns False if a token gradient is NaN."""
    for k in ("anomaly_token", "normal_token"):
        gr = head_t[k].grad
        if gr is not None:
            if torch.isnan(gr).any():
                return False
            torch.nn.utils.clip_grad_norm_([head_t[k]], max_norm=max_norm)
    return True


def train_step(family, state, head_t, opt, images, labels, masks, layers, topk_ratio=0.01, eps=None,
               heads=None) -> Optional[dict]:
    """One training step (dropout 0).  Returns the float losses, or None when skipped."""
    opt.zero_grad(set_to_none=True)
    losses = visualad_losses(family, state, head_t, images, labels, masks, layers, topk_ratio, eps, heads)
    if any(torch.isnan(v).any() for v in losses.values()):
        return None
    losses["total"].backward()
    if not clip_token_grads(head_t):
        opt.zero_grad(set_to_none=True)
        return None
    opt.step()
    return {k: float(v.detach()) for k, v in losses.items()}


# =====================================================================================
# mapping to HF transformers naming (used by the self-checks)
# =====================================================================================

def _split_qkv(o: dict, names, W, b) -> None:
    """The q, k and v rows of a packed projection (W [3D, D], b [3D]) as o[name + ".weight" / ".bias"]."""
    D = W.shape[1]
    for j, name in enumerate(names):
        o[name + ".weight"], o[name + ".bias"] = W[j * D:(j + 1) * D], b[j * D:(j + 1) * D]


def clip_to_hf(state: dict) -> dict:
    """OpenAI 'visual.*' -> transformers CLIPVisionModel state dict."""
    o = {}
    o["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    o["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"]
    o["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    o["vision_model.pre_layrnorm.weight"] = state["visual.ln_pre.weight"]
    o["vision_model.pre_layrnorm.bias"] = state["visual.ln_pre.bias"]
    depth = _count_blocks(state, "visual.transformer.resblocks.")
    for i in range(depth):
        p, q = f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        _split_qkv(o, [q + f"self_attn.{n}_proj" for n in "qkv"], state[p + "attn.in_proj_weight"],
                   state[p + "attn.in_proj_bias"])
        o[q + "self_attn.out_proj.weight"] = state[p + "attn.out_proj.weight"]
        o[q + "self_attn.out_proj.bias"] = state[p + "attn.out_proj.bias"]
        o[q + "layer_norm1.weight"] = state[p + "ln_1.weight"]
        o[q + "layer_norm1.bias"] = state[p + "ln_1.bias"]
        o[q + "layer_norm2.weight"] = state[p + "ln_2.weight"]
        o[q + "layer_norm2.bias"] = state[p + "ln_2.bias"]
        o[q + "mlp.fc1.weight"] = state[p + "mlp.c_fc.weight"]
        o[q + "mlp.fc1.bias"] = state[p + "mlp.c_fc.bias"]
        o[q + "mlp.fc2.weight"] = state[p + "mlp.c_proj.weight"]
        o[q + "mlp.fc2.bias"] = state[p + "mlp.c_proj.bias"]
    o["vision_model.post_layernorm.weight"] = state["visual.ln_post.weight"]
    o["vision_model.post_layernorm.bias"] = state["visual.ln_post.bias"]
    return o


def dinov2_to_hf(state: dict, new_names: bool = True) -> dict:
    """DINOv2 hub naming -> transformers Dinov2Model / Dinov2WithRegistersModel.
    new_names=True: transformers >= 5 (attention.q_proj/.../o_proj, mlp.gate_proj/up_proj/
    down_proj); False: the 4.x / on-disk names (attention.attention.query, ...,
    attention.output.dense, mlp.weights_in/weights_out) that docs/checkpoints.md lists.
    VERIFIED in installed transformers 5.24 conversion_mapping.py: weights_in is split with
    Chunk(dim=0) into gate_proj (first half) and up_proj (second half), like w12's chunk."""
    o = {}
    o["embeddings.cls_token"] = state["cls_token"]
    o["embeddings.mask_token"] = state["mask_token"].reshape(1, -1)
    o["embeddings.position_embeddings"] = state["pos_embed"]
    if "register_tokens" in state:
        o["embeddings.register_tokens"] = state["register_tokens"]
    o["embeddings.patch_embeddings.projection.weight"] = state["patch_embed.proj.weight"]
    o["embeddings.patch_embeddings.projection.bias"] = state["patch_embed.proj.bias"]
    depth = _count_blocks(state, "blocks.")
    for i in range(depth):
        p, q = f"blocks.{i}.", f"encoder.layer.{i}."
        names = [q + (f"attention.{new}" if new_names else f"attention.attention.{old}")
                 for new, old in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))]
        _split_qkv(o, names, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        oname = "attention.o_proj" if new_names else "attention.output.dense"
        o[q + oname + ".weight"] = state[p + "attn.proj.weight"]
        o[q + oname + ".bias"] = state[p + "attn.proj.bias"]
        o[q + "layer_scale1.lambda1"] = state[p + "ls1.gamma"]
        o[q + "layer_scale2.lambda1"] = state[p + "ls2.gamma"]
        o[q + "norm1.weight"], o[q + "norm1.bias"] = state[p + "norm1.weight"], state[p + "norm1.bias"]
        o[q + "norm2.weight"], o[q + "norm2.bias"] = state[p + "norm2.weight"], state[p + "norm2.bias"]
        if (p + "mlp.w12.weight") in state:
            W12, b12 = state[p + "mlp.w12.weight"], state[p + "mlp.w12.bias"]
            h = W12.shape[0] // 2
            if new_names:
                o[q + "mlp.gate_proj.weight"], o[q + "mlp.up_proj.weight"] = W12[:h], W12[h:]
                o[q + "mlp.gate_proj.bias"], o[q + "mlp.up_proj.bias"] = b12[:h], b12[h:]
                o[q + "mlp.down_proj.weight"] = state[p + "mlp.w3.weight"]
                o[q + "mlp.down_proj.bias"] = state[p + "mlp.w3.bias"]
            else:
                o[q + "mlp.weights_in.weight"], o[q + "mlp.weights_in.bias"] = W12, b12
                o[q + "mlp.weights_out.weight"] = state[p + "mlp.w3.weight"]
                o[q + "mlp.weights_out.bias"] = state[p + "mlp.w3.bias"]
        else:
            for n in ("fc1", "fc2"):
                o[q + f"mlp.{n}.weight"] = state[p + f"mlp.{n}.weight"]
                o[q + f"mlp.{n}.bias"] = state[p + f"mlp.{n}.bias"]
    o["layernorm.weight"], o["layernorm.bias"] = state["norm.weight"], state["norm.bias"]
    return o
