"""Train and evaluate a head/loss pair on a long-tailed CIFAR benchmark (CIFAR-10-LT / CIFAR-100-LT)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pancls.commands.common import absolute_paths
from pancls.config import apply_flags, apply_overrides, load_yaml


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML recipe (configs/lt_ldam_drw.yaml, ...); flags below override it")
    p.add_argument("--dataset", choices=None, help="cifar10 or cifar100")
    p.add_argument("--imbalance-ratio", type=float, help="n_max / n_min, e.g. 100 or 50 (1 = balanced)")
    p.add_argument("--construction", help="ldam (LDAM-DRW subset, default) or first")
    p.add_argument("--head", help="tsp, softmax (linear), cosine")
    p.add_argument("--loss", help="ce, focal, cb, ldam, logit_adjust, balanced_softmax")
    p.add_argument("--data", help="cifar10.npz, cifar-10-python.tar.gz, cifar-100-python.tar.gz or their folders")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set model.head_kwargs.form=paper (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="build data and model, print one JSON line, do not train")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def build_config(args: argparse.Namespace):
    from pancls.lt import load_config

    data = load_yaml(args.config) if args.config else {}
    flags = {
        "data.dataset": args.dataset, "data.imbalance_ratio": args.imbalance_ratio,
        "data.construction": args.construction, "data.path": args.data,
        "model.head": args.head, "loss.name": args.loss,
        "train.epochs": args.epochs, "train.seed": args.seed, "device": args.device,
    }
    apply_flags(data, flags)
    apply_overrides(data, args.overrides)
    absolute_paths(data)  # the run's config.yaml and a resume's comparison name each file one way
    return load_config(data)


def run(args: argparse.Namespace) -> int:
    from pancls import lt
    from pancls.io import writable_folder

    cfg = build_config(args)
    lt.resolve_device(cfg.device)  # a dry run too: "cuda" on a machine without one is refused now, not later
    if args.dry_run:
        print(json.dumps(lt.dry_run(cfg)))
        return 0
    writable_folder(args.out, "run folder")
    results = lt.run(cfg, args.out, resume=args.resume, log=lambda msg: print(msg, file=sys.stderr))
    print(json.dumps({"out": str(args.out), "reported": "last epoch", "top1": results["top1"],
                      "many": results["many_shot_top1"], "medium": results["medium_shot_top1"],
                      "few": results["few_shot_top1"]}))
    return 0
