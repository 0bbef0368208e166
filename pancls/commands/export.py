"""Export a `pancls cv` run folder as a MONAI bundle (configs/metadata.json, configs/inference.json, models/model.ts).

The bundle gives the probabilities `pancls predict` gives, under MONAI's own runner.

Typical use:
  pancls export runs/cv --out bundles/pancls_tsp
  python -m monai.bundle run --config_file bundles/pancls_tsp/configs/inference.json \\
      --bundle_root bundles/pancls_tsp --image ct.nii.gz --mask lesion.nii.gz
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, metavar="RUN", help="a finished `pancls cv` run folder")
    p.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    p.add_argument("--fold", type=int, help="export only this fold's model (default: the ensemble of all folds)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    from pancls.bundle import export

    print(json.dumps(export(args.run, args.out, fold=args.fold, force=args.force)))
    return 0
