"""Turn folders of DICOM (and NIfTI files) into checked NIfTI volumes, a manifest and an inventory.

Pipeline: :func:`pancls.ct.scan.scan` (headers only) -> :func:`pancls.ct.select.select_series`
(one series per study) -> :func:`pancls.ct.volume.build_volume` (from the scan's headers: each file is
parsed once, then only its pixel data is read) -> :func:`pancls.ct.write.write_volume`.

Outputs in ``out``:

* ``images/<study>_<series>.nii.gz`` + ``.json`` sidecar (hash names, no identifiers);
* ``manifest.csv``: ``patient_id, image, label, study_id, series_id, series_number, description,
  n_slices, flags, source`` -- ``patient_id`` is a pseudonym, the first 12 hex digits of
  sha256(``patient_salt`` + sha256(PatientID)); without a PatientID it is the study hash. Rows of
  earlier runs whose image still exists are kept (a run adds to or refreshes the dataset);
* ``inventory.csv``: every series found (kept or not, with the reason) and every skipped file (its
  path relative to the source argument it was found under, the only place input paths appear).

Incremental: a series is converted again only when its sidecar is missing or records another
source fingerprint (sha256 over the files' paths, sizes and mtimes, and the geometry policy), or
with ``force``. Output names derive from the study/series hashes of :mod:`pancls.ct.scan`; a study
stored in several places is split into copies there, so its names depend on the copies scanned together.
Each problem (unreadable file, series that cannot be built, NIfTI refused, a source with no usable
series) is one line ``<where>: <reason>`` on stderr; the batch goes on and the exit status is 1.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from tqdm.auto import tqdm

from pancls.config import from_dict, load_yaml, to_dict
from pancls.ct.nifti import load_nifti
from pancls.ct.scan import ScanResult, Series, scan, short_hash, sop_class_name
from pancls.ct.select import Decision, SelectionRules, select_series
from pancls.ct.volume import GeometryPolicy, Volume, build_volume
from pancls.ct.write import write_volume
from pancls.errors import UserError
from pancls.io import atomic_write_text

MANIFEST_COLUMNS = ["patient_id", "image", "label", "study_id", "series_id", "series_number",
                    "description", "n_slices", "flags", "source"]
INVENTORY_COLUMNS = ["kind", "study_id", "series_id", "series_number", "description", "modality",
                     "sop_class", "n_files", "n_slices", "orientation", "status", "reason", "path"]
FINGERPRINT_KEY = "source_fingerprint"


@dataclass
class IngestConfig:
    """``pancls ingest --config`` YAML: sections ``selection`` and ``geometry``, and the pseudonym salt."""

    selection: SelectionRules = field(default_factory=SelectionRules)
    geometry: GeometryPolicy = field(default_factory=GeometryPolicy)
    patient_salt: str = ""  # a secret salt makes patient_id hashes unlinkable to known PatientIDs


def load_config(path: Optional[Path]) -> IngestConfig:
    return IngestConfig() if path is None else from_dict(IngestConfig, load_yaml(path), str(path))


@dataclass
class Job:
    """One volume to produce: a selected DICOM series or a NIfTI file."""

    name: str  # output stem, from hashes only
    label: str  # how stderr names it when the builder gives no better place
    fingerprint: str
    load: Callable[[], Volume]
    row: Dict[str, str]  # manifest row without 'image' and 'flags'
    inventory: Dict[str, str]  # its inventory row; 'status' is updated as the job runs


@dataclass
class IngestReport:
    converted: int = 0
    up_to_date: int = 0
    skipped: int = 0
    problems: List[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.converted + self.up_to_date

    def summary(self) -> str:
        return (f"{self.kept} series kept ({self.converted} converted, {self.up_to_date} up to date), "
                f"{self.skipped} skipped, {len(self.problems)} failed")


def file_fingerprint(paths: Sequence[Path]) -> str:
    """sha256 over (resolved path, size, mtime) of every file: changes when any source changes."""
    h = hashlib.sha256()
    for p in sorted(Path(p).resolve() for p in paths):
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


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


def _relative(path: Path, root: Path) -> str:
    root = root if root.is_dir() else root.parent
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def _series_inventory_row(decision: Decision) -> Dict[str, str]:
    s = decision.series
    first = s.first
    return {
        "kind": "series", "study_id": s.study_hash, "series_id": s.series_hash,
        "series_number": "" if first.series_number is None else str(first.series_number),
        "description": first.series_description, "modality": first.modality,
        "sop_class": sop_class_name(first.sop_class_uid), "n_files": str(len(s.instances)),
        "n_slices": str(s.n_slices), "orientation": s.orientation_label,
        "status": "selected" if decision.kept else "skipped", "reason": "; ".join([decision.reason, *s.notes]),
    }


def _dicom_job(series: Series, inventory: Dict[str, str], config: IngestConfig, workers: Optional[int]) -> Job:
    first = series.first
    # the policy is part of the fingerprint: a series resampled under one policy is redone under another
    fingerprint = hashlib.sha256(f"{series.fingerprint()}|{to_dict(config.geometry)}".encode()).hexdigest()

    def load() -> Volume:
        volume = build_volume(series.paths, config.geometry, workers=workers, headers=series.headers)
        volume.meta[FINGERPRINT_KEY] = fingerprint
        return volume

    return Job(
        name=f"{series.study_hash}_{series.series_hash}", label=f"{first.folder} (series {series.name})",
        fingerprint=fingerprint, load=load, inventory=inventory,
        row={"patient_id": short_hash(config.patient_salt + series.patient_key, 12), "label": "",
             "study_id": series.study_hash, "series_id": series.series_hash,
             "series_number": inventory["series_number"], "description": first.series_description,
             "n_slices": str(series.n_slices), "source": "dicom"},
    )


def _nifti_job(path: Path, inventory: Dict[str, str], config: IngestConfig) -> Job:
    fingerprint = file_fingerprint([path])
    key = short_hash(str(path.resolve()))
    stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem

    def load() -> Volume:
        volume = load_nifti(path)
        volume.meta[FINGERPRINT_KEY] = fingerprint
        return volume

    inventory.update(study_id=key, series_id="nifti")
    return Job(
        name=f"{key}_nifti", label=str(path), fingerprint=fingerprint, load=load, inventory=inventory,
        # the file stem usually carries the case id: only its salted hash is written
        row={"patient_id": short_hash(config.patient_salt + "nifti:" + stem, 12), "label": "", "study_id": key,
             "series_id": "nifti", "series_number": "", "description": "", "n_slices": "", "source": "nifti"},
    )


def _csv_text(rows: List[Dict[str, str]], columns: List[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _previous_manifest(path: Path, out: Path) -> Dict[str, Dict[str, str]]:
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["image"]: row for row in csv.DictReader(fh) if row.get("image") and (out / row["image"]).exists()}


def ingest(sources: Sequence[Path], out: Path, config: IngestConfig = IngestConfig(), force: bool = False,
           workers: Optional[int] = None, progress: bool = True, err=None) -> IngestReport:
    """Run the whole pipeline into ``out``; each problem is printed to ``err`` (default stderr) and
    collected in the returned report. A missing source is a :class:`UserError` (nothing is done)."""
    err = err or sys.stderr
    sources = [Path(s) for s in sources]
    for src in sources:
        if not src.exists():
            raise UserError("no such file or folder", src)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", out)
    report = IngestReport()

    def problem(where, reason: str) -> None:
        line = f"{where}: {reason}"
        report.problems.append(line)
        print(line, file=err, flush=True)

    with tempfile.TemporaryDirectory(prefix="pancls-ingest-") as tmp:  # zip archives are unpacked here
        # no name is kept for the scan result: the headers of series that are not converted can be freed
        inventory, jobs = _plan(scan(sources, workers=workers, tmp_dir=Path(tmp), progress=progress), sources,
                                config, workers, report, problem)
        manifest = _previous_manifest(out / "manifest.csv", out)
        for job in tqdm(jobs, desc="volumes", unit="series", disable=None if progress else True, leave=False):
            flags = _run_job(job, out, force, report, problem)
            image = f"images/{job.name}.nii.gz"
            if flags is None:  # an output left from an earlier run no longer stands
                manifest.pop(image, None)
            else:
                manifest[image] = {**job.row, "image": image, "flags": ";".join(flags)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "manifest.csv", _csv_text([manifest[k] for k in sorted(manifest)], MANIFEST_COLUMNS))
    atomic_write_text(out / "inventory.csv", _csv_text(inventory, INVENTORY_COLUMNS))
    return report


def _plan(result: ScanResult, sources: List[Path], config: IngestConfig, workers, report: IngestReport, problem):
    """Inventory rows and the jobs to run; reports unreadable files and sources without usable series."""
    inventory: List[Dict[str, str]] = []
    jobs: List[Job] = []
    reasons_by_source: Dict[Path, List[str]] = {src: [] for src in sources}
    used_sources = set()
    for decision in select_series(result.series, config.selection):
        row = _series_inventory_row(decision)
        inventory.append(row)
        src = result.origin[decision.series.first.path]
        if decision.kept:
            jobs.append(_dicom_job(decision.series, row, config, workers))
            used_sources.add(src)
        else:
            report.skipped += 1
            reasons_by_source[src].append(f"{decision.series.name}: {decision.reason}")
    for path in result.nifti:
        src = result.origin[path]
        row = {"kind": "nifti", "path": _relative(path, src), "n_files": "1", "status": "selected"}
        inventory.append(row)
        explicit = src == path  # a NIfTI named on the command line is always converted
        pattern = config.selection.nifti_exclude
        if not explicit and pattern and re.search(pattern, path.name, re.IGNORECASE):
            row.update(status="skipped", reason="file name matches selection.nifti_exclude (a mask?)")
            report.skipped += 1
            continue
        jobs.append(_nifti_job(path, row, config))
        used_sources.add(src)
    for skip in result.skipped:
        src = result.origin[skip.path]
        inventory.append({"kind": "file", "path": _relative(skip.path, src), "n_files": "1",
                          "status": "failed" if skip.problem else "skipped", "reason": skip.reason})
        if skip.problem or src == skip.path:  # a damaged DICOM, or a file the user named that is unusable
            problem(skip.path, skip.reason)
        else:
            report.skipped += 1
            reasons_by_source[src].append(skip.reason)
    for src in sources:
        if src.is_dir() and src not in used_sources:
            found = sorted(set(reasons_by_source[src]))
            problem(src, "no usable series" + (f" (found: {'; '.join(found[:5])}"
                                               f"{'; ...' if len(found) > 5 else ''})" if found else " (no files)"))
    return inventory, jobs


def _run_job(job: Job, out: Path, force: bool, report: IngestReport, problem) -> Optional[List[str]]:
    """Convert one job unless up to date; returns the volume's flags, or None when it failed."""
    image = out / "images" / f"{job.name}.nii.gz"
    sidecar_path = out / "images" / f"{job.name}.json"
    sidecar = _read_sidecar(sidecar_path) if image.exists() and not force else None
    if sidecar is not None and _find_key(sidecar, FINGERPRINT_KEY) == job.fingerprint:
        job.inventory["status"] = "up to date"
        report.up_to_date += 1
        return list(_find_key(sidecar, "flags") or [])
    try:
        volume = job.load()
        write_volume(volume, image, sidecar_path)
    except UserError as exc:
        job.inventory.update(status="failed", reason=exc.reason)
        problem(exc.where or job.label, exc.reason)
        return None
    job.inventory["status"] = "converted"
    report.converted += 1
    return list(volume.flags)
