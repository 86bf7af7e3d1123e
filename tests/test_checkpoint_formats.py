"""load_backbone on every container and naming, written with the real libraries (torch.save,
torch.jit.save, safetensors, transformers save_pretrained); canonical tensors compared one by one
with the source (exact: fp16/bf16 -> float32 widening is exact)."""
import json
import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import checkpoint_models as cm
import visualad
from visualad.checkpoint import BackboneWeights, load_backbone
from visualad.errors import CheckpointError


def assert_same(bw: BackboneWeights, expected: dict):
    assert set(bw.tensors) == set(expected), sorted(set(bw.tensors) ^ set(expected))
    for name, ref in expected.items():
        got = bw.tensors[name]
        assert got.dtype == np.float32 and got.flags.c_contiguous, name
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        np.testing.assert_array_equal(got, ref, err_msg=name)
    assert_same_encode(bw, expected)


def assert_same_encode(bw: BackboneWeights, expected: dict):
    """The loaded backbone encodes like the canonical dict (same architecture hints), <= 1e-6 relative,
    at a non-native grid so that position resizing is exercised too."""
    from visualad.backbone import build_backbone
    loaded, reference = build_backbone(bw.tensors, bw.family, bw.hints), build_backbone(expected, bw.family, bw.hints)
    size = loaded.config["patch"] * (loaded.config["grid"] + 1)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    outs = [visualad.Detector(b, image_size=size, random_state=0, num_threads=1).encode(x) for b in (loaded, reference)]
    for l, feat in outs[1]["layers"].items():
        diff = np.abs(outs[0]["layers"][l] - feat).max() / np.abs(feat).max()
        assert diff <= 1e-6, (l, diff)


@pytest.fixture(scope="module")
def clip_fp32():
    return cm.openai_clip(seed=1)


@pytest.fixture(scope="module")
def clip_fp16():
    return cm.openai_clip(seed=2, half=True)


# --- OpenAI / open_clip naming --------------------------------------------------------------------

def test_torch_zip_state_dict(tmp_path, clip_fp32):
    path = tmp_path / "clip.pt"
    torch.save(clip_fp32.state_dict(), path)
    bw = load_backbone(path)
    assert (bw.family, bw.hints["format"], bw.hints["naming"]) == ("clip", "torch-zip", "openai")
    assert bw.hints["activation"] == "quick_gelu" and bw.hints["ln_eps"] == 1e-5
    assert bw.arch == dict(width=cm.WIDTH, depth=cm.DEPTH, patch=cm.PATCH, grid=cm.GRID, mlp_hidden=4 * cm.WIDTH,
                           registers=0, layerscale=False, swiglu=False)
    assert_same(bw, cm.expected_openai(clip_fp32.state_dict()))


def test_torch_zip_mixed_fp16_fp32(tmp_path, clip_fp16):
    state = clip_fp16.state_dict()
    assert {v.dtype for v in state.values()} == {torch.float16, torch.float32}
    path = tmp_path / "clip16.pt"
    torch.save(state, path)
    assert_same(load_backbone(str(path)), cm.expected_openai(state))


def test_torch_legacy_format(tmp_path, clip_fp16):
    path = tmp_path / "legacy.pt"
    torch.save(clip_fp16.state_dict(), path, _use_new_zipfile_serialization=False)
    bw = load_backbone(path)
    assert bw.hints["format"] == "torch-legacy"
    assert_same(bw, cm.expected_openai(clip_fp16.state_dict()))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archive(tmp_path, how):
    """OpenAI's release is a TorchScript archive; its top folder is named after the file."""
    model = cm.openai_clip(seed=3, half=(how == "script"))
    if how == "script":
        module = torch.jit.script(model)
    else:
        module = torch.jit.trace(model, torch.randn(1, 3, cm.PATCH * cm.GRID, cm.PATCH * cm.GRID))
    path = tmp_path / "ViT-T-8.pt"
    torch.jit.save(module, str(path))
    bw = load_backbone(path)
    assert bw.hints["format"] == "torchscript"
    # a scripted module keeps nn.MultiheadAttention's num_heads; tracing keeps only tensors
    assert bw.hints["heads"] == (cm.HEADS if how == "script" else None)
    assert bw.hints["activation"] == "quick_gelu"
    assert_same(bw, cm.expected_openai(model.state_dict()))


def test_open_clip_bare_visual_tower(tmp_path, clip_fp32):
    """open_clip's vision tower saved alone: the OpenAI names without `visual.`."""
    state = clip_fp32.visual.state_dict()
    path = tmp_path / "visual.bin"
    torch.save(state, path)
    bw = load_backbone(path)
    assert bw.hints["naming"] == "openai"
    assert_same(bw, cm.expected_openai(state, prefix=""))


def test_open_clip_training_checkpoint(tmp_path, clip_fp32):
    """open_clip training checkpoints wrap a DDP state dict: {'epoch', 'state_dict': {'module.visual...'}}."""
    state = OrderedDict(("module." + k, v) for k, v in clip_fp32.state_dict().items())
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": state}, path)
    assert_same(load_backbone(path), cm.expected_openai(clip_fp32.state_dict()))


def test_safetensors_file_with_bf16(tmp_path, clip_fp32):
    state = {k: v.contiguous() for k, v in clip_fp32.state_dict().items()}
    state["visual.ln_pre.weight"] = state["visual.ln_pre.weight"].bfloat16()
    state["visual.conv1.weight"] = state["visual.conv1.weight"].half()
    path = tmp_path / "open_clip_model.safetensors"
    save_file(state, str(path))
    bw = load_backbone(path)
    assert bw.hints["format"] == "safetensors"
    assert_same(bw, cm.expected_openai(state))


@pytest.mark.parametrize("container", ["safetensors", "torch"])
def test_sharded_folder(tmp_path, clip_fp32, container):
    """A folder of shards with a `weight_map` index (no config.json)."""
    state = {k: v.contiguous() for k, v in clip_fp32.state_dict().items()}
    names = sorted(state)
    ext, index = ((".safetensors", "model.safetensors.index.json") if container == "safetensors"
                  else (".bin", "pytorch_model.bin.index.json"))
    weight_map = {}
    for i, keys in enumerate((names[::2], names[1::2])):
        file = f"model-0000{i + 1}-of-00002{ext}"
        shard = {k: state[k] for k in keys}
        if container == "safetensors":
            save_file(shard, str(tmp_path / file))
        else:
            torch.save(shard, tmp_path / file)
        weight_map.update({k: file for k in keys})
    (tmp_path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    bw = load_backbone(tmp_path)
    assert bw.hints["format"] == ("safetensors" if container == "safetensors" else "torch-zip")
    assert_same(bw, cm.expected_openai(state))


def test_open_clip_hub_folder_prefers_safetensors(tmp_path, clip_fp32):
    """open_clip hub folders hold the same weights twice (.bin and .safetensors) and no config.json."""
    state = {k: v.contiguous() for k, v in clip_fp32.state_dict().items()}
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "open_clip_pytorch_model.bin")
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text("{}")
    assert_same(load_backbone(tmp_path), cm.expected_openai(state))


def test_dict_input_any_naming(clip_fp32):
    state = {k: v.numpy() for k, v in clip_fp32.state_dict().items()}
    assert_same(load_backbone(state), cm.expected_openai(clip_fp32.state_dict()))
    timm = {k: v.numpy() for k, v in cm.timm_clip_state(clip_fp32.state_dict()).items()}
    bw = load_backbone(timm)
    assert (bw.hints["format"], bw.hints["naming"], bw.hints["source"]) == ("dict", "timm-clip", "dict")
    assert_same(bw, cm.expected_openai(clip_fp32.state_dict()))


# --- timm CLIP --------------------------------------------------------------------------------------

def test_timm_clip(tmp_path, clip_fp16):
    state = cm.timm_clip_state(clip_fp16.state_dict())
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    bw = load_backbone(path)
    assert (bw.family, bw.hints["naming"], bw.hints["activation"]) == ("clip", "timm-clip", "quick_gelu")
    assert_same(bw, cm.expected_openai(clip_fp16.state_dict()))


# --- transformers CLIP ------------------------------------------------------------------------------

@pytest.mark.parametrize("safe", [True, False])
def test_hf_clip_vision_model(tmp_path, safe):
    folder = cm.save_hf(cm.hf_clip_vision(seed=4), str(tmp_path / "clip-vision"), safe)
    bw = load_backbone(folder)
    assert (bw.family, bw.hints["format"], bw.hints["naming"]) == ("clip", "hf", "hf-clip")
    assert (bw.hints["heads"], bw.hints["ln_eps"], bw.hints["activation"]) == (cm.HEADS, 1e-5, "quick_gelu")
    assert_same(bw, cm.expected_hf_clip(cm.hf_folder_state(folder)))


@pytest.mark.parametrize("safe", [True, False])
def test_hf_clip_model(tmp_path, safe):
    folder = cm.save_hf(cm.hf_clip_model(seed=5), str(tmp_path / "clip"), safe)
    disk = cm.hf_folder_state(folder)
    assert any(k.startswith("text_model.") for k in disk)
    bw = load_backbone(folder)
    assert bw.hints["naming"] == "hf-clip" and bw.hints["heads"] == cm.HEADS
    assert_same(bw, cm.expected_hf_clip(disk))


def test_hf_clip_config_gives_activation_and_eps(tmp_path):
    folder = cm.save_hf(cm.hf_clip_vision(seed=6, hidden_act="gelu", layer_norm_eps=1e-6), str(tmp_path / "m"), True)
    bw = load_backbone(folder)
    assert (bw.hints["activation"], bw.hints["ln_eps"]) == ("gelu", 1e-6)


def test_hf_sharded_checkpoint(tmp_path):
    model = cm.hf_clip_vision(seed=7)
    folder = str(tmp_path / "sharded")
    model.save_pretrained(folder, max_shard_size="40KB")
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    from safetensors.torch import load_file
    disk = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            disk.update(load_file(os.path.join(folder, f)))
    assert_same(load_backbone(folder), cm.expected_hf_clip(disk))


# --- DINOv2 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (0, True)])
def test_dinov2_hub(tmp_path, registers, swiglu):
    state = cm.dinov2_hub_state(seed=8, registers=registers, swiglu=swiglu)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    bw = load_backbone(path)
    assert (bw.family, bw.hints["naming"], bw.hints["ln_eps"]) == ("dinov2", "dinov2-hub", 1e-6)
    assert bw.hints["activation"] == ("swiglu" if swiglu else "gelu")
    assert bw.arch["registers"] == registers and bw.arch["layerscale"] and bw.arch["swiglu"] == swiglu
    assert_same(bw, cm.expected_dinov2(state))


def test_dinov2_hub_fp16_and_block_chunks(tmp_path):
    """FSDP training checkpoints name blocks `blocks.<chunk>.<index>.`; fp16 widens exactly."""
    state = cm.dinov2_hub_state(seed=9, dtype=torch.float16)
    chunked = OrderedDict((k.replace("blocks.", f"teacher.backbone.blocks.{int(k.split('.')[1]) // 2}.")
                           if k.startswith("blocks.") else "teacher.backbone." + k, v) for k, v in state.items())
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": chunked}, path)
    assert_same(load_backbone(path), cm.expected_dinov2(state))


@pytest.mark.parametrize("swiglu", [False, True])
def test_timm_dinov2(tmp_path, swiglu):
    hub = cm.dinov2_hub_state(seed=10, swiglu=swiglu)
    path = tmp_path / "timm.safetensors"
    save_file(cm.timm_dinov2_state(hub), str(path))
    bw = load_backbone(path)
    assert bw.hints["activation"] == ("swiglu" if swiglu else "gelu")
    assert bw.hints["naming"] == ("timm-dinov2" if swiglu else "dinov2-hub")
    assert_same(bw, cm.expected_dinov2(hub))


def test_timm_dinov2_registers_fold_class_position(tmp_path):
    hub = cm.dinov2_hub_state(seed=11, registers=4)
    path = tmp_path / "timm_reg.pth"
    torch.save(cm.timm_dinov2_state(hub), path)
    with pytest.warns(UserWarning, match="class-position"):
        bw = load_backbone(path)
    assert bw.hints["naming"] == "timm-dinov2" and bw.arch["registers"] == 4
    expected = cm.expected_dinov2(hub)
    # timm keeps cls + pos[0] and drops the class row: the class token after adding positions is exact
    expected["cls_token"] = expected["cls_token"] + expected["pos_embed"][:, :1]
    expected["pos_embed"][:, 0] = 0.0
    assert_same(bw, expected)


@pytest.mark.parametrize("registers,swiglu,safe", [(False, False, True), (False, False, False),
                                                   (True, True, True), (True, False, False)])
def test_hf_dinov2(tmp_path, registers, swiglu, safe):
    folder = cm.save_hf(cm.hf_dinov2(seed=12, registers=registers, swiglu=swiglu), str(tmp_path / "dino"), safe)
    bw = load_backbone(folder)
    assert (bw.family, bw.hints["naming"], bw.hints["heads"]) == ("dinov2", "hf-dinov2", cm.HEADS)
    assert bw.arch["registers"] == (4 if registers else 0) and bw.arch["swiglu"] == swiglu
    assert bw.hints["activation"] == ("swiglu" if swiglu else "gelu")
    assert_same(bw, cm.expected_hf_dinov2(cm.hf_folder_state(folder)))


def test_hf_dinov2_in_memory_names_of_transformers_5(tmp_path):
    """transformers >= 5 names q/k/v `attention.q_proj`..., SwiGLU `mlp.gate_proj`/`up_proj`/`down_proj`."""
    model = cm.hf_dinov2(seed=13, registers=True, swiglu=True)
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    folder = cm.save_hf(model, str(tmp_path / "dino"), True)
    assert_same(load_backbone(path), cm.expected_hf_dinov2(cm.hf_folder_state(folder)))


def test_loading_never_imports_torch(tmp_path, clip_fp16):
    path = tmp_path / "clip.pt"
    torch.save(clip_fp16.state_dict(), path)
    code = ("import sys; from visualad.checkpoint import load_backbone; load_backbone(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(visualad.__file__)))  # the visualad under test
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": package_root})


def test_bad_argument_type():
    with pytest.raises(TypeError):
        load_backbone(42)
    with pytest.raises(CheckpointError, match="no such file"):
        load_backbone("/nonexistent/model.pt")
