"""Cross-validate the 3D CT classifier over patient-grouped folds, and write its report and model card.

Patient-grouped stratified k folds, inner-split model selection, out-of-fold metrics with intervals beside
the all-majority and intensity baselines.

With no --config and no --manifest it runs the synthetic 530-patient demo cohort (written into the cache on
first use) with a recipe sized for a few minutes on a CPU (pancls/recipes/cv_demo_cpu.yaml). A --manifest
without --config (your own cohort) gets the full-size recipe (pancls/recipes/cv_full.yaml: 3D ResNet-18,
64 x 64 x 32 ROI, 60 epochs, device auto), never the CPU demo's; the first line says what runs.

Fold-parallel: --jobs N trains N folds at once on the CPU (one process each, cores // N threads each);
--gpus 0,1,2,3 trains one fold per listed GPU. The parent writes splits.json once, merges when every fold is
done, and names a failed fold with its last error line (the other folds still finish; --resume retrains only
unfinished folds). See pancls/cv_parallel.py.

Typical use:
  pancls cv --folds 4 --out runs/cv-demo                             the synthetic demo cohort, CPU, minutes
  pancls cv --manifest manifest.csv --out runs/cv                   a hospital cohort: the full-size recipe
  pancls cv --resume --out runs/cv                                   continue a run from its own config
  pancls cv ... --head softmax                                       the same folds with the linear softmax head
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pancls.config import apply_flags, apply_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML recipe (default: the packaged full-size recipe with "
                   "--manifest, the CPU demo recipe without; with --resume, the run's own configs/config.yaml)")
    p.add_argument("--manifest", help="dataset manifest CSV (default: the synthetic demo cohort)")
    p.add_argument("--folds", type=int, help="number of outer folds (default 4)")
    p.add_argument("--fold", type=int, help="train only this fold (0-based); merge with `pancls report RUN`")
    p.add_argument("--head", help="tsp_paper_nu7 (default: the tSP paper form, nu = 7), tsp (its kernel form), "
                   "softmax (linear), cosine")
    p.add_argument("--loss", help="logit_adjust (default), ce, focal, cb, ldam, balanced_softmax")
    p.add_argument("--epochs", type=int, help="training epochs per fold")
    p.add_argument("--seed", type=int, help="split and training seed")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--out", type=Path, default=Path("runs/cv"), help="run folder (default: runs/cv)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set preprocess.roi=centre (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (finished folds are kept)")
    p.add_argument("--no-summary", dest="summary", action="store_false",
                   help="with --fold: train the fold only, even when it is the last one (merge later with "
                        "`pancls report RUN`; for Slurm arrays and the --jobs workers)")
    par = p.add_mutually_exclusive_group()
    par.add_argument("--jobs", type=int, metavar="N",
                     help="train N folds at once on the CPU, one process each (clipped to the folds)")
    par.add_argument("--gpus", metavar="LIST", help="train one fold per GPU at once, e.g. --gpus 0,1,2,3")


def default_recipe(args: argparse.Namespace) -> Path:
    """The packaged recipe a run without --config starts from: the full-size one for a cohort of one's own
    (--manifest), the CPU demo for the synthetic demo cohort."""
    from pancls.cv import DEMO_CONFIG, FULL_CONFIG

    return FULL_CONFIG if args.manifest else DEMO_CONFIG


def build_config(args: argparse.Namespace):
    """The recipe (--config; with --resume the run's own configs/config.yaml; else :func:`default_recipe`) with
    the flags on top (:func:`pancls.commands.common.starting_recipe`)."""
    from pancls.commands.common import starting_recipe
    from pancls.config import absolute_paths
    from pancls.cv import load_config, run_config_path

    data = starting_recipe(args.config, args.resume, run_config_path(args.out), default_recipe(args))
    flags = {"data.manifest": args.manifest, "cv.folds": args.folds, "model.head": args.head,
             "loss.name": args.loss, "train.epochs": args.epochs, "train.seed": args.seed,
             "cv.seed": args.seed, "device": args.device}
    apply_flags(data, flags)
    apply_overrides(data, args.overrides)
    absolute_paths(data)  # a resume from another folder, or with the manifest spelled out, is the same run
    return load_config(data)


def run(args: argparse.Namespace) -> int:
    from pancls import cv
    from pancls.distributed import is_main_process

    cfg = build_config(args)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.jobs is not None or args.gpus is not None:
        return _run_parallel(args, cfg, log)
    result = cv.run(cfg, args.out, resume=args.resume, fold=args.fold, log=log, summary=args.summary)
    if not is_main_process():  # torchrun: rank 0 prints the result
        return 0
    if "pooled" not in result:  # one fold of several
        print(json.dumps({"out": str(args.out), "fold": result["fold"], "selected_epoch": result["selected_epoch"]}))
        return 0
    print(cv.headline(result, args.out))
    return 0


def _run_parallel(args: argparse.Namespace, cfg, log) -> int:
    from pancls import cv
    from pancls.cv_parallel import parse_gpus, run_parallel
    from pancls.errors import UserError

    flag = "--jobs" if args.jobs is not None else "--gpus"
    if args.fold is not None:
        raise UserError("trains every fold; --fold k trains one (drop one of the two)", flag)
    gpus = parse_gpus(args.gpus) if args.gpus is not None else None
    summary = run_parallel(cfg, args.out, resume=args.resume, jobs=args.jobs, gpus=gpus, log=log)
    print(cv.headline(summary, args.out))
    return 0
