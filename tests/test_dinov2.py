"""DINOv2 backbones (docs/method.md §9): the plain tower against transformers, position resizing against the
reference of the original DINOv2 rule, and VisualAD(DINOv2) maps against the PyTorch reference."""
import numpy as np
import pytest
import torch

import reference as R
from conftest import rel_err
from fixtures import random_images, to_numpy
from hf_models import make_hf_dinov2
import visualad
from visualad.backbone import build_backbone


def engine_for(state, threads=2):
    bb = build_backbone(to_numpy(state))
    return bb, visualad._engine.Backbone(bb.config, bb.params, threads)


@pytest.mark.parametrize("width,registers,swiglu", [(128, 0, False), (192, 4, False), (128, 0, True), (192, 4, True)])
def test_plain_tower_matches_transformers_at_518(width, registers, swiglu):
    depth, heads = 4, width // 64
    state = R.random_dinov2_state(width, depth, registers=registers, swiglu=swiglu, seed=width + registers)
    hf = make_hf_dinov2(state, width, depth, heads, registers=registers, swiglu=swiglu)
    bb, eng = engine_for(state)
    assert bb.config["registers"] == registers and bb.config["layerscale"] == 1
    x = random_images(1, 518, seed=3)
    with torch.no_grad():
        want = hf(pixel_values=x, output_hidden_states=True)
    got = eng.forward(x.numpy(), list(range(depth + 1)))
    for l in range(depth + 1):
        err = rel_err(got[l], want.hidden_states[l].numpy())
        assert err < 1e-4, f"block {l}: relative error {err:.2e}"
    # the final norm is VisualAD's ln_post: compare it through encode's token path
    normed = torch.nn.functional.layer_norm(torch.from_numpy(got[-1]), (width,), torch.from_numpy(bb.default_ln_post[0]),
                                            torch.from_numpy(bb.default_ln_post[1]), 1e-6)
    assert rel_err(normed.numpy(), want.last_hidden_state.numpy()) < 1e-4


@pytest.mark.parametrize("registers,size", [(0, 224), (0, 658), (4, 224), (4, 658), (0, 98)])
def test_plain_tower_at_other_sizes_matches_reference(registers, size):
    depth = 2
    state = R.random_dinov2_state(128, depth, registers=registers, seed=5)
    _, eng = engine_for(state)
    x = random_images(2, size, seed=size)
    with torch.no_grad():
        want = R.dinov2_tower(state, x, list(range(depth + 1)))
    got = eng.forward(x.numpy(), list(range(depth + 1)))
    for l in range(depth + 1):
        err = rel_err(got[l], want["hidden"][l].numpy())
        assert err < 1e-4, f"block {l}: relative error {err:.2e}"


@pytest.mark.parametrize("registers,swiglu,size,layers,batch", [(0, False, 126, [1, 2], 1), (4, False, 112, [2, 3], 3),
                                                               (4, True, 98, [1, 3], 1), (0, False, 518, [2, 3], 1)])
def test_visualad_dinov2_maps_match_reference(registers, swiglu, size, layers, batch):
    width = 64 if size == 518 else 128
    state = R.random_dinov2_state(width, 3, registers=registers, swiglu=swiglu, seed=size)
    head = R.random_head(width, layers, seed=size + 1)
    x = random_images(batch, size, seed=size + 2)
    with torch.no_grad():
        want = R.visualad_maps("dinov2", state, head, x, layers)
        enc = R.visualad_encode("dinov2", state, head, x, layers)
    det = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=size, layers=layers, num_threads=2)
    got_enc = det.encode(x.numpy())
    for l in layers:
        assert rel_err(got_enc["layers"][l], enc["layers"][l].numpy()) < 1e-4
    assert rel_err(got_enc["anomaly_token"], enc["anomaly_token"].numpy()) < 1e-4
    maps, scores = det.anomaly_maps(x.numpy()), det.anomaly_scores(x.numpy())
    assert np.abs(maps - want["final"].numpy()).max() < 1e-4
    assert np.abs(scores - want["scores"].numpy()).max() < 1e-4
    assert want["final"].std() > 1e-3


def test_dinov2_defaults():
    state = to_numpy(R.random_dinov2_state(64, 12, seed=1))
    det = visualad.Detector(state)
    det.encode(np.zeros((1, 3, 518, 518), np.float32))
    assert det.head_["features_list"] == [3, 6, 9, 12]
    assert det._backbone_.mean == (0.485, 0.456, 0.406)
    assert det._backbone_.config["ln_eps"] == pytest.approx(1e-6)
    np.testing.assert_array_equal(det.head_["ln_post_weight"], state["norm.weight"])
