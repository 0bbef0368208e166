"""Predict the subtype of new CT studies with a ``pancls cv`` run folder: the fold ensemble, its agreement,
and quality flags.

Pipeline per study (the model loads once; one bad study never stops the others)::

    input (DICOM folder/zip, NIfTI, manifest CSV row)
      -> series chosen by the rules of ``pancls ingest`` -> Volume (int16 HU, RAS affine)
      -> the run's own deterministic preprocessing (:func:`pancls.data.transforms.deterministic_specs` with
         ``configs/config.yaml``'s ``preprocess``: never re-specified by hand; see :class:`Preprocessor`)
      -> every fold model -> softmax(logits / T_k) with fold k's temperature -> mean over folds

The ensemble probability of class c is the mean of the fold models' calibrated probabilities,

    p_c = (1/F) sum_k softmax(z_k / T_k)_c,

its ``spread`` the standard deviation over folds, and ``agreement`` the number of folds whose own argmax is
the ensemble's prediction (4/4 = unanimous).

ROI policy: the run's ``roi`` decides. A ``mask`` model refuses a study given without a mask (the training
crop cannot be reproduced without it); ``centre``/``box`` models need none and flag the study
``roi_from_centre`` / ``roi_fixed_box``.

Privacy: outputs carry no patient identifiers -- no UIDs, names, dates, paths or free-text descriptions --
unless ``keep_ids``. A study is named by its position (input ``i``, study ``j`` within it) and the SHA-256 of
its input files' bytes (which only someone holding those exact files can match).
"""
from __future__ import annotations

import csv
import hashlib
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set

import numpy as np
import torch

from pancls.errors import UserError, exception_text, redact_names

#: Relative tolerance on the training spacing range before a study is flagged (rounding of headers).
SPACING_TOLERANCE = 0.05


# ------------------------------------------------------------------------------------------- the model
@dataclass
class FoldModel:
    fold: int
    model: torch.nn.Module
    temperature: float
    checkpoint: str  # file name inside fold_k/


@dataclass
class LoadedRun:
    """A cv run folder ready for inference: its config, classes, ROI policy and the fold models."""

    run: Path
    cfg: Any  # pancls.cv.CVConfig
    classes: List[str]
    folds: List[FoldModel]
    metadata: Dict[str, Any]
    model_id: str  # sha256 (16 hex) over the fold checkpoints' bytes and the config
    config_sha256: str
    device: torch.device
    ensemble: torch.nn.Module  # pancls.bundle.FoldEnsemble of the folds: what predict runs and export traces

    @property
    def requires_mask(self) -> bool:
        return self.cfg.preprocess.roi == "mask"

    def info(self) -> Dict[str, Any]:
        """The model block of every output file."""
        p = self.cfg.preprocess
        return {"model_id": self.model_id, "config_sha256": self.config_sha256, "classes": self.classes,
                "folds": [f.fold for f in self.folds], "checkpoints": [f"fold_{f.fold}/{f.checkpoint}" for f in self.folds],
                "temperatures": [round(f.temperature, 6) for f in self.folds], "roi": p.roi,
                "requires_mask": self.requires_mask, "spacing_mm": p.spacing, "windows_hu": p.windows,
                "size": p.size, "backbone": self.cfg.model.backbone, "head": self.cfg.model.head,
                "trained_with_pancls": self.metadata.get("pancls_version")}


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in str(text).split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def fold_checkpoint(fold_dir: Path, record: Dict[str, Any]) -> str:
    """The checkpoint file the fold evaluated its held-out patients with (``fold.json`` says; older runs:
    ``best.pt`` under ``best_inner`` selection when present, else ``last.pt``)."""
    from pancls.train.engine import BEST, CHECKPOINT

    if record.get("checkpoint"):
        return str(record["checkpoint"])
    return BEST if record.get("selection") == "best_inner" and (fold_dir / BEST).exists() else CHECKPOINT


def load_run(run: Path, fold: Optional[int] = None, device: str = "auto") -> LoadedRun:
    """Load a finished ``pancls cv`` run folder (all folds, or only ``fold``) for inference.

    Refuses, in one line each: a folder that is not a run, a run with unfinished folds (unless ``fold``
    names a finished one), a run written by a newer pancls, a checkpoint that is not a pancls state dict or
    does not fit the network of the run's config.
    """
    from pancls import __version__
    from pancls.config import load_yaml
    from pancls.cv import FOLD_DONE, load_config, resolve_model, run_config_path
    from pancls.io import read_json
    from pancls.lt import resolve_device
    from pancls.models import create_model
    from pancls.train.checkpoint import load_checkpoint

    run = Path(run)
    if not run.is_dir():
        raise UserError("not a folder; --model takes a `pancls cv` run folder", run)
    needed = [run_config_path(run), run / "configs" / "metadata.json", run / "classes.json"]
    missing = [str(p.relative_to(run)) for p in needed if not p.is_file()]
    if missing:
        raise UserError(f"not a complete pancls cv run folder (missing {', '.join(missing)})", run)
    metadata = read_json(run / "configs" / "metadata.json", "run's metadata", dict)
    trained_with = metadata.get("pancls_version", "0")
    if _version_tuple(trained_with) > _version_tuple(__version__):
        raise UserError(f"the run was written by pancls {trained_with}, newer than this pancls {__version__}; "
                        "upgrade pancls to use it", run)
    config_text = run_config_path(run).read_bytes()
    cfg = load_config(load_yaml(run_config_path(run)))
    classes = read_json(run / "classes.json", "run's class list", dict).get("classes")
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise UserError("the run's class list is damaged: 'classes' must list two or more distinct names",
                        run / "classes.json")
    if fold is not None and not 0 <= fold < cfg.cv.folds:
        raise UserError(f"the run has folds 0..{cfg.cv.folds - 1}, not {fold}", "--fold")
    wanted = [fold] if fold is not None else list(range(cfg.cv.folds))
    unfinished = [k for k in wanted if not (run / f"fold_{k}" / FOLD_DONE).is_file()]
    if unfinished:
        raise UserError(f"incomplete run: fold(s) {unfinished} are not finished; finish them with "
                        "`pancls cv --resume` or choose a finished one with --fold k", run)
    device = resolve_device(device)
    net_cfg = resolve_model(cfg)
    digest = hashlib.sha256(config_text)
    folds = []
    for k in wanted:
        fold_dir = run / f"fold_{k}"
        record = read_json(fold_dir / FOLD_DONE, "fold record", dict)
        name = fold_checkpoint(fold_dir, record)
        weights = load_checkpoint(fold_dir / name, map_location="cpu")["model"]
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise UserError("not a pancls checkpoint (no 'model' state dict of tensors)", fold_dir / name)
        model = create_model(net_cfg.backbone, net_cfg.head, len(classes), backbone_kwargs=net_cfg.backbone_kwargs,
                             head_kwargs=net_cfg.head_kwargs)
        try:
            result = model.load_state_dict(weights, strict=False)
        except RuntimeError as exc:  # a tensor of another shape (strict=False only forgives missing/extra keys)
            raise UserError(f"the checkpoint does not fit the run's network ({exception_text(exc)})",
                            fold_dir / name) from None
        if result.missing_keys or result.unexpected_keys:
            raise UserError(f"the checkpoint does not fit the run's network ({len(result.missing_keys)} missing "
                            f"keys, e.g. {result.missing_keys[:3]}; {len(result.unexpected_keys)} unexpected, "
                            f"e.g. {result.unexpected_keys[:3]})", fold_dir / name)
        digest.update((fold_dir / name).read_bytes())
        temperature = record.get("temperature", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < 1e6:
            raise UserError(f"the fold record is damaged: temperature {temperature!r} is not a number > 0",
                            fold_dir / FOLD_DONE)
        folds.append(FoldModel(k, model.eval().to(device), float(temperature), name))
    from pancls.bundle import FoldEnsemble

    ensemble = FoldEnsemble([f.model for f in folds], [f.temperature for f in folds]).eval().to(device)
    return LoadedRun(run=run, cfg=cfg, classes=classes, folds=folds, metadata=metadata,
                     model_id=digest.hexdigest()[:16], config_sha256=hashlib.sha256(config_text).hexdigest(),
                     device=device, ensemble=ensemble)


@torch.no_grad()
def ensemble(loaded: LoadedRun, x: torch.Tensor) -> Dict[str, np.ndarray]:
    """``x``: ``(B, C, *size)`` preprocessed studies -> per-fold calibrated probabilities ``(F, B, K)``
    (:meth:`pancls.bundle.FoldEnsemble.fold_probabilities`, the network ``pancls export`` traces), their mean
    ``(B, K)``, spread (SD over folds), the ensemble prediction and the folds agreeing with it."""
    probs = loaded.ensemble.fold_probabilities(x.to(loaded.device)).cpu().numpy().astype(np.float64)
    mean = probs.mean(axis=0)
    pred = mean.argmax(axis=1)
    agreement = (probs.argmax(axis=2) == pred[None, :]).sum(axis=0)
    return {"per_fold": probs, "mean": mean, "spread": probs.std(axis=0), "pred": pred, "agreement": agreement}


# ------------------------------------------------------------------------------------------ the inputs
@dataclass
class Study:
    """One study to predict: how to get its volume, its optional mask, and what was decided on the way."""

    input: int  # 1-based position of the INPUT argument it came from
    study: int  # 1-based study number within that input
    kind: str  # "nifti", "dicom" or "manifest"
    load: Optional[Callable[[], Any]] = None  # -> pancls.ct.volume.Volume
    files: List[Path] = field(default_factory=list)  # what the checksum covers
    mask: Optional[Path] = None
    flags: List[str] = field(default_factory=list)
    series: Dict[str, Any] = field(default_factory=dict)  # the DICOM series choice (no identifiers)
    ids: Dict[str, str] = field(default_factory=dict)  # identifiers, written only with keep_ids
    patient_id: Optional[str] = None  # a manifest's own patient_id column: written only with keep_ids
    error: Optional[Any] = None  # why the study cannot be predicted (a message or the exception); the batch goes on
    dicom_headers: List[Any] = field(default_factory=list)  # the chosen series' datasets, for the SR
    #: the input's file and folder names and zip member paths: taken out of the reasons written to output files
    names: Set[str] = field(default_factory=set)


def _is_nifti(path: Path) -> bool:
    """A volume file: NIfTI, or NRRD/MetaImage as 3D Slicer exports it (read by :func:`pancls.ct.nifti.load_image`)."""
    from pancls.ct.itk import is_itk

    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz") or is_itk(path)


def input_names(paths: Iterable[Path], source: Path, tmp: Optional[Path] = None) -> Set[str]:
    """Every name of ``paths`` (files found under the INPUT ``source``) that a reason could repeat: each folder
    and file name below ``source`` and the source's own, and for a file unpacked from a zip archive under ``tmp``
    (``tmp/<key>/<member path>``) its member path and each of its parts (:func:`pancls.errors.redact_names`)."""
    source = Path(source)
    names = {source.name}
    for p in map(Path, paths):
        parts: tuple = ()
        for root, skip in ((tmp, 1), (source, 0)):
            if root is None:
                continue
            try:
                parts = p.relative_to(root).parts[skip:]
            except ValueError:
                continue
            break
        names.update(parts or (p.name,))
        if len(parts) > 1:
            names.update("/".join(parts[i:]) for i in range(len(parts) - 1))
    return names


def _dicom_studies(index: int, source: Path, rules, policy, tmp: Path, progress: bool) -> List[Study]:
    from pancls.ct.scan import problems_beside, scan
    from pancls.ct.select import preference_key, select_series
    from pancls.ct.volume import build_volume

    result = scan([source], tmp_dir=tmp, progress=progress)
    names = input_names(result.origin, source, tmp)
    by_study: Dict[str, list] = {}
    for decision in select_series(result.series, rules):
        by_study.setdefault(decision.series.study_hash, []).append(decision)
    studies = []
    for number, decisions in enumerate(by_study.values(), 1):
        kept = [d for d in decisions if d.kept]
        candidates = [d.series for d in decisions if d.kept or d.reason.startswith("not preferred")]
        study = Study(input=index, study=number, kind="dicom", names=names)
        studies.append(study)
        if not kept:
            reasons = sorted({d.reason for d in decisions})
            study.error = f"no usable CT series ({'; '.join(reasons[:3])})"
            continue
        chosen = kept[0].series
        first = chosen.first
        key = preference_key(chosen, rules)[:-2]  # everything but series number and hash
        ties = [s for s in candidates if s is not chosen and preference_key(s, rules)[:-2] == key]
        if ties:
            listed = ", ".join(f"S{s.first.series_number} ({s.n_slices} slices)" for s in [chosen, *ties])
            study.error = (f"ambiguous series choice: {listed} tie on every selection rule; give the series' own "
                           "folder as INPUT, or choose with selection.include_description in --config")
            continue
        if len(candidates) > 1:
            study.flags.append(f"series_chosen_among_several:{len(candidates)}")
        lost = problems_beside(chosen, result.skipped)
        if lost:  # a truncated or damaged slice is not in the series: the volume may lack it (ingest notes it too)
            study.flags.append(f"unreadable_files_beside_series:{len(lost)}")
        study.series = {"series_number": first.series_number, "n_slices": chosen.n_slices,
                        "orientation": chosen.orientation_label, "candidates": len(candidates)}
        if key[0] < len(rules.phase_preference):  # the description names a phase of selection.phase_preference
            study.series["phase"] = rules.phase_preference[key[0]]
        study.files = list(chosen.paths)
        study.dicom_headers = [h.dataset for h in chosen.headers]
        ds = study.dicom_headers[0]
        study.ids = {"source": str(source), "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
                     "series_instance_uid": str(ds.get("SeriesInstanceUID", ""))}
        study.load = (lambda s=chosen: build_volume(s.paths, policy, headers=s.headers))
    for archive in result.archives:  # a damaged zip may hold a whole study: its own failed row, not silence
        studies.append(Study(input=index, study=len(studies) + 1, kind="dicom", names=names,
                             error=UserError(archive.reason, archive.path), ids={"source": str(archive.path)}))
    if not studies:
        found = sorted({s.reason for s in result.skipped})
        nifti = [p for p in source.rglob("*") if _is_nifti(p)] if source.is_dir() else []
        if nifti:  # give NIfTI files themselves, or a manifest: a folder is read as a DICOM study
            found.insert(0, f"{len(nifti)} NIfTI/NRRD/MetaImage file(s): give each as INPUT, or list them in a "
                                 "manifest CSV")
        error = UserError("no DICOM image series found" + (f" ({'; '.join(found[:3])})" if found else ""), source)
        return [Study(input=index, study=0, kind="unknown", error=error, ids={"source": str(source)}, names=names)]
    return studies


def _nifti_study(index: int, image: Path, mask: Optional[Path], kind: str = "nifti") -> Study:
    from pancls.ct.nifti import load_image

    study = Study(input=index, study=1, kind=kind, files=[image], mask=mask, ids={"source": str(image)},
                  load=lambda: load_image(image), names={image.name, *([mask.name] if mask else [])})
    study.flags.append("contrast_phase_unknown")  # a NIfTI header has no acquisition description
    return study


def _manifest_studies(index: int, path: Path) -> List[Study]:
    """Rows of a CSV with an ``image`` column (paths relative to the CSV), optional ``mask`` and ``patient_id``."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the CSV ({exception_text(exc, path)})", path) from None
    if "image" not in table.columns:
        raise UserError(f"a manifest for predict needs an 'image' column (found: {', '.join(table.columns)})", path)
    base = path.resolve().parent
    studies = []
    for number, row in enumerate(table.to_dict("records"), 1):
        image = base / row["image"]
        mask = base / row["mask"] if row.get("mask") else None
        study = _nifti_study(index, image, mask, kind="manifest")
        study.study = number
        study.patient_id = row.get("patient_id") or None
        missing = [(key, row[key]) for key, file in (("image", image), ("mask", mask))
                   if file is not None and not file.is_file()]
        if missing:  # the paths go to the terminal (where) only: a CSV's paths may name the patient
            study.error = UserError(f"row {number + 1}: {' and '.join(k for k, _ in missing)} file(s) not found",
                                    "; ".join(v for _, v in missing))
        studies.append(study)
    if not studies:
        raise UserError("the manifest has no rows", path)
    return studies


def failure_text(exc: BaseException, where: bool = True) -> str:
    """One line for a study's failure: a :class:`UserError` as itself (without the file it names when
    ``where`` is false: input paths may carry identifiers, so output files get the reason only); anything else
    is a pancls bug, named as one (type and first line), so that the batch can go on and the row says what
    happened."""
    if isinstance(exc, UserError):
        return " ".join((str(exc) if where else exc.reason).split())
    return f"internal error ({exception_text(exc)}); please report it with the input's description"


def collect_studies(inputs: Sequence[Path], mask: Optional[Path] = None, rules=None, policy=None,
                    tmp: Optional[Path] = None, progress: bool = False) -> List[Study]:
    """Every study of every input, in order; zip archives are unpacked into ``tmp`` (the CLI passes a temporary
    folder it removes; default: the system temp folder). A missing input, or ``mask`` with several inputs, is a
    :class:`UserError` for the whole call (nothing was predicted yet); an input or a study that cannot be read
    (an unreadable manifest, no CT series, an ambiguous choice) becomes a study with ``error`` instead, so that
    the others still run."""
    from pancls.ct.select import with_default_min_slices
    from pancls.ct.volume import GeometryPolicy

    rules = with_default_min_slices(rules)  # ingest's minimum: a single slice or a scout is not a study to classify
    policy = policy or GeometryPolicy()
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise UserError("give at least one INPUT (DICOM folder or zip, NIfTI file, or manifest CSV)", "INPUT")
    for p in inputs:
        if not p.exists():
            raise UserError("no such file or folder", p)
    if mask is not None:
        if not Path(mask).is_file():
            raise UserError("no such file", mask)
        if len(inputs) != 1 or inputs[0].suffix.lower() == ".csv":
            raise UserError("--mask goes with one image INPUT; for many studies give a manifest CSV with a "
                            "'mask' column", "--mask")
    studies: List[Study] = []
    for index, p in enumerate(inputs, 1):
        try:
            if p.is_file() and p.suffix.lower() == ".csv":
                found = _manifest_studies(index, p)
            elif p.is_file() and _is_nifti(p):
                found = [_nifti_study(index, p, Path(mask) if mask else None)]
            else:
                found = _dicom_studies(index, p, rules, policy, tmp or Path(tempfile.gettempdir()), progress)
                if mask is not None:
                    if len(found) != 1:
                        raise UserError(f"--mask given but the input holds {len(found)} studies", p)
                    found[0].mask = Path(mask)
        except Exception as exc:  # noqa: BLE001 - this input is unusable; the others still run
            found = [Study(input=index, study=0, kind="unknown", error=exc, ids={"source": str(p)}, names={p.name})]
        studies.extend(found)
    return studies


def input_checksum(files: Sequence[Path]) -> str:
    """sha256 over the bytes of the input files in sorted order (names are not hashed). An unkeyed digest of
    files that carry the patient's name and UIDs: anyone holding the files can link a result to them, so it is
    written only with the identifiers (``--keep-ids``)."""
    h = hashlib.sha256()
    for f in sorted(Path(f) for f in files):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------- preprocessing
def quality_flags(volume, loaded: LoadedRun, phase: Optional[str] = None) -> List[str]:
    """What the model was not trained on, or what a reader should know about this volume. ``phase``: the contrast
    phase the series description names (see :func:`_dicom_studies`), if any."""
    from pancls.data.transforms import ras_extent, ras_spacing

    flags = []
    p = loaded.cfg.preprocess
    spacing = ras_spacing(volume.affine)
    training = loaded.metadata.get("pancls", {}).get("training_spacing_mm")
    if training:
        lo, hi = training["min"], training["max"]
        out = [f"{axis}={s:.2f}mm (trained {a:.2f}-{b:.2f})" for axis, s, a, b in zip("RAS", spacing, lo, hi, strict=True)
               if s < a * (1 - SPACING_TOLERANCE) or s > b * (1 + SPACING_TOLERANCE)]
        if out:
            flags.append("spacing_outside_training_range:" + ",".join(out))
        thickness = volume.meta.get("slice_thickness_mm") or []
        if thickness and max(thickness) > hi[2] * (1 + SPACING_TOLERANCE):
            flags.append(f"slice_thickness_outside_training_range:{max(thickness):g}mm (trained up to {hi[2]:.2f})")
    else:
        flags.append("training_range_unknown")
    roi = [n * s for n, s in zip(p.size, p.spacing, strict=True)]
    fov = ras_extent(volume.array.shape, volume.affine)
    small = [f"{axis}={f:.0f}<{r:.0f}mm" for axis, f, r in zip("RAS", fov, roi, strict=True) if f < r]
    if small and p.roi != "mask":
        flags.append("field_of_view_smaller_than_roi:" + ",".join(small))
    if volume.meta.get("source") == "dicom":
        if not (phase or volume.meta.get("contrast_bolus_agent") or volume.meta.get("contrast_phase")):
            flags.append("contrast_phase_unknown")
    if p.roi == "centre":
        flags.append("roi_from_centre")
    elif p.roi == "box":
        flags.append("roi_fixed_box")
    flags += [f"volume:{f}" for f in volume.flags]
    return flags


def roi_cropped(mask, affine, p) -> List[str]:
    """``["roi_cropped:<axis>=<needed>><input>mm,..."]`` when a ``roi: mask`` model's crop, the mask's bounding box
    plus ``margin_mm`` on each side (in output voxels, as ``CropForegroundd`` takes it), is larger than the model's
    input field of view (``size`` x ``spacing``) along an axis: ``ResizeWithPadOrCropd`` then keeps its centre and
    cuts the rim, lesion included (the field-of-view check of :func:`quality_flags` is for the other ROIs)."""
    import math

    idx = np.argwhere(np.asarray(mask))
    if idx.size == 0:
        return []
    a = np.asarray(affine, float)[:3, :3]
    span = [0.0] * 3  # the bounding box's extent (mm) along R, A, S (each voxel axis to its nearest, as ras_extent)
    for j in range(3):
        span[int(np.argmax(np.abs(a[:, j])))] = float((idx[:, j].max() - idx[:, j].min() + 1) * np.linalg.norm(a[:, j]))
    out = []
    for axis, mm, s, n, m in zip("RAS", span, p.spacing, p.size, p.margin_voxels, strict=True):
        if math.ceil(mm / s - 1e-6) + 2 * m > n:
            out.append(f"{axis}={mm + 2 * m * s:.0f}>{n * s:.0f}mm")
    return ["roi_cropped:" + ",".join(out)] if out else []


class Preprocessor:
    """The run's deterministic pipeline (:func:`pancls.data.transforms.deterministic_specs`) on one study.

    Training read each volume from the NIfTI that ``pancls ingest`` wrote; here the volume is already in memory,
    so the pipeline's first step (``LoadImaged`` with MONAI's ``NibabelReader``) is replaced by the same reader
    applied to the same NIfTI image *in memory* (:func:`pancls.ct.write.nifti_image`, its affine as a NIfTI
    header stores it): no 50 MB temporary file per study, and a DICOM study still gives the tensor its
    ingested NIfTI gives (tested). Every later step is the run's own, instantiated once.
    """

    def __init__(self, cfg):
        from monai.transforms import LoadImage

        from pancls.data.transforms import (
            IMAGE_KEY,
            MASK_KEY,
            deterministic_specs,
            instantiate_specs,
            quiet_monai_readers,
        )

        self.cfg = cfg
        keys = [IMAGE_KEY, MASK_KEY] if cfg.roi == "mask" else [IMAGE_KEY]
        specs = deterministic_specs(cfg, [IMAGE_KEY, MASK_KEY])
        load = specs[0]
        assert load["_target_"] == "LoadImaged", load
        options = {k: v for k, v in load.items() if k not in ("_target_", "keys")}
        with quiet_monai_readers():
            self.loader = LoadImage(**options)
        self.with_mask = instantiate_specs(specs[1:])
        self.image_only = None if cfg.roi == "mask" else instantiate_specs(deterministic_specs(cfg, keys)[1:])

    def _loaded(self, img, name: str):
        """What ``LoadImage`` returns for the NIfTI image ``img`` had it been read from a file."""
        from monai.data import MetaTensor
        from monai.utils import convert_to_dst_type

        reader = self.loader.readers[-1]  # the one the spec names (tried first)
        reader.filenames = (name,)  # what read(path) would have set: get_data pairs each image with its name
        array, meta = reader.get_data(img)
        array = convert_to_dst_type(array, dst=array, dtype=self.loader.dtype)[0]
        meta["filename_or_obj"] = name
        return MetaTensor.ensure_torch_and_prune_meta(array, meta, self.loader.simple_keys,
                                                      pattern=self.loader.pattern, sep=self.loader.sep)

    def _image(self, volume):
        """The volume's NIfTI image (its affine as a file gives it back: the header's float32 sform) and what
        ``LoadImage`` returns for it."""
        import nibabel as nib

        from pancls.ct.write import nifti_image

        stored = nifti_image(volume)
        stored.update_header()
        img = nib.Nifti1Image(stored.dataobj, stored.header.get_best_affine(), header=stored.header)
        return img, self._loaded(img, "study")

    def _mask(self, img, mask: Path, label: Optional[int] = None):
        """The mask on the image's voxel grid, and a note when it had to be reoriented. A mask saved in another
        orientation or slice order (same voxels, axes flipped or permuted, e.g. dcm2niix's geometry or DICOM
        SEG) is reordered exactly; one that would need resampling is refused: the lesion drawn on another grid
        is not this study's lesion voxel for voxel. A mask of several labels is refused unless ``label`` (``--mask
        -label``) chooses the lesion's (:func:`pancls.ct.mask.select_label`); a mask ROI larger than the model's
        input is noted (:func:`roi_cropped`)."""
        import nibabel as nib
        import numpy as np

        from pancls.ct.mask import axes_reordered, check_inside, onto_grid, read_mask, select_label
        from pancls.data.manifest import AFFINE_ATOL_MM
        from pancls.ingest import MASK_REORIENTED

        labels, affine, _ = read_mask(mask)
        labels = select_label(labels, label, mask)
        on, how = onto_grid(labels, affine, img.shape, img.affine, AFFINE_ATOL_MM)
        if how != "reoriented":
            raise UserError("the mask is not on the image's voxel grid (it would need resampling): give the mask "
                            "drawn on this series", mask)
        # marked beyond the image's extent (drawn on a longer series?): refused beyond 1 %, as in ingest
        lost = check_inside(labels, affine, img.shape[:3], img.affine, mask)
        out = nib.Nifti1Image(np.asarray(on, dtype=np.int16), img.affine, header=img.header)
        # noted when its axes had to be reordered (not for a mask that only covers another extent)
        notes = [MASK_REORIENTED] if axes_reordered(affine, img.affine) else []
        if lost:
            notes.append(f"mask_voxels_outside_image:{lost}")
        if self.cfg.roi == "mask":
            notes += roi_cropped(on, img.affine, self.cfg)
        return self._loaded(out, "mask"), notes

    def __call__(self, volume, mask: Optional[Path], mask_label: Optional[int] = None):
        """``(tensor (C, *size), notes)`` for one study."""
        img, image = self._image(volume)
        item, notes = {"image": image}, []
        if mask is not None:
            item["mask"], notes = self._mask(img, mask, mask_label)
        transform = self.with_mask if mask is not None else self.image_only
        try:
            out = transform(item)
        except RuntimeError as exc:  # MONAI wraps errors raised inside a transform
            cause = exc.__cause__
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise UserError(cause.reason, mask or cause.where) from None
        return torch.as_tensor(out["image"]).as_subclass(torch.Tensor), notes


class LoadStudyd:
    """The first step of an exported bundle's pipeline: ``{"image": path, "mask": path}`` -> what
    :class:`Preprocessor` gives the run's later steps, read as ``pancls predict`` reads the same files.

    ``LoadImaged`` alone would read a NIfTI without sform/qform with nibabel's guessed (mirrored) affine, and a
    mask cropped to its extent or half a voxel off the image's grid as if it lay on it (a crop in the wrong
    place, silently); this step refuses the first two and aligns a mask on the same voxel grid exactly
    (:meth:`Preprocessor._mask`, :func:`pancls.ct.nifti.load_image`), so that bundle and ``predict`` give the
    same answer or the same refusal. ``keys`` is ``["image"]`` or ``["image", "mask"]``; the notes of a
    reoriented or partly outside mask go to ``"notes"``."""

    def __init__(self, keys: Sequence[str], preprocess: Dict[str, Any]):
        from pancls.config import from_dict
        from pancls.data.transforms import PreprocessConfig

        self.keys = list(keys)
        self.pre = Preprocessor(from_dict(PreprocessConfig, preprocess, "preprocess"))

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        from pancls.ct.nifti import load_image
        from pancls.ct.select import check_stack
        from pancls.ct.volume import check_ct_hu

        volume = load_image(data["image"])
        check_ct_hu(volume, data["image"])
        check_stack(volume, data["image"])
        img, image = self.pre._image(volume)
        out = {**data, "image": image, "notes": []}
        if "mask" in self.keys:
            out["mask"], out["notes"] = self.pre._mask(img, Path(data["mask"]))
        return out


# ----------------------------------------------------------------------------------------- predict
def predict(loaded: LoadedRun, studies: Sequence[Study], keep_ids: bool = False, batch_size: Optional[int] = None,
            progress: bool = True,
            on_result: Optional[Callable[[Dict[str, Any], Study, Optional[str]], None]] = None,
            mask_label: Optional[int] = None, min_slices: Optional[int] = None) -> List[Dict[str, Any]]:
    """One result dict per study, in order. A study that fails gets ``status: "failed"`` and its one-line
    ``error`` (the reason; the file it names too with ``keep_ids``); the others go on. ``on_result(result,
    study, message)`` is called as each study is done, ``message`` being the full one-line failure or None.
    ``mask_label``: each mask's lesion is its voxels of this value (recorded as ``mask_label`` in the result).
    ``min_slices``: a volume given as one file (NIfTI ...) with fewer slices fails (default
    :data:`pancls.ct.select.MIN_SLICES`, as a DICOM series' selection)."""
    from tqdm.auto import tqdm

    from pancls.ct.select import check_stack
    from pancls.ct.volume import check_ct_hu

    if batch_size is None:
        batch_size = 8 if loaded.device.type == "cuda" else 1
    results: List[Optional[Dict[str, Any]]] = [None] * len(studies)
    pending: List[tuple] = []

    def flush():
        if not pending:
            return
        out = ensemble(loaded, torch.stack([x for _, x, _ in pending]))
        for row, (i, _, base) in enumerate(pending):
            results[i] = {**base, **_prediction(loaded, out, row)}
            if on_result:
                on_result(results[i], studies[i], None)
        pending.clear()

    pre = Preprocessor(loaded.cfg.preprocess)
    bar = tqdm(studies, desc="studies", unit="study", disable=None if progress else True, leave=False)
    for i, study in enumerate(bar):
        base = _base_fields(loaded, study, keep_ids)
        if study.mask is not None and mask_label is not None:
            base["mask_label"] = mask_label
        try:
            if isinstance(study.error, BaseException):
                raise study.error
            if study.error:
                raise UserError(study.error)
            if loaded.requires_mask and study.mask is None:
                raise UserError("this model was trained with roi 'mask' and needs the lesion mask of every "
                                "study: pass --mask (one study) or a manifest with a 'mask' column, or use a "
                                "model trained with roi 'centre'/'box'")
            volume = study.load()
            check_ct_hu(volume, study.ids.get("source", f"input {study.input}"))
            if study.kind != "dicom":  # a DICOM series met min_slices when it was selected
                check_stack(volume, study.ids.get("source", f"input {study.input}"), min_slices)
            base["quality_flags"] = study.flags + quality_flags(volume, loaded, study.series.get("phase"))
            if keep_ids:  # a digest of files that hold the patient's name and UIDs links a result to them
                base["ids"]["input_sha256"] = input_checksum(study.files + ([study.mask] if study.mask else []))
            x, notes = pre(volume, study.mask, mask_label)
            base["quality_flags"] += notes
        except Exception as exc:  # noqa: BLE001 - one bad study never stops the batch
            # output files get the reason without the input's file names (SOP UIDs, patient folders); the terminal
            # (on_result) the whole line, names and all
            error = failure_text(exc, where=keep_ids)
            results[i] = {**base, "status": "failed", "error": error if keep_ids else redact_names(error, study.names)}
            if on_result:
                on_result(results[i], study, failure_text(exc))
            continue
        pending.append((i, x, base))
        if len(pending) >= batch_size:
            flush()
    flush()
    return results  # type: ignore[return-value]


def _base_fields(loaded: LoadedRun, study: Study, keep_ids: bool) -> Dict[str, Any]:
    from pancls import __version__

    base: Dict[str, Any] = {"input": study.input, "study": study.study, "kind": study.kind}
    if study.patient_id is not None and keep_ids:  # a hand-made CSV may hold the hospital's own ids: the row
        base["patient_id"] = study.patient_id      # is found again by input and study (the CSV's row number)
    if study.series:
        base["series"] = dict(study.series)
    base.update(quality_flags=list(study.flags), model_id=loaded.model_id,
                config_sha256=loaded.config_sha256, pancls_version=__version__,
                mask_used=study.mask is not None and loaded.requires_mask)
    if keep_ids:
        base["ids"] = dict(study.ids, **({"mask": str(study.mask)} if study.mask else {}))
    return base


def _prediction(loaded: LoadedRun, out: Dict[str, np.ndarray], row: int) -> Dict[str, Any]:
    classes = loaded.classes
    pred = int(out["pred"][row])
    return {
        "status": "ok", "error": None, "predicted": classes[pred],
        "probabilities": {c: round(float(v), 6) for c, v in zip(classes, out["mean"][row], strict=True)},
        "spread": {c: round(float(v), 6) for c, v in zip(classes, out["spread"][row], strict=True)},
        "agreement": int(out["agreement"][row]), "n_folds": len(loaded.folds),
        "fold_predictions": [classes[int(k)] for k in out["per_fold"][:, row].argmax(axis=1)],
    }


# ------------------------------------------------------------------------------------------- output
CSV_FIXED = ["input", "study", "kind", "patient_id", "status", "predicted", "agreement", "n_folds"]
CSV_TAIL = ["quality_flags", "series_number", "model_id", "config_sha256", "pancls_version", "error"]


def to_csv(results: Sequence[Dict[str, Any]], classes: Sequence[str]) -> str:
    buf = io.StringIO()
    columns = [*CSV_FIXED, *[f"p_{c}" for c in classes], *[f"spread_{c}" for c in classes], *CSV_TAIL]
    if any("mask_label" in r for r in results):
        columns.insert(columns.index("quality_flags"), "mask_label")
    if any("sr" in r for r in results):  # with --sr: this row's SR file (or why none), not an earlier run's
        columns.insert(columns.index("error"), "sr")
    if any("ids" in r for r in results):
        columns += ["source", "study_instance_uid", "series_instance_uid", "input_sha256"]
    w = csv.DictWriter(buf, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in results:
        row = {k: r.get(k) for k in columns}
        row["quality_flags"] = ";".join(r.get("quality_flags") or [])
        row["series_number"] = (r.get("series") or {}).get("series_number", "")
        for c in classes:
            row[f"p_{c}"] = (r.get("probabilities") or {}).get(c, "")
            row[f"spread_{c}"] = (r.get("spread") or {}).get(c, "")
        row.update(r.get("ids") or {})
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def write_results(path: Path, loaded: LoadedRun, results: Sequence[Dict[str, Any]]) -> None:
    """``.json`` (model block + one object per study) or ``.csv`` (one row per study), atomically."""
    from pancls.io import atomic_write_json, atomic_write_text

    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            atomic_write_text(path, to_csv(results, loaded.classes))
        else:
            atomic_write_json(path, {"model": loaded.info(), "studies": list(results)})
    except OSError as exc:  # checked writable before any work; a full disk or a vanished folder since
        raise UserError(f"cannot write the results ({exception_text(exc, path)})", path) from None


def check_output_path(path: Optional[Path]) -> None:
    """Refuse before any work an --out that cannot be written (wrong suffix, a folder, a missing parent)."""
    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() not in (".json", ".csv"):
        raise UserError("the output must end in .json or .csv", "--out")
    if path.is_dir():
        raise UserError("is a folder; give a file name ending in .json or .csv", path)
    from pancls.io import check_writable_folder

    check_writable_folder(path.resolve().parent, "the output's folder")


def iter_results_summary(results: Sequence[Dict[str, Any]]) -> Iterator[str]:
    """Human-readable lines for the terminal (no identifiers)."""
    for r in results:
        name = f"input {r['input']}" + (f" study {r['study']}" if r["kind"] != "nifti" else "")
        if r["status"] != "ok":
            yield f"{name}: failed: {r['error']}"
            continue
        p = r["probabilities"][r["predicted"]]
        flags = f"  flags: {', '.join(r['quality_flags'])}" if r["quality_flags"] else ""
        yield f"{name}: {r['predicted']} p={p:.3f} folds {r['agreement']}/{r['n_folds']}{flags}"
