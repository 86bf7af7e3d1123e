"""Turning user inputs into normalised float32 batches (docs/method.md §1).

decode -> PIL bicubic resize to S x S in the image's own mode -> RGB -> /255 -> (x - mean) / std,
all in float32, in the order of the official pipeline (torchvision Resize, CenterCrop, then
``convert('RGB')``, ToTensor, Normalize). Resizing before the conversion matters for palette images
(PIL resizes those with nearest-neighbour), RGBA (resized with premultiplied alpha) and CMYK.

Images with more than 8 bits per sample are scaled to 8 bits after the resize instead of being
clipped (which turns any 16-bit picture white): 16-bit modes (``I;16*``) by 255/65535; 32-bit
integer (``I``) and float (``F``) images by the range their values fit, 0..1 (float only), 0..255
or 0..65535 (others are refused)."""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from . import limits


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def check_image_size(width: int, height: int, where) -> None:
    """Refuses empty images and images of more than :data:`visualad.limits.MAX_IMAGE_PIXELS`
    pixels (checked from the header, before anything is decoded)."""
    if width < 1 or height < 1:
        raise ValueError(f"{where}: image is empty ({width}x{height})")
    if width * height > limits.MAX_IMAGE_PIXELS:
        raise ValueError(f"{where}: image of {width}x{height} = {width * height} pixels exceeds the limit of "
                         f"{limits.MAX_IMAGE_PIXELS} (visualad.limits.MAX_IMAGE_PIXELS)")


#: modes with more than 8 bits per sample and the value that maps to 255 (None: from the values)
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": None, "F": None}


def open_image(path) -> Image.Image:
    """The decoded image in its own mode (converted by :func:`resize_rgb`, in the official order)."""
    try:
        with Image.open(path) as im:
            check_image_size(im.width, im.height, f"image {path}")
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except ValueError:
        raise
    except Exception as exc:  # decoder errors, truncated files, Pillow's own bomb error
        raise ValueError(f"cannot read image {path}: {exc}") from None


def _array_to_pil(arr: np.ndarray, where: str) -> Image.Image:
    if arr.dtype != np.uint8:
        raise TypeError(f"{where}: images given as arrays must be uint8 (H,W,3)/(H,W) or float32 "
                        f"(N,3,S,S) already normalised; got {arr.dtype} {arr.shape}")
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    if arr.ndim == 3 and arr.shape[2] == 4:
        return Image.fromarray(np.ascontiguousarray(arr), mode="RGBA")
    raise ValueError(f"{where}: expected shape (H, W, 3) or (H, W), got {arr.shape}")


def _full_scale(im: Image.Image) -> float | None:
    """The sample value that becomes 255 for a wide (> 8-bit) mode; None for 8-bit modes."""
    if im.mode not in WIDE_MODES:
        return None
    if WIDE_MODES[im.mode] is not None:
        return float(WIDE_MODES[im.mode])
    lo, hi = im.getextrema()
    for top in ((1.0,) if im.mode == "F" else ()) + (255.0, 65535.0):
        if lo >= 0 and hi <= top:
            return top
    raise ValueError(f"cannot scale a mode-{im.mode} image with values in [{lo}, {hi}] to 8 bits: "
                     "convert it to 8 or 16 bits per sample")


def resize_rgb(im: Image.Image, size: int) -> Image.Image:
    """The S x S RGB image the model sees: PIL bicubic resize in the image's own mode, then RGB
    (wide modes scaled to 8 bits first, see the module docstring)."""
    check_image_size(im.width, im.height, "image")
    scale = _full_scale(im)
    im = im.resize((size, size), Image.BICUBIC)
    if scale is not None:
        values = np.asarray(im, dtype=np.float64) * (255.0 / scale)
        im = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")


def normalize_pil(im: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3, S, S] float32 from one PIL image."""
    im = resize_rgb(im, size)
    x = np.asarray(im, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class ImageSource:
    """A uniform, indexable view of every input form docs/api.md accepts, decoded lazily."""

    def __init__(self, X, size: int, mean, std):
        self.size, self.mean, self.std = limits.check_int(size, "image_size", 1, limits.MAX_IMAGE_SIDE), mean, std
        self.prepared = None
        if isinstance(X, np.ndarray) and X.dtype == np.float32 and X.ndim == 4:
            if X.shape[1] != 3 or X.shape[2] != self.size or X.shape[3] != self.size:
                raise ValueError(f"float32 input must already be (N, 3, {self.size}, {self.size}), got {X.shape}")
            if not np.isfinite(X).all():
                raise ValueError("input images contain NaN or Inf values")
            self.prepared = np.ascontiguousarray(X)
            self.items = None
        elif isinstance(X, np.ndarray) and X.dtype == np.uint8 and X.ndim == 4:
            self.items = list(X)
        elif isinstance(X, np.ndarray) and (X.dtype == object or X.dtype.kind == "U"):
            if X.ndim != 1:
                raise ValueError(f"an array of paths or images must be 1-D, got shape {X.shape}")
            self.items = list(X)
        elif isinstance(X, np.ndarray):
            if X.ndim in (2, 3) and X.dtype == np.uint8:
                self.items = [X]
            elif X.dtype != np.uint8 and X.dtype != np.float32:
                raise TypeError(f"image arrays must be uint8 or float32, got {X.dtype}")
            else:
                raise ValueError(f"unsupported image array shape {X.shape} for dtype {X.dtype}")
        elif _is_path(X) or isinstance(X, Image.Image):
            self.items = [X]
        elif isinstance(X, (list, tuple)):
            self.items = list(X)
        else:
            raise TypeError(f"unsupported input type {type(X).__name__}: give paths, PIL images, "
                            "uint8 arrays or a float32 (N,3,S,S) array")
        if self.items is not None and not self.items:
            raise ValueError("no images given")

    def __len__(self) -> int:
        return len(self.prepared) if self.prepared is not None else len(self.items)

    def _one(self, i: int) -> np.ndarray:
        item = self.items[i]
        if _is_path(item):
            im = open_image(item)
        elif isinstance(item, Image.Image):
            im = item
        elif isinstance(item, np.ndarray):
            im = _array_to_pil(item, f"image {i}")
        else:
            raise TypeError(f"image {i}: unsupported type {type(item).__name__}")
        check_image_size(im.width, im.height, f"image {i}")
        return normalize_pil(im, self.size, self.mean, self.std)

    def batch(self, start: int, stop: int) -> np.ndarray:
        if self.prepared is not None:
            return self.prepared[start:stop]
        return np.stack([self._one(i) for i in range(start, stop)])

    def batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        n = len(self)
        for start in range(0, n, batch_size):
            yield start, self.batch(start, min(n, start + batch_size))
