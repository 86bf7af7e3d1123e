"""read_checkpoint / load_head / the safetensors reader and writer: every object and tensor layout
torch and safetensors write, compared with what the real libraries hold."""
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoint_models as cm
from visualad.checkpoint import load_head, read_checkpoint, to_float32
from visualad.checkpoint.safetensors import read_safetensors, save_safetensors
from visualad.errors import CheckpointError


def official_head(width=32, layers=(6, 12), seed=0):
    """A random head in the official VisualAD `CLIP.pth` layout (docs/checkpoints.md)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, generator=g)

    head = {"anomaly_token": r(width), "normal_token": r(width), "ln_post_weight": r(width),
            "ln_post_bias": r(width), "features_list": list(layers), "image_size": 518, "epoch": 1,
            "backbone": "ViT-L-14-336", "transform_type": "mlp", "layer_transforms": {}, "cross_attn": OrderedDict(),
            "cross_attn_config": {"num_anchors": 4, "dropout": 0.1, "res_scale_init": 0.01}}
    for layer in layers:
        head["layer_transforms"][f"layer_{layer}"] = OrderedDict(
            [("mlp.0.weight", r(width, width)), ("mlp.0.bias", r(width)), ("mlp.3.weight", r(width, width)),
             ("mlp.3.bias", r(width))])
        p = f"layer_attentions.layer_{layer}."
        for name, shape in (("anchor_queries", (4, width)), ("pos_encoding", (1, 1536, width)),
                            ("q_proj.weight", (width, width)), ("k_proj.weight", (width, width)),
                            ("v_proj.weight", (width, width)), ("q_norm.weight", (width,)), ("q_norm.bias", (width,)),
                            ("k_norm.weight", (width,)), ("k_norm.bias", (width,)), ("gate.0.weight", (4, width)),
                            ("gate.0.bias", (4,)), ("out_proj.weight", (width, width)), ("out_proj.bias", (width,)),
                            ("res_scale", ())):
            head["cross_attn"][p + name] = torch.nn.Parameter(r(*shape))
    return head


def assert_tree_equal(got, ref):
    if isinstance(ref, torch.Tensor):
        ref = ref.detach()
        want = ref.float().numpy() if ref.dtype == torch.bfloat16 else ref.numpy()
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    elif isinstance(ref, dict):
        assert type(got) is type(ref) and list(got) == list(ref)
        for k in ref:
            assert_tree_equal(got[k], ref[k])
    elif isinstance(ref, (list, tuple)):
        assert type(got) is type(ref) and len(got) == len(ref)
        for a, b in zip(got, ref):
            assert_tree_equal(a, b)
    else:
        assert got == ref


@pytest.mark.parametrize("zip_format", [True, False])
def test_official_head_layout(tmp_path, zip_format):
    head = official_head()
    path = tmp_path / "CLIP.pth"
    torch.save(head, path, _use_new_zipfile_serialization=zip_format)
    assert_tree_equal(read_checkpoint(path), head)
    loaded = load_head(path)
    assert loaded["features_list"] == [6, 12] and loaded["backbone"] == "ViT-L-14-336"
    assert loaded["cross_attn"]["layer_attentions.layer_6.res_scale"].shape == ()


def test_dtypes_and_layouts(tmp_path):
    base = torch.randn(6, 5)
    shared = torch.arange(20, dtype=torch.float64)
    obj = {
        "f16": torch.randn(3, 4).half(), "bf16": torch.randn(7).bfloat16(), "f64": torch.randn(2, 2).double(),
        "i64": torch.arange(5), "i32": torch.arange(4, dtype=torch.int32), "u8": torch.arange(9, dtype=torch.uint8),
        "i8": torch.arange(-3, 3, dtype=torch.int8), "bool": torch.tensor([True, False]),
        "u16": torch.tensor([1, 2, 60000], dtype=torch.uint16),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
        "transposed": base.t(), "strided": base[::2, 1::2], "offset": base[2:],
        "shared_a": shared[3:9].view(2, 3), "shared_b": shared[10:], "tuple": (torch.ones(2), 3, "x"),
        "nested": [OrderedDict(w=torch.full((2,), 2.0))], "none": None, "float": 0.25,
    }
    path = tmp_path / "layouts.pt"
    torch.save(obj, path)
    got = read_checkpoint(path)
    assert_tree_equal(got, obj)
    assert got["f16"].dtype == np.float16 and got["bf16"].dtype == np.float32
    assert got["transposed"].flags.c_contiguous
    f32 = read_checkpoint(path, float32=True)
    assert f32["f16"].dtype == np.float32 and f32["i64"].dtype == np.int64
    np.testing.assert_array_equal(f32["f16"], obj["f16"].float().numpy())


def test_big_endian_archive(tmp_path):
    """Archives from big-endian machines say so in `byteorder`; values come back native."""
    obj = {"a": torch.randn(3, 2), "b": torch.randn(4)}  # float32 only: every storage swaps by 4 bytes
    path = tmp_path / "le.pt"
    torch.save(obj, path)
    be = tmp_path / "be.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(be, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "le/byteorder":
                data = b"big"
            elif "/data/" in name:
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            dst.writestr(name, data)
    assert_tree_equal(read_checkpoint(be), obj)


def test_torchscript_read_gives_state_dict(tmp_path):
    model = cm.openai_clip(seed=30, half=True)
    path = tmp_path / "clip_jit.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    got = read_checkpoint(path)
    state = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(got[k], v.numpy())


def test_safetensors_read_and_write_roundtrip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.arange(6).reshape(2, 3),
               "d": torch.randn(2).bfloat16(), "e": torch.zeros(0)}
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    arrays, meta = read_safetensors(str(path))
    assert meta == {"format": "pt", "note": "x"}
    assert_tree_equal(arrays, {k: tensors[k] for k in arrays})
    assert set(arrays) == set(tensors)

    ours = tmp_path / "ours.safetensors"
    out = {k: v for k, v in arrays.items() if k != "d"} | {"f": np.array([True, False]), "g": np.float64(2.5)}
    save_safetensors(str(ours), out, {"visualad": '{"version": 1}'})
    with safe_open(str(ours), "np") as f:
        assert f.metadata() == {"visualad": '{"version": 1}'}
        for k, v in out.items():
            ref = f.get_tensor(k)
            assert ref.dtype == np.asarray(v).dtype
            np.testing.assert_array_equal(ref, v)
    back, meta = read_safetensors(str(ours))
    assert meta == {"visualad": '{"version": 1}'}
    for k, v in out.items():
        np.testing.assert_array_equal(back[k], v)


def test_save_safetensors_rejects_bad_metadata(tmp_path):
    with pytest.raises(TypeError):
        save_safetensors(str(tmp_path / "x.safetensors"), {"a": np.zeros(2)}, {"k": 1})


def test_to_float32():
    assert to_float32(np.arange(3, dtype=np.float16)).dtype == np.float32
    with pytest.raises(CheckpointError):
        to_float32(np.arange(3))


def test_load_head_rejects_non_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a dict"):
        load_head(path)
