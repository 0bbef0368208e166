"""Synthetic pancreatic-tumour CT phantoms: the built-in demo dataset, so every command runs without hospital data.

Each phantom is a procedural contrast-enhanced abdominal CT in Hounsfield units (int16, RAS+ affine):
air, a body outline with subcutaneous fat and muscle wall, visceral fat, liver, spleen, kidneys (cortex
and medulla), spine with discs and spinal canal, aorta, IVC, SMA/SMV, splenic vein, stomach (with an air
cap), gallbladder, duodenum and bowel loops, and a curved, lobulated pancreas with its main duct. It holds
ONE lesion whose look depends on the subtype, loosely after the radiology of each entity:

========  ============================================================================================
PDAC      ill-defined hypo-attenuating solid mass; upstream (tail-side) duct dilatation and atrophy
IPMN      grape-like cluster of fluid cysts (0-25 HU) along the duct, often a dilated main duct
NET       well-defined, round, hyper-enhancing solid mass (a minority iso-enhancing or cystic-centred)
SCN       lobulated micro-cystic "honeycomb" mass, central scar, sometimes a central calcification
ASC       large irregular mass with a necrotic centre and an enhancing rim, upstream duct dilatation
CP        no discrete mass: atrophy, an irregular beaded duct, calcification specks (sometimes none)
========  ============================================================================================

The lesion mask covers the lesion (for CP: the abnormal pancreatic segment). Contrast phase, anatomy,
lesion size, position, contrast to parenchyma, shape and noise are all drawn at random with overlapping
ranges, so simple intensity statistics do not separate the classes (tests/data/test_synth.py checks that a
linear model on them stays well below perfect); the shape/texture cues above are what a 3D network can use.
These are cartoons for exercising the pipeline and benchmarking imbalance methods, not a clinical model.

Class counts (:data:`PAPER_COUNTS`) follow the tSP paper (Yang et al., "T-distributed Spherical Feature
Representation for Imbalanced Classification", AAAI 2023): 530 patients, of which PDAC 315 and CP 8 are
stated in its text; the split of the remaining 207 into IPMN 82, NET 60, SCN 45 and ASC 20 is OUR ASSUMPTION
(the paper gives it only in a figure we do not have).

Determinism: patient ``k`` of a class draws everything from ``numpy.random.default_rng([seed, class, k])``,
so the same seed gives identical arrays, and a different ``--scale`` adds or drops patients without changing
the ones kept (their ``SYN`` number, assigned after a seeded shuffle, may change).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from pancls.config import from_dict, load_yaml
from pancls.ct.nifti import save_nifti
from pancls.data.classes import DEFAULT_CLASSES
from pancls.errors import UserError
from pancls.io import atomic_write_json, atomic_write_text, remove_stale_temps, writable_folder
from pancls.validation import InvalidParameter, check_scalar

#: Patients per class at the paper's scale (530). PDAC and CP from the paper's text; the others assumed.
PAPER_COUNTS: Dict[str, int] = {"PDAC": 315, "IPMN": 82, "NET": 60, "SCN": 45, "ASC": 20, "CP": 8}
#: What each class looks like in the phantoms (written into the dataset README).
APPEARANCE: Dict[str, str] = {
    "PDAC": "ill-defined hypo-attenuating solid mass; upstream (tail-side) duct dilatation and atrophy",
    "IPMN": "grape-like cluster of fluid cysts along the duct, often a dilated main duct",
    "NET": "well-defined, round, hyper-enhancing solid mass (a minority iso-enhancing or cystic-centred)",
    "SCN": "lobulated micro-cystic honeycomb mass, central scar, sometimes a central calcification",
    "ASC": "large irregular mass with a necrotic centre and an enhancing rim, upstream duct dilatation",
    "CP": "no discrete mass: atrophy, an irregular beaded duct, calcification specks (sometimes none)",
}
#: HU range representable as 12-bit unsigned DICOM with RescaleIntercept -1024 (and kept in the NIfTI too).
HU_MIN, HU_MAX = -1024, 3071
#: Bumped whenever a change to the generator changes the volumes (stored in OUT/synth.json).
GENERATOR_VERSION = 1
_N_CENTRELINE = 128


@dataclass
class SynthConfig:
    """Generation parameters (``configs/synth.yaml``); :func:`pancls.config.from_dict` builds it from YAML.

    ``counts`` must list every class (at ``scale`` 1). A scaled count is ``max(min_per_class,
    round_half_up(count * scale))``: the default minimum of 4 keeps every class in every test fold of a
    stratified 4-fold CV. ``size`` is voxels (x, y, z) and ``spacing`` mm, on a RAS+ grid.
    """

    counts: Dict[str, int] = field(default_factory=lambda: dict(PAPER_COUNTS))
    min_per_class: int = 4
    size: Tuple[int, int, int] = (96, 96, 48)
    spacing: Tuple[float, float, float] = (2.0, 2.0, 3.0)
    seed: int = 0
    dicom_subset: int = 4

    def __post_init__(self) -> None:
        unknown = sorted(set(self.counts) - set(DEFAULT_CLASSES))
        if unknown:
            raise ValueError(f"counts: unknown class(es) {', '.join(map(repr, unknown))}; "
                             f"classes: {', '.join(DEFAULT_CLASSES)}")
        missing = [c for c in DEFAULT_CLASSES if c not in self.counts]
        if missing:
            raise ValueError(f"counts: every class needs a count; missing {', '.join(missing)}")
        for name, n in self.counts.items():
            check_scalar(n, f"counts.{name}", int, min_val=1)
        check_scalar(self.min_per_class, "min_per_class", int, min_val=1)
        if len(self.size) != 3:
            raise InvalidParameter(f"expected 3 voxel counts (x, y, z), got {list(self.size)}", "size")
        for n in self.size:
            check_scalar(n, "size", int, min_val=32)  # room for the anatomy
        if len(self.spacing) != 3:
            raise InvalidParameter(f"expected 3 mm values (x, y, z), got {list(self.spacing)}", "spacing")
        for mm in self.spacing:
            check_scalar(mm, "spacing", float, min_val=0, include_boundaries="neither")
        check_scalar(self.seed, "seed", int, min_val=0)
        check_scalar(self.dicom_subset, "dicom_subset", int, min_val=0)


@dataclass(frozen=True)
class PatientSpec:
    """One planned patient: its id, subtype and rank ``k`` within the subtype (which seeds its volume)."""

    patient_id: str
    label: str
    k: int


@dataclass(frozen=True)
class Phantom:
    """A generated volume: HU image (int16), lesion and pancreas masks (uint8), RAS+ affine."""

    image: np.ndarray
    lesion: np.ndarray
    pancreas: np.ndarray
    affine: np.ndarray
    label: str


def load_synth_config(path: str | os.PathLike | None = None, **overrides) -> SynthConfig:
    """The config from a YAML file (or the defaults), with non-None ``overrides`` (``seed=3``, ...) on top."""
    data = load_yaml(path) if path is not None else {}
    data.update({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items() if v is not None})
    return from_dict(SynthConfig, data, str(path) if path is not None else "synth config")


def scaled_counts(config: SynthConfig, scale: float) -> Dict[str, int]:
    """Per-class counts at ``scale``, in class order: ``max(min_per_class, floor(count * scale + 0.5))``."""
    check_scalar(scale, "scale", float, min_val=0, include_boundaries="neither")
    return {c: max(config.min_per_class, int(np.floor(config.counts[c] * scale + 0.5))) for c in DEFAULT_CLASSES}


def plan_patients(config: SynthConfig, scale: float = 1.0) -> List[PatientSpec]:
    """All patients in manifest order: a seeded shuffle of the classes, numbered SYN0001, SYN0002, ..."""
    entries = [(c, k) for c, n in scaled_counts(config, scale).items() for k in range(n)]
    order = np.random.default_rng([config.seed, 0x5EED]).permutation(len(entries))
    width = max(4, len(str(len(entries))))
    return [PatientSpec(f"SYN{i + 1:0{width}d}", *entries[j]) for i, j in enumerate(order)]


def ras_affine(size: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS+ voxel-to-mm affine with the volume centred on the origin (axes i->R, j->A, k->S)."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(size) - 1) / 2 * np.asarray(spacing, float)
    return affine


# ----------------------------------------------------------------------------------------------------------
# geometry helpers: everything is evaluated on crops of the volume, never voxel by voxel


class _Grid:
    """World (RAS, mm) coordinates of the voxel centres, per axis, and crops of them."""

    def __init__(self, size: Sequence[int], spacing: Sequence[float]):
        self.size = tuple(int(n) for n in size)
        self.voxel = float(min(spacing))
        affine = ras_affine(size, spacing)
        self.axes = [(affine[a, 3] + np.arange(n) * affine[a, a]).astype(np.float32) for a, n in enumerate(size)]

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> Tuple[slice, slice, slice]:
        """Slices selecting the voxels whose centres lie within ``[lo, hi]`` mm (possibly empty)."""
        out = []
        for axis, a, b in zip(self.axes, lo, hi, strict=True):
            i0, i1 = int(np.searchsorted(axis, a)), int(np.searchsorted(axis, b, side="right"))
            out.append(slice(i0, max(i0, i1)))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, sl: Tuple[slice, slice, slice]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable x (n,1,1), y (1,n,1), z (1,1,n) for a crop."""
        x, y, z = (a[s] for a, s in zip(self.axes, sl, strict=True))
        return x[:, None, None], y[None, :, None], z[None, None, :]


@lru_cache(maxsize=4)
def _grid(size: Tuple[int, int, int], spacing: Tuple[float, float, float]) -> _Grid:
    return _Grid(size, spacing)


def _ramp(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """Opacity from a signed distance (mm, < 0 inside): a linear edge ``width`` mm wide.

    One voxel wide is plain anti-aliasing (partial volume); several mm is an ill-defined margin.
    """
    return np.clip(0.5 - signed_distance / width, 0.0, 1.0)


def _blend(vol: np.ndarray, sl, alpha: np.ndarray, value) -> None:
    """Paint ``value`` with opacity ``alpha`` into the crop ``vol[sl]``, in place (painter's algorithm)."""
    region = vol[sl]
    region += alpha * (value - region)


def _ellipsoid(grid: _Grid, centre, radii, angle: float = 0.0, pad: float = 4.0):
    """Crop and approximate signed distance (mm) of an ellipsoid rotated by ``angle`` about the z axis."""
    in_plane = max(radii[0], radii[1])  # the rotation mixes x and y, never z
    reach = np.array([in_plane, in_plane, radii[2]]) + pad
    sl = grid.box(np.subtract(centre, reach), np.add(centre, reach))
    x, y, z = grid.coords(sl)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    c, s = np.cos(angle), np.sin(angle)
    q = np.sqrt(((c * dx + s * dy) / radii[0]) ** 2 + ((-s * dx + c * dy) / radii[1]) ** 2 + (dz / radii[2]) ** 2)
    return sl, (q - 1.0) * min(radii)


def _direction_noise(rng: np.random.Generator, dx, dy, dz, r, terms: int = 5) -> np.ndarray:
    """A smooth random function of direction in [-1, 1]: makes lobulated / irregular outlines."""
    inv = 1.0 / np.maximum(r, 1e-3)
    out = 0.0
    for _ in range(terms):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        proj = (dx * v[0] + dy * v[1] + dz * v[2]) * inv
        out = out + np.cos(rng.uniform(1.0, 3.5) * np.pi * proj + rng.uniform(0, 2 * np.pi))
    return out / terms


@lru_cache(maxsize=16)
def _upsampler(n: int, factor: int) -> np.ndarray:
    """(n, n // factor + 2) matrix of linear-interpolation weights from a coarse lattice to ``n`` samples."""
    pos = np.arange(n) / factor
    lo = np.floor(pos).astype(int)
    weights = np.zeros((n, n // factor + 2), np.float32)
    weights[np.arange(n), lo] = 1 - (pos - lo)
    weights[np.arange(n), lo + 1] = pos - lo
    return weights


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], factor: int) -> np.ndarray:
    """Unit-variance smooth noise: white noise on a ``factor``-times coarser lattice, linearly upsampled.

    Separable interpolation as three small matrix products, several times faster than ``ndimage.zoom``.
    """
    mats = [_upsampler(int(n), factor) for n in shape]
    out = rng.standard_normal([m.shape[1] for m in mats]).astype(np.float32)
    for axis, m in enumerate(mats):
        out = np.moveaxis(np.tensordot(m, out, axes=(1, axis)), 0, axis)
    return out / max(float(out.std()), 1e-6)


def _bezier(points: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Cubic Bezier curve through 4 control points, sampled at ``t`` (n, 3)."""
    p0, p1, p2, p3 = points
    t = t[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3


def _nearest_on_curve(grid: _Grid, sl, curve: np.ndarray, max_distance: float) -> Tuple[np.ndarray, np.ndarray]:
    """For each voxel of a crop: distance (mm) to the nearest curve sample and that sample's index.

    Voxels farther than ``max_distance`` get an infinite distance (and the last index), which is much faster.
    """
    x, y, z = grid.coords(sl)
    pts = np.stack(np.broadcast_arrays(x, y, z), -1).reshape(-1, 3)
    dist, idx = cKDTree(curve).query(pts, distance_upper_bound=max_distance)
    idx = np.minimum(idx, len(curve) - 1)  # points beyond max_distance: dist = inf, idx = len(curve)
    shape = tuple(s.stop - s.start for s in sl)
    return dist.reshape(shape).astype(np.float32), idx.reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# lesions


@dataclass
class _Context:
    """What a lesion painter needs to know about the patient."""

    grid: _Grid
    rng: np.random.Generator
    vol: np.ndarray
    scale: float  # body half-width (mm): lesion sizes follow the phantom's size
    centre: np.ndarray  # lesion centre (mm)
    parenchyma: float  # pancreas HU in this patient's contrast phase
    fluid: float  # HU of water-like fluid in this patient


def _lesion_crop(ctx: _Context, radius: float):
    reach = radius * 1.4 + 2 * ctx.grid.voxel
    sl = ctx.grid.box(ctx.centre - reach, ctx.centre + reach)
    x, y, z = ctx.grid.coords(sl)
    dx, dy, dz = x - ctx.centre[0], y - ctx.centre[1], z - ctx.centre[2]
    r = np.sqrt(dx ** 2 + dy ** 2 + dz ** 2)
    return sl, dx, dy, dz, r


def _solid_mass(ctx: _Context, radius: float, irregularity: float, edge: float, hu: float,
                texture: float = 0.0, necrosis: Optional[Tuple[float, float]] = None):
    """Irregular mass of ``hu`` (+ smooth heterogeneity of SD ``texture``); optional necrotic core (fraction, HU)."""
    sl, dx, dy, dz, r = _lesion_crop(ctx, radius)
    outline = radius * (1 + irregularity * _direction_noise(ctx.rng, dx, dy, dz, r))
    alpha = _ramp(r - outline, edge)
    _blend(ctx.vol, sl, alpha, hu + texture * _smooth_noise(ctx.rng, r.shape, 2))
    if necrosis is not None:
        fraction, core_hu = necrosis
        # concentric with the irregular outline, so that the rim keeps a similar thickness all round
        core = fraction * outline * (1 + 0.15 * _direction_noise(ctx.rng, dx, dy, dz, r))
        _blend(ctx.vol, sl, _ramp(r - core, 1.5 * ctx.grid.voxel) * alpha, core_hu)
    return sl, alpha >= 0.5


def _pdac(ctx: _Context):
    rng = ctx.rng
    radius = ctx.scale * rng.uniform(0.08, 0.2)
    hu = ctx.parenchyma - rng.uniform(15, 60)  # hypo-attenuating in the pancreatic phase
    return _solid_mass(ctx, radius, rng.uniform(0.15, 0.35), rng.uniform(2.0, 5.0), hu, texture=8.0)


def _net(ctx: _Context):
    rng = ctx.rng
    radius = ctx.scale * rng.uniform(0.06, 0.17)
    hu = ctx.parenchyma + rng.uniform(-10, 80)  # mostly hyper-enhancing; a minority iso/hypo
    cystic = radius > 0.12 * ctx.scale and rng.random() < 0.4
    necrosis = (rng.uniform(0.3, 0.6), ctx.fluid + rng.uniform(10, 30)) if cystic else None
    return _solid_mass(ctx, radius, rng.uniform(0.03, 0.1), ctx.grid.voxel, hu, texture=4.0, necrosis=necrosis)


def _asc(ctx: _Context):
    rng = ctx.rng
    radius = ctx.scale * rng.uniform(0.13, 0.26)
    rim = ctx.parenchyma + rng.uniform(-5, 30)
    necrosis = (rng.uniform(0.35, 0.75), ctx.fluid + rng.uniform(0, 25))
    return _solid_mass(ctx, radius, rng.uniform(0.2, 0.35), rng.uniform(1.5, 3.5), rim, texture=8.0,
                       necrosis=necrosis)


def _ipmn(ctx: _Context):
    rng = ctx.rng
    n = int(rng.integers(2, 10))
    spread = ctx.scale * rng.uniform(0.04, 0.12)
    radii = ctx.scale * rng.uniform(0.04, 0.1, n)
    centres = ctx.centre + rng.normal(size=(n, 3)) * spread * np.array([1.0, 0.6, 0.6])
    reach = np.abs(centres - ctx.centre).max() + radii.max()
    sl, dx, dy, dz, _ = _lesion_crop(ctx, reach / 1.4)
    inside = np.zeros(tuple(s.stop - s.start for s in sl), bool)
    wall_hu = ctx.parenchyma + rng.uniform(-20, 30)
    content = ctx.fluid + rng.uniform(-5, 20)
    for c, rad in zip(centres - ctx.centre, radii, strict=True):
        r = np.sqrt((dx - c[0]) ** 2 + (dy - c[1]) ** 2 + (dz - c[2]) ** 2)
        alpha = _ramp(r - rad, ctx.grid.voxel)
        _blend(ctx.vol, sl, alpha, wall_hu)
        inside |= alpha >= 0.5
    for c, rad in zip(centres - ctx.centre, radii, strict=True):  # contents after all walls: septa only between cysts
        r = np.sqrt((dx - c[0]) ** 2 + (dy - c[1]) ** 2 + (dz - c[2]) ** 2)
        _blend(ctx.vol, sl, _ramp(r - (rad - 1.2), ctx.grid.voxel), content)
    if rng.random() < 0.2:  # mural nodule
        c = centres[0] - ctx.centre
        r = np.sqrt((dx - c[0]) ** 2 + (dy - c[1]) ** 2 + (dz - c[2]) ** 2)
        _blend(ctx.vol, sl, _ramp(r - 0.45 * radii[0], ctx.grid.voxel), ctx.parenchyma - rng.uniform(0, 30))
    return sl, inside


def _scn(ctx: _Context):
    rng = ctx.rng
    radius = ctx.scale * rng.uniform(0.1, 0.24)
    sl, dx, dy, dz, r = _lesion_crop(ctx, radius)
    outline = radius * (1 + rng.uniform(0.08, 0.2) * _direction_noise(rng, dx, dy, dz, r))
    alpha = _ramp(r - outline, ctx.grid.voxel)
    # honeycomb: band-passed noise thresholded into many small cysts separated by thin enhancing septa
    shape = r.shape
    cell = rng.uniform(0.8, 1.6)
    noise = rng.standard_normal(shape).astype(np.float32)
    band = ndimage.gaussian_filter(noise, cell) - ndimage.gaussian_filter(noise, 2.5 * cell)
    cyst_fraction = rng.uniform(0.35, 0.8)
    cysts = band > np.quantile(band, 1 - cyst_fraction)
    septa = ctx.parenchyma + rng.uniform(-15, 25)
    honeycomb = np.where(cysts, ctx.fluid + rng.uniform(0, 20), septa).astype(np.float32)
    _blend(ctx.vol, sl, alpha, ndimage.gaussian_filter(honeycomb, 0.5))
    # central stellate scar: a fibrous core with radiating strands, calcified in a minority
    scar = _ramp(r - radius * rng.uniform(0.12, 0.25), ctx.grid.voxel)
    for _ in range(int(rng.integers(3, 6))):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        along = dx * v[0] + dy * v[1] + dz * v[2]
        off = np.sqrt(np.maximum(r ** 2 - along ** 2, 0))
        scar = np.maximum(scar, _ramp(off - 0.6 * ctx.grid.voxel, ctx.grid.voxel) * (along > 0) * (r < 0.8 * radius))
    _blend(ctx.vol, sl, scar * alpha, ctx.parenchyma - rng.uniform(10, 40))
    if rng.random() < 0.4:
        calc = _ramp(r - rng.uniform(1.0, 2.5), ctx.grid.voxel)
        _blend(ctx.vol, sl, calc, rng.uniform(350, 900))
    return sl, alpha >= 0.5


_LESIONS: Dict[str, Callable[[_Context], tuple]] = {
    "PDAC": _pdac, "IPMN": _ipmn, "NET": _net, "SCN": _scn, "ASC": _asc,
}

# probability that the lesion sits in the head (t < 0.3 along the gland; 0 = head, 1 = tail), else body/tail
_HEAD_PROBABILITY = {
    "PDAC": 0.65, "IPMN": 0.6, "NET": 0.35, "SCN": 0.4, "ASC": 0.5, "CP": 0.5,
}


# ----------------------------------------------------------------------------------------------------------
# the phantom


def generate_phantom(label: str, k: int, seed: int = 0, size: Sequence[int] = (96, 96, 48),
                     spacing: Sequence[float] = (2.0, 2.0, 3.0)) -> Phantom:
    """Patient ``k`` of class ``label``: a function of ``(seed, label, k, size, spacing)`` only.

    The anatomy is painted in this order, each step drawing from one random generator seeded by
    ``(seed, class index, k)`` (so the order is part of the cohort's definition): contrast phase and body wall,
    spine, vessels, solid organs, hollow organs, pancreas (with its duct and the splenic vein), the lesion, then
    tissue heterogeneity and quantum noise.
    """
    if label not in DEFAULT_CLASSES:
        raise UserError(f"unknown class {label!r}; classes: {', '.join(DEFAULT_CLASSES)}", "label")
    size = tuple(int(n) for n in size)
    spacing = tuple(float(s) for s in spacing)
    rng = np.random.default_rng([seed, DEFAULT_CLASSES.index(label), k])
    body = _body_wall(rng, _grid(size, spacing), size)
    _spine(body)
    _vessels(body)
    _solid_organs(body)
    _hollow_organs(body)
    gland = _pancreas(body, label)
    lesion = _lesion(body, gland, label)
    image = _noise(body)
    lesion &= (body.body >= 0.5).astype(np.uint8)
    return Phantom(image, lesion, gland.mask, ras_affine(size, spacing), label)


@dataclass
class _Body:
    """The patient being painted: the volume (HU, float32), its contrast phase, the body's half-axes and the
    body/abdominal-cavity membership maps that organs are clipped to."""

    grid: _Grid
    rng: np.random.Generator
    vol: np.ndarray
    arterial: float
    venous: float
    parenchyma: float
    fluid: float
    A: float  # body half-width (mm)
    B: float  # body half-depth (mm)
    C: float  # half the field of view along z (mm)
    body: np.ndarray
    cavity: np.ndarray

    def u(self, low: float, high: float) -> float:
        return self.rng.uniform(low, high)

    def at(self, uu: float, vv: float, ww: float, jitter: float = 0.03) -> np.ndarray:
        """A point in body units (fractions of A, B, C), jittered in x and y."""
        return np.array([self.A * (uu + self.rng.normal(0, jitter)), self.B * (vv + self.rng.normal(0, jitter)),
                         self.C * ww])

    def organ(self, centre, radii, value, angle: float = 0.0, clip: Optional[np.ndarray] = None):
        """Blend an ellipsoid of ``value`` HU into the volume, clipped to ``clip`` (default: the cavity)."""
        clip = self.cavity if clip is None else clip
        sl, sd = _ellipsoid(self.grid, centre, radii, angle)
        _blend(self.vol, sl, _ramp(sd, self.grid.voxel) * clip[sl[0], sl[1]], value)
        return sl, sd

    def hollow(self, centre, radii, lumen):
        """A hollow organ: a soft-tissue wall and a ``lumen`` 2.5 mm inside it."""
        self.organ(centre, radii, self.u(35, 55))
        return self.organ(centre, tuple(r - 2.5 for r in radii), lumen)


def _body_wall(rng: np.random.Generator, grid: _Grid, size: Tuple[int, int, int]) -> _Body:
    """The contrast phase (one factor moves arterial, venous and parenchymal enhancement together), then the body:
    an elliptic cylinder, subcutaneous fat, the muscle wall and visceral fat in the cavity."""
    half = np.array([grid.axes[a][-1] for a in range(3)])  # half field of view (mm)
    vol = np.full(size, -1000.0, np.float32)
    u = rng.uniform
    phase = u(0.7, 1.3)
    arterial, venous = phase * u(170, 240), phase * u(120, 160)
    parenchyma = 40 + phase * u(30, 70)
    fluid = u(0, 15)
    A, B, C = half[0] * u(0.8, 0.93), half[1] * u(0.66, 0.8), half[2]
    x, y, _ = grid.coords((slice(None),) * 3)
    q = np.sqrt((x / A) ** 2 + (y / B) ** 2)
    fat = u(0.05, 0.15)
    full = (slice(None),) * 3
    body = _ramp((q - 1) * B, grid.voxel)
    _blend(vol, full, body, u(-115, -85))
    _blend(vol, full, _ramp((q - (1 - fat)) * B, grid.voxel), u(35, 60))
    cavity = _ramp((q - (1 - fat - 0.05)) * B, grid.voxel)
    _blend(vol, full, cavity, u(-105, -80))
    return _Body(grid, rng, vol, arterial, venous, parenchyma, fluid, A, B, C, body, cavity)


def _spine(b: _Body) -> None:
    """Paraspinal muscle, the vertebral body with discs, the canal and the arch (the whole z range)."""
    A, C, u = b.A, b.C, b.u
    for side in (-1, 1):
        b.organ(b.at(0.22 * side, -0.78, 0), (0.15 * A, 0.12 * b.B, 2 * C), u(40, 60), clip=b.body)
    vb_c, vb_r = b.at(0, -0.58, 0, 0.01), 0.15 * A
    b.organ(vb_c, (vb_r, vb_r, 2 * C), u(650, 950), clip=b.body)
    zz = b.grid.axes[2][None, None, :]
    disc = (np.mod(zz - u(0, 30), 30.0) < 6.0)
    sl, sd = _ellipsoid(b.grid, vb_c, (vb_r - 2.5, vb_r - 2.5, 2 * C))
    _blend(b.vol, sl, _ramp(sd, b.grid.voxel), np.where(disc[..., sl[2]], u(70, 100), u(180, 320)))
    canal = vb_c - np.array([0, vb_r + 0.08 * A, 0])
    b.organ(canal, (0.1 * A, 0.1 * A, 2 * C), u(500, 800), clip=b.body)
    b.organ(canal, (0.055 * A, 0.055 * A, 2 * C), u(5, 20), clip=b.body)


def _vessels(b: _Body) -> None:
    """Aorta, IVC, SMA and SMV (the latter two below the pancreas neck)."""
    A, B, C = b.A, b.B, b.C
    b.organ(b.at(-0.07, -0.36, 0, 0.01), (0.065 * A, 0.065 * A, 2 * C), b.arterial)
    b.organ(b.at(0.16, -0.33, 0, 0.01), (0.08 * A, 0.06 * B, 2 * C), b.venous - b.u(0, 30))
    b.organ(b.at(-0.03, -0.2, -0.6, 0.01), (0.028 * A, 0.028 * A, 0.55 * C), b.arterial)
    b.organ(b.at(0.06, -0.12, -0.6, 0.01), (0.035 * A, 0.035 * A, 0.55 * C), b.venous)


def _solid_organs(b: _Body) -> None:
    """Liver, spleen, both kidneys (cortex and medulla) and, in 70 % of patients, the gallbladder."""
    A, B, C, u = b.A, b.B, b.C, b.u
    liver = b.parenchyma + u(-20, 20)
    b.organ(b.at(0.5, 0.05, 0.65), (0.55 * A, 0.8 * B, 0.9 * C), liver, angle=u(0.1, 0.5))
    b.organ(b.at(-0.62, -0.35, 0.55), (0.2 * A, 0.32 * B, 0.5 * C), liver + u(0, 30), angle=-u(0.3, 0.7))
    for side, w in ((-1, u(-0.05, 0.1)), (1, u(-0.3, -0.1))):
        centre, angle = b.at(0.4 * side, -0.45, w), 0.5 * side
        b.organ(centre, (0.13 * A, 0.17 * B, 0.38 * C), 0.75 * b.arterial, angle)
        b.organ(centre, (0.07 * A, 0.09 * B, 0.25 * C), 0.55 * b.venous, angle)
    if b.rng.random() < 0.7:  # gallbladder: fluid away from the pancreas
        b.organ(b.at(0.38, 0.4, 0.15), (0.08 * A, 0.1 * B, 0.2 * C), b.fluid)


def _hollow_organs(b: _Body) -> None:
    """The stomach with an air cap, the duodenum beside the head, 5-10 bowel loops below."""
    A, B, C, u, rng, fluid = b.A, b.B, b.C, b.u, b.rng, b.fluid
    stomach = b.at(-0.3, 0.32, 0.6)
    sl, sd = b.hollow(stomach, (0.25 * A, 0.3 * B, 0.4 * C), fluid + u(0, 15))
    _, yy, _ = b.grid.coords(sl)
    _blend(b.vol, sl, _ramp(sd, b.grid.voxel) * (yy > stomach[1] + 0.1 * B), u(-900, -700))
    b.hollow(b.at(0.36, -0.05, -0.35), (0.07 * A, 0.07 * B, 0.45 * C), u(-850, -600) if rng.random() < 0.4 else fluid)
    for _ in range(int(rng.integers(5, 11))):
        lumen = [fluid + u(0, 20), u(-850, -500), u(180, 350)][int(rng.choice(3, p=[0.5, 0.35, 0.15]))]
        b.hollow(np.array([A * u(-0.65, 0.65), B * u(0.1, 0.7), C * u(-1.0, -0.2)]),
                 (A * u(0.07, 0.13), B * u(0.07, 0.13), C * u(0.1, 0.3)), lumen)


@dataclass
class _Gland:
    """The painted pancreas: its centre line, where the lesion sits along it, and its voxels."""

    ctrl: np.ndarray  # Bezier control points (mm)
    ts: np.ndarray  # centre-line parameter, 0 = head, 1 = tail
    t_lesion: float
    segment: Optional[Tuple[float, float]]  # chronic pancreatitis: the affected stretch of the gland
    sl: Tuple[slice, slice, slice]  # the box the gland was painted in
    idx: np.ndarray  # per voxel of the box: the nearest centre-line point
    alpha: np.ndarray  # per voxel of the box: pancreas membership (0..1)
    mask: np.ndarray  # uint8, the whole volume: alpha >= 0.5


def _pancreas(b: _Body, label: str) -> _Gland:
    """A tube of varying radius along a jittered Bezier centre line from the head (t = 0) to the tail, with its
    main duct (dilated upstream of an obstructing PDAC/ASC, in main-duct IPMN, beaded in chronic pancreatitis),
    atrophy where the class has it, and the splenic vein behind the body and tail."""
    A, B, C, u, rng, grid = b.A, b.B, b.C, b.u, b.rng, b.grid
    ctrl = np.array([[0.22, -0.12, -0.2], [0.04, 0.02, -0.08], [-0.25, -0.02, 0.05], [-0.5, -0.25, 0.15]])
    ctrl = ctrl + rng.normal(0, [0.04, 0.03, 0.05], ctrl.shape)
    ctrl = ctrl * [A, B, C]
    ts = np.linspace(0, 1, _N_CENTRELINE)
    curve = _bezier(ctrl, ts)
    radius = np.interp(ts, [0, 0.3, 1], [A * u(0.11, 0.15), A * u(0.07, 0.1), A * u(0.06, 0.09)])
    duct = np.full_like(ts, 0.8)  # a normal main duct (< 3 mm across): partial volume at most
    atrophy = np.ones_like(ts)

    head = rng.random() < _HEAD_PROBABILITY[label]
    t_lesion = u(0.0, 0.3) if head else u(0.3, 0.9)
    if label in ("PDAC", "ASC") and rng.random() < 0.85:  # obstruction: upstream duct dilatation +/- atrophy
        up = ts > t_lesion
        duct[up] = u(1.5, 4.0)
        atrophy[up] = u(0.7, 1.0)
    elif label == "IPMN" and rng.random() < 0.5:  # main-duct or mixed type
        duct[:] = u(1.5, 3.5)
    segment = None
    if label == "CP":
        length = u(0.4, 1.0)
        t0 = u(0, 1 - length)
        segment = (t0, t0 + length)
        inside = (ts >= segment[0]) & (ts <= segment[1])
        atrophy[inside] = u(0.55, 0.85)
        beads = 1 + 0.5 * np.sin(u(15, 40) * ts + u(0, 2 * np.pi))
        duct[inside] = u(1.2, 3.0) * beads[inside]

    reach = 2 * radius.max() + 0.08 * A + 2 * grid.voxel  # gland, its lobulation and the splenic vein behind
    sl = grid.box(curve.min(0) - reach, curve.max(0) + reach)
    dist, idx = _nearest_on_curve(grid, sl, curve, 1.3 * radius.max() + 2 * grid.voxel)
    vein = (curve + np.stack([np.zeros_like(ts), -(radius + 0.04 * A), np.zeros_like(ts)], 1))[ts > 0.3]
    vdist, _ = _nearest_on_curve(grid, sl, vein, 0.03 * A + 2 * grid.voxel)
    _blend(b.vol, sl, _ramp(vdist - 0.03 * A, grid.voxel), b.venous)
    lobulation = 1 + u(0.05, 0.15) * _smooth_noise(rng, dist.shape, 2)
    alpha = _ramp(dist - radius[idx] * atrophy[idx] * lobulation, grid.voxel) * b.cavity[sl[0], sl[1]]
    cp_fibrosis = u(0, 30) if label == "CP" else 0.0
    _blend(b.vol, sl, alpha, b.parenchyma - cp_fibrosis + 6 * _smooth_noise(rng, dist.shape, 2))
    _blend(b.vol, sl, _ramp(dist - duct[idx], grid.voxel) * alpha, b.fluid)
    mask = np.zeros(b.vol.shape, np.uint8)
    mask[sl] = alpha >= 0.5
    return _Gland(ctrl, ts, t_lesion, segment, sl, idx, alpha, mask)


def _lesion(b: _Body, gland: _Gland, label: str) -> np.ndarray:
    """The lesion mask (uint8, the whole volume), painted into the volume as it is made: for chronic pancreatitis
    the affected stretch of the gland with calcifications and, in 20 %, a pseudocyst beside it; for the other
    classes the class's painter (:data:`_LESIONS`) at ``t_lesion`` along the gland."""
    u, rng, grid = b.u, b.rng, b.grid
    lesion = np.zeros(b.vol.shape, np.uint8)
    if label != "CP":
        centre = _bezier(gland.ctrl, np.array([gland.t_lesion]))[0] + rng.normal(0, 0.02 * b.A, 3)
        ctx = _Context(grid, rng, b.vol, b.A, centre, b.parenchyma, b.fluid)
        sl_l, mask = _LESIONS[label](ctx)
        lesion[sl_l] = mask
        return lesion
    sl, segment, ts, idx = gland.sl, gland.segment, gland.ts, gland.idx
    cp = (gland.alpha >= 0.5) & (ts[idx] >= segment[0]) & (ts[idx] <= segment[1])
    lesion[sl] = cp
    n_calc = 0 if rng.random() < 0.2 else int(rng.integers(3, 20))
    spots = np.argwhere(cp)
    for j in rng.choice(len(spots), min(n_calc, len(spots)), replace=False) if len(spots) else ():
        c = np.array([grid.axes[a][sl[a].start + spots[j][a]] for a in range(3)])
        b.organ(c, (u(0.8, 1.8),) * 3, u(350, 1000), clip=b.body)
    if rng.random() < 0.2:  # pseudocyst next to the gland
        t = u(*segment)
        c = _bezier(gland.ctrl, np.array([t]))[0] + rng.normal(0, 0.05 * b.A, 3)
        r = b.A * u(0.05, 0.1)
        b.organ(c, (r, r, r), b.fluid + u(0, 15))
        sl_c, sd_c = _ellipsoid(grid, c, (r, r, r))
        lesion[sl_c] |= (sd_c < 0).astype(np.uint8)
    return lesion


def _noise(b: _Body) -> np.ndarray:
    """Tissue heterogeneity (smooth, inside the body) and quantum noise (white, everywhere); the int16 image in
    [HU_MIN, HU_MAX]."""
    b.vol += _smooth_noise(b.rng, b.vol.shape, 4) * b.u(3, 8) * b.body
    b.vol += b.rng.standard_normal(b.vol.shape, dtype=np.float32) * np.float32(b.u(8, 22))
    return np.clip(np.rint(b.vol), HU_MIN, HU_MAX).astype(np.int16)


# ----------------------------------------------------------------------------------------------------------
# the dataset on disk


def _params(config: SynthConfig, scale: float) -> dict:
    """What determines the volumes; a folder generated with other values is never silently mixed in."""
    return {"generator_version": GENERATOR_VERSION, "seed": config.seed, "size": list(config.size),
            "spacing": list(config.spacing), "scale": scale, "counts": scaled_counts(config, scale)}


def _write_patient(job: Tuple[PatientSpec, SynthConfig, str, bool, bool]) -> bool:
    """Generate and write one patient (worker); returns False when its files already existed."""
    from pancls.data.synth_dicom import write_ct_series

    spec, config, out, dicom, force = job
    out = Path(out)
    image_path = out / "images" / f"{spec.patient_id}.nii.gz"
    mask_path = out / "masks" / f"{spec.patient_id}_lesion.nii.gz"
    dicom_dir = out / "dicom" / spec.patient_id
    todo_nifti = force or not (image_path.exists() and mask_path.exists())
    todo_dicom = dicom and (force or not dicom_dir.exists())
    if not (todo_nifti or todo_dicom):
        return False
    phantom = generate_phantom(spec.label, spec.k, config.seed, config.size, config.spacing)
    if todo_nifti:
        save_nifti(mask_path, phantom.lesion, phantom.affine)
        save_nifti(image_path, phantom.image, phantom.affine)
    if todo_dicom:
        write_ct_series(dicom_dir, phantom.image, phantom.affine, spec.patient_id, config.seed, overwrite=force)
    return True


def _init_worker() -> None:
    # One BLAS/OpenMP thread per worker process: the workers already use every core.
    from threadpoolctl import threadpool_limits

    from pancls.io import quiet_worker

    quiet_worker()
    threadpool_limits(1)


def generate_dataset(out: str | os.PathLike, config: SynthConfig, scale: float = 1.0, force: bool = False,
                     workers: Optional[int] = None, progress: bool = True) -> dict:
    """Write the dataset into ``out``; returns a summary (counts, written, skipped, seconds).

    Layout: ``images/<pid>.nii.gz``, ``masks/<pid>_lesion.nii.gz``, ``manifest.csv`` (patient_id, image,
    mask, label; paths relative to ``out``), ``README.md``, ``synth.json`` (the generation parameters) and,
    for the first ``config.dicom_subset`` patients, ``dicom/<pid>/`` (see :mod:`pancls.data.synth_dicom`).
    Every file is written atomically; an interrupted run is completed by re-running it, which skips the
    patients already on disk. A folder holding a dataset made with other parameters is refused unless
    ``force`` (which regenerates everything).
    """
    import fcntl

    out = writable_folder(out)
    # one writer at a time (fold processes of `pancls cv` each ask for the demo cohort: the others wait, then skip
    # what is on disk); under the lock, what a killed run was writing is a leftover and goes
    with open(out / ".synth.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        for folder in (out, out / "images", out / "masks"):
            remove_stale_temps(folder)
        if (out / "dicom").is_dir():  # synth_dicom's series folders being built (hidden siblings)
            for left in (out / "dicom").glob(".*"):
                if left.is_dir():
                    shutil.rmtree(left, ignore_errors=True)
        return _generate(out, config, scale, force, workers, progress)


def _generate(out: Path, config: SynthConfig, scale: float, force: bool, workers: Optional[int],
              progress: bool) -> dict:
    from tqdm import tqdm

    params = _params(config, scale)
    params_path = out / "synth.json"
    if params_path.exists() and not force:
        try:
            previous = json.loads(params_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous != params:
            raise UserError("holds a synthetic dataset made with other parameters (see synth.json); "
                            "use --force to regenerate it or choose another --out", out)
    atomic_write_json(params_path, params)

    specs = plan_patients(config, scale)
    jobs = [(s, config, str(out), i < config.dicom_subset, force) for i, s in enumerate(specs)]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="synth", unit="patient", disable=not progress)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
            written = []
            for done in pool.imap_unordered(_write_patient, jobs, chunksize=4):
                written.append(done)
                bar.update()
    else:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            written = []
            for job in jobs:
                written.append(_write_patient(job))
                bar.update()
    bar.close()
    seconds = time.perf_counter() - start

    manifest = pd.DataFrame({
        "patient_id": [s.patient_id for s in specs],
        "image": [f"images/{s.patient_id}.nii.gz" for s in specs],
        "mask": [f"masks/{s.patient_id}_lesion.nii.gz" for s in specs],
        "label": [s.label for s in specs],
    })
    atomic_write_text(out / "manifest.csv", manifest.to_csv(index=False, lineterminator="\n"))
    atomic_write_text(out / "README.md", _readme(config, scale, params["counts"], specs))
    return {"counts": params["counts"], "patients": len(specs), "written": int(sum(written)),
            "skipped": len(specs) - int(sum(written)), "seconds": round(seconds, 2), "workers": workers}


def _readme(config: SynthConfig, scale: float, counts: Dict[str, int], specs: List[PatientSpec]) -> str:
    rows = "\n".join(f"| {c} | {PAPER_COUNTS[c]} | {'paper' if c in ('PDAC', 'CP') else 'assumed'}"
                     f" | {config.counts[c]} | {counts[c]} |" for c in DEFAULT_CLASSES)
    dicom = ", ".join(s.patient_id for s in specs[:config.dicom_subset]) or "none"
    looks = "\n".join(f"{c:<6}{APPEARANCE[c]}" for c in DEFAULT_CLASSES)
    return f"""# Synthetic pancreatic-tumour CT (pancls demo dataset)

Procedural phantoms written by `pancls synth`; **no patient data**, not for clinical use. Each volume is a
contrast-enhanced abdominal CT in Hounsfield units with one pancreatic lesion whose appearance depends on
its class (loosely after the radiology of each entity):

```
{looks}
```

## Classes and counts

{len(specs)} patients (scale {scale:g}, at least {config.min_per_class} per class so that stratified 4-fold
cross-validation has every class in every fold). The 530-patient split follows the tSP paper (Yang et al.,
AAAI 2023): PDAC 315 and CP 8 are stated in its text; IPMN, NET, SCN and ASC are **our assumption** (the paper
gives them only in a figure).

| class | paper-scale count | source | config count | this dataset |
|---|---|---|---|---|
{rows}

## Files

- `images/<pid>.nii.gz`: int16 HU, {config.size[0]}x{config.size[1]}x{config.size[2]} voxels of
  {config.spacing[0]:g}x{config.spacing[1]:g}x{config.spacing[2]:g} mm, RAS+ affine centred on the origin.
- `masks/<pid>_lesion.nii.gz`: uint8 lesion mask on the same grid (CP: the abnormal pancreatic segment).
- `manifest.csv`: `patient_id, image, mask, label`, paths relative to this folder.
- `dicom/<pid>/`: the first {config.dicom_subset} patients ({dicom}) also as a DICOM CT series (12-bit
  unsigned, RescaleIntercept -1024, LPS geometry matching the NIfTI), with shuffled file names and a
  coronal LOCALIZER image in the same folder, to exercise `pancls ingest`.
- `synth.json`: the generation parameters; re-running with the same ones skips finished patients.

## Generation

seed {config.seed}, generator version {GENERATOR_VERSION}. Patient k of a class is drawn from
`numpy.random.default_rng([seed, class_index, k])`: the same seed gives identical volumes, and another scale
adds or drops patients without changing the others. Regenerate with:

    pancls synth --out <dir> --seed {config.seed} --scale {scale:g} --size {' '.join(map(str, config.size))} \\
        --spacing {' '.join(f'{s:g}' for s in config.spacing)} --dicom-subset {config.dicom_subset}

(plus `--config` if the class counts or the per-class minimum differ from the defaults).
"""
