"""The embedded default model and its reproducibility (the demo itself runs in test_first_hour.py)."""
import numpy as np

import visualad
from visualad.demo import DEFAULT_MODEL, build_default_model


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
