"""build_volume on the real CT fixtures (shared/data/ct), checked against expected.json, pydicom,
SimpleITK and dcm2niix."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pancls.ct.geometry import GeometryPolicy
from pancls.ct.volume import Volume, build_volume
from pancls.errors import UserError

RESAMPLE_ALL = GeometryPolicy(on_gap="resample", on_uneven="resample", on_tilt="resample")


def _expected(ct_data: Path, fixture: str) -> dict:
    return json.loads((ct_data / fixture / "expected.json").read_text())


def _hu(path: Path) -> np.ndarray:
    """Independent reference: pydicom stored values * slope + intercept of one single-frame file."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _stack_sha256(volume: Volume) -> str:
    """sha256 in expected.json's layout: int16 [slice, row, column], slices ascending along the normal."""
    return hashlib.sha256(np.ascontiguousarray(volume.array.transpose(2, 1, 0)).tobytes()).hexdigest()


def _flip_rows(affine: np.ndarray, rows: int) -> np.ndarray:
    """The affine of the same grid with the row index reversed (j -> rows-1-j), as dcm2niix stores it."""
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, rows - 1
    return affine @ flip


def _canonical(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(array, affine))


def _assert_same_world_grid(vol: Volume, array: np.ndarray, affine: np.ndarray, values: bool = True) -> None:
    """Same voxels at the same world positions, up to axis flips/permutations (nibabel reorientation)."""
    ours, theirs = _canonical(vol.array, vol.affine), _canonical(np.asarray(array), affine)
    assert ours.shape == theirs.shape
    corners = np.array([[i, j, k, 1] for i in (0, ours.shape[0] - 1) for j in (0, ours.shape[1] - 1)
                        for k in (0, ours.shape[2] - 1)]).T
    np.testing.assert_allclose(ours.affine @ corners, theirs.affine @ corners, atol=1e-3)
    if values:
        np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))


# ---------------------------------------------------------------------------------------------- series_ct
@pytest.fixture(scope="module")
def series_files(ct_data: Path) -> list[Path]:
    return sorted((ct_data / "series_ct/S21570/S2010").iterdir())  # lexicographic: I10, I100, I20, ...


@pytest.fixture(scope="module")
def series_volume(series_files) -> Volume:
    return build_volume(series_files)


def test_series_sorted_by_position_with_exact_hu(series_volume, series_files, ct_data):
    exp = _expected(ct_data, "series_ct")["readers"]["axial_series"]["pydicom"]
    assert [p.name for p in series_files][:3] == ["I10", "I100", "I20"]  # the trap is really there
    folder = series_files[0].parent
    assert series_volume.array.shape == (512, 512, 10) and series_volume.array.dtype == np.int16
    for k, name in enumerate(exp["filenames_by_position_ascending"]):
        np.testing.assert_array_equal(series_volume.array[:, :, k].T, _hu(folder / name))
    assert _stack_sha256(series_volume) == exp["HU_volume_position_ascending"]["array"]["sha256"]
    assert series_volume.flags == []
    np.testing.assert_allclose(series_volume.spacing, [0.451172, 0.451172, 5.0], atol=1e-6)


def test_series_parallel_decoding_is_deterministic(series_volume, series_files):
    # the default runs 10 files in the calling thread; 4 threads must give the same volume
    np.testing.assert_array_equal(build_volume(series_files, workers=4).array, series_volume.array)


def test_series_affine_matches_dcm2niix_record_and_simpleitk(series_volume, series_files, ct_data):
    rec = _expected(ct_data, "series_ct")["readers"]["whole_folder"]["dcm2niix_on_top_folder"]["outputs"]["201.nii"]
    np.testing.assert_allclose(_flip_rows(series_volume.affine, 512), rec["affine"], atol=1e-3)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_files[0].parent)))
    image = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(series_volume.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-3)
    np.testing.assert_array_equal(series_volume.array.transpose(2, 1, 0), sitk.GetArrayFromImage(image))


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not on PATH")
def test_series_matches_live_dcm2niix(series_volume, series_files, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir(), out.mkdir()
    for f in series_files:
        (src / f.name).symlink_to(f)
    subprocess.run(["dcm2niix", "-z", "n", "-f", "%s", "-o", str(out), str(src)], check=True, capture_output=True)
    img = nib.load(out / "201.nii")
    _assert_same_world_grid(series_volume, np.rint(img.get_fdata()).astype(np.int16), img.affine)


# --------------------------------------------------------------------------------------------------- gap
def test_gap_refused_by_default_naming_it(ct_data):
    exp = _expected(ct_data, "gap")["readers"]["removed_slices"]["pydicom"]
    gap = exp["gaps"][0]
    with pytest.raises(UserError) as err:
        build_volume(sorted((ct_data / "gap/removed_slices").iterdir()))
    assert err.value.where == str(ct_data / "gap/removed_slices")
    assert f"gap of {gap['interval_mm']:.2f} mm between the slices at z=706.21 and z=731.21 mm" in err.value.reason
    assert f"{gap['missing_slices_if_median_spacing']} slice(s) appear to be missing" in err.value.reason
    assert "typical spacing 5.00 mm" in err.value.reason


def test_gap_resampled_onto_uniform_grid_keeps_original_slices(ct_data):
    folder = ct_data / "gap/removed_slices"
    exp = _expected(ct_data, "gap")["readers"]["removed_slices"]["pydicom"]
    vol = build_volume(sorted(folder.iterdir()), policy=GeometryPolicy(on_gap="resample"))
    assert vol.flags == ["resampled:gap"]
    assert vol.array.shape == (512, 512, 10)
    np.testing.assert_allclose(vol.spacing[2], 5.0, atol=1e-6)
    assert vol.meta["original_intervals_mm"] == exp["intervals_along_normal_mm"]
    originals = {}
    for s in exp["slices_by_position_ascending"]:
        k = round((s["position_along_normal_mm"] - 696.21) / 5.0)
        originals[k] = _hu(folder / s["file"])
        # world z of plane k is the slice's own position
        assert (vol.affine @ [0, 0, k, 1])[2] == pytest.approx(s["position_along_normal_mm"], abs=1e-3)
        np.testing.assert_array_equal(vol.array[:, :, k].T, originals[k])
    # z=716.21 lies 10 of the 25 mm from the slice at 706.21 (k=2) to the one at 731.21 (k=7).
    blend = 0.6 * originals[2] + 0.4 * originals[7]
    assert np.max(np.abs(vol.array[:, :, 4].T - blend)) <= 0.5


# -------------------------------------------------------------------------------------- tilt + uneven
@pytest.fixture(scope="module")
def tilt_files(ct_data: Path) -> list[Path]:
    return sorted((ct_data / "gap/tilt_variable_spacing").iterdir())


def test_tilt_refused_naming_angle_and_spacing(tilt_files):
    with pytest.raises(UserError) as err:
        build_volume(tilt_files)
    reason = err.value.reason
    assert "gantry tilt: the slice stack runs 18.5 degrees off the slice normal" in reason
    assert "intervals along the slice normal 4.00/4.00/1.08/7.00 mm" in reason
    assert "on_gap/on_uneven/on_tilt" in reason
    # Allowing only the tilt is not enough: the spacing is still refused.
    with pytest.raises(UserError, match="uneven slice spacing"):
        build_volume(tilt_files, policy=GeometryPolicy(on_tilt="resample", on_gap="resample"))


def test_tilt_resampled_onto_orthogonal_grid(tilt_files, ct_data):
    exp = _expected(ct_data, "gap")["readers"]["tilt_variable_spacing"]["pydicom"]
    vol = build_volume(tilt_files, policy=RESAMPLE_ALL)
    assert set(vol.flags) == {"resampled:gap", "resampled:uneven", "resampled:tilt"}
    assert vol.meta["tilt_deg"] == pytest.approx(exp["angle_stack_vs_normal_deg"], abs=1e-3)
    axes = vol.affine[:3, :3] / vol.spacing
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-9)  # no shear left
    # k runs along the slice normal (RAS) at the typical spacing.
    normal_ras = np.array(exp["slice_normal"]) * [-1, -1, 1]
    np.testing.assert_allclose(axes[:, 2], normal_ras, atol=1e-5)
    assert vol.spacing[2] == pytest.approx(exp["interval_median_mm"], abs=1e-5)

    inv = np.linalg.inv(vol.affine)
    for s in exp["slices_by_position_ascending"][:3]:  # 0, 4.0 and 8.0 mm: on the output grid
        ds = pydicom.dcmread(tilt_files[0].parent / s["file"])
        hu = _hu(tilt_files[0].parent / s["file"])
        r, c = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        dr, dc = map(float, ds.PixelSpacing)
        jj, ii = np.mgrid[40:472:8, 40:472:8]  # interior pixels of the original slice
        lps = np.asarray(ds.ImagePositionPatient, float) + ii[..., None] * dc * r + jj[..., None] * dr * c
        ras = np.concatenate([lps * [-1, -1, 1], np.ones(lps.shape[:2] + (1,))], axis=-1)
        idx = ras @ inv.T
        k = idx[..., 2]
        assert np.max(np.abs(k - np.round(k))) < 1e-3  # the slice lies on an output plane
        # columns stay on the grid; rows move by a fraction: interpolate the output linearly along j
        np.testing.assert_allclose(idx[..., 0], np.round(idx[..., 0]), atol=1e-3)
        i0, k0, j = np.round(idx[..., 0]).astype(int), np.round(k).astype(int), idx[..., 1]
        jf = np.floor(j).astype(int)
        t = j - jf
        out = vol.array.astype(float)
        sampled = (1 - t) * out[i0, jf, k0] + t * out[i0, jf + 1, k0]
        diff = np.abs(sampled - hu[jj, ii])
        if s is exp["slices_by_position_ascending"][0]:
            assert np.max(diff) <= 0.5  # the anchor slice is copied, shifted by whole rows only
        else:
            assert np.median(diff) <= 2 and np.percentile(diff, 90) <= 15  # measured: 0.5-0.6 and 4.8-6.0


# ---------------------------------------------------------------------------------------------- enhanced
def test_enhanced_rescale_and_frame_order(ct_data):
    path = ct_data / "enhanced/eCT_Supplemental.dcm"
    exp = _expected(ct_data, "enhanced")["readers"]["enhanced_ct"]
    vol = build_volume([path])
    assert vol.array.min() == -1024 and vol.array.max() == 172
    stored = pydicom.dcmread(path).pixel_array.astype(np.int32)
    # Frames are stored descending along the normal: plane 0 is stored frame 1 (at 149 mm).
    assert exp["pydicom"]["frames_position_along_normal_mm"] == [159.0, 149.0]
    np.testing.assert_array_equal(vol.array[:, :, 0].T, stored[1] - 1024)
    np.testing.assert_array_equal(vol.array[:, :, 1].T, stored[0] - 1024)
    for k, frame in enumerate((1, 0)):
        expected_mean = exp["pydicom"]["pixels"]["per_frame_rescaled"][frame]["mean"]
        assert vol.array[:, :, k].mean() == pytest.approx(expected_mean, abs=1e-6)
    assert "rescale_type:US" in vol.flags
    dcm = exp["dcm2niix"]["outputs"]["3.nii"]
    np.testing.assert_allclose(_flip_rows(vol.affine, 512), dcm["affine"], atol=1e-3)


# ---------------------------------------------------------------------------------------------- jpeg2000
def test_jpeg2000_decodes_to_its_uncompressed_twin(ct_data):
    j2k = build_volume([ct_data / "jpeg2000/693_J2KR.dcm"])
    raw = build_volume([ct_data / "jpeg2000/693_UNCR.dcm"])
    np.testing.assert_array_equal(j2k.array, raw.array)
    assert (j2k.array.min(), j2k.array.max()) == (-3024, 1468)
    assert j2k.array.mean() == pytest.approx(-1035.563015, abs=1e-6)
    assert j2k.meta["transfer_syntax"] == "JPEG 2000 Image Compression (Lossless Only)"
    assert "single_slice" in j2k.flags


# ------------------------------------------------------------------------------------------------ abdomen
def test_abdomen_series_matches_dcm2niix_geometry(ct_data):
    folder = ct_data / "abdomen/dicom_series"
    exp = _expected(ct_data, "abdomen")["readers"]["dicom_series"]["pydicom"]
    files = sorted(folder.iterdir())
    vol = build_volume(files)
    assert vol.spacing[2] == pytest.approx(2.0, abs=1e-6)  # SliceThickness says 3 mm
    assert _stack_sha256(vol) == exp["HU_volume_position_ascending"]["array"]["sha256"]
    seg = nib.load(ct_data / "abdomen/example_seg_dicom.nii.gz")
    _assert_same_world_grid(vol, np.asanyarray(seg.dataobj), seg.affine, values=False)


# ---------------------------------------------------------------------------------- refusals (tmp copies)
def _copy_with(src: Path, dst: Path, **changes) -> Path:
    ds = pydicom.dcmread(src)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        elif keyword == "TransferSyntaxUID":
            # Wrap the raw bytes as one fragment: a header-valid compressed file, never decoded.
            ds.file_meta.TransferSyntaxUID = value
            ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
        else:
            setattr(ds, keyword, value)
    ds.save_as(dst)
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"ImageOrientationPatient": [1, 0, 0, 0, 0.9, -0.435890]}, "mixed ImageOrientationPatient"),
    ({"ImagePositionPatient": [-115.5, -1.85, 701.21]}, r"duplicate slice position z=701\.210"),
    ({"PixelSpacing": [0.5, 0.5]}, "mixed PixelSpacing"),
    ({"FrameOfReferenceUID": "1.2.3.4"}, "FrameOfReferenceUID"),
    ({"SeriesInstanceUID": "1.2.3.4"}, "2 different SeriesInstanceUIDs"),
    ({"Rows": 256}, "mixed image sizes"),
    ({"RescaleIntercept": None}, "no RescaleSlope/RescaleIntercept"),
    ({"ImagePositionPatient": None}, "no ImagePositionPatient"),
    ({"RescaleSlope": 100}, "do not fit int16"),
])
def test_inconsistent_series_is_refused(series_files, tmp_path, changes, message):
    trio = [series_files[0].parent / name for name in ("I10", "I20", "I30")]  # contiguous, 5 mm apart
    paths = [tmp_path / p.name for p in trio]
    for src, dst in zip(trio[:2], paths, strict=False):
        shutil.copy(src, dst)
    _copy_with(trio[2], paths[2], **changes)  # I30 changed; I20 sits at z=701.21
    with pytest.raises(UserError, match=message):
        build_volume(paths)


def test_missing_decoder_names_transfer_syntax(series_files, tmp_path):
    """Native pixel data labelled JPEG-LS: without a JPEG-LS plugin the syntax is named before decoding;
    with one (pyjpegls) its decoder error comes back as one line."""
    from pydicom.pixels import get_decoder

    bad = _copy_with(series_files[0], tmp_path / "ls.dcm", TransferSyntaxUID=pydicom.uid.JPEGLSLossless)
    available = get_decoder(pydicom.uid.JPEGLSLossless).is_available
    expected = ("damaged or truncated compressed pixel data" if available
                else "transfer syntax JPEG-LS Lossless Image Compression")
    with pytest.raises(UserError, match=expected) as err:
        build_volume([bad])
    assert err.value.where == str(bad) and "\n" not in str(err.value)


def test_not_dicom_is_refused(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not dicom")
    with pytest.raises(UserError, match="cannot read DICOM file"):
        build_volume([junk])


# ------------------------------------------------------------------ headers from the scan, pixel decoding
def test_headers_from_scan_give_the_same_volume(series_files, series_volume):
    from pancls.ct.scan import scan

    (series,) = [s for s in scan([series_files[0].parent], progress=False).series]
    vol = build_volume(series.paths, headers=series.headers)
    np.testing.assert_array_equal(vol.array, series_volume.array)
    np.testing.assert_array_equal(vol.affine, series_volume.affine)
    assert vol.meta == series_volume.meta and vol.flags == series_volume.flags
    with pytest.raises(ValueError, match="2 headers for 10 paths"):
        build_volume(series.paths, headers=series.headers[:2])


def test_headers_are_not_read_again(series_files, monkeypatch):
    from pancls.ct.scan import read_dicom_header

    headers = [read_dicom_header(p) for p in series_files]
    calls = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: calls.append(a) or real(*a, **k))
    build_volume(series_files, headers=headers)
    assert calls == []  # native pixel data is read from the recorded offset, without parsing anything


CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _synthetic_slice(path: Path, raw: np.ndarray, *, syntax=pydicom.uid.ExplicitVRLittleEndian, bits_stored=None,
                     signed=False, z=0.0, slope=1.0, intercept=-1024.0, series_uid="1.2.826.0.1.3680043.10.1"):
    """Write a tiny CT slice whose PixelData holds exactly ``raw`` (including any bits above BitsStored)."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "CT", series_uid, series_uid + ".9"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, z], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept = [0.5, 0.5], slope, intercept
    frames, ds.Rows, ds.Columns = (raw.shape[0], *raw.shape[1:]) if raw.ndim == 3 else (1, *raw.shape)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = raw.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(signed)
    ds.PixelData = raw.astype(raw.dtype.newbyteorder(">" if syntax == pydicom.uid.ExplicitVRBigEndian else "<")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


_RNG = np.random.default_rng(7)
_U12 = _RNG.integers(0, 4096, (2, 5, 6)).astype(np.uint16)  # 12-bit unsigned values ...
_S12 = _RNG.integers(-2048, 2048, (2, 5, 6)).astype(np.int16)  # ... and signed ones
_JUNK = (_RNG.integers(0, 16, (2, 5, 6)) << 12).astype(np.uint16)  # overlay bits above BitsStored


@pytest.mark.parametrize("raw, kwargs, values", [
    (_U12[0] | _JUNK[0], dict(bits_stored=12), _U12[0]),
    ((_S12[0].view(np.uint16) & 0x0FFF) | _JUNK[0], dict(bits_stored=12, signed=True), _S12[0]),
    (_S12[0], dict(signed=True), _S12[0]),
    (_U12[0], dict(syntax=pydicom.uid.ImplicitVRLittleEndian, bits_stored=12), _U12[0]),
    (_U12[0].astype(np.uint8), dict(bits_stored=8), _U12[0].astype(np.uint8)),
    (_S12.astype(np.int32), dict(signed=True), _S12),  # 32-bit, two frames
    (_S12[0], dict(syntax=pydicom.uid.ExplicitVRBigEndian, signed=True), _S12[0]),  # via pydicom's decoder
    (_U12[0], dict(syntax=pydicom.uid.DeflatedExplicitVRLittleEndian, bits_stored=12), _U12[0]),  # full read
], ids=["u12-junk", "s12-junk", "s16", "implicit", "u8", "s32-2frames", "big-endian", "deflated"])
def test_stored_values_decode_every_native_encoding(tmp_path, raw, kwargs, values):
    from pancls.ct.scan import read_dicom_header
    from pancls.ct.volume import _stored_values

    path = _synthetic_slice(tmp_path / "s.dcm", raw, **kwargs)
    header = read_dicom_header(path)
    deflated = kwargs.get("syntax") == pydicom.uid.DeflatedExplicitVRLittleEndian
    assert header.pixel_tag == 0x7FE00010 and (header.pixel_offset is None) == deflated  # inflated: no offset
    got = _stored_values(path, header)
    np.testing.assert_array_equal(got.reshape(values.shape), values)  # the intended values ...
    np.testing.assert_array_equal(got.reshape(values.shape), pydicom.dcmread(path).pixel_array)  # ... = pydicom's


def test_float_rescale_is_rounded_per_slice(tmp_path):
    stored = _U12[:, :4, :4]
    paths = [_synthetic_slice(tmp_path / f"{k}.dcm", stored[k], bits_stored=12, z=2.0 * k, slope=0.5 + k,
                              intercept=-1000.25 * (k + 1)) for k in range(2)]
    vol = build_volume(paths)
    for k in range(2):
        expected = np.rint(stored[k] * (0.5 + k) - 1000.25 * (k + 1))
        np.testing.assert_array_equal(vol.array[:, :, k].T, expected)


def test_truncated_pixel_data_is_a_user_error(tmp_path):
    path = _synthetic_slice(tmp_path / "s.dcm", _U12[0], bits_stored=12)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="cannot decode pixel data.*truncated") as err:
        build_volume([path])
    assert err.value.where == str(path)


def test_only_compressed_series_are_decoded_in_processes(ct_data, series_files):
    import os

    from pancls.ct.scan import read_dicom_header
    from pancls.ct.volume import decode_processes

    native = [read_dicom_header(p) for p in series_files]
    j2k = [read_dicom_header(p) for p in sorted((ct_data / "abdomen/dicom_series").iterdir())]
    assert decode_processes(native) == 1  # numpy copies need no second process
    assert decode_processes(j2k) == min(len(os.sched_getaffinity(0)), 20 // 4)
    assert decode_processes(j2k, workers=1) == 1 and decode_processes(j2k[:7]) == 1


def test_worker_process_failure_names_the_file(ct_data, tmp_path):
    files = sorted((ct_data / "abdomen/dicom_series").iterdir())
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    bad = tmp_path / files[5].name
    bad.write_bytes(bad.read_bytes()[:-60_000])  # the JPEG 2000 codestream loses its end
    with pytest.raises(UserError, match="damaged or truncated compressed pixel data") as err:
        build_volume(sorted(tmp_path.iterdir()))
    assert err.value.where == str(bad)
    # the reason says what happened and keeps the first decoder's own (pydicom's first line listed no plugin)
    reason = err.value.reason
    assert reason.startswith("damaged or truncated compressed pixel data (") and "plugins:" not in reason
    assert re.search(r"\((pylibjpeg|gdcm|pillow|pyjpegls|pylibjpeg-openjpeg)\w*: \w", err.value.reason), err.value.reason
