"""Hostile and malformed files and arguments: each case an attacker or a careless user found is
refused with the project's exception, without a crash, without changing what later (trusted)
files give, and without allocating more than the input justifies.

Files are written by the real libraries (torch.save, safetensors, Pillow, Detector.save) and then
altered the way the attack needs (a field rewritten, a pickle written opcode by opcode).
"""
import io
import json
import os
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import visualad
import visualad.checkpoint.detector_file
from visualad import _engine, limits, metrics
from visualad.checkpoint import load_backbone, read_checkpoint
from visualad.checkpoint.safetensors import read_safetensors, save_safetensors
from visualad.errors import CheckpointError

from fuzz.seeds import GRID, PATCH, _tiny_vit

SIZE = PATCH * GRID


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    """A tiny CLIP tower saved by torch (zip and legacy), its detector file, and the maps a
    detector built from each gives on fixed images."""
    folder = tmp_path_factory.mktemp("trusted")
    state = _tiny_vit().state_dict()
    paths = {"zip": str(folder / "tower.pt"), "legacy": str(folder / "tower_legacy.pt")}
    torch.save(state, paths["zip"])
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    images = np.random.default_rng(0).integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    det = visualad.Detector(paths["zip"], image_size=SIZE, layers=[1], num_threads=1)
    paths["detector"] = str(folder / "detector.safetensors")
    det.save(paths["detector"])
    return paths, images, _snapshot(paths, images)


def _snapshot(paths: dict, images) -> dict:
    out = {}
    for kind in ("zip", "legacy"):
        out[kind] = read_checkpoint(paths[kind])
        det = visualad.Detector(paths[kind], image_size=SIZE, layers=[1], num_threads=1)
        out[kind + "_maps"] = det.anomaly_maps(images)
    out["detector_maps"] = visualad.Detector.load(paths["detector"]).anomaly_maps(images)
    return out


def _assert_same(before: dict, after: dict) -> None:
    for key, value in before.items():
        if key.endswith("_maps"):
            assert np.array_equal(value, after[key]), key
        else:
            assert value.keys() == after[key].keys()
            for name, arr in value.items():
                assert arr.dtype == after[key][name].dtype and np.array_equal(arr, after[key][name]), name


def _rewrite_meta(src: str, dst: str, change) -> str:
    """A copy of a visualad file whose metadata document went through ``change(meta)``."""
    arrays, metadata = read_safetensors(src)
    meta = json.loads(metadata["visualad"])
    change(meta)
    save_safetensors(dst, arrays, {"visualad": json.dumps(meta)})
    return dst


def _legacy_file(path, pickle_bytes: bytes) -> str:
    with open(path, "wb") as f:
        f.write(pickle_bytes)
    return str(path)


def _zip_with_pickle(path, pickle_bytes: bytes, compress=zipfile.ZIP_STORED) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo("evil/data.pkl"), pickle_bytes, compress_type=compress)
        zf.writestr("evil/version", b"3\n")
    return str(path)


def _peak_bytes(fn) -> int:
    """Peak bytes traced (Python and NumPy allocations) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _raises_checkpoint_error(fn, *match) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        fn()
    for text in match:
        assert text in str(info.value), (text, str(info.value))
    return info.value


# ------------------------------------------------------------------------------------ 1. sizes in a detector file
@pytest.mark.parametrize("key,value", [("grid", 65536), ("grid", 2 ** 32 + 16), ("width", 2 ** 32 + 96),
                                        ("depth", 257), ("patch", 65), ("registers", 65), ("patch", 2 ** 20),
                                        ("registers", 2 ** 30), ("mlp_hidden", 2 ** 31 - 1), ("grid", -1)])
def test_detector_file_with_out_of_range_sizes_is_refused(tmp_path, trusted, key, value):
    paths = trusted[0]
    path = _rewrite_meta(paths["detector"], str(tmp_path / "big.safetensors"),
                         lambda m: m["backbone_config"].__setitem__(key, value))
    err = _raises_checkpoint_error(lambda: visualad.Detector.load(path), path, key)
    assert any(w in str(err) for w in ("limits", "must be in", "positive", "too large"))


@pytest.mark.parametrize("change,words", [
    (lambda m: m["backbone_config"].pop("grid"), ["missing 'grid'"]),
    (lambda m: m["backbone_config"].__setitem__("width", "96"), ["'width' must be an int"]),
    (lambda m: m["backbone_config"].__setitem__("width", 96.0), ["'width' must be an int"]),
    (lambda m: m.__setitem__("settings", [1, 2]), ["'settings' must be an object"]),
    (lambda m: m.__setitem__("settings", {"image_size": 128.9}), ["image_size must be a whole number"]),
    (lambda m: m.__setitem__("settings", {"num_threads": 2 ** 40}), ["num_threads must be in"]),
    (lambda m: m.__setitem__("settings", {"threshold": float("nan")}), ["threshold must be a finite"]),
    (lambda m: m.__setitem__("settings", {"layers": [1.7]}), ["layers"]),
    (lambda m: m.__setitem__("settings", {"precision": 7}), ["precision"]),
    (lambda m: m["settings"].__setitem__("layers", [99]), ["layers"]),
    (lambda m: m["settings"].__setitem__("layers", [1] * (limits.MAX_LAYERS + 1)), ["layers"]),
    (lambda m: m.__setitem__("head_info", "x"), ["head_info"]),
    (lambda m: m.__setitem__("family", ["clip"]), ["family"]),
    (lambda m: m.__setitem__("backbone_path", 5), ["backbone_path"]),
])
def test_detector_file_with_malformed_metadata_is_refused(tmp_path, trusted, change, words):
    path = _rewrite_meta(trusted[0]["detector"], str(tmp_path / "bad.safetensors"), change)
    _raises_checkpoint_error(lambda: visualad.Detector.load(path), path, *words)


def test_detector_file_with_nan_weights_is_refused(tmp_path, trusted):
    arrays, metadata = read_safetensors(trusted[0]["detector"])
    arrays["backbone.cls"] = np.full_like(arrays["backbone.cls"], np.nan)
    path = str(tmp_path / "nan.safetensors")
    save_safetensors(path, arrays, metadata)
    _raises_checkpoint_error(lambda: visualad.Detector.load(path), path, "NaN")


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_torch_checkpoint_with_nan_weights_is_refused(tmp_path, trusted, kind):
    state = _tiny_vit().state_dict()
    name = next(k for k in state if k.endswith("class_embedding"))
    state[name] = torch.full_like(state[name], float("nan"))
    path = str(tmp_path / "nan.pt")
    torch.save(state, path, _use_new_zipfile_serialization=kind == "zip")
    _raises_checkpoint_error(lambda: visualad.Detector(path, image_size=SIZE, layers=[1]).encode(
        trusted[1]), path, "NaN", "class_embedding")


def test_engine_config_checks_every_size_in_c():
    """The glue refuses instead of truncating; the engine's check bounds every size (csrc/vad_limits.h)."""
    cfg = dict(width=8, depth=1, heads=2, patch=4, grid=2, mlp_hidden=32)
    _engine.vit_layout(cfg)
    for key, value in [("grid", 2 ** 32 + 16), ("width", 2 ** 32 + 96), ("depth", 2 ** 63)]:
        with pytest.raises(ValueError, match=key):
            _engine.vit_layout(dict(cfg, **{key: value}))
    for key, limit in [("width", limits.MAX_WIDTH), ("depth", limits.MAX_DEPTH), ("patch", limits.MAX_PATCH),
                       ("grid", limits.MAX_GRID), ("registers", limits.MAX_REGISTERS)]:
        with pytest.raises(ValueError, match="limits"):
            _engine.vit_layout(dict(cfg, **{key: limit + 1}))
    with pytest.raises(TypeError, match="'width' must be an int"):
        _engine.vit_layout(dict(cfg, width="8"))
    with pytest.raises(TypeError, match="'patch' must be an int"):
        _engine.vit_layout(dict(cfg, patch=4.0))
    with pytest.raises(ValueError, match="missing 'grid'"):
        _engine.vit_layout({k: v for k, v in cfg.items() if k != "grid"})


def test_python_and_c_limits_agree():
    c = _engine.limits()
    assert c == {"width": limits.MAX_WIDTH, "depth": limits.MAX_DEPTH, "heads": limits.MAX_HEADS,
                 "patch": limits.MAX_PATCH, "grid": limits.MAX_GRID, "registers": limits.MAX_REGISTERS,
                 "mlp_hidden": limits.MAX_MLP_HIDDEN, "image_side": limits.MAX_IMAGE_SIDE,
                 "threads": limits.MAX_THREADS, "layers": limits.MAX_LAYERS}


# ------------------------------------------------------------------------------------ 2. allow-list bypass
def _pickle(*parts: bytes) -> bytes:
    return b"\x80\x02" + b"".join(parts) + b"."


def _text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


MUTATIONS = {
    # BUILD on the shared torch.float32 stand-in: later float32 tensors would decode as bfloat16
    "dtype_state": _pickle(b"ctorch\nfloat32\n", b"}(", _text("name"), _text("bfloat16"), b"u", b"b"),
    # BUILD with slot state on torch.FloatStorage: later storages would become another type
    "storage_slots": _pickle(b"ctorch\nFloatStorage\n", b"N}(", _text("etype"), b"ctorch\nuint8\n", b"u",
                             b"\x86", b"b"),
    # BUILD on a rebuild function: its defaults would change for every later file
    "function_defaults": _pickle(b"ctorch._utils\n_rebuild_tensor_v2\n", b"N}(", _text("__defaults__"), b"(\x88N",
                                 _text("x"), b"t", b"u\x86", b"b"),
    # BUILD on the TorchScript stand-in class itself
    "torchscript_class": _pickle(b"c__torch__\nM\n", b"N}(", _text("attributes"), b"}u\x86", b"b"),
    # SETITEM on an allowed class
    "setitem_on_class": _pickle(b"ccollections\nOrderedDict\n", _text("k"), _text("v"), b"s"),
    # APPENDS on something that is not a list
    "appends_on_dtype": _pickle(b"ctorch\nfloat32\n", b"(", _text("v"), b"e"),
}


@pytest.mark.parametrize("container", ["legacy", "zip"])
@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_pickle_cannot_change_what_later_files_give(tmp_path, trusted, name, container):
    paths, images, before = trusted
    data = MUTATIONS[name]
    if container == "legacy":
        assert len(data) < 120
        evil = _legacy_file(tmp_path / "evil.pt", data)
    else:
        evil = _zip_with_pickle(tmp_path / "evil.pt", data)
    for reader in (read_checkpoint, load_backbone):
        _raises_checkpoint_error(lambda: reader(evil), evil, "not allowed")
    _assert_same(before, _snapshot(paths, images))


# ------------------------------------------------------------------------------------ 3. memory from tiny files
@pytest.mark.parametrize("container", ["legacy", "zip"])
def test_huge_memo_index_costs_nothing(tmp_path, container):
    data = _pickle(b"]", b"r" + struct.pack("<I", 2 ** 27), b"0", b"h" + b"\x00")  # LONG_BINPUT 2**27, BINGET 0
    assert len(data) < 140
    path = _legacy_file(tmp_path / "memo.pt", data) if container == "legacy" else \
        _zip_with_pickle(tmp_path / "memo.pt", data)
    assert _peak_bytes(lambda: pytest.raises(CheckpointError, read_checkpoint, path)) < 10 << 20


def _zip_with_declared_size(members: list, patched: str, declared: int) -> bytes:
    """A zip of ``(name, body, compression)`` members in which the declared (uncompressed) size of
    member ``patched`` is rewritten to ``declared`` in its local header and central directory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, body, compress in members:
            zf.writestr(zipfile.ZipInfo(name), body, compress_type=compress)
    raw = bytearray(buf.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
        local = zf.getinfo(patched).header_offset
    struct.pack_into("<I", raw, local + 22, declared)
    name = patched.encode()
    pos = raw.index(b"PK\x01\x02")
    while raw[pos + 46:pos + 46 + len(name)] != name:
        pos = raw.index(b"PK\x01\x02", pos + 4)
    struct.pack_into("<I", raw, pos + 24, declared)
    return bytes(raw)


@pytest.mark.parametrize("member", ["evil/data.pkl", "evil/byteorder"])
@pytest.mark.parametrize("compress", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_compression_bomb_member_is_refused_before_decompressing(tmp_path, member, compress):
    bomb = b"\0" * (64 << 20)  # 64 MB from a few KB (the attack used 4 GB); declared as 8 bytes
    members = [("evil/data.pkl", _pickle(b"}"), zipfile.ZIP_STORED), ("evil/byteorder", b"little", zipfile.ZIP_STORED)]
    members = [(n, bomb, compress) if n == member else (n, b, c) for n, b, c in members]
    path = tmp_path / "bomb.pt"
    path.write_bytes(_zip_with_declared_size(members, member, 8))
    assert os.path.getsize(path) < 64 << 10
    assert _peak_bytes(lambda: _raises_checkpoint_error(lambda: read_checkpoint(path), str(path),
                                                        "compression")) < 8 << 20


def test_oversized_data_pkl_is_refused_before_reading(tmp_path):
    raw = _zip_with_declared_size([("evil/data.pkl", _pickle(b"}"), zipfile.ZIP_STORED)], "evil/data.pkl", 2 ** 31)
    path = tmp_path / "big.pt"
    path.write_bytes(raw)
    _raises_checkpoint_error(lambda: read_checkpoint(path), str(path), "declares 2147483648 bytes")


def test_huge_safetensors_header_is_refused_before_parsing(tmp_path):
    n = limits.MAX_JSON_BYTES + 8
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.write(b"{" + b" " * (n - 2) + b"}")
    assert _peak_bytes(lambda: _raises_checkpoint_error(lambda: read_checkpoint(path), str(path), "exceeds")) \
        < 1 << 20


def test_overlapping_views_are_refused(tmp_path):
    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(10 ** 8)}, path)  # 4 bytes of storage, 400 MB as a view
    assert _peak_bytes(lambda: _raises_checkpoint_error(lambda: read_checkpoint(path), str(path),
                                                        "overlapping")) < 1 << 20


# ------------------------------------------------------------------------------------ 4. only the project's errors
@pytest.mark.parametrize("where", ["safetensors_header", "config_json", "visualad_metadata"])
def test_json_nested_100000_deep_is_a_checkpoint_error(tmp_path, trusted, where):
    deep = "[" * 100_000 + "]" * 100_000
    if where == "safetensors_header":
        path = tmp_path / "deep.safetensors"
        text = ('{"a":' + deep + "}").encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text)
        _raises_checkpoint_error(lambda: read_checkpoint(path), str(path), "nested too deeply")
    elif where == "config_json":
        from fuzz.seeds import _hf_seed
        folder = _hf_seed(str(tmp_path))[0]
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write('{"model_type": "clip_vision_model", "x": ' + deep + "}")
        _raises_checkpoint_error(lambda: load_backbone(folder), "config.json", "nested too deeply")
    else:
        arrays, metadata = read_safetensors(trusted[0]["detector"])
        path = str(tmp_path / "deep.safetensors")
        save_safetensors(path, arrays, {"visualad": deep})
        _raises_checkpoint_error(lambda: visualad.checkpoint.detector_file.read_detector_file(path), path, "nested too deeply")
        _raises_checkpoint_error(lambda: visualad.Detector.load(path), path)  # "not a visualad detector file"


def test_int_too_large_to_print_is_reported(tmp_path):
    big = 10 ** 5000  # repr() of it raises ValueError
    digits = big.to_bytes((big.bit_length() + 8) // 8, "little", signed=True)
    data = _pickle(b"(", _text("storage"), b"ctorch\nFloatStorage\n", _text("0"), _text("cpu"),
                   b"\x8b" + struct.pack("<I", len(digits)) + digits, b"tQ")
    path = _zip_with_pickle(tmp_path / "bigint.pt", data)
    _raises_checkpoint_error(lambda: read_checkpoint(path), path, "malformed storage reference", "bits")


def test_nested_tuple_dict_key_is_refused(tmp_path):
    data = _pickle(b"}", b")" + b"\x85" * 200_000, _text("v"), b"s")  # key: a tuple nested 200,000 deep
    path = _zip_with_pickle(tmp_path / "deepkey.pt", data)
    _raises_checkpoint_error(lambda: read_checkpoint(path), path, "keys must be")


# ------------------------------------------------------------------------------------ 5. arguments
def _threads_now() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def test_num_threads_is_capped_at_the_cores(trusted):
    cores = limits.usable_cores()
    with pytest.raises(ValueError, match="num_threads must be in"):  # beyond the largest pool
        visualad.Detector(trusted[0]["zip"], image_size=SIZE, layers=[1], num_threads=1000).anomaly_maps(trusted[1])
    det = visualad.Detector(trusted[0]["zip"], image_size=SIZE, layers=[1], num_threads=limits.MAX_THREADS)
    before = _threads_now()
    det.anomaly_maps(trusted[1])
    assert det._threads() == min(cores, limits.MAX_THREADS)
    assert _threads_now() - before <= 2 * cores  # backbone and head pools, each at most `cores` threads
    assert np.array_equal(det.anomaly_maps(trusted[1]), trusted[2]["zip_maps"])


def test_metrics_num_threads_is_capped_or_refused():
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 70_000), rng.random(70_000)
    reference = metrics.binary_metrics(y, s, num_threads=1)
    assert metrics.binary_metrics(y, s, num_threads=limits.MAX_THREADS) == reference  # capped at the cores
    for bad, err in [(10 ** 6, ValueError), (2 ** 40, ValueError), (2.5, ValueError), (0, ValueError),
                     ("2", TypeError), (True, TypeError)]:
        with pytest.raises(err, match="num_threads"):
            metrics.binary_metrics(y, s, num_threads=bad)


def test_engine_refuses_bad_thread_counts():
    cfg = dict(width=8, depth=1, heads=2, patch=4, grid=2, mlp_hidden=32)
    _, total = _engine.vit_layout(cfg)
    params = np.zeros(total, np.float32)
    for bad, err in [(2 ** 40, ValueError), (limits.MAX_THREADS + 1, ValueError), (0, ValueError),
                     (2.5, TypeError)]:
        with pytest.raises(err, match="num_threads"):
            _engine.Backbone(cfg, params, bad)
    with pytest.raises(ValueError, match="num_threads"):
        _engine.testing.gaussian_filter(np.zeros((1, 4, 4), np.float32), 1.0, 10 ** 6)


@pytest.mark.parametrize("param,value,err", [
    ("image_size", 128.9, ValueError), ("image_size", float("nan"), ValueError), ("image_size", "8", TypeError),
    ("layers", [1.7], ValueError), ("num_threads", 2.5, ValueError), ("num_threads", 2 ** 40, ValueError),
    ("batch_size", 0.5, ValueError), ("image_size", limits.MAX_IMAGE_SIDE + PATCH, ValueError),
])
def test_detector_arguments_are_not_truncated(trusted, param, value, err):
    det = visualad.Detector(trusted[0]["zip"], **{"image_size": SIZE, "layers": [1], param: value})
    with pytest.raises(err, match=param):
        det.anomaly_scores(trusted[1])


def test_integral_floats_are_accepted(trusted):
    det = visualad.Detector(trusted[0]["zip"], image_size=float(SIZE), layers=[1.0], num_threads=1.0)
    assert np.array_equal(det.anomaly_maps(trusted[1]), trusted[2]["zip_maps"])


def test_nan_threshold_is_refused(trusted):
    det = visualad.Detector(trusted[0]["zip"], image_size=SIZE, layers=[1], threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold"):
        det.predict(trusted[1])


def test_huge_image_size_is_refused_before_allocating(trusted):
    det = visualad.Detector(trusted[0]["zip"], image_size=SIZE, layers=[1])
    det.anomaly_scores(trusted[1][:1])  # loads the model and its head
    det.set_params(image_size=PATCH * 2 ** 20)
    assert _peak_bytes(lambda: pytest.raises(ValueError, det.anomaly_maps, trusted[1])) < 1 << 20


@pytest.mark.parametrize("image", [np.zeros((0, 0, 3), np.uint8), np.zeros((5, 0), np.uint8),
                                   Image.new("RGB", (0, 0))], ids=["array_0x0", "array_5x0", "pil_0x0"])
def test_empty_images_are_refused(trusted, image):
    det = visualad.Detector(trusted[0]["zip"], image_size=SIZE, layers=[1])
    with pytest.raises(ValueError, match="empty"):
        det.anomaly_scores([image])


# ------------------------------------------------------------------------------------ 6. images
def _tiff(width: int, height: int) -> bytes:
    """A minimal 8-bit grayscale TIFF declaring width x height pixels (and holding 16 bytes)."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
            (278, 4, height), (279, 4, 16)]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(tags) + 4
    tags[5] = (273, 4, data_offset)
    out = b"II*\0" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        out += struct.pack("<HHII", tag, kind, 1, value)
    return out + b"\0\0\0\0" + bytes(16)


def test_pixel_bomb_tiff_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.tif"
    path.write_bytes(_tiff(16, 8_454_160))
    assert os.path.getsize(path) < 1000
    with Image.open(path) as im:
        assert im.size == (16, 8_454_160)  # what Pillow would decode (1.2 GB as RGB)
    det_source = visualad.preprocess.ImageSource([str(path)], 16, (0.5,) * 3, (0.25,) * 3)
    assert _peak_bytes(lambda: pytest.raises(ValueError, det_source.batch, 0, 1)) < 1 << 20
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        det_source.batch(0, 1)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.new("RGB", (8, 6)).save(path)
    src = visualad.preprocess.ImageSource([str(path)], 16, (0.5,) * 3, (0.25,) * 3)
    assert src.batch(0, 1).shape == (1, 3, 16, 16)
    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 47)
    with pytest.raises(ValueError, match="8x6 = 48 pixels exceeds the limit of 47"):
        src.batch(0, 1)
