"""Training (docs/method.md §10-§12) end to end: Detector.loss_and_grad against PyTorch autograd on the reference,
Detector.fit against the reference's torch.optim.AdamW loop, reproducibility, convergence, the
official head file, and the `visualad train` command."""
import numpy as np
import pytest
import torch
from PIL import Image

import reference as R
from fixtures import random_images, to_numpy
import visualad
from visualad.metrics import roc_auc

ZERO_GRAD = ("k_norm.bias",)  # exactly zero true gradient (softmax ignores a per-row constant)


def grad_errors(ours: dict, head_t: dict) -> dict:
    errs = {}
    for name, t in R.flatten_head(head_t).items():
        ref = t.grad.numpy().reshape(-1)
        got = ours[name].reshape(-1)
        scale = np.linalg.norm(ref)
        if name.endswith(ZERO_GRAD):
            scale = max(scale, 1.0)  # compare on an absolute scale
        errs[name] = float(np.linalg.norm(got - ref) / scale)
    return errs


CASES = [  # family, layers, sca layers, labels, which images have masks
    ("clip", [1, 2], None, [0, 1, 1], [True, True, False]),
    ("clip", [2], None, [1, 1], [True, True]),
    ("dinov2", [1, 2], [1], [0, 1], [False, True]),
]


@pytest.mark.parametrize("family,layers,sca_layers,labels,with_mask", CASES)
def test_loss_and_grad_matches_autograd(family, layers, sca_layers, labels, with_mask):
    size = 56
    if family == "clip":
        state = R.random_clip_state(64, 2, 14, 4, seed=3)
    else:
        state = R.random_dinov2_state(64, 2, grid=4, registers=4, seed=3)
    head = R.random_head(64, layers, seed=4, sca_layers=sca_layers, image_size=size)
    n = len(labels)
    x = random_images(n, size, seed=5)
    rng = np.random.default_rng(6)
    masks = [((rng.random((40, 40)) > 0.85) if lab else np.zeros((40, 40), bool)) if m else None
             for lab, m in zip(labels, with_mask)]
    det = visualad.Detector(to_numpy(state), head=to_numpy(head), layers=layers, num_threads=2)
    losses, grads = det.loss_and_grad(x.numpy(), np.array(labels), masks)
    from visualad.training import batch_targets
    mk, has = batch_targets(np.array(labels, np.float32), masks, np.arange(n), size)
    ht = R.head_to_torch(head)
    ref = R.visualad_losses(family, state, ht, x, torch.tensor(labels, dtype=torch.float32), torch.from_numpy(mk),
                            layers, has_mask=torch.from_numpy(has.astype(bool)))
    ref["total"].backward()
    for k in ("cls", "seg", "contrastive", "total"):
        want = float(ref[k].detach())
        assert abs(losses[k] - want) <= 1e-4 * max(1.0, abs(want)), k
    errs = grad_errors(grads, ht)
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-3, (worst, errs[worst])
    assert set(grads) == set(R.flatten_head(ht))


def test_fit_matches_torch_adamw_loop():
    """Three steps (3 epochs of one full batch, dropout 0): every parameter within 1e-5."""
    size, layers = 56, [1, 2]
    state = R.random_clip_state(64, 2, 14, 4, seed=7)
    head = R.random_head(64, layers, seed=8, image_size=size, res_scale=0.3)
    x = random_images(3, size, seed=9)
    labels = np.array([0, 1, 1])
    rng = np.random.default_rng(10)
    masks = [None, rng.random((size, size)) > 0.8, rng.random((size, size)) > 0.9]
    det = visualad.Detector(to_numpy(state), head=to_numpy(head), epochs=3, batch_size=3, dropout=0.0)
    det.fit(x.numpy(), labels, masks)
    assert len(det.training_history_) == 3 and det.n_skipped_steps_ == 0

    from visualad.training import batch_targets
    mk, _ = batch_targets(labels.astype(np.float32), masks, np.arange(3), size)
    ht = R.head_to_torch(head)
    opt = R.make_optimizer(ht)
    sched = R.make_scheduler(opt, 3)
    for _ in range(3):
        assert R.train_step("clip", state, ht, opt, x, torch.tensor(labels, dtype=torch.float32),
                            torch.from_numpy(mk), layers) is not None
        sched.step()
    ours = visualad.checkpoint.detector_file.flatten_head(det.head_)
    for name, t in R.flatten_head(ht).items():
        tol = 1e-4 if name.endswith(ZERO_GRAD) else 1e-5  # Adam normalises that gradient's rounding noise
        diff = np.abs(ours[name].reshape(-1) - t.detach().numpy().reshape(-1)).max()
        assert diff <= tol, (name, diff)


def _textures(n, size, seed, with_defects):
    """Smooth random textures; defective ones get a bright square. Returns images, masks, labels."""
    rng = np.random.default_rng(seed)
    imgs, masks, labels = [], [], []
    for i in range(n):
        base = rng.integers(60, 120, size=(size // 8, size // 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((size, size), Image.BILINEAR)).copy()
        mask = np.zeros((size, size), bool)
        if with_defects and i % 2:
            side = int(rng.integers(size // 6, size // 3))
            y0, x0 = rng.integers(0, size - side, 2)
            img[y0:y0 + side, x0:x0 + side] = rng.integers(200, 256, 3)
            mask[y0:y0 + side, x0:x0 + side] = True
        imgs.append(img)
        masks.append(mask)
        labels.append(int(mask.any()))
    return np.stack(imgs), np.stack(masks), np.array(labels)


def test_training_lowers_the_loss_and_learns_defects():
    size = 56
    state = to_numpy(R.random_clip_state(64, 2, 14, 4, seed=11))
    xtr, mtr, ytr = _textures(24, size, 12, True)
    xte, mte, yte = _textures(16, size, 13, True)
    det = visualad.Detector(state, image_size=size, epochs=8, batch_size=8, dropout=0.0, learning_rate=1e-2,
                            head_learning_rate=1e-3, random_state=0)
    before = roc_auc(mte, det.anomaly_maps(xte))
    det.fit(xtr, ytr, list(mtr))
    hist = det.training_history_
    first = np.mean([h["total"] for h in hist[:3]])
    last = np.mean([h["total"] for h in hist[-3:]])
    after = roc_auc(mte, det.anomaly_maps(xte))
    print(f"loss {first:.3f} -> {last:.3f}; held-out pixel AUROC {before:.3f} -> {after:.3f}")
    assert last < first - 0.3
    assert after > 0.8


def test_fit_is_reproducible_and_uses_dropout():
    size = 56
    state = to_numpy(R.random_clip_state(64, 2, 14, 4, seed=14))
    x, m, y = _textures(6, size, 15, True)
    heads = []
    for seed in (5, 5, 6):
        det = visualad.Detector(state, image_size=size, epochs=1, batch_size=3, dropout=0.1, random_state=seed)
        heads.append(visualad.checkpoint.detector_file.flatten_head(det.fit(x, y, list(m)).head_))
    for k in heads[0]:
        np.testing.assert_array_equal(heads[0][k], heads[1][k])
    assert any(not np.array_equal(heads[0][k], heads[2][k]) for k in heads[0])


def test_official_head_file_loads_in_torch_and_reproduces_maps(tmp_path):
    size, layers = 56, [1, 2]
    state = R.random_clip_state(64, 2, 14, 4, seed=16)
    x, m, y = _textures(4, size, 17, True)
    det = visualad.Detector(to_numpy(state), image_size=size, layers=layers, epochs=1, batch_size=4)
    det.fit(x, y, list(m))
    det.save_official_head(tmp_path / "CLIP.pth")
    loaded = torch.load(tmp_path / "CLIP.pth")  # weights_only: only allowed globals inside
    assert loaded["features_list"] == layers and loaded["image_size"] == size
    assert loaded["transform_type"] == "mlp" and "layer_1" in loaded["layer_transforms"]
    xt = torch.from_numpy(np.stack([visualad.preprocess.normalize_pil(Image.fromarray(im), size,
                                                                      visualad.backbone.CLIP_MEAN,
                                                                      visualad.backbone.CLIP_STD) for im in x]))
    with torch.no_grad():
        want = R.visualad_maps("clip", state, loaded, xt, layers)
    np.testing.assert_allclose(det.anomaly_maps(x), want["final"].numpy(), atol=1e-4)


def test_train_command(tmp_path):
    from dataset_fixtures import make_folder_dataset
    from visualad.cli import main
    root = make_folder_dataset(tmp_path / "mvtec", size=(60, 60))
    state = R.random_clip_state(64, 2, 14, 4, seed=18)
    torch.save(state, tmp_path / "clip.pt")
    out = tmp_path / "head.safetensors"
    assert main(["train", "--data", root, "--dataset", "mvtec", "--backbone", str(tmp_path / "clip.pt"),
                 "--out", str(out), "--image-size", "56", "--epochs", "2", "--batch-size", "4", "--no-progress"]) == 0
    det = visualad.Detector.load(out)
    det.encode(np.zeros((1, 3, 56, 56), np.float32))  # loads the model
    official = torch.load(tmp_path / "head.pth")
    np.testing.assert_array_equal(official["anomaly_token"].numpy(), det.head_["anomaly_token"])
    assert det.head_["epoch"] == 2


def test_fit_rejects_bad_targets():
    state = to_numpy(R.random_clip_state(64, 1, 14, 4, seed=1))
    det = visualad.Detector(state, image_size=56)
    x = np.zeros((2, 56, 56, 3), np.uint8)
    with pytest.raises(ValueError, match="one label per image"):
        det.fit(x, [0, 1, 1])
    with pytest.raises(ValueError, match="0 \\(normal\\) and 1"):
        det.fit(x, [0, 2])
    with pytest.raises(ValueError, match="one entry"):
        det.fit(x, [0, 1], masks=[None])
    with pytest.raises(ValueError, match="dropout"):
        det.set_params(dropout=1.5).fit(x, [0, 1])


def test_trained_head_survives_new_settings_and_fit_restarts():
    size = 56
    state = to_numpy(R.random_clip_state(64, 2, 14, 4, seed=19))
    x, m, y = _textures(4, size, 20, True)
    det = visualad.Detector(state, image_size=size, epochs=1, batch_size=4, num_threads=2)
    det.fit(x, y, list(m))
    trained = det.head_["anomaly_token"].copy()
    maps = det.anomaly_maps(x)
    det.set_params(num_threads=1)
    np.testing.assert_array_equal(det.head_["anomaly_token"], trained)
    np.testing.assert_allclose(det.anomaly_maps(x), maps, atol=1e-5)
    det.fit(x, y, list(m))  # starts again from the fresh seeded head: same result
    np.testing.assert_allclose(det.head_["anomaly_token"], trained, atol=1e-6)
