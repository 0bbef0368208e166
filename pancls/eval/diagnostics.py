"""Why a head does or does not help the tail: confidence, loss share and who pushes which centre.

The tSP paper argues (its Fig. 2) that with a heavy-tailed kernel "a head-class sample barely pushes
tail centres". This module measures that on a trained model instead of assuming it. On the
un-augmented training set it reports, per group of the sample's class (the classes sorted by training
count and cut into thirds: ``head``, ``middle``, ``tail``; shot groups would leave CIFAR-10-LT with no
few-shot class):

* ``mean_p_true``: mean softmax probability of the true class (how confident the head can get);
* ``loss_share``: the group's share of the summed cross-entropy (who still drives training);
* ``push_on_tail_centres``: ``|| d/dC_tail sum_{i in group} CE_i ||``, the norm of the gradient that the
  group's samples put on the class-centre parameters of the tail classes (rows of the linear or
  cosine weight, or the tSP centres ``mu``), i.e. how hard those samples move the tail centres;

and, over all samples, the mean logit range ``max_k z_k - min_k z_k``, bounded by ``2 s (1 - 1/(1+2 kappa))``
for the tSP kernel form, and for a tSP head the mean cosine of each embedding to its own class centre.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def class_terciles(train_counts) -> Dict[str, np.ndarray]:
    """Class indices of the most frequent, middle and least frequent thirds (ties by class index)."""
    order = np.argsort(-np.asarray(train_counts), kind="stable")
    head, middle, tail = np.array_split(order, 3)
    return {"head": np.sort(head), "middle": np.sort(middle), "tail": np.sort(tail)}


def centre_parameter(head: nn.Module) -> nn.Parameter:
    """The parameter whose rows are the class centres: tSP ``mu``, else the (cosine) linear ``weight``."""
    param = getattr(head, "mu", None)
    return param if isinstance(param, nn.Parameter) else head.weight


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def head_diagnostics(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, train_counts) -> Dict[str, object]:
    """Measure confidence, loss share and centre push per shot group (see the module docstring)."""
    labels = torch.as_tensor(labels, device=features.device)
    groups = {name: torch.as_tensor(idx, device=features.device) for name, idx in class_terciles(train_counts).items()}
    centres = centre_parameter(head)
    logits = head(features)
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_true = logits.softmax(1).gather(1, labels[:, None])[:, 0]
    report: Dict[str, object] = {
        "mean_logit_range": float((logits.max(1).values - logits.min(1).values).mean().detach()),
        "train_ce": float(ce.mean().detach()),
    }
    if hasattr(head, "cosines"):  # tSP: how close the embeddings sit to their own centres
        own = head.cosines(features).gather(1, labels[:, None])[:, 0]
        report["mean_cos_to_own_centre"] = float(own.mean().detach())
    tail = groups["tail"]
    for name, classes in groups.items():
        member = torch.isin(labels, classes)
        if not member.any():
            report[name] = None
            continue
        (grad,) = torch.autograd.grad(ce[member].sum(), centres, retain_graph=True)
        report[name] = {"mean_p_true": float(p_true[member].mean().detach()),
                        "loss_share": float((ce[member].sum() / ce.sum()).detach()),
                        "push_on_tail_centres": float(grad[tail].norm())}
    return report


def group_prediction_share(logits: np.ndarray, train_counts) -> Dict[str, float]:
    """Fraction of predictions that fall in each class tercile (on a balanced test set: about 1/3 each)."""
    pred = np.asarray(logits).argmax(1)
    return {name: float(np.isin(pred, idx).mean()) for name, idx in class_terciles(train_counts).items()}
