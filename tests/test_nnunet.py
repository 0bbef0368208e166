"""`pancls export-nnunet`: the files against nnU-Net v2's documented raw-dataset schema (dataset_format.md,
manual_data_splits.md), on the tiny synthetic cohort."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from pancls.cli import main
from pancls.data.classes import DEFAULT_CLASSES
from pancls.data.manifest import load_manifest
from pancls.data.splits import make_splits
from pancls.errors import UserError
from pancls.nnunet import case_ids, mask_labels


def check_nnunet_v2_raw(out: Path) -> dict:
    """nnU-Net v2's rules for a raw dataset folder (documentation/dataset_format.md); returns dataset.json."""
    ds = json.loads((out / "dataset.json").read_text())
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        assert key in ds, key
    assert all(re.fullmatch(r"[0-9]+", k) and isinstance(v, str) for k, v in ds["channel_names"].items())
    labels = ds["labels"]  # name -> int (v2; v1 had int -> name), background 0, consecutive integers
    assert labels["background"] == 0 and sorted(labels.values()) == list(range(len(labels)))
    ending = ds["file_ending"]
    channels = sorted(ds["channel_names"])
    images = sorted(p.name for p in (out / "imagesTr").iterdir())
    pattern = re.compile(rf"^(.+)_([0-9]{{4}}){re.escape(ending)}$")
    cases = sorted({pattern.match(n).group(1) for n in images})
    assert ds["numTraining"] == len(cases)
    for case in cases:  # every case has every channel, and its segmentation
        assert all(f"{case}_{int(c):04d}{ending}" in images for c in channels)
        seg = out / "labelsTr" / f"{case}{ending}"
        img = nib.load(out / "imagesTr" / f"{case}_0000{ending}")
        m = nib.load(seg)
        assert m.shape == img.shape and np.allclose(m.affine, img.affine, atol=1e-3)
        assert set(np.unique(np.asanyarray(m.dataobj)).astype(int)) <= set(labels.values())
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}{ending}" for c in cases]
    splits_file = out / "splits_final.json"
    if splits_file.exists():  # a list of {"train": [...], "val": [...]}, one per fold
        splits = json.loads(splits_file.read_text())
        assert isinstance(splits, list) and splits
        for s in splits:
            assert set(s) == {"train", "val"} and s["val"]
            assert not set(s["train"]) & set(s["val"]) and sorted(s["train"] + s["val"]) == cases
        assert sorted(c for s in splits for c in s["val"]) == cases  # each case validated exactly once
    return ds


def _cases(out: Path):
    with open(out / "cases.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_export_with_cv_splits_follows_the_nnunet_v2_schema(cohort, tmp_path, capsys):
    manifest = load_manifest(cohort / "manifest.csv", DEFAULT_CLASSES)
    splits = make_splits(manifest.records(), DEFAULT_CLASSES, folds=4, seed=0, inner_folds=3, root=manifest.root)
    run = tmp_path / "run"
    run.mkdir()
    (run / "splits.json").write_text(json.dumps(splits))
    out = tmp_path / "nnUNet_raw" / "Dataset501_Synth"
    code = main(["export-nnunet", str(cohort), "--out", str(out), "--splits", str(run / "splits.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    n = len(manifest)
    assert summary["cases"] == n == 24 and summary["folds"] == 4 and summary["images"] == "linked"
    ds = check_nnunet_v2_raw(out)
    assert ds["channel_names"] == {"0": "CT"} and ds["file_ending"] == ".nii.gz"
    assert ds["labels"] == {"background": 0, "lesion": 1}  # the synthetic masks are 0/1 lesion masks
    assert "copies splits_final.json into $nnUNet_preprocessed" in captured.err and "rename" not in captured.err

    # the images are links to the manifest's files, in manifest order, named by row number only
    rows = manifest.table.to_dict("records")
    assert [c["case_id"] for c in _cases(out)] == case_ids(n) == [f"case_{i:04d}" for i in range(1, n + 1)]
    for case, row in zip(case_ids(n), rows, strict=True):
        link = out / "imagesTr" / f"{case}_0000.nii.gz"
        assert link.is_symlink() and os.path.samefile(link, row["image"])
        assert os.path.samefile(out / "labelsTr" / f"{case}.nii.gz", row["mask"])
    names = " ".join(p.name for p in out.rglob("*"))
    assert not any(pid in names for pid in manifest.patients())  # SYN0001...: not in a file name

    # nnU-Net's fold k validates on pancls's test fold k; every patient's cases stay together
    by_case = {c["case_id"]: c for c in _cases(out)}
    for k, fold in enumerate(json.loads((out / "splits_final.json").read_text())):
        assert {by_case[c]["patient_id"] for c in fold["val"]} == {p for p, f in splits["test_fold"].items() if f == k}
        assert {int(by_case[c]["fold"]) for c in fold["val"]} == {k}
    assert [c["label"] for c in _cases(out)] == [r["label"] for r in rows]
    assert not list(tmp_path.glob("nnUNet_raw/.*"))  # no temporary folder left


def test_fold_column_copy_and_a_plain_name(cohort, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(cohort, ds)
    lines = (ds / "manifest.csv").read_text().splitlines()
    folds = {}
    rows = [lines[0] + ",fold"]
    for line in lines[1:]:
        pid = line.split(",")[0]
        folds.setdefault(pid, len(folds) % 3)
        rows.append(f"{line},{folds[pid]}")
    (ds / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "export"
    out.mkdir()  # an empty folder is fine
    code = main(["export-nnunet", str(ds / "manifest.csv"), "--out", str(out), "--copy"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["splits_from"] == "fold column"
    check_nnunet_v2_raw(out)
    assert "DatasetNNN_Name" in captured.err  # the folder name nnU-Net needs
    splits = json.loads((out / "splits_final.json").read_text())
    assert len(splits) == 3
    first = out / "imagesTr" / "case_0001_0000.nii.gz"
    assert not first.is_symlink() and first.read_bytes() == (ds / "images" / "SYN0001.nii.gz").read_bytes()
    by_case = {c["case_id"]: int(c["fold"]) for c in _cases(out)}
    assert [sorted({by_case[c] for c in s["val"]}) for s in splits] == [[0], [1], [2]]


def test_refusals_are_one_line_and_write_nothing(cohort, tmp_path, capsys):
    out = tmp_path / "Dataset502_X"
    out.mkdir()
    (out / "old.txt").write_text("x")
    code = main(["export-nnunet", str(cohort), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not an empty folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]

    # splits of another manifest (one patient's label changed)
    manifest = load_manifest(cohort / "manifest.csv", DEFAULT_CLASSES)
    records = manifest.records()
    records[0] = {**records[0], "label": (records[0]["label"] + 1) % len(DEFAULT_CLASSES)}
    for seed in range(50):  # a tiny cohort: some seeds' inner splits take all of a class's training patients
        try:
            splits = make_splits(records, DEFAULT_CLASSES, folds=2, seed=seed, inner_folds=2, root=manifest.root)
            break
        except UserError:
            continue
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    fresh = tmp_path / "Dataset503_Y"
    code = main(["export-nnunet", str(cohort), "--out", str(fresh), "--splits", str(tmp_path / "splits.json")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "another manifest" in err
    assert not fresh.exists() and not list(tmp_path.glob(".Dataset503_Y*"))

    # a mask column with an empty cell: nnU-Net needs a segmentation per case
    ds = tmp_path / "ds"
    shutil.copytree(cohort, ds)
    lines = (ds / "manifest.csv").read_text().splitlines()
    head = lines[0].split(",")
    cells = lines[2].split(",")
    cells[head.index("mask")] = ""
    lines[2] = ",".join(cells)
    (ds / "manifest.csv").write_text("\n".join(lines) + "\n")
    code = main(["export-nnunet", str(ds), "--out", str(fresh)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "1 of 24 rows have no mask (first: CSV line 3)" in err
    assert not fresh.exists()
    # the same refusal under a folder that does not exist yet: nothing made on the way
    assert main(["export-nnunet", str(ds), "--out", str(tmp_path / "new" / "a" / "Dataset504_Z")]) == 2
    assert not (tmp_path / "new").exists() and "rows have no mask" in capsys.readouterr().err
    # a parent that is a file, or where no one can write (/proc, root included): one line, no traceback
    (tmp_path / "typo.yaml").write_text("x")
    for out in (tmp_path / "typo.yaml" / "Dataset505_Z", Path("/proc/x/Dataset505_Z")):
        assert main(["export-nnunet", str(cohort), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "folder of --out" in err[0], err


def test_a_rerun_removes_the_build_a_kill_left(cohort, tmp_path, capsys):
    left = tmp_path / ".Dataset506_K.nnunet-abc123"  # a SIGKILL mid-export: its lock died with it
    (left / "imagesTr").mkdir(parents=True)
    (left / ".lock").touch()
    (left / "imagesTr" / "case_000_0000.nii.gz").write_bytes(b"copied patient image")
    assert main(["export-nnunet", str(cohort), "--out", str(tmp_path / "Dataset506_K"), "--copy"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset506_K"]
    assert not (tmp_path / "Dataset506_K" / ".lock").exists()
    assert oct(os.stat(tmp_path / "Dataset506_K").st_mode & 0o777) != "0o700"


def test_mask_labels_follow_nnunet_rules():
    assert mask_labels([0, 1]) == {"background": 0, "lesion": 1}
    assert mask_labels([0, 3]) == {"background": 0, "label_1": 1, "label_2": 2, "label_3": 3}
    assert mask_labels([0]) == {"background": 0}
    assert case_ids(10000)[-1] == "case_10000" and case_ids(3) == ["case_0001", "case_0002", "case_0003"]
