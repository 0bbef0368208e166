"""Load a CT volume from NIfTI (nibabel) into the same :class:`~pancls.ct.volume.Volume` as the DICOM path.

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
from pancls.errors import UserError


def load_nifti(path: str | os.PathLike) -> Volume:
    """Read a 3D NIfTI CT image as int16 HU with its RAS affine; :class:`UserError` for anything unusable."""
    path = Path(path)
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise UserError("file not found", path) from None
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad or truncated file
        raise UserError(f"cannot read NIfTI: {type(exc).__name__}: {exc}", path) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UserError(f"not a NIfTI image ({type(img).__name__})", path)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise UserError(f"expected a 3D volume, got shape {tuple(img.shape)}", path)
    header = img.header
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    if sform_code == 0 and qform_code == 0:
        raise UserError("neither sform nor qform is set: the voxel-to-world orientation is unknown", path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise UserError(f"the affine is not invertible: {np.round(affine, 4).tolist()}", path)
    try:
        data = np.asarray(img.dataobj, dtype=np.float64).reshape(shape)
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt gzip streams surface here
        raise UserError(f"cannot read voxel data: {type(exc).__name__}: {exc}", path) from None
    if not np.all(np.isfinite(data)):
        raise UserError(f"{int(np.sum(~np.isfinite(data)))} voxel(s) are NaN or infinite", path)
    rounded = np.rint(data)
    if rounded.min() < INT16_MIN or rounded.max() > INT16_MAX:
        raise UserError(f"values {data.min():g}..{data.max():g} do not fit int16 HU", path)
    flags = ["rounded"] if np.any(np.abs(rounded - data) > 1e-3) else []
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    meta = {
        "source": "nifti",
        "shape": list(shape),
        "spacing_mm": [round(float(s), 6) for s in spacing],
        "axcodes": list(nib.aff2axcodes(affine)),
        "sform_code": sform_code,
        "qform_code": qform_code,
    }
    return Volume(array=rounded.astype(np.int16), affine=affine, spacing=spacing, flags=flags, meta=meta)
