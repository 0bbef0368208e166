"""Predict the tumour subtype of new CT studies with a `pancls cv` run folder (the fold ensemble).

INPUT: DICOM study folders or zips (one series per study, chosen by the rules of `pancls ingest`: at least 20
slices unless --min-slices), NIfTI files, or a manifest CSV (column image, optional mask and patient_id).
Preprocessing and the ROI policy come from the run folder. Outputs carry no patient identifiers unless --keep-ids.

Typical use:
  pancls predict --model runs/cv study1/ study2.zip ct.nii.gz --out predictions.csv
  pancls predict --model runs/cv ct.nii.gz --mask lesion.nii.gz          a mask-ROI model needs the mask
  pancls predict --model runs/cv /pacs/export/ --sr sr_out/               + one DICOM SR per study

--sr DIR: each SR is DIR/<its SOPInstanceUID>.dcm (new, random: no identifier), never overwritten by a later run;
the output's `sr` field/column names the file of each study (earlier runs' SRs stay in DIR). Files being written
do not end in .dcm, and a killed run's are removed by the next run (one run at a time per DIR).

Exit status: 0 every study predicted (and, with --sr, its SR written), 1 some failed (one line each on stderr,
and a row in the output), 2 a problem with the command itself (model folder, output path, arguments).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from pancls.commands.ingest import _positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                   help="DICOM folder or zip, NIfTI file (.nii/.nii.gz), or manifest CSV")
    p.add_argument("--model", type=Path, required=True, help="a `pancls cv` run folder")
    p.add_argument("--fold", type=int, help="use only this fold's model (default: the ensemble of all folds)")
    p.add_argument("--mask", type=Path, help="the lesion mask (NIfTI on the image's grid) for a single INPUT")
    p.add_argument("--mask-label", type=_positive_int, metavar="N",
                   help="the lesion's value in the mask (e.g. a TotalSegmentator map): its voxels become the mask "
                        "(recorded as mask_label); without it a mask holding several labels is refused")
    p.add_argument("--out", type=Path, help="write the results to this .json or .csv (default: JSON on stdout)")
    p.add_argument("--config", type=Path,
                   help="the `pancls ingest` YAML (series selection, geometry policy) to read DICOM with")
    p.add_argument("--min-slices", type=_positive_int, metavar="N",
                   help="refuse DICOM series with fewer slices (overrides selection.min_slices; default 20, as "
                        "pancls ingest: shorter stacks are scouts, single images or partial series)")
    p.add_argument("--sr", type=Path, metavar="DIR", help="also write one DICOM Structured Report per DICOM study")
    p.add_argument("--keep-ids", action="store_true",
                   help="also write input paths and DICOM UIDs (identifying: for local use only)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch-size", type=int, help="studies per forward pass (default 1 on CPU, 8 on CUDA)")


def run(args: argparse.Namespace) -> int:
    from pancls import predict
    from pancls.errors import UserError
    from pancls.ingest import load_config
    from pancls.io import hold_lock, owned_temp_dir, remove_stale_temps, remove_stale_temps_of

    predict.check_output_path(args.out)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"must be >= 1, got {args.batch_size}", "--batch-size")
    if args.sr is not None:
        from pancls.report.sr import check_sr_folder

        check_sr_folder(args.sr)
    if args.mask_label is not None and args.mask is None and not any(p.suffix.lower() == ".csv" for p in args.inputs):
        raise UserError("goes with --mask or a manifest CSV with a 'mask' column", "--mask-label")
    ingest_cfg = load_config(args.config)
    if args.min_slices is not None:
        ingest_cfg.selection = dataclasses.replace(ingest_cfg.selection, min_slices=args.min_slices)
    loaded = predict.load_run(args.model, fold=args.fold, device=args.device)
    err = sys.stderr

    def report(result, study, message):
        if message:  # the terminal gets the file too; output files only the reason (paths may identify)
            print(f"pancls predict: input {result['input']} ({study.kind}): {message}", file=err, flush=True)

    with contextlib.ExitStack() as stack:
        if args.sr is not None:  # one run at a time writes SRs there; a killed run's temporary SRs are removed
            args.sr.mkdir(exist_ok=True)
            stack.enter_context(hold_lock(args.sr, "the --sr folder"))
            remove_stale_temps(args.sr)
        if args.out is not None:  # only this output's temporary files: its folder may be shared
            remove_stale_temps_of(args.out)
        tmp = stack.enter_context(owned_temp_dir("pancls-predict-inputs-"))  # zips unpack here; a rerun removes a killed run's
        studies = predict.collect_studies(args.inputs, args.mask, ingest_cfg.selection, ingest_cfg.geometry,
                                          Path(tmp), progress=True)
        results = predict.predict(loaded, studies, keep_ids=args.keep_ids, batch_size=args.batch_size,
                                  on_result=report, mask_label=args.mask_label,
                                  min_slices=ingest_cfg.selection.min_slices)
        if args.sr is not None:
            from pancls.report.sr import write_study_srs

            write_study_srs(args.sr, loaded, studies, results, keep_ids=args.keep_ids)
    sr_failed = [r for r in results if str(r.get("sr", "")).startswith("failed")]  # asked for and not written
    for r in sr_failed:
        print(f"pancls predict: input {r['input']} study {r['study']}: DICOM SR {r['sr']}", file=err)
    if args.out is None:
        print(json.dumps({"model": loaded.info(), "studies": results}, indent=2))
    else:
        predict.write_results(args.out, loaded, results)
        for line in predict.iter_results_summary(results):
            print(line)
    failed = sum(r["status"] != "ok" for r in results)
    print(f"pancls predict: {len(results) - failed} of {len(results)} studies predicted"
          + (f", {failed} failed" if failed else "") + (f"; {len(sr_failed)} DICOM SR(s) not written" if sr_failed
                                                         else ""), file=err)
    return 1 if failed or sr_failed else 0
