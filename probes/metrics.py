"""Label-agreement metrics computed from contingency tables, vectorised over bootstrap replicates.

scikit-learn's metric functions cost about a millisecond each in argument checks; a 200-replicate
bootstrap of three metrics per layer would spend seconds there. These compute the same numbers (tests
compare them with ``f1_score``, ``balanced_accuracy_score``, ``adjusted_rand_score`` and
``normalized_mutual_info_score``) from one ``bincount`` per batch of replicates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

LABEL_METRICS = ("macro_f1", "balanced_accuracy", "accuracy")  # :func:`label_metrics`, in its order
PARTITION_METRICS = ("ari", "nmi")  # :func:`partition_metrics`, in its order


def encode(*arrays: np.ndarray) -> list[np.ndarray]:
    """Each array as int64 codes ``0..K-1`` (its own sorted unique values)."""
    return [np.unique(np.asarray(a), return_inverse=True)[1].astype(np.int64).ravel() for a in arrays]


def contingency(a: np.ndarray, b: np.ndarray, idx: np.ndarray | None = None, *, square: bool = False) -> np.ndarray:
    """Counts ``[B, Ka, Kb]`` of code pairs; ``idx [B, n]`` selects each replicate's cells (default: all).

    ``square`` makes ``Ka == Kb`` (codes from one shared label set, as for true vs predicted labels).
    """
    ka, kb = int(a.max(initial=-1)) + 1, int(b.max(initial=-1)) + 1
    if square:
        ka = kb = max(ka, kb)
    if idx is None:
        idx = np.arange(len(a))[None, :]
    B = idx.shape[0]
    codes = a[idx] * kb + b[idx] + (np.arange(B, dtype=np.int64) * ka * kb)[:, None]
    return np.bincount(codes.ravel(), minlength=B * ka * kb).reshape(B, ka, kb).astype(np.float64)


def macro_f1_from(table: np.ndarray) -> np.ndarray:
    """Macro-F1 per table ``[B, K, K]`` (rows true, columns predicted) over classes present in truth."""
    tp = np.diagonal(table, axis1=1, axis2=2)
    true_n, pred_n = table.sum(axis=2), table.sum(axis=1)
    present = true_n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(true_n + pred_n > 0, 2 * tp / (true_n + pred_n), 0.0)
    return (f1 * present).sum(axis=1) / present.sum(axis=1)


def balanced_accuracy_from(table: np.ndarray) -> np.ndarray:
    """Mean recall per table over classes present in truth."""
    tp = np.diagonal(table, axis1=1, axis2=2)
    true_n = table.sum(axis=2)
    present = true_n > 0
    recall = np.divide(tp, true_n, out=np.zeros_like(tp), where=present)
    return recall.sum(axis=1) / present.sum(axis=1)


def accuracy_from(table: np.ndarray) -> np.ndarray:
    return np.diagonal(table, axis1=1, axis2=2).sum(axis=1) / table.sum(axis=(1, 2))


def ari_from(table: np.ndarray) -> np.ndarray:
    """Adjusted Rand index per contingency table (1.0 when both partitions are trivial and equal)."""
    n = table.sum(axis=(1, 2))
    comb = lambda x: x * (x - 1) / 2.0  # noqa: E731
    sum_ij = comb(table).sum(axis=(1, 2))
    sum_a = comb(table.sum(axis=2)).sum(axis=1)
    sum_b = comb(table.sum(axis=1)).sum(axis=1)
    expected = sum_a * sum_b / np.maximum(comb(n), 1e-300)
    top = (sum_a + sum_b) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (sum_ij - expected) / (top - expected)
    return np.where(top == expected, 1.0, out)


def _entropy(counts: np.ndarray, n: np.ndarray) -> np.ndarray:
    p = counts / n[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)


def nmi_from(table: np.ndarray) -> np.ndarray:
    """Normalised mutual information (arithmetic mean normalisation) per contingency table."""
    n = table.sum(axis=(1, 2))
    ra, rb = table.sum(axis=2), table.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = table * n[:, None, None] / (ra[:, :, None] * rb[:, None, :])
        mi = np.where(table > 0, table / n[:, None, None] * np.log(ratio), 0.0).sum(axis=(1, 2))
    ha, hb = _entropy(ra, n), _entropy(rb, n)
    denom = (ha + hb) / 2.0
    out = np.divide(np.maximum(mi, 0.0), denom, out=np.ones_like(mi), where=denom > 0)
    return np.minimum(out, 1.0)


def _batched(
    fn: Callable[[np.ndarray], np.ndarray],
    a: np.ndarray,
    b: np.ndarray,
    idx: np.ndarray | None,
    *,
    square: bool = False,
    batch: int = 64,
) -> np.ndarray:
    if idx is None:
        return fn(contingency(a, b, square=square))
    parts = [fn(contingency(a, b, idx[s : s + batch], square=square)) for s in range(0, len(idx), batch)]
    return np.concatenate(parts)


def label_metrics(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Macro-F1, balanced accuracy and accuracy of predictions (per bootstrap row of ``idx``, or once)."""
    labels = np.concatenate([np.asarray(y_true), np.asarray(y_pred)])
    codes = np.unique(labels, return_inverse=True)[1].astype(np.int64).ravel()
    a, b = codes[: len(y_true)], codes[len(y_true) :]
    fns = (macro_f1_from, balanced_accuracy_from, accuracy_from)
    return {name: _batched(fn, a, b, idx, square=True) for name, fn in zip(LABEL_METRICS, fns, strict=True)}


def partition_metrics(labels: np.ndarray, clusters: np.ndarray, idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """ARI and NMI of a clustering against labels (per bootstrap row of ``idx``, or once)."""
    a, b = encode(labels, clusters)
    fns = (ari_from, nmi_from)
    return {name: _batched(fn, a, b, idx) for name, fn in zip(PARTITION_METRICS, fns, strict=True)}
