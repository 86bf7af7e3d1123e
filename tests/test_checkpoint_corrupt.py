"""Corrupted, truncated or inconsistent checkpoints: each raises CheckpointError naming the problem,
never a crash, a hang or another exception type."""
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import checkpoint_models as cm
from visualad.checkpoint import load_backbone, read_checkpoint
from visualad.errors import CheckpointError


class FakeStorage:
    def __init__(self, key, numel, storage_type=torch.FloatStorage):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, OrderedDict())


class TorchLikePickler(pickle.Pickler):
    """Writes torch's pickle opcodes for hand-made (possibly inconsistent) tensors."""

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, FakeTensor):
            return torch._utils._rebuild_tensor_v2, obj.args
        return NotImplemented


def torch_like_zip(path, obj, storages: dict):
    buf = io.BytesIO()
    TorchLikePickler(buf, protocol=2).dump(obj)
    members = {"archive/data.pkl": buf.getvalue(), **{f"archive/data/{k}": v for k, v in storages.items()}}
    return rewrite_zip(None, path, members=members)


def rewrite_zip(src, dst, transform=lambda name, data: (name, data), members=None, method=zipfile.ZIP_STORED):
    """Copies zip `src` to `dst` through `transform(name, data) -> (name, data) | None`."""
    if members is None:
        with zipfile.ZipFile(src) as zf:
            members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(dst, "w", method) as zf:
        for name, data in members.items():
            out = transform(name, data)
            if out is not None:
                zf.writestr(out[0], out[1])
    return dst


def safetensors_file(path, header: dict, data: bytes, header_len=None):
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text) if header_len is None else header_len))
        f.write(text)
        f.write(data)
    return path


@pytest.fixture(scope="module")
def clip_state():
    return {k: v.contiguous() for k, v in cm.openai_clip(seed=21).state_dict().items()}


@pytest.fixture()
def good_zip(tmp_path, clip_state):
    path = tmp_path / "good.pt"
    torch.save(clip_state, path)
    return path


# Each case builds a broken input in `tmp` (from a good torch zip / the state dict) and returns
# (path, regex the error message must match).

def case_empty_file(tmp, good, state):
    (tmp / "empty.pt").write_bytes(b"")
    return tmp / "empty.pt", "empty"


def case_garbage_bytes(tmp, good, state):
    (tmp / "garbage.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    return tmp / "garbage.bin", "unrecognised checkpoint format"


def case_truncated_zip(tmp, good, state):
    data = good.read_bytes()
    (tmp / "cut.pt").write_bytes(data[: len(data) // 2])
    return tmp / "cut.pt", "not a readable zip archive"


def case_zip_without_data_pkl(tmp, good, state):
    return rewrite_zip(good, tmp / "nopkl.pt", lambda n, d: None if n.endswith("data.pkl") else (n, d)), \
        "no 'good/data.pkl'"


def case_zip_two_top_folders(tmp, good, state):
    return rewrite_zip(good, tmp / "two.pt", lambda n, d: (n.replace("good/data/1", "other/data/1"), d)), \
        "one top-level folder"


def case_missing_storage_member(tmp, good, state):
    return rewrite_zip(good, tmp / "nostorage.pt", lambda n, d: None if n == "good/data/3" else (n, d)), \
        "storage member 'good/data/3' is missing"


def case_storage_member_too_small(tmp, good, state):
    return rewrite_zip(good, tmp / "small.pt", lambda n, d: (n, d[:-4]) if n == "good/data/2" else (n, d)), \
        "storage member 'good/data/2' has .* bytes, the pickle declares"


def case_compressed_storage(tmp, good, state):
    return rewrite_zip(good, tmp / "deflated.pt", method=zipfile.ZIP_DEFLATED), "compressed"


def case_garbage_data_pkl(tmp, good, state):
    return rewrite_zip(good, tmp / "badpkl.pt", lambda n, d: (n, b"\x80\x02}q\x00(X\xff\xff") if n.endswith(
        "data.pkl") else (n, d)), "corrupt pickle"


def case_tensor_view_beyond_storage(tmp, good, state):
    s = FakeStorage("0", 6)
    return torch_like_zip(tmp / "view.pt", {"w": FakeTensor(s, 2, (2, 3), (3, 1))}, {"0": bytes(24)}), \
        "needs 8 elements of float32 but its storage holds 6"


def case_malformed_storage_reference(tmp, good, state):
    buf = io.BytesIO()

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", "not-a-type") if obj == "S" else None

    P(buf, protocol=2).dump({"w": "S"})
    return rewrite_zip(None, tmp / "pid.pt", members={"a/data.pkl": buf.getvalue()}), "malformed storage reference"


def case_bad_tensor_shape_types(tmp, good, state):
    s = FakeStorage("0", 6)
    return torch_like_zip(tmp / "shape.pt", {"w": FakeTensor(s, 0, (2, "3"), (3, 1))}, {"0": bytes(24)}), \
        "shape must be a sequence of non-negative ints"


def case_legacy_truncated(tmp, good, state):
    path = tmp / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    return path, "truncated"


def case_plain_pickle_not_torch(tmp, good, state):
    (tmp / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    return tmp / "plain.pkl", "not a torch checkpoint"


def case_tar_legacy_format(tmp, good, state):
    path = tmp / "old.tar"
    with tarfile.open(path, "w") as tf:
        tf.add(good, arcname="storages")
    return path, "tar-based"


def _st_header(shape=(2, 2), dtype="F32", offsets=(0, 16)):
    return {"w": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


def case_safetensors_huge_header_length(tmp, good, state):
    return safetensors_file(tmp / "huge.safetensors", _st_header(), bytes(16), header_len=1 << 40), \
        "header length 1099511627776 exceeds"


def case_safetensors_header_beyond_file(tmp, good, state):
    return safetensors_file(tmp / "beyond.safetensors", _st_header(), bytes(16), header_len=10_000), \
        "runs past the end of the file"


def case_safetensors_not_json(tmp, good, state):
    return safetensors_file(tmp / "notjson.safetensors", b"{this is not json}", bytes(16)), "not valid JSON"


def case_safetensors_header_not_object(tmp, good, state):
    return safetensors_file(tmp / "list.safetensors", b"[1, 2, 3]", b""), "must be a JSON object"


def case_safetensors_unknown_dtype(tmp, good, state):
    return safetensors_file(tmp / "dtype.safetensors", _st_header(dtype="F7"), bytes(16)), \
        "unsupported dtype 'F7'"


def case_safetensors_offsets_out_of_range(tmp, good, state):
    return safetensors_file(tmp / "range.safetensors", _st_header(offsets=(16, 32)), bytes(16)), \
        "outside the data section"


def case_safetensors_overlapping(tmp, good, state):
    header = {**_st_header(offsets=(0, 16)), "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    return safetensors_file(tmp / "overlap.safetensors", header, bytes(16)), "overlap"


def case_safetensors_size_mismatch(tmp, good, state):
    return safetensors_file(tmp / "size.safetensors", _st_header(shape=(3, 2)), bytes(16)), \
        "needs 24 bytes, data_offsets span 16"


def case_safetensors_truncated_data(tmp, good, state):
    path = tmp / "model.safetensors"
    save_file(state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    return path, "outside the data section"


def case_folder_without_weights(tmp, good, state):
    folder = tmp / "empty_model"
    folder.mkdir()
    (folder / "README.md").write_text("nothing here")
    return folder, "no weights"


def _hf_folder(tmp):
    return cm.save_hf(cm.hf_clip_vision(seed=22), str(tmp / "hf"), True)


def case_hf_config_inconsistent(tmp, good, state):
    folder = _hf_folder(tmp)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["hidden_size"] = 2 * cm.WIDTH
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    return folder, f"hidden_size={2 * cm.WIDTH} but the weights imply {cm.WIDTH}"


def case_hf_config_wrong_family(tmp, good, state):
    folder = _hf_folder(tmp)
    json.dump({"model_type": "dinov2", "hidden_size": cm.WIDTH}, open(os.path.join(folder, "config.json"), "w"))
    return folder, "describes a dinov2 model but the weights are clip"


def case_hf_config_not_json(tmp, good, state):
    folder = _hf_folder(tmp)
    open(os.path.join(folder, "config.json"), "w").write("{model_type: clip")
    return folder, "not a readable JSON file"


def case_shard_outside_folder(tmp, good, state):
    folder = tmp / "shards"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../good.pt"}}))
    return folder, "is not a file in the folder"


def case_shard_missing_tensor(tmp, good, state):
    folder = tmp / "shards"
    folder.mkdir()
    save_file({"a": torch.zeros(2)}, str(folder / "s1.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"b": "s1.safetensors"}}))
    return folder, "tensor 'b' is not in shard 's1.safetensors'"


def case_wrong_shape_for_architecture(tmp, good, state):
    bad = dict(state)
    bad["visual.transformer.resblocks.1.attn.in_proj_weight"] = torch.zeros(3 * cm.WIDTH, cm.WIDTH - 1)
    torch.save(bad, tmp / "shape.pt")
    return tmp / "shape.pt", "in_proj_weight' has shape \\(192, 63\\), expected \\(192, 64\\)"


def case_missing_block(tmp, good, state):
    bad = {k.replace("resblocks.1.", "resblocks.2."): v for k, v in state.items()}
    torch.save(bad, tmp / "gap.pt")
    return tmp / "gap.pt", r"transformer block\(s\) \[1\] are missing"


def case_missing_tensor(tmp, good, state):
    bad = {k: v for k, v in state.items() if k != "visual.ln_post.bias"}
    torch.save(bad, tmp / "missing.pt")
    return tmp / "missing.pt", "missing tensor 'visual.ln_post.bias'"


def case_integer_weights(tmp, good, state):
    bad = dict(state)
    bad["visual.ln_pre.weight"] = torch.ones(cm.WIDTH, dtype=torch.int64)
    torch.save(bad, tmp / "int.pt")
    return tmp / "int.pt", "not floating-point"


def case_unknown_block_tensor(tmp, good, state):
    bad = dict(state)
    bad["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(cm.WIDTH)
    torch.save(bad, tmp / "ls.pt")
    return tmp / "ls.pt", "unexpected tensor 'ls_1.gamma' in block 0"


def case_no_vision_tower(tmp, good, state):
    torch.save({"text.weight": torch.zeros(3)}, tmp / "text.pt")
    return tmp / "text.pt", "no CLIP or DINOv2 vision tower"


def case_two_towers(tmp, good, state):
    torch.save({"model": state, "model_ema": dict(state)}, tmp / "ema.pt")
    return tmp / "ema.pt", "several vision towers"


CASES = [f for name, f in sorted(globals().items()) if name.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[f.__name__[5:] for f in CASES])
def test_corrupt_input_raises_checkpoint_error(tmp_path, good_zip, clip_state, case):
    path, pattern = case(tmp_path, good_zip, clip_state)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_backbone(path)
    assert str(path) in str(info.value) or os.path.basename(str(path)) in str(info.value)


def test_read_checkpoint_reports_corruption_too(tmp_path, good_zip):
    path = rewrite_zip(good_zip, tmp_path / "nostorage.pt", lambda n, d: None if n == "good/data/0" else (n, d))
    with pytest.raises(CheckpointError, match="is missing"):
        read_checkpoint(path)


def test_every_truncation_of_a_torch_file_is_an_error(tmp_path, clip_state):
    """Cut a small checkpoint at many points: always CheckpointError (or, for a zip cut inside the
    trailing bookkeeping, never anything but CheckpointError)."""
    path = tmp_path / "small.pt"
    torch.save({"visual.class_embedding": clip_state["visual.class_embedding"]}, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    for n in range(0, len(data), max(1, len(data) // 64)):
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError):
            read_checkpoint(cut)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": clip_state["visual.class_embedding"]}, legacy, _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    for n in range(0, len(data), max(1, len(data) // 64)):
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError):
            read_checkpoint(cut)


def test_corrupt_cases_are_many():
    assert len(CASES) >= 15


def test_folder_with_several_weight_files(tmp_path, good_zip):
    folder = tmp_path / "many"
    folder.mkdir()
    shutil.copy(good_zip, folder / "a.pt")
    shutil.copy(good_zip, folder / "b.pt")
    with pytest.raises(CheckpointError, match="several weight files"):
        load_backbone(folder)
