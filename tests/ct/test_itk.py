"""NRRD/MetaImage volumes (3D Slicer's exports) through SimpleITK: the same volume as the NIfTI path, bad ones refused.

The files are written with SimpleITK from the real abdominal CT (and its pancreas mask) in ../shared/data/ct; the
reference is the NIfTI fixture read by nibabel, or, for other orientations, the NIfTI that SimpleITK writes of
the same image (ITK's own LPS -> RAS conversion, independent of pancls').
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pancls.ct.itk import ITK_SUFFIXES, itk_affine, itk_header, read_itk
from pancls.ct.mask import read_mask
from pancls.ct.nifti import load_image, load_nifti
from pancls.errors import UserError


def write_itk(source: Path, target: Path, transform=None) -> Path:
    """``source`` (any format SimpleITK reads) written to ``target`` by SimpleITK: voxels and geometry only (no
    NIfTI header text travels along), optionally through ``transform(image)`` first."""
    img = sitk.ReadImage(str(source))
    clean = sitk.GetImageFromArray(sitk.GetArrayFromImage(img))
    clean.CopyInformation(img)
    if transform is not None:
        clean = transform(clean)
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(clean, str(target))
    return target


@pytest.fixture(scope="module")
def ct_nifti(ct_data: Path) -> Path:
    return ct_data / "abdomen" / "example_ct_sm.nii.gz"


@pytest.mark.parametrize("suffix", ITK_SUFFIXES)
def test_itk_volume_equals_the_nifti_it_was_written_from(ct_nifti, tmp_path, suffix):
    path = write_itk(ct_nifti, tmp_path / f"ct{suffix}")
    itk, nifti = load_image(path), load_nifti(ct_nifti)
    assert itk.array.dtype == np.int16 and np.array_equal(itk.array, nifti.array)
    assert np.array_equal(itk.affine, nifti.affine)  # exactly: the LPS -> RAS conversion only flips signs
    assert np.array_equal(itk.affine, nib.load(ct_nifti).affine)
    assert itk.flags == nifti.flags == [] and itk.meta["source"] == "itk"
    assert {k: v for k, v in itk.meta.items() if k != "source"} == {
        k: v for k, v in nifti.meta.items() if k not in ("source", "sform_code", "qform_code")}
    shape, affine = itk_header(path)  # the header alone gives the same grid
    assert shape == (122, 101, 30) and np.array_equal(affine, nifti.affine)


@pytest.mark.parametrize("name, transform", [
    ("flipped", lambda img: sitk.Flip(img, [True, False, True])),  # LPS-like voxel order, slices reversed
    ("permuted", lambda img: sitk.PermuteAxes(img, [2, 0, 1])),  # slices along the first index axis
])
def test_other_orientations_match_itks_own_nifti(ct_nifti, tmp_path, name, transform):
    itk = load_image(write_itk(ct_nifti, tmp_path / f"{name}.nrrd", transform))
    reference = nib.load(write_itk(ct_nifti, tmp_path / f"{name}.nii.gz", transform))  # ITK's NiftiImageIO
    assert np.array_equal(itk.array, np.asanyarray(reference.dataobj))
    assert np.array_equal(itk.affine, reference.affine)
    # and in world space it is the fixture's volume: voxel (0, 0, 0) of the flipped file is the fixture's far corner
    if name == "flipped":
        fixture = nib.load(ct_nifti)
        corner = fixture.affine @ [121, 0, 29, 1]
        assert np.allclose(itk.affine @ [0, 0, 0, 1], corner)
        assert itk.array[0, 0, 0] == np.asanyarray(fixture.dataobj)[121, 0, 29]


def test_itk_affine_known_answer():
    # direction = identity in LPS, spacing (2, 3, 4), origin (10, 20, 30): voxel (1, 1, 1) lies at LPS (12, 23, 34),
    # which is RAS (-12, -23, 34)
    affine = itk_affine(np.eye(3).ravel(), (2.0, 3.0, 4.0), (10.0, 20.0, 30.0))
    assert np.array_equal(affine @ [1, 1, 1, 1], [-12.0, -23.0, 34.0, 1.0])


def test_nrrd_mask_reads_like_the_nifti_mask(ct_data, tmp_path):
    nifti = ct_data / "abdomen" / "pancreas_mask.nii.gz"
    labels, affine, kind = read_mask(write_itk(nifti, tmp_path / "mask.nrrd"))
    ref_labels, ref_affine, _ = read_mask(nifti)
    assert kind == "itk" and np.array_equal(labels, ref_labels) and np.array_equal(affine, ref_affine)
    assert int(labels.sum()) == 644  # the fixture's pancreas (README: 644 voxels)


def _mha_with(ct_nifti: Path, tmp_path: Path, old: bytes, new: bytes) -> Path:
    path = write_itk(ct_nifti, tmp_path / "good.mha")
    raw = path.read_bytes()
    assert old in raw
    bad = tmp_path / "bad.mha"
    bad.write_bytes(raw.replace(old, new, 1))
    return bad


@pytest.mark.parametrize("old, new, message", [
    (b"ElementSpacing = 3 3 3", b"ElementSpacing = 0 3 3",
     "voxel spacing [0.0, 3.0, 3.0] mm: every spacing must be a finite number > 0"),
    (b"TransformMatrix = -1 0 0 0 -1 0 0 0 1", b"TransformMatrix = 1 0 0 1 0 0 0 0 1",
     "the direction matrix [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]] is singular or not finite"),  # MetaImage: column-major
    (b"NDims = 3", b"NDims = 2", "expected a 3D scalar image"),
])
def test_bad_geometry_is_refused_in_one_line(ct_nifti, tmp_path, old, new, message):
    bad = _mha_with(ct_nifti, tmp_path, old, new)
    for read in (load_image, read_itk, itk_header):
        with pytest.raises(UserError) as info:
            read(bad)
        assert message in str(info.value) and "\n" not in str(info.value)
        assert str(info.value).startswith(str(bad))


def test_voxel_data_problems_are_refused(ct_nifti, tmp_path):
    path = write_itk(ct_nifti, tmp_path / "ct.mha")
    truncated = tmp_path / "truncated.mha"
    truncated.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(UserError, match="cannot read the voxel data") as info:
        load_image(truncated)
    assert "\n" not in str(info.value)
    # values a CT in HU cannot hold (float data beyond int16) are refused as for NIfTI
    img = sitk.ReadImage(str(path), sitk.sitkFloat32) * 100.0
    sitk.WriteImage(img, str(tmp_path / "scaled.nrrd"))
    with pytest.raises(UserError, match="do not fit int16 HU"):
        load_image(tmp_path / "scaled.nrrd")
    with pytest.raises(UserError, match="file not found"):
        load_image(tmp_path / "missing.nrrd")


def test_predict_takes_nrrd_and_metaimage_inputs(ct_nifti, tmp_path):
    from pancls.predict import collect_studies

    good = write_itk(ct_nifti, tmp_path / "ct.nrrd")
    bad = _mha_with(ct_nifti, tmp_path, b"ElementSpacing = 3 3 3", b"ElementSpacing = 3 0 3")
    nrrd, mha = collect_studies([good, bad])
    assert nrrd.error is None and nrrd.kind == "nifti"  # a volume file (no DICOM scan)
    volume, reference = nrrd.load(), load_nifti(ct_nifti)
    assert np.array_equal(volume.array, reference.array) and np.array_equal(volume.affine, reference.affine)
    with pytest.raises(UserError, match=r"bad\.mha: voxel spacing \[3\.0, 0\.0, 3\.0\] mm"):
        mha.load()
