#!/usr/bin/env python3
"""Does tSP equalise the feature space (the paper's Figs. 1, 5 and 6)? Numbers from finished `pancls lt` runs.

For each run (its last checkpoint), on the un-augmented training set, in the space where the head measures
angles (``head.embed``: the normalised feature, or tSP's normalised projection), per class
(:func:`pancls.eval.crowding.angular_regions`): the mean angle of its samples to its own centre, its spread (mean
angle to the class's mean direction), the smallest angle from its centre to another centre, and from its mean
direction to another class's. The table gives each by frequency third (head / medium / tail classes, by
training count) and the tail / head ratio: a head that "equalises" the space gives the tail classes as much
room as the head classes (ratio near 1). ``--figure`` draws a t-SNE of test features, one panel per run side
by side (Fig. 5's layout), on the same stratified subsample of the test set.

    python scripts/eigenspace.py runs/issue16_r20_e36/cifar10_ir100_softmax_la_s2 \\
        runs/issue16_r20_e36/cifar10_ir100_tsp_kernel_la_s2 --json out.json --figure tsne.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from pancls.data import augment
from pancls.eval.crowding import angular_regions
from pancls.eval.diagnostics import class_terciles, extract_features
from pancls.heads import HEADS, TSPHead
from pancls.lt import load_run

MEASURES = (("angle_to_centre_deg", "angle to own centre"), ("spread_deg", "spread"),
            ("min_angle_between_centres_deg", "min angle centre-centre"),
            ("min_angle_between_means_deg", "min angle mean-mean"))


@torch.no_grad()
def embeddings(run: Path):
    """``(cfg, data, train embeddings, test embeddings, centres)`` of a run's last checkpoint."""
    cfg, data, model = load_run(run)
    mean, std = augment.normalisation(cfg.data.dataset)

    def embed(images: np.ndarray) -> np.ndarray:
        x = augment.to_float_normalised(torch.from_numpy(images), mean, std, "cpu")
        return model.head.embed(extract_features(model, x)).numpy()

    return cfg, data, embed(data.train_images), embed(data.test_images), model.head.centres().numpy()


def by_third(values: np.ndarray, counts) -> dict:
    thirds = class_terciles(counts)
    out = {name: float(np.nanmean(values[idx])) for name, idx in thirds.items()}
    out["tail_over_head"] = out["tail"] / out["head"]
    return out


def run_label(cfg) -> str:
    """The head as a reader tells runs apart: ``softmax``, ``cosine``, ``tsp kernel``, ``tsp paper nu=7``
    (read from the head the config builds, so a preset and its spelled-out options get one label)."""
    head = HEADS.create(cfg.model.head, in_features=2, num_classes=2, **cfg.model.head_kwargs)
    if not isinstance(head, TSPHead):
        return cfg.model.head
    extra = f" nu={head.nu:g}" if head.form == "paper" and head.nu != 1 else ""
    return f"tsp {head.form}{extra}"


def stratified(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == k))[:per_class] for k in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="`pancls lt` run folders (with last.pt)")
    p.add_argument("--json", type=Path, help="also write every per-class number here")
    p.add_argument("--figure", type=Path, help="t-SNE of test features, one panel per run (PNG)")
    p.add_argument("--tsne-per-class", type=int, default=150, help="test images per class in the t-SNE")
    args = p.parse_args()

    rows, everything, panels, classes = [], {}, {}, None
    for run in args.runs:
        if not (run / "last.pt").exists():
            print(f"{run}: no last.pt (the checkpoints of finished runs are not kept in bench/results)",
                  file=sys.stderr)
            return 2
        cfg, data, train, test, centres = embeddings(run)
        regions = angular_regions(train, data.train_labels, centres)
        results = json.loads((run / "results.json").read_text())
        name = f"{run_label(cfg)} + {cfg.loss.name} (s{cfg.train.seed})"
        summary = {key: by_third(regions[key], data.class_counts) for key, _ in MEASURES}
        everything[run.name] = {"name": name, "top1": results["top1"], "dim": int(centres.shape[1]),
                                "classes": list(data.classes), "train_counts": list(map(int, data.class_counts)),
                                "per_class": {k: v.tolist() for k, v in regions.items()}, "by_third": summary}
        for key, label in MEASURES:
            s = summary[key]
            rows.append((name, f"{100 * results['top1']:.1f}", label, f"{s['head']:.1f}", f"{s['middle']:.1f}",
                         f"{s['tail']:.1f}", f"{s['tail_over_head']:.2f}"))
        keep = stratified(data.test_labels, args.tsne_per_class)
        panels[f"{name}, top-1 {100 * results['top1']:.1f}"] = (test[keep], data.test_labels[keep])
        classes = [f"{c}, {n} train" for c, n in zip(data.classes, data.class_counts, strict=True)]

    header = ("run", "top-1", "measure (deg, training set)", "head third", "medium third", "tail third", "tail / head")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        from pancls.io import atomic_write_json

        atomic_write_json(args.json, everything)
    if args.figure:
        from pancls.report.figures import embeddings_side_by_side_png

        embeddings_side_by_side_png(panels, classes, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
