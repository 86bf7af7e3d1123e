"""Pickling, deep copies, processes and threads: a Detector travels as its parameters plus a
reference to its weights, loads them once per process, and gives bit-identical results everywhere."""
import copy
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from joblib import Parallel, delayed
from sklearn.base import clone

import reference as R
from fixtures import random_images, to_numpy
import visualad
from visualad.demo import default_detector, random_clip_backbone
from visualad.errors import CheckpointError
from visualad.synthetic import DEMO_TEXTURES, make_samples


@pytest.fixture(scope="module")
def images():
    return make_samples(DEMO_TEXTURES, 2, 2, 128, seed=3)[0]


def test_pickle_after_use_is_a_reference(images):
    det = default_detector()
    want = det.anomaly_scores(images)
    blob = pickle.dumps(det)
    assert len(blob) < 20_000  # parameters + path + digest, no weights
    again = pickle.loads(blob)
    assert "_loaded_" not in again.__dict__  # nothing loaded until used
    np.testing.assert_array_equal(again.anomaly_scores(images), want)
    assert again._loaded_ is det._loaded_  # one load per process
    np.testing.assert_array_equal(copy.deepcopy(det).anomaly_maps(images), det.anomaly_maps(images))


def test_pickle_of_a_dict_backbone_carries_the_arrays_and_the_trained_head():
    state = to_numpy(R.random_clip_state(64, 2, 14, 4, seed=1))
    det = visualad.Detector(state, image_size=56, layers=[1, 2], epochs=1, batch_size=2)
    x = random_images(4, 56, seed=2).numpy()
    det.fit(x, np.array([0, 1, 0, 1]))
    want = det.anomaly_maps(x)
    again = pickle.loads(pickle.dumps(det))
    assert again.backbone is not state and set(again.backbone) == set(state)
    np.testing.assert_array_equal(again.anomaly_maps(x), want)
    assert again._loaded_ is det._loaded_  # equal content -> the same loaded backbone
    np.testing.assert_array_equal(copy.deepcopy(det).anomaly_maps(x), want)
    # a fresh clone is unfitted: it starts again from the (fresh) head
    assert not np.array_equal(clone(det).anomaly_maps(x), want)


def test_unpickling_checks_the_file_content(tmp_path, images):
    path = tmp_path / "det.safetensors"
    shutil.copy(visualad.demo.DEFAULT_MODEL, path)
    det = visualad.Detector.load(path)
    blob = pickle.dumps(det)
    other = visualad.Detector(random_clip_backbone(96, 2, 8, 16, seed=5), image_size=128)
    other.save(path)
    with pytest.raises(CheckpointError, match="differs from the backbone this Detector was pickled with"):
        pickle.loads(blob).anomaly_scores(images)


def test_a_replaced_file_is_loaded_again(tmp_path, images):
    path = tmp_path / "det.safetensors"
    shutil.copy(visualad.demo.DEFAULT_MODEL, path)
    det = visualad.Detector(str(path))
    first = det.anomaly_scores(images)
    visualad.Detector(random_clip_backbone(96, 2, 8, 16, seed=5), image_size=128, layers=[1, 2]).save(path)
    assert not np.array_equal(det.anomaly_scores(images), first)


def _scores(det, chunk):
    return os.getpid(), det.anomaly_scores(chunk)


def test_joblib_processes(images):
    """Chunks of the detector's batch size, so the engine sees the same batches as the local run
    (its float rounding depends on the batch split)."""
    det = default_detector(num_threads=1, batch_size=2)
    want = det.anomaly_scores(images)
    chunks = [images[i:i + 2] for i in range(0, len(images), 2)]
    out = Parallel(n_jobs=2, backend="loky")(delayed(_scores)(det, c) for c in chunks)
    assert all(pid != os.getpid() for pid, _ in out)
    np.testing.assert_array_equal(np.concatenate([s for _, s in out]), want)


def test_threads_on_clones_and_on_one_detector(images):
    """Two threads on clones of one loaded backbone (and on one Detector) at once give exactly the
    sequential results; the weights are shared, each call has its own engine state."""
    det = default_detector(batch_size=2)
    want_maps, want_scores = det.maps_and_scores(images)
    clones = [clone(det) for _ in range(2)]
    for target in (clones, [det, det]):
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda d: [d.maps_and_scores(images) for _ in range(3)], target))
        for runs in outs:
            for maps, scores in runs:
                np.testing.assert_array_equal(maps, want_maps)
                np.testing.assert_array_equal(scores, want_scores)
    assert all(c._backbone_.params is det._backbone_.params for c in clones)


def test_engine_states_share_one_model():
    """_engine.BackboneModel.state(): states over one model, used from two threads at once, equal a
    Backbone built on its own."""
    from visualad import _engine
    from visualad.backbone import build_backbone
    bb = build_backbone(to_numpy(R.random_clip_state(64, 2, 14, 4, seed=4)))
    x = random_images(3, 56, seed=5).numpy()
    want = _engine.Backbone(bb.config, bb.params, 2).forward(x, [1, 2])
    model = _engine.BackboneModel(bb.config, bb.params)
    states = [model.state(2), model.state(num_threads=2)]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda s: [s.forward(x, [1, 2]) for _ in range(5)], states))
    for runs in outs:
        for got in runs:
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_used_clones_of_a_vit_b_share_its_weights():
    """Three used clones of a ViT-B/16 backbone (330 MB of packed weights) add less than
    100 MB (measured about 0-5 MB; benchmarks/bench_clone_memory.py reports the figure, also
    for a backbone given as a path)."""
    det = visualad.Detector(random_clip_backbone(768, 12, 16, 14, seed=0), image_size=224, num_threads=2)
    x = np.zeros((1, 224, 224, 3), np.uint8)
    det.anomaly_scores(x)
    before = _rss_mb()
    clones = [clone(det) for _ in range(3)]
    for c in clones:
        c.anomaly_scores(x)
    added = _rss_mb() - before
    assert all(c._backbone_.params is det._backbone_.params for c in clones)
    assert added < 100, f"three used clones added {added:.0f} MB"
