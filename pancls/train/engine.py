"""The one training loop, shared by the 2D long-tailed benchmarks and the 3D CT pipeline.

:func:`fit` knows nothing of CIFAR or CT. It takes a model, a loss, iterables of batches and a run
folder, and writes there:

* ``last.pt`` -- model, optimiser, AMP scaler, epoch, global step, history, best epoch, the last
  evaluation's logits and labels, every RNG state and the config fingerprint; rewritten atomically
  after every epoch, so that a killed run resumes (``resume=True``) bit-identically on the same hardware;
* ``metrics.jsonl`` -- one JSON line per finished epoch, appended only after that epoch's checkpoint is
  on disk, and rewritten from the checkpoint on resume (lines of epochs the checkpoint does not hold
  are dropped);
* ``tensorboard/`` (loss, lr, metrics per epoch) unless ``tensorboard: false`` or the package is missing.

Batch contract: an iterable of either ``(image, label, ...)`` tuples/lists (``TensorBatchLoader``,
``TensorDataset``) or mappings with ``"image"`` and ``"label"`` keys (MONAI dictionary transforms).
Images are ``(N, C, *spatial)``; labels are class indices of shape ``(N,)`` or ``(N, 1)``. Tensor
subclasses such as MONAI's ``MetaTensor`` are stripped to plain tensors before the model sees them.
Before every epoch the engine calls ``set_epoch(epoch)`` on each loader and on its sampler where they
have one, and on the loss where it has one (deferred re-weighting).

Bit-exact resume needs every random draw to be either seeded per epoch (``TensorBatchLoader``,
:class:`~pancls.train.samplers.EpochWeightedRandomSampler`) or drawn from the global RNGs, which are
checkpointed (dropout, a ``DataLoader``'s shuffling and worker seeds when ``persistent_workers`` is off).
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

from pancls.config import to_dict
from pancls.errors import UserError
from pancls.io import atomic_write_text
from pancls.train.checkpoint import (
    capture_rng_state,
    check_same_config,
    config_hash,
    flatten,
    load_checkpoint,
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
_RESUMABLE_KEYS = frozenset({"epochs", "progress", "tensorboard", "eval_every"})
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
    progress: bool = True

    def __post_init__(self) -> None:
        # Literal choices are checked by pancls.config.from_dict, but not when built in Python.
        for name, hint in typing.get_type_hints(TrainConfig).items():
            if typing.get_origin(hint) is Literal:
                check_choice(getattr(self, name), name, typing.get_args(hint))
        for key in ("epochs", "batch_size", "eval_every"):
            check_scalar(getattr(self, key), key, int, min_val=1)
        for key in ("warmup_epochs", "sampler_start_epoch", "seed"):
            check_scalar(getattr(self, key), key, int, min_val=0)
        check_scalar(self.weight_decay, "weight_decay", float, min_val=0)
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
        ``len(train_loader)`` must be the number of batches per epoch. ``eval_loader`` may be None.
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
        Receives one summary line per epoch.
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
    run_dir = Path(run_dir)
    device = torch.device(device)
    ckpt_path, metrics_path = run_dir / CHECKPOINT, run_dir / METRICS
    if ckpt_path.exists() and not resume:
        raise UserError("a run already exists here; pass --resume to continue it or choose another --out", run_dir)
    if any(p.requires_grad for p in loss_fn.parameters()):
        raise ValueError("the loss has trainable parameters; put them in the model so that the optimiser sees them")
    amp_dtype = _amp_dtype(cfg.amp, device)
    summary_writer = _summary_writer_class(required=cfg.tensorboard is True) if cfg.tensorboard is not False else None
    fingerprint = _fingerprint(cfg, run_config)

    model.to(device)
    loss_fn.to(device)
    if cfg.channels_last:
        _to_channels_last(model)
    optimizer = build_optimizer(model, cfg)
    schedule = LRSchedule(cfg, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        check_same_config(ckpt["config"], fingerprint, ckpt_path)
        if ckpt["epoch"] > cfg.epochs:
            raise UserError(f"the run being resumed has already trained {ckpt['epoch']} epochs, more than "
                            f"epochs={cfg.epochs}", "train.epochs")
        try:
            model.load_state_dict(ckpt["model"])
            loss_fn.load_state_dict(ckpt["loss"])
        except RuntimeError as exc:
            raise UserError(f"the checkpoint does not fit this model or loss ({str(exc).splitlines()[0]})",
                            ckpt_path) from None
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        schedule.load_state_dict(ckpt["schedule"])
        restore_rng_state(ckpt["rng"])
        start_epoch, global_step = ckpt["epoch"], ckpt["global_step"]
        history, best, last_eval = ckpt["history"], ckpt["best"], ckpt["last_eval"]
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        log(f"resumed {run_dir} after epoch {start_epoch}/{cfg.epochs}")
    else:
        _seed_everything(cfg.seed)
        start_epoch, global_step, history, best, last_eval = 0, 0, [], None, None
        atomic_write_text(metrics_path, "")  # a stale log from a run that never reached its first checkpoint

    writer = None
    if summary_writer is not None and start_epoch < cfg.epochs:
        writer = summary_writer(log_dir=str(run_dir / "tensorboard"), purge_step=global_step)
    net = torch.compile(model, mode=cfg.compile) if cfg.compile != "off" else model
    step = _Step(net, loss_fn, optimizer, scaler, schedule, device, amp_dtype, cfg)
    try:
        with _determinism(cfg.deterministic, device):
            for epoch in range(start_epoch, cfg.epochs):
                started = time.perf_counter()
                for loader in (train_loader, eval_loader):
                    _set_epoch(loader, epoch)  # loader, its sampler and its dataset (random transforms)
                if hasattr(loss_fn, "set_epoch"):
                    loss_fn.set_epoch(epoch)
                mean_epoch_s = float(np.mean([r["seconds"] for r in history])) if history else None
                train = step.train_epoch(train_loader, epoch, epochs_after=cfg.epochs - epoch - 1,
                                         mean_epoch_s=mean_epoch_s)
                global_step += train["steps"]
                record = {"epoch": epoch, "lr": schedule.lr_at(epoch, 0), "train_loss": train["loss"],
                          "train_top1": train["top1"]}
                if eval_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    logits, labels = step.predict(eval_loader)
                    record["eval_top1"] = float((logits.argmax(1) == labels).mean())
                    if evaluate is not None:
                        record.update({f"eval_{k}": v for k, v in _jsonable(evaluate(labels, logits)).items()})
                    last_eval = {"logits": torch.from_numpy(logits), "labels": torch.from_numpy(labels)}
                    if select_metric not in record:
                        raise ValueError(f"select_metric {select_metric!r} is not among the evaluation keys "
                                         f"{sorted(k for k in record if k.startswith('eval_'))}")
                    if best is None or record[select_metric] > best[select_metric]:
                        best = {"selected_on": selected_on, "select_metric": select_metric, **record}
                        if save_best:
                            save_checkpoint(run_dir / BEST, {"epoch": epoch + 1, "model": model.state_dict(),
                                                             "record": record})
                record["seconds"] = round(time.perf_counter() - started, 3)
                record["images_per_s"] = round(train["images"] / train["seconds"], 1)
                history.append(record)

                save_checkpoint(ckpt_path, {
                    "epoch": epoch + 1, "global_step": global_step, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "schedule": schedule.state_dict(), "loss": loss_fn.state_dict(), "history": history,
                    "best": best, "last_eval": last_eval, "rng": capture_rng_state(),
                    "config": fingerprint, "config_hash": config_hash(fingerprint),
                })
                _append_line(metrics_path, json.dumps(record))
                if writer is not None:
                    for key, value in record.items():
                        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                            writer.add_scalar(key, value, global_step)
                log(_summary(record, cfg.epochs))
    finally:
        if writer is not None:
            writer.close()

    return FitResult(
        last_metrics=history[-1],
        eval_logits=None if last_eval is None else last_eval["logits"].numpy(),
        eval_labels=None if last_eval is None else last_eval["labels"].numpy(),
        best_epoch_metrics=best,
        history=history,
    )


class _Step:
    """One epoch of training and one pass of prediction, with AMP, clipping and the per-iteration lr."""

    def __init__(self, net, loss_fn, optimizer, scaler, schedule, device, amp_dtype, cfg: TrainConfig):
        self.net, self.loss_fn, self.optimizer, self.scaler = net, loss_fn, optimizer, scaler
        self.schedule, self.device, self.amp_dtype, self.cfg = schedule, device, amp_dtype, cfg

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

    def train_epoch(self, loader: Iterable, epoch: int, epochs_after: int, mean_epoch_s: Optional[float]) -> Dict[str, Any]:
        self.net.train()
        n_steps = len(loader)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        images = 0
        started = time.perf_counter()
        bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", file=sys.stderr, leave=False,
                   dynamic_ncols=True, disable=None if self.cfg.progress else True)  # None: off when not a TTY
        with bar:
            for i, (x, y) in enumerate(self._batches(loader)):
                lr = self.schedule.lr_at(epoch, i)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                with self._autocast():
                    logits = self.net(x)
                loss = self.loss_fn(logits.float(), y)  # margin losses want float32 logits
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if self.cfg.clip_grad_norm is not None:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.clip_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()

                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                images += len(y)
                bar.update(1)
                if not bar.disable and ((i + 1) % _POSTFIX_EVERY == 0 or i + 1 == n_steps):
                    per_step = (time.perf_counter() - started) / (i + 1)
                    per_epoch = mean_epoch_s if mean_epoch_s is not None else per_step * n_steps
                    eta = per_step * (n_steps - i - 1) + per_epoch * epochs_after
                    bar.set_postfix(loss=f"{loss_sum.item() / images:.4f}", acc=f"{correct.item() / images:.3f}",
                                    run_eta=tqdm.format_interval(eta), refresh=False)
        if images == 0:
            raise ValueError("the training loader yielded no batches")
        mean_loss = loss_sum.item() / images  # also waits for the device, so the timing below is honest
        seconds = time.perf_counter() - started
        if not math.isfinite(mean_loss):
            raise UserError(f"training diverged: the mean loss of epoch {epoch} is {mean_loss}; lower the learning "
                            "rate or set clip_grad_norm", "train.lr")
        return {"loss": mean_loss, "top1": correct.item() / images, "images": images, "seconds": seconds,
                "steps": n_steps}

    @torch.no_grad()
    def predict(self, loader: Iterable) -> Tuple[np.ndarray, np.ndarray]:
        self.net.eval()
        logits, labels = [], []
        for x, y in self._batches(loader):
            with self._autocast():
                logits.append(self.net(x).float())
            labels.append(y)
        return torch.cat(logits).cpu().numpy(), torch.cat(labels).cpu().numpy()


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
    (``epochs`` counts, except under the cosine schedule, whose shape depends on it), plus ``run_config``."""
    train = {k: v for k, v in to_dict(cfg).items()
             if k not in _RESUMABLE_KEYS or (k == "epochs" and cfg.schedule == "cosine")}
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
    candidates = (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None),
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _summary(record: Mapping[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch'] + 1}/{epochs}", f"lr {record['lr']:.4g}", f"loss {record['train_loss']:.4f}",
             f"train top1 {record['train_top1']:.2%}"]
    if "eval_top1" in record:
        parts.append(f"eval top1 {record['eval_top1']:.2%}")
    parts += [f"{record['seconds']:.1f}s", f"{record['images_per_s']:.0f} img/s"]
    return "  ".join(parts)
