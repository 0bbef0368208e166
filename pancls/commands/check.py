"""Check a dataset manifest the way `pancls cv` will, and show its class counts.

Every problem is listed at once with its CSV line (missing or unreadable files, unknown labels, duplicates,
a patient with two labels or folds, paths leaving the dataset root, image/mask grid mismatch, empty masks).

Typical use:
  pancls check dataset/manifest.csv
  pancls check dataset/manifest.csv --config pancls/recipes/cv_full.yaml      the recipe's classes and roots

Exit status: 0 the manifest is valid (class counts, per fold when it has a fold column), 2 it is not.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Sequence


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="manifest CSV, e.g. the one `pancls ingest` wrote (DATASET/manifest.csv)")
    add_manifest_arguments(p)
    p.add_argument("--no-images", action="store_true",
                   help="check the table and paths only, without opening the images (e.g. on a machine without them)")


def add_manifest_arguments(p: argparse.ArgumentParser, classes_default: str = "the recipe's, else "
                           "PDAC,IPMN,NET,SCN,ASC,CP") -> None:
    """The options that say how to read a manifest (classes, root, allowed roots): `check`, `export-nnunet`."""
    p.add_argument("--config", type=Path,
                   help="a `pancls cv` YAML recipe: take its data.classes, data.root and data.allowed_roots")
    p.add_argument("--classes", metavar="A,B,...", help=f"allowed labels in class order (default: {classes_default})")
    p.add_argument("--root", type=Path, help="folder no image or mask may leave (default: the manifest's folder)")
    p.add_argument("--allowed-root", dest="allowed_roots", type=Path, action="append", default=[], metavar="DIR",
                   help="a folder the real files behind symbolic links may lie in (repeatable)")


def load_manifest_from_args(args: argparse.Namespace, path: Path, check_images: bool = True,
                            classes: Sequence[str] | None = None):
    """The validated manifest at ``path`` read with the options of :func:`add_manifest_arguments`; ``classes``
    is the default class list when neither --classes nor --config gives one."""
    from pancls.data.classes import DEFAULT_CLASSES
    from pancls.data.manifest import load_manifest

    classes = DEFAULT_CLASSES if classes is None else classes
    root, allowed = args.root, list(args.allowed_roots)
    if args.config is not None:
        from pancls.config import load_yaml
        from pancls.cv import load_config

        data = load_config(load_yaml(args.config)).data
        classes = data.classes
        root = root if root is not None else data.root
        allowed += [Path(p) for p in data.allowed_roots]
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",")]
    return load_manifest(path, classes, root=root, check_images=check_images, allowed_roots=allowed)


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest_from_args(args, args.manifest, check_images=not args.no_images)
    print(report(manifest, images_checked=not args.no_images))
    return 0


def report(manifest, images_checked: bool = True) -> str:
    """The text `pancls check` prints for a valid manifest: size, class counts, per fold when folds exist."""
    table = manifest.table
    n_masks = int(table["mask"].notna().sum()) if "mask" in table else 0
    lines = [f"{manifest.path}: valid ({len(manifest)} volumes, {len(manifest.patients())} patients, "
             f"{n_masks} with a mask{'' if images_checked else '; images not opened'})"]
    counts = manifest.class_counts()
    rows: List[List[str]] = [["", *manifest.classes, "total"]]
    if "fold" in table:
        for fold in sorted(table["fold"].unique()):
            part = table[table["fold"] == fold]["label"].value_counts()
            rows.append([f"fold {fold}", *[str(int(part.get(c, 0))) for c in manifest.classes], str(int(part.sum()))])
    rows.append(["all", *[str(counts[c]) for c in manifest.classes], str(sum(counts.values()))])
    lines += _columns(rows)
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        lines.append(f"note: no volume of class {', '.join(empty)}")
    if "fold" in table:
        missing: Dict[str, List[str]] = {}
        for fold in sorted(table["fold"].unique()):
            present = set(table[table["fold"] == fold]["label"])
            for c in manifest.classes:
                if counts[c] and c not in present:
                    missing.setdefault(c, []).append(str(fold))
        for c, folds in missing.items():
            lines.append(f"note: class {c} is absent from fold(s) {', '.join(folds)}")
    return "\n".join(lines)


def _columns(rows: List[List[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]
