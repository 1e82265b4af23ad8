"""Layers whose features are the same for every cell: NaN metrics with a note, for every task.

Some layers carry no information about the cell by construction: Tahoe-X1's layer-0 ``cls`` is the
``<cls>`` token's embedding, identical for every cell. A task run on such features does not fail; it
returns numbers (a DPT on a degenerate graph gave a Spearman of -0.40 with a "significant" p-value) that
mean nothing. The runner checks every (pooling, layer, context) before the task sees it: when all rows are
equal, the task's declared metrics (:meth:`.base.Task.metric_specs`: names, cells, replicate counts,
recipes, directions) are returned as NaN (value, interval, replicates) with ``constant_features = 1``,
which the report turns into a note.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import ContextPlan, LayerRows, Metric, MetricSpec, StreamingTask, Task

FLAG = "constant_features"
NOTE = "constant features (every cell has the same vector): metrics undefined, NaN"


def is_constant(X: np.ndarray) -> bool:
    """True when ``X`` has at least two rows and they are all equal (zero variance in every feature)."""
    X = np.asarray(X)
    return X.shape[0] > 1 and bool((X[0] == X).all())


def undefined(context: str, specs: list[MetricSpec]) -> list[Metric]:
    """NaN metrics of ``context`` as ``specs`` declare them (NaN replicates of the declared count), flagged."""
    nan = float("nan")
    return [
        Metric(
            context=context,
            metric=spec.name,
            value=nan,
            n_cells=spec.n_cells,
            replicates=None if spec.n_replicates is None else np.full(spec.n_replicates, nan),
            higher_is_better=spec.higher_is_better,
            features=spec.features,
            ci_low=nan,
            ci_high=nan,
            extra={FLAG: 1.0},
        )
        for spec in specs
    ]


def evaluate(task: Task, plan: ContextPlan, X: np.ndarray) -> list[Metric]:
    """``task.evaluate(plan, X)``, or NaN metrics when ``X`` is constant over the plan's cells."""
    if is_constant(X):
        return undefined(plan.context, task.metric_specs(plan))
    return task.evaluate(plan, X)


class _Watch:
    """A row reader that remembers whether every row it returned equals the first one."""

    def __init__(self, read: Callable[[np.ndarray], np.ndarray]):
        self._read = read
        self.first: np.ndarray | None = None
        self.constant = True

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        X = self._read(rows)
        if len(X):
            if self.first is None:
                self.first = X[0].copy()
            if self.constant and not (self.first == X).all():
                self.constant = False
        return X


def evaluate_stream(
    task: StreamingTask, plan: ContextPlan, read: Callable[[np.ndarray], np.ndarray], chunk_cells: int
) -> list[Metric]:
    """``task.evaluate_stream`` over the plan's rows, or NaN metrics when they are all equal.

    Constancy is watched while the task reads; when every row read was equal (or the task failed), one
    more pass over all rows decides: constant features give NaN metrics, otherwise the task's result
    (or error) stands.
    """
    watch = _Watch(read)
    error: Exception | None = None
    metrics: list[Metric] = []
    try:
        metrics = task.evaluate_stream(plan, LayerRows(watch, plan.rows, chunk_cells))
    except Exception as err:
        error = err
    if plan.n_cells >= 2 and (error is not None or watch.constant):
        full = _Watch(read)
        rows = LayerRows(full, plan.rows, chunk_cells)
        for i in range(rows.n_chunks):
            rows.chunk(i)
        if full.constant:
            return undefined(plan.context, task.metric_specs(plan))
    if error is not None:
        raise error
    return metrics
