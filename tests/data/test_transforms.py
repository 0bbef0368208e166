"""MONAI preprocessing on the real abdomen fixture (122x101x30 voxels of 3 mm, pancreas mask 644 voxels)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

from pancls.config import from_dict, load_yaml
from pancls.data.classes import DEFAULT_CLASSES, check_classes
from pancls.data.transforms import (
    AugmentConfig,
    CTDataConfig,
    PreprocessConfig,
    deterministic_specs,
    deterministic_transforms,
    instantiate_specs,
    load_ct_preprocess,
    make_dataset,
    preprocess_fingerprint,
    random_transforms,
    window_specs,
)
from pancls.errors import UserError

REPO = Path(__file__).resolve().parents[2]
# Small grid for speed: 2 x 2 x 3 mm, 128 x 96 x 96 mm field of view, enough for this pancreas
# (bbox 39 x 21 x 18 voxels of 3 mm = 117 x 63 x 54 mm) plus 6 mm on each side.
CFG = PreprocessConfig(spacing=[2.0, 2.0, 3.0], size=[64, 48, 32], margin_mm=6.0)


@pytest.fixture(scope="module")
def abdomen(ct_data: Path) -> dict:
    folder = ct_data / "abdomen"
    return {"image": str(folder / "example_ct_sm.nii.gz"), "mask": str(folder / "pancreas_mask.nii.gz")}


@pytest.fixture(scope="module")
def cropped(abdomen) -> dict:
    return deterministic_transforms(CFG)(dict(abdomen))


def _resampled_mask_voxels(mask_path: str, spacing) -> int:
    """The mask on the output grid without any crop (MONAI directly, independent of our pipeline)."""
    resample = Compose([LoadImaged("mask"), EnsureChannelFirstd("mask"), Orientationd("mask", "RAS", labels=None),
                        Spacingd("mask", pixdim=spacing, mode="nearest")])
    return int((resample({"mask": mask_path})["mask"] > 0).sum())


def test_mask_crop_keeps_the_whole_mask_inside_a_margin(abdomen, cropped):
    mask = cropped["mask"][0].numpy()
    assert mask.shape == tuple(CFG.size)
    kept = int((mask > 0).sum())
    assert kept == _resampled_mask_voxels(abdomen["mask"], CFG.spacing)
    # and the resampled count is the original 644 voxels of 27 mm^3, up to nearest-neighbour resampling
    volume_mm3 = kept * float(np.prod(CFG.spacing))
    assert volume_mm3 == pytest.approx(644 * 27.0, rel=0.05)
    # no mask voxel within margin_mm of the border: margin_voxels of clearance on every side
    nz = np.nonzero(mask)
    for axis, margin in enumerate(CFG.margin_voxels):
        assert margin >= 1
        assert nz[axis].min() >= margin
        assert nz[axis].max() <= mask.shape[axis] - 1 - margin


def test_image_and_mask_stay_aligned(abdomen, cropped):
    image, mask = cropped["image"][0], cropped["mask"][0] > 0
    assert image.dtype == torch.float32 and cropped["mask"].dtype == torch.uint8
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    # The windowed mean inside the mask matches the one on the original grid (nibabel, no MONAI), up to
    # linear resampling; a crop that moved the image against the mask would land on fat or gut instead.
    hu = nib.load(abdomen["image"]).get_fdata()
    original = nib.load(abdomen["mask"]).get_fdata() > 0
    expected = float(np.clip((hu[original] + 160.0) / 400.0, 0.0, 1.0).mean())
    inside = float(image[mask].mean())
    assert inside == pytest.approx(expected, abs=0.03)
    assert inside > float(image[~mask].mean()) + 0.1


def test_window_maps_bounds_exactly():
    hu = torch.tensor([-1000.0, -160.0, 40.0, 240.0, 1000.0]).reshape(1, 5, 1, 1)
    out = instantiate_specs(window_specs([[400, 40]]))({"image": hu})["image"].flatten()
    assert out.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    two = instantiate_specs(window_specs([[400, 40], [2000, 0]]))({"image": hu})["image"]
    assert two.shape == (2, 5, 1, 1)
    assert two[0].flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert two[1].flatten().tolist() == pytest.approx([0.0, 0.42, 0.52, 0.62, 1.0])


@pytest.mark.parametrize("cfg", [
    PreprocessConfig(spacing=[3.0, 3.0, 3.0], size=[40, 32, 24], roi="centre", windows=[[400, 40], [1500, -600]]),
    PreprocessConfig(spacing=[3.0, 3.0, 3.0], size=[20, 24, 16], roi="box", box_start=[30, 40, 0], box_end=[70, 70, 20]),
], ids=["centre-2windows", "box"])
def test_output_shape_equals_configured_size(abdomen, cfg):
    out = deterministic_transforms(cfg, ["image"])({"image": abdomen["image"]})
    assert tuple(out["image"].shape) == (len(cfg.windows), *cfg.size)
    if len(cfg.windows) == 2:  # the lung window sees soft tissue as bright, the abdominal one as mid-grey
        assert not torch.equal(out["image"][0], out["image"][1])


def test_roi_mask_without_masks_is_a_user_error(abdomen, tmp_path):
    with pytest.raises(UserError, match="mask"):
        make_dataset([{"image": abdomen["image"], "label": 0}], CFG, tmp_path, train=False)


def test_empty_mask_is_refused_not_cropped_to_background(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])  # tiny synthetic pair: the defect is the point, not the anatomy
    nib.save(nib.Nifti1Image(np.full((20, 20, 10), 40, np.int16), affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 10), np.uint8), affine), tmp_path / "mask.nii.gz")
    records = [{"image": str(tmp_path / "ct.nii.gz"), "mask": str(tmp_path / "mask.nii.gz"), "label": 0}]
    dataset = make_dataset(records, CFG, tmp_path / "cache", train=False)
    with pytest.raises(UserError, match="no foreground") as info:
        dataset[0]
    assert info.value.where.endswith("mask.nii.gz")


def test_cache_is_read_back_and_keyed_by_config(abdomen, tmp_path):
    records = [{**abdomen, "label": 2, "patient_id": "case0"}]
    first = make_dataset(records, CFG, tmp_path, train=False)
    item = first[0]
    assert first.cache_dir == tmp_path / preprocess_fingerprint(CFG)
    cached = sorted(first.cache_dir.glob("*.pt"))
    assert len(cached) == 1 and (first.cache_dir / "preprocess.json").is_file()
    assert item["label"] == 2 and item["patient_id"] == "case0"

    # Tamper with the cached tensor: a fresh dataset must return the tampered copy, i.e. read the cache.
    payload = torch.load(cached[0], weights_only=True)
    payload["image"] = torch.zeros_like(payload["image"])
    torch.save(payload, cached[0])
    second = make_dataset([{**abdomen, "label": 4, "patient_id": "case0"}], CFG, tmp_path, train=False)[0]
    assert float(second["image"].abs().sum()) == 0.0
    assert second["label"] == 4  # labels are joined after the cache, never cached

    changed = PreprocessConfig(spacing=CFG.spacing, size=CFG.size, margin_mm=CFG.margin_mm, windows=[[350, 50]])
    third = make_dataset(records, changed, tmp_path, train=False)
    assert third.cache_dir != first.cache_dir
    assert float(third[0]["image"].abs().sum()) > 0
    assert len(list(third.cache_dir.glob("*.pt"))) == 1


def test_fingerprint_ignores_number_spelling_but_not_values():
    a = PreprocessConfig(spacing=[1.5, 1.5, 3], windows=[[400, 40]])
    b = PreprocessConfig(spacing=(1.5, 1.5, 3.0), windows=[(400.0, 40.0)])
    assert preprocess_fingerprint(a) == preprocess_fingerprint(b)
    assert preprocess_fingerprint(a) != preprocess_fingerprint(PreprocessConfig(margin_mm=11.0))


def test_random_transforms_change_image_not_shape_and_are_seeded(cropped):
    aug = AugmentConfig(flip_prob=0.5, affine_prob=1.0, intensity_prob=1.0, noise_prob=1.0)

    def run(seed):
        return random_transforms(aug).set_random_state(seed)({k: v.clone() for k, v in cropped.items()})

    a, b, c = run(7), run(7), run(8)
    assert a["image"].shape == cropped["image"].shape and a["mask"].shape == cropped["mask"].shape
    assert a["mask"].dtype == torch.uint8 and a["image"].dtype == torch.float32
    assert not torch.equal(a["image"], cropped["image"])
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])


def test_flips_move_image_and_mask_together(cropped):
    flips = AugmentConfig(flip_prob=1.0, flip_axes=[0], affine_prob=0.0, intensity_prob=0.0, noise_prob=0.0)
    out = random_transforms(flips)({k: v.clone() for k, v in cropped.items()})
    assert torch.equal(out["image"], torch.flip(cropped["image"], dims=[1]))
    assert torch.equal(out["mask"], torch.flip(cropped["mask"], dims=[1]))


def test_training_dataset_applies_augmentation_after_the_cache(abdomen, tmp_path):
    records = [{**abdomen, "label": 1, "patient_id": "case0"}]
    evaluation = make_dataset(records, CFG, tmp_path, train=False)[0]
    train = make_dataset(records, CFG, tmp_path, train=True, aug_cfg=AugmentConfig(flip_prob=1.0, flip_axes=[2]))
    item = train[0]
    assert len(list(train.cache_dir.glob("*.pt"))) == 1  # same cache as evaluation
    assert item["label"] == 1 and item["image"].shape == evaluation["image"].shape
    assert not torch.equal(item["image"], evaluation["image"])


def test_config_file_has_a_root_schema(tmp_path):
    cfg = load_ct_preprocess(REPO / "configs" / "ct_preprocess.yaml")
    assert cfg == CTDataConfig() and tuple(cfg.classes) == DEFAULT_CLASSES  # the file documents the defaults
    typo = tmp_path / "typo.yaml"
    typo.write_text("classes: [PDAC, IPMN]\npreprocesss:\n  roi: centre\n", encoding="utf-8")  # one s too many
    with pytest.raises(UserError) as info:
        load_ct_preprocess(typo)
    assert str(info.value) == (f"{typo}: unknown key(s) 'preprocesss'; known: augment, classes, preprocess")
    dup = tmp_path / "dup.yaml"
    dup.write_text("classes: [PDAC, PDAC]\n", encoding="utf-8")
    with pytest.raises(UserError, match="classes"):
        load_ct_preprocess(dup)
    nested = tmp_path / "nested.yaml"
    nested.write_text("augment: {flip: 0.5}\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"augment: unknown key\(s\) 'flip'"):
        load_ct_preprocess(nested)


def test_config_file_parses_and_rejects_bad_values():
    data = load_yaml(REPO / "configs" / "ct_preprocess.yaml")
    assert check_classes(data["classes"]) == DEFAULT_CLASSES
    cfg = from_dict(PreprocessConfig, data["preprocess"], "preprocess")
    assert cfg == PreprocessConfig()  # the file documents the defaults
    assert from_dict(AugmentConfig, data["augment"], "augment") == AugmentConfig()
    with pytest.raises(UserError, match=r"preprocess: windows\[0\]"):
        from_dict(PreprocessConfig, {"windows": [[-400, 40]]}, "preprocess")
    with pytest.raises(UserError, match="box_start"):
        from_dict(PreprocessConfig, {"roi": "box"}, "preprocess")
    with pytest.raises(UserError, match="unknown key"):
        from_dict(AugmentConfig, {"flip": 0.5}, "augment")


def test_nrrd_and_metaimage_inputs_give_the_nifti_tensors(abdomen, cropped, tmp_path):
    # the loader's NRRD/MetaImage reader (pancls.data.transforms.ITKImageReader) on files SimpleITK wrote from the
    # fixture: every output voxel equals the NIfTI pipeline's
    from tests.ct.test_itk import write_itk

    items = {"image": str(write_itk(Path(abdomen["image"]), tmp_path / "ct.nrrd")),
             "mask": str(write_itk(Path(abdomen["mask"]), tmp_path / "mask.mha"))}
    out = deterministic_transforms(CFG)(items)
    assert torch.equal(out["image"], cropped["image"]) and torch.equal(out["mask"], cropped["mask"])
    load = instantiate_specs(deterministic_specs(CFG)[:1])  # the loading step alone: same voxels, same affine
    itk, nifti = load(items), load(dict(abdomen))
    for key in ("image", "mask"):
        assert torch.equal(itk[key], nifti[key])
        assert torch.equal(itk[key].affine, nifti[key].affine)
