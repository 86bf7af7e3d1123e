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


@pytest.fixture(scope="module")
def first_hour(tmp_path_factory):
    """Runs the start of the hour once: --version, the demo, and the next commands the demo prints.
    Returns the folder and what each step printed."""
    cwd = str(tmp_path_factory.mktemp("newcomer"))
    printed = {"version": visualad_cli("--version", cwd=cwd).stdout,
               "demo": visualad_cli("demo", "--no-progress", "--threads", THREADS, cwd=cwd).stdout}
    printed["next"] = [line.strip() for line in printed["demo"].splitlines() if line.strip().startswith("visualad ")]
    for command in printed["next"]:
        args = shlex.split(command)[1:] + ["--no-progress", "--threads", THREADS]
        printed[args[0] + "_next"] = visualad_cli(*args, cwd=cwd).stdout
    return cwd, printed


def test_version(first_hour):
    assert first_hour[1]["version"].strip() == f"visualad {visualad.__version__}"


def test_demo_runs_offline_and_finds_the_defects(first_hour):
    out = os.path.join(first_hour[0], "visualad-demo-output")
    overlays = sorted(os.listdir(os.path.join(out, "overlays")))
    with open(os.path.join(out, "scores.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(overlays) == len(rows) == 48
    with Image.open(os.path.join(out, "overlays", overlays[0])) as im:
        assert im.format == "PNG"
    mean = json.load(open(os.path.join(out, "results.json")))["mean"]
    # the default model's heatmaps highlight the pasted defects
    assert mean["pixel_auroc"] > 85 and mean["image_auroc"] > 60, mean
    assert mean_row(first_hour[1]["demo"])["P-AUROC"] == round(mean["pixel_auroc"], 1)


def test_demo_prints_next_commands_that_run(first_hour):
    cwd, printed = first_hour
    assert [c.split()[1] for c in printed["next"]] == ["predict", "eval"]
    assert all("--backbone default" in c for c in printed["next"])
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
    a = visualad.Detector.load(os.path.join(cwd, "straight", "head.safetensors")).head
    b = visualad.Detector.load(os.path.join(cwd, killed)).head
    flat = visualad.savefile.flatten_head
    for k, v in flat(a).items():
        np.testing.assert_array_equal(v, flat(b)[k], err_msg=k)


def test_readme_quick_start_numbers_are_the_printed_ones(first_hour):
    cwd, printed = first_hour
    quick = readme_quick_start()
    assert "--backbone default" in quick and "Detector.default(" in quick and "--calibrate" in quick
    assert "calibrate(" in quick
    mean = mean_row(printed["demo"])
    quoted = {"P-AUROC": r"pixel AUROC (\d+\.\d) %", "I-AUROC": r"image AUROC (\d+\.\d) %"}
    for header, pattern in quoted.items():
        found = re.findall(pattern, quick)
        assert found, f"the quick start should quote the demo's {header}"
        assert all(float(v) == mean[header] for v in found), (header, found, mean[header])
    # the calibrated predict the demo suggests: the README's counts are the scores.csv's
    rows = list(csv.DictReader(open(os.path.join(cwd, "visualad-demo-output", "predictions", "scores.csv"))))
    flagged_defects = sum(int(r["predicted_anomaly"]) for r in rows if os.sep + "defect" + os.sep in r["path"])
    flagged_good = sum(int(r["predicted_anomaly"]) for r in rows if os.sep + "good" + os.sep in r["path"])
    match = re.search(r"flags (\d+) of the 8 brick defects and (\d+) of the 8 good brick images", quick)
    assert match, "the quick start should say what the calibrated threshold flags"
    assert (int(match.group(1)), int(match.group(2))) == (flagged_defects, flagged_good)
