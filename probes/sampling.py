"""Which cells a probe uses: stratified subsamples with caps, always as sorted unique row indices."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def stratified_cap(
    labels: np.ndarray | pd.Series,
    *,
    max_per_class: int | None,
    max_total: int | None,
    seed: int | np.random.SeedSequence,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Positions (sorted) of a stratified random subsample of ``labels``, and what the caps did.

    Each class keeps at most ``max_per_class`` cells; if more than ``max_total`` remain, every class is
    scaled down proportionally (each keeps at least one cell). ``None`` means no cap. The report holds
    ``n_available``, ``n_used`` and the caps, and goes into the results.
    """
    labels = np.asarray(pd.Series(labels).astype(str))
    n = len(labels)
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(classes))]
    quota = np.array([len(m) for m in members], dtype=np.int64)
    if max_per_class is not None:
        quota = np.minimum(quota, max_per_class)
    if max_total is not None and quota.sum() > max_total:
        scaled = np.floor(quota * (max_total / quota.sum())).astype(np.int64)
        quota = np.maximum(scaled, np.minimum(quota, 1))
    keep = [m if q >= len(m) else rng.choice(m, size=q, replace=False) for m, q in zip(members, quota, strict=True)]
    idx = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
    report = {
        "n_available": int(n),
        "n_used": len(idx),
        "max_per_class": max_per_class,
        "max_total": max_total,
        "subsampled": bool(len(idx) < n),
    }
    return idx.astype(np.int64), report


def random_cap(n: int, max_total: int | None, seed: int | np.random.SeedSequence) -> np.ndarray:
    """Sorted positions of at most ``max_total`` of ``n`` items, uniformly at random."""
    if max_total is None or n <= max_total:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_total, replace=False)).astype(np.int64)
