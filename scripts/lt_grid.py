#!/usr/bin/env python3
"""Run a grid of long-tailed CIFAR runs (datasets x IR x variants x seeds) and print our table beside
the published one.

Every cell is one ``pancls lt`` run in its own folder under ``--out``; finished cells are re-read,
unfinished ones resumed, so the grid can be stopped and restarted. The table reports the LAST-epoch
top-1 (mean ± std over seeds) with where each number came from (device, epochs, seeds).

Example (the reduced CPU protocol of the README):
    python scripts/lt_grid.py --config configs/lt_cpu_reduced.yaml --data ../shared/data/cifar10.npz \
        --datasets cifar10 --ratios 100 --variants softmax cosine tsp_kernel tsp_paper --seeds 0 --out runs/grid_cpu

``--pairs softmax:tsp_kernel_s16 ...`` adds a paired table (issue 16): for each pair ``A:B`` run with the same
seeds (same data order and initialisation), the per-seed top-1 difference A - B, its mean with a 95 % paired t
interval and the sign test over seeds (:mod:`pancls.eval.paired`); ``--figure PNG`` draws them, a line per seed.
``--kept bench/results/<grid>`` reports from the committed results of finished cells and trains nothing:
    python scripts/lt_grid.py --config configs/lt_cpu_reduced.yaml --kept bench/results/issue16_r20_e36 \
        --variants softmax tsp_kernel_s16 --seeds 0 1 2 --pairs softmax:tsp_kernel_s16 --figure pairs.png
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

#: One YAML per variant (a head/loss recipe laid over --config; everything else comes from the recipe, identical
#: across variants). ``'{first_milestone}'`` stands for the recipe's first lr milestone (where DRW switches on);
#: ``'{out}'``, ``'{dataset}'``, ``'{ratio}'`` and ``'{seed}'`` for the grid's output folder and the cell's
#: dataset, imbalance ratio and seed (a two-stage recipe names its stage-1 cell: ``{out}/{dataset}_ir{ratio}_softmax_s{seed}``).
VARIANTS_DIR = Path(__file__).resolve().parents[1] / "configs" / "lt_variants"
VARIANTS = sorted(p.stem for p in VARIANTS_DIR.glob("*.yaml"))


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def variant(name: str):
    """``(head, loss, ["key=value", ...])`` of ``configs/lt_variants/<name>.yaml``."""
    import yaml

    data = yaml.safe_load((VARIANTS_DIR / f"{name}.yaml").read_text()) or {}
    head = data.get("model", {}).pop("head")
    loss = data.get("loss", {}).pop("name")
    overrides = [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in _leaves(data)]
    return head, loss, overrides


# Published top-1 (%) for context only; never printed as our result.
# tSP: Yang et al., AAAI 2023, Table 2 (ResNet-32). CE: Cao et al. (LDAM-DRW), NeurIPS 2019, Table 2 "ERM".
PUBLISHED = {
    ("cifar10", 100): {"tSP (paper)": 84.5, "CE (LDAM-DRW paper)": 70.36},
    ("cifar10", 50): {"tSP (paper)": 86.9, "CE (LDAM-DRW paper)": 74.81},
    ("cifar100", 100): {"tSP (paper)": 51.7, "CE (LDAM-DRW paper)": 38.32},
    ("cifar100", 50): {"tSP (paper)": 55.1, "CE (LDAM-DRW paper)": 43.85},
}


def first_milestone(config: Path, overrides) -> int:
    """The recipe's first lr milestone, where DRW switches on (160 of 200 epochs in LDAM-DRW)."""
    from pancls.config import apply_overrides, load_yaml

    data = apply_overrides(load_yaml(config), overrides)
    milestones = data.get("train", {}).get("milestones") or []
    if not milestones:
        raise SystemExit(f"{config}: a DRW variant needs train.milestones in the recipe")
    return int(milestones[0])


def fill(overrides, values: dict) -> list:
    """The variant's ``key=value`` overrides with each placeholder of ``values`` (``{"{seed}": "0", ...}``)
    replaced (plain text replacement: the values may hold JSON braces)."""
    out = []
    for item in overrides:
        for key, value in values.items():
            item = item.replace(key, value)
        out.append(item)
    return out


def cell_name(dataset: str, ratio: float, name: str, seed: int) -> str:
    return f"{dataset}_ir{ratio:g}_{name}_s{seed}"


def run_cell(args, dataset: str, ratio: float, name: str, seed: int) -> dict | None:
    if args.kept:  # report only: the committed results.json of each finished cell, nothing trains
        for folder in args.kept:  # the first folder that holds the cell
            kept = folder / f"{cell_name(dataset, ratio, name, seed)}.json"
            if kept.is_file():
                return json.loads(kept.read_text())
        return None
    head, loss, extra = variant(name)
    values = {"{out}": str(args.out), "{dataset}": dataset, "{ratio}": f"{ratio:g}", "{seed}": str(seed)}
    if any("{first_milestone}" in item for item in extra):
        values["{first_milestone}"] = str(first_milestone(args.config, args.set))
    extra = fill(extra, values)
    out = args.out / cell_name(dataset, ratio, name, seed)
    results = out / "results.json"
    if not results.exists():
        cmd = [sys.executable, "-m", "pancls", "lt", "--config", str(args.config), "--dataset", dataset,
               "--imbalance-ratio", str(ratio), "--head", head, "--loss", loss, "--data", str(args.data),
               "--out", str(out), "--seed", str(seed), "--resume"]
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        if args.device:
            cmd += ["--device", args.device]
        for item in extra + args.set:
            cmd += ["--set", item]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"cell failed: {out}", file=sys.stderr)
            return None
    return json.loads(results.read_text())


def fmt(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    pct = 100 * np.asarray(values)
    return f"{pct.mean():.1f}" if len(pct) == 1 else f"{pct.mean():.1f} ± {pct.std(ddof=1):.1f}"


def _paired(cells: dict, pairs, datasets, ratios, seeds):
    """For each pair ``A:B`` (and dataset x ratio) with at least one seed where both ran:
    ``(dataset, ratio, A, B, seeds, A's top-1 %, B's top-1 %)``, the values in seed order.
    ``cells[(dataset, ratio, variant, seed)]`` is a cell's results.json (None when it did not run)."""
    for dataset in datasets:
        for ratio in ratios:
            for pair in pairs:
                a, b = pair.split(":")
                both = [s for s in seeds if cells.get((dataset, ratio, a, s)) and cells.get((dataset, ratio, b, s))]
                if both:
                    yield (dataset, ratio, a, b, both, [100 * cells[(dataset, ratio, a, s)]["top1"] for s in both],
                           [100 * cells[(dataset, ratio, b, s)]["top1"] for s in both])


def paired_rows(cells: dict, pairs, datasets, ratios, seeds) -> list:
    """Rows of the paired table (:mod:`pancls.eval.paired`), one per pair of :func:`_paired`."""
    from pancls.eval.paired import paired_difference

    rows = []
    for dataset, ratio, a, b, both, a_values, b_values in _paired(cells, pairs, datasets, ratios, seeds):
        r = paired_difference(a_values, b_values)
        per_seed = ", ".join(f"{d:+.1f}" for d in r["differences"])
        interval = "—" if r["lo"] is None else f"[{r['lo']:+.1f}, {r['hi']:+.1f}]"
        sign = "—" if r["sign_test_p"] is None else f"{r['wins']}/{r['n']} seeds, p = {r['sign_test_p']:.2f}"
        rows.append((f"{dataset}-LT", f"{ratio:g}", f"{a} - {b}", per_seed, f"{r['mean']:+.1f}", interval, sign,
                     ",".join(map(str, both))))
    return rows


def paired_panels(cells: dict, pairs, datasets, ratios, seeds, label: str | None = None) -> list:
    """The panels of :func:`pancls.report.figures.paired_seeds_png`, one per pair of :func:`_paired`; ``label``
    (the protocol, e.g. "36 epochs") heads each panel's title."""
    panels = []
    for dataset, ratio, a, b, both, a_values, b_values in _paired(cells, pairs, datasets, ratios, seeds):
        where = f"{dataset}-LT, IR {ratio:g}"
        panels.append({"title": f"{label} ({where})" if label else where, "a": a, "b": b, "seeds": both,
                       "a_values": a_values, "b_values": b_values})
    return panels


def _print_table(header, rows) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--data", type=Path, help="the dataset (needed unless --kept)")
    p.add_argument("--out", type=Path, help="folder of the cells' runs (needed unless --kept)")
    p.add_argument("--kept", type=Path, nargs="+", metavar="DIR",
                   help="report only, from the finished cells' results.json kept as DIR/<cell>.json (the committed "
                        "bench/results/<grid>/; several DIRs: a cell from the first that holds it); nothing trains")
    p.add_argument("--datasets", nargs="+", default=["cifar10"])
    p.add_argument("--ratios", nargs="+", type=float, default=[100.0])
    p.add_argument("--variants", nargs="+", default=["softmax", "tsp_kernel"], choices=VARIANTS,
                   help="recipes in configs/lt_variants/ (file names without .yaml)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int)
    p.add_argument("--device")
    p.add_argument("--set", action="append", default=[], help="extra override for every cell")
    p.add_argument("--pairs", nargs="+", default=[], metavar="A:B",
                   help="paired differences A - B over the seeds (both variants must be in --variants)")
    p.add_argument("--figure", type=Path, metavar="PNG", help="with --pairs: one panel per pair, a line per seed")
    p.add_argument("--no-published", dest="published", action="store_false",
                   help="leave the published rows (Yang et al., Cao et al.) out of the table")
    p.add_argument("--label", help="the protocol, at the head of each figure panel's title (e.g. '36 epochs')")
    args = p.parse_args()
    if not args.kept and (args.data is None or args.out is None):
        p.error("--data and --out are needed to run cells (or give --kept DIR to report kept results)")
    for folder in args.kept or []:
        if not folder.is_dir():
            p.error(f"--kept {folder}: not a folder")
    if args.figure and not args.pairs:
        p.error("--figure draws the --pairs: give at least one A:B")
    for pair in args.pairs:
        names = pair.split(":")
        if len(names) != 2 or any(n not in args.variants for n in names):
            p.error(f"--pairs {pair}: expected A:B with A and B among --variants {args.variants}")

    rows, by_key = [], {}
    for dataset in args.datasets:
        for ratio in args.ratios:
            for name in args.variants:
                cells = [run_cell(args, dataset, ratio, name, s) for s in args.seeds]
                by_key.update({(dataset, ratio, name, s): c for s, c in zip(args.seeds, cells, strict=True)})
                cells = [c for c in cells if c]
                if not cells:
                    continue
                prov = cells[0]["provenance"]
                rows.append((f"{dataset}-LT", f"{ratio:g}", name, fmt([c["top1"] for c in cells]),
                             fmt([c["many_shot_top1"] for c in cells]), fmt([c["medium_shot_top1"] for c in cells]),
                             fmt([c["few_shot_top1"] for c in cells]),
                             f"{prov['device']}, {prov['epochs']} ep, seeds {','.join(str(c['provenance']['seed']) for c in cells)}"))
            for name, value in (PUBLISHED.get((dataset, int(ratio)), {}) if args.published else {}).items():
                rows.append((f"{dataset}-LT", f"{ratio:g}", name, f"{value:.1f}", "", "", "", "published, not run here"))

    _print_table(("dataset", "IR", "variant", "top-1 (last epoch)", "many", "medium", "few", "source"), rows)
    if args.pairs:
        print()
        pairs = paired_rows(by_key, args.pairs, args.datasets, args.ratios, args.seeds)
        if pairs:
            _print_table(("dataset", "IR", "A - B", "per seed (points)", "mean", "95 % paired t interval",
                          "sign test", "seeds"), pairs)
        else:
            print("(no pair has both sides of a seed yet)")
    if args.figure:
        from pancls.report.figures import paired_seeds_png

        panels = paired_panels(by_key, args.pairs, args.datasets, args.ratios, args.seeds, args.label)
        if not panels:
            print(f"no pair has a seed where both ran: {args.figure} not written", file=sys.stderr)
            return 1
        print(f"figure: {paired_seeds_png(panels, args.figure)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
