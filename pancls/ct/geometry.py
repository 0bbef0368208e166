"""Slice-stack geometry: sort, check and (when allowed) resample the planes of one CT series.

pancls decides a volume's geometry from the headers itself instead of trusting a reader's guess:

* Each 2D image is a plane in DICOM patient space (LPS, mm) with origin ``IPP`` (ImagePositionPatient,
  the centre of the first transmitted pixel), row direction ``r`` and column direction ``c``
  (ImageOrientationPatient). Its normal is ``n = r x c`` and its position along the stack is
  ``d = IPP . n``. Planes are sorted by ``d``, never by file name or InstanceNumber.
* A volume is a uniform orthogonal grid: plane ``k`` must sit at ``IPP_0 + k * s * n``. Three things break
  that, and each is refused unless :class:`GeometryPolicy` says to resample:

  - a *gap*: an interval ``> max_gap_factor x`` the typical (median) interval, e.g. missing files;
  - *uneven* spacing: other intervals that differ from the typical one by more than the tolerance;
  - *tilt* (a sheared stack, e.g. gantry tilt): the planes' origins drift within the plane, so the stack
    runs at an angle to ``n``.

  Readers that stack such series at one averaged spacing (ITK's ImageSeriesReader, MONAI's
  PydicomReader) misplace slices by millimetres while printing at most a warning.
* Resampling interpolates linearly: each output voxel at world point ``p`` takes the two planes
  bracketing ``p . n``, samples each bilinearly at the orthogonal projection of ``p`` onto that plane, and
  blends them by distance along ``n``. The output grid keeps the planes' orientation, so for an
  untilted stack only the slice positions change and original slices on the new grid keep their exact
  values; for a tilted one the in-plane extent grows to cover every plane (as dcm2niix's ``_Tilt_Eq``).

The NIfTI affine maps voxel ``(i, j, k)`` = (column, row, plane) to RAS mm::

    LPS = IPP_0 + i * dc * r + j * dr * c + k * s * n,      RAS = diag(-1, -1, 1) . LPS

with ``(dr, dc)`` = PixelSpacing (between rows, between columns) and ``s`` the spacing along ``n``.
Reference: DICOM PS3.3 C.7.6.2.1.1 (Image Position and Orientation); NIfTI-1 qform/sform convention.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Literal, Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

Action = Literal["refuse", "resample"]


@dataclass
class GeometryPolicy:
    """What to do with a slice stack that is not a uniform orthogonal grid (strict YAML via ``config.from_dict``).

    Attributes
    ----------
    on_gap, on_uneven, on_tilt : "refuse" or "resample"
        ``refuse`` (default) raises a :class:`~pancls.errors.UserError` describing the problem;
        ``resample`` interpolates onto a uniform orthogonal grid and flags the volume
        (``"resampled:gap"``, ``"resampled:uneven"``, ``"resampled:tilt"``).
    spacing_tolerance_mm, spacing_tolerance_rel : float
        A plane may sit at most ``spacing_tolerance_mm + spacing_tolerance_rel * s`` (default
        0.01 mm + 0.1 % of the slice spacing ``s``, i.e. 0.015 mm at 5 mm) from where the uniform grid puts
        it, along the normal (interval check) and within the plane (tilt check). DICOM positions are
        decimal strings rounded to 0.01 mm or finer, so this accepts rounding and nothing a radiologist
        could see.
    max_gap_factor : float
        An interval longer than ``max_gap_factor`` x the median interval is a gap (missing slices); it is
        reported with the number of slices that appear to be missing. Shorter irregular intervals are
        "uneven".
    orientation_tolerance : float
        Largest difference between two planes' direction cosines for them to count as one orientation
        (1e-4 ~ 0.006 degrees).
    """

    on_gap: Action = "refuse"
    on_uneven: Action = "refuse"
    on_tilt: Action = "refuse"
    spacing_tolerance_mm: float = 0.01
    spacing_tolerance_rel: float = 0.001
    max_gap_factor: float = 1.5
    orientation_tolerance: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("on_gap", "on_uneven", "on_tilt"):
            if getattr(self, name) not in ("refuse", "resample"):
                raise ValueError(f"{name} must be 'refuse' or 'resample', got {getattr(self, name)!r}")
        for name in ("spacing_tolerance_mm", "spacing_tolerance_rel", "orientation_tolerance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(self.max_gap_factor) and self.max_gap_factor > 1):
            raise ValueError(f"max_gap_factor must be > 1, got {self.max_gap_factor!r}")

    def tolerance(self, spacing: float) -> float:
        """Allowed position error in mm for a stack with slice spacing ``spacing``."""
        return self.spacing_tolerance_mm + self.spacing_tolerance_rel * abs(spacing)


class GeometryError(ValueError):
    """A stack that violates the policy; ``problems`` holds one sentence per violation."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def median(values: np.ndarray) -> float:
    """Median of a non-empty 1-D array: the middle value, or the mean of the two middle ones.

    The same number as ``np.median``, which imports ``numpy.ma`` on its first call (~20 ms, more than
    the whole geometry check of a series).
    """
    v = np.sort(np.asarray(values, dtype=np.float64))
    mid = len(v) // 2
    return float(v[mid]) if len(v) % 2 else float((v[mid - 1] + v[mid]) / 2)


def slice_normal(row_cosine: np.ndarray, col_cosine: np.ndarray) -> np.ndarray:
    """Unit normal ``n = r x c`` of a plane with ImageOrientationPatient ``(r, c)``."""
    n = np.cross(row_cosine, col_cosine)
    return n / np.linalg.norm(n)


def iop_normal(iop: Sequence[float] | None) -> np.ndarray | None:
    """:func:`slice_normal` of six ImageOrientationPatient cosines as a header gives them; None when they
    are missing, not 6 finite numbers, or (nearly) parallel (``|r x c| < 1e-6``): no plane to speak of."""
    if iop is None or len(iop) != 6:
        return None
    iop = np.asarray(iop, dtype=np.float64)
    if not np.all(np.isfinite(iop)):
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        n = np.cross(iop[:3], iop[3:])
        norm = float(np.linalg.norm(n))
    if not (math.isfinite(norm) and norm >= 1e-6):
        return None
    return n / norm


def check_orientation(iop: Sequence[float], tolerance: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Split ImageOrientationPatient into unit row/column cosines; ValueError unless they are orthonormal."""
    iop = np.asarray(iop, dtype=np.float64)
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        raise ValueError(f"ImageOrientationPatient must be 6 finite numbers, got {iop.tolist()}")
    r, c = iop[:3], iop[3:]
    if abs(np.linalg.norm(r) - 1) > tolerance or abs(np.linalg.norm(c) - 1) > tolerance or abs(r @ c) > tolerance:
        raise ValueError(f"ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors")
    # Re-orthonormalise so that rounding in the header does not leak into the affine.
    r = r / np.linalg.norm(r)
    c = c - (c @ r) * r
    return r, c / np.linalg.norm(c)


def affine_lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """DICOM patient space (LPS) -> NIfTI world (RAS): flip the first two world axes."""
    return LPS_TO_RAS @ affine_lps


def grid_affine(origin_lps: np.ndarray, row_cosine: np.ndarray, col_cosine: np.ndarray,
                spacing: Sequence[float]) -> np.ndarray:
    """RAS affine of voxel ``(i, j, k)`` = (column, row, plane) for an orthogonal grid.

    ``spacing`` is ``(column spacing, row spacing, plane spacing)`` = ``(dc, dr, s)`` in mm.
    """
    aff = np.eye(4)
    aff[:3, 0] = row_cosine * spacing[0]
    aff[:3, 1] = col_cosine * spacing[1]
    aff[:3, 2] = slice_normal(row_cosine, col_cosine) * spacing[2]
    aff[:3, 3] = origin_lps
    return affine_lps_to_ras(aff)


@dataclass
class StackGeometry:
    """Where each plane of a stack lies, in sorted order (ascending along the normal).

    ``order[k]`` is the input index of the k-th plane; ``positions`` its ``IPP . n`` (mm);
    ``offsets`` its in-plane drift from plane 0 as ``(along r, along c)`` in mm.
    """

    order: np.ndarray
    positions: np.ndarray
    offsets: np.ndarray
    ipp: np.ndarray
    row_cosine: np.ndarray
    col_cosine: np.ndarray
    pixel_spacing: tuple[float, float]
    gaps: List[int] = dataclasses.field(default_factory=list)
    uneven: List[int] = dataclasses.field(default_factory=list)
    drift_mm: float = 0.0
    tilted: bool = False
    tilt_deg: float = 0.0

    @property
    def intervals(self) -> np.ndarray:
        return np.diff(self.positions)

    @property
    def typical_spacing(self) -> float:
        """Median interval along the normal (the acquisition's slice spacing)."""
        return median(self.intervals) if len(self.positions) > 1 else float("nan")

    @property
    def uniform_spacing(self) -> float:
        """Mean interval, first to last plane: exact at both ends of a stack that passed the checks."""
        return float((self.positions[-1] - self.positions[0]) / (len(self.positions) - 1))

    @property
    def is_regular(self) -> bool:
        return not (self.gaps or self.uneven or self.drift_mm or self.tilted)

    def problems(self, policy: GeometryPolicy) -> dict[str, str]:
        """One human-readable sentence per violation, keyed by ``gap``, ``uneven``, ``tilt``."""
        out: dict[str, str] = {}
        d, steps, typical = self.positions, self.intervals, self.typical_spacing
        irregular = sorted(self.gaps + self.uneven)
        if len(steps) <= 12:
            spacing = f"intervals along the slice normal {'/'.join(f'{v:.2f}' for v in steps)} mm"
        else:
            shown = ", ".join(f"{steps[k]:.2f} mm at z={d[k]:.2f}" for k in irregular[:5])
            more = ", ..." if len(irregular) > 5 else ""
            spacing = f"{len(irregular)} of {len(steps)} intervals are irregular: {shown}{more}"
        if self.gaps:
            out["gap"] = "; ".join(
                f"gap of {steps[k]:.2f} mm between the slices at z={d[k]:.2f} and z={d[k + 1]:.2f} mm "
                f"(typical spacing {typical:.2f} mm); {max(round(steps[k] / typical) - 1, 1)} slice(s) appear "
                f"to be missing" for k in self.gaps)
        if self.uneven:
            out["uneven"] = (f"uneven slice spacing: {spacing} (typical {typical:.2f} mm, tolerance "
                             f"{policy.tolerance(typical):.3f} mm)")
        elif self.drift_mm:
            out["uneven"] = f"uneven slice spacing: positions drift up to {self.drift_mm:.3f} mm from a uniform grid"
        elif self.gaps:
            out["gap"] += f" ({spacing})"
        if self.tilted:
            shift = float(np.max(np.linalg.norm(self.offsets, axis=1)))
            out["tilt"] = (f"gantry tilt: the slice stack runs {self.tilt_deg:.1f} degrees off the slice normal "
                           f"(slices shift up to {shift:.2f} mm within their planes)")
        return out


def analyse_stack(ipp: np.ndarray, row_cosine: np.ndarray, col_cosine: np.ndarray,
                  pixel_spacing: tuple[float, float], policy: GeometryPolicy,
                  labels: Sequence[str]) -> StackGeometry:
    """Sort planes along the normal and classify their spacing and in-plane drift.

    ``ipp`` is ``(N, 3)`` LPS positions in input order; ``labels`` name the planes in error messages.
    Raises ValueError for duplicate positions (two planes closer than the tolerance).
    """
    ipp = np.asarray(ipp, dtype=np.float64)
    n = slice_normal(row_cosine, col_cosine)
    along = ipp @ n
    order = np.argsort(along, kind="stable")
    ipp_sorted, d = ipp[order], along[order]
    rel = ipp_sorted - ipp_sorted[0]
    offsets = np.stack([rel @ row_cosine, rel @ col_cosine], axis=1)
    geo = StackGeometry(order=order, positions=d, offsets=offsets, ipp=ipp_sorted, row_cosine=row_cosine,
                        col_cosine=col_cosine, pixel_spacing=pixel_spacing)
    if len(d) < 2:
        return geo
    steps = np.diff(d)
    duplicates = np.flatnonzero(steps <= policy.tolerance(0.0))
    if duplicates.size:
        k = duplicates[0]
        raise ValueError(f"duplicate slice position z={d[k]:.3f} mm along the normal "
                         f"({labels[order[k]]} and {labels[order[k + 1]]})")
    typical = median(steps)
    tol = policy.tolerance(typical)
    geo.gaps = [int(k) for k in np.flatnonzero(steps > policy.max_gap_factor * typical)]
    geo.uneven = [int(k) for k in np.flatnonzero(np.abs(steps - typical) > tol) if k not in geo.gaps]
    if not (geo.gaps or geo.uneven):
        grid = d[0] + np.arange(len(d)) * geo.uniform_spacing
        drift = float(np.max(np.abs(d - grid)))
        geo.drift_mm = drift if drift > tol else 0.0
    geo.tilted = bool(np.max(np.linalg.norm(offsets, axis=1)) > tol)
    stack = ipp_sorted[-1] - ipp_sorted[0]
    geo.tilt_deg = float(np.degrees(np.arccos(np.clip(abs(stack @ n) / np.linalg.norm(stack), 0.0, 1.0))))
    return geo


def resample_flags(geo: StackGeometry, policy: GeometryPolicy) -> list[str]:
    """Flags (``"resampled:<problem>"``) for the resampling ``policy`` allows on ``geo``.

    Raises GeometryError naming every problem of the stack (so that one run shows all of them) when the
    policy refuses any of them.
    """
    problems = geo.problems(policy)
    actions = {"gap": policy.on_gap, "uneven": policy.on_uneven, "tilt": policy.on_tilt}
    refused = [f"on_{key}" for key in problems if actions[key] == "refuse"]
    if refused:
        raise GeometryError(list(problems.values())
                            + [f"set geometry {'/'.join(refused)}: resample to interpolate onto a uniform grid"])
    return [f"resampled:{key}" for key in problems]


def _sample_translated(img: np.ndarray, sy: float, sx: float, out_shape: tuple[int, int],
                       fill: float) -> np.ndarray:
    """Bilinear sample of ``img`` at ``(y + sy, x + sx)`` for every output pixel ``(y, x)``; outside -> ``fill``."""
    iy, ix = math.floor(sy), math.floor(sx)
    fy, fx = sy - iy, sx - ix
    rows, cols = out_shape
    canvas = np.full((rows + 1, cols + 1), fill, dtype=np.float64)
    # Source rows iy..iy+rows and columns ix..ix+cols land on canvas[0..rows, 0..cols].
    y0, y1 = max(iy, 0), min(iy + rows + 1, img.shape[0])
    x0, x1 = max(ix, 0), min(ix + cols + 1, img.shape[1])
    if y0 < y1 and x0 < x1:
        canvas[y0 - iy:y1 - iy, x0 - ix:x1 - ix] = img[y0:y1, x0:x1]
    top = (1 - fx) * canvas[:-1, :-1] + fx * canvas[:-1, 1:]
    bottom = (1 - fx) * canvas[1:, :-1] + fx * canvas[1:, 1:]
    return (1 - fy) * top + fy * bottom


def resample_stack(planes: np.ndarray, geo: StackGeometry, spacing: float, fill: float,
                   policy: GeometryPolicy) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate sorted planes ``(N, rows, cols)`` onto a uniform orthogonal grid with plane spacing ``spacing``.

    Returns ``(stack, origin_lps)``: ``stack`` is float32 ``(K, rows', cols')`` (exact to ~1e-3 HU, half the
    memory of float64 for a whole CT) and ``origin_lps`` the world
    position of its voxel (0, 0, 0). Output planes run from plane 0 to the last whole step before the last
    input plane. Pixels outside every input plane's footprint (only with tilt) get ``fill``.
    """
    dr, dc = geo.pixel_spacing
    d = geo.positions
    tol = policy.tolerance(spacing)
    # In-plane drift in pixels; below tolerance it is rounding and the planes are used unshifted.
    shift_c = geo.offsets[:, 0] / dc if geo.tilted else np.zeros(len(d))
    shift_r = geo.offsets[:, 1] / dr if geo.tilted else np.zeros(len(d))
    c0, r0 = math.floor(shift_c.min() + 1e-6), math.floor(shift_r.min() + 1e-6)
    cols = math.ceil(shift_c.max() - 1e-6) - c0 + planes.shape[2]
    rows = math.ceil(shift_r.max() - 1e-6) - r0 + planes.shape[1]
    n_out = int(math.floor((d[-1] - d[0] + tol) / spacing)) + 1
    out = np.empty((n_out, rows, cols), dtype=np.float32)

    def plane_on_grid(k: int) -> np.ndarray:
        sy, sx = r0 - shift_r[k], c0 - shift_c[k]
        if sy == 0 and sx == 0 and (rows, cols) == planes.shape[1:]:
            return planes[k].astype(np.float64)
        return _sample_translated(planes[k], sy, sx, (rows, cols), fill)

    cache: dict[int, np.ndarray] = {}
    for m in range(n_out):
        z = d[0] + m * spacing
        k = int(np.clip(np.searchsorted(d, z, side="right") - 1, 0, len(d) - 2))
        t = float(np.clip((z - d[k]) / (d[k + 1] - d[k]), 0.0, 1.0))
        needed = {k} if abs(z - d[k]) <= tol else {k + 1} if abs(z - d[k + 1]) <= tol else {k, k + 1}
        cache = {j: cache[j] if j in cache else plane_on_grid(j) for j in needed}
        if needed == {k}:
            out[m] = cache[k]
        elif needed == {k + 1}:
            out[m] = cache[k + 1]
        else:
            out[m] = (1 - t) * cache[k] + t * cache[k + 1]
    origin = geo.ipp[0] + c0 * dc * geo.row_cosine + r0 * dr * geo.col_cosine
    return out, origin
