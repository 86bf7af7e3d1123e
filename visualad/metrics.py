"""Exact anomaly-detection metrics (docs/benchmarks.md), computed in the C engine.

Every function takes NumPy arrays (or array-likes) of any shape, flattened; labels and masks are
boolean or numeric with values 0 (normal) and 1 (anomalous); scores and maps are float32 or
float64 (other numeric dtypes are converted to float64) and must be finite. Nothing is binned:
scores are sorted once as exact integer keys (parallel radix sort), so the results equal the
reference definitions up to floating-point rounding, and memory stays linear in the number of
pixels (never thresholds x pixels). ``num_threads`` (keyword): None = every usable core; larger
counts are capped at the usable cores, counts above ``visualad.limits.MAX_THREADS`` (256) refused.

>>> from visualad import metrics
>>> metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
0.75
"""

import numpy as np

from . import _engine
from .limits import check_threads

__all__ = ["roc_auc", "average_precision", "f1_max", "binary_metrics", "aupro", "aupro_anomalyclip"]

ANOMALYCLIP_STEPS = 200  # cal_pro_score(max_step=200)
ANOMALYCLIP_EXPECT_FPR = 0.3  # cal_pro_score(expect_fpr=0.3)
#: which thresholds cal_pro_score keeps: VisualAD's release keeps FPR <= 0.3, AnomalyCLIP's FPR < 0.3.
#: The engine keeps FPR < bound, and FPR <= 0.3 is exactly FPR < the next double above 0.3.
AUPRO_FPR_RULES = {"visualad": float(np.nextafter(ANOMALYCLIP_EXPECT_FPR, 1.0)),
                   "anomalyclip": ANOMALYCLIP_EXPECT_FPR}


def _threads(num_threads):
    """None = every usable core; an int in [1, limits.MAX_THREADS], capped at the usable cores."""
    return check_threads(num_threads)


def _binary(y, name):
    """C-contiguous uint8 view/copy of a 0/1 or boolean array."""
    y = np.asarray(y)
    if y.dtype == np.bool_:
        return np.ascontiguousarray(y).view(np.uint8)
    if y.dtype == np.uint8:  # values are checked in C
        return np.ascontiguousarray(y)
    if y.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be boolean or numeric, got dtype {y.dtype}")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError(f"{name} must contain only 0 and 1 (or be boolean); binarise it first, e.g. {name} > 0")
    return (y == 1).view(np.uint8)


def _scores(s, name):
    """C-contiguous float32 or float64 array (other real dtypes become float64, exactly)."""
    s = np.asarray(s)
    if s.dtype not in (np.float32, np.float64):
        if s.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be real-valued, got dtype {s.dtype}")
        s = s.astype(np.float64)
    return np.ascontiguousarray(s)


def _labels_scores(y_true, y_score):
    y = _binary(y_true, "y_true")
    s = _scores(y_score, "y_score")
    if y.shape != s.shape:
        raise ValueError(f"y_true and y_score must have the same shape, got {y.shape} and {s.shape}")
    return y, s


def _masks_maps(masks, maps):
    m = _binary(masks, "masks")
    a = _scores(maps, "maps")
    if m.shape != a.shape:
        raise ValueError(f"masks and maps must have the same shape, got {m.shape} and {a.shape}")
    if a.ndim == 2:  # one image
        m, a = m[None], a[None]
    if a.ndim != 3:
        raise ValueError(f"masks and maps must have shape (N, H, W), got {a.shape}")
    return m, a


def binary_metrics(y_true, y_score, *, num_threads=None):
    """ROC AUC, average precision and F1-max from one sort of the scores.

    Returns ``{"auroc": ..., "ap": ..., "f1_max": ...}``, each equal to the function of the same
    meaning below. Use it when you need several of them (e.g. pixel-level evaluation).

    Raises ValueError when y_true holds only one class, contains values other than 0/1, when the
    shapes differ, the input is empty or a score is NaN/Inf.
    """
    y, s = _labels_scores(y_true, y_score)
    auroc, ap, f1 = _engine.binary_metrics(y.reshape(-1), s.reshape(-1), _threads(num_threads))
    return {"auroc": auroc, "ap": ap, "f1_max": f1}


def roc_auc(y_true, y_score, *, num_threads=None):
    """Area under the ROC curve; equals ``sklearn.metrics.roc_auc_score`` (binary).

    One ROC point per distinct score (ties grouped), trapezoid rule. Computed exactly in integer
    arithmetic (2·P·N·AUC is an integer). Unlike recent scikit-learn (which warns and returns NaN),
    a y_true with only one class raises ValueError.
    """
    return binary_metrics(y_true, y_score, num_threads=num_threads)["auroc"]


def average_precision(y_true, y_score, *, num_threads=None):
    """Average precision; equals ``sklearn.metrics.average_precision_score`` (binary).

    AP = Σ_n (R_n − R_{n−1}) P_n over the distinct scores taken as thresholds, highest first (ties
    grouped, no interpolation). A y_true with only one class raises ValueError (scikit-learn warns
    and returns 0 without positives, 1 without negatives).
    """
    return binary_metrics(y_true, y_score, num_threads=num_threads)["ap"]


def f1_max(y_true, y_score, *, num_threads=None):
    """Maximum F1 = 2PR/(P+R) over the points of the precision-recall curve.

    The points are those of ``sklearn.metrics.precision_recall_curve`` (one per distinct score);
    points with P = R = 0 (F1 undefined) are skipped. A y_true with only one class raises ValueError.
    """
    return binary_metrics(y_true, y_score, num_threads=num_threads)["f1_max"]


def aupro(masks, maps, fpr_limit=0.3, *, num_threads=None):
    """Area under the per-region-overlap curve, MVTec AD definition, normalised to [0, 1].

    masks: bool/0-1 (N, H, W) ground truth; maps: float (N, H, W) anomaly maps, higher = more
    anomalous. A single (H, W) image is accepted too.

    - Regions: 8-connected components of each image's mask (regions never span images); images
      without defects contribute only normal pixels.
    - Every distinct score t is a threshold (pixels with score >= t are positive); for each,
      PRO(t) = mean over all regions of all images of the region's positive fraction, and
      FPR(t) = positive normal pixels / normal pixels, both over the whole set.
    - The curve (0, 0), (FPR(t), PRO(t)) for t from high to low, is integrated over FPR in
      [0, fpr_limit] by the trapezoid rule, with PRO interpolated linearly at fpr_limit, and the area
      divided by fpr_limit.

    Differences to the official MVTec AD script are rounding only: it accumulates FPRs in float32
    (about 1e-7 relative), here everything is float64 from exact counts.

    Memory: only pixels scoring at or above (about) the threshold where FPR reaches fpr_limit are
    sorted: 8 bytes each for float32 maps (16 for float64), 8 more per such defect pixel, plus
    16 bytes per pixel of one image per thread; C-contiguous float32/float64 maps and bool/uint8
    masks are not copied.

    Raises ValueError for masks without any defect pixel or without any normal pixel, non-binary
    masks, shape mismatch, NaN/Inf maps, or fpr_limit outside (0, 1].
    """
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m, a = _masks_maps(masks, maps)
    return _engine.aupro(m, a, fpr_limit, _threads(num_threads))


def aupro_anomalyclip(masks, maps, *, fpr_rule="visualad", num_threads=None):
    """AUPRO as AnomalyCLIP-family papers (VisualAD included) report it: ``cal_pro_score``.

    Reproduces the published evaluation code exactly, on exact counts:

    - thresholds: ``np.arange(lo, hi, (hi - lo) / 200)`` with ``lo, hi = maps.min(), maps.max()``
      (so ``hi`` itself is not a threshold and the step is computed in the maps' dtype);
      a pixel is positive at threshold t when ``score > t`` (compared in float64);
    - regions: 8-connected components of each image's mask (``skimage.measure.label`` default);
    - per threshold: PRO = mean over all regions of all images of (positive pixels in the region /
      region area); FPR = positive normal pixels / normal pixels over all images;
    - keep the thresholds within the FPR bound, rescale their FPRs to [0, 1] by min-max, and
      integrate PRO over them with the trapezoid rule (``sklearn.metrics.auc``, area taken positive).

    ``fpr_rule`` chooses the bound as the two releases write it: ``"visualad"`` (default, VisualAD's
    own ``cal_pro_score``) keeps FPR <= 0.3, ``"anomalyclip"`` (AnomalyCLIP's) keeps FPR < 0.3. They
    differ only when some threshold gives an FPR of exactly 0.3.

    Note the result is *not* normalised like :func:`aupro`: the x axis is stretched to [0, 1] from
    whatever FPR range the 200 thresholds cover within 0.3.

    Returns NaN where the reference code fails or returns NaN: constant maps, fewer than two kept
    thresholds, or all kept FPRs equal. Raises ValueError like :func:`aupro` otherwise.
    """
    if fpr_rule not in AUPRO_FPR_RULES:
        raise ValueError(f"fpr_rule must be one of {', '.join(map(repr, AUPRO_FPR_RULES))}, got {fpr_rule!r}")
    m, a = _masks_maps(masks, maps)
    lo, hi = a.min(), a.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("maps contain NaN or Inf values")
    if hi > lo:
        # np.unique drops repeated float64 values (a step below one ulp), which add no area
        thresholds = np.unique(np.arange(lo, hi, (hi - lo) / ANOMALYCLIP_STEPS).astype(np.float64))
    else:  # constant maps: no threshold range; one threshold gives the NaN of a degenerate curve
        thresholds = np.array([lo], dtype=np.float64)
    return _engine.aupro_anomalyclip(m, a, thresholds, AUPRO_FPR_RULES[fpr_rule], _threads(num_threads))
