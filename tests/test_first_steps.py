"""What a newcomer meets first: the default model by name, the version, images as people have them,
defaults that fit, warnings, thresholds, plain-folder data, switches for the official release and
clear messages. Each test compares with an independent computation (PIL, NumPy, the PyTorch
reference, the package metadata file) or checks the exact text a user sees."""
import io
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import reference as ref
from dataset_fixtures import IMAGE_SIZE, make_folder_dataset, save_tiny_model
from fixtures import clip_case, to_numpy
import visualad
from visualad import datasets, metrics
from visualad.cli import build_parser, main, output_names
from visualad.demo import DEFAULT_MODEL
from visualad.errors import UntrainedHeadWarning
from visualad.preprocess import ImageSource, normalize_pil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("model")))


def tiny(model, **params):
    backbone, head = model
    return visualad.Detector(backbone, head=head, image_size=IMAGE_SIZE, num_threads=THREADS, **params)


# ------------------------------------------------------------------ 1. the default model by name

def test_default_model_by_name_equals_the_embedded_file():
    x = (np.random.default_rng(0).random((2, 90, 100, 3)) * 255).astype(np.uint8)
    det = visualad.Detector.default(num_threads=THREADS)
    assert det.backbone == DEFAULT_MODEL and det.num_threads == THREADS
    stored = visualad.Detector.load(DEFAULT_MODEL, num_threads=THREADS)
    np.testing.assert_array_equal(det.anomaly_maps(x), stored.anomaly_maps(x))
    assert visualad.Detector.default(threshold=0.5).threshold == 0.5


# ------------------------------------------------------------------ 2. version

def test_version_has_one_source(capsys):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        want = tomllib.load(f)["project"]["version"]
    assert visualad.__version__ == want
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"visualad {want}"


# ------------------------------------------------------------------ 3. images as people have them

def _png(im: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


MEAN, STD = visualad.backbone.CLIP_MEAN, visualad.backbone.CLIP_STD


def _official(im: Image.Image, size: int) -> np.ndarray:
    """The official order written out: Resize((S,S), bicubic) on the PIL image as opened, then
    convert('RGB'), ToTensor, Normalize."""
    x = np.asarray(im.resize((size, size), Image.BICUBIC).convert("RGB"), np.float32) / np.float32(255)
    return ((x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).transpose(2, 0, 1)


def test_palette_and_rgba_follow_the_official_order():
    rng = np.random.default_rng(1)
    rgb = Image.fromarray((rng.random((37, 45, 3)) * 255).astype(np.uint8))
    rgba = np.dstack([np.asarray(rgb), (rng.random((37, 45)) * 255).astype(np.uint8)])
    cases = {"P": _png(rgb.quantize(16)), "RGBA": _png(Image.fromarray(rgba, "RGBA")),
             "LA": _png(Image.fromarray(rgba[..., ::2].copy(), "LA")), "L": _png(rgb.convert("L"))}
    for mode, im in cases.items():
        assert im.mode == mode
        got = normalize_pil(im, 32, MEAN, STD)
        np.testing.assert_array_equal(got, _official(im, 32), err_msg=mode)
        if mode != "L":  # converting first (the old order) gives another image: the test can fail
            first = np.asarray(im.convert("RGB").resize((32, 32), Image.BICUBIC), np.float32) / 255
            assert np.abs(first - (got.transpose(1, 2, 0) * STD + MEAN)).max() > 0.05, mode
    # an RGBA array goes the same way as the RGBA image
    src = ImageSource([rgba], 32, MEAN, STD)
    np.testing.assert_array_equal(src.batch(0, 1)[0], _official(Image.fromarray(rgba, "RGBA"), 32))


def test_16_bit_png_is_scaled_to_its_picture():
    yy, xx = np.mgrid[:40, :48]  # a smooth picture (noise would differ by PIL's 8-bit intermediate clipping)
    picture = np.clip(128 + 100 * np.sin(xx / 7.0) * np.cos(yy / 9.0), 0, 255).astype(np.uint8)
    wide = _png(Image.fromarray(picture.astype(np.uint16) * 257))  # the same picture in 16 bits
    assert wide.mode.startswith("I;16")
    got = normalize_pil(wide, 32, MEAN, STD)
    want = normalize_pil(Image.fromarray(picture), 32, MEAN, STD)
    level = 1 / 255 / min(STD)  # one grey level after normalisation
    assert np.abs(got - want).max() <= level + 1e-6
    white = normalize_pil(Image.new("L", (40, 48), 255), 32, MEAN, STD)
    assert np.abs(got - white).mean() > 1.0  # not the all-white image the clipping conversion gives
    # 32-bit integer and float images: by the range their values fit, else refused
    np.testing.assert_allclose(normalize_pil(Image.fromarray(picture.astype(np.int32) * 257), 32, MEAN, STD),
                               want, atol=level + 1e-6)
    np.testing.assert_allclose(normalize_pil(Image.fromarray(picture.astype(np.float32) / 255), 32, MEAN, STD),
                               want, atol=level + 1e-6)
    with pytest.raises(ValueError, match="cannot scale a mode-I image"):
        normalize_pil(Image.fromarray(np.full((8, 8), -5, np.int32)), 32, MEAN, STD)


def test_empty_image_is_refused():
    det = visualad.Detector.default(num_threads=THREADS)
    with pytest.raises(ValueError):
        det.anomaly_scores(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ValueError):
        det.anomaly_scores([Image.new("RGB", (0, 0))])


# ------------------------------------------------------------------ 4. defaults that fit

@pytest.mark.parametrize("patch,grid,want", [(14, 4, 518), (16, 4, 64), (16, 14, 224), (8, 16, 128)])
def test_image_size_default_fits_the_patch(patch, grid, want):
    state = to_numpy(ref.random_clip_state(32, 1, patch, grid, seed=0))
    det = visualad.Detector(state, num_threads=THREADS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedHeadWarning)
        det.encode(np.zeros((1, 20, 20, 3), np.uint8))
    assert det._settings()[0] == want
    assert det.head_["image_size"] == want


def test_image_size_default_is_the_heads_first(model):
    backbone, head = model
    det = visualad.Detector(backbone, head=head, num_threads=THREADS)
    det.encode(np.zeros((1, 20, 20, 3), np.uint8))
    assert det._settings()[0] == det.head_["image_size"]


# ------------------------------------------------------------------ 5. untrained head warning

def test_fresh_head_warns_and_trained_heads_do_not(model, capsys):
    backbone, head = model
    x = np.zeros((1, 40, 40, 3), np.uint8)
    fresh = visualad.Detector(backbone, image_size=IMAGE_SIZE, num_threads=THREADS)
    with pytest.warns(UntrainedHeadWarning, match="no trained head"):
        fresh.anomaly_scores(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedHeadWarning)
        tiny(model).anomaly_scores(x)
        visualad.Detector.default(num_threads=THREADS).anomaly_scores(x)
        fresh.set_params(epochs=1, batch_size=2).fit(np.zeros((2, 40, 40, 3), np.uint8), [0, 1])
        fresh.anomaly_scores(x)  # trained now
    image = os.path.join(os.path.dirname(backbone), "x.png")
    Image.fromarray(x[0]).save(image)
    out = os.path.join(os.path.dirname(backbone), "pred")
    assert main(["predict", image, "--backbone", backbone, "--image-size", str(IMAGE_SIZE), "--out", out,
                 "--no-progress", "--threads", str(THREADS)]) == 0
    assert "visualad predict: warning: no trained head" in capsys.readouterr().err


# ------------------------------------------------------------------ 6. work is not lost

class Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_head(tmp_path, model):
    rng = np.random.default_rng(3)
    x = (rng.random((6, 50, 50, 3)) * 255).astype(np.uint8)
    y = np.array([0, 1, 0, 1, 1, 0])
    masks = [None, (rng.random((50, 50)) > 0.7), None, None, (rng.random((50, 50)) > 0.5), None]
    params = dict(epochs=3, batch_size=4, dropout=0.1)
    straight = tiny(model, **params).fit(x, y, masks)

    def stop_after_two(det, epoch):
        if epoch == 2:
            raise Interrupt

    state = str(tmp_path / "run.state.npz")
    with pytest.raises(Interrupt):
        tiny(model, **params).fit(x, y, masks, checkpoint=state, on_epoch=stop_after_two)
    resumed = tiny(model, **params).fit(x, y, masks, checkpoint=state, resume=True)
    flat = visualad.savefile.flatten_head
    a, b = flat(straight.head_), flat(resumed.head_)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert straight.training_history_ == resumed.training_history_
    changed = tiny(model, **dict(params, learning_rate=5e-3))
    with pytest.raises(ValueError, match="another training run.*learning_rate"):
        changed.fit(x, y, masks, checkpoint=state, resume=True)


def test_output_names_are_unique_and_readable():
    paths = ["d/crack/000.png", "d/good/000.png", "a/x.png", "b/x.png", "z.png", "z.jpg", "z_2.png"]
    names = output_names(paths)
    assert names[:4] == ["crack_000.png", "good_000.png", "a_x.png", "b_x.png"]
    assert len(set(names)) == len(names)


def test_predict_saves_maps_as_npz(tmp_path, model):
    root = make_folder_dataset(tmp_path / "d", classes=("a",), defects=("crack",), n_good=2, n_bad=2)
    backbone, head = model
    out = tmp_path / "new" / "pred"
    assert main(["predict", os.path.join(root, "a", "test"), "--backbone", backbone, "--head", head,
                 "--image-size", str(IMAGE_SIZE), "--threads", str(THREADS), "--save-maps", "npz",
                 "--color-scale", "image", "--out", str(out), "--no-progress"]) == 0
    import csv
    rows = list(csv.DictReader(open(out / "scores.csv")))
    maps = tiny(model).anomaly_maps([r["path"] for r in rows])
    with np.load(out / "maps.npz") as saved:
        assert sorted(saved.files) == sorted(r["map"].split(":")[1] for r in rows)
        for r, want in zip(rows, maps):
            np.testing.assert_array_equal(saved[r["map"].split(":")[1]], want)


def test_mvtec_layout_without_ground_truth_gives_image_metrics(tmp_path, model, capsys):
    root = make_folder_dataset(tmp_path / "d", classes=("a",))
    import shutil
    shutil.rmtree(os.path.join(root, "a", "ground_truth"))
    data = datasets.load_dataset(root, "mvtec")
    assert all(it.mask is None for it in data.items) and sum(it.label for it in data.items) == 4
    backbone, head = model
    out = tmp_path / "new" / "eval"
    assert main(["eval", "--data", root, "--dataset", "mvtec", "--backbone", backbone, "--head", head,
                 "--image-size", str(IMAGE_SIZE), "--threads", str(THREADS), "--out", str(out),
                 "--no-progress"]) == 0
    doc = json.load(open(out / "results.json"))
    row = doc["classes"][0]
    assert row["pixel_auroc"] is None and row["aupro"] is None
    assert any("pixel metrics not available" in n for n in row["notes"])
    det = tiny(model)
    images = [it.image for it in data.items]
    want = metrics.roc_auc([it.label for it in data.items], det.anomaly_scores(images))
    assert abs(row["image_auroc"] - 100 * want) < 1e-9
    assert doc["settings"]["layers"] == det._settings()[1] and doc["settings"]["head"] == head


# ------------------------------------------------------------------ 7. honest heatmaps

def test_run_overlays_share_one_colour_scale(tmp_path):
    pytest.importorskip("matplotlib")
    from visualad.plotting import RunOverlays, save_overlay
    rng = np.random.default_rng(4)
    image = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
    quiet = rng.random((32, 32)).astype(np.float32)
    loud = (5 * rng.random((32, 32))).astype(np.float32)
    with RunOverlays(tmp_path / "run", capacity=2) as run:
        run.add("quiet.png", image, quiet, score=0.1, prediction=False)
        run.add("loud.png", image, loud, score=2.0, prediction=True)
    lo = min(np.percentile(quiet, 1), np.percentile(loud, 1))
    hi = max(np.percentile(quiet, 99.9), np.percentile(loud, 99.9))
    assert run.range == pytest.approx((lo, hi), rel=1e-6)
    save_overlay(tmp_path / "want.png", image, quiet, score=0.1, prediction=False, vmin=lo, vmax=hi)
    save_overlay(tmp_path / "own.png", image, quiet, score=0.1, prediction=False)
    got = np.asarray(Image.open(tmp_path / "run" / "quiet.png"))
    np.testing.assert_array_equal(got, np.asarray(Image.open(tmp_path / "want.png")))
    assert not np.array_equal(got, np.asarray(Image.open(tmp_path / "own.png")))
    assert sorted(os.listdir(tmp_path / "run")) == ["loud.png", "quiet.png"]  # the map spool is gone


def test_overlay_title_shows_the_prediction():
    import matplotlib.pyplot as plt
    amap = np.random.default_rng(5).random((16, 16)).astype(np.float32)
    fig, ax = plt.subplots()
    visualad.plot_overlay(np.zeros((16, 16, 3), np.uint8), amap, score=1.5, prediction=-1, ax=ax, title="a")
    assert ax.get_title() == "a  score 1.5000  ANOMALY"
    visualad.plot_overlay(np.zeros((16, 16, 3), np.uint8), amap, score=-1.0, prediction=False, ax=ax)
    assert ax.get_title().endswith("normal")
    for anomalous in (True, np.bool_(True), -1, np.int64(-1)):
        visualad.plot_overlay(np.zeros((16, 16, 3), np.uint8), amap, prediction=anomalous, ax=ax)
        assert ax.get_title() == "ANOMALY"
    visualad.plot_overlay(np.zeros((16, 16, 3), np.uint8), amap, prediction=1, ax=ax)
    assert ax.get_title() == "normal"
    plt.close(fig)


# ------------------------------------------------------------------ 8. thresholds

def test_calibrate_bounds_the_false_positive_rate(tmp_path, model):
    rng = np.random.default_rng(6)
    good = (rng.random((20, 48, 48, 3)) * 255).astype(np.uint8)
    for max_fpr in (0.0, 0.1, 0.26):
        det = tiny(model).calibrate(good, max_fpr=max_fpr)
        scores = det.anomaly_scores(good)
        flagged = int((det.predict(good) == -1).sum())
        allowed = math.floor(max_fpr * len(good))
        assert flagged <= allowed
        # the smallest such threshold among the scores: one step lower flags too many
        assert det.threshold in scores.tolist()
        assert int((scores >= det.threshold).sum()) > allowed
        norm = det.normalized_scores(good)
        assert norm.min() >= 0 and norm.max() <= 1
        np.testing.assert_allclose(norm[scores == det.threshold], 0.5, atol=1e-6)
        np.testing.assert_allclose(norm[scores == scores.min()], 0.0, atol=1e-6)
    det.save(tmp_path / "calibrated.safetensors")
    back = visualad.Detector.load(tmp_path / "calibrated.safetensors")
    assert back.threshold == det.threshold and back.calibration_ == det.calibration_
    np.testing.assert_array_equal(back.normalized_scores(good[:3]), det.normalized_scores(good[:3]))
    with pytest.raises(ValueError, match="call calibrate"):
        tiny(model).normalized_scores(good[:1])


# ------------------------------------------------------------------ 9. plain folders

def test_plain_folders_equal_the_layout(tmp_path, model):
    root = make_folder_dataset(tmp_path / "d", classes=("a",), defects=("crack",), n_good=3, n_bad=3)
    layout = datasets.load_dataset(root, "mvtec")
    folders = datasets.read_dirs(os.path.join(root, "a", "test", "good"), os.path.join(root, "a", "test", "crack"),
                                 os.path.join(root, "a", "ground_truth", "crack"))
    key = lambda it: (it.image, it.mask, it.label)  # noqa: E731
    assert sorted(map(key, folders.items)) == sorted(map(key, layout.items))
    backbone, head = model
    common = ["--backbone", backbone, "--head", head, "--image-size", str(IMAGE_SIZE), "--threads", str(THREADS),
              "--no-progress"]
    for name, data in (("layout", ["--data", root, "--dataset", "mvtec"]),
                       ("folders", ["--normal-dir", os.path.join(root, "a", "test", "good"),
                                    "--abnormal-dir", os.path.join(root, "a", "test", "crack"),
                                    "--mask-dir", os.path.join(root, "a", "ground_truth", "crack")])):
        assert main(["eval", *data, *common, "--out", str(tmp_path / name)]) == 0
    a, b = (json.load(open(tmp_path / n / "results.json"))["mean"] for n in ("layout", "folders"))
    for k in ("pixel_auroc", "aupro", "image_auroc"):
        assert a[k] == b[k]
    assert main(["train", "--normal-dir", os.path.join(root, "a", "test", "good"),
                 "--abnormal-dir", os.path.join(root, "a", "test", "crack"), *common, "--batch-size", "3",
                 "--out", str(tmp_path / "deep" / "new" / "head.safetensors")]) == 0
    assert os.path.isfile(tmp_path / "deep" / "new" / "head.pth")


# ------------------------------------------------------------------ 10. switches for the official release

def test_ln_post_backbone_matches_the_reference_with_the_backbones_norm():
    state, head = clip_case(64, 2, 14, 4, [1, 2], seed=21)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    as_released = dict(head, ln_post_weight=state["visual.ln_post.weight"], ln_post_bias=state["visual.ln_post.bias"])
    with torch.no_grad():
        want = ref.visualad_maps("clip", state, as_released, x, [1, 2])["final"].numpy()
    det = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=56, num_threads=THREADS,
                            ln_post="backbone")
    got = det.anomaly_maps(x.numpy())
    assert np.abs(got - want).max() < 1e-4
    trained = det.set_params(ln_post="head").anomaly_maps(x.numpy())
    assert np.abs(trained - want).max() > 1e-2  # the switch changes the maps
    with pytest.raises(ValueError, match="ln_post must be one of"):
        det.set_params(ln_post="other").anomaly_maps(x.numpy())


def test_aupro_anomalyclip_fpr_rules():
    from test_metrics import grid_dataset, ref_aupro_anomalyclip
    masks, maps = grid_dataset(np.random.default_rng(0))
    inclusive = metrics.aupro_anomalyclip(masks, maps)
    strict = metrics.aupro_anomalyclip(masks, maps, fpr_rule="anomalyclip")
    assert abs(inclusive - ref_aupro_anomalyclip(masks, maps, keep="<=")) <= 1e-9
    assert abs(strict - ref_aupro_anomalyclip(masks, maps, keep="<")) <= 1e-9
    assert abs(inclusive - strict) > 1e-3
    assert inclusive == metrics.aupro_anomalyclip(masks, maps, fpr_rule="visualad")
    with pytest.raises(ValueError, match="fpr_rule"):
        metrics.aupro_anomalyclip(masks, maps, fpr_rule="x")


def test_missing_mask_option(model):
    rng = np.random.default_rng(7)
    x = (rng.random((3, 50, 50, 3)) * 255).astype(np.uint8)
    y = [1, 1, 0]
    given = [None, rng.random((50, 50)) > 0.6, None]
    zeros = [np.zeros((50, 50), bool), given[1], None]
    skip, _ = tiny(model).loss_and_grad(x, y, given)
    as_official, grads = tiny(model, missing_mask="zeros").loss_and_grad(x, y, given)
    explicit, grads_explicit = tiny(model).loss_and_grad(x, y, zeros)
    assert as_official == explicit
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads_explicit[k])
    assert skip["seg"] != as_official["seg"] and skip["cls"] == as_official["cls"]


# ------------------------------------------------------------------ 11. messages

def test_messages_name_the_problem(tmp_path, model):
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(visualad.CheckpointError, match="x.png is not a visualad detector file"):
        visualad.Detector.load(png)
    with pytest.raises(FileNotFoundError, match="detector file not found"):
        visualad.Detector.load(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match=r"e\.g\. \[2\]"):
        tiny(model, layers=2).anomaly_maps(np.zeros((1, 20, 20, 3), np.uint8))
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray((np.random.default_rng(i).random((30, 30, 3)) * 255).astype(np.uint8)).save(paths[-1])
    det = tiny(model)
    want = det.anomaly_scores(paths)
    np.testing.assert_array_equal(det.anomaly_scores(np.array(paths, dtype=object)), want)
    np.testing.assert_array_equal(det.anomaly_scores(np.array(paths)), want)
    head_help = next(a.help for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions
                     if "--head" in a.option_strings)
    assert "stored in a visualad file" in head_help


def test_progress_text_bar_without_ipywidgets(monkeypatch):
    import importlib.util
    from visualad import progress
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real(name, *a))
    import tqdm.std
    assert progress.tqdm_class() is tqdm.std.tqdm
