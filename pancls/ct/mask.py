"""Read a lesion/organ mask drawn on a CT study and put it on the voxel grid of the ingested volume.

Formats: NIfTI (``.nii``/``.nii.gz``, nibabel), NRRD/MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``;
SimpleITK, LPS geometry turned into RAS) as 3D Slicer exports them, and DICOM SEG (highdicom: the segments
combined into one label map, segment number = voxel value) as PACS-side tools export them. Every mask comes
back as integer labels with a RAS affine (nibabel's convention, the one ingest writes).

:func:`onto_grid` maps a mask onto a target grid by nearest neighbour: each target voxel takes the mask
voxel whose centre is nearest to its own centre (outside the mask's extent: 0). When the two grids are the
same up to an axis permutation/flip (a mask saved in LPS or with another slice order), every voxel has an
exact partner and the result is the same label map, only reordered (``"reoriented"``; also a mask cropped
to its extent, as DICOM SEG objects store only the frames that hold a segment); any other difference is a
real resampling (``"resampled"``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import nibabel as nib
import numpy as np

from pancls.ct.itk import ITK_SUFFIXES, read_itk
from pancls.ct.nifti import orientation_codes
from pancls.ct.scan import NIFTI_SUFFIXES
from pancls.errors import UserError, exception_text

MASK_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def mask_stem(path: Path) -> str:
    """The file name without its mask suffix (``case7.nii.gz`` -> ``case7``; DICOM files keep their name)."""
    name = path.name
    for suffix in sorted(MASK_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_mask(path: str | os.PathLike) -> Tuple[np.ndarray, np.ndarray, str]:
    """``(labels, affine_ras, kind)`` of a mask file; ``kind`` is ``"nifti"``, ``"itk"`` or ``"seg"``.

    Raises :class:`UserError` for an unreadable file, a non-3D image, non-integer or negative labels, or a
    singular affine."""
    path = Path(path)
    lower = path.name.lower()
    try:
        if lower.endswith(NIFTI_SUFFIXES):
            img = nib.load(path)
            orientation_codes(img, path)
            data, affine, kind = np.asanyarray(img.dataobj), np.asarray(img.affine, float), "nifti"
        elif lower.endswith(ITK_SUFFIXES):
            data, affine, kind = (*read_itk(path), "itk")
        else:
            data, affine, kind = (*_read_seg(path), "seg")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - each reader raises its own types for a bad file
        raise UserError(f"cannot read the mask: {exception_text(exc, path)}", path) from None
    data = np.asarray(data)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"a mask must be a 3D label map, its shape is {data.shape}", path)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise UserError("the mask's affine is not invertible", path)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or np.any(data != np.rint(data)):
            raise UserError("a mask must hold integer labels (found fractional or non-finite values)", path)
    if data.dtype.kind not in "biuf":
        raise UserError(f"a mask must hold integer labels, found {data.dtype}", path)
    if data.size and data.min() < 0:
        raise UserError("a mask must hold labels >= 0", path)
    labels = data.astype(np.uint8 if data.size == 0 or data.max() <= 255 else np.int16)
    return labels, affine, kind


def _read_seg(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    import highdicom as hd

    seg = hd.seg.segread(path)
    volume = seg.get_volume(combine_segments=True)  # segment number as the voxel value, 0 = background
    img = volume.to_nibabel()
    return np.asanyarray(img.dataobj), np.asarray(img.affine, float)


def is_seg_file(path: Path) -> bool:
    """True for a DICOM Segmentation object (by SOP class, from the header only)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - not DICOM
        return False
    return str(ds.get("SOPClassUID", "")) == "1.2.840.10008.5.1.4.1.1.66.4"


def onto_grid(labels: np.ndarray, affine: np.ndarray, shape: Tuple[int, int, int], target_affine: np.ndarray,
              tolerance_mm: float) -> Tuple[np.ndarray, str]:
    """``labels`` (on ``affine``) on the grid ``shape`` x ``target_affine`` by nearest neighbour, and how:
    ``"reoriented"`` when the grids share their voxels (same voxel size, axes permuted or flipped, an integer
    offset: a mask saved in another orientation or cropped to its extent; within ``tolerance_mm``), so that
    every label lands on its own voxel, else ``"resampled"``."""
    shape = tuple(int(s) for s in shape)
    to_mask = np.linalg.inv(affine) @ np.asarray(target_affine, float)
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    ijk = to_mask[:3, :3] @ grid + to_mask[:3, 3:4]
    nearest = np.rint(ijk)
    rotation = to_mask[:3, :3]
    permutation = np.rint(rotation)
    same_voxels = (np.all(np.abs(rotation - permutation) < 1e-4)
                   and set(np.abs(permutation).ravel()) <= {0.0, 1.0}
                   and np.all(np.abs(permutation).sum(axis=0) == 1) and np.all(np.abs(permutation).sum(axis=1) == 1))
    # voxel centres coincide in world space (mm), for every voxel of the target
    offset_mm = float(np.abs(affine[:3, :3] @ (ijk - nearest)).max()) if ijk.size else 0.0
    inside = np.all((nearest >= 0) & (nearest < np.asarray(labels.shape)[:, None]), axis=0)
    out = np.zeros(int(np.prod(shape)), dtype=labels.dtype)
    idx = nearest[:, inside].astype(np.intp)
    out[inside] = labels[idx[0], idx[1], idx[2]]
    return out.reshape(shape), "reoriented" if same_voxels and offset_mm <= tolerance_mm else "resampled"


def axes_reordered(affine: np.ndarray, target_affine: np.ndarray, atol: float = 1e-4) -> bool:
    """True when a mask's voxel axes run in another order or direction than the target grid's (what
    ``"reoriented"`` of :func:`onto_grid` had to undo); False for a mask on the same axes that only covers another
    extent (a DICOM SEG cropped to its segments, a mask longer than the series): no reordering to report."""
    return not np.allclose(np.asarray(affine, float)[:3, :3], np.asarray(target_affine, float)[:3, :3], atol=atol)


#: The largest fraction of a mask's marked voxels that may fall outside the image it is put on. A mask drawn
#: on this series loses none (nearest neighbour onto the same voxels), and one on a grid up to half a voxel off
#: loses at most voxels within half a voxel of the image's edge: a thin rim, and only of a mask that reaches
#: the edge. Losing more (e.g. 100,255 of 130,634 voxels for one patient's mask put on another of their
#: studies) means the mask was drawn on another scan, longer or shifted: what remains is not the lesion the
#: annotator drew, and its bounding box, which sets the ROI crop, would be cut where the image ends.
MAX_OUTSIDE_FRACTION = 0.01


def voxels_outside(labels: np.ndarray, affine: np.ndarray, shape: Tuple[int, int, int],
                   target_affine: np.ndarray) -> Tuple[int, int]:
    """``(marked, outside)``: the mask's non-zero voxels, and how many of them have their centre outside the grid
    ``shape`` x ``target_affine`` (nearest target voxel beyond its extent): reoriented or resampled alike."""
    ijk = np.argwhere(labels).T.astype(np.float64)
    if ijk.size == 0:
        return 0, 0
    to_target = np.linalg.inv(np.asarray(target_affine, float)) @ np.asarray(affine, float)
    nearest = np.rint(to_target[:3, :3] @ ijk + to_target[:3, 3:4])
    inside = np.all((nearest >= 0) & (nearest < np.asarray(shape)[:, None]), axis=0)
    return int(ijk.shape[1]), int(np.count_nonzero(~inside))


def check_inside(labels: np.ndarray, affine: np.ndarray, shape: Tuple[int, int, int], target_affine: np.ndarray,
                 where: str | os.PathLike | None = None) -> int:
    """How many of the mask's marked voxels lie outside the image (the grid ``shape`` x ``target_affine``), when
    at most :data:`MAX_OUTSIDE_FRACTION` of them do; else a :class:`UserError`: the mask was drawn on another
    scan (``pancls ingest`` and ``pancls predict`` apply this one rule)."""
    marked, outside = voxels_outside(labels, affine, shape, target_affine)
    if marked and outside > MAX_OUTSIDE_FRACTION * marked:
        raise UserError(f"{outside} of the mask's {marked} voxels ({100 * outside / marked:.1f} %) lie outside the "
                        f"image (at most {100 * MAX_OUTSIDE_FRACTION:g} % may): it was drawn on another scan (a "
                        "longer or shifted series, another study of the patient?); give the mask drawn on this "
                        "series", where)
    return outside


def select_label(labels: np.ndarray, label: int | None = None, where: str | os.PathLike | None = None) -> np.ndarray:
    """The lesion of a mask: ``labels`` as they are when they hold one non-zero value; with ``label`` (the user's
    ``--mask-label N``) the voxels == N, as 1. A mask with several non-zero values (an organ atlas such as
    TotalSegmentator's 41 labels, a SEG of several segments) without ``label`` is a :class:`UserError`: its
    foreground is not one lesion, and the ROI crop around it (30 % of the volume) would be a guess."""
    values = [int(v) for v in np.unique(labels) if v]
    shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
    if label is None:
        if len(values) > 1:
            raise UserError(f"the mask holds {len(values)} labels ({shown}), not one lesion: choose the lesion's "
                            "label with --mask-label N, or give a binary mask (0 = background, 1 = lesion; with "
                            "nibabel: nib.save(nib.Nifti1Image((data == N).astype('uint8'), img.affine), "
                            "'lesion.nii.gz'))", where)
        return labels
    if label not in values:
        raise UserError(f"the mask has no voxel of label {label} (--mask-label); it holds "
                        f"{shown or 'no label at all'}", where)
    return (labels == label).astype(np.uint8)
