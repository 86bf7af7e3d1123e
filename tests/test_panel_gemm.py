"""The backbone's linear layers over panel-stored weights (csrc/panel_gemm.c) against float64 NumPy,
on both code paths: the AVX-512 kernel (when the CPU has it) and BLAS sgemm per panel."""
import numpy as np
import pytest
from scipy.special import erf

import reference as ref
import visualad
from fixtures import to_numpy
from visualad import _engine
from visualad.backbone import read_tensor, write_tensor

PANEL = 64


@pytest.fixture(params=["simd", "blas"])
def path(request):
    previous = _engine.set_simd_gemm(request.param == "simd")
    if request.param == "simd" and not _engine.simd_gemm_active():
        _engine.set_simd_gemm(previous)
        pytest.skip("this CPU has no AVX-512F: only the BLAS path exists")
    yield request.param
    _engine.set_simd_gemm(previous)


def panels_of(w):
    n, k = w.shape
    buf = np.full(-(-n // PANEL) * PANEL * k, np.nan, np.float32)  # padding must be written (zeros)
    write_tensor(buf, ("w", (n, k), 0, PANEL), w)
    return buf


def reference(x, w, bias=None, out=None, act=-1):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    if bias is not None:
        y += bias
    if out is not None:
        y += out
    if act == 0:
        y = y / (1 + np.exp(-1.702 * y))
    elif act == 1:
        y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    return y


def bound(x, w, bias=None, out=None):
    """Scale of the rounding error of an fp32 dot product: |x| |w|^T (+ |bias| + |out|)."""
    s = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    s += 0 if bias is None else np.abs(bias)
    s += 0 if out is None else np.abs(out)
    return s.max()


def test_write_and_read_round_trip():
    rng = np.random.default_rng(0)
    for n, k in [(1, 1), (63, 5), (64, 7), (65, 3), (200, 33)]:
        w = rng.standard_normal((n, k)).astype(np.float32)
        buf = panels_of(w)
        assert np.array_equal(read_tensor(buf, ("w", (n, k), 0, PANEL)), w)
        # panel j, row kk holds w[64 j : 64 j + 64, kk], zero past n
        stored = buf.reshape(-1, k, PANEL)
        assert np.array_equal(stored[0, :, :min(n, PANEL)], w[:PANEL].T)
        assert not np.isnan(buf).any() and np.all(stored[-1, :, n - PANEL * (len(stored) - 1):] == 0)


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 63, 3), (6, 64, 64), (7, 65, 100), (13, 130, 1025),
                                   (40, 200, 2100), (1100, 130, 1025)])
@pytest.mark.parametrize("act", [-1, 0, 1])
def test_matches_float64(path, m, n, k, act):
    rng = np.random.default_rng(m * 1000 + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    got = _engine.testing.panel_linear(x, panels_of(w), n, bias=bias, activation=act, num_threads=2)
    err = np.abs(got - reference(x, w, bias, act=act)).max()
    assert err <= 1e-6 * bound(x, w, bias) + 1e-7, f"{path}: max error {err:.2e}"


@pytest.mark.parametrize("act", [-1, 0])
def test_accumulates_into_out(path, act):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((31, 1500)).astype(np.float32)  # two passes over K
    w = (rng.standard_normal((100, 1500)) / 40).astype(np.float32)
    out = rng.standard_normal((31, 100)).astype(np.float32)
    want = reference(x, w, None, out, act)
    got = _engine.testing.panel_linear(x, panels_of(w), 100, out=out, activation=act)
    assert got is out
    assert np.abs(out - want).max() <= 1e-6 * bound(x, w, None, want) + 1e-7


def test_results_depend_on_neither_threads_nor_rows(path):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((700, 1300)).astype(np.float32)
    w = (rng.standard_normal((330, 1300)) / 36).astype(np.float32)
    p = panels_of(w)
    base = _engine.testing.panel_linear(x, p, 330, num_threads=1)
    for threads in (2, 3, 5):
        assert np.array_equal(_engine.testing.panel_linear(x, p, 330, num_threads=threads), base)
    if path == "simd":  # BLAS may block differently for other row counts
        for rows in (slice(0, 1), slice(5, 12), slice(600, 700)):
            assert np.array_equal(_engine.testing.panel_linear(x[rows], p, 330, num_threads=2), base[rows])


def test_simd_and_blas_paths_give_the_same_encode():
    state = to_numpy(ref.random_clip_state(128, 2, 16, 4, seed=5))
    x = np.random.default_rng(5).standard_normal((2, 3, 80, 80)).astype(np.float32)
    outs = []
    for simd in (True, False):
        previous = _engine.set_simd_gemm(simd)
        try:
            outs.append(visualad.Detector(state, image_size=80, layers=[1, 2], num_threads=2).encode(x))
        finally:
            _engine.set_simd_gemm(previous)
    for l in (1, 2):
        a, b = outs[0]["layers"][l], outs[1]["layers"][l]
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_bad_arguments_raise():
    x = np.zeros((4, 8), np.float32)
    p = panels_of(np.zeros((10, 8), np.float32))
    with pytest.raises(ValueError, match="panels has"):
        _engine.testing.panel_linear(x, p[:-1], 10)
    with pytest.raises(ValueError, match="bias has"):
        _engine.testing.panel_linear(x, p, 10, bias=np.zeros(9, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        _engine.testing.panel_linear(x, p, 10, out=np.zeros((4, 9), np.float32))
    with pytest.raises(TypeError, match="float32"):
        _engine.testing.panel_linear(x.astype(np.float64), p, 10)
    with pytest.raises(ValueError, match="activation"):
        _engine.testing.panel_linear(x, p, 10, activation=2)
