"""Crowding of class centres on the sphere (the tSP paper's Figs. 1 and 6).

For class centres u_1..u_K (unit vectors), the crowding of class k is the mean angle to the others::

    a_k = 1/(K-1) * sum_{j != k} arccos(u_k . u_j)

A tail class squeezed between head classes has a small a_k. Reference: Yang et al., "T-distributed
Spherical Feature Representation for Imbalanced Classification", AAAI 2023, Figs. 1 and 6.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def mean_angle_to_other_centres(centres: torch.Tensor | np.ndarray) -> np.ndarray:
    """Mean angle in degrees from each centre to every other centre; centres need not be normalised."""
    u = torch.as_tensor(centres, dtype=torch.float64)
    if u.ndim != 2 or u.shape[0] < 2:
        raise ValueError(f"centres must be a (K >= 2, d) matrix, got shape {tuple(u.shape)}")
    u = torch.nn.functional.normalize(u, dim=1)
    angles = torch.rad2deg(torch.arccos((u @ u.T).clamp(-1.0, 1.0)))
    k = u.shape[0]
    return (angles.sum(dim=1) / (k - 1)).numpy()  # the diagonal contributes arccos(1) = 0


def plot_crowding(
    mean_angles: Sequence[float], class_counts: Sequence[int], class_names: Sequence[str], path: Path, title: str
) -> None:
    """Scatter of each class's mean angle to the other centres against its training-set size (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pancls.io import atomic_save

    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    ax.scatter(class_counts, mean_angles, color="tab:blue")
    for n, a, name in zip(class_counts, mean_angles, class_names, strict=True):
        ax.annotate(name, (n, a), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("mean angle to the other class centres (deg)")
    ax.axhline(90.0, color="grey", lw=0.8, ls="--")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
