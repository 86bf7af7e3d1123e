"""precision="bf16": the bf16 linear kernel (csrc/bf16_gemm.c) against float64 NumPy on
bf16-rounded inputs, and the bf16 backbone (inference and training) against the fp32 one.

Tolerances, from bf16's 8-bit significand (unit roundoff u = 2^-8, half an ulp):
* the GEMM: inputs are rounded to bf16 before the product (the reference rounds them the same way),
  bf16 x bf16 products are exact in fp32, and the sums accumulate in fp32, so what is left is fp32
  accumulation error, <= ~K 2^-24 relative to sum |a||w|; 1e-5 of sum |a||w| + |bias| + |out| covers
  K up to ~160 in the worst case and every K here in practice (measured <= 2e-7).
* the pipeline: each product rounds both inputs once, at most 2u relative per term (about u/sqrt(3)
  each on average); independent roundings add in quadrature over the K terms, so each product's
  output is off by ~u of its own scale; the residual stream stays fp32 and only accumulates the
  branches' errors, so states stay ~u (max abs / max abs). Measured 1-1.5u on the models below; we
  allow 3u for states, 4u (1.6 %) of the map range for maps and scores, 2u relative for losses and 4u
  for gradients (norm over all head gradients).
"""
import numpy as np
import pytest

import reference as R
import visualad
from bf16_reference import BF16_UNIT as U, round_bf16
from fixtures import clip_case, random_images, to_numpy
from visualad import _engine

pytestmark = pytest.mark.skipif(_engine.precision_kernel("bf16") == "none", reason="this CPU has no AVX512-BF16")


def gemm_reference(x, w, bias=None, out=None):
    a, b = round_bf16(x).astype(np.float64), round_bf16(w).astype(np.float64)
    y, scale = a @ b.T, np.abs(a) @ np.abs(b).T
    for extra in (bias, out):
        if extra is not None:
            y, scale = y + extra, scale + np.abs(extra)
    return y, scale


# rows, cols, depth: not multiples of 6/16/32/64, depth 1, odd depths (a zero-padded pair), one row,
# one column; depth exactly one 3072-deep pass, and just over it (two passes) with rows over one
# row block (168 rows at that depth)
SHAPES = [(1, 1, 1), (5, 3, 1), (7, 65, 3), (13, 130, 33), (6, 64, 64), (100, 70, 129), (37, 200, 1000),
          (50, 17, 1300), (9, 1, 2049), (7, 64, 3072), (200, 130, 3073)]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_gemm_matches_float64(M, N, K):
    rng = np.random.default_rng(M * 131 + N * 7 + K)
    x, w = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    want, scale = gemm_reference(x, w, bias)
    assert np.all(np.abs(_engine.testing.bf16_linear(x, w, bias) - want) <= 1e-5 * scale)
    # accumulation into the output
    out0 = rng.standard_normal((M, N)).astype(np.float32)
    out = out0.copy()
    _engine.testing.bf16_linear(x, w, None, out)
    want, scale = gemm_reference(x, w, None, out0)
    assert np.all(np.abs(out - want) <= 1e-5 * scale)


@pytest.mark.parametrize("M,K", [(131, 300), (200, 3073)])  # one pass / two passes and two row blocks
def test_gemm_rows_and_threads_do_not_change_results(M, K):
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((200, K)).astype(np.float32)
    full = _engine.testing.bf16_linear(x, w)
    for n in (2, 3, 4):
        assert np.array_equal(_engine.testing.bf16_linear(x, w, num_threads=n), full)
    for lo, hi in [(0, 1), (5, 17), (60, 131), (1, 130), (0, M)]:  # any split into row ranges
        assert np.array_equal(_engine.testing.bf16_linear(np.ascontiguousarray(x[lo:hi]), w), full[lo:hi])


def test_gemm_activation_is_applied_in_fp32():
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((20, 70)).astype(np.float32), rng.standard_normal((90, 70)).astype(np.float32)
    plain = _engine.testing.bf16_linear(x, w).astype(np.float64)
    assert np.allclose(_engine.testing.bf16_linear(x, w, activation=0), plain / (1 + np.exp(-1.702 * plain)), rtol=1e-5,
                       atol=1e-6)


def test_gemm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="matching K"):
        _engine.testing.bf16_linear(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32))


# ---------------------------------------------------------------- the pipeline against fp32

MODELS = {
    "clip-64": lambda: clip_case(64, 2, 14, 4, [1, 2], seed=58) + (56, [1, 2]),
    "clip-128": lambda: clip_case(128, 3, 16, 5, [1, 2, 3], seed=67) + (64, [1, 2, 3]),
    "dinov2-reg": lambda: (R.random_dinov2_state(64, 2, grid=4, registers=4, seed=3),
                           R.random_head(64, [1, 2], seed=4, image_size=56), 56, [1, 2]),
}


def detectors(name, threads=2):
    state, head, size, layers = MODELS[name]()
    return [visualad.Detector(to_numpy(state), head=to_numpy(head), layers=layers, image_size=size,
                              num_threads=threads, precision=p) for p in ("fp32", "bf16")], size, layers


@pytest.mark.parametrize("name", sorted(MODELS))
def test_features_maps_and_scores_within_bf16_tolerance(name):
    (d32, d16), size, layers = detectors(name)
    x = random_images(2, size, seed=5).numpy()
    e32, e16 = d32.encode(x), d16.encode(x)
    for l in layers:
        assert np.abs(e16["layers"][l] - e32["layers"][l]).max() <= 3 * U * np.abs(e32["layers"][l]).max()
    m32, s32 = d32.maps_and_scores(x)
    m16, s16 = d16.maps_and_scores(x)
    span = m32.max() - m32.min()
    assert span > 1e-3  # the comparison can fail
    assert np.abs(m16 - m32).max() <= 4 * U * span
    assert np.abs(s16 - s32).max() <= 4 * U * span
    assert not np.array_equal(m16, m32)  # bf16 really ran


@pytest.mark.parametrize("name", ["clip-64", "clip-128"])
def test_training_losses_and_gradients_within_bf16_tolerance(name):
    (d32, d16), size, layers = detectors(name)
    x = random_images(3, size, seed=5).numpy()
    labels = np.array([0, 1, 1])
    masks = [None, np.random.default_rng(1).random((size, size)) > 0.8, None]
    l32, g32 = d32.loss_and_grad(x, labels, masks)
    l16, g16 = d16.loss_and_grad(x, labels, masks)
    for k in l32:
        assert abs(l16[k] - l32[k]) <= 2 * U * max(1.0, abs(l32[k])), k
    ref = np.concatenate([g32[k].ravel() for k in g32])
    ours = np.concatenate([g16[k].ravel() for k in g32])
    assert np.linalg.norm(ours - ref) <= 4 * U * np.linalg.norm(ref)
    for k in ("anomaly_token", "normal_token"):  # through the bf16 backward of the frozen blocks
        assert np.linalg.norm(g16[k] - g32[k]) <= 4 * U * np.linalg.norm(g32[k]), k


def test_backbone_thread_count_does_not_change_bf16_results():
    state, _, size, _ = MODELS["clip-128"]()
    from visualad.backbone import build_backbone
    bb = build_backbone(to_numpy(state))
    x = random_images(2, size, seed=9).numpy()
    outs = [_engine.Backbone(bb.config, bb.params, n, "bf16").forward(x, [1, 3]) for n in (1, 2, 3)]
    for other in outs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(outs[0], other))


# ---------------------------------------------------------------- the API

def test_precision_is_a_parameter_and_is_validated():
    (d32, d16), size, _ = detectors("clip-64")
    assert d32.get_params()["precision"] == "fp32" and d16.get_params()["precision"] == "bf16"
    bad = visualad.Detector(d32.backbone, head=d32.head, image_size=size, precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        bad.anomaly_scores(random_images(1, size).numpy())
    with pytest.raises(ValueError, match="precision"):
        _engine.Backbone({}, np.zeros(1, np.float32), 1, "int8")


def test_bf16_is_refused_naming_the_feature_where_the_cpu_lacks_it():
    (_, d16), size, _ = detectors("clip-64")
    previous = _engine.testing.allow_bf16(False)
    try:
        assert visualad.engine_info()["precisions"]["bf16"] == {
            "kernel": "none", "available": False,
            "reason": "needs AVX512-BF16 (vdpbf16ps), which this CPU or OS does not offer"}
        with pytest.raises(ValueError, match="AVX512-BF16"):
            d16.anomaly_scores(random_images(1, size).numpy())
        with pytest.raises(ValueError, match="AVX512-BF16"):
            _engine.testing.bf16_linear(np.ones((1, 1), np.float32), np.ones((1, 1), np.float32))
    finally:
        _engine.testing.allow_bf16(previous)
    assert d16.anomaly_scores(random_images(1, size).numpy()).shape == (1,)


def test_engine_info_reports_features_and_kernels():
    info = visualad.engine_info()
    assert set(info["cpu_features"]) >= {"avx512f", "avx512bf16", "amx_tile", "amx_bf16", "os_amx", "amx_permitted"}
    assert info["precisions"]["bf16"]["kernel"] == "avx512bf16"
    assert info["precisions"]["fp32"]["kernel"] in ("avx512f", "openblas")


def test_cli_commands_take_precision():
    from visualad.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["demo", "--precision", "bf16"]).precision == "bf16"
    for cmd in (["predict", "a.png", "--out", "o"], ["eval", "--data", "d", "--dataset", "mvtec"],
                ["train", "--data", "d", "--dataset", "mvtec", "--out", "h"], ["convert", "a", "b"]):
        assert parser.parse_args(cmd + (["--backbone", "b"] if cmd[0] != "convert" else [])).precision == "fp32"
        assert parser.parse_args(cmd + (["--backbone", "b"] if cmd[0] != "convert" else []) +
                                 ["--precision", "bf16"]).precision == "bf16"


# ---------------------------------------------------------------- weight memory: one bf16 pack per model

def small_and_linear_floats(config):
    """(floats of the tensors a bf16-only model keeps in fp32, of its linear weights and patch
    embedding, of its bf16 forward pack lower bound (panels of 64 output columns, pairs of inputs))."""
    layout, _ = _engine.vit_layout(config)
    small = linear = packed = 0
    for name, shape, _, panel in layout:
        size = int(np.prod(shape))
        if panel or name == "patch.weight":
            n, k = shape[0], size // shape[0]
            linear += size
            packed += -(-n // 64) * 64 * 2 * -(-k // 2)
        else:
            small += size
    return small, linear, packed, len(layout)


def same_bits(a, b) -> bool:
    """Equal arrays, or equal nested lists / tuples of arrays, bit for bit."""
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_bits(u, v) for u, v in zip(a, b))
    return np.array_equal(a, b)


def backward_once(state, x, layers, width):
    """encode_train + encode_backward on one state: the gradient of the tokens (through the bf16 backward)."""
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((2, width)).astype(np.float32)
    ln = (np.ones(width, np.float32), np.zeros(width, np.float32))
    feats, ta, tn = state.encode_train(x, layers, tokens, *ln)
    grads = state.encode_backward([np.ones_like(f) for f in feats], np.ones_like(ta), np.ones_like(tn))
    return [feats, ta, tn, *grads]


def test_bf16_states_share_the_models_one_pack():
    state, _, size, layers = MODELS["clip-128"]()
    from visualad.backbone import build_backbone
    bb = build_backbone(to_numpy(state))
    x = random_images(2, size, seed=9).numpy()
    small, linear, packed, n = small_and_linear_floats(bb.config)
    model = _engine.BackboneModel(bb.config, bb.params)
    assert model.weight_bytes() == {"fp32": bb.params.nbytes, "bf16": 0}
    states = [model.state(2, "bf16")]
    fwd = model.weight_bytes()["bf16"]
    assert 2 * packed <= fwd <= 2 * (packed + 32 * n)  # bf16: about half the fp32 linear weights
    states += [model.state(1, "bf16"), model.state(3, precision="bf16")]
    assert model.weight_bytes()["bf16"] == fwd  # more states, no more packs
    own = _engine.Backbone(bb.config, bb.params, 2, "bf16")  # a private model: its own pack
    want_fwd, want_bwd = own.forward(x, layers), backward_once(own, x, layers, bb.width)
    for s in states:
        assert same_bits(s.forward(x, layers), want_fwd)
    assert same_bits(backward_once(states[0], x, layers, bb.width), want_bwd)
    bwd = model.weight_bytes()["bf16"]
    assert 2 * fwd - 2 * 64 * 2 * 3 * 16 * 16 <= bwd  # the transposes came, once
    for s in states[1:]:
        assert same_bits(backward_once(s, x, layers, bb.width), want_bwd)
    assert model.weight_bytes()["bf16"] == bwd


def test_bf16_only_model_keeps_no_fp32_linear_weights_and_gives_the_same_bits():
    state, _, size, layers = MODELS["dinov2-reg"]()
    from visualad.backbone import build_backbone
    bb = build_backbone(to_numpy(state))
    x = random_images(2, size, seed=3).numpy()
    small, linear, packed, n = small_and_linear_floats(bb.config)
    want = _engine.Backbone(bb.config, bb.params, 2, "bf16")
    params = bb.params.copy()
    model = _engine.BackboneModel(bb.config, params, "bf16")
    params[:] = np.nan  # not read after the model was made
    del params
    held = model.weight_bytes()
    assert 4 * small <= held["fp32"] <= 4 * (small + 16 * n) < bb.params.nbytes
    assert 2 * packed <= held["bf16"] <= 2 * (packed + 32 * n)
    s = model.state(2, "bf16")
    assert same_bits(s.forward(x, layers, final_norm=True), want.forward(x, layers, final_norm=True))
    assert same_bits(backward_once(s, x, layers, bb.width), backward_once(want, x, layers, bb.width))
    with pytest.raises(ValueError, match="bf16 only"):
        model.state(1)  # fp32 needs the fp32 weights
    with pytest.raises(ValueError, match="precision"):
        _engine.BackboneModel(bb.config, bb.params, "fp16")


def test_two_threads_creating_bf16_states_at_once_get_one_pack_and_the_same_bits():
    import threading
    from visualad.backbone import build_backbone
    # wide enough that packing takes longer than the threads' start-up jitter (without the model's
    # lock both threads pack in nearly every round)
    bb = build_backbone(to_numpy(R.random_clip_state(256, 2, 14, 4, seed=2)))
    size, layers = 56, [1, 2]
    x = random_images(2, size, seed=4).numpy()
    want = _engine.Backbone(bb.config, bb.params, 1, "bf16")
    want_fwd, want_bwd = want.forward(x, layers), backward_once(want, x, layers, bb.width)
    for attempt in range(8):  # each round races the forward packs (state()) and the transposes (backward)
        model = _engine.BackboneModel(bb.config, bb.params)
        barrier, outs = threading.Barrier(2), [None, None]

        def run(i):
            barrier.wait()
            s = model.state(1 + i, "bf16")
            outs[i] = (s.forward(x, layers), backward_once(s, x, layers, bb.width))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        one = _engine.BackboneModel(bb.config, bb.params)
        backward_once(one.state(1, "bf16"), x, layers, bb.width)
        assert model.weight_bytes() == one.weight_bytes()  # one forward pack and one transpose, not two
        for fwd, bwd in outs:
            assert same_bits(fwd, want_fwd) and same_bits(bwd, want_bwd)


def test_bf16_detector_holds_only_the_bf16_weights(tmp_path):
    from sklearn.base import clone
    from visualad import model_cache
    model_cache.clear()  # a fresh load: no earlier test's training made its transposes
    (d32, d16), size, layers = detectors("clip-128")
    x = random_images(2, size, seed=5).numpy()
    d16.anomaly_scores(x)
    assert d16._backbone_.params is None and d16._loaded_.precision == "bf16"
    small, linear, packed, n = small_and_linear_floats(d16._backbone_.config)
    held = d16._loaded_.weight_bytes()
    assert 4 * small <= held["fp32"] <= 4 * (small + 16 * n)  # no fp32 linear weights
    assert 2 * packed <= held["bf16"] <= 2 * (packed + 32 * n)
    key = d16._loaded_.key
    assert (key, "fp32") not in model_cache._entries  # nothing fp32 was loaded for it
    clones = [clone(d16) for _ in range(3)]
    for c in clones:
        np.testing.assert_array_equal(c.anomaly_scores(x), d16.anomaly_scores(x))
    assert all(c._loaded_ is d16._loaded_ for c in clones) and d16._loaded_.weight_bytes() == held
    d32.anomaly_scores(x)
    assert d32._loaded_.key == key and d32._loaded_.weight_bytes() == {"fp32": d32._backbone_.params.nbytes, "bf16": 0}


def _file_tensors(path):
    from visualad.checkpoint.safetensors import read_safetensors
    arrays, _ = read_safetensors(str(path))
    return {k: np.asarray(v) for k, v in arrays.items()}


def _same_tensors(a, b):
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("source", ["dict", "file"])
def test_bf16_detector_saves_pickles_and_switches_with_the_exact_weights(tmp_path, source):
    import pickle
    from visualad import model_cache
    state, head, size, layers = MODELS["clip-64"]()
    spec = to_numpy(state)
    if source == "file":
        visualad.Detector(spec, image_size=size, layers=layers).save(tmp_path / "backbone.safetensors")
        spec = str(tmp_path / "backbone.safetensors")
    model_cache.clear()
    kw = dict(head=to_numpy(head), layers=layers, image_size=size, num_threads=2, epochs=1, batch_size=2)
    d16 = visualad.Detector(spec, precision="bf16", **kw)
    x = random_images(4, size, seed=6).numpy()
    d16.save(tmp_path / "d16.safetensors")
    key = d16._loaded_.key
    assert (key, "fp32") not in model_cache._entries  # the float32 weights were read again, not kept
    d32 = visualad.Detector(spec, precision="fp32", **kw)
    d32.save(tmp_path / "d32.safetensors")
    f16, f32 = _file_tensors(tmp_path / "d16.safetensors"), _file_tensors(tmp_path / "d32.safetensors")
    assert _same_tensors(f16, f32) and any(k.startswith("backbone.") for k in f16)
    # a file saved by the bf16 Detector loads as that Detector again, bf16 only
    again = visualad.Detector.load(tmp_path / "d16.safetensors")
    assert again.precision == "bf16" and again._model().precision == "bf16"
    assert (again._loaded_.key, "fp32") not in model_cache._entries
    np.testing.assert_array_equal(again.anomaly_maps(x), d16.anomaly_maps(x))
    if source == "file":  # a file that refers to its backbone: the referred weights load bf16 only too
        d16.save(tmp_path / "ref16.safetensors", include_backbone=False)
        ref16 = visualad.Detector.load(tmp_path / "ref16.safetensors")
        assert ref16._backbone_.params is None and ref16._loaded_.model is d16._loaded_.model
        np.testing.assert_array_equal(ref16.anomaly_maps(x), d16.anomaly_maps(x))
    # pickling: a reference, the same loaded bf16 backbone and bits
    unpickled = pickle.loads(pickle.dumps(d16))
    np.testing.assert_array_equal(unpickled.anomaly_maps(x), d16.anomaly_maps(x))
    assert unpickled._loaded_ is d16._loaded_
    # features: the bf16 tower's, within bf16 tolerance of fp32's
    f = d16.features(x[:2])
    ref = d32.features(x[:2])
    assert np.abs(f["final"] - ref["final"]).max() <= 3 * U * np.abs(ref["final"]).max()
    # train in bf16, then switch to fp32: the trained head stays, the fp32 weights come back exactly
    d16.fit(x, np.array([0, 1, 0, 1]))
    trained = d16.head_
    d16.set_params(precision="fp32")
    assert d16._model().precision == "fp32" and d16.head_ is trained and d16._backbone_.params is not None
    fp32_with_head = visualad.Detector(spec, **dict(kw, head=trained))
    np.testing.assert_array_equal(d16.anomaly_maps(x), fp32_with_head.anomaly_maps(x))
    d16.save(tmp_path / "switched.safetensors")
    fp32_with_head.save(tmp_path / "fp32_trained.safetensors")
    assert _same_tensors(_file_tensors(tmp_path / "switched.safetensors"),
                         _file_tensors(tmp_path / "fp32_trained.safetensors"))
    d16.set_params(precision="bf16")
    assert d16._model().precision == "bf16" and d16.head_ is trained


def test_bf16_detector_refuses_to_save_a_dict_edited_in_place_since_it_was_loaded(tmp_path):
    state, head, size, layers = MODELS["clip-64"]()
    spec = to_numpy(state)
    det = visualad.Detector(spec, head=to_numpy(head), layers=layers, image_size=size, precision="bf16")
    det.anomaly_scores(random_images(1, size).numpy())
    spec["visual.ln_post.bias"] = spec["visual.ln_post.bias"] + 1  # the engine still runs the loaded weights
    with pytest.raises(ValueError, match="changed since they were loaded"):
        det.save(tmp_path / "d.safetensors")
    det.set_params(backbone=dict(spec))
    det.save(tmp_path / "d.safetensors")
    assert np.array_equal(_file_tensors(tmp_path / "d.safetensors")["backbone.ln_post.bias"], spec["visual.ln_post.bias"])


@pytest.mark.parametrize("C", [1, 7, 16, 17, 31, 32, 33, 100, 768, 1031])
def test_layernorm_bf16_rows_are_the_fp32_layernorm_rounded(C):
    """The bf16 path normalises straight into the next product's bf16 input: it must equal the fp32
    LayerNorm rounded to nearest-even bf16, at every width (vector tails, odd widths) and thread count."""
    rng = np.random.default_rng(C)
    x = (rng.standard_normal((11, C)) * 2 + 1).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    want = round_bf16(_engine.testing.layernorm(x, w, b, 1e-6))
    for threads in (1, 3):
        got = _engine.testing.layernorm(x, w, b, 1e-6, precision="bf16", num_threads=threads)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
