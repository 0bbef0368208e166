"""Long-tail losses: ``create_loss(name, class_counts, **options)``.

Every loss is a :class:`LongTailLoss`: ``forward(logits, target)`` returns the weighted batch mean of the
per-sample losses ``l_i`` under the current per-class weights ``w`` (all ones unless the loss re-weights),
and ``set_epoch(epoch)`` (0-based) lets deferred re-weighting switch weights. Two normalisations, each its
reference's:

* ``cb`` (Cui et al. 2019): ``sum_i w_{y_i} l_i / N``; the weights sum to K and set the loss scale;
* deferred re-weighting (DRW, Cao et al. 2019): ``sum_i w_{y_i} l_i / sum_i w_{y_i}``, what the LDAM-DRW code's
  ``F.cross_entropy(..., weight=w)`` computes. Divided by N instead, the re-weighted CIFAR-10-LT (IR 100)
  loss and its gradient are about 0.18 times the reference's (the mean of ``w_y`` over the training set).

================  ==================================================================================
name              loss
================  ==================================================================================
ce                cross-entropy, optional label smoothing
focal             focal loss (Lin et al. 2017)
cb                class-balanced loss (Cui et al. 2019), over ce or focal
ldam              label-distribution-aware margin loss (Cao et al. 2019)
logit_adjust      logit-adjusted loss (Menon et al. 2021)
balanced_softmax  balanced softmax (Ren et al. 2020), the same loss as logit_adjust with tau = 1
================  ==================================================================================

Deferred re-weighting (DRW, Cao et al. 2019) is an option of every loss except ``cb``:
``drw_epoch=E`` keeps uniform weights for epochs ``0 .. E-1`` and uses the class-balanced
effective-number weights (``drw_beta``) from epoch ``E`` on. LDAM-DRW is
``create_loss("ldam", counts, drw_epoch=160)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pancls.registry import Registry
from pancls.validation import InvalidParameter, check_choice, check_class_counts, check_scalar

LOSSES = Registry("loss")


def _check_counts(class_counts: Sequence[int]) -> list[int]:
    return check_class_counts(class_counts, "class_counts")


def _check_beta(beta, name: str) -> float:
    return float(check_scalar(beta, name, float, min_val=0.0, max_val=1.0, include_boundaries="left"))


def _check_positive(value, name: str) -> float:
    return float(check_scalar(value, name, float, min_val=0.0, include_boundaries="neither"))


def _check_nonnegative(value, name: str) -> float:
    return float(check_scalar(value, name, float, min_val=0.0))


def effective_number_weights(class_counts: Sequence[int], beta: float) -> torch.Tensor:
    """Class-balanced weights ``w_j ∝ (1 - beta) / (1 - beta^{n_j})``, normalised to sum to K.

    ``(1 - beta^n) / (1 - beta)`` is the effective number of samples of a class with ``n`` samples:
    ``beta = 0`` gives uniform weights, ``beta -> 1`` inverse class frequency.
    Reference: Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019.
    """
    counts = torch.tensor(_check_counts(class_counts), dtype=torch.float64)
    beta = _check_beta(beta, "beta")
    # -expm1(n log beta) = 1 - beta^n without cancellation for beta close to 1
    raw = (1.0 - beta) / -torch.expm1(counts * math.log(beta)) if beta > 0 else torch.ones_like(counts)
    return (raw * len(counts) / raw.sum()).float()


class LongTailLoss(nn.Module):
    """Base class: per-sample loss, per-class weights, optional deferred re-weighting (DRW).

    ``loss = sum_i w_{y_i} l_i / N`` with ``l = per_sample(logits, target)``. Without DRW, ``w`` is
    ``static_weight`` (uniform unless a loss passes its own). With ``drw_epoch = E``, ``w`` is uniform before
    epoch E and ``effective_number_weights(class_counts, drw_beta)`` from epoch E on, and the loss is then the
    weighted mean ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (Cao et al., "Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss", NeurIPS 2019, sec. 3.3, and their code's weighted cross-entropy).

    Parameters
    ----------
    class_counts : sequence of int
        Training samples per class, all > 0; its length is K.
    drw_epoch : int or None
        First (0-based) epoch of re-weighting; None disables DRW.
    drw_beta : float
        ``beta`` of the effective number used by DRW.
    static_weight : tensor (K,) or None
        The weights of a loss that re-weights without DRW (``cb``); None for uniform.
    """

    def __init__(self, class_counts: Sequence[int], *, drw_epoch: int | None = None, drw_beta: float = 0.9999,
                 static_weight: torch.Tensor | None = None):
        super().__init__()
        counts = _check_counts(class_counts)
        self.num_classes = len(counts)
        if drw_epoch is not None:
            check_scalar(drw_epoch, "drw_epoch", int, min_val=0)
        self.drw_epoch = drw_epoch
        self.drw_beta = _check_beta(drw_beta, "drw_beta")
        # Derived from the counts, never learned: kept out of the state dict so that a checkpoint
        # does not pin them (set_epoch recomputes the weights on resume).
        self.register_buffer("class_counts", torch.tensor(counts, dtype=torch.float32), persistent=False)
        self.register_buffer("static_weight", torch.ones(self.num_classes) if static_weight is None
                             else static_weight.float(), persistent=False)
        self.register_buffer("class_weight", torch.ones(self.num_classes), persistent=False)
        self.weighted_mean = False  # DRW's re-weighted epochs: divide by the batch's sum of weights
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Select the class weights for 0-based ``epoch``; call before each epoch, and on resume."""
        if self.drw_epoch is None:
            weight = self.static_weight
        elif epoch >= self.drw_epoch:
            weight = effective_number_weights(self.class_counts.long().tolist(), self.drw_beta)
        else:
            weight = torch.ones(self.num_classes)
        self.class_weight.copy_(weight)
        self.weighted_mean = self.drw_epoch is not None and epoch >= self.drw_epoch

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unweighted loss of each sample, ``(N,)``."""
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits of shape (N, {self.num_classes}), got {tuple(logits.shape)}")
        w = self.class_weight[target]
        total = (w * self.per_sample(logits, target)).sum()
        if not self.weighted_mean:
            return total / len(target)
        return total / (len(target) * _mean_weight(w.detach()))


    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, drw_epoch={self.drw_epoch}, drw_beta={self.drw_beta:g}"


def _mean_weight(w: torch.Tensor) -> torch.Tensor:
    """The mean of the samples' weights ``w`` over the global batch: over every DDP rank's slice.

    A weighted mean is ``sum_i w_i l_i / sum_i w_i`` over the global batch. Each rank returns its partial sum
    divided by ``n_rank * mean_global(w)``, the per-rank-mean convention of the engine (which scales a rank's loss
    by its share of the global batch before DDP averages the gradients), so that the DDP gradient is exactly the
    one-process one; in one process this is ``sum_i w_i``. Dividing by the rank's own ``sum w`` weighted each
    rank's slice by its own class mix. Only while gradients are computed: evaluation shards differ in length
    between ranks and must not communicate."""
    import torch.distributed as dist

    if not (torch.is_grad_enabled() and dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return w.mean()
    both = torch.stack([w.sum(), torch.tensor(float(len(w)), device=w.device, dtype=w.dtype)])
    dist.all_reduce(both)
    return both[0] / both[1]


def _focal(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    # 1 - p via expm1 keeps precision for confident samples; the floor keeps the gradient of
    # (1 - p)^gamma finite at p = 1 when gamma < 1.
    one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
    return -(one_minus_p ** gamma) * log_p


@LOSSES.register("ce")
class CrossEntropyLoss(LongTailLoss):
    """Cross-entropy ``l = -sum_k q_k log softmax(z)_k`` with ``q`` the one-hot target, smoothed to
    ``(1 - eps) onehot + eps / K`` when ``label_smoothing = eps > 0`` (Szegedy et al., CVPR 2016).
    """

    def __init__(self, class_counts: Sequence[int], label_smoothing: float = 0.0, drw_epoch: int | None = None,
                 drw_beta: float = 0.9999):
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=drw_beta)
        self.label_smoothing = _check_beta(label_smoothing, "label_smoothing")

    def per_sample(self, logits, target):
        return F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)


@LOSSES.register("focal")
class FocalLoss(LongTailLoss):
    """Focal loss ``l = -(1 - p_y)^gamma log p_y``, ``p = softmax(z)``; ``gamma = 0`` is cross-entropy.

    Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
    """

    def __init__(self, class_counts: Sequence[int], gamma: float = 2.0, drw_epoch: int | None = None,
                 drw_beta: float = 0.9999):
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=drw_beta)
        self.gamma = _check_nonnegative(gamma, "gamma")

    def per_sample(self, logits, target):
        return _focal(logits, target, self.gamma)


@LOSSES.register("cb")
class ClassBalancedLoss(LongTailLoss):
    """Class-balanced loss ``l = w_y * l_base``, ``w`` from :func:`effective_number_weights`.

    Reference: Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019.

    Parameters
    ----------
    beta : float
        In [0, 1); 0.9999 by default.
    base : {"ce", "focal"}
    gamma : float, default 2 (``base="focal"`` only)
    """

    def __init__(self, class_counts: Sequence[int], beta: float = 0.9999, base: str = "ce",
                 gamma: float | None = None, drw_epoch: int | None = None,
                 drw_beta: float = 0.9999):
        if drw_epoch is not None:
            raise InvalidParameter("'cb' weights classes from epoch 0 already; for deferred class-balanced "
                            "weights use loss 'ce' or 'focal' with drw_epoch", "drw_epoch")
        check_choice(base, "base", ("ce", "focal"))
        if base == "ce" and gamma is not None:
            raise InvalidParameter("is an option of base 'focal', not of base 'ce'", "gamma")
        beta = _check_beta(beta, "beta")
        super().__init__(class_counts, drw_beta=drw_beta, static_weight=effective_number_weights(class_counts, beta))
        self.beta = beta
        self.base = base
        self.gamma = _check_nonnegative(2.0 if gamma is None else gamma, "gamma") if base == "focal" else 0.0

    def per_sample(self, logits, target):
        if self.base == "focal":
            return _focal(logits, target, self.gamma)
        return F.cross_entropy(logits, target, reduction="none")


@LOSSES.register("ldam")
class LDAMLoss(LongTailLoss):
    """Label-distribution-aware margin loss ``l = CE(s * (z - Delta_y e_y), y)``.

    ``Delta_j = C / n_j^{1/4}`` with ``C`` set so that the largest margin (the rarest class's) is
    ``max_m``. Reference: Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware
    Margin Loss", NeurIPS 2019.

    The margin is subtracted from the logit before scaling, so it is in the units of ``z``. With the
    default ``s = 30`` the logits are meant to be cosines in [-1, 1] (a cosine head with scale 1), and
    ``max_m = 0.5`` is half a unit of cosine. Heads that scale their own logits (:class:`CosineHead`
    with its ``scale``, :class:`TSPHead`) should use ``s = 1``; the margin is then in logit units: for a
    cosine head of scale ``S`` it is a cosine margin of ``Delta / S``, and for a tSP head it must be
    read against that head's logit range (``[2s/(1+2 kappa), 2s]`` for the kernel form, about 3.3 wide
    at its defaults, so 0.5 is a large margin there).

    Parameters
    ----------
    max_m : float
        Margin of the rarest class, > 0.
    s : float
        Logit scale, > 0.
    """

    def __init__(self, class_counts: Sequence[int], max_m: float = 0.5, s: float = 30.0, drw_epoch: int | None = None,
                 drw_beta: float = 0.9999):
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=drw_beta)
        for name, value in (("max_m", max_m), ("s", s)):
            _check_positive(value, name)
        self.max_m = float(max_m)
        self.s = float(s)
        quarter = self.class_counts.double() ** -0.25
        self.register_buffer("margins", (quarter * (self.max_m / quarter.max())).float(), persistent=False)

    def per_sample(self, logits, target):
        shifted = logits - F.one_hot(target, self.num_classes).to(logits.dtype) * self.margins[target, None]
        return F.cross_entropy(self.s * shifted, target, reduction="none")


@LOSSES.register("logit_adjust")
class LogitAdjustedLoss(LongTailLoss):
    """Logit-adjusted loss ``l = CE(z + tau * log pi, y)``, ``pi_j = n_j / sum_k n_k`` the class prior.

    Reference: Menon et al., "Long-tail Learning via Logit Adjustment", ICLR 2021.
    """

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0, drw_epoch: int | None = None,
                 drw_beta: float = 0.9999):
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=drw_beta)
        self.tau = _check_nonnegative(tau, "tau")
        prior = self.class_counts.double() / self.class_counts.double().sum()
        self.register_buffer("adjustment", (self.tau * prior.log()).float(), persistent=False)

    def per_sample(self, logits, target):
        return F.cross_entropy(logits + self.adjustment.to(logits.dtype), target, reduction="none")


@LOSSES.register("balanced_softmax")
def balanced_softmax(class_counts: Sequence[int], drw_epoch: int | None = None,
                     drw_beta: float = 0.9999) -> LogitAdjustedLoss:
    """Balanced softmax ``l = CE(z + log n, y)`` (Ren et al., "Balanced Meta-Softmax for Long-Tailed
    Visual Recognition", NeurIPS 2020).

    ``log n_j = log pi_j + log N`` and cross-entropy ignores a shift shared by all logits, so this is
    exactly :class:`LogitAdjustedLoss` with ``tau = 1``; it is kept as a named alias.
    """
    return LogitAdjustedLoss(class_counts, tau=1.0, drw_epoch=drw_epoch, drw_beta=drw_beta)


def create_loss(name: str, class_counts: Sequence[int], num_classes: int | None = None, **kwargs) -> LongTailLoss:
    """Build the loss ``name`` for a training set with ``class_counts[j]`` samples of class j.

    ``num_classes``, when given, must equal ``len(class_counts)``; the other keyword arguments are the
    loss's options plus ``drw_epoch`` / ``drw_beta`` (see :class:`LongTailLoss`). Unknown names,
    unknown options and bad values raise :class:`~pancls.errors.UserError` (:class:`~pancls.validation.InvalidParameter`).
    """
    counts = _check_counts(class_counts)
    if num_classes is not None and len(counts) != num_classes:
        raise InvalidParameter(f"has {len(counts)} entries but the model has {num_classes} classes", "class_counts")
    return LOSSES.create(name, class_counts=counts, **kwargs)


__all__ = ["LOSSES", "ClassBalancedLoss", "CrossEntropyLoss", "FocalLoss", "LDAMLoss", "LogitAdjustedLoss",
           "LongTailLoss", "create_loss", "effective_number_weights"]
