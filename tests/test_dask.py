"""Dask: `visualad eval --dask local:2` (a LocalCluster of 2 worker processes started by the command),
`--dask ADDRESS` (eval and predict on a running LocalCluster) and the visualad.dask entry points give
exactly the local run's numbers and files."""
import csv
import os

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

import visualad  # noqa: E402
import visualad.dask  # noqa: E402
from visualad.cli import main  # noqa: E402
from visualad.demo import DEFAULT_MODEL, default_detector, write_demo_dataset  # noqa: E402

pytest.importorskip("matplotlib").use("Agg")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return write_demo_dataset(str(tmp_path_factory.mktemp("demo")), n_good=3, n_bad=3)


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as c:
        yield c


def _paths(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                  if f.endswith(".png") and "ground_truth" not in d)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_eval_on_a_local_cluster_equals_the_local_run(tmp_path, demo_root, capsys):
    common = ["eval", "--data", demo_root, "--dataset", "mvtec", "--backbone", DEFAULT_MODEL,
              "--batch-size", "4", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "local")]) == 0
    local = capsys.readouterr().out
    assert main(common + ["--out", str(tmp_path / "dask"), "--dask", "local:2"]) == 0
    dask = capsys.readouterr().out
    assert local.splitlines()[:-1] == dask.splitlines()[:-1]  # the table (the last line names the folder)
    for name in ("results.csv", "results.json"):
        assert _read(tmp_path / "local" / name) == _read(tmp_path / "dask" / name)


def test_eval_on_a_running_scheduler(tmp_path, demo_root, client, capsys):
    common = ["eval", "--data", demo_root, "--dataset", "mvtec", "--backbone", DEFAULT_MODEL,
              "--batch-size", "5", "--threads", "1", "--no-progress", "--classes", "brick,gravel"]
    assert main(common + ["--out", str(tmp_path / "local")]) == 0
    assert main(common + ["--out", str(tmp_path / "dask"), "--dask", client.scheduler.address]) == 0
    capsys.readouterr()
    assert _read(tmp_path / "local" / "results.json") == _read(tmp_path / "dask" / "results.json")
    assert client.status == "running"  # a scheduler given by address is left running


def test_predict_on_a_cluster_equals_the_local_run(tmp_path, demo_root, client):
    images = _paths(demo_root)[:5]
    common = ["predict", *images, "--backbone", DEFAULT_MODEL, "--batch-size", "3", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "local")]) == 0
    assert main(common + ["--out", str(tmp_path / "dask"), "--dask", client.scheduler.address]) == 0
    assert _read(tmp_path / "local" / "scores.csv") == _read(tmp_path / "dask" / "scores.csv")
    with open(tmp_path / "dask" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and all(os.path.exists(tmp_path / "dask" / r["overlay"]) for r in rows)


def test_python_entry_points(tmp_path, demo_root, client):
    paths = _paths(demo_root)
    det = default_detector(batch_size=4)
    maps, scores = det.maps_and_scores(paths)
    np.testing.assert_array_equal(visualad.dask.anomaly_scores(det, paths, client), scores)
    got_maps, got_scores = visualad.dask.maps_and_scores(det, paths, client)
    np.testing.assert_array_equal(got_maps, maps)
    np.testing.assert_array_equal(got_scores, scores)
    outs = [str(tmp_path / "maps" / f"{i:03d}.npy") for i in range(len(paths))]
    np.testing.assert_array_equal(visualad.dask.save_maps(det, paths, outs, client), scores)
    np.testing.assert_array_equal(np.stack([np.load(p) for p in outs]), maps)


def test_each_worker_loads_the_model_once(demo_root, client):
    paths = _paths(demo_root)
    det = default_detector(batch_size=2)
    visualad.dask.anomaly_scores(det, paths, client)
    visualad.dask.anomaly_scores(det, paths, client)

    def loads():
        from visualad import model_cache
        return model_cache.load_count

    assert set(client.run(loads).values()) == {1}


def test_dask_and_sklearn_are_imported_only_when_asked_for(tmp_path):
    import subprocess
    import sys
    code = ("import sys, visualad, visualad.cli, visualad.evaluation; visualad.cli.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'dask', 'distributed', 'sklearn'}))")
    # from an empty folder: `-c` puts the working folder first on sys.path, and the repository root
    # holds the source package without its compiled engine
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(visualad.__file__))))
    assert out.stdout.strip() == "[]", out.stdout


def test_bad_addresses(demo_root):
    with pytest.raises(ValueError, match="worker count"):
        with visualad.dask.connect("local:zero"):
            pass
    assert main(["eval", "--data", demo_root, "--dataset", "mvtec", "--backbone", DEFAULT_MODEL,
                 "--dask", "local:0", "--no-progress"]) == 1
