"""The one training loop, shared by the 2D long-tailed benchmarks and the 3D CT pipeline.

:func:`fit` knows nothing of CIFAR or CT. It takes a model, a loss, iterables of batches and a run
folder, and writes there:

* ``last.pt`` -- model, optimiser, AMP scaler, epoch, global step, history, best epoch, the last
  evaluation's logits and labels, every RNG state and the config fingerprint; rewritten atomically
  after every epoch, so that a killed run resumes (``resume=True``) bit-identically on the same hardware;
* ``metrics.jsonl`` -- one JSON line per finished epoch, appended only after that epoch's checkpoint is
  on disk, and rewritten from the checkpoint on resume (lines of epochs the checkpoint does not hold
  are dropped);
* ``tensorboard/`` (loss, lr, metrics per epoch) unless ``tensorboard: false`` or the package is missing;
  with ``mlflow: true`` the same metrics also go to MLflow (:mod:`pancls.train.tracking`).

Batch contract: an iterable of either ``(image, label, ...)`` tuples/lists (``TensorBatchLoader``,
``TensorDataset``) or mappings with ``"image"`` and ``"label"`` keys (MONAI dictionary transforms).
Images are ``(N, C, *spatial)``; labels are class indices of shape ``(N,)`` or ``(N, 1)``. Tensor
subclasses such as MONAI's ``MetaTensor`` are stripped to plain tensors before the model sees them.
Before every epoch the engine calls ``set_epoch(epoch)`` on each loader and on its sampler where they
have one, and on the loss where it has one (deferred re-weighting).

Bit-exact resume needs every random draw to be either seeded per epoch (``TensorBatchLoader``,
:class:`~pancls.train.samplers.EpochWeightedRandomSampler`) or drawn from the global RNGs, which are
checkpointed (dropout, a ``DataLoader``'s shuffling and worker seeds when ``persistent_workers`` is off).

Distributed data parallel (``torchrun``, :mod:`pancls.distributed`): when a process group is initialised,
:func:`fit` wraps the model in PyTorch's ``DistributedDataParallel`` (optionally with ``SyncBatchNorm``,
``train.sync_bn``). ``train.batch_size`` stays the GLOBAL batch: the training loader must give each rank its
slice of every global batch (``TensorBatchLoader(rank=, world_size=)`` or a ``DataLoader`` with a
:class:`~pancls.train.samplers.ShardedBatchSampler`), the evaluation loader its contiguous share of the set
(``shard="data"`` or :class:`~pancls.train.samplers.ShardSampler`); a loader that is not sharded is refused.
Epoch loss, accuracy and image counts are summed over the ranks and evaluation logits gathered in order, so
``metrics.jsonl`` holds the same numbers as one process would write; only rank 0 writes files or logs; every
rank's RNG states are checkpointed, so a DDP run resumes bit-identically on the same number of processes.
A DDP run matches a single-process run with the same global batch up to float summation order (the
gradient all-reduce adds the ranks' partial sums in another order than one process's batch reduction), and
only without BatchNorm or with SyncBatchNorm: plain BatchNorm normalises each rank's share by its own
statistics.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Literal, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pancls import distributed
from pancls.config import to_dict
from pancls.errors import UserError, exception_text
from pancls.io import atomic_write_text, json_safe
from pancls.train.checkpoint import (
    RESUME_KEYS,
    capture_rng_state,
    check_same_config,
    config_hash,
    flatten,
    load_checkpoint,
    refuse_unresumed,
    restore_rng_state,
    save_checkpoint,
)
from pancls.train.optim import LRSchedule, build_optimizer
from pancls.validation import InvalidParameter, check_choice, check_scalar

CHECKPOINT = "last.pt"
BEST = "best.pt"  # weights of the selected epoch, written only when fit() is given a selection metric
METRICS = "metrics.jsonl"
#: how the best epoch is labelled wherever it is written: it was chosen by looking at the evaluation set
BEST_SELECTED_ON = "evaluation set (max eval_top1; optimistic, not a held-out estimate)"
#: keys that may change between a run and its resumption without changing what it computes
RESUMABLE_KEYS = frozenset({"epochs", "progress", "progress_steps", "progress_seconds", "tensorboard", "mlflow",
                            "eval_every"})
#: keys added after runs were checkpointed without them: in the fingerprint only when not at this default, so
#: that those runs still resume
_LATER_KEYS = {"sync_bn": False}
_POSTFIX_EVERY = 10  # progress-bar refreshes cost a device sync; do it every few iterations only


@dataclass(frozen=True)
class TrainConfig:
    """The ``train:`` section of an experiment config.

    Defaults are the LDAM-DRW CIFAR-LT recipe (Cao et al., NeurIPS 2019): SGD, momentum 0.9,
    weight decay 2e-4 on every parameter, batch 128, 200 epochs, lr 0.1 with 5 linear warm-up epochs
    and x0.01 at epochs 160 and 180 (see :class:`~pancls.train.optim.LRSchedule` for the exact formula),
    except that the warm-up ramps per iteration; ``warmup: epoch`` is LDAM-DRW's per-epoch staircase.

    ``sampler`` and ``sampler_start_epoch`` are applied by whoever builds the training loader:
    ``TensorBatchLoader(..., sample_weights=sample_weights(labels, cfg.sampler),
    weights_from_epoch=cfg.sampler_start_epoch)`` or
    ``make_torch_sampler(labels, cfg.sampler, seed=cfg.seed, start_epoch=cfg.sampler_start_epoch)``.
    """

    epochs: int = 200
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9  # SGD only
    nesterov: bool = False
    weight_decay: float = 2e-4
    wd_on_all: bool = True  # False: no decay on biases, norm and scalar parameters (ndim <= 1)
    warmup_epochs: int = 5
    warmup: Literal["step", "epoch"] = "step"  # linear per iteration, or LDAM-DRW's constant-per-epoch steps
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: Tuple[int, ...] = (160, 180)  # 0-based epochs from which lr is multiplied by gamma once more
    gamma: float = 0.01
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 autocast on CUDA, off on CPU
    clip_grad_norm: Optional[float] = None
    sampler: Literal["none", "class_balanced", "sqrt"] = "none"  # applied by the loader builder
    sampler_start_epoch: int = 0  # deferred re-sampling: first epoch that re-samples
    seed: int = 0
    deterministic: bool = False
    eval_every: int = 1  # the last epoch is always evaluated
    channels_last: bool = False
    compile: Literal["off", "default", "reduce-overhead"] = "off"
    #: None: log to ``run_dir/tensorboard`` when the tensorboard package is installed (a dependency of pancls);
    #: True: require it; False: never.
    tensorboard: Optional[bool] = None
    #: also log to MLflow (opt-in; needs the mlflow package): pancls.train.tracking
    mlflow: bool = False
    progress: bool = True  # a bar on a terminal; plain lines on a file or pipe (nohup, Slurm, tee)
    progress_steps: int = 0  # plain lines: one every this many steps (0: by time only) ...
    progress_seconds: float = 30.0  # ... or every this many seconds, whichever comes first
    #: DDP only (ignored in one process): BatchNorm statistics over the global batch, not each rank's share;
    #: PyTorch's SyncBatchNorm runs on CUDA only
    sync_bn: bool = False

    def __post_init__(self) -> None:
        # Literal choices are checked by pancls.config.from_dict, but not when built in Python.
        for name, hint in typing.get_type_hints(TrainConfig).items():
            if typing.get_origin(hint) is Literal:
                check_choice(getattr(self, name), name, typing.get_args(hint))
        for key in ("epochs", "batch_size", "eval_every"):
            check_scalar(getattr(self, key), key, int, min_val=1)
        for key in ("warmup_epochs", "sampler_start_epoch", "seed", "progress_steps"):
            check_scalar(getattr(self, key), key, int, min_val=0)
        check_scalar(self.weight_decay, "weight_decay", float, min_val=0)
        check_scalar(self.progress_seconds, "progress_seconds", float, min_val=0, include_boundaries="neither")
        check_scalar(self.lr, "lr", float, min_val=0, include_boundaries="neither")
        check_scalar(self.momentum, "momentum", float, min_val=0, max_val=1, include_boundaries="left")
        check_scalar(self.gamma, "gamma", float, min_val=0, include_boundaries="neither")
        if self.clip_grad_norm is not None:
            check_scalar(self.clip_grad_norm, "clip_grad_norm", float, min_val=0, include_boundaries="neither")

        def bad(key: str, reason: str) -> None:
            raise InvalidParameter(f"{reason}, got {getattr(self, key)!r}", key)

        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            bad("nesterov", "needs optimizer 'sgd' with momentum > 0")
        if any(m < 1 for m in self.milestones) or any(b <= a for a, b in itertools.pairwise(self.milestones)):
            bad("milestones", "must be strictly increasing epochs >= 1")
        if self.warmup_epochs > self.epochs:
            bad("warmup_epochs", f"must be <= epochs ({self.epochs}), or the run would end inside its warm-up")
        if self.schedule == "cosine" and self.warmup_epochs and self.warmup_epochs >= self.epochs:
            bad("warmup_epochs", f"must be < epochs ({self.epochs}) for the cosine schedule, which decays after it")


def inactive_keys(cfg: TrainConfig) -> Dict[str, str]:
    """The keys of ``cfg`` whose value has no effect on training under the rest of it, each with the reason.

    For showing a config to a user (results.json provenance, reports): a key listed here may hold any value
    without changing what is computed, so printing it beside the keys that matter would mislead (issue 18).
    ``config.yaml`` and the resume fingerprint keep every key; this only says which ones are idle.

    * ``milestones``, ``gamma``: only the ``step`` schedule reads them (:class:`~pancls.train.optim.LRSchedule`);
      under ``step``, ``gamma`` is idle too when no milestone falls inside the run (``m < epochs``).
    * ``warmup``: the warm-up form, idle when ``warmup_epochs`` is 0.
    * ``sampler_start_epoch``: idle with ``sampler: none``.
    * ``momentum``, ``nesterov``: SGD only (AdamW keeps its default betas).
    * ``wd_on_all``: which parameters decay, idle when ``weight_decay`` is 0.
    * ``progress_steps``, ``progress_seconds``: idle with ``progress: false``.

    Keys whose "off" value is itself the setting (``clip_grad_norm: null``, ``sampler: none``) are not listed,
    nor ``sync_bn`` (it depends on how the run is launched, not on the config).
    """
    out: Dict[str, str] = {}
    if cfg.schedule != "step":
        for key in ("milestones", "gamma"):
            out[key] = f"schedule is {cfg.schedule!r}; only 'step' uses milestones and gamma"
    elif not any(m < cfg.epochs for m in cfg.milestones):
        out["gamma"] = (f"no milestone falls before epoch {cfg.epochs} (milestones {list(cfg.milestones)}), "
                        "so the rate is never multiplied by gamma")
    if cfg.warmup_epochs == 0:
        out["warmup"] = "warmup_epochs is 0: there is no warm-up"
    if cfg.sampler == "none":
        out["sampler_start_epoch"] = "sampler is 'none': no re-sampling to defer"
    if cfg.optimizer != "sgd":
        for key in ("momentum", "nesterov"):
            out[key] = f"optimizer is {cfg.optimizer!r}; momentum and nesterov are SGD's"
    if cfg.weight_decay == 0:
        out["wd_on_all"] = "weight_decay is 0: no parameter is decayed"
    if not cfg.progress:
        for key in ("progress_steps", "progress_seconds"):
            out[key] = "progress is false: no progress lines are written"
    return out


@dataclass
class FitResult:
    """What :func:`fit` returns. The headline is the LAST epoch; ``best_epoch_metrics`` was selected on
    the evaluation set (labelled so in its ``selected_on`` field) and is an optional extra only."""

    last_metrics: Dict[str, Any]
    eval_logits: Optional[np.ndarray]  # (N, num_classes) float32 of the last evaluation
    eval_labels: Optional[np.ndarray]  # (N,) int64
    best_epoch_metrics: Optional[Dict[str, Any]]
    history: List[Dict[str, Any]]


def fit(
    model: nn.Module,
    train_loader: Iterable,
    eval_loader: Optional[Iterable],
    loss_fn: nn.Module,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    device: torch.device | str,
    evaluate: Optional[Callable[[np.ndarray, np.ndarray], Dict[str, Any]]] = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    run_config: Optional[Mapping[str, Any]] = None,
    select_metric: str = "eval_top1",
    selected_on: str = BEST_SELECTED_ON,
    save_best: bool = False,
) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` epochs, evaluating and checkpointing to ``run_dir`` as it goes.

    Parameters
    ----------
    model : nn.Module
        Maps an image batch to logits ``(N, num_classes)``.
    train_loader, eval_loader : iterables of batches (see the module docstring for the contract)
        ``len(train_loader)`` must be the number of batches per epoch. ``eval_loader`` may be None. Under
        DDP both must be sharded for this rank (see the module docstring).
    loss_fn : nn.Module
        ``loss_fn(logits, target)`` -> scalar, computed in float32 outside autocast; ``set_epoch`` is
        called when present. Trainable parameters belong in the model, not the loss.
    cfg : TrainConfig
    run_dir : path
        The run folder. Without ``resume`` it must not hold a ``last.pt`` already.
    device : torch.device or str
    evaluate : callable ``(y_true, logits) -> dict``, optional
        Extra evaluation metrics (JSON-able), stored with an ``eval_`` prefix next to ``eval_top1``.
    resume : bool
        Continue from ``run_dir/last.pt`` when there is one (a finished run returns its stored result);
        start afresh when there is none.
    log : callable
        Receives one summary line per epoch (on rank 0 only).
    run_config : mapping, optional
        The rest of the experiment config (model, loss, data); it joins ``cfg`` in the fingerprint that
        a resumed run must match.
    select_metric : str
        The record key (``eval_top1`` or an ``eval_<name>`` of ``evaluate``) whose maximum defines the
        best epoch; ties keep the earlier epoch.
    selected_on : str
        What the evaluation loader is, written into the best record (``"inner validation split ..."``
        when ``eval_loader`` holds training-fold patients; the default warns that it is the test set).
    save_best : bool
        Also write the best epoch's weights to ``run_dir/best.pt`` (atomically, when it improves).
    """
    run = _Run(model, train_loader, eval_loader, loss_fn, cfg, Path(run_dir), torch.device(device), evaluate, log,
               run_config, select_metric, selected_on, save_best)
    run.start(resume)
    try:
        with _determinism(cfg.deterministic, run.device):
            for epoch in range(run.start_epoch, cfg.epochs):
                record = run.train_one_epoch(epoch)
                if run.evaluates(epoch):
                    run.evaluate(epoch, record)
                run.checkpoint_and_log(epoch, record)
    finally:
        run.close()
    return run.result()


class _Run:
    """The state of one :func:`fit` call, in the order it is used: set up (or resumed), one epoch of training,
    evaluation, checkpoint and logs. Under DDP every rank holds one; only rank 0 writes."""

    def __init__(self, model, train_loader, eval_loader, loss_fn, cfg: TrainConfig, run_dir: Path,
                 device: torch.device, evaluate, log, run_config, select_metric, selected_on, save_best):
        self.ctx = distributed.context()
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        self.train_loader, self.eval_loader, self.loss_fn, self.evaluate_fn = train_loader, eval_loader, loss_fn, evaluate
        self.log = distributed.main_log(log, self.ctx)
        self.select_metric, self.selected_on, self.save_best = select_metric, selected_on, save_best
        self.best_due = False  # best.pt to write at this epoch's checkpoint
        self.ckpt_path, self.metrics_path = run_dir / CHECKPOINT, run_dir / METRICS
        self.fingerprint = _fingerprint(cfg, run_config)
        self._check_arguments(model)
        self.amp_dtype = _amp_dtype(cfg.amp, device)
        want_tb = cfg.tensorboard is not False and self.ctx.is_main
        self.summary_writer = _summary_writer_class(required=cfg.tensorboard is True) if want_tb else None
        self.model = self._prepare_model(model)
        loss_fn.to(device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule = LRSchedule(cfg, len(train_loader))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.writer = self.tracker = None
        self.start_epoch, self.global_step, self.history, self.best, self.last_eval = 0, 0, [], None, None

    # ------------------------------------------------------------------------------------------------ set-up
    def _check_arguments(self, model: nn.Module) -> None:
        cfg, ctx = self.cfg, self.ctx
        if any(p.requires_grad for p in self.loss_fn.parameters()):
            raise ValueError("the loss has trainable parameters; put them in the model so that the optimiser sees them")
        if ctx.active:
            distributed.per_rank_batch(cfg.batch_size, ctx.world_size)
            _check_sharded(self.train_loader, ctx, "batch", "train_loader")
            if self.eval_loader is not None:
                _check_sharded(self.eval_loader, ctx, "data", "eval_loader")
            if cfg.sync_bn and self.device.type != "cuda":
                raise InvalidParameter("needs CUDA processes (PyTorch's SyncBatchNorm synchronises on GPUs only); "
                                       "set it false for CPU processes", "train.sync_bn")

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if self.cfg.channels_last:
            _to_channels_last(model)
        if self.cfg.sync_bn and self.ctx.active:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # converts the BatchNorm layers in place
        return model

    def start(self, resume: bool) -> None:
        """Resume from ``last.pt`` or start afresh; then wrap the model (DDP, compile) and open TensorBoard.
        Whether a checkpoint exists is rank 0's answer, the same on every rank."""
        exists = self.ctx.broadcast(self.ckpt_path.exists())
        refuse_unresumed(exists, self.run_dir, resume)
        if exists:
            self._resume()
        else:
            _seed_everything(distributed.rank_seed(self.cfg.seed, self.ctx.rank))
            if self.ctx.is_main:  # a stale log from a run that never reached its first checkpoint
                atomic_write_text(self.metrics_path, "")
        if self.summary_writer is not None and self.start_epoch < self.cfg.epochs:
            self.writer = self.summary_writer(log_dir=str(self.run_dir / "tensorboard"), purge_step=self.global_step)
        if self.cfg.mlflow and self.ctx.is_main and self.start_epoch < self.cfg.epochs:
            from pancls.train.tracking import MLflowLogger

            self.tracker = MLflowLogger(self.run_dir, self.fingerprint)
        train_net = self.model
        if self.ctx.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else None
            train_net = DistributedDataParallel(self.model, device_ids=ids)
        compiled = self.cfg.compile != "off"
        net = torch.compile(train_net, mode=self.cfg.compile) if compiled else train_net
        # evaluation shards differ in length between ranks: it runs on the bare model, which communicates nothing
        eval_net = net if not self.ctx.active else torch.compile(self.model, mode=self.cfg.compile) if compiled \
            else self.model
        self.step = _Step(net, eval_net, self.loss_fn, self.optimizer, self.scaler, self.schedule, self.device,
                          self.amp_dtype, self.cfg, self.ctx)

    def _resume(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        try:
            ckpt = load_checkpoint(self.ckpt_path, required=RESUME_KEYS)
        except UserError as exc:
            if ctx.active and not self.ckpt_path.exists():
                raise UserError(f"rank {ctx.rank} cannot read the checkpoint rank 0 sees; a distributed run's "
                                "folder must be on a file system every node shares", self.ckpt_path) from None
            raise exc
        check_same_config(ckpt["config"], self.fingerprint, self.ckpt_path)
        if ckpt["epoch"] > cfg.epochs:
            raise UserError(f"the run being resumed has already trained {ckpt['epoch']} epochs, more than "
                            f"epochs={cfg.epochs}", "train.epochs")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.loss_fn.load_state_dict(ckpt["loss"])
        except RuntimeError as exc:
            raise UserError(f"the checkpoint does not fit this model or loss ({exception_text(exc)})",
                            self.ckpt_path) from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.start_epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.history, self.best, self.last_eval = ckpt["history"], ckpt["best"], ckpt["last_eval"]
        self._restore_rng(ckpt)
        if ctx.is_main:
            self._repair_best(self.start_epoch)
        if ctx.is_main:
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))
        self.log(f"resumed {self.run_dir} after epoch {self.start_epoch}/{cfg.epochs}")
        if self.device.type == "cuda" and not cfg.deterministic:
            self.log("note: train.deterministic is off on CUDA (cuDNN chooses its kernels per process), so the resumed "
                     "run is not bit-identical to an uninterrupted one; train.deterministic: true makes it so (slower)")

    def _restore_rng(self, ckpt: Mapping[str, Any]) -> None:
        """Each rank's RNG states as they were (``rng_ranks``); on another number of processes the data order
        is still the same (it depends on the seed and the global batch only), per-process draws are not."""
        ctx = self.ctx
        per_rank = ckpt.get("rng_ranks") or [ckpt["rng"]]
        if len(per_rank) == ctx.world_size:
            restore_rng_state(per_rank[ctx.rank])
            return
        restore_rng_state(ckpt["rng"])
        if ctx.rank > 0:
            _seed_everything(distributed.rank_seed(self.cfg.seed + self.start_epoch, ctx.rank))
        self.log(f"note: the checkpoint was written by {len(per_rank)} processes, this run has {ctx.world_size}: "
                 "the batches are the same, per-process random draws (dropout) are not, so the resumed run is "
                 "not bit-identical to an uninterrupted one")

    # ------------------------------------------------------------------------------------------ one epoch
    def train_one_epoch(self, epoch: int) -> Dict[str, Any]:
        self.started = time.perf_counter()
        for loader in (self.train_loader, self.eval_loader):
            _set_epoch(loader, epoch)  # loader, its sampler and its dataset (random transforms)
        if hasattr(self.loss_fn, "set_epoch"):
            self.loss_fn.set_epoch(epoch)
        mean_epoch_s = float(np.mean([r["seconds"] for r in self.history])) if self.history else None
        train = self.step.train_epoch(self.train_loader, epoch, epochs_after=self.cfg.epochs - epoch - 1,
                                      mean_epoch_s=mean_epoch_s)
        self.global_step += train["steps"]
        distributed.broadcast_buffers(self.model, self.ctx)  # rank 0's BatchNorm statistics everywhere
        self.train_stats = train
        return {"epoch": epoch, "lr": self.schedule.lr_at(epoch, 0), "train_loss": train["loss"],
                "train_top1": train["top1"]}

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluates(self, epoch: int) -> bool:
        cfg = self.cfg
        return self.eval_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)

    def evaluate(self, epoch: int, record: Dict[str, Any]) -> None:
        """Predict the whole evaluation set (gathered from every rank's shard), add ``eval_*`` to ``record``
        and keep the best epoch (written to ``best.pt`` with ``save_best``)."""
        logits, labels = self.step.predict(self.eval_loader)
        record["eval_top1"] = float((logits.argmax(1) == labels).mean())
        if self.evaluate_fn is not None:
            record.update({f"eval_{k}": v for k, v in json_safe(self.evaluate_fn(labels, logits)).items()})
        self.last_eval = {"logits": torch.from_numpy(logits), "labels": torch.from_numpy(labels)}
        if self.select_metric not in record:
            raise ValueError(f"select_metric {self.select_metric!r} is not among the evaluation keys "
                             f"{sorted(k for k in record if k.startswith('eval_'))}")
        if self.best is None or record[self.select_metric] > self.best[self.select_metric]:
            self.best = {"selected_on": self.selected_on, "select_metric": self.select_metric, **record}
            self.best_due = self.save_best  # written after last.pt (checkpoint_and_log), never ahead of it

    # ---------------------------------------------------------------------------------- checkpoint and log
    def checkpoint_and_log(self, epoch: int, record: Dict[str, Any]) -> None:
        """``last.pt`` (atomically), then the ``metrics.jsonl`` line, TensorBoard and the summary line: a line is
        never logged for an epoch the checkpoint does not hold. Every rank's RNG states go into the checkpoint."""
        train = self.train_stats
        record["seconds"] = round(time.perf_counter() - self.started, 3)
        record["images_per_s"] = round(train["images"] / train["seconds"], 1)
        self.history.append(record)
        rng = capture_rng_state()
        rng_ranks = self.ctx.all_gather(rng) if self.ctx.active else None
        if not self.ctx.is_main:
            return
        save_checkpoint(self.ckpt_path, {
            "epoch": epoch + 1, "global_step": self.global_step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "schedule": self.schedule.state_dict(), "loss": self.loss_fn.state_dict(), "history": self.history,
            "best": self.best, "last_eval": self.last_eval, "rng": rng,
            **({"rng_ranks": rng_ranks} if rng_ranks else {}),
            "config": self.fingerprint, "config_hash": config_hash(self.fingerprint),
        })
        if self.best_due:
            self.save_best_weights()
        _append_line(self.metrics_path, json.dumps(record))
        scalars = {k: float(v) for k, v in record.items()
                   if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, self.global_step)
        if self.tracker is not None:
            self.tracker.log_epoch(scalars, epoch)
        self.log(_summary(record, self.cfg.epochs))

    def save_best_weights(self) -> None:
        """``best.pt``: the weights of the epoch ``self.best`` records (the model's current ones: called at that
        epoch's checkpoint, right after ``last.pt``, so that ``best.pt`` is never from an epoch ``last.pt`` does not
        hold yet; a kill between the two is repaired on resume by :meth:`_repair_best`)."""
        save_checkpoint(self.run_dir / BEST, {"epoch": self.best["epoch"] + 1, "model": self.model.state_dict(),
                                              "record": {k: v for k, v in self.best.items()
                                                         if k not in ("selected_on", "select_metric")}})
        self.best_due = False

    def _repair_best(self, epoch: int) -> None:
        """On resume after epoch ``epoch`` (1-based): make ``best.pt`` hold the epoch ``last.pt``'s record names.
        A kill after ``last.pt`` and before ``best.pt`` leaves an older ``best.pt`` while the best epoch is the
        checkpoint's own (its weights are the model's, just loaded); a ``best.pt`` from an epoch after the
        checkpoint (written by a version that saved it first) is from a trajectory being retrained: removed, and
        written again when training passes the best epoch."""
        path = self.run_dir / BEST
        want = None if self.best is None else self.best["epoch"] + 1
        have = None
        if path.exists():
            held = load_checkpoint(path, required=("epoch",))
            have = int(held["epoch"])
        if want == have or not self.save_best:
            return
        if want == epoch:
            self.save_best_weights()
            self.log(f"best.pt rewritten from epoch {epoch}'s checkpoint (the run was stopped between the two)")
        elif have is not None and have > epoch:
            path.unlink()
            self.log(f"note: best.pt of epoch {have}, after the checkpoint's epoch {epoch}, removed (it is retrained); "
                     f"the best epoch so far ({want}) has no weights left, so unless a later epoch does better "
                     "there is no best.pt to select (a cv fold then refuses and asks to retrain it)")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.tracker is not None:
            self.tracker.close()

    def result(self) -> FitResult:
        last = self.last_eval
        return FitResult(
            last_metrics=self.history[-1],
            eval_logits=None if last is None else last["logits"].numpy(),
            eval_labels=None if last is None else last["labels"].numpy(),
            best_epoch_metrics=self.best,
            history=self.history,
        )


def _check_sharded(loader: Iterable, ctx: distributed.Context, kind: str, name: str) -> None:
    """Under DDP a loader must yield this rank's shard (``kind`` "batch": its slice of every global batch;
    "data": its contiguous share of the set), or each rank would train on, or predict, everything."""
    for obj in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if getattr(obj, "shard", None) == kind and getattr(obj, "world_size", None) == ctx.world_size \
                and getattr(obj, "rank", None) == ctx.rank:
            return
    how = ("TensorBatchLoader(..., rank=, world_size=) or DataLoader(batch_sampler=ShardedBatchSampler(...))"
           if kind == "batch" else
           "TensorBatchLoader(..., rank=, world_size=, shard='data') or DataLoader(sampler=ShardSampler(...))")
    raise ValueError(f"{name} is not sharded for rank {ctx.rank} of {ctx.world_size}; build it with {how} "
                     "(pancls.train.loaders / pancls.train.samplers)")


class _Step:
    """One epoch of training and one pass of prediction, with AMP, clipping and the per-iteration lr.

    Under DDP (``ctx.active``) each rank's loss is weighted by ``n_rank * W / n_batch`` before the backward
    pass: DDP averages the ranks' gradients, so the update is the gradient of the mean loss over the global
    batch even when its last batch splits unevenly. The epoch's loss, accuracy and image count are summed
    over the ranks (exact counts); predictions are gathered from the ranks' shards in rank order."""

    def __init__(self, net, eval_net, loss_fn, optimizer, scaler, schedule, device, amp_dtype, cfg: TrainConfig,
                 ctx: distributed.Context):
        self.net, self.eval_net, self.loss_fn, self.optimizer, self.scaler = net, eval_net, loss_fn, optimizer, scaler
        self.schedule, self.device, self.amp_dtype, self.cfg, self.ctx = schedule, device, amp_dtype, cfg, ctx

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _batches(self, loader: Iterable) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for batch in loader:
            x, y = _unpack(batch)
            x = x.to(self.device, non_blocking=True)
            if self.cfg.channels_last and x.dim() in _MEMORY_FORMATS:
                x = x.contiguous(memory_format=_MEMORY_FORMATS[x.dim()])
            yield x, y.to(self.device, non_blocking=True)

    def _share(self, n: int) -> torch.Tensor | float:
        """``n * W / (images of the global batch)``: this rank's weight in the DDP gradient average."""
        if not self.ctx.active:
            return 1.0
        total = self.ctx.all_reduce_sum(torch.tensor(float(n), device=self.device, dtype=torch.float32))
        return n * self.ctx.world_size / total

    def train_epoch(self, loader: Iterable, epoch: int, epochs_after: int, mean_epoch_s: Optional[float]) -> Dict[str, Any]:
        self.net.train()
        n_steps = len(loader)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        images = 0
        started = time.perf_counter()
        progress = _Progress.open(self.cfg, self.ctx, epoch, n_steps, mean_epoch_s, epochs_after)
        with progress:
            for i, (x, y) in enumerate(self._batches(loader)):
                lr = self.schedule.lr_at(epoch, i)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                with self._autocast():
                    logits = self.net(x)
                loss = self.loss_fn(logits.float(), y)  # margin losses want float32 logits
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss * self._share(len(y))).backward()
                if self.cfg.clip_grad_norm is not None:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.clip_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()

                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                images += len(y)
                progress.update(i + 1, loss_sum, correct, images)
        totals = self.ctx.all_reduce_sum(torch.stack([loss_sum, correct.double(),
                                                      torch.tensor(float(images), device=self.device,
                                                                   dtype=torch.float64)]))
        loss_total, correct_total, images_total = totals.tolist()  # also waits for the device: honest timing
        if images_total == 0:
            raise ValueError("the training loader yielded no batches")
        mean_loss = loss_total / images_total
        seconds = time.perf_counter() - started
        if not math.isfinite(mean_loss):
            raise UserError(f"training diverged: the mean loss of epoch {epoch} is {mean_loss}; lower the learning "
                            "rate or set clip_grad_norm", "train.lr")
        return {"loss": mean_loss, "top1": correct_total / images_total, "images": int(images_total),
                "seconds": seconds, "steps": n_steps}

    @torch.no_grad()
    def predict(self, loader: Iterable) -> Tuple[np.ndarray, np.ndarray]:
        self.eval_net.eval()
        logits, labels = [], []
        for x, y in self._batches(loader):
            with self._autocast():
                logits.append(self.eval_net(x).float())
            labels.append(y)
        num_classes = logits[0].shape[1] if logits else 0
        z = torch.cat(logits) if logits else torch.zeros((0, num_classes), device=self.device)
        y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=self.device)
        if self.ctx.active:  # every rank's shard, in rank order: the whole set in its order
            width = max(self.ctx.all_gather(int(z.shape[1])))  # a rank with an empty shard knows no width
            if z.shape[1] != width:
                z = torch.zeros((0, width), device=self.device)
            z, y = distributed.gather_rows(z, self.ctx), distributed.gather_rows(y, self.ctx)
        return z.cpu().numpy(), y.cpu().numpy()


class _Progress:
    """Training progress on rank 0: a tqdm bar on a terminal; plain lines on a file or pipe (nohup, Slurm,
    ``tee``), one every ``progress_steps`` steps (when set) or ``progress_seconds`` seconds, whichever comes
    first, with the step, the mean loss and accuracy so far, the speed and the epoch's and the run's ETA:

        epoch 3/200  step 120/391  loss 1.2345  acc 0.456  4.20 it/s  epoch ETA 1:05  run ETA 3:12:40

    The run ETA is the rest of this epoch plus the remaining epochs at the mean epoch time so far (this
    epoch's pace on the first one)."""

    def __init__(self, cfg: TrainConfig, epoch: int, n_steps: int, mean_epoch_s: Optional[float], epochs_after: int,
                 mode: Optional[str], stream):
        self.cfg, self.epoch, self.n_steps, self.mode, self.stream = cfg, epoch, n_steps, mode, stream
        self.mean_epoch_s, self.epochs_after = mean_epoch_s, epochs_after
        self.started = self.last_line = time.perf_counter()
        self.last_step = 0
        self.bar = None
        if mode == "bar":
            self.bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=stream, leave=False,
                            dynamic_ncols=True)

    @classmethod
    def open(cls, cfg: TrainConfig, ctx: distributed.Context, epoch: int, n_steps: int,
             mean_epoch_s: Optional[float], epochs_after: int) -> "_Progress":
        stream = sys.stderr
        mode = None
        if cfg.progress and ctx.is_main:
            mode = "bar" if _is_terminal(stream) else "lines"
        return cls(cfg, epoch, n_steps, mean_epoch_s, epochs_after, mode, stream)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def _eta(self, done: int) -> Tuple[float, float]:
        per_step = (time.perf_counter() - self.started) / done
        per_epoch = self.mean_epoch_s if self.mean_epoch_s is not None else per_step * self.n_steps
        epoch_eta = per_step * (self.n_steps - done)
        return epoch_eta, epoch_eta + per_epoch * self.epochs_after

    def update(self, done: int, loss_sum: torch.Tensor, correct: torch.Tensor, images: int) -> None:
        """After step ``done`` (1-based), with the running sums (this rank's share under DDP); reading them
        syncs the device, so it is done only when something is shown."""
        if self.mode == "bar":
            self.bar.update(1)
            if done % _POSTFIX_EVERY == 0 or done == self.n_steps:
                loss, acc = loss_sum.item() / images, correct.item() / images
                self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}",
                                     run_eta=tqdm.format_interval(self._eta(done)[1]), refresh=False)
        elif self.mode == "lines":
            now = time.perf_counter()
            by_steps = self.cfg.progress_steps > 0 and done - self.last_step >= self.cfg.progress_steps
            if not (by_steps or now - self.last_line >= self.cfg.progress_seconds):
                return
            loss, acc = loss_sum.item() / images, correct.item() / images
            epoch_eta, run_eta = self._eta(done)
            rate = done / max(now - self.started, 1e-9)
            print(f"epoch {self.epoch + 1}/{self.cfg.epochs}  step {done}/{self.n_steps}  loss {loss:.4f}  "
                  f"acc {acc:.3f}  {rate:.2f} it/s  epoch ETA {tqdm.format_interval(epoch_eta)}  "
                  f"run ETA {tqdm.format_interval(run_eta)}", file=self.stream, flush=True)
            self.last_line, self.last_step = now, done


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@torch.no_grad()
def predict_logits(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu", amp: str = "auto",
                   features: bool = False) -> Dict[str, np.ndarray]:
    """Label-free inference: ``{"logits": (N, K) float32[, "features": (N, d)]}`` in loader order.

    Batches may be bare image tensors, ``(image, ...)`` tuples or mappings with an ``"image"`` key (labels,
    if any, are ignored). The model is put in eval mode; ``features=True`` needs ``model.features`` and
    ``model.head`` (a :class:`~pancls.models.Classifier`) and returns the backbone features too.
    """
    device = torch.device(device)
    amp_dtype = _amp_dtype(amp, device)
    model.eval().to(device)
    out: Dict[str, List[torch.Tensor]] = {"logits": [], "features": []}
    for batch in loader:
        if isinstance(batch, Mapping):
            x = batch["image"]
        elif isinstance(batch, (tuple, list)):
            x = batch[0]
        else:
            x = batch
        x = torch.as_tensor(x).as_subclass(torch.Tensor).to(device, non_blocking=True)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            if features:
                f = model.features(x)
                out["features"].append(f.float().cpu())
                out["logits"].append(model.head(f).float().cpu())
            else:
                out["logits"].append(model(x).float().cpu())
    if not out["logits"]:
        raise ValueError("the loader yielded no batches")
    return {k: torch.cat(v).numpy() for k, v in out.items() if v}


_MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _unpack(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(image, label, ...)`` or ``{"image": ..., "label": ...}`` -> plain tensors, labels of shape (N,)."""
    if isinstance(batch, Mapping):
        x, y = batch["image"], batch["label"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        raise TypeError(f"a batch must be (image, label) or a mapping with 'image' and 'label', got {type(batch)}")
    x = torch.as_tensor(x).as_subclass(torch.Tensor)
    y = torch.as_tensor(y).as_subclass(torch.Tensor)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be class indices of shape ({x.shape[0]},) or ({x.shape[0]}, 1), "
                         f"got {tuple(y.shape)}")
    return x, y.long()


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    cuda = device.type == "cuda"
    if amp == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    if amp == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU does not support bfloat16; use amp: fp16 or off", "train.amp")
        return torch.bfloat16
    if amp == "fp16":
        if not cuda:
            raise UserError("fp16 autocast needs a CUDA device; use amp: bf16 or off", "train.amp")
        return torch.float16
    return None


def _fingerprint(cfg: TrainConfig, run_config: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The flattened config a resumed run must match: ``cfg`` minus keys that do not change the result
    (``epochs`` counts, except under the cosine schedule, whose shape depends on it), plus ``run_config``.
    The number of processes is not in it: the global batch fixes what is trained."""
    train = {k: v for k, v in to_dict(cfg).items()
             if (k not in RESUMABLE_KEYS or (k == "epochs" and cfg.schedule == "cosine"))
             and not (k in _LATER_KEYS and v == _LATER_KEYS[k])}
    return flatten({"train": train, **({"run": to_dict(dict(run_config))} if run_config else {})})


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def _determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the duration of training; the previous global flags come back after."""
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark)
    if enabled:
        # cuBLAS needs a fixed workspace for reproducible results; it is read when CUDA initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        cudnn.deterministic, cudnn.benchmark = True, False
    else:
        cudnn.benchmark = device.type == "cuda"  # fixed input sizes: let cuDNN pick the fastest kernels
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]


def _set_epoch(loader: Optional[Iterable], epoch: int) -> None:
    """``set_epoch`` on the loader, its (batch) sampler and its dataset (reseeded random transforms), each once."""
    if loader is None:
        return
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None),
                  getattr(loader, "dataset", None))
    seen = set()
    for obj in candidates:
        if id(obj) not in seen and callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)
            seen.add(id(obj))


def _to_channels_last(model: nn.Module) -> None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.dim() in _MEMORY_FORMATS:
            t.data = t.data.contiguous(memory_format=_MEMORY_FORMATS[t.dim()])


def _summary_writer_class(required: bool):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not required:
            return None
        raise UserError("tensorboard: true needs the tensorboard package: pip install tensorboard",
                        "train.tensorboard") from None
    return SummaryWriter


def _append_line(path: Path, line: str) -> None:
    """Append one line and push it to the disk before returning."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _summary(record: Mapping[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch'] + 1}/{epochs}", f"lr {record['lr']:.4g}", f"loss {record['train_loss']:.4f}",
             f"train top1 {record['train_top1']:.2%}"]
    if "eval_top1" in record:
        parts.append(f"eval top1 {record['eval_top1']:.2%}")
    parts += [f"{record['seconds']:.1f}s", f"{record['images_per_s']:.0f} img/s"]
    return "  ".join(parts)
