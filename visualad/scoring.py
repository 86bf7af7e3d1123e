"""Scorers for scikit-learn model selection (``GridSearchCV(..., scoring=...)``, ``cross_val_score``).

A scorer is called as ``scorer(estimator, X, y)`` with ``y`` the 0/1 labels (1 = anomalous, as
``fit`` takes them) and uses the Detector's ``anomaly_scores`` (higher = more anomalous), so the
figures are the paper's image-level metrics in [0, 1]. scikit-learn's string scorers (``"roc_auc"``)
would use ``decision_function``, whose sign is the other way round for these labels.
"""
from __future__ import annotations

import numpy as np

from . import metrics

__all__ = ["image_auroc", "image_ap", "image_f1_max"]


def _scores_and_labels(estimator, X, y):
    if y is None:
        raise ValueError("these scorers need the 0/1 labels y (1 = anomalous)")
    return np.asarray(y), estimator.anomaly_scores(X)


def image_auroc(estimator, X, y) -> float:
    """Image-level AUROC of ``estimator.anomaly_scores(X)`` against the labels y."""
    labels, scores = _scores_and_labels(estimator, X, y)
    return float(metrics.roc_auc(labels, scores))


def image_ap(estimator, X, y) -> float:
    """Image-level average precision of ``estimator.anomaly_scores(X)`` against the labels y."""
    labels, scores = _scores_and_labels(estimator, X, y)
    return float(metrics.average_precision(labels, scores))


def image_f1_max(estimator, X, y) -> float:
    """Image-level F1-max of ``estimator.anomaly_scores(X)`` against the labels y."""
    labels, scores = _scores_and_labels(estimator, X, y)
    return float(metrics.f1_max(labels, scores))
