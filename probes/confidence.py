"""Confidence for layer-wise metrics: bootstrap replicates, percentile and paired CIs, permutation nulls.

Replicates of one context share their resample indices across layers (they are drawn from a seed that
depends on the task and the context only), so ``best - other`` can be bootstrapped pairwise: that is
what makes "layer 15 beats the final layer" a statement with a confidence interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import ndtr, ndtri
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

    With ``center`` (the statistic on the full sample) it is the bias-corrected percentile interval (BC,
    Efron 1987): ``z0 = Phi^-1(share of replicates below center)`` moves the quantile levels to
    ``Phi(2 z0 -+ z)``. Resampling with replacement duplicates cells, which inflates agreement scores such
    as NMI, and the plain interval can then miss the estimate itself; BC follows that shift but, unlike
    shifting the replicates by their bias, only ever returns replicate values (or ``center``), so a
    bounded metric's interval stays inside the metric's range (a 9-cell context gave macro-F1 up to 1.029
    and balanced accuracy down to -0.011 with the shift). When every replicate lies on one side of
    ``center`` the interval is extended to reach it.
    """
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    levels = np.array([a, 1.0 - a])
    if center is not None and np.isfinite(center):
        below = (np.sum(r < center) + 0.5 * np.sum(r == center)) / r.size
        below = float(np.clip(below, 0.5 / r.size, 1.0 - 0.5 / r.size))
        z0 = ndtri(below)
        levels = ndtr(2.0 * z0 + ndtri(levels))
    lo, hi = np.quantile(r, levels)
    if center is not None and np.isfinite(center):
        lo, hi = min(lo, center), max(hi, center)
    return float(lo), float(hi)


REL_GAIN_MIN_FINAL = 0.1  # |final| below this (or best and final of opposite signs): report the absolute difference


def relative_gain(best: np.ndarray | float, final: np.ndarray | float) -> np.ndarray | float:
    """``(best - final) / |final|`` (NaN where ``final`` is 0)."""
    best = np.asarray(best, dtype=np.float64)
    final = np.asarray(final, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (best - final) / np.abs(final)
    out = np.where(final == 0, np.nan, out)
    return float(out) if out.ndim == 0 else out


def gain_basis(best: np.ndarray | float, final: np.ndarray | float) -> np.ndarray | str:
    """``"relative"`` where a relative gain over the final layer means something, else ``"absolute"``.

    Relative only when ``|final| >= REL_GAIN_MIN_FINAL`` and best and final have the same sign: a final
    value near 0 turns a small difference into "+310%", and a sign change has no relative reading.
    """
    best = np.asarray(best, dtype=np.float64)
    final = np.asarray(final, dtype=np.float64)
    ok = (np.abs(final) >= REL_GAIN_MIN_FINAL) & (best * final > 0)
    out = np.where(ok, "relative", "absolute")
    return str(out) if out.ndim == 0 else out


def reported_gain(best: np.ndarray | float, final: np.ndarray | float) -> np.ndarray | float:
    """:func:`relative_gain` where :func:`gain_basis` is ``"relative"``, NaN elsewhere (read the difference)."""
    gain = np.asarray(relative_gain(best, final), dtype=np.float64)
    out = np.where(np.asarray(gain_basis(best, final)) == "relative", gain, np.nan)
    return float(out) if out.ndim == 0 else out


def tied_with_best(
    replicates: np.ndarray, best: int, *, higher_is_better: bool = True, level: float = CI_LEVEL
) -> np.ndarray:
    """Indices of rows of ``replicates [n_layers, B]`` not distinguishable from row ``best``.

    A layer is tied when the paired bootstrap interval of ``best - layer`` (sign-adjusted) reaches 0.
    The best layer is always in the set; a layer without any finite replicate (e.g. constant features)
    never is.
    """
    reps = np.asarray(replicates, dtype=np.float64)
    diff = reps[best][None, :] - reps
    if not higher_is_better:
        diff = -diff
    tied = []
    for i, d in enumerate(diff):
        if i != best and not np.isfinite(reps[i]).any():
            continue
        lo, _ = percentile_ci(d, level)
        if i == best or not np.isfinite(lo) or lo <= 0.0:
            tied.append(i)
    return np.asarray(tied, dtype=np.int64)


def _informative(replicates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, sub)``: the rows with a finite replicate and their columns finite in all of those rows."""
    reps = np.asarray(replicates, dtype=np.float64)
    rows = np.flatnonzero(np.isfinite(reps).any(axis=1)) if reps.ndim == 2 else np.zeros(0, np.int64)
    sub = reps[rows]
    return rows, sub[:, np.isfinite(sub).all(axis=0)]


def best_index_distribution(replicates: np.ndarray, *, higher_is_better: bool = True) -> np.ndarray:
    """For every bootstrap replicate, the row (layer) that wins it; ``[B]``.

    Rows without any finite replicate (a layer that yields NaN) are not candidates; columns with a NaN
    in a remaining row are skipped.
    """
    rows, reps = _informative(replicates)
    if reps.size == 0:
        return np.zeros(0, np.int64)
    win = np.argmax(reps, axis=0) if higher_is_better else np.argmin(reps, axis=0)
    return rows[win].astype(np.int64)


def selection_adjusted(
    replicates: np.ndarray,
    final: int | None = None,
    *,
    higher_is_better: bool = True,
    level: float = CI_LEVEL,
) -> dict[str, float]:
    """Confidence for "the best of the candidate layers", with the choice of layer inside the bootstrap.

    The best layer is picked from every candidate, so its own interval is optimistic (the winner's
    curse). Here the layer is chosen again in every bootstrap replicate ``b`` and scored in the next
    replicate ``b + 1`` (another resample of the cells), like a held-out split: ``value_ci_*`` is the
    percentile interval of the chosen layer's score, ``diff_ci_*`` that of the chosen layer minus the
    final layer (row ``final``) in the scoring replicate. When the winner changes from resample to
    resample, these intervals widen and ``diff`` moves towards 0; ``n_candidates`` counts the layers
    with a finite value.
    """
    nan = float("nan")
    rows, reps = _informative(replicates)
    out = {"n_candidates": float(len(rows)), "value_ci_low": nan, "value_ci_high": nan}
    out |= {"diff_ci_low": nan, "diff_ci_high": nan}
    B = reps.shape[1] if reps.ndim == 2 else 0
    if B < 2:
        return out
    pick = np.argmax(reps, axis=0) if higher_is_better else np.argmin(reps, axis=0)
    score = np.roll(reps, -1, axis=1)  # column b holds replicate b + 1
    cols = np.arange(B)
    chosen = score[pick, cols]
    out["value_ci_low"], out["value_ci_high"] = percentile_ci(chosen, level)
    if final is not None and final in rows:
        f = int(np.flatnonzero(rows == final)[0])
        out["diff_ci_low"], out["diff_ci_high"] = percentile_ci(chosen - score[f], level)
    return out


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
