"""check_ct_hu: the one rule ingest and predict apply before converting or classifying a volume (is it CT in HU?)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pancls.ct.geometry import GeometryPolicy
from pancls.ct.nifti import load_nifti
from pancls.ct.volume import Volume, build_volume, check_ct_hu
from pancls.errors import UserError

RESAMPLE = GeometryPolicy(on_gap="resample", on_uneven="resample", on_tilt="resample")


def _real_volumes(ct_data: Path) -> dict:
    nifti = load_nifti(ct_data / "abdomen" / "example_ct_sm.nii.gz")
    crop = nifti.array[30:69, 47:68, 2:20]  # the pancreas' bounding box: no outside air, fat around it
    return {
        "abdomen nifti": nifti,
        "pancreas crop": Volume(np.ascontiguousarray(crop), nifti.affine, nifti.spacing),
        "abdomen dicom": build_volume(sorted((ct_data / "abdomen" / "dicom_series").iterdir())),
        "phantom": build_volume(sorted((ct_data / "series_ct" / "S21570" / "S2010").iterdir())),
        "jpeg2000": build_volume([ct_data / "jpeg2000" / "693_J2KR.dcm"]),
        "gap": build_volume(sorted((ct_data / "gap" / "removed_slices").iterdir()), RESAMPLE),
        "tilt": build_volume(sorted((ct_data / "gap" / "tilt_variable_spacing").iterdir()), RESAMPLE),
    }


@pytest.fixture(scope="module")
def real_volumes(ct_data):
    return _real_volumes(ct_data)


def test_every_real_ct_fixture_is_accepted(real_volumes):
    for name, volume in real_volumes.items():
        check_ct_hu(volume, name)  # none refused, the tight crop around the pancreas included


def _shifted(volume: Volume, transform) -> Volume:
    array = np.rint(transform(volume.array.astype(np.float64))).astype(np.int16)
    return Volume(array, volume.affine, volume.spacing)


@pytest.mark.parametrize("what, transform, reason", [
    ("stored values (HU + 1024)", lambda a: a + 1024, "raw stored values"),
    ("rescaled to 0..1", lambda a: (a - a.min()) / (a.max() - a.min()), "rescaled intensities"),
    ("rescaled to 0..1000", lambda a: 1000 * (a - a.min()) / (a.max() - a.min()), "rescaled intensities"),
    ("padding kept, HU + 1024", lambda a: np.where(a < -1500, -2000, a + 1024), "raw stored values"),
    ("intercept applied twice", lambda a: a - 1024, "applied twice"),
])
def test_values_that_are_not_hu_are_refused(real_volumes, what, transform, reason):
    # applied twice, the bone and contrast of a whole abdomen still reach 50: only the phantom and the crop fail
    names = ["pancreas crop", "phantom"] + (["abdomen nifti", "abdomen dicom", "jpeg2000"] if "twice" not in what
                                            else [])
    for name in names:
        with pytest.raises(UserError, match=reason) as info:
            check_ct_hu(_shifted(real_volumes[name], transform), name)
        assert str(info.value).startswith(f"{name}: values ") and "\n" not in str(info.value), what


def test_a_rescale_type_other_than_hu_is_refused(enhanced_file):
    volume = build_volume([enhanced_file])  # the NEMA rCBF perfusion map: the reader reads it faithfully
    assert "rescale_type:US" in volume.flags
    with pytest.raises(UserError, match=r"RescaleType US: the values are not Hounsfield units"):
        check_ct_hu(volume, enhanced_file)
