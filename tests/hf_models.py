"""transformers models (random init) and weight moves between their naming and ours, for tests."""
import numpy as np
import torch

import reference as R


def make_hf_clip(width, depth, patch, image_size, seed=0):
    """CLIPVisionModel with QuickGELU and non-trivial LayerNorm parameters."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                           num_attention_heads=width // 64, image_size=image_size, patch_size=patch,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5)
    model = CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_clip_to_openai(model) -> dict:
    """CLIPVisionModel weights moved into OpenAI naming (q, k, v packed into in_proj)."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    p = "vision_model." if "vision_model.embeddings.class_embedding" in sd else ""
    out = {
        "visual.conv1.weight": sd[p + "embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd[p + "embeddings.class_embedding"],
        "visual.positional_embedding": sd[p + "embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd[p + "pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd[p + "pre_layrnorm.bias"],
        "visual.ln_post.weight": sd[p + "post_layernorm.weight"],
        "visual.ln_post.bias": sd[p + "post_layernorm.bias"],
    }
    for i in range(model.config.num_hidden_layers):
        q = f"{p}encoder.layers.{i}."
        o = f"visual.transformer.resblocks.{i}."
        out[o + "attn.in_proj_weight"] = np.concatenate([sd[q + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        out[o + "attn.in_proj_bias"] = np.concatenate([sd[q + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        out[o + "attn.out_proj.weight"] = sd[q + "self_attn.out_proj.weight"]
        out[o + "attn.out_proj.bias"] = sd[q + "self_attn.out_proj.bias"]
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            out[o + a + ".weight"] = sd[q + b + ".weight"]
            out[o + a + ".bias"] = sd[q + b + ".bias"]
        out[o + "mlp.c_fc.weight"] = sd[q + "mlp.fc1.weight"]
        out[o + "mlp.c_fc.bias"] = sd[q + "mlp.fc1.bias"]
        out[o + "mlp.c_proj.weight"] = sd[q + "mlp.fc2.weight"]
        out[o + "mlp.c_proj.bias"] = sd[q + "mlp.fc2.bias"]
    return out


def make_hf_dinov2(state, width, depth, heads, registers=0, swiglu=False, image_size=518):
    """Dinov2Model / Dinov2WithRegistersModel holding the hub-named `state`."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    kw = dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=4,
              image_size=image_size, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu",
              use_swiglu_ffn=swiglu, layerscale_value=1.0, drop_path_rate=0.0)
    torch.manual_seed(0)
    if registers:
        m = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    else:
        m = Dinov2Model(Dinov2Config(**kw))
    m.eval()
    new = any(".attention.q_proj." in k for k in m.state_dict())
    sd = R.dinov2_to_hf(state, new_names=new)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return m
