"""Train and evaluate one head/loss pair on a long-tailed CIFAR benchmark (CIFAR-10-LT or CIFAR-100-LT).

The run folder (--out) gets config.yaml (the resolved recipe), metrics.jsonl (one line per epoch),
results.json (the LAST epoch's top-1, per class and many/medium/few-shot; the best epoch only as a labelled
extra, since choosing it looks at the test set), last.pt and crowding.png. --resume continues it.

Typical use:
  pancls lt --config configs/lt_demo_cpu.yaml --data cifar10.npz --out runs/lt-demo
  pancls lt --config configs/lt_ldam_drw.yaml --head tsp --loss logit_adjust --data cifar10.npz --out runs/c10_tsp_la
  pancls lt ... --dry-run                              build data and model, print their sizes, do not train
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pancls.commands.common import starting_recipe
from pancls.config import absolute_paths, apply_flags, apply_overrides

#: The config defaults the flags fall back to without --config (pancls.lt.LTConfig's; a test keeps them equal,
#: so that --help need not import torch to show them).
DEFAULTS = {"data.dataset": "cifar10", "data.imbalance_ratio": 100.0, "data.construction": "ldam", "model.head": "tsp",
            "loss.name": "ce", "train.epochs": 200, "train.seed": 0, "device": "auto"}


def _default(key: str) -> str:
    value = DEFAULTS[key]
    return f"default: the recipe's {key}, else {value:g}" if isinstance(value, float) else \
        f"default: the recipe's {key}, else {value}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="recipe (configs/lt_demo_cpu.yaml, configs/lt_ldam_drw.yaml, ...); the flags below override it")
    p.add_argument("--dataset", metavar="NAME", help=f"cifar10, cifar100, imagenet_lt or inat2018 ({_default('data.dataset')}; the "
                   "last two read --data as the image root and need data.train_list, data.eval_list)")
    p.add_argument("--imbalance-ratio", type=float, metavar="IR",
                   help=f"n_max / n_min of the training set, e.g. 100 or 50; 1 = balanced ({_default('data.imbalance_ratio')})")
    p.add_argument("--construction", metavar="NAME",
                   help=f"ldam (the LDAM-DRW subset) or first ({_default('data.construction')})")
    p.add_argument("--head", metavar="NAME", help="tsp (kernel form), tsp_paper_nu7 (paper form, nu = 7), softmax "
                   f"(linear) or cosine ({_default('model.head')})")
    p.add_argument("--loss", metavar="NAME",
                   help=f"ce, focal, cb, ldam, logit_adjust or balanced_softmax ({_default('loss.name')})")
    p.add_argument("--data", metavar="PATH",
                   help="cifar10.npz, cifar-10-python.tar.gz, cifar-100-python.tar.gz or their extracted folders")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder (created)")
    p.add_argument("--epochs", type=int, metavar="N", help=f"training epochs ({_default('train.epochs')})")
    p.add_argument("--seed", type=int, metavar="N",
                   help=f"seed of initialisation, sampling and augmentation ({_default('train.seed')})")
    p.add_argument("--device", help=f"auto, cpu or cuda ({_default('device')}; auto: cuda when available)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set model.head_kwargs.form=paper (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="build data and model, print one JSON line, do not train")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(without --config: with the run's own config.yaml)")


def build_config(args: argparse.Namespace):
    from pancls.lt import load_config, run_config_path

    data = starting_recipe(args.config, args.resume, run_config_path(args.out))  # --resume alone: the run's own
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
    from pancls.distributed import is_main_process
    from pancls.io import check_creatable

    cfg = build_config(args)
    lt.resolve_device(cfg.device)  # a dry run too: "cuda" on a machine without one is refused now, not later
    if args.dry_run:
        print(json.dumps(lt.dry_run(cfg)))
        return 0
    check_creatable(args.out, "run folder")  # made once data and model are built: a refusal leaves no folder
    results = lt.run(cfg, args.out, resume=args.resume, log=lambda msg: print(msg, file=sys.stderr))
    if not is_main_process():  # torchrun: rank 0 prints the result
        return 0
    print(json.dumps({"out": str(args.out), "reported": "last epoch", "top1": results["top1"],
                      "many": results["many_shot_top1"], "medium": results["medium_shot_top1"],
                      "few": results["few_shot_top1"]}))
    return 0
