"""3D CT preprocessing with MONAI: a deterministic part that is cached on disk, and a random training part.

Deterministic part (:func:`deterministic_transforms`), per volume::

    load -> channel first -> RAS -> resample to `spacing` (image linear, mask nearest)
         -> window(s) to [0, 1] -> ROI crop -> pad/crop to `size`

Windowing maps a CT window of width W and level L linearly onto [0, 1] with clipping,

    x' = clip((HU - (L - W/2)) / W, 0, 1),

so the abdominal window W400/L40 sends [-160, 240] HU to [0, 1]. Several windows become stacked channels.
It runs *before* cropping and padding so that padded voxels are 0, i.e. "below the window" like air or fat,
never the 0.5 that a padded 0 HU would become.

ROI (``roi``): ``"mask"`` crops the bounding box of the mask's foreground plus ``margin_mm`` on each side
(then centre-pads/crops to ``size``; choose ``size * spacing`` to cover the largest ROI plus margins, or
its centre is kept and the rim is cut); ``"box"`` a fixed voxel box of the resampled RAS grid; ``"centre"``
the centre of the volume.

Caching (:func:`make_dataset`): the deterministic output of each volume is stored by MONAI's
:class:`~monai.data.PersistentDataset` under ``cache_root/<preprocess_fingerprint(cfg)>/``. MONAI keys its
cache files by the input item only, so a changed pipeline would silently reuse stale tensors; the
fingerprint (config + :data:`PREPROCESS_VERSION` + MONAI version) gives every pipeline its own folder. Items
are keyed by the volume paths plus their size and modification time, not by the label or fold, so one cache
serves every fold and a corrected label never meets a stale cached copy.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import monai
import numpy as np
from monai.data import NibabelReader, PersistentDataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from torch.utils.data import Dataset

from pancls.config import from_dict, load_yaml, to_dict
from pancls.data.classes import DEFAULT_CLASSES, check_classes
from pancls.errors import UserError
from pancls.io import atomic_write_json, file_identity

#: Bump whenever the deterministic pipeline's code changes what it outputs: old caches then go unused.
PREPROCESS_VERSION = 1
IMAGE_KEY = "image"
MASK_KEY = "mask"


def _list_field(*values):
    """A list default (a fresh copy per instance: dataclasses refuse a shared mutable default)."""
    return field(default_factory=lambda: [list(v) if isinstance(v, (list, tuple)) else v for v in values])


@dataclass
class PreprocessConfig:
    """Deterministic preprocessing (YAML section ``preprocess``).

    Defaults suit pancreas work on portal-venous CT: 1.5 x 1.5 mm in plane, 3 mm slices (the usual
    clinical reconstruction, so z is rarely upsampled), and a 96 x 96 x 48 output, i.e. a 144 mm cube that
    holds a whole pancreas or any lesion with its margin.
    """

    spacing: List[float] = _list_field(1.5, 1.5, 3.0)
    #: (width, level) in HU per output channel; W400/L40 is the standard abdominal soft-tissue window.
    windows: List[List[float]] = _list_field([400.0, 40.0])
    roi: Literal["mask", "box", "centre"] = "mask"
    margin_mm: float = 10.0
    size: List[int] = _list_field(96, 96, 48)
    #: roi "box" only: first voxel and one-past-last voxel in the resampled RAS grid.
    box_start: Optional[List[int]] = None
    box_end: Optional[List[int]] = None

    def __post_init__(self):
        # Normalised types keep the fingerprint identical for [1.5, 1.5, 3] and [1.5, 1.5, 3.0].
        self.spacing = [float(s) for s in _triple(self.spacing, "spacing")]
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive (mm), got {self.spacing}")
        self.size = [int(s) for s in _triple(self.size, "size")]
        if any(s <= 0 for s in self.size):
            raise ValueError(f"size must be positive (voxels), got {self.size}")
        if not self.windows:
            raise ValueError("windows: give at least one (width, level) pair")
        windows = []
        for i, window in enumerate(self.windows):
            if len(window) != 2 or float(window[0]) <= 0:
                raise ValueError(f"windows[{i}] must be [width > 0, level] in HU, got {window}")
            windows.append([float(window[0]), float(window[1])])
        self.windows = windows
        if self.roi not in ("mask", "box", "centre"):
            raise ValueError(f"roi must be 'mask', 'box' or 'centre', got {self.roi!r}")
        if self.margin_mm < 0:
            raise ValueError(f"margin_mm must be >= 0, got {self.margin_mm}")
        self.margin_mm = float(self.margin_mm)
        if self.roi == "box":
            if self.box_start is None or self.box_end is None:
                raise ValueError("roi 'box' needs box_start and box_end (voxels of the resampled RAS grid)")
            self.box_start = [int(v) for v in _triple(self.box_start, "box_start")]
            self.box_end = [int(v) for v in _triple(self.box_end, "box_end")]
            if any(s < 0 or e <= s for s, e in zip(self.box_start, self.box_end, strict=True)):
                raise ValueError(f"box must satisfy 0 <= box_start < box_end, got {self.box_start}..{self.box_end}")
        elif self.box_start is not None or self.box_end is not None:
            raise ValueError(f"box_start/box_end are only used with roi 'box', not {self.roi!r}")

    @property
    def margin_voxels(self) -> List[int]:
        """``margin_mm`` in output voxels, rounded up so that any margin > 0 is at least one voxel."""
        return [math.ceil(self.margin_mm / s - 1e-9) for s in self.spacing]


@dataclass
class AugmentConfig:
    """Random training augmentation (YAML section ``augment``), applied after the cache.

    Intensities are in windowed units ([0, 1] = the window), so ``intensity_shift: 0.05`` is 5% of the
    window width (20 HU for W400). A probability of 0 switches a transform off.
    """

    flip_prob: float = 0.5
    #: RAS axes to flip, each independently with ``flip_prob``.
    flip_axes: List[int] = _list_field(0, 1, 2)
    affine_prob: float = 0.3
    #: Largest rotation about the x, y, z (RAS) axes in degrees; the default turns within the axial plane.
    rotate_deg: List[float] = _list_field(0.0, 0.0, 15.0)
    #: Largest relative zoom, e.g. 0.1 for factors in [0.9, 1.1].
    scale: float = 0.1
    intensity_prob: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    noise_prob: float = 0.2
    noise_std: float = 0.01

    def __post_init__(self):
        for name in ("flip_prob", "affine_prob", "intensity_prob", "noise_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name in ("scale", "intensity_scale", "intensity_shift", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ValueError(f"flip_axes must be among 0, 1, 2, got {self.flip_axes}")
        self.rotate_deg = [float(v) for v in _triple(self.rotate_deg, "rotate_deg")]


@dataclass
class CTDataConfig:
    """The root of ``configs/ct_preprocess.yaml``: the class order (``classes``, checked by
    :func:`pancls.data.classes.check_classes`), ``preprocess`` (:class:`PreprocessConfig`) and ``augment``
    (:class:`AugmentConfig`). Read it with :func:`load_ct_preprocess`: an unknown key at any level is refused,
    as in every pancls config."""

    classes: List[str] = field(default_factory=lambda: list(DEFAULT_CLASSES))
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        self.classes = list(check_classes(self.classes))


def load_ct_preprocess(path: str | os.PathLike) -> CTDataConfig:
    """``configs/ct_preprocess.yaml`` (or a file like it) through :class:`CTDataConfig`; UserError naming the key."""
    return from_dict(CTDataConfig, load_yaml(path), str(path))


def _triple(values: Sequence, name: str) -> Sequence:
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ValueError(f"{name} needs 3 values (x, y, z), got {values!r}")
    return values


def ras_spacing(affine: np.ndarray) -> List[float]:
    """Voxel size (mm) along the world R, A, S axes: each voxel axis is assigned to the world axis it runs
    closest to (what ``Orientationd`` to RAS does before resampling)."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(a, axis=0)
    out = [math.nan] * 3
    for j in range(3):
        out[int(np.argmax(np.abs(a[:, j])))] = float(norms[j])
    return out


def ras_extent(shape: Sequence[int], affine: np.ndarray) -> List[float]:
    """Field of view (mm) along R, A, S."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    out = [math.nan] * 3
    for j in range(3):
        out[int(np.argmax(np.abs(a[:, j])))] = float(np.linalg.norm(a[:, j]) * shape[j])
    return out


def window_specs(windows: Sequence[Sequence[float]], key: str = IMAGE_KEY) -> List[Dict[str, Any]]:
    """CT windows ``[(width, level), ...]`` -> one [0, 1] channel each, stacked along the channel axis
    (MONAI config specs, see :func:`deterministic_specs`)."""
    ranges = [(level - width / 2.0, level + width / 2.0) for width, level in windows]
    if len(ranges) == 1:
        lo, hi = ranges[0]
        return [{"_target_": "ScaleIntensityRanged", "keys": key, "a_min": lo, "a_max": hi, "b_min": 0.0,
                 "b_max": 1.0, "clip": True}]
    names = [f"{key}_window{i}" for i in range(len(ranges))]
    specs: List[Dict[str, Any]] = [{"_target_": "CopyItemsd", "keys": key, "times": len(names), "names": names}]
    specs += [{"_target_": "ScaleIntensityRanged", "keys": name, "a_min": lo, "a_max": hi, "b_min": 0.0,
               "b_max": 1.0, "clip": True} for name, (lo, hi) in zip(names, ranges, strict=True)]
    specs += [{"_target_": "ConcatItemsd", "keys": names, "name": key}, {"_target_": "DeleteItemsd", "keys": names}]
    return specs


class RequireForegroundd(MapTransform):
    """Refuse an empty ROI mask (also one that vanished in resampling): MONAI's crop would silently
    return a crop of background instead."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if not bool((d[key] > 0).any()):
                source = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                raise UserError("the ROI mask has no foreground voxels at the preprocessing spacing", source)
        return d


class ITKImageReader(NibabelReader):
    """MONAI image reader for NRRD/MetaImage files (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``: 3D Slicer's exports),
    through SimpleITK (:func:`pancls.ct.itk.read_itk`: the LPS geometry turned exactly into the RAS affine).

    Each file becomes the NIfTI image pancls would write for it (:func:`pancls.ct.nifti.nifti1_image`), in
    memory, and from there on it is MONAI's :class:`~monai.data.NibabelReader`: the array and metadata
    ``LoadImage`` returns are those of the same volume stored as NIfTI. A file the header checks refuse
    (zero spacing, a singular direction, not 3D) raises :class:`~pancls.errors.UserError` naming it.
    """

    def verify_suffix(self, filename) -> bool:
        from monai.utils import ensure_tuple

        from pancls.ct.itk import is_itk

        return all(is_itk(f) for f in ensure_tuple(filename))

    def read(self, data, **kwargs):
        from monai.utils import ensure_tuple

        from pancls.ct.itk import read_itk
        from pancls.ct.nifti import nifti1_image

        self.filenames = ensure_tuple(data)
        images = [nifti1_image(*read_itk(name), name) for name in self.filenames]
        return images if len(images) > 1 else images[0]


#: MONAI's LoadImage tries the readers it is given last-first: NIfTI through MONAI's own reader, NRRD/MetaImage
#: through :class:`ITKImageReader`.
READERS = ["pancls.data.transforms.ITKImageReader", "NibabelReader"]


def deterministic_specs(cfg: PreprocessConfig, keys: Sequence[str] = (IMAGE_KEY, MASK_KEY)) -> List[Dict[str, Any]]:
    """The cacheable pipeline as MONAI bundle config items (``{"_target_": "Spacingd", ...}``), for a dict of
    file paths.

    This list is the one definition of the preprocessing: :func:`deterministic_transforms` instantiates it
    for training and ``pancls predict``, and ``pancls export`` writes it into the bundle's
    ``inference.json``, so the three cannot drift apart.

    ``keys`` are the volumes to load: ``"image"`` (the CT in HU) and optionally ``"mask"`` (any label map,
    resampled with nearest neighbour and returned as uint8 on the same grid). ``roi="mask"`` needs the mask.
    Output: ``image`` float32 ``(len(windows), *size)`` in [0, 1], ``mask`` uint8 ``(1, *size)``.
    """
    keys = list(keys)
    if IMAGE_KEY not in keys:
        raise ValueError(f"keys must include {IMAGE_KEY!r}, got {keys}")
    if cfg.roi == "mask" and MASK_KEY not in keys:
        raise UserError(f"roi 'mask' needs a {MASK_KEY!r} volume for every image", "preprocess.roi")
    is_image = [k == IMAGE_KEY for k in keys]
    specs: List[Dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True, "reader": list(READERS)},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
        # labels=None: take the axis convention from the image's own space (RAS for NIfTI).
        {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS", "labels": None},
        {"_target_": "Spacingd", "keys": keys, "pixdim": list(cfg.spacing),
         "mode": ["bilinear" if i else "nearest" for i in is_image]},
        *window_specs(cfg.windows),
    ]
    if cfg.roi == "mask":
        specs.append({"_target_": "pancls.data.transforms.RequireForegroundd", "keys": MASK_KEY})
        specs.append({"_target_": "CropForegroundd", "keys": keys, "source_key": MASK_KEY,
                      "margin": list(cfg.margin_voxels), "start_coord_key": None, "end_coord_key": None})
    elif cfg.roi == "box":
        specs.append({"_target_": "SpatialCropd", "keys": keys, "roi_start": list(cfg.box_start),
                      "roi_end": list(cfg.box_end)})
    specs += [
        {"_target_": "ResizeWithPadOrCropd", "keys": keys, "spatial_size": list(cfg.size)},  # pads with 0 = below the window
        {"_target_": "EnsureTyped", "keys": keys, "dtype": ["float32" if i else "uint8" for i in is_image],
         "track_meta": False},
    ]
    return specs


@contextlib.contextmanager
def quiet_monai_readers():
    """MONAI builds every default image reader whenever a loader is made, and its optional GPU DICOM reader warns
    on each construction where nvImageCodec is missing (a CPU machine): that noise is kept out of the user's
    terminal, nothing else is silenced."""
    import logging
    import warnings

    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
            yield
    finally:
        plugin_log.setLevel(level)


def instantiate_specs(specs: Sequence[Dict[str, Any]]) -> Compose:
    """``Compose`` of MONAI config items, instantiated by MONAI's own :class:`~monai.bundle.ConfigParser` (what
    ``monai.bundle run`` does with ``inference.json``), readers built quietly (:func:`quiet_monai_readers`)."""
    from monai.bundle import ConfigParser

    with quiet_monai_readers():
        parser = ConfigParser({"transforms": [dict(s) for s in specs]})
        return Compose(parser.get_parsed_content("transforms"))


def deterministic_transforms(cfg: PreprocessConfig, keys: Sequence[str] = (IMAGE_KEY, MASK_KEY)) -> Compose:
    """The cacheable pipeline for a dict of file paths: :func:`deterministic_specs`, instantiated."""
    return instantiate_specs(deterministic_specs(cfg, keys))


def random_transforms(cfg: AugmentConfig, keys: Sequence[str] = (IMAGE_KEY, MASK_KEY)) -> Compose:
    """Training augmentation on preprocessed tensors: spatial ones move image and mask together,
    intensity ones touch the image only. Missing keys (no mask) are allowed.

    Reproducible with ``random_transforms(cfg).set_random_state(seed)``.
    """
    keys = list(keys)
    spatial_modes = ["bilinear" if k == IMAGE_KEY else "nearest" for k in keys]
    steps: List[monai.transforms.Transform] = []
    if cfg.flip_prob > 0:
        steps += [RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis, allow_missing_keys=True)
                  for axis in cfg.flip_axes]
    if cfg.affine_prob > 0 and (any(cfg.rotate_deg) or cfg.scale > 0):
        steps.append(RandAffined(keys, prob=cfg.affine_prob, rotate_range=[math.radians(d) for d in cfg.rotate_deg],
                                 scale_range=[cfg.scale] * 3, mode=spatial_modes, padding_mode="zeros",
                                 allow_missing_keys=True))
    if cfg.intensity_prob > 0 and cfg.intensity_scale > 0:
        steps.append(RandScaleIntensityd(IMAGE_KEY, factors=cfg.intensity_scale, prob=cfg.intensity_prob))
    if cfg.intensity_prob > 0 and cfg.intensity_shift > 0:
        steps.append(RandShiftIntensityd(IMAGE_KEY, offsets=cfg.intensity_shift, prob=cfg.intensity_prob))
    if cfg.noise_prob > 0 and cfg.noise_std > 0:
        steps.append(RandGaussianNoised(IMAGE_KEY, prob=cfg.noise_prob, std=cfg.noise_std))
    # Same types as the evaluation path: plain tensors, float32 image, uint8 mask.
    steps.append(EnsureTyped(keys, dtype=[np.float32 if k == IMAGE_KEY else np.uint8 for k in keys],
                             track_meta=False, allow_missing_keys=True))
    return Compose(steps)


def preprocess_fingerprint(cfg: PreprocessConfig) -> str:
    """Short sha256 of everything that determines the cached tensors: config, pipeline version, MONAI version."""
    identity = {"pancls_preprocess": PREPROCESS_VERSION, "monai": monai.__version__, "config": to_dict(cfg)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _volume_hash(item: Dict[str, str]) -> bytes:
    """Cache key of one item: its volume paths with size and mtime, so a rewritten file is recomputed."""
    identity = {key: list(file_identity(path)) for key, path in sorted(item.items())}
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest().encode()


class PreprocessedDataset(Dataset):
    """Records joined with their cached deterministic volumes, then (training) the random transforms.

    ``transform`` is the random part (or None). :meth:`set_epoch` (called by the training engine before
    every epoch) reseeds it from ``(seed, epoch)``, so that with ``num_workers=0`` an epoch's augmentation
    depends on nothing else and a resumed run repeats it bit for bit; with worker processes MONAI reseeds
    each worker from the DataLoader's worker seed, which comes from the (checkpointed) global torch RNG.
    """

    def __init__(self, records: Sequence[Dict[str, Any]], volumes: PersistentDataset, transform: Optional[Compose],
                 seed: int = 0):
        self.records = list(records)
        self.volumes = volumes
        self.transform = transform
        self.seed = int(seed)
        self.cache_dir = Path(volumes.cache_dir)

    def set_epoch(self, epoch: int) -> None:
        from pancls.train.samplers import epoch_seed

        if self.transform is not None:
            self.transform.set_random_state(seed=epoch_seed(self.seed, epoch) % (2 ** 32))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        try:
            volumes = self.volumes[index]
        except RuntimeError as exc:  # MONAI wraps transform errors; surface a data problem as itself
            cause = exc.__cause__
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None
        item = {**self.records[index], **volumes}
        return self.transform(item) if self.transform is not None else item


def make_dataset(
    records: Sequence[Dict[str, Any]],
    cfg: PreprocessConfig,
    cache_root: str | os.PathLike,
    train: bool,
    aug_cfg: Optional[AugmentConfig] = None,
    seed: int = 0,
) -> PreprocessedDataset:
    """A dataset over manifest records (:meth:`pancls.data.manifest.Manifest.records`).

    The deterministic output is cached under ``cache_root/<preprocess_fingerprint(cfg)>/`` (with a
    ``preprocess.json`` saying which config made it); ``train=True`` adds ``random_transforms(aug_cfg)``
    (default :class:`AugmentConfig`) after the cache. Masks are used when every record has one.
    """
    if not records:
        raise UserError("no records to build a dataset from", "records")
    has_mask = [MASK_KEY in r for r in records]
    if cfg.roi == "mask" and not all(has_mask):
        raise UserError(f"roi 'mask' needs a mask for every image; {has_mask.count(False)} of {len(records)} "
                        f"records have none", "preprocess.roi")
    keys = [IMAGE_KEY, MASK_KEY] if all(has_mask) else [IMAGE_KEY]
    # The volume paths go to the cache; everything else (label, fold, ids) is joined on afterwards.
    records = [{k: v for k, v in r.items() if k not in (IMAGE_KEY, MASK_KEY) or k in keys} for r in records]

    cache_dir = Path(cache_root) / preprocess_fingerprint(cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp = cache_dir / "preprocess.json"
    if not stamp.exists():
        atomic_write_json(stamp, {"pancls_preprocess": PREPROCESS_VERSION, "monai": monai.__version__,
                                  "config": to_dict(cfg)})
    volumes = PersistentDataset(data=[{k: r[k] for k in keys} for r in records],
                                transform=deterministic_transforms(cfg, keys), cache_dir=cache_dir,
                                hash_func=_volume_hash)
    augment = random_transforms(aug_cfg or AugmentConfig(), keys) if train else None
    return PreprocessedDataset(records, volumes, augment, seed=seed)
