#!/usr/bin/env python
"""What the head of each `pancls lt` run learned: its scale, gamma or kappa and its logit width, from last.pt.

The logit width (``pancls.heads``: a logit at ``cos = 1`` minus one at ``cos = -1``) bounds how confident a head
can be: ``2 s`` for a cosine head, ``nu * log((1 + gamma) / gamma)`` for the tSP paper form. Runs finished since
2026-12-06 also hold it in ``results.json`` (``head``); this reads it from any run folder that kept its last.pt.

    python scripts/head_summary.py runs/issue16_r20_e36/cifar10_ir100_tsp_paper_nu7*_s? [--json heads.json]
        [--figure profiles.png]

``--figure`` draws each head's logit against the angle to its centre (its own ``logit_of_cos``), shifted to 0
at the centre: where a head spends its logit range.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from pancls.io import atomic_write_json
from pancls.lt import load_run
from pancls.train.checkpoint import load_checkpoint


def summarise(run: Path, with_head: bool = False):
    """``{"run", "epochs_done", **head.summary()}`` of the run's last checkpoint (and the head itself)."""
    cfg, _, model = load_run(run)
    done = int(load_checkpoint(run / "last.pt")["epoch"])  # the epochs finished when it was written
    row = {"run": run.name, "epochs_done": done, "epochs": cfg.train.epochs, "loss": cfg.loss.name,
           **model.head.summary()}
    return (row, model.head) if with_head else row


def profile(head, points: int = 181):
    """``(angles in degrees, logits)`` of a head's ``logit_of_cos`` from 0 to 180 degrees."""
    angles = torch.linspace(0.0, 180.0, points, dtype=torch.float64)
    with torch.no_grad():
        logits = head.logit_of_cos(torch.cos(angles * math.pi / 180.0))
    return angles.numpy(), logits.numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="`pancls lt` run folders (with last.pt)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--figure", type=Path, help="each head's logit against the angle to its centre (PNG)")
    args = p.parse_args(argv)
    missing = [str(run) for run in args.runs if not (run / "last.pt").exists()]
    if missing:
        print(f"no last.pt in: {', '.join(missing)}", file=sys.stderr)
        return 2
    pairs = [summarise(run, with_head=True) for run in args.runs]
    rows = [row for row, _ in pairs]
    keys = ["run", "epochs_done", "loss", "form", "nu", "gamma", "scale", "kappa", "logit_width"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        cells = [row.get(k, "") for k in keys]
        print("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    if args.json:
        atomic_write_json(args.json, rows)
    if args.figure:
        from pancls.report.figures import logit_profiles_png

        curves = {f"{row['run']} (width {row['logit_width']:.1f})": profile(head) for row, head in pairs
                  if hasattr(head, "logit_of_cos")}  # a linear head has no angle-only logit
        logit_profiles_png(curves, args.figure, "learned heads: logit against the angle to the centre")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
