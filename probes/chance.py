"""Chance levels: what each metric reaches without any information in the features, defined in one place.

Label metrics depend on the context's class frequencies ``p_k`` (``K`` classes, the plan's cells):

- ``macro_f1``: ``1/K``, the expected macro-F1 of guessing each class with its frequency (class ``k``'s
  precision and recall are both ``p_k``, so its F1 is ``p_k``; the mean over classes is ``1/K``; always
  predicting the majority class scores less);
- ``balanced_accuracy``: ``1/K`` (the mean recall of any label-blind guess);
- ``accuracy``: ``max_k p_k`` (always the majority class; guessing by frequency gets ``sum p_k^2``, less).

The ``knn_`` (kNN transfer), ``leiden_`` and ``kmeans_`` prefixes keep the metric's chance level. The rest
do not depend on the classes: ARI, NMI, silhouette, Spearman correlations (pseudotime, ridge), R² (the
mean predictor) and semantic similarity are 0, AUROC is 0.5, ``time_smoothness`` (neighbour time gap over
the mean gap of all pairs) is 1, the fraction of significant E-tests is 0 (BH keeps false discoveries
rare). Metrics whose chance value depends on sample sizes (``energy_distance_ratio``,
``auroc_frac_above_0_6``) have none (NaN).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

PREFIXES = ("knn_", "leiden_", "kmeans_")

CONSTANT: dict[str, float] = {
    "ari": 0.0,
    "nmi": 0.0,
    "silhouette": 0.0,
    "dpt_spearman_time": 0.0,
    "dpt_spearman_reference": 0.0,
    "ridge_spearman": 0.0,
    "ridge_r2": 0.0,
    "time_smoothness": 1.0,
    "semantic_similarity": 0.0,
    "semantic_similarity_delta": 0.0,
    "auroc_median": 0.5,
    "energy_fraction_significant": 0.0,
}

RULES: dict[str, str] = {
    "macro_f1": "1/K (guessing by class frequency)",
    "balanced_accuracy": "1/K",
    "accuracy": "largest class share (majority guess)",
    "time_smoothness": "1 (neighbours no closer in time than random pairs)",
    "auroc_median": "0.5",
}


def base_metric(metric: str) -> str:
    """``metric`` without a ``knn_``/``leiden_``/``kmeans_`` prefix."""
    for p in PREFIXES:
        if metric.startswith(p):
            return metric[len(p) :]
    return metric


def chance_level(metric: str, class_counts: Mapping[str, int] | Sequence[int] | np.ndarray | None = None) -> float:
    """The chance level of ``metric`` (NaN when it has none, or needs class counts that are not given)."""
    name = base_metric(metric)
    if name in ("macro_f1", "balanced_accuracy", "accuracy"):
        if isinstance(class_counts, Mapping):
            class_counts = list(class_counts.values())
        counts = np.asarray([] if class_counts is None else class_counts, dtype=np.float64)
        counts = counts[counts > 0]
        if counts.size == 0:
            return float("nan")
        if name == "accuracy":
            return float(counts.max() / counts.sum())
        return 1.0 / counts.size
    return CONSTANT.get(name, CONSTANT.get(metric, float("nan")))


def chance_rule(metric: str) -> str:
    """How :func:`chance_level` defines ``metric``'s chance level, in words (for the report)."""
    name = base_metric(metric)
    if name in RULES:
        return RULES[name]
    value = CONSTANT.get(name)
    return "none (depends on sample sizes)" if value is None else f"{value:g}"


def class_counts_of(task: object, obs: object) -> dict[str, int] | None:
    """Class counts of a label task's plan (``obs[task.label_key]``), None for tasks without labels."""
    key = getattr(task, "label_key", None)
    if key is None or key not in getattr(obs, "columns", ()):
        return None
    counts = obs[key].astype(str).value_counts()  # type: ignore[index]
    return {str(k): int(v) for k, v in counts.items()}


def add_chance(table: pd.DataFrame, class_counts: Mapping[tuple[str, str], Mapping[str, int] | None]) -> pd.DataFrame:
    """Column ``chance``: each row's chance level, with the class counts of its (task, context)."""
    if table.empty:
        return table
    levels: dict[tuple[str, str, str], float] = {}
    for key in table[["task", "context", "metric"]].drop_duplicates().itertuples(index=False):
        task, context, metric = (str(x) for x in key)
        levels[(task, context, metric)] = chance_level(metric, class_counts.get((task, context)))
    keys = zip(table["task"].astype(str), table["context"].astype(str), table["metric"].astype(str), strict=True)
    table["chance"] = [levels[k] for k in keys]
    return table
