"""Patient-level cross-validation splits, written once into the run folder and re-read (after nnU-Net's
``splits_final.json``).

Outer folds: scikit-learn's :class:`~sklearn.model_selection.StratifiedGroupKFold` over the manifest's rows,
grouped by ``patient_id`` (no patient is in two test folds) and stratified by label, with a fixed seed; or the
manifest's own ``fold`` column when it has one. Inner validation: for each outer fold, one fold of a second
``StratifiedGroupKFold`` over the *training* patients of that fold only, so that model and temperature
selection never see the held-out fold.

``splits.json`` records the manifest's fingerprint (a SHA-256 of the patient/label/image table, not of any
identifier alone); a run folder whose manifest has changed is refused instead of being silently re-split.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from pancls.errors import UserError, exception_text
from pancls.io import atomic_write_json, read_json

SPLITS = "splits.json"
SPLITS_VERSION = 1


def manifest_fingerprint(records: Sequence[Dict[str, Any]], root: Path) -> str:
    """SHA-256 of the rows that define the splits: patient, label, fold and the image/mask paths relative to
    the dataset root (so that a moved dataset keeps its splits)."""
    rows = []
    for r in records:
        rel = {k: str(Path(r[k]).resolve().relative_to(root.resolve())) if Path(r[k]).is_absolute() else r[k]
               for k in ("image", "mask") if k in r}
        rows.append([r["patient_id"], int(r["label"]), r.get("fold"), rel.get("image"), rel.get("mask")])
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def check_class_sizes(records: Sequence[Dict[str, Any]], classes: Sequence[str], folds: int) -> None:
    """Every class needs at least ``folds`` patients, or some test fold has none of it: one error with the
    counts per class."""
    per_class = Counter()
    for _pid, label in {(r["patient_id"], int(r["label"])) for r in records}:
        per_class[label] += 1
    small = [k for k in range(len(classes)) if per_class[k] < folds]
    if small:
        counts = ", ".join(f"{classes[k]} {per_class[k]}" for k in range(len(classes)))
        raise UserError(f"{folds} folds need at least {folds} patients in every class; "
                        f"{', '.join(classes[k] for k in small)} ha{'s' if len(small) == 1 else 've'} fewer "
                        f"(patients per class: {counts}); lower --folds or merge classes", "--folds")


def _group_kfold(patients: List[str], labels: List[int], folds: int, seed: int) -> List[int]:
    """Fold index of each patient from StratifiedGroupKFold (one row per patient)."""
    from sklearn.model_selection import StratifiedGroupKFold

    order = np.arange(len(patients))
    out = np.full(len(patients), -1)
    with warnings.catch_warnings():  # "the least populated class has only n members": reported by us instead
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        for k, (_, test) in enumerate(splitter.split(order, labels, groups=patients)):
            out[test] = k
    return out.tolist()


def make_splits(records: Sequence[Dict[str, Any]], classes: Sequence[str], folds: int, seed: int,
                inner_folds: int, root: Path) -> Dict[str, Any]:
    """The outer test fold of every patient and, per outer fold, its inner validation patients."""
    if folds < 2:
        raise UserError(f"must be >= 2, got {folds}", "--folds")
    if inner_folds < 2:
        raise UserError(f"must be >= 2, got {inner_folds}", "cv.inner_folds")
    patients = list(dict.fromkeys(r["patient_id"] for r in records))
    label_of = {r["patient_id"]: int(r["label"]) for r in records}
    labels = [label_of[p] for p in patients]
    given = {r["patient_id"]: r["fold"] for r in records if r.get("fold") is not None}
    if given:
        if len(given) != len(patients):
            raise UserError(f"the fold column is filled for {len(given)} of {len(patients)} patients; fill it for "
                            "all or for none", "manifest fold")
        values = sorted(set(given.values()))
        if values != list(range(folds)):
            raise UserError(f"the manifest's fold column holds {values}, but --folds {folds} needs exactly "
                            f"0..{folds - 1}", "manifest fold")
        outer = [int(given[p]) for p in patients]
        source = "manifest fold column"
    else:
        check_class_sizes(records, classes, folds)
        outer = _group_kfold(patients, labels, folds, seed)
        source = f"StratifiedGroupKFold(n_splits={folds}, shuffle=True, random_state={seed}), grouped by patient"
    test = {p: k for p, k in zip(patients, outer, strict=True)}
    inner = {}
    for k in range(folds):
        train_p = [p for p in patients if test[p] != k]
        train_y = [label_of[p] for p in train_p]
        per_class = Counter(train_y)
        absent = [classes[c] for c in range(len(classes)) if not per_class[c]]
        if absent:  # refused here, before the run folder exists, not when fold k starts training
            fix = ("the manifest's fold column puts every such patient in that fold" if given
                   else "lower --folds")
            raise UserError(f"fold {k}: no training patient of class {', '.join(absent)}; {fix}",
                            "manifest fold" if given else "--folds")
        try:
            inner_k = _group_kfold(train_p, train_y, inner_folds, seed + 1000 + k)
        except ValueError as exc:  # scikit-learn: too few patients per class for n_splits groups
            counts = ", ".join(f"{classes[c]} {per_class[c]}" for c in range(len(classes)))
            raise UserError(f"fold {k}'s training patients (per class: {counts}) cannot be split into "
                            f"{inner_folds} inner folds ({exception_text(exc)}); lower cv.inner_folds",
                            "cv.inner_folds") from None
        inner[str(k)] = sorted(p for p, f in zip(train_p, inner_k, strict=True) if f == 0)
        left = Counter(label_of[p] for p, f in zip(train_p, inner_k, strict=True) if f != 0)
        gone = [c for c in range(len(classes)) if not left[c]]
        if gone:  # the model would train without the class
            counts = ", ".join(f"{classes[c]} {per_class[c]}" for c in gone)
            raise UserError(f"fold {k}: the inner validation split takes every training patient of class "
                            f"{', '.join(classes[c] for c in gone)} (fold {k} trains on {counts}); lower "
                            f"{'--folds' if not given else 'cv.inner_folds'} or add patients of the class",
                            "manifest fold" if given else "--folds")
    return {
        "version": SPLITS_VERSION,
        "folds": folds,
        "seed": seed,
        "inner_folds": inner_folds,
        "source": source,
        "inner_source": f"fold 0 of StratifiedGroupKFold(n_splits={inner_folds}) over each fold's training "
                        "patients (seed + 1000 + fold)",
        "manifest_sha256": manifest_fingerprint(records, root),
        "classes": list(classes),
        "test_fold": test,
        "inner_validation": inner,
    }


def load_or_make_splits(run_dir: Path, records: Sequence[Dict[str, Any]], classes: Sequence[str], folds: int,
                        seed: int, inner_folds: int, root: Path,
                        check: Optional[Callable[[Dict[str, Any]], Any]] = None) -> Dict[str, Any]:
    """Reuse ``run_dir/splits.json`` when it matches the manifest and the fold settings; write it otherwise.
    ``check(splits)`` runs before the file is written (a refusal there leaves no folder behind).

    A changed manifest or different ``folds``/``seed`` is refused with the reason: re-splitting an existing
    run would mix models trained on different partitions.
    """
    path = run_dir / SPLITS
    current = manifest_fingerprint(records, root)
    if path.exists():
        stored = read_splits(path)
        if stored.get("manifest_sha256") != current:
            raise UserError("this run folder was split from a different manifest (its content changed since); "
                            "use a new --out, or restore the manifest the run was made with", path)
        for key, value in (("folds", folds), ("seed", seed), ("inner_folds", inner_folds)):
            if stored.get(key) != value:
                raise UserError(f"this run was split with {key}={stored.get(key)}, not {value}; use a new --out "
                                f"or the run's own setting", path)
        if check is not None:
            check(stored)
        return stored
    splits = make_splits(records, classes, folds, seed, inner_folds, root)  # a refusal here leaves no folder
    if check is not None:
        check(splits)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, splits)
    return splits


def read_splits(path: Path) -> Dict[str, Any]:
    """A ``splits.json`` (of this module's :func:`make_splits`); one line when it is missing or damaged."""
    splits = read_json(path, "run's splits", dict)
    if not isinstance(splits.get("classes"), list) or not isinstance(splits.get("test_fold"), dict):
        raise UserError("the run's splits are damaged: no class list or test folds", path)
    return splits


def fold_records(records: Sequence[Dict[str, Any]], splits: Dict[str, Any], fold: int) -> Dict[str, List[Dict[str, Any]]]:
    """``{"train", "val", "test"}`` rows of outer fold ``fold``; train and val are disjoint from test and
    from each other (asserted: a violated split is a bug, never data)."""
    test_fold, inner = splits["test_fold"], set(splits["inner_validation"][str(fold)])
    out: Dict[str, List[Dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for r in records:
        p = r["patient_id"]
        part = "test" if test_fold[p] == fold else "val" if p in inner else "train"
        out[part].append(r)
    ids = {k: {r["patient_id"] for r in v} for k, v in out.items()}
    assert not (ids["train"] & ids["test"] or ids["val"] & ids["test"] or ids["train"] & ids["val"])
    return out


def check_fold(fold: Optional[int], folds: int) -> None:
    if fold is not None and not 0 <= fold < folds:
        raise UserError(f"must be in 0..{folds - 1} for {folds} folds, got {fold}", "--fold")
