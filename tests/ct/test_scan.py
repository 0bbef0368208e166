"""Discovery, classification and grouping of DICOM files on the real fixtures (headers only)."""
from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import pydicom
import pytest

from pancls.ct.scan import (
    PIXEL_DATA,
    SkippedFile,
    default_workers,
    group_series,
    orientation_label,
    parallel_map,
    read_dicom_header,
    read_header,
    scan,
)
from pancls.errors import UserError


def test_series_ct_recurses_and_finds_three_series(ct_data: Path):
    result = scan([ct_data / "series_ct"], progress=False)
    assert not result.skipped or all(s.path.name == "expected.json" for s in result.skipped)
    by_number = {s.first.series_number: s for s in result.series}
    assert sorted(by_number) == [100, 201, 401]
    assert len({s.study_hash for s in result.series}) == 1
    axial = by_number[201]
    assert axial.n_slices == 10 and axial.orientation_label == "axial"
    assert {p.parent.name for p in axial.paths} == {"S2010"}
    assert by_number[100].first.is_localizer
    assert by_number[401].first.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
    assert by_number[401].first.modality == "CT"  # says CT, yet it is a secondary capture


def test_names_carry_no_uids(ct_data: Path):
    result = scan([ct_data / "series_ct"], progress=False)
    for s in result.series:
        assert s.first.series_uid not in s.name and s.first.study_uid not in s.name
        assert len(s.series_hash) == 10 and int(s.series_hash, 16) >= 0


def test_abdomen_empty_uids_grouped_by_fallback(ct_data: Path):
    result = scan([ct_data / "abdomen" / "dicom_series"], progress=False)
    assert len(result.series) == 1
    series = result.series[0]
    assert series.first.series_uid == "" and series.first.study_uid == "" and series.first.series_number is None
    assert series.first.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"  # from the file meta
    assert len(series.instances) == 20 and series.notes == []


@pytest.mark.parametrize("name, expected", [
    ("DICOMDIR", "DICOMDIR"),
    ("test-SR.dcm", "Comprehensive SR Storage"),
    ("sr_document.dcm", "Comprehensive 3D SR Storage"),
    ("seg_image_ct_binary.dcm", "Segmentation Storage"),
    ("GSPS.dcm", "Grayscale Softcopy Presentation State Storage"),
    ("rtstruct.dcm", "no DICOM preamble/file meta"),
    ("rtplan.dcm", "RT Plan Storage"),
    ("rtdose.dcm", "RT Dose Storage"),
])
def test_nonimage_objects_skipped_by_sop_class(ct_data: Path, name: str, expected: str):
    result = read_header(ct_data / "nonimage" / name)
    assert isinstance(result, SkippedFile) and not result.problem
    assert expected in result.reason


def test_nonimage_folder_yields_no_series(ct_data: Path):
    result = scan([ct_data / "nonimage"], progress=False)
    assert result.series == []
    assert {s.path.name for s in result.skipped} >= {"DICOMDIR", "rtdose.dcm", "seg_image_ct_binary.dcm"}


def test_jpeg2000_twin_is_deduplicated_with_a_note(ct_data: Path):
    (series,) = scan([ct_data / "jpeg2000"], progress=False).series
    assert len(series.instances) == 1
    assert "duplicate" in series.notes[0]


def test_copy_of_a_series_in_another_folder_stays_separate(ct_data: Path):
    # gap/removed_slices holds 6 byte-identical files of series_ct's S2010 (same UIDs)
    result = scan([ct_data / "series_ct", ct_data / "gap" / "removed_slices"], progress=False)
    s201 = sorted((s for s in result.series if s.first.series_number == 201), key=lambda s: s.n_slices)
    assert [s.n_slices for s in s201] == [6, 10]
    assert s201[0].study_hash != s201[1].study_hash
    assert all(s.notes == [] for s in s201)


def test_bad_files_are_classified_not_raised(tmp_path: Path, ct_data: Path):
    good = ct_data / "series_ct" / "S21570" / "S2010" / "I10"
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:700])
    text = tmp_path / "notes.txt"
    text.write_text("not dicom at all\n" * 20)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    res = {p.name: read_header(p) for p in (truncated, text, empty)}
    assert res["truncated.dcm"].problem and "truncated" in res["truncated.dcm"].reason
    assert not res["notes.txt"].problem and res["notes.txt"].reason == "not a DICOM file"
    # an empty file among slices is most likely a lost slice: a problem, not a quiet skip
    assert res["empty"].problem and "empty file" in res["empty"].reason


def test_zip_archives_are_walked(tmp_path: Path, ct_data: Path):
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((ct_data / "series_ct" / "S21570" / "S2010").iterdir()):
            zf.write(f, f"a/{f.name}")
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    result = scan([archive], tmp_dir=unpacked, progress=False)
    assert [s.n_slices for s in result.series] == [10]
    assert set(result.origin.values()) == {archive}


def test_missing_source_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="no such file"):
        scan([tmp_path / "nope"], progress=False)


def test_localizer_sharing_the_series_uid_becomes_its_own_subseries(ct_data: Path):
    axial = [read_header(p) for p in sorted((ct_data / "series_ct" / "S21570" / "S2010").iterdir())]
    scout = read_header(ct_data / "series_ct" / "S21570" / "S1000" / "I10")
    scout = dataclasses.replace(scout, series_uid=axial[0].series_uid, folder=axial[0].folder)
    series = group_series(axial + [scout])
    assert sorted(s.n_slices for s in series) == [1, 10]
    assert len({s.series_hash for s in series}) == 2


@pytest.mark.parametrize("iop, label", [
    ((1, 0, 0, 0, 1, 0), "axial"),
    ((1, 0, 0, 0, 0, -1), "coronal"),
    ((0, 1, 0, 0, 0, -1), "sagittal"),
    ((1, 0, 0, 0, 0.9483, -0.3173), "axial"),  # 18.5 deg gantry tilt
    ((1, 0, 0, 0, 0.7071, -0.7071), "oblique"),
    (None, "unknown"),
])
def test_orientation_label(iop, label):
    assert orientation_label(iop) == label


@pytest.mark.parametrize("name", ["series_ct/S21570/S2010/I10", "jpeg2000/693_J2KR.dcm", "enhanced/eCT_Supplemental.dcm"])
def test_header_records_where_the_pixel_data_starts(ct_data: Path, name: str):
    path = ct_data / name
    header = read_dicom_header(path)
    assert header.pixel_tag == PIXEL_DATA and "PixelData" not in header.dataset  # pixels not read
    with open(path, "rb") as fh:
        fh.seek(header.pixel_offset)
        assert fh.read(4) == b"\xe0\x7f\x10\x00"  # the (7FE0,0010) tag, little endian
    full = pydicom.dcmread(path)
    # the parsed header is the full dataset minus the pixel data
    assert [e.tag for e in header.dataset] == [e.tag for e in full if e.tag != 0x7FE00010]


def test_header_without_pixel_data(ct_data: Path):
    header = read_dicom_header(ct_data / "nonimage" / "rtplan.dcm")
    assert header.pixel_tag is None and header.pixel_offset is None


def test_series_carry_their_headers(ct_data: Path):
    (series,) = scan([ct_data / "series_ct" / "S21570" / "S2010"], progress=False).series
    assert [h.dataset.SOPInstanceUID for h in series.headers] == [i.sop_instance_uid for i in series.instances]


def test_parallel_map_keeps_order_and_raises(ct_data: Path):
    items = list(range(40))
    assert parallel_map(lambda x: x * x, items, workers=3) == [x * x for x in items]
    assert parallel_map(lambda x: x * x, items) == [x * x for x in items]
    with pytest.raises(ZeroDivisionError):
        parallel_map(lambda x: 1 // (x - 17), items, workers=2)
    assert default_workers(1) == 1  # a small series runs in the calling thread
    assert 1 <= default_workers(10_000) <= 8


def test_scan_with_threads_equals_scan_without(ct_data: Path):
    one = scan([ct_data / "series_ct"], workers=1, progress=False)
    many = scan([ct_data / "series_ct"], workers=4, progress=False)
    assert [(s.series_hash, s.paths) for s in one.series] == [(s.series_hash, s.paths) for s in many.series]
    assert one.skipped == many.skipped


def _abdomen_headers(ct_data: Path, n: int = 5):
    """The first ``n`` slices of the UID-less Siemens series (2 mm apart), headers only."""
    return [read_header(p) for p in sorted((ct_data / "abdomen" / "dicom_series").iterdir())[:n]]


@pytest.mark.parametrize("moved, change, noted", [
    (2, {"acquisition_key": ("1", "", "", "")}, 1),  # a middle slice's KVP differs: split off, a hole left
    (2, {"patient_hash": "other"}, 1),  # ... or it went to another study (PatientID): same folder, same note
    (2, {"pixel_spacing": (float("inf"), 0.98)}, 1),  # a damaged value in the grouping key
    (2, {"orientation": (1.0, 0.0, -1.0, 0.0, 1.0, 0.0)}, 1),  # an orientation that is no plane: counted
    (4, {"acquisition_key": ("1", "", "", "")}, 1),  # the end slice: the stack is shorter by one interval
    (2, {"orientation": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)}, 0),  # a coronal plane belongs to another stack
    (2, {"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, 0),  # a localizer is no lost slice
])
def test_uidless_series_notes_files_split_off_inside_its_range(ct_data: Path, moved, change, noted):
    # Rule 6: without SeriesInstanceUID, one changed header value moves a slice into a group of its own; what is
    # left can still look regular (2 slices always do), so the series that keeps the others says so.
    headers = _abdomen_headers(ct_data)
    headers[moved] = dataclasses.replace(headers[moved], **change)
    series = group_series(headers)
    main = max(series, key=lambda s: s.n_slices)
    assert main.n_slices == 4
    stray = [n for n in main.notes if "went to other series" in n]
    if noted:
        assert stray and stray[0].startswith(f"grouped without SeriesInstanceUID: {noted} file(s) of this folder")
    else:
        assert stray == []
    untouched = group_series(_abdomen_headers(ct_data))
    assert len(untouched) == 1 and untouched[0].notes == []


def test_series_with_uids_get_no_stray_note(ct_data: Path):
    # with a SeriesInstanceUID a series is what the scanner says; another series in the folder is no hole
    axial = [read_header(p) for p in sorted((ct_data / "series_ct" / "S21570" / "S2010").iterdir())]
    axial[3] = dataclasses.replace(axial[3], series_uid=axial[3].series_uid + ".9")
    series = group_series(axial)
    assert sorted(s.n_slices for s in series) == [1, 9]
    assert all("went to other series" not in n for s in series for n in s.notes)


@pytest.mark.parametrize("orientation", [None, (1.0, 0.0, 0.0, 0.0, float("nan"), 0.0), (1.0, 0.0, 0.0)])
def test_uidless_slice_without_orientation_stays_in_its_series(ct_data: Path, orientation):
    # the orientation is part of the fallback key: without this rule the slice would become a series of its own
    # and leave a 4-slice stack with a hole; it stays, so that the volume builder refuses it by name
    headers = _abdomen_headers(ct_data)
    headers[2] = dataclasses.replace(headers[2], orientation=orientation)
    (series,) = group_series(headers)
    assert series.n_slices == 5 and headers[2] in series.instances


def test_cut_short_slices_and_damaged_zips_are_problems_not_skips(tmp_path: Path, ct_data: Path):
    """A slice cut to 100 bytes (no room for 'DICM') beside DICOM files, and a zip archive cut short (zip signature,
    no central directory), are refused as problems, not skipped as "not a DICOM file"; a short text file alone
    and one beside nothing stay skips; problems_beside lists the series' lost slice."""
    from pancls.ct.scan import problems_beside

    series = ct_data / "series_ct" / "S21570" / "S2010"
    folder = tmp_path / "export" / "series"
    folder.mkdir(parents=True)
    for f in sorted(series.iterdir())[:4]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "I50").write_bytes((series / "I50").read_bytes()[:100])
    (folder / "md5.txt").write_text("ab\n")  # a short text file beside the slices: no slice (review)
    archive = tmp_path / "export" / "other_study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(series.iterdir())[4:]:
            zf.write(f, f"zipped/{f.name}")
    archive.write_bytes(archive.read_bytes()[:5000])  # an interrupted copy: no central directory
    alone = tmp_path / "export" / "readme"
    alone.mkdir()
    (alone / "notes.txt").write_text("hello\n")
    result = scan([tmp_path / "export"], tmp_dir=tmp_path / "tmp", progress=False)
    skipped = {s.path.name: s for s in result.skipped}
    assert skipped["I50"].problem and "truncated file (100 bytes" in skipped["I50"].reason
    assert skipped["other_study.zip"].problem and "damaged or truncated zip archive" in skipped["other_study.zip"].reason
    assert [a.path.name for a in result.archives] == ["other_study.zip"]
    assert not skipped["notes.txt"].problem and skipped["notes.txt"].reason == "not a DICOM file"
    assert not skipped["md5.txt"].problem and skipped["md5.txt"].reason == "not a DICOM file"
    (kept,) = result.series
    assert kept.n_slices == 4 and [s.path.name for s in problems_beside(kept, result.skipped)] == ["I50"]
