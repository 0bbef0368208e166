"""`pancls predict` on real CT fixtures with small fold ensembles trained on the synthetic cohort in the test.

Known answers: a fold model's prediction of one of its own held-out patients must equal what `pancls cv`
wrote for that patient (a different code path: the cached dataset and loader); the ensemble must be the
mean of the single-fold predictions; a DICOM series and its `pancls ingest` NIfTI must give the same numbers.
"""
import json
import pathlib
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from pancls.cli import main


@pytest.fixture(scope="module")
def runs(cv_runs):
    return cv_runs


#: the fixtures' short DICOM series (1-10 slices) are predicted with this; the default minimum is 20, as in ingest
SHORT = ["--min-slices", "1"]


def predict_json(tmp_path, capsys, *args):
    """`pancls predict ARGS` (with :data:`SHORT` unless ARGS set --min-slices) -> (exit code, JSON, captured)."""
    out = tmp_path / f"preds_{len(list(tmp_path.glob('preds_*')))}.json"
    args = [*map(str, args), *(SHORT if "--min-slices" not in map(str, args) else [])]
    code = main(["predict", *args, "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, (json.loads(out.read_text()) if out.exists() else None), captured


def test_a_fold_reproduces_its_own_held_out_predictions(runs, cohort, tmp_path, capsys):
    run = runs["mask"]
    table = pd.read_csv(run / "fold_2" / "predictions.csv", dtype={"patient_id": str})
    manifest = pd.read_csv(cohort / "manifest.csv", dtype={"patient_id": str}).set_index("patient_id")
    classes = json.loads((run / "classes.json").read_text())["classes"]
    for _, row in table.head(3).iterrows():
        image, mask = cohort / manifest.loc[row["patient_id"], "image"], cohort / manifest.loc[row["patient_id"], "mask"]
        code, got, _ = predict_json(tmp_path, capsys, image, "--mask", mask, "--model", run, "--fold", 2)
        assert code == 0
        probs = got["studies"][0]["probabilities"]
        assert np.allclose([probs[c] for c in classes], [row[f"p_{c}"] for c in classes], atol=2e-5)
        assert got["studies"][0]["predicted"] == row["pred"]


def test_the_ensemble_is_the_mean_of_the_folds(runs, ct_data, tmp_path, capsys):
    run = runs["mask"]
    args = [ct_data / "abdomen" / "example_ct_sm.nii.gz", "--mask", ct_data / "abdomen" / "pancreas_mask.nii.gz",
            "--model", run]
    code, ens, _ = predict_json(tmp_path, capsys, *args)
    assert code == 0
    study = ens["studies"][0]
    singles = []
    for k in range(4):
        _, one, _ = predict_json(tmp_path, capsys, *args, "--fold", k)
        singles.append(one["studies"][0]["probabilities"])
    classes = ens["model"]["classes"]
    per_fold = np.array([[s[c] for c in classes] for s in singles])
    assert np.allclose([study["probabilities"][c] for c in classes], per_fold.mean(0), atol=2e-6)
    assert np.allclose([study["spread"][c] for c in classes], per_fold.std(0), atol=2e-6)
    votes = [classes[int(i)] for i in per_fold.argmax(1)]
    assert study["fold_predictions"] == votes
    assert study["agreement"] == votes.count(study["predicted"])
    assert study["predicted"] == classes[int(per_fold.mean(0).argmax())]
    # the fields a reader needs, and the provenance
    assert study["status"] == "ok" and study["mask_used"] is True and study["n_folds"] == 4
    assert study["model_id"] == ens["model"]["model_id"] and "ids" not in study
    assert ens["model"]["requires_mask"] is True and ens["model"]["checkpoints"][0].startswith("fold_0/")
    # the fixture is 3 mm isotropic, the tiny training cohort 4 x 4 x 4.5 mm: flagged
    assert any(f.startswith("spacing_outside_training_range") for f in study["quality_flags"])
    assert "contrast_phase_unknown" in study["quality_flags"]


def test_a_mask_model_refuses_a_study_without_mask_and_the_batch_goes_on(runs, cohort, ct_data, tmp_path, capsys):
    manifest = tmp_path / "batch.csv"
    rows = pd.read_csv(cohort / "manifest.csv").head(2)
    pd.DataFrame({"image": [str(cohort / rows["image"][0]), str(ct_data / "abdomen" / "example_ct_sm.nii.gz")],
                  "mask": [str(cohort / rows["mask"][0]), ""]}).to_csv(manifest, index=False)
    code, got, captured = predict_json(tmp_path, capsys, manifest, ct_data / "series_ct", "--model", runs["mask"])
    assert code == 1  # some failed
    status = [s["status"] for s in got["studies"]]
    assert status == ["ok", "failed", "failed"]
    assert "needs the lesion mask" in got["studies"][1]["error"] and "--mask" in got["studies"][1]["error"]
    assert all("\n" not in s["error"] for s in got["studies"][1:])
    assert "1 of 3 studies predicted, 2 failed" in captured.err


def test_missing_manifest_files_are_all_named_on_the_terminal_only(runs, ct_data, tmp_path, capsys):
    manifest = tmp_path / "batch.csv"
    pd.DataFrame({"image": ["DOE_JOHN/ct.nii.gz", str(ct_data / "abdomen" / "example_ct_sm.nii.gz")],
                  "mask": ["DOE_JOHN/lesion.nii.gz", ""], "patient_id": ["MRN1234", "MRN5678"]}
                 ).to_csv(manifest, index=False)
    code, got, captured = predict_json(tmp_path, capsys, manifest, "--model", runs["centre"])
    assert code == 1 and [s["status"] for s in got["studies"]] == ["failed", "ok"]
    assert "row 2: image and mask file(s) not found" in got["studies"][0]["error"]
    assert "DOE_JOHN" not in json.dumps(got)  # a CSV's paths may name the patient
    assert "MRN" not in json.dumps(got)  # and its patient_id may be the hospital's own (--keep-ids writes it)
    assert [s["study"] for s in got["studies"]] == [1, 2]  # the CSV's rows: how a result is found again
    assert "DOE_JOHN/ct.nii.gz; DOE_JOHN/lesion.nii.gz" in captured.err
    code, kept, _ = predict_json(tmp_path, capsys, manifest, "--model", runs["centre"], "--keep-ids")
    assert [s["patient_id"] for s in kept["studies"]] == ["MRN1234", "MRN5678"]


def test_a_folder_of_nifti_files_is_pointed_to_the_right_input(runs, ct_data, tmp_path, capsys):
    folder = tmp_path / "volumes"
    folder.mkdir()
    shutil.copy(ct_data / "abdomen" / "example_ct_sm.nii.gz", folder)
    code, got, _ = predict_json(tmp_path, capsys, folder, "--model", runs["centre"])
    assert code == 1 and "no DICOM image series found (1 NIfTI/NRRD/MetaImage file(s)" in got["studies"][0]["error"]


def test_a_centre_model_predicts_dicom_like_its_ingested_nifti(runs, ct_data, tmp_path, capsys):
    run = runs["centre"]
    code, from_dicom, _ = predict_json(tmp_path, capsys, ct_data / "series_ct", "--model", run)
    assert code == 0
    study = from_dicom["studies"][0]
    assert study["kind"] == "dicom" and study["status"] == "ok" and study["mask_used"] is False
    # the localizer and the secondary capture were not chosen: the 10-slice axial series was
    assert study["series"]["n_slices"] == 10 and study["series"]["candidates"] == 1
    assert "roi_from_centre" in study["quality_flags"]
    assert main(["ingest", str(ct_data / "series_ct"), "--out", str(tmp_path / "ingested"), "--min-slices", "1"]) == 0  # 10 slices
    capsys.readouterr()
    image = next((tmp_path / "ingested" / "images").glob("*.nii.gz"))
    code, from_nifti, _ = predict_json(tmp_path, capsys, image, "--model", run)
    assert code == 0
    a, b = study["probabilities"], from_nifti["studies"][0]["probabilities"]
    assert np.allclose(list(a.values()), list(b.values()), atol=1e-6)


def _identifiers(series_dir):
    """Every UID, name, id, date and description of the series' files, raw and as a plain SHA-256."""
    import hashlib

    found = set()
    for path in sorted(series_dir.rglob("*")):
        if not path.is_file() or path.suffix == ".json":
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        found |= {str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                               "PatientName", "PatientID", "StudyDate", "SeriesDate",
                                               "AccessionNumber", "SeriesDescription", "InstitutionName")}
    found = {v for v in found if len(v) >= 4}
    return found | {hashlib.sha256(v.encode()).hexdigest() for v in found}


def test_outputs_carry_no_identifiers_unless_asked(runs, ct_data, tmp_path, capsys):
    series = ct_data / "series_ct"
    ids = _identifiers(series)
    assert ids  # the fixture does carry UIDs
    # a folder named after the patient, as exports often are, that fails (a 25 mm gap): its path must not leak
    named = tmp_path / "DOE_JOHN_1234567"
    shutil.copytree(ct_data / "gap" / "removed_slices", named)
    for suffix in ("json", "csv"):
        out = tmp_path / f"plain.{suffix}"
        assert main(["predict", str(series), str(named), "--model", str(runs["centre"]), "--out", str(out), *SHORT]) == 1
        text = out.read_text()
        leaked = [v for v in ids if v in text] + [p for p in (str(series), "DOE_JOHN") if p in text]
        assert not leaked, leaked
        assert "gap of 25.00 mm" in text  # the reason is there, only the path is not
    assert "DOE_JOHN" in capsys.readouterr().err  # the operator's terminal names the folder
    # nor a digest of the input files (they hold the name and UIDs: whoever has them could link the result)
    from pancls.predict import input_checksum

    digest = input_checksum([p for p in (series / "S21570" / "S2010").iterdir()])
    assert digest not in (tmp_path / "plain.json").read_text() + (tmp_path / "plain.csv").read_text()
    # a reader's message that repeats the path (nibabel's) loses it in the output files
    empty = tmp_path / "DOE_JANE.nii.gz"
    empty.write_bytes(b"")
    out = tmp_path / "empty.json"
    assert main(["predict", str(empty), "--model", str(runs["centre"]), "--out", str(out)]) == 1
    text = out.read_text()
    assert "DOE_JANE" not in text and "cannot read NIfTI" in text and "<file>" in text, text
    keep = tmp_path / "keep.json"
    assert main(["predict", str(series), "--model", str(runs["centre"]), "--out", str(keep), "--keep-ids", *SHORT]) == 0
    kept = json.loads(keep.read_text())["studies"][0]["ids"]
    assert kept["series_instance_uid"] in ids and kept["source"] == str(series) and kept["input_sha256"] == digest


def test_the_sr_carries_no_patient_or_study_attribute_beyond_the_study_uid(ct_data):
    """highdicom copies the whole Patient and Study modules and the source's equipment; without keep_ids only the
    SR's own attributes and the study UID stay, the Type 2 ones empty. Real headers, enriched with what a
    hospital's series may carry."""
    import warnings

    from pancls.report.sr import EMPTIED, SR_OWN, build_sr

    files = sorted((ct_data / "series_ct" / "S21570" / "S2010").iterdir())[:3]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    planted = {"PatientAge": "067Y", "PatientWeight": 80, "PatientComments": "DOE^JOHN, VIP",
               "AdditionalPatientHistory": "history", "OtherPatientIDs": "MRN123", "IssuerOfPatientID": "HOSP",
               "PhysiciansOfRecord": "WHO^DR", "ClinicalTrialSubjectID": "S1", "StudyDescription": "CT DOE JOHN"}
    for ds in headers:
        for keyword, value in planted.items():
            setattr(ds, keyword, value)
        ds.StudyDate, ds.AccessionNumber = "20150206", "ACC777"  # Type 2: kept, emptied
    result = {"predicted": "CP", "probabilities": {"PDAC": 0.2, "CP": 0.8}, "agreement": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sr = build_sr(headers, result, ["PDAC", "CP"], "model-a")
        again = build_sr(headers, result, ["PDAC", "CP"], "model-a")
        kept = build_sr(headers, result, ["PDAC", "CP"], "model-a", keep_ids=True)
    present = {e.keyword for e in sr}
    assert present <= SR_OWN | set(EMPTIED) and not present & set(planted)
    assert "ContributingEquipmentSequence" not in sr  # the source's institution, station, serial, acquisition time
    assert all(sr[k].value in ("", None) for k in EMPTIED if k in sr)
    assert sr.StudyInstanceUID == headers[0].StudyInstanceUID
    text = str(sr)
    for value in ("DOE", "MRN123", "QMC", "NOTTINGHAM", "067Y", "20150206", "ACC777"):
        assert value not in text, value
    assert kept.PatientAge == "067Y" and kept.StudyDescription == "CT DOE JOHN"  # --keep-ids: as a PACS expects

    def device_uid(report):
        return next(i.UID for i in _walk(report.ContentSequence) if getattr(i, "ValueType", "") == "UIDREF")

    assert device_uid(sr) == device_uid(again)  # one model, one device across its reports


def _walk(items):
    for item in items:
        yield item
        yield from _walk(getattr(item, "ContentSequence", []))


def test_the_sr_reads_back_with_codes_and_references(runs, ct_data, tmp_path, capsys):
    series = ct_data / "series_ct"
    code, got, _ = predict_json(tmp_path, capsys, series, "--model", runs["centre"], "--sr", tmp_path / "sr")
    assert code == 0
    study = got["studies"][0]
    sr = pydicom.dcmread(tmp_path / "sr" / study["sr"])
    source = pydicom.dcmread(sorted((series / "S21570" / "S2010").iterdir())[0], stop_before_pixels=True)
    assert sr.Modality == "SR" and sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert str(sr.PatientName) == "" and sr.PatientID == "" and sr.StudyDate == ""
    # the evidence references every slice of the chosen series
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == source.SeriesInstanceUID
    assert len(evidence.ReferencedSOPSequence) == study["series"]["n_slices"]

    items = list(_walk(sr.ContentSequence))
    codes = {(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue)
             for i in items if i.ValueType == "CODE"}
    assert ("SUBTYPE", study["predicted"]) in codes
    assert ("121071", "LESION") in codes  # Finding: pancreatic lesion (private: CP is not a neoplasm)
    probs = {i.ConceptNameCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0].NumericValue)
             for i in items if i.ValueType == "NUM"}
    for c, p in study["probabilities"].items():
        assert abs(probs[f"P-{c}"] - p) < 1e-5
    texts = " ".join(str(i.TextValue) for i in items if i.ValueType == "TEXT")
    assert "research use only" in texts


def test_no_sr_for_an_anonymised_study_without_uids(runs, ct_data, tmp_path, capsys):
    # the abdominal fixture's UIDs are blanked: its SR could not be attached to any study
    code, got, captured = predict_json(tmp_path, capsys, ct_data / "abdomen" / "dicom_series", "--model",
                                       runs["centre"], "--sr", tmp_path / "sr")
    assert code == 1 and got["studies"][0]["status"] == "ok"  # predicted, but an output asked for is missing
    assert got["studies"][0]["sr"].startswith("failed") and "StudyInstanceUID" in got["studies"][0]["sr"]
    assert "1 DICOM SR(s) not written" in captured.err
    assert not list((tmp_path / "sr").glob("*.dcm"))


def test_ambiguous_series_are_refused_with_the_candidates(runs, ct_data, tmp_path, capsys):
    study = tmp_path / "study"
    for number, uid_suffix in ((2, "1"), (3, "2")):  # the same series twice, as two series of one study
        target = study / f"S{number}"
        target.mkdir(parents=True)
        for path in sorted((ct_data / "series_ct" / "S21570" / "S2010").iterdir()):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = ds.SeriesInstanceUID + "." + uid_suffix
            ds.SOPInstanceUID = ds.SOPInstanceUID + "." + uid_suffix
            ds.SeriesNumber = number
            ds.save_as(target / path.name)
    code, got, captured = predict_json(tmp_path, capsys, study, "--model", runs["centre"])
    assert code == 1
    error = got["studies"][0]["error"]
    assert "ambiguous series choice" in error and "S2 (10 slices)" in error and "S3 (10 slices)" in error
    assert "include_description" in error


def test_a_mask_on_another_grid_is_refused(runs, ct_data, tmp_path, capsys):
    mask = nib.load(ct_data / "abdomen" / "pancreas_mask.nii.gz")
    shifted = nib.Nifti1Image(np.asarray(mask.dataobj), mask.affine + _shift(5.0))
    nib.save(shifted, tmp_path / "shifted.nii.gz")
    code, got, _ = predict_json(tmp_path, capsys, ct_data / "abdomen" / "example_ct_sm.nii.gz", "--mask",
                                tmp_path / "shifted.nii.gz", "--model", runs["mask"])
    assert code == 1
    assert "not on the image's voxel grid" in got["studies"][0]["error"]


def test_a_mask_beyond_the_image_is_flagged_or_refused_and_one_without_orientation_refused(runs, ct_data, tmp_path, capsys):
    image = ct_data / "abdomen" / "example_ct_sm.nii.gz"
    mask = nib.load(ct_data / "abdomen" / "pancreas_mask.nii.gz")
    data = np.asarray(mask.dataobj)
    longer = np.zeros(data.shape[:2] + (data.shape[2] + 3,), data.dtype)
    longer[..., : data.shape[2]] = data
    longer[:5, :1, -1:] = 1  # 5 voxels (0.8 %) on a slice the image does not have: kept, flagged
    nib.save(nib.Nifti1Image(longer, mask.affine), tmp_path / "longer.nii.gz")
    code, got, _ = predict_json(tmp_path, capsys, image, "--mask", tmp_path / "longer.nii.gz", "--model", runs["mask"])
    flags = got["studies"][0]["quality_flags"]
    assert code == 0 and "mask_voxels_outside_image:5" in flags and "mask_reoriented" not in flags  # same axes
    # 50 voxels (7 %) beyond the image: drawn on another scan; refused (was: flagged, predicted), as ingest does
    longer[:5, :5, -2:] = 1
    nib.save(nib.Nifti1Image(longer, mask.affine), tmp_path / "longer.nii.gz")
    code, got, _ = predict_json(tmp_path, capsys, image, "--mask", tmp_path / "longer.nii.gz", "--model", runs["mask"])
    assert code == 1 and got["studies"][0]["status"] == "failed"
    assert got["studies"][0]["error"] == ("50 of the mask's 694 voxels (7.2 %) lie outside the image (at most 1 % "
                                          "may): it was drawn on another scan (a longer or shifted series, another "
                                          "study of the patient?); give the mask drawn on this series")
    code, got, _ = predict_json(tmp_path, capsys, image, "--mask", ct_data / "abdomen" / "pancreas_mask.nii.gz",
                                "--model", runs["mask"])
    assert code == 0 and not any(f.startswith("mask_") for f in got["studies"][0]["quality_flags"])
    with_own_mask = got["studies"][0]["probabilities"]
    # cropped to its labels' bounding box, as a DICOM SEG stores it: the same voxels, nothing to report
    lo, hi = np.argwhere(data).min(0), np.argwhere(data).max(0) + 1
    shift = np.eye(4)
    shift[:3, 3] = lo
    cropped = nib.Nifti1Image(data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], mask.affine @ shift)
    nib.save(cropped, tmp_path / "cropped.nii.gz")
    code, got, _ = predict_json(tmp_path, capsys, image, "--mask", tmp_path / "cropped.nii.gz", "--model", runs["mask"])
    assert code == 0 and not any(f.startswith("mask_") for f in got["studies"][0]["quality_flags"])
    assert got["studies"][0]["probabilities"] == with_own_mask
    unknown = nib.Nifti1Image(data, mask.affine)
    unknown.set_sform(None, code=0)
    unknown.set_qform(None, code=0)
    nib.save(unknown, tmp_path / "unknown.nii.gz")
    code, got, _ = predict_json(tmp_path, capsys, image, "--mask", tmp_path / "unknown.nii.gz", "--model", runs["mask"])
    assert code == 1 and "orientation is unknown" in got["studies"][0]["error"]


def _shift(mm):
    m = np.zeros((4, 4))
    m[0, 3] = mm
    return m


def test_non_image_dicom_is_a_failed_row_not_a_crash(runs, ct_data, tmp_path, capsys):
    code, got, captured = predict_json(tmp_path, capsys, ct_data / "nonimage", ct_data / "abdomen" / "example_ct_sm.nii.gz",
                                       "--model", runs["centre"])
    assert code == 1
    assert [s["status"] for s in got["studies"]] == ["failed", "ok"]
    assert "no DICOM image series" in got["studies"][0]["error"]


@pytest.mark.parametrize("damage", ["incomplete", "newer", "not_a_state_dict", "wrong_network", "metadata_json",
                                    "classes_json", "fold_json", "classes_not_a_list", "fewer_classes",
                                    "empty_checkpoint"])
def test_a_bad_model_folder_is_one_line_exit_2(runs, ct_data, tmp_path, capsys, damage):
    import torch

    run = tmp_path / "run"
    shutil.copytree(runs["centre"], run)
    if damage == "incomplete":
        (run / "fold_1" / "fold.json").unlink()
        expected = "incomplete run"
    elif damage == "newer":
        meta = json.loads((run / "configs" / "metadata.json").read_text())
        meta["pancls_version"] = "99.0.0"
        (run / "configs" / "metadata.json").write_text(json.dumps(meta))
        expected = "newer than this pancls"
    elif damage == "not_a_state_dict":
        torch.save({"model": [1, 2, 3]}, run / "fold_0" / "best.pt")
        torch.save({"model": [1, 2, 3]}, run / "fold_0" / "last.pt")
        expected = "not a pancls checkpoint"
    elif damage == "wrong_network":
        for name in ("best.pt", "last.pt"):
            state = torch.load(run / "fold_0" / name, weights_only=True)
            state["model"] = {k + ".extra": v for k, v in state["model"].items()}
            torch.save(state, run / "fold_0" / name)
        expected = "does not fit the run's network"
    elif damage.endswith("_json"):  # a file cut short (a copy interrupted, a full disk)
        file = {"metadata_json": run / "configs" / "metadata.json", "classes_json": run / "classes.json",
                "fold_json": run / "fold_2" / "fold.json"}[damage]
        file.write_text(file.read_text()[:10])
        expected = "damaged: not valid JSON"
    elif damage == "classes_not_a_list":
        (run / "classes.json").write_text('{"classes": 3}')
        expected = "class list is damaged"
    elif damage == "fewer_classes":  # names that parse, but not the network's six outputs
        (run / "classes.json").write_text('{"classes": ["PDAC", "IPMN", "CP"]}')
        expected = "does not fit the run's network"
    else:
        for name in ("best.pt", "last.pt"):
            (run / "fold_0" / name).write_bytes(b"")
        expected = "checkpoint is damaged"
    out = tmp_path / "p.json"
    code = main(["predict", str(ct_data / "abdomen" / "example_ct_sm.nii.gz"), "--model", str(run), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and expected in err[-1] and len(err) == 1
    assert not out.exists()


@pytest.mark.parametrize("case", ["suffix", "missing_folder", "mask_with_two_inputs", "missing_input",
                                  "sr_missing_parent", "unwritable_folder"])
def test_bad_invocations_are_one_line_exit_2(runs, ct_data, tmp_path, capsys, case):
    image = ct_data / "abdomen" / "example_ct_sm.nii.gz"
    args = {"suffix": [str(image), "--out", str(tmp_path / "p.txt")],
            "missing_folder": [str(image), "--out", str(tmp_path / "nope" / "p.json")],
            "mask_with_two_inputs": [str(image), str(image), "--mask", str(ct_data / "abdomen" / "pancreas_mask.nii.gz")],
            "missing_input": [str(tmp_path / "absent.nii.gz")],
            "sr_missing_parent": [str(image), "--sr", str(tmp_path / "nope" / "sr")],
            # no one can create a file in /proc, root included (for whom os.access says yes)
            "unwritable_folder": [str(image), "--out", "/proc/p.json"]}[case]
    code = main(["predict", *args, "--model", str(runs["centre"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("pancls predict: error:")


def test_csv_output_has_one_row_per_study(runs, ct_data, tmp_path, capsys):
    out = tmp_path / "p.csv"
    image = ct_data / "abdomen" / "example_ct_sm.nii.gz"
    assert main(["predict", str(image), str(ct_data / "series_ct"), "--model", str(runs["centre"]), "--out", str(out),
                 *SHORT]) == 0
    table = pd.read_csv(out)
    assert list(table["status"]) == ["ok", "ok"] and list(table["kind"]) == ["nifti", "dicom"]
    probs = table[[c for c in table.columns if c.startswith("p_")]].to_numpy()
    assert probs.shape == (2, 6) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (table["agreement"] <= table["n_folds"]).all()


def test_in_memory_load_equals_loading_the_written_nifti(ct_data, tmp_path):
    # predict skips the temporary NIfTI; what it hands to the pipeline must be what LoadImage gives for that file
    from monai.transforms import LoadImage

    from pancls.ct.nifti import load_nifti
    from pancls.ct.write import write_volume
    from pancls.data.transforms import PreprocessConfig
    from pancls.predict import Preprocessor

    volume = load_nifti(ct_data / "abdomen" / "example_ct_sm.nii.gz")
    _, in_memory = Preprocessor(PreprocessConfig(roi="centre"))._image(volume)
    write_volume(volume, tmp_path / "v.nii")
    from_file = LoadImage(image_only=True, reader="NibabelReader")(str(tmp_path / "v.nii"))
    assert in_memory.dtype == from_file.dtype and in_memory.shape == from_file.shape
    assert bool((in_memory == from_file).all())
    assert bool((in_memory.affine == from_file.affine).all())
    same = {k for k in from_file.meta if k != "filename_or_obj"}
    assert all(str(in_memory.meta[k]) == str(from_file.meta[k]) for k in same)


def test_contrast_phase_is_known_from_the_header_or_the_description(runs, ct_data, tmp_path, capsys):
    # Siemens abdomen: ContrastBolusAgent "APPLIED"; the Philips phantom: no contrast tags, no phase word
    code, got, _ = predict_json(tmp_path, capsys, ct_data / "abdomen" / "dicom_series", ct_data / "series_ct",
                                "--model", runs["centre"])
    assert code == 0
    assert "contrast_phase_unknown" not in got["studies"][0]["quality_flags"]
    assert "contrast_phase_unknown" in got["studies"][1]["quality_flags"]
    renamed = tmp_path / "venous"
    renamed.mkdir()
    for path in sorted((ct_data / "series_ct" / "S21570" / "S2010").iterdir()):
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "Abdomen portal venous 5mm"
        ds.save_as(renamed / path.name)
    code, got, _ = predict_json(tmp_path, capsys, renamed, "--model", runs["centre"])
    study = got["studies"][0]
    assert code == 0 and study["series"]["phase"] == "venous"
    assert "contrast_phase_unknown" not in study["quality_flags"]
    assert "portal venous 5mm" not in json.dumps(got)  # the description itself is not written


def test_a_mask_model_on_a_dicom_series_with_a_mask_in_another_orientation(runs, ct_data, tmp_path, capsys):
    # the TotalSegmentator labels of the DICOM series in dcm2niix's geometry (x flipped against pancls's volume)
    series, mask = ct_data / "abdomen" / "dicom_series", ct_data / "abdomen" / "example_seg_dicom.nii.gz"
    code, got, _ = predict_json(tmp_path, capsys, series, "--mask", mask, "--model", runs["mask"], "--mask-label", 7)
    study = got["studies"][0]
    assert code == 0 and study["status"] == "ok" and study["mask_used"] is True and study["mask_label"] == 7
    assert "mask_reoriented" in study["quality_flags"]
    # the same labels written on pancls's own grid of the series give the same prediction, without the note
    import nibabel as nib

    from pancls.ct.mask import onto_grid, read_mask
    from pancls.ct.write import nifti_image
    from pancls.predict import collect_studies

    image = nifti_image(collect_studies([series])[0].load())  # the series as `pancls ingest` writes it (RAS+)
    labels, affine, _ = read_mask(mask)
    on, how = onto_grid(labels, affine, image.shape, image.affine, 1e-3)
    assert how == "reoriented"
    nib.save(nib.Nifti1Image((on == 7).astype(np.int16), image.affine), tmp_path / "own_grid.nii.gz")  # pancreas
    code, again, _ = predict_json(tmp_path, capsys, series, "--mask", tmp_path / "own_grid.nii.gz", "--model",
                                  runs["mask"])
    assert code == 0 and "mask_reoriented" not in again["studies"][0]["quality_flags"]
    assert np.allclose(list(again["studies"][0]["probabilities"].values()), list(study["probabilities"].values()),
                       atol=1e-6)


def test_batched_forward_passes_give_the_same_results(runs, ct_data, tmp_path, capsys):
    # CUDA batches 8 studies per pass; the results must not depend on the batch size
    inputs = [ct_data / "abdomen" / "example_ct_sm.nii.gz", ct_data / "series_ct", ct_data / "nonimage",
              ct_data / "abdomen" / "dicom_series"]
    _, one, _ = predict_json(tmp_path, capsys, *inputs, "--model", runs["centre"], "--batch-size", 1)
    _, three, _ = predict_json(tmp_path, capsys, *inputs, "--model", runs["centre"], "--batch-size", 3)
    assert [s["status"] for s in one["studies"]] == ["ok", "ok", "failed", "ok"]
    for a, b in zip(one["studies"], three["studies"], strict=True):
        assert a["status"] == b["status"] and a.get("predicted") == b.get("predicted")
        if a["status"] == "ok":
            assert np.allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-6)


def test_volumes_not_in_hounsfield_units_are_failed_rows(runs, ct_data, tmp_path, capsys):
    """Stored values (HU + 1024), intensities rescaled to 0..1 and the perfusion map (RescaleType US) are refused
    with the reason (pancls.ct.volume.check_ct_hu, ingest's rule); the real CT beside them is predicted."""
    image = ct_data / "abdomen" / "example_ct_sm.nii.gz"
    img = nib.load(image)
    hu = np.asanyarray(img.dataobj).astype(np.float64)
    nib.save(nib.Nifti1Image((hu + 1024).astype(np.int16), img.affine, img.header), tmp_path / "stored.nii.gz")
    scaled = nib.Nifti1Image(((hu - hu.min()) / (hu.max() - hu.min())).astype(np.float32), img.affine)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    code, got, captured = predict_json(tmp_path, capsys, tmp_path / "stored.nii.gz", tmp_path / "scaled.nii.gz",
                                       ct_data / "enhanced", image, "--model", runs["centre"])
    assert code == 1
    assert [s["status"] for s in got["studies"]] == ["failed", "failed", "failed", "ok"]
    stored, scaled, perfusion = (s["error"] for s in got["studies"][:3])
    assert "not CT in Hounsfield units" in stored and "HU + 1024?" in stored
    assert "not CT in Hounsfield units" in scaled and "0..1?" in scaled
    assert perfusion.startswith("RescaleType US: the values are not Hounsfield units")
    assert "stored.nii.gz: values" in captured.err  # the terminal names the file; the output only the reason


def test_stacks_too_short_to_classify_are_refused_as_in_ingest(runs, ct_data, tmp_path, capsys):
    """A single slice (the JPEG 2000 study) and the 10-slice series are refused with ingest's reason and minimum
    (pancls.ct.select.MIN_SLICES); the 20-slice abdominal series beside them is predicted; --min-slices lowers it."""
    from pancls.ct.select import MIN_SLICES
    from pancls.ingest import INGEST_MIN_SLICES

    assert MIN_SLICES == INGEST_MIN_SLICES == 20
    out = tmp_path / "short.json"
    inputs = [ct_data / "jpeg2000", ct_data / "series_ct", ct_data / "abdomen" / "dicom_series"]
    code = main(["predict", *map(str, inputs), "--model", str(runs["centre"]), "--out", str(out)])
    studies = json.loads(out.read_text())["studies"]
    assert code == 1 and [s["status"] for s in studies] == ["failed", "failed", "ok"]
    assert "1 slice(s), fewer than min_slices=20 (too short a stack to classify" in studies[0]["error"]
    assert "10 slice(s), fewer than min_slices=20" in studies[1]["error"] and "--min-slices" in studies[1]["error"]
    assert "1 of 3 studies predicted, 2 failed" in capsys.readouterr().err
    code = main(["predict", str(inputs[1]), "--model", str(runs["centre"]), "--out", str(out), "--min-slices", "10"])
    assert code == 0 and json.loads(out.read_text())["studies"][0]["series"]["n_slices"] == 10
    # the same rule for a volume given as one file (review: one slice of the abdominal NIfTI had status ok)
    import nibabel as nib

    ct = nib.load(ct_data / "abdomen" / "example_ct_sm.nii.gz")
    k = ct.shape[2] // 2
    one = tmp_path / "one_slice.nii.gz"
    shift = np.eye(4)
    shift[2, 3] = k  # the slice where it lay
    nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj)[:, :, k:k + 1], ct.affine @ shift), one)
    code = main(["predict", str(one), "--model", str(runs["centre"]), "--out", str(out)])
    (study,) = json.loads(out.read_text())["studies"]
    assert code == 1 and study["status"] == "failed" and "1 slice(s), fewer than min_slices=20" in study["error"]
    assert main(["predict", str(one), "--model", str(runs["centre"]), "--out", str(out), "--min-slices", "1"]) == 0


def test_input_file_names_and_zip_members_stay_out_of_the_outputs(runs, ct_data, tmp_path, capsys):
    """A duplicated slice (both files named in the reason) and a zip whose member fails its CRC: the error column
    of the JSON and CSV keeps the reason but no file name or member path (SOP Instance UIDs, a patient's folder);
    the terminal names them."""
    import zipfile

    series = ct_data / "abdomen" / "dicom_series"
    slices = sorted(series.iterdir())
    dup = tmp_path / "DOE_JOHN_1234567"
    shutil.copytree(series, dup)
    shutil.copy(slices[5], dup / "CT.1.2.826.0.1.3680043.8.498.777")  # the same slice under another UID
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for f in slices:
            zf.write(f, f"DOE_JANE/{f.name}")
    data = bytearray(archive.read_bytes())
    at = data.find(b"DICM") + 2000  # inside the first member's data: its CRC no longer matches
    data[at] ^= 0xFF
    archive.write_bytes(bytes(data))
    names = {p.name for p in slices} | {f"DOE_JANE/{p.name}" for p in slices} | {"DOE_JOHN", "DOE_JANE",
                                                                                     "CT.1.2.826.0.1.3680043.8.498.777"}
    texts = []
    for suffix in ("json", "csv"):
        out = tmp_path / f"p.{suffix}"
        assert main(["predict", str(dup), str(archive), "--model", str(runs["centre"]), "--out", str(out)]) == 1
        texts.append(out.read_text())
    studies = json.loads(texts[0])["studies"]
    assert [s["status"] for s in studies] == ["failed", "failed"]
    assert studies[0]["error"].startswith("duplicate slice position") and "(<file> and <file>)" in studies[0]["error"]
    assert "bad zip archive" in studies[1]["error"] and "CRC" in studies[1]["error"]
    leaked = [n for n in names for text in texts if n in text]
    assert not leaked, leaked
    err = capsys.readouterr().err
    assert "CT.1.2.826.0.1.3680043.8.498.777" in err and "DOE_JOHN" in err  # the operator's terminal


def test_lost_slices_and_archives_are_flagged_or_refused(runs, ct_data, tmp_path, capsys):
    """A slice whose header is cut short and one cut to 100 bytes beside the chosen series: the study is predicted
    from the slices left, flagged unreadable_files_beside_series (ingest notes them too); a zip archive cut
    short beside it is a failed row of its own (it may hold a study), not silence."""
    import zipfile

    series = ct_data / "abdomen" / "dicom_series"
    slices = sorted(series.iterdir())
    folder = tmp_path / "export" / "series"
    shutil.copytree(series, folder)
    (folder / slices[-1].name).write_bytes(slices[-1].read_bytes()[:600])  # the header cut short
    (folder / slices[0].name).write_bytes(slices[0].read_bytes()[:100])  # not even the preamble left
    with zipfile.ZipFile(tmp_path / "export" / "more.zip", "w") as zf:
        for f in slices[:5]:
            zf.write(f, f"more/{f.name}")
    (tmp_path / "export" / "more.zip").write_bytes((tmp_path / "export" / "more.zip").read_bytes()[:4000])
    code, got, captured = predict_json(tmp_path, capsys, tmp_path / "export", "--model", runs["centre"])
    studies = got["studies"]
    assert code == 1 and [s["status"] for s in studies] == ["ok", "failed"], studies
    assert studies[0]["series"]["n_slices"] == 18 and "unreadable_files_beside_series:2" in studies[0]["quality_flags"]
    assert "damaged or truncated zip archive" in studies[1]["error"] and "more.zip" not in studies[1]["error"]
    assert "more.zip" in captured.err


def test_a_label_map_as_mask_is_refused_unless_a_label_is_chosen(runs, ct_data, tmp_path, capsys):
    """TotalSegmentator's 41-label map as --mask (30 % of the volume) was predicted without a flag; refused now,
    and --mask-label 7 (pancreas) gives exactly the prediction of the binary pancreas mask, recorded in the output.
    The pancreas' box plus margin exceeds the tiny model's 64 x 64 x 36 mm input: flagged roi_cropped."""
    image, abdomen = ct_data / "abdomen" / "example_ct_sm.nii.gz", ct_data / "abdomen"
    code, got, captured = predict_json(tmp_path, capsys, image, "--mask", abdomen / "example_seg.nii.gz",
                                       "--model", runs["mask"])
    error = got["studies"][0]["error"]
    assert code == 1 and error.startswith("the mask holds 41 labels (1, 2, 3, 4, 5, 6, 7, 8, ...), not one lesion")
    assert "--mask-label N" in error and "binary mask" in error and "example_seg" not in error
    code, chosen, _ = predict_json(tmp_path, capsys, image, "--mask", abdomen / "example_seg.nii.gz", "--mask-label", 7,
                                   "--model", runs["mask"])
    code_b, binary, _ = predict_json(tmp_path, capsys, image, "--mask", abdomen / "pancreas_mask.nii.gz",
                                     "--model", runs["mask"])
    study = chosen["studies"][0]
    assert code == code_b == 0 and study["mask_label"] == 7 and "mask_label" not in binary["studies"][0]
    assert study["probabilities"] == binary["studies"][0]["probabilities"]
    # bbox 39 x 21 x 18 voxels of 3 mm + 4 mm margins (one 4 / 4.5 mm voxel) against 16 x 16 x 8 voxels
    assert "roi_cropped:R=125>64mm,A=71>64mm,S=63>36mm" in study["quality_flags"]
    code, got, _ = predict_json(tmp_path, capsys, image, "--mask", abdomen / "example_seg.nii.gz", "--mask-label", 200,
                                "--model", runs["mask"])
    assert code == 1 and "the mask has no voxel of label 200 (--mask-label)" in got["studies"][0]["error"]
    # a lesion whose box and margins fit the input: no flag; the CSV records the label
    data = np.zeros((122, 101, 30), np.uint8)
    data[60:66, 50:56, 10:13] = 3
    nib.save(nib.Nifti1Image(data, nib.load(image).affine), tmp_path / "small.nii.gz")
    code = main(["predict", str(image), "--mask", str(tmp_path / "small.nii.gz"), "--mask-label", "3", "--model",
                 str(runs["mask"]), "--out", str(tmp_path / "p.csv"), "--device", "cpu"])
    row = pd.read_csv(tmp_path / "p.csv").iloc[0]
    assert code == 0 and row["mask_label"] == 3 and "roi_cropped" not in str(row["quality_flags"])


def test_sr_files_are_named_by_their_own_uid_and_listed_per_row(runs, ct_data, tmp_path, capsys):
    """SRs were named by position (sr_1_1.dcm): a run on other inputs overwrote another's, and a run whose study
    failed left the last run's SR to be taken for its own. Now each is sr_<random>.dcm, never overwritten, and
    the predictions name each row's file; not by the SR's SOPInstanceUID, which a PACS resolves to the patient."""
    series, sr_dir = ct_data / "series_ct", tmp_path / "sr"
    code, first, _ = predict_json(tmp_path, capsys, series, "--model", runs["centre"], "--sr", sr_dir)
    name = first["studies"][0]["sr"]
    uid = pydicom.dcmread(sr_dir / name).SOPInstanceUID
    assert code == 0 and name.startswith("sr_") and name.endswith(".dcm") and len(name) == len("sr_.dcm") + 24
    assert uid not in name and uid not in json.dumps(first) and "PLASTIC" not in name
    code, second, _ = predict_json(tmp_path, capsys, series, "--model", runs["centre"], "--sr", sr_dir)
    other = second["studies"][0]["sr"]
    assert code == 0 and other != name and sorted(p.name for p in sr_dir.glob("*.dcm")) == sorted([name, other])
    # a run whose study fails writes no SR and lists none: the earlier SRs are not this run's
    code, failed, _ = predict_json(tmp_path, capsys, ct_data / "nonimage", "--model", runs["centre"], "--sr", sr_dir)
    assert code == 1 and "sr" not in failed["studies"][0] and len(list(sr_dir.glob("*.dcm"))) == 2
    code = main(["predict", str(series), *SHORT, "--model", str(runs["centre"]), "--sr", str(sr_dir), "--out",
                 str(tmp_path / "p.csv"), "--device", "cpu"])
    row = pd.read_csv(tmp_path / "p.csv").iloc[0]
    assert code == 0 and (sr_dir / row["sr"]).is_file() and len(list(sr_dir.glob("*.dcm"))) == 3


def test_a_killed_runs_temporary_files_are_removed_and_never_look_like_srs(runs, ct_data, tmp_path, capsys):
    """A kill during an SR write left .sr_1_2.dcm.<8>.tmp.dcm, which a forwarding script collecting *.dcm picks
    up; predict now removes atomic writes' leftovers in --sr and those of its own --out file at the start (another
    file's in that folder are left), and writes SRs under temporary names that do not end in .dcm."""
    sr_dir, out = tmp_path / "sr", tmp_path / "preds.json"
    sr_dir.mkdir()
    stale = [sr_dir / ".sr_1_2.dcm.a1b2c3d4.tmp.dcm", tmp_path / ".preds.json.a1b2c3d4.tmp.json"]
    kept = [sr_dir / "forwarded_later.dcm", tmp_path / ".other.csv.a1b2c3d4.tmp.csv"]
    for p in stale + kept:
        p.write_bytes(b"partial")
    seen = []
    from pancls import io as pancls_io

    real = pancls_io.atomic_path

    def spy(path, suffix=None):
        seen.append((path, suffix))
        return real(path, suffix)

    import unittest.mock

    with unittest.mock.patch.object(pancls_io, "atomic_path", spy):
        code = main(["predict", str(ct_data / "series_ct"), *SHORT, "--model", str(runs["centre"]), "--sr",
                     str(sr_dir), "--out", str(out), "--device", "cpu"])
    assert code == 0 and not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    sr_writes = [(p, s) for p, s in seen if pathlib.Path(p).parent == sr_dir]
    assert len(sr_writes) == 1 and sr_writes[0][1] == ""  # .<uid>.dcm.<8>.tmp: not *.dcm
