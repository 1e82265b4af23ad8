"""Pearson and Spearman correlations: batched over leading axes, over bootstrap multiplicities, per row.

Spearman is the Pearson correlation of average ranks (ties share their mean rank, as scipy's
``spearmanr``; ``inf`` ranks last), NaN when either side is constant. The trajectory metrics and their
bootstrap replicates use :func:`spearman` and :func:`spearman_boot`; the perturbation permutation null
uses :func:`spearman_rows` (one reference vector against many rows).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Pearson correlation along the last axis (NaN where either side is constant)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    num = (a * b).sum(axis=-1)
    den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    out = np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)
    return float(out) if out.ndim == 0 else out


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Spearman correlation along the last axis: Pearson of average ranks (ties as scipy; ``inf`` ranks last)."""
    return pearson(rankdata(a, axis=-1), rankdata(b, axis=-1))


def spearman_rows(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of every row of ``A [B, m]`` with one vector ``b [m]`` (``b`` ranked once)."""
    ra = rankdata(A, axis=1, method="average")
    rb = rankdata(b, method="average")
    ra -= ra.mean(axis=1, keepdims=True)
    rb = rb - rb.mean()
    den = np.sqrt((ra * ra).sum(axis=1) * (rb @ rb))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra @ rb) / np.where(den > 0, den, 1.0), np.nan)


# A bootstrap replicate of a statistic of per-cell values equals a weighted statistic over the original
# cells, weighted by how often each was drawn. Computing it that way costs O(n_boot * n) instead of
# re-sorting every resample (rankdata on a [200, 50k] resample matrix takes seconds, per metric and layer).


def boot_counts(boot: np.ndarray, n: int) -> np.ndarray:
    """How often each of ``n`` cells is drawn in every replicate of ``boot [B, m]``: ``[B, n]`` float64."""
    B = boot.shape[0]
    flat = (np.asarray(boot, dtype=np.int64) + (np.arange(B, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=B * n).reshape(B, n).astype(np.float64)


def resample_ranks(a: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[B, n]``: the average rank each cell's value gets among the values drawn in each replicate."""
    order = np.argsort(a, kind="stable")
    s = a[order]
    new = np.r_[True, s[1:] != s[:-1]]  # tie groups (equal infinities tie too)
    per_group = np.add.reduceat(counts[:, order], np.flatnonzero(new), axis=1)
    ranks = np.cumsum(per_group, axis=1) - per_group + (per_group + 1.0) / 2.0
    out = np.empty_like(counts)
    out[:, order] = ranks[:, np.cumsum(new) - 1]
    return out


def weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``x``, ``y`` along the last axis with weights ``w`` ``[B, n]``."""
    m = w.sum(axis=-1, keepdims=True)
    dx = x - (w * x).sum(axis=-1, keepdims=True) / m
    dy = y - (w * y).sum(axis=-1, keepdims=True) / m
    num = (w * dx * dy).sum(axis=-1)
    den = np.sqrt((w * dx * dx).sum(axis=-1) * (w * dy * dy).sum(axis=-1))
    return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)


def spearman_boot(a: np.ndarray, b: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``spearman(a[idx], b[idx])`` for every replicate, from ``counts = boot_counts(boot, n)`` (no NaN in a, b)."""
    return weighted_pearson(resample_ranks(a, counts), resample_ranks(b, counts), counts)
