"""What every probe task shares: the per-context plan it gets, the metrics it returns, its interface.

A task is a small frozen settings object. The runner asks it to :meth:`Task.plan` which cells it needs
per context (cell state), gives it the counts of those cells once to :meth:`Task.prepare` references
that do not depend on the layer (HVG-PCA baseline features, reference pseudotime, DE profiles), and
then calls :meth:`Task.evaluate` once per (pooling, layer) with that layer's rows, float32, in plan order
(a :class:`StreamingTask` gets them one store chunk at a time through :class:`LayerRows` instead).
Everything a task computes from arrays lives in pure functions next to it.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..engine.errors import ProbeError

log = logging.getLogger("cellstrata.probes")

ALL_CONTEXT = "all"
DEFAULT_WAY_OUT = "merge or drop this context"
MAX_LISTED = 3  # contexts whose reasons an all-too-small error lists
DEFAULT_BOOTSTRAP = 200
DEFAULT_SEED = 0


@dataclass
class Metric:
    """One metric of one layer in one context.

    ``replicates`` are bootstrap values drawn with the *same* resample indices for every layer of the
    context (the task seeds them from its settings and the context only), so differences between layers
    can be bootstrapped pairwise. ``ci_low``/``ci_high`` are the bias-corrected percentile interval of the
    replicates unless the task set them otherwise; ``extra`` holds side numbers (p-values, z-scores, fold sd).
    """

    context: str
    metric: str
    value: float
    n_cells: int
    replicates: np.ndarray | None = None
    higher_is_better: bool = True
    features: str = "std"
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.value = float(self.value)
        if self.replicates is not None:
            self.replicates = np.asarray(self.replicates, dtype=np.float64)
            if np.isnan(self.ci_low) and np.isnan(self.ci_high):
                from .confidence import percentile_ci

                self.ci_low, self.ci_high = percentile_ci(self.replicates, center=self.value)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["replicates"] = None if self.replicates is None else [float(x) for x in self.replicates]
        d["extra"] = {k: float(v) for k, v in self.extra.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Metric:
        d = dict(d)
        reps = d.pop("replicates")
        return cls(**d, replicates=None if reps is None else np.asarray(reps, dtype=np.float64))


@dataclass(frozen=True)
class MetricSpec:
    """What a task declares about one metric of a layer before computing it (:meth:`Task.metric_specs`).

    ``n_replicates`` is the number of bootstrap replicates the metric carries (None: no replicates).
    A layer whose features are the same for every cell gets NaN metrics built from these
    (:mod:`.constant`), so they must match what :meth:`Task.evaluate` returns, in its order.
    """

    name: str
    n_cells: int
    n_replicates: int | None
    features: str = "std"
    higher_is_better: bool = True


@dataclass
class ContextPlan:
    """The cells one context of one task uses.

    ``rows`` are global store/input row indices, sorted ascending and unique; ``obs`` is the annotation
    of exactly those rows, in that order. ``caps`` reports what subsampling did (cells available,
    used, the cap). ``reference`` is filled by :meth:`Task.prepare` (layer-independent arrays).
    """

    task: str
    context: str
    rows: np.ndarray
    obs: pd.DataFrame
    caps: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        if len(self.rows) != len(self.obs):
            raise ValueError(f"{len(self.rows)} rows but {len(self.obs)} obs rows")
        if len(self.rows) > 1 and not (np.diff(self.rows) > 0).all():
            raise ValueError("plan rows must be sorted and unique")

    @property
    def n_cells(self) -> int:
        return len(self.rows)

    def seed_for(self, seed: int, *salt: str) -> np.random.SeedSequence:
        """A seed that depends on the task's seed, this context and ``salt`` only (never on the layer)."""
        digest = hashlib.sha256("\x1f".join((self.task, self.context, *salt)).encode()).digest()
        return np.random.SeedSequence([seed, int.from_bytes(digest[:8], "little")])


class Task:
    """Base class of probe tasks; subclasses are frozen dataclasses of settings.

    ``name`` is the task's name in results; ``primary_metric`` is the metric the summary ranks layers
    by (a task may return it under several contexts). ``needs_counts`` says whether :meth:`prepare`
    needs the counts of the plan's cells (all built-in tasks do, for the HVG-PCA baseline).
    """

    name: ClassVar[str] = "task"
    needs_counts: ClassVar[bool] = True

    @property
    def primary_metric(self) -> str:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The task's settings as JSON-able values (part of the cache key and of the results)."""
        out: dict[str, Any] = {"task": self.name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def required_columns(self) -> list[str]:
        """obs columns the task reads (checked before any layer is read)."""
        raise NotImplementedError

    def plan(self, obs: pd.DataFrame, *, chunk_cells: int) -> list[ContextPlan]:
        """Validate ``obs`` (all cells, store order) and choose the cells of each context."""
        raise NotImplementedError

    def counts_rows(self, plan: ContextPlan) -> np.ndarray:
        """Positions (into ``plan.rows``) whose counts :meth:`prepare` receives; default every planned cell."""
        return np.arange(plan.n_cells, dtype=np.int64)

    def prepare(self, plan: ContextPlan, counts: sp.csr_matrix | None, var_names: Sequence[str]) -> None:
        """Compute layer-independent references into ``plan.reference`` from the plan's counts."""

    def evaluate(self, plan: ContextPlan, X: np.ndarray) -> list[Metric]:
        """Metrics of one layer: ``X`` is ``[plan.n_cells, W]`` float32 in plan row order."""
        raise NotImplementedError

    def metric_specs(self, plan: ContextPlan) -> list[MetricSpec]:
        """The metrics one layer's evaluation returns for ``plan`` (prepared), in order: names, cells,
        replicate counts, feature recipes and directions, known without the layer's features."""
        raise NotImplementedError

    def evaluate_baseline(self, plan: ContextPlan) -> list[Metric]:
        """The same metrics on the HVG-PCA(50) baseline features (``plan.reference['baseline']``)."""
        return self.evaluate(plan, plan.reference["baseline"])


class StreamingTask(Task, abc.ABC):
    """A task whose layers are read one store chunk at a time: :meth:`evaluate_stream` replaces
    :meth:`evaluate` for the layers (incremental learners over every planned cell, memory one chunk).

    The baseline stays in memory (:meth:`evaluate_baseline`, on a subsample the task chooses).
    """

    @abc.abstractmethod
    def evaluate_stream(self, plan: ContextPlan, rows: LayerRows) -> list[Metric]:
        """Metrics of one layer read chunk by chunk through ``rows``."""


class LayerRows:
    """One layer's rows of a plan, readable one store chunk at a time (for streaming tasks).

    ``chunk(i)`` returns ``(positions, X)``: positions into ``plan.rows`` and their float32 features.
    """

    def __init__(self, read: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, chunk_cells: int):
        self._read = read
        chunk_of = rows // chunk_cells
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        self._parts = [p for p in np.split(np.arange(len(rows), dtype=np.int64), bounds) if len(p)]
        self._rows = rows

    @property
    def n_chunks(self) -> int:
        return len(self._parts)

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        part = self._parts[i]
        return part, self._read(self._rows[part])


def require_columns(obs: pd.DataFrame, columns: Sequence[str], task: str) -> None:
    """One clear error naming every missing annotation column and the ones that exist."""
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        have = ", ".join(map(str, obs.columns[:30])) or "(none)"
        msg = (
            f"task {task}: obs has no column {', '.join(repr(c) for c in missing)}; it has: {have}. "
            "Pass the column that holds it (see `cellstrata probe --help`)"
        )
        raise ProbeError(msg)


def contexts_of(obs: pd.DataFrame, context_key: str | None) -> list[tuple[str, np.ndarray]]:
    """``[(name, row indices)]``: one per value of ``context_key`` (sorted), or one ``all`` context."""
    if context_key is None:
        return [(ALL_CONTEXT, np.arange(len(obs), dtype=np.int64))]
    values = obs[context_key]
    if values.isna().any():
        values = values.astype(object).where(values.notna(), None)
    out = []
    codes, uniques = pd.factorize(values, sort=True)
    for i, u in enumerate(uniques):
        out.append((str(u), np.flatnonzero(codes == i).astype(np.int64)))
    return out


class SmallContextError(ProbeError):
    """A context has too few cells, classes, perturbations, controls or time points for a task.

    Raised by a task's per-context planning; :func:`plan_contexts` skips that context (with a warning)
    and probes the others. ``reason`` says what is missing (it names the context); ``setting``
    (``"task.field"``) is the threshold to lower and ``value`` the largest value that would keep the
    context (``None`` when lowering cannot help); ``otherwise`` is the other way out.
    """

    def __init__(
        self,
        task: str,
        reason: str,
        *,
        setting: str | None = None,
        value: int | None = None,
        otherwise: str = DEFAULT_WAY_OUT,
    ):
        self.task, self.reason, self.setting, self.value, self.otherwise = task, reason, setting, value, otherwise
        super().__init__(f"task {task}: {reason}. {self.hint(value)}")

    def hint(self, value: int | None) -> str:
        """What to do: the ``--set`` option (and Python keyword) with ``value``, or ``otherwise``."""
        if self.setting is None or value is None:
            return self.otherwise[:1].upper() + self.otherwise[1:]
        field = self.setting.partition(".")[2]
        return f"Lower the threshold (`--set {self.setting}={value}`, in Python `{field}={value}`) or {self.otherwise}"

    def skipped_message(self) -> str:
        """The warning when the context is skipped: the reason, and how to include it."""
        text = f"task {self.task}: {self.reason}; this context is skipped, the other contexts are probed"
        if self.setting is not None and self.value is not None:
            field = self.setting.partition(".")[2]
            return f"{text}. To include it: `--set {self.setting}={self.value}` (in Python `{field}={self.value}`)"
        if self.setting is not None:
            return f"{text}. Lowering `{self.setting}` cannot include it"
        if self.otherwise != DEFAULT_WAY_OUT:
            return f"{text}. To include it: {self.otherwise}"
        return text


class ContextPlans(list):
    """The plans of one task (a ``list[ContextPlan]``) and ``skipped``: ``{context: warning}``."""

    def __init__(self, plans: Sequence[ContextPlan] = (), skipped: dict[str, str] | None = None):
        super().__init__(plans)
        self.skipped: dict[str, str] = dict(skipped or {})


def plan_contexts(
    task: str,
    obs: pd.DataFrame,
    context_key: str | None,
    plan_one: Callable[[str, np.ndarray], ContextPlan],
) -> ContextPlans:
    """``plan_one(context, rows)`` for every context of ``context_key``, skipping the too-small ones.

    A context whose planning raises :class:`SmallContextError` is left out with a warning (logged on
    ``cellstrata.probes``) and recorded in ``skipped`` and in every kept plan's
    ``caps['skipped_contexts']`` (so in the report); the run goes on with the others. When every
    context is too small the task cannot run: one :class:`ProbeError` lists why for each (without
    ``context_key`` the single context's own error).
    """
    plans = ContextPlans()
    errors: list[SmallContextError] = []
    for context, rows in contexts_of(obs, context_key):
        try:
            plans.append(plan_one(context, rows))
        except SmallContextError as err:
            plans.skipped[context] = err.skipped_message()
            errors.append(err)
    if not plans:
        if len(errors) == 1:
            raise ProbeError(str(errors[0]))
        # the threshold that would keep the most promising context
        best = max((e for e in errors if e.value is not None), key=lambda e: e.value or 0, default=errors[0])
        hint = best.hint(best.value)
        reasons = "; ".join(e.reason for e in errors[:MAX_LISTED])
        if len(errors) > MAX_LISTED:
            reasons += f"; and {len(errors) - MAX_LISTED} more contexts"
        msg = f"task {task}: every context of {context_key!r} is too small to probe: {reasons}. {hint}"
        raise ProbeError(msg)
    for message in plans.skipped.values():
        log.warning("%s", message)
    if plans.skipped:  # the report prints every plan's caps: the skipped contexts appear with the kept ones
        for p in plans:
            p.caps["skipped_contexts"] = dict(plans.skipped)
    return plans
