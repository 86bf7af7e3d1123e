"""The shipped default model (visualad/data/default_detector.safetensors) is what
visualad.demo.build_default_model produces, as the README says.

The backbone part is checked exactly on every run: it is the seeded random CLIP tower of
DEFAULT_SPEC, packed by build_backbone. The head is the product of 15 epochs of training, which takes
minutes; rebuilding it runs when VISUALAD_SLOW_TESTS=1. Its tolerance: the rebuilt and the shipped
model must give the same maps within 2e-2 (map values reach about 4) and the same image scores within
2e-3 on the demo's own images. The engine is deterministic and independent of the thread count, so
the same engine arithmetic rebuilds the same model; but the 300 training steps amplify any change of
the float rounding (of the trainer, the GEMM's blocking, the attention kernel) far beyond the
tolerance: blocking the GEMM calls by shape for thread-count independence (1e-7 per forward) moved the
rebuilt maps by 0.13, as much as another recipe. So the shipped model is rebuilt
(build_default_model()) whenever the engine's arithmetic changes, and this test says when that is due
(on another CPU, whose BLAS kernels round differently, it can fail for the same reason)."""
import os

import numpy as np
import pytest

import visualad
from visualad.backbone import build_backbone
from visualad.demo import DEFAULT_MODEL, DEFAULT_SPEC, DEMO_SEED, build_default_model, random_clip_backbone
from visualad.synthetic import DEMO_TEXTURES, make_samples

SLOW = os.environ.get("VISUALAD_SLOW_TESTS") == "1"


def loaded(path):
    det = visualad.Detector.load(path)
    det.encode(np.zeros((1, 3, DEFAULT_SPEC["image_size"], DEFAULT_SPEC["image_size"]), np.float32))
    return det


def test_shipped_backbone_is_the_seeded_random_tower():
    s = DEFAULT_SPEC
    want = build_backbone(random_clip_backbone(s["width"], s["depth"], s["patch"], s["image_size"] // s["patch"],
                                               s["seed"]))
    det = loaded(DEFAULT_MODEL)
    assert det._backbone_.family == "clip" and det._backbone_.config == want.config
    np.testing.assert_array_equal(det._backbone_.params, want.params)
    assert det._settings() == (s["image_size"], list(range(1, s["depth"] + 1)))
    # the settings build_default_model leaves in the file it writes
    params = det.get_params()
    assert params["random_state"] == s["seed"] and params["epochs"] == 1 and params["dropout"] == 0.0
    assert params["learning_rate"] == 1e-2 and params["head_learning_rate"] == 3e-3


@pytest.mark.skipif(not SLOW, reason="rebuilds the default model (minutes); set VISUALAD_SLOW_TESTS=1")
def test_rebuilding_the_default_model_gives_the_shipped_one(tmp_path):
    rebuilt = build_default_model(tmp_path / "default.safetensors", num_threads=2, progress=False)
    shipped = loaded(DEFAULT_MODEL)
    images, _, _, _ = make_samples(DEMO_TEXTURES, 4, 4, DEFAULT_SPEC["image_size"], DEMO_SEED)
    maps, scores = rebuilt.maps_and_scores(images)
    want_maps, want_scores = shipped.maps_and_scores(images)
    assert np.abs(maps - want_maps).max() < 2e-2, np.abs(maps - want_maps).max()
    assert np.abs(scores - want_scores).max() < 2e-3, np.abs(scores - want_scores).max()
