"""Bad inputs, one at a time, through the whole ingest: each ends as a one-line refusal naming the problem,
or as a conversion that is right and says where it differs from the files (issue 14).

Every damaged input is a copy of a real fixture with one thing changed (see conftest.py).
"""
from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pancls.ct.select import SelectionRules
from pancls.ct.volume import build_volume
from pancls.errors import UserError
from pancls.ingest import IngestConfig, ingest

from .conftest import save, set_raw, set_value, unknown_vr, write_series  # noqa: F401 - helpers


def _rows(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _ingest(tmp_path: Path, *sources: Path, **kwargs):
    """Run ingest; return (report, stderr lines, inventory rows, manifest rows). Never expected to raise."""
    err = io.StringIO()
    out = tmp_path / "out"
    kwargs.setdefault("config", IngestConfig(selection=SelectionRules(min_slices=1)))  # the fixtures are short
    report = ingest(list(sources), out, progress=False, err=err, **kwargs)
    lines = err.getvalue().splitlines()
    assert all("Traceback" not in line for line in lines)
    return report, lines, _rows(out / ".private" / "inventory.csv"), _rows(out / "manifest.csv")


def _series_row(inventory):
    (row,) = [r for r in inventory if r["kind"] == "series" and r["status"] != "skipped"]
    return row


def _refused(tmp_path: Path, src: Path, *expected: str):
    """The one series of ``src`` is refused with a one-line reason containing every ``expected`` text."""
    report, err, inventory, manifest = _ingest(tmp_path, src)
    row = _series_row(inventory)
    assert row["status"] == "refused", row
    for text in expected:
        assert text in row["reason"], row["reason"]
    assert manifest == [] and len(report.refused) == 1 and not report.failed
    assert len(err) == 1 and all(text in err[0] for text in expected), err
    assert report.exit_code == 1
    return row


def _file_refused(tmp_path: Path, src: Path, *expected: str):
    """A file of ``src`` is refused at the header scan (no series built from it), one line."""
    report, err, inventory, manifest = _ingest(tmp_path, src)
    files = [r for r in inventory if r["kind"] == "file" and r["status"] == "refused"]
    assert files and all(text in files[0]["reason"] for text in expected), inventory
    assert not report.failed and report.exit_code == 1
    assert any(all(text in line for text in expected) for line in err), err
    return inventory, manifest


# ------------------------------------------------------------------------------ crashes -> refusals
def test_slice_thickness_not_a_number(tmp_path, s2010):
    src = write_series(s2010[:4], tmp_path / "src", lambda ds, i, n: set_raw(ds, "SliceThickness", b"abc "))
    _refused(tmp_path, src, "SliceThickness", "abc")


def test_pixel_spacing_with_one_value(tmp_path, s2010):
    src = write_series(s2010[:4], tmp_path / "src", lambda ds, i, n: set_value(ds, "PixelSpacing", "0.5"))
    _refused(tmp_path, src, "PixelSpacing has 1 value(s), expected 2")


def test_single_slice_with_nan_thickness(tmp_path, s2010):
    src = write_series(s2010[:1], tmp_path / "src", lambda ds, i, n: set_value(ds, "SliceThickness", "nan"))
    _refused(tmp_path, src, "SliceThickness is nan")


@pytest.mark.parametrize("rows, expected", [(0, "Rows 0"), ([512, 512], "Rows has 2 values")])
def test_enhanced_bad_rows_refused_at_the_scan(tmp_path, enhanced_file, rows, expected):
    src = write_series([enhanced_file], tmp_path / "src", lambda ds, i, n: set_value(ds, "Rows", rows))
    _file_refused(tmp_path, src, expected)


def test_huge_matrix_refused_before_allocating(tmp_path, enhanced_file):
    def huge(ds, i, n):
        set_value(ds, "Rows", 65535)
        set_value(ds, "Columns", 65535)
    src = write_series([enhanced_file], tmp_path / "src", huge)
    _refused(tmp_path, src, "Rows 65535 is outside 1..8192")


def test_unknown_vr_in_a_used_element(tmp_path, s2010):
    src = write_series(s2010[:4], tmp_path / "src")
    unknown_vr(src / s2010[3].name, 0x00200032)  # ImagePositionPatient of the last slice
    inventory, _ = _file_refused(tmp_path, src, "Unknown Value Representation 'ZZ'")
    # the other three slices are converted, and their row says a file beside them was unreadable
    (row,) = [r for r in inventory if r["kind"] == "series"]
    assert row["status"] == "converted" and "1 unreadable file(s) beside this series" in row["notes"]


def test_corrupt_zip_member_does_not_stop_the_batch(tmp_path, s2010):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in s2010[:3]:
            zf.write(f, f"S/{f.name}")
    raw = bytearray(archive.read_bytes())
    raw[2000:2400] = bytes(400)  # inside the first member's deflate stream
    archive.write_bytes(bytes(raw))
    good = write_series(s2010[:4], tmp_path / "good")
    report, err, inventory, manifest = _ingest(tmp_path, archive, good)
    assert len(manifest) == 1 and report.converted == 1
    (bad,) = [r for r in inventory if r["kind"] == "file"]
    assert bad["status"] == "refused" and "bad zip archive" in bad["reason"]
    assert len(err) == 1 and "bad.zip" in err[0] and report.exit_code == 1


# ------------------------------------------------------------------------------ one failure, the batch goes on
def test_unexpected_error_in_one_series_fails_only_that_series(tmp_path, s2010, ct_data, monkeypatch):
    import pancls.ingest as ingest_module

    first = write_series(s2010[:4], tmp_path / "a")

    def other_study(ds, i, n):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.7", "1.2.826.0.1.3680043.2.1125.8"
    second = write_series(s2010[4:8], tmp_path / "b", other_study)
    real = ingest_module.build_volume

    def flaky(paths, *args, **kwargs):
        if Path(paths[0]).parent == first:
            raise RuntimeError("boom")
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(ingest_module, "build_volume", flaky)
    report, err, inventory, manifest = _ingest(tmp_path, first, second)
    statuses = sorted(r["status"] for r in inventory if r["kind"] == "series")
    assert statuses == ["converted", "failed"] and len(manifest) == 1
    failed = next(r for r in inventory if r["status"] == "failed")
    assert "internal error RuntimeError: boom" in failed["reason"]
    assert report.exit_code == 3 and len(report.failed) == 1 and len(err) == 1
    log = (tmp_path / "out" / ".private" / "errors.log").read_text()
    assert "Traceback" in log and "RuntimeError: boom" in log


# ------------------------------------------------------------------------------ silently wrong -> right + noted
def test_all_slices_sharing_one_sop_uid_are_kept(tmp_path, s2010):
    src = write_series(s2010[:4], tmp_path / "src",
                       lambda ds, i, n: setattr(ds, "SOPInstanceUID", "1.2.826.0.1.3680043.2.1125.1"))
    report, err, inventory, manifest = _ingest(tmp_path, src)
    row = _series_row(inventory)
    assert row["status"] == "converted" and row["n_slices"] == "4"
    assert "share a SOP Instance UID but lie at different positions" in row["notes"]
    assert nib.load(tmp_path / "out" / manifest[0]["image"]).shape == (512, 512, 4)
    assert "1 with notes" in report.summary()


def test_blanked_uids_keep_every_slice(tmp_path, s2010):
    def blank(ds, i, n):
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            setattr(ds, keyword, "")
    src = write_series(s2010[:4], tmp_path / "src", blank)
    report, err, inventory, manifest = _ingest(tmp_path, src)
    assert _series_row(inventory)["n_slices"] == "4" and report.exit_code == 0, err


@pytest.mark.parametrize("which", ["end", "middle"])
def test_missing_orientation_on_one_slice_is_refused_by_name(tmp_path, s2010, which):
    index = {"end": 3, "middle": 1}[which]

    def drop(ds, i, n):
        if i == index:
            del ds.ImageOrientationPatient
    src = write_series(s2010[:4], tmp_path / "src", drop)
    row = _refused(tmp_path, src, "has no ImageOrientationPatient")
    assert row["n_slices"] == "4"


def test_zero_byte_slice_is_reported_on_the_series(tmp_path, s2010):
    src = write_series(s2010[:4], tmp_path / "src")
    (src / s2010[3].name).write_bytes(b"")
    report, err, inventory, manifest = _ingest(tmp_path, src)
    row = _series_row(inventory)
    assert row["status"] == "converted" and "unreadable file(s) beside this series" in row["notes"]
    assert "empty file" in row["notes"] and report.exit_code == 1 and "1 with notes" in report.summary()


def test_pixel_data_longer_than_the_header_says(tmp_path, s2010):
    src = write_series(s2010[:4], tmp_path / "src",
                       lambda ds, i, n: setattr(ds, "PixelData", ds.PixelData + bytes(1024)))
    _refused(tmp_path, src, "the header does not describe this pixel data")


@pytest.mark.parametrize("frames, expected", [("-1", None), (None, "no NumberOfFrames, but 2 per-frame")])
def test_enhanced_number_of_frames_bad_or_missing(tmp_path, enhanced_file, frames, expected):
    def change(ds, i, n):
        if frames is None:
            del ds.NumberOfFrames
        else:
            set_value(ds, "NumberOfFrames", frames)
    src = write_series([enhanced_file], tmp_path / "src", change)
    if expected is None:  # refused at the scan already
        _file_refused(tmp_path, src, "NumberOfFrames -1")
    else:
        _refused(tmp_path, src, expected)


@pytest.mark.parametrize("keyword, value, expected", [
    ("RescaleSlope", "0", "RescaleSlope 0: must be > 0"),
    ("BitsStored", 0, "BitsStored 0 is outside 1..16"),
])
def test_rescale_slope_and_bits_stored_zero(tmp_path, s2010, keyword, value, expected):
    src = write_series(s2010[:4], tmp_path / "src", lambda ds, i, n: set_value(ds, keyword, value))
    _refused(tmp_path, src, expected)


def test_huge_position_never_reaches_the_affine(tmp_path, s2010):
    src = write_series(s2010[:4], tmp_path / "src",
                       lambda ds, i, n: set_value(ds, "ImagePositionPatient", ["1e308", "0", str(5 * i)]))
    _refused(tmp_path, src, "ImagePositionPatient", "from the origin")


# ------------------------------------------------------------------------------ messages and warnings
def test_decoder_error_is_one_line(tmp_path, ct_data):
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(ct_data / "jpeg2000" / "693_J2KR.dcm")
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(998)])  # a J2K start marker, then nothing valid
    src = tmp_path / "src"
    save(ds, src / "j2k.dcm")
    row = _refused(tmp_path, src, "damaged or truncated compressed pixel data (")
    assert "\n" not in row["reason"]


def test_singular_nifti_affine_and_newline_in_a_name_are_one_line(tmp_path):
    path = tmp_path / "bad\nname.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), path)
    header = nib.load(path).header.copy()
    header["srow_z"] = 0  # a singular sform (nibabel will not write one itself)
    header["qform_code"] = 0
    path.write_bytes(header.binaryblock + path.read_bytes()[348:])
    report, err, inventory, manifest = _ingest(tmp_path, path)
    assert len(err) == 1 and "not invertible" in err[0] and "bad\\nname" in err[0], err


def test_pydicom_warnings_go_to_the_inventory_not_stderr(tmp_path, s2010, capfd):
    src = write_series(s2010[:4], tmp_path / "src",
                       lambda ds, i, n: i == 2 and set_raw(ds, "SOPInstanceUID", b"abc\0"))
    report, err, inventory, manifest = _ingest(tmp_path, src)
    row = _series_row(inventory)
    assert row["status"] == "converted" and f"{s2010[2].name}: UserWarning: Invalid value for VR UI" in row["warnings"]
    captured = capfd.readouterr()
    assert "Invalid value" not in captured.err and err == []


def test_build_volume_alone_raises_user_errors(s2010, tmp_path):
    """The library call (no ingest around it) refuses the same inputs with UserError, one line."""
    src = write_series(s2010[:2], tmp_path / "src", lambda ds, i, n: set_raw(ds, "SliceThickness", b"abc "))
    with pytest.raises(UserError, match="SliceThickness 'abc' is not a number") as err:
        build_volume(sorted(src.iterdir()))
    assert "\n" not in str(err.value)
