#!/usr/bin/env python3
"""Compare heads and losses under `pancls cv` on the same splits, and print one table.

Every variant is one `pancls cv` run folder under --out with the same config, manifest, folds and seed, so the
splits are identical (each run writes and checks its own splits.json against the manifest). Finished runs are
re-read, unfinished ones resumed: stop and restart freely.

    python scripts/cv_compare.py --out runs/cv_compare                 # the demo cohort and recipe
    python scripts/cv_compare.py --config configs/my_cv.yaml --manifest data/manifest.csv --out runs/cmp

Columns: out-of-fold balanced accuracy and macro-F1 with 95 % patient-level bootstrap intervals, CP and ASC
recall with Wilson intervals, ECE after temperature scaling, and whether any fold collapsed to one class;
the all-majority and intensity baselines of the same splits close the table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

#: name -> (head, loss, extra --set overrides)
VARIANTS = {
    "softmax": ("softmax", "ce", []),
    "softmax_la": ("softmax", "logit_adjust", []),
    "cosine": ("cosine", "ce", []),
    "cosine_la": ("cosine", "logit_adjust", []),
    "tsp": ("tsp", "ce", []),  # the kernel form (TSPHead's default)
    "tsp_la": ("tsp", "logit_adjust", []),
    # the paper form with nu = 7 (pancls.heads.tsp_paper_nu7: its logit width matched to the cosine head's),
    # issue 16's best tSP recipe and the clinical default; the same network as head tsp with
    # model.head_kwargs {form: paper, nu: 7.0}, the spelling of the results kept before the preset existed
    "tsp_paper_nu7": ("tsp_paper_nu7", "ce", []),
    "tsp_paper_nu7_la": ("tsp_paper_nu7", "logit_adjust", []),
}


def run_variant(name: str, args) -> dict:
    head, loss, extra = VARIANTS[name]
    out = args.out / name
    if not (out / "summary.json").exists():
        cmd = [sys.executable, "-m", "pancls.cli", "cv", "--out", str(out), "--head", head, "--loss", loss,
               "--resume"]
        for flag, value in (("--config", args.config), ("--manifest", args.manifest), ("--seed", args.seed),
                            ("--epochs", args.epochs)):
            if value is not None:
                cmd += [flag, str(value)]
        for item in extra + args.set:
            cmd += ["--set", item]
        print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())


def _ci(block: dict, metric: str) -> str:
    b = block.get(metric, {})
    return f"{b['estimate']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}]" if b else "—"


def _recall(block: dict, cls: str) -> str:
    """A class's recall with its patient-bootstrap interval; a summary written before those existed: Wilson."""
    boot = block["intervals"].get("per_class", {}).get(cls, {}).get("sensitivity")
    if boot:
        lo, hi, value = boot["lo"], boot["hi"], boot["estimate"]
    else:
        c = block["pooled"]["per_class"].get(cls)
        if not c:
            return "—"
        value, (lo, hi) = c["sensitivity"], c["sensitivity_ci"]
    return "—" if value is None else f"{value:.2f} [{lo:.2f}, {hi:.2f}]"


def _recall_interval(s: dict) -> str:
    return "patient-level bootstrap" if "per_class" in s["intervals"] else "Wilson"


def table(summaries: dict) -> str:
    rows = ["| variant | balanced accuracy | macro-F1 | CP recall | ASC recall | ECE (after T) | collapsed folds |",
            "|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        cal = s.get("pooled_calibrated") or s["pooled"]
        rows.append(f"| {name} | {_ci(s['intervals'], 'balanced_accuracy')} | {_ci(s['intervals'], 'macro_f1')} | "
                    f"{_recall(s, 'CP')} | {_recall(s, 'ASC')} | {cal['ece']:.3f} | "
                    f"{s['collapsed_folds'] or 'none'} |")
    any_s = next(iter(summaries.values()))
    for base in ("majority", "intensity"):
        b = any_s["baselines"][base]
        rows.append(f"| *baseline: {base}* | {_ci(b['intervals'], 'balanced_accuracy')} | "
                    f"{_ci(b['intervals'], 'macro_f1')} | {_recall(b, 'CP')} | "
                    f"{_recall(b, 'ASC')} | {b['pooled']['ece']:.3f} | "
                    f"{'collapsed' if b['pooled']['collapsed'] else ''} |")
    m = any_s["model"]
    rows.append(f"\n{any_s['folds']} folds, {sum(any_s['class_counts'].values())} patients, {m['backbone']}, "
                f"{m['epochs']} epochs, machine: {any_s['machine']}; intervals: 95 % patient-level bootstrap "
                f"(balanced accuracy, macro-F1) and {_recall_interval(any_s)} (recall).")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path)
    p.add_argument("--manifest")
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    summaries = {}
    for name in args.variants:
        summaries[name] = run_variant(name, args)
        text = table(summaries)
        (args.out / "compare.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
