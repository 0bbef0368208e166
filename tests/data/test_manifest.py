"""Manifest loading and validation. The dataset folder is built in tmp_path from symbolic links to the real
abdomen fixture (read in place, never copied); tiny synthetic NIfTIs only where a defect is needed."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pancls.data.classes import DEFAULT_CLASSES
from pancls.data.manifest import ManifestError, load_manifest
from pancls.errors import UserError


def _link(dataset: Path, name: str, target: Path) -> None:
    path = dataset / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def _tiny_nifti(path: Path, affine: np.ndarray, shape=(4, 4, 4), value: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(shape, value, np.int16), affine), path)


@pytest.fixture()
def dataset(tmp_path: Path, ct_data: Path) -> Path:
    """tmp/ds/{images,masks}: ct1..ct7 -> the abdominal CT, pancreas -> its mask, other_grid -> a mask on
    the DICOM series' grid (wrong geometry)."""
    abdomen = ct_data / "abdomen"
    ds = tmp_path / "ds"
    for i in range(1, 8):
        _link(ds, f"images/ct{i}.nii.gz", abdomen / "example_ct_sm.nii.gz")
    _link(ds, "masks/pancreas.nii.gz", abdomen / "pancreas_mask.nii.gz")
    _link(ds, "masks/other_grid.nii.gz", abdomen / "example_seg_dicom.nii.gz")
    return ds


@pytest.fixture(autouse=True)
def _shared_store(ct_data: Path):
    """The dataset is made of links into the shared fixtures: that store is named as an allowed root."""
    global STORE
    STORE = ct_data


def _load(*args, **kwargs):
    kwargs.setdefault("allowed_roots", [STORE])
    return load_manifest(*args, **kwargs)


def _write(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_every_problem_is_listed_once_with_its_line(dataset: Path, tmp_path: Path):
    shifted = np.eye(4)
    shifted[0, 3] = 0.01  # 10 micrometres: far above float noise, far below a voxel
    _tiny_nifti(dataset / "images/tiny.nii.gz", np.eye(4))
    _tiny_nifti(dataset / "masks/tiny_shifted.nii.gz", shifted)
    (dataset / "images/garbage.nii.gz").write_bytes(b"this is not a NIfTI file" * 20)
    (tmp_path / "outside.nii.gz").write_bytes(b"")
    manifest = _write(dataset / "manifest.csv", [
        "patient_id,image,mask,label,fold,site",                       # 1
        "P1,images/ct1.nii.gz,masks/pancreas.nii.gz,PDAC,0,A",         # 2 valid
        "P2,images/missing.nii.gz,,IPMN,1,A",                          # 3 missing file
        "P3,images/ct2.nii.gz,,XYZ,1,A",                               # 4 unknown label
        "P4,images/ct3.nii.gz,,,2,A",                                  # 5 empty label
        "P5,images/ct1.nii.gz,,NET,2,B",                               # 6 duplicate of line 2
        "P1,images/ct4.nii.gz,,IPMN,0,B",                              # 7 conflicts with line 2
        "P6,../outside.nii.gz,,SCN,3,B",                               # 8 escapes the root
        "P7,images/garbage.nii.gz,,ASC,3,B",                           # 9 unreadable
        "P8,images/ct5.nii.gz,masks/other_grid.nii.gz,CP,3,B",         # 10 mask shape
        "P9,images/tiny.nii.gz,masks/tiny_shifted.nii.gz,PDAC,0,C",    # 11 mask affine
        "P10,images/ct6.nii.gz,,PDAC,x,C",                             # 12 bad fold
        f"P11,{dataset / 'images/ct7.nii.gz'},,PDAC,1,C",              # 13 absolute path
        "",                                                            # 14 blank: skipped, still counted
        "P12,images/ct7.nii.gz,,PDAC,1",                               # 15 missing a field
        '"P1",images/ct7.nii.gz,,PDAC,2,C',                            # 16 same patient, other fold
    ])
    with pytest.raises(ManifestError) as info:
        _load(manifest, DEFAULT_CLASSES)
    err = info.value
    expected = {
        3: "image file not found", 4: "unknown label 'XYZ'", 5: "empty label", 6: "already listed on line 2",
        7: "same patient_id as line 2 but a different label", 8: "escapes the dataset root",
        9: "not a readable image", 10: "mask shape", 11: "mask affine differs", 12: "fold must be an integer",
        13: "is absolute", 15: "expected 6 fields, found 5", 16: "a patient must not span folds",
    }
    assert [line for line, _ in err.problems] == sorted(expected)
    for line, message in err.problems:
        assert expected[line] in message, (line, message)
    # one error, one problem per line, each as "<manifest>:<line>: ..."; the allowed classes are named
    text = str(err).splitlines()
    assert len(text) == 1 + len(expected)
    for line in expected:
        assert any(t.startswith(f"{manifest}:{line}: ") for t in text)
    assert "PDAC, IPMN, NET, SCN, ASC, CP" in str(err)
    assert "P11" not in str(err) and "P1," not in str(err)  # patient ids are never echoed


def test_an_empty_mask_is_a_problem_of_its_line(dataset: Path):
    _tiny_nifti(dataset / "images/tiny.nii.gz", np.eye(4))
    _tiny_nifti(dataset / "masks/empty.nii.gz", np.eye(4), value=0)
    manifest = _write(dataset / "manifest.csv", [
        "patient_id,image,mask,label",
        "P1,images/ct1.nii.gz,masks/pancreas.nii.gz,PDAC",
        "P2,images/tiny.nii.gz,masks/empty.nii.gz,CP",
    ])
    with pytest.raises(ManifestError) as info:
        _load(manifest, DEFAULT_CLASSES)
    assert info.value.problems == [(3, "mask is empty (no non-zero voxel)")]


def test_missing_columns_are_reported_with_the_row_problems(dataset: Path):
    manifest = _write(dataset / "manifest.csv", ["patient_id,image", "P1,images/ct1.nii.gz", "P2,images/nope.nii.gz"])
    with pytest.raises(ManifestError) as info:
        _load(manifest, DEFAULT_CLASSES)
    assert [line for line, _ in info.value.problems] == [1, 3]
    assert "missing required column(s): label" in info.value.problems[0][1]


def test_valid_manifest_loads(dataset: Path):
    manifest = _write(dataset / "manifest.csv", [
        "patient_id,study_id,image,mask,label,fold,scanner",
        "P1,S1,images/ct1.nii.gz,masks/pancreas.nii.gz,NET,0,Siemens",
        "P1,S2,./images/ct2.nii.gz,,NET,0,GE",
        "P2,S3,images/sub/../ct3.nii.gz,,CP,1, Philips ",
        "",
        "P3,S4,images/ct4.nii.gz,,PDAC,2,GE",
    ])
    m = _load(manifest, DEFAULT_CLASSES)
    assert len(m) == 4 and list(m.table.index) == [2, 3, 4, 6]
    records = m.records()
    assert [r["label"] for r in records] == [2, 2, 5, 0]
    assert [r["fold"] for r in records] == [0, 0, 1, 2] and all(type(r["fold"]) is int for r in records)
    assert records[0]["image"] == str(dataset / "images/ct1.nii.gz")  # relative to the manifest, links kept
    assert records[2]["image"] == str(dataset / "images/ct3.nii.gz")
    assert records[0]["mask"] == str(dataset / "masks/pancreas.nii.gz") and "mask" not in records[1]
    assert [r["scanner"] for r in records] == ["Siemens", "GE", "Philips", "GE"]
    assert records[1]["study_id"] == "S2" and records[1]["patient_id"] == "P1"
    assert m.class_counts() == {"PDAC": 1, "IPMN": 0, "NET": 2, "SCN": 0, "ASC": 0, "CP": 1}
    assert m.patients() == ["P1", "P2", "P3"]
    # the index is the position in the configured list, whatever that order is
    reordered = _load(manifest, ["CP", "NET", "PDAC", "IPMN", "SCN", "ASC"])
    assert [r["label"] for r in reordered.records()] == [1, 1, 0, 2]


def test_root_bounds_paths_from_a_manifest_kept_elsewhere(dataset: Path, tmp_path: Path):
    manifest = _write(tmp_path / "manifests" / "cohort.csv",
                      ["patient_id,image,label", "P1,../ds/images/ct1.nii.gz,PDAC"])
    with pytest.raises(ManifestError, match="escapes the dataset root"):
        _load(manifest, DEFAULT_CLASSES)
    m = _load(manifest, DEFAULT_CLASSES, root=dataset)
    assert m.records()[0]["image"] == str(dataset / "images/ct1.nii.gz")


def test_absolute_paths_only_with_the_flag_and_inside_the_root(dataset: Path, tmp_path: Path):
    manifest = _write(dataset / "manifest.csv", ["patient_id,image,label", f"P1,{dataset / 'images/ct1.nii.gz'},SCN"])
    with pytest.raises(ManifestError, match="absolute"):
        _load(manifest, DEFAULT_CLASSES)
    assert _load(manifest, DEFAULT_CLASSES, allow_absolute=True).records()[0]["label"] == 3
    outside = _write(dataset / "outside.csv", ["patient_id,image,label", f"P1,{tmp_path / 'x.nii.gz'},SCN"])
    with pytest.raises(ManifestError, match="escapes"):
        _load(outside, DEFAULT_CLASSES, allow_absolute=True)


def test_check_images_false_skips_the_filesystem_only(dataset: Path):
    manifest = _write(dataset / "manifest.csv",
                      ["patient_id,image,label", "P1,images/not_here.nii.gz,PDAC", "P2,../x.nii.gz,PDAC"])
    with pytest.raises(ManifestError) as info:
        _load(manifest, DEFAULT_CLASSES, check_images=False)
    assert [line for line, _ in info.value.problems] == [3]


def test_unreadable_manifest_files_are_user_errors(tmp_path: Path):
    with pytest.raises(UserError, match="manifest not found"):
        _load(tmp_path / "nope.csv", DEFAULT_CLASSES)
    empty = _write(tmp_path / "empty.csv", ["patient_id,image,label"])
    with pytest.raises(ManifestError, match="no data rows"):
        _load(empty, DEFAULT_CLASSES)
    dup = _write(tmp_path / "dup.csv", ["patient_id,image,label,label", "P1,a.nii.gz,PDAC,PDAC"])
    with pytest.raises(ManifestError, match="named twice: label"):
        _load(dup, DEFAULT_CLASSES)
    with pytest.raises(UserError, match="listed twice"):
        _load(empty, ["PDAC", "PDAC"])


def test_example_manifest_is_well_formed():
    example = Path(__file__).resolve().parents[2] / "data_manifests" / "example.csv"
    m = _load(example, DEFAULT_CLASSES, check_images=False)
    assert set(m.class_counts()) == set(DEFAULT_CLASSES) and all(m.class_counts().values())
    assert os.path.commonpath([r["image"] for r in m.records()]).startswith(str(example.parent))


def test_links_out_of_the_root_need_an_allowed_root(dataset: Path, tmp_path: Path, ct_data: Path):
    """The root check follows symbolic links: a link inside the root to a file elsewhere (here /etc/passwd,
    and the shared store) is refused unless its real folder is an allowed root."""
    _link(dataset, "images/passwd.nii.gz", Path("/etc/passwd"))
    manifest = _write(dataset / "manifest.csv", ["patient_id,image,label", "P1,images/passwd.nii.gz,PDAC",
                                                 "P2,images/ct1.nii.gz,PDAC"])
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest, DEFAULT_CLASSES, check_images=False)
    assert [line for line, _ in err.value.problems] == [2, 3]
    assert all("link to a file outside the dataset root" in m for _, m in err.value.problems)
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest, DEFAULT_CLASSES, check_images=False, allowed_roots=[ct_data])
    assert [line for line, _ in err.value.problems] == [2]  # the shared store is allowed, /etc is not


def test_nrrd_and_metaimage_volumes_are_validated_like_nifti(dataset: Path, ct_data: Path):
    # 3D Slicer exports: image and mask written with SimpleITK from the real fixture (so on the same grid)
    from tests.ct.test_itk import write_itk

    abdomen = ct_data / "abdomen"
    write_itk(abdomen / "example_ct_sm.nii.gz", dataset / "images" / "slicer.nrrd")
    write_itk(abdomen / "example_ct_sm.nii.gz", dataset / "images" / "slicer.mhd")
    write_itk(abdomen / "pancreas_mask.nii.gz", dataset / "masks" / "slicer.seg.nrrd")
    write_itk(abdomen / "example_seg_dicom.nii.gz", dataset / "masks" / "other_grid.mha")
    bad = write_itk(abdomen / "example_ct_sm.nii.gz", dataset / "images" / "bad.mha")
    bad.write_bytes(bad.read_bytes().replace(b"ElementSpacing = 3 3 3", b"ElementSpacing = 0 3 3", 1))
    good = _write(dataset / "good.csv", ["patient_id,image,mask,label",
                                         "p1,images/slicer.nrrd,masks/slicer.seg.nrrd,PDAC",
                                         "p2,images/ct1.nii.gz,masks/slicer.seg.nrrd,IPMN",  # NIfTI image, NRRD mask
                                         "p3,images/slicer.mhd,masks/pancreas.nii.gz,NET"])
    assert len(_load(good, DEFAULT_CLASSES).table) == 3
    wrong = _write(dataset / "wrong.csv", ["patient_id,image,mask,label",
                                           "p1,images/slicer.nrrd,masks/other_grid.mha,PDAC",
                                           "p2,images/bad.mha,,IPMN"])
    with pytest.raises(ManifestError) as info:
        _load(wrong, DEFAULT_CLASSES)
    (line2, first), (line3, second) = info.value.problems
    assert (line2, line3) == (2, 3)
    assert first.startswith("mask shape (512, 512, 20) differs from image shape (122, 101, 30)")
    assert second == ("image is not a readable image (voxel spacing [0.0, 3.0, 3.0] mm: every spacing must be a "
                      "finite number > 0)")
