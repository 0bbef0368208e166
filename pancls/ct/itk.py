"""NRRD and MetaImage volumes (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) as 3D Slicer exports them, through SimpleITK.

ITK describes a voxel's centre in DICOM patient space (LPS, mm) from its index ``(x, y, z)``::

    LPS = origin + D . diag(spacing) . (x, y, z)

with ``D`` the 3x3 direction matrix (columns: the index axes' unit vectors). pancls works in NIfTI's RAS world
with voxel ``(i, j, k) = (x, y, z)`` (``sitk.GetArrayFromImage`` returns ``[z, y, x]``, transposed here), so
the affine is exactly::

    affine_RAS = diag(-1, -1, 1, 1) . [[D . diag(spacing), origin], [0, 0, 0, 1]]

-- sign flips only: no rounding enters (nibabel's and SimpleITK's own conversions do the same,
``nibabel.orientations`` and ITK's NiftiImageIO). Only headers are read by :func:`itk_header` (shape and affine
for validating a manifest); :func:`read_itk` reads the voxels too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import numpy as np

from pancls.ct.geometry import LPS_TO_RAS
from pancls.errors import UserError

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def is_itk(path: str | os.PathLike) -> bool:
    """True for a file name with one of :data:`ITK_SUFFIXES` (case-insensitive)."""
    return Path(path).name.lower().endswith(ITK_SUFFIXES)


def itk_affine(direction, spacing, origin) -> np.ndarray:
    """The RAS affine of voxel ``(i, j, k)`` for ITK geometry (see the module docstring)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing, dtype=np.float64)
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ lps


def _reader(path: Path):
    """A SimpleITK reader with the header of ``path`` read and checked: 3D, one component per voxel, spacing
    finite and > 0, a finite direction matrix with a non-zero determinant, a finite origin (ITK itself refuses
    some of these only when the voxels are read, with a multi-line message)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise UserError(f"cannot read the image: {_itk_message(exc)}", path) from None
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise UserError(f"expected a 3D scalar image, got {reader.GetDimension()}D with "
                        f"{reader.GetNumberOfComponents()} component(s) per voxel", path)
    spacing, direction, origin = reader.GetSpacing(), np.reshape(reader.GetDirection(), (3, 3)), reader.GetOrigin()
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise UserError(f"voxel spacing {list(spacing)} mm: every spacing must be a finite number > 0", path)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise UserError(f"the direction matrix {direction.tolist()} is singular or not finite: no voxel-to-world "
                        "orientation", path)
    if not all(np.isfinite(origin)):
        raise UserError(f"the origin {list(origin)} is not finite", path)
    return reader


def _itk_message(exc: Exception) -> str:
    """What an ITK exception says, without its source location and object address (``ITK ERROR: Image(0x..):``)."""
    text = str(exc)
    if "ITK ERROR:" in text:
        text = text.split("ITK ERROR:", 1)[1]
        text = text.split("): ", 1)[1] if "): " in text.split("\n", 1)[0] else text
    return text.strip() or type(exc).__name__


def itk_header(path: str | os.PathLike) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """``(shape (i, j, k), RAS affine)`` of an NRRD/MetaImage file from its header only; UserError when unreadable
    or not a 3D scalar image."""
    path = Path(path)
    reader = _reader(path)
    shape = tuple(int(s) for s in reader.GetSize())
    return shape, itk_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())


def read_itk(path: str | os.PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """``(data [i, j, k], RAS affine)`` of an NRRD/MetaImage file (the stored type); UserError when unreadable
    or not a 3D scalar image."""
    path = Path(path)
    reader = _reader(path)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"cannot read the voxel data: {_itk_message(exc)}", path) from None
    import SimpleITK as sitk

    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # [z, y, x] -> [i, j, k]
    return data, itk_affine(img.GetDirection(), img.GetSpacing(), img.GetOrigin())
