"""`pancls ingest` end to end on the real CT fixtures, through ``pancls.cli.main``."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pancls.cli import main

REPO = Path(__file__).resolve().parents[1]

S2010 = ("series_ct", "S21570", "S2010")


def _run(capsys, *argv):
    """`pancls ingest ARGV`, keeping the fixtures' short series (1-10 slices; the default minimum is 20)."""
    code = main(["ingest", *map(str, argv), "--no-progress", "--min-slices", "1"])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def _csv(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _mtimes(out: Path):
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "images").iterdir())}


@pytest.fixture(scope="module")
def whole_ct(ct_data: Path, tmp_path_factory):
    """One default ingest of the whole ct/ folder, shared by the tests below (it is the slow part)."""
    out = tmp_path_factory.mktemp("ingest") / "out"
    err, std = io.StringIO(), io.StringIO()  # capsys is function-scoped
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        code = main(["ingest", str(ct_data), "--out", str(out), "--no-progress", "--keep-descriptions",
                     "--min-slices", "1"])
    return code, std.getvalue(), err.getvalue().splitlines(), out


def test_whole_folder_default_policy(whole_ct, ct_data: Path):
    code, out_text, err, out = whole_ct
    assert code == 1
    assert "Traceback" not in "\n".join(err)
    gap_lines = [line for line in err if "removed_slices" in line]
    tilt_lines = [line for line in err if "tilt_variable_spacing" in line]
    assert len(gap_lines) == 1 and "gap" in gap_lines[0] and "25" in gap_lines[0]
    assert len(tilt_lines) == 1 and "tilt" in tilt_lines[0] and "18.5" in tilt_lines[0]
    (perfusion,) = [line for line in err if "enhanced" in line]
    assert "RescaleType US" in perfusion  # the NEMA perfusion map is not CT in HU
    assert len(err) == 3, err
    assert "4 series kept (4 converted, 0 up to date, 1 with notes (see .private/inventory.csv))" in out_text
    assert "3 refused, 0 failed" in out_text  # gap, tilt and the perfusion map (RescaleType US)

    manifest = _csv(out / "manifest.csv")
    assert list(manifest[0]) == ["patient_id", "image", "label", "study_id", "series_id", "series_number",
                                 "description", "n_slices", "flags", "source"]
    by_desc = {(r["source"], r["description"]): r for r in manifest}
    assert set(by_desc) == {("dicom", "STD BRAIN 5MM"), ("dicom", "CT Body 3.0"), ("dicom", "5/5mm Plain"),
                            ("nifti", "")}  # not the perfusion map
    assert all(r["label"] == "" and (out / r["image"]).exists() for r in manifest)
    series = nib.load(out / by_desc["dicom", "STD BRAIN 5MM"]["image"])
    assert series.shape == (512, 512, 10) and np.allclose(series.header.get_zooms(), (0.451172, 0.451172, 5.0), atol=1e-5)
    abdomen = nib.load(out / by_desc["dicom", "CT Body 3.0"]["image"])
    assert abdomen.shape == (512, 512, 20)
    assert nib.load(out / by_desc["nifti", ""]["image"]).shape == (122, 101, 30)  # the masks were not taken

    inventory = _csv(out / ".private" / "inventory.csv")
    status = {(r["kind"], r["series_number"], r["description"], r["path"]): (r["status"], r["reason"]) for r in inventory}
    localizer = status["series", "100", "", "series_ct/S21570/S1000"]  # series rows name their folder
    assert localizer[0] == "skipped" and "localizer" in localizer[1]
    assert "secondary capture" in status["series", "401", "Exam Summary", "series_ct/S21570/S4010"][1]
    series_status = {r["series_id"]: r["status"] for r in inventory if r["kind"] == "series"}
    assert series_status[by_desc["dicom", "STD BRAIN 5MM"]["series_id"]] == "converted"
    assert sorted(s for s in series_status.values() if s != "skipped") == ["converted"] * 3 + ["refused"] * 3
    notes = {(r["series_number"], r["description"]): r["notes"] for r in inventory if r["kind"] == "series"}
    assert "duplicate" in notes["2", "5/5mm Plain"]
    assert [k for k, v in notes.items() if v] == [("2", "5/5mm Plain")]
    files = {r["path"]: r["reason"] for r in inventory if r["kind"] == "file"}
    for name in ("DICOMDIR", "GSPS.dcm", "rtdose.dcm", "rtplan.dcm", "rtstruct.dcm", "seg_image_ct_binary.dcm",
                 "sr_document.dcm", "test-SR.dcm"):
        assert f"nonimage/{name}" in files
    assert files["nonimage/rtstruct.dcm"].endswith("no DICOM preamble/file meta")
    masks = [r for r in inventory if r["kind"] == "nifti" and r["status"] == "skipped"]
    assert sorted(Path(r["path"]).name for r in masks) == ["example_seg.nii.gz", "example_seg_dicom.nii.gz",
                                                           "pancreas_mask.nii.gz"]


def test_outputs_carry_no_identifiers(whole_ct, ct_data: Path):
    *_, out = whole_ct
    ds = pydicom.dcmread(ct_data.joinpath(*S2010, "I10"), stop_before_pixels=True)
    secrets = [str(v) for v in (ds.PatientID, ds.PatientName, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                ds.SOPInstanceUID) if str(v)]
    texts = [(out / "manifest.csv").read_text(), (out / ".private" / "inventory.csv").read_text()]
    texts += [p.read_text() for p in (out / "images").glob("*.json")]
    names = " ".join(p.name for p in (out / "images").iterdir())
    for secret in secrets:
        assert all(secret not in t for t in texts) and secret not in names


def test_rerun_is_incremental_and_force_rewrites(whole_ct, ct_data: Path, capsys, tmp_path: Path):
    *_, out = whole_ct
    work = tmp_path / "out"
    shutil.copytree(out, work, copy_function=shutil.copy2)
    before = _mtimes(work)
    code, text, err = _run(capsys, ct_data, "--out", work, "--keep-descriptions")
    assert code == 1 and "0 converted, 4 up to date" in text
    assert _mtimes(work) == before
    assert _csv(work / "manifest.csv") == _csv(out / "manifest.csv")
    (work / "manifest.csv").write_text("patient_id,image\nx,images/gone.nii.gz\n")  # stale rows are dropped
    code, text, err = _run(capsys, ct_data, "--out", work, "--force", "--keep-descriptions")
    assert code == 1 and "4 converted, 0 up to date" in text
    after = _mtimes(work)
    assert set(after) == set(before) and all(after[n] != before[n] for n in before)
    assert _csv(work / "manifest.csv") == _csv(out / "manifest.csv")


def test_run_on_one_source_keeps_the_other_rows(whole_ct, ct_data: Path, capsys, tmp_path: Path):
    *_, out = whole_ct
    work = tmp_path / "out"
    shutil.copytree(out, work)
    code, text, _ = _run(capsys, ct_data / "jpeg2000", "--out", work, "--keep-descriptions")
    assert code == 0 and "0 converted, 1 up to date" in text
    assert _csv(work / "manifest.csv") == _csv(out / "manifest.csv")  # rows from the earlier sources stay


def test_resample_policy_writes_and_flags_gap_and_tilt(ct_data: Path, capsys, tmp_path: Path):
    out = tmp_path / "out"
    code, text, err = _run(capsys, ct_data / "gap", "--out", out,
                           "--on-gap", "resample", "--on-tilt", "resample", "--on-uneven", "resample")
    assert code == 0, err
    rows = _csv(out / "manifest.csv")
    assert len(rows) == 2
    flags = sorted(r["flags"] for r in rows)
    assert "resampled:gap" in flags[0] + flags[1] and "resampled:tilt" in flags[0] + flags[1]


def test_bad_inputs_each_give_one_line(ct_data: Path, capsys, tmp_path: Path):
    src = tmp_path / "src"
    good = src / "good"
    shutil.copytree(ct_data.joinpath(*S2010), good)
    broken = src / "broken"
    broken.mkdir()
    (broken / "cut.dcm").write_bytes((good / "I10").read_bytes()[:600])  # header cut short
    only_sr = src / "only_sr"
    only_sr.mkdir()
    shutil.copy(ct_data / "nonimage" / "test-SR.dcm", only_sr)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), affine), tmp_path / "flat.nii.gz")

    code, text, err = _run(capsys, good, broken, only_sr, notes, tmp_path / "nan.nii.gz",
                           tmp_path / "flat.nii.gz", "--out", tmp_path / "out", "--keep-descriptions")
    assert code == 1
    assert "Traceback" not in "\n".join(err)
    assert len(err) == 6, err  # cut.dcm, broken/ has no usable series, only_sr/, notes.txt, nan, flat
    line = {key: [line for line in err if key in line] for key in ("cut.dcm", "only_sr", "notes.txt", "nan.nii.gz", "flat.nii.gz")}
    assert all(len(v) == 1 for v in line.values()), line
    assert "truncated" in line["cut.dcm"][0]
    assert "no usable series" in line["only_sr"][0] and "Comprehensive SR Storage" in line["only_sr"][0]
    assert line["notes.txt"][0].endswith("not a DICOM file")
    assert "NaN" in line["nan.nii.gz"][0] or "nan" in line["nan.nii.gz"][0].lower()
    assert "1 converted" in text
    (row,) = _csv(tmp_path / "out" / "manifest.csv")
    assert row["description"] == "STD BRAIN 5MM" and (tmp_path / "out" / row["image"]).exists()


def test_missing_source_and_bad_config_exit_2(ct_data: Path, capsys, tmp_path: Path):
    code, _, err = _run(capsys, tmp_path / "nope", "--out", tmp_path / "out")
    assert code == 2 and err == [f"pancls ingest: error: {tmp_path / 'nope'}: no such file or folder"]
    config = tmp_path / "bad.yaml"
    config.write_text("selection:\n  min_slice: 3\n")
    code, _, err = _run(capsys, ct_data / "jpeg2000", "--out", tmp_path / "out", "--config", config)
    assert code == 2 and len(err) == 1 and "min_slice" in err[0]
    assert not (tmp_path / "out").exists()
    code, _, err = _run(capsys, tmp_path, "--out", tmp_path / "inside")
    assert code == 2 and "inside the source" in err[0]


def test_each_file_is_parsed_once(ct_data: Path, capsys, tmp_path: Path, monkeypatch):
    """The scan's headers are reused to build the volume, and native pixels are read without re-parsing."""
    calls = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda src, *a, **k: calls.append(getattr(src, "name", src))
                        or real(src, *a, **k))
    code, text, err = _run(capsys, ct_data.joinpath(*S2010), "--out", tmp_path / "out")
    assert code == 0 and "1 converted" in text, err
    files = sorted(str(p) for p in ct_data.joinpath(*S2010).iterdir())
    assert sorted(map(str, calls)) == files


# Elements whose values identify a patient, a study or a person, or describe in free text. UIDs are all
# UI elements except the standard's own (SOP classes, transfer syntaxes: 1.2.840.10008.*).
_IDENTIFYING_KEYWORDS = ("PatientID", "PatientName", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber",
                         "StudyID", "StudyDescription", "SeriesDescription", "ProtocolName", "InstitutionName",
                         "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "OperatorsName",
                         "ReferringPhysicianName", "PerformingPhysicianName", "RequestedProcedureDescription",
                         "PerformedProcedureStepDescription", "ImageComments", "DeviceSerialNumber",
                         "ContrastBolusAgent", "AdmittingDiagnosesDescription")


def _identifying_values(files):
    """Every UID, person name, date, date-time and descriptive text of the files (nested items included)."""
    values = set()

    def visit(ds):
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
                continue
            keep = (elem.VR in ("UI", "PN", "DA", "DT") or elem.keyword in _IDENTIFYING_KEYWORDS)
            if not keep or elem.value in (None, ""):
                continue
            for value in (elem.value if elem.VM > 1 else [elem.value]):
                text = str(value).strip()
                if len(text) >= 4 and not text.startswith("1.2.840.10008."):
                    values.add(text)

    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        visit(ds.file_meta)
        visit(ds)
    return values


def test_no_identifier_in_any_output_file(ct_data: Path, tmp_path: Path, capsys):
    """Default ingest of real series: no UID, name, date or description of the input appears in any output
    file (CSV, JSON, NIfTI headers, file names), neither raw nor as a plain SHA-256 (full or a 10-digit prefix)."""
    sources = [ct_data.joinpath(*S2010), ct_data / "abdomen" / "dicom_series", ct_data / "enhanced"]
    files = [f for src in sources for f in sorted(src.iterdir()) if f.name != "expected.json"]
    values = _identifying_values(files)
    assert len(values) >= 40 and any("^" in v for v in values)  # real UIDs, names and dates to leak
    out = tmp_path / "out"
    code, _, err = _run(capsys, *sources, "--out", out)
    assert code == 1 and len(err) == 1 and "RescaleType US" in err[0], err  # the perfusion map: refused
    outputs = [p for p in out.rglob("*") if p.is_file() and ".private" not in p.relative_to(out).parts]
    assert sorted({p.suffix for p in outputs}) == [".csv", ".gz", ".json"] and len(outputs) == 1 + 2 * 2  # + inventory in .private
    texts = {}
    for p in outputs:
        if p.name.endswith(".nii.gz"):
            header = nib.load(p).header
            for field in ("descrip", "aux_file", "intent_name", "db_name"):
                assert header[field].item() == b"", (p.name, field)
            texts[p] = header.binaryblock.decode("latin-1")
        else:
            texts[p] = p.read_text(encoding="utf-8")
        texts[p] += "\n" + str(p.relative_to(out))
    for value in values:
        digest = hashlib.sha256(value.encode()).hexdigest()
        for p, text in texts.items():
            assert value not in text and digest[:10] not in text, f"{value!r} (or its sha256) in {p.name}"


# ------------------------------------------------------------------------------ kill safety
def _kill_sources(ct_data: Path, tmp_path: Path):
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(ct_data.joinpath(*S2010).iterdir()):
            zf.write(f, f"zipped/{f.name}")
    return [archive, ct_data / "abdomen" / "dicom_series", ct_data / "enhanced", ct_data / "jpeg2000"]


def _start(sources, out: Path, secret: Path, tmp: Path):
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.Popen([sys.executable, "-m", "pancls", "ingest", *map(str, sources), "--out", str(out),
                             "--secret", str(secret), "--no-progress", "--min-slices", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)


def _leftovers(out: Path, tmp: Path):
    from pancls.io import is_temp_name

    temps = [p for p in out.rglob("*") if is_temp_name(p.name)]
    return temps + list((out / ".private" / "tmp").glob("*")) + list(tmp.iterdir())


def _snapshot(out: Path):
    """What an ingest produced: manifest, inventory without the status column, every image's voxels,
    affine and sidecar."""
    inventory = [{k: v for k, v in row.items() if k != "status"} for row in _csv(out / ".private" / "inventory.csv")]
    images = {}
    for p in sorted((out / "images").iterdir()):
        if p.name.endswith(".nii.gz"):
            img = nib.load(p)
            images[p.name] = (hashlib.sha256(np.asanyarray(img.dataobj).tobytes()).hexdigest(),
                              np.round(img.affine, 6).tolist())
        else:
            images[p.name] = p.read_text()
    return _csv(out / "manifest.csv"), inventory, images


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_ingest_leaves_nothing_and_a_rerun_equals_an_uninterrupted_run(ct_data, tmp_path, sig):
    import signal
    import time

    from pancls.io import is_temp_name

    sources = _kill_sources(ct_data, tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("ab" * 32 + "\n")
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    reference = tmp_path / "reference"
    assert _start(sources, reference, secret, tmp).wait(120) == 1  # the perfusion map (RescaleType US) is refused
    out = tmp_path / "out"
    for _attempt in range(5):  # kill while a volume is being written (retried if the run was too quick)
        shutil.rmtree(out, ignore_errors=True)
        proc = _start(sources, out, secret, tmp)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "images").is_dir() and any(is_temp_name(p.name) for p in (out / "images").iterdir()):
                break
            time.sleep(0.001)
        if proc.poll() is None:
            break
    assert proc.poll() is None, "every run ended before a volume was being written"
    proc.send_signal(getattr(signal, sig))
    code = proc.wait(60)
    if sig == "SIGKILL":
        assert code == -signal.SIGKILL
        assert _leftovers(out, tmp), "the kill left no temporary file: the test did not catch a write"
    else:  # SIGTERM unwinds: temporary files removed, manifest and inventory written, exit 130
        assert code == 130 and "interrupted" in proc.stderr.read().decode()
        assert _leftovers(out, tmp) == [] and (out / "manifest.csv").exists()
    rerun = _start(sources, out, secret, tmp)
    assert rerun.wait(120) == 1, rerun.stderr.read().decode()
    assert _leftovers(out, tmp) == []
    assert _snapshot(out) == _snapshot(reference)


def test_default_min_slices_skips_short_series_with_the_reason(ct_data: Path, capsys, tmp_path: Path):
    """Default 20 slices: the 10-slice series and the 1-slice JPEG 2000 study are not volumes to train on; the
    20-slice abdomen series is kept. Each skip has its reason; a source left without a series is refused."""
    code, text, err = main(["ingest", str(ct_data / "series_ct"), str(ct_data / "jpeg2000"),
                            str(ct_data / "abdomen" / "dicom_series"), "--out", str(tmp_path / "out"),
                            "--no-progress"]), *(lambda c: (c.out, c.err))(capsys.readouterr())
    assert code == 1 and "1 series kept" in text
    assert len(err.splitlines()) == 2 and all("no usable series" in line and "min_slices=20" in line
                                              for line in err.splitlines())
    reasons = [r["reason"] for r in _csv(tmp_path / "out" / ".private" / "inventory.csv") if r["status"] == "skipped"]
    short = [r for r in reasons if "fewer than min_slices=20" in r]
    assert all("lower selection.min_slices" in r for r in short)
    assert any(r.startswith("10 slice(s), fewer than min_slices=20") for r in short)  # S2010
    assert any(r.startswith("1 slice(s), fewer than min_slices=20") for r in short)  # the JPEG 2000 study
    assert len(_csv(tmp_path / "out" / "manifest.csv")) == 1


def test_a_folder_of_damaged_files_says_so_not_no_files(ct_data: Path, capsys, tmp_path: Path):
    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("I10", "I20"):
        data = (ct_data / "series_ct" / "S21570" / "S2010" / name).read_bytes()
        (folder / name).write_bytes(data[:600])  # cut inside the header
    code = main(["ingest", str(folder), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 3, err  # each damaged file, then the folder
    assert "no usable series" in err[-1] and "2 damaged file(s) refused" in err[-1] and "no files" not in err[-1]


def test_volumes_not_in_hounsfield_units_are_refused(ct_data: Path, capsys, tmp_path: Path):
    """The perfusion map (RescaleType US) and a CT saved as stored values (HU + 1024) are refused with the reason,
    not written into manifest.csv (pancls.ct.volume.check_ct_hu, the rule predict applies too)."""
    img = nib.load(ct_data / "abdomen" / "example_ct_sm.nii.gz")
    raw = tmp_path / "raw_ct.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.int16) + 1024, img.affine, img.header), raw)
    out = tmp_path / "out"
    code, text, err = _run(capsys, ct_data / "enhanced", raw, "--out", out)
    assert code == 1 and "0 series kept" in text and "2 refused" in text
    assert len(err) == 2, err
    (enhanced,) = [line for line in err if "enhanced" in line]
    assert "RescaleType US: the values are not Hounsfield units" in enhanced
    (stored,) = [line for line in err if "raw_ct.nii.gz" in line]
    assert "not CT in Hounsfield units" in stored and "HU + 1024?" in stored
    assert _csv(out / "manifest.csv") == [] and not list((out / "images").glob("*.nii.gz"))
    refused = [r for r in _csv(out / ".private" / "inventory.csv") if r["status"] == "refused"]
    assert len(refused) == 2


def test_a_single_slice_nifti_is_refused_as_a_short_dicom_series_is(ct_data: Path, capsys, tmp_path: Path):
    """A DICOM series under min_slices is refused by selection; a NIfTI holding one slice went through (review):
    the same minimum now applies to a volume given as one file (pancls.ct.select.check_stack)."""
    img = nib.load(ct_data / "abdomen" / "example_ct_sm.nii.gz")
    one = tmp_path / "one_slice.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, 20:21], img.affine), one)
    code = main(["ingest", str(one), "--out", str(tmp_path / "out"), "--no-progress"])  # the default minimum
    text, err = capsys.readouterr()
    assert code == 1 and "1 refused" in text and "1 slice(s), fewer than min_slices=20" in err
    assert "one_slice.nii.gz" in err
    code, text, err = _run(capsys, one, "--out", tmp_path / "out1", "--min-slices", "1")
    assert code == 0, err


def test_a_truncated_zip_beside_a_good_one_is_refused_not_dropped(ct_data: Path, capsys, tmp_path: Path):
    """A zip archive cut short (an interrupted copy) was "not a DICOM file", skipped: the study in it dropped
    silently with exit 0. Now it is refused, named on the terminal and in the inventory, exit 1."""
    src = tmp_path / "export"
    src.mkdir()
    for name, files in (("good.zip", sorted(ct_data.joinpath(*S2010).iterdir())),
                        ("truncated.zip", sorted((ct_data / "abdomen" / "dicom_series").iterdir()))):
        with zipfile.ZipFile(src / name, "w") as zf:
            for f in files:
                zf.write(f, f"study/{f.name}")
    (src / "truncated.zip").write_bytes((src / "truncated.zip").read_bytes()[:200_000])
    code, text, err = _run(capsys, src, "--out", tmp_path / "out")
    assert code == 1 and "1 series kept" in text and "1 refused" in text
    (line,) = err
    assert "truncated.zip" in line and "damaged or truncated zip archive" in line
    rows = [r for r in _csv(tmp_path / "out" / ".private" / "inventory.csv") if r["status"] == "refused"]
    assert [r["path"] for r in rows] == ["truncated.zip"]


def test_a_second_ingest_into_the_same_folder_is_refused(ct_data, tmp_path, capsys):
    """ingest holds OUT/.private/.lock as cv/lt hold theirs (pancls.io.hold_lock, one lock rule): another process
    writing into OUT (here an open file description holding that flock) refuses this run in one line, exit 2."""
    import fcntl
    import os

    from pancls.cli import main

    out = tmp_path / "ds"
    (out / ".private").mkdir(parents=True)
    fd = os.open(out / ".private" / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(["ingest", str(ct_data / "jpeg2000"), "--out", str(out), "--min-slices", "1", "--no-progress"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    finally:
        os.close(fd)
    assert code == 2 and len(err) == 1, err
    assert f"the ingest output folder {out} is in use by another pancls process" in err[0]
    assert not (out / "manifest.csv").exists() and not list(out.glob("images/*.nii.gz"))
    code = main(["ingest", str(ct_data / "jpeg2000"), "--out", str(out), "--min-slices", "1", "--no-progress"])
    assert code == 0 and (out / "manifest.csv").exists()  # the kernel dropped the lock with its holder
