"""Anomaly-detection benchmark datasets (SPEC §5): readers, ground-truth masks, ``meta.json``.

Supported sources (``kind``):

- ``"meta"``: an AnomalyCLIP / VisualAD ``meta.json``:
  ``{"train"|"test": {class: [{img_path, mask_path, cls_name, specie_name, anomaly}, ...]}}``
  with paths relative to the dataset root and an empty ``mask_path`` for good images.
- ``"mvtec"``, ``"btad"``, ``"mpdd"``: the MVTec AD folder layout
  ``root/<class>/{train/good, test/<defect>, ground_truth/<defect>/<mask>}``. Normal images live
  in ``good`` (MVTec AD, MPDD) or ``ok`` (BTAD). The mask of ``test/<defect>/<name>.<ext>`` is
  ``ground_truth/<defect>/<name>_mask.<ext2>`` (MVTec AD, MPDD) or ``<name>.<ext2>`` (BTAD), with
  any image extension (BTAD mixes ``.png`` and ``.bmp``).
  A class without a ``ground_truth`` folder has no masks (image metrics only).
- ``"visa"``: VisA's ``root/split_csv/1cls.csv`` (columns ``object, split, label, image, mask``;
  label ``normal`` or ``anomaly``; paths relative to the root).

- folders without a layout (:func:`read_dirs`, anomalib's ``Folder`` idea): a folder of normal
  images, a folder of anomalous ones and optionally a folder of their masks.

Every item carries the image path, the mask path (None for good images and for anomalies given
without a mask), the class name, the defect type (``specie_name``) and the label (0 good,
1 anomalous). Missing files are reported when the dataset is read; unreadable images and masks
whose size differs from their image when the mask is loaded (:func:`load_mask`), always naming
the file.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

__all__ = ["DATASET_KINDS", "FOLDER_KINDS", "Item", "Dataset", "EmptySplitError", "load_dataset", "read_meta",
           "read_folder", "read_visa", "read_dirs", "image_files", "to_meta", "write_meta", "load_mask",
           "preprocess_mask"]

FOLDER_KINDS = ("mvtec", "btad", "mpdd")
DATASET_KINDS = FOLDER_KINDS + ("visa", "meta")
SPLITS = ("train", "test")
NORMAL_DIRS = ("good", "ok")  # MVTec AD / MPDD, BTAD
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VISA_CSV = os.path.join("split_csv", "1cls.csv")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
META_FIELDS = ("img_path", "mask_path", "cls_name", "anomaly")


class EmptySplitError(ValueError):
    """The requested split of a dataset has no images."""


@dataclass(frozen=True)
class Item:
    """One image of a dataset split."""

    image: str               # path of the image (root joined with the relative path)
    mask: str | None         # path of the ground-truth mask; None = no mask (all normal)
    cls_name: str            # object / texture class
    specie_name: str         # defect type ("good"/"ok" for normal images; "" when unknown)
    label: int               # 0 = good, 1 = anomalous


class Dataset:
    """The items of one split of one dataset, grouped by class in reading order."""

    def __init__(self, root: str, kind: str, split: str, items: Sequence[Item]):
        self.root, self.kind, self.split = str(root), kind, split
        self.items = list(items)

    @property
    def classes(self) -> list[str]:
        """Class names in order of first appearance."""
        return list(dict.fromkeys(item.cls_name for item in self.items))

    def items_of(self, cls_name: str) -> list[Item]:
        """The items of one class."""
        return [item for item in self.items if item.cls_name == cls_name]

    def select(self, classes: Sequence[str]) -> "Dataset":
        """A dataset restricted to ``classes`` (in the given order); unknown names are an error."""
        known = self.classes
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise ValueError(f"unknown class(es) {', '.join(unknown)} in {self.root} ({self.split} split); "
                             f"available: {', '.join(known)}")
        items = [item for c in dict.fromkeys(classes) for item in self.items_of(c)]
        return Dataset(self.root, self.kind, self.split, items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __repr__(self) -> str:
        return (f"Dataset(root={self.root!r}, kind={self.kind!r}, split={self.split!r}, "
                f"classes={len(self.classes)}, items={len(self.items)})")


# ---------------------------------------------------------------------------------------- readers

def load_dataset(root, kind: str, split: str = "test", meta_path=None) -> Dataset:
    """Reads one split of a dataset of the given ``kind`` (one of :data:`DATASET_KINDS`).

    ``meta_path`` (kind ``"meta"`` only) defaults to ``root/meta.json``."""
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}")
    if meta_path is not None and kind != "meta":
        raise ValueError(f"meta_path is only used with kind 'meta', not {kind!r}")
    if kind == "meta":
        return read_meta(root, split, meta_path)
    if kind == "visa":
        return read_visa(root, split)
    return read_folder(root, kind, split)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def _check_root(root) -> str:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root is not a folder: {root}")
    return root


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def read_meta(root, split: str = "test", meta_path=None) -> Dataset:
    """Reads an AnomalyCLIP / VisualAD ``meta.json`` (paths relative to ``root``).

    An anomalous entry with an empty ``mask_path`` (or one naming a folder, which is how the
    AnomalyCLIP loader marks classification-only data) gets ``mask=None``."""
    _check_split(split)
    root = _check_root(root)
    meta_path = os.path.join(root, "meta.json") if meta_path is None else os.fspath(meta_path)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"meta.json not found: {meta_path}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {meta_path}: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get(split, {}), dict):
        raise ValueError(f"{meta_path}: expected {{\"{split}\": {{class: [entries]}}}}")
    items = []
    for cls_key, entries in meta.get(split, {}).items():
        if not isinstance(entries, list):
            raise ValueError(f"{meta_path}: {split}/{cls_key} must be a list of entries")
        for i, entry in enumerate(entries):
            items.append(_meta_item(root, entry, f"{meta_path}: {split}/{cls_key}[{i}]"))
    if not items:
        raise EmptySplitError(f"{meta_path}: no entries in the {split!r} split")
    return Dataset(root, "meta", split, items)


def _meta_item(root: str, entry, where: str) -> Item:
    if not isinstance(entry, dict) or any(k not in entry for k in META_FIELDS):
        raise ValueError(f"{where}: an entry needs the fields {', '.join(META_FIELDS)}; got {entry!r}")
    anomaly = entry["anomaly"]
    if anomaly not in (0, 1):  # also accepts True/False
        raise ValueError(f"{where}: anomaly must be 0 or 1, got {anomaly!r}")
    image = _require_file(os.path.join(root, entry["img_path"]), "image")
    mask = None
    if entry["mask_path"]:
        mask = os.path.join(root, entry["mask_path"])
        mask = None if os.path.isdir(mask) else _require_file(mask, "mask")
    return Item(image, mask, str(entry["cls_name"]), str(entry.get("specie_name", "")), int(anomaly))


def _image_files(folder: str) -> list[str]:
    return _image_files_in(os.listdir(folder))


def _find_mask(gt_dir: str, image_name: str, image_path: str) -> str:
    """The mask of ``image_name`` in ``gt_dir``: ``<stem>_mask.<ext>``, else ``<stem>.<ext>``."""
    stem = os.path.splitext(image_name)[0]
    if os.path.isdir(gt_dir):
        by_stem = {}
        for name in _image_files(gt_dir):
            by_stem.setdefault(os.path.splitext(name)[0], []).append(name)
        for candidate in (stem + "_mask", stem):
            found = by_stem.get(candidate, [])
            if len(found) > 1:
                raise ValueError(f"ambiguous masks for {image_path}: {', '.join(found)} in {gt_dir}")
            if found:
                return os.path.join(gt_dir, found[0])
    raise FileNotFoundError(f"mask not found for {image_path}: expected {stem}_mask.png or {stem}.png "
                            f"(any image extension) in {gt_dir}")


def read_folder(root, kind: str = "mvtec", split: str = "test") -> Dataset:
    """Reads a dataset in the MVTec AD folder layout (MVTec AD, BTAD, MPDD).

    Classes are the sub-folders of ``root`` that have a ``<split>`` folder, in sorted order; defect
    folders are read in sorted order with the normal one (``good`` or ``ok``) first. A class with no
    ``ground_truth`` folder at all gives its anomalies ``mask=None`` (image metrics only); one that has
    it must have every mask."""
    if kind not in FOLDER_KINDS:
        raise ValueError(f"read_folder reads the kinds {', '.join(FOLDER_KINDS)}, not {kind!r}")
    _check_split(split)
    root = _check_root(root)
    classes = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name, split)))
    if not classes:
        raise EmptySplitError(f"no class folders with a '{split}' sub-folder in {root}: is it a dataset in the "
                         f"MVTec AD layout (root/<class>/{split}/<defect>/<image>)?")
    items = []
    for cls_name in classes:
        split_dir = os.path.join(root, cls_name, split)
        species = sorted((name for name in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, name))),
                         key=lambda name: (name not in NORMAL_DIRS, name))
        has_masks = os.path.isdir(os.path.join(root, cls_name, "ground_truth"))
        for specie in species:
            normal = specie in NORMAL_DIRS
            gt_dir = os.path.join(root, cls_name, "ground_truth", specie)
            for name in _image_files(os.path.join(split_dir, specie)):
                image = os.path.join(split_dir, specie, name)
                mask = None if normal or not has_masks else _find_mask(gt_dir, name, image)
                items.append(Item(image, mask, cls_name, specie, 0 if normal else 1))
    if not items:
        raise EmptySplitError(f"no images in {root}/<class>/{split}/<defect>/")
    return Dataset(root, kind, split, items)


def image_files(folder) -> list[str]:
    """The image files of a folder and its sub-folders (recursively), in sorted path order."""
    folder = os.fspath(folder)
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(parent, name) for name in _image_files_in(files))
    return sorted(found)


def _image_files_in(names) -> list[str]:
    return sorted(name for name in names
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)


def read_dirs(normal_dir=None, abnormal_dir=None, mask_dir=None, cls_name: str | None = None) -> Dataset:
    """A one-class test set from plain folders: normal images in ``normal_dir``, anomalous ones in
    ``abnormal_dir`` (either may be omitted, not both), masks of the anomalous images in ``mask_dir``
    (``<stem>_mask.<ext>`` or ``<stem>.<ext>``; without it the anomalies have no masks). Images are
    read from the folders themselves, not their sub-folders. The class is named ``cls_name``, else
    after the folder holding the given folders."""
    if normal_dir is None and abnormal_dir is None:
        raise ValueError("give a folder of normal images, of anomalous images, or both")
    if mask_dir is not None and abnormal_dir is None:
        raise ValueError("a mask folder needs the folder of anomalous images it belongs to")
    given = [os.path.abspath(os.fspath(d)) for d in (normal_dir, abnormal_dir) if d is not None]
    for folder in given + ([os.fspath(mask_dir)] if mask_dir is not None else []):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"not a folder: {folder}")
    root = os.path.commonpath([os.path.dirname(d) for d in given])
    name = cls_name or os.path.basename(root) or "images"
    items = []
    for folder, label in ((normal_dir, 0), (abnormal_dir, 1)):
        if folder is None:
            continue
        folder = os.fspath(folder)
        names = _image_files(folder)
        if not names:
            raise EmptySplitError(f"no images in {folder}")
        for image_name in names:
            image = os.path.join(folder, image_name)
            mask = _find_mask(os.fspath(mask_dir), image_name, image) if label and mask_dir is not None else None
            items.append(Item(image, mask, name, "good" if label == 0 else "anomaly", label))
    return Dataset(root, "folder", "test", items)


def read_visa(root, split: str = "test") -> Dataset:
    """Reads VisA through ``root/split_csv/1cls.csv`` (defect type ``""``, as AnomalyCLIP writes it)."""
    _check_split(split)
    root = _check_root(root)
    csv_path = _require_file(os.path.join(root, VISA_CSV), "VisA split file")
    items = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                             f"expected {', '.join(VISA_COLUMNS)}")
        for row in reader:
            if row["split"] != split:
                continue
            where = f"{csv_path} line {reader.line_num}"
            if row["label"] not in ("normal", "anomaly"):
                raise ValueError(f"{where}: label must be 'normal' or 'anomaly', got {row['label']!r}")
            anomalous = row["label"] == "anomaly"
            image = _require_file(os.path.join(root, row["image"]), "image")
            mask = _require_file(os.path.join(root, row["mask"]), "mask") if anomalous and row["mask"] else None
            items.append(Item(image, mask, row["object"], "", int(anomalous)))
    if not items:
        raise EmptySplitError(f"{csv_path}: no rows with split {split!r}")
    return Dataset(root, "visa", split, items)


# ------------------------------------------------------------------------------------- meta.json

def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def to_meta(datasets: Sequence[Dataset]) -> dict:
    """The ``meta.json`` dictionary of one or more splits (paths relative to each dataset's root)."""
    meta = {}
    for ds in datasets:
        split = meta.setdefault(ds.split, {})
        for item in ds:
            split.setdefault(item.cls_name, []).append({
                "img_path": _relative(item.image, ds.root),
                "mask_path": _relative(item.mask, ds.root) if item.mask else "",
                "cls_name": item.cls_name,
                "specie_name": item.specie_name,
                "anomaly": item.label,
            })
    return meta


def write_meta(root, dataset_kind: str, out_path=None) -> str:
    """Writes ``meta.json`` (train and test splits) for a dataset in a folder / CSV layout.

    ``out_path`` defaults to ``root/meta.json``; a split the dataset lacks (e.g. no ``train``
    folders) is written as ``{}``. Returns the path written."""
    if dataset_kind not in DATASET_KINDS or dataset_kind == "meta":
        kinds = ", ".join(k for k in DATASET_KINDS if k != "meta")
        raise ValueError(f"write_meta needs a folder/CSV dataset kind ({kinds}), got {dataset_kind!r}")
    root = _check_root(root)
    splits, empty = [], []
    for split in SPLITS:
        try:
            splits.append(load_dataset(root, dataset_kind, split))
        except EmptySplitError as exc:
            empty.append(str(exc))
    if not splits:
        raise EmptySplitError("; ".join(empty))
    meta = {split: {} for split in SPLITS}
    meta.update(to_meta(splits))
    out_path = os.path.join(root, "meta.json") if out_path is None else os.fspath(out_path)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=4)
        f.write("\n")
    return out_path


# ----------------------------------------------------------------------------------------- masks

def preprocess_mask(mask: Image.Image, size: int) -> np.ndarray:
    """SPEC §1 mask rule: binarise (> 0), resize to S×S with PIL bilinear, pixel >= 128 is anomalous.

    Returns uint8 (S, S) with values 0/1."""
    binary = np.asarray(mask.convert("L")) > 0
    resized = Image.fromarray(binary.astype(np.uint8) * 255, mode="L").resize((size, size), Image.BILINEAR)
    return (np.asarray(resized) >= 128).astype(np.uint8)


def _image_size(path: str, what: str) -> tuple[int, int]:
    """(width, height) from the file header; errors name the file."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except Exception as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc


def load_mask(item: Item, size: int) -> np.ndarray:
    """The ground truth of ``item`` at S×S as uint8 0/1 (:func:`preprocess_mask`); zeros without a mask.

    Raises FileNotFoundError / ValueError naming the file for a missing or unreadable image or mask,
    and ValueError when the mask's size differs from its image's."""
    if item.mask is None:
        return np.zeros((size, size), np.uint8)
    image_size = _image_size(item.image, "image")
    try:
        with Image.open(item.mask) as im:
            im.load()
            mask = im.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"mask not found: {item.mask}") from None
    except Exception as exc:
        raise ValueError(f"cannot read mask {item.mask}: {exc}") from exc
    if mask.size != image_size:
        raise ValueError(f"mask {item.mask} is {mask.size[0]}x{mask.size[1]} but its image {item.image} "
                         f"is {image_size[0]}x{image_size[1]}")
    return preprocess_mask(mask, size)
