"""`pancls ingest --labels/--label-key/--masks`: from the real DICOM fixtures and a label sheet written here to
a manifest that ``load_manifest`` accepts, in one command (pancls.join)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from pancls.cli import main
from pancls.data.classes import DEFAULT_CLASSES
from pancls.data.manifest import load_manifest

S2010 = ("series_ct", "S21570", "S2010")


def _run(capsys, *argv):
    code = main(["ingest", *map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def _csv(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write(path: Path, rows, delimiter=","):
    with open(path, "w", newline="") as fh:
        csv.writer(fh, delimiter=delimiter).writerows(rows)
    return path


def _seg_for_s2010(ct_data: Path, out: Path) -> tuple[Path, np.ndarray]:
    """A DICOM SEG (highdicom) of a 4 x 5 x 3 voxel box drawn on the S2010 slices; returns it and the box in
    the SEG's frame order (source file order) as a boolean (frames, rows, columns) array."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    files = sorted(ct_data.joinpath(*S2010).iterdir())
    sources = [pydicom.dcmread(f) for f in files if f.name != "expected.json"]
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    frames = np.zeros((len(sources), 512, 512), dtype=bool)
    frames[3:6, 200:204, 300:305] = True
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="lesion",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="pancls tests", manufacturer_model_name="test", software_versions="0",
        device_serial_number="0")
    out.mkdir(parents=True, exist_ok=True)
    seg.save_as(out / "lesion_seg.dcm")
    return out / "lesion_seg.dcm", frames


def test_one_ingest_gives_a_labelled_manifest_with_masks(ct_data: Path, tmp_path: Path, capsys):
    """DICOM (PatientID / blank UIDs) + NIfTI, a sheet keyed by folder with a mask column, a SEG under
    --masks: labels filled, masks on the volume grid (SEG as drawn, a dcm2niix-geometry NIfTI reoriented),
    one sheet row unmatched and one study unlabelled -- both counted and in the inventory, by line / id."""
    seg, box = _seg_for_s2010(ct_data, tmp_path / "masks")
    abdomen = ct_data / "abdomen"
    source = nib.load(abdomen / "example_seg_dicom.nii.gz")  # TotalSegmentator labels: its pancreas (7) as a mask
    source = nib.Nifti1Image((np.asanyarray(source.dataobj) == 7).astype(np.uint8), source.affine)
    pancreas_dicom = tmp_path / "pancreas_dicom.nii.gz"
    nib.save(source, pancreas_dicom)
    sheet = _write(tmp_path / "labels.csv", [
        ["folder", "label", "mask"],
        ["S21570", "PDAC", ""],                                       # the SEG under --masks (by series UID)
        ["dicom_series", "IPMN", str(pancreas_dicom)],  # LAS mask, volume LPS/RAS
        ["example_ct_sm", "NET", str(abdomen / "pancreas_mask.nii.gz")],  # NIfTI input, same grid
        ["no_such_case", "CP", ""],                                   # matches nothing
    ])
    out = tmp_path / "ds"
    code, text, err = _run(capsys, ct_data / "series_ct", abdomen / "dicom_series", abdomen / "example_ct_sm.nii.gz",
                           ct_data / "jpeg2000", "--out", out, "--labels", sheet, "--label-key", "folder",
                           "--masks", tmp_path / "masks", "--min-slices", "1")
    assert code == 0, err
    assert "labels: 3 labelled, 1 without a label (not in manifest.csv), 1 sheet row(s) matched no study" in text
    assert "masks: 3 (0 resampled onto the volume's grid)" in text
    assert err == ["labels.csv: 1 row(s) matched no study (line 5)"]

    manifest = load_manifest(out / "manifest.csv", DEFAULT_CLASSES)
    assert sorted(manifest.class_counts().items()) == sorted({"PDAC": 1, "IPMN": 1, "NET": 1, "SCN": 0, "ASC": 0,
                                                              "CP": 0}.items())
    rows = {r["label"]: r for r in _csv(out / "manifest.csv")}
    for r in rows.values():  # one voxel order for every volume and mask written (DICOM rows/columns are L, P)
        for key in ("image", "mask"):
            assert nib.aff2axcodes(nib.load(out / r[key]).affine) == ("R", "A", "S")
    assert list(_csv(out / "manifest.csv")[0])[:4] == ["patient_id", "image", "mask", "label"]
    # the SEG: the drawn box, voxel for voxel, on the ingested volume (sorted by position like the SEG frames)
    pdac = nib.load(out / rows["PDAC"]["mask"])
    image = nib.load(out / rows["PDAC"]["image"])
    assert pdac.shape == image.shape and np.allclose(pdac.affine, image.affine)
    data = np.asanyarray(pdac.dataobj)
    assert data.sum() == box.sum()
    ds = pydicom.dcmread(ct_data.joinpath(*S2010, "I10"), stop_before_pixels=True)
    slices = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in ct_data.joinpath(*S2010).iterdir()
                     if f.name != "expected.json"), key=lambda d: float(d.ImagePositionPatient[2]))
    expected = set()
    for k, r, c in np.argwhere(box):  # DICOM: IPP + c * column spacing * row direction + r * row spacing * column dir
        d = slices[k]
        iop, (dr, dc) = np.asarray(d.ImageOrientationPatient, float), map(float, d.PixelSpacing)
        lps = np.asarray(d.ImagePositionPatient, float) + c * dc * iop[:3] + r * dr * iop[3:]
        expected.add(tuple(np.round(lps * [-1, -1, 1], 2)))
    found = {tuple(np.round((pdac.affine @ [*ijk, 1])[:3], 2)) for ijk in np.argwhere(data)}
    assert found == expected
    # the dcm2niix-geometry mask: the same voxels after the flip (reoriented, not resampled)
    ipmn = np.asanyarray(nib.load(out / rows["IPMN"]["mask"]).dataobj)
    assert "mask_reoriented" in rows["IPMN"]["flags"].split(";")
    assert np.array_equal(np.bincount(ipmn.ravel()), np.bincount(np.asanyarray(source.dataobj).ravel()))
    ijk = np.argwhere(ipmn == 1)[0]
    src_ijk = np.rint(np.linalg.inv(source.affine) @ nib.load(out / rows["IPMN"]["image"]).affine @ [*ijk, 1])[:3]
    assert np.asanyarray(source.dataobj)[tuple(src_ijk.astype(int))] == 1
    assert "mask_" not in rows["NET"]["flags"]  # already on the grid

    inventory = _csv(out / ".private" / "inventory.csv")
    unmatched = [r for r in inventory if r["kind"] == "label"]
    assert [(r["path"], r["status"], r["label"]) for r in unmatched] == [("labels.csv:5", "unmatched", "CP")]
    unlabelled = [r for r in inventory if r["reason"].startswith("no label")]
    assert len(unlabelled) == 1 and unlabelled[0]["status"] == "converted" and unlabelled[0]["image"]
    assert not (out / "masks").joinpath(Path(unlabelled[0]["image"]).name).exists()

    # the key file: every kept volume (labelled or not) -> its source identifiers; nothing of it elsewhere
    keys = _csv(out / ".private" / "keys.csv")
    assert len(keys) == 4 and (out / ".private" / "keys.csv").stat().st_mode & 0o077 == 0
    plastic = [k for k in keys if k["PatientID"] == "PLASTIC"]
    assert len(plastic) == 1 and plastic[0]["StudyInstanceUID"] == ds.StudyInstanceUID
    assert plastic[0]["image"] == rows["PDAC"]["image"] and plastic[0]["folder"].endswith("S2010")
    public = [p for p in out.rglob("*") if p.is_file() and ".private" not in p.relative_to(out).parts]
    for p in public:
        text = p.read_text(errors="replace") if p.suffix in (".csv", ".json") else p.name
        # input paths (folder names often carry patient names) only in .private/inventory.csv
        values = ["PLASTIC", ds.StudyInstanceUID, ds.SeriesInstanceUID, "CQ500-CT-310", "no_such_case",
                  "dicom_series", "S21570"]
        for value in values:
            assert value not in text, (value, p.name)


def test_patient_id_key_and_rerun_keep_labels(ct_data: Path, tmp_path: Path, capsys):
    sheet = _write(tmp_path / "labels.csv", [["Patient ID", "Label"], ["PLASTIC", "SCN"], [" CQ500-CT-310 ", "CP"]],
                   delimiter=";")
    out = tmp_path / "ds"
    config = "--min-slices", "1"  # the fixtures' series have 1-10 slices: below the default minimum (20)
    code, text, err = _run(capsys, ct_data.joinpath(*S2010), ct_data / "jpeg2000", "--out", out, "--labels", sheet,
                           *config)
    assert code == 0, err
    assert "labels: 2 labelled, 0 without a label" in text and "0 sheet row(s) matched no study" in text
    assert sorted(load_manifest(out / "manifest.csv", DEFAULT_CLASSES).table["label"]) == ["CP", "SCN"]
    before = _csv(out / "manifest.csv")
    code, text, err = _run(capsys, ct_data.joinpath(*S2010), ct_data / "jpeg2000", "--out", out, *config)
    assert code == 0 and "up to date" in text and _csv(out / "manifest.csv") == before  # labels kept without --labels


def test_unknown_labels_and_bad_sheets_are_refused_at_once(ct_data: Path, tmp_path: Path, capsys):
    sheet = _write(tmp_path / "labels.csv", [["PatientID", "label"], ["a", "PDCA"], ["", "PDAC"], ["b", "NET"],
                                             ["b", "SCN"], ["c", ""]])
    code, _, err = _run(capsys, ct_data / "jpeg2000", "--out", tmp_path / "ds", "--labels", sheet)
    assert code == 2
    text = "\n".join(err)
    assert "4 problems in the label sheet" in text
    assert "labels.csv:2: unknown label 'PDCA'; expected one of PDAC, IPMN, NET, SCN, ASC, CP" in text
    assert "labels.csv:3: empty PatientID" in text and "labels.csv:6: empty label; expected one of" in text
    assert "labels.csv:5: same PatientID as line 4 but a different label (SCN here, NET there)" in text
    assert not (tmp_path / "ds").exists()  # refused before anything was written
    missing = _write(tmp_path / "nokey.csv", [["StudyInstanceUID", "label"], ["1.2", "PDAC"]])
    code, _, err = _run(capsys, ct_data / "jpeg2000", "--out", tmp_path / "ds", "--labels", missing)
    assert code == 2 and "missing column(s): PatientID (found: StudyInstanceUID, label)" in err[-1]
    code, _, err = _run(capsys, ct_data / "jpeg2000", "--out", tmp_path / "ds", "--labels", missing,
                        "--classes", "benign,malignant")
    assert code == 2


def test_mask_off_the_grid_is_resampled_and_flagged(ct_data: Path, tmp_path: Path, capsys):
    """A mask at half the resolution of the volume: resampled nearest-neighbour onto its grid, flagged."""
    src = nib.load(ct_data / "abdomen" / "pancreas_mask.nii.gz")
    data = np.asanyarray(src.dataobj)[::2, ::2, :]
    affine = src.affine.copy()
    affine[:3, :2] *= 2
    affine[:3, 3] += src.affine[:3, :2] @ [0.5, 0.5]  # voxel centres of 2x2 blocks
    (tmp_path / "masks").mkdir()
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "masks" / "example_ct_sm.nii.gz")
    out = tmp_path / "ds"
    code, text, err = _run(capsys, ct_data / "abdomen" / "example_ct_sm.nii.gz", "--out", out, "--label-key", "folder",
                           "--masks", tmp_path / "masks")
    assert code == 0, err
    assert "masks: 1 (1 resampled onto the volume's grid)" in text
    row = _csv(out / "manifest.csv")[0]
    assert "mask_resampled:nearest" in row["flags"].split(";")
    mask = nib.load(out / row["mask"])
    assert mask.shape == (122, 101, 30) and 0.5 < np.asanyarray(mask.dataobj).sum() / 644 < 2


def _second_study(ct_data: Path, folder: Path, shift_mm: float) -> Path:
    """The S2010 slices as another study of the same patient (PatientID PLASTIC): new Study/Series/SOP/Frame of
    Reference UIDs, the slices ``shift_mm`` further along z (another scan's extent)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    uids = {k: generate_uid() for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}
    for f in sorted(ct_data.joinpath(*S2010).iterdir()):
        ds = pydicom.dcmread(f)
        for k, v in uids.items():
            setattr(ds, k, v)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + shift_mm]
        ds.save_as(folder / f.name)
    return folder


def _patient_mask(ct_data: Path, masks: Path) -> Path:
    """``masks/PLASTIC.nii.gz``: a 20 x 20 box on every slice of S2010's grid, named by the PatientID."""
    from pancls.ct.volume import build_volume

    volume = build_volume(sorted(ct_data.joinpath(*S2010).iterdir()))
    data = np.zeros(volume.array.shape, np.uint8)
    data[200:220, 200:220, :] = 1
    masks.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, volume.affine), masks / "PLASTIC.nii.gz")
    return masks / "PLASTIC.nii.gz"


def test_a_mask_matching_two_studies_is_refused_for_both(ct_data: Path, tmp_path: Path, capsys):
    """One PatientID-named mask, two studies of that patient (other Study and Frame of Reference UIDs): the mask
    was drawn on one of them; both are refused (reason: ambiguous, how to key masks), neither row gets a mask."""
    _patient_mask(ct_data, tmp_path / "masks")
    other = _second_study(ct_data, tmp_path / "src" / "later", 25.0)
    out = tmp_path / "ds"
    code, text, err = _run(capsys, ct_data.joinpath(*S2010), other, "--out", out, "--masks", tmp_path / "masks",
                           "--min-slices", "1")
    assert code == 1, err
    assert len(err) == 2 and all("mask PLASTIC.nii.gz is ambiguous: it matches 2 studies by PatientID" in e
                                 and "StudyInstanceUID" in e and "DICOM SEG" in e for e in err), err
    rows = _csv(out / "manifest.csv")
    assert len(rows) == 2 and all(not r.get("mask") for r in rows)
    assert not list(out.glob("masks/*.nii.gz"))
    notes = [r["notes"] for r in _csv(out / ".private" / "inventory.csv") if r["kind"] == "series"]
    assert len(notes) == 2 and all("is ambiguous" in n for n in notes)


def test_a_mask_mostly_outside_its_volume_is_refused(ct_data: Path, tmp_path: Path, capsys):
    """The mask of the first scan put on a later one whose slices start 25 mm further: half its voxels fall
    outside the volume (was: kept with a private note); refused for that study, exit 1. A sliver outside (<= 1 %)
    is kept with the note."""
    mask = _patient_mask(ct_data, tmp_path / "masks")
    other = _second_study(ct_data, tmp_path / "src" / "later", 25.0)
    out = tmp_path / "ds"
    code, text, err = _run(capsys, other, "--out", out, "--masks", tmp_path / "masks", "--min-slices", "1")
    assert code == 1
    assert len(err) == 1 and "2000 of the mask's 4000 voxels (50.0 %) lie outside the image (at most 1 % may)" in err[0], err
    assert not _csv(out / "manifest.csv")[0].get("mask")
    # the same mask with 1 % of its voxels beyond the last slice: on the grid, noted privately
    near = _second_study(ct_data, tmp_path / "src2" / "same_extent", 0.0)
    data = np.zeros((512, 512, 11), np.uint8)
    data[200:220, 200:220, :10] = np.asanyarray(nib.load(mask).dataobj)[200:220, 200:220, :]
    data[0:4, 0:10, 10] = 1  # 40 of 4040 voxels on a slice the series does not have
    nib.save(nib.Nifti1Image(data, nib.load(mask).affine), mask)
    code, text, err = _run(capsys, near, "--out", tmp_path / "ds2", "--masks", tmp_path / "masks", "--min-slices", "1")
    assert code == 0, err
    assert _csv(tmp_path / "ds2" / "manifest.csv")[0]["mask"]
    notes = [r["notes"] for r in _csv(tmp_path / "ds2" / ".private" / "inventory.csv") if r["kind"] == "series"]
    assert "40 mask voxel(s) lie outside the volume" in notes[0]


def test_a_label_map_as_mask_is_refused_unless_a_label_is_chosen(ct_data: Path, tmp_path: Path, capsys):
    """TotalSegmentator's 41-label map in --masks was accepted as a mask (30 % of the volume); refused now, and
    --mask-label 7 makes its pancreas the mask, recorded in the flags and the mask's sidecar."""
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "example_ct_sm.nii.gz").symlink_to(ct_data / "abdomen" / "example_seg.nii.gz")
    image, out = ct_data / "abdomen" / "example_ct_sm.nii.gz", tmp_path / "ds"
    args = (image, "--out", out, "--label-key", "folder", "--masks", tmp_path / "masks")
    code, text, err = _run(capsys, *args)
    assert code == 1 and len(err) == 1
    assert "example_ct_sm.nii.gz: the mask holds 41 labels (1, 2, 3, 4, 5, 6, 7, 8, ...), not one lesion: choose" in err[0]
    assert "--mask-label N" in err[0] and not _csv(out / "manifest.csv")[0].get("mask")
    code, text, err = _run(capsys, *args, "--mask-label", 7)
    assert code == 0, err
    row = _csv(out / "manifest.csv")[0]
    assert "mask_label:7" in row["flags"].split(";")
    mask = np.asanyarray(nib.load(out / row["mask"]).dataobj)
    pancreas = np.asanyarray(nib.load(ct_data / "abdomen" / "pancreas_mask.nii.gz").dataobj)
    assert np.array_equal(mask, pancreas)
    assert json.loads((out / row["mask"].replace(".nii.gz", ".json")).read_text())["mask_label"] == 7
    code, text, err = _run(capsys, *args)  # another choice (none): the mask is checked again, and refused
    assert code == 1 and "41 labels" in err[0] and not _csv(out / "manifest.csv")[0].get("mask")
    code, _, err = _run(capsys, image, "--out", out, "--mask-label", 7)
    assert code == 2 and err == ["pancls ingest: error: --mask-label: goes with --masks or a label sheet with a 'mask' column"]
