"""Figures of a run's evaluation, one PNG each (matplotlib with the Agg backend, imported lazily).

Every function writes ``path`` atomically (:func:`pancls.io.atomic_save`) and returns it as a
:class:`~pathlib.Path`. The numbers come from :mod:`pancls.eval.clinical`:

* :func:`confusion_matrix_png`: counts or row-normalised confusion (rows true, columns predicted);
* :func:`recall_vs_size_png`: recall of each class against its size (log x), 95 % bars;
* :func:`roc_png`: one-vs-rest ROC curves with their AUC (Fawcett, "An introduction to ROC
  analysis", Pattern Recognition Letters 2006);
* :func:`reliability_png`: reliability diagram, accuracy against confidence in equal-width bins,
  before and optionally after temperature scaling (Guo et al., ICML 2017);
* :func:`embedding_png`: 2-D t-SNE of the penultimate features (van der Maaten & Hinton, JMLR 2008),
  perplexity capped at ``(N - 1) / 3`` for small N; :func:`embeddings_side_by_side_png`: one such panel per
  model, side by side;
* :func:`paired_seeds_png`: paired comparisons of two recipes over seeds, one panel per comparison, a line per
  seed from A to B, titled with the mean difference and its 95 % paired t interval (:mod:`pancls.eval.paired`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    from pancls.io import atomic_save

    path = Path(path)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    _pyplot().close(fig)
    return path


def confusion_matrix_png(confusion, classes: Sequence[str], path, normalised: bool = True) -> Path:
    """Heat map of a confusion matrix (rows true, columns predicted), each cell annotated.

    With ``normalised`` the rows are divided by their support (a row with no case stays 0) and the
    cell text is ``fraction`` over the count.
    """
    plt = _pyplot()
    cm = np.asarray(confusion, dtype=np.float64)
    support = cm.sum(axis=1, keepdims=True)
    shown = np.where(support > 0, cm / np.maximum(support, 1), 0.0) if normalised else cm
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * k, 0.8 + 0.7 * k), dpi=120)
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalised else max(1.0, shown.max()))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    threshold = (1.0 if normalised else max(1.0, shown.max())) / 2
    for i in range(k):
        for j in range(k):
            text = f"{shown[i, j]:.2f}\n({int(cm[i, j])})" if normalised else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > threshold else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalised else " (counts)"), fontsize=9)
    return _save(fig, path)


def _recall_and_ci(value, ci):
    """``(recall, (lo, hi) or None)`` from a float or a :func:`clinical_metrics` per-class entry."""
    if isinstance(value, Mapping):
        return value.get("sensitivity"), value.get("sensitivity_ci")
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], (tuple, list)):
        return value[0], value[1]
    return value, ci


def recall_vs_size_png(
    per_class_recall: Dict[str, object],
    class_counts: Dict[str, int],
    path,
    intervals: Optional[Dict[str, Sequence[float]]] = None,
    interval_name: str = "Wilson 95 % CI",
    size_name: str = "cases",
) -> Path:
    """Recall of each class against its number of cases (log x), with 95 % error bars if given.

    ``per_class_recall`` maps a class name to a recall (float or None), to ``(recall, (lo, hi))``, or
    to a ``clinical_metrics(...)["per_class"]`` entry (``sensitivity`` and its Wilson ``sensitivity_ci``);
    ``intervals`` may give the ``(lo, hi)`` separately (``interval_name`` says which interval they are, on the
    y axis; ``size_name`` what ``class_counts`` counts). Classes with no recall or no case are left out.
    """
    plt = _pyplot()
    intervals = intervals or {}
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    for name, value in per_class_recall.items():
        recall, ci = _recall_and_ci(value, intervals.get(name))
        count = class_counts.get(name, 0)
        if recall is None or not count:
            continue
        yerr = None
        if ci is not None and all(c is not None and np.isfinite(c) for c in ci):
            yerr = [[max(0.0, recall - ci[0])], [max(0.0, ci[1] - recall)]]
        ax.errorbar([count], [recall], yerr=yerr, fmt="o", color="tab:blue", capsize=3)
        ax.annotate(name, (count, recall), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(f"{size_name} of the class (log scale)")
    ax.set_ylabel(f"recall (sensitivity), {interval_name}")
    ax.set_title("recall against class size", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def roc_png(y_true, probs, classes: Sequence[str], path) -> Path:
    """One-vs-rest ROC curve of every class that has both positives and negatives, AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    y = np.asarray(y_true, dtype=np.int64)
    p = np.nan_to_num(np.asarray(probs, dtype=np.float64))
    fig, ax = plt.subplots(figsize=(5.0, 4.5), dpi=120)
    for k, name in enumerate(classes):
        positive = y == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, p[:, k])
        ax.plot(fpr, tpr, lw=1.2, label=f"{name} (AUC {roc_auc_score(positive, p[:, k]):.2f}, n={int(positive.sum())})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("one-vs-rest ROC", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _reliability(p: np.ndarray, y: np.ndarray, n_bins: int):
    """Per-bin mean confidence, accuracy and count of the top-label confidence."""
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
        acc = np.bincount(b, weights=correct, minlength=n_bins) / count
    return mean_conf, acc, count


def reliability_png(y_true, probs, path, n_bins: int = 15, probs_after=None) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin, ECE in the legend.

    ``probs_after`` (e.g. after temperature scaling) is drawn as a second series.
    """
    from pancls.eval.clinical import expected_calibration_error

    plt = _pyplot()
    y = np.asarray(y_true, dtype=np.int64)
    fig, ax = plt.subplots(figsize=(4.8, 4.5), dpi=120)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    series = [("before", probs, "tab:red")]
    if probs_after is not None:
        series.append(("after temperature scaling", probs_after, "tab:blue"))
    for label, pr, colour in series:
        p = np.nan_to_num(np.asarray(pr, dtype=np.float64))
        mean_conf, acc, count = _reliability(p, y, n_bins)
        keep = count > 0
        ece = expected_calibration_error(p, y, n_bins=n_bins)
        ax.plot(mean_conf[keep], acc[keep], "o-", color=colour, ms=3,
                label=f"{label} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability, {n_bins} equal-width bins", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def _tsne(features, n: int, seed: int):
    """``(embedding (n, 2), title)``: t-SNE with perplexity ``min(30, (n - 1) / 3)``, or the first two columns
    when fewer than 5 cases make t-SNE meaningless."""
    X = np.asarray(features, dtype=np.float64).reshape(n, -1)
    if n >= 5:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(X)
        return emb, f"t-SNE of the features (perplexity {perplexity:g})"
    emb = np.zeros((n, 2))
    emb[:, : min(2, X.shape[1])] = X[:, :2]
    return emb, "features (too few cases for t-SNE)"


def _scatter_classes(ax, plt, emb, y, classes: Sequence[str], title: str) -> None:
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for k, name in enumerate(classes):
        sel = y == k
        if sel.any():
            ax.scatter(emb[sel, 0], emb[sel, 1], s=10, color=cmap(k % cmap.N), label=f"{name} ({int(sel.sum())})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, markerscale=1.5, loc="best")


def embedding_png(features, y_true, classes: Sequence[str], path, seed: int = 0) -> Path:
    """2-D t-SNE of ``features`` coloured by true class; perplexity ``min(30, (N - 1) / 3)``.

    With fewer than 5 cases t-SNE is meaningless and the first two feature columns are drawn instead.
    """
    plt = _pyplot()
    y = np.asarray(y_true, dtype=np.int64)
    emb, title = _tsne(features, len(y), seed)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    _scatter_classes(ax, plt, emb, y, classes, title)
    return _save(fig, path)


def _panel_grid(plt, n: int, cols: int, width: float, height: float):
    """``(fig, axes)`` for ``n`` panels, ``cols`` to a row; ``axes`` holds the first ``n`` axes, the spare ones are
    switched off."""
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), dpi=120, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def embeddings_side_by_side_png(panels: Mapping[str, tuple], classes: Sequence[str], path, seed: int = 0) -> Path:
    """One t-SNE panel per entry of ``panels`` (``name -> (features, y_true)``), two to a row, each titled by its
    name: the tSP paper's Fig. 5 layout, for comparing heads on the same images."""
    plt = _pyplot()
    fig, axes = _panel_grid(plt, len(panels), 2, 6.5, 5.2)
    for ax, (name, (features, y_true)) in zip(axes, panels.items(), strict=True):
        y = np.asarray(y_true, dtype=np.int64)
        emb, title = _tsne(features, len(y), seed)
        _scatter_classes(ax, plt, emb, y, classes, f"{name}: {title}")
    return _save(fig, path)


def paired_seeds_png(panels: Sequence[Mapping], path, ylabel: str = "top-1 (%)") -> Path:
    """One panel per paired comparison; each ``panels[i]`` maps ``title``, ``a`` and ``b`` (the two recipes'
    labels), ``seeds``, ``a_values`` and ``b_values`` (one value per seed, same order). A grey line joins the two
    values of each seed (labelled by its seed), the bars mark the means, and the panel's title gives A - B: the
    mean difference with its 95 % paired t interval (:func:`pancls.eval.paired.paired_difference`), so a reader
    sees at once whether every seed moves the same way."""
    from pancls.eval.paired import paired_difference

    if not panels:
        raise ValueError("panels must hold at least one comparison")
    for panel in panels:  # before a figure exists
        lengths = [len(panel[key]) for key in ("a_values", "b_values", "seeds")]
        if len(set(lengths)) != 1:
            raise ValueError(f"{panel['title']}: a_values, b_values and seeds must be equally long; got "
                             f"{lengths[0]}, {lengths[1]} and {lengths[2]}")
    plt = _pyplot()
    fig, axes = _panel_grid(plt, len(panels), 3, 3.6, 3.6)
    for ax, panel in zip(axes, panels, strict=True):
        a, b, seeds = list(panel["a_values"]), list(panel["b_values"]), list(panel["seeds"])
        r = paired_difference(a, b)
        for seed, va, vb in zip(seeds, a, b, strict=True):
            ax.plot([0, 1], [va, vb], color="0.6", marker="o", zorder=1)
            ax.annotate(f"s{seed}", (1, vb), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7,
                        color="0.4")
        for x, values, colour in ((0, a, "tab:blue"), (1, b, "tab:orange")):
            ax.hlines(float(np.mean(values)), x - 0.12, x + 0.12, colors=colour, linewidth=3, zorder=2)
        ax.set_xticks([0, 1], [panel["a"], panel["b"]], fontsize=8)
        ax.set_xlim(-0.35, 1.35)
        interval = "" if r["lo"] is None else f" [{r['lo']:+.1f}, {r['hi']:+.1f}]"
        ax.set_title(f"{panel['title']}\nA - B = {r['mean']:+.1f}{interval}, n = {r['n']}", fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def logit_profiles_png(curves: Mapping[str, tuple], path, title: str = "") -> Path:
    """How fast each head's logit falls with the angle to its class centre: ``curves`` maps a label to
    ``(angles_deg, logits)``; each curve is drawn as ``logit(angle) - logit(0)``, so heads of different widths
    share the axis (a head's ``logit_of_cos``, :mod:`pancls.heads`). A steep start spends the logit range on
    samples already near their centre; a flat far field leaves hard samples little gradient."""
    if not curves:
        raise ValueError("curves must hold at least one head")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for label, (angles, logits) in curves.items():
        logits = np.asarray(logits, dtype=float)
        ax.plot(np.asarray(angles, dtype=float), logits - logits[0], label=label)
    ax.set_xlabel("angle to the class centre (degrees)")
    ax.set_ylabel("logit - logit at the centre")
    ax.set_xlim(0, 180)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
