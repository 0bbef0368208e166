"""A pancls dataset (its validated manifest) as an nnU-Net v2 raw dataset, so the same cohort can go to nnU-Net.

The layout is nnU-Net v2's ``documentation/dataset_format.md`` (raw dataset) and ``manual_data_splits.md``::

    OUT/dataset.json        channel_names {"0": "CT"}, labels, numTraining, file_ending ".nii.gz"
    OUT/imagesTr/case_0001_0000.nii.gz   a symbolic link to the manifest's image (a copy with copy=True)
    OUT/labelsTr/case_0001.nii.gz        the row's mask, when the manifest has a mask column
    OUT/splits_final.json   [{"train": [case ids], "val": [case ids]}, ...] one entry per fold
    OUT/cases.csv           case_id, patient_id, label (the pancls class), fold: the way back to the manifest

Case ids are ``case_`` + the row's number in the manifest (1-based, zero-padded to 4 digits): they carry no
identifier at all, not even the pseudonymous one; ``cases.csv`` maps them to the manifest's ``patient_id``.

``labels``: nnU-Net trains segmentations, so its ``labels`` are the values of the masks, not the pancls
classes (which nnU-Net has no field for; they go to ``cases.csv``). nnU-Net needs ``background`` = 0 and
consecutive integers; a binary lesion mask (0/1, what ``pancls synth`` and ``pancls ingest --masks`` write)
becomes ``{"background": 0, "lesion": 1}``, a mask with values 0..m ``{"background": 0, "label_1": 1, ...,
"label_m": m}``. Without a mask column there is no ``labelsTr/`` and ``labels`` is ``{"background": 0}``
(nnU-Net's planning needs segmentations: the export then only carries the images and the splits).

``splits_final.json`` comes from a ``pancls cv`` run's ``splits.json`` (its held-out test fold k is nnU-Net's
``val`` of fold k; the inner validation patients pancls uses for model selection are part of ``train``) or
from the manifest's ``fold`` column. Folds stay patient-grouped: every case of a patient is in the same
``val``. nnU-Net's trainer reads the file from ``nnUNet_preprocessed/DatasetNNN_Name/``; its
``nnUNetv2_plan_and_preprocess`` copies it there from the raw folder (nnunetv2 2.6.2, checked; an older
release may need a manual copy). Without it nnU-Net makes its own random 5 folds, not grouped by patient.

Checked with nnunetv2 2.6.2 on the synthetic cohort: ``verify_dataset_integrity`` passes and
``nnUNetv2_plan_and_preprocess -c 3d_fullres`` preprocesses every case and takes over ``splits_final.json``.

The whole dataset is written into a temporary folder beside ``OUT`` and renamed onto it at the end: an
interrupted export leaves no half-written dataset, and the folder a SIGKILL leaves (with ``--copy``, copies of
the images) is removed by the next export (:func:`pancls.io.owned_temp_dir`).
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pancls.errors import UserError
from pancls.io import atomic_write_json, atomic_write_text, owned_temp_dir, publish_temp_dir

FILE_ENDING = ".nii.gz"
CHANNEL_NAMES = {"0": "CT"}  # "CT": nnU-Net's global foreground-intensity normalisation, what HU volumes need
#: nnU-Net finds a dataset as nnUNet_raw/DatasetNNN_Name (a three-digit id and a name).
DATASET_NAME = re.compile(r"^Dataset[0-9]{3}_[A-Za-z0-9_.-]+$")


def case_ids(n: int) -> List[str]:
    """``case_0001`` ... for ``n`` rows (more digits past 9999): the row's position, nothing else."""
    width = max(4, len(str(n)))
    return [f"case_{i:0{width}d}" for i in range(1, n + 1)]


def mask_labels(values: Sequence[int]) -> Dict[str, int]:
    """nnU-Net's ``labels`` (name -> int, background 0, consecutive) for the values found in the masks."""
    top = max([0, *values])
    if top == 1:
        return {"background": 0, "lesion": 1}
    return {"background": 0, **{f"label_{v}": v for v in range(1, top + 1)}}


def _mask_values(path: Path) -> List[int]:
    """The distinct voxel values of a mask; non-integer or negative values are refused (nnU-Net segmentations
    are maps of non-negative integer labels)."""
    import nibabel as nib

    values = np.unique(np.asanyarray(nib.load(path).dataobj))
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)) or np.any(values < 0):
        bad = values[~np.isfinite(values) | (values != np.round(values)) | (values < 0)][:3]
        raise UserError(f"nnU-Net segmentations hold integer labels >= 0; this mask has {', '.join(map(str, bad))}",
                        path)
    return [int(v) for v in values]


def nnunet_splits(patients: Sequence[str], fold_of: Dict[str, int], ids: Sequence[str]) -> List[Dict[str, List[str]]]:
    """nnU-Net's split list: for fold k, ``val`` = the cases of the patients in fold k, ``train`` = the rest.

    ``patients[i]`` is the patient of case ``ids[i]``; ``fold_of`` gives each patient's fold (0..F-1, all used)."""
    folds = sorted(set(fold_of[p] for p in patients))
    if len(folds) < 2 or folds != list(range(len(folds))):
        raise UserError(f"the folds are {folds}; nnU-Net's splits need folds 0..F-1 with F >= 2", "folds")
    return [{"train": [c for c, p in zip(ids, patients, strict=True) if fold_of[p] != k],
             "val": [c for c, p in zip(ids, patients, strict=True) if fold_of[p] == k]} for k in folds]


def _fold_of(manifest, splits: Optional[Dict[str, Any]], splits_path: Optional[Path]) -> Optional[Dict[str, int]]:
    """Each patient's fold from a cv run's splits.json (checked against the manifest) or the fold column."""
    from pancls.data.splits import manifest_fingerprint

    if splits is not None:
        where = splits_path or "--splits"
        if not isinstance(splits, dict) or not isinstance(splits.get("test_fold"), dict):
            raise UserError("not a `pancls cv` splits.json (no test_fold mapping)", where)
        if splits.get("manifest_sha256") != manifest_fingerprint(manifest.records(), manifest.root):
            raise UserError("these splits were made from another manifest (or another class order); export the "
                            "manifest the cv run used", where)
        return {str(p): int(k) for p, k in splits["test_fold"].items()}
    if "fold" in manifest.table:
        return {str(p): int(k) for p, k in zip(manifest.table["patient_id"], manifest.table["fold"], strict=True)}
    return None


def check_out(out: Path) -> None:
    """Refuse an --out that exists and is not an empty folder, or whose folder cannot be made or written; creates
    nothing (the export makes the parent once the manifest was read)."""
    from pancls.io import check_creatable

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError("exists and is not an empty folder; choose a new --out (nothing was written)", out)
    check_creatable(Path(os.path.abspath(out)).parent, "folder of --out")


def export(manifest, out: Path, splits: Optional[Dict[str, Any]] = None, splits_path: Optional[Path] = None,
           copy: bool = False, log: Callable[[str], None] = lambda _: None) -> Dict[str, Any]:
    """Write ``manifest`` (a validated :class:`pancls.data.manifest.Manifest`) as nnU-Net raw dataset ``out``.

    Returns a summary; ``log`` gets the notes a user should read (where splits_final.json goes, ...).
    """
    import nibabel as nib

    from pancls import __version__

    out = Path(out)
    check_out(out)
    table = manifest.table
    rows = table.to_dict("records")
    ids = case_ids(len(rows))
    patients = [str(r["patient_id"]) for r in rows]
    has_masks = "mask" in table
    if has_masks:
        missing = [i for i, r in enumerate(rows) if not isinstance(r.get("mask"), str)]
        if missing:
            raise UserError(f"{len(missing)} of {len(rows)} rows have no mask (first: CSV line {table.index[missing[0]]}); "
                            "nnU-Net needs a segmentation for every training case: give every row a mask, or "
                            "export a manifest without the mask column", manifest.path)
    not_gz = [r["image"] for r in rows if not r["image"].endswith(FILE_ENDING)]
    not_gz += [r["mask"] for r in rows if has_masks and not r["mask"].endswith(FILE_ENDING)]
    if not_gz and not copy:
        raise UserError(f"{len(not_gz)} image/mask file(s) are not {FILE_ENDING} (first: {not_gz[0]}); nnU-Net needs one "
                        f"file ending for the whole dataset: pass --copy to write them as {FILE_ENDING}", manifest.path)
    fold_of = _fold_of(manifest, splits, splits_path)
    split_list = None
    if fold_of is not None:
        unknown = sorted(set(patients) - set(fold_of))
        if unknown:
            raise UserError(f"{len(unknown)} patient(s) of the manifest are in no fold of the splits", splits_path or "--splits")
        split_list = nnunet_splits(patients, fold_of, ids)

    def place(source: str, target: Path) -> None:
        if not copy:
            os.symlink(os.path.abspath(source), target)
        elif source.endswith(FILE_ENDING):
            shutil.copyfile(source, target)
        else:  # .nii and the other formats nibabel reads: the same voxels and affine, gzip-compressed NIfTI
            img = nib.load(source)
            nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header), target)

    parent = Path(os.path.abspath(out)).parent
    parent.mkdir(parents=True, exist_ok=True)
    # built beside out and renamed onto it; a build a kill left (patient images, with --copy) goes on the next export
    with owned_temp_dir(f".{out.name}.nnunet-", parent) as tmp:
        (tmp / "imagesTr").mkdir()
        values = set()
        if has_masks:
            (tmp / "labelsTr").mkdir()
        for case, row in zip(ids, rows, strict=True):
            place(row["image"], tmp / "imagesTr" / f"{case}_0000{FILE_ENDING}")
            if has_masks:
                values.update(_mask_values(Path(row["mask"])))
                place(row["mask"], tmp / "labelsTr" / f"{case}{FILE_ENDING}")
        labels = mask_labels(sorted(values)) if has_masks else {"background": 0}
        atomic_write_json(tmp / "dataset.json", {
            "channel_names": CHANNEL_NAMES,
            "labels": labels,
            "numTraining": len(rows),
            "file_ending": FILE_ENDING,
            "name": out.name,
            "description": f"exported by pancls {__version__} (pancls export-nnunet): {len(rows)} CT volumes of "
                           f"{len(set(patients))} patients; the pancls class of each case is in cases.csv",
        })
        if split_list is not None:
            atomic_write_json(tmp / "splits_final.json", split_list)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["case_id", "patient_id", "label", *(["fold"] if fold_of is not None else [])])
        for case, row, pid in zip(ids, rows, patients, strict=True):
            writer.writerow([case, pid, row["label"], *([fold_of[pid]] if fold_of is not None else [])])
        atomic_write_text(tmp / "cases.csv", text.getvalue())
        publish_temp_dir(tmp, out)  # onto a missing or empty folder: the dataset appears whole or not at all

    if not DATASET_NAME.match(out.name):
        log(f"note: nnU-Net finds datasets as $nnUNet_raw/DatasetNNN_Name (e.g. Dataset501_Pancreas); rename {out.name} "
            "when you move it there")
    if split_list is not None:
        log("note: nnUNetv2_plan_and_preprocess copies splits_final.json into $nnUNet_preprocessed/DatasetNNN_Name/, "
            "where nnU-Net's trainer reads it (nnunetv2 2.6.2; with an older release copy it there yourself)")
    else:
        log("note: no splits (no --splits and no fold column): nnU-Net will make its own random 5 folds, which "
            "are not grouped by patient")
    if not has_masks:
        log("note: the manifest has no mask column: no labelsTr/, and nnU-Net training needs a segmentation per case")
    return {"out": str(out), "cases": len(rows), "patients": len(set(patients)),
            "segmentations": len(rows) if has_masks else 0, "labels": labels,
            "folds": len(split_list) if split_list is not None else 0,
            "splits_from": ("splits.json" if splits is not None else "fold column") if split_list is not None else None,
            "images": "copied" if copy else "linked"}


def load_splits(path: Path) -> Tuple[Path, Dict[str, Any]]:
    """``(file, content)`` of a ``pancls cv`` run's ``splits.json`` (a run folder stands for its splits.json)."""
    from pancls.data.splits import read_splits

    path = Path(path)
    if path.is_dir():
        path = path / "splits.json"
    if not path.is_file():
        raise UserError("not found (give a `pancls cv` run's splits.json)", path)
    return path, read_splits(path)
