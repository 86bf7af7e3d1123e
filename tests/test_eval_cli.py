"""`visualad eval` and `visualad predict` end to end on tiny generated datasets and a tiny random model:
the table's numbers equal visualad.metrics applied directly to Detector.anomaly_maps and the masks."""
import csv
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import reference as ref
from dataset_fixtures import IMAGE_SIZE, make_folder_dataset, make_meta_dataset, make_visa, save_tiny_model
import visualad
from visualad import datasets, metrics
from visualad.cli import main
from visualad.evaluation import METRICS

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

THREADS = "2"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("model")))


def detector(model, batch_size=8):
    """The detector the CLI builds (its default --batch-size is 8): the maps then come from the same
    engine calls, so the metrics can be compared to 1e-9 (another batch split changes maps by float
    rounding, enough to flip ties in a ranking)."""
    backbone, head = model
    return visualad.Detector(backbone, head=head, image_size=IMAGE_SIZE, num_threads=int(THREADS),
                             batch_size=batch_size)


def independent_scores(maps, ratio=0.01):
    k = math.ceil(maps.shape[1] * maps.shape[2] * ratio)
    return np.sort(maps.reshape(len(maps), -1), axis=1)[:, -k:].astype(np.float64).mean(axis=1).astype(np.float32)


def expected_rows(model, dataset, batch_size=8):
    """The table computed directly: maps from Detector.anomaly_maps, masks by the reference rule."""
    det = detector(model, batch_size)
    rows = {}
    for cls in dataset.classes:
        items = dataset.items_of(cls)
        maps = det.anomaly_maps([it.image for it in items])
        scores = independent_scores(maps)
        np.testing.assert_allclose(scores, det.anomaly_scores([it.image for it in items]), rtol=0, atol=1e-6)
        labels = np.array([it.label for it in items])
        row = {name: math.nan for name in METRICS}
        if labels.min() != labels.max():
            row.update(image_auroc=metrics.roc_auc(labels, scores), image_ap=metrics.average_precision(labels, scores),
                       image_f1_max=metrics.f1_max(labels, scores))
        if all(it.mask for it in items if it.label):
            masks = np.stack([ref.preprocess_mask_reference(Image.open(it.mask), IMAGE_SIZE) if it.mask
                              else np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32) for it in items]) > 0
            row.update(pixel_auroc=metrics.roc_auc(masks, maps), pixel_ap=metrics.average_precision(masks, maps),
                       pixel_f1_max=metrics.f1_max(masks, maps), aupro=metrics.aupro(masks, maps),
                       aupro_anomalyclip=metrics.aupro_anomalyclip(masks, maps))
        rows[cls] = {k: 100 * v for k, v in row.items()}
    return rows


def assert_close(got, want, where):
    if math.isnan(want):
        assert got is None or math.isnan(got), f"{where}: {got} should be undefined"
    else:
        assert got is not None and abs(got - want) <= 1e-9, f"{where}: {got} != {want}"


def check_outputs(out_dir, printed, expected):
    doc = json.load(open(os.path.join(out_dir, "results.json")))
    assert doc["metrics"] == list(METRICS) and doc["unit"] == "percent"
    assert [r["class"] for r in doc["classes"]] == list(expected)
    with open(os.path.join(out_dir, "results.csv"), newline="") as f:
        csv_rows = {r["class"]: r for r in csv.DictReader(f)}
    assert list(csv_rows) == list(expected) + ["mean"]
    printed_rows = {line.split()[0]: line.split()[2:] for line in printed.splitlines()
                    if line.split() and line.split()[0] in csv_rows}
    for row in doc["classes"] + [doc["mean"]]:
        cls = row["class"]
        for i, name in enumerate(METRICS):
            if cls == "mean":
                vals = [expected[c][name] for c in expected if not math.isnan(expected[c][name])]
                want = sum(vals) / len(vals) if vals else math.nan
            else:
                want = expected[cls][name]
            assert_close(row[name], want, f"json {cls} {name}")
            assert_close(float(csv_rows[cls][name]), want, f"csv {cls} {name}")
            shown = float(printed_rows[cls][i])
            assert (math.isnan(want) and math.isnan(shown)) or abs(shown - want) <= 0.05 + 1e-9, (cls, name)
    return doc


def test_eval_mvtec_layout(tmp_path, model, capsys):
    root = make_folder_dataset(tmp_path / "mvtec", classes=("bottle", "wood", "zipper"))
    out = tmp_path / "out"
    backbone, head = model
    code = main(["eval", "--data", root, "--dataset", "mvtec", "--backbone", backbone, "--head", head,
                 "--out", str(out), "--image-size", str(IMAGE_SIZE), "--batch-size", "3", "--threads", THREADS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    expected = expected_rows(model, datasets.load_dataset(root, "mvtec"), batch_size=3)
    doc = check_outputs(out, captured.out, expected)
    assert doc["classes"][0]["n_images"] == 7 and doc["classes"][0]["n_anomalous"] == 4
    assert doc["settings"]["image_size"] == IMAGE_SIZE and doc["settings"]["dataset"] == "mvtec"
    assert "eval" in captured.err  # the progress bar
    assert all(not math.isnan(v) for v in expected["bottle"].values())


def test_eval_visa_selected_classes(tmp_path, model, capsys):
    root = make_visa(tmp_path / "visa", classes=("candle", "pcb1", "pcb2"))
    out = tmp_path / "out"
    backbone, head = model
    code = main(["eval", "--data", root, "--dataset", "visa", "--backbone", backbone, "--head", head,
                 "--out", str(out), "--image-size", str(IMAGE_SIZE), "--classes", "pcb2,candle",
                 "--threads", THREADS, "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    expected = expected_rows(model, datasets.load_dataset(root, "visa").select(["pcb2", "candle"]))
    check_outputs(out, captured.out, expected)


def test_eval_meta_undefined_metrics_are_nan_with_notes(tmp_path, model, capsys):
    root = make_meta_dataset(tmp_path / "meta")
    out = tmp_path / "out"
    backbone, head = model
    code = main(["eval", "--data", root, "--dataset", "meta", "--backbone", backbone, "--head", head,
                 "--out", str(out), "--image-size", str(IMAGE_SIZE), "--threads", THREADS, "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    expected = expected_rows(model, datasets.load_dataset(root, "meta"))
    doc = check_outputs(out, captured.out, expected)
    rows = {r["class"]: r for r in doc["classes"]}
    # lesion: anomalies only -> no image metrics; xray: no masks -> no pixel metrics
    assert rows["lesion"]["image_auroc"] is None and rows["lesion"]["pixel_auroc"] is not None
    assert any("all 3 test images are anomalous" in n for n in rows["lesion"]["notes"])
    assert rows["xray"]["pixel_auroc"] is None and rows["xray"]["image_auroc"] is not None
    assert any("3 anomalous image(s) have no mask" in n for n in rows["xray"]["notes"])
    assert any("over 2 of 3 classes" in n for n in doc["mean"]["notes"])
    assert "notes:" in captured.out and "lesion: image metrics undefined" in captured.out


def test_eval_error_names_the_file(tmp_path, model, capsys):
    root = make_folder_dataset(tmp_path / "d", classes=("a",))
    bad = os.path.join(root, "a", "test", "good", "001.png")
    with open(bad, "wb") as f:
        f.write(b"garbage")
    backbone, head = model
    code = main(["eval", "--data", root, "--dataset", "mvtec", "--backbone", backbone, "--head", head,
                 "--image-size", str(IMAGE_SIZE), "--threads", THREADS, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "visualad eval: error: cannot read image" in err and bad in err
    code = main(["eval", "--data", root, "--dataset", "mvtec", "--backbone", backbone, "--classes", "zz"])
    assert code == 1 and "unknown class(es) zz" in capsys.readouterr().err


def test_predict_scores_and_overlays(tmp_path, model, capsys):
    root = make_folder_dataset(tmp_path / "d", classes=("a",))
    images = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, "a", "test")) for f in fs)
    out = tmp_path / "pred"
    backbone, head = model
    threshold = 0.02
    code = main(["predict", *images, "--backbone", backbone, "--head", head, "--out", str(out),
                 "--image-size", str(IMAGE_SIZE), "--batch-size", "4", "--threads", THREADS,
                 "--threshold", str(threshold), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == images
    det = detector(model, batch_size=4).set_params(threshold=threshold)  # the CLI call's --batch-size
    scores = np.array([float(r["score"]) for r in rows])
    np.testing.assert_array_equal(scores, independent_scores(det.anomaly_maps(images)))
    np.testing.assert_allclose(scores, det.anomaly_scores(images), rtol=0, atol=1e-6)
    # one label convention in every CSV: predicted_anomaly 1 = anomaly (Detector.predict's -1), 0 = normal
    np.testing.assert_array_equal([int(r["predicted_anomaly"]) for r in rows], (det.predict(images) == -1).astype(int))
    overlays = [os.path.join(out, r["overlay"]) for r in rows]
    assert len(set(overlays)) == len(images)  # repeated stems (000.png in each defect folder) kept apart
    for path in overlays:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
            im.verify()


def test_maps_and_scores_follow_the_topk_rule(model):
    det = detector(model).set_params(topk_ratio=0.05)
    x = (np.random.default_rng(0).random((3, 70, 50, 3)) * 255).astype(np.uint8)
    maps, scores = det.maps_and_scores(x)
    np.testing.assert_array_equal(maps, det.anomaly_maps(x))
    np.testing.assert_array_equal(scores, det.anomaly_scores(x))
    np.testing.assert_allclose(scores, independent_scores(maps, 0.05), rtol=0, atol=1e-6)


def test_plot_overlay_for_notebooks(tmp_path):
    import matplotlib.pyplot as plt
    rng = np.random.default_rng(0)
    image = (rng.random((80, 90, 3)) * 255).astype(np.uint8)
    amap = rng.random((56, 56)).astype(np.float32)
    mask = np.zeros((80, 90), np.uint8)
    mask[10:30, 20:50] = 1
    fig, ax = plt.subplots()
    assert visualad.plot_overlay(image, amap, mask=mask, score=0.1234, ax=ax, title="x.png") is ax
    assert ax.get_title() == "x.png  score 0.1234"
    assert len(fig.axes) == 2  # the image axes and its colour bar
    plt.close(fig)
    ax = visualad.plot_overlay(image, amap)
    assert ax.get_title() == ""
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="square 2-D"):
        visualad.plot_overlay(image, amap[:, :50])
