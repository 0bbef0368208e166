"""Crowding of class centres on the sphere (the tSP paper's Figs. 1 and 6).

For class centres u_1..u_K (unit vectors), two per-class measures::

    mean angle  a_k = 1/(K-1) * sum_{j != k} arccos(u_k . u_j)
    min angle   m_k = min_{j != k} arccos(u_k . u_j)      (the angle to the nearest other centre)

A tail class squeezed between head classes has a small a_k and m_k. The min angle has a known optimum: K
unit vectors in d >= K-1 dimensions maximise their smallest pairwise angle as the vertices of a regular
simplex, where every pair has u_i . u_j = -1/(K-1), i.e. arccos(-1/(K-1)) (96.4 deg for K = 10, 101.5 deg for
K = 6; Rankin, "The closest packing of spherical caps in n dimensions", 1955). No m_k can exceed it; with
d < K-1 it is an upper bound that cannot be reached. The mean angle of the simplex is the same value, but a
mean can exceed it (antipodal pairs), so it is no optimum for a_k.

The region each class's samples occupy (:func:`angular_regions`, for the paper's claim that tSP "equalises the
eigenspace"): with unit embeddings ``x_i`` (a head's :meth:`embed`), its unit centres ``c_k`` and the class's mean
direction ``m_k = sum_{y_i = k} x_i / || sum_{y_i = k} x_i ||``::

    angle to centre   t_k = mean_{y_i = k} arccos(x_i . c_k)     (how far the class sits from its own centre)
    spread            r_k = mean_{y_i = k} arccos(x_i . m_k)     (the angular radius of the class's region)
    mean separation   the min angle above, between the m_k instead of the c_k

A crowded tail class has a small spread squeezed between its neighbours, or (what Fig. 1 shows for softmax) a
region that its neighbours' regions overlap: a separation below the sum of the two spreads.

Reference: Yang et al., "T-distributed Spherical Feature Representation for Imbalanced Classification",
AAAI 2023, Figs. 1, 5 and 6.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch


def _degrees(cos: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def _pairwise_degrees(centres) -> np.ndarray:
    u = torch.as_tensor(centres, dtype=torch.float64)
    if u.ndim != 2 or u.shape[0] < 2:
        raise ValueError(f"centres must be a (K >= 2, d) matrix, got shape {tuple(u.shape)}")
    u = torch.nn.functional.normalize(u, dim=1)
    return _degrees(u @ u.T).numpy()


def mean_angle_to_other_centres(centres: torch.Tensor | np.ndarray) -> np.ndarray:
    """Mean angle in degrees from each centre to every other centre; centres need not be normalised."""
    angles = _pairwise_degrees(centres)
    return angles.sum(axis=1) / (angles.shape[0] - 1)  # the diagonal contributes arccos(1) = 0


def min_angle_to_other_centres(centres: torch.Tensor | np.ndarray) -> np.ndarray:
    """Angle in degrees from each centre to its nearest other centre; centres need not be normalised."""
    angles = _pairwise_degrees(centres)
    np.fill_diagonal(angles, np.inf)
    return angles.min(axis=1)


def angular_regions(embeddings, labels, centres) -> dict:
    """Per class: angle to its own centre, spread around its mean direction, and the min angles between centres
    and between mean directions (module docstring), all in degrees, as ``(K,)`` arrays (NaN for a class without
    samples). ``embeddings`` ``(N, d)`` and ``centres`` ``(K, d)`` need not be normalised."""
    x = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.as_tensor(centres, dtype=torch.float64), dim=1)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1] or len(y) != len(x):
        raise ValueError(f"embeddings (N, d), labels (N,) and centres (K, d) must agree; got {tuple(x.shape)}, "
                         f"{tuple(y.shape)} and {tuple(c.shape)}")
    k = c.shape[0]
    to_centre, spread = np.full(k, np.nan), np.full(k, np.nan)
    means = torch.zeros_like(c)
    for j in range(k):
        member = x[y == j]
        if len(member) == 0:
            continue
        to_centre[j] = float(_degrees(member @ c[j]).mean())
        means[j] = torch.nn.functional.normalize(member.sum(0), dim=0)
        spread[j] = float(_degrees(member @ means[j]).mean())
    present = ~np.isnan(spread)
    separation = np.full(k, np.nan)
    if present.sum() >= 2:
        separation[present] = min_angle_to_other_centres(means[torch.as_tensor(present)])
    return {"angle_to_centre_deg": to_centre, "spread_deg": spread,
            "min_angle_between_centres_deg": min_angle_to_other_centres(c),
            "min_angle_between_means_deg": separation}


def simplex_angle(k: int) -> float:
    """arccos(-1/(K-1)) in degrees: the largest possible smallest angle between K unit vectors (d >= K-1)."""
    if k < 2:
        raise ValueError(f"needs K >= 2 classes, got {k}")
    return float(np.degrees(np.arccos(-1.0 / (k - 1))))


#: What the y axis of :func:`plot_crowding` shows, by ``measure``.
_MEASURES = {"min": "smallest angle to another class centre (°)", "mean": "mean angle to the other class centres (°)"}
_GROUPS = (("head", "head (most frequent third)", "tab:blue"), ("middle", "medium (middle third)", "tab:orange"),
           ("tail", "tail (least frequent third)", "tab:red"))


def crowding_figure(angles: Sequence[float], class_counts: Sequence[int], class_names: Sequence[str], title: str,
                    measure: str = "mean", dim: Optional[int] = None):
    """The figure of :func:`plot_crowding` (returned, not saved: the tests read its axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pancls.eval.diagnostics import class_terciles

    if measure not in _MEASURES:
        raise ValueError(f"measure must be one of {sorted(_MEASURES)}, got {measure!r}")
    angles, counts = np.asarray(angles, dtype=float), np.asarray(class_counts)
    k = len(class_names)
    optimum = simplex_angle(k)
    fig, ax = plt.subplots(figsize=(6.0, 4.4), dpi=120)
    for group, label, colour in _GROUPS:
        idx = class_terciles(counts)[group]
        if len(idx):
            ax.scatter(counts[idx], angles[idx], color=colour, label=label, zorder=3)
    for n, a, name in zip(counts, angles, class_names, strict=True):
        if k <= 30:  # beyond that the names only hide the points
            ax.annotate(name, (n, a), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if measure == "min":
        line = f"optimum for K = {k}: arccos(-1/(K-1)) = {optimum:.1f}°"
        if dim is not None and dim < k - 1:
            line += f" (out of reach in d = {dim} < K-1)"
    else:
        line = f"K = {k} centres spread evenly (regular simplex): {optimum:.1f}°"
    ax.axhline(optimum, color="black", lw=1.0, ls="--", label=line, zorder=2)
    top = min(180.0, 10.0 * np.ceil((max(optimum, float(np.nanmax(angles))) + 10.0) / 10.0))
    ax.set_ylim(0.0, top)  # from 0: a 5° spread must not look dramatic
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel(f"{_MEASURES[measure]}\nhigher = less crowded")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_crowding(
    angles: Sequence[float], class_counts: Sequence[int], class_names: Sequence[str], path: Path, title: str,
    measure: str = "mean", dim: Optional[int] = None,
) -> Path:
    """Each class's angle to the other centres (``measure``: "mean" or "min", see the module docstring) against
    its training-set size (log x), coloured by frequency third, with the K-class optimum marked and the y
    axis from 0; ``dim`` (the centres' dimension) says whether that optimum can be reached. Written
    atomically as PNG."""
    import matplotlib.pyplot as plt

    from pancls.io import atomic_save

    fig = crowding_figure(angles, class_counts, class_names, title, measure, dim)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)
