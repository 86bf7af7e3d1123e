"""Anomaly-map overlays: the heatmap over the image, a colour bar, the score in the title.

matplotlib is needed only here and is imported when a function is called
(``pip install matplotlib`` or ``pip install visualad[plot]``).

>>> ax = visualad.plot_overlay("img.png", det.anomaly_maps(["img.png"])[0], score=0.42)
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .datasets import preprocess_mask
from .preprocess import open_image

__all__ = ["plot_overlay", "save_overlay"]


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("visualad's overlays need matplotlib: pip install matplotlib "
                          "(or pip install 'visualad[plot]')") from None
    return matplotlib


def _image_rgb(image, size: int) -> np.ndarray:
    """uint8 (S, S, 3): the image resized to the map's side with PIL bicubic (as the model sees it)."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise TypeError(f"image arrays must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {image.dtype} "
                            f"{image.shape}")
        image = Image.fromarray(np.ascontiguousarray(image))
    elif not isinstance(image, Image.Image):
        raise TypeError(f"image must be a path, a PIL image or a uint8 array, got {type(image).__name__}")
    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))


def _mask_binary(mask, size: int) -> np.ndarray:
    """bool (S, S); masks of another size follow the rule of docs/method.md §1 (binarise, bilinear, >= 128)."""
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
                 vmin=None, vmax=None):
    """Draws an anomaly map over its image.

    image : path, PIL image or uint8 array; resized to the map's size S (PIL bicubic).
    map : (S, S) anomaly map (``Detector.anomaly_maps(X)[i]``).
    mask : optional ground truth (array, PIL image or path; non-zero = defect), drawn as a contour.
    score : optional image score, shown in the title.
    ax : matplotlib Axes to draw on; None = a new pyplot figure.
    title : text before the score in the title (e.g. the file name).
    alpha, cmap, vmin, vmax : heatmap opacity, colour map and colour range (default: the map's range).

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
