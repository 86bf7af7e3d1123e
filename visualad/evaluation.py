"""The paper's benchmark table (SPEC §6): a Detector run over a dataset, class by class.

For every class of the test split: pixel AUROC, pixel F1-max, pixel AP, AUPRO in both definitions
(:func:`visualad.metrics.aupro` and :func:`visualad.metrics.aupro_anomalyclip`), image AUROC, image
F1-max and image AP, in percent; then the mean over classes.

Memory. Maps are streamed into the metrics: the detector runs ``batch_size`` images at a time and
only the current class is kept, as exactly what the exact pixel metrics consume — its maps as
float32 and its masks as uint8, written into arrays allocated once per class. With ``n`` the number
of test images of the largest class and ``S`` the image size, the evaluation holds at most

    5·n·S² bytes (maps + masks)  +  4·batch_size·S² bytes (the batch being computed)

on top of the model and the metric functions' own working memory (their sort keys, about 8 more
bytes per pixel of the class during the AUROC/AP/F1 pass; see :mod:`visualad.metrics`). At S = 518
that is about 1.3 MB per image of the class in memory at once, 3.5 MB at the metrics' peak; memory
never grows with the number of classes. Classes without pixel ground truth keep only their scores.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from . import metrics
from .batches import maps_and_scores, split
from .datasets import Dataset, load_mask
from .progress import Progress

__all__ = ["METRICS", "ClassResult", "EvalReport", "class_metrics", "evaluate"]

# column name -> header in the printed table
METRICS = {
    "pixel_auroc": "P-AUROC",
    "pixel_f1_max": "P-F1max",
    "pixel_ap": "P-AP",
    "aupro": "AUPRO",
    "aupro_anomalyclip": "AUPRO-AC",
    "image_auroc": "I-AUROC",
    "image_f1_max": "I-F1max",
    "image_ap": "I-AP",
}
PIXEL_METRICS = ("pixel_auroc", "pixel_f1_max", "pixel_ap", "aupro", "aupro_anomalyclip")
IMAGE_METRICS = ("image_auroc", "image_f1_max", "image_ap")


def class_metrics(labels, scores, masks=None, maps=None, num_threads=None, aupro_fpr="visualad") -> tuple[dict, list]:
    """The table's metrics for one class, in percent, and notes on what could not be computed.

    labels (N,) 0/1 and scores (N,) give the image metrics; masks (N, S, S) 0/1 and maps
    (N, S, S) the pixel metrics (None: no pixel ground truth). A metric that is undefined (one
    label only, no defect pixel, a degenerate AUPRO curve) is NaN and explained in the notes.
    ``aupro_fpr`` is the FPR rule of :func:`visualad.metrics.aupro_anomalyclip`."""
    values = {name: math.nan for name in METRICS}
    notes = []
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        notes.append(f"image metrics undefined: all {len(labels)} test images are "
                     f"{'anomalous' if labels[0] else 'good'}")
    else:
        image = metrics.binary_metrics(labels, scores, num_threads=num_threads)
        values.update(image_auroc=image["auroc"], image_f1_max=image["f1_max"], image_ap=image["ap"])
    if masks is not None:
        defect_pixels = int(np.count_nonzero(masks))
        if defect_pixels in (0, masks.size):
            notes.append(f"pixel metrics undefined: the masks have {'no' if defect_pixels == 0 else 'only'} "
                         "defect pixels")
        else:
            pixel = metrics.binary_metrics(masks, maps, num_threads=num_threads)
            values.update(pixel_auroc=pixel["auroc"], pixel_f1_max=pixel["f1_max"], pixel_ap=pixel["ap"],
                          aupro=metrics.aupro(masks, maps, num_threads=num_threads),
                          aupro_anomalyclip=metrics.aupro_anomalyclip(masks, maps, fpr_rule=aupro_fpr,
                                                                         num_threads=num_threads))
            if math.isnan(values["aupro_anomalyclip"]):
                notes.append("aupro_anomalyclip undefined: degenerate curve (constant maps or < 2 thresholds "
                             "within FPR 0.3)")
    return {name: 100.0 * v for name, v in values.items()}, notes


@dataclass
class ClassResult:
    """One row of the table: metrics in percent (NaN = undefined, see notes)."""

    name: str
    n_images: int
    n_anomalous: int
    metrics: dict
    notes: list = field(default_factory=list)


@dataclass
class EvalReport:
    """The benchmark table: per-class rows, their mean and the settings of the run."""

    classes: list
    settings: dict
    images: list = field(default_factory=list)  # (Item, image score) in evaluation order

    @property
    def mean(self) -> dict:
        """Mean over classes of each metric, skipping classes where it is undefined (NaN)."""
        out = {}
        for name in METRICS:
            vals = [r.metrics[name] for r in self.classes if not math.isnan(r.metrics[name])]
            out[name] = sum(vals) / len(vals) if vals else math.nan
        return out

    def mean_notes(self) -> list:
        """Which means leave classes out, one note per set of left-out classes."""
        left_out = {}
        for name in METRICS:
            missing = tuple(r.name for r in self.classes if math.isnan(r.metrics[name]))
            if missing and len(missing) < len(self.classes):
                left_out.setdefault(missing, []).append(name)
        notes = []
        for missing, names in left_out.items():
            group = {PIXEL_METRICS: "pixel metrics", IMAGE_METRICS: "image metrics"}.get(tuple(names), ", ".join(names))
            notes.append(f"mean {group} over {len(self.classes) - len(missing)} of {len(self.classes)} classes "
                         f"(undefined for {', '.join(missing)})")
        return notes

    def rows(self) -> list[dict]:
        """One dict per class plus the ``mean`` row: class, n_images, n_anomalous, metrics, notes."""
        out = [{"class": r.name, "n_images": r.n_images, "n_anomalous": r.n_anomalous, **r.metrics,
                "notes": r.notes} for r in self.classes]
        out.append({"class": "mean", "n_images": sum(r.n_images for r in self.classes),
                    "n_anomalous": sum(r.n_anomalous for r in self.classes), **self.mean,
                    "notes": self.mean_notes()})
        return out

    def format_table(self, digits: int = 1) -> str:
        """The table as text, metrics in percent with ``digits`` decimals, notes below."""
        rows = self.rows()
        width = max(5, *(len(r["class"]) for r in rows))
        header = f"{'class':<{width}} {'images':>6} " + " ".join(f"{h:>8}" for h in METRICS.values())
        lines = [header, "-" * len(header)]
        for r in rows:
            if r["class"] == "mean":
                lines.append("-" * len(header))
            cells = " ".join(f"{r[name]:>8.{digits}f}" for name in METRICS)
            lines.append(f"{r['class']:<{width}} {r['n_images']:>6} {cells}")
        notes = [f"{r['class']}: {note}" for r in rows for note in r["notes"]]
        return "\n".join(lines + (["", "notes:"] + [f"  {n}" for n in notes] if notes else []))

    def write_csv(self, path) -> None:
        """One row per class plus ``mean``; metrics in percent at full precision, ``nan`` if undefined."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "n_images", "n_anomalous", *METRICS, "notes"])
            for r in self.rows():
                writer.writerow([r["class"], r["n_images"], r["n_anomalous"], *(repr(r[m]) for m in METRICS),
                                 "; ".join(r["notes"])])

    def write_scores_csv(self, path, threshold: float) -> None:
        """Per-image results: image, class, defect type, ``true_anomaly`` and ``predicted_anomaly``
        (both 1 = anomalous, 0 = normal; predicted when the score exceeds ``threshold``), score."""
        t = np.float32(threshold)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "class", "defect", "true_anomaly", "predicted_anomaly", "score"])
            for item, score in self.images:
                writer.writerow([item.image, item.cls_name, item.specie_name, item.label,
                                 int(np.float32(score) > t), repr(float(score))])

    def write_json(self, path) -> None:
        """``{"settings", "metrics", "unit", "classes": [rows], "mean": row}``; undefined values are null."""
        rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                for r in self.rows()]
        doc = {"settings": self.settings, "metrics": list(METRICS), "unit": "percent",
               "classes": rows[:-1], "mean": rows[-1]}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")


def _describe(value):
    """A JSON-friendly description of a backbone/head argument."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return None if value is None else os.fspath(value)
    return f"<{type(value).__name__}>"


def _describe_head(detector) -> str | None:
    """What head the run used: the ``head`` argument, the one stored in the backbone file, or a fresh one."""
    if detector.head is not None:
        return _describe(detector.head)
    if detector._model().stored_head is not None:
        return f"stored in {_describe(detector.backbone)}"
    return f"fresh, untrained (random_state {detector.random_state})"


def used_settings(detector) -> tuple[int, list, str | None]:
    """(image size, layers, head description) a run of ``detector`` uses (loads the model)."""
    detector._model()
    size, layers = detector._settings()
    return size, [int(l) for l in layers], _describe_head(detector)


def _run_class(results, items, batch, progress, name, num_threads, aupro_fpr, on_batch):
    """Maps of one class streamed into the class's arrays, then its metrics. ``results`` yields
    (maps, scores) for each batch of ``batch`` items, in order."""
    need_pixels = all(item.mask is not None for item in items if item.label)
    labels = np.array([item.label for item in items], np.uint8)
    scores = np.empty(len(items), np.float32)
    maps = masks = None
    for start, stop in split(len(items), batch):
        chunk = items[start:stop]
        out, scores[start:stop] = next(results)
        size = out.shape[-1]
        if on_batch is not None:
            on_batch(chunk, out, scores[start:start + len(chunk)])
        if need_pixels:
            if maps is None:
                maps = np.empty((len(items), size, size), np.float32)
                masks = np.empty((len(items), size, size), np.uint8)
            maps[start:start + len(chunk)] = out
            for i, item in enumerate(chunk):
                masks[start + i] = load_mask(item, size)
        progress.update(len(chunk), **{"class": name})
    values, notes = class_metrics(labels, scores, masks, maps, num_threads, aupro_fpr)
    if not need_pixels:
        missing = sum(1 for item in items if item.label and item.mask is None)
        notes.append(f"pixel metrics not available: {missing} anomalous image(s) have no mask")
    return ClassResult(name, len(items), int(labels.sum()), values, notes), size, scores


def evaluate(detector, dataset: Dataset, *, progress: bool = False, aupro_fpr: str = "visualad",
             on_batch=None, client=None) -> EvalReport:
    """Runs ``detector`` over every class of ``dataset`` (use :meth:`Dataset.select` for a subset).

    The detector's ``batch_size`` sets how many images run at once, its ``num_threads`` also
    drives the metrics, and image scores are the top-k mean of the maps with its ``topk_ratio``
    (from :meth:`Detector.maps_and_scores`). ``aupro_fpr``: the FPR rule of the AnomalyCLIP-family
    AUPRO (``"visualad"``: FPR <= 0.3, ``"anomalyclip"``: < 0.3). ``on_batch(items, maps, scores)``
    is called for every batch (e.g. to draw overlays). Memory: see the module docstring. The
    report's settings record the image size, layers and head the run actually used.

    ``client``: a ``dask.distributed.Client``; the batches then run on its workers
    (:mod:`visualad.dask`) and the report is identical to the local one (same batches and engine
    threads; masks, ``on_batch`` and the metrics stay in this process)."""
    batch = max(1, int(detector.batch_size))
    plan = [[item.image for item in dataset.items_of(name)[a:b]]
            for name in dataset.classes for a, b in split(len(dataset.items_of(name)), batch)]
    if client is None:
        runs = (maps_and_scores(detector, paths) for paths in plan)
    else:
        from .dask import map_batches, run
        runs = map_batches(detector, maps_and_scores, [(paths,) for paths in plan], client)
    results, size, images = [], None, []
    with Progress(len(dataset), "eval", progress) as bar:
        for name in dataset.classes:
            items = dataset.items_of(name)
            result, size, scores = _run_class(runs, items, batch, bar, name, detector.num_threads, aupro_fpr,
                                              on_batch)
            results.append(result)
            images.extend(zip(items, (float(v) for v in scores)))
    size, layers, head = used_settings(detector) if client is None else run(detector, used_settings, client)
    settings = {"dataset": dataset.kind, "root": dataset.root, "split": dataset.split,
                "backbone": _describe(detector.backbone), "head": head,
                "image_size": size, "layers": [int(l) for l in layers], "ln_post": detector.ln_post,
                "sigma": detector.sigma, "topk_ratio": detector.topk_ratio, "threshold": float(detector.threshold),
                "aupro_fpr": aupro_fpr}
    return EvalReport(results, settings, images)
