"""Patient-level CV splits: integrity, inner validation, fold column, refusals."""
import json
from pathlib import Path

import pytest

from pancls.data.splits import check_class_sizes, fold_records, load_or_make_splits, make_splits
from pancls.errors import UserError

CLASSES = ["PDAC", "IPMN", "NET", "SCN", "ASC", "CP"]
COUNTS = {"PDAC": 315, "IPMN": 82, "NET": 60, "SCN": 45, "ASC": 20, "CP": 8}  # the paper's cohort size


def cohort(two_volumes_every=7):
    """530 patients at the paper's counts; every 7th patient has two volumes (e.g. two phases)."""
    records, n = [], 0
    for label, count in enumerate(COUNTS.values()):
        for _ in range(count):
            pid = f"p{n:03d}"
            for v in range(2 if n % two_volumes_every == 0 else 1):
                records.append({"patient_id": pid, "image": f"images/{pid}_{v}.nii.gz", "label": label})
            n += 1
    return records


def test_no_patient_in_two_test_folds_and_inner_split_is_disjoint(tmp_path):
    records = cohort()
    splits = make_splits(records, CLASSES, folds=4, seed=0, inner_folds=5, root=tmp_path)
    assert len(splits["test_fold"]) == 530 and set(splits["test_fold"].values()) == {0, 1, 2, 3}
    seen = set()
    for k in range(4):
        parts = fold_records(records, splits, k)
        test = {r["patient_id"] for r in parts["test"]}
        train = {r["patient_id"] for r in parts["train"]}
        val = {r["patient_id"] for r in parts["val"]}
        assert not (test & train) and not (test & val) and not (train & val)
        assert not (test & seen)
        seen |= test
        # both volumes of a two-volume patient stay together
        assert sum(r["patient_id"] == "p000" for r in parts["test"]) in (0, 2)
        # stratified: each test fold holds 2 CP patients (8 / 4) and 78-79 PDAC
        labels = {r["patient_id"]: r["label"] for r in parts["test"]}
        assert list(labels.values()).count(5) == 2
        assert 76 <= list(labels.values()).count(0) <= 81
        # the inner validation split is about a fifth of the training patients, every class present
        assert 0.15 < len(val) / (len(val) + len(train)) < 0.25
        assert {r["label"] for r in parts["val"]} == set(range(6))
    assert seen == {r["patient_id"] for r in records}


def test_same_seed_same_splits_other_seed_other_splits(tmp_path):
    a = make_splits(cohort(), CLASSES, 4, 0, 5, tmp_path)
    assert a == make_splits(cohort(), CLASSES, 4, 0, 5, tmp_path)
    assert a["test_fold"] != make_splits(cohort(), CLASSES, 4, 1, 5, tmp_path)["test_fold"]


def test_class_smaller_than_folds_is_one_error_with_counts():
    records = [r for r in cohort() if not (r["label"] == 5 and r["patient_id"] > "p524")]
    with pytest.raises(UserError, match=r"CP has fewer.*CP 3.*--folds") as exc:
        check_class_sizes(records, CLASSES, 4)
    assert "\n" not in str(exc.value) and "PDAC 315" in str(exc.value)


def test_fold_column_overrides_and_is_checked(tmp_path):
    records = cohort()
    for r in records:
        r["fold"] = int(r["patient_id"][1:]) % 4
    splits = make_splits(records, CLASSES, 4, 0, 5, tmp_path)
    assert splits["source"] == "manifest fold column"
    assert all(splits["test_fold"][r["patient_id"]] == r["fold"] for r in records)
    with pytest.raises(UserError, match="needs exactly 0..4"):
        make_splits(records, CLASSES, 5, 0, 5, tmp_path)


def test_splits_written_once_and_a_changed_manifest_is_refused(tmp_path):
    records = cohort()
    first = load_or_make_splits(tmp_path, records, CLASSES, 4, 0, 5, tmp_path)
    stored = json.loads((tmp_path / "splits.json").read_text())
    assert stored == first
    assert load_or_make_splits(tmp_path, records, CLASSES, 4, 0, 5, tmp_path) == first
    changed = [dict(r) for r in records]
    changed[3]["label"] = 1
    with pytest.raises(UserError, match="different manifest"):
        load_or_make_splits(tmp_path, changed, CLASSES, 4, 0, 5, tmp_path)
    with pytest.raises(UserError, match="folds=4, not 5"):
        load_or_make_splits(tmp_path, records, CLASSES, 5, 0, 5, tmp_path)


def test_splits_hold_no_identifier_beyond_the_manifest_pseudonyms(tmp_path):
    splits = make_splits(cohort(), CLASSES, 4, 0, 5, Path(tmp_path))
    text = json.dumps(splits)
    assert "images/" not in text  # paths go into the fingerprint only


def test_an_inner_split_that_takes_all_of_a_class_is_refused_before_anything_is_written(tmp_path):
    """A class of 2 patients and 2 folds: fold k trains on 1 patient of it, which the inner validation split
    may take; the model would then train without the class. Refused with the fold and the class named."""
    records = [{"patient_id": f"a{i:02d}", "image": f"a{i}.nii.gz", "label": 0} for i in range(20)]
    records += [{"patient_id": f"b{i}", "image": f"b{i}.nii.gz", "label": 1} for i in range(2)]
    refused = 0
    for seed in range(12):
        try:
            splits = make_splits(records, ["A", "B"], folds=2, seed=seed, inner_folds=2, root=tmp_path)
        except UserError as exc:
            refused += 1
            assert exc.where == "--folds" and "takes every training patient of class B" in exc.reason
            continue
        for k in range(2):  # accepted: every fold trains on both classes
            assert {r["label"] for r in fold_records(records, splits, k)["train"]} == {0, 1}
    assert 0 < refused < 12  # both cases occur over these seeds
    assert not list(tmp_path.iterdir())
