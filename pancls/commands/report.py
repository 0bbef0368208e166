"""Regenerate the summary, figures, report and model card of a `pancls cv` run folder.

Rewrites summary.json, oof_predictions.csv, figures/, report.md/html and MODEL_CARD.md, e.g. after the
folds were trained on different machines with `pancls cv --fold k`.

Typical use:
  pancls report runs/cv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a `pancls cv` run folder")


def run(args: argparse.Namespace) -> int:
    from pancls import cv

    summary = cv.summarise(args.run, log=lambda m: print(m, file=sys.stderr))
    print(cv.headline(summary, args.run))
    return 0
