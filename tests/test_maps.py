"""Anomaly maps and image scores (SPEC §1 items 7-12) against the PyTorch reference, and the
pieces against the libraries that define them (SciPy, torch.nn.functional, PIL + torch ops)."""
import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

import reference as ref
from fixtures import clip_case, random_images, to_numpy
import visualad

# width, depth, patch, native grid, image size, batch, layers, sca layers (None = all)
CASES = [
    (128, 2, 14, 4, 70, 1, [1, 2], None),
    (128, 3, 16, 5, 64, 3, [1, 2, 3], None),
    (256, 3, 14, 3, 56, 3, [2], None),
    (128, 4, 14, 4, 42, 1, [1, 3, 4], [1, 3]),  # test.py layout: no SCA on the last layer
]


def check_against_reference(state, head, x, size, layers, sigma=4.0, topk_ratio=0.01):
    with torch.no_grad():
        want = ref.visualad_maps("clip", state, head, x, layers, sigma=sigma, topk_ratio=topk_ratio)
    det = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=size, layers=layers,
                            sigma=sigma, topk_ratio=topk_ratio, num_threads=2)
    maps = det.anomaly_maps(x.numpy())
    scores = det.anomaly_scores(x.numpy())
    assert maps.shape == (x.shape[0], size, size) and maps.dtype == np.float32
    assert scores.shape == (x.shape[0],) and scores.dtype == np.float32
    map_err = np.abs(maps - want["final"].numpy()).max()
    score_err = np.abs(scores - want["scores"].numpy()).max()
    assert map_err < 1e-4, f"map abs error {map_err:.2e}"
    assert score_err < 1e-4, f"score abs error {score_err:.2e}"
    # the maps must not be trivially flat: the comparison has to be able to fail
    assert want["final"].std() > 1e-3
    return det, maps, scores


@pytest.mark.parametrize("width,depth,patch,grid,size,batch,layers,sca_layers", CASES)
def test_maps_and_scores_match_reference(width, depth, patch, grid, size, batch, layers, sca_layers):
    state, head = clip_case(width, depth, patch, grid, layers, seed=size + depth, sca_layers=sca_layers)
    x = random_images(batch, size, seed=batch + size)
    check_against_reference(state, head, x, size, layers)


def test_maps_at_518():
    state, head = clip_case(64, 2, 14, 24, [1, 2], seed=7)
    x = random_images(1, 518, seed=2)
    check_against_reference(state, head, x, 518, [1, 2])


def test_sigma_zero_and_other_topk():
    state, head = clip_case(128, 2, 14, 4, [1, 2], seed=11)
    x = random_images(2, 56, seed=4)
    check_against_reference(state, head, x, 56, [1, 2], sigma=0.0, topk_ratio=0.1)


def test_tokens_after_sca_match_reference():
    state, head = clip_case(128, 2, 14, 4, [1, 2], seed=12)
    x = random_images(2, 56, seed=5)
    with torch.no_grad():
        want = ref.visualad_maps("clip", state, head, x, [1, 2])
    det = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=56, layers=[1, 2])
    det.encode(x.numpy())
    enc = det.encode(x.numpy())
    with det._head_state([1, 2]) as eng:
        _, _, lmaps, toks = eng.maps([enc["layers"][1], enc["layers"][2]], enc["anomaly_token"], enc["normal_token"],
                                     56, 4.0, 32, layer_maps=True, tokens=True)
    for i, l in enumerate([1, 2]):
        np.testing.assert_allclose(toks[i, 0], want["tokens"][l][0].numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(toks[i, 1], want["tokens"][l][1].numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(lmaps[i], want["layer_maps"][l].numpy(), atol=1e-4)


def test_too_many_patches_for_sca_positions_is_refused():
    state, head = clip_case(64, 2, 14, 4, [1, 2], seed=1, max_patches=16)
    det = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=70)  # 25 patches
    with pytest.raises(ValueError, match="exceed the 16 rows"):
        det.anomaly_maps(np.zeros((1, 3, 70, 70), np.float32))


# ---------------------------------------------------------------- pieces vs libraries

@pytest.mark.parametrize("sigma,shape", [(4.0, (2, 40, 57)), (1.5, (1, 23, 9)), (4.0, (1, 5, 70)), (1.5, (3, 64, 64))])
def test_gaussian_filter_matches_scipy(sigma, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ours = visualad._engine.gaussian_filter(x, sigma, 2)
    want = np.stack([scipy.ndimage.gaussian_filter(m, sigma=sigma) for m in x])
    assert np.abs(ours - want).max() <= 1e-6


@pytest.mark.parametrize("src,dst", [((4, 4), (70, 70)), ((37, 37), (518, 518)), ((5, 3), (17, 30)), ((24, 24), (37, 37)),
                                     ((9, 9), (4, 4))])
def test_bilinear_resize_matches_torch(src, dst):
    x = np.random.default_rng(1).standard_normal(src + (3,)).astype(np.float32)
    ours = visualad._engine.resize_bilinear(x, *dst)
    want = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=dst, mode="bilinear",
                         align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - want).max() <= 1e-6


@pytest.mark.parametrize("shape", [(37, 53, 3), (300, 200, 3), (64, 64)])
def test_preprocessing_matches_reference(shape):
    img = (np.random.default_rng(2).random(shape) * 255).astype(np.uint8)
    pil = Image.fromarray(img)
    want = ref.preprocess_reference(pil, 98, "clip")
    src = visualad.preprocess.ImageSource(img, 98, visualad.backbone.CLIP_MEAN, visualad.backbone.CLIP_STD)
    ours = src.batch(0, 1)[0]
    assert np.abs(ours - want).max() <= 1e-6


def test_input_forms_agree(tmp_path):
    state, head = clip_case(64, 2, 14, 4, [1, 2], seed=3)
    det = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=56)
    rng = np.random.default_rng(3)
    imgs = (rng.random((2, 40, 50, 3)) * 255).astype(np.uint8)
    paths = []
    for i, im in enumerate(imgs):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(im).save(p)
        paths.append(str(p))
    a = det.anomaly_maps(imgs)
    b = det.anomaly_maps(paths)
    c = det.anomaly_maps([Image.fromarray(im) for im in imgs])
    d = det.anomaly_maps(imgs[0])
    e = det.anomaly_maps(paths[1])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(a[:1], d, atol=1e-6)  # batch size changes only float rounding
    np.testing.assert_allclose(a[1:], e, atol=1e-6)
    gray = imgs[0, :, :, 0]
    g1 = det.anomaly_maps(gray)
    g2 = det.anomaly_maps(np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(g1, g2)
    with pytest.raises(FileNotFoundError):
        det.anomaly_maps(str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        det.anomaly_maps(str(tmp_path / "bad.png"))


def test_batching_does_not_change_results():
    state, head = clip_case(64, 2, 14, 4, [1, 2], seed=5)
    x = random_images(5, 42, seed=6).numpy()
    a = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=42, batch_size=2).anomaly_maps(x)
    b = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=42, batch_size=8).anomaly_maps(x)
    np.testing.assert_allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- scikit-learn surface

def test_sklearn_conventions_and_clone():
    from sklearn.base import clone
    state, head = clip_case(64, 2, 14, 4, [1, 2], seed=8)
    det = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=42, threshold=0.05)
    params = det.get_params()
    assert params["image_size"] == 42 and params["threshold"] == 0.05 and "backbone" in params
    x = random_images(3, 42, seed=9).numpy()
    scores = det.anomaly_scores(x)
    np.testing.assert_array_equal(det.score_samples(x), -scores)
    np.testing.assert_allclose(det.decision_function(x), -scores + np.float32(0.05))
    np.testing.assert_array_equal(det.predict(x), np.where(scores > 0.05, -1, 1))
    twin = clone(det)
    assert not hasattr(twin, "head_")
    np.testing.assert_array_equal(twin.anomaly_maps(x), det.anomaly_maps(x))
    det.set_params(sigma=0.0)
    assert det.sigma == 0.0
    with pytest.raises(ValueError, match="invalid parameter"):
        det.set_params(nonsense=1)


def test_topk_count_follows_ceil():
    state, head = clip_case(64, 2, 14, 4, [1, 2], seed=8)
    det = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=518)
    assert det._topk(518) == math.ceil(518 * 518 * 0.01) == 2684
    with pytest.raises(ValueError, match="topk_ratio"):
        det.set_params(topk_ratio=0.0)._topk(518)


def test_official_head_file_gives_the_same_maps_as_the_dict(tmp_path):
    """A head written by torch.save in the official CLIP.pth layout (nested dicts) is read without
    torch and gives the maps of the same head passed as a dict; layers/size default to the file's."""
    state, head = clip_case(128, 3, 14, 4, [1, 3], seed=21, sca_layers=[1], image_size=56)
    torch.save(head, tmp_path / "CLIP.pth")
    x = random_images(2, 56, seed=22).numpy()
    from_file = visualad.Detector(to_numpy(state), head=str(tmp_path / "CLIP.pth"))
    from_dict = visualad.Detector(to_numpy(state), head=to_numpy(head))
    np.testing.assert_array_equal(from_file.anomaly_maps(x), from_dict.anomaly_maps(x))
    assert from_file._settings() == (56, [1, 3])
