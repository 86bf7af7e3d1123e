"""Seed inputs for the fuzzer, written by the real libraries: ``torch.save`` (zip and legacy),
``torch.jit.save``, ``torch.onnx.export``, ``safetensors``, transformers ``save_pretrained`` (a Hugging Face folder),
visualad's own ``Detector.save`` and Pillow (images in several formats).

Every model is tiny (width 8, one block, 2x2 patches of 4 pixels) so that a seed is a few KB and a
mutated input runs in about a millisecond. ``write_seeds(folder)`` returns
``{target: [seed path, ...]}`` for the targets of targets.py.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

WIDTH, HEADS, PATCH, GRID = 8, 2, 4, 2


def _tiny_vit():
    import torch
    import torch.nn as nn

    from checkpoint_models import VisionTransformer

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = VisionTransformer(d=WIDTH, depth=1, heads=HEADS, patch=PATCH, grid=GRID, out_dim=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)

    torch.manual_seed(0)
    return Tiny().eval()


def _torch_seeds(folder: str) -> dict:
    import torch
    model = _tiny_vit()
    state = model.state_dict()
    out = {"torch_zip": [], "torch_legacy": [], "torchscript": [], "safetensors": []}
    path = os.path.join(folder, "state.pt")
    torch.save(state, path)
    out["torch_zip"].append(path)
    path = os.path.join(folder, "nested.pth")  # a training checkpoint: nested dicts, numbers, fp16
    torch.save({"model": OrderedDict((k, v.half() if v.ndim == 2 else v) for k, v in state.items()),
                "epoch": 3, "lr": [1e-3, 1e-4], "name": "tiny"}, path)
    out["torch_zip"].append(path)
    path = os.path.join(folder, "legacy.pt")
    torch.save(state, path, _use_new_zipfile_serialization=False)
    out["torch_legacy"].append(path)
    path = os.path.join(folder, "script.pt")
    torch.jit.save(torch.jit.script(model), path)
    out["torchscript"].append(path)
    from safetensors.torch import save_file
    path = os.path.join(folder, "state.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
    out["safetensors"].append(path)
    return out


def _onnx_seed(folder: str) -> list:
    import warnings

    import torch
    path = os.path.join(folder, "tower.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_tiny_vit().visual, (torch.randn(1, 3, PATCH * GRID, PATCH * GRID),), path, dynamo=False,
                          input_names=["pixel_values"], opset_version=17)
    return [path]


def _hf_seed(folder: str) -> list:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=1,
                           num_attention_heads=HEADS, image_size=PATCH * GRID, patch_size=PATCH)
    path = os.path.join(folder, "hf_clip")
    CLIPVisionModel(cfg).save_pretrained(path, safe_serialization=True)
    return [path]


def _visualad_seed(folder: str, state_path: str) -> list:
    import visualad
    from visualad.checkpoint import load_backbone
    weights = load_backbone(state_path)
    det = visualad.Detector({k: v for k, v in weights.tensors.items()}, image_size=PATCH * GRID, layers=[1],
                            num_threads=1)
    path = os.path.join(folder, "detector.safetensors")
    det.save(path)
    return [path]


def _image_seeds(folder: str) -> list:
    from PIL import Image
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB")
    out = []
    for name, im, kw in [("im.png", rgb, {}), ("im.jpg", rgb, {"quality": 90}), ("im.bmp", rgb, {}),
                         ("im.gif", rgb.convert("P"), {}), ("im.tif", rgb, {"compression": "tiff_lzw"}),
                         ("im.webp", rgb, {"lossless": True}), ("im.ppm", rgb, {}),
                         ("gray.png", rgb.convert("L"), {}), ("rgba.png", rgb.convert("RGBA"), {})]:
        path = os.path.join(folder, name)
        im.save(path, **kw)
        out.append(path)
    return out


def write_seeds(folder: str) -> dict:
    """Writes every seed under ``folder``; returns ``{target name: [paths]}``."""
    os.makedirs(folder, exist_ok=True)
    seeds = _torch_seeds(folder)
    seeds["onnx"] = _onnx_seed(folder)
    seeds["hf_folder"] = _hf_seed(folder)
    seeds["visualad"] = _visualad_seed(folder, seeds["torch_zip"][0])
    seeds["image"] = _image_seeds(folder)
    return seeds


if __name__ == "__main__":  # python tests/fuzz/seeds.py OUT_DIR  (prints the seed map as JSON)
    import json
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(write_seeds(sys.argv[1])))
