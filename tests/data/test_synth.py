"""The synthetic CT demo dataset: determinism, counts, per-subtype features, files, DICOM subset, difficulty."""
from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage
from threadpoolctl import threadpool_limits

from pancls.cli import main
from pancls.data.classes import DEFAULT_CLASSES
from pancls.data.manifest import load_manifest
from pancls.data.synth import (
    PAPER_COUNTS,
    SynthConfig,
    generate_dataset,
    generate_phantom,
    load_synth_config,
    plan_patients,
    scaled_counts,
)
from pancls.errors import UserError

SAMPLES = 4  # phantoms per class for the feature checks
_MEDIANS: dict = {}


def _median3(ph) -> np.ndarray:
    """3x3x3 median-filtered image (fluid vs tissue, not noise), computed once per phantom."""
    if id(ph) not in _MEDIANS:
        _MEDIANS[id(ph)] = ndimage.median_filter(ph.image, 3)
    return _MEDIANS[id(ph)]


@pytest.fixture(scope="module")
def phantoms():
    with threadpool_limits(1):
        return {c: [generate_phantom(c, k, seed=7) for k in range(SAMPLES)] for c in DEFAULT_CLASSES}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    config = SynthConfig(counts={c: 1 for c in DEFAULT_CLASSES}, min_per_class=1, seed=3, dicom_subset=1)
    summary = generate_dataset(out, config, workers=2, progress=False)
    return out, config, summary


def _lesion_and_pancreas(ph):
    lesion = ph.image[ph.lesion > 0].astype(float)
    rest = ph.image[(ph.pancreas > 0) & (ph.lesion == 0)].astype(float)
    return lesion, rest


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_volume_other_seed_differs():
    a, b = generate_phantom("SCN", 2, seed=5), generate_phantom("SCN", 2, seed=5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.lesion, b.lesion)
    c = generate_phantom("SCN", 2, seed=6)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.int16 and a.image.shape == (96, 96, 48)


@pytest.mark.parametrize("label, k, seed, digests", [
    ("PDAC", 0, 0, ("ca0017a94f7f0b02", "355cb20f84047061", "6263587aa5850159")),
    ("CP", 1, 7, ("a5c1dc771a54c8a1", "bd55ec355a2272ae", "9a2e2eec5452123c")),
    ("IPMN", 2, 3, ("b2120f8f3f591534", "eee725292cce80e7", "61167f5add249a20")),
])
def test_cohort_is_bit_identical_to_its_recorded_hashes(label, k, seed, digests):
    # sha256 (first 16 hex digits) of image, lesion and pancreas, recorded before generate_phantom was split into
    # named steps: the painting order is part of the cohort's definition, a refactor must not move a draw
    import hashlib

    with threadpool_limits(1):
        ph = generate_phantom(label, k, seed=seed)
    assert tuple(hashlib.sha256(a.tobytes()).hexdigest()[:16] for a in (ph.image, ph.lesion, ph.pancreas)) == digests


def test_scaling_keeps_the_patients_it_keeps():
    config = SynthConfig(seed=4)
    small = {(s.label, s.k) for s in plan_patients(config, 0.05)}
    large = {(s.label, s.k) for s in plan_patients(config, 0.2)}
    assert small < large  # a patient's volume is seeded by (seed, label, k) only


# ---------------------------------------------------------------------------------------------- counts


def test_paper_scale_counts():
    counts = scaled_counts(SynthConfig(), 1.0)
    assert counts == PAPER_COUNTS and sum(counts.values()) == 530
    assert list(counts) == list(DEFAULT_CLASSES)


def test_scaled_counts_round_half_up_with_minimum():
    assert scaled_counts(SynthConfig(), 0.1) == {"PDAC": 32, "IPMN": 8, "NET": 6, "SCN": 5, "ASC": 4, "CP": 4}
    assert scaled_counts(SynthConfig(min_per_class=2), 0.1)["CP"] == 2


def test_plan_labels_match_counts_and_ids_are_unique():
    config = SynthConfig(seed=1)
    plan = plan_patients(config, 0.1)
    labels = [s.label for s in plan]
    assert {c: labels.count(c) for c in DEFAULT_CLASSES} == scaled_counts(config, 0.1)
    ids = [s.patient_id for s in plan]
    assert ids == [f"SYN{i:04d}" for i in range(1, len(plan) + 1)]
    assert labels != sorted(labels, key=DEFAULT_CLASSES.index)  # shuffled: the id does not give the class away


# ---------------------------------------------------------------------------------------------- appearance


def test_masks_non_empty_inside_body_and_pancreas_present(phantoms):
    for c, items in phantoms.items():
        for ph in items:
            assert ph.lesion.sum() > 0, c
            assert ph.pancreas.sum() > 100, c
            assert (ph.image[ph.lesion > 0] > -300).all(), c  # soft tissue / fluid / calcium, never air outside
            for axis in range(3):  # and not touching the volume border
                profile = ph.lesion.any(axis=tuple(a for a in range(3) if a != axis))
                assert not profile[0] and not profile[-1], c


def _contrast_to_parenchyma(ph):
    """Median HU of the lesion minus that of the pancreatic parenchyma within 15 mm of it (3x3x3 median-filtered).

    Parenchyma = pancreas outside the lesion, excluding fluid (> 30 HU): the duct is not parenchyma.
    """
    smooth = _median3(ph)
    lesion = ph.lesion > 0
    near = ndimage.distance_transform_edt(~lesion, sampling=(2.0, 2.0, 3.0)) <= 15
    parenchyma = (ph.pancreas > 0) & ~lesion & near & (smooth > 30)
    return float(np.median(smooth[lesion]) - np.median(smooth[parenchyma]))


def test_pdac_hypo_and_net_hyper_attenuating(phantoms):
    pdac = [_contrast_to_parenchyma(ph) for ph in phantoms["PDAC"]]
    net = [_contrast_to_parenchyma(ph) for ph in phantoms["NET"]]
    assert max(pdac) < 0, pdac
    assert np.mean(net) > 15 and sum(d > 0 for d in net) >= SAMPLES - 1, net


def _fluid_fraction(ph):
    lesion = _median3(ph)[ph.lesion > 0]
    return float(((lesion > -20) & (lesion < 30)).mean())


def test_cystic_lesions_contain_fluid(phantoms):
    solid = np.mean([_fluid_fraction(ph) for ph in phantoms["NET"]])
    for c in ("IPMN", "SCN"):
        fractions = [_fluid_fraction(ph) for ph in phantoms[c]]
        assert min(fractions) > 0.1, (c, fractions)
        assert np.mean(fractions) > 2 * solid, (c, fractions, solid)


def test_cp_has_calcifications_in_the_pancreas(phantoms):
    with_calcium = [int((ph.image[ph.lesion > 0] > 300).sum()) for ph in phantoms["CP"]]
    assert sum(n > 0 for n in with_calcium) >= SAMPLES - 1, with_calcium
    assert all(ph.lesion.sum() <= ph.pancreas.sum() + 200 for ph in phantoms["CP"])  # the gland, not a mass


def _centre_minus_rim(ph):
    """Median HU of the lesion's core minus that of its wall (depth bands; outer partial-volume voxels left out)."""
    depth = ndimage.distance_transform_edt(ph.lesion > 0, sampling=(2.0, 2.0, 3.0))
    smooth = _median3(ph)
    centre = smooth[depth >= 0.75 * depth.max()]
    rim = smooth[(depth > 0.3 * depth.max()) & (depth <= 0.6 * depth.max())]
    return float(np.median(centre) - np.median(rim))


def test_asc_necrotic_centre_darker_than_rim_unlike_solid_masses(phantoms):
    asc = [_centre_minus_rim(ph) for ph in phantoms["ASC"]]
    solid = [_centre_minus_rim(ph) for c in ("PDAC", "NET") for ph in phantoms[c]]
    assert max(asc) < -20, asc
    assert min(solid) > -10, solid


# ---------------------------------------------------------------------------------------------- files


def test_manifest_is_valid_and_complete(dataset):
    out, config, summary = dataset
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["patient_id", "image", "mask", "label"]
    assert sorted(r["label"] for r in rows) == sorted(DEFAULT_CLASSES)
    manifest = load_manifest(out / "manifest.csv", DEFAULT_CLASSES)  # checks paths, headers, mask grids
    assert len(manifest) == 6 and summary["written"] == 6
    readme = (out / "README.md").read_text()
    assert "seed 3" in readme and "assumption" in readme


def test_nifti_is_ras_and_equals_the_generator(dataset):
    out, config, _ = dataset
    for spec in plan_patients(config):
        image = nib.load(out / "images" / f"{spec.patient_id}.nii.gz")
        mask = nib.load(out / "masks" / f"{spec.patient_id}_lesion.nii.gz")
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert np.allclose(image.affine, mask.affine) and image.shape == mask.shape
        assert np.allclose(image.header.get_zooms(), config.spacing)
        expected = generate_phantom(spec.label, spec.k, config.seed, config.size, config.spacing)
        assert np.array_equal(np.asanyarray(image.dataobj), expected.image)
        assert np.array_equal(np.asanyarray(mask.dataobj), expected.lesion)


def test_rerun_skips_and_other_parameters_are_refused(dataset):
    out, config, _ = dataset
    before = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    again = generate_dataset(out, config, workers=1, progress=False)
    assert again["written"] == 0 and again["skipped"] == 6
    assert before == {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    with pytest.raises(UserError, match="other parameters"):
        generate_dataset(out, SynthConfig(counts=config.counts, min_per_class=1, seed=4), progress=False)
    # no temporary leftovers (.synth.lock stays: the one-writer lock)
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name != ".synth.lock"]


def test_dicom_subset_matches_nifti(dataset):
    out, config, _ = dataset
    pid = plan_patients(config)[0].patient_id
    folder = out / "dicom" / pid
    datasets = {p.name: pydicom.dcmread(p) for p in folder.iterdir()}
    localizers = [n for n, ds in datasets.items() if "LOCALIZER" in ds.ImageType]
    axial = {n: ds for n, ds in datasets.items() if n not in localizers}
    assert len(localizers) == 1 and len(axial) == config.size[2]
    ds = next(iter(axial.values()))
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT" and ds.PatientID == pid
    assert (ds.RescaleSlope, ds.RescaleIntercept, ds.PixelRepresentation) == (1, -1024, 0)
    by_name = [axial[n].InstanceNumber for n in sorted(axial)]
    assert by_name != sorted(by_name) and by_name != sorted(by_name, reverse=True)  # names sort out of order

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), ds.SeriesInstanceUID))
    volume = reader.Execute()
    nifti = nib.load(out / "images" / f"{pid}.nii.gz")
    # SimpleITK: array [z, y, x] in LPS with identity direction; RAS voxel (i, j, k) = LPS (nx-1-i, ny-1-j, k)
    lps = sitk.GetArrayFromImage(volume).transpose(2, 1, 0)
    assert np.array_equal(lps[::-1, ::-1, :], np.asanyarray(nifti.dataobj))
    assert np.allclose(volume.GetDirection(), np.eye(3).ravel())
    assert np.allclose(volume.GetSpacing(), config.spacing)
    nx, ny, _ = config.size
    corner_ras = nifti.affine @ np.array([nx - 1, ny - 1, 0, 1.0])
    assert np.allclose(volume.GetOrigin(), corner_ras[:3] * [-1, -1, 1], atol=1e-3)
    again = pydicom.dcmread(folder / sorted(axial)[0])
    assert again.StudyInstanceUID == ds.StudyInstanceUID != ds.SeriesInstanceUID


# ---------------------------------------------------------------------------------------------- difficulty


def test_intensity_statistics_do_not_solve_the_task():
    """A linear model on HU statistics of lesion and pancreas: some signal, far from solved.

    Coarser grid (same field of view) to keep the test fast; the lesion statistics are resolution-robust.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = [], []
    with threadpool_limits(1):
        for index, c in enumerate(DEFAULT_CLASSES):
            for k in range(12):
                ph = generate_phantom(c, k, seed=11, size=(64, 64, 32), spacing=(3.0, 3.0, 4.5))
                row = []
                for values in _lesion_and_pancreas(ph):
                    values = values if values.size else ph.image[ph.lesion > 0].astype(float)
                    row += [values.mean(), values.std(), *np.percentile(values, [5, 25, 50, 75, 95])]
                features.append(row)
                labels.append(index)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        cv = StratifiedKFold(4, shuffle=True, random_state=0)
        score = cross_val_score(model, np.array(features), labels, cv=cv, scoring="balanced_accuracy").mean()
    assert 0.3 < score < 0.85, score  # chance is 1/6


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_arguments_are_user_errors(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "a"), "--scale", "0"]) == 2
    assert "--scale" in capsys.readouterr().err
    with pytest.raises(UserError, match="^scale: must be a finite number > 0, got -1.0$"):
        scaled_counts(SynthConfig(), -1.0)  # the library names its argument; the CLI names the flag
    bad = tmp_path / "bad.yaml"
    bad.write_text("counts: {PDAC: 3, IPMN: 1, NET: 1, SCN: 1, ASC: 1, CP: 1, XYZ: 2}\n")
    with pytest.raises(UserError, match="XYZ"):
        load_synth_config(bad)
    assert main(["synth", "--out", str(tmp_path / "b"), "--config", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    with pytest.raises(UserError, match="size"):
        load_synth_config(None, size=[96, 96, 8])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_rerun_with_worker_processes_prints_no_traceback(tmp_path, capfd):
    """A pool ends its idle workers with SIGTERM. Forked from a pancls command they had inherited its
    SIGTERM -> KeyboardInterrupt handler (io.signals_unwind), and each printed a traceback whenever the pool
    closed with idle workers: every `pancls cv` on a cached cohort did (io.quiet_worker now resets it)."""
    argv = ["synth", "--out", str(tmp_path / "s"), "--scale", "0.02", "--size", "32", "32", "32", "--workers", "2",
            "--dicom-subset", "0", "--no-progress"]
    assert main(argv) == 0
    capfd.readouterr()
    for _ in range(4):  # every patient is there already: the workers sit idle until the pool closes
        assert main(argv) == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_pool_workers_drop_the_inherited_signal_handlers():
    import signal

    from pancls.data.synth import _init_worker
    from pancls.io import signals_unwind

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        with signals_unwind():
            _init_worker()  # what each worker of the synth pool runs first
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_quiet_worker_restores_the_default_signal_handlers():
    import signal

    from pancls.io import quiet_worker, signals_unwind

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        with signals_unwind():
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
            quiet_worker()  # what a forked worker runs first
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_a_rerun_removes_what_a_killed_run_was_writing(tmp_path):
    argv = ["synth", "--out", str(tmp_path / "s"), "--scale", "0.02", "--size", "32", "32", "32", "--workers", "1",
            "--dicom-subset", "0", "--no-progress"]
    assert main(argv) == 0
    left = [tmp_path / "s" / "images" / ".SYN0001.nii.gz.1a2b3c4d.tmp.nii.gz",
            tmp_path / "s" / ".manifest.csv.0badf00d.tmp.csv", tmp_path / "s" / "dicom" / ".SYN0001.x1y2z3" / "IM1"]
    for file in left:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"half")
    assert main(argv) == 0
    assert [f for f in left if f.exists()] == [] and not (tmp_path / "s" / "dicom" / ".SYN0001.x1y2z3").exists()
