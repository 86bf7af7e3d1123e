"""Gradients through the frozen backbone (encode_train / encode_backward) against PyTorch
autograd on the reference: d t_a, d t_n, d ln_post weight and bias."""
import numpy as np
import pytest
import torch

import reference as R
from fixtures import random_images, to_numpy
import visualad
from visualad.backbone import build_backbone


def grad_err(ours, ref):
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


CASES = [  # family, state kwargs, image size, layers, batch
    ("clip", dict(width=128, depth=3, patch=14, grid=4), 70, [1, 3], 2),
    ("clip", dict(width=128, depth=2, patch=16, grid=3), 48, [1], 1),
    ("dinov2", dict(width=128, depth=3, grid=4, registers=4), 70, [2, 3], 2),
    ("dinov2", dict(width=128, depth=2, grid=4, swiglu=True), 56, [1, 2], 1),
]


@pytest.mark.parametrize("family,kw,size,layers,batch", CASES)
def test_encode_backward_matches_autograd(family, kw, size, layers, batch):
    width = kw["width"]
    if family == "clip":
        state = R.random_clip_state(kw["width"], kw["depth"], kw["patch"], kw["grid"], seed=size)
    else:
        state = R.random_dinov2_state(width, kw["depth"], grid=kw["grid"], registers=kw.get("registers", 0),
                                      swiglu=kw.get("swiglu", False), seed=size)
    head = R.random_head(width, layers, seed=size + 1)
    x = random_images(batch, size, seed=size + 2)
    ht = R.head_to_torch(head, requires_grad=True)
    out = R.visualad_encode(family, state, ht, x, layers)
    g = torch.Generator().manual_seed(7)
    cot = {l: torch.randn(out["layers"][l].shape, generator=g) for l in layers}
    cta, ctn = torch.randn(out["anomaly_token"].shape, generator=g), torch.randn(out["normal_token"].shape, generator=g)
    loss = sum((out["layers"][l] * cot[l]).sum() for l in layers)
    loss = loss + (out["anomaly_token"] * cta).sum() + (out["normal_token"] * ctn).sum()
    loss.backward()

    bb = build_backbone(to_numpy(state))
    eng = visualad._engine.Backbone(bb.config, bb.params, 2)
    hn = to_numpy(head)
    tokens = np.stack([hn["anomaly_token"], hn["normal_token"]])
    feats, ta, tn = eng.encode_train(x.numpy(), layers, tokens, hn["ln_post_weight"], hn["ln_post_bias"])
    for l, f in zip(layers, feats):
        np.testing.assert_allclose(f, out["layers"][l].detach().numpy(), atol=2e-4, rtol=1e-3)
    dtok, dlnw, dlnb = eng.encode_backward([cot[l].numpy() for l in layers], cta.numpy(), ctn.numpy())
    assert grad_err(dtok[0], ht["anomaly_token"].grad) < 1e-3
    assert grad_err(dtok[1], ht["normal_token"].grad) < 1e-3
    assert grad_err(dlnw, ht["ln_post_weight"].grad) < 1e-3
    assert grad_err(dlnb, ht["ln_post_bias"].grad) < 1e-3


def test_backward_requires_a_training_forward():
    state = R.random_clip_state(64, 1, 14, 2, seed=0)
    bb = build_backbone(to_numpy(state))
    eng = visualad._engine.Backbone(bb.config, bb.params, 1)
    with pytest.raises(RuntimeError, match="encode_train"):
        eng.encode_backward([], np.zeros((1, 64), np.float32), np.zeros((1, 64), np.float32))
