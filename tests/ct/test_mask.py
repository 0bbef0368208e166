"""pancls.ct.mask: the mask formats give the same labels and RAS affine; onto_grid tells reorientation
from resampling."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from pancls.ct.mask import onto_grid, read_mask


def test_nrrd_reads_like_the_nifti_it_was_written_from(ct_data: Path, tmp_path: Path):
    import SimpleITK as sitk

    nifti = ct_data / "abdomen" / "pancreas_mask.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(tmp_path / "mask.nrrd"))  # ITK: LPS in the file
    labels, affine, kind = read_mask(tmp_path / "mask.nrrd")
    ref, ref_affine, _ = read_mask(nifti)
    assert kind == "itk" and np.array_equal(labels, ref) and np.allclose(affine, ref_affine, atol=1e-4)


def test_onto_grid_flip_is_a_reorientation_and_half_resolution_a_resampling():
    rng = np.random.default_rng(0)
    labels = (rng.random((6, 5, 4)) > 0.7).astype(np.uint8)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    flip = affine @ np.array([[-1, 0, 0, 5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    out, how = onto_grid(labels[::-1], flip, labels.shape, affine, 1e-3)
    assert how == "reoriented" and np.array_equal(out, labels)
    fine = np.diag([1.0, 1.0, 3.0, 1.0])
    out, how = onto_grid(labels, affine, (12, 10, 4), fine, 1e-3)
    assert how == "resampled" and out.sum() > 0
    # a nibabel image round trip keeps the grid
    assert nib.aff2axcodes(flip) == ("L", "A", "S")
