"""Sample images from real photographs with synthetic defects (for the demo and the default model).

The photographs are the ones scikit-image ships inside its wheel (``skimage/data/*.png``): the
textures ``brick``, ``grass`` and ``gravel`` for the demo, other photographs for training the
default model. They are read as files (no network, no ``skimage`` import needed).

Defects are pasted the way anomaly-detection papers synthesise them: a patch cut from elsewhere in
the image (CutPaste), a bright or dark scratch, a colour stain, a blob of noise. Every generator is
deterministic given its ``numpy.random.Generator``.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEMO_TEXTURES = ("brick", "grass", "gravel")
TRAIN_PHOTOS = ("camera", "coins", "moon", "page", "text", "astronaut", "coffee", "chelsea", "rocket",
                "hubble_deep_field", "ihc", "retina")
DEFECT_KINDS = ("cutpaste", "scratch", "stain", "noise")


def photo_dir() -> str:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the demo images come from scikit-image's bundled photographs: pip install scikit-image")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def load_photo(name: str) -> np.ndarray:
    """A bundled photograph as uint8 RGB (H, W, 3)."""
    folder = photo_dir()
    for ext in (".png", ".jpg"):
        path = os.path.join(folder, name + ext)
        if os.path.exists(path):
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
    raise FileNotFoundError(f"photograph '{name}' is not in {folder}")


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A square crop (side between size and the photo's short side), resized to size x size."""
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side])
    return np.asarray(crop.resize((size, size), Image.BICUBIC))


def _shape_mask(size: int, rng: np.random.Generator, scale=(0.06, 0.2)) -> np.ndarray:
    """A random filled polygon (bool mask) of roughly scale * size across."""
    r = size * rng.uniform(*scale)
    cy, cx = rng.uniform(r, size - r, 2)
    n = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.5, 1.0, n)
    pts = [(float(cx + rr * np.cos(a)), float(cy + rr * np.sin(a))) for a, rr in zip(angles, radii)]
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).polygon(pts, fill=255)
    return np.asarray(im) > 127


def add_defect(image: np.ndarray, rng: np.random.Generator, kind: str | None = None):
    """(defective image, bool mask) for a uint8 RGB image."""
    kind = kind or DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
    size = image.shape[0]
    out = image.astype(np.float32).copy()
    if kind == "scratch":
        im = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(im)
        pts = [tuple(rng.uniform(0.1 * size, 0.9 * size, 2))]
        for _ in range(int(rng.integers(2, 4))):
            step = rng.normal(0, 0.15 * size, 2)
            pts.append(tuple(np.clip(np.array(pts[-1]) + step, 0, size - 1)))
        draw.line([(float(x), float(y)) for x, y in pts], fill=255, width=int(rng.integers(2, max(3, size // 40) + 1)))
        mask = np.asarray(im) > 127
        value = 255.0 if rng.random() < 0.5 else 0.0
        out[mask] = 0.25 * out[mask] + 0.75 * value
    elif kind == "stain":
        mask = _shape_mask(size, rng)
        soft = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(size / 64)),
                          np.float32)[..., None] / 255.0
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        out = out * (1 - 0.8 * soft) + colour * 0.8 * soft
        mask = soft[..., 0] > 0.25
    elif kind == "noise":
        mask = _shape_mask(size, rng)
        out[mask] = rng.uniform(0, 255, (int(mask.sum()), 3))
    elif kind == "cutpaste":
        side = int(size * rng.uniform(0.12, 0.25))
        sy, sx, ty, tx = (int(v) for v in rng.integers(0, size - side, 4))
        patch = Image.fromarray(image[sy:sy + side, sx:sx + side]).rotate(float(rng.uniform(0, 360)))
        patch = np.asarray(patch, np.float32) * rng.uniform(0.6, 1.4) + rng.normal(0, 20, 3)
        shape = _shape_mask(side, rng, scale=(0.35, 0.5))
        region = out[ty:ty + side, tx:tx + side]
        region[shape] = patch[shape]
        mask = np.zeros((size, size), bool)
        mask[ty:ty + side, tx:tx + side] = shape
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECT_KINDS}")
    return np.clip(out, 0, 255).astype(np.uint8), mask


def make_samples(photos, n_good: int, n_bad: int, size: int, seed: int, kinds=DEFECT_KINDS):
    """Images (N, size, size, 3) uint8, masks (N, size, size) bool, labels (N,), class names."""
    rng = np.random.default_rng(seed)
    images, masks, labels, names = [], [], [], []
    for name in photos:
        photo = load_photo(name)
        for i in range(n_good + n_bad):
            crop = random_crop(photo, size, rng)
            if i < n_good:
                images.append(crop)
                masks.append(np.zeros((size, size), bool))
                labels.append(0)
            else:
                img, m = add_defect(crop, rng, kinds[int(rng.integers(len(kinds)))])
                images.append(img)
                masks.append(m)
                labels.append(1)
            names.append(name)
    return np.stack(images), np.stack(masks), np.array(labels), names
