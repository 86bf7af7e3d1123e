"""What the fuzzer runs on each mutated input, and which exceptions count as the project's.

Every target takes one input (a file, or a folder for ``hf_folder``) and runs the public path a
user would: reading a checkpoint as a backbone (then packing it for the engine) and as a generic
checkpoint, loading a detector file and building its engines, decoding an image. ``PROJECT_ERRORS``
are the only exceptions a target may raise; anything else is a finding.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Callable

from .mutate import Mutator


def _backbone(path: str) -> None:
    """What ``Detector(path)`` does with a checkpoint: load the tower, pack it for the engine."""
    from visualad.backbone import build_backbone
    from visualad.checkpoint import load_backbone
    from visualad.errors import CheckpointError
    weights = load_backbone(path)
    try:
        build_backbone(weights.tensors, weights.family, weights.hints)
    except ValueError as exc:  # Detector wraps these into CheckpointError naming the file
        raise CheckpointError(f"{path}: {exc}") from None


def _checkpoint(path: str, rng) -> None:
    """Half the inputs go through the backbone path, half through ``read_checkpoint`` (every
    tensor and value the file holds)."""
    from visualad.checkpoint import read_checkpoint
    if rng.random() < 0.5:
        _backbone(path)
    else:
        read_checkpoint(path)


def _detector_file(path: str, rng) -> None:
    import visualad
    det = visualad.Detector.load(path)
    with det._engine():  # the backbone's C state (threads and precision from the file)
        pass
    _, layers = det._settings()
    with det._head_state(layers):  # packs the head and builds its C state
        pass


def _image(path: str, rng) -> None:
    from visualad.preprocess import ImageSource
    ImageSource([path], 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).batch(0, 1)


def _project_errors(target: str) -> tuple:
    from visualad.errors import CheckpointError
    # image decoding reports every unreadable or oversized image as ValueError naming the file
    return (ValueError,) if target == "image" else (CheckpointError,)


@dataclass
class Target:
    """A fuzz target: how to mutate its seeds, how to write one input, what to run on it."""

    name: str
    mutate: Callable[[Mutator, bytes, list], bytes]
    run: Callable  # run(path, rng)
    folder_seed: bool = False  # the seed is a folder (config.json mutated, weights kept)

    @property
    def errors(self) -> tuple:
        return _project_errors(self.name)


def _zip(m: Mutator, data: bytes, pool: list) -> bytes:
    return m.zip(data) if m.rng.random() < 0.85 else m.bytes(data, pool)


def _legacy(m: Mutator, data: bytes, pool: list) -> bytes:
    return m.pickle(data) if m.rng.random() < 0.7 else m.bytes(data, pool)


def _safetensors(m: Mutator, data: bytes, pool: list) -> bytes:
    return m.safetensors(data) if m.rng.random() < 0.8 else m.bytes(data, pool)


def _visualad(m: Mutator, data: bytes, pool: list) -> bytes:
    return m.safetensors(data, nested_key="visualad") if m.rng.random() < 0.9 else m.bytes(data, pool)


def _json(m: Mutator, data: bytes, pool: list) -> bytes:
    return m.json_text(data)


def _onnx(m: Mutator, data: bytes, pool: list) -> bytes:
    return m.onnx(data) if m.rng.random() < 0.8 else m.bytes(data, pool)


def _image_bytes(m: Mutator, data: bytes, pool: list) -> bytes:
    return m.bytes(data, pool)


TARGETS = {t.name: t for t in [
    Target("torch_zip", _zip, _checkpoint),
    Target("torchscript", _zip, _checkpoint),
    Target("torch_legacy", _legacy, _checkpoint),
    Target("safetensors", _safetensors, _checkpoint),
    Target("onnx", _onnx, lambda path, rng: _backbone(path)),
    Target("hf_folder", _json, lambda path, rng: _backbone(path), folder_seed=True),
    Target("visualad", _visualad, _detector_file),
    Target("image", _image_bytes, _image),
]}


class InputWriter:
    """Writes each mutated input to the same place under ``workdir`` (a folder seed is copied once;
    only its config.json changes, and sometimes its weights)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self._folders: dict[str, str] = {}

    def write(self, target: Target, seed_path: str, data: bytes, mutator: Mutator) -> tuple[str, int]:
        """(path to run the target on, input size in bytes)."""
        if target.folder_seed:
            folder = self._folders.get(seed_path)
            if folder is None:
                folder = os.path.join(self.workdir, f"folder{len(self._folders)}")
                shutil.rmtree(folder, ignore_errors=True)
                shutil.copytree(seed_path, folder)
                self._folders[seed_path] = folder
            with open(os.path.join(folder, "config.json"), "wb") as f:
                f.write(data)
            weights = os.path.join(folder, "model.safetensors")
            original = os.path.join(seed_path, "model.safetensors")
            if mutator.rng.random() < 0.1:
                with open(original, "rb") as f:
                    body = mutator.safetensors(f.read())
            else:
                with open(original, "rb") as f:
                    body = f.read()
            with open(weights, "wb") as f:
                f.write(body)
            return folder, len(data) + len(body)
        ext = os.path.splitext(seed_path)[1]
        path = os.path.join(self.workdir, "input" + ext)
        with open(path, "wb") as f:
            f.write(data)
        return path, len(data)


def seed_bytes(target: Target, seed_path: str) -> bytes:
    """What the mutator starts from for one seed (a folder seed: its config.json)."""
    path = os.path.join(seed_path, "config.json") if target.folder_seed else seed_path
    with open(path, "rb") as f:
        return f.read()
