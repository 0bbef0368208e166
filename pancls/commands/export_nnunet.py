"""Write a dataset as an nnU-Net v2 raw dataset (dataset.json, imagesTr/, labelsTr/, splits_final.json).

Typical use, after `pancls ingest` and a `pancls cv` run on the same manifest:

    pancls export-nnunet dataset/ --out nnUNet_raw/Dataset501_Pancreas --splits runs/cv/splits.json

Images are linked (--copy copies them), masks become labelsTr/, the cv folds become nnU-Net's folds (grouped
by patient; or the manifest's fold column), and cases.csv maps each case_NNNN to its patient and class.
Case ids are row numbers: no identifier, not even the pseudonymous one, is in a file name.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pancls.commands.check import add_manifest_arguments

    p.add_argument("dataset", type=Path, metavar="DATASET",
                   help="a dataset folder with manifest.csv (what `pancls ingest` or `pancls synth` wrote) or a manifest CSV")
    p.add_argument("--out", type=Path, required=True,
                   help="the nnU-Net dataset folder to write, e.g. nnUNet_raw/Dataset501_Pancreas (new or empty)")
    p.add_argument("--splits", type=Path, metavar="RUN/splits.json",
                   help="a `pancls cv` run's splits.json (or the run folder): its folds become splits_final.json "
                        "(default: the manifest's fold column, if any)")
    p.add_argument("--copy", action="store_true",
                   help="copy the images and masks instead of linking them (and write non-.nii.gz files as .nii.gz)")
    add_manifest_arguments(p, "the --splits run's classes, else the recipe's, else PDAC,IPMN,NET,SCN,ASC,CP")


def run(args: argparse.Namespace) -> int:
    from pancls import nnunet
    from pancls.commands.check import load_manifest_from_args

    nnunet.check_out(args.out)  # before reading every mask of a large cohort
    path = args.dataset / "manifest.csv" if args.dataset.is_dir() else args.dataset
    splits, splits_path = None, None
    if args.splits is not None:
        splits_path, splits = nnunet.load_splits(args.splits)
    classes = splits.get("classes") if isinstance(splits, dict) else None
    manifest = load_manifest_from_args(args, path, classes=classes)
    summary = nnunet.export(manifest, args.out, splits=splits, splits_path=splits_path, copy=args.copy,
                            log=lambda m: print(f"pancls export-nnunet: {m}", file=sys.stderr))
    print(json.dumps(summary))
    return 0
