"""precision="bf16": the bf16 linear kernel (csrc/bf16_gemm.c) against float64 NumPy on
bf16-rounded inputs, and the bf16 backbone (inference and training) against the fp32 one.

Tolerances, from bf16's 8-bit significand (unit roundoff u = 2^-9):
* the GEMM: inputs are rounded to bf16 before the product (the reference rounds them the same way),
  bf16 x bf16 products are exact in fp32, and the sums accumulate in fp32, so what is left is fp32
  accumulation error, <= ~K 2^-24 relative to sum |a||w|; 1e-5 of sum |a||w| + |bias| + |out| covers
  K up to ~160 in the worst case and every K here in practice (measured <= 2e-7).
* the pipeline: each product rounds both inputs once, 2u relative per term; independent roundings
  add in quadrature over the K terms, so each product's output is off by ~2u of its own scale; the
  residual stream stays fp32 and only accumulates the branches' errors, so states stay ~2u (max abs /
  max abs). Measured 2-3u on the models below; we allow 6u for states, 8u (1.6 %) of the map range
  for maps and scores, 4u relative for losses and 8u for gradients (norm over all head gradients).
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
        assert np.abs(e16["layers"][l] - e32["layers"][l]).max() <= 6 * U * np.abs(e32["layers"][l]).max()
    m32, s32 = d32.maps_and_scores(x)
    m16, s16 = d16.maps_and_scores(x)
    span = m32.max() - m32.min()
    assert span > 1e-3  # the comparison can fail
    assert np.abs(m16 - m32).max() <= 8 * U * span
    assert np.abs(s16 - s32).max() <= 8 * U * span
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
        assert abs(l16[k] - l32[k]) <= 4 * U * max(1.0, abs(l32[k])), k
    ref = np.concatenate([g32[k].ravel() for k in g32])
    ours = np.concatenate([g16[k].ravel() for k in g32])
    assert np.linalg.norm(ours - ref) <= 8 * U * np.linalg.norm(ref)
    for k in ("anomaly_token", "normal_token"):  # through the bf16 backward of the frozen blocks
        assert np.linalg.norm(g16[k] - g32[k]) <= 8 * U * np.linalg.norm(g32[k]), k


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
