"""load_nifti on the real abdominal CT and on tiny broken files written in tmp_path."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pancls.ct.nifti import load_nifti
from pancls.errors import UserError


def _save(path: Path, data: np.ndarray, affine=None, code: int = 1, qform: bool = True) -> Path:
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(data, np.eye(4))  # a singular affine cannot go through the constructor's qform
    img.set_sform(affine, code=code)
    img.set_qform(affine if qform else None, code=code if qform else 0)
    nib.save(img, path)
    return path


def test_loads_real_abdominal_ct(ct_data):
    path = ct_data / "abdomen/example_ct_sm.nii.gz"
    exp = json.loads((ct_data / "abdomen/expected.json").read_text())["readers"]["ct"]["nibabel"]
    vol = load_nifti(path)
    assert vol.array.shape == tuple(exp["shape"]) == (122, 101, 30)
    assert vol.array.dtype == np.int16
    assert hashlib.sha256(vol.array.tobytes()).hexdigest() == exp["array"]["sha256"]
    np.testing.assert_allclose(vol.affine, exp["affine"], atol=1e-5)
    np.testing.assert_allclose(vol.spacing, [3.0, 3.0, 3.0])
    assert vol.flags == [] and vol.meta["axcodes"] == ["R", "A", "S"] and vol.meta["sform_code"] == 2


def test_trailing_singleton_dimension_is_dropped(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4, 1)
    vol = load_nifti(_save(tmp_path / "a.nii.gz", data))
    assert vol.array.shape == (2, 3, 4)
    np.testing.assert_array_equal(vol.array, data[..., 0])


def test_float_values_are_rounded_and_flagged(tmp_path):
    data = np.array([[[-1000.4, 40.6]]], dtype=np.float32)
    vol = load_nifti(_save(tmp_path / "f.nii.gz", data))
    assert vol.array.tolist() == [[[-1000, 41]]] and vol.flags == ["rounded"]


@pytest.mark.parametrize("make, message", [
    (lambda p: _save(p, np.array([[[0.0, np.nan], [np.inf, 1.0]]], dtype=np.float32)), "2 voxel"),
    (lambda p: _save(p, np.zeros((4, 5), dtype=np.int16)), r"expected a 3D volume, got shape \(4, 5\)"),
    (lambda p: _save(p, np.zeros((2, 2, 2, 3), dtype=np.int16)), "expected a 3D volume"),
    (lambda p: _save(p, np.zeros((2, 2, 2), dtype=np.int16), code=0), "neither sform nor qform"),
    (lambda p: _save(p, np.zeros((2, 2, 2), dtype=np.int16), affine=np.diag([1.0, 0.0, 1.0, 1.0]),
                          qform=False),
     "not invertible"),
    (lambda p: _save(p, np.full((2, 2, 2), 40000.0, dtype=np.float32)), "do not fit int16"),
    (lambda p: p.write_bytes(b"\x1f\x8bnot really gzip"), "cannot read"),
])
def test_unusable_files_are_refused(tmp_path, make, message):
    path = tmp_path / "bad.nii.gz"
    make(path)
    with pytest.raises(UserError, match=message) as err:
        load_nifti(path)
    assert err.value.where == str(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_nifti(tmp_path / "nope.nii.gz")
