"""Clinical evaluation of a subtype classifier: intervals, calibration, collapse and baselines.

All functions take integer labels ``y`` in ``0..K-1`` and an ``(N, K)`` matrix of probabilities ``p``
(rows of a softmax). The predicted class is ``argmax_k p_ik`` (ties go to the lower index).

Point metrics (scikit-learn underneath)
---------------------------------------
* ``top1`` accuracy; ``top2`` / ``top5``: the true class is among the k most probable ones, with
  ``k`` capped at ``K`` (so ``top5`` of a 3-class problem is 1.0).
* ``balanced_accuracy``: mean recall over the classes present in ``y`` (Brodersen et al. 2010).
* ``macro_f1``: mean over the classes present in ``y`` or in the predictions of
  ``F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k)``.
* ``mcc``: multiclass Matthews correlation coefficient (Gorodkin 2004). With the confusion matrix
  ``C``, ``t_k`` the true and ``p_k`` the predicted counts of class k, ``c = trace C``, ``s = N``::

      MCC = (c s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t))        (0 when a factor is 0)

* ``brier``: multiclass Brier score (Brier 1950), ``1/N sum_i sum_k (p_ik - [y_i = k])^2``, in [0, 2].
* ``ece``: top-label expected calibration error with M equal-width bins
  ``B_m = ((m-1)/M, m/M]`` of the confidence ``c_i = max_k p_ik`` (Guo et al., "On Calibration of
  Modern Neural Networks", ICML 2017)::

      ECE = sum_m |B_m| / N * | acc(B_m) - conf(B_m) |

* per class k, one-vs-rest: sensitivity ``TP / (TP + FN)`` and specificity ``TN / (TN + FP)``, each
  with a 95 % Wilson score interval, and the one-vs-rest ROC AUC of ``p_ik``. Wilson treats every row as
  an independent trial: right when each patient has one row; with several studies per patient it is too
  narrow, and the patient-level bootstrap below (``per_class=True``) is the interval to report.
* collapse: the model predicts one class for at least 90 % of the cases (``COLLAPSE_SHARE``).

Wilson score interval (Wilson 1927; recommended by Brown, Cai & DasGupta, "Interval Estimation for a
Binomial Proportion", Statistical Science 2001) for k successes in n trials, ``p = k / n``::

    centre = (p + z^2 / (2n)) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))

Temperature scaling (Guo et al. 2017) divides the logits by one scalar ``T > 0`` fitted on held-out
data by minimising the negative log-likelihood of ``softmax(z / T)``; it changes confidence, never
the predicted class.

Bootstrap intervals are patient-level (Efron & Tibshirani, "An Introduction to the Bootstrap",
1993, percentile method): the unique patients are resampled with replacement and every row of a
drawn patient enters the resample, so the several scans of one patient move together. Per class they
cover sensitivity ``TP_k / t_k`` and specificity ``TN_k / (N - t_k)`` of each resampled confusion matrix;
a resample without a case of class k leaves its sensitivity undefined, and such resamples are dropped
(``n_boot`` counts the defined ones).

Baselines: *majority* predicts the training set's most frequent class for every case (the
"all-PDAC" classifier); *intensity* is a logistic regression on a few intensity statistics of the
region of interest (:func:`roi_intensity_features`), i.e. what a model gets without any shape or
texture.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    roc_auc_score,
    top_k_accuracy_score,
)

COLLAPSE_SHARE = 0.9  # one class predicted for >= 90 % of the cases means the model has collapsed
Z_95 = 1.959964  # standard normal quantile for a two-sided 95 % interval

BOOTSTRAP_METRICS = ("balanced_accuracy", "macro_f1", "top1", "top2", "top5", "mcc", "brier", "ece")

# HU bands of roi_intensity_features: fat/air, water/fluid, soft tissue, enhancing tissue, dense.
HU_BANDS = (-np.inf, -100.0, 20.0, 60.0, 150.0, np.inf)
# the same number of bands for windowed images in [0, 1]
UNIT_BANDS = (-np.inf, 0.2, 0.4, 0.6, 0.8, np.inf)
INTENSITY_FEATURE_NAMES = (
    "mean", "sd", "p5", "p25", "p50", "p75", "p95",
    "band0", "band1", "band2", "band3", "band4", "n_voxels",
)


# ---------------------------------------------------------------------------------------------------
# basic pieces


def wilson_interval(k: int, n: int, z: float = Z_95) -> Tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (formula in the module docstring).

    Parameters
    ----------
    k, n : int
        Successes and trials, ``0 <= k <= n``.
    z : float
        Standard normal quantile; the default gives a two-sided 95 % interval.

    Returns
    -------
    (lo, hi) : tuple of float
        ``(nan, nan)`` when ``n == 0``.
    """
    if n == 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(z / T)``, computed after subtracting each row's maximum (no overflow)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fit_temperature(logits, y_true) -> float:
    """The temperature ``T > 0`` minimising the mean NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    The search is over ``log T`` in ``[log 0.05, log 20]`` (bounded Brent method; the NLL is convex
    in ``1/T``, hence unimodal in ``log T``), so it is deterministic. Returns 1.0 for empty input.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if z.size == 0 or y.size == 0:
        return 1.0
    rows = np.arange(y.shape[0])

    def nll(log_t: float) -> float:
        return float(-_log_softmax(z / np.exp(log_t))[rows, y].mean())

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def _confidence_bins(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Index of the equal-width bin ``((m-1)/M, m/M]`` of each confidence (0 goes to the first bin)."""
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def expected_calibration_error(probs, y_true, n_bins: int = 15) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins (Guo et al. 2017).

    ``sum_m |B_m| / N * |acc(B_m) - conf(B_m)|``; 0.0 for empty input.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if y.size == 0:
        return 0.0
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    b = _confidence_bins(conf, n_bins)
    gap = np.bincount(b, weights=correct, minlength=n_bins) - np.bincount(b, weights=conf, minlength=n_bins)
    return float(np.abs(gap).sum() / y.size)  # |B| * |acc - conf| = |sum correct - sum conf|


def brier_score(probs, y_true) -> float:
    """Multiclass Brier score ``1/N sum_i sum_k (p_ik - [y_i = k])^2``."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    onehot = np.eye(p.shape[1])[y]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def _check(y_true, probs, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Labels as int64 and probabilities as float64 with missing (NaN) entries read as 0.

    A NaN entry stands for a class the model had no output for; a row with no finite probability at all,
    or an infinite one, is a broken model output (a diverged network), refused: read as zeros, its argmax
    would score it as a prediction of class 0."""
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape != (y.shape[0], num_classes):
        raise ValueError(f"probabilities of shape {p.shape} do not match {y.shape[0]} labels and {num_classes} classes")
    broken = np.isinf(p).any(axis=1) | np.isnan(p).all(axis=1) if p.size else np.zeros(0, dtype=bool)
    if broken.any():
        raise ValueError(f"{int(broken.sum())} of {len(p)} rows hold no finite probabilities (first: row "
                         f"{int(np.flatnonzero(broken)[0])}); a model output that is not a number cannot be scored")
    p = np.nan_to_num(p, nan=0.0)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return y, p


def _none_if_nan(x: float) -> Optional[float]:
    return None if x is None or not np.isfinite(x) else float(x)


# ---------------------------------------------------------------------------------------------------
# the full report of one set of predictions


def clinical_metrics(y_true, probs, classes: List[str]) -> Dict[str, object]:
    """All the point metrics of the module docstring, as plain JSON-able Python types.

    Parameters
    ----------
    y_true : array of int, shape (N,)
        True class indices into ``classes``.
    probs : array of float, shape (N, K)
        Predicted probabilities, ``K == len(classes)``. NaN entries (a class the model had no output
        for) count as probability 0. A class absent from ``y_true`` is fine: its sensitivity, CI and
        AUC are ``None`` and it does not enter the balanced accuracy.
    classes : list of str
        Class names, in column order.

    Returns
    -------
    dict
        ``n, top1, top2, top5, balanced_accuracy, macro_f1, mcc, brier, ece, confusion,
        confusion_row_normalised, per_class, predicted_share, collapsed, collapsed_to``.
    """
    num_classes = len(classes)
    y, p = _check(y_true, probs, num_classes)
    n = int(y.size)
    if n == 0:
        raise ValueError("no predictions to evaluate")
    y_pred = p.argmax(axis=1)
    labels = np.arange(num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # y_pred with classes absent from y_true, single-class folds
        cm = confusion_matrix(y, y_pred, labels=labels)
        out: Dict[str, object] = {"n": n, "top1": float(accuracy_score(y, y_pred))}
        for k in (2, 5):
            if k >= num_classes:
                out[f"top{k}"] = 1.0
            elif num_classes == 2:  # k == 1 only, handled above
                out[f"top{k}"] = out["top1"]
            else:
                out[f"top{k}"] = float(top_k_accuracy_score(y, p, k=k, labels=labels))
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, y_pred))
        out["macro_f1"] = float(f1_score(y, y_pred, average="macro", zero_division=0))
        out["mcc"] = float(matthews_corrcoef(y, y_pred))
    out["brier"] = brier_score(p, y)
    out["ece"] = expected_calibration_error(p, y)
    out["confusion"] = cm.astype(int).tolist()
    support = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(support > 0, cm / np.maximum(support, 1), 0.0)
    out["confusion_row_normalised"] = normalised.astype(float).tolist()

    per_class: Dict[str, Dict[str, object]] = {}
    for k, name in enumerate(classes):
        tp = int(cm[k, k])
        pos = int(cm[k].sum())
        fp = int(cm[:, k].sum()) - tp
        neg = n - pos
        tn = neg - fp
        is_k = y == k
        auc = None
        if 0 < pos < n:
            auc = float(roc_auc_score(is_k, p[:, k]))
        per_class[name] = {
            "n": pos,
            "sensitivity": tp / pos if pos else None,
            "sensitivity_ci": list(wilson_interval(tp, pos)) if pos else None,
            "specificity": tn / neg if neg else None,
            "specificity_ci": list(wilson_interval(tn, neg)) if neg else None,
            "auc_ovr": auc,
        }
    out["per_class"] = per_class
    share = np.bincount(y_pred, minlength=num_classes) / n
    out["predicted_share"] = {name: float(share[k]) for k, name in enumerate(classes)}
    top = int(share.argmax())
    out["collapsed"] = bool(share[top] >= COLLAPSE_SHARE)
    out["collapsed_to"] = classes[top] if out["collapsed"] else None
    return out


# ---------------------------------------------------------------------------------------------------
# patient-level bootstrap


def _metrics_from_confusion(cm: np.ndarray) -> Dict[str, np.ndarray]:
    """top1, balanced accuracy, macro F1 and MCC of a stack of confusion matrices ``(..., K, K)``.

    Same definitions as scikit-learn (module docstring), vectorised over the leading axes.
    """
    cm = cm.astype(np.float64)
    n = cm.sum(axis=(-2, -1))
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    t = cm.sum(axis=-1)  # true counts per class
    pr = cm.sum(axis=-2)  # predicted counts per class
    c = tp.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        top1 = c / n
        present = t > 0
        recall = np.where(present, tp / np.where(present, t, 1), 0.0)
        bacc = recall.sum(axis=-1) / present.sum(axis=-1)
        used = (t + pr) > 0
        f1 = np.where(used, 2 * tp / np.where(used, t + pr, 1), 0.0)
        macro_f1 = f1.sum(axis=-1) / used.sum(axis=-1)
        cov_ytyp = c * n - (t * pr).sum(axis=-1)
        cov_ypyp = n * n - (pr * pr).sum(axis=-1)
        cov_ytyt = n * n - (t * t).sum(axis=-1)
        denom = cov_ypyp * cov_ytyt
        mcc = np.where(denom > 0, cov_ytyp / np.sqrt(np.where(denom > 0, denom, 1)), 0.0)
    return {"top1": top1, "balanced_accuracy": bacc, "macro_f1": macro_f1, "mcc": mcc}


def _topk_hits(y: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    """Per row, whether ``y`` is among the k highest scores (scikit-learn's tie rule)."""
    if k >= p.shape[1]:
        return np.ones(y.shape[0], dtype=bool)
    if k == 1:
        return p.argmax(axis=1) == y
    order = np.argsort(p, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return (order == y[:, None]).any(axis=1)


def bootstrap_intervals(
    y_true,
    probs,
    groups,
    classes: Sequence[str],
    metrics: Sequence[str] = ("balanced_accuracy", "macro_f1", "top1", "mcc"),
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    per_class: bool = False,
) -> Dict[str, Dict[str, object]]:
    """Patient-level percentile bootstrap intervals of pooled metrics.

    Every metric in ``BOOTSTRAP_METRICS`` is a function of sums over rows (a confusion matrix, hit
    counts, per-bin sums), so each patient's sums are computed once and a resample is a weighted sum
    of them: ``W @ S`` with ``W[b, g]`` the number of times patient g was drawn in resample b.

    Parameters
    ----------
    y_true : array of int, shape (N,)
    probs : array of float, shape (N, K)
    groups : array, shape (N,), or None
        Patient identifier of each row; ``None`` treats every row as its own patient.
    classes : sequence of str
        Class names (only their number is used).
    metrics : sequence of str
        Names from ``BOOTSTRAP_METRICS``.
    n_boot : int
        Number of resamples.
    seed : int
        Seed of the ``numpy.random.Generator``; equal seeds give equal intervals.
    alpha : float
        The interval is the ``[alpha/2, 1 - alpha/2]`` percentile range of the resampled values.
    per_class : bool
        Also the sensitivity and specificity of every class, from the same resamples (so a model's and a
        baseline's intervals computed with the same ``seed`` are paired).

    Returns
    -------
    dict
        ``{metric: {"estimate", "lo", "hi", "n_boot"}}``; ``estimate`` is the metric on the full data,
        ``n_boot`` the number of resamples where the metric was defined. With ``per_class``, also
        ``"per_class": {class: {"sensitivity": {...}, "specificity": {...}}}`` in the same form.
    """
    unknown = [m for m in metrics if m not in BOOTSTRAP_METRICS]
    if unknown:
        raise ValueError(f"unknown bootstrap metrics {unknown}; choose from {BOOTSTRAP_METRICS}")
    num_classes = len(classes)
    y, p = _check(y_true, probs, num_classes)
    if y.size == 0:
        raise ValueError("no predictions to bootstrap")
    g = np.arange(y.size) if groups is None else np.asarray(groups)
    if g.shape[0] != y.shape[0]:
        raise ValueError(f"{g.shape[0]} groups for {y.shape[0]} rows")
    _, gi = np.unique(g, return_inverse=True)
    gi = gi.reshape(-1)
    n_groups = int(gi.max()) + 1

    # per-patient sums: confusion counts, top-k hits, Brier, ECE bins (count, correct, confidence)
    y_pred = p.argmax(axis=1)
    kk = num_classes * num_classes
    cells = gi * kk + y * num_classes + y_pred
    sums = [np.bincount(cells, minlength=n_groups * kk).reshape(n_groups, kk).astype(np.float64)]
    names = ["cm"]
    for k in (2, 5):
        sums.append(np.bincount(gi, weights=_topk_hits(y, p, k), minlength=n_groups)[:, None])
        names.append(f"top{k}")
    onehot = np.eye(num_classes)[y]
    sums.append(np.bincount(gi, weights=((p - onehot) ** 2).sum(axis=1), minlength=n_groups)[:, None])
    names.append("brier")
    n_bins = 15
    conf = p.max(axis=1)
    correct = (y_pred == y).astype(np.float64)
    bins = gi * n_bins + _confidence_bins(conf, n_bins)
    gap = np.bincount(bins, weights=correct - conf, minlength=n_groups * n_bins).reshape(n_groups, n_bins)
    sums.append(gap)
    names.append("ece")
    widths = [s.shape[1] for s in sums]
    S = np.concatenate(sums, axis=1)  # (G, F)

    def evaluate(W: np.ndarray) -> Dict[str, np.ndarray]:
        T = W @ S  # (B, F)
        parts = dict(zip(names, np.split(T, np.cumsum(widths)[:-1], axis=1), strict=True))
        cm = parts["cm"].reshape(-1, num_classes, num_classes)
        vals = _metrics_from_confusion(cm)
        n = cm.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            tp, t, pr = np.diagonal(cm, axis1=1, axis2=2), cm.sum(axis=2), cm.sum(axis=1)
            vals["sensitivity"] = tp / t  # (B, K); NaN where a resample holds no case of the class
            vals["specificity"] = (n[:, None] - t - pr + tp) / (n[:, None] - t)
            vals["top2"] = parts["top2"][:, 0] / n
            vals["top5"] = parts["top5"][:, 0] / n
            vals["brier"] = parts["brier"][:, 0] / n
            vals["ece"] = np.abs(parts["ece"]).sum(axis=1) / n
        return vals

    estimate = evaluate(np.ones((1, n_groups)))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    offsets = (np.arange(n_boot)[:, None] * n_groups + draws).ravel()
    W = np.bincount(offsets, minlength=n_boot * n_groups).reshape(n_boot, n_groups).astype(np.float64)
    boot = evaluate(W)

    def interval(values: np.ndarray, point: float) -> Dict[str, object]:
        v = values[np.isfinite(values)]
        lo, hi = (np.quantile(v, [alpha / 2, 1 - alpha / 2]) if v.size else (np.nan, np.nan))
        return {"estimate": _none_if_nan(point), "lo": _none_if_nan(lo), "hi": _none_if_nan(hi),
                "n_boot": int(v.size)}

    out: Dict[str, Dict[str, object]] = {m: interval(boot[m], estimate[m][0]) for m in metrics}
    if per_class:
        out["per_class"] = {name: {m: interval(boot[m][:, k], estimate[m][0, k])
                                   for m in ("sensitivity", "specificity")} for k, name in enumerate(classes)}
    return out


# ---------------------------------------------------------------------------------------------------
# across folds


def _lookup(d: dict, key: str):
    """``d[key]``, or a dotted path ``"per_class.CP.sensitivity"``; ``None`` when missing."""
    if key in d:
        return d[key]
    cur = d
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def mean_sd_across_folds(per_fold: List[dict], keys: Sequence[str]) -> Dict[str, Dict[str, Optional[float]]]:
    """Mean and sample SD (``ddof=1``) of each metric over the folds.

    ``per_fold`` holds metric dicts, or ``{"fold": k, "metrics": {...}}`` entries; keys may be dotted
    paths (``"per_class.CP.sensitivity"``). Folds where a value is missing or ``None`` are skipped;
    ``sd`` is ``None`` with fewer than two values, ``mean`` with none.
    """
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for key in keys:
        values = []
        for entry in per_fold:
            d = entry["metrics"] if isinstance(entry.get("metrics"), dict) and key not in entry else entry
            v = _lookup(d, key)
            if v is not None and np.isfinite(v):
                values.append(float(v))
        arr = np.asarray(values)
        out[key] = {
            "mean": float(arr.mean()) if arr.size else None,
            "sd": float(arr.std(ddof=1)) if arr.size > 1 else None,
        }
    return out


# ---------------------------------------------------------------------------------------------------
# baselines


def majority_baseline(y_train, y_test, K: int) -> np.ndarray:
    """One-hot probabilities of the training set's most frequent class for every test case.

    Ties go to the lower class index. With the cohort's class balance this is the "all-PDAC" model.
    """
    counts = np.bincount(np.asarray(y_train, dtype=np.int64).reshape(-1), minlength=K)
    n_test = int(np.asarray(y_test).reshape(-1).shape[0])
    probs = np.zeros((n_test, K))
    probs[:, int(counts.argmax())] = 1.0
    return probs


def roi_intensity_features(image: np.ndarray, mask: Optional[np.ndarray], units: str = "auto") -> np.ndarray:
    """A fixed vector of intensity statistics of the voxels inside ``mask`` (``INTENSITY_FEATURE_NAMES``).

    For the voxel values ``v`` (the whole image when ``mask`` is None):

    * ``mean``, ``sd`` (ddof=0), percentiles ``p5, p25, p50, p75, p95``;
    * ``band0..band4``: the fraction of voxels in five intensity bands. In Hounsfield units
      (``HU_BANDS``): below -100 (fat, air), -100..20 (fluid, cyst, necrosis), 20..60 (unenhanced
      soft tissue), 60..150 (enhancing parenchyma), above 150 (vessels with contrast, calcification).
      For windowed images in [0, 1] (``UNIT_BANDS``) five equal bands 0.2 wide;
    * ``n_voxels``: the number of voxels in the mask (the size of the region).

    Parameters
    ----------
    image : ndarray
        The volume; with a mask of one dimension fewer, the first axis is channels (one window each)
        and the vector is the concatenation of the per-channel statistics (``n_voxels`` each time).
    mask : ndarray of bool or None
        Region of interest, same spatial shape as ``image``. An empty mask gives zeros.
    units : {"auto", "hu", "unit"}
        Which bands to use; ``"auto"`` picks the unit bands when every value lies in [0, 1].
    """
    img = np.asarray(image, dtype=np.float64)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        if img.ndim == m.ndim + 1:
            return np.concatenate([roi_intensity_features(c, m, units) for c in img])
        if img.shape != m.shape:
            raise ValueError(f"image of shape {img.shape} and mask of shape {m.shape} do not match")
        v = img[m]
    else:
        v = img.reshape(-1)
    if units == "auto":
        units = "unit" if img.size and img.min() >= 0.0 and img.max() <= 1.0 else "hu"
    if units not in ("hu", "unit"):
        raise ValueError(f"units must be 'auto', 'hu' or 'unit', got {units!r}")
    if v.size == 0:
        return np.zeros(len(INTENSITY_FEATURE_NAMES))
    edges = np.asarray(HU_BANDS if units == "hu" else UNIT_BANDS)
    band = np.histogram(v, bins=edges)[0] / v.size
    pct = np.percentile(v, [5, 25, 50, 75, 95])
    return np.concatenate([[v.mean(), v.std()], pct, band, [float(v.size)]])


def intensity_baseline(features_train, y_train, features_test, K: int, seed: int = 0) -> np.ndarray:
    """Probabilities of ``StandardScaler + LogisticRegression(class_weight="balanced")`` on intensity features.

    Returns ``(N_test, K)`` probabilities with a column for every class: a class absent from the
    training labels gets probability 0. With a single training class every test case gets it.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X_train = np.asarray(features_train, dtype=np.float64)
    X_test = np.asarray(features_test, dtype=np.float64)
    y = np.asarray(y_train, dtype=np.int64).reshape(-1)
    present = np.unique(y)
    probs = np.zeros((X_test.shape[0], K))
    if present.size == 1:
        probs[:, int(present[0])] = 1.0
        return probs
    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed),
    )
    model.fit(X_train, y)
    probs[:, model.classes_.astype(np.int64)] = model.predict_proba(X_test)
    return probs
