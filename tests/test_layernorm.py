"""The backbone's LayerNorm kernel (csrc/ops.c) on its own, against float64 NumPy, at widths around
its vector boundaries and at several thread counts (the bf16 variant is in test_bf16.py)."""
import numpy as np
import pytest

from visualad import _engine


# widths around the 16-lane vectors and the 32-value bf16 stores: one lane, a partial vector, exact
# vectors, odd widths (a zero-padded bf16 pair), a model width
@pytest.mark.parametrize("C", [1, 7, 16, 17, 31, 32, 33, 100, 768, 1031])
def test_layernorm_matches_float64_and_does_not_depend_on_threads(C):
    rng = np.random.default_rng(C)
    x = (rng.standard_normal((13, C)) * 3 + rng.standard_normal((13, 1)) * 5).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    x64 = x.astype(np.float64)
    mu = x64.mean(1, keepdims=True)
    want = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(1, keepdims=True) + 1e-5) * w + b
    got = _engine.testing.layernorm(x, w, b, 1e-5)
    # fp32 statistics and one normalise: a few ulp of |xhat||w| + |b|
    scale = np.abs((x64 - mu) / x64.std(1, keepdims=True).clip(1e-30)) * np.abs(w) + np.abs(b)
    assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-6)
    for threads in (2, 3):
        assert np.array_equal(_engine.testing.layernorm(x, w, b, 1e-5, num_threads=threads), got)
