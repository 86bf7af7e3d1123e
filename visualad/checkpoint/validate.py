"""Checks that canonical tensors form one consistent ViT, and reads its architecture off the shapes.

Width D and patch P come from the patch embedding, the native grid G from the position table, depth
from the block indices (which must run 0..L-1), the MLP width from the first block; every other
tensor must then have exactly the shape this architecture implies, be floating-point, and no block
may hold tensors the architecture does not use.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ..errors import CheckpointError
from ..limits import MAX_DEPTH, MAX_GRID, MAX_PATCH, MAX_REGISTERS, MAX_WIDTH
from .describe import describe
from .lazy import is_floating, shape_of


def _shape(t: Mapping, key: str, where: str, expected: tuple | None = None) -> tuple:
    if key not in t:
        raise CheckpointError(f"{where}: missing tensor '{key}'")
    if not is_floating(t[key]):
        raise CheckpointError(f"{where}: tensor '{key}' is not floating-point")
    shape = shape_of(t[key])
    if expected is not None and shape != tuple(expected):
        raise CheckpointError(f"{where}: tensor '{key}' has shape {shape}, expected {tuple(expected)}")
    return shape


def _dim(t: Mapping, key: str, axis: int, where: str) -> int:
    s = _shape(t, key, where)
    if len(s) != 2:
        raise CheckpointError(f"{where}: tensor '{key}' has shape {s}, expected a matrix")
    return s[axis]


def _patch(t: Mapping, key: str, where: str) -> tuple[int, int]:
    s = _shape(t, key, where)
    if len(s) != 4 or s[1] != 3 or s[2] != s[3] or s[0] == 0 or s[2] == 0:
        raise CheckpointError(f"{where}: tensor '{key}' has shape {s}, expected (D, 3, P, P)")
    if s[0] > MAX_WIDTH or s[2] > MAX_PATCH:
        raise CheckpointError(f"{where}: tensor '{key}' has shape {s}: width <= {MAX_WIDTH} and patch <= "
                              f"{MAX_PATCH} are supported")
    return s[0], s[2]


def _grid(rows: int, key: str, where: str) -> int:
    g = math.isqrt(max(rows - 1, 0))
    if g == 0 or g * g != rows - 1:
        raise CheckpointError(f"{where}: tensor '{key}' has {rows} positions, expected 1 + G*G")
    if g > MAX_GRID:
        raise CheckpointError(f"{where}: tensor '{key}' has a {g}x{g} position grid; at most {MAX_GRID} is supported")
    return g


def _depth(t: Mapping, prefix: str, where: str) -> int:
    rx = re.compile(re.escape(prefix) + r"(\d{1,9})\.")
    found = {int(m.group(1)) for k in t for m in [rx.match(k)] if m}
    if not found:
        raise CheckpointError(f"{where}: no transformer blocks ('{prefix}0...')")
    if max(found) >= MAX_DEPTH:
        raise CheckpointError(f"{where}: block index {describe(max(found))} exceeds the limit of {MAX_DEPTH} blocks")
    missing = sorted(set(range(max(found) + 1)) - found)
    if missing:
        raise CheckpointError(f"{where}: transformer block(s) {missing} are missing")
    return max(found) + 1


def _check_blocks(t: Mapping, prefix: str, depth: int, expected: dict, where: str) -> None:
    for i in range(depth):
        p = f"{prefix}{i}."
        for suffix, shape in expected.items():
            _shape(t, p + suffix, where, shape)
        extra = sorted(k for k in t if k.startswith(p) and k[len(p):] not in expected)
        if extra:
            raise CheckpointError(f"{where}: unexpected tensor(s) {extra} in block {i}")


def check_clip(t: Mapping, where: str) -> dict:
    """Architecture of a canonical (OpenAI-named) CLIP vision tower."""
    d, p = _patch(t, "visual.conv1.weight", where)
    _shape(t, "visual.class_embedding", where, (d,))
    rows = _shape(t, "visual.positional_embedding", where)
    if len(rows) != 2 or rows[1] != d:
        raise CheckpointError(f"{where}: tensor 'visual.positional_embedding' has shape {rows}, expected (N, {d})")
    grid = _grid(rows[0], "visual.positional_embedding", where)
    for key in ("visual.ln_pre", "visual.ln_post"):
        _shape(t, key + ".weight", where, (d,))
        _shape(t, key + ".bias", where, (d,))
    prefix = "visual.transformer.resblocks."
    depth = _depth(t, prefix, where)
    hidden = _dim(t, prefix + "0.mlp.c_fc.weight", 0, where)
    _check_blocks(t, prefix, depth, {
        "ln_1.weight": (d,), "ln_1.bias": (d,), "attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,),
        "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
        "mlp.c_fc.weight": (hidden, d), "mlp.c_fc.bias": (hidden,), "mlp.c_proj.weight": (d, hidden),
        "mlp.c_proj.bias": (d,)}, where)
    return dict(width=d, depth=depth, patch=p, grid=grid, mlp_hidden=hidden, registers=0, layerscale=False,
                swiglu=False)


def check_dinov2(t: Mapping, where: str) -> dict:
    """Architecture of a canonical (hub-named) DINOv2 tower."""
    d, p = _patch(t, "patch_embed.proj.weight", where)
    _shape(t, "patch_embed.proj.bias", where, (d,))
    _shape(t, "cls_token", where, (1, 1, d))
    pos = _shape(t, "pos_embed", where)
    if len(pos) != 3 or pos[0] != 1 or pos[2] != d:
        raise CheckpointError(f"{where}: tensor 'pos_embed' has shape {pos}, expected (1, N, {d})")
    grid = _grid(pos[1], "pos_embed", where)
    registers = 0
    if "register_tokens" in t:
        reg = _shape(t, "register_tokens", where)
        if len(reg) != 3 or reg[0] != 1 or reg[2] != d:
            raise CheckpointError(f"{where}: tensor 'register_tokens' has shape {reg}, expected (1, R, {d})")
        registers = reg[1]
        if registers > MAX_REGISTERS:
            raise CheckpointError(f"{where}: {registers} register tokens; at most {MAX_REGISTERS} are supported")
    _shape(t, "norm.weight", where, (d,))
    _shape(t, "norm.bias", where, (d,))
    depth = _depth(t, "blocks.", where)
    swiglu = "blocks.0.mlp.w12.weight" in t
    layerscale = "blocks.0.ls1.gamma" in t
    expected = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
                "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,)}
    if swiglu:
        hidden = _dim(t, "blocks.0.mlp.w3.weight", 1, where)
        expected.update({"mlp.w12.weight": (2 * hidden, d), "mlp.w12.bias": (2 * hidden,),
                         "mlp.w3.weight": (d, hidden), "mlp.w3.bias": (d,)})
    else:
        hidden = _dim(t, "blocks.0.mlp.fc1.weight", 0, where)
        expected.update({"mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,),
                         "mlp.fc2.weight": (d, hidden), "mlp.fc2.bias": (d,)})
    if layerscale:
        expected.update({"ls1.gamma": (d,), "ls2.gamma": (d,)})
    _check_blocks(t, "blocks.", depth, expected, where)
    return dict(width=d, depth=depth, patch=p, grid=grid, mlp_hidden=hidden, registers=registers,
                layerscale=layerscale, swiglu=swiglu)


def check_tower(family: str, tensors: Mapping, where: str) -> dict:
    """Validates a canonical tower of ``family`` ('clip' or 'dinov2'); returns its architecture
    (width, depth, patch, grid, mlp_hidden, registers, layerscale, swiglu)."""
    if family == "clip":
        return check_clip(tensors, where)
    if family == "dinov2":
        return check_dinov2(tensors, where)
    raise CheckpointError(f"{where}: unknown backbone family {family}")
