"""Volume files in and out: load a CT volume from NIfTI (nibabel) or NRRD/MetaImage (SimpleITK,
:func:`load_image`) into the same :class:`~pancls.ct.volume.Volume` as the DICOM path, and the one way pancls
writes a NIfTI file (:func:`save_nifti`).

The affine is nibabel's choice (sform if its code is set, else qform). A file with neither code set has no
world orientation and is refused, as are NaN/inf voxels, non-3D data (a trailing singleton 4th dimension
is dropped) and a singular affine. Voxel values (after ``scl_slope``/``scl_inter``) are rounded to int16
HU; non-integral values get the flag ``"rounded"`` and values beyond int16 are refused.
"""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from pancls.ct.volume import INT16_MAX, INT16_MIN, Volume
from pancls.errors import UserError, exception_text
from pancls.io import atomic_save

#: qform/sform code of every NIfTI pancls writes: 1, scanner anatomical coordinates
NIFTI_SCANNER_CODE = 1


def load_nifti(path: str | os.PathLike) -> Volume:
    """Read a 3D NIfTI CT image as int16 HU with its RAS affine; :class:`UserError` for anything unusable."""
    path = Path(path)
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise UserError("file not found", path) from None
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad or truncated file
        raise UserError(f"cannot read NIfTI: {exception_text(exc, path)}", path) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UserError(f"not a NIfTI image ({type(img).__name__})", path)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise UserError(f"expected a 3D volume, got shape {tuple(img.shape)}", path)
    sform_code, qform_code = orientation_codes(img, path)
    affine = _checked_affine(img.affine, path)
    try:
        data = np.asarray(img.dataobj, dtype=np.float64).reshape(shape)
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt gzip streams surface here
        raise UserError(f"cannot read voxel data: {exception_text(exc, path)}", path) from None
    return _hu_volume(data, affine, path, {"source": "nifti", "sform_code": sform_code, "qform_code": qform_code})


def orientation_codes(img, path: Path) -> tuple[int, int]:
    """``(sform_code, qform_code)`` of a NIfTI image; :class:`UserError` when both are 0 (nibabel then makes up
    an affine from the voxel sizes alone: the orientation is unknown, not RAS)."""
    sform_code, qform_code = int(img.header["sform_code"]), int(img.header["qform_code"])
    if sform_code == 0 and qform_code == 0:
        raise UserError("neither sform nor qform is set: the voxel-to-world orientation is unknown", path)
    return sform_code, qform_code


def load_image(path: str | os.PathLike) -> Volume:
    """A CT volume from NIfTI (:func:`load_nifti`) or NRRD/MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``:
    SimpleITK, :mod:`pancls.ct.itk`, its LPS geometry turned exactly into the RAS affine), with the same checks:
    a finite, invertible affine, finite voxels rounded to int16 HU (flag ``"rounded"`` when they were not
    integers), values beyond int16 refused."""
    from pancls.ct.itk import is_itk, read_itk

    path = Path(path)
    if not is_itk(path):
        return load_nifti(path)
    if not path.is_file():
        raise UserError("file not found", path)
    data, affine = read_itk(path)
    return _hu_volume(np.asarray(data, dtype=np.float64), _checked_affine(affine, path), path, {"source": "itk"})


def _checked_affine(affine: np.ndarray, path: Path) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise UserError(f"the affine is not invertible: {np.round(affine, 4).tolist()}", path)
    return affine


def _hu_volume(data: np.ndarray, affine: np.ndarray, path: Path, meta: dict) -> Volume:
    """``data`` (float64, voxel order of ``affine``) as an int16 HU :class:`Volume`: NaN/inf and values beyond
    int16 refused, non-integers rounded and flagged."""
    if not np.all(np.isfinite(data)):
        raise UserError(f"{int(np.sum(~np.isfinite(data)))} voxel(s) are NaN or infinite", path)
    rounded = np.rint(data)
    if rounded.min() < INT16_MIN or rounded.max() > INT16_MAX:
        raise UserError(f"values {data.min():g}..{data.max():g} do not fit int16 HU", path)
    flags = ["rounded"] if np.any(np.abs(rounded - data) > 1e-3) else []
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    meta = {"source": meta.pop("source"), "shape": list(data.shape),
            "spacing_mm": [round(float(s), 6) for s in spacing], "axcodes": list(nib.aff2axcodes(affine)), **meta}
    return Volume(array=rounded.astype(np.int16), affine=affine, spacing=spacing, flags=flags, meta=meta)


def _has_shear(affine: np.ndarray, tolerance: float = 1e-6) -> bool:
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.max(np.abs(axes.T @ axes - np.eye(3))) > tolerance)


def nifti1_image(array: np.ndarray, affine: np.ndarray, where: str | os.PathLike = "volume") -> nib.Nifti1Image:
    """``array`` (its own dtype) as NIfTI-1 with pancls' header conventions: qform = sform = ``affine`` (code
    :data:`NIFTI_SCANNER_CODE`), units mm, no scaling (``scl_slope`` 1, ``scl_inter`` 0: the stored values are
    the values), and empty text fields (``descrip``, ``aux_file``, ``intent_name``, ``db_name``: no header text
    from anywhere). A sheared affine is refused naming ``where``: a qform stores rotations and zooms only."""
    if _has_shear(affine):
        raise UserError("the volume's affine has shear, which a NIfTI qform cannot store; resample it first", where)
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.set_qform(affine, code=NIFTI_SCANNER_CODE)
    img.set_sform(affine, code=NIFTI_SCANNER_CODE)
    img.header.set_xyzt_units(xyz="mm")
    img.header.set_slope_inter(1.0, 0.0)
    for text_field in ("descrip", "aux_file", "intent_name", "db_name"):
        img.header[text_field] = b""
    return img


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` with ``affine`` to ``path`` (``.nii`` / ``.nii.gz``) as :func:`nifti1_image` makes it,
    atomically (the file appears complete or not at all, :func:`pancls.io.atomic_save`)."""
    img = nifti1_image(array, affine, path)
    atomic_save(path, lambda tmp: nib.save(img, tmp))
