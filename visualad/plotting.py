"""Anomaly-map overlays: the heatmap over the image, a colour bar, score and prediction in the title.

matplotlib is needed only here and is imported when a function is called
(``pip install matplotlib`` or ``pip install visualad[plot]``).

>>> ax = visualad.plot_overlay("img.png", det.anomaly_maps(["img.png"])[0], score=0.42)
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .datasets import preprocess_mask
from .preprocess import open_image, resize_rgb

__all__ = ["plot_overlay", "save_overlay", "map_range", "RunOverlays"]


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("visualad's overlays need matplotlib: pip install matplotlib "
                          "(or pip install 'visualad[plot]')") from None
    return matplotlib


def _image_rgb(image, size: int) -> np.ndarray:
    """uint8 (S, S, 3): the image resized to the map's side as the model sees it (preprocess.resize_rgb)."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise TypeError(f"image arrays must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {image.dtype} "
                            f"{image.shape}")
        image = Image.fromarray(np.ascontiguousarray(image))
    elif not isinstance(image, Image.Image):
        raise TypeError(f"image must be a path, a PIL image or a uint8 array, got {type(image).__name__}")
    return np.asarray(resize_rgb(image, size))


def _mask_binary(mask, size: int) -> np.ndarray:
    """bool (S, S); masks of another size follow the SPEC rule (binarise, bilinear, >= 128)."""
    if isinstance(mask, (str, os.PathLike)):
        with Image.open(mask) as im:
            im.load()
            mask = im.copy()
    if isinstance(mask, Image.Image):
        return preprocess_mask(mask, size).astype(bool)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.shape == (size, size):
        return mask > 0
    return preprocess_mask(Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L"), size).astype(bool)


def plot_overlay(image, map, mask=None, score=None, ax=None, *, title=None, alpha=0.5, cmap="jet",
                 vmin=None, vmax=None, prediction=None):
    """Draws an anomaly map over its image.

    image : path, PIL image or uint8 array; resized to the map's size S (PIL bicubic).
    map : (S, S) anomaly map (``Detector.anomaly_maps(X)[i]``).
    mask : optional ground truth (array, PIL image or path; non-zero = defect), drawn as a contour.
    score : optional image score, shown in the title.
    ax : matplotlib Axes to draw on; None = a new pyplot figure.
    title : text before the score in the title (e.g. the file name).
    alpha, cmap, vmin, vmax : heatmap opacity, colour map and colour range (default: the map's own
        range, which makes any image look hot somewhere: give one range to every image compared,
        e.g. :func:`map_range` of all their maps or the detector's ``calibration_["map_range"]``).
    prediction : optional decision, shown after the score: -1 / True = "anomaly", +1 / False = "normal"
        (``Detector.predict``'s convention, or a boolean "is anomalous").

    Returns the Axes.
    """
    _require_matplotlib()
    amap = np.asarray(map, dtype=np.float32)
    if amap.ndim != 2 or amap.shape[0] != amap.shape[1]:
        raise ValueError(f"map must be a square 2-D array (S, S), got shape {amap.shape}")
    size = amap.shape[0]
    if ax is None:
        import matplotlib.pyplot as plt
        _, ax = plt.subplots(figsize=(5.2, 4.4))
    ax.imshow(_image_rgb(image, size))
    heat = ax.imshow(amap, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax)
    if mask is not None:
        ax.contour(_mask_binary(mask, size).astype(np.float32), levels=[0.5], colors="white", linewidths=1.0)
    from matplotlib.cm import ScalarMappable
    opaque = ScalarMappable(norm=heat.norm, cmap=heat.cmap)  # the colour bar without the overlay's alpha
    ax.figure.colorbar(opaque, ax=ax, fraction=0.046, pad=0.04, label="anomaly map")
    parts = [str(title)] if title else []
    if score is not None:
        parts.append(f"score {float(score):.4f}")
    if prediction is not None:
        anomalous = bool(prediction) if isinstance(prediction, (bool, np.bool_)) else int(prediction) == -1
        parts.append("ANOMALY" if anomalous else "normal")
    if parts:
        ax.set_title("  ".join(parts))
    ax.set_axis_off()
    return ax


def save_overlay(path, image, map, mask=None, score=None, *, dpi=100, **kwargs):
    """Writes :func:`plot_overlay` to ``path`` (format from the extension, e.g. PNG).

    Renders with the Agg canvas on a figure of its own, so it works without a display and leaves
    pyplot's state alone. ``kwargs`` go to :func:`plot_overlay`."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.2, 4.4), dpi=dpi)
    FigureCanvasAgg(fig)
    plot_overlay(image, map, mask, score, ax=fig.add_subplot(), **kwargs)
    fig.tight_layout()
    fig.savefig(path)


def map_range(maps) -> tuple[float, float]:
    """One colour range for a set of maps: the 1st and 99.9th percentiles of all their pixels."""
    lo, hi = np.percentile(np.asarray(maps, np.float32), [1.0, 99.9])
    return float(lo), float(hi)


class RunOverlays:
    """The overlays of one run, on one colour scale.

    With ``vrange`` (e.g. a calibration's map range) or ``per_image=True`` each overlay is drawn when
    it is added. Otherwise the scale is the run's: the lowest 1st and highest 99.9th percentile of the
    maps' pixels; the maps (at most ``capacity``) wait in a memory-mapped temporary file in ``folder``,
    not in memory, and are drawn by :meth:`close` (also after an error, so finished work is kept),
    which then deletes that file. Use as a context manager."""

    def __init__(self, folder, capacity: int, vrange=None, per_image: bool = False):
        self.folder, self.capacity, self.per_image = os.fspath(folder), int(capacity), per_image
        self.vrange = None if vrange is None else (float(vrange[0]), float(vrange[1]))
        self.pending, self.lo, self.hi = [], np.inf, -np.inf
        self._spool = None
        os.makedirs(self.folder, exist_ok=True)

    def add(self, name: str, image, amap, **kwargs) -> str:
        """Queues or draws ``folder/name`` (kwargs: mask, score, prediction, title); returns its path."""
        path = os.path.join(self.folder, name)
        if self.per_image or self.vrange is not None:
            vmin, vmax = (None, None) if self.per_image else self.vrange
            save_overlay(path, image, amap, vmin=vmin, vmax=vmax, **kwargs)
            return path
        amap = np.asarray(amap, np.float32)
        if self._spool is None:
            import tempfile
            fd, spool_path = tempfile.mkstemp(prefix=".visualad-maps-", suffix=".npy", dir=self.folder)
            os.close(fd)
            self._spool = np.lib.format.open_memmap(spool_path, mode="w+", dtype=np.float32,
                                                    shape=(self.capacity,) + amap.shape)
        if len(self.pending) >= self.capacity or amap.shape != self._spool.shape[1:]:
            raise ValueError(f"RunOverlays holds {self.capacity} maps of shape {self._spool.shape[1:]}")
        lo, hi = map_range(amap)
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self._spool[len(self.pending)] = amap
        self.pending.append((path, image, kwargs))
        return path

    @property
    def range(self):
        """The colour range used (None when each image has its own)."""
        return None if self.per_image else (self.vrange if self.vrange is not None else (self.lo, self.hi))

    def close(self) -> None:
        """Draws the queued overlays with the run's range and removes the temporary file."""
        try:
            for i, (path, image, kwargs) in enumerate(self.pending):
                save_overlay(path, image, self._spool[i], vmin=self.lo, vmax=self.hi, **kwargs)
        finally:
            self.pending = []
            if self._spool is not None:
                spool_path, self._spool = self._spool.filename, None
                if spool_path and os.path.exists(spool_path):
                    os.unlink(spool_path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
