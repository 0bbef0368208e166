"""Build a CT volume in Hounsfield units from the DICOM files of ONE series.

Call :func:`build_volume` with the files of one series (many single-frame slices, or one enhanced
multi-frame file; choosing the files is the caller's job, see :mod:`pancls.ct.scan`). It returns a
:class:`Volume`: int16 HU in NIfTI voxel order with its RAS affine, ready for :func:`pancls.ct.write.write_volume`.

What it does, in order:

1. Reads every header (``stop_before_pixels``), splitting multi-frame files into frames. Per-frame
   functional groups come first, then the shared ones (Enhanced CT keeps position, orientation, pixel
   spacing and the rescale there; ``pydicom.pixels.apply_rescale`` does not look there).
2. Checks the series is one stack: one SeriesInstanceUID and FrameOfReferenceUID, one orientation, one
   matrix size and pixel spacing, a decoder for every transfer syntax. Then sorts and checks the
   geometry with :mod:`pancls.ct.geometry` (gaps, uneven spacing, tilt: refused unless the policy says to
   resample). All of this happens before a single pixel is decoded.
3. Decodes the pixels in a thread pool and converts each plane to HU with its own slope/intercept::

       HU = stored * RescaleSlope + RescaleIntercept,   rounded to the nearest integer

   A value outside int16 (-32768..32767) is refused, never clipped: it means the data is not CT in HU.

The voxel array is ``array[i, j, k]`` = column i, row j of the k-th plane in ascending order along the
slice normal ``n = r x c``; see :mod:`pancls.ct.geometry` for the affine.
"""
from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from pancls.ct.geometry import (GeometryPolicy, analyse_stack, check_orientation, grid_affine, resample_flags,
                                resample_stack)
from pancls.errors import UserError

# GeometryPolicy is re-exported: callers configure build_volume from this one module.
__all__ = ["GeometryPolicy", "Volume", "build_volume", "default_workers"]

INT16_MIN, INT16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max

# Pixel decoding (file reads, numpy copies, OpenJPEG via Pillow/pylibjpeg) runs mostly in C with the GIL
# released, so threads can use every free core; more threads than cores only add contention. On the
# 2-core development machine, shared and loaded (load average 5-6), 1 and 2 threads were within noise of
# each other (20 JPEG 2000 slices: 0.83-1.19 s either way); rerun the benchmark on an idle machine.
DEFAULT_MAX_WORKERS = 8


@dataclass
class Volume:
    """A CT volume: int16 HU in NIfTI/RAS voxel order.

    Attributes
    ----------
    array : np.ndarray
        int16 ``(I, J, K)``; ``array[i, j, k]`` is the voxel whose world position is ``affine @ (i, j, k, 1)``.
    affine : np.ndarray
        4x4 voxel -> RAS world (mm).
    spacing : np.ndarray
        ``(3,)`` voxel size in mm along i, j, k (the column norms of ``affine[:3, :3]``).
    flags : list of str
        What was done to the data or what it is not, e.g. ``"resampled:gap"``, ``"resampled:tilt"``,
        ``"single_slice"``, ``"rescale_type:US"`` (values are not HU).
    meta : dict
        Non-identifying acquisition metadata (JSON-serialisable). Never names, IDs, dates or UIDs; the
        series is identified only by ``series_uid_sha256``.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray
    flags: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.spacing = np.asarray(self.spacing, dtype=np.float64)
        if self.array.dtype != np.int16 or self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D int16, got {self.array.ndim}D {self.array.dtype}")
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise ValueError("Volume.affine must be a finite 4x4 matrix")
        if not np.allclose(self.spacing, np.linalg.norm(self.affine[:3, :3], axis=0), rtol=1e-5, atol=1e-6):
            raise ValueError(f"Volume.spacing {self.spacing} disagrees with the affine's column norms")


@dataclass
class _Frame:
    """One 2D plane: where it lies, how to turn its stored values into HU, and where its pixels are."""

    path: Path
    index: int  # frame number inside the file (0 for single-frame files)
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]
    slope: float
    intercept: float
    rescale_type: str | None
    slice_thickness: float | None


def _group_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """Item of functional-group ``sequence`` for ``frame``: per-frame first, then shared (PS3.3 C.7.6.16)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and index < len(items) and items[index].get(sequence):
            return items[index].get(sequence)[0]
    return None


def _number(value: Any, name: str, where: Path) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} {value!r} is not a number", where) from None
    if not math.isfinite(number):
        raise UserError(f"{name} is {number}", where)
    return number


def _frames_of(ds: Dataset, path: Path) -> list[_Frame]:
    """Split one header into planes, taking each attribute from the functional groups when present."""
    n_frames = int(ds.get("NumberOfFrames") or 1)
    has_groups = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if n_frames > 1 and not has_groups:
        raise UserError(f"multi-frame object ({n_frames} frames) without functional groups: "
                        "frame positions unknown", path)
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise UserError(f"not a grayscale image (SamplesPerPixel {ds.SamplesPerPixel})", path)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise UserError("no pixel data", path)
    frames = []
    for f in range(n_frames):
        def attr(sequence: str, keyword: str) -> Any:
            item = _group_item(ds, f, sequence) if has_groups else None
            return item.get(keyword) if item is not None and keyword in item else ds.get(keyword)

        ipp = attr("PlanePositionSequence", "ImagePositionPatient")
        iop = attr("PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = attr("PixelMeasuresSequence", "PixelSpacing")
        if not ipp or not iop or not spacing:
            missing = [k for k, v in (("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop),
                                      ("PixelSpacing", spacing)) if not v]
            raise UserError(f"frame {f} has no {', '.join(missing)}: it cannot be placed in space", path)
        slope = attr("PixelValueTransformationSequence", "RescaleSlope")
        intercept = attr("PixelValueTransformationSequence", "RescaleIntercept")
        if slope is None or intercept is None:
            raise UserError(f"frame {f} has no RescaleSlope/RescaleIntercept: HU cannot be computed", path)
        thickness = attr("PixelMeasuresSequence", "SliceThickness")
        rescale_type = attr("PixelValueTransformationSequence", "RescaleType")
        frames.append(_Frame(
            path=path, index=f,
            ipp=np.array([_number(v, "ImagePositionPatient", path) for v in ipp]),
            iop=np.array([_number(v, "ImageOrientationPatient", path) for v in iop]),
            pixel_spacing=tuple(_number(v, "PixelSpacing", path) for v in spacing),
            shape=(int(ds.Rows), int(ds.Columns)),
            slope=_number(slope, "RescaleSlope", path), intercept=_number(intercept, "RescaleIntercept", path),
            rescale_type=str(rescale_type) if rescale_type else None,
            slice_thickness=float(thickness) if thickness not in (None, "") else None))
        if len(frames[-1].ipp) != 3 or len(frames[-1].pixel_spacing) != 2 or min(frames[-1].pixel_spacing) <= 0:
            raise UserError("ImagePositionPatient needs 3 values and PixelSpacing 2 positive ones", path)
    return frames


def _check_decoder(ds: Dataset, path: Path) -> None:
    """Refuse, before decoding anything, a transfer syntax no installed plugin can decode."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        return  # pydicom falls back to implicit VR little endian, which needs no decoder
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UserError(f"pixel data in transfer syntax {syntax.name} ({syntax}) cannot be decoded by pydicom",
                        path) from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise UserError(f"no decoder installed for transfer syntax {syntax.name} ({syntax}); install {needs}", path)


def _read_header(path: Path) -> tuple[Dataset, list[_Frame]]:
    try:
        # defer_size skips over the pixel data (and other large values) without loading it, yet keeps
        # the element so that a file without pixels is recognised.
        ds = pydicom.dcmread(path, defer_size="1 KB")
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise UserError(f"cannot read DICOM file: {exc}", path) from None
    _check_decoder(ds, path)
    return ds, _frames_of(ds, path)


def _to_hu(stored: np.ndarray, frame: _Frame) -> np.ndarray:
    """``stored * slope + intercept`` rounded to int16; refuses values int16 cannot hold."""
    if frame.slope == 1.0 and frame.intercept == round(frame.intercept):
        hu = stored.astype(np.int32) + int(frame.intercept)  # exact and ~3x faster than the float path
    else:
        hu = np.rint(stored.astype(np.float64) * frame.slope + frame.intercept)
    lo, hi = hu.min(), hu.max()
    if lo < INT16_MIN or hi > INT16_MAX:
        raise UserError(f"frame {frame.index}: rescaled values {lo:g}..{hi:g} do not fit int16 "
                        f"(slope {frame.slope:g}, intercept {frame.intercept:g}); not CT in HU?", frame.path)
    return hu.astype(np.int16)


def _decode_into(out: np.ndarray, path: Path, targets: list[tuple[int, _Frame]]) -> None:
    """Decode ``path`` and write each of its frames, converted to HU, into ``out[k]`` (k = sorted plane)."""
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure on user data is a bad file, not a bug
        raise UserError(f"cannot decode pixel data: {type(exc).__name__}: {exc}", path) from None
    pixels = pixels.reshape((-1,) + pixels.shape[-2:])
    if pixels.shape[1:] != targets[0][1].shape or len(pixels) <= max(fr.index for _, fr in targets):
        raise UserError(f"decoded pixel data has shape {pixels.shape}, the header says "
                        f"{int(ds.get('NumberOfFrames') or 1)} x {targets[0][1].shape}", path)
    for k, frame in targets:
        out[k] = _to_hu(pixels[frame.index], frame)


def _series_folder(paths: Sequence[Path]) -> Path:
    return paths[0] if len(paths) == 1 else Path(os.path.commonpath([str(p) for p in paths]))


def _check_one_stack(headers: list[Dataset], frames: list[_Frame], policy: GeometryPolicy, where: Path) -> None:
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword) or "") for ds in headers}
        if len(values) > 1:
            raise UserError(f"the files mix {len(values)} different {keyword}s: pass one series at a time", where)
    ref = frames[0]
    for fr in frames[1:]:
        label = f"{fr.path.name}" + (f" frame {fr.index}" if fr.index else "")
        if np.max(np.abs(fr.iop - ref.iop)) > policy.orientation_tolerance:
            raise UserError(f"mixed ImageOrientationPatient: {label} has {np.round(fr.iop, 6).tolist()}, "
                            f"{ref.path.name} has {np.round(ref.iop, 6).tolist()}", where)
        if fr.shape != ref.shape:
            raise UserError(f"mixed image sizes: {label} is {fr.shape[0]}x{fr.shape[1]}, "
                            f"{ref.path.name} is {ref.shape[0]}x{ref.shape[1]}", where)
        if np.max(np.abs(np.subtract(fr.pixel_spacing, ref.pixel_spacing))) > 1e-4:
            raise UserError(f"mixed PixelSpacing: {label} has {list(fr.pixel_spacing)}, "
                            f"{ref.path.name} has {list(ref.pixel_spacing)}", where)
    types = {fr.rescale_type for fr in frames}
    if len(types) > 1:
        raise UserError(f"mixed RescaleType {sorted(map(str, types))}", where)


def _json_value(value: Any) -> Any:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [_json_value(v) for v in value]
    if isinstance(value, (pydicom.valuerep.DSfloat, pydicom.valuerep.DSdecimal, float)):
        return float(value)
    if isinstance(value, (pydicom.valuerep.IS, int)):
        return int(value)
    return str(value)


def _find(ds: Dataset, keyword: str) -> Any:
    """Attribute at the top level, else inside the shared / first per-frame functional groups (Enhanced CT)."""
    if ds.get(keyword) not in (None, ""):
        return ds.get(keyword)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for seq in (ds.get(groups) or [Dataset()])[0]:
            if seq.VR == "SQ":
                for item in seq.value:
                    if item.get(keyword) not in (None, ""):
                        return item.get(keyword)
    return None


# Acquisition descriptors worth keeping; free-text fields that may carry names (descriptions,
# institution, operators, comments) are deliberately absent.
_META_KEYWORDS = {
    "modality": "Modality",
    "manufacturer": "Manufacturer",
    "manufacturer_model_name": "ManufacturerModelName",
    "convolution_kernel": "ConvolutionKernel",
    "kvp": "KVP",
    "contrast_bolus_agent": "ContrastBolusAgent",
    "contrast_bolus_route": "ContrastBolusRoute",
    "contrast_phase": "ContrastBolusAgentPhase",
    "gantry_detector_tilt_deg": "GantryDetectorTilt",
    "image_type": "ImageType",
}


def _acquisition_meta(ds: Dataset, frames: Iterable[_Frame]) -> dict[str, Any]:
    frames = list(frames)
    meta: dict[str, Any] = {"source": "dicom"}
    for key, keyword in _META_KEYWORDS.items():
        value = _find(ds, keyword)
        if value is not None:
            meta[key] = _json_value(value)
    sop = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
    sop = ds.get("SOPClassUID") or sop
    if sop:
        meta["sop_class"] = sop.name
    if hasattr(ds, "file_meta") and "TransferSyntaxUID" in ds.file_meta:
        meta["transfer_syntax"] = ds.file_meta.TransferSyntaxUID.name
    meta["rescale_type"] = frames[0].rescale_type or "HU (implied)"
    thickness = sorted({fr.slice_thickness for fr in frames if fr.slice_thickness is not None})
    if thickness:
        meta["slice_thickness_mm"] = thickness
    uid = str(ds.get("SeriesInstanceUID") or "")
    meta["series_uid_sha256"] = hashlib.sha256(uid.encode()).hexdigest() if uid else None
    meta["n_slices"] = len(frames)
    return meta


def default_workers(n_files: int) -> int:
    """Thread count for reading: one per CPU (never more than files), capped at ``DEFAULT_MAX_WORKERS``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n_files, cpus, DEFAULT_MAX_WORKERS))


def build_volume(paths: Sequence[str | os.PathLike], policy: GeometryPolicy = GeometryPolicy(),
                 workers: int | None = None) -> Volume:
    """Build the HU volume of ONE series from its DICOM files (see the module docstring for the rules).

    Parameters
    ----------
    paths : sequence of path-like
        The image files of one series, in any order: single-frame slices, or enhanced multi-frame
        file(s). Non-image objects and other series must already be excluded.
    policy : GeometryPolicy
        What to do with gaps, uneven spacing and gantry tilt (default: refuse each).
    workers : int, optional
        Threads decoding pixel data; default :func:`default_workers`.

    Returns
    -------
    Volume
        int16 HU ``array[i, j, k]`` (column, row, plane ascending along the normal) with its RAS affine.

    Raises
    ------
    UserError
        For anything that cannot be read right: unreadable file, missing geometry or rescale,
        undecodable transfer syntax, mixed series/orientation/size/spacing, duplicate positions, and any
        gap, uneven spacing or tilt the policy refuses. ``where`` is the file or the series folder.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no DICOM files given", "build_volume")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}", "workers")
    where = _series_folder(paths)
    n_workers = workers or default_workers(len(paths))
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        headers_frames = list(pool.map(_read_header, paths))
    headers = [h for h, _ in headers_frames]
    frames = [fr for _, frs in headers_frames for fr in frs]
    _check_one_stack(headers, frames, policy, where)

    try:
        row_cos, col_cos = check_orientation(frames[0].iop)
    except ValueError as exc:
        raise UserError(str(exc), frames[0].path) from None
    labels = [fr.path.name + (f" frame {fr.index}" if len(frames) > len(paths) else "") for fr in frames]
    try:
        geo = analyse_stack(np.stack([fr.ipp for fr in frames]), row_cos, col_cos, frames[0].pixel_spacing,
                            policy, labels)
        flags = resample_flags(geo, policy)
    except ValueError as exc:
        raise UserError(str(exc), where) from None

    sorted_frames = [frames[i] for i in geo.order]
    rows, cols = frames[0].shape
    planes = np.empty((len(frames), rows, cols), dtype=np.int16)
    by_file: dict[Path, list[tuple[int, _Frame]]] = {}
    for k, fr in enumerate(sorted_frames):
        by_file.setdefault(fr.path, []).append((k, fr))
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        list(pool.map(lambda item: _decode_into(planes, *item), by_file.items()))

    header_of = {frs[0].path: h for h, frs in headers_frames}
    meta = _acquisition_meta(header_of[sorted_frames[0].path], sorted_frames)
    if sorted_frames[0].rescale_type not in (None, "HU"):
        flags.append(f"rescale_type:{sorted_frames[0].rescale_type}")
    dr, dc = geo.pixel_spacing
    if len(frames) == 1:
        # One plane has no neighbour to measure spacing from; SliceThickness is the only hint there is.
        spacing_k = sorted_frames[0].slice_thickness or 1.0
        flags.append("single_slice")
        origin = geo.ipp[0]
    elif geo.is_regular:
        spacing_k = geo.uniform_spacing
        origin = geo.ipp[0]
    else:
        spacing_k = geo.typical_spacing
        fill = float(planes.min())  # scanners pad outside the reconstruction circle with the minimum
        stack, origin = resample_stack(planes, geo, spacing_k, fill, policy)
        planes = np.rint(stack).astype(np.int16)  # convex combinations of int16 values: no overflow
        meta.update(original_slice_positions_mm=np.round(geo.positions, 4).tolist(),
                    original_intervals_mm=np.round(geo.intervals, 4).tolist(),
                    tilt_deg=round(geo.tilt_deg, 4), resample_interpolation="linear", resample_fill_hu=fill)
    spacing = np.array([dc, dr, spacing_k])
    affine = grid_affine(origin, row_cos, col_cos, spacing)
    array = np.ascontiguousarray(planes.transpose(2, 1, 0))
    meta.update(shape=list(array.shape), spacing_mm=[round(float(s), 6) for s in spacing])
    return Volume(array=array, affine=affine, spacing=spacing, flags=flags, meta=meta)
