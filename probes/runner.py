"""The lazy layer-wise runner: plan cells per task, read only those rows of only the asked layers, cache.

``probe(store, adata, tasks)`` runs these steps:

1. :func:`_open_inputs` reads the obs columns the tasks need and checks they align with the store's cells;
2. :func:`_plan` asks every task for its per-context plans (sorted row subsets, capped and reported);
3. :func:`_look_up` keys every (task settings, context, cells, pooling, layer) result and finds the ones
   cached inside the store under ``probes/``, so re-running the same probe, or adding a task or layer,
   only computes what is new;
4. :func:`_prepare_references` reads the counts of the planned cells once, for the layer-independent
   references (HVG-PCA baseline, reference pseudotime, DE profiles) of the plans left to compute;
5. :func:`_evaluate_layers` builds one Dask task per (pooling, layer) that reads the union of planned rows
   of that one layer, one store chunk at a time, and evaluates every task on it (a
   :class:`~.base.StreamingTask` reads its rows chunk by chunk); the layers run in parallel on Dask's
   threaded scheduler;
6. :func:`_evaluate_baselines` evaluates the HVG-PCA(50) baseline; :func:`_assemble` makes the tidy table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from ..engine.errors import CellstrataError, ProbeError
from ..engine.models.weights import weights_provenance
from ..engine.progress import ProbeProgress, progress_bar
from ..engine.storage.location import member_array
from ..engine.storage.store import Store, open_store
from . import constant
from .base import ContextPlan, Metric, StreamingTask, Task
from .chance import add_chance, class_counts_of
from .confidence import gain_basis, reported_gain

log = logging.getLogger("cellstrata.probes")

CACHE_GROUP = "probes"
BASELINE_POOLING = "hvg_pca50"
COUNTS_BLOCK = 8192
DEFAULT_MEMORY_BUDGET = 4 * 2**30
CACHE_VERSION = 3  # bump when a metric's definition changes, so cached results of the old one are not reused


@dataclass
class ProbeResults:
    """Everything a probe run produced.

    ``table`` is the tidy table (one row per task, context, pooling, layer, metric; baseline rows have
    pooling ``hvg_pca50`` and no layer). ``replicates[(task, context, pooling, metric)]`` is the
    ``[n_layers_evaluated, B]`` matrix of paired bootstrap replicates, rows in ``layers`` order.
    """

    table: pd.DataFrame
    replicates: dict[tuple[str, str, str, str], np.ndarray]
    layers: list[int]
    n_layers: int
    primary: dict[str, str]
    higher_is_better: dict[tuple[str, str], bool]
    caps: dict[str, dict[str, Any]]
    settings: dict[str, dict[str, Any]]
    store: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def probe(
    store: str | os.PathLike[str] | Store,
    adata: Any,
    tasks: Sequence[Task] | Task,
    *,
    layers: str | Iterable[int] = "all",
    pooling: str | Sequence[str] | None = None,
    counts_layer: str | None = None,
    n_jobs: int | None = None,
    cache: bool = True,
    baseline: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> ProbeResults:
    """Evaluate ``tasks`` on every requested layer and pooling of ``store``; see the module docstring.

    ``adata``: the AnnData (path, object or open source) the store was extracted from; its obs holds the
    annotations and ``counts_layer`` (default: the matrix the store was extracted from) the raw counts.
    ``layers``: ``"all"`` or store layer indices (0 = embedding output, L = last block; negative counts
    from the end). ``pooling``: names in the store (default: all of them).
    """
    t_start = time.perf_counter()
    run = _open_inputs(store, adata, tasks, layers=layers, pooling=pooling, counts_layer=counts_layer)
    plans, caps = _plan(run)
    t_plan = time.perf_counter()

    work = _look_up(run, plans, _Cache(run.st, enabled=cache), baseline=baseline)
    _prepare_references(run, plans, work)
    t_prep = time.perf_counter()

    with progress_bar(work.n_steps, enabled=progress, desc="probe", unit="evaluations") as bar:
        tracker = ProbeProgress(bar, run.st.n_layers)
        _evaluate_layers(run, plans, work, n_jobs=n_jobs, memory_budget=memory_budget, progress=tracker)
        t_layers = time.perf_counter()
        base_results = _evaluate_baselines(run, plans, work, progress=tracker) if baseline else {}
    t_end = time.perf_counter()

    out = _assemble(run.st, run.tasks, plans, run.poolings, run.layers, work.keys, work.results, base_results)
    out.caps = caps
    n_total = len(run.poolings) * len(run.layers)
    n_computed = len(work.layer_todo)
    out.timings = {
        "plan_s": t_plan - t_start,
        "references_s": t_prep - t_plan,
        "layers_s": t_layers - t_prep,
        "baseline_s": t_end - t_layers,
        "total_s": t_end - t_start,
        "layer_evaluations": float(n_computed),
        "layer_evaluations_cached": float(n_total - n_computed),
    }
    log.info(
        "probe finished in %.1f s (%d of %d layer evaluations computed, the rest from the cache)",
        t_end - t_start,
        n_computed,
        n_total,
    )
    return out


# --------------------------------------------------------------------------------------------------
# The steps of a run
# --------------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    """What a run reads: the store, the annotation source, the tasks, the poolings and layers asked for.

    ``obs`` holds the tasks' columns in store cell order; ``order`` is the input row of each store cell
    (None when they are the same); ``valid`` marks cells with gene tokens (None when all have).
    """

    st: Store
    source: Any
    tasks: list[Task]
    poolings: list[str]
    layers: list[int]
    obs: pd.DataFrame
    order: np.ndarray | None
    valid: np.ndarray | None


@dataclass
class _Work:
    """The cache look-up of a run: what is known and what is left to compute.

    ``keys[(pooling, layer, task, context)]`` is the cache key of each result (the baseline under
    pooling ``hvg_pca50`` and layer -1); ``results[key]`` the metrics found or computed so far;
    ``todo[(pooling, layer)]`` the (task, context) pairs still to compute there.
    """

    cache: _Cache
    keys: dict[tuple[str, int, str, str], str] = field(default_factory=dict)
    results: dict[str, list[Metric]] = field(default_factory=dict)
    todo: dict[tuple[str, int], set[tuple[str, str]]] = field(default_factory=dict)

    @property
    def layer_todo(self) -> dict[tuple[str, int], set[tuple[str, str]]]:
        """``todo`` without the baseline."""
        return {k: v for k, v in self.todo.items() if k[0] != BASELINE_POOLING}

    @property
    def n_steps(self) -> int:
        """Evaluations left: one per (task, context) per layer to compute, and per baseline."""
        return sum(len(v) for v in self.layer_todo.values()) + len(self.todo.get((BASELINE_POOLING, -1), ()))


def _open_inputs(
    store: str | os.PathLike[str] | Store,
    adata: Any,
    tasks: Sequence[Task] | Task,
    *,
    layers: str | Iterable[int],
    pooling: str | Sequence[str] | None,
    counts_layer: str | None,
) -> _Inputs:
    """Open the store and the annotations, check the tasks, poolings and layers, and read the obs
    columns the tasks need, aligned with the store's cells."""
    from ..engine.input.sources import open_source

    st = store if isinstance(store, Store) else open_store(store)
    st.require_complete()
    task_list = [tasks] if isinstance(tasks, Task) else list(tasks)
    if not task_list:
        raise ProbeError("no probe task given; choose at least one (cell_type, knn_transfer, clustering, ...)")
    names = [t.name for t in task_list]
    if len(set(names)) != len(names):
        raise ProbeError(f"each task may be given once per run, got {', '.join(names)}")
    poolings = _poolings(st, pooling)
    layer_list = _layers(st, layers)
    src_layer = counts_layer if counts_layer is not None else st.attrs.get("source", {}).get("layer")
    try:
        source = open_source(adata, layer=src_layer)
    except CellstrataError as err:
        raise ProbeError(f"cannot read the annotations: {err}") from None
    needed = sorted({c for t in task_list for c in t.required_columns()})
    try:
        obs_all = source.read_obs(needed) if needed else pd.DataFrame(index=source.obs_names)
    except CellstrataError as err:
        users = {c: [t.name for t in task_list if c in t.required_columns()] for c in needed}
        which = "; ".join(f"{c!r} (needed by {', '.join(u)})" for c, u in users.items())
        raise ProbeError(f"the tasks need obs columns {which}: {err}") from None
    order = _align(st, source.obs_names)
    obs = obs_all.iloc[order].reset_index(drop=True) if order is not None else obs_all.reset_index(drop=True)
    obs.index = pd.Index(st.obs_names())
    return _Inputs(st, source, task_list, poolings, layer_list, obs, order, _valid_cells(st))


def _plan(run: _Inputs) -> tuple[dict[str, list[ContextPlan]], dict[str, dict[str, Any]]]:
    """Every task's per-context plans over the cells with gene tokens (rows are store rows), and
    ``caps["task/context"]``: what each plan's subsampling did."""
    plans: dict[str, list[ContextPlan]] = {}
    caps: dict[str, dict[str, Any]] = {}
    valid = run.valid
    for task in run.tasks:
        sub = run.obs if valid is None else run.obs.iloc[np.flatnonzero(valid)]
        task_plans = task.plan(sub, chunk_cells=run.st.chunk_cells)
        if valid is not None:  # plan rows are positions in ``sub``; make them store rows
            keep = np.flatnonzero(valid)
            for p in task_plans:
                p.rows = keep[p.rows]
                p.caps["excluded_empty_cells"] = int((~valid).sum())
        plans[task.name] = task_plans
        for p in task_plans:
            caps[f"{task.name}/{p.context}"] = dict(p.caps)
    return plans, caps


def _look_up(run: _Inputs, plans: dict[str, list[ContextPlan]], cache: _Cache, *, baseline: bool) -> _Work:
    """The cache key of every (pooling, layer, task, context), the results the cache holds, and the rest."""
    work = _Work(cache)
    fingerprint = run.source.fingerprint()
    task_keys = {t.name: _store_key(run.st, run.obs, t.required_columns(), fingerprint) for t in run.tasks}
    for pool in [*run.poolings, BASELINE_POOLING] if baseline else run.poolings:
        for layer in [-1] if pool == BASELINE_POOLING else run.layers:
            for task in run.tasks:
                for p in plans[task.name]:
                    k = _result_key(task_keys[task.name], task, p, pool, layer)
                    work.keys[(pool, layer, task.name, p.context)] = k
                    hit = cache.get(k)
                    if hit is None:
                        work.todo.setdefault((pool, layer), set()).add((task.name, p.context))
                    else:
                        work.results[k] = hit
    return work


def _prepare_references(run: _Inputs, plans: dict[str, list[ContextPlan]], work: _Work) -> None:
    """Read the counts of the planned cells once and let each plan with something left to compute build
    its layer-independent references (only those plans need them, so only their counts are read)."""
    pending = set().union(*work.todo.values()) if work.todo else set()
    to_prepare = [(t, p) for t in run.tasks for p in plans[t.name] if (t.name, p.context) in pending]
    if not to_prepare:
        return
    wanted = [p.rows[t.counts_rows(p)] for t, p in to_prepare]
    union = np.unique(np.concatenate(wanted))
    rows = union if run.order is None else run.order[union]
    counts = _read_counts(run.source, rows, any(t.needs_counts for t, _ in to_prepare))
    for (task, p), w in zip(to_prepare, wanted, strict=True):
        sub_counts = None if counts is None else counts[np.searchsorted(union, w)]
        task.prepare(p, sub_counts, run.source.gene_names)


def _evaluate_layers(
    run: _Inputs,
    plans: dict[str, list[ContextPlan]],
    work: _Work,
    *,
    n_jobs: int | None,
    memory_budget: int,
    progress: ProbeProgress,
) -> None:
    """Compute the missing layer results (:func:`_compute`), store them in ``work`` and in the cache."""
    layer_todo = work.layer_todo
    if not layer_todo:
        return
    computed = _compute(
        run.st, layer_todo, run.tasks, plans, n_jobs=n_jobs, memory_budget=memory_budget, progress=progress
    )
    for (pool, layer), per_task in computed.items():
        for (task_name, context), metrics in per_task.items():
            k = work.keys[(pool, layer, task_name, context)]
            work.results[k] = metrics
            work.cache.put(k, metrics)


def _evaluate_baselines(
    run: _Inputs, plans: dict[str, list[ContextPlan]], work: _Work, *, progress: ProbeProgress
) -> dict[tuple[str, str], list[Metric]]:
    """The HVG-PCA(50) baseline metrics of every (task, context): from the cache, or computed and cached."""
    out: dict[tuple[str, str], list[Metric]] = {}
    for task in run.tasks:
        for p in plans[task.name]:
            k = work.keys[(BASELINE_POOLING, -1, task.name, p.context)]
            if k not in work.results:
                progress.start(task.name, p.context, BASELINE_POOLING, None)
                work.results[k] = task.evaluate_baseline(p)
                progress.finish()
                work.cache.put(k, work.results[k])
            out[(task.name, p.context)] = work.results[k]
    return out


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _poolings(st: Store, pooling: str | Sequence[str] | None) -> list[str]:
    if pooling is None:
        return st.poolings
    wanted = [pooling] if isinstance(pooling, str) else list(pooling)
    bad = [p for p in wanted if p not in st.poolings]
    if bad:
        raise ProbeError(f"pooling {', '.join(map(repr, bad))} is not in {st.path}; it has {', '.join(st.poolings)}")
    return wanted


def _layers(st: Store, layers: str | Iterable[int]) -> list[int]:
    n = st.n_layers + 1
    if isinstance(layers, str):
        if layers != "all":
            raise ProbeError(f"layers must be 'all' or store layer indices 0..{n - 1}, got {layers!r}")
        return list(range(n))
    out = []
    for layer in layers:
        i = int(layer)
        if not -n <= i < n:
            raise ProbeError(f"layer {i} is not in {st.path}: it has layers 0..{n - 1} (0 = embedding output)")
        out.append(i % n)
    if not out:
        raise ProbeError("no layer selected")
    return sorted(set(out))


def _align(st: Store, input_names: np.ndarray) -> np.ndarray | None:
    """None when the input's cells are the store's cells in order; else the input row of each store cell."""
    store_names = st.obs_names()
    input_names = np.asarray(input_names).astype(str)
    if len(input_names) == len(store_names) and (input_names == store_names).all():
        return None
    pos = pd.Index(input_names)
    if not pos.is_unique:
        raise ProbeError("the annotations' obs_names are not unique; make them unique (obs_names_make_unique)")
    idx = pos.get_indexer(store_names)
    if (idx < 0).any():
        missing = store_names[idx < 0]
        msg = (
            f"obs is not aligned with the store's cells: {len(missing)} of the store's {len(store_names)} cells "
            f"(e.g. {missing[0]!r}) are not in the annotations ({len(input_names)} cells). Pass the AnnData the "
            "store was extracted from"
        )
        raise ProbeError(msg)
    return idx.astype(np.int64)


def _valid_cells(st: Store) -> np.ndarray | None:
    """Mask of cells with at least one gene token (None when all have); empty cells' gene poolings are NaN."""
    n_tokens = np.asarray(member_array(st.group, "n_tokens")[:])
    valid = n_tokens > 0
    return None if valid.all() else valid


def _read_counts(source: Any, rows: np.ndarray, needed: bool) -> sp.csr_matrix | None:
    """CSR counts of ``rows`` (sorted input rows), reading only the row blocks that hold them."""
    if not needed or len(rows) == 0:
        return None
    order = np.argsort(rows, kind="stable")
    rows_sorted = rows[order]
    parts = []
    blocks = np.unique(rows_sorted // COUNTS_BLOCK)
    for b in blocks:
        lo, hi = b * COUNTS_BLOCK, min((b + 1) * COUNTS_BLOCK, source.n_cells)
        sel = rows_sorted[(rows_sorted >= lo) & (rows_sorted < hi)]
        block = source.read(int(sel[0]), int(sel[-1]) + 1)
        parts.append(block.X[sel - sel[0]])
    X = sp.vstack(parts, format="csr")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return sp.csr_matrix(X[inverse])


# --------------------------------------------------------------------------------------------------
# Layer evaluation
# --------------------------------------------------------------------------------------------------


def read_layer_rows(array: zarr.Array, layer: int, rows: np.ndarray, chunk_cells: int) -> np.ndarray:
    """Rows ``rows`` (sorted) of ``array[layer]`` as float32, reading each touched chunk once."""
    out = np.empty((len(rows), array.shape[2]), dtype=np.float32)
    chunk_of = rows // chunk_cells
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    for part in np.split(np.arange(len(rows)), bounds):
        if len(part) == 0:
            continue
        lo, hi = int(rows[part[0]]), int(rows[part[-1]]) + 1
        block = cast(np.ndarray, array[layer, lo:hi])  # a region of an array: an ndarray
        out[part] = block[rows[part] - lo]
    return out


def _evaluate_layer(
    st: Store,
    pooling: str,
    layer: int,
    work: list[tuple[Task, ContextPlan]],
    progress: ProbeProgress | None = None,
) -> dict[tuple[str, str], list[Metric]]:
    """Evaluate each (task, plan) of ``work`` on one layer (each one counted on ``progress``).

    In-memory tasks share one read of the union of their rows; streaming tasks read their rows one store
    chunk at a time through :class:`.base.LayerRows`. Features equal for every cell give NaN metrics
    (:mod:`.constant`).
    """
    array = member_array(st.group, "pooled", pooling)

    def read(rows: np.ndarray) -> np.ndarray:
        X = read_layer_rows(array, layer, rows, st.chunk_cells)
        _check_finite(X, st, pooling, layer)
        return X

    def step(task: Task, p: ContextPlan) -> None:
        if progress is not None:
            progress.start(task.name, p.context, pooling, layer)

    def done() -> None:
        if progress is not None:
            progress.finish()

    out: dict[tuple[str, str], list[Metric]] = {}
    in_memory = [(t, p) for t, p in work if not isinstance(t, StreamingTask)]
    if in_memory:
        union = np.unique(np.concatenate([p.rows for _, p in in_memory]))
        X = read(union)
        for task, p in in_memory:
            step(task, p)
            out[(task.name, p.context)] = constant.evaluate(task, p, X[np.searchsorted(union, p.rows)])
            done()
        del X
    for task, p in work:
        if isinstance(task, StreamingTask):
            step(task, p)
            out[(task.name, p.context)] = constant.evaluate_stream(task, p, read, st.chunk_cells)
            done()
    return out


def _rows_in_memory(work: list[tuple[Task, ContextPlan]]) -> int:
    """Rows one layer's in-memory tasks hold at once (streaming tasks hold one chunk)."""
    rows = [p.rows for t, p in work if not isinstance(t, StreamingTask)]
    return len(np.unique(np.concatenate(rows))) if rows else 0


def _check_finite(X: np.ndarray, st: Store, pooling: str, layer: int) -> None:
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        msg = (
            f"{int(bad.sum())} cells have NaN or inf in pooling {pooling!r} at layer {layer} of {st.path} "
            "(float16 overflow or cells without gene tokens); re-extract with --dtype float32, or probe "
            "another pooling"
        )
        raise ProbeError(msg)


def _compute(
    st: Store,
    todo: dict[tuple[str, int], set[tuple[str, str]]],
    tasks: Sequence[Task],
    plans: dict[str, list[ContextPlan]],
    *,
    n_jobs: int | None,
    memory_budget: int,
    progress: ProbeProgress | None = None,
) -> dict[tuple[str, int], dict[tuple[str, str], list[Metric]]]:
    """Evaluate the missing (task, context) pairs of each (pooling, layer) in parallel on Dask threads."""
    import dask
    from threadpoolctl import threadpool_limits

    work = {
        key: [(t, p) for t in tasks for p in plans[t.name] if (t.name, p.context) in pairs]
        for key, pairs in todo.items()
    }
    n_rows = max(max(_rows_in_memory(w), 2 * st.chunk_cells) for w in work.values())
    width = max(member_array(st.group, "pooled", pool).shape[2] for pool, _ in work)
    per_layer = max(n_rows * width * 4 * 4, 1)  # the rows, a standardised copy, PCA and slack
    cpus = os.cpu_count() or 1
    workers = n_jobs or min(cpus, len(work))
    workers = int(max(1, min(workers, len(work), memory_budget // per_layer)))
    log.info("evaluating %d layer(s) on %d thread(s)", len(work), workers)
    delayed = [dask.delayed(_evaluate_layer)(st, pool, layer, w, progress) for (pool, layer), w in work.items()]
    limit = threadpool_limits(limits=max(1, cpus // workers)) if workers > 1 else contextlib.nullcontext()
    with limit:
        values = dask.compute(*delayed, scheduler="threads", num_workers=workers)
    return dict(zip(work, values, strict=True))


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def _store_key(st: Store, obs: pd.DataFrame, columns: Sequence[str], counts: dict[str, Any]) -> str:
    """What a task's cached results depend on: the store's configuration, the counts' matrix and the
    annotation columns the task reads (only those, so adding a task keeps the others' results)."""
    h = hashlib.sha256(str(st.attrs.get("config_hash")).encode())
    h.update(json.dumps({k: v for k, v in counts.items() if k != "path"}, sort_keys=True, default=str).encode())
    for c in columns:
        h.update(c.encode())
        h.update(pd.util.hash_pandas_object(obs[c].astype(str), index=False).to_numpy().tobytes())
    return h.hexdigest()


def _result_key(store_key: str, task: Task, plan: ContextPlan, pooling: str, layer: int) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}\x1f{store_key}".encode())
    h.update(json.dumps(task.settings(), sort_keys=True, default=str).encode())
    h.update(f"\x1f{plan.context}\x1f{pooling}\x1f{layer}\x1f".encode())
    h.update(plan.rows.tobytes())
    return h.hexdigest()[:32]


class _Cache:
    """Results inside the store: group ``probes/<key>`` with the metrics as its ``result`` attribute."""

    def __init__(self, st: Store, *, enabled: bool):
        self.group: zarr.Group | None = None
        if not enabled:
            return
        try:
            root = st.location.open_group("r+")
            self.group = root.require_group(CACHE_GROUP)
        except Exception as err:  # read-only media, permissions
            log.warning("cannot cache probe results in %s (%s); they will be recomputed next time", st.path, err)

    def get(self, key: str) -> list[Metric] | None:
        if self.group is None:
            return None
        try:
            entry = self.group[key]
        except KeyError:
            return None
        try:
            return [Metric.from_json(m) for m in cast(list[dict[str, Any]], entry.attrs["result"])]
        except Exception:  # a partial or older entry: recompute it
            return None

    def put(self, key: str, metrics: list[Metric]) -> None:
        if self.group is None:
            return
        try:
            entry = self.group.require_group(key)
            entry.attrs["result"] = [m.to_json() for m in metrics]
        except Exception as err:
            log.warning("cannot cache a probe result in the store (%s)", err)


# --------------------------------------------------------------------------------------------------
# Tidy table
# --------------------------------------------------------------------------------------------------


def _assemble(
    st: Store,
    tasks: Sequence[Task],
    plans: dict[str, list[ContextPlan]],
    poolings: list[str],
    layers: list[int],
    keys: dict[tuple[str, int, str, str], str],
    results: dict[str, list[Metric]],
    base_results: dict[tuple[str, str], list[Metric]],
) -> ProbeResults:
    L = st.n_layers
    rows: list[dict[str, Any]] = []
    replicates: dict[tuple[str, str, str, str], list[np.ndarray | None]] = {}
    direction: dict[tuple[str, str], bool] = {}
    for task in tasks:
        for p in plans[task.name]:
            base = {m.metric: m for m in base_results.get((task.name, p.context), [])}
            for pool in poolings:
                for layer in layers:
                    for m in results[keys[(pool, layer, task.name, p.context)]]:
                        direction[(task.name, m.metric)] = m.higher_is_better
                        rows.append(_row(task.name, pool, layer, L, m, base.get(m.metric)))
                        replicates.setdefault((task.name, m.context, pool, m.metric), []).append(m.replicates)
            for m in base.values():
                rows.append(_row(task.name, BASELINE_POOLING, None, L, m, None))
    table = pd.DataFrame(rows)
    table = add_chance(table, {(t.name, p.context): class_counts_of(t, p.obs) for t in tasks for p in plans[t.name]})
    table = _add_final(table, L)
    reps = {}
    for k, v in replicates.items():
        if all(r is not None for r in v) and len({len(cast(np.ndarray, r)) for r in v}) == 1:
            reps[k] = np.vstack(cast(list[np.ndarray], v))  # none is None
    return ProbeResults(
        table=table,
        replicates=reps,
        layers=layers,
        n_layers=L,
        primary={t.name: t.primary_metric for t in tasks},
        higher_is_better=direction,
        caps={},
        settings={t.name: t.settings() for t in tasks},
        store={
            "path": str(st.path),
            "model": st.attrs.get("model", {}).get("family"),
            "preset": st.attrs.get("model", {}).get("preset"),
            "checkpoint": st.attrs.get("model", {}).get("checkpoint"),
            "n_layers": L,
            "official_layer": st.attrs.get("official_layer"),
            "n_cells": st.n_cells,
            "weights": weights_provenance(st.attrs),
        },
    )


TABLE_COLUMNS = [
    "task", "context", "pooling", "layer", "depth", "metric", "value", "ci_low", "ci_high", "n_cells",
    "features", "higher_is_better", "baseline", "chance", "final_value", "diff_vs_final", "gain_vs_final",
    "gain_basis", "constant_features",
]  # fmt: skip


def _row(task: str, pooling: str, layer: int | None, L: int, m: Metric, base: Metric | None) -> dict[str, Any]:
    row = {
        "task": task,
        "context": m.context,
        "pooling": pooling,
        "layer": layer,
        "depth": None if layer is None else layer / L,
        "metric": m.metric,
        "value": m.value,
        "ci_low": m.ci_low,
        "ci_high": m.ci_high,
        "n_cells": m.n_cells,
        "features": m.features,
        "higher_is_better": m.higher_is_better,
        "baseline": float("nan") if base is None else base.value,
    }
    row.update(m.extra)
    return row


def _add_final(table: pd.DataFrame, L: int) -> pd.DataFrame:
    """Columns ``final_value`` (the last layer's value of the same series), ``diff_vs_final`` and
    ``gain_vs_final`` (relative, only where ``gain_basis`` is ``relative``: see :func:`.confidence.gain_basis`)."""
    if table.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    layer_rows = table["layer"].notna()
    finals = table[layer_rows & (table["layer"] == L)].set_index(["task", "context", "pooling", "metric"])["value"]
    idx = pd.MultiIndex.from_frame(table[["task", "context", "pooling", "metric"]])
    table["final_value"] = finals.reindex(idx).to_numpy()
    table.loc[~layer_rows, "final_value"] = np.nan
    value, final = table["value"].to_numpy(np.float64), table["final_value"].to_numpy(np.float64)
    table["diff_vs_final"] = value - final
    table["gain_vs_final"] = reported_gain(value, final)  # NaN where only the difference is meaningful
    basis = pd.Series(np.atleast_1d(gain_basis(value, final)), index=table.index, dtype=object)
    table["gain_basis"] = basis.where(np.isfinite(value - final))
    if "constant_features" not in table:
        table["constant_features"] = np.nan
    table["layer"] = table["layer"].astype("Int64")
    extra = [c for c in table.columns if c not in TABLE_COLUMNS]
    return table[TABLE_COLUMNS + extra]
