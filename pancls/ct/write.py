"""Write a :class:`~pancls.ct.volume.Volume` as NIfTI-1 plus a JSON sidecar, atomically.

One voxel orientation for everything written (:func:`as_ras`): the voxel axes run as close as the volume's
own axes allow to R, A, S (RAS+, nibabel's canonical order and the one the preprocessing's ``Orientation``
transform uses), so a DICOM series (rows/columns in L, P order) and a NIfTI input come out alike. Only axes
are permuted and flipped: the voxels and their world positions are unchanged, and the affine stays exact
(an oblique volume keeps its obliquity).

The image is int16 with ``qform = sform = volume.affine`` (code 1, scanner anatomical), units mm, and no
scaling (``scl_slope`` = 1, ``scl_inter`` = 0), so the stored integers are the HU. The sidecar holds the
geometry, the flags and ``volume.meta``; it is written only from those fields, so it cannot carry a
header value pancls did not choose to keep (no names, IDs, dates or UIDs).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from pancls.ct.nifti import nifti1_image, save_nifti
from pancls.ct.volume import SIDECAR_KEYS, Volume
from pancls.errors import UserError
from pancls.io import atomic_write_json

_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def as_ras(volume: Volume) -> Volume:
    """``volume`` with its voxel axes in the order closest to R, A, S (itself when they already are)."""
    ornt = nib.orientations.io_orientation(volume.affine)
    if np.array_equal(ornt, _RAS):
        return volume
    shape = volume.array.shape
    array = nib.orientations.apply_orientation(volume.array, ornt)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = np.asarray(volume.spacing, float)
    meta = dict(volume.meta)
    if "shape" in meta:
        meta["shape"] = [int(s) for s in array.shape]
    if "spacing_mm" in meta:
        meta["spacing_mm"] = [round(float(s), 6) for s in spacing]
    if "axcodes" in meta:
        meta["axcodes"] = list(nib.aff2axcodes(affine))
    return dataclasses.replace(volume, array=array, affine=affine, spacing=spacing, meta=meta)


def sidecar_dict(volume: Volume) -> dict:
    """The JSON sidecar content: geometry, flags and the volume's non-identifying metadata, the acquisition
    fields under dcm2niix's BIDS keys (``Modality``, ``Manufacturer``, ``ManufacturersModelName``,
    ``ConvolutionKernel``, ``KVP``, ``XRayTubeCurrent``, ``SliceThickness``, ``ContrastBolusAgent`` (only
    with --keep-descriptions), ``ContrastBolusRoute``, ``ContrastBolusAgentPhase``, ``GantryDetectorTilt``,
    ``ImageType``, ``BodyPartExamined``)."""
    return {
        "shape": [int(s) for s in volume.array.shape],
        "spacing_mm": [float(s) for s in volume.spacing],
        "affine_ras": [[float(v) for v in row] for row in volume.affine],
        "axcodes": list(nib.aff2axcodes(volume.affine)),
        "dtype": "int16",
        "units": "HU" if not any(f.startswith("rescale_type:") for f in volume.flags) else "rescaled stored values",
        "flags": list(volume.flags),
        "meta": {SIDECAR_KEYS.get(k, k): _sidecar_value(k, v) for k, v in volume.meta.items()},
    }


def _sidecar_value(key: str, value):
    if key == "slice_thickness_mm" and isinstance(value, list) and len(value) == 1:
        return value[0]  # one number, as dcm2niix writes it (several: the list of distinct values)
    return value


def nifti_image(volume: Volume, where: str | os.PathLike = "volume") -> nib.Nifti1Image:
    """The in-memory NIfTI-1 image :func:`write_volume` saves: RAS+ voxel order (:func:`as_ras`), int16, with
    the header conventions of :func:`pancls.ct.nifti.nifti1_image`."""
    volume = as_ras(volume)
    return nifti1_image(np.asarray(volume.array, dtype=np.int16), volume.affine, where)


def write_volume(volume: Volume, nifti_path: str | os.PathLike, sidecar_path: str | os.PathLike | None = None) -> None:
    """Write ``volume`` to ``nifti_path`` (``.nii`` or ``.nii.gz``) and, if given, its JSON sidecar.

    Each file appears complete or not at all (temporary file + rename). A sheared affine is refused:
    the NIfTI qform can only store rotations and zooms.
    """
    nifti_path = Path(nifti_path)
    if not (nifti_path.name.endswith(".nii.gz") or nifti_path.name.endswith(".nii")):
        raise UserError("the output file name must end in .nii.gz or .nii", nifti_path)
    volume = as_ras(volume)
    save_nifti(nifti_path, np.asarray(volume.array, dtype=np.int16), volume.affine)
    if sidecar_path is not None:
        atomic_write_json(sidecar_path, sidecar_dict(volume))
