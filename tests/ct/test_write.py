"""write_volume: NIfTI round trip, atomicity, and a sidecar free of identifiers."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pancls.ct.volume import Volume, build_volume
from pancls.ct.write import as_ras, write_volume
from pancls.errors import UserError

IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber",
               "InstitutionName", "ReferringPhysicianName", "OperatorsName", "StationName", "DeviceSerialNumber",
               "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "StudyID",
               "StudyDate", "SeriesDate", "ContentDate")


def _volume() -> Volume:
    rng = np.random.default_rng(1)
    affine = np.array([[-0.5, 0, 0, 10.0], [0, -0.6, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    array = rng.integers(-1024, 3000, size=(5, 4, 3)).astype(np.int16)
    return Volume(array=array, affine=affine, spacing=np.array([0.5, 0.6, 2.5]), flags=["resampled:gap"],
                  meta={"source": "dicom", "kvp": 120.0})


def test_round_trip_keeps_values_and_geometry(tmp_path):
    vol = as_ras(_volume())
    write_volume(vol, tmp_path / "ct.nii.gz", tmp_path / "ct.json")
    img = nib.load(tmp_path / "ct.nii.gz")
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), vol.array)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_sform(), vol.affine, atol=1e-6)
    np.testing.assert_allclose(img.get_qform(), vol.affine, atol=1e-5)
    assert img.header.get_xyzt_units()[0] == "mm"
    side = json.loads((tmp_path / "ct.json").read_text())
    assert side["flags"] == ["resampled:gap"] and side["shape"] == [5, 4, 3] and side["meta"]["KVP"] == 120.0


def test_every_volume_is_written_in_ras_order_with_the_same_voxels_at_the_same_places(tmp_path):
    vol = _volume()  # L, P, S voxel order, as DICOM rows/columns give it
    write_volume(vol, tmp_path / "ct.nii.gz", tmp_path / "ct.json")
    img = nib.load(tmp_path / "ct.nii.gz")
    ref = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(img.get_sform(), ref.affine, atol=1e-9)
    side = json.loads((tmp_path / "ct.json").read_text())
    assert side["axcodes"] == ["R", "A", "S"] and np.allclose(side["affine_ras"], ref.affine, atol=1e-9)
    assert side["shape"] == [5, 4, 3] and side["spacing_mm"] == [0.5, 0.6, 2.5]
    assert as_ras(as_ras(vol)) is not vol and as_ras(as_ras(vol)).array.shape == (5, 4, 3)


def test_written_dicom_series_equals_simpleitk_in_ras_order(ct_data, tmp_path):
    import SimpleITK as sitk

    folder = ct_data / "series_ct/S21570/S2010"
    write_volume(build_volume(sorted(folder.iterdir())), tmp_path / "ct.nii.gz")
    img = nib.load(tmp_path / "ct.nii.gz")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    ref = nib.as_closest_canonical(nib.Nifti1Image(sitk.GetArrayFromImage(image).transpose(2, 1, 0),
                                                   np.diag([-1, -1, 1, 1]) @ lps))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(ref.dataobj))


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "ct.nii.gz"
    target.write_bytes(b"previous version")

    def broken_save(img, path):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_volume(_volume(), target)
    assert target.read_bytes() == b"previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_sheared_affine_and_bad_name_are_refused(tmp_path):
    vol = _volume()
    vol.affine[1, 2] = 0.8  # shear between j and k (an un-resampled gantry tilt)
    vol.spacing = np.linalg.norm(vol.affine[:3, :3], axis=0)
    with pytest.raises(UserError, match="shear"):
        write_volume(vol, tmp_path / "ct.nii.gz")
    with pytest.raises(UserError, match=r"\.nii\.gz or \.nii"):
        write_volume(_volume(), tmp_path / "ct.nrrd")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source", ["enhanced/eCT_Supplemental.dcm", "series_ct/S21570/S2010"])
def test_sidecar_of_real_series_has_no_identifiers(ct_data, tmp_path, source):
    src = ct_data / source
    files = sorted(src.iterdir()) if src.is_dir() else [src]
    vol = build_volume(files)
    write_volume(vol, tmp_path / "ct.nii.gz", tmp_path / "ct.json")
    text = (tmp_path / "ct.json").read_text()
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    present = [(k, str(header.get(k))) for k in IDENTIFYING if str(header.get(k) or "").strip()]
    assert len(present) >= 4  # the fixture really carries identifiers to leak
    for keyword, value in present:
        assert value not in text, f"{keyword} leaked into the sidecar"
    assert "series_uid_sha256" not in text  # a plain hash of the UID is linkable; ids are keyed (pancls.ingest)
    img = nib.load(tmp_path / "ct.nii.gz")
    ras = as_ras(vol)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), ras.array)
    np.testing.assert_allclose(img.affine, ras.affine, atol=1e-5)


def test_sidecar_acquisition_fields_use_the_dcm2niix_bids_keys(ct_data, tmp_path):
    folder = ct_data / "series_ct/S21570/S2010"
    write_volume(build_volume(sorted(folder.iterdir())), tmp_path / "ct.nii.gz", tmp_path / "ct.json")
    meta = json.loads((tmp_path / "ct.json").read_text())["meta"]
    ds = pydicom.dcmread(folder / "I10", stop_before_pixels=True)
    assert meta["Modality"] == "CT" and meta["Manufacturer"] == ds.Manufacturer
    assert meta["ManufacturersModelName"] == ds.ManufacturerModelName and meta["ConvolutionKernel"] == "UB"
    assert meta["SliceThickness"] == float(ds.SliceThickness) and meta["KVP"] == float(ds.KVP)
    assert meta["XRayTubeCurrent"] == int(ds.XRayTubeCurrent) and meta["ImageType"][:2] == ["ORIGINAL", "PRIMARY"]
    assert "kvp" not in meta and "manufacturer_model_name" not in meta and "slice_thickness_mm" not in meta
