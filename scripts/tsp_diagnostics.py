#!/usr/bin/env python3
"""Explain finished `pancls lt` runs: how confident each head gets, which classes still carry the loss, and
how hard head-class samples push the tail-class centres (pancls.eval.diagnostics). Prints a markdown table.

The numbers are measured on the training set with each run's last checkpoint (last.pt); the share of test
predictions that fall in the tail third of the classes is measured on the test set.

Typical use:
  python scripts/tsp_diagnostics.py runs/cpu_reduced/*/ --json diagnostics.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pancls.data import augment
from pancls.eval.diagnostics import class_terciles, extract_features, group_prediction_share, head_diagnostics
from pancls.lt import load_run, per_class


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="`pancls lt` run folders (with results.json)")
    p.add_argument("--json", type=Path, help="also write every number to this file")
    args = p.parse_args()
    torch.set_grad_enabled(True)
    rows, everything = [], {}
    for run in args.runs:
        if not (run / "results.json").exists():
            print(f"skipping {run}: no results.json", file=sys.stderr)
            continue
        cfg, data, model = load_run(run)
        mean, std = augment.normalisation(cfg.data.dataset)
        x = augment.to_float_normalised(torch.from_numpy(data.train_images), mean, std, "cpu")
        feats = extract_features(model, x)
        diag = head_diagnostics(model.head, feats, torch.from_numpy(data.train_labels), data.class_counts)
        results = json.loads((run / "results.json").read_text())
        test_logits = model.head(extract_features(model, augment.to_float_normalised(
            torch.from_numpy(data.test_images), mean, std, "cpu"))).detach().numpy()
        share = group_prediction_share(test_logits, data.class_counts)
        head = model.head
        param = (f"s={head.scale.item():.2f}" if getattr(head, "form", None) == "kernel" else
                 f"gamma={head.gamma.item():.2g}" if getattr(head, "form", None) == "paper" else
                 f"s={head.scale.item():.1f}" if hasattr(head, "scale") else "—")
        everything[run.name] = {"diagnostics": diag, "test_prediction_share": share, "head_parameter": param}
        tail = class_terciles(data.class_counts)["tail"]
        accuracy = per_class(results, "per_class_accuracy")  # keyed by class name, or an old run's list
        tail_top1 = sum(accuracy[k] for k in tail) / len(tail)
        rows.append((run.name, _pct(results["top1"]), _pct(tail_top1), param,
                     f"{diag['mean_logit_range']:.1f}",
                     f"{diag['mean_cos_to_own_centre']:.2f}" if "mean_cos_to_own_centre" in diag else "—",
                     f"{diag['train_ce']:.3f}",
                     _pct(diag["head"]["mean_p_true"]), _pct(diag["tail"]["mean_p_true"]),
                     _pct(diag["head"]["loss_share"]),
                     f"{diag['head']['push_on_tail_centres']:.3g} / {diag['tail']['push_on_tail_centres']:.3g}",
                     _pct(share["tail"])))
    header = ("run", "top-1", "tail-third top-1", "head param", "logit range", "cos to own centre", "train CE", "p_true head", "p_true tail",
              "loss share of head classes", "push on tail centres: head / tail samples", "test preds in tail classes (%)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
