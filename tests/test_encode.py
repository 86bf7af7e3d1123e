"""Detector.encode against the PyTorch reference of SPEC §1 items 1-6 (tests/reference.py)."""
import numpy as np
import pytest
import torch

import reference as ref
from conftest import rel_err
from fixtures import clip_case, random_images, to_numpy
import visualad

# width, depth, patch, native grid, image size, batch, layers
CASES = [
    (128, 2, 14, 4, 84, 1, [1, 2]),     # grid 6 > native 4, last layer included
    (256, 3, 16, 6, 64, 3, [1, 2]),     # grid 4 < native 6, last layer not used
    (128, 4, 16, 3, 48, 3, [2, 4]),     # native grid
    (256, 4, 14, 5, 42, 1, [1, 3]),     # grid 3 < native 5, 4 heads
    (128, 3, 14, 3, 70, 3, [3]),        # grid 5 > native 3, only the last layer
    (320, 2, 16, 4, 224, 3, [1, 2]),    # 5 heads; MLP width 1280: two passes over K, 597 rows in 2 blocks
]


@pytest.fixture(params=["simd", "blas"])
def gemm_path(request):
    """The backbone's linear layers on the AVX-512 kernel (where the CPU has it) or BLAS per panel."""
    previous = visualad._engine.set_simd_gemm(request.param == "simd")
    yield request.param
    visualad._engine.set_simd_gemm(previous)


@pytest.mark.parametrize("width,depth,patch,grid,size,batch,layers", CASES)
def test_encode_matches_reference(width, depth, patch, grid, size, batch, layers, gemm_path):
    state, head = clip_case(width, depth, patch, grid, layers, seed=width + depth + size)
    x = random_images(batch, size, seed=size)
    with torch.no_grad():
        want = ref.visualad_encode("clip", state, head, x, layers)
    det = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=size, layers=layers, num_threads=2)
    got = det.encode(x.numpy())
    assert sorted(got["layers"]) == sorted(layers)
    for l in layers:
        err = rel_err(got["layers"][l], want["layers"][l].numpy())
        assert err < 1e-4, f"layer {l}: relative error {err:.2e}"
    for key in ("anomaly_token", "normal_token"):
        err = rel_err(got[key], want[key].numpy())
        assert err < 1e-4, f"{key}: relative error {err:.2e}"


def test_plain_tower_with_resized_positions_matches_reference():
    """The plain tower (no inserted tokens) at a non-native grid, every block."""
    state = ref.random_clip_state(128, 3, 14, 4, seed=5)
    x = random_images(2, 98, seed=3)  # grid 7 vs native 4
    with torch.no_grad():
        want = ref.clip_tower(state, x, [0, 1, 2, 3])
    bb = visualad.backbone.build_backbone(to_numpy(state))
    eng = visualad._engine.Backbone(bb.config, bb.params, 2)
    got = eng.forward(x.numpy(), [0, 1, 2, 3])
    for l in range(4):
        assert rel_err(got[l], want["hidden"][l].numpy()) < 1e-4


def test_results_do_not_depend_on_thread_count():
    state, head = clip_case(128, 2, 14, 4, [1, 2], seed=9)
    x = random_images(3, 56, seed=1).numpy()
    outs = []
    for n in (1, 2, 3):
        det = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=56, num_threads=n)
        outs.append(det.encode(x))
    for o in outs[1:]:
        for l in (1, 2):
            np.testing.assert_array_equal(o["layers"][l], outs[0]["layers"][l])


def test_maps_scores_and_gradients_do_not_depend_on_thread_count():
    """Bit for bit: every product is cut into blocks fixed by its shape, never by the thread count
    (OpenBLAS may round a row differently inside calls of different sizes)."""
    state, head = clip_case(96, 2, 8, 4, [1, 2], seed=5)
    x = random_images(5, 64, seed=2).numpy()
    y = np.array([0, 1, 0, 1, 1])
    masks = [None, np.ones((64, 64), np.uint8), None, np.zeros((64, 64), np.uint8), None]
    outs = []
    for n in (1, 2, 3, 4):
        det = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=64, num_threads=n)
        maps, scores = det.maps_and_scores(x)
        losses, grads = det.loss_and_grad(x, y, masks)
        outs.append((maps, scores, losses, grads))
    for maps, scores, losses, grads in outs[1:]:
        np.testing.assert_array_equal(maps, outs[0][0])
        np.testing.assert_array_equal(scores, outs[0][1])
        assert losses == outs[0][2]
        for k in grads:
            np.testing.assert_array_equal(grads[k], outs[0][3][k], err_msg=k)


def test_fresh_head_uses_backbone_ln_post_and_seed():
    state = to_numpy(ref.random_clip_state(128, 2, 14, 4, seed=2))
    a = visualad.Detector(state, image_size=56, random_state=3)
    a.encode(np.zeros((1, 3, 56, 56), np.float32))
    np.testing.assert_array_equal(a.head_["ln_post_weight"], state["visual.ln_post.weight"])
    b = visualad.Detector(state, image_size=56, random_state=3)
    b.encode(np.zeros((1, 3, 56, 56), np.float32))
    np.testing.assert_array_equal(a.head_["anomaly_token"], b.head_["anomaly_token"])
    assert a.head_["features_list"] == [1, 2]
    std = float(np.std(a.head_["anomaly_token"]))
    assert 0.3 * 0.1 * 128 ** -0.5 < std < 3 * 0.1 * 128 ** -0.5


# ---------------------------------------------------------------- errors at the boundary

@pytest.fixture(scope="module")
def small():
    state, head = clip_case(128, 2, 14, 4, [1, 2], seed=4)
    return to_numpy(state), to_numpy(head)


def test_rejects_bad_images(small):
    state, head = small
    det = visualad.Detector(state, head=head, image_size=56)
    with pytest.raises(TypeError, match="uint8 or float32"):
        det.encode(np.zeros((1, 3, 56, 56), np.float64))
    with pytest.raises(ValueError, match=r"\(N, 3, 56, 56\)"):
        det.encode(np.zeros((1, 3, 42, 42), np.float32))
    bad = np.zeros((1, 3, 56, 56), np.float32)
    bad[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        det.encode(bad)
    bad[0, 1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        det.encode(bad)
    with pytest.raises(ValueError, match="shape"):
        det.encode(np.zeros((2, 5, 5, 5, 5), np.uint8))
    with pytest.raises(TypeError):
        det.encode(12)


def test_rejects_bad_settings(small):
    state, head = small
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        visualad.Detector(state, head=head, image_size=50).encode(np.zeros((1, 3, 50, 50), np.float32))
    with pytest.raises(ValueError, match=r"layer 3 is outside 1\.\.2"):
        visualad.Detector(state, head=head, image_size=56, layers=[1, 3]).encode(np.zeros((1, 3, 56, 56), np.float32))


def test_rejects_bad_backbone_dicts(small):
    state, _ = small
    x = np.zeros((1, 3, 56, 56), np.float32)
    broken = dict(state)
    del broken["visual.transformer.resblocks.1.attn.in_proj_weight"]
    with pytest.raises(ValueError, match="resblocks.1.attn.in_proj_weight"):
        visualad.Detector(broken, image_size=56).encode(x)
    broken = dict(state)
    broken["visual.transformer.resblocks.0.mlp.c_proj.weight"] = np.zeros((128, 100), np.float32)
    with pytest.raises(ValueError, match="c_proj.weight"):
        visualad.Detector(broken, image_size=56).encode(x)
    broken = dict(state)
    broken["visual.ln_pre.weight"] = np.zeros(128, np.int64)
    with pytest.raises(TypeError, match="ln_pre.weight"):
        visualad.Detector(broken, image_size=56).encode(x)
    with pytest.raises(ValueError, match="naming"):
        visualad.Detector({"foo": np.zeros(3, np.float32)}).encode(x)
    with pytest.raises(TypeError):
        visualad.Detector(42).encode(x)


def test_rejects_bad_heads(small):
    state, head = small
    x = np.zeros((1, 3, 56, 56), np.float32)
    h = dict(head)
    h["anomaly_token"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="anomaly_token"):
        visualad.Detector(state, head=h, image_size=56).encode(x)
    h = dict(head)
    del h["normal_token"]
    with pytest.raises(ValueError, match="normal_token"):
        visualad.Detector(state, head=h, image_size=56).encode(x)
