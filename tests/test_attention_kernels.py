"""The backbone's attention core (csrc/attention_fused.c, and the per-head BLAS path in ops.c)
against a float64 softmax(q k^T / sqrt(d)) v, for fp32 and bf16, plus thread-count invariance."""
import numpy as np
import pytest

from bf16_reference import BF16_UNIT, round_bf16
from conftest import rel_err
from visualad import _engine

# (batch, tokens, width, heads): token counts around the 64-key blocks and 6-row query groups,
# head sizes that are not multiples of 16 (odd too, for the bf16 pairs), the ViT-B head
SHAPES = [(1, 1, 16, 1), (2, 5, 48, 3), (1, 7, 21, 3), (1, 64, 64, 1), (1, 70, 128, 2), (2, 131, 96, 2),
          (1, 197, 768, 12), (1, 257, 160, 2)]


def reference(qkv, heads):
    x = qkv.astype(np.float64)
    B, T, D3 = x.shape
    D = D3 // 3
    dh = D // heads
    q, k, v = (x[..., i * D:(i + 1) * D].reshape(B, T, heads, dh).transpose(0, 2, 1, 3) for i in range(3))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(B, T, D)


def random_qkv(shape, seed=0):
    B, T, D, _ = shape
    return (2.0 * np.random.default_rng(seed).standard_normal((B, T, 3 * D))).astype(np.float32)


@pytest.fixture(params=["fused", "blas"])
def fp32_path(request):
    previous = _engine.set_fused_attention(request.param == "fused")
    if request.param == "fused" and _engine.precision_kernel("fp32") != "avx512f":
        _engine.set_fused_attention(previous)
        pytest.skip("this CPU has no AVX-512F: only the BLAS attention exists")
    yield request.param
    _engine.set_fused_attention(previous)


def needs_bf16():
    if _engine.precision_kernel("bf16") == "none":
        pytest.skip("this CPU has no AVX512-BF16")


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_float64(fp32_path, shape):
    qkv = random_qkv(shape)
    # fp32 dot products of length head_dim and tokens: measured <= 1.3e-6, both paths
    assert rel_err(_engine.attention(qkv, shape[3]), reference(qkv, shape[3])) <= 5e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_matches_float64_on_rounded_inputs(shape):
    """q, k, v are rounded to bf16 (so the reference uses the rounded values); products are exact in
    fp32 and accumulate in fp32, so the one rounding left is the probabilities': each p_j becomes
    p_j (1 + e_j), |e_j| <= 2^-9, and sum_j p_j e_j v_j / sum_j p_j <= 2^-9 max |v| per head."""
    needs_bf16()
    qkv = random_qkv(shape, seed=1)
    heads, D = shape[3], shape[2]
    ours = _engine.attention(qkv, heads, "bf16")
    want = reference(round_bf16(qkv), heads)
    v = round_bf16(qkv)[..., 2 * D:].astype(np.float64)
    bound = BF16_UNIT * np.abs(v).max() + 1e-5 * np.abs(want).max()
    assert np.abs(ours - want).max() <= bound


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_thread_count_does_not_change_results(precision):
    if precision == "bf16":
        needs_bf16()
    qkv = random_qkv((3, 131, 96, 4), seed=2)
    one = _engine.attention(qkv, 4, precision, num_threads=1)
    for n in (2, 3, 5):
        assert np.array_equal(_engine.attention(qkv, 4, precision, num_threads=n), one)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible by heads"):
        _engine.attention(np.zeros((1, 4, 30), np.float32), 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        _engine.attention(np.full((1, 4, 12), np.nan, np.float32), 1)
    with pytest.raises(ValueError, match="precision"):
        _engine.attention(np.zeros((1, 4, 12), np.float32), 1, "fp16")
