"""The dataset manifest: one CSV row per CT volume, validated as a whole before anything trains on it.

Schema (documented with an example in ``data_manifests/README.md``)::

    patient_id, image, label          required
    mask, study_id, fold              optional (``fold``: a predefined split, integer >= 0)
    anything else                     kept as text and passed on in :meth:`Manifest.records`

``image`` and ``mask`` are paths relative to the manifest's folder. They must stay inside the dataset
root (by default that same folder; ``root=`` widens or moves it), so a manifest can be moved together with
its data and can never point at unrelated files. Absolute paths are refused unless ``allow_absolute=True``,
and even then must lie inside the root. Two checks: the path as written (``..`` resolved) must lie in the
root, and so must the file it really is (symbolic links followed: a link inside the root pointing at
``/etc/passwd`` is refused). A dataset folder made of links into a shared store names that store in
``allowed_roots``: the real file may then lie in the root or in one of those folders.

Validation collects *every* problem with its CSV line (line 1 = header, line 2 = first data row) and raises
one :class:`ManifestError` listing them all, so a 530-row manifest is fixed in one round trip. Images are
checked from their headers only (nibabel for NIfTI, SimpleITK for NRRD/MetaImage; no voxel data is loaded),
which keeps validation fast; a volume whose voxel data is truncated is therefore only caught when it is
preprocessed.
"""
from __future__ import annotations

import csv
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import pandas as pd

from pancls.data.classes import check_classes
from pancls.errors import UserError, exception_text, one_line

REQUIRED_COLUMNS = ("patient_id", "image", "label")
#: Image and mask must share the voxel grid; affines may differ by float noise from a NIfTI round trip.
AFFINE_ATOL_MM = 1e-3

_FOLD = re.compile(r"^[0-9]+$")
# What nibabel raises for a file that is not a readable NIfTI/Analyze/MGH header.
_READ_ERRORS = (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, OSError, EOFError,
                ValueError, zlib.error)


class ManifestError(UserError):
    """Every problem found in a manifest (or another CSV table, named by ``what``: the ingest label sheet);
    ``problems`` holds ``(line, message)`` pairs in line order.

    The message lists them one per line (each problem itself is one line)."""

    multiline = True

    def __init__(self, path: str | os.PathLike, problems: Sequence[Tuple[int, str]], what: str = "the manifest"):
        self.problems = sorted(problems, key=lambda p: p[0])
        shown = os.fspath(path)
        lines = "\n".join(f"{one_line(shown)}:{line}: {one_line(message)}" for line, message in self.problems)
        n = len(self.problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in {what}:\n{lines}", shown)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest.

    ``table`` has one row per volume, indexed by the CSV line number, with the CSV's columns in their
    order; ``image``/``mask`` hold absolute paths (``mask`` is missing where a row has none), ``fold`` is an
    integer column, and every other value is the stripped text from the file.
    """

    path: Path
    root: Path
    classes: Tuple[str, ...]
    table: pd.DataFrame

    def __len__(self) -> int:
        return len(self.table)

    def records(self) -> List[Dict[str, Any]]:
        """One dict per row for MONAI datasets: ``label`` is the class index; ``mask`` only where present."""
        index = {name: i for i, name in enumerate(self.classes)}
        out = []
        for row in self.table.to_dict("records"):
            if "mask" in row and not isinstance(row["mask"], str):  # None/NaN: this row has no mask
                del row["mask"]
            row["label"] = index[row["label"]]
            if "fold" in row:
                row["fold"] = int(row["fold"])
            out.append(row)
        return out

    def class_counts(self) -> Dict[str, int]:
        """Number of volumes per class, in class order, zero included."""
        counts = self.table["label"].value_counts()
        return {name: int(counts.get(name, 0)) for name in self.classes}

    def patient_counts(self) -> Dict[str, int]:
        """Number of patients per class, in class order, zero included (a patient has one label: the manifest
        check refuses two)."""
        counts = self.table.drop_duplicates("patient_id")["label"].value_counts()
        return {name: int(counts.get(name, 0)) for name in self.classes}

    def patients(self) -> List[str]:
        """Patient ids in order of first appearance (folds must split by patient, not by volume)."""
        return list(dict.fromkeys(self.table["patient_id"]))


def load_manifest(
    path: str | os.PathLike,
    classes: Sequence[str],
    root: str | os.PathLike | None = None,
    check_images: bool = True,
    allow_absolute: bool = False,
    allowed_roots: Sequence[str | os.PathLike] = (),
) -> Manifest:
    """Read and validate a manifest CSV.

    Parameters
    ----------
    path : manifest CSV (UTF-8, a BOM is accepted).
    classes : class names in index order; a label must be one of them.
    root : folder no image or mask may leave; defaults to the manifest's folder.
    check_images : also check that the files exist, have readable 3D headers, and that each mask has its
        image's shape and affine (within :data:`AFFINE_ATOL_MM`). ``False`` checks the table alone, e.g. to
        plan folds on a machine without the images.
    allow_absolute : accept absolute paths (still confined to ``root``).
    allowed_roots : folders (besides ``root``) where the real files behind symbolic links may lie, e.g. the
        shared store a dataset of links points into. Compared after resolving links on both sides.

    Raises
    ------
    UserError
        The file cannot be read or ``root`` is not a folder.
    ManifestError
        Anything wrong in the table, all problems at once.
    """
    classes = check_classes(classes)
    path = Path(path)
    base = Path(os.path.abspath(path)).parent
    root_dir = Path(os.path.abspath(root)) if root is not None else base
    if not root_dir.is_dir():
        raise UserError("dataset root is not a folder", root_dir)
    real_roots = [Path(os.path.realpath(root_dir))]
    for extra in allowed_roots:
        if not Path(extra).is_dir():
            raise UserError("an allowed root is not a folder", extra)
        real_roots.append(Path(os.path.realpath(extra)))
    header, rows = read_csv_rows(path)

    problems: List[Tuple[int, str]] = []
    columns = _check_header(path, header, problems)
    consistency = _Consistency()
    table_rows: List[Dict[str, Any]] = []
    lines: List[int] = []
    for line, values in rows:
        if len(values) != len(columns):
            problems.append((line, f"expected {len(columns)} fields, found {len(values)}"))
            continue
        row: Dict[str, Any] = dict(zip(columns, (v.strip() for v in values), strict=True))
        found = _check_values(row, classes) + _check_paths(row, base, root_dir, real_roots, allow_absolute,
                                                           check_images)
        found += consistency.check(line, row)
        problems += [(line, p) for p in found]
        table_rows.append(row)
        lines.append(line)

    if not rows:
        problems.append((1, "the manifest has no data rows"))
    if problems:
        raise ManifestError(path, problems)
    table = pd.DataFrame(table_rows, columns=columns, index=pd.Index(lines, name="line"))
    if "fold" in table:
        table["fold"] = table["fold"].astype(int)
    return Manifest(path=path, root=root_dir, classes=classes, table=table)


def label_problem(label: str, classes: Sequence[str]) -> Optional[str]:
    """Why ``label`` is not one of ``classes`` (None when it is): the message names the allowed classes.
    The one label rule, for manifests and for the label sheet of ``pancls ingest --labels``."""
    if label in classes:
        return None
    what = f"unknown label {label!r}" if label else "empty label"
    return f"{what}; expected one of {', '.join(classes)}"


def _check_values(row: Dict[str, Any], classes: Tuple[str, ...]) -> List[str]:
    """Text fields; ``fold`` becomes an int, an invalid ``label``/``fold`` becomes None."""
    problems = []
    if "patient_id" in row and not row["patient_id"]:
        problems.append("empty patient_id")
    if "label" in row:
        problem = label_problem(row["label"], classes)
        if problem:
            problems.append(problem)
            row["label"] = None
    if "fold" in row:
        if _FOLD.match(row["fold"]):
            row["fold"] = int(row["fold"])
        else:
            problems.append(f"fold must be an integer >= 0, got {row['fold']!r}")
            row["fold"] = None
    return problems


def _check_paths(row: Dict[str, Any], base: Path, root: Path, real_roots: List[Path], allow_absolute: bool,
                 check_images: bool) -> List[str]:
    """Resolve ``image``/``mask`` to absolute paths (None if empty or unusable) and check the files: the
    written path must lie in ``root``, the real file (links followed) in one of ``real_roots``."""
    problems, usable = [], {}
    for key in ("image", "mask"):
        if key not in row:
            continue
        value, row[key] = row[key], None
        if not value:
            if key == "image":
                problems.append("empty image path")
            continue
        given = Path(value)
        resolved = Path(os.path.normpath(base / given))
        if given.is_absolute() and not allow_absolute:
            problems.append(f"{key} path {value!r} is absolute; write it relative to the manifest's folder")
        elif not resolved.is_relative_to(root):
            problems.append(f"{key} path {value!r} escapes the dataset root {root}")
        elif not any(Path(os.path.realpath(resolved)).is_relative_to(r) for r in real_roots):
            problems.append(f"{key} path {value!r} is a link to a file outside the dataset root; name the folder "
                            "it points into in allowed_roots if that is intended")
        else:
            row[key] = str(resolved)
            if not check_images:
                continue
            if resolved.is_file():
                usable[key] = resolved
            else:
                problems.append(f"{key} file not found: {value}")
    if usable:
        problems += _check_volumes(usable)
    return problems


class _Consistency:
    """Checks across rows: each image listed once, one label and one fold per patient."""

    def __init__(self):
        self.images: Dict[str, int] = {}
        self.patients: Dict[str, Tuple[int, Dict[str, Any]]] = {}

    def check(self, line: int, row: Dict[str, Any]) -> List[str]:
        problems = []
        image = row.get("image")
        if image:
            if image in self.images:
                problems.append(f"duplicate image, already listed on line {self.images[image]}")
            else:
                self.images[image] = line
        pid = row.get("patient_id")
        if not pid:
            return problems
        if pid not in self.patients:
            self.patients[pid] = (line, row)
            return problems
        # Name the other line, never the patient: manifests may carry hospital ids.
        other, first = self.patients[pid]
        for key, why in (("label", ""), ("fold", ": a patient must not span folds")):
            mine, theirs = row.get(key), first.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                problems.append(f"same patient_id as line {other} but a different {key} "
                                f"({mine} here, {theirs} there){why}")
        return problems


def read_csv_rows(path: Path, what: str = "manifest", delimiter: str = ","
                  ) -> Tuple[List[str], List[Tuple[int, List[str]]]]:
    """Header and ``(line, fields)`` rows of a UTF-8 CSV (a BOM is accepted); blank lines are skipped but
    still counted. ``what`` names the file in errors."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            rows = []
            while True:
                start = reader.line_num + 1  # a quoted field may span lines: report where the row starts
                try:
                    values = next(reader)
                except StopIteration:
                    break
                if any(v.strip() for v in values):
                    rows.append((start, values))
    except FileNotFoundError:
        raise UserError(f"{what} not found", path) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read the {what}: {exception_text(exc, path)}", path) from None
    if header is None:
        raise UserError(f"the {what} is empty (no header line)", path)
    return header, rows


def _check_header(path: Path, header: List[str], problems: List[Tuple[int, str]]) -> List[str]:
    """Column names; a missing required column is recorded and the rows are still checked for the rest."""
    columns = [c.strip() for c in header]
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated or not all(columns):
        # Rows cannot be mapped onto ambiguous or nameless columns: stop at the header.
        what = f"column(s) named twice: {', '.join(duplicated)}" if duplicated else "a column has an empty name"
        raise ManifestError(path, [(1, what)])
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        problems.append((1, f"missing required column(s): {', '.join(missing)} "
                            f"(required: {', '.join(REQUIRED_COLUMNS)}; found: {', '.join(columns)})"))
    return columns


def _grid_problem(image: Tuple[tuple, np.ndarray], mask: Tuple[tuple, np.ndarray]) -> Optional[str]:
    """Why a mask ``(shape, affine)`` is not on an image's voxel grid (None when it is)."""
    (shape, affine), (mshape, maffine) = image, mask
    if tuple(shape) != tuple(mshape):
        return f"mask shape {tuple(mshape)} differs from image shape {tuple(shape)}"
    off = float(np.abs(np.asarray(affine) - np.asarray(maffine)).max())
    if off > AFFINE_ATOL_MM:
        return f"mask affine differs from the image affine by up to {off:.4g} mm (tolerance {AFFINE_ATOL_MM} mm)"
    return None


def image_header(file) -> Tuple[tuple, np.ndarray]:
    """``(shape, RAS affine)`` of a volume file from its header only: NIfTI through nibabel (also a nibabel image
    in memory), NRRD/MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) through SimpleITK
    (:func:`pancls.ct.itk.itk_header`). A trailing singleton 4th dimension is dropped. Raises what the readers
    raise for an unreadable file (:data:`_READ_ERRORS`, or :class:`UserError` from the ITK path)."""
    from pancls.ct.itk import is_itk, itk_header

    if not isinstance(file, nib.spatialimages.SpatialImage) and is_itk(file):
        return itk_header(file)
    img = file if isinstance(file, nib.spatialimages.SpatialImage) else nib.load(file)
    shape = tuple(int(s) for s in img.shape)
    return shape[:3] if len(shape) == 4 and shape[3] == 1 else shape, np.asarray(img.affine, dtype=float)


def _unreadable(exc: Exception) -> str:
    return exc.reason if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"


def grid_mismatch(image, mask) -> Optional[str]:
    """Why ``mask`` is not on the voxel grid of ``image`` (paths of NIfTI/NRRD/MetaImage files, or nibabel images)
    (same shape, affine within :data:`AFFINE_ATOL_MM`), from their headers; None when it is. The check
    ``load_manifest`` applies to every row, for callers that meet the pair outside a manifest
    (``pancls predict --mask``)."""
    headers = []
    for file in (image, mask):
        try:
            headers.append(image_header(file))
        except (*_READ_ERRORS, UserError) as exc:
            return f"{file} is not a readable image ({_unreadable(exc)})"
    return _grid_problem(*headers)


def _check_volumes(files: Dict[str, Path]) -> List[str]:
    """Readable, 3D, the mask on the image's voxel grid, and a mask that marks something.

    Images are checked from their headers only; masks are small label maps and are read in full, since
    an empty mask would otherwise crop background silently (and a truncated one fail mid-training)."""
    from pancls.ct.mask import read_mask

    problems, headers = [], {}
    for key, file in files.items():
        try:
            shape, affine = image_header(file)
        except (*_READ_ERRORS, UserError) as exc:
            problems.append(f"{key} is not a readable image ({_unreadable(exc)})")
            continue
        if len(shape) != 3:
            problems.append(f"{key} must be a 3D volume, its shape is {shape}")
            continue
        headers[key] = (shape, affine)
    if "image" in headers and "mask" in headers:
        problem = _grid_problem(headers["image"], headers["mask"])
        if problem:
            problems.append(problem)
    if "mask" in headers:
        try:
            if not np.any(read_mask(files["mask"])[0]):
                problems.append("mask is empty (no non-zero voxel)")
        except UserError as exc:
            problems.append(f"mask voxel data cannot be used ({exc.reason})")
    return problems
