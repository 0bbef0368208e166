"""Long-tailed benchmark runs (CIFAR-10/100-LT; ImageNet-LT and iNaturalist 2018 from list files, see
:mod:`pancls.data.lt_lists`): data -> model -> the shared engine -> results.

A run is a folder (after nnU-Net): ``config.yaml`` (resolved), ``classes.json``, ``last.pt``,
``metrics.jsonl``, ``results.json`` and ``crowding.png``. It can be resumed with ``--resume`` and
re-read later. The headline number is the LAST epoch's top-1; the best epoch is kept only as a
labelled extra because choosing it looks at the test set.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from pancls.config import dump_yaml, from_dict
from pancls.data.images import ImageAugmentConfig
from pancls.errors import UserError
from pancls.io import atomic_write_json, hold_lock, remove_stale_temps
from pancls.schemas import LossConfig, ModelConfig
from pancls.train.engine import TrainConfig
from pancls.validation import check_choice, check_scalar


@dataclass
class LTDataConfig:
    dataset: str = "cifar10"  # cifar10 | cifar100 | imagenet_lt | inat2018 (pancls.data.lt_lists)
    path: Optional[str] = None  # npz, official archive or extracted folder; for the list datasets the image root
    train_list: Optional[str] = None  # list datasets: ImageNet_LT_train.txt, iNaturalist18_train.txt
    eval_list: Optional[str] = None  # list datasets: the list evaluated each epoch (ImageNet_LT_test.txt, ...)
    num_classes: Optional[int] = None  # list datasets: None = the standard count (1000, 8142)
    imbalance_ratio: float = 100.0
    construction: str = "ldam"  # ldam | first


@dataclass
class Augment2DConfig:
    crop_padding: int = 4  # pad-4 random crop (He et al. 2016); 0 disables
    flip: bool = True


#: the values of a run's ``device`` (config key and ``--device``)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class LTConfig:
    data: LTDataConfig = field(default_factory=LTDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: Augment2DConfig = field(default_factory=Augment2DConfig)
    images: ImageAugmentConfig = field(default_factory=ImageAugmentConfig)  # list datasets only
    device: str = "auto"  # auto | cpu | cuda
    eval_batch_size: int = 1000
    note: str = ""  # free text carried into results.json (e.g. where the paper is vague)

    def __post_init__(self) -> None:
        check_choice(self.device, "device", DEVICES)
        check_scalar(self.eval_batch_size, "eval_batch_size", int, min_val=1)


def load_config(mapping: Dict[str, Any]) -> LTConfig:
    return from_dict(LTConfig, mapping, "config")


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` of a ``device`` setting (:data:`DEVICES`): ``auto`` is CUDA where there is one."""
    check_choice(name, "device", DEVICES)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but no CUDA device is available to this torch build", "--device")
    return torch.device(name)


def _build(cfg: LTConfig, init_weights: bool = True):
    from pancls.data.cifar import load_cifar_lt
    from pancls.data.lt_lists import DATASETS, load_image_lists
    from pancls.schemas import build_model_and_loss

    if cfg.data.dataset in DATASETS:  # ImageNet-LT, iNaturalist 2018: list files + an image folder
        data = load_image_lists(cfg.data.dataset, cfg.data.path, cfg.data.train_list, cfg.data.eval_list,
                                cfg.data.num_classes)
        model, loss_fn = build_model_and_loss(cfg.model, cfg.loss, data.class_counts, init_weights)
        return data, model, loss_fn
    if cfg.data.path is None:
        raise UserError("no data path given; pass --data PATH (an npz, an official archive or its folder)", "--data")
    data = load_cifar_lt(cfg.data.path, cfg.data.dataset, cfg.data.imbalance_ratio, cfg.data.construction)
    model, loss_fn = build_model_and_loss(cfg.model, cfg.loss, data.class_counts, init_weights)
    return data, model, loss_fn


def dry_run(cfg: LTConfig) -> Dict[str, Any]:
    """Build data and model only; return the facts a user checks before a long run."""
    from pancls.data import lt_lists

    data, model, _ = _build(cfg)
    if cfg.data.dataset in lt_lists.DATASETS:
        return {**lt_lists.facts(cfg, data), "parameters": int(sum(p.numel() for p in model.parameters())),
                "backbone": cfg.model.backbone, "head": cfg.model.head, "loss": cfg.loss.name,
                "inactive": inactive_keys(cfg)}
    return {
        "dataset": cfg.data.dataset,
        "imbalance_ratio": cfg.data.imbalance_ratio,
        "construction": cfg.data.construction,
        "n_train": int(len(data.train_labels)),
        "n_test": int(len(data.test_labels)),
        "class_counts": [int(c) for c in data.class_counts],
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "backbone": cfg.model.backbone,
        "head": cfg.model.head,
        "loss": cfg.loss.name,
        "inactive": inactive_keys(cfg),  # train keys that do nothing in this recipe, with the reason
    }


def _loaders(cfg: LTConfig, data, device: torch.device, ctx=None):
    """Training and test loaders; under DDP (``ctx``) rank ``r`` gets its slice of every global training batch
    and its contiguous share of the test set (:mod:`pancls.distributed`)."""
    from pancls.data import augment, lt_lists
    from pancls.distributed import Context
    from pancls.train.loaders import TensorBatchLoader
    from pancls.train.samplers import sample_weights

    if cfg.data.dataset in lt_lists.DATASETS:  # images decoded from files by DataLoader workers
        return lt_lists.make_loaders(cfg, data, device, ctx)
    mean, std = augment.normalisation(cfg.data.dataset)
    flip_prob = 0.5 if cfg.augment.flip else 0.0
    # Images stay uint8 NHWC on the device; conversion and augmentation happen per batch, on the device.
    train_x = torch.from_numpy(data.train_images).to(device)
    test_x = torch.from_numpy(data.test_images).to(device)

    def train_transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = augment.to_float_normalised(x, mean, std, device)
        if cfg.augment.crop_padding > 0 or flip_prob > 0:
            x = augment.random_crop_flip(x, padding=cfg.augment.crop_padding, generator=generator, flip_prob=flip_prob)
        return x

    def eval_transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return augment.to_float_normalised(x, mean, std, device)

    ctx = ctx or Context()
    weights = sample_weights(data.train_labels, cfg.train.sampler)
    train_loader = TensorBatchLoader(
        train_x, torch.from_numpy(data.train_labels).to(device), batch_size=cfg.train.batch_size, shuffle=True,
        sample_weights=weights, transform=train_transform, seed=cfg.train.seed,
        weights_from_epoch=cfg.train.sampler_start_epoch, rank=ctx.rank, world_size=ctx.world_size,
    )
    eval_loader = TensorBatchLoader(
        test_x, torch.from_numpy(data.test_labels).to(device), batch_size=cfg.eval_batch_size, shuffle=False,
        transform=eval_transform, seed=cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size, shard="data",
    )
    return train_loader, eval_loader


def run(cfg: LTConfig, out_dir: Path, resume: bool = False, log=print) -> Dict[str, Any]:
    """Train and evaluate one configuration; write and return ``results.json``.

    Started by ``torchrun`` (several processes), it trains with DDP (:mod:`pancls.distributed`):
    ``train.batch_size`` is the global batch, rank 0 writes the same run folder one process would."""
    from pancls import distributed

    with distributed.session(resolve_device(cfg.device)) as (ctx, device), contextlib.ExitStack() as held:
        distributed.per_rank_batch(cfg.train.batch_size, ctx.world_size)  # before the data is read
        return _run(cfg, out_dir, resume, log, ctx, device, held)


def _run(cfg: LTConfig, out_dir: Path, resume: bool, log, ctx, device: torch.device,
         held: contextlib.ExitStack) -> Dict[str, Any]:
    from pancls.eval.crowding import mean_angle_to_other_centres, min_angle_to_other_centres, plot_crowding
    from pancls.eval.metrics import classification_report
    from pancls.train.checkpoint import refuse_unresumed
    from pancls.train.engine import fit

    has_checkpoint = (out_dir / "last.pt").exists()
    torch.manual_seed(cfg.train.seed)  # model initialisation depends only on the seed
    data, model, loss_fn = _build(cfg, init_weights=not has_checkpoint)  # a resume takes its weights from last.pt
    model.to(device)
    loss_fn.to(device)
    train_loader, eval_loader = _loaders(cfg, data, device, ctx)

    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:  # another process training this run folder: refused
        held.enter_context(hold_lock(out_dir, "this lt run"))
    refuse_unresumed(has_checkpoint, out_dir, resume)  # before config.yaml is written
    if ctx.is_main:
        remove_stale_temps(out_dir)  # a checkpoint or results file a killed run was writing
    # a resumed run keeps its config and classes until fit() checked that the config is the run's own (a refused
    # resume with another dataset left classes.json rewritten); the same config gives the same classes
    if ctx.is_main and not has_checkpoint:
        dump_yaml(cfg, run_config_path(out_dir))
    if ctx.is_main and not (has_checkpoint and (out_dir / "classes.json").exists()):
        atomic_write_json(out_dir / "classes.json", {"classes": list(data.classes),
                                                     "train_counts": list(map(int, data.class_counts))})

    def evaluate(y_true: np.ndarray, logits: np.ndarray) -> Dict[str, Any]:
        return classification_report(y_true, logits, data.class_counts)

    started = time.time()
    run_config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("train", "note")}
    run_config["images"].pop("workers")  # the batches do not depend on it (pancls.data.images): a resume may change it
    if resume and has_checkpoint:
        _keep_stored_path_spelling(run_config, out_dir / "last.pt")
    result = fit(model, train_loader, eval_loader, loss_fn, cfg.train, out_dir, device=device,
                 evaluate=evaluate, resume=resume, log=log, run_config=run_config)
    final = classification_report(result.eval_labels, result.eval_logits, data.class_counts)
    centres = model.head.centres().detach().cpu()
    angles, nearest = mean_angle_to_other_centres(centres), min_angle_to_other_centres(centres)
    if not ctx.is_main:  # the same results on every rank; rank 0 writes them
        return {"reported": "last epoch", **final}
    dump_yaml(cfg, run_config_path(out_dir))  # a resumed run may have been given more epochs
    plot_crowding(nearest, data.class_counts, data.classes, out_dir / "crowding.png",
                  f"{_benchmark_name(cfg)}, head {cfg.model.head}, loss {cfg.loss.name}, "
                  f"{cfg.train.epochs} epochs, top-1 {final['top1']:.1%} (last epoch)", measure="min",
                  dim=centres.shape[1])

    results = by_class({
        "reported": "last epoch",
        "epochs": cfg.train.epochs,
        **final,
        "crowding_mean_angle_deg": [float(a) for a in angles],
        "crowding_min_angle_deg": [float(a) for a in nearest],
        "head": model.head.summary(),  # the learned scale / gamma / kappa and the logit width (pancls.heads)
        "class_counts": [int(c) for c in data.class_counts],
        "classes": list(data.classes),
        "best_epoch_on_test_set__not_reported": result.best_epoch_metrics,
        "provenance": {**_provenance(device, cfg, time.time() - started), "processes": ctx.world_size},
    }, data.classes)
    atomic_write_json(out_dir / "results.json", results)
    return results


def _benchmark_name(cfg: LTConfig) -> str:
    from pancls.data.lt_lists import DATASETS

    return cfg.data.dataset if cfg.data.dataset in DATASETS else f"{cfg.data.dataset}-LT IR {cfg.data.imbalance_ratio:g}"


#: The per-class entries of results.json, written as {class name: value} (issue 18); :func:`per_class` reads
#: both that and the lists of older runs. (``class_counts`` stays a list in class order, beside ``classes``.)
PER_CLASS_KEYS = ("per_class_accuracy", "crowding_mean_angle_deg", "crowding_min_angle_deg")


def by_class(results: Dict[str, Any], classes) -> Dict[str, Any]:
    """``results`` with each list of :data:`PER_CLASS_KEYS` keyed by class name, also inside nested dicts (the
    best epoch's metrics). Lists stay lists when two classes share a name (a dict would lose one)."""
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes):
        return results

    def convert(node):
        if not isinstance(node, dict):
            return node
        return {k: dict(zip(classes, v, strict=True)) if k in PER_CLASS_KEYS and isinstance(v, list)
                and len(v) == len(classes) else convert(v) for k, v in node.items()}

    return convert(results)


def per_class(results: Dict[str, Any], key: str) -> list:
    """The values of a per-class entry of results.json in class order, from the keyed form or an old run's list."""
    value = results[key]
    if isinstance(value, dict):
        return [value[str(c)] for c in results["classes"]]
    return list(value)


def _keep_stored_path_spelling(run_config: Dict[str, Any], checkpoint: Path) -> None:
    """Resume a run whose checkpoint spells a path another way (a run started before the commands stored paths
    absolute: ``cifar10.npz`` then, ``/data/cifar10.npz`` now): where both name the same file, keep the stored
    spelling in ``run_config`` (in place), so that the resume compares files, not strings."""
    from pancls.config import PATH_KEYS
    from pancls.train.checkpoint import load_checkpoint

    stored = load_checkpoint(checkpoint, required=("config",))["config"] or {}  # fit() checks the rest
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        node: Any = run_config
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        then = stored.get(f"run.{key}")
        if isinstance(node, dict) and isinstance(node.get(name), str) and isinstance(then, str) \
                and node[name] != then and os.path.abspath(node[name]) == os.path.abspath(then):
            node[name] = then


def _provenance(device: torch.device, cfg: LTConfig, seconds: float) -> Dict[str, Any]:
    from pancls import __version__
    from pancls.machine import describe as describe_machine

    config, inactive = dataclasses.asdict(cfg), inactive_keys(cfg)
    return {
        "pancls": __version__,
        "torch": torch.__version__,
        "device": describe_machine(device),
        "seed": cfg.train.seed,
        "epochs": cfg.train.epochs,
        "wall_seconds_this_session": round(seconds, 1),
        "config": {**config, "train": {k: v for k, v in config["train"].items() if f"train.{k}" not in inactive}},
        "inactive": inactive,
        "note": cfg.note,
    }


def inactive_keys(cfg: LTConfig) -> Dict[str, str]:
    """``{"train.KEY": reason}`` for the train keys that do nothing in this recipe (milestones under the cosine
    schedule, ...; :func:`pancls.train.engine.inactive_keys`). results.json's provenance leaves them out of its
    config and lists them here; config.yaml keeps them, so that the run reloads and resumes."""
    from pancls.train.engine import inactive_keys as train_inactive

    return {f"train.{k}": reason for k, reason in train_inactive(cfg.train).items()}


def run_config_path(out) -> Path:
    """``RUN/config.yaml``: the resolved config of a run (what ``--resume`` alone and :func:`load_run` read)."""
    return Path(out) / "config.yaml"


def load_run(run_dir: Path):
    """Re-read a finished or interrupted run: ``(cfg, data, model)`` with the last checkpoint's weights."""
    from pancls.config import load_yaml
    from pancls.train.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    cfg = load_config(load_yaml(run_config_path(run_dir)))
    data, model, _ = _build(cfg, init_weights=False)  # the weights are last.pt's
    model.load_state_dict(load_checkpoint(run_dir / "last.pt")["model"])
    return cfg, data, model
