"""Convert DICOM/NIfTI studies into checked NIfTI volumes (RAS+), a manifest and an inventory.

Walks every SRC (folders recursively, files, zip archives), skips non-image objects, chooses one CT series
per study, checks its geometry and writes OUT/images/*.nii.gz with JSON sidecars, OUT/manifest.csv (what
`pancls check` and `pancls cv` read) and OUT/.private/inventory.csv (every series and file, and why it was skipped; private: it names input paths).
--labels joins the hospital's label sheet, --masks the lesion masks; the ids in the outputs are
pseudonyms, and OUT/.private/keys.csv (never share it) maps them back for authorised staff.
Re-running converts only what changed (--force redoes everything).

Typical use:
  pancls ingest /data/export --out dataset --labels labels.csv --label-key AccessionNumber --masks masks/
  pancls ingest study.zip ct.nii.gz --out dataset --on-gap resample --on-uneven resample

Exit status: 0 everything converted, 1 some input refused (listed on stderr and in .private/inventory.csv), 3 a series
failed with an unexpected error (a bug; traceback in OUT/.private/errors.log), 2 nothing could be done.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from pancls.data.classes import DEFAULT_CLASSES
from pancls.errors import UserError
from pancls.join import LABEL_KEYS


def _classes(text: str) -> list:
    return [c.strip() for c in text.split(",")]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", type=Path, metavar="SRC",
                        help="DICOM folders/files, zip archives or NIfTI files")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--config", type=Path, help="YAML with 'selection' and 'geometry'")
    parser.add_argument("--force", action="store_true", help="convert again even when up to date")
    parser.add_argument("--workers", type=_positive_int, help="threads for header reading and decoding")
    for problem in ("gap", "tilt", "uneven"):
        parser.add_argument(f"--on-{problem}", choices=("refuse", "resample"),
                            help=f"what to do with a series with {problem} (overrides the config; default refuse)")
    parser.add_argument("--min-slices", type=_positive_int, metavar="N",
                        help="skip series with fewer slices (overrides selection.min_slices; default 20: shorter "
                             "stacks are scouts, single images or partial series)")
    parser.add_argument("--secret", type=Path, metavar="FILE",
                        help="the key of every id (default OUT/.private/secret, created on first use); give "
                             "several datasets the same file to share one id space")
    parser.add_argument("--insecure-ids", action="store_true",
                        help="accept an empty secret: ids become plain hashes anyone with the UIDs can link back")
    parser.add_argument("--keep-descriptions", action="store_true",
                        help="write SeriesDescription and other header free text into the manifest, inventory "
                             "and sidecars (off: they may carry names)")
    parser.add_argument("--labels", type=Path, metavar="CSV",
                        help="label sheet (a key column, 'label', optional 'mask'): fills the manifest's label; the "
                             "manifest then lists the labelled volumes only (the others: .private/inventory.csv)")
    parser.add_argument("--label-key", default="PatientID", choices=LABEL_KEYS,
                        help="what the sheet's key column holds, matched inside pancls (default PatientID; "
                             "folder: a folder or NIfTI name on the input's path)")
    parser.add_argument("--masks", type=Path, metavar="DIR",
                        help="mask files (NIfTI, NRRD, DICOM SEG) matched by the same key or the sheet's 'mask' "
                             "column, put on each volume's grid (resampled nearest-neighbour and flagged if need be)")
    parser.add_argument("--mask-label", type=_positive_int, metavar="N",
                        help="the lesion's value in the mask files (e.g. a TotalSegmentator map): its voxels become "
                             "the mask (flag mask_label:N); without it a mask holding several labels is refused")
    parser.add_argument("--classes", type=_classes, default=list(DEFAULT_CLASSES), metavar="A,B,...",
                        help=f"the allowed labels (default {','.join(DEFAULT_CLASSES)})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from pancls.ingest import ingest, load_config  # pydicom/nibabel only when ingesting

    config = load_config(args.config)
    overrides = {f"on_{p}": getattr(args, f"on_{p}") for p in ("gap", "tilt", "uneven") if getattr(args, f"on_{p}")}
    if overrides:
        config.geometry = dataclasses.replace(config.geometry, **overrides)
    if args.min_slices is not None:
        config.selection = dataclasses.replace(config.selection, min_slices=args.min_slices)
    out = args.out.resolve()
    for src in args.sources:
        # a later scan of that source would pick up our own NIfTI outputs as inputs
        if src.exists() and src.is_dir() and (out == src.resolve() or src.resolve() in out.parents):
            raise UserError(f"the output folder must not be inside the source {src}", "--out")
    report = ingest(args.sources, args.out, config, force=args.force, workers=args.workers,
                    progress=not args.no_progress, keep_descriptions=args.keep_descriptions,
                    insecure_ids=args.insecure_ids, secret_file=args.secret, labels=args.labels,
                    label_key=args.label_key, masks=args.masks, classes=args.classes,
                    mask_label=args.mask_label)
    print(f"pancls ingest: {report.summary()} -> {args.out}")
    return report.exit_code
