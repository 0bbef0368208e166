"""Optimiser and learning-rate schedule of the training engine.

The schedule is a pure function ``lr_at(epoch, step)`` of the config and the number of batches per
epoch; the engine writes its value into the optimiser before every iteration. Nothing about it is
mutable, so resuming needs only the epoch and step (plus a check that the epoch length is unchanged).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List

import torch
from torch import nn

from pancls.errors import UserError

if TYPE_CHECKING:  # engine.py imports this module
    from pancls.train.engine import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, wd_on_all: bool) -> List[Dict[str, Any]]:
    """Split trainable parameters into weight-decayed and non-decayed groups.

    With ``wd_on_all`` (the LDAM-DRW recipe, which passes ``model.parameters()`` to SGD) every
    parameter is decayed. Otherwise parameters with ``ndim <= 1`` are not: biases, normalisation
    scales/shifts and scalar head parameters such as a learnable logit scale, whose decay towards 0
    only fights the loss (timm's ``param_groups_weight_decay`` convention).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if wd_on_all:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    decay = [p for _, p in params if p.ndim > 1]
    no_decay = [p for _, p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: "TrainConfig") -> torch.optim.Optimizer:
    """SGD (``momentum``, ``nesterov``) or AdamW (default betas; ``momentum`` unused) at ``cfg.lr``."""
    groups = param_groups(model, cfg.weight_decay, cfg.wd_on_all)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise UserError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw", "optimizer")


class LRSchedule:
    """Warm-up followed by a step, cosine or constant schedule, evaluated per iteration.

    With base rate ``lr``, ``W = warmup_epochs`` and 0-based ``epoch``:

    * warm-up, ``epoch < W``, ``warmup="step"`` (the default): linear per iteration,
      ``lr * (i + 1) / (W * steps_per_epoch)`` with ``i = epoch * steps_per_epoch + step`` the global
      iteration, reaching ``lr`` at the last warm-up iteration (the gradual warm-up of Goyal et al.,
      "Accurate, Large Minibatch SGD", 2017, sec. 2.2).
    * warm-up, ``warmup="epoch"``: ``lr * (epoch + 1) / W``, constant within the epoch. This is the
      LDAM-DRW warm-up exactly (Cao et al., NeurIPS 2019, ``adjust_learning_rate``: ``lr * (epoch+1) / 5``),
      starting at ``lr / W``. Note that with ``W = 1`` it is no warm-up at all (the first epoch runs at
      ``lr``): that was the cause of issue 19, where an engine run of a "1 linear warm-up epoch" recipe
      trained 5-10 points below an independent per-iteration implementation.
    * ``"step"``: ``lr * gamma ** k`` with ``k`` the number of milestones ``m <= epoch`` (the meaning of
      ``torch.optim.lr_scheduler.MultiStepLR``). LDAM-DRW's ``epoch+1 > 160 -> lr * 0.01`` and
      ``epoch+1 > 180 -> lr * 0.0001`` is ``milestones=[160, 180], gamma=0.01``: the factor applied
      from 0-based epoch 160 is 0.01 and from epoch 180 it is 0.01² = 1e-4 (relative to ``lr``).
    * ``"cosine"``: ``lr * (1 + cos(pi * t)) / 2`` with ``t`` the fraction of post-warm-up iterations done,
      ``t = (epoch - W + step / steps_per_epoch) / (epochs - W)`` (Loshchilov & Hutter, SGDR, ICLR 2017,
      without restarts); updated every iteration.
    * ``"constant"``: ``lr``.
    """

    def __init__(self, cfg: "TrainConfig", steps_per_epoch: int):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.base_lr = cfg.lr
        self.warmup_epochs = cfg.warmup_epochs
        self.warmup = cfg.warmup
        self.schedule = cfg.schedule
        self.milestones = tuple(cfg.milestones)
        self.gamma = cfg.gamma
        self.epochs = cfg.epochs
        self.steps_per_epoch = int(steps_per_epoch)

    def lr_at(self, epoch: int, step: int = 0) -> float:
        """Learning rate for iteration ``step`` (0-based, within the epoch) of 0-based ``epoch``."""
        if epoch < self.warmup_epochs:
            if self.warmup == "epoch":
                return self.base_lr * (epoch + 1) / self.warmup_epochs
            done = epoch * self.steps_per_epoch + step + 1
            return self.base_lr * done / (self.warmup_epochs * self.steps_per_epoch)
        if self.schedule == "step":
            return self.base_lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.schedule == "cosine":
            t = (epoch - self.warmup_epochs + step / self.steps_per_epoch) / (self.epochs - self.warmup_epochs)
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        return self.base_lr

    def state_dict(self) -> Dict[str, int]:
        return {"steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Refuse to resume with a different epoch length: the schedule (and data order) would shift."""
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise UserError(
                f"the checkpoint was trained with {state['steps_per_epoch']} batches per epoch, this run has "
                f"{self.steps_per_epoch}; resume with the same data and batch_size", "batch_size")
