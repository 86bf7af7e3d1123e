"""Tiny benchmark datasets on disk (MVTec AD / BTAD folder layouts, VisA CSV, meta.json) and a tiny
random CLIP backbone + VisualAD head saved with torch.save, for the dataset and CLI tests."""
import csv
import json
import os

import numpy as np
import torch
from PIL import Image

import reference as ref

IMAGE_SIZE = 56  # S for the tiny model: patch 14, grid 4


def texture(rng, h, w):
    """A random smooth-ish RGB texture, uint8 (h, w, 3)."""
    base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    noise = rng.integers(-20, 21, size=(h, w, 3))
    return np.clip(np.asarray(im, np.int16) + noise, 0, 255).astype(np.uint8)


def defective(rng, h, w):
    """(image, mask): a texture with a pasted square, and the square as a 0/255 mask."""
    img = texture(rng, h, w)
    mask = np.zeros((h, w), np.uint8)
    side = int(rng.integers(max(4, h // 8), h // 3))
    y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    img[y:y + side, x:x + side] = rng.integers(0, 256, size=3, dtype=np.uint8)
    mask[y:y + side, x:x + side] = 255
    return img, mask


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def make_folder_dataset(root, classes=("bottle", "wood"), defects=("crack", "hole"), n_good=3, n_bad=2,
                        normal="good", ext=".png", mask_names=("{stem}_mask.png", "{stem}.png"),
                        size=(60, 68), seed=0):
    """MVTec AD layout; defect folder i names its masks with mask_names[i % len(mask_names)]."""
    rng = np.random.default_rng(seed)
    h, w = size
    for cls in classes:
        for i in range(2):
            save(os.path.join(root, cls, "train", normal, f"{i:03d}{ext}"), texture(rng, h, w))
        for i in range(n_good):
            save(os.path.join(root, cls, "test", normal, f"{i:03d}{ext}"), texture(rng, h, w))
        for d, defect in enumerate(defects):
            pattern = mask_names[d % len(mask_names)]
            for i in range(n_bad):
                img, mask = defective(rng, h, w)
                stem = f"{i:03d}"
                save(os.path.join(root, cls, "test", defect, stem + ext), img)
                save(os.path.join(root, cls, "ground_truth", defect, pattern.format(stem=stem)), mask)
    return str(root)


def make_visa(root, classes=("candle", "pcb1"), n_good=3, n_bad=3, size=(64, 60), seed=1):
    """VisA layout: <cls>/Data/{Images,Masks}/... JPEG images, PNG masks, split_csv/1cls.csv."""
    rng = np.random.default_rng(seed)
    h, w = size
    rows = []
    for cls in classes:
        for i in range(2):
            rel = f"{cls}/Data/Images/Normal/train_{i:03d}.JPG"
            save(os.path.join(root, rel), texture(rng, h, w))
            rows.append([cls, "train", "normal", rel, ""])
        for i in range(n_good):
            rel = f"{cls}/Data/Images/Normal/{i:03d}.JPG"
            save(os.path.join(root, rel), texture(rng, h, w))
            rows.append([cls, "test", "normal", rel, ""])
        for i in range(n_bad):
            img, mask = defective(rng, h, w)
            rel, mrel = f"{cls}/Data/Images/Anomaly/{i:03d}.JPG", f"{cls}/Data/Masks/Anomaly/{i:03d}.png"
            save(os.path.join(root, rel), img)
            save(os.path.join(root, mrel), (mask > 0).astype(np.uint8) * 3)  # VisA masks hold small ids
            rows.append([cls, "test", "anomaly", rel, mrel])
    os.makedirs(os.path.join(root, "split_csv"), exist_ok=True)
    with open(os.path.join(root, "split_csv", "1cls.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return str(root)


def make_meta_dataset(root, seed=2):
    """meta.json dataset: 'tiles' (good + masked defects), 'lesion' (anomalies only, masked) and
    'xray' (classification only: anomalies without masks)."""
    rng = np.random.default_rng(seed)
    test = {"tiles": [], "lesion": [], "xray": []}

    def entry(cls, rel, mask_rel, specie, anomaly):
        test[cls].append({"img_path": rel, "mask_path": mask_rel, "cls_name": cls,
                          "specie_name": specie, "anomaly": anomaly})

    for i in range(3):
        save(os.path.join(root, f"tiles/good_{i}.png"), texture(rng, 50, 50))
        entry("tiles", f"tiles/good_{i}.png", "", "good", 0)
        img, mask = defective(rng, 50, 50)
        save(os.path.join(root, f"tiles/bad_{i}.png"), img)
        save(os.path.join(root, f"tiles/bad_{i}_gt.png"), mask)
        entry("tiles", f"tiles/bad_{i}.png", f"tiles/bad_{i}_gt.png", "scratch", 1)
        img, mask = defective(rng, 64, 48)
        save(os.path.join(root, f"lesion/{i}.png"), img)
        save(os.path.join(root, f"lesion/{i}_mask.png"), mask)
        entry("lesion", f"lesion/{i}.png", f"lesion/{i}_mask.png", "tumor", 1)
        save(os.path.join(root, f"xray/n{i}.png"), texture(rng, 40, 40))
        entry("xray", f"xray/n{i}.png", "", "", 0)
        save(os.path.join(root, f"xray/a{i}.png"), defective(rng, 40, 40)[0])
        entry("xray", f"xray/a{i}.png", "", "", 1)
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump({"train": {}, "test": test}, f)
    return str(root)


def save_tiny_model(folder):
    """(backbone.pt, head.pt): random CLIP ViT (width 64, 2 blocks, patch 14, grid 4) and head, torch.save'd."""
    os.makedirs(folder, exist_ok=True)
    backbone, head = os.path.join(folder, "backbone.pt"), os.path.join(folder, "head.pt")
    torch.save(ref.random_clip_state(64, 2, 14, 4, seed=3), backbone)
    torch.save(ref.random_head(64, [1, 2], seed=4, image_size=IMAGE_SIZE), head)
    return backbone, head
