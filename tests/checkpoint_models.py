"""Tiny random CLIP / DINOv2 towers written with the real libraries, for the checkpoint tests.

Every builder returns torch objects; `expected_*` give the canonical arrays the loader must return,
built from the source names independently of visualad's own conversion code.
"""
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn

WIDTH, DEPTH, HEADS, PATCH, GRID = 64, 2, 2, 8, 3


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP's block: ln_1, attn (nn.MultiheadAttention), ln_2, mlp(c_fc, gelu, c_proj)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(4 * d, d))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, d: int, depth: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(d, heads) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """OpenAI CLIP's vision tower, attribute for attribute."""

    def __init__(self, d=WIDTH, depth=DEPTH, heads=HEADS, patch=PATCH, grid=GRID, out_dim=32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, d, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(d))
        self.positional_embedding = nn.Parameter(torch.randn(1 + grid * grid, d))
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = Transformer(d, depth, heads)
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Parameter(torch.randn(d, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], 1, x.shape[-1])
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype))
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    """OpenAI CLIP: vision tower `visual` plus a small text tower sharing some attribute names."""

    def __init__(self, heads=HEADS):
        super().__init__()
        self.visual = VisionTransformer(heads=heads)
        self.token_embedding = nn.Embedding(50, 32)
        self.positional_embedding = nn.Parameter(torch.randn(7, 32))
        self.transformer = Transformer(32, 1, 2)
        self.ln_final = nn.LayerNorm(32)
        self.text_projection = nn.Parameter(torch.randn(32, 32))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def randomize(module: nn.Module, seed=0) -> nn.Module:
    """Random values everywhere (LayerNorm weights/biases too), so no two tensors coincide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module.eval()


def openai_clip(seed=0, half=False) -> CLIP:
    """A random OpenAI-layout CLIP; `half` converts weights to fp16 as OpenAI's release does
    (conv, linear and attention weights, projections), LayerNorms and embeddings stay fp32."""
    model = randomize(CLIP(), seed)
    if half:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.half()
            if isinstance(m, nn.MultiheadAttention):
                m.in_proj_weight.data = m.in_proj_weight.data.half()
                m.in_proj_bias.data = m.in_proj_bias.data.half()
        model.visual.proj.data = model.visual.proj.data.half()
        model.text_projection.data = model.text_projection.data.half()
    return model


def numpy_f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def expected_openai(state: dict, prefix="visual.") -> dict:
    """Canonical CLIP arrays from an OpenAI-named state dict: its vision tower minus `proj`."""
    return {"visual." + k[len(prefix):]: numpy_f32(v) for k, v in state.items()
            if k.startswith(prefix) and k != prefix + "proj"}


def timm_clip_state(openai_state: dict) -> OrderedDict:
    """The timm layout of an OpenAI vision tower, from timm's documented names."""
    out = OrderedDict()
    v = {k[len("visual."):]: t for k, t in openai_state.items() if k.startswith("visual.")}
    out["cls_token"] = v["class_embedding"].reshape(1, 1, -1).clone()
    out["pos_embed"] = v["positional_embedding"].unsqueeze(0).clone()
    out["patch_embed.proj.weight"] = v["conv1.weight"]
    out["norm_pre.weight"], out["norm_pre.bias"] = v["ln_pre.weight"], v["ln_pre.bias"]
    for i in range(DEPTH):
        s, d = f"transformer.resblocks.{i}.", f"blocks.{i}."
        for a, b in (("ln_1", "norm1"), ("ln_2", "norm2"), ("attn.out_proj", "attn.proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[d + b + ".weight"], out[d + b + ".bias"] = v[s + a + ".weight"], v[s + a + ".bias"]
        out[d + "attn.qkv.weight"] = v[s + "attn.in_proj_weight"]
        out[d + "attn.qkv.bias"] = v[s + "attn.in_proj_bias"]
    out["norm.weight"], out["norm.bias"] = v["ln_post.weight"], v["ln_post.bias"]
    out["head.weight"] = v["proj"].t().contiguous()
    return out


def dinov2_hub_state(seed=0, registers=0, swiglu=False, d=WIDTH, depth=DEPTH, patch=14, grid=GRID,
                     dtype=torch.float32) -> OrderedDict:
    """A random DINOv2 state dict in the hub's names (facebookresearch/dinov2 vision_transformer)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, generator=g).to(dtype)

    s = OrderedDict()
    s["cls_token"], s["pos_embed"], s["mask_token"] = r(1, 1, d), r(1, 1 + grid * grid, d), r(1, d)
    if registers:
        s["register_tokens"] = r(1, registers, d)
    s["patch_embed.proj.weight"], s["patch_embed.proj.bias"] = r(d, 3, patch, patch), r(d)
    hidden = 40 if swiglu else 4 * d
    for i in range(depth):
        p = f"blocks.{i}."
        s[p + "norm1.weight"], s[p + "norm1.bias"] = r(d), r(d)
        s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"] = r(3 * d, d), r(3 * d)
        s[p + "attn.proj.weight"], s[p + "attn.proj.bias"] = r(d, d), r(d)
        s[p + "ls1.gamma"] = r(d)
        s[p + "norm2.weight"], s[p + "norm2.bias"] = r(d), r(d)
        if swiglu:
            s[p + "mlp.w12.weight"], s[p + "mlp.w12.bias"] = r(2 * hidden, d), r(2 * hidden)
            s[p + "mlp.w3.weight"], s[p + "mlp.w3.bias"] = r(d, hidden), r(d)
        else:
            s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = r(hidden, d), r(hidden)
            s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = r(d, hidden), r(d)
        s[p + "ls2.gamma"] = r(d)
    s["norm.weight"], s["norm.bias"] = r(d), r(d)
    return s


def expected_dinov2(hub_state: dict) -> dict:
    return {k: numpy_f32(v) for k, v in hub_state.items() if k != "mask_token"}


def timm_dinov2_state(hub_state: dict) -> OrderedDict:
    """timm's conversion of a hub state dict (timm vision_transformer `_convert_dinov2`): w12/w3
    become fc1/fc2; with registers, `reg_token`, the class position folded into `cls_token` and
    no class row in `pos_embed`."""
    s = OrderedDict((k, v) for k, v in hub_state.items() if k != "mask_token")
    out = OrderedDict()
    if "register_tokens" in s:
        out["reg_token"] = s.pop("register_tokens")
        out["cls_token"] = s.pop("cls_token") + s["pos_embed"][:, 0]
        out["pos_embed"] = s.pop("pos_embed")[:, 1:].clone()
    for k, v in s.items():
        out[k.replace("mlp.w12", "mlp.fc1").replace("mlp.w3", "mlp.fc2")] = v
    return out


def hf_clip_vision(seed=0, **overrides):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    cfg = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=DEPTH,
               num_attention_heads=HEADS, image_size=PATCH * GRID, patch_size=PATCH)
    cfg.update(overrides)
    return randomize(CLIPVisionModel(CLIPVisionConfig(**cfg)), seed)


def hf_clip_model(seed=0):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    vision = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=DEPTH,
                  num_attention_heads=HEADS, image_size=PATCH * GRID, patch_size=PATCH)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    return randomize(CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)), seed)


def hf_dinov2(seed=0, registers=False, swiglu=False):
    import transformers
    torch.manual_seed(seed)
    kind = "Dinov2WithRegisters" if registers else "Dinov2"
    cfg = getattr(transformers, kind + "Config")(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                                 image_size=14 * GRID, patch_size=14, use_swiglu_ffn=swiglu)
    return randomize(getattr(transformers, kind + "Model")(cfg), seed)


def hf_folder_state(folder) -> dict:
    """The tensors a transformers folder holds on disk, by their file names (safetensors or .bin)."""
    import os

    from safetensors.torch import load_file
    path = os.path.join(folder, "model.safetensors")
    if os.path.exists(path):
        return load_file(path)
    return torch.load(os.path.join(folder, "pytorch_model.bin"), weights_only=True)


def save_hf(model, folder, safe: bool):
    """`save_pretrained`; for `.bin`, where this transformers version writes safetensors anyway,
    the same tensors go to `pytorch_model.bin` with torch.save as older versions wrote them."""
    import os

    from safetensors.torch import load_file
    model.save_pretrained(folder, safe_serialization=safe)
    st = os.path.join(folder, "model.safetensors")
    if not safe and not os.path.exists(os.path.join(folder, "pytorch_model.bin")):
        torch.save(load_file(st), os.path.join(folder, "pytorch_model.bin"))
        os.remove(st)
    return folder


def expected_hf_clip(disk: dict) -> dict:
    """Canonical CLIP arrays from the on-disk names of a CLIPVisionModel / CLIPModel."""
    p = "vision_model." if "vision_model.pre_layrnorm.weight" in disk else ""
    e = {"visual.conv1.weight": disk[p + "embeddings.patch_embedding.weight"],
         "visual.class_embedding": disk[p + "embeddings.class_embedding"],
         "visual.positional_embedding": disk[p + "embeddings.position_embedding.weight"]}
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for w in ("weight", "bias"):
            e[f"visual.{a}.{w}"] = disk[f"{p}{b}.{w}"]
    for i in range(DEPTH):
        s, d = f"{p}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        e[d + "attn.in_proj_weight"] = torch.cat([disk[s + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        e[d + "attn.in_proj_bias"] = torch.cat([disk[s + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for w in ("weight", "bias"):
                e[f"{d}{a}.{w}"] = disk[f"{s}{b}.{w}"]
    return {k: numpy_f32(v) for k, v in e.items()}


def expected_hf_dinov2(disk: dict) -> dict:
    """Canonical DINOv2 arrays from the on-disk names of a Dinov2Model / Dinov2WithRegistersModel."""
    e = {"cls_token": disk["embeddings.cls_token"], "pos_embed": disk["embeddings.position_embeddings"],
         "patch_embed.proj.weight": disk["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": disk["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": disk["layernorm.weight"], "norm.bias": disk["layernorm.bias"]}
    if "embeddings.register_tokens" in disk:
        e["register_tokens"] = disk["embeddings.register_tokens"]
    for i in range(DEPTH):
        s, d = f"encoder.layer.{i}.", f"blocks.{i}."
        for w in ("weight", "bias"):
            e[f"{d}attn.qkv.{w}"] = torch.cat([disk[f"{s}attention.attention.{n}.{w}"]
                                                for n in ("query", "key", "value")])
            e[f"{d}attn.proj.{w}"] = disk[f"{s}attention.output.dense.{w}"]
            for n in ("norm1", "norm2"):
                e[f"{d}{n}.{w}"] = disk[f"{s}{n}.{w}"]
            for a, b in (("fc1", "fc1"), ("fc2", "fc2"), ("w12", "weights_in"), ("w3", "weights_out")):
                if f"{s}mlp.{b}.{w}" in disk:
                    e[f"{d}mlp.{a}.{w}"] = disk[f"{s}mlp.{b}.{w}"]
        e[d + "ls1.gamma"] = disk[s + "layer_scale1.lambda1"]
        e[d + "ls2.gamma"] = disk[s + "layer_scale2.lambda1"]
    return {k: numpy_f32(v) for k, v in e.items()}
