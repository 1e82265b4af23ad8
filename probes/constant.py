"""Layers whose features are the same for every cell: NaN metrics with a note, for every task.

Some layers carry no information about the cell by construction: Tahoe-X1's layer-0 ``cls`` is the
``<cls>`` token's embedding, identical for every cell. A task run on such features does not fail; it
returns numbers (a DPT on a degenerate graph gave a Spearman of -0.40 with a "significant" p-value) that
mean nothing. The runner checks every (pooling, layer, context) before the task sees it: when all rows are
equal, the task runs on seeded Gaussian stand-in features of the same shape only to name its metrics, and
every metric is returned as NaN (value, interval, replicates, side numbers) with ``constant_features = 1``,
which the report turns into a note.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import ContextPlan, LayerRows, Metric, StreamingTask, Task

FLAG = "constant_features"
NOTE = "constant features (every cell has the same vector): metrics undefined, NaN"
STAND_IN_SEED = 0


def is_constant(X: np.ndarray) -> bool:
    """True when ``X`` has at least two rows and they are all equal (zero variance in every feature)."""
    X = np.asarray(X)
    return X.shape[0] > 1 and bool((X[0] == X).all())


def stand_in(rows: np.ndarray, width: int) -> np.ndarray:
    """Seeded Gaussian features ``[len(rows), width]`` float32, the same for the same rows."""
    seed = [STAND_IN_SEED, len(rows), int(rows[0]) if len(rows) else 0]
    return np.random.default_rng(seed).standard_normal((len(rows), width)).astype(np.float32)


def undefined(metrics: list[Metric]) -> list[Metric]:
    """NaN copies of ``metrics`` (names, direction, replicate count and features kept), flagged constant."""
    out = []
    for m in metrics:
        reps = None if m.replicates is None else np.full(len(m.replicates), np.nan)
        nan = float("nan")
        out.append(
            Metric(
                context=m.context,
                metric=m.metric,
                value=nan,
                n_cells=m.n_cells,
                replicates=reps,
                higher_is_better=m.higher_is_better,
                features=m.features,
                ci_low=nan,
                ci_high=nan,
                extra={FLAG: 1.0},
            )
        )
    return out


def evaluate(task: Task, plan: ContextPlan, X: np.ndarray) -> list[Metric]:
    """``task.evaluate(plan, X)``, or NaN metrics when ``X`` is constant over the plan's cells."""
    if is_constant(X):
        return undefined(task.evaluate(plan, stand_in(plan.rows, X.shape[1])))
    return task.evaluate(plan, X)


class _Watch:
    """A row reader that remembers whether every row it returned equals the first one."""

    def __init__(self, read: Callable[[np.ndarray], np.ndarray]):
        self._read = read
        self.first: np.ndarray | None = None
        self.constant = True
        self.width = 0

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        X = self._read(rows)
        self.width = X.shape[1]
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
            width = full.width
            stand = LayerRows(lambda r: stand_in(r, width), plan.rows, chunk_cells)
            return undefined(task.evaluate_stream(plan, stand))
    if error is not None:
        raise error
    return metrics
