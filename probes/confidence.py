"""Confidence for layer-wise metrics: bootstrap replicates, percentile and paired CIs, permutation nulls.

Replicates of one context share their resample indices across layers (they are drawn from a seed that
depends on the task and the context only), so ``best - other`` can be bootstrapped pairwise: that is
what makes "layer 15 beats the final layer" a statement with a confidence interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import false_discovery_control

CI_LEVEL = 0.95


def bootstrap_indices(n: int, n_boot: int, seed: int | np.random.SeedSequence) -> np.ndarray:
    """``[n_boot, n]`` resample indices (with replacement) from ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n), dtype=np.int64) if n else np.zeros((n_boot, 0), np.int64)


def bootstrap(statistic: Callable[..., float], arrays: Sequence[np.ndarray], indices: np.ndarray) -> np.ndarray:
    """``statistic(*(a[idx] for a in arrays))`` for every row ``idx`` of ``indices``."""
    return np.array([statistic(*(a[idx] for a in arrays)) for idx in indices], dtype=np.float64)


def percentile_ci(
    replicates: np.ndarray, level: float = CI_LEVEL, *, center: float | None = None
) -> tuple[float, float]:
    """Percentile interval of the finite replicates (NaN, NaN when there are none).

    With ``center`` (the statistic on the full sample) the replicates are first shifted by the bootstrap
    bias ``mean(replicates) - center``: resampling with replacement duplicates cells, which inflates
    agreement scores such as NMI, and the plain percentile interval can then miss the estimate itself.
    """
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if center is not None and r.size and np.isfinite(center):
        r = r - (r.mean() - center)
    if r.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(r, [a, 1.0 - a])
    return float(lo), float(hi)


def relative_gain(best: np.ndarray | float, final: np.ndarray | float) -> np.ndarray | float:
    """``(best - final) / |final|`` (NaN where ``final`` is 0)."""
    best = np.asarray(best, dtype=np.float64)
    final = np.asarray(final, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (best - final) / np.abs(final)
    out = np.where(final == 0, np.nan, out)
    return float(out) if out.ndim == 0 else out


def tied_with_best(
    replicates: np.ndarray, best: int, *, higher_is_better: bool = True, level: float = CI_LEVEL
) -> np.ndarray:
    """Indices of rows of ``replicates [n_layers, B]`` not distinguishable from row ``best``.

    A layer is tied when the paired bootstrap interval of ``best - layer`` (sign-adjusted) reaches 0.
    The best layer is always in the set.
    """
    reps = np.asarray(replicates, dtype=np.float64)
    diff = reps[best][None, :] - reps
    if not higher_is_better:
        diff = -diff
    tied = []
    for i, d in enumerate(diff):
        lo, _ = percentile_ci(d, level)
        if i == best or not np.isfinite(lo) or lo <= 0.0:
            tied.append(i)
    return np.asarray(tied, dtype=np.int64)


def best_index_distribution(replicates: np.ndarray, *, higher_is_better: bool = True) -> np.ndarray:
    """For every bootstrap replicate, the row (layer) that wins it; ``[B]`` (NaN columns skipped)."""
    reps = np.asarray(replicates, dtype=np.float64)
    ok = np.isfinite(reps).all(axis=0)
    reps = reps[:, ok]
    if reps.size == 0:
        return np.zeros(0, np.int64)
    return (np.argmax(reps, axis=0) if higher_is_better else np.argmin(reps, axis=0)).astype(np.int64)


def permutation_test(observed: float, null: np.ndarray, *, higher_is_better: bool = True) -> dict[str, float]:
    """One-sided permutation p-value ``(1 + #{null >= obs}) / (1 + n)`` and the z-score against the null."""
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    if null.size == 0 or not np.isfinite(observed):
        return {"p_perm": float("nan"), "z_perm": float("nan"), "null_mean": float("nan")}
    extreme = null >= observed if higher_is_better else null <= observed
    sd = null.std(ddof=1) if null.size > 1 else 0.0
    z = (observed - null.mean()) / sd if sd > 0 else float("nan")
    return {
        "p_perm": float((1 + extreme.sum()) / (1 + null.size)),
        "z_perm": float(z),
        "null_mean": float(null.mean()),
    }


def fdr_bh(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy's ``false_discovery_control``)."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return p
    return false_discovery_control(p, method="bh")
