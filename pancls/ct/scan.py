"""Find DICOM image objects under folders, skip everything else, and group them into series.

Only headers are read here (``pydicom.dcmread(stop_before_pixels=True)``); the pixels are decoded
later, one chosen series at a time, by :func:`pancls.ct.volume.build_volume`. Each image keeps its
parsed header and the byte offset of its pixel data (:class:`Header`, ~50 KB per CT file in memory),
so that the series chosen for conversion is neither parsed twice nor searched for its pixels again.

Classification of every file found
----------------------------------
* ``.nii`` / ``.nii.gz`` files are returned as NIfTI inputs (:attr:`ScanResult.nifti`).
* A file without the ``DICM`` marker at byte 128 that pydicom can only parse with ``force=True``
  (e.g. pydicom's ``rtstruct.dcm``) is skipped: "no DICOM preamble/file meta". Anything else
  without the marker is skipped as "not a DICOM file".
* A DICOM file whose header cannot be parsed (truncated, corrupt) is *unreadable*: unlike a skip
  this is reported as a problem, since it is most likely a lost slice.
* The SOP class is the dataset's SOPClassUID or, when that is empty (anonymisers blank it), the
  file meta's MediaStorageSOPClassUID. Only *image storage* classes are kept; DICOMDIR, structured
  reports, segmentations, RT structure sets/plans/doses, presentation states and every other
  non-image class are skipped by SOP class -- never by extension or by the presence of PixelData
  (RT Dose and SEG carry pixel data and SimpleITK and dcm2niix read them as images).

Grouping rule
-------------
1. **Study**: StudyInstanceUID; when empty, the fallback key (PatientID, StudyDate, StudyTime,
   StudyID, AccessionNumber, grand-parent folder of the file -- series folders of one study are
   usually siblings).
2. **Copies**: if one SOPInstanceUID occurs in more than one folder, the study was stored more than
   once (a re-export, or a hand-made subset such as the ``gap`` fixture). The study is then split
   where the copies diverge: below the common folder of the duplicated instances, each top-level
   sub-folder is a separate copy with its own study hash. A series split over several folders
   without repeated instances stays one series.
3. **Series**: SeriesInstanceUID; when empty, the fallback key (SeriesNumber, SeriesDescription,
   ImageType, orientation rounded to 0.01, PixelSpacing rounded to 0.001 mm, Rows, Columns, KVP,
   ConvolutionKernel, AcquisitionNumber, FrameOfReferenceUID, folder).
4. Inside a series, files are further split by (LOCALIZER in ImageType, orientation rounded to
   0.01), so that a scout stored under the series' UID becomes its own (excluded) sub-series
   instead of breaking the volume.
   A file whose orientation is missing or unusable is not split off (it would silently shorten the
   stack): it stays with the largest group of its series (without SeriesInstanceUID: of the series whose
   fallback key agrees with it except for the orientation), where :func:`pancls.ct.volume.build_volume`
   refuses it by name. A non-localizer series split by orientation gets a note on each part.
5. Files repeating a SOPInstanceUID *at the same position* inside one series are duplicates (e.g. the
   same slice stored compressed and uncompressed): the first by path is kept and the series gets a note.
   Files that share a SOPInstanceUID but lie at different positions are distinct slices (anonymisers
   that blank or reuse UIDs make them): all are kept, with a note.
6. A series grouped by the fallback key (no SeriesInstanceUID) gets a note when files of its folder that
   went to other series or studies lie inside its slice range or next to its ends (positions along its
   normal): one changed header value can move a slice out of a UID-less series and leave a stack that
   still looks regular (see :func:`_stray_neighbours`).

Nothing here writes patient identifiers: studies and series are named by keyed hashes
(:func:`pancls.privacy.keyed_id`) of their UIDs (or fallback keys) under the caller's secret; PatientID
is only ever used hashed, for :attr:`Series.patient_key`. Display names carry no description.
Header values are converted inside :func:`read_header`: a value pydicom cannot convert makes the file a
refused (problem) skip naming the element, and pydicom's warnings are kept per file
(:attr:`Instance.warnings`) when :func:`pancls.ct.capture.routed` is active.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import struct
import zipfile
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import pydicom
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from tqdm.auto import tqdm

from pancls.ct.capture import collecting
from pancls.ct.functional import functional_value
from pancls.ct.geometry import check_orientation, iop_normal, median, slice_normal
from pancls.errors import UserError, exception_text, redact_names
from pancls.privacy import keyed_id, session_secret

NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: SOP classes from which a CT volume can be built.
CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
}
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC and its multi-frame variants (.7.1-.7.4)


#: (7FE0,0008) FloatPixelData, (7FE0,0009) DoubleFloatPixelData, (7FE0,0010) PixelData.
PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
PIXEL_DATA = 0x7FE00010

# Threads only overlap I/O waits (network storage): header parsing is pure Python, OpenJPEG as
# pylibjpeg-openjpeg and Pillow call it keeps the GIL while decoding (compressed series are decoded in
# processes instead, see pancls.ct.volume), and native pixel data is one copy. Measured on the 2-core
# machine while shared: 80 native 512x512 slices decode in 23-25 ms with 1 or 2 threads,
# and a 10-file series took 19-27 ms (scan + build) in the calling thread, 20-37 ms with 2 threads (pool
# start-up, GIL hand-offs). So: one thread per 16 files, and none below that.
MIN_FILES_PER_THREAD = 16

_T = TypeVar("_T")
_R = TypeVar("_R")


def default_workers(n_items: int) -> int:
    """Threads for ``n_items`` files: one per ``MIN_FILES_PER_THREAD`` files, at most one per CPU (and 8).

    1 means "no pool": for a small series the work is done in the calling thread.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n_items // MIN_FILES_PER_THREAD, cpus, 8))


def parallel_map(fn: Callable[[_T], _R], items: Sequence[_T], workers: Optional[int] = None) -> List[_R]:
    """``[fn(x) for x in items]``, in a thread pool of ``workers`` (default :func:`default_workers`) threads
    when that is more than one; results keep the input order and the first exception propagates."""
    workers = workers or default_workers(len(items))
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def short_hash(text: str, n: int = 10) -> str:
    """First ``n`` hex digits of sha256(``text``): a stable name for internal use (temp folders, grouping
    keys). Never for an output: a plain hash of a UID is linkable, see :mod:`pancls.privacy`."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def sop_class_name(uid: str) -> str:
    """Human name of a SOP class UID (pydicom's dictionary), or the UID itself when unknown."""
    if not uid:
        return "unknown SOP class"
    name = UID(uid).name
    return name if name and name != uid else f"unknown SOP class {uid}"


def is_image_storage(uid: str) -> bool:
    """True for image storage SOP classes ("... Image Storage"), which hold a viewable image."""
    return "Image Storage" in sop_class_name(uid)


@dataclass(frozen=True)
class Header:
    """A file's parsed header (no pixel data read) and where its pixel data element starts.

    ``pixel_tag`` is the first pixel data element in the file (one of :data:`PIXEL_DATA_TAGS`), None
    when it has none. ``pixel_offset`` is that element's byte offset in the file, None where the file
    cannot be addressed that way (Deflated transfer syntax: the dataset is inflated in memory).
    """

    dataset: pydicom.Dataset
    pixel_tag: Optional[int]
    pixel_offset: Optional[int]


def read_dicom_header(path: Path) -> Header:
    """Parse ``path`` up to its pixel data (``stop_before_pixels``) and note where that starts.

    pydicom leaves the file positioned at the element it stopped at, so the offset costs one 4-byte
    read. Raises what :func:`pydicom.dcmread` raises (callers decide what a bad file means).
    """
    with open(path, "rb") as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        offset = fh.tell()
        tag_bytes = fh.read(4)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax == DeflatedExplicitVRLittleEndian:
        full = pydicom.dcmread(path, specific_tags=list(PIXEL_DATA_TAGS))
        return Header(ds, next((t for t in PIXEL_DATA_TAGS if t in full), None), None)
    if len(tag_bytes) < 4:
        return Header(ds, None, None)
    _, little_endian = ds.original_encoding
    group, element = struct.unpack("<HH" if little_endian else ">HH", tag_bytes)
    tag = group << 16 | element
    return Header(ds, tag, offset) if tag in PIXEL_DATA_TAGS else Header(ds, None, None)


@dataclass(frozen=True)
class Instance:
    """Header facts of one DICOM image object (no pixels, no patient identifiers except hashed)."""

    path: Path
    folder: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    series_number: Optional[int]
    series_description: str
    modality: str
    image_type: Tuple[str, ...]
    orientation: Optional[Tuple[float, ...]]  # ImageOrientationPatient (6 cosines)
    position: Optional[Tuple[float, ...]]  # ImagePositionPatient (of the first frame)
    pixel_spacing: Optional[Tuple[float, float]]
    rows: int
    columns: int
    n_frames: int
    acquisition_key: Tuple[str, ...]  # KVP, kernel, AcquisitionNumber, FrameOfReferenceUID
    study_fallback: Tuple[str, ...]  # StudyDate, StudyTime, StudyID, AccessionNumber
    patient_hash: str  # sha256 of PatientID ('' when absent)
    header: Header = field(compare=False, repr=False)
    warnings: Tuple[str, ...] = ()  # pydicom's warnings while reading this header, one line each

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def has_orientation(self) -> bool:
        """Six finite direction cosines (anything else cannot be grouped or placed)."""
        return self.orientation is not None and len(self.orientation) == 6 and all(map(math.isfinite, self.orientation))


@dataclass(frozen=True)
class SkippedFile:
    """A file that holds no usable image; ``problem`` marks unreadable DICOM (a real failure)."""

    path: Path
    reason: str
    problem: bool = False


@dataclass
class Series:
    """The image objects of one series (one copy of it, one orientation), with naming hashes."""

    study_hash: str
    series_hash: str
    patient_key: str
    instances: List[Instance]
    notes: List[str] = field(default_factory=list)

    @property
    def first(self) -> Instance:
        return self.instances[0]

    @property
    def paths(self) -> List[Path]:
        return [inst.path for inst in self.instances]

    @property
    def headers(self) -> List[Header]:
        return [inst.header for inst in self.instances]

    @property
    def n_slices(self) -> int:
        return sum(inst.n_frames for inst in self.instances)

    @property
    def name(self) -> str:
        """Display name without identifiers or free text: ``<series hash> S<number>``."""
        number = "S?" if self.first.series_number is None else f"S{self.first.series_number}"
        return f"{self.series_hash} {number}"

    @property
    def warnings(self) -> List[str]:
        """pydicom's warnings on the headers of this series, each once, prefixed by the first file."""
        seen: Dict[str, str] = {}
        for inst in self.instances:
            for w in inst.warnings:
                seen.setdefault(w, inst.path.name)
        return [f"{name}: {w}" for w, name in seen.items()]

    @property
    def orientation_label(self) -> str:
        return orientation_label(self.first.orientation)


@dataclass
class ScanResult:
    series: List[Series]
    skipped: List[SkippedFile]
    nifti: List[Path]
    origin: Dict[Path, Path]  # every file found -> the source (argument) it was found under
    archives: List[SkippedFile] = field(default_factory=list)  # zip archives refused (also in skipped): lost studies?


def _cut_short(skip: SkippedFile) -> SkippedFile:
    """A "not a DICOM file" beside DICOM files: refused as a slice cut short when it is shorter than a DICOM
    preamble and magic (:data:`DICOM_HEAD`: a copy interrupted at its start) and its bytes can be the start of
    one (all NUL, the usual preamble, possibly ``DICM`` after it: empty, or a copy that stopped in the first
    block), else left skipped: a short text file (``md5.txt``, ``README``) beside the slices is no slice."""
    try:
        size = skip.path.stat().st_size
        head = skip.path.read_bytes()[:DICOM_HEAD] if size < DICOM_HEAD else b""
    except OSError:
        return skip
    if size >= DICOM_HEAD or head[:128].strip(b"\0") or not b"DICM".startswith(head[128:]):
        return skip
    return SkippedFile(skip.path, f"truncated file ({size} bytes, shorter than a DICOM preamble) beside DICOM "
                                  "files: a lost slice?", problem=True)


def problems_beside(series: Series, skipped: Sequence[SkippedFile]) -> List[SkippedFile]:
    """The unreadable files (``problem``) in the folders of ``series``: slices it may have lost (a truncated or
    damaged file of the series is not in it). ``pancls ingest`` notes them on the series, ``pancls predict``
    flags the study."""
    folders = {i.folder for i in series.instances}
    return [s for s in skipped if s.problem and s.path.parent in folders]


def orientation_label(iop: Optional[Sequence[float]], oblique_deg: float = 30.0) -> str:
    """'axial' / 'coronal' / 'sagittal' from the slice normal's nearest patient axis, else 'oblique'.

    The normal is n = row cosines x column cosines; the label is the axis (x: sagittal, y: coronal,
    z: axial) with the largest |n| component, provided the normal is within ``oblique_deg`` of it
    (so an 18.5 deg gantry tilt is still axial).
    """
    normal = iop_normal(iop)
    if normal is None:
        return "unknown"
    normal = np.abs(normal)
    axis = int(np.argmax(normal))
    if np.degrees(np.arccos(min(1.0, normal[axis]))) > oblique_deg:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


# --------------------------------------------------------------------------- discovery


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def iter_files(sources: Sequence[Path], tmp_dir: Optional[Path] = None
               ) -> Iterator[Tuple[Path, Path, Optional[str]]]:
    """Yield ``(file, source root, problem)`` for every regular file under ``sources`` (recursively).

    Zip archives are extracted into ``tmp_dir`` (required when one is met) and walked like folders; an
    archive that cannot be extracted (corrupt member, unsupported compression, zip-slip) is yielded once
    with ``problem`` set and nothing of it is kept. ``problem`` is None for every other file.
    Hidden files and folders (``.name``) are ignored. A missing source is a :class:`UserError`.
    """
    for src in sources:
        src = Path(src)
        if not src.exists():
            raise UserError("no such file or folder", src)
        for path in [src] if src.is_file() else _walk(src):
            try:
                is_zip = zipfile.is_zipfile(path) and not _is_nifti(path)
            except OSError:
                is_zip = False  # unreadable: read_header reports it
            if not is_zip:
                damaged = _damaged_zip(path)
                yield path, src, damaged
                continue
            if tmp_dir is None:
                raise ValueError("iter_files needs tmp_dir to extract zip archives")
            # keyed with this process's secret: a folder name that is a plain hash of a path (which may name
            # the patient) would be linkable, even in a private temp folder
            target = Path(tmp_dir) / keyed_id(session_secret(), "zip", str(path.resolve()), 10)
            try:
                _extract_zip(path, target)
            except UserError as exc:
                shutil.rmtree(target, ignore_errors=True)
                yield path, src, exc.reason
                continue
            yield from ((p, src, problem) for p, _, problem in iter_files([target], tmp_dir))


#: the first bytes of a zip archive (local file header, empty archive, spanned archive)
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")


def _damaged_zip(path: Path) -> Optional[str]:
    """Why ``path`` is a damaged zip archive (it starts with a zip signature or is named ``.zip``, and
    :func:`zipfile.is_zipfile` found no central directory: truncated, e.g. by an interrupted copy), else None.
    Refused, not skipped as "not a DICOM file": a whole study may be in it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return None  # unreadable: read_header reports it
    if head in ZIP_SIGNATURES or path.name.lower().endswith(".zip"):
        return ("damaged or truncated zip archive (its end, the central directory, is missing or unreadable): "
                "the studies in it cannot be read")
    return None


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # in place: prunes the walk
        yield from (Path(folder) / n for n in sorted(names) if not n.startswith("."))


def _extract_zip(path: Path, target: Path) -> None:
    """Extract ``path`` into ``target``; a :class:`UserError` whose reason names no member (member paths are
    file names of the export, often SOP Instance UIDs, and folder names, often the patient's: the reason reaches
    output files; the inventory names the archive)."""
    members: list[str] = []
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
            for member in zf.infolist():
                # refuse absolute paths and '..' (zip-slip): they would escape the temp folder
                dest = (target / member.filename).resolve()
                if not str(dest).startswith(str(target.resolve())):
                    raise UserError("a zip member escapes the archive (an absolute path or '..')", path)
            zf.extractall(target)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        # a corrupt member (zlib.error, CRC), unsupported compression or an encrypted member
        text = redact_names(exception_text(exc, path), members, "<member>")
        raise UserError(f"bad zip archive: {text}", path) from None
    except OSError as exc:
        raise UserError(f"cannot extract zip archive: {exc.strerror or exc}", path) from None


# --------------------------------------------------------------------------- headers


def _floats(value) -> Optional[Tuple[float, ...]]:
    if value is None or value == "":
        return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def _str(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: pydicom.Dataset, keyword: str, default: Optional[int] = None) -> Optional[int]:
    """An integer element with one value (``default`` when absent or empty); ValueError otherwise."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        raise ValueError(f"{keyword} has {len(value)} values, expected 1")
    try:
        number = int(value)
        exact = number == float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{keyword} {value!r} is not an integer") from None
    if not exact:
        raise ValueError(f"{keyword} {value!r} is not an integer")
    return number


def read_header(path: Path) -> Instance | SkippedFile:
    """Classify one file from its header; never raises for a bad file (returns a skip instead).

    Every element used later is converted here, so that a value pydicom cannot convert (a DS "abc", an
    unknown VR) refuses the file with its name instead of failing somewhere downstream. Warnings raised
    while reading go into :attr:`Instance.warnings` (or into the skip's reason).
    """
    path = Path(path)
    with collecting() as sink:
        result = _read_header(path)
    if sink and isinstance(result, Instance):
        return dataclasses.replace(result, warnings=tuple(sink))
    if sink and isinstance(result, SkippedFile) and result.problem:
        return dataclasses.replace(result, reason=f"{result.reason} (warnings: {'; '.join(sink[:3])})")
    return result


#: bytes of a DICOM file's preamble and magic ('DICM'); a shorter file is not DICOM, or one cut short
DICOM_HEAD = 132
NOT_DICOM = "not a DICOM file"


def _read_header(path: Path) -> Instance | SkippedFile:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        return SkippedFile(path, f"cannot read file: {exc.strerror}", problem=True)
    if len(head) == 0:
        return SkippedFile(path, "empty file (0 bytes): a lost slice?", problem=True)
    if head[128:132] != b"DICM":
        return _classify_without_preamble(path)
    try:
        header = read_dicom_header(path)
    except Exception as exc:  # pydicom raises many types on corrupt input; the batch must go on
        return SkippedFile(path, f"unreadable DICOM header ({exception_text(exc, path)})", problem=True)
    try:
        return _instance(path, header)
    except _Skip as skip:
        return skip.file
    except Exception as exc:  # noqa: BLE001 - converting a damaged element raises anything
        return SkippedFile(path, f"unreadable DICOM header value ({exception_text(exc, path)})",
                           problem=True)


class _Skip(Exception):
    def __init__(self, file: SkippedFile):
        self.file = file


def _instance(path: Path, header: Header) -> Instance:
    ds = header.dataset
    if "DirectoryRecordSequence" in ds:
        raise _Skip(SkippedFile(path, "DICOMDIR (Media Storage Directory Storage): not an image"))
    meta_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or "") or meta_class
    if not is_image_storage(sop_class):
        # a SOP class the standard does not define is a damaged file (maybe a lost slice), not a skip
        unknown = sop_class_name(sop_class).startswith("unknown SOP class")
        raise _Skip(SkippedFile(path, f"{sop_class_name(sop_class)}: not an image storage SOP class", problem=unknown))
    if "Rows" not in ds or "Columns" not in ds:
        # pydicom stops quietly at end of file, so a truncated header shows up as missing elements
        raise _Skip(SkippedFile(path, f"incomplete {sop_class_name(sop_class)} header (truncated?): no Rows/Columns",
                                problem=True))
    try:
        rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
        n_frames = _int(ds, "NumberOfFrames", 1)
        series_number = _int(ds, "SeriesNumber")
    except ValueError as exc:
        raise _Skip(SkippedFile(path, str(exc), problem=True)) from None
    if min(rows, columns, n_frames) < 1:
        raise _Skip(SkippedFile(path, f"Rows {rows}, Columns {columns}, NumberOfFrames {n_frames}: no image",
                                problem=True))
    spacing = _floats(functional_value(ds, "PixelSpacing", "PixelMeasuresSequence"))
    patient_id = _str(ds, "PatientID")
    return Instance(
        path=path,
        folder=path.parent,
        sop_class_uid=sop_class,
        sop_instance_uid=_str(ds, "SOPInstanceUID"),
        study_uid=_str(ds, "StudyInstanceUID"),
        series_uid=_str(ds, "SeriesInstanceUID"),
        series_number=series_number,
        series_description=_str(ds, "SeriesDescription"),
        modality=_str(ds, "Modality"),
        image_type=tuple(v.upper() for v in _str(ds, "ImageType").split("\\") if v),
        orientation=_floats(functional_value(ds, "ImageOrientationPatient", "PlaneOrientationSequence")),
        position=_floats(functional_value(ds, "ImagePositionPatient", "PlanePositionSequence")),
        pixel_spacing=spacing[:2] if spacing and len(spacing) >= 2 else None,
        rows=rows,
        columns=columns,
        n_frames=n_frames,
        acquisition_key=tuple(_str(ds, k) for k in ("KVP", "ConvolutionKernel", "AcquisitionNumber", "FrameOfReferenceUID")),
        study_fallback=tuple(_str(ds, k) for k in ("StudyDate", "StudyTime", "StudyID", "AccessionNumber")),
        patient_hash=short_hash("patient:" + patient_id, 64) if patient_id else "",
        header=header,
    )


def _classify_without_preamble(path: Path) -> SkippedFile:
    """A file lacking 'DICM': either a raw DICOM dataset (readable only with force=True) or not DICOM."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        sop_class = str(ds.get("SOPClassUID", "") or "")
    except Exception:  # force=True on arbitrary bytes fails in arbitrary ways
        return SkippedFile(path, NOT_DICOM)
    # force=True "parses" almost any bytes; only a real SOP class UID shows it is a DICOM dataset
    if sop_class.startswith("1.2.840.10008."):
        return SkippedFile(path, f"{sop_class_name(sop_class)}: no DICOM preamble/file meta")
    return SkippedFile(path, NOT_DICOM)


# --------------------------------------------------------------------------- grouping


def _rounded(values: Optional[Sequence[float]], ndigits: int) -> Tuple[float, ...]:
    # + 0.0 turns -0.0 into 0.0 so that both round to the same key
    return () if values is None else tuple(round(v, ndigits) + 0.0 for v in values)


def _study_key(inst: Instance) -> str:
    if inst.study_uid:
        return "uid:" + inst.study_uid
    return "fallback:" + repr((inst.patient_hash, inst.study_fallback, str(inst.folder.parent)))


def _series_key(inst: Instance, orientation: bool = True) -> str:
    """Rule 3's key; ``orientation=False`` leaves the orientation out of the fallback key (see
    :func:`_group_by_series_key`)."""
    if inst.series_uid:
        return "uid:" + inst.series_uid
    return "fallback:" + repr((
        inst.series_number, inst.series_description, inst.image_type,
        *((_rounded(inst.orientation, 2),) if orientation else ()), _rounded(inst.pixel_spacing, 3),
        inst.rows, inst.columns, inst.acquisition_key, str(inst.folder),
    ))


def _group_by_series_key(files: Sequence[Instance]) -> Dict[str, List[Instance]]:
    """Rule 3. A file without SeriesInstanceUID and without a usable orientation would get a fallback key of
    its own (the orientation is part of it) and so leave a shorter stack behind: it joins the largest group
    that agrees with it on every other field of the key (rule 4 then keeps it with that group, and the volume
    builder refuses it by name)."""
    by_key: Dict[str, List[Instance]] = defaultdict(list)
    unplaced = []
    for inst in files:
        if inst.series_uid or inst.has_orientation:
            by_key[_series_key(inst)].append(inst)
        else:
            unplaced.append(inst)
    for inst in unplaced:
        partial = _series_key(inst, orientation=False)
        matches = [k for k, members in by_key.items()
                   if not members[0].series_uid and _series_key(members[0], orientation=False) == partial]
        key = max(matches, key=lambda k: (len(by_key[k]), k)) if matches else _series_key(inst)
        by_key[key].append(inst)
    return by_key


def _position_key(inst: Instance) -> Tuple[float, ...]:
    return _rounded(inst.position, 2) if inst.position and all(map(math.isfinite, inst.position)) else ()


def _copy_tags(instances: Sequence[Instance]) -> List[str]:
    """Per instance, which stored copy of the study it belongs to ('' when stored once); see rule 2.

    An instance is "the same" in two folders when SOPInstanceUID *and* position agree (anonymisers that
    reuse one UID for every file would otherwise make every folder a copy)."""
    folders_of = defaultdict(set)
    for inst in instances:
        if inst.sop_instance_uid:
            folders_of[(inst.sop_instance_uid, _position_key(inst))].add(inst.folder)
    dup_folders = sorted({f for fs in folders_of.values() if len(fs) > 1 for f in fs})
    if not dup_folders:
        return [""] * len(instances)
    common = Path(os.path.commonpath([str(f) for f in dup_folders]))
    tags = []
    for inst in instances:
        try:
            rel = inst.folder.relative_to(common)
        except ValueError:  # outside the copies' common folder: a copy of its own
            rel = inst.folder
        tags.append(rel.parts[0] if rel.parts else ".")
    return tags


def _orientation_buckets(files: List[Instance]) -> Dict[Tuple, List[Instance]]:
    """Rule 4: split one series' files by (localizer, orientation); files without a usable orientation
    join the largest group (of their localizer kind when there is one), so that the volume builder names them."""
    buckets: Dict[Tuple, List[Instance]] = defaultdict(list)
    unplaced = []
    for inst in files:
        if inst.has_orientation:
            buckets[(inst.is_localizer, _rounded(inst.orientation, 2))].append(inst)
        else:
            unplaced.append(inst)
    for inst in unplaced:
        same_kind = [k for k in buckets if k[0] == inst.is_localizer] or list(buckets)
        key = max(same_kind, key=lambda k: (len(buckets[k]), repr(k))) if same_kind else (inst.is_localizer, ())
        buckets[key].append(inst)
    return buckets


def _stray_neighbours(series: Sequence[Series]) -> Dict[int, int]:
    """Rule 6: for each series grouped without SeriesInstanceUID, how many files of its folder(s) that went to
    *other* series (or another study) lie inside its slice range or within one slice interval of its ends.

    Without UIDs a series is a guess from header values, and one changed value (a KVP, a PatientID, a damaged
    PixelSpacing) puts a slice in a group of its own; the rest may still be a regular stack (two slices always
    are), so no geometry check can see the hole. Positions are measured along this series' normal ``n``
    (``d = IPP . n``, tolerance 0.01 mm); localizers and files lying in a plane more than 45 degrees off
    ``n`` belong to other stacks and are not counted; a file whose orientation is no plane is counted.
    Returns ``{id(series): count}`` for the series with a count > 0."""
    with np.errstate(all="ignore"):  # positions up to 1e5 mm pass the volume's check, damaged ones need not
        return _count_strays(series)


def _count_strays(series: Sequence[Series]) -> Dict[int, int]:
    by_folder: Dict[Path, List[Tuple[int, Instance]]] = defaultdict(list)
    for s in series:
        for inst in s.instances:
            by_folder[inst.folder].append((id(s), inst))
    counts: Dict[int, int] = {}
    for s in series:
        n = iop_normal(s.first.orientation)
        positions = [float(np.dot(inst.position, n)) for inst in s.instances
                     if n is not None and inst.position is not None and len(inst.position) == 3
                     and all(map(math.isfinite, inst.position))]
        if s.first.series_uid or not positions:
            continue
        d = np.sort(positions)
        step = median(np.diff(d)) if len(d) > 1 else 0.0
        low, high = d[0] - step - 0.01, d[-1] + step + 0.01
        count = 0
        for folder in sorted({inst.folder for inst in s.instances}):
            for owner, inst in by_folder[folder]:
                if owner == id(s) or inst.is_localizer or inst.position is None or len(inst.position) != 3 \
                        or not all(map(math.isfinite, inst.position)):
                    continue
                other = _plane_normal(inst.orientation)
                if other is not None and abs(float(np.dot(other, n))) < math.cos(math.radians(45)):
                    continue
                count += low <= float(np.dot(inst.position, n)) <= high
        if count:
            counts[id(s)] = count
    return counts


def _plane_normal(iop: Optional[Sequence[float]]) -> Optional[np.ndarray]:
    """The slice normal of ``iop`` when it describes a plane (two orthogonal unit vectors), else None."""
    try:
        row, col = check_orientation(iop if iop is not None else ())
    except ValueError:
        return None
    return slice_normal(row, col)


def group_series(instances: Sequence[Instance], secret: Optional[bytes] = None) -> List[Series]:
    """Group image objects into series following the rules in the module docstring.

    Study and series hashes are :func:`pancls.privacy.keyed_id` under ``secret`` (default: this process's
    :func:`~pancls.privacy.session_secret`)."""
    secret = session_secret() if secret is None else secret
    by_study = defaultdict(list)
    for inst in instances:
        by_study[_study_key(inst)].append(inst)
    series: List[Series] = []
    for study_key, members in by_study.items():
        tagged = defaultdict(list)
        for inst, tag in zip(members, _copy_tags(members), strict=True):
            tagged[tag].append(inst)
        for tag, copy_members in tagged.items():
            study_id = study_key + (f"|copy:{tag}" if tag else "")
            by_key = _group_by_series_key(copy_members)
            for key, files in by_key.items():
                buckets = _orientation_buckets(files)
                orientations = sum(1 for loc, _ in buckets if not loc)
                for sub, sub_files in buckets.items():
                    # the sub-series key enters the hash only when a series really was split
                    series_id = study_id + "|" + key + (f"|{sub}" if len(buckets) > 1 else "")
                    notes = []
                    if orientations > 1 and not sub[0]:
                        notes.append(f"the series holds {orientations} slice orientations; converted separately "
                                     f"(this part: {len(sub_files)} of {len(files)} files)")
                    series.append(_make_series(study_id, series_id, sub_files, secret, notes))
    strays = _stray_neighbours(series)
    for s in series:
        if id(s) in strays:
            s.notes.append(f"grouped without SeriesInstanceUID: {strays[id(s)]} file(s) of this folder that went to "
                           "other series lie inside this stack's slice range or next to its ends, so slices may be "
                           "missing (they differ in a header value that groups series: SeriesNumber, description, "
                           "ImageType, geometry, KVP, kernel, acquisition number, frame of reference or study)")
    series.sort(key=lambda s: (s.study_hash, s.first.series_number or 0, s.series_hash))
    return series


def _make_series(study_id: str, series_id: str, files: List[Instance], secret: bytes,
                 notes: Optional[List[str]] = None) -> Series:
    """Rule 5: drop duplicates (same SOPInstanceUID and position), keep same-UID files at other positions."""
    files = sorted(files, key=lambda i: str(i.path))
    kept, seen, duplicates = [], set(), 0
    positions_of_uid: Dict[str, set] = defaultdict(set)
    for inst in files:
        key = (inst.sop_instance_uid, _position_key(inst), inst.n_frames)
        if inst.sop_instance_uid and key in seen:
            duplicates += 1
            continue
        seen.add(key)
        positions_of_uid[inst.sop_instance_uid].add(key)
        kept.append(inst)
    notes = list(notes or [])
    if duplicates:
        notes.append(f"{duplicates} duplicate file(s) (same SOP Instance UID and position) ignored")
    shared = sum(len(v) for uid, v in positions_of_uid.items() if uid and len(v) > 1)
    if shared:
        notes.append(f"{shared} files share a SOP Instance UID but lie at different positions: kept as distinct slices")
    patient = kept[0].patient_hash
    study_hash = keyed_id(secret, "study", study_id, 10)
    return Series(
        study_hash=study_hash,
        series_hash=keyed_id(secret, "series", series_id, 10),
        patient_key=patient or "study:" + study_id,
        instances=kept,
        notes=notes,
    )


# --------------------------------------------------------------------------- entry point


def scan(sources: Sequence[Path], workers: Optional[int] = None, tmp_dir: Optional[Path] = None,
         progress: bool = True, secret: Optional[bytes] = None) -> ScanResult:
    """Walk ``sources``, read every file's header, and group images into series.

    ``workers`` threads read headers (default :func:`default_workers`: none for a few files); ``secret``
    keys the study/series hashes (see :func:`group_series`).
    """
    files, nifti, origin, bad_archives = [], [], {}, []
    for path, root, problem in iter_files(sources, tmp_dir):
        origin[path] = root
        if problem:
            bad_archives.append(SkippedFile(path, problem, problem=True))
            continue
        (nifti if _is_nifti(path) else files).append(path)
    if progress:
        with tqdm(total=len(files), desc="headers", unit="file", disable=None, leave=False) as bar:
            results = parallel_map(lambda path: (read_header(path), bar.update())[0], files, workers)
    else:  # not even a disabled bar: its first creation sets up a multiprocessing lock (~3 ms)
        results = parallel_map(read_header, files, workers)
    instances = [r for r in results if isinstance(r, Instance)]
    dicom_folders = {i.folder for i in instances}
    skipped = bad_archives + [_cut_short(r) if r.reason == NOT_DICOM and r.path.parent in dicom_folders else r
                              for r in results if isinstance(r, SkippedFile)]
    return ScanResult(series=group_series(instances, secret), skipped=skipped, nifti=nifti, origin=origin,
                      archives=bad_archives)
