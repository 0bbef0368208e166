"""Write the synthetic pancreatic-tumour CT cohort: NIfTI volumes, lesion masks, a manifest and a few DICOM series.

Every pancls command can then be tried without hospital data. The class counts follow the tSP paper's
530-patient cohort (--scale shrinks them); the same seed gives identical volumes.

Typical use:
  pancls synth --out runs/synth --scale 0.1            59 patients in a few seconds
  pancls check runs/synth/manifest.csv
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write (created if missing)")
    p.add_argument("--config", type=Path, help="YAML with counts, min_per_class, size, spacing, seed, "
                                                "dicom_subset (default: configs/synth.yaml values)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the per-class counts (1 = the paper's 530 patients; each class keeps at "
                        "least min_per_class)")
    p.add_argument("--seed", type=int, help="random seed (same seed -> identical volumes)")
    p.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="volume size in voxels")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="voxel spacing in mm")
    p.add_argument("--dicom-subset", type=int, metavar="N", help="also write the first N patients as DICOM")
    p.add_argument("--workers", type=int, help="processes (default: all CPU cores)")
    p.add_argument("--force", action="store_true", help="regenerate every file, even those already written")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


#: config keys that have a flag of their own: an error on one of them names the flag the user typed
_FLAGS = {"seed": "--seed", "size": "--size", "spacing": "--spacing", "dicom_subset": "--dicom-subset",
          "scale": "--scale", "workers": "--workers"}


def run(args: argparse.Namespace) -> int:
    from pancls.data.synth import generate_dataset, load_synth_config, scaled_counts
    from pancls.errors import UserError
    from pancls.io import writable_folder
    from pancls.validation import InvalidParameter, check_scalar

    try:  # every rule lives in SynthConfig / the library; this layer only renames the key to its flag
        config = load_synth_config(args.config, seed=args.seed, size=args.size, spacing=args.spacing,
                                   dicom_subset=args.dicom_subset)
        scaled_counts(config, args.scale)
        if args.workers is not None:
            check_scalar(args.workers, "workers", int, min_val=1)
    except InvalidParameter as exc:
        key = str(exc.where).rsplit(": ", 1)[-1].rsplit(".", 1)[-1]
        if key in _FLAGS and (args.config is None or getattr(args, key, None) is not None):
            raise UserError(exc.reason, _FLAGS[key]) from None
        raise
    writable_folder(args.out)  # before any work: not at the end of it
    summary = generate_dataset(args.out, config, scale=args.scale, force=args.force, workers=args.workers,
                               progress=args.progress)
    print(json.dumps({"out": str(args.out), **summary}))
    return 0
