"""The report of a cross-validated run: ``report.md`` and a self-contained ``report.html``.

Both files carry the same content, built once as a list of blocks (headings, paragraphs, tables,
figures) and rendered twice; the HTML embeds every figure as a base64 PNG (``data:image/png;base64,``)
so it can be mailed as one file. Both are written atomically (:func:`pancls.io.atomic_write_text`).

Sections: run description; headline pooled metrics with their 95 % patient-level bootstrap intervals,
next to the all-PDAC (majority) and intensity baselines; the pooled confusion matrix; per-class
sensitivity and specificity with patient-level bootstrap 95 % intervals (Wilson intervals for a summary
without them), the baselines' sensitivity beside, one-vs-rest AUC and predicted share; per-fold metrics of
the held-out test folds with mean ± SD across folds; collapse flags; figures.

The ``summary`` consumed (every key optional except ``classes`` and ``pooled``)::

    {
      "classes": [str, ...],                      # class names, column order of the probabilities
      "class_counts": {name: int},                # patients per class in the cohort
      "folds": int,
      "model": {...},                             # free key/value description of the model
      "pooled": <clinical_metrics dict>,          # out-of-fold predictions of all folds together
      "pooled_calibrated": <clinical_metrics dict> or None,   # after temperature scaling
      "intervals": <bootstrap_intervals dict>,    # of "pooled"; with "per_class" (per_class=True)
      "intervals_calibrated": <bootstrap_intervals dict>,      # optional, of "pooled_calibrated"
      "per_fold": [{"fold": int, "metrics": <clinical_metrics dict>}, ...],
      "across_folds": <mean_sd_across_folds dict>,  # computed from per_fold when missing
      "baselines": {
        "majority":  {"pooled": <clinical_metrics dict>, "intervals": <bootstrap_intervals dict>},
        "intensity": {"pooled": <clinical_metrics dict>, "intervals": <bootstrap_intervals dict>},
      },
      "selection": str,                           # how the model / epoch was selected
      "roi": str,                                 # region of interest the model sees
      "machine": str,                             # where it ran
    }

``<clinical_metrics dict>`` and friends are the outputs of :mod:`pancls.eval.clinical`.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HEADLINE_METRICS = (
    ("top1", "top-1"),
    ("top2", "top-2"),
    ("balanced_accuracy", "balanced acc."),
    ("macro_f1", "macro F1"),
    ("mcc", "MCC"),
    ("brier", "Brier"),
    ("ece", "ECE"),
)
FOLD_METRICS = ("top1", "balanced_accuracy", "macro_f1", "mcc", "brier", "ece")
BASELINE_LABELS = {  # the majority baseline is named after its class: "All-PDAC (majority) baseline"
    "majority": "Majority baseline",
    "intensity": "Intensity baseline (logistic regression)",
}
NA = "n/a"


# ---------------------------------------------------------------------------------------------------
# formatting


def _num(x, digits: int = 3) -> str:
    if x is None:
        return NA
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return NA if x != x else f"{x:.{digits}f}"


def _with_interval(x, interval: Optional[dict]) -> str:
    """``0.612 (0.550-0.670)`` with a bootstrap interval, the bare number without."""
    text = _num(x)
    if interval and interval.get("lo") is not None and interval.get("hi") is not None:
        text += f" ({_num(interval['lo'])}–{_num(interval['hi'])})"
    return text


def _with_ci(x, ci) -> str:
    text = _num(x)
    if x is not None and ci is not None and len(ci) == 2 and None not in ci:
        text += f" ({_num(ci[0])}–{_num(ci[1])})"
    return text


def _mean_sd(entry: Optional[dict]) -> str:
    if not entry or entry.get("mean") is None:
        return NA
    return _num(entry["mean"]) + ("" if entry.get("sd") is None else f" ± {_num(entry['sd'])}")


# ---------------------------------------------------------------------------------------------------
# content as blocks: ("h", level, text) | ("p", text) | ("table", headers, rows) | ("figure", title, path)


def _baseline_label(key: str, base: dict) -> str:
    """``All-PDAC (majority) baseline`` named after the class the majority baseline predicts."""
    if key == "majority":
        to = (base.get("pooled") or {}).get("collapsed_to")
        return f"All-{to} (majority) baseline" if to else "Majority baseline"
    return BASELINE_LABELS.get(key, f"{key} baseline")


def _headline(summary: dict) -> List[tuple]:
    headers = ["predictions", "n"] + [label for _, label in HEADLINE_METRICS]
    rows = []

    def row(label: str, metrics: Optional[dict], intervals: Optional[dict]):
        if not metrics:
            return
        intervals = intervals or {}
        rows.append([label, str(metrics.get("n", NA))]
                    + [_with_interval(metrics.get(k), intervals.get(k)) for k, _ in HEADLINE_METRICS])

    row("Model", summary.get("pooled"), summary.get("intervals"))
    row("Model, temperature-scaled", summary.get("pooled_calibrated"), summary.get("intervals_calibrated"))
    for key, base in (summary.get("baselines") or {}).items():
        base = base or {}
        row(_baseline_label(key, base), base.get("pooled"), base.get("intervals"))
    return [
        ("h", 2, "Headline: pooled out-of-fold metrics"),
        ("p", "Point estimates on all out-of-fold predictions pooled; in brackets the 95 % patient-level "
              "percentile bootstrap interval where one was computed. Brier and ECE: lower is better."),
        ("table", headers, rows),
    ]


def _confusion(summary: dict) -> List[tuple]:
    pooled = summary.get("pooled") or {}
    cm = pooled.get("confusion")
    if not cm:
        return []
    classes = summary["classes"]
    rows = [[f"true {name}"] + [str(v) for v in cm[i]] for i, name in enumerate(classes)]
    return [("h", 2, "Pooled confusion matrix (counts)"),
            ("p", "Rows are the true class, columns the predicted class."),
            ("table", [""] + [f"pred. {c}" for c in classes], rows)]


def _per_class(summary: dict) -> List[tuple]:
    # the model's output as predict gives it (after the folds' temperatures): the same argmax as the raw
    # output, but the pooled one-vs-rest AUC ranks rows of folds with different temperatures
    pooled = summary.get("pooled_calibrated") or summary.get("pooled") or {}
    per_class = pooled.get("per_class") or {}
    if not per_class:
        return []
    counts = summary.get("class_counts") or {}
    share = pooled.get("predicted_share") or {}
    boot = (summary.get("intervals") or {}).get("per_class")
    baselines = {key: base for key, base in (summary.get("baselines") or {}).items() if base}
    headers = ["class", "patients in cohort", "studies evaluated", "sensitivity (95 % CI)",
               "specificity (95 % CI)", "AUC one-vs-rest", "share of predictions",
               *[f"sensitivity, {_baseline_label(key, base)}" for key, base in baselines.items()]]
    rows = []
    for name in summary["classes"]:
        c = per_class.get(name) or {}
        if boot:
            sens, spec = (_with_interval(b.get("estimate"), b) for b in (boot[name]["sensitivity"],
                                                                          boot[name]["specificity"]))
        else:
            sens, spec = (_with_ci(c.get(m), c.get(f"{m}_ci")) for m in ("sensitivity", "specificity"))
        base_cells = []
        for base in baselines.values():
            b = ((base.get("intervals") or {}).get("per_class") or {}).get(name, {}).get("sensitivity")
            value = (((base.get("pooled") or {}).get("per_class") or {}).get(name) or {}).get("sensitivity")
            base_cells.append(_with_interval(b.get("estimate"), b) if b else _num(value))
        rows.append([name, str(counts.get(name, NA)), str(c.get("n", NA)), sens, spec,
                     _num(c.get("auc_ovr")), _num(share.get(name)), *base_cells])
    how = ("patient-level percentile bootstrap 95 % intervals (the several studies of a patient move together)"
           if boot else "Wilson score 95 % intervals (each study counted as an independent case)")
    return [("h", 2, "Per class (pooled)"),
            ("p", f"Sensitivity and specificity one-vs-rest with {how}; AUC of the temperature-scaled "
                  "probabilities" + ("; the baselines' sensitivity on the same resamples." if baselines else ".")),
            ("table", headers, rows)]


def _per_fold(summary: dict) -> List[tuple]:
    per_fold = summary.get("per_fold") or []
    if not per_fold:
        return []
    across = dict(summary.get("across_folds") or {})
    missing = [k for k in FOLD_METRICS if k not in across]
    if missing:
        from pancls.eval.clinical import mean_sd_across_folds

        across.update(mean_sd_across_folds(per_fold, missing))
    labels = dict(HEADLINE_METRICS)
    headers = ["fold", "n"] + [labels.get(k, k) for k in FOLD_METRICS] + ["collapsed"]
    rows = []
    for i, entry in enumerate(per_fold):
        m = entry.get("metrics") or {}
        collapsed = f"yes ({m.get('collapsed_to')})" if m.get("collapsed") else "no"
        rows.append([str(entry.get("fold", i)), str(m.get("n", NA))] + [_num(m.get(k)) for k in FOLD_METRICS]
                    + [collapsed])
    rows.append(["mean ± SD", ""] + [_mean_sd(across.get(k)) for k in FOLD_METRICS] + [""])
    return [("h", 2, "Per fold"),
            ("p", "Metrics of each held-out test fold; last row the mean ± sample SD across folds."),
            ("table", headers, rows)]


def _collapse(summary: dict) -> List[tuple]:
    entries = [("model, pooled", summary.get("pooled"))]
    for key, base in (summary.get("baselines") or {}).items():
        entries.append((_baseline_label(key, base or {}), (base or {}).get("pooled")))
    for i, entry in enumerate(summary.get("per_fold") or []):
        entries.append((f"model, fold {entry.get('fold', i)}", entry.get("metrics")))
    rows = []
    for where, m in entries:
        if not m:
            continue
        share = m.get("predicted_share") or {}
        top = max(share, key=share.get) if share else None
        rows.append([where, "**COLLAPSED**" if m.get("collapsed") else "no", str(m.get("collapsed_to") or ""),
                     f"{top} {_num(share[top])}" if top else NA])
    if not rows:
        return []
    return [("h", 2, "Collapse flags"),
            ("p", "A set of predictions is flagged when one class is predicted for at least 90 % of the cases."),
            ("table", ["predictions", "collapsed", "to", "largest predicted share"], rows)]


def _description(summary: dict) -> List[tuple]:
    rows = [["classes", ", ".join(summary["classes"])]]
    for key, label in (("folds", "folds"), ("selection", "model selection"), ("roi", "region of interest"),
                       ("machine", "machine")):
        if summary.get(key) is not None:
            rows.append([label, str(summary[key])])
    for key, value in (summary.get("model") or {}).items():
        rows.append([f"model.{key}", f"{value:.4g}" if isinstance(value, float) else str(value)])
    return [("h", 2, "Run"), ("table", ["", ""], rows)]


def _figures(figures: Dict[str, Path]) -> List[tuple]:
    blocks = [("figure", name, Path(path)) for name, path in (figures or {}).items()
              if path is not None and Path(path).is_file()]
    return [("h", 2, "Figures")] + blocks if blocks else []


def _blocks(run_dir: Path, summary: dict, figures: Dict[str, Path]) -> List[tuple]:
    return ([("h", 1, f"pancls report: {run_dir.name}")]
            + _description(summary) + _headline(summary) + _confusion(summary) + _per_class(summary)
            + _per_fold(summary) + _collapse(summary) + _figures(figures))


# ---------------------------------------------------------------------------------------------------
# rendering


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _render_md(blocks: Sequence[tuple], run_dir: Path) -> str:
    out: List[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out += ["#" * block[1] + " " + block[2], ""]
        elif kind == "p":
            out += [block[1], ""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "|".join("---" for _ in headers) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("")
        elif kind == "figure":
            path = block[2]
            try:
                ref = path.resolve().relative_to(run_dir.resolve()).as_posix()
            except ValueError:
                ref = path.resolve().as_posix()
            out += [f"![{block[1]}]({ref})", ""]
    return "\n".join(out)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
td.collapsed { color: #b00; font-weight: bold; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; }
figcaption { font-size: 0.85em; color: #555; }
img { max-width: 640px; }
"""


def _render_html(blocks: Sequence[tuple]) -> str:
    esc = html.escape
    title = next((b[2] for b in blocks if b[0] == "h"), "pancls report")
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{esc(block[1])}</p>")
        elif kind == "table":
            headers, rows = block[1], block[2]
            out.append("<table>")
            if any(headers):
                out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>")
            for r in rows:
                cells = []
                for c in r:
                    if c == "**COLLAPSED**":
                        cells.append('<td class="collapsed">COLLAPSED</td>')
                    else:
                        cells.append(f"<td>{esc(str(c))}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</table>")
        elif kind == "figure":
            data = base64.b64encode(block[2].read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{esc(block[1])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(block[1])}</figcaption></figure>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def write_report(run_dir: Path, summary: dict, figures: Dict[str, Path]) -> Tuple[Path, Path]:
    """Write ``run_dir/report.md`` and ``run_dir/report.html`` (shape of ``summary``: module docstring).

    Parameters
    ----------
    run_dir : Path
        Folder of the run; created if missing.
    summary : dict
        The run's evaluation; missing optional keys leave their section out.
    figures : dict of str to Path
        Title and PNG of each figure; the Markdown links them (relative to ``run_dir`` when inside it),
        the HTML embeds them. Missing files are skipped.

    Returns
    -------
    (report_md, report_html) : tuple of Path
    """
    from pancls.io import atomic_write_text

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    blocks = _blocks(run_dir, summary, figures)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md_path, _render_md(blocks, run_dir))
    atomic_write_text(html_path, _render_html(blocks))
    return md_path, html_path
