"""DICOM Structured Reports of ``pancls predict`` results, built with highdicom.

One Comprehensive SR per predicted DICOM study: a TID 1500 Measurement Report whose one measurement group
(TID 1501) holds

* the finding type "Pancreatic lesion" (private code ``LESION``: a SNOMED CT neoplasm concept would be wrong for
  chronic pancreatitis, one of the classes),
* the predicted subtype as a qualitative evaluation and one probability per class as measurements
  (unit "1", UCUM), in the private coding scheme ``99PANCLS`` (no standard code exists for these subtypes
  as a classifier's output),
* the algorithm (TID 4019: "pancls", its version, the model id, "research use only"),
* the source series: every slice of the series the prediction was made from is referenced (evidence).

Identifiers: the SR must carry the study's UIDs (StudyInstanceUID, and the referenced SOP instances) to
attach to the study. Every other patient or study attribute the standard requires is Type 2, present but
empty: patient name, ID, birth date and sex, study date and time, accession number, referring physician,
study ID; and everything else highdicom copies from the source images (patient age, weight, comments and
history, other ids, physicians, study description, clinical-trial ids, the source's equipment with its
institution, station, serial number and acquisition time) is removed: the SR keeps only the attributes of
:data:`SR_OWN` (what it sets itself) and the study UID -- unless ``keep_ids`` (then highdicom copies them all
from the source images, as a PACS expects). The device observer UID is derived from the model id, so one model
is one device across its reports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

from pancls.errors import UserError, exception_text

SCHEME = "99PANCLS"
#: Type 2 attributes of the Patient and General Study modules emptied unless keep_ids.
EMPTIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
           "AccessionNumber", "ReferringPhysicianName", "StudyID")
RESEARCH_USE = "research use only; not for diagnostic use"
#: the top-level attributes an SR keeps without keep_ids: those it sets itself (SOP common, SR document series
#: and general, content) and the study UID that attaches it; everything else copied from the source is removed
SR_OWN = frozenset((
    "SpecificCharacterSet", "InstanceCreationDate", "InstanceCreationTime", "SOPClassUID", "SOPInstanceUID",
    "ContentDate", "ContentTime", "Modality", "Manufacturer", "SeriesDescription",
    "ReferencedPerformedProcedureStepSequence", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
    "InstanceNumber", "ValueType", "ConceptNameCodeSequence", "ContinuityOfContent",
    "PerformedProcedureCodeSequence", "CurrentRequestedProcedureEvidenceSequence", "CompletionFlag",
    "VerificationFlag", "PreliminaryFlag", "ContentTemplateSequence", "ContentSequence"))


def check_sr_folder(folder: Path) -> None:
    """Refuse, before any work, an --sr folder that cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError("exists and is not a folder", folder)
    from pancls.io import check_writable_folder

    check_writable_folder(folder if folder.exists() else folder.resolve().parent, "the --sr folder (or its parent)")


def build_sr(source_images: Sequence[Any], result: Dict[str, Any], classes: Sequence[str], model_id: str,
             keep_ids: bool = False):
    """The SR dataset of one study's result (``status == "ok"``) made from ``source_images`` (the pydicom
    datasets of the series that was predicted; pixel data not needed)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from pancls import __version__

    if not str(source_images[0].get("StudyInstanceUID", "")).strip():
        raise ValueError("the source images have no StudyInstanceUID (anonymised?): an SR could not be attached "
                         "to their study")
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    algorithm = hd.sr.AlgorithmIdentification(name="pancls", version=__version__,
                                              parameters=[f"model {model_id}", RESEARCH_USE])
    evaluation = hd.sr.QualitativeEvaluation(
        name=hd.sr.CodedConcept("SUBTYPE", SCHEME, "Predicted pancreatic lesion subtype"),
        value=hd.sr.CodedConcept(result["predicted"], SCHEME, result["predicted"]))
    measurements = [hd.sr.Measurement(name=hd.sr.CodedConcept(f"P-{c}", SCHEME, f"Probability of {c}"),
                                      value=float(result["probabilities"][c]), unit=unit, algorithm_id=algorithm)
                    for c in classes]
    agreement = hd.sr.Measurement(name=hd.sr.CodedConcept("AGREE", SCHEME, "Fold models agreeing"),
                                  value=float(result["agreement"]), unit=unit, algorithm_id=algorithm)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="pancreatic lesion subtype"),
        finding_type=hd.sr.CodedConcept("LESION", SCHEME, "Pancreatic lesion"),
        algorithm_id=algorithm, qualitative_evaluations=[evaluation], measurements=[*measurements, agreement],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source_images[0])])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["pancls model", model_id]), name="pancls"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region"),
        imaging_measurements=[group])
    sr = hd.sr.ComprehensiveSR(
        evidence=list(source_images), content=report[0], series_instance_uid=generate_uid(), series_number=9001,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="pancls",
        series_description="pancls subtype prediction (research use only)", is_complete=True)
    if not keep_ids:
        for element in list(sr):  # top level only: the content and evidence hold codes, values and UIDs
            if element.keyword in EMPTIED:
                element.value = ""
            elif element.keyword not in SR_OWN:
                del sr[element.tag]
    return sr


def sr_file_name() -> str:
    """``sr_<24 random hex digits>.dcm``: unique, so a run never overwrites another run's SR (the position-based
    ``sr_<input>_<study>.dcm`` of earlier versions was overwritten by a run on other inputs, and left in place by
    one whose study failed, to be mistaken for its SR), and derived from nothing, so the predictions file can name
    it without an identifier: the SR's own SOPInstanceUID, once the SR is in a PACS, finds the patient."""
    import secrets

    return f"sr_{secrets.token_hex(12)}.dcm"


def write_study_srs(folder: Path, loaded, studies: Sequence[Any], results: Sequence[Dict[str, Any]],
                    keep_ids: bool = False) -> int:
    """One ``sr_<random>.dcm`` (:func:`sr_file_name`) per successfully predicted DICOM study; returns how many
    were written. ``result["sr"]`` names each study's file, so that the predictions file says which SRs this run
    wrote (the folder keeps earlier runs' SRs: a forwarding script sends each once, by its own UID).

    A study whose source headers highdicom refuses (e.g. a malformed attribute it must copy) gets
    ``result["sr"] = "failed: <reason>"`` and the others are still written. Each file is written atomically under
    a temporary name that does not end in ``.dcm`` (``.<name>.<random>.tmp``), so that a script collecting
    ``*.dcm`` never picks up a half-written one (a killed run's are removed by the next run)."""
    import warnings

    from pancls.io import atomic_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for study, result in zip(studies, results, strict=True):
        if result["status"] != "ok" or study.kind != "dicom" or not study.dicom_headers:
            continue
        try:
            with warnings.catch_warnings():  # highdicom's advice on the source's name formats is not ours to print
                warnings.simplefilter("ignore", UserWarning)
                sr = build_sr(study.dicom_headers, result, loaded.classes, loaded.model_id, keep_ids=keep_ids)
        except (ValueError, TypeError, AttributeError) as exc:
            result["sr"] = f"failed: {exception_text(exc)}"
            continue
        name = sr_file_name()
        with atomic_path(folder / name, suffix="") as tmp:
            sr.save_as(tmp, enforce_file_format=True)
        result["sr"] = name
        written += 1
    return written
