"""visualad.datasets: the folder / CSV / meta.json readers, meta.json writing, masks and errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import reference as ref
from dataset_fixtures import make_folder_dataset, make_meta_dataset, make_visa, save, texture
from visualad import datasets
from visualad.cli import main
from visualad.datasets import Item


def test_mvtec_layout(tmp_path):
    root = make_folder_dataset(tmp_path / "mvtec")
    ds = datasets.load_dataset(root, "mvtec")
    assert ds.classes == ["bottle", "wood"] and ds.split == "test"
    items = ds.items_of("bottle")
    assert [(it.specie_name, it.label) for it in items] == [("good", 0)] * 3 + [("crack", 1)] * 2 + [("hole", 1)] * 2
    assert all(it.mask is None for it in items if not it.label)
    # both mask naming conventions: <name>_mask.png (crack) and <name>.png (hole)
    assert items[3].mask == os.path.join(root, "bottle", "ground_truth", "crack", "000_mask.png")
    assert items[5].mask == os.path.join(root, "bottle", "ground_truth", "hole", "000.png")
    assert items[5].image == os.path.join(root, "bottle", "test", "hole", "000.png")
    train = datasets.load_dataset(root, "mpdd", "train")
    assert len(train) == 4 and {it.label for it in train} == {0} and train.items[0].specie_name == "good"


def test_btad_layout_ok_ko_and_bmp(tmp_path):
    root = make_folder_dataset(tmp_path / "btad", classes=("01", "03"), defects=("ko",), normal="ok", ext=".bmp",
                               mask_names=("{stem}.png",))
    os.remove(os.path.join(root, "03", "ground_truth", "ko", "001.png"))  # 03 has .bmp masks in BTAD
    save(os.path.join(root, "03", "ground_truth", "ko", "001.bmp"), np.full((60, 68), 255, np.uint8))
    ds = datasets.load_dataset(root, "btad")
    assert ds.classes == ["01", "03"]
    items = ds.items_of("03")
    assert [(it.specie_name, it.label) for it in items] == [("ok", 0)] * 3 + [("ko", 1)] * 2
    assert items[-1].mask.endswith(os.path.join("03", "ground_truth", "ko", "001.bmp"))
    assert datasets.load_mask(items[-1], 28).all()


def test_visa_csv(tmp_path):
    root = make_visa(tmp_path / "visa")
    ds = datasets.load_dataset(root, "visa")
    assert ds.classes == ["candle", "pcb1"] and len(ds) == 12
    bad = [it for it in ds.items_of("pcb1") if it.label]
    assert len(bad) == 3 and bad[0].mask == os.path.join(root, "pcb1/Data/Masks/Anomaly/000.png")
    assert all(it.mask is None and it.specie_name == "" for it in ds if not it.label)
    assert len(datasets.load_dataset(root, "visa", "train")) == 4


def test_meta_json_reader(tmp_path):
    root = make_meta_dataset(tmp_path / "meta")
    ds = datasets.load_dataset(root, "meta")
    assert ds.classes == ["tiles", "lesion", "xray"]
    assert {it.label for it in ds.items_of("lesion")} == {1}
    assert all(it.mask is None for it in ds.items_of("xray"))  # classification-only anomalies
    tiles = ds.items_of("tiles")
    assert tiles[1] == Item(os.path.join(root, "tiles/bad_0.png"), os.path.join(root, "tiles/bad_0_gt.png"),
                            "tiles", "scratch", 1)
    with pytest.raises(datasets.EmptySplitError, match="train"):
        datasets.load_dataset(root, "meta", "train")
    # AnomalyCLIP's loader treats a mask path naming a folder as "no mask"
    meta = json.load(open(os.path.join(root, "meta.json")))
    meta["test"]["xray"][1]["mask_path"] = "xray"
    json.dump(meta, open(os.path.join(tmp_path, "other.json"), "w"))
    ds2 = datasets.load_dataset(root, "meta", meta_path=os.path.join(tmp_path, "other.json"))
    assert ds2.items_of("xray")[1].mask is None


@pytest.mark.parametrize("kind", ["mvtec", "visa"])
def test_make_meta_round_trip(tmp_path, kind, capsys):
    root = make_folder_dataset(tmp_path / "d") if kind == "mvtec" else make_visa(tmp_path / "d")
    out = tmp_path / "meta.json"
    assert main(["make-meta", root, "--dataset", kind, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    meta = json.load(open(out))
    assert set(meta) == {"train", "test"}
    first = meta["test"][next(iter(meta["test"]))][-1]
    assert set(first) == {"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}
    assert not os.path.isabs(first["img_path"]) and first["anomaly"] == 1 and first["mask_path"]
    for split in ("train", "test"):
        direct = datasets.load_dataset(root, kind, split)
        via_meta = datasets.load_dataset(root, "meta", split, meta_path=out)
        assert via_meta.items == direct.items


def test_write_meta_default_path_and_test_only(tmp_path):
    root = make_folder_dataset(tmp_path / "d", classes=("a",))
    for name in os.listdir(os.path.join(root, "a", "train", "good")):
        os.remove(os.path.join(root, "a", "train", "good", name))
    os.rmdir(os.path.join(root, "a", "train", "good"))
    os.rmdir(os.path.join(root, "a", "train"))
    path = datasets.write_meta(root, "mvtec")
    assert path == os.path.join(root, "meta.json")
    meta = json.load(open(path))
    assert meta["train"] == {} and len(meta["test"]["a"]) == 7
    with pytest.raises(ValueError, match="folder/CSV"):
        datasets.write_meta(root, "meta")


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "P"])
@pytest.mark.parametrize("shape,size", [((60, 68), 56), ((37, 23), 56), ((300, 280), 28)])
def test_mask_rule_matches_reference(mode, shape, size):
    rng = np.random.default_rng([shape[0], shape[1], len(mode)])
    values = rng.integers(0, 256, size=shape, dtype=np.uint8) * (rng.random(shape) < 0.3)
    im = Image.fromarray(values.astype(np.uint8), mode="L")
    im = im.convert(mode) if mode != "P" else im.convert("P")
    ours = datasets.preprocess_mask(im, size)
    assert ours.dtype == np.uint8 and ours.shape == (size, size)
    np.testing.assert_array_equal(ours, ref.preprocess_mask_reference(im, size))


# --------------------------------------------------------------------------------- errors

def test_missing_mask_file_names_the_image(tmp_path):
    root = make_folder_dataset(tmp_path / "d")
    os.remove(os.path.join(root, "wood", "ground_truth", "crack", "001_mask.png"))
    with pytest.raises(FileNotFoundError, match=r"wood.test.crack.001\.png"):
        datasets.load_dataset(root, "mvtec")


def test_ambiguous_masks(tmp_path):
    root = make_folder_dataset(tmp_path / "d", classes=("a",))
    save(os.path.join(root, "a", "ground_truth", "crack", "000_mask.bmp"), np.zeros((60, 68), np.uint8))
    with pytest.raises(ValueError, match="ambiguous masks"):
        datasets.load_dataset(root, "mvtec")


def test_meta_missing_files(tmp_path):
    root = make_meta_dataset(tmp_path / "d")
    os.remove(os.path.join(root, "lesion/2.png"))
    with pytest.raises(FileNotFoundError, match=r"image not found: .*lesion/2\.png"):
        datasets.read_meta(root)
    os.remove(os.path.join(root, "tiles/bad_1_gt.png"))
    with pytest.raises(FileNotFoundError, match=r"mask not found: .*tiles/bad_1_gt\.png"):
        datasets.load_dataset(root, "meta")
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump({"test": {"c": [{"img_path": "x.png"}]}}, f)
    with pytest.raises(ValueError, match=r"meta\.json: test/c\[0\]: an entry needs the fields"):
        datasets.read_meta(root)


def test_wrong_mask_size_names_both_files(tmp_path):
    img = save(str(tmp_path / "img.png"), texture(np.random.default_rng(0), 40, 50))
    mask = save(str(tmp_path / "mask.png"), np.zeros((40, 49), np.uint8))
    with pytest.raises(ValueError, match=r"mask .*mask\.png is 49x40 but its image .*img\.png is 50x40"):
        datasets.load_mask(Item(img, mask, "c", "d", 1), 28)


def test_unreadable_image_and_mask(tmp_path):
    good = save(str(tmp_path / "img.png"), texture(np.random.default_rng(0), 40, 40))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        datasets.load_mask(Item(str(broken), good, "c", "d", 1), 28)
    with pytest.raises(ValueError, match=r"cannot read mask .*broken\.png"):
        datasets.load_mask(Item(good, str(broken), "c", "d", 1), 28)
    assert not datasets.load_mask(Item(str(broken), None, "c", "good", 0), 28).any()  # no mask: zeros


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset kind"):
        datasets.load_dataset(tmp_path, "kolektor")
    with pytest.raises(FileNotFoundError, match="dataset root"):
        datasets.load_dataset(tmp_path / "nope", "mvtec")
    with pytest.raises(datasets.EmptySplitError, match="MVTec AD layout"):
        datasets.load_dataset(tmp_path, "mvtec")
    root = make_visa(tmp_path / "v", classes=("candle",))
    with pytest.raises(ValueError, match=r"unknown class\(es\) pcb9"):
        datasets.load_dataset(root, "visa").select(["pcb9"])
    csv_path = os.path.join(root, "split_csv", "1cls.csv")
    text = open(csv_path).read().replace("anomaly", "defect", 1)
    open(csv_path, "w").write(text)
    with pytest.raises(ValueError, match=r"1cls\.csv line \d+: label must be"):
        datasets.load_dataset(root, "visa")
