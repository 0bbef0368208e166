import numpy as np

from pancls.eval.clinical import (
    bootstrap_intervals,
    clinical_metrics,
    fit_temperature,
    majority_baseline,
    mean_sd_across_folds,
    softmax,
)
from pancls.report.figures import (
    confusion_matrix_png,
    embedding_png,
    recall_vs_size_png,
    reliability_png,
    roc_png,
)
from pancls.report.html import write_report

CLASSES = ["PDAC", "PNET", "IPMN", "CP"]


def _fake_run(seed=0, n=80):
    rng = np.random.default_rng(seed)
    y = rng.choice(4, size=n, p=[0.6, 0.2, 0.15, 0.05])
    logits = rng.normal(size=(n, 4)) * 2
    logits[np.arange(n), y] += 1.5
    probs = softmax(logits)
    groups = np.arange(n) // 2
    fold = np.arange(n) % 3
    t = fit_temperature(logits, y)
    calibrated = softmax(logits, t)
    majority = majority_baseline(y, y, 4)
    intensity = softmax(rng.normal(size=(n, 4)))
    per_fold = [{"fold": k, "metrics": clinical_metrics(y[fold == k], probs[fold == k], CLASSES)} for k in range(3)]
    summary = {
        "classes": CLASSES,
        "class_counts": {c: int((y == k).sum()) for k, c in enumerate(CLASSES)},
        "folds": 3,
        "model": {"backbone": "resnet10", "temperature": t},
        "pooled": clinical_metrics(y, probs, CLASSES),
        "pooled_calibrated": clinical_metrics(y, calibrated, CLASSES),
        "intervals": bootstrap_intervals(y, probs, groups, CLASSES, n_boot=200),
        "per_fold": per_fold,
        "across_folds": mean_sd_across_folds(per_fold, ["top1", "balanced_accuracy", "macro_f1", "mcc"]),
        "baselines": {
            "majority": {"pooled": clinical_metrics(y, majority, CLASSES),
                         "intervals": bootstrap_intervals(y, majority, groups, CLASSES, n_boot=200)},
            "intensity": {"pooled": clinical_metrics(y, intensity, CLASSES),
                          "intervals": bootstrap_intervals(y, intensity, groups, CLASSES, n_boot=200)},
        },
        "selection": "last epoch",
        "roi": "pancreas bounding box + 10 mm",
        "machine": "test",
    }
    return summary, y, probs, calibrated, rng.normal(size=(n, 16))


def test_figures_and_report_are_written(tmp_path):
    summary, y, probs, calibrated, feats = _fake_run()
    pooled = summary["pooled"]
    fig_dir = tmp_path / "figures"
    figures = {
        "confusion": confusion_matrix_png(pooled["confusion"], CLASSES, fig_dir / "confusion.png"),
        "confusion counts": confusion_matrix_png(pooled["confusion"], CLASSES, fig_dir / "cm_counts.png",
                                                 normalised=False),
        "recall vs size": recall_vs_size_png(pooled["per_class"], summary["class_counts"], fig_dir / "recall.png"),
        "roc": roc_png(y, probs, CLASSES, fig_dir / "roc.png"),
        "reliability": reliability_png(y, probs, fig_dir / "reliability.png", probs_after=calibrated),
        "embedding": embedding_png(feats, y, CLASSES, fig_dir / "tsne.png"),
    }
    for path in figures.values():
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert embedding_png(feats[:3], y[:3], CLASSES, fig_dir / "tiny.png").is_file()  # too few for t-SNE

    md_path, html_path = write_report(tmp_path, summary, figures)
    assert md_path == tmp_path / "report.md" and html_path == tmp_path / "report.html"
    md, page = md_path.read_text(), html_path.read_text()
    assert page.count("data:image/png;base64,") == len(figures)
    ba = summary["intervals"]["balanced_accuracy"]
    headline = f"{ba['estimate']:.3f} ({ba['lo']:.3f}–{ba['hi']:.3f})"
    assert headline in md and headline in page
    assert f"{pooled['top1']:.3f}" in page
    for text in ("All-PDAC (majority) baseline", "Intensity baseline", "temperature-scaled"):
        assert text in md and text in page
    maj = summary["baselines"]["majority"]["intervals"]["balanced_accuracy"]
    majority_row = next(line for line in md.splitlines() if line.startswith("| All-PDAC (majority) baseline"))
    assert f"{maj['estimate']:.3f}" in majority_row
    assert "COLLAPSED" in md  # the majority baseline predicts one class only
    sens = pooled["per_class"]["PDAC"]
    assert f"{sens['sensitivity']:.3f} ({sens['sensitivity_ci'][0]:.3f}–{sens['sensitivity_ci'][1]:.3f})" in md
    mean_sd = summary["across_folds"]["top1"]
    assert f"{mean_sd['mean']:.3f} ± {mean_sd['sd']:.3f}" in md
    assert "](figures/confusion.png)" in md
    assert not list(tmp_path.glob(".report*"))  # no temporary files left by the atomic writes


def test_report_tolerates_a_minimal_summary(tmp_path):
    y = np.array([0, 1, 1, 0])
    summary = {"classes": ["a", "b"], "pooled": clinical_metrics(y, np.eye(2)[[0, 1, 0, 0]], ["a", "b"])}
    md_path, html_path = write_report(tmp_path / "run", summary, {"missing": tmp_path / "nope.png"})
    md = md_path.read_text()
    assert "Headline" in md and "0.750" in md and "baseline" not in md
    assert "data:image/png" not in html_path.read_text()
