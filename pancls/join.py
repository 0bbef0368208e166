"""The join of ``pancls ingest``: the hospital's label sheet and masks matched to the ingested studies.

Everything here runs inside the ingest process on the studies' real identifiers (:class:`SourceIds`, read
from the DICOM headers in memory); what leaves it are labels, mask files on the volume's grid, sheet line
numbers and the keyed ids. The identifiers themselves reach one file only: the private key file
``OUT/.private/keys.csv`` (:data:`KEY_COLUMNS`), for authorised re-identification.

Label sheet (``--labels FILE``, CSV, ``,``/``;``/tab separated, UTF-8): a key column named like
``--label-key`` (case, spaces and underscores ignored: ``PatientID``, ``patient_id``, ``Patient ID``), a
``label`` column and optionally a ``mask`` column (a mask file per row, relative to ``--masks`` or, without
it, to the sheet's folder). Keys:

* ``PatientID``, ``AccessionNumber``, ``StudyInstanceUID``: the DICOM element of the series' first file,
  compared exactly after stripping spaces (a NIfTI input has none of them);
* ``folder``: a folder (or a NIfTI file name without its suffix) on the path of the input, written with
  ``/`` between parts: ``case7`` matches ``export/case7/CT/1/*.dcm`` and ``export/case7.nii.gz``, and
  ``case7/CT`` only the former. Paths count from the folder that holds the source argument, so the
  source's own name matches too. The most specific (longest) match wins.

Every problem in the sheet (unknown or empty label, empty key, one key with two labels, a missing column)
is reported at once before anything is converted, as for a manifest. A row that matches no study, and a
study without a row, are counted in the summary and listed in ``.private/inventory.csv`` by sheet line / keyed id.

Masks (``--masks DIR``): NIfTI, NRRD/MetaImage and DICOM SEG files anywhere under DIR. A SEG is matched to
the series it references (ReferencedSeriesSequence), else to its study by the key; any other file by its
name without suffix being the study's key value (for ``folder``: one of its path parts, the deepest
wins) or by the sheet's ``mask`` column. A mask file that more than one study matches (a mask named by a
PatientID with two studies of that patient, a sheet row keyed by patient) is refused for each of them: name
masks after one study (StudyInstanceUID, AccessionNumber, its folder) or give DICOM SEGs.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from pancls.errors import UserError

# pancls.ct.mask and pancls.data.manifest (nibabel, pandas) are imported where used: the CLI imports this
# module for LABEL_KEYS when it builds its parser

LABEL_KEYS = ("PatientID", "AccessionNumber", "StudyInstanceUID", "folder")
#: the private key file: pseudonymous ids -> source identifiers (``OUT/.private/keys.csv``)
KEY_FILE = "keys.csv"
KEY_COLUMNS = ["image", "patient_id", "study_id", "series_id", "PatientID", "AccessionNumber",
               "StudyInstanceUID", "SeriesInstanceUID", "source", "folder"]


def _norm(name: str) -> str:
    return re.sub(r"[\s_]", "", name).lower()


@dataclass(frozen=True)
class SourceIds:
    """A study's source identifiers, in memory only (never written outside ``.private/keys.csv``).

    ``location``: the parts of the input's path from the folder holding the source argument (the last
    part of a NIfTI file without its suffix; a zip archive counts as a folder of that name)."""

    patient_id: str = ""
    accession: str = ""
    study_uid: str = ""
    series_uid: str = ""
    location: Tuple[str, ...] = ()
    source: str = ""  # the source argument, resolved
    folder: str = ""  # the series folder / NIfTI file, resolved (inside a zip: archive + member folder)

    def value(self, key: str) -> str:
        return {"PatientID": self.patient_id, "AccessionNumber": self.accession,
                "StudyInstanceUID": self.study_uid}.get(key, "")

    def key_row(self) -> Dict[str, str]:
        return {"PatientID": self.patient_id, "AccessionNumber": self.accession,
                "StudyInstanceUID": self.study_uid, "SeriesInstanceUID": self.series_uid,
                "source": self.source, "folder": self.folder}


def folder_parts(text: str) -> Tuple[str, ...]:
    return tuple(p for p in text.replace("\\", "/").split("/") if p and p != ".")


def _contains(location: Tuple[str, ...], parts: Tuple[str, ...]) -> bool:
    n = len(parts)
    return any(location[i:i + n] == parts for i in range(len(location) - n + 1))


@dataclass
class SheetRow:
    line: int
    key: str
    label: str
    mask: str = ""
    matched: bool = False


@dataclass
class LabelSheet:
    path: Path
    key: str
    rows: List[SheetRow]
    has_mask_column: bool
    _by_value: Dict[str, SheetRow] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def match(self, ids: SourceIds) -> Tuple[Optional[SheetRow], str]:
        """The sheet row of a study, or None and why (one line, without the identifier)."""
        if self.key != "folder":
            value = ids.value(self.key).strip()
            if not value:
                return None, f"it has no {self.key} (choose another --label-key)"
            row = self._by_value.get(value)
            return (row, "") if row else (None, f"no row of {self.name} has its {self.key}")
        candidates = [r for r in self.rows if _contains(ids.location, folder_parts(r.key))]
        if not candidates:
            return None, f"no row of {self.name} names a folder on its path"
        longest = max(len(folder_parts(r.key)) for r in candidates)
        best = [r for r in candidates if len(folder_parts(r.key)) == longest]
        if len({r.label for r in best}) > 1:
            return None, (f"rows {', '.join(str(r.line) for r in best)} of {self.name} name folders on its path "
                          "with different labels")
        return best[0], ""

    def unmatched(self) -> List[SheetRow]:
        return [r for r in self.rows if not r.matched]


def _delimiter(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            first = fh.readline()
    except OSError:
        return ","  # read_csv_rows reports it
    counts = {d: first.count(d) for d in (",", ";", "\t")}
    return max(counts, key=counts.get) if any(counts.values()) else ","


def _cell(values: Sequence[str], index: Dict[str, int], name: str) -> str:
    """The stripped cell of column ``name`` in one sheet row ("" when the column or the cell is absent)."""
    i = index.get(name)
    return values[i].strip() if i is not None and i < len(values) else ""


def read_label_sheet(path: str | os.PathLike, key: str, classes: Sequence[str]) -> LabelSheet:
    """Read and check the whole sheet; every problem at once as a :class:`ManifestError` (CSV line numbers)."""
    from pancls.data.manifest import ManifestError, label_problem, read_csv_rows

    path = Path(path)
    if key not in LABEL_KEYS:
        raise UserError(f"unknown label key {key!r}; expected one of {', '.join(LABEL_KEYS)}", "--label-key")
    header, rows = read_csv_rows(path, "label sheet", _delimiter(path))
    columns = [_norm(c) for c in header]
    wanted = {"key": _norm(key), "label": "label", "mask": "mask"}
    if key == "AccessionNumber":
        aliases = {"accessionnumber", "accession", "accessionno"}
    else:
        aliases = {wanted["key"]}
    index = {}
    for i, c in enumerate(columns):
        if c in aliases and "key" not in index:
            index["key"] = i
        elif c == "label" and "label" not in index:
            index["label"] = i
        elif c == "mask" and "mask" not in index:
            index["mask"] = i
    missing = [n for n, k in (("key", key), ("label", "label")) if n not in index]
    if missing:
        names = [key if n == "key" else "label" for n in missing]
        raise ManifestError(path, [(1, f"missing column(s): {', '.join(names)} (found: {', '.join(header)})")],
                            "the label sheet")
    problems: List[Tuple[int, str]] = []
    out: List[SheetRow] = []
    by_value: Dict[str, SheetRow] = {}
    for line, values in rows:
        row = SheetRow(line, *(_cell(values, index, name) for name in ("key", "label", "mask")))
        found = []
        if not row.key:
            found.append(f"empty {key}")
        problem = label_problem(row.label, classes)
        if problem:
            found.append(problem)
        previous = by_value.get(row.key if key != "folder" else "/".join(folder_parts(row.key)))
        if row.key and previous is not None and previous.label != row.label and not problem:
            found.append(f"same {key} as line {previous.line} but a different label ({row.label} here, "
                         f"{previous.label} there)")
        problems += [(line, p) for p in found]
        if not found:
            by_value.setdefault(row.key if key != "folder" else "/".join(folder_parts(row.key)), row)
            out.append(row)
    if not rows:
        problems.append((1, "the label sheet has no data rows"))
    if problems:
        raise ManifestError(path, problems, "the label sheet")
    sheet = LabelSheet(path, key, out, "mask" in index)
    sheet._by_value = by_value if key != "folder" else {}
    return sheet


class MaskFinder:
    """The mask files under ``--masks DIR``, found once: by name (without suffix) and, for DICOM SEG, by the
    series and study they reference (header only; the SEG is read in full when it is used)."""

    def __init__(self, folder: Optional[Path], sheet: Optional[LabelSheet]):
        from pancls.ct.mask import MASK_SUFFIXES, is_seg_file, mask_stem

        self.folder = folder
        self.sheet_dir = sheet.path.parent if sheet is not None else None
        self.by_stem: Dict[str, List[Path]] = {}
        self.seg_by_series: Dict[str, List[Path]] = {}
        self.seg_by_value: Dict[Tuple[str, str], List[Path]] = {}
        self.shared: Dict[Path, int] = {}  # mask files (resolved) that several studies match -> how many (claim)
        if folder is None:
            return
        if not folder.is_dir():
            raise UserError("not a folder", "--masks")
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            if path.name.lower().endswith(MASK_SUFFIXES):
                self.by_stem.setdefault(mask_stem(path), []).append(path)
            elif is_seg_file(path):
                self._index_seg(path)

    def _index_seg(self, path: Path) -> None:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for ref in ds.get("ReferencedSeriesSequence", []):
            uid = str(ref.get("SeriesInstanceUID", "") or "")
            if uid:
                self.seg_by_series.setdefault(uid, []).append(path)
        for key in ("PatientID", "AccessionNumber", "StudyInstanceUID"):
            value = str(ds.get(key, "") or "").strip()
            if value:
                self.seg_by_value.setdefault((key, value), []).append(path)

    def claim(self, studies: Iterable[Tuple[str, SourceIds, Optional[SheetRow]]], key: str) -> None:
        """Find the mask of every study of the run (``(study id, ids, sheet row)``) before any is used, so that
        :meth:`find` refuses a mask file that more than one study matches -- for each of them: a mask is drawn on
        one scan, and a patient's other studies (a PatientID-named mask, a sheet row keyed by patient) have
        other voxel grids, where it would mark the wrong voxels or fall partly outside the image."""
        claims: Dict[Path, set] = {}
        for study, ids, row in studies:
            path, _ = self._find(ids, key, row)
            if path is not None:
                claims.setdefault(path.resolve(), set()).add(study)
        self.shared = {path: len(found) for path, found in claims.items() if len(found) > 1}

    def find(self, ids: SourceIds, key: str, row: Optional[SheetRow]) -> Tuple[Optional[Path], str]:
        """The mask of a study, or None and why (empty when no mask was looked for or none exists); a mask that
        several studies match (see :meth:`claim`) is refused, with how to name masks so that each matches one."""
        path, why = self._find(ids, key, row)
        shared = self.shared.get(path.resolve(), 0) if path is not None else 0
        if shared > 1:
            by = (f"line {row.line} of the label sheet names it, and that row matches {shared} studies"
                  if row is not None and row.mask else f"it matches {shared} studies by {key}")
            return None, (f"mask {path.name} is ambiguous: {by}, and a mask is drawn on one study; key each mask to "
                          "one study: name it after the study's StudyInstanceUID or AccessionNumber (with --label-key "
                          "of that name) or its own folder (--label-key folder), or give a DICOM SEG (matched by the "
                          "series it references)")
        return path, why

    def _find(self, ids: SourceIds, key: str, row: Optional[SheetRow]) -> Tuple[Optional[Path], str]:
        if row is not None and row.mask:
            base = self.folder or self.sheet_dir
            path = Path(row.mask) if Path(row.mask).is_absolute() else base / row.mask
            if not path.is_file():
                return None, f"the mask of {self._sheet_name()} line {row.line} is not a file: {row.mask}"
            return path, ""
        if self.folder is None:
            return None, ""
        found: List[Path] = []
        if ids.series_uid:
            found = self.seg_by_series.get(ids.series_uid, [])
        if not found and key != "folder" and ids.value(key):
            found = self.seg_by_value.get((key, ids.value(key).strip()), []) or self.by_stem.get(ids.value(key).strip(), [])
        if not found and key == "folder":
            for part in reversed(ids.location):  # the deepest folder first
                found = self.by_stem.get(part, [])
                if found:
                    break
        if len(found) > 1:
            return None, f"{len(found)} mask files under --masks match this study; keep one"
        return (found[0], "") if found else (None, "")

    def _sheet_name(self) -> str:
        return "the label sheet"


def relative_location(path: Path, source: Path, unpacked: Path) -> Tuple[str, ...]:
    """:attr:`SourceIds.location` of ``path`` (a series folder or a NIfTI file) found under ``source``.

    A file unpacked from a zip archive (under ``unpacked/<hash>/``) is placed under the source's name (the
    archive's name without ``.zip`` when the source is the archive)."""
    from pancls.ct.mask import mask_stem

    source = source.resolve()
    try:
        member = path.relative_to(unpacked)
    except ValueError:
        try:
            parts = path.resolve().relative_to(source.parent).parts
        except ValueError:
            parts = (path.name,)
    else:
        name = source.name[: -len(".zip")] if source.name.lower().endswith(".zip") else source.name
        parts = (name, *member.parts[1:])
    parts = tuple(p for p in parts if p)
    return (*parts[:-1], mask_stem(Path(parts[-1]))) if parts else ()


def read_key_file(path: Path, images: Iterable[str]) -> Dict[str, Dict[str, str]]:
    """Rows of an earlier key file whose image is still in the dataset (``images``)."""
    keep = set(images)
    if not path.exists():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return {r["image"]: r for r in csv.DictReader(fh) if r.get("image") in keep}
    except (OSError, UnicodeDecodeError, csv.Error, KeyError):
        return {}
