"""Head training, head side: Head.loss_and_grad against PyTorch autograd on the
independent reference (tests/reference.py: visualad_head_losses on leaf encode outputs).

Tolerances: each loss term within 1e-4 relative; every SAF/SCA gradient and the input gradients
(dfeats, d t_a, d t_n) within 1e-3 relative (norm of difference / norm of reference). Observed
errors are ~1e-6. Dropout is checked against the same reference fed with the engine's masks."""
import math

import numpy as np
import pytest
import torch

import reference as ref
from fixtures import to_numpy
from visualad import _engine
from visualad.head import _engine_names, head_engine_config, pack_head, validate_head

LOSS_TOL = 1e-4
GRAD_TOL = 1e-3
TOKEN_KEYS = ("anomaly_token", "normal_token", "ln_post_weight", "ln_post_bias")
SITES = {"saf_hidden": 0, "saf_out": 1, "sca_att": 2, "sca_out": 3}


def rel(ours, want) -> float:
    ours = np.asarray(ours, np.float64).ravel()
    want = np.asarray(want, np.float64).ravel()
    return float(np.linalg.norm(ours - want) / max(np.linalg.norm(want), 1e-30))


def make_head(D, layers, seed, sca_layers=None, saf_layers=None, saf_hidden=None, max_patches=64):
    head = ref.random_head(D, layers, max_patches=max_patches, seed=seed, sca_layers=sca_layers)
    g = torch.Generator().manual_seed(seed + 100)
    if saf_hidden is not None:  # SAF hidden width != D catches transposed weight gradients
        for sd in head["layer_transforms"].values():
            sd["mlp.0.weight"] = torch.randn(saf_hidden, D, generator=g) * D ** -0.5
            sd["mlp.0.bias"] = torch.randn(saf_hidden, generator=g) * 0.1
            sd["mlp.3.weight"] = torch.randn(D, saf_hidden, generator=g) * saf_hidden ** -0.5
    if saf_layers is not None:
        head["layer_transforms"] = {k: v for k, v in head["layer_transforms"].items()
                                    if int(k.split("_")[1]) in saf_layers}
    return validate_head(to_numpy(head), D)


def make_engine(head, layers, D, threads=2):
    cfg = head_engine_config(head, layers, D)
    layout, total = _engine.head_layout(cfg)
    params = pack_head(head, layers, D, layout, total)
    return _engine.Head(cfg, params, threads), layout, total


def make_inputs(B, N, D, n_layers, seed):
    rng = np.random.default_rng(seed)
    feats = [rng.standard_normal((B, N, D)).astype(np.float32) for _ in range(n_layers)]
    ta = rng.standard_normal((B, D)).astype(np.float32)
    tn = rng.standard_normal((B, D)).astype(np.float32)
    return feats, ta, tn


def blob_masks(B, S, defective, seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((B, S, S), np.float32)
    for b in range(B):
        if defective[b]:
            h, w = rng.integers(S // 6, S // 2, size=2)
            y, x = rng.integers(0, S - h), rng.integers(0, S - w)
            masks[b, y:y + h, x:x + w] = 1.0
    return masks


def small_case(seed, S, labels):
    """A two-layer D=32 head with a batch of 4x4-patch features and blob masks for ``labels``:
    (head, layers, feats, anomaly token, normal token, labels, masks, top-k count at ratio 0.05)."""
    D, layers = 32, [1, 2]
    labels = np.array(labels, np.float32)
    feats, ta, tn = make_inputs(len(labels), 16, D, len(layers), seed)
    masks = blob_masks(len(labels), S, labels, seed)
    return make_head(D, layers, seed), layers, feats, ta, tn, labels, masks, ref.topk_count(S, 0.05)


def engine_masks(B, N, D, m, Hs, p, seed):
    """The reference's dropout_masks callable built from the engine's own counter-based masks."""
    shapes = {"saf_hidden": (N, Hs), "saf_out": (N, D), "sca_att": (m, N), "sca_out": (D,)}

    def masks(site, i, token):
        per_image = [_engine.testing.dropout_mask(int(np.prod(shapes[site])), p, seed, i, b, SITES[site], token)
                     .reshape(shapes[site]) for b in range(B)]
        return torch.from_numpy(np.stack(per_image))
    return masks


def reference_run(head, layers, feats, ta, tn, labels, masks, has_mask, S, ratio, dropout_masks=None):
    head_t = ref.head_to_torch(head)
    feats_t = {l: torch.tensor(f, requires_grad=True) for l, f in zip(layers, feats)}
    ta_t = torch.tensor(ta, requires_grad=True)
    tn_t = torch.tensor(tn, requires_grad=True)
    want = ref.visualad_head_losses(head_t, feats_t, ta_t, tn_t, labels, masks, layers, S, ratio, has_mask,
                                    dropout_masks=dropout_masks)
    want["total"].backward()
    losses = {k: float(v.detach()) for k, v in want.items()}
    return losses, ref.head_grads(head_t), [feats_t[l].grad.numpy() for l in layers], ta_t.grad.numpy(), \
        tn_t.grad.numpy()


def compare(head, layers, layout, got, want):
    losses, grad, dfeats, dta, dtn = got
    w_losses, w_grads, w_dfeats, w_dta, w_dtn = want
    for k in ("cls", "seg", "contrastive", "total"):
        err = abs(losses[k] - w_losses[k]) / max(abs(w_losses[k]), 1e-12)
        assert err < LOSS_TOL or abs(losses[k] - w_losses[k]) < 1e-9, (k, losses[k], w_losses[k])
    where = dict(_engine_names(head, layers))
    scale = max(float(np.linalg.norm(v.numpy())) for v in w_grads.values())
    checked = 0
    for name, shape, off, _panel in layout:
        key = ".".join(where[name])
        size = int(np.prod(shape))
        ours = grad[off:off + size]
        if key in TOKEN_KEYS:  # the backbone backward's job: must be left untouched
            assert not ours.any(), f"{name} should receive no gradient from the head"
            continue
        theirs = w_grads[key].numpy().ravel()
        if np.linalg.norm(theirs) < 1e-6 * scale:
            # exactly zero in exact arithmetic (k_norm.bias: softmax ignores a per-row constant)
            assert np.linalg.norm(ours) < 1e-5 * scale, name
            continue
        assert rel(ours, theirs) < GRAD_TOL, (name, rel(ours, theirs))
        checked += 1
    assert checked >= 4
    for i, l in enumerate(layers):
        assert rel(dfeats[i], w_dfeats[i]) < GRAD_TOL, ("dfeats", l, rel(dfeats[i], w_dfeats[i]))
    assert rel(dta, w_dta) < GRAD_TOL, rel(dta, w_dta)
    assert rel(dtn, w_dtn) < GRAD_TOL, rel(dtn, w_dtn)


# D, layers, sca layers (None = all), saf layers (None = all), saf hidden, B, S, patch, labels, has_mask, ratio
CASES = [
    (32, [1, 2], None, None, None, 3, 28, 7, [0, 1, 1], [1, 1, 0], 0.05),       # a defect without its mask
    (48, [2], None, None, None, 2, 35, 7, [0, 0], None, 0.01),                   # one layer, all good, no masks
    (32, [1, 3, 4], [1, 3], None, None, 2, 24, 6, [1, 0], [1, 1], 0.02),         # last layer without SCA
    (24, [2, 3], None, [3], 40, 3, 30, 6, [1, 1, 0], None, 0.03),                # one layer without SAF, Hs != D
    (32, [1, 2], [2], None, None, 2, 20, 5, [1, 1], [0, 0], 0.05),               # no mask counts: seg = 0
]


def case_setup(D, layers, sca, saf, hidden, B, S, P, labels, has_mask, ratio):
    """The head, engine and inputs of one CASES row: (head, engine, layout, total, feats, anomaly
    token, normal token, labels, masks (None when no image has a defect or a mask flag), has_mask,
    top-k count)."""
    seed = D + B + S
    head = make_head(D, layers, seed, sca_layers=sca, saf_layers=saf, saf_hidden=hidden)
    eng, layout, total = make_engine(head, layers, D)
    g = S // P
    feats, ta, tn = make_inputs(B, g * g, D, len(layers), seed)
    labels = np.array(labels, np.float32)
    masks = None if has_mask is None and not labels.any() else blob_masks(B, S, labels, seed)
    hm = None if has_mask is None else np.array(has_mask, np.uint8)
    return head, eng, layout, total, feats, ta, tn, labels, masks, hm, ref.topk_count(S, ratio)


@pytest.mark.parametrize("D,layers,sca,saf,hidden,B,S,P,labels,has_mask,ratio", CASES)
def test_loss_and_grad_match_autograd(D, layers, sca, saf, hidden, B, S, P, labels, has_mask, ratio):
    head, eng, layout, total, feats, ta, tn, labels, masks, hm, k = case_setup(
        D, layers, sca, saf, hidden, B, S, P, labels, has_mask, ratio)
    g = S // P
    got = eng.loss_and_grad(feats, ta, tn, S, labels, masks, hm, k)
    assert got[1].shape == (total,) and got[1].dtype == np.float32
    assert [d.shape for d in got[2]] == [(B, g * g, D)] * len(layers)
    want = reference_run(head, layers, feats, ta, tn, labels, masks, hm, S, ratio)
    compare(head, layers, layout, got, want)
    if hm is not None and not hm.any():
        assert got[0]["seg"] == 0.0
    else:
        assert got[0]["seg"] > 0.1


def test_has_mask_zero_image_is_left_out_of_the_segmentation_loss():
    """A defective image without a mask must not be treated as all-normal: its map gets no
    segmentation gradient, and the seg loss equals the one of the sub-batch that counts."""
    S = 28
    head, layers, feats, ta, tn, labels, masks, k = small_case(5, S, [0, 1, 1])
    eng, _, _ = make_engine(head, layers, 32)
    full = eng.loss_and_grad(feats, ta, tn, S, labels, masks, np.array([1, 1, 0], np.uint8), k)
    sub = eng.loss_and_grad([f[:2] for f in feats], ta[:2], tn[:2], S, labels[:2], masks[:2], None, k)
    assert abs(full[0]["seg"] - sub[0]["seg"]) < 1e-6 * sub[0]["seg"]
    # counting the mask-less defect as an all-normal image changes the loss
    zeroed = masks.copy()
    zeroed[2] = 0
    wrong = eng.loss_and_grad(feats, ta, tn, S, labels, zeroed, None, k)
    assert abs(wrong[0]["seg"] - full[0]["seg"]) > 1e-3


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference_with_the_same_masks(p):
    D, layers, sca, B, S, P = 32, [1, 2, 3], [1, 2], 2, 24, 6
    head = make_head(D, layers, 9, sca_layers=sca, saf_hidden=40)
    eng, layout, _ = make_engine(head, layers, D)
    g = S // P
    feats, ta, tn = make_inputs(B, g * g, D, len(layers), 9)
    labels = np.array([1, 0], np.float32)
    masks = blob_masks(B, S, labels, 9)
    k = ref.topk_count(S, 0.05)
    seed = 12345
    got = eng.loss_and_grad(feats, ta, tn, S, labels, masks, None, k, dropout=p, seed=seed)
    dm = engine_masks(B, g * g, D, 4, 40, p, seed)
    want = reference_run(head, layers, feats, ta, tn, labels, masks, None, S, 0.05, dropout_masks=dm)
    compare(head, layers, layout, got, want)
    # and dropout did change the result
    plain = eng.loss_and_grad(feats, ta, tn, S, labels, masks, None, k)
    assert rel(got[1], plain[1]) > 1e-2 and rel(got[2][0], plain[2][0]) > 1e-2


def test_dropout_reproducible_seeded_and_thread_independent():
    S = 28
    head, layers, feats, ta, tn, labels, masks, k = small_case(21, S, [1, 0])
    runs = {}
    for threads in (1, 3):
        eng, _, _ = make_engine(head, layers, 32, threads)
        for seed in (7, 8):
            runs[threads, seed] = eng.loss_and_grad(feats, ta, tn, S, labels, masks, None, k, dropout=0.1, seed=seed)
        again = eng.loss_and_grad(feats, ta, tn, S, labels, masks, None, k, dropout=0.1, seed=7)
        assert again[0] == runs[threads, 7][0]
        np.testing.assert_array_equal(again[1], runs[threads, 7][1])
    a, b = runs[1, 7], runs[3, 7]
    for key in a[0]:
        assert abs(a[0][key] - b[0][key]) <= 1e-5 * abs(b[0][key]) + 1e-7
    assert rel(a[1], b[1]) < 1e-4
    assert abs(runs[1, 7][0]["total"] - runs[1, 8][0]["total"]) > 1e-4
    assert rel(runs[1, 7][1], runs[1, 8][1]) > 1e-3


def test_dropout_mask_statistics():
    n, p = 200_000, 0.1
    m = _engine.testing.dropout_mask(n, p, 3, 0, 0, 0, 0)
    kept = m != 0
    assert set(np.unique(m).tolist()) == {0.0, np.float32(1 / (1 - p))}
    assert abs((~kept).mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert abs(m.mean() - 1.0) < 0.01                       # E[mask] = 1: unbiased in expectation
    # different layers / images / sites / tokens / seeds give independent masks
    others = [_engine.testing.dropout_mask(n, p, 3, 1, 0, 0, 0), _engine.testing.dropout_mask(n, p, 3, 0, 1, 0, 0),
              _engine.testing.dropout_mask(n, p, 3, 0, 0, 1, 0), _engine.testing.dropout_mask(n, p, 3, 0, 0, 2, 1),
              _engine.testing.dropout_mask(n, p, 4, 0, 0, 0, 0)]
    for o in others:
        both_dropped = ((m == 0) & (o == 0)).mean()
        assert abs(both_dropped - p * p) < 0.004
    np.testing.assert_array_equal(m, _engine.testing.dropout_mask(n, p, 3, 0, 0, 0, 0))
    assert (_engine.testing.dropout_mask(1000, 0.0, 3, 0, 0, 0, 0) == 1).all()


def test_loss_in_expectation_close_to_no_dropout():
    """Averaged over many dropout seeds the SCA/SAF maps keep their mean, so the (mostly
    smooth) total loss stays near the dropout-free one (a rough check of the 1/(1-p) scaling:
    without it the average would drift far)."""
    S = 24
    head, layers, feats, ta, tn, labels, masks, k = small_case(33, S, [1, 0])
    eng, _, _ = make_engine(head, layers, 32)
    plain = eng.loss_and_grad(feats, ta, tn, S, labels, masks, None, k)[0]["total"]
    vals = [eng.loss_and_grad(feats, ta, tn, S, labels, masks, None, k, dropout=0.1, seed=s)[0]["total"]
            for s in range(40)]
    assert abs(np.mean(vals) - plain) < 0.05 * plain


def test_grad_accumulates_into_a_given_buffer():
    S = 20
    head, layers, feats, ta, tn, labels, masks, k = small_case(41, S, [1, 0])
    eng, layout, total = make_engine(head, layers, 32)
    first = eng.loss_and_grad(feats, ta, tn, S, labels, masks, None, k)[1]
    buf = np.full(total, 0.5, np.float32)
    out = eng.loss_and_grad(feats, ta, tn, S, labels, masks, None, k, grad=buf)[1]
    assert out is buf
    head_part = np.ones(total, bool)
    for name, shape, off, _panel in layout[:4]:  # tokens and ln_post come first and stay untouched
        head_part[off:off + int(np.prod(shape))] = False
    np.testing.assert_allclose(buf[head_part], 0.5 + first[head_part], rtol=1e-6, atol=1e-7)
    assert (buf[~head_part] == 0.5).all()


def test_bad_arguments_raise():
    D, layers, B, S = 32, [1, 2], 2, 20
    head = make_head(D, layers, 51)
    eng, _, total = make_engine(head, layers, D)
    feats, ta, tn = make_inputs(B, 16, D, 2, 51)
    labels = np.array([1, 0], np.float32)
    with pytest.raises(ValueError):
        eng.loss_and_grad(feats, ta, tn, S, labels, None, None, 0)
    with pytest.raises(ValueError):
        eng.loss_and_grad(feats, ta, tn, S, labels, None, None, 4, dropout=1.0)
    with pytest.raises(ValueError):
        eng.loss_and_grad(feats[:1], ta, tn, S, labels, None, None, 4)
    with pytest.raises(ValueError):
        eng.loss_and_grad(feats, ta, tn, S, labels[:1], None, None, 4)
    with pytest.raises(ValueError):
        eng.loss_and_grad(feats, ta, tn, S, labels, np.zeros((B, S, S + 1), np.float32), None, 4)
    with pytest.raises(ValueError):
        eng.loss_and_grad(feats, ta, tn, S, labels, np.full((B, S, S), np.nan, np.float32), None, 4)
    with pytest.raises(TypeError):
        eng.loss_and_grad(feats, ta, tn, S, labels, None, None, 4, grad=np.zeros(total, np.float64))
    with pytest.raises(ValueError):
        eng.loss_and_grad(feats, ta, tn, S, labels, None, None, 4, grad=np.zeros(total + 1, np.float32))
    big = make_head(D, layers, 51, max_patches=9)
    eng_small, _, _ = make_engine(big, layers, D)
    with pytest.raises(ValueError, match="position"):
        eng_small.loss_and_grad(feats, ta, tn, S, labels, None, None, 4)


@pytest.mark.parametrize("case", [0, 2, 3])
def test_inference_maps_are_the_trainers_forward_with_dropout_zero(case):
    """One head forward serves both: the trainer's per-layer maps at dropout 0 equal the
    inference head's unfiltered layer maps bit for bit (with dropout they differ)."""
    D, layers, sca, saf, hidden, B, S, P, labels, has_mask, ratio = CASES[case]
    _, eng, _, _, feats, ta, tn, labels, masks, _, k = case_setup(*CASES[case])
    assert masks is not None  # these cases have defects or mask flags
    _, _, inference, _ = eng.maps(feats, ta, tn, S, 4.0, k, layer_maps=True)
    trained = np.full((len(layers), B, S, S), np.nan, np.float32)
    eng.loss_and_grad(feats, ta, tn, S, labels, masks, None, k, layer_maps=trained)
    np.testing.assert_array_equal(trained, inference)
    dropped = np.empty_like(trained)
    eng.loss_and_grad(feats, ta, tn, S, labels, masks, None, k, dropout=0.1, seed=3, layer_maps=dropped)
    assert np.abs(dropped - inference).max() > 1e-3
    with pytest.raises(ValueError, match="layer_maps"):
        eng.loss_and_grad(feats, ta, tn, S, labels, masks, None, k, layer_maps=np.zeros((len(layers), 1, S, S), np.float32))
