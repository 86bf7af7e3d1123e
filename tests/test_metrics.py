"""visualad.metrics against scikit-learn and straightforward NumPy/SciPy implementations of SPEC §6."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from visualad import metrics

EIGHT = np.ones((3, 3), dtype=int)  # 8-connectivity structure


# ------------------------------------------------------------------ references

def ref_f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        f1 = 2 * p * r / (p + r)
    return np.nanmax(f1)


def region_weights(masks):
    """Per pixel 1/(size of its 8-connected region), 0 for normal pixels; and the region count."""
    w = np.zeros(masks.shape)
    n_regions = 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, EIGHT)
        sizes = np.bincount(lab.ravel())
        w[i] = np.where(lab > 0, 1.0 / sizes[lab], 0.0)
        n_regions += n
    return w, n_regions


def ref_aupro(masks, maps, limit=0.3):
    """MVTec AD AUPRO from its definition: every distinct score a threshold, PRO over FPR."""
    w, n_regions = region_weights(masks)
    s, normal, w = maps.ravel().astype(np.float64), masks.ravel() == 0, w.ravel()
    order = np.argsort(-s, kind="stable")
    s = s[order]
    fpr = np.cumsum(normal[order]) / normal.sum()
    pro = np.cumsum(w[order]) / n_regions
    last = np.append(np.diff(s) != 0, True)  # one point per distinct score, after its whole tie group
    fpr = np.concatenate([[0.0], fpr[last]])
    pro = np.concatenate([[0.0], pro[last]])
    k = np.searchsorted(fpr, limit, side="right")  # fpr[:k] <= limit < fpr[k]
    area = np.trapezoid(pro[:k], fpr[:k])
    if k < len(fpr) and fpr[k - 1] < limit:
        pro_at = np.interp(limit, fpr[k - 1:k + 1], pro[k - 1:k + 1])
        area += 0.5 * (limit - fpr[k - 1]) * (pro[k - 1] + pro_at)
    return area / limit


def ref_aupro_anomalyclip(masks, maps, keep="<="):
    """cal_pro_score semantics, threshold by threshold, region by region; keep "<=" is VisualAD's
    FPR bound (fprs <= 0.3, the default), "<" AnomalyCLIP's (fprs < 0.3)."""
    lo, hi = maps.min(), maps.max()
    labels = [ndimage.label(m, EIGHT)[0] for m in masks]
    regions = [(i, lab == r) for i, lab in enumerate(labels) for r in range(1, lab.max() + 1)]
    normal = masks == 0
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / 200):
        binary = maps > th
        pros.append(np.mean([binary[i][region].sum() / region.sum() for i, region in regions]))
        fprs.append((binary & normal).sum() / normal.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    kept = fprs <= 0.3 if keep == "<=" else fprs < 0.3
    x = fprs[kept]
    return auc((x - x.min()) / (x.max() - x.min()), pros[kept])


# ------------------------------------------------------------------ data

def tied_scores(rng, n, levels, dtype):
    """Scores with heavy ties (few levels), including -0.0 and +0.0 as one value."""
    s = rng.integers(-levels // 2, levels // 2 + 1, n) / 4.0
    s[s == 0] = rng.choice([-0.0, 0.0], (s == 0).sum())
    return s.astype(dtype)


def blob_dataset(rng, n, h, w, levels=None, dtype=np.float32):
    """Masks with blobs, one-pixel regions, diagonal-touching pixels and defect-free images; maps
    that score defects higher on average (quantised to `levels` values for heavy ties)."""
    masks = np.zeros((n, h, w), dtype=bool)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        if i % 3 == 2:
            continue  # no defect
        for _ in range(rng.integers(1, 4)):
            cy, cx, ry, rx = rng.integers(0, h), rng.integers(0, w), rng.integers(1, 6), rng.integers(1, 6)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        y, x = rng.integers(1, h - 1), rng.integers(1, w - 1)
        masks[i, y, x] = True  # a single pixel (maybe isolated) ...
        masks[i, y + 1, x + 1] = rng.random() < 0.5  # ... and sometimes a diagonal neighbour
    maps = rng.normal(size=(n, h, w)) + 1.5 * masks
    if levels:
        maps = np.round(maps * levels / 8) / (levels / 8)
    return masks, maps.astype(dtype)


def grid_dataset(rng):
    """Scores exactly on AnomalyCLIP's threshold grid (lo = 0, hi = 1, step 1/200), with 570 of the
    1900 normal pixels above many thresholds (FPR exactly 0.3 there): `score > t` vs `>=` and
    `FPR < 0.3` vs `<=` give different results on this data."""
    grid = np.arange(0.0, 1.0, 1.0 / 200)
    masks = np.zeros((2, 25, 40), dtype=bool)
    masks[0, 5:13, 10:20] = True  # 80 pixels
    masks[1, 2:6, 2:6] = True  # 16
    masks[1, 10, 10] = masks[1, 11, 11] = True  # a diagonal pair: one region
    masks[1, 20, 30] = masks[1, 0, 39] = True  # one-pixel regions; 100 defect pixels in all
    normal = np.flatnonzero(~masks.ravel())
    maps = grid[rng.integers(0, 100, masks.size)]
    high = rng.choice(normal, 570, replace=False)
    maps[high] = grid[rng.integers(150, 200, 570)]
    maps[high[0]] = 1.0
    maps[normal[~np.isin(normal, high)][0]] = 0.0
    maps[masks.ravel()] = grid[rng.integers(60, 200, 100)]
    return masks, maps.reshape(masks.shape)


# ------------------------------------------------------------------ ranking metrics vs scikit-learn

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,pos_rate,levels", [(7, 0.5, 4), (1000, 0.02, 10), (5000, 0.3, 3), (150_000, 0.01, 200)])
def test_binary_metrics_match_sklearn(dtype, n, pos_rate, levels):
    rng = np.random.default_rng(n + levels)
    y = rng.random(n) < pos_rate
    y[:2] = [True, False]  # both classes present
    s = tied_scores(rng, n, levels, dtype) + y * dtype(0.25)
    got = metrics.binary_metrics(y, s, num_threads=2)
    assert abs(got["auroc"] - roc_auc_score(y, s)) <= 1e-9
    assert abs(got["ap"] - average_precision_score(y, s)) <= 1e-9
    assert abs(got["f1_max"] - ref_f1_max(y, s)) <= 1e-9
    assert metrics.roc_auc(y, s) == got["auroc"]
    assert metrics.average_precision(y, s) == got["ap"]
    assert metrics.f1_max(y, s) == got["f1_max"]
    assert metrics.binary_metrics(y, s, num_threads=1) == got


def test_binary_metrics_any_shape_and_label_dtypes():
    rng = np.random.default_rng(1)
    y = rng.random((6, 20, 30)) < 0.1
    s = rng.random((6, 20, 30)).astype(np.float32)
    ref = roc_auc_score(y.ravel(), s.ravel())
    assert abs(metrics.roc_auc(y, s) - ref) <= 1e-12
    for labels in (y.astype(np.uint8), y.astype(np.int64), y.astype(np.float32)):
        assert metrics.roc_auc(labels, s) == metrics.roc_auc(y, s)
    assert metrics.roc_auc([0, 0, 1, 1], [1, 2, 3, 4]) == 1.0  # lists and integer scores
    assert metrics.roc_auc([1, 0], [0.0, -0.0]) == 0.5  # -0.0 ties with 0.0


def test_perfect_and_reversed_ranking():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert metrics.binary_metrics(y, s) == {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0}
    assert metrics.roc_auc(y, -s) == 0.0


@pytest.mark.parametrize("fn", [metrics.roc_auc, metrics.average_precision, metrics.f1_max])
def test_binary_metric_errors(fn):
    with pytest.raises(ValueError, match="one class"):
        fn([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one class"):
        fn(np.zeros(5, bool), np.arange(5.0))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn([0, 1, 1], np.array([0.1, 0.2, np.inf], np.float32))
    with pytest.raises(ValueError, match="same shape"):
        fn([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="only 0 and 1"):
        fn([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only 0 and 1"):
        fn(np.array([0, 255], np.uint8), [0.1, 0.2])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(TypeError):
        fn(["a", "b"], [0.1, 0.2])


# ------------------------------------------------------------------ AUPRO (MVTec AD)

@pytest.mark.parametrize("levels", [None, 12])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aupro_matches_reference(levels, dtype):
    rng = np.random.default_rng(3 if levels else 4)
    masks, maps = blob_dataset(rng, 9, 24, 31, levels, dtype)
    for limit in (0.3, 0.05, 1.0):
        got = metrics.aupro(masks, maps, fpr_limit=limit)
        assert abs(got - ref_aupro(masks, maps, limit)) <= 1e-6, limit


def test_aupro_multithreaded_matches_reference():
    rng = np.random.default_rng(5)
    masks, maps = blob_dataset(rng, 12, 64, 96, levels=40)  # > 64K pixels: the pool is used
    ref = ref_aupro(masks, maps)
    assert abs(metrics.aupro(masks, maps, num_threads=2) - ref) <= 1e-6
    assert metrics.aupro(masks, maps, num_threads=2) == metrics.aupro(masks, maps, num_threads=1)


def test_aupro_one_large_image_more_threads_than_images():
    rng = np.random.default_rng(10)
    masks, maps = blob_dataset(rng, 1, 260, 260)  # > 64K pixels: a pool of 3 threads, 2 of them idle
    assert abs(metrics.aupro(masks, maps, num_threads=3) - ref_aupro(masks, maps)) <= 1e-6
    assert abs(metrics.aupro_anomalyclip(masks, maps, num_threads=3) - ref_aupro_anomalyclip(masks, maps)) <= 1e-6


def test_aupro_touching_regions_are_one_under_8_connectivity():
    # A 2x2 block and a pixel touching it diagonally: one region of 5 pixels (not 4 + 1).
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 1
    masks[0, 3, 3] = 1
    maps = np.zeros((1, 6, 6), dtype=np.float32)
    maps[0, 3, 3] = 1.0  # the single pixel first: PRO 1/5 under 8-connectivity (1/2 under 4)
    maps[0, 0, 0:3] = 0.75  # 3 of the 31 normal pixels next
    maps[0, 1:3, 1:3] = 0.5  # then the block: PRO 1
    f = 3 / 31
    expected = (f * 0.2 + (0.3 - f) * 1.0) / 0.3
    assert abs(metrics.aupro(masks, maps) - expected) <= 1e-12
    assert abs(ref_aupro(masks, maps) - expected) <= 1e-12


def test_aupro_one_pixel_regions_and_defect_free_images():
    rng = np.random.default_rng(6)
    masks = np.zeros((4, 10, 10), dtype=bool)
    masks[0, ::3, ::3] = True  # 16 isolated one-pixel regions
    masks[1, 0, 0] = masks[1, 9, 9] = True  # corners
    maps = rng.random(masks.shape)  # images 2 and 3 have no defect
    assert abs(metrics.aupro(masks, maps) - ref_aupro(masks, maps)) <= 1e-6
    assert abs(metrics.aupro(masks[0], maps[0]) - ref_aupro(masks[:1], maps[:1])) <= 1e-6  # one (H, W) image


def test_aupro_perfect_and_constant_maps():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:4, 2:5] = True
    assert abs(metrics.aupro(masks, masks.astype(np.float32)) - 1.0) <= 1e-12
    # constant maps: the curve is the diagonal, integral of x over [0, 0.3] / 0.3 = 0.15
    assert abs(metrics.aupro(masks, np.ones(masks.shape)) - 0.15) <= 1e-12


@pytest.mark.parametrize("fn", [metrics.aupro, metrics.aupro_anomalyclip])
def test_aupro_errors(fn):
    masks = np.zeros((2, 5, 5), dtype=bool)
    maps = np.random.default_rng(0).random((2, 5, 5))
    with pytest.raises(ValueError, match="no defect"):
        fn(masks, maps)
    with pytest.raises(ValueError, match="no normal"):
        fn(~masks, maps)
    masks[0, 1, 1] = True
    with pytest.raises(ValueError, match="same shape"):
        fn(masks, maps[:1])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        fn(masks[None], maps[None])
    with pytest.raises(ValueError, match="only 0 and 1"):
        fn(masks * np.uint8(255), maps)
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(masks, bad)
    bad[1, 2, 3] = -np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(masks, bad)


def test_aupro_fpr_limit_range():
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    for limit in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fpr_limit"):
            metrics.aupro(masks, np.ones((1, 4, 4)), fpr_limit=limit)


# ------------------------------------------------------------------ AUPRO (AnomalyCLIP)

@pytest.mark.parametrize("levels", [None, 12])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aupro_anomalyclip_matches_reference(levels, dtype):
    rng = np.random.default_rng(7 if levels else 8)
    masks, maps = blob_dataset(rng, 9, 24, 31, levels, dtype)
    assert abs(metrics.aupro_anomalyclip(masks, maps) - ref_aupro_anomalyclip(masks, maps)) <= 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_variants_scores_on_the_threshold_grid(seed):
    masks, maps = grid_dataset(np.random.default_rng(seed))
    assert abs(metrics.aupro_anomalyclip(masks, maps) - ref_aupro_anomalyclip(masks, maps)) <= 1e-6
    assert abs(metrics.aupro_anomalyclip(masks, maps, fpr_rule="anomalyclip")
               - ref_aupro_anomalyclip(masks, maps, keep="<")) <= 1e-6
    assert abs(metrics.aupro(masks, maps) - ref_aupro(masks, maps)) <= 1e-6


def test_aupro_anomalyclip_multithreaded_and_one_pixel_regions():
    rng = np.random.default_rng(9)
    masks, maps = blob_dataset(rng, 8, 64, 130)  # > 64K pixels: the pool is used
    masks[0] = False
    masks[0, ::4, ::4] = True  # one-pixel regions
    ref = ref_aupro_anomalyclip(masks, maps)
    assert abs(metrics.aupro_anomalyclip(masks, maps, num_threads=2) - ref) <= 1e-6
    assert abs(metrics.aupro_anomalyclip(masks, maps, num_threads=1) - ref) <= 1e-6


def test_aupro_anomalyclip_degenerate_curves_are_nan():
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 2, 2] = True
    assert np.isnan(metrics.aupro_anomalyclip(masks, np.ones((1, 6, 6))))  # constant maps
    maps = np.zeros((1, 6, 6))
    maps[0, 0, :] = 1.0  # the same 6 of 35 normal pixels are positive at every threshold
    maps[0, 2, 2] = 0.5
    assert np.isnan(metrics.aupro_anomalyclip(masks, maps))  # all kept FPRs equal
