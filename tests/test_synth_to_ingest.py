"""End to end: a synthetic phantom exported as a DICOM series (unsorted names, a localizer in the
folder) goes through `pancls ingest` and comes back voxel for voxel, at the same world positions."""
import nibabel as nib
import numpy as np
import pandas as pd

from pancls.cli import main
from pancls.data.synth import generate_phantom
from pancls.data.synth_dicom import write_ct_series


def test_synthetic_dicom_series_round_trips_through_ingest(tmp_path, capsys):
    phantom = generate_phantom("NET", 0, seed=3, size=(48, 40, 20), spacing=(2.0, 2.0, 3.0))
    write_ct_series(tmp_path / "dicom" / "SYN0001", phantom.image, phantom.affine, "SYN0001", seed=3)

    code = main(["ingest", str(tmp_path / "dicom"), "--out", str(tmp_path / "out"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err

    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert len(manifest) == 1  # the localizer is not a second volume
    assert "SYN0001" not in (tmp_path / "out" / "manifest.csv").read_text()  # no patient id in outputs
    inventory = pd.read_csv(tmp_path / "out" / ".private" / "inventory.csv")
    assert (inventory["reason"].astype(str).str.contains("localizer")).sum() == 1

    ingested = nib.as_closest_canonical(nib.load(tmp_path / "out" / manifest.loc[0, "image"]))
    original = nib.as_closest_canonical(nib.Nifti1Image(phantom.image, phantom.affine))
    np.testing.assert_allclose(ingested.affine, original.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(ingested.dataobj), np.asarray(original.dataobj))
