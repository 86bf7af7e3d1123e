"""Detector.save / Detector.load: one self-describing file that reproduces the maps exactly."""
import numpy as np
import pytest
import torch

import reference as R
from fixtures import random_images, to_numpy
import visualad
from visualad.errors import CheckpointError


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_round_trip_reproduces_maps(tmp_path, family):
    if family == "clip":
        state = R.random_clip_state(64, 2, 14, 4, seed=1)
    else:
        state = R.random_dinov2_state(64, 2, grid=4, registers=4, seed=1)
    head = R.random_head(64, [1, 2], seed=2, sca_layers=[1])
    det = visualad.Detector(to_numpy(state), head=to_numpy(head), image_size=70, sigma=2.0, threshold=0.1)
    x = random_images(2, 70, seed=3).numpy()
    want = det.anomaly_maps(x)
    det.save(tmp_path / "det.safetensors")
    again = visualad.Detector.load(tmp_path / "det.safetensors")
    assert again.sigma == 2.0 and again.threshold == 0.1 and again.image_size == 70
    np.testing.assert_array_equal(again.anomaly_maps(x), want)
    # the file also works as a backbone argument, with its stored head unless another head is given
    other = visualad.Detector(str(tmp_path / "det.safetensors"), image_size=70, sigma=2.0)
    np.testing.assert_array_equal(other.anomaly_maps(x), want)
    fresh = visualad.Detector(str(tmp_path / "det.safetensors"), head=to_numpy(R.random_head(64, [1, 2], seed=9)),
                              image_size=70, sigma=2.0)
    assert not np.array_equal(fresh.anomaly_maps(x), want)


def test_reference_only_file(tmp_path):
    state = R.random_clip_state(64, 2, 14, 4, seed=1)
    torch.save(state, tmp_path / "clip.pt")
    det = visualad.Detector(str(tmp_path / "clip.pt"), image_size=56)
    x = random_images(1, 56, seed=3).numpy()
    want = det.anomaly_maps(x)
    det.save(tmp_path / "small.safetensors", include_backbone=False)
    from safetensors.numpy import load_file
    assert not [k for k in load_file(str(tmp_path / "small.safetensors")) if k.startswith("backbone.")]
    np.testing.assert_array_equal(visualad.Detector.load(tmp_path / "small.safetensors").anomaly_maps(x), want)


def test_not_a_detector_file(tmp_path):
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a visualad detector file"):
        visualad.Detector.load(tmp_path / "plain.safetensors")


def test_convert_command(tmp_path):
    from visualad.cli import main
    state = R.random_clip_state(64, 2, 14, 4, seed=4)
    head = R.random_head(64, [1, 2], seed=5, image_size=56)
    torch.save(state, tmp_path / "clip.pt")
    torch.save(head, tmp_path / "CLIP.pth")
    assert main(["convert", str(tmp_path / "clip.pt"), str(tmp_path / "det.safetensors"), "--head",
                 str(tmp_path / "CLIP.pth")]) == 0
    x = random_images(1, 56, seed=6).numpy()
    want = visualad.Detector(to_numpy(state), head=to_numpy(head)).anomaly_maps(x)
    np.testing.assert_array_equal(visualad.Detector.load(tmp_path / "det.safetensors").anomaly_maps(x), want)
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "x.safetensors")]) == 1
