"""Shared planning for the label tasks (cell-type probe, kNN transfer, clustering): classes, caps, folds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from .base import ContextPlan, ContextPlans, SmallContextError, Task, plan_contexts, require_columns
from .confidence import bootstrap_indices
from .features import hvg_pca
from .sampling import stratified_cap


def plan_labels(
    task: str,
    obs: pd.DataFrame,
    *,
    label_key: str,
    context_key: str | None,
    group_key: str | None,
    min_cells_per_class: int,
    max_per_class: int | None,
    max_cells: int | None,
    seed: int,
    n_folds: int,
) -> ContextPlans:
    """One plan per context: cells with a label, classes with ``>= min_cells_per_class`` cells, capped.

    A context with fewer than two such classes (or, with ``group_key``, a single group) is skipped with a
    warning naming the setting to change (:func:`plan_contexts`); the others are probed.
    """
    require_columns(obs, [c for c in (label_key, context_key, group_key) if c], task)

    def plan_one(context: str, rows: np.ndarray) -> ContextPlan:
        labels = obs[label_key].iloc[rows]
        has = labels.notna().to_numpy()
        rows, labels = rows[has], labels[has].astype(str)
        counts = labels.value_counts()
        kept = counts[counts >= min_cells_per_class]
        dropped = counts[counts < min_cells_per_class]
        where = f" in context {context!r}" if context_key else ""
        if len(kept) < 2:
            reason = (
                f"column {label_key!r}{where} has {len(kept)} class(es) with at least {min_cells_per_class} "
                f"cells (class sizes: {_sizes(counts)}); a probe needs two"
            )
            # the largest threshold that keeps two classes (a class of one cell cannot be split into folds)
            value = int(counts.iloc[1]) if len(counts) >= 2 and counts.iloc[1] >= 2 else None
            raise SmallContextError(
                task,
                reason,
                setting=f"{task}.min_cells_per_class",
                value=value,
                otherwise="pick another column or drop the context",
            )
        keep = labels.isin(kept.index).to_numpy()
        rows, labels = rows[keep], labels[keep]
        pos, caps = stratified_cap(
            labels.to_numpy(), max_per_class=max_per_class, max_total=max_cells, seed=_seed(seed, task, context)
        )
        rows = rows[pos]
        sub = obs.iloc[rows]
        caps.update(
            n_classes=len(kept),
            dropped_classes={str(k): int(v) for k, v in dropped.items()},
            n_unlabelled=int((~has).sum()),
        )
        if group_key is not None:
            groups = sub[group_key].astype(str).to_numpy()
            n_groups = len(np.unique(groups))
            if n_groups < 2:
                reason = (
                    f"group column {group_key!r}{where} has {n_groups} value; grouped folds need at least two "
                    "donors/batches"
                )
                raise SmallContextError(task, reason, otherwise="drop --group-key or choose another column")
            caps["n_groups"] = n_groups
            caps["n_folds"] = int(min(n_folds, n_groups))
        else:
            smallest = int(sub[label_key].astype(str).value_counts().min())
            caps["n_folds"] = int(max(2, min(n_folds, smallest)))
        return ContextPlan(task=task, context=context, rows=rows, obs=sub, caps=caps)

    return plan_contexts(task, obs, context_key, plan_one)


def _sizes(counts: pd.Series) -> str:
    items = [f"{k}: {v}" for k, v in counts.head(8).items()]
    return ", ".join(items) + (", ..." if len(counts) > 8 else "") if items else "none"


def _seed(seed: int, task: str, context: str) -> np.random.SeedSequence:
    return ContextPlan(task=task, context=context, rows=np.zeros(0), obs=pd.DataFrame()).seed_for(seed, "cap")


def prepare_labels(
    plan: ContextPlan,
    counts: sp.csr_matrix | None,
    *,
    label_key: str,
    group_key: str | None,
    n_boot: int,
    seed: int,
) -> None:
    """Labels, fold assignment, bootstrap indices and the HVG-PCA baseline, fixed for every layer."""
    y = plan.obs[label_key].astype(str).to_numpy()
    groups = None if group_key is None else plan.obs[group_key].astype(str).to_numpy()
    plan.reference["y"] = y
    plan.reference["folds"] = fold_ids(y, groups, plan.caps["n_folds"], seed)
    plan.reference["boot"] = bootstrap_indices(plan.n_cells, n_boot, plan.seed_for(seed, "boot"))
    if counts is not None:
        plan.reference["baseline"] = hvg_pca(counts, seed=seed)


def fold_ids(y: np.ndarray, groups: np.ndarray | None, n_folds: int, seed: int) -> np.ndarray:
    """Test-fold number of every cell: stratified folds, grouped (no donor in two folds) when ``groups``."""
    folds = np.full(len(y), -1, dtype=np.int64)
    if groups is None:
        cv: Any = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = cv.split(np.zeros(len(y)), y)
    else:
        cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = cv.split(np.zeros(len(y)), y, groups)
    for k, (_, test) in enumerate(splits):
        folds[test] = k
    return folds


def splits_of(folds: np.ndarray) -> Sequence[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` index pairs of the fold assignment (for ``cross_val_predict(cv=...)``)."""
    return [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in np.unique(folds)]


class LabelTask(Task):
    """Shared behaviour of the tasks over one label column: columns, plans, labels, folds, baseline.

    Subclasses are frozen dataclasses with ``label_key``, ``context_key``, ``min_cells_per_class``,
    ``max_per_class``, ``max_cells``, ``n_boot`` and ``seed``, and optionally ``group_key`` and ``n_folds``.
    """

    label_key: str
    context_key: str | None
    min_cells_per_class: int
    max_per_class: int | None
    max_cells: int | None
    n_boot: int
    seed: int

    @property
    def _group_key(self) -> str | None:
        return getattr(self, "group_key", None)

    def required_columns(self) -> list[str]:
        return [c for c in (self.label_key, self.context_key, self._group_key) if c]

    def plan(self, obs: pd.DataFrame, *, chunk_cells: int) -> list[ContextPlan]:
        return plan_labels(
            self.name,
            obs,
            label_key=self.label_key,
            context_key=self.context_key,
            group_key=self._group_key,
            min_cells_per_class=self.min_cells_per_class,
            max_per_class=self.max_per_class,
            max_cells=self.max_cells,
            seed=self.seed,
            n_folds=getattr(self, "n_folds", 2),
        )

    def prepare(self, plan: ContextPlan, counts: sp.csr_matrix | None, var_names: Any) -> None:
        prepare_labels(
            plan, counts, label_key=self.label_key, group_key=self._group_key, n_boot=self.n_boot, seed=self.seed
        )
