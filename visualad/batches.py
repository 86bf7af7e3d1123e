"""One batch of images through a Detector: the unit of work a local run loops over and a Dask
worker runs (:mod:`visualad.dask`).

The engine's float rounding can depend on how images are grouped into batches (the GEMM sees a
different row count), so every runner cuts the input with :func:`split` — consecutive runs of the
detector's ``batch_size`` from the start — and a distributed run reproduces the local numbers
exactly.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["split", "maps_and_scores", "anomaly_scores", "save_maps"]


def split(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of the batches a run over ``n`` images uses: ``batch_size`` at a time."""
    batch_size = max(1, int(batch_size))
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def maps_and_scores(detector, images) -> tuple[np.ndarray, np.ndarray]:
    """``detector.maps_and_scores(images)`` for one batch."""
    return detector.maps_and_scores(images)


def anomaly_scores(detector, images) -> np.ndarray:
    """``detector.anomaly_scores(images)`` for one batch."""
    return detector.anomaly_scores(images)


def save_maps(detector, images, out_paths, overlays: bool = False, titles=None) -> np.ndarray:
    """Computes one batch and writes each map to its ``out_paths`` entry: the float32 map as ``.npy``
    (``overlays=False``) or an overlay picture of image, map and score (``overlays=True``, the
    format from the extension). Returns the batch's scores."""
    maps, scores = detector.maps_and_scores(images)
    if overlays:
        from .plotting import save_overlay
    for i, (image, path, amap, score) in enumerate(zip(images, out_paths, maps, scores)):
        folder = os.path.dirname(os.fspath(path))
        if folder:
            os.makedirs(folder, exist_ok=True)
        if overlays:
            title = titles[i] if titles is not None else None
            save_overlay(path, image, amap, score=score, **({"title": title} if title is not None else {}))
        else:
            np.save(path, amap)
    return scores
