"""The backbone's attention core (csrc/attention_fused.c, and the per-head BLAS path in ops.c)
against a float64 softmax(q k^T / sqrt(d)) v, for fp32 and bf16, and its input-gradient backward
(ops.c vad_attention_backward in fp32, csrc/attention_backward.c in bf16) against the float64
gradients, plus thread-count invariance of both."""
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


def heads_of(x, heads):
    """[B, T, heads * dh] -> [B, heads, T, dh] in float64."""
    B, T, D = x.shape
    return x.astype(np.float64).reshape(B, T, heads, D // heads).transpose(0, 2, 1, 3)


def reference_backward(qkv, dout, heads):
    """float64 (dqkv [B, T, 3D], and per head: p, ds, q, k, dO) of attention(qkv) for the output
    gradient dout: dv = p^T dO, ds = p (dO v^T - rowsum(p dO v^T)), dq = ds k / sqrt(d), dk = ds^T q / sqrt(d)."""
    B, T, D3 = qkv.shape
    D = D3 // 3
    q, k, v = (heads_of(qkv[..., i * D:(i + 1) * D], heads) for i in range(3))
    dO = heads_of(dout, heads)
    scale = 1.0 / np.sqrt(D // heads)
    s = q @ k.transpose(0, 1, 3, 2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = dO @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    parts = (ds @ k * scale, ds.transpose(0, 1, 3, 2) @ q * scale, p.transpose(0, 1, 3, 2) @ dO)
    dqkv = np.concatenate([g.transpose(0, 2, 1, 3).reshape(B, T, D) for g in parts], -1)
    return dqkv, (p, ds, q, k, dO)


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
    assert rel_err(_engine.testing.attention(qkv, shape[3]), reference(qkv, shape[3])) <= 5e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_matches_float64_on_rounded_inputs(shape):
    """q, k, v are rounded to bf16 (so the reference uses the rounded values); products are exact in
    fp32 and accumulate in fp32, so the one rounding left is the probabilities': each p_j becomes
    p_j (1 + e_j), |e_j| <= u = 2^-8, so sum_j p_j e_j v_j / sum_j p_j <= u max |v| per head in the
    worst case. The test holds the kernel to u/2: the e_j of one row's many p_j partly cancel
    (measured <= 0.47 of u/2)."""
    needs_bf16()
    qkv = random_qkv(shape, seed=1)
    heads, D = shape[3], shape[2]
    ours = _engine.testing.attention(qkv, heads, "bf16")
    want = reference(round_bf16(qkv), heads)
    v = round_bf16(qkv)[..., 2 * D:].astype(np.float64)
    bound = BF16_UNIT / 2 * np.abs(v).max() + 1e-5 * np.abs(want).max()
    assert np.abs(ours - want).max() <= bound


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_thread_count_does_not_change_results(precision):
    if precision == "bf16":
        needs_bf16()
    qkv = random_qkv((3, 131, 96, 4), seed=2)
    one = _engine.testing.attention(qkv, 4, precision, num_threads=1)
    for n in (2, 3, 5):
        assert np.array_equal(_engine.testing.attention(qkv, 4, precision, num_threads=n), one)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible by heads"):
        _engine.testing.attention(np.zeros((1, 4, 30), np.float32), 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        _engine.testing.attention(np.full((1, 4, 12), np.nan, np.float32), 1)
    with pytest.raises(ValueError, match="precision"):
        _engine.testing.attention(np.zeros((1, 4, 12), np.float32), 1, "fp16")


# the backward's query blocks are 96 rows, its key blocks 64: token counts around both (193 leaves
# one row), head sizes 64, 32, 80 and odd ones
BACKWARD_SHAPES = [(1, 1, 16, 1), (1, 7, 21, 3), (2, 5, 48, 3), (2, 131, 96, 3), (1, 193, 128, 4),
                   (1, 197, 768, 12), (1, 257, 160, 2)]


def random_dout(shape, seed):
    B, T, D, _ = shape
    return np.random.default_rng(seed + 100).standard_normal((B, T, D)).astype(np.float32)


@pytest.mark.parametrize("shape", BACKWARD_SHAPES)
def test_fp32_backward_matches_float64(shape):
    qkv, dout = random_qkv(shape), random_dout(shape, 0)
    want, _ = reference_backward(qkv, dout, shape[3])
    # fp32 dot products of length head_dim and tokens: measured <= 1.4e-6
    assert rel_err(_engine.testing.attention_backward(qkv, dout, shape[3]), want) <= 5e-6


@pytest.mark.parametrize("shape", BACKWARD_SHAPES)
def test_bf16_backward_matches_float64_on_rounded_inputs(shape):
    """q, k, v and dO are rounded to bf16 (so the reference uses the rounded values); their products
    are exact in fp32 and accumulate in fp32, the softmax and its backward run in fp32, so the
    roundings left are those of the products' other operands: P (in dv = P^T dO) and dS (in dq = s dS k,
    dk = s dS^T q), each element times (1 + e). Rounding to 8 significant bits moves x by at most half
    an ulp, 2^-8 |x| just above a power of two (measured on P here: 3.8e-3), so |e| <= 2^-8 = BF16_UNIT
    and per element of the gradient the error is at most 2^-8 times the same product of absolute
    values, plus fp32 accumulation (1e-5 of the largest gradient, as in the forward test); measured
    up to 0.9 of that bound."""
    needs_bf16()
    B, T, D, heads = shape
    qkv, dout = round_bf16(random_qkv(shape, seed=1)), round_bf16(random_dout(shape, 1))
    want, (p, ds, q, k, dO) = reference_backward(qkv, dout, heads)
    ours = _engine.testing.attention_backward(qkv, dout, heads, "bf16").astype(np.float64)
    scale = 1.0 / np.sqrt(D // heads)
    a = np.abs
    bounds = (a(ds) @ a(k) * scale, a(ds).transpose(0, 1, 3, 2) @ a(q) * scale, a(p).transpose(0, 1, 3, 2) @ a(dO))
    for i, bound in enumerate(bounds):
        cols = slice(i * D, (i + 1) * D)
        bound = BF16_UNIT * bound.transpose(0, 2, 1, 3).reshape(B, T, D) + 1e-5 * a(want[..., cols]).max()
        assert np.all(a(ours[..., cols] - want[..., cols]) <= bound), "dq dk dv".split()[i]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backward_thread_count_does_not_change_results(precision):
    if precision == "bf16":
        needs_bf16()
    shape = (3, 131, 96, 4)
    qkv, dout = random_qkv(shape, seed=2), random_dout(shape, 2)
    one = _engine.testing.attention_backward(qkv, dout, 4, precision, num_threads=1)
    for n in (2, 3, 5):
        assert np.array_equal(_engine.testing.attention_backward(qkv, dout, 4, precision, num_threads=n), one)


def test_backward_rejects_bad_input():
    with pytest.raises(ValueError, match="dout"):
        _engine.testing.attention_backward(np.zeros((1, 4, 12), np.float32), np.zeros((1, 4, 5), np.float32), 1)
    with pytest.raises(ValueError, match="dout"):
        _engine.testing.attention_backward(np.zeros((1, 4, 12), np.float32), np.full((1, 4, 4), np.inf, np.float32), 1)
