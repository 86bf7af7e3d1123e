"""Tensor names of every supported CLIP / DINOv2 vision tower -> the two canonical namings.

Canonical CLIP is OpenAI's (``visual.conv1.weight``, ``visual.transformer.resblocks.{i}.attn.
in_proj_weight``, ...); canonical DINOv2 is the hub's (``patch_embed.proj.weight``,
``blocks.{i}.attn.qkv.weight``, ...). Recognised source namings:

- ``openai``: OpenAI / open_clip, with ``visual.`` (full model) or bare (vision tower alone);
- ``timm-clip``: timm CLIP towers (``patch_embed.proj``, ``norm_pre``, ``blocks.{i}.attn.qkv``, ``norm``);
- ``hf-clip``: transformers CLIPVisionModel / CLIPModel (separate q, k, v are packed);
- ``dinov2-hub`` / ``timm-dinov2``: the DINOv2 hub layout (also with FSDP block chunks) and timm's
  variant of it (``reg_token``, SwiGLU packed in ``mlp.fc1``);
- ``hf-dinov2``: transformers Dinov2Model / Dinov2WithRegistersModel, in the on-disk naming and in
  the in-memory naming of transformers >= 5 (``q_proj``, ``gate_proj``...).

A tower is found wherever its anchor keys sit, under any prefix (``module.``, ``state_dict.``,
``vision_model.``...). Unknown tensors inside a transformer block are errors (an unsupported variant
would otherwise be silently mis-read); tensors outside the tower (text tower, projections, heads,
``mask_token``) are dropped.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import CheckpointError
from .lazy import Concatenated, Reshaped, shape_of


@dataclass(frozen=True)
class NamingSpec:
    """How one source naming maps onto a canonical one."""

    name: str
    family: str
    anchors: tuple  # keys (relative to the tower prefix) that identify the naming
    top: dict  # source key -> canonical key, outside the blocks
    block_re: str  # regex with groups (block index, suffix) over source keys
    block_dst: str  # canonical block prefix, formatted with the block index
    block: dict  # source suffix -> canonical suffix inside a block
    packs: tuple = ()  # (canonical suffix, source suffixes concatenated along axis 0)
    reshape: dict = field(default_factory=dict)  # canonical key -> new shape from the source shape
    unsupported: tuple = ()  # source keys of variants the engine cannot run
    heads_attr: str | None = None  # TorchScript attribute giving the number of heads


@dataclass
class Canonical:
    """A tower in canonical naming (values are arrays or lazy tensors)."""

    family: str
    naming: str
    prefix: str
    tensors: dict
    heads: int | None = None


def _same(*names: str) -> dict:
    return {n: n for n in names}


def _wb(*stems: str) -> tuple:
    return tuple(f"{s}.{p}" for s in stems for p in ("weight", "bias"))


_CLIP_BLOCK = "visual.transformer.resblocks.{}."
_CLIP_TOP = ("conv1.weight", "class_embedding", "positional_embedding") + _wb("ln_pre", "ln_post")
_DINO_BLOCK = "blocks.{}."
_DINO_TOP = ("cls_token", "pos_embed", "register_tokens") + _wb("patch_embed.proj", "norm")
_DINO_BLOCK_KEYS = _wb("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2", "mlp.w12", "mlp.w3") + (
    "ls1.gamma", "ls2.gamma")

OPENAI = NamingSpec(
    name="openai", family="clip",
    anchors=("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight"),
    top={k: "visual." + k for k in _CLIP_TOP},
    block_re=r"transformer\.resblocks\.(\d+)\.(.+)", block_dst=_CLIP_BLOCK,
    block=_same("attn.in_proj_weight", "attn.in_proj_bias", *_wb("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc",
                                                                  "mlp.c_proj")),
    unsupported=("conv1.bias",),
    heads_attr="transformer.resblocks.0.attn.num_heads",
)

TIMM_CLIP = NamingSpec(
    name="timm-clip", family="clip",
    anchors=("patch_embed.proj.weight", "pos_embed", "cls_token", "norm_pre.weight"),
    top={"patch_embed.proj.weight": "visual.conv1.weight", "cls_token": "visual.class_embedding",
         "pos_embed": "visual.positional_embedding", "norm_pre.weight": "visual.ln_pre.weight",
         "norm_pre.bias": "visual.ln_pre.bias", "norm.weight": "visual.ln_post.weight",
         "norm.bias": "visual.ln_post.bias"},
    block_re=r"blocks\.(\d+)\.(.+)", block_dst=_CLIP_BLOCK,
    block={"norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias", "attn.qkv.weight": "attn.in_proj_weight",
           "attn.qkv.bias": "attn.in_proj_bias", "attn.proj.weight": "attn.out_proj.weight",
           "attn.proj.bias": "attn.out_proj.bias", "norm2.weight": "ln_2.weight", "norm2.bias": "ln_2.bias",
           "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
           "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias"},
    reshape={"visual.class_embedding": lambda s: s[-1:], "visual.positional_embedding": lambda s: s[-2:]},
    unsupported=("patch_embed.proj.bias", "reg_token"),
)

HF_CLIP = NamingSpec(
    name="hf-clip", family="clip",
    anchors=("embeddings.patch_embedding.weight", "embeddings.class_embedding", "pre_layrnorm.weight"),
    top={"embeddings.patch_embedding.weight": "visual.conv1.weight",
         "embeddings.class_embedding": "visual.class_embedding",
         "embeddings.position_embedding.weight": "visual.positional_embedding",
         "pre_layrnorm.weight": "visual.ln_pre.weight", "pre_layrnorm.bias": "visual.ln_pre.bias",
         "post_layernorm.weight": "visual.ln_post.weight", "post_layernorm.bias": "visual.ln_post.bias"},
    block_re=r"encoder\.layers\.(\d+)\.(.+)", block_dst=_CLIP_BLOCK,
    block={"layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
           "self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
           "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
           "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
           "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias"},
    packs=(("attn.in_proj_weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
           ("attn.in_proj_bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"))),
    unsupported=("embeddings.patch_embedding.bias",),
)

DINOV2 = NamingSpec(
    name="dinov2-hub", family="dinov2",
    anchors=("patch_embed.proj.weight", "pos_embed", "cls_token"),
    top=_same(*_DINO_TOP),
    block_re=r"blocks\.(?:\d+\.)?(\d+)\.(.+)", block_dst=_DINO_BLOCK,  # optional FSDP chunk index
    block=_same(*_DINO_BLOCK_KEYS),
)

HF_DINOV2 = NamingSpec(
    name="hf-dinov2", family="dinov2",
    anchors=("embeddings.patch_embeddings.projection.weight", "embeddings.cls_token",
             "embeddings.position_embeddings"),
    top={"embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
         "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
         "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
         "embeddings.register_tokens": "register_tokens", "layernorm.weight": "norm.weight",
         "layernorm.bias": "norm.bias"},
    block_re=r"encoder\.layer\.(\d+)\.(.+)", block_dst=_DINO_BLOCK,
    block={**_same(*_wb("norm1", "norm2", "mlp.fc1", "mlp.fc2")),
           "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
           "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
           "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
           "mlp.weights_in.weight": "mlp.w12.weight", "mlp.weights_in.bias": "mlp.w12.bias",
           "mlp.weights_out.weight": "mlp.w3.weight", "mlp.weights_out.bias": "mlp.w3.bias",
           "mlp.down_proj.weight": "mlp.w3.weight", "mlp.down_proj.bias": "mlp.w3.bias"},
    packs=tuple((f"attn.qkv.{p}", tuple(f"attention.attention.{n}.{p}" for n in ("query", "key", "value")))
                for p in ("weight", "bias"))
    + tuple((f"attn.qkv.{p}", tuple(f"attention.{n}_proj.{p}" for n in "qkv")) for p in ("weight", "bias"))
    + tuple((f"mlp.w12.{p}", (f"mlp.gate_proj.{p}", f"mlp.up_proj.{p}")) for p in ("weight", "bias")),
)

_SPECS = (OPENAI, TIMM_CLIP, HF_CLIP, DINOV2, HF_DINOV2)


def _prefixes(keys: set, anchors: tuple) -> list[str]:
    """Prefixes under which every anchor key exists."""
    first = anchors[0]
    found = []
    for key in keys:
        if key.endswith(first):
            prefix = key[: len(key) - len(first)]
            if (not prefix or prefix.endswith(".")) and all(prefix + a in keys for a in anchors[1:]):
                found.append(prefix)
    return found


def _locate(tensors: Mapping, where: str) -> tuple[NamingSpec, str]:
    keys = set(tensors)
    found = [(spec, p) for spec in _SPECS for p in _prefixes(keys, spec.anchors)]
    # timm CLIP also carries the DINOv2 anchors: the more specific naming wins
    found = [(s, p) for s, p in found if not (s is DINOV2 and (TIMM_CLIP, p) in found)]
    if not found:
        sample = sorted(keys)[:8]
        raise CheckpointError(
            f"{where}: no CLIP or DINOv2 vision tower found (expected e.g. 'visual.conv1.weight', "
            f"'vision_model.embeddings.patch_embedding.weight', 'patch_embed.proj.weight' or "
            f"'embeddings.patch_embeddings.projection.weight'; the file has {sample}...)")
    if len(found) > 1:
        raise CheckpointError(f"{where}: several vision towers found "
                              f"({', '.join(repr(p + s.anchors[0]) for s, p in found)}); keep only one")
    return found[0]


def _convert_blocks(spec: NamingSpec, local: Mapping, where: str) -> dict:
    rx = re.compile(spec.block_re)
    blocks: dict[int, dict] = {}
    for key, value in local.items():
        m = rx.fullmatch(key)
        if m:
            if len(m.group(1)) > 4:  # a block index far beyond any model (and beyond int()'s digit limit)
                raise CheckpointError(f"{where}: tensor '{key[:80]}' has an implausible block index")
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value
    out = {}
    for i, block in sorted(blocks.items()):
        dst = spec.block_dst.format(i)
        used = set()
        for target, sources in spec.packs:
            present = [s for s in sources if s in block]
            if present and len(present) != len(sources):
                raise CheckpointError(f"{where}: block {i} has {present} but not all of {list(sources)}")
            if present:
                out[dst + target] = Concatenated([block[s] for s in sources], 0, where)
                used.update(sources)
        for suffix, value in block.items():
            if suffix in used:
                continue
            if suffix not in spec.block:
                raise CheckpointError(f"{where}: unexpected tensor '{suffix}' in block {i} "
                                      f"({spec.name} naming): unsupported architecture variant")
            out[dst + spec.block[suffix]] = value
    return out


def _timm_dinov2(local: dict, out: dict, where: str) -> bool:
    """Adapts timm's DINOv2 variant in place; True when it differs from the hub layout."""
    timm = False
    for key in [k for k in out if k.endswith(".mlp.fc1.weight")]:
        stem = key[: -len("fc1.weight")]
        fc1, fc2 = shape_of(out[key]), shape_of(out.get(stem + "fc2.weight", ()))
        if len(fc1) == 2 and len(fc2) == 2 and fc1[0] == 2 * fc2[1]:
            for p in ("weight", "bias"):  # SwiGLUPacked: fc1 holds both halves, like the hub's w12
                if stem + f"fc1.{p}" in out:
                    out[stem + f"w12.{p}"] = out.pop(stem + f"fc1.{p}")
                if stem + f"fc2.{p}" in out:
                    out[stem + f"w3.{p}"] = out.pop(stem + f"fc2.{p}")
            timm = True
    if "reg_token" in local:
        out["register_tokens"] = local["reg_token"]
        pos = out.get("pos_embed")
        rows = shape_of(pos)[-2] if pos is not None and len(shape_of(pos)) >= 2 else 0
        if rows and math.isqrt(rows) ** 2 == rows:
            # timm folded the class position into cls_token and dropped its row: the class token is
            # exact, tokens placed at the class position (VisualAD's t_a, t_n) get a zero position.
            warnings.warn(f"{where}: timm DINOv2 with registers has no class-position row; using zeros "
                          "for it (the class token itself is exact)", stacklevel=3)
            d = shape_of(pos)[-1]
            out["pos_embed"] = Concatenated([np.zeros((1, 1, d), np.float32), pos], 1, where)
        timm = True
    return timm


def canonicalize(tensors: Mapping, where: str, numbers: Mapping | None = None) -> Canonical:
    """Finds the vision tower in ``{name: tensor}`` and renames it to the canonical naming.
    ``numbers`` are TorchScript attributes (``...attn.num_heads``) when the source has them."""
    spec, prefix = _locate(tensors, where)
    local = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    for key in spec.unsupported:
        if key in local:
            raise CheckpointError(f"{where}: '{prefix}{key}' marks an unsupported {spec.name} variant")
    out = {dst: local[src] for src, dst in spec.top.items() if src in local}
    for key, new_shape in spec.reshape.items():
        if key in out:
            out[key] = Reshaped(out[key], new_shape(shape_of(out[key])))
    out.update(_convert_blocks(spec, local, where))
    name = spec.name
    if spec is DINOV2 and _timm_dinov2(local, out, where):
        name = "timm-dinov2"
    heads = None
    if spec.heads_attr and numbers:
        value = numbers.get(prefix + spec.heads_attr)
        heads = int(value) if isinstance(value, int) else None
    return Canonical(spec.family, name, prefix, out, heads)
