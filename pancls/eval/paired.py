"""Paired comparison of two recipes over seeds (issue 16: "does tSP beat softmax?").

Runs of two recipes with the same seed share the data order and the backbone's initialisation, so the per-seed
difference ``d_i = a_i - b_i`` removes what the seed does to both. Over ``n`` seeds::

    mean difference     d_bar = 1/n sum_i d_i
    sd                  s = sqrt( 1/(n-1) sum_i (d_i - d_bar)^2 )
    95 % interval       d_bar -/+ t_{0.975, n-1} s / sqrt(n)          (Student's paired t interval)
    sign test           p = min(1, 2 P[X <= min(n_+, n_-)]),  X ~ Binomial(n_+ + n_-, 1/2)   (ties dropped)

The t interval assumes roughly normal differences; with 3 seeds it is wide (t = 4.30), which is the honest
width. The sign test assumes nothing but needs at least 6 untied seeds before it can reach p < 0.05: with 3 it
says only how many seeds agree. Reference: Dror et al., "Deep Dominance -- How to Properly Compare Deep Neural
Models", ACL 2019 (why seeds, not runs, are the unit); Student, "The probable error of a mean", 1908.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def sign_test(differences: Sequence[float]) -> Optional[float]:
    """Exact two-sided sign test of "median difference 0"; ``None`` when every difference is 0."""
    from scipy.stats import binomtest

    d = np.asarray(differences, dtype=float)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    if pos + neg == 0:
        return None
    return float(binomtest(pos, pos + neg, 0.5).pvalue)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Dict[str, object]:
    """``a - b`` seed by seed (``a[i]`` and ``b[i]`` ran with the same seed): mean, sd, t interval, sign test.

    Returns ``{"n", "differences", "mean", "sd", "lo", "hi", "sign_test_p", "wins"}`` where ``wins`` is how many
    seeds have ``a > b``; ``sd``/``lo``/``hi`` are ``None`` for a single seed (no interval from one pair).
    """
    from scipy.stats import t

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"a and b must be two equally long, non-empty lists of per-seed values; got {a.shape} "
                         f"and {b.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = a - b
    n = d.size
    out: Dict[str, object] = {"n": n, "differences": d.tolist(), "mean": float(d.mean()), "sd": None, "lo": None,
                              "hi": None, "sign_test_p": sign_test(d), "wins": int((d > 0).sum())}
    if n >= 2:
        sd = float(d.std(ddof=1))
        half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / np.sqrt(n)
        out.update(sd=sd, lo=float(d.mean() - half), hi=float(d.mean() + half))
    return out
