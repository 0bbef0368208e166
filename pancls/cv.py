"""Patient-grouped, stratified k-fold cross-validation of a 3D CT classifier: manifest -> folds -> the shared
engine -> out-of-fold predictions -> metrics with intervals, baselines and a report.

The run folder is the model (after nnU-Net v2 and MONAI bundles)::

    configs/config.yaml      the resolved config          configs/metadata.json   bundle-style I/O description
    classes.json             class order + counts         splits.json             outer folds + inner validation
    fold_k/                  last.pt, best.pt, metrics.jsonl, predictions.csv, fold.json (written last = done)
    oof_predictions.csv      pooled held-out predictions  summary.json            every number of the report
    report.md, report.html, figures/*.png, MODEL_CARD.md

Rules that keep the estimate honest:

* folds are split by patient (:mod:`pancls.data.splits`); a patient is in exactly one test fold;
* the epoch (``cv.select: best_inner``, on balanced accuracy) and the temperature are chosen on an inner
  validation split of the training patients; the held-out fold is predicted once, by the chosen weights;
* every headline number is reported next to the all-majority-class ("all-PDAC") and an intensity-statistics
  logistic-regression baseline on the same splits, with 95 % patient-level bootstrap intervals;
* the ROI policy is recorded: a ``mask`` model needs a mask at inference (``metadata.json``
  ``inference_requires_mask``); ``centre``/``box`` models do not.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence

import numpy as np
import torch

from pancls.config import absolute_paths, dump_yaml, from_dict, load_yaml, to_dict
from pancls.data.classes import DEFAULT_CLASSES, check_classes
from pancls.data.transforms import AugmentConfig, PreprocessConfig
from pancls.errors import UserError
from pancls.io import (
    LockHeld,
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    check_creatable,
    hold_lock,
    read_json,
    remove_stale_temps,
)
from pancls.lt import DEVICES
from pancls.schemas import LossConfig, ModelConfig
from pancls.train.checkpoint import check_same_config, flatten, refuse_unresumed
from pancls.train.engine import RESUMABLE_KEYS, TrainConfig
from pancls.validation import check_choice, check_scalar

#: The demo recipe that ``pancls cv`` runs without ``--config`` (shipped inside the package).
DEMO_CONFIG = Path(__file__).parent / "recipes" / "cv_demo_cpu.yaml"  # no --manifest: the synthetic demo, CPU
FULL_CONFIG = Path(__file__).parent / "recipes" / "cv_full.yaml"  # a --manifest without --config: full size
FOLD_DONE = "fold.json"
INNER_SELECTED_ON = "inner validation split of the training patients (never the held-out fold)"


@dataclass
class CVDataConfig:
    manifest: Optional[str] = None  # None: the synthetic demo cohort, generated into the cache on first use
    root: Optional[str] = None  # folder no image/mask may leave (default: the manifest's folder)
    #: folders where the real files behind symbolic links in the dataset may lie (a dataset of links into a store)
    allowed_roots: List[str] = field(default_factory=list)
    classes: List[str] = field(default_factory=lambda: list(DEFAULT_CLASSES))
    cache_dir: Optional[str] = None  # preprocessed volumes; default $PANCLS_CACHE or ~/.cache/pancls
    synth_scale: float = 1.0  # demo cohort only: 1 = the paper's 530 patients


@dataclass
class CVSplitConfig:
    folds: int = 4
    seed: int = 0
    inner_folds: int = 5  # 1/inner_folds of each fold's training patients is its inner validation split
    select: Literal["best_inner", "last"] = "best_inner"
    select_metric: Literal["balanced_accuracy", "macro_f1", "top1"] = "balanced_accuracy"
    temperature: bool = True  # fit a temperature on the inner validation split
    bootstrap: int = 1000  # patient-level bootstrap resamples for the pooled intervals

    def __post_init__(self):  # refused when the config is read, not after every fold has trained
        check_scalar(self.folds, "folds", int, min_val=2)
        check_scalar(self.inner_folds, "inner_folds", int, min_val=2)
        check_scalar(self.bootstrap, "bootstrap", int, min_val=10)  # an interval from fewer is not one


@dataclass
class CVConfig:
    data: CVDataConfig = field(default_factory=CVDataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    #: the tSP paper form with nu = 7 (pancls.heads.tsp_paper_nu7): issue 16's best tSP recipe on CIFAR-10-LT and
    #: on the synthetic cohort (balanced accuracy 0.65 / 0.61 against the kernel form's 0.44 / 0.39, with LA)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(backbone="resnet18", head="tsp_paper_nu7"))
    #: logit adjustment by default (issue 16): on the synthetic cohort it lifts every head's balanced accuracy
    #: (tSP 0.26 -> 0.44 / 0.39 over two seeds) and on CIFAR-10-LT tSP's top-1 by 16.5 points (three seeds)
    loss: LossConfig = field(default_factory=lambda: LossConfig(name="logit_adjust"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=60, batch_size=8, optimizer="adamw",
                                                                   lr=1e-3, weight_decay=1e-4, wd_on_all=False,
                                                                   warmup_epochs=2, schedule="cosine"))
    cv: CVSplitConfig = field(default_factory=CVSplitConfig)
    device: str = "auto"
    num_workers: int = 0
    eval_batch_size: int = 8
    note: str = ""

    def __post_init__(self):
        check_choice(self.device, "device", DEVICES)
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")


def run_config_path(out) -> Path:
    """``RUN/configs/config.yaml``: the resolved config a run was started with (what resume, the fold workers,
    the report and predict read)."""
    return Path(out) / "configs" / "config.yaml"


def load_config(mapping: Dict[str, Any]) -> CVConfig:
    return from_dict(CVConfig, mapping, "config")


def cache_root(cfg: CVConfig) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return Path(os.environ.get("PANCLS_CACHE") or Path.home() / ".cache" / "pancls")


# ----------------------------------------------------------------------------------------------- data
def demo_manifest(cfg: CVConfig, log: Callable[[str], None]) -> Path:
    """The synthetic cohort of ``pancls synth`` in the cache (written once; later runs reuse it)."""
    from pancls.data.synth import generate_dataset, load_synth_config

    out = cache_root(cfg) / f"synth-scale{cfg.data.synth_scale:g}"
    if not (out / "manifest.csv").exists():
        log(f"writing the synthetic demo cohort into {out} (once)")
    generate_dataset(out, load_synth_config(), scale=cfg.data.synth_scale, progress=False)
    return out / "manifest.csv"


def load_records(cfg: CVConfig, log: Callable[[str], None] = print):
    """``(manifest, records)``: the validated manifest (every problem at once) and its rows."""
    from pancls.data.manifest import load_manifest

    path = Path(cfg.data.manifest) if cfg.data.manifest else demo_manifest(cfg, log)
    manifest = load_manifest(path, check_classes(cfg.data.classes, "data.classes"), root=cfg.data.root,
                             allowed_roots=cfg.data.allowed_roots)
    records = manifest.records()
    if cfg.preprocess.roi == "mask":
        missing = sum("mask" not in r for r in records)
        if missing:
            raise UserError(f"preprocess.roi is 'mask' but {missing} of {len(records)} rows have no mask; add "
                            "masks or choose roi 'centre'/'box' (then predict needs no mask either)", path)
    return manifest, records


def resolve_model(cfg: CVConfig) -> ModelConfig:
    """The model config with the 3D defaults filled in: ``spatial_dims=3``, one input channel per window."""
    kwargs = dict(cfg.model.backbone_kwargs)
    if not cfg.model.backbone.endswith("_cifar"):
        kwargs.setdefault("spatial_dims", 3)
        kwargs.setdefault("in_channels", len(cfg.preprocess.windows))
    return dataclasses.replace(cfg.model, backbone_kwargs=kwargs)


def _loader(dataset, batch_size: int, num_workers: int, sampler=None, batch_sampler=None):
    """A MONAI DataLoader in ``sampler`` order (default: the data set's) or with ``batch_sampler``."""
    from monai.data import DataLoader

    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, persistent_workers=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers,
                      persistent_workers=False, drop_last=False)


# ---------------------------------------------------------------------------------------------- folds
#: train keys that may differ between a run and its resumption (the engine's resumable keys, less eval_every:
#: here it decides which epochs the inner selection sees; less epochs: folds finished at the old length would be
#: pooled with folds trained to the new one, and the report would give every fold the new length)
_RESUMABLE_TRAIN_KEYS = tuple(sorted(RESUMABLE_KEYS - {"eval_every", "epochs"}))


def run(cfg: CVConfig, out: Path, *, resume: bool = False, fold: Optional[int] = None,
        log: Callable[[str], None] = print, summary: bool = True) -> Dict[str, Any]:
    """Train every fold (or only ``fold``), then summarise when all folds are done; returns the summary
    (or the fold's record when other folds are still missing, or when ``summary`` is False: a fold-parallel
    worker or a Slurm array task, whose merge is left to the parent or to ``pancls report RUN``).

    Started by ``torchrun`` (several processes), each fold trains with DDP (:mod:`pancls.distributed`):
    ``train.batch_size`` is the global batch; rank 0 alone writes, and the run folder is the one a single
    process writes. Ranks other than 0 return ``{}``."""
    from pancls import distributed
    from pancls.lt import resolve_device

    out = Path(out)
    with distributed.session(resolve_device(cfg.device)) as (ctx, device), contextlib.ExitStack() as held:
        owns_run = ctx.is_main and fold is None  # a --fold k process holds its fold's lock only
        distributed.per_rank_batch(cfg.train.batch_size, ctx.world_size)
        log = distributed.main_log(log, ctx)
        if owns_run:
            lock_run(held, out, made=False)
        records, classes, splits = prepare(cfg, out, resume=resume, fold=fold, log=log, ctx=ctx)
        if owns_run:
            lock_run(held, out, made=True)
        p = cfg.preprocess
        log(f"cohort: {len(records)} studies of {len(splits['test_fold'])} patients, {cfg.cv.folds} folds; "
            f"{cfg.model.backbone} + {cfg.model.head}, loss {cfg.loss.name}, {cfg.train.epochs} epochs; ROI "
            f"{p.roi} {'x'.join(map(str, p.size))} at {'x'.join(f'{v:g}' for v in p.spacing)} mm; device {device}"
            + (f" ({cfg.note})" if cfg.note else ""))
        todo = [fold] if fold is not None else list(range(cfg.cv.folds))
        done = ctx.broadcast({k: (out / f"fold_{k}" / FOLD_DONE).exists() for k in todo})
        progress = _Progress(cfg.train.epochs, [k for k in todo if not done[k]], log)
        for k in todo:
            if ctx.broadcast((out / f"fold_{k}" / FOLD_DONE).exists()):  # rank 0's view: the fold was finished
                log(f"fold {k}: finished earlier, kept")
                continue
            train_fold(cfg, out, records, splits, k, classes, device, progress, ctx)
        if not ctx.is_main:
            return {}
        missing = [k for k in range(cfg.cv.folds) if not (out / f"fold_{k}" / FOLD_DONE).exists()]
        if fold is not None and not summary:
            return read_json(out / f"fold_{fold}" / FOLD_DONE, "fold record")
        if missing:
            log(f"folds {missing} are not trained yet; run them (--fold k) and then `pancls report {out}`")
            return read_json(out / f"fold_{fold}" / FOLD_DONE, "fold record")
        try:
            return summarise(out, cfg=cfg, records=records, log=log)
        except LockHeld:
            if fold is None:
                raise
            log(f"fold {fold}: done; another process is writing the run's summary (`pancls report {out}` "
                "rewrites it)")
            return read_json(out / f"fold_{fold}" / FOLD_DONE, "fold record")


def lock_run(held: contextlib.ExitStack, out: Path, made: bool) -> None:
    """Hold the whole run's lock in ``held``: before :func:`prepare` (``made=False``) only for an existing run,
    which prepare then cleans; after it (``made=True``) for a new one, so that a refusal leaves nothing, not
    even a lock file, in a folder that is no run yet. Re-entrant: calling both is the rule."""
    if run_config_path(out).exists() if not made else out.is_dir():
        held.enter_context(hold_lock(out, "this cv run"))


def prepare(cfg: CVConfig, out: Path, *, resume: bool, fold: Optional[int] = None,
            log: Callable[[str], None] = print, ctx=None):
    """Everything before the folds train: refusals (another run in ``out`` without ``resume``, a changed config),
    the manifest check, ``splits.json``, ``configs/`` and ``classes.json``; returns ``(records, classes, splits)``.

    Under DDP (``ctx``) rank 0 decides and writes; the others read the manifest after it and get its splits."""
    from pancls.data.splits import check_fold, load_or_make_splits
    from pancls.distributed import Context

    ctx = ctx or Context()
    out = Path(out)
    if ctx.is_main:
        check_creatable(out, "run folder")
    check_fold(fold, cfg.cv.folds)
    config_path = run_config_path(out)
    exists = ctx.broadcast(config_path.exists())
    refuse_unresumed(exists, out, resume, what="cv run", kept=" (finished folds are kept)")
    if exists:
        stored = absolute_paths(to_dict(load_config(load_yaml(config_path))))  # a run written before paths were
        mine = absolute_paths(to_dict(cfg))  # made absolute, and a library caller's relative ones: one spelling
        for key in _RESUMABLE_TRAIN_KEYS:
            stored["train"].pop(key), mine["train"].pop(key)
        check_same_config(flatten(stored), flatten(mine), out)  # names each key that differs
    if not ctx.is_main:
        ctx.barrier()  # rank 0 writes the demo cohort, when there is one to write, before the others read it
        _, records = load_records(cfg, log)
        return records, ctx.broadcast(None), ctx.broadcast(None)
    manifest, records = load_records(cfg, log)
    ctx.barrier()
    classes = list(manifest.classes)
    _check_model_and_loss(cfg, list(manifest.class_counts().values()))  # before the run folder is written
    if fold is None:  # nobody else writes here now (a --fold k process may run beside other folds' processes)
        _remove_stale_run_temps(out)
    # creates the folder once the splits exist: a refusal (too few patients for the folds) writes nothing
    # a backbone that saw a test fold's patients (model.init_backbone_from) is refused before anything is written
    splits = load_or_make_splits(out, records, classes, cfg.cv.folds, cfg.cv.seed, cfg.cv.inner_folds, manifest.root,
                                 check=lambda splits: backbone_sources(cfg, splits))
    if fold is None or not exists:  # a --fold k worker of an existing run leaves the run's own files alone: it
        # does not hold the run's lock, and the process writing the summary may be sweeping temporary files there
        dump_yaml(cfg, config_path)
        atomic_write_json(out / "classes.json", {"classes": classes, "patients_per_class": manifest.patient_counts(),
                                                 "studies_per_class": manifest.class_counts()})
        write_metadata(out, cfg, classes, records)
    ctx.broadcast(classes), ctx.broadcast(splits)
    return records, classes, splits


def backbone_sources(cfg: CVConfig, splits: Dict[str, Any]) -> Dict[int, str]:
    """Per fold ``k``, the checkpoint that ``model.init_backbone_from`` starts its backbone from (``{}`` without
    one), refused when that backbone trained on (or was selected with) a patient of this run's test fold ``k``.

    * a ``pancls cv`` run folder (it holds ``splits.json``): fold ``k`` starts from that run's ``fold_k`` (stage 2
      of a decoupled recipe run per fold); it must be a run of the same manifest (fingerprint), whose splits hold
      every patient of this run's test fold ``k`` in its own test fold ``k`` (the same ``cv.folds`` and
      ``cv.seed`` do);
    * one fold of a cv run (``RUN/fold_j`` or a checkpoint in it): every fold would start from the one backbone,
      which trained on the other folds' test patients: refused unless none of them is in that run;
    * anything else (an ``lt`` run, weights trained on another data set) cannot be checked and is used as given
      for every fold: its training data must not include this cohort's patients."""
    source = cfg.model.init_backbone_from
    if not source:
        return {}
    from pancls.data.splits import SPLITS, read_splits

    path = Path(source)
    folder = path if path.is_dir() else path.parent
    if (folder / SPLITS).exists():
        run_dir, their_fold = folder, None
    elif folder.name.startswith("fold_") and folder.name[5:].isdigit() and (folder.parent / SPLITS).exists():
        run_dir, their_fold = folder.parent, int(folder.name[5:])
    else:
        return {k: source for k in range(cfg.cv.folds)}
    their_splits = read_splits(run_dir / SPLITS)
    if their_splits.get("manifest_sha256") != splits["manifest_sha256"]:  # their patients cannot be matched
        raise UserError(f"model.init_backbone_from: {run_dir} is a cv run of another manifest, so its folds' "
                        "patients cannot be matched to this run's (a re-ingested cohort has other pseudonyms); "
                        "start from a cv run of this manifest, or from a checkpoint outside any cv run folder "
                        "trained on other patients", source)
    theirs = their_splits["test_fold"]
    sources = {}
    for k in range(cfg.cv.folds):
        j = k if their_fold is None else their_fold
        seen = sum(1 for p, f in splits["test_fold"].items() if f == k and p in theirs and theirs[p] != j)
        if seen:
            how = ("its splits differ from this run's (same manifest, cv.folds and cv.seed needed)"
                   if their_fold is None else "one fold's backbone would start every fold; give the cv run "
                   "folder itself, so that fold k starts from its fold_k")
            raise UserError(f"model.init_backbone_from: the backbone for fold {k} ({run_dir / f'fold_{j}'}) "
                            f"trained on {seen} of this run's fold-{k} test patients: {how}", source)
        sources[k] = str(run_dir / f"fold_{j}") if their_fold is None else source
    return sources


def _check_model_and_loss(cfg: CVConfig, class_counts: Sequence[int]) -> None:
    """Build the model and the loss once, so that an option a head or a loss does not take (a recipe's tSP
    options under ``--head softmax``) is refused before anything is written, not when fold 0 starts."""
    from pancls.schemas import build_model_and_loss

    build_model_and_loss(resolve_model(cfg), cfg.loss, [max(int(n), 1) for n in class_counts], init_weights=False)


class _Progress:
    """One line per epoch with the run's ETA across every fold still to train."""

    def __init__(self, epochs: int, folds: List[int], log: Callable[[str], None]):
        self.total = epochs * len(folds)
        self.done, self.seconds, self.log = 0, 0.0, log

    def line(self, fold: int, folds: int) -> Callable[[str], None]:
        started = [time.perf_counter()]

        def emit(message: str) -> None:
            if message.startswith("epoch "):
                now = time.perf_counter()
                self.done += 1
                self.seconds += now - started[0]
                started[0] = now
                eta = self.seconds / self.done * max(self.total - self.done, 0)
                message = f"{message}  run ETA {_hms(eta)}"
            self.log(f"fold {fold + 1}/{folds}  {message}")
        return emit


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def train_fold(cfg: CVConfig, out: Path, records, splits, k: int, classes: Sequence[str], device, progress,
               ctx=None) -> Optional[Dict]:
    """Train fold ``k`` with the shared engine, select on the inner validation split, predict the test fold.

    Training batches come from one epoch-seeded order (:func:`~pancls.train.samplers.make_batch_sampler`), so a
    DDP run (``ctx``) splits exactly the batches one process trains on; selection, temperature and the test
    predictions run on rank 0 alone (the others return None)."""
    from pancls.distributed import Context

    ctx = ctx or Context()
    fold_dir = out / f"fold_{k}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    with hold_lock(fold_dir, f"fold {k} of this cv run") if ctx.is_main else contextlib.nullcontext():
        return _train_fold(cfg, out, records, splits, k, classes, device, progress, ctx, fold_dir)


def _train_fold(cfg: CVConfig, out: Path, records, splits, k: int, classes: Sequence[str], device, progress,
                ctx, fold_dir: Path) -> Optional[Dict]:
    from pancls.data.splits import fold_records
    from pancls.data.transforms import make_dataset
    from pancls.distributed import rank_seed
    from pancls.eval.clinical import fit_temperature
    from pancls.eval.crowding import mean_angle_to_other_centres
    from pancls.schemas import build_model_and_loss
    from pancls.train.checkpoint import load_checkpoint
    from pancls.train.engine import BEST, CHECKPOINT, fit, predict_logits
    from pancls.train.samplers import ShardSampler, make_batch_sampler

    if ctx.is_main:
        remove_stale_temps(fold_dir)  # a killed run's half-written checkpoint (only this fold's process writes here)
    parts = fold_records(records, splits, k)  # every class has training patients (make_splits refuses otherwise)
    counts = np.bincount([r["label"] for r in parts["train"]], minlength=len(classes))
    cache = cache_root(cfg) / "preprocessed"
    seed = cfg.train.seed + 1000 * k
    # each rank draws its own augmentations (rank 0 those of a single process)
    train_ds = make_dataset(parts["train"], cfg.preprocess, cache, train=True, aug_cfg=cfg.augment,
                            seed=rank_seed(seed, ctx.rank))
    val_ds = make_dataset(parts["val"], cfg.preprocess, cache, train=False)
    test_ds = make_dataset(parts["test"], cfg.preprocess, cache, train=False)
    batches = make_batch_sampler([r["label"] for r in parts["train"]], cfg.train.sampler, cfg.train.batch_size,
                                 seed=seed, start_epoch=cfg.train.sampler_start_epoch, rank=ctx.rank,
                                 world_size=ctx.world_size)
    train_loader = _loader(train_ds, cfg.train.batch_size, cfg.num_workers, batch_sampler=batches)
    val_shard = _loader(val_ds, cfg.eval_batch_size, cfg.num_workers,
                        sampler=ShardSampler(len(val_ds), ctx.rank, ctx.world_size))
    val_loader = _loader(val_ds, cfg.eval_batch_size, cfg.num_workers)
    test_loader = _loader(test_ds, cfg.eval_batch_size, cfg.num_workers)

    torch.manual_seed(seed)  # initialisation depends on the seed and the fold only
    model_cfg = dataclasses.replace(resolve_model(cfg), init_backbone_from=backbone_sources(cfg, splits).get(k))
    model, loss_fn = build_model_and_loss(model_cfg, cfg.loss, counts.tolist(),
                                          init_weights=not (fold_dir / "last.pt").exists())  # a resume has its own
    train_cfg = dataclasses.replace(cfg.train, seed=seed)

    def evaluate(y_true, logits):
        from sklearn.metrics import balanced_accuracy_score, f1_score

        pred = logits.argmax(1)
        return {"balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
                "macro_f1": float(f1_score(y_true, pred, average="macro", labels=range(len(classes)),
                                           zero_division=0))}

    select_metric = f"eval_{cfg.cv.select_metric}"
    run_config = {"fold": k, "model": to_dict(resolve_model(cfg)), "loss": to_dict(cfg.loss),
                  "preprocess": to_dict(cfg.preprocess), "augment": to_dict(cfg.augment),
                  "splits": splits["manifest_sha256"]}
    started = time.time()
    try:
        result = fit(model, train_loader, val_shard, loss_fn, train_cfg, fold_dir, device=device, evaluate=evaluate,
                     resume=True, log=progress.line(k, cfg.cv.folds), run_config=run_config,
                     select_metric=select_metric, selected_on=INNER_SELECTED_ON, save_best=True)
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"fold {k}: out of GPU memory; lower train.batch_size ({cfg.train.batch_size}) or "
                        f"preprocess.size ({cfg.preprocess.size})", "train.batch_size") from None
    except UserError as exc:
        raise UserError(f"fold {k}: {exc.reason} (the last good checkpoint is kept in {fold_dir})", exc.where) from None
    if not ctx.is_main:
        return None

    if cfg.cv.select == "best_inner":
        if not (fold_dir / BEST).exists():  # never silently the last epoch instead of the selected one
            raise UserError(f"fold {k}: no {BEST} holds the epoch the inner validation split selected (a run "
                            f"stopped by an older pancls between its two checkpoints); delete {fold_dir} and "
                            "rerun with --resume to train the fold again", fold_dir)
        chosen = load_checkpoint(fold_dir / BEST)
        model.load_state_dict(chosen["model"])
        selected_epoch, checkpoint = int(chosen["epoch"]), BEST
    else:
        selected_epoch, checkpoint = cfg.train.epochs, CHECKPOINT
    val = predict_logits(model, val_loader, device, cfg.train.amp)
    test = predict_logits(model, test_loader, device, cfg.train.amp, features=True)
    for name, part in (("inner validation", val), ("test", test)):  # a diverged network: not a prediction
        bad = int((~np.isfinite(part["logits"])).any(axis=1).sum())
        if bad:
            raise UserError(f"fold {k}: the model's outputs are not finite numbers for {bad} of "
                            f"{len(part['logits'])} {name} studies (training diverged); start a new run with a lower "
                            "train.lr, or without mixed precision (train.amp: off)", fold_dir)
    val_y = np.array([r["label"] for r in parts["val"]])
    temperature = fit_temperature(val["logits"], val_y) if cfg.cv.temperature else 1.0
    write_predictions(fold_dir / "predictions.csv", parts["test"], test["logits"], temperature, classes, k)
    atomic_save(fold_dir / "test_features.npy", lambda tmp: np.save(tmp, test["features"].astype(np.float32)))
    record = {
        "fold": k, "train_patients": len({r["patient_id"] for r in parts["train"]}),
        "val_patients": len({r["patient_id"] for r in parts["val"]}),
        "test_patients": len({r["patient_id"] for r in parts["test"]}),
        "train_counts": {c: int(n) for c, n in zip(classes, counts, strict=True)},
        "selection": cfg.cv.select, "selected_epoch": selected_epoch, "selected_on": INNER_SELECTED_ON,
        "select_metric": cfg.cv.select_metric, "checkpoint": checkpoint, "temperature": float(temperature),
        "inner_best": result.best_epoch_metrics, "last": result.last_metrics,
        "centre_mean_angle_deg": [float(a) for a in mean_angle_to_other_centres(model.head.centres().cpu())],
        "seconds_this_session": round(time.time() - started, 1),
    }
    atomic_write_json(fold_dir / FOLD_DONE, record)  # last: its presence marks the fold as finished
    return record


def write_predictions(path: Path, rows, logits: np.ndarray, temperature: float, classes: Sequence[str], fold: int):
    """``patient_id, label, fold, pred, p_<class>... (after temperature), logit_<class>...`` per test row."""
    from pancls.eval.clinical import softmax

    probs = softmax(logits, temperature)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["patient_id", "label", "fold", "pred", *[f"p_{c}" for c in classes], *[f"logit_{c}" for c in classes]])
    for r, p, z in zip(rows, probs, logits, strict=True):
        w.writerow([r["patient_id"], classes[r["label"]], fold, classes[int(p.argmax())],
                    *[f"{v:.6f}" for v in p], *[f"{v:.6f}" for v in z]])
    atomic_write_text(path, buf.getvalue())


def read_predictions(path: Path, classes: Sequence[str]):
    import pandas as pd

    table = pd.read_csv(path, dtype={"patient_id": str})
    index = {c: i for i, c in enumerate(classes)}
    return table, table["label"].map(index).to_numpy(), table[[f"p_{c}" for c in classes]].to_numpy(), \
        table[[f"logit_{c}" for c in classes]].to_numpy()


# ------------------------------------------------------------------------------------------ summary
def intensity_features(cfg: CVConfig, records) -> np.ndarray:
    """Per-row ROI intensity statistics from the cached preprocessed volumes (the intensity baseline's input)."""
    from pancls.data.transforms import make_dataset
    from pancls.eval.clinical import roi_intensity_features

    ds = make_dataset(records, cfg.preprocess, cache_root(cfg) / "preprocessed", train=False)
    rows = []
    for i in range(len(ds)):
        item = ds[i]
        image = np.asarray(item["image"])[0]
        mask = np.asarray(item["mask"])[0] if "mask" in item else None
        rows.append(roi_intensity_features(image, mask))
    return np.stack(rows)


def summarise(out: Path, cfg: Optional[CVConfig] = None, records=None, log: Callable[[str], None] = print) -> Dict:
    """Pool the folds' predictions and write ``oof_predictions.csv``, ``summary.json``, the figures, the report
    and the model card. Re-runnable on a finished run folder (``pancls report RUN``); holds the run's lock
    (another process writing the run is refused) and first removes what a killed summary left half-written."""
    out = Path(out)
    if not run_config_path(out).exists():  # before the lock file: not written into a folder that is no run
        raise UserError("not a pancls cv run folder (no configs/config.yaml)", out)
    with hold_lock(out, "this cv run"):
        _remove_stale_run_temps(out)
        return _summarise(out, cfg, records, log)


def _remove_stale_run_temps(out: Path) -> None:
    """What a killed process left half-written in the run's own folders (each fold cleans its own when it
    trains); only while this process holds the run (its lock, or a new folder)."""
    for folder in (out, out / "configs", out / "figures"):
        remove_stale_temps(folder)


def _summarise(out: Path, cfg: Optional[CVConfig], records, log: Callable[[str], None]) -> Dict:
    import pandas as pd

    from pancls.data.splits import read_splits
    from pancls.eval import clinical
    from pancls.report import figures
    from pancls.report.html import write_report

    if cfg is None:
        cfg = load_config(load_yaml(run_config_path(out)))
    splits = read_splits(out / "splits.json")
    classes = splits["classes"]
    K = len(classes)
    missing = [k for k in range(cfg.cv.folds) if not (out / f"fold_{k}" / FOLD_DONE).exists()]
    if missing:
        raise UserError(f"folds {missing} are not finished; train them with `pancls cv --resume --fold k`", out)
    tables, per_fold, fold_records_, calibrated = [], [], [], []
    for k in range(cfg.cv.folds):
        table, y, _, z = read_predictions(out / f"fold_{k}" / "predictions.csv", classes)
        record = read_json(out / f"fold_{k}" / FOLD_DONE, "fold record", dict)
        # from the logits and the fold's temperature: the CSV's p_ columns are rounded to 6 decimals, and rows
        # tied at 0.000000 would change top-2
        p = clinical.softmax(z, record.get("temperature", 1.0))
        tables.append(table)
        calibrated.append(p)
        per_fold.append({"fold": k, "metrics": clinical.clinical_metrics(y, p, classes)})
        fold_records_.append(record)
    oof = pd.concat(tables, ignore_index=True)
    atomic_write_text(out / "oof_predictions.csv", oof.to_csv(index=False, lineterminator="\n"))
    index = {c: i for i, c in enumerate(classes)}
    y = oof["label"].map(index).to_numpy()
    probs = np.concatenate(calibrated)
    logits = oof[[f"logit_{c}" for c in classes]].to_numpy()
    groups = oof["patient_id"].astype(str).to_numpy()
    raw = clinical.softmax(logits, 1.0)
    headline = ("balanced_accuracy", "macro_f1", "top1", "top2", "mcc")
    # patient-level, paired (one seed for the model and the baselines), per class too (sensitivity, specificity)
    boot = dict(n_boot=cfg.cv.bootstrap, seed=cfg.cv.seed, metrics=(*headline, "brier", "ece"), per_class=True)

    # Baselines on the same splits: majority class of each fold's training patients; intensity statistics.
    if records is None:  # read again (pancls report): the manifest must still be the one the run was split from
        from pancls.data.splits import manifest_fingerprint

        manifest, records = load_records(cfg, log)
        if manifest_fingerprint(records, manifest.root) != splits.get("manifest_sha256"):
            raise UserError("the manifest changed since this run was split (its rows differ from splits.json's "
                            "fingerprint); restore the manifest the run was made with", cfg.data.manifest or out)
    feats = intensity_features(cfg, records)
    labels_all = np.array([r["label"] for r in records])
    base_major, base_intensity = np.zeros((len(oof), K)), np.zeros((len(oof), K))
    for k in range(cfg.cv.folds):
        # predictions.csv lists a fold's test rows in manifest order, as fold_records returns them
        test_rows = [i for i, r in enumerate(records) if splits["test_fold"][r["patient_id"]] == k]
        train_rows = [i for i, r in enumerate(records) if splits["test_fold"][r["patient_id"]] != k]
        dest = np.flatnonzero(oof["fold"].to_numpy() == k)
        assert len(dest) == len(test_rows), "predictions.csv does not match the splits"
        # one label per patient: the majority of the training patients, not of their studies
        train_patients = {records[i]["patient_id"]: records[i]["label"] for i in train_rows}
        base_major[dest] = clinical.majority_baseline(list(train_patients.values()), labels_all[test_rows], K)
        base_intensity[dest] = clinical.intensity_baseline(feats[train_rows], labels_all[train_rows],
                                                           feats[test_rows], K, seed=cfg.cv.seed)

    counts = read_json(out / "classes.json", "run's class list", dict)["patients_per_class"]
    summary = {
        "classes": classes, "class_counts": counts, "folds": cfg.cv.folds,
        "model": {"backbone": cfg.model.backbone, "head": cfg.model.head, "loss": cfg.loss.name,
                  "head_kwargs": cfg.model.head_kwargs, "loss_kwargs": cfg.loss.kwargs,
                  "epochs": cfg.train.epochs},
        "selection": f"{cfg.cv.select} on {cfg.cv.select_metric} of the {INNER_SELECTED_ON}; "
                     f"temperature {'fitted on the same split' if cfg.cv.temperature else 'off'}",
        "roi": cfg.preprocess.roi,
        # temperature scaling leaves every row's ranking of the classes (argmax, top-k) unchanged, hence every
        # metric of the headline; calibration (Brier, ECE) and the pooled one-vs-rest AUC, which ranks rows of
        # folds with different temperatures against each other, differ
        "pooled": clinical.clinical_metrics(y, raw, classes),
        "pooled_calibrated": clinical.clinical_metrics(y, probs, classes),
        "intervals": clinical.bootstrap_intervals(y, raw, groups, classes, **boot),
        # per class only once: sensitivity and specificity depend on the argmax alone, which T does not move
        "intervals_calibrated": clinical.bootstrap_intervals(y, probs, groups, classes, **{**boot, "per_class": False}),
        "per_fold": per_fold,
        "across_folds": clinical.mean_sd_across_folds([f["metrics"] for f in per_fold], headline),
        "folds_detail": fold_records_,
        "baselines": {
            "majority": {"pooled": clinical.clinical_metrics(y, base_major, classes),
                         "intervals": clinical.bootstrap_intervals(y, base_major, groups, classes, **boot)},
            "intensity": {"pooled": clinical.clinical_metrics(y, base_intensity, classes),
                          "intervals": clinical.bootstrap_intervals(y, base_intensity, groups, classes, **boot)},
        },
        "collapsed_folds": [f["fold"] for f in per_fold if f["metrics"]["collapsed"]],
        "machine": _machine(),
        "pancls": _version(),
    }
    summary["figures"] = _figures(out, summary, y, probs, raw, oof, classes, counts, fold_records_, figures)
    atomic_write_json(out / "summary.json", summary)
    write_report(out, summary, {k: out / v for k, v in summary["figures"].items()})
    atomic_write_text(out / "MODEL_CARD.md", model_card(cfg, summary))
    return summary


def _figures(out, summary, y, probs, raw, oof, classes, counts, folds, figures) -> Dict[str, str]:
    from pancls.eval.crowding import plot_crowding

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    pooled, recall = summary["pooled"], summary["intervals"]["per_class"]
    made = {
        "confusion": figures.confusion_matrix_png(pooled["confusion"], classes, fig_dir / "confusion.png"),
        "recall_vs_size": figures.recall_vs_size_png(
            {c: recall[c]["sensitivity"]["estimate"] for c in classes}, counts, fig_dir / "recall_vs_size.png",
            intervals={c: (recall[c]["sensitivity"]["lo"], recall[c]["sensitivity"]["hi"]) for c in classes},
            interval_name="patient bootstrap 95 % CI", size_name="patients"),
        # the output predict gives (after each fold's temperature), as the report's per-class AUC
        "roc": figures.roc_png(y, probs, classes, fig_dir / "roc.png"),
        "reliability": figures.reliability_png(y, raw, fig_dir / "reliability.png", probs_after=probs),
    }
    angles = np.mean([f["centre_mean_angle_deg"] for f in folds], axis=0)
    plot_crowding(angles, [counts[c] for c in classes], classes, fig_dir / "crowding.png",
                  "class-centre crowding, mean over folds (higher = less crowded)")
    made["crowding"] = fig_dir / "crowding.png"
    # one panel per fold: each fold's network has its own feature space, and one t-SNE of the four together
    # would place folds, not classes, apart
    fold_of = oof["fold"].to_numpy()
    panels = {f"fold {k}": (np.load(out / f"fold_{k}" / "test_features.npy"), y[fold_of == k])
              for k in range(len(folds))}
    if min(len(v[1]) for v in panels.values()) >= 10:
        made["embedding"] = figures.embeddings_side_by_side_png(panels, classes, fig_dir / "embedding.png")
    return {k: str(Path(v).relative_to(out)) for k, v in made.items()}


def training_spacing(records) -> Dict[str, List[float]]:
    """Smallest and largest voxel size (mm) along R, A, S over the training images (from their headers):
    ``predict`` flags a study outside this range."""
    import nibabel as nib

    from pancls.data.transforms import ras_spacing

    spacings = np.array([ras_spacing(nib.load(r["image"]).affine) for r in records])
    return {"min": [round(float(v), 4) for v in spacings.min(axis=0)],
            "max": [round(float(v), 4) for v in spacings.max(axis=0)]}


def write_metadata(out: Path, cfg: CVConfig, classes: Sequence[str], records=None) -> None:
    """``configs/metadata.json`` in the MONAI bundle layout, plus the preprocessing ``predict`` must repeat
    and the training images' spacing range (when ``records`` are given)."""
    import monai

    p = cfg.preprocess
    atomic_write_json(out / "configs" / "metadata.json", {
        "version": "0.1.0",
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__,
        "pancls_version": _version(),
        "name": "pancls pancreatic lesion subtype classifier",
        "task": f"{len(classes)}-class pancreatic lesion subtype classification from abdominal CT",
        "description": "Research use only; not a medical device. Trained by `pancls cv`.",
        "references": ["T-distributed Spherical Feature Representation for Imbalanced Classification, AAAI 2023"],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": len(p.windows),
                "spatial_shape": list(p.size), "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {str(i): f"window W{w:g}/L{lvl:g} HU -> [0, 1]" for i, (w, lvl) in enumerate(p.windows)},
            }},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": len(classes),
                                 "spatial_shape": [len(classes)], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {str(i): c for i, c in enumerate(classes)}}},
        },
        "pancls": {"spacing_mm": p.spacing, "windows_hu": p.windows, "size": p.size, "roi": p.roi,
                   "margin_mm": p.margin_mm, "inference_requires_mask": p.roi == "mask",
                   "roi_policy": ROI_POLICY[p.roi], "classes": list(classes),
                   **({"training_spacing_mm": training_spacing(records)} if records else {})},
    })


ROI_POLICY = {
    "mask": "crop around the lesion mask (+ margin): every study given to predict needs its mask",
    "box": "a fixed box of the resampled RAS grid: predict needs no mask; the lesion must lie in the box",
    "centre": "the centre of the resampled volume: predict needs no mask; use when no segmentation exists",
}


def _interval(b: Optional[Dict[str, Any]]) -> str:
    """``0.612 [0.550, 0.670]`` of a :func:`~pancls.eval.clinical.bootstrap_intervals` entry (n/a where undefined)."""
    def num(x):
        return "n/a" if x is None else f"{x:.3f}"

    b = b or {}
    return f"{num(b.get('estimate'))} [{num(b.get('lo'))}, {num(b.get('hi'))}]"


def _ci(block: Dict[str, Any], metric: str) -> str:
    """:func:`_interval` of ``metric`` in a :func:`~pancls.eval.clinical.bootstrap_intervals` result."""
    return _interval(block.get(metric))


def _recall_rows(s: Dict[str, Any]):
    """Per class: ``(name, patients, model, all-majority, intensity)`` recall with patient-bootstrap intervals
    (runs summarised before per-class intervals existed: the point estimates alone)."""
    def recall(intervals, pooled, c):
        if "per_class" in intervals:
            return _interval(intervals["per_class"][c]["sensitivity"])
        value = pooled["per_class"][c]["sensitivity"]
        return "n/a" if value is None else f"{value:.3f}"

    base = s["baselines"]
    return [(c, s["class_counts"][c], recall(s["intervals"], s["pooled"], c),
             *(recall(base[b]["intervals"], base[b]["pooled"], c) for b in ("majority", "intensity")))
            for c in s["classes"]]


def model_card(cfg: CVConfig, s: Dict[str, Any]) -> str:
    iv, pooled, base = s["intervals"], s["pooled"], s["baselines"]

    rows = "\n".join(f"| {c} | {n} | {m} | {a} | {i} |" for c, n, m, a, i in _recall_rows(s))
    return f"""# Model card — pancls cv run

**Intended use**: research on pancreatic lesion subtype classification from abdominal CT. **Not a medical
device**; not for diagnosis or treatment decisions.

## Model
{cfg.model.backbone} (3D, MONAI) + `{cfg.model.head}` head, loss `{cfg.loss.name}`, {cfg.train.epochs} epochs,
{cfg.cv.folds}-fold patient-grouped stratified cross-validation. Selection: {s['selection']}.

## Data and per-class recall (out of fold, 95 % patient-level bootstrap intervals)
| class | patients | model | all-majority baseline | intensity baseline |
|---|---|---|---|---|
{rows}

Preprocessing: spacing {cfg.preprocess.spacing} mm, windows {cfg.preprocess.windows} (W/L, HU), ROI `{cfg.preprocess.roi}`
({ROI_POLICY[cfg.preprocess.roi]}), input {cfg.preprocess.size} voxels.

## Out-of-fold results (95 % patient-level bootstrap intervals)
| | model | all-majority baseline | intensity baseline |
|---|---|---|---|
| balanced accuracy | {_ci(iv, 'balanced_accuracy')} | {_ci(base['majority']['intervals'], 'balanced_accuracy')} | {_ci(base['intensity']['intervals'], 'balanced_accuracy')} |
| macro-F1 | {_ci(iv, 'macro_f1')} | {_ci(base['majority']['intervals'], 'macro_f1')} | {_ci(base['intensity']['intervals'], 'macro_f1')} |
| top-1 | {_ci(iv, 'top1')} | {_ci(base['majority']['intervals'], 'top1')} | {_ci(base['intensity']['intervals'], 'top1')} |

Collapsed folds (one class predicted for >= 90 % of a fold): {s['collapsed_folds'] or 'none'}.
ECE {s['pooled_calibrated']['ece']:.3f} after temperature scaling ({pooled['ece']:.3f} before).

## Reporting checklist (CLAIM 2024 / TRIPOD+AI items this run answers)
- Data partitions at the patient level, no overlap (`splits.json`); model selection on an inner split only.
- Reference standard: the manifest's `label` column (as supplied by the data owner).
- Performance with confidence intervals, per class, against baselines; calibration (ECE, reliability diagram).
- Not answered by the run: external validation, clinical utility, subgroup/fairness analyses, sample-size rationale.

Machine: {s['machine']}. pancls {s['pancls']}.
"""


def _version() -> str:
    from pancls import __version__

    return __version__


def _machine() -> str:
    from pancls.machine import describe

    return describe("cuda:0" if torch.cuda.is_available() else "cpu")


def headline(s: Dict[str, Any], out: Path) -> str:
    """The few lines ``pancls cv`` prints at the end: headline metrics with intervals beside the baselines."""
    base = s["baselines"]
    lines = [f"pancls cv: {s['folds']} folds, {sum(s['class_counts'].values())} patients, "
             f"{s['model']['backbone']} + {s['model']['head']} head, loss {s['model']['loss']}, "
             f"{s['model']['epochs']} epochs  ({out})",
             f"{'out-of-fold, 95% CI':<20}{'model':<24}{'all-majority':<24}{'intensity LR':<24}"]
    for m, name in (("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"), ("top1", "top-1"),
                    ("top2", "top-2")):
        lines.append(f"{name:<20}{_ci(s['intervals'], m):<24}{_ci(base['majority']['intervals'], m):<24}"
                     f"{_ci(base['intensity']['intervals'], m):<24}")
    lines.append(f"{'recall, 95% CI':<20}{'model':<24}{'all-majority':<24}{'intensity LR':<24}patients")
    for c, n, model, major, intensity in _recall_rows(s):
        lines.append(f"{c:<20}{model:<24}{major:<24}{intensity:<24}{n}")
    lines.append(f"ECE {s['pooled_calibrated']['ece']:.3f} (before temperature {s['pooled']['ece']:.3f}); "
                 f"collapsed folds: {s['collapsed_folds'] or 'none'}; report: {Path(out) / 'report.html'}")
    return "\n".join(lines)
