"""Turn folders of DICOM (and NIfTI files) into checked NIfTI volumes, a manifest and an inventory.

Pipeline: :func:`pancls.ct.scan.scan` (headers only) -> :func:`pancls.ct.select.select_series`
(one series per study) -> :func:`pancls.ct.volume.build_volume` (from the scan's headers: each file is
parsed once, then only its pixel data is read) -> :func:`pancls.ct.write.write_volume`.

Outputs in ``out``:

* ``images/<study>_<series>.nii.gz`` + ``.json`` sidecar (keyed-hash names, no identifiers);
* ``manifest.csv``: ``patient_id, image, label, study_id, series_id, series_number, description,
  n_slices, flags, source`` -- every id is a keyed hash (:func:`pancls.privacy.keyed_id`) under the
  dataset secret; ``patient_id`` hashes the PatientID, or the study when there is none. ``description`` is
  empty unless ``keep_descriptions``. Rows of earlier runs whose image still exists are kept (a run adds
  to or refreshes the dataset);
* ``.private/inventory.csv``: every series found and every file not used, with its status -- ``converted``, ``up
  to date``, ``skipped`` (not chosen, or not an image; the reason says why), ``refused`` (the input
  cannot be converted right; the reason says why) or ``failed`` (an unexpected error: a bug) -- and
  ``notes`` (where the output differs from what the files describe: a file dropped as a duplicate, an
  unreadable file beside the series, a series split by orientation) and ``warnings`` (what pydicom and
  nibabel warned about, per file). Input paths appear only here, relative to the source argument: folder
  names of an export often carry the patient's name, so the inventory is private like the keys (an
  ``inventory.csv`` at the top of OUT, where versions before 2026-12-06 wrote it, is removed);
* ``masks/<study>_<series>.nii.gz`` (+ ``.json``) with ``--masks`` or a ``mask`` column in the label sheet:
  each mask on its volume's voxel grid (the image's affine exactly), and the manifest's ``mask`` column;
  flags ``mask_reoriented`` (same voxels, other axis order) or ``mask_resampled:nearest``, and ``mask_label:N``
  with ``--mask-label N`` (the mask is the voxels == N of the file; a mask holding several labels is refused
  without it);
* with ``--labels`` (:mod:`pancls.join`) the manifest's ``label`` is filled and the manifest lists only the
  labelled volumes; unlabelled volumes and sheet rows that matched no study are in the inventory (reason
  ``no label ...``; kind ``label``, path ``<sheet>:<line>``). Without it, labels and masks of earlier runs
  are kept;
* ``.private/``: the dataset ``secret`` (created on first use; never inside an output), ``keys.csv`` (each
  pseudonymous patient/study/series id and image -> PatientID, AccessionNumber, Study/SeriesInstanceUID,
  source and folder, for re-identification by authorised staff: **the one file that must never be
  shared**), ``.lock`` (:func:`pancls.io.hold_lock`), the temporary folder for zip archives and
  ``errors.log`` (tracebacks of ``failed`` series). Keep the whole folder out of anything you share; pancls never reads it into an output.

One series failing never stops the batch: every series and file gets its row, and the manifest and
inventory are written even when a series fails or the run is interrupted. Each problem is one line
``<where>: <reason>`` on stderr. Incremental: a series is converted again only when its sidecar is
missing or records another source fingerprint (keyed hash over the files' paths, sizes and mtimes, and
the geometry policy), or with ``force``.

Kill safety: outputs are written atomically (:mod:`pancls.io`), under a lock in ``.private``; a run
starts by removing the temporary files a killed run left (in ``out``, ``out/images`` and
``.private/tmp``), and SIGTERM/SIGHUP unwind like Ctrl-C (temporary files removed, manifest written).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from pancls.config import from_dict, load_yaml, to_dict
from pancls.ct.capture import collecting, routed
from pancls.ct.mask import axes_reordered, check_inside, onto_grid, read_mask, select_label
from pancls.ct.nifti import load_nifti, save_nifti
from pancls.ct.scan import ScanResult, Series, problems_beside, scan, sop_class_name
from pancls.ct.select import (
    MIN_SLICES,
    Decision,
    SelectionRules,
    check_stack,
    select_series,
    with_default_min_slices,
)
from pancls.ct.volume import FREE_TEXT_META, GeometryPolicy, Volume, build_volume, check_ct_hu
from pancls.ct.write import write_volume
from pancls.data.classes import DEFAULT_CLASSES, check_classes
from pancls.data.manifest import AFFINE_ATOL_MM, grid_mismatch
from pancls.errors import UserError, one_line
from pancls.io import (
    atomic_write_json,
    atomic_write_text,
    file_identity,
    hold_lock,
    remove_stale_temps,
    signals_unwind,
    writable_folder,
)
from pancls.join import (
    KEY_COLUMNS,
    KEY_FILE,
    LABEL_KEYS,
    LabelSheet,
    MaskFinder,
    SheetRow,
    SourceIds,
    read_key_file,
    read_label_sheet,
    relative_location,
)
from pancls.privacy import keyed_id, load_or_create_secret

MANIFEST_COLUMNS = ["patient_id", "image", "label", "study_id", "series_id", "series_number",
                    "description", "n_slices", "flags", "source"]
INVENTORY_COLUMNS = ["kind", "study_id", "series_id", "series_number", "description", "modality",
                     "sop_class", "n_files", "n_slices", "orientation", "status", "reason", "notes", "warnings",
                     "image", "label", "mask", "path"]
FINGERPRINT_KEY = "source_fingerprint"
PRIVATE_DIR = ".private"
#: every input's row, with its path: private, like the keys (export folder names often carry patient names)
INVENTORY = f"{PRIVATE_DIR}/inventory.csv"
#: exit status of ``pancls ingest``: everything converted / some input refused / an unexpected error
EXIT_OK, EXIT_REFUSED, EXIT_FAILED = 0, 1, 3


#: ingest's ``selection.min_slices`` when the config leaves it unset (:data:`pancls.ct.select.MIN_SLICES`, the
#: minimum of ``pancls predict`` too): a shorter series (a scout, a single image, a partial series) is not a volume
#: to train on; it is skipped with the reason in the inventory. Set it in the config or with --min-slices to keep
#: such series.
INGEST_MIN_SLICES = MIN_SLICES


@dataclass
class IngestConfig:
    """``pancls ingest --config`` YAML: sections ``selection`` and ``geometry``."""

    selection: SelectionRules = field(default_factory=SelectionRules)
    geometry: GeometryPolicy = field(default_factory=GeometryPolicy)


def load_config(path: Optional[Path]) -> IngestConfig:
    if path is None:
        return IngestConfig()
    data = load_yaml(path)
    if "patient_salt" in data:
        raise UserError("patient_salt is gone: every id is now keyed with the dataset secret "
                        f"(OUT/{PRIVATE_DIR}/secret, or --secret FILE); remove the key", f"{path}: patient_salt")
    return from_dict(IngestConfig, data, str(path))


@dataclass
class Job:
    """One volume to produce: a selected DICOM series or a NIfTI file."""

    name: str  # output stem, from keyed hashes only
    label: str  # how stderr names it when the builder gives no better place
    fingerprint: str
    load: Callable[[], Volume]
    row: Dict[str, str]  # manifest row without 'image' and 'flags'
    inventory: Dict[str, str]  # its inventory row; 'status' is updated as the job runs
    ids: SourceIds = field(default_factory=SourceIds)  # source identifiers: in memory and .private/keys.csv only
    warnings: List[str] = field(default_factory=list)  # from the header scan


@dataclass
class IngestReport:
    converted: int = 0
    up_to_date: int = 0
    skipped: int = 0
    with_notes: int = 0  # kept series whose output differs from what the files describe (see 'notes')
    refused: List[str] = field(default_factory=list)  # one line each: input that cannot be converted right
    failed: List[str] = field(default_factory=list)  # one line each: unexpected errors (bugs)
    labels: bool = False  # a label sheet was given
    labelled: int = 0  # kept volumes with a label from the sheet
    unlabelled: int = 0  # kept volumes the sheet has no row for (not in manifest.csv; see the inventory)
    unmatched_rows: List[int] = field(default_factory=list)  # sheet lines that matched no study
    masks: int = 0  # volumes with a mask on their grid
    masks_resampled: int = 0  # ... of which resampled (nearest neighbour) onto it

    @property
    def kept(self) -> int:
        return self.converted + self.up_to_date

    @property
    def problems(self) -> List[str]:
        return self.refused + self.failed

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.failed else EXIT_REFUSED if self.refused else EXIT_OK

    def summary(self) -> str:
        notes = f", {self.with_notes} with notes (see {INVENTORY})" if self.with_notes else ""
        text = (f"{self.kept} series kept ({self.converted} converted, {self.up_to_date} up to date{notes}), "
                f"{self.skipped} skipped, {len(self.refused)} refused, {len(self.failed)} failed")
        if self.labels:
            text += (f"; labels: {self.labelled} labelled, {self.unlabelled} without a label (not in manifest.csv), "
                     f"{len(self.unmatched_rows)} sheet row(s) matched no study")
        if self.masks:
            text += f"; masks: {self.masks} ({self.masks_resampled} resampled onto the volume's grid)"
        if self.unlabelled or self.unmatched_rows:
            text += f" (see {INVENTORY})"
        return text


def file_fingerprint(paths: Sequence[Path], origin: Dict[Path, Path], unpacked: Path) -> str:
    """Text that changes when any source file changes: (resolved path, size, mtime) of every file; a file
    unpacked from a zip archive under ``unpacked`` counts as (archive path, size, mtime, member path), so
    that a rerun, which unpacks it anew, finds it unchanged.

    Internal only: it holds paths, so what is stored is its keyed hash (see :meth:`_Run.key`)."""
    lines = []
    for p in paths:
        p = Path(p)
        try:
            member = p.relative_to(unpacked)
        except ValueError:
            source, member = p, ""
        else:  # the member's path inside its archive (the unpack folder's name is keyed per process)
            source, member = Path(origin.get(p, p)), Path(*member.parts[1:])
        resolved, size, mtime_ns = file_identity(source)
        lines.append(f"{resolved}\0{member}\0{size}\0{mtime_ns}")
    return "\n".join(sorted(lines))


def _read_sidecar(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _find_key(obj: dict, key: str):
    """``key`` at the top of a JSON object or one level down (e.g. under ``meta``)."""
    if key in obj:
        return obj[key]
    return next((v[key] for v in obj.values() if isinstance(v, dict) and key in v), None)


def _relative(path: Path, root: Path, unpacked: Optional[Path] = None) -> str:
    """How the inventory names an input: relative to the source folder (a file source: its folder); a file
    unpacked from a zip archive (under ``unpacked/<hash>/``) as ``<archive name>/<member path>``."""
    if unpacked is not None:
        try:
            member = path.relative_to(unpacked)
        except ValueError:
            pass
        else:
            return one_line(Path(root.name, *member.parts[1:]), escape=True)
    root = root if root.is_dir() else root.parent
    try:
        return one_line(path.relative_to(root), escape=True)
    except ValueError:
        return one_line(path.name, escape=True)


def _csv_text(rows: List[Dict[str, str]], columns: List[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: one_line(v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def _previous_manifest(path: Path, out: Path) -> Dict[str, Dict[str, str]]:
    if not path.exists():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return {row["image"]: row for row in csv.DictReader(fh)
                    if row.get("image") and (out / row["image"]).exists()}
    except (OSError, UnicodeDecodeError, csv.Error, KeyError) as exc:
        raise UserError(f"cannot read the existing manifest ({type(exc).__name__}: {exc}); move it away to "
                        "start a new one", path) from None


@dataclass
class _Run:
    """What every step of one ingest needs: options, the dataset secret and the report."""

    config: IngestConfig
    secret: bytes
    keep_descriptions: bool
    workers: Optional[int]
    report: IngestReport
    err: object
    private: Path
    origin: Dict[Path, Path] = field(default_factory=dict)  # every file found -> the source it came from
    sheet: Optional[LabelSheet] = None
    masks: Optional[MaskFinder] = None
    label_key: str = "PatientID"  # how masks are matched to studies (also without a sheet)
    mask_label: Optional[int] = None  # --mask-label: the voxels of this value are each mask's lesion

    @property
    def unpacked(self) -> Path:
        """Where zip archives are unpacked (emptied at the start and end of every run)."""
        return self.private / "tmp"

    def problem(self, where, reason: str, failed: bool = False) -> None:
        line = f"{one_line(where, escape=True)}: {one_line(reason)}"
        (self.report.failed if failed else self.report.refused).append(line)
        print(line, file=self.err, flush=True)

    def description(self, text: str) -> str:
        return text if self.keep_descriptions else ""

    def key(self, kind: str, value: str, length: int = 12) -> str:
        return keyed_id(self.secret, kind, value, length)


def ingest(sources: Sequence[Path], out: Path, config: Optional[IngestConfig] = None, force: bool = False,
           workers: Optional[int] = None, progress: bool = True, err=None, keep_descriptions: bool = False,
           insecure_ids: bool = False, secret_file: Optional[Path] = None, labels: Optional[Path] = None,
           label_key: str = "PatientID", masks: Optional[Path] = None,
           classes: Sequence[str] = DEFAULT_CLASSES, mask_label: Optional[int] = None) -> IngestReport:
    """Run the whole pipeline into ``out``; each problem is printed to ``err`` (default stderr) and
    collected in the returned report.

    Refused before anything is done (:class:`UserError`): a missing source, an ``out`` that is not a
    writable folder, an unusable secret (see :func:`pancls.privacy.load_or_create_secret`; ``insecure_ids``
    accepts an empty one), another ingest writing into ``out``. After that nothing raises for bad input:
    every series gets its row and the manifest and inventory are always written.

    ``labels`` (a label sheet matched on ``label_key``, labels from ``classes``) and ``masks`` (a folder of
    mask files): see :mod:`pancls.join`. With a sheet, manifest.csv lists the labelled volumes only. A mask must
    hold one non-zero label, or ``mask_label`` chooses it (:func:`pancls.ct.mask.select_label`; the manifest's
    flags and the mask's sidecar record it).
    """
    config = config if config is not None else IngestConfig()
    err = err or sys.stderr
    sources = [Path(s) for s in sources]
    for src in sources:
        if not src.exists():
            raise UserError("no such file or folder", src)
    sheet = read_label_sheet(labels, label_key, check_classes(classes)) if labels is not None else None
    if label_key not in LABEL_KEYS:
        raise UserError(f"unknown label key {label_key!r}; expected one of {', '.join(LABEL_KEYS)}", "--label-key")
    finder = (MaskFinder(None if masks is None else Path(masks), sheet)
              if masks is not None or (sheet is not None and sheet.has_mask_column) else None)
    if mask_label is not None and finder is None:
        raise UserError("goes with --masks or a label sheet with a 'mask' column", "--mask-label")
    private = Path(out) / PRIVATE_DIR
    if secret_file is not None:  # a refused secret file leaves no output folder behind
        secret = load_or_create_secret(private, insecure=insecure_ids, file=secret_file)
    out = writable_folder(out)
    writable_folder(out / "images")
    writable_folder(private, "private folder")
    os.chmod(private, 0o700)
    if secret_file is None:  # the dataset's own, in .private/ (made on first use)
        secret = load_or_create_secret(private, insecure=insecure_ids)
    config = dataclasses.replace(config, selection=with_default_min_slices(config.selection))
    run = _Run(config, secret, keep_descriptions, workers, IngestReport(labels=sheet is not None), err, private,
               sheet=sheet, masks=finder, label_key=label_key, mask_label=mask_label)
    # one ingest per output folder: the lock of cv/lt runs (flock on .private/.lock, released when the process dies)
    with hold_lock(private, f"the ingest output folder {out}"), signals_unwind(), routed():
        for folder in (out, out / "images", out / "masks", private):  # every folder ingest writes atomically into
            remove_stale_temps(folder)
        tmp = run.unpacked
        shutil.rmtree(tmp, ignore_errors=True)  # zip archives unpacked by a killed run
        tmp.mkdir()
        manifest = _previous_manifest(out / "manifest.csv", out)
        keys = read_key_file(private / KEY_FILE, [p for p in _images_on_disk(out)])
        inventory: List[Dict[str, str]] = []
        try:
            # no name is kept for the scan result: the headers of series that are not converted can be freed
            jobs = _plan(scan(sources, workers=workers, tmp_dir=tmp, progress=progress, secret=secret), sources,
                         run, inventory)
            if finder is not None:  # a mask file that several studies match is refused for each (pancls.join)
                finder.claim([(job.row["study_id"], job.ids, sheet.match(job.ids)[0] if sheet is not None else None)
                              for job in jobs], label_key)
            for job in tqdm(jobs, desc="volumes", unit="series", disable=None if progress else True, leave=False):
                flags = _run_job(job, out, force, run)
                image = f"images/{job.name}.nii.gz"
                if flags is None:  # an output left from an earlier run no longer stands
                    manifest.pop(image, None)
                    continue
                keys[image] = {**job.ids.key_row(), "image": image, **{k: job.row[k] for k in
                                                                       ("patient_id", "study_id", "series_id")}}
                row = _join(job, image, flags, out, run, manifest.get(image))
                if row is None:
                    manifest.pop(image, None)
                else:
                    manifest[image] = row
            if sheet is not None:
                _unmatched_rows(sheet, run, inventory)
        finally:  # also when interrupted: what was converted is listed, nothing half-written is
            rows = [manifest[k] for k in sorted(manifest)]
            columns = MANIFEST_COLUMNS
            if any(r.get("mask") for r in rows):
                columns = [*MANIFEST_COLUMNS[:2], "mask", *MANIFEST_COLUMNS[2:]]
            atomic_write_text(out / "manifest.csv", _csv_text(rows, columns))
            atomic_write_text(out / INVENTORY, _csv_text(inventory, INVENTORY_COLUMNS))
            (out / "inventory.csv").unlink(missing_ok=True)  # where older versions wrote it, paths and all
            _write_key_file(private / KEY_FILE, keys)
            shutil.rmtree(tmp, ignore_errors=True)
    return run.report


def _series_inventory_row(decision: Decision, run: _Run) -> Dict[str, str]:
    s = decision.series
    first = s.first
    return {
        "kind": "series", "study_id": s.study_hash, "series_id": s.series_hash,
        "series_number": "" if first.series_number is None else str(first.series_number),
        "description": run.description(first.series_description), "modality": first.modality,
        "sop_class": sop_class_name(first.sop_class_uid), "n_files": str(len(s.instances)),
        "n_slices": str(s.n_slices), "orientation": s.orientation_label,
        "status": "selected" if decision.kept else "skipped", "reason": decision.reason,
        "notes": "; ".join(s.notes), "warnings": "; ".join(s.warnings),
    }


def _source_ids(path: Path, source: Path, run: _Run, dataset=None, series_uid: str = "") -> SourceIds:
    """The identifiers of the study at ``path`` (a series folder or a NIfTI file found under the argument
    ``source``): in memory only."""
    text = lambda key: str(dataset.get(key, "") or "").strip() if dataset is not None else ""  # noqa: E731
    try:
        member = path.relative_to(run.unpacked)
    except ValueError:
        folder = str(path.resolve())
    else:
        folder = f"{Path(source).resolve()}!/{Path(*member.parts[1:]) if len(member.parts) > 1 else ''}"
    return SourceIds(patient_id=text("PatientID"), accession=text("AccessionNumber"),
                     study_uid=text("StudyInstanceUID"), series_uid=series_uid or text("SeriesInstanceUID"),
                     location=relative_location(path, Path(source), run.unpacked), source=str(Path(source).resolve()),
                     folder=folder)


def _dicom_job(series: Series, inventory: Dict[str, str], run: _Run) -> Job:
    first = series.first
    # the policy is part of the fingerprint: a series resampled under one policy is redone under another
    fingerprint = run.key("fingerprint", f"{file_fingerprint(series.paths, run.origin, run.unpacked)}|"
                                         f"{to_dict(run.config.geometry)}", 64)

    def load() -> Volume:
        volume = build_volume(series.paths, run.config.geometry, workers=run.workers, headers=series.headers)
        check_ct_hu(volume, first.folder)
        volume.meta[FINGERPRINT_KEY] = fingerprint
        volume.meta["series_id"] = series.series_hash
        return volume

    return Job(
        name=f"{series.study_hash}_{series.series_hash}", label=f"{first.folder} (series {series.name})",
        fingerprint=fingerprint, load=load, inventory=inventory,
        ids=_source_ids(first.folder, run.origin[first.path], run, first.header.dataset, first.series_uid),
        row={"patient_id": run.key("patient", series.patient_key), "label": "",
             "study_id": series.study_hash, "series_id": series.series_hash,
             "series_number": inventory["series_number"], "description": inventory["description"],
             "n_slices": str(series.n_slices), "source": "dicom"},
    )


def _nifti_job(path: Path, inventory: Dict[str, str], run: _Run) -> Job:
    fingerprint = run.key("fingerprint", file_fingerprint([path], run.origin, run.unpacked), 64)
    key = run.key("file", str(path.resolve()), 10)
    stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem

    def load() -> Volume:
        volume = load_nifti(path)
        check_ct_hu(volume, path)
        check_stack(volume, path, run.config.selection.min_slices)  # a DICOM series' rule, for a file
        volume.meta[FINGERPRINT_KEY] = fingerprint
        return volume

    inventory.update(study_id=key, series_id="nifti")
    return Job(
        name=f"{key}_nifti", label=str(path), fingerprint=fingerprint, load=load, inventory=inventory,
        ids=_source_ids(path, run.origin[path], run),
        # the file stem usually carries the case id: only its keyed hash is written
        row={"patient_id": run.key("patient", "nifti:" + stem), "label": "", "study_id": key,
             "series_id": "nifti", "series_number": "", "description": "", "n_slices": "", "source": "nifti"},
    )


def _plan(result: ScanResult, sources: List[Path], run: _Run, inventory: List[Dict[str, str]]) -> List[Job]:
    """Fill ``inventory`` and return the jobs to run; reports unreadable files and sources without usable
    series, and notes on a kept series every unreadable file in its folders (a slice may be lost)."""
    config, report = run.config, run.report
    run.origin = result.origin
    jobs: List[Job] = []
    reasons_by_source: Dict[Path, List[str]] = {src: [] for src in sources}
    refused_by_source: Dict[Path, int] = {src: 0 for src in sources}
    used_sources = set()
    for decision in select_series(result.series, config.selection):
        row = _series_inventory_row(decision, run)
        inventory.append(row)
        src = result.origin[decision.series.first.path]
        row["path"] = _relative(decision.series.first.folder, src, run.unpacked)
        if decision.kept:
            lost = [f"{one_line(s.path.name, escape=True)}: {s.reason}"
                    for s in problems_beside(decision.series, result.skipped)]
            if lost:
                shown = "; ".join(lost[:3]) + ("; ..." if len(lost) > 3 else "")
                note = f"{len(lost)} unreadable file(s) beside this series, the volume may lack slices ({shown})"
                row["notes"] = "; ".join(filter(None, [row["notes"], note]))
            jobs.append(_dicom_job(decision.series, row, run))
            used_sources.add(src)
        else:
            report.skipped += 1
            reasons_by_source[src].append(f"{decision.series.name}: {decision.reason}")
    for path in result.nifti:
        src = result.origin[path]
        row = {"kind": "nifti", "path": _relative(path, src, run.unpacked), "n_files": "1", "status": "selected"}
        inventory.append(row)
        explicit = src == path  # a NIfTI named on the command line is always converted
        pattern = config.selection.nifti_exclude
        if not explicit and pattern and re.search(pattern, path.name, re.IGNORECASE):
            row.update(status="skipped", reason="file name matches selection.nifti_exclude (a mask?)")
            report.skipped += 1
            continue
        jobs.append(_nifti_job(path, row, run))
        used_sources.add(src)
    for skip in result.skipped:
        src = result.origin[skip.path]
        inventory.append({"kind": "file", "path": _relative(skip.path, src, run.unpacked), "n_files": "1",
                          "status": "refused" if skip.problem else "skipped", "reason": skip.reason})
        if skip.problem or src == skip.path:  # a damaged DICOM, or a file the user named that is unusable
            run.problem(skip.path, skip.reason)
            refused_by_source[src] += 1
        else:
            report.skipped += 1
            reasons_by_source[src].append(skip.reason)
    for src in sources:
        if src.is_dir() and src not in used_sources:
            found = sorted(set(reasons_by_source[src]))
            refused = refused_by_source[src]
            what = ([f"{refused} damaged file(s) refused, each named above"] if refused else []) + found[:5]
            run.problem(src, "no usable series" + (f" (found: {'; '.join(what)}{'; ...' if len(found) > 5 else ''})"
                                                   if what else " (no files)"))
    return jobs


def _run_job(job: Job, out: Path, force: bool, run: _Run) -> Optional[List[str]]:
    """Convert one job unless up to date; returns the volume's flags, or None when it was refused or failed.

    A :class:`UserError` refuses the series; any other exception fails it (its traceback goes to
    ``.private/errors.log``) -- either way the batch goes on."""
    report = run.report
    image = out / "images" / f"{job.name}.nii.gz"
    sidecar_path = out / "images" / f"{job.name}.json"
    sidecar = _read_sidecar(sidecar_path) if image.exists() and not force else None
    if sidecar is not None and _find_key(sidecar, FINGERPRINT_KEY) == job.fingerprint:
        job.inventory["status"] = "up to date"
        report.up_to_date += 1
        if job.inventory.get("notes"):
            report.with_notes += 1
        return list(_find_key(sidecar, "flags") or [])
    sink: List[str] = []
    volume: Optional[Volume] = None
    try:
        with collecting(sink):
            volume = job.load()
            if not run.keep_descriptions:
                for key in FREE_TEXT_META:
                    volume.meta.pop(key, None)
            write_volume(volume, image, sidecar_path)
    except UserError as exc:
        job.inventory.update(status="refused", reason=exc.reason)
        run.problem(exc.where or job.label, exc.reason)
        return None
    except MemoryError:
        job.inventory.update(status="refused", reason="not enough memory to build this volume")
        run.problem(job.label, "not enough memory to build this volume")
        return None
    except Exception as exc:  # noqa: BLE001 - one series failing must not stop the others
        with open(run.private / "errors.log", "a", encoding="utf-8") as log:
            log.write(f"--- {job.name}\n{traceback.format_exc()}\n")
        reason = (f"internal error {type(exc).__name__}: {exc} (a bug in pancls: please report it with the "
                  f"traceback in {PRIVATE_DIR}/errors.log)")
        job.inventory.update(status="failed", reason=one_line(reason))
        run.problem(job.label, reason, failed=True)
        return None
    finally:
        warned = [*filter(None, [job.inventory.get("warnings")]), *sink, *(volume.warnings if volume else [])]
        job.inventory["warnings"] = "; ".join(dict.fromkeys(warned))
    job.inventory["status"] = "converted"
    report.converted += 1
    if job.inventory.get("notes"):
        report.with_notes += 1
    return list(volume.flags)


# --------------------------------------------------------------------------- the join (pancls.join)


def _images_on_disk(out: Path) -> List[str]:
    folder = out / "images"
    return [f"images/{p.name}" for p in folder.glob("*.nii.gz")] if folder.is_dir() else []


def _join(job: Job, image: str, flags: List[str], out: Path, run: _Run,
          previous: Optional[Dict[str, str]]) -> Optional[Dict[str, str]]:
    """The manifest row of a kept volume: its label (from the sheet, else the earlier run's) and mask; None
    when a sheet was given and has no row for it (the volume stays on disk, listed in the inventory)."""
    inv, report = job.inventory, run.report
    inv["image"] = image
    row = {**job.row, "image": image}
    sheet_row: Optional[SheetRow] = None
    if run.sheet is not None:
        sheet_row, why = run.sheet.match(job.ids)
        if sheet_row is None:
            report.unlabelled += 1
            inv["reason"] = one_line(f"no label, not in manifest.csv: {why}")
            return None
        sheet_row.matched = True
        report.labelled += 1
        row["label"] = sheet_row.label
    elif previous:
        row["label"] = previous.get("label", "")
    inv["label"] = row["label"]
    mask, flag = _mask(job, image, sheet_row, out, run)
    if flag == MASK_REFUSED:  # not an earlier run's mask either: the refusal stands
        mask, flag = None, None
    elif mask is None and previous and previous.get("mask") and (out / previous["mask"]).exists():
        mask, flag = previous["mask"], ";".join(f for f in previous.get("flags", "").split(";")
                                                if f.startswith("mask_")) or None
    if mask:
        row["mask"] = inv["mask"] = mask
        report.masks += 1
        report.masks_resampled += MASK_RESAMPLED in (flag or "").split(";")
    row["flags"] = ";".join([*flags, *([flag] if flag else [])])
    return row


MASK_RESAMPLED, MASK_REORIENTED = "mask_resampled:nearest", "mask_reoriented"
MASK_LABEL = "mask_label"  # flag mask_label:N: the mask is the voxels == N of the file (--mask-label)
MASK_REFUSED = "refused"  # _mask's flag for a mask found and refused (never written to the manifest)


def _mask(job: Job, image: str, sheet_row: Optional[SheetRow], out: Path, run: _Run
          ) -> tuple[Optional[str], Optional[str]]:
    """``(masks/<name>.nii.gz, flag)`` of a volume whose mask was found, on the image's grid; ``(None,
    None)`` when there is none, ``(None, MASK_REFUSED)`` when it was refused (one line on stderr, the reason in
    the inventory)."""
    if run.masks is None:
        return None, None
    source, why = run.masks.find(job.ids, run.label_key, sheet_row)
    if source is None:
        if why:
            job.inventory["notes"] = "; ".join(filter(None, [job.inventory.get("notes"), f"no mask: {why}"]))
            run.problem(job.label, why)
            return None, MASK_REFUSED
        return None, None
    name = f"masks/{job.name}.nii.gz"
    target, sidecar_path = out / name, out / "masks" / f"{job.name}.json"
    # the rules' version: a mask written before a mask was refused beyond 1 % outside the volume is checked again
    fingerprint = run.key("fingerprint", f"{file_fingerprint([source], {}, run.unpacked)}|{job.fingerprint}|"
                                         f"rules 2|label {run.mask_label}", 64)
    sidecar = _read_sidecar(sidecar_path) if target.exists() else None
    if sidecar is not None and sidecar.get(FINGERPRINT_KEY) == fingerprint:
        return name, sidecar.get("flag") or None
    try:
        labels, affine, kind = read_mask(source)
        labels = select_label(labels, run.mask_label)
        img = nib.load(out / image)
        shape = tuple(int(s) for s in img.shape[:3])
        flag = None
        if grid_mismatch(img, nib.Nifti1Image(labels, affine)) is not None:
            lost = check_inside(labels, affine, shape, img.affine)  # refused beyond 1 % (one rule with predict)
            labels, how = onto_grid(labels, affine, shape, img.affine, AFFINE_ATOL_MM)
            flag = (MASK_RESAMPLED if how == "resampled" else
                    MASK_REORIENTED if axes_reordered(affine, img.affine) else None)  # else only cropped
            if lost > 0:
                job.inventory["notes"] = "; ".join(filter(None, [job.inventory.get("notes"),
                                                                 f"{lost} mask voxel(s) lie outside the volume"]))
        if not labels.any():
            raise UserError("the mask marks nothing on the volume's grid" +
                            (" (it does not overlap the volume)" if flag else ""))
        writable_folder(out / "masks")
        save_nifti(target, labels, img.affine)
        if run.mask_label is not None:  # what the mask was made of, for a rerun to reproduce it
            flag = ";".join(filter(None, [flag, f"{MASK_LABEL}:{run.mask_label}"]))
        atomic_write_json(sidecar_path, {FINGERPRINT_KEY: fingerprint, "flag": flag, "format": kind,
                                         "labels": sorted(int(v) for v in np.unique(labels) if v),
                                         "mask_label": run.mask_label})
    except UserError as exc:
        job.inventory["notes"] = "; ".join(filter(None, [job.inventory.get("notes"), f"mask refused: {exc.reason}"]))
        run.problem(source, exc.reason)
        return None, MASK_REFUSED
    return name, flag


def _unmatched_rows(sheet: LabelSheet, run: _Run, inventory: List[Dict[str, str]]) -> None:
    """One inventory row per sheet row that matched no study (named by its line, never by its key)."""
    rows = sheet.unmatched()
    for r in rows:
        inventory.append({"kind": "label", "status": "unmatched", "label": r.label,
                          "reason": f"no study in the sources has this {sheet.key}",
                          "path": f"{one_line(sheet.name, escape=True)}:{r.line}"})
    run.report.unmatched_rows = [r.line for r in rows]
    if rows:
        lines = ", ".join(map(str, run.report.unmatched_rows[:20])) + (", ..." if len(rows) > 20 else "")
        print(f"{one_line(sheet.name, escape=True)}: {len(rows)} row(s) matched no study (line {lines})",
              file=run.err, flush=True)


def _write_key_file(path: Path, keys: Dict[str, Dict[str, str]]) -> None:
    """``.private/keys.csv``: pseudonymous ids -> source identifiers and folder (owner-only, never shared)."""
    atomic_write_text(path, _csv_text([keys[k] for k in sorted(keys)], KEY_COLUMNS))
    os.chmod(path, 0o600)
