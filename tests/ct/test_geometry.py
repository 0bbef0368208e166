"""Unit tests of slice-stack geometry on tiny synthetic stacks (no files)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pancls.config import from_dict
from pancls.ct.geometry import (
    GeometryError,
    GeometryPolicy,
    analyse_stack,
    check_orientation,
    grid_affine,
    median,
    resample_flags,
    resample_stack,
)
from pancls.errors import UserError

AXIAL = (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))


def _stack(z, shift_y=None):
    z = np.asarray(z, dtype=float)
    ipp = np.zeros((len(z), 3))
    ipp[:, 2] = z
    if shift_y is not None:
        ipp[:, 1] = shift_y
    return ipp


def _analyse(ipp, policy=None, iop=AXIAL, spacing=(1.0, 1.0)):
    return analyse_stack(ipp, *iop, spacing, policy or GeometryPolicy(), [f"f{i}" for i in range(len(ipp))])


def test_sorts_along_normal_not_input_order():
    geo = _analyse(_stack([10.0, 0.0, 5.0, 15.0]))
    assert geo.order.tolist() == [1, 2, 0, 3]
    assert geo.positions.tolist() == [0.0, 5.0, 10.0, 15.0]
    assert geo.is_regular and resample_flags(geo, GeometryPolicy()) == []


def test_sort_direction_follows_the_normal_of_the_orientation():
    # Column cosine -y: the normal is -z, so ascending along the normal is descending z.
    iop = (np.array([1.0, 0, 0]), np.array([0, -1.0, 0]))
    geo = _analyse(_stack([0.0, 5.0, 10.0]), iop=iop)
    assert geo.order.tolist() == [2, 1, 0]


def test_duplicate_position_is_refused_naming_files():
    with pytest.raises(ValueError, match=r"duplicate slice position z=5\.000.*f1 and f2"):
        _analyse(_stack([0.0, 5.0, 5.0, 10.0]))


def test_gap_is_reported_with_size_place_and_missing_count():
    geo = _analyse(_stack([0, 5, 10, 35, 40, 45]))
    assert geo.gaps == [2] and geo.uneven == [] and not geo.tilted
    with pytest.raises(GeometryError) as err:
        resample_flags(geo, GeometryPolicy())
    text = str(err.value)
    assert "gap of 25.00 mm between the slices at z=10.00 and z=35.00 mm" in text
    assert "4 slice(s) appear to be missing" in text and "on_gap" in text
    assert resample_flags(geo, GeometryPolicy(on_gap="resample")) == ["resampled:gap"]


def test_uneven_spacing_respects_tolerance():
    jitter = np.array([0, 5.004, 9.998, 15.003, 20.0])  # DICOM rounding: within 0.015 mm
    assert _analyse(_stack(jitter)).is_regular
    geo = _analyse(_stack([0, 5, 10, 14.5, 20]))
    assert geo.uneven == [2, 3] and not geo.gaps
    with pytest.raises(GeometryError, match=r"uneven slice spacing: intervals along the slice normal "
                                            r"5\.00/5\.00/4\.50/5\.50 mm"):
        resample_flags(geo, GeometryPolicy(on_gap="resample"))


def test_drift_without_single_bad_interval_is_uneven():
    # Each interval within 0.012 mm of the median, yet positions walk 0.057 mm off a uniform grid.
    z = np.concatenate([[0.0], np.cumsum([5.006] * 10 + [4.994] * 9)])
    geo = _analyse(_stack(z))
    assert not geo.gaps and not geo.uneven and geo.drift_mm > 0.015
    assert "uneven" in geo.problems(GeometryPolicy())


def test_tilt_angle_is_measured_from_positions():
    tilt = math.radians(18.5)
    z = np.arange(5) * 4.0
    geo = _analyse(_stack(z, shift_y=z * math.tan(tilt)))
    assert geo.tilted
    assert geo.tilt_deg == pytest.approx(18.5, abs=1e-6)
    with pytest.raises(GeometryError, match=r"gantry tilt: the slice stack runs 18\.5 degrees"):
        resample_flags(geo, GeometryPolicy())


def test_policy_from_yaml_is_strict():
    policy = from_dict(GeometryPolicy, {"on_gap": "resample", "spacing_tolerance_mm": 0.02}, "ingest.geometry")
    assert policy.on_gap == "resample" and policy.on_tilt == "refuse" and policy.spacing_tolerance_mm == 0.02
    with pytest.raises(UserError, match="unknown key"):
        from_dict(GeometryPolicy, {"on_gaps": "resample"}, "ingest.geometry")
    with pytest.raises(UserError, match="ingest.geometry.on_tilt"):
        from_dict(GeometryPolicy, {"on_tilt": "ignore"}, "ingest.geometry")
    with pytest.raises(UserError, match="max_gap_factor"):
        from_dict(GeometryPolicy, {"max_gap_factor": 0.5}, "ingest.geometry")


def test_check_orientation_rejects_non_orthonormal():
    with pytest.raises(ValueError, match="not two orthogonal unit vectors"):
        check_orientation([1, 0, 0, 0.5, 0.5, 0])
    r, c = check_orientation([1, 0, 0, 0, 0.948324, -0.317305])
    assert np.linalg.norm(c) == pytest.approx(1.0, abs=1e-12)


def test_grid_affine_is_ras_with_dicom_axes():
    r, c = np.array([0.0, 1, 0]), np.array([0.0, 0, -1])  # sagittal: rows along +y (P), columns along -z
    aff = grid_affine(np.array([10.0, 20.0, 30.0]), r, c, (0.5, 0.7, 2.0))
    # LPS (x, y, z) -> RAS (-x, -y, z); normal = r x c = (-1, 0, 0) in LPS.
    expected = np.array([[0, 0, 2.0, -10], [-0.5, 0, 0, -20], [0, -0.7, 0, 30], [0, 0, 0, 1]])
    np.testing.assert_allclose(aff, expected, atol=1e-12)


def _sample_planes(ipp, r, c, spacing, shape, field):
    """Planes whose pixel values are ``field(world LPS point)``."""
    rows, cols = shape
    jj, ii = np.mgrid[0:rows, 0:cols]
    return np.stack([field(p[None, None] + ii[..., None] * spacing[1] * r + jj[..., None] * spacing[0] * c)
                     for p in ipp])


def test_resample_reproduces_a_linear_field_on_a_tilted_uneven_stack():
    """Linear interpolation is exact on a linear field: every output voxel must equal the field at its
    world position, which checks positions, in-plane shifts and the affine together."""
    r, c = check_orientation([1, 0, 0, 0, 0.948324, -0.317305])
    n = np.cross(r, c)
    spacing = (0.5, 0.8)  # (between rows, between columns)
    depths = np.array([0.0, 4.0, 8.0, 9.1, 16.1])
    # The stack advances along +z (gantry tilt), so each plane is shifted within its own plane.
    ipp = np.array([[3.0, -2.0, 1.0]]) + (depths / n[2])[:, None] * np.array([0, 0, 1.0])
    field = lambda p: 2.0 * p[..., 0] - 3.0 * p[..., 1] + 5.0 * p[..., 2] + 7.0  # noqa: E731
    planes = _sample_planes(ipp, r, c, spacing, (40, 12), field)
    policy = GeometryPolicy(on_gap="resample", on_uneven="resample", on_tilt="resample")
    geo = _analyse(ipp, policy, iop=(r, c), spacing=spacing)
    assert set(resample_flags(geo, policy)) == {"resampled:gap", "resampled:uneven", "resampled:tilt"}
    out, origin = resample_stack(planes, geo, spacing=4.0, fill=np.nan, policy=policy)
    assert out.shape[0] == 5 and out.shape[1] > 40  # rows grow to hold the sheared footprints
    kk, jj, ii = np.mgrid[0:out.shape[0], 0:out.shape[1], 0:out.shape[2]]
    world = (origin + ii[..., None] * spacing[1] * r + jj[..., None] * spacing[0] * c
             + kk[..., None] * 4.0 * n)
    inside = np.isfinite(out)  # NaN fill marks (and spreads to) voxels outside some footprint
    assert inside.sum() > 1000
    np.testing.assert_allclose(out[inside], field(world)[inside], atol=1e-3)  # float32 output


def test_resample_without_tilt_keeps_original_planes_exactly():
    z = [0.0, 5.0, 10.0, 35.0, 40.0]
    rng = np.random.default_rng(0)
    planes = rng.integers(-1024, 2000, size=(5, 4, 3)).astype(np.int16)
    policy = GeometryPolicy(on_gap="resample")
    geo = _analyse(_stack(z), policy)
    out, origin = resample_stack(planes, geo, spacing=5.0, fill=-1024, policy=policy)
    assert out.shape == (9, 4, 3) and origin.tolist() == [0, 0, 0]
    for src, k in zip(range(5), [0, 1, 2, 7, 8], strict=True):
        np.testing.assert_array_equal(out[k], planes[src])
    np.testing.assert_allclose(out[4], 0.6 * planes[2] + 0.4 * planes[3], atol=1e-3)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 101])
def test_median_equals_numpy(n):
    values = np.random.default_rng(n).normal(5.0, 2.0, n)
    assert median(values) == np.median(values)
    assert median(np.sort(values)[::-1]) == np.median(values)  # order does not matter
