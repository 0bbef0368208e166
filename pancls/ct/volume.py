"""Build a CT volume in Hounsfield units from the DICOM files of ONE series.

Call :func:`build_volume` with the files of one series (many single-frame slices, or one enhanced
multi-frame file; choosing the files is the caller's job, see :mod:`pancls.ct.scan`). It returns a
:class:`Volume`: int16 HU in NIfTI voxel order with its RAS affine, ready for :func:`pancls.ct.write.write_volume`.

What it does, in order:

1. Takes every header (``stop_before_pixels``; those :func:`pancls.ct.scan.scan` already parsed are
   passed in as ``headers`` and not read again), splitting multi-frame files into frames. Per-frame
   functional groups come first, then the shared ones (Enhanced CT keeps position, orientation, pixel
   spacing and the rescale there; ``pydicom.pixels.apply_rescale`` does not look there).
2. Checks the series is one stack: one SeriesInstanceUID and FrameOfReferenceUID, one orientation, one
   matrix size and pixel spacing, a decoder for every transfer syntax. Then sorts and checks the
   geometry with :mod:`pancls.ct.geometry` (gaps, uneven spacing, tilt: refused unless the policy says to
   resample). All of this happens before a single pixel is decoded.
3. Reads each file's pixel data element, and only that, from the offset the header scan recorded (native
   little-endian data straight into an integer array, compressed data through pydicom's decoder for the
   transfer syntax, in forked worker processes when there are enough files, see :func:`decode_processes`),
   and converts each plane to HU with its own slope/intercept::

       HU = stored * RescaleSlope + RescaleIntercept,   rounded to the nearest integer

   A value outside int16 (-32768..32767) is refused, never clipped: it means the data is not CT in HU.

The voxel array is ``array[i, j, k]`` = column i, row j of the k-th plane in ascending order along the
slice normal ``n = r x c``; see :mod:`pancls.ct.geometry` for the affine.
"""
from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import os
import struct
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import as_pixel_options

from pancls.ct.capture import collecting
from pancls.ct.functional import functional_value
from pancls.ct.geometry import (
    GeometryPolicy,
    StackGeometry,
    analyse_stack,
    check_orientation,
    grid_affine,
    resample_flags,
    resample_stack,
)
from pancls.ct.scan import PIXEL_DATA, Header, default_workers, parallel_map, read_dicom_header
from pancls.errors import UserError, exception_text, one_line
from pancls.io import quiet_worker

# GeometryPolicy is re-exported: callers configure build_volume from this one module.
__all__ = ["GeometryPolicy", "Volume", "build_volume", "decode_processes", "default_workers"]

INT16_MIN, INT16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max

#: Limits checked before any pixel is allocated (a header saying 65535 x 65535 is refused, not attempted):
#: rows/columns per image, frames per file, voxels per volume (2**30 int16 = 2 GiB; a 512 x 512 CT of
#: 4096 slices), |coordinate| of a slice position and pixel spacing, in mm.
MAX_MATRIX = 8192
MAX_FRAMES = 16384
MAX_VOXELS = 2 ** 30
MAX_POSITION_MM = 1e5
MAX_SPACING_MM = 1e3

# OpenJPEG keeps the GIL while it decodes (pylibjpeg-openjpeg calls it without releasing it), so threads
# cannot share JPEG 2000 work out; forked processes can. Measured on the idle 2-core machine, 20 JPEG 2000
# slices of 512x512: 0.48-0.56 s in one process, 0.27-0.31 s in 2 forked workers, start-up included (a
# fork costs milliseconds, one slice ~25 ms). Below 4 compressed files per process it does not pay.
MIN_COMPRESSED_FILES_PER_PROCESS = 4


@dataclass
class Volume:
    """A CT volume: int16 HU in NIfTI/RAS voxel order.

    Attributes
    ----------
    array : np.ndarray
        int16 ``(I, J, K)``; ``array[i, j, k]`` is the voxel whose world position is ``affine @ (i, j, k, 1)``.
        :func:`build_volume` returns it Fortran-ordered (a transposed view of the decoded planes, no copy),
        which is NIfTI's on-disk order.
    affine : np.ndarray
        4x4 voxel -> RAS world (mm).
    spacing : np.ndarray
        ``(3,)`` voxel size in mm along i, j, k (the column norms of ``affine[:3, :3]``).
    flags : list of str
        What was done to the data or what it is not, e.g. ``"resampled:gap"``, ``"resampled:tilt"``,
        ``"single_slice"``, ``"rescale_type:US"`` (values are not HU).
    meta : dict
        Non-identifying acquisition metadata (JSON-serialisable). Never names, IDs, dates or UIDs (the
        caller adds its own keyed series id); free text only in :data:`FREE_TEXT_META` keys.
    warnings : list of str
        What the readers (pydicom's decoders) warned about while reading the pixel data, one line each.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray
    flags: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.spacing = np.asarray(self.spacing, dtype=np.float64)
        if self.array.dtype != np.int16 or self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D int16, got {self.array.ndim}D {self.array.dtype}")
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise ValueError("Volume.affine must be a finite 4x4 matrix")
        if not np.allclose(self.spacing, np.linalg.norm(self.affine[:3, :3], axis=0), rtol=1e-5, atol=1e-6):
            raise ValueError(f"Volume.spacing {self.spacing} disagrees with the affine's column norms")


#: What every CT of the abdomen in Hounsfield units holds, checked by :func:`check_ct_hu` before a volume is
#: converted (``pancls ingest``) or classified (``pancls predict``). Air (-1000 HU: outside the body, in the
#: bowel and stomach) or fat (-150..-50 HU: subcutaneous, around the pancreas, in the mesentery) fills at least
#: :data:`HU_AIR_FAT_MIN_FRACTION` of the voxels; measured on the real fixtures: 61 % (abdominal NIfTI), 75 %
#: (abdominal DICOM), 88 % (phantom), 51 % in a crop of the abdominal NIfTI to the pancreas' bounding box
#: (no outside air: fat carries it), and 0.00 % in each of them as stored values (HU + 1024, where air lies at
#: 0..30 and fat at ~900) or rescaled to 0..1. The band reaches -1200 HU (air's noise; padding outside the
#: reconstruction circle at -2048 or -3024 HU is not counted: raw stored values with such padding still fail).
HU_AIR_FAT = (-1200, -30)
HU_AIR_FAT_MIN_FRACTION = 0.01
#: ... and something as dense as soft tissue (muscle, liver, blood: 40-60 HU unenhanced, more with contrast;
#: bone 300+ HU). Below it (the fixtures' maxima are 172-1839 HU, 240 in the pancreas crop) the values are
#: shifted down (the intercept applied twice) or the volume holds no body.
HU_MIN_MAX = 50


def check_ct_hu(volume: "Volume", where: str | os.PathLike) -> None:
    """Refuse (:class:`UserError` naming ``where``) a volume that cannot be a CT in Hounsfield units: a DICOM
    RescaleType other than HU (absent means HU for CT), or values without air or fat
    (:data:`HU_AIR_FAT`) or without soft tissue (:data:`HU_MIN_MAX`) -- raw stored values, rescaled
    intensities, a perfusion or other parametric map. The one rule ``pancls ingest`` and ``pancls predict``
    apply to every volume they convert or classify (the readers themselves read any such file faithfully)."""
    rescale = next((f.split(":", 1)[1] for f in volume.flags if f.startswith("rescale_type:")), None)
    if rescale is not None:
        raise UserError(f"RescaleType {rescale}: the values are not Hounsfield units (a perfusion or other "
                        "parametric map?), not a CT to classify", where)
    array = volume.array
    sample = array[::2, ::2] if array.shape[0] > 64 and array.shape[1] > 64 else array  # a quarter is enough
    lo, hi = HU_AIR_FAT
    fraction = np.count_nonzero((sample >= lo) & (sample <= hi)) / max(sample.size, 1)
    low, high = int(array.min()), int(array.max())
    if fraction < HU_AIR_FAT_MIN_FRACTION:
        raise UserError(f"values {low}..{high} are not CT in Hounsfield units: {100 * fraction:.2f} % of the voxels "
                        f"lie between {lo} and {hi} HU (air or fat: at least {100 * HU_AIR_FAT_MIN_FRACTION:g} % in "
                        "any abdominal CT); raw stored values (RescaleIntercept not applied, HU + 1024?) or "
                        "rescaled intensities (0..1?)", where)
    if high < HU_MIN_MAX:
        raise UserError(f"values {low}..{high} are not CT in Hounsfield units: no voxel reaches {HU_MIN_MAX} HU "
                        "(soft tissue, contrast, bone); values shifted down (RescaleIntercept applied twice?) or "
                        "no body in the volume", where)


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


def _frame_value(ds: Dataset, frame: int, sequence: str, keyword: str, where: Path) -> Any:
    """``keyword`` of ``frame`` (:func:`pancls.ct.functional.functional_value`: per-frame, shared, top level);
    a value pydicom cannot convert is a UserError naming it."""
    try:
        return functional_value(ds, keyword, sequence, frame)
    except Exception as exc:  # noqa: BLE001 - pydicom converts lazily and raises anything on a bad element
        raise UserError(f"{keyword}: unreadable value ({type(exc).__name__}: {exc})", where) from None


def _number(value: Any, name: str, where: Path) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{name} {value!r} is not a number", where) from None
    if not math.isfinite(number):
        raise UserError(f"{name} is {number}", where)
    return number


def _numbers(value: Any, name: str, where: Path, count: int) -> tuple[float, ...]:
    """Exactly ``count`` finite numbers (a multi-valued DS/FD element); UserError naming ``name`` otherwise."""
    values = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    if len(values) != count:
        raise UserError(f"{name} has {len(values)} value(s), expected {count}", where)
    return tuple(_number(v, name, where) for v in values)


def _get(ds: Dataset, keyword: str, where: Path) -> Any:
    """``ds.get(keyword)``; a value pydicom cannot convert (unknown VR, malformed string) is a UserError naming it."""
    try:
        return ds.get(keyword)
    except Exception as exc:  # noqa: BLE001 - pydicom converts lazily and raises anything on a bad element
        raise UserError(f"{keyword}: unreadable value ({type(exc).__name__}: {exc})", where) from None


def _integer(ds: Dataset, keyword: str, where: Path, low: int, high: int, default: int | None = None) -> int:
    """A one-valued integer element within ``low..high``; UserError otherwise (``default`` when absent)."""
    value = _get(ds, keyword, where)
    if value is None or value == "":
        if default is None:
            raise UserError(f"no {keyword}", where)
        return default
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        raise UserError(f"{keyword} has {len(value)} values, expected 1", where)
    try:
        number = int(value)
        exact = number == float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{keyword} {value!r} is not an integer", where) from None
    if not exact:
        raise UserError(f"{keyword} {value!r} is not an integer", where)
    if not low <= number <= high:
        raise UserError(f"{keyword} {number} is outside {low}..{high}", where)
    return number


@contextlib.contextmanager
def _header_errors(where: Path) -> Iterator[None]:
    """Turn an error raised while *reading header values* into a UserError naming ``where``: pydicom converts
    elements lazily, and a damaged one (unknown VR, malformed value) raises anything where it is first used."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring; pixel decoding is not wrapped by this
        raise UserError(f"unreadable header value ({type(exc).__name__}: {exc})", where) from None


def _frames_of(header: Header, path: Path) -> list[_Frame]:
    """Split one header into planes (see :func:`_parse_frames`), header errors refused (:func:`_header_errors`)."""
    with _header_errors(path):
        return _parse_frames(header, path)


def _parse_frames(header: Header, path: Path) -> list[_Frame]:
    """Split one header into planes, taking each attribute from the functional groups when present.

    Refused before anything is allocated: a matrix or frame count outside :data:`MAX_MATRIX` /
    :data:`MAX_FRAMES`, NumberOfFrames missing or disagreeing with the per-frame functional groups, a
    pixel format other than 8/16/32-bit integers with 1 <= BitsStored <= BitsAllocated, positions beyond
    :data:`MAX_POSITION_MM`, a RescaleSlope that is not > 0, and any value that is not a finite number
    of the right multiplicity.
    """
    ds = header.dataset
    has_groups = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence", path)
    n_frames = _integer(ds, "NumberOfFrames", path, 1, MAX_FRAMES, default=0 if per_frame else 1)
    if per_frame is not None and n_frames != len(per_frame):
        what = "no NumberOfFrames" if n_frames == 0 else f"NumberOfFrames {n_frames}"
        raise UserError(f"{what}, but {len(per_frame)} per-frame functional group item(s): frames would be "
                        "dropped or invented", path)
    if n_frames > 1 and not has_groups:
        raise UserError(f"multi-frame object ({n_frames} frames) without functional groups: "
                        "frame positions unknown", path)
    if _integer(ds, "SamplesPerPixel", path, 1, 4, default=1) != 1:
        raise UserError(f"not a grayscale image (SamplesPerPixel {ds.SamplesPerPixel})", path)
    if header.pixel_tag is None:
        raise UserError("no pixel data", path)
    shape = (_integer(ds, "Rows", path, 1, MAX_MATRIX), _integer(ds, "Columns", path, 1, MAX_MATRIX))
    if header.pixel_tag == PIXEL_DATA:
        allocated = _integer(ds, "BitsAllocated", path, 1, 64)
        if allocated not in (8, 16, 32):
            raise UserError(f"BitsAllocated {allocated}: a CT image has 8-, 16- or 32-bit integer pixels", path)
        _integer(ds, "BitsStored", path, 1, allocated)
        _integer(ds, "PixelRepresentation", path, 0, 1)
    return [_parse_frame(ds, f, shape, path) for f in range(n_frames)]


def _parse_frame(ds: Dataset, f: int, shape: tuple[int, int], path: Path) -> _Frame:
    """Plane ``f`` of ``ds``: its geometry and rescale, each from the functional groups of that frame when
    present (:func:`_frame_value`), checked as :func:`_parse_frames` says."""
    ipp = _frame_value(ds, f, "PlanePositionSequence", "ImagePositionPatient", path)
    iop = _frame_value(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient", path)
    spacing = _frame_value(ds, f, "PixelMeasuresSequence", "PixelSpacing", path)
    if ipp in (None, "") or iop in (None, "") or spacing in (None, ""):
        missing = [k for k, v in (("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop),
                                  ("PixelSpacing", spacing)) if v in (None, "")]
        raise UserError(f"frame {f} has no {', '.join(missing)}: it cannot be placed in space", path)
    slope = _frame_value(ds, f, "PixelValueTransformationSequence", "RescaleSlope", path)
    intercept = _frame_value(ds, f, "PixelValueTransformationSequence", "RescaleIntercept", path)
    if slope in (None, "") or intercept in (None, ""):
        raise UserError(f"frame {f} has no RescaleSlope/RescaleIntercept: HU cannot be computed", path)
    thickness = _frame_value(ds, f, "PixelMeasuresSequence", "SliceThickness", path)
    rescale_type = _frame_value(ds, f, "PixelValueTransformationSequence", "RescaleType", path)
    position = np.array(_numbers(ipp, "ImagePositionPatient", path, 3))
    if np.max(np.abs(position)) > MAX_POSITION_MM:
        raise UserError(f"ImagePositionPatient {position.tolist()} lies more than {MAX_POSITION_MM:g} mm "
                        "from the origin: not a patient position", path)
    pixel_spacing = _numbers(spacing, "PixelSpacing", path, 2)
    if min(pixel_spacing) <= 0 or max(pixel_spacing) > MAX_SPACING_MM:
        raise UserError(f"PixelSpacing {list(pixel_spacing)} must be > 0 and <= {MAX_SPACING_MM:g} mm", path)
    slope = _numbers(slope, "RescaleSlope", path, 1)[0]
    if slope <= 0:
        raise UserError(f"RescaleSlope {slope:g}: must be > 0 (0 would make every voxel the intercept)", path)
    return _Frame(
        path=path, index=f, ipp=position,
        iop=np.array(_numbers(iop, "ImageOrientationPatient", path, 6)),
        pixel_spacing=pixel_spacing, shape=shape, slope=slope,
        intercept=_numbers(intercept, "RescaleIntercept", path, 1)[0],
        rescale_type=str(rescale_type).strip() or None if rescale_type else None,
        slice_thickness=None if thickness in (None, "") else _numbers(thickness, "SliceThickness", path, 1)[0])


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


def _read_header(path: Path) -> Header:
    try:
        return read_dicom_header(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise UserError(f"cannot read DICOM file: {exception_text(exc, path)}", path) from None


def _native_stored(fh: BinaryIO, ds: Dataset, value_length: int) -> np.ndarray:
    """Stored values of native little-endian pixel data, read from ``fh`` (positioned at the value).

    ``BitsAllocated``-bit integers, signed when PixelRepresentation is 1. When BitsStored < BitsAllocated
    the unused high bits may hold anything (PS3.5 8.1.1): shifting left then right by the difference clears
    them (unsigned) or sign-extends (signed), exactly as pydicom's ``correct_unused_bits``.
    """
    allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
    dtype = np.dtype(f"<{'i' if int(ds.PixelRepresentation) == 1 else 'u'}{allocated // 8}")
    shape = (int(ds.get("NumberOfFrames") or 1), int(ds.Rows), int(ds.Columns))
    n_bytes = math.prod(shape) * dtype.itemsize
    if value_length not in (n_bytes, n_bytes + 1):  # + 1: the pad byte of an odd length
        raise ValueError(f"the pixel data element holds {value_length} bytes, Rows x Columns x frames x "
                         f"BitsAllocated say {n_bytes}: the header does not describe this pixel data")
    buffer = bytearray(n_bytes)  # writable, so that the bit correction below works in place
    if fh.readinto(buffer) != n_bytes:
        raise ValueError(f"the file ends inside the pixel data ({n_bytes} bytes expected): truncated?")
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    if stored < allocated:
        np.left_shift(array, allocated - stored, out=array)
        np.right_shift(array, allocated - stored, out=array)
    return array


def _stored_values(path: Path, header: Header) -> np.ndarray:
    """Decoded stored values of ``path``, ``(frames, rows, columns)``, reading only its pixel data element.

    The element starts at ``header.pixel_offset``: its tag (4 bytes), then with an explicit VR the VR and 2
    reserved bytes, then a 4-byte length (PS3.5 7.1.2). Native little-endian data of 8/16/32 bits is read
    straight into an array (:func:`_native_stored`); anything else goes to pydicom's decoder for the transfer
    syntax, reading from the open file. Files that cannot be addressed that way (Deflated, float pixel
    data) are decoded from a full read.
    """
    ds = header.dataset
    if header.pixel_offset is None or header.pixel_tag != PIXEL_DATA:
        return pydicom.dcmread(path).pixel_array
    implicit_vr, little_endian = ds.original_encoding
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    syntax = syntax or (pydicom.uid.ImplicitVRLittleEndian if implicit_vr else pydicom.uid.ExplicitVRLittleEndian)
    with open(path, "rb") as fh:
        fh.seek(header.pixel_offset)
        element = fh.read(8 if implicit_vr else 12)
        (value_length,) = struct.unpack("<I" if little_endian else ">I", element[-4:])
        if (not syntax.is_encapsulated and syntax.is_little_endian and not syntax.is_deflated
                and int(ds.BitsAllocated) in (8, 16, 32)):
            return _native_stored(fh, ds, value_length)
        array, _ = get_decoder(syntax).as_array(fh, **as_pixel_options(ds, transfer_syntax_uid=syntax,
                                                                          pixel_keyword="PixelData"))
    return array


def _stored_values_captured(path: Path, header: Header) -> tuple[np.ndarray, list[str]]:
    """:func:`_stored_values` in a worker process, returning its warnings too (the parent's routing of
    warnings does not reach a forked worker's stderr)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        array = _stored_values(path, header)
    return array, [f"{w.category.__name__}: {w.message}" for w in caught]


def _to_hu(stored: np.ndarray, frame: _Frame, out: np.ndarray) -> None:
    """``out[...] = rint(stored * slope + intercept)`` as int16; refuses values int16 cannot hold."""
    if frame.slope == 1.0 and frame.intercept == round(frame.intercept):
        # Integer rescale (nearly all CT): the range from the stored extremes, then one exact add into
        # ``out`` (numpy widens chunk by chunk inside the ufunc: no full-size temporary).
        intercept = int(frame.intercept)
        lo, hi = int(stored.min()) + intercept, int(stored.max()) + intercept
        hu = None
    else:
        hu = np.rint(stored.astype(np.float64) * frame.slope + frame.intercept)
        lo, hi = hu.min(), hu.max()
    if lo < INT16_MIN or hi > INT16_MAX:
        raise UserError(f"frame {frame.index}: rescaled values {lo:g}..{hi:g} do not fit int16 "
                        f"(slope {frame.slope:g}, intercept {frame.intercept:g}); not CT in HU?", frame.path)
    if hu is None:
        wide = np.int64 if stored.dtype.itemsize >= 4 else np.int32
        np.add(stored, intercept, out=out, dtype=wide, casting="unsafe")
    else:
        out[...] = hu


def _decode_failure(exc: BaseException, path: Path) -> str:
    """The reason for a decoder's failure. pydicom's "Unable to decode as exceptions were raised by all available
    plugins:" puts each plugin's reason on a line of its own (exception_text keeps the first line only, which
    says nothing): the first plugin's reason is kept instead."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    if len(lines) > 1 and "all available plugins" in lines[0]:
        first = exception_text(RuntimeError(lines[1]), path).split(": ", 1)[1]
        return f"damaged or truncated compressed pixel data ({first}; every installed decoder failed)"
    return f"cannot decode pixel data: {exception_text(exc, path)}"


def _decode_into(out: np.ndarray, path: Path, header: Header, targets: list[tuple[int, _Frame]],
                 stored: Callable[[], np.ndarray] | None = None) -> None:
    """Decode ``path`` and write each of its frames, converted to HU, into ``out[k]`` (k = sorted plane).

    ``stored`` returns the decoded stored values when they come from elsewhere (a worker process).
    """
    try:
        pixels = stored() if stored is not None else _stored_values(path, header)
    except Exception as exc:  # noqa: BLE001 - any decoder failure on user data is a bad file, not a bug
        raise UserError(_decode_failure(exc, path), path) from None
    pixels = pixels.reshape((-1,) + pixels.shape[-2:])
    if pixels.shape[1:] != targets[0][1].shape or len(pixels) <= max(fr.index for _, fr in targets):
        raise UserError(f"decoded pixel data has shape {pixels.shape}, the header says "
                        f"{int(header.dataset.get('NumberOfFrames') or 1)} x {targets[0][1].shape}", path)
    for k, frame in targets:
        _to_hu(pixels[frame.index], frame, out[k])


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


# Acquisition descriptors worth keeping; free-text fields that may carry names (descriptions,
# institution, operators, comments) are deliberately absent. The few kept free-text fields are listed in
# FREE_TEXT_META: pancls ingest drops them unless --keep-descriptions.
FREE_TEXT_META = ("contrast_bolus_agent",)
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
    "body_part_examined": "BodyPartExamined",
    "x_ray_tube_current_ma": "XRayTubeCurrent",
}
#: The sidecar's names for the acquisition fields (:func:`pancls.ct.write.sidecar_dict`): dcm2niix's BIDS
#: CamelCase keys (``ManufacturersModelName``, ``SliceThickness`` in mm), else the DICOM keyword.
SIDECAR_KEYS = {key: keyword for key, keyword in _META_KEYWORDS.items()}
SIDECAR_KEYS.update(manufacturer_model_name="ManufacturersModelName", slice_thickness_mm="SliceThickness")


def _acquisition_meta(ds: Dataset, frames: Iterable[_Frame]) -> dict[str, Any]:
    frames = list(frames)
    meta: dict[str, Any] = {"source": "dicom"}
    for key, keyword in _META_KEYWORDS.items():
        value = functional_value(ds, keyword)
        if value not in (None, ""):
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
    meta["n_slices"] = len(frames)
    return meta


def _is_compressed(header: Header) -> bool:
    ds = header.dataset
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return header.pixel_offset is not None and syntax is not None and syntax.is_encapsulated


def decode_processes(headers: Sequence[Header], workers: int | None = None) -> int:
    """Worker processes for decoding: more than one only for compressed pixel data (OpenJPEG holds the GIL),
    with at least ``MIN_COMPRESSED_FILES_PER_PROCESS`` such files per process, on Linux (fork start-up)."""
    if not sys.platform.startswith("linux"):
        return 1
    cpus = len(os.sched_getaffinity(0))
    compressed = sum(_is_compressed(h) for h in headers)
    return max(1, min(workers or cpus, cpus, compressed // MIN_COMPRESSED_FILES_PER_PROCESS))


def build_volume(paths: Sequence[str | os.PathLike], policy: GeometryPolicy | None = None,
                 workers: int | None = None, headers: Sequence[Header] | None = None) -> Volume:
    """Build the HU volume of ONE series from its DICOM files (see the module docstring for the rules).

    Parameters
    ----------
    paths : sequence of path-like
        The image files of one series, in any order: single-frame slices, or enhanced multi-frame
        file(s). Non-image objects and other series must already be excluded.
    policy : GeometryPolicy
        What to do with gaps, uneven spacing and gantry tilt (default: refuse each).
    workers : int, optional
        Threads reading headers and decoding pixel data; default :func:`~pancls.ct.scan.default_workers`
        (none for a small series). Compressed pixel data is decoded in up to ``workers`` forked processes
        instead (default :func:`decode_processes`); ``workers=1`` keeps everything in the calling thread.
    headers : sequence of Header, optional
        ``headers[i]`` is ``paths[i]``'s header as :func:`pancls.ct.scan.read_dicom_header` read it (e.g.
        :attr:`pancls.ct.scan.Series.headers`); read from the files when not given.

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
    policy = policy if policy is not None else GeometryPolicy()
    paths = [Path(p) for p in paths]
    headers = _headers_of(paths, workers, headers)
    where = _series_folder(paths)
    frames = _checked_frames(paths, headers, policy, where)
    row_cos, col_cos, geo, flags = _stack_geometry(frames, len(paths), policy, where)
    sorted_frames = [frames[i] for i in geo.order]
    header_of = dict(zip(paths, headers, strict=True))
    planes, decode_warnings = _decode_planes(sorted_frames, header_of, workers, where)
    with _header_errors(sorted_frames[0].path):
        meta = _acquisition_meta(header_of[sorted_frames[0].path].dataset, sorted_frames)
    if sorted_frames[0].rescale_type not in (None, "HU"):
        flags.append(f"rescale_type:{sorted_frames[0].rescale_type}")
    planes, spacing_k, origin = _slice_axis(planes, sorted_frames, geo, policy, flags, meta, where)
    dr, dc = geo.pixel_spacing
    spacing = np.array([dc, dr, spacing_k])
    affine = grid_affine(origin, row_cos, col_cos, spacing)
    if not np.all(np.isfinite(affine)):
        raise UserError("the slice positions and spacings give a non-finite affine", where)
    array = planes.transpose(2, 1, 0)
    meta.update(shape=list(array.shape), spacing_mm=[round(float(s), 6) for s in spacing])
    return Volume(array=array, affine=affine, spacing=spacing, flags=flags, meta=meta, warnings=decode_warnings)


def _headers_of(paths: list[Path], workers: int | None, headers: Sequence[Header] | None) -> list[Header]:
    """Step 1: the arguments checked, and each file's header (read here when the caller has none)."""
    if not paths:
        raise UserError("no DICOM files given", "build_volume")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}", "workers")
    if headers is not None and len(headers) != len(paths):
        raise ValueError(f"build_volume got {len(headers)} headers for {len(paths)} paths")
    if headers is None:
        headers = parallel_map(_read_header, paths, workers or default_workers(len(paths)))
    return list(headers)


def _checked_frames(paths: list[Path], headers: list[Header], policy: GeometryPolicy, where: Path) -> list[_Frame]:
    """Step 2: a decoder for every file, every plane of every file (:func:`_parse_frames`), one stack."""
    for path, header in zip(paths, headers, strict=True):
        with _header_errors(path):
            _check_decoder(header.dataset, path)
    frames = [fr for path, header in zip(paths, headers, strict=True) for fr in _frames_of(header, path)]
    with _header_errors(where):
        _check_one_stack([h.dataset for h in headers], frames, policy, where)
    return frames


def _stack_geometry(frames: list[_Frame], n_files: int, policy: GeometryPolicy, where: Path
                    ) -> tuple[np.ndarray, np.ndarray, StackGeometry, list[str]]:
    """Step 3: unit row/column cosines, the planes sorted along the normal and checked
    (:func:`pancls.ct.geometry.analyse_stack`), and the ``resampled:*`` flags the policy allows."""
    try:
        row_cos, col_cos = check_orientation(frames[0].iop)
    except ValueError as exc:
        raise UserError(str(exc), frames[0].path) from None
    labels = [fr.path.name + (f" frame {fr.index}" if len(frames) > n_files else "") for fr in frames]
    try:
        geo = analyse_stack(np.stack([fr.ipp for fr in frames]), row_cos, col_cos, frames[0].pixel_spacing,
                            policy, labels)
        flags = resample_flags(geo, policy)
    except ValueError as exc:
        raise UserError(str(exc), where) from None
    return row_cos, col_cos, geo, flags


def _decode_planes(sorted_frames: list[_Frame], header_of: dict[Path, Header], workers: int | None,
                   where: Path) -> tuple[np.ndarray, list[str]]:
    """Step 4: ``planes[k]`` = plane k in HU (int16, ``(K, rows, columns)``) and the decoders' warnings.

    The size is checked against :data:`MAX_VOXELS` before anything is allocated; each file is decoded once
    (all its frames), in forked processes for compressed data (:func:`decode_processes`), else in threads."""
    rows, cols = sorted_frames[0].shape
    if len(sorted_frames) * rows * cols > MAX_VOXELS:
        raise UserError(f"{len(sorted_frames)} x {rows} x {cols} voxels is more than the {MAX_VOXELS:,} pancls "
                        "converts (pancls.ct.volume.MAX_VOXELS)", where)
    planes = np.empty((len(sorted_frames), rows, cols), dtype=np.int16)
    by_file: dict[Path, list[tuple[int, _Frame]]] = {}
    for k, fr in enumerate(sorted_frames):
        by_file.setdefault(fr.path, []).append((k, fr))
    items = list(by_file.items())
    n_processes = decode_processes([header_of[path] for path, _ in items], workers)
    sinks: dict[Path, list[str]] = {path: [] for path, _ in items}
    if n_processes > 1:
        with ProcessPoolExecutor(n_processes, mp_context=multiprocessing.get_context("fork"),
                                 initializer=quiet_worker) as pool:
            futures = [pool.submit(_stored_values_captured, path, header_of[path]) for path, _ in items]
            for (path, targets), future in zip(items, futures, strict=True):
                _decode_into(planes, path, header_of[path], targets, functools.partial(_worker_result, future,
                                                                                       sinks[path]))
    else:
        def decode(item: tuple[Path, list[tuple[int, _Frame]]]) -> None:
            path, targets = item
            with collecting(sinks[path]):
                _decode_into(planes, path, header_of[path], targets)
        parallel_map(decode, items, workers or default_workers(len(header_of)))
    warnings = list(dict.fromkeys(f"{path.name}: {one_line(w)}" for path, sink in sinks.items() for w in sink))
    return planes, warnings


def _worker_result(future: Future, sink: list[str]) -> np.ndarray:
    """A worker's decoded stored values; its warnings go into ``sink``."""
    array, caught = future.result()
    sink.extend(caught)
    return array


def _slice_axis(planes: np.ndarray, sorted_frames: list[_Frame], geo: StackGeometry, policy: GeometryPolicy,
                flags: list[str], meta: dict[str, Any], where: Path) -> tuple[np.ndarray, float, np.ndarray]:
    """Step 5: ``(planes, spacing along the normal, LPS origin)``. A single plane takes its SliceThickness (1 mm
    and a flag when it has none); a regular stack its first-to-last mean interval; an irregular one the
    policy allowed is resampled onto its median interval (:func:`pancls.ct.geometry.resample_stack`).
    ``flags`` and ``meta`` are updated in place."""
    if len(sorted_frames) == 1:
        # One plane has no neighbour to measure spacing from; SliceThickness is the only hint there is.
        thickness = sorted_frames[0].slice_thickness
        if thickness is not None and not 0 < thickness <= MAX_SPACING_MM:
            raise UserError(f"single slice with SliceThickness {thickness:g}: its spacing is unknown", where)
        flags.append("single_slice")
        if thickness is None:
            flags.append("slice_spacing_assumed:1mm")  # no SliceThickness: the affine's k step is a guess
        return planes, thickness or 1.0, geo.ipp[0]
    if geo.is_regular:
        return planes, geo.uniform_spacing, geo.ipp[0]
    spacing_k = geo.typical_spacing
    fill = float(planes.min())  # scanners pad outside the reconstruction circle with the minimum
    stack, origin = resample_stack(planes, geo, spacing_k, fill, policy)
    meta.update(original_slice_positions_mm=np.round(geo.positions, 4).tolist(),
                original_intervals_mm=np.round(geo.intervals, 4).tolist(),
                tilt_deg=round(geo.tilt_deg, 4), resample_interpolation="linear", resample_fill_hu=fill)
    return np.rint(stack).astype(np.int16), spacing_k, origin  # convex combinations of int16: no overflow
