"""`pancls export`: a MONAI bundle that MONAI's own tools verify and run, giving `pancls predict`'s probabilities."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pancls.bundle import SCHEMA_FILE, FoldEnsemble
from pancls.cli import main


@pytest.fixture(scope="module")
def bundles(cv_runs, tmp_path_factory):
    out = {}
    for roi, run in cv_runs.items():
        target = tmp_path_factory.mktemp("bundle") / roi
        assert main(["export", str(run), "--out", str(target)]) == 0
        out[roi] = target
    return out


def test_layout_and_metadata_verify_with_monai(bundles):
    from monai.bundle import verify_metadata

    for bundle in bundles.values():
        for name in ("configs/metadata.json", "configs/inference.json", "models/model.ts", "models/model.pt",
                     "docs/README.md", "docs/license.txt"):
            assert (bundle / name).is_file(), name
        verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA_FILE))
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["0"] == "PDAC"
    # the schema does check something: a metadata without a mandatory key fails
    meta = json.loads((bundles["mask"] / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["num_channels"]
    broken = bundles["mask"].parent / "broken.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_channels"):
        verify_metadata(meta_file=str(broken), filepath=str(SCHEMA_FILE))


def test_torchscript_is_the_fold_ensemble(bundles, cv_runs):
    from pancls.predict import load_run

    loaded = load_run(cv_runs["centre"], device="cpu")
    eager = FoldEnsemble([f.model for f in loaded.folds], [f.temperature for f in loaded.folds]).eval()
    from monai.data import load_net_with_metadata

    scripted, meta, extra = load_net_with_metadata(str(bundles["centre"] / "models" / "model.ts"),
                                                   more_extra_files=("inference.json",))
    assert meta == json.loads((bundles["centre"] / "configs" / "metadata.json").read_text())  # MONAI's TS format
    assert json.loads(extra["inference.json"]) == json.loads((bundles["centre"] / "configs" / "inference.json").read_text())
    x = torch.rand(3, 1, 16, 16, 8)
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager(x), atol=1e-6)
        assert torch.allclose(eager(x).sum(1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("roi", ["mask", "centre"])
def test_monai_bundle_run_gives_the_predict_probabilities(bundles, cv_runs, ct_data, tmp_path, roi):
    image = ct_data / "abdomen" / "example_ct_sm.nii.gz"
    mask = ct_data / "abdomen" / "pancreas_mask.nii.gz"
    extra = ["--mask", str(mask)] if roi == "mask" else []
    bundle = bundles[roi]
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                           "--image", str(image), *extra], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads((bundle / "eval" / "probabilities.json").read_text())
    out = tmp_path / "p.json"
    assert main(["predict", str(image), *extra, "--model", str(cv_runs[roi]), "--out", str(out)]) == 0
    expected = json.loads(out.read_text())["studies"][0]
    classes = list(expected["probabilities"])
    assert np.allclose([got["probabilities"][c] for c in classes], [expected["probabilities"][c] for c in classes],
                       atol=1e-5)
    assert got["predicted"] == expected["predicted"]


def _bundle_run(bundle, image, mask):
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                           "--image", str(image), "--mask", str(mask)], capture_output=True, text=True, timeout=300)


def test_the_bundle_aligns_or_refuses_a_mask_as_predict_does(bundles, cv_runs, ct_data, tmp_path):
    """A mask cropped to its extent (same grid, shifted origin, as DICOM SEG stores it) gives the full mask's
    answer; one half a voxel off the grid is refused, by predict and by the bundle alike (LoadImaged alone read
    both as if they lay on the image's grid: a crop in the wrong place, silently)."""
    import nibabel as nib

    image = ct_data / "abdomen" / "example_ct_sm.nii.gz"
    full = nib.load(ct_data / "abdomen" / "pancreas_mask.nii.gz")
    data = np.asarray(full.dataobj)
    lo = np.argwhere(data > 0).min(0)
    hi = np.argwhere(data > 0).max(0) + 1
    shift = np.eye(4)
    shift[:3, 3] = lo
    cropped = tmp_path / "cropped.nii.gz"
    nib.save(nib.Nifti1Image(data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], full.affine @ shift), cropped)
    off = full.affine.copy()
    off[:3, 3] += 0.5 * np.abs(np.diag(full.affine)[:3])
    halfway = tmp_path / "halfway.nii.gz"
    nib.save(nib.Nifti1Image(data, off), halfway)

    bundle = bundles["mask"]
    assert _bundle_run(bundle, image, ct_data / "abdomen" / "pancreas_mask.nii.gz").returncode == 0
    whole = json.loads((bundle / "eval" / "probabilities.json").read_text())
    done = _bundle_run(bundle, image, cropped)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads((bundle / "eval" / "probabilities.json").read_text())
    assert got["probabilities"] == pytest.approx(whole["probabilities"], abs=1e-6)
    done = _bundle_run(bundle, image, halfway)
    assert done.returncode != 0 and "not on the image's voxel grid" in done.stderr
    out = tmp_path / "p.json"
    assert main(["predict", str(image), "--mask", str(halfway), "--model", str(cv_runs["mask"]), "--out", str(out)]) == 1
    assert "not on the image's voxel grid" in json.loads(out.read_text())["studies"][0]["error"]


def test_export_refusals_leave_nothing_behind(cv_runs, tmp_path, capsys):
    target = tmp_path / "b"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    assert main(["export", str(cv_runs["centre"]), "--out", str(target)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no half-built bundle beside it


def test_export_never_replaces_its_own_run_and_checks_what_it_loads(cv_runs, tmp_path, capsys):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cv_runs["centre"], run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out in (run, run / "fold_0", tmp_path):  # the run, inside it, or holding it: --force would delete it
        assert main(["export", str(run), "--out", str(out), "--force"]) == 2
        assert "would delete the run" in capsys.readouterr().err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    # an unwritable place is refused before the models load (no one creates files in /proc, root included)
    assert main(["export", str(run), "--out", "/proc/pancls_bundle"]) == 2
    assert "cannot write into the --out's parent folder" in capsys.readouterr().err
    # a temperature that is not a number > 0 (0 gave a bundle returning NaN)
    record = json.loads((run / "fold_1" / "fold.json").read_text())
    for bad in (0, None, "1.2", -1.0):
        (run / "fold_1" / "fold.json").write_text(json.dumps(dict(record, temperature=bad)))
        assert main(["export", str(run), "--out", str(tmp_path / "b")]) == 2
        assert "temperature" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_export_removes_a_build_a_kill_left(cv_runs, tmp_path):
    import os
    import stat

    left = tmp_path / ".b.bundle-abc123"  # what a SIGKILL mid-export leaves (its lock died with the process)
    (left / "models").mkdir(parents=True)
    (left / ".lock").touch()
    (left / "models" / "model.ts").write_bytes(b"half")
    assert main(["export", str(cv_runs["centre"]), "--out", str(tmp_path / "b")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert not (tmp_path / "b" / ".lock").exists()
    assert stat.S_IMODE(os.stat(tmp_path / "b").st_mode) == 0o755
