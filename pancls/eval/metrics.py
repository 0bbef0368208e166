"""Classification metrics for long-tailed problems (scikit-learn underneath).

Many / medium / few shot groups follow Liu et al., "Large-Scale Long-Tailed Recognition in an Open
World" (OLTR), CVPR 2019: a class is *many-shot* with more than 100 training images, *medium-shot*
with 20 to 100, *few-shot* with fewer than 20. A group with no class reports ``None``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix

MANY_SHOT_MIN = 100  # a class with > 100 training images is many-shot
FEW_SHOT_MAX = 20  # a class with < 20 training images is few-shot


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class, ``cm[k, k] / sum_j cm[k, j]``; NaN for a class absent from ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


def shot_groups(train_counts: Sequence[int]) -> Dict[str, np.ndarray]:
    """Class indices of the many (> 100), medium (20..100) and few (< 20) shot groups."""
    counts = np.asarray(train_counts)
    return {
        "many": np.flatnonzero(counts > MANY_SHOT_MIN),
        "medium": np.flatnonzero((counts >= FEW_SHOT_MAX) & (counts <= MANY_SHOT_MIN)),
        "few": np.flatnonzero(counts < FEW_SHOT_MAX),
    }


def _mean_or_none(values: np.ndarray) -> Optional[float]:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def classification_report(
    y_true: np.ndarray, logits: np.ndarray, train_counts: Sequence[int]
) -> Dict[str, object]:
    """Top-1, balanced accuracy, per-class accuracy and shot-group accuracy from logits.

    Group accuracy is the mean of the per-class accuracies in the group (the test set of the
    long-tailed benchmarks is balanced, so this equals the sample-weighted accuracy there).
    """
    y_true = np.asarray(y_true)
    logits = np.asarray(logits)
    num_classes = len(train_counts)
    if logits.ndim != 2 or logits.shape[1] != num_classes or logits.shape[0] != y_true.shape[0]:
        raise ValueError(f"logits of shape {logits.shape} do not match {y_true.shape[0]} labels and {num_classes} classes")
    y_pred = logits.argmax(axis=1)
    per_class = per_class_accuracy(y_true, y_pred, num_classes)
    report: Dict[str, object] = {
        "top1": float((y_pred == y_true).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
    }
    for name, idx in shot_groups(train_counts).items():
        report[f"{name}_shot_top1"] = _mean_or_none(per_class[idx]) if idx.size else None
    return report
