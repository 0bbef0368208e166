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
* ``inventory.csv``: every series found and every file not used, with its status -- ``converted``, ``up
  to date``, ``skipped`` (not chosen, or not an image; the reason says why), ``refused`` (the input
  cannot be converted right; the reason says why) or ``failed`` (an unexpected error: a bug) -- and
  ``notes`` (where the output differs from what the files describe: a file dropped as a duplicate, an
  unreadable file beside the series, a series split by orientation) and ``warnings`` (what pydicom and
  nibabel warned about, per file). Input paths appear only here, relative to the source argument.
* ``.private/``: the dataset ``secret`` (created on first use; never inside an output), ``lock``, the
  temporary folder for zip archives and ``errors.log`` (tracebacks of ``failed`` series). Keep it out of
  anything you share.

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

import contextlib
import csv
import fcntl
import io
import json
import os
import re
import shutil
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from tqdm.auto import tqdm

from pancls.config import from_dict, load_yaml, to_dict
from pancls.ct.capture import collecting, routed
from pancls.ct.nifti import load_nifti
from pancls.ct.scan import ScanResult, Series, scan, sop_class_name
from pancls.ct.select import Decision, SelectionRules, select_series
from pancls.ct.volume import FREE_TEXT_META, GeometryPolicy, Volume, build_volume
from pancls.ct.write import write_volume
from pancls.errors import UserError, one_line
from pancls.io import atomic_write_text, remove_stale_temps, writable_folder
from pancls.privacy import keyed_id, load_or_create_secret

MANIFEST_COLUMNS = ["patient_id", "image", "label", "study_id", "series_id", "series_number",
                    "description", "n_slices", "flags", "source"]
INVENTORY_COLUMNS = ["kind", "study_id", "series_id", "series_number", "description", "modality",
                     "sop_class", "n_files", "n_slices", "orientation", "status", "reason", "notes", "warnings",
                     "path"]
FINGERPRINT_KEY = "source_fingerprint"
PRIVATE_DIR = ".private"
#: exit status of ``pancls ingest``: everything converted / some input refused / an unexpected error
EXIT_OK, EXIT_REFUSED, EXIT_FAILED = 0, 1, 3


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
    warnings: List[str] = field(default_factory=list)  # from the header scan


@dataclass
class IngestReport:
    converted: int = 0
    up_to_date: int = 0
    skipped: int = 0
    with_notes: int = 0  # kept series whose output differs from what the files describe (see 'notes')
    refused: List[str] = field(default_factory=list)  # one line each: input that cannot be converted right
    failed: List[str] = field(default_factory=list)  # one line each: unexpected errors (bugs)

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
        notes = f", {self.with_notes} with notes (see inventory.csv)" if self.with_notes else ""
        return (f"{self.kept} series kept ({self.converted} converted, {self.up_to_date} up to date{notes}), "
                f"{self.skipped} skipped, {len(self.refused)} refused, {len(self.failed)} failed")


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
            source, member = p.resolve(), ""
        else:
            source = Path(origin.get(p, p)).resolve()  # member keeps the archive's folder (a hash of its path)
        st = source.stat()
        lines.append(f"{source}\0{member}\0{st.st_size}\0{st.st_mtime_ns}")
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


def _relative(path: Path, root: Path) -> str:
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


def ingest(sources: Sequence[Path], out: Path, config: IngestConfig = IngestConfig(), force: bool = False,
           workers: Optional[int] = None, progress: bool = True, err=None, keep_descriptions: bool = False,
           insecure_ids: bool = False, secret_file: Optional[Path] = None) -> IngestReport:
    """Run the whole pipeline into ``out``; each problem is printed to ``err`` (default stderr) and
    collected in the returned report.

    Refused before anything is done (:class:`UserError`): a missing source, an ``out`` that is not a
    writable folder, an unusable secret (see :func:`pancls.privacy.load_or_create_secret`; ``insecure_ids``
    accepts an empty one), another ingest writing into ``out``. After that nothing raises for bad input:
    every series gets its row and the manifest and inventory are always written.
    """
    err = err or sys.stderr
    sources = [Path(s) for s in sources]
    for src in sources:
        if not src.exists():
            raise UserError("no such file or folder", src)
    out = writable_folder(out)
    writable_folder(out / "images")
    private = out / PRIVATE_DIR
    writable_folder(private, "private folder")
    os.chmod(private, 0o700)
    secret = load_or_create_secret(private, insecure=insecure_ids, file=secret_file)
    run = _Run(config, secret, keep_descriptions, workers, IngestReport(), err, private)
    with _exclusive(private), _signals_unwind(), routed():
        for folder in (out, out / "images"):
            remove_stale_temps(folder)
        tmp = run.unpacked
        shutil.rmtree(tmp, ignore_errors=True)  # zip archives unpacked by a killed run
        tmp.mkdir()
        manifest = _previous_manifest(out / "manifest.csv", out)
        inventory: List[Dict[str, str]] = []
        try:
            # no name is kept for the scan result: the headers of series that are not converted can be freed
            jobs = _plan(scan(sources, workers=workers, tmp_dir=tmp, progress=progress, secret=secret), sources,
                         run, inventory)
            for job in tqdm(jobs, desc="volumes", unit="series", disable=None if progress else True, leave=False):
                flags = _run_job(job, out, force, run)
                image = f"images/{job.name}.nii.gz"
                if flags is None:  # an output left from an earlier run no longer stands
                    manifest.pop(image, None)
                else:
                    manifest[image] = {**job.row, "image": image, "flags": ";".join(flags)}
        finally:  # also when interrupted: what was converted is listed, nothing half-written is
            atomic_write_text(out / "manifest.csv",
                              _csv_text([manifest[k] for k in sorted(manifest)], MANIFEST_COLUMNS))
            atomic_write_text(out / "inventory.csv", _csv_text(inventory, INVENTORY_COLUMNS))
            shutil.rmtree(tmp, ignore_errors=True)
    return run.report


@contextlib.contextmanager
def _exclusive(private: Path) -> Iterator[None]:
    """Hold ``private/lock`` (flock: released by the kernel when the process dies, even by SIGKILL)."""
    with open(private / "lock", "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError("another pancls ingest is writing into this folder", private.parent) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt (in the main thread), so that ``finally`` blocks run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def _dicom_job(series: Series, inventory: Dict[str, str], run: _Run) -> Job:
    first = series.first
    # the policy is part of the fingerprint: a series resampled under one policy is redone under another
    fingerprint = run.key("fingerprint", f"{file_fingerprint(series.paths, run.origin, run.unpacked)}|"
                                         f"{to_dict(run.config.geometry)}", 64)

    def load() -> Volume:
        volume = build_volume(series.paths, run.config.geometry, workers=run.workers, headers=series.headers)
        volume.meta[FINGERPRINT_KEY] = fingerprint
        volume.meta["series_id"] = series.series_hash
        return volume

    return Job(
        name=f"{series.study_hash}_{series.series_hash}", label=f"{first.folder} (series {series.name})",
        fingerprint=fingerprint, load=load, inventory=inventory,
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
        volume.meta[FINGERPRINT_KEY] = fingerprint
        return volume

    inventory.update(study_id=key, series_id="nifti")
    return Job(
        name=f"{key}_nifti", label=str(path), fingerprint=fingerprint, load=load, inventory=inventory,
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
    used_sources = set()
    unreadable: Dict[Path, List[str]] = {}
    for skip in result.skipped:
        if skip.problem:
            unreadable.setdefault(skip.path.parent, []).append(f"{one_line(skip.path.name, escape=True)}: {skip.reason}")
    for decision in select_series(result.series, config.selection):
        row = _series_inventory_row(decision, run)
        inventory.append(row)
        src = result.origin[decision.series.first.path]
        if decision.kept:
            lost = [r for folder in sorted({i.folder for i in decision.series.instances})
                    for r in unreadable.get(folder, [])]
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
        row = {"kind": "nifti", "path": _relative(path, src), "n_files": "1", "status": "selected"}
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
        inventory.append({"kind": "file", "path": _relative(skip.path, src), "n_files": "1",
                          "status": "refused" if skip.problem else "skipped", "reason": skip.reason})
        if skip.problem or src == skip.path:  # a damaged DICOM, or a file the user named that is unusable
            run.problem(skip.path, skip.reason)
        else:
            report.skipped += 1
            reasons_by_source[src].append(skip.reason)
    for src in sources:
        if src.is_dir() and src not in used_sources:
            found = sorted(set(reasons_by_source[src]))
            run.problem(src, "no usable series" + (f" (found: {'; '.join(found[:5])}"
                                                   f"{'; ...' if len(found) > 5 else ''})" if found else " (no files)"))
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
