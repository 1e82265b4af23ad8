"""Trajectory / time probe (protocol §1.4, §2.2): how well each layer orders cells in real time.

Per context (cell state) and layer, on a kNN graph of the layer (``features``: the raw layer activations by
default, as the paper's ``sc.pp.neighbors(use_rep=layer)``; ``pca50`` to standardise and reduce first):

- ``dpt_spearman_time`` (primary): Spearman of the layer's diffusion pseudotime against real time;
- ``dpt_spearman_reference``: Spearman against the DPT of the HVG-PCA(50) reference, the paper's number;
- ``time_smoothness``: mean |t_i - t_j| over each cell's kNN over the mean over all pairs (lower is better;
  about 1 when the neighbourhoods ignore time);

and on the layer's ``std`` features (standardised inside each training fold):

- ``ridge_r2`` / ``ridge_spearman``: out-of-fold predictions of ``RidgeCV(alphas=logspace(-2, 4, 13))``.

The defaults are the paper's method (protocol §1.4), restated without scanpy (:mod:`.diffusion`,
:mod:`.features`):

- reference: ``normalize_total(1e4)`` -> ``log1p`` -> ``highly_variable_genes(n_top_genes=2500,
  subset=True)`` (scanpy's default ``seurat`` flavour) -> ``pca(n_comps=50)`` (centred, not scaled), and its
  DPT on those PCs as they are (``use_rep="X_pca"``); ``hvg_genes`` changes the 2,500;
- every graph: ``sc.pp.neighbors(n_neighbors=30)`` with its default UMAP connectivities (``kernel="umap"``;
  ``"gauss"`` for the Gaussian kernel of Haghverdi et al. 2016), exact Euclidean neighbours (scanpy uses
  pynndescent's approximate ones from 8,192 cells on), then ``sc.tl.diffmap`` (15 components) and
  ``sc.tl.dpt`` (10 components);
- root (``root="first"``): the first cell, in the AnnData's order, at the earliest time of the context
  (cell order is the store's, which is the AnnData's when the store was extracted from it; cells the store
  left out, e.g. without gene tokens, cannot be roots). Subsampling (``max_cells``) keeps the planned cells
  in that order and always keeps that cell, so the root is the paper's cell. ``root="robust"`` (protocol
  §2.2) averages the pseudotime over ``n_roots`` earliest-time cells drawn at random.

Bootstrap replicates resample cells of the per-cell quantities (pseudotime, out-of-fold predictions,
neighbour time gaps) with the same indices for every layer; graphs and fits are not rebuilt per replicate,
so the intervals reflect which cells were sampled, not the variance of graph construction. With
``root="robust"`` each replicate of the two DPT metrics also draws its own ``n_roots`` roots among the same
candidates (the same draws for every layer, and for the layer and the reference DPT), so their intervals
cover the root choice as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.model_selection import KFold

from ..engine.errors import ConfigError, ProbeError
from .base import ContextPlan, Metric, MetricSpec, SmallContextError, Task, plan_contexts, require_columns
from .confidence import bootstrap_indices
from .correlation import boot_counts, spearman, spearman_boot
from .diffusion import (
    KERNELS,
    DiffusionMap,
    connectivities,
    diffusion_map,
    dpt_pseudotime,
    knn_graph,
    knn_search,
    without_self,
)
from .features import as_float32, hvg_pca, pca_recipe
from .sampling import stratified_cap

RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))
ROOT_RULES = ("first", "robust")
GRAPH_FEATURES = ("raw", "pca50")
REFERENCE_HVG_GENES = 2500  # the paper's highly_variable_genes(n_top_genes=2500)
MAX_TIME_LEVELS = 50  # more distinct time values than this are strata of quantile bins when capping
TIME_BINS = 20


# ---------------------------------------------------------------- time and roots


def time_values(values: pd.Series, key: str) -> np.ndarray:
    """Time as float64 ``[n]``: numeric values, or the codes of an *ordered* categorical; NaN = missing.

    Anything else (strings, unordered categoricals, datetimes) raises :class:`ProbeError` saying what
    to pass instead.
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        if not values.cat.ordered:
            cats = ", ".join(map(str, values.cat.categories[:8]))
            msg = (
                f"task trajectory: time column {key!r} is an unordered categorical ({cats}); make it ordered "
                f"(obs[{key!r}] = obs[{key!r}].cat.reorder_categories([earliest, ..., latest], ordered=True)) "
                "or numeric (e.g. days)"
            )
            raise ProbeError(msg)
        codes = values.cat.codes.to_numpy().astype(np.float64)
        codes[codes < 0] = np.nan
        return codes
    if pd.api.types.is_numeric_dtype(values.dtype):
        t = values.to_numpy(dtype=np.float64, na_value=np.nan)
        t[~np.isfinite(t)] = np.nan
        return t
    msg = (
        f"task trajectory: time column {key!r} has dtype {values.dtype}, which has no order; pass a numeric "
        f"column (e.g. days) or an ordered categorical (pd.Categorical(values, categories=[earliest, ..., "
        "latest], ordered=True))"
    )
    raise ProbeError(msg)


def time_strata(t: np.ndarray) -> np.ndarray:
    """Strata for capping: the time values themselves, or ``TIME_BINS`` quantile bins when time is continuous."""
    if len(np.unique(t)) <= MAX_TIME_LEVELS:
        return t
    return pd.qcut(t, q=TIME_BINS, labels=False, duplicates="drop").astype(np.int64)


def root_candidates(t: np.ndarray, n_roots: int) -> np.ndarray:
    """Positions ``root="robust"`` draws its roots from: the cells at the minimum time, or the ``n_roots``
    earliest cells (stable order) when fewer share it (continuous time)."""
    earliest = np.flatnonzero(t == np.min(t))
    if len(earliest) < n_roots:
        earliest = np.argsort(t, kind="stable")[:n_roots]
    return earliest.astype(np.int64)


def choose_roots(t: np.ndarray, rule: str, n_roots: int, seed: int | np.random.SeedSequence) -> np.ndarray:
    """Root positions (sorted) for DPT from time ``t [n]``.

    ``"first"`` (the paper): the first cell, in row order, at the minimum time. ``"robust"``: ``n_roots``
    cells drawn at random (``seed``) from :func:`root_candidates`; the pseudotime is then averaged over them.
    """
    if rule == "first":
        return np.flatnonzero(t == np.min(t))[:1].astype(np.int64)
    if rule != "robust":
        msg = f"root must be one of {', '.join(ROOT_RULES)}, got {rule!r}"
        raise ValueError(msg)
    candidates = root_candidates(t, n_roots)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(n_roots, len(candidates)), replace=False)).astype(np.int64)


def bootstrap_roots(t: np.ndarray, n_roots: int, n_boot: int, seed: int | np.random.SeedSequence) -> np.ndarray:
    """``[n_boot, min(n_roots, candidates)]``: the roots every bootstrap replicate of ``root="robust"`` draws
    (sorted per replicate), from the same :func:`root_candidates` as the point estimate."""
    candidates = root_candidates(t, n_roots)
    k = min(n_roots, len(candidates))
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, k), dtype=np.int64)
    for b in range(n_boot):
        out[b] = np.sort(rng.choice(candidates, size=k, replace=False))
    return out


# ---------------------------------------------------------------- metric functions (last axis = cells)


def r2(y: np.ndarray, y_hat: np.ndarray) -> np.ndarray | float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` along the last axis (NaN when ``y`` is constant)."""
    y = np.asarray(y, dtype=np.float64)
    ss_res = ((y - y_hat) ** 2).sum(axis=-1)
    ss_tot = ((y - y.mean(axis=-1, keepdims=True)) ** 2).sum(axis=-1)
    out = np.divide(ss_res, ss_tot, out=np.full_like(ss_res, np.nan), where=ss_tot > 0)
    out = 1.0 - out
    return float(out) if out.ndim == 0 else out


def mean_pair_gap(t: np.ndarray) -> np.ndarray | float:
    """Mean ``|t_i - t_j|`` over all pairs ``i != j`` along the last axis (exact, from the sorted values)."""
    s = np.sort(np.asarray(t, dtype=np.float64), axis=-1)
    n = s.shape[-1]
    k = np.arange(1, n + 1, dtype=np.float64)
    total = (s * (2.0 * k - n - 1.0)).sum(axis=-1)
    out = total / (n * (n - 1) / 2.0) if n > 1 else np.full(s.shape[:-1], np.nan)
    return float(out) if np.ndim(out) == 0 else out


def neighbour_gaps(t: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per cell, mean ``|t_i - t_j|`` over its neighbours ``indices [n, k]``."""
    return np.abs(t[:, None] - t[indices]).mean(axis=1)


def time_smoothness(gaps: np.ndarray, t: np.ndarray) -> np.ndarray | float:
    """Mean neighbour time gap over the mean gap of all pairs (0 = neighbours share time, ~1 = random)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(gaps, dtype=np.float64).mean(axis=-1) / mean_pair_gap(t)


# ---------------------------------------------------------------- bootstrap replicates (see :mod:`.correlation`)


def r2_boot(y: np.ndarray, y_hat: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``r2(y[idx], y_hat[idx])`` for every replicate, from ``counts``."""
    m = counts.sum(axis=1)
    yc = np.asarray(y, dtype=np.float64) - np.mean(y)  # centred first: no cancellation in ss_tot
    ss_res = counts @ (yc - (y_hat - np.mean(y))) ** 2
    ss_tot = counts @ (yc * yc) - (counts @ yc) ** 2 / m
    return 1.0 - np.divide(ss_res, ss_tot, out=np.full_like(ss_res, np.nan), where=ss_tot > 0)


def time_smoothness_boot(gaps: np.ndarray, t: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``time_smoothness(gaps[idx], t[idx])`` for every replicate, from ``counts``."""
    m = counts.sum(axis=1)
    order = np.argsort(t, kind="stable")
    c = counts[:, order]
    before = np.cumsum(c, axis=1) - c
    pair_sum = (c * (2.0 * before + c - m[:, None])) @ t[order]  # sum over i < j of the sorted resample
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((counts @ gaps) / m) / (pair_sum / (m * (m - 1) / 2.0))


def bootstrap_replicates(
    statistics: dict[str, Callable[[np.ndarray], np.ndarray]], boot: np.ndarray, n: int, block: int = 2_000_000
) -> dict[str, np.ndarray]:
    """Replicates ``[B]`` of every ``statistic(counts)`` over ``boot [B, m]`` resamples of ``n`` cells.

    Replicates are processed in blocks of about ``block`` counts to bound memory.
    """
    out: dict[str, list[np.ndarray]] = {k: [] for k in statistics}
    step = max(1, block // max(n, 1))
    for start in range(0, boot.shape[0], step):
        counts = boot_counts(boot[start : start + step], n)
        for k, fn in statistics.items():
            out[k].append(fn(counts))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def dpt_root_replicates(
    dm: DiffusionMap,
    reference: DiffusionMap | None,
    t: np.ndarray,
    boot: np.ndarray,
    boot_roots: np.ndarray,
    n_dcs: int,
) -> dict[str, np.ndarray]:
    """Replicates ``[B]`` of the DPT metrics when every replicate also draws its roots (``root="robust"``).

    Replicate ``b`` is the Spearman, over the cells ``boot[b]``, of the pseudotime averaged over the roots
    ``boot_roots[b]`` against time (``dpt_spearman_time``) and against the reference DPT from the same roots
    (``dpt_spearman_reference``, when ``reference`` is given).
    """
    n = dm.eigenvectors.shape[0]
    out = {"dpt_spearman_time": np.empty(boot.shape[0])}
    if reference is not None:
        out["dpt_spearman_reference"] = np.empty(boot.shape[0])
    for b in range(boot.shape[0]):
        counts = boot_counts(boot[b : b + 1], n)
        pt = dpt_pseudotime(dm, boot_roots[b], n_dcs)
        out["dpt_spearman_time"][b] = spearman_boot(pt, t, counts)[0]
        if reference is not None:
            ref = dpt_pseudotime(reference, boot_roots[b], n_dcs)
            out["dpt_spearman_reference"][b] = spearman_boot(pt, ref, counts)[0]
    return out


def ridge_cv_predict(
    X: np.ndarray,
    y: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    alphas: Sequence[float] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold predictions of ``make_pipeline(StandardScaler(), RidgeCV(alphas))`` and each fold's alpha.

    The same estimator as scikit-learn's (penalised coefficients, free intercept, alpha chosen per training
    fold by the efficient leave-one-out squared error, first alpha on ties), computed from one symmetric
    eigendecomposition per fold (the smaller of ``A^T A`` and ``A A^T``) instead of an SVD: an order of
    magnitude faster on wide layers. ``X [n, p]``, ``y [n]``; ``folds`` as from ``KFold.split``.
    """
    y = np.asarray(y, dtype=np.float64)
    pred = np.empty(len(y), dtype=np.float64)
    chosen = np.empty(len(folds), dtype=np.float64)
    alphas = np.asarray(alphas, dtype=np.float64)
    for f, (train, test) in enumerate(folds):
        A = np.asarray(X[train], dtype=np.float64)
        mu = A.mean(axis=0)
        sd = A.std(axis=0)
        sd[sd < 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mu))] = 1.0  # constant: StandardScaler
        A -= mu
        A /= sd
        y_mean = y[train].mean()
        yc = y[train] - y_mean
        n, p = A.shape
        if n <= p:
            s2, U = np.linalg.eigh(A @ A.T)
        else:
            s2, V = np.linalg.eigh(A.T @ A)
            keep = s2 > s2.max() * 1e-12
            s2, V = s2[keep], V[:, keep]
            U = (A @ V) / np.sqrt(s2)
        s2 = np.maximum(s2, 0.0)
        U2 = U * U
        Uty = U.T @ yc
        loo = []
        for a in alphas:
            shrink = s2 / (s2 + a)
            resid = yc - U @ (shrink * Uty)
            hat = 1.0 / n + U2 @ shrink
            loo.append(np.mean((resid / (1.0 - hat)) ** 2))
        best = alphas[int(np.argmin(loo))]
        coef = A.T @ (U @ (Uty / (s2 + best)))
        pred[test] = ((np.asarray(X[test], dtype=np.float64) - mu) / sd) @ coef + y_mean
        chosen[f] = best
    return pred, chosen


# ---------------------------------------------------------------- the task


@dataclass(frozen=True)
class TrajectoryTask(Task):
    """Trajectory probe: DPT pseudotime and ridge regression of time, per context and layer.

    ``time_key`` holds real time (numeric, or an ordered categorical whose codes are used); cells
    without a time are dropped. The defaults are the paper's method (module docstring):

    - ``root``: ``"first"``, the first cell in the AnnData's order at the earliest time (kept even when
      ``max_cells`` subsamples); ``"robust"`` averages the pseudotime over ``n_roots`` random earliest
      cells (protocol §2.2; layer-independent, so every layer uses the same roots, and the bootstrap
      redraws them per replicate);
    - ``kernel``: ``"umap"`` (scanpy's default connectivities) or ``"gauss"``;
    - ``features``: the layer's graph on its ``"raw"`` activations (the paper) or on ``"pca50"``
      (StandardScaler -> PCA(50), so a few huge residual-stream dimensions cannot dominate distances);
    - ``hvg_genes``: highly variable genes of the HVG-PCA(50) reference (2,500; the other tasks' baselines
      use 2,000).

    ``max_cells`` caps each context, stratified by time (DPT needs an eigendecomposition over all its
    cells); ``ridge_max_cells`` caps the ridge fits again, likewise.
    """

    name: ClassVar[str] = "trajectory"

    time_key: str
    context_key: str | None = None
    n_neighbors: int = 30
    n_comps: int = 15
    n_dcs: int = 10
    root: str = "first"
    n_roots: int = 5
    kernel: str = "umap"
    features: str = "raw"
    hvg_genes: int = REFERENCE_HVG_GENES
    max_cells: int | None = 50_000
    ridge_max_cells: int | None = 20_000
    n_boot: int = 200
    seed: int = 0
    ridge_folds: int = 5
    smoothness_k: int = 15

    def __post_init__(self) -> None:
        """Refuse impossible settings, all at once, with a :class:`ConfigError`."""
        problems = []
        for name, allowed in (("root", ROOT_RULES), ("kernel", KERNELS), ("features", GRAPH_FEATURES)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.n_neighbors < 2:
            problems.append(f"n_neighbors must be at least 2, got {self.n_neighbors}")
        if self.n_comps < 3:
            problems.append(f"n_comps must be at least 3 (as sc.tl.diffmap), got {self.n_comps}")
        if not 2 <= self.n_dcs <= self.n_comps:
            problems.append(f"n_dcs must be between 2 and n_comps ({self.n_comps}), got {self.n_dcs}")
        for name in ("n_roots", "smoothness_k", "hvg_genes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ridge_folds < 2:
            problems.append(f"ridge_folds must be at least 2, got {self.ridge_folds}")
        if self.n_boot < 0:
            problems.append(f"n_boot must be >= 0, got {self.n_boot}")
        for name in ("max_cells", "ridge_max_cells"):
            cap = getattr(self, name)
            if cap is not None and cap < self.min_cells:
                problems.append(f"{name} must be at least 3 * n_neighbors = {self.min_cells}, got {cap}")
        if problems:
            raise ConfigError("trajectory task: " + "; ".join(problems))

    @property
    def primary_metric(self) -> str:
        """Layers are ranked by the Spearman of their DPT against real time."""
        return "dpt_spearman_time"

    @property
    def min_cells(self) -> int:
        """Fewest cells a context needs: three times the neighbourhood size."""
        return 3 * self.n_neighbors

    def required_columns(self) -> list[str]:
        """The time column, and the context column when there is one."""
        return [self.time_key] + ([self.context_key] if self.context_key is not None else [])

    def plan(self, obs: pd.DataFrame, *, chunk_cells: int) -> list[ContextPlan]:
        """One plan per context: cells with a time, capped at ``max_cells`` stratified by time."""
        require_columns(obs, self.required_columns(), self.name)
        time = time_values(obs[self.time_key], self.time_key)

        def plan_one(context: str, rows: np.ndarray) -> ContextPlan:  # too small: skipped (plan_contexts)
            t = time[rows]
            has_time = ~np.isnan(t)
            self._check_context(context, t[has_time], len(rows))
            rows, t = rows[has_time], t[has_time]
            keep, report = stratified_cap(
                time_strata(t), max_per_class=None, max_total=self.max_cells, seed=self._seed(context, "cap")
            )
            if self.root == "first":  # the paper's root survives subsampling
                keep = np.union1d(keep, choose_roots(t, "first", 1, 0))
            report.update(n_used=len(keep), n_in_context=len(has_time), n_missing_time=int((~has_time).sum()))
            sel = rows[keep]
            return ContextPlan(self.name, context, sel, obs.iloc[sel][self.required_columns()], caps=report)

        return plan_contexts(self.name, obs, self.context_key, plan_one)

    def prepare(self, plan: ContextPlan, counts: sp.csr_matrix | None, var_names: Sequence[str]) -> None:
        """HVG-PCA(50) reference (``hvg_genes`` genes), its DPT, and the layer-independent draws (:meth:`draws`).

        The reference DPT is built on the reference PCs as they are (the paper's ``use_rep="X_pca"``), from
        the same roots and with the same graph settings (``n_neighbors``, ``kernel``) as every layer.
        """
        where = f"task trajectory, context {plan.context!r}"
        if counts is None:
            raise ProbeError(f"{where}: needs the counts for its HVG-PCA reference")
        if counts.shape[0] != plan.n_cells:
            msg = f"counts have {counts.shape[0]} rows for a plan of {plan.n_cells} cells"
            raise ValueError(msg)
        draws = self.draws(plan)
        try:
            baseline = hvg_pca(counts, n_top=self.hvg_genes, seed=self.seed)
        except ProbeError as err:
            raise ProbeError(f"{where}: the HVG-PCA reference pseudotime cannot be built: {err}") from None
        dm = self._diffusion_map(baseline)
        reference = dpt_pseudotime(dm, draws["roots"], self.n_dcs)
        plan.reference.update(draws, baseline=baseline, reference_dpt=reference)
        if "boot_roots" in draws:
            plan.reference["reference_dm"] = dm

    def draws(self, plan: ContextPlan) -> dict[str, np.ndarray]:
        """What every layer of a context shares, drawn from the task seed and the context only.

        ``roots`` (positions, :func:`choose_roots`), ``boot`` ``[n_boot, n_cells]`` bootstrap indices,
        ``ridge_rows`` (positions the ridge fits use: all, or ``ridge_max_cells`` stratified by time),
        ``ridge_boot`` (bootstrap indices into ``ridge_rows``) and, with ``root="robust"``, ``boot_roots``
        ``[n_boot, n_roots]`` (:func:`bootstrap_roots`). Taken from ``plan.reference`` when :meth:`prepare`
        has stored them.
        """
        keys = ("roots", "boot", "ridge_rows", "ridge_boot") + (("boot_roots",) if self.root == "robust" else ())
        if all(k in plan.reference for k in keys):
            return {k: plan.reference[k] for k in keys}
        t = time_values(plan.obs[self.time_key], self.time_key)
        roots = choose_roots(t, self.root, self.n_roots, plan.seed_for(self.seed, "roots"))
        boot = bootstrap_indices(plan.n_cells, self.n_boot, plan.seed_for(self.seed, "boot"))
        if self.ridge_max_cells is None or plan.n_cells <= self.ridge_max_cells:
            ridge_rows, ridge_boot = np.arange(plan.n_cells, dtype=np.int64), boot
        else:
            seed = plan.seed_for(self.seed, "ridge")
            ridge_rows, _ = stratified_cap(
                time_strata(t), max_per_class=None, max_total=self.ridge_max_cells, seed=seed
            )
            ridge_boot = bootstrap_indices(len(ridge_rows), self.n_boot, plan.seed_for(self.seed, "ridge-boot"))
        out = {"roots": roots, "boot": boot, "ridge_rows": ridge_rows, "ridge_boot": ridge_boot}
        if self.root == "robust":
            out["boot_roots"] = bootstrap_roots(t, self.n_roots, self.n_boot, plan.seed_for(self.seed, "boot-roots"))
        return out

    def metric_specs(self, plan: ContextPlan) -> list[MetricSpec]:
        """The metrics of one layer (graph metrics on the ``features`` recipe)."""
        return self._specs(plan, self.features)

    def _specs(self, plan: ContextPlan, graph_recipe: str) -> list[MetricSpec]:
        """Names, cells, replicate counts and recipes of the metrics, in order; ``dpt_spearman_reference``
        only when :meth:`prepare` has stored a reference."""
        d = self.draws(plan)
        n_boot, n_ridge_boot = len(d["boot"]) or None, len(d["ridge_boot"]) or None
        n_ridge = len(d["ridge_rows"])
        reference = "reference_dpt" in plan.reference
        specs = [
            MetricSpec("dpt_spearman_time", plan.n_cells, n_boot, graph_recipe),
            *([MetricSpec("dpt_spearman_reference", plan.n_cells, n_boot, graph_recipe)] if reference else []),
            MetricSpec("ridge_r2", n_ridge, n_ridge_boot, "std"),
            MetricSpec("ridge_spearman", n_ridge, n_ridge_boot, "std"),
            MetricSpec("time_smoothness", plan.n_cells, n_boot, graph_recipe, higher_is_better=False),
        ]
        return specs

    def evaluate(self, plan: ContextPlan, X: np.ndarray) -> list[Metric]:
        """The metrics of one layer from its raw features ``X [plan.n_cells, W]``.

        The graph metrics use ``X`` itself (``features="raw"``, recorded as ``raw``) or its ``pca50`` recipe;
        ridge metrics standardise ``X`` per training fold. ``dpt_spearman_reference`` is left out when
        :meth:`prepare` has not stored a reference.
        """
        X = as_float32(X)
        F = X if self.features == "raw" else pca_recipe(X, seed=self.seed)
        return self._evaluate(plan, X, F, self.features)

    def evaluate_baseline(self, plan: ContextPlan) -> list[Metric]:
        """The metrics of the HVG-PCA(50) reference, its graph built on the PCs as they are (recipe ``none``).

        That is the reference DPT's own graph (so ``dpt_spearman_reference`` is 1): the ``pca50`` recipe
        would standardise the 50 PCs and give the noise PCs the weight of the leading ones.
        """
        baseline = as_float32(plan.reference["baseline"])
        return self._evaluate(plan, baseline, baseline, "none")

    def _diffusion_map(self, F: np.ndarray, neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> DiffusionMap:
        """The diffusion map of the ``n_neighbors`` graph of ``F`` (``neighbours``: its :func:`knn_search`
        lists when already found) with the task's kernel."""
        indices, distances = knn_search(F, self.n_neighbors) if neighbours is None else neighbours
        W = connectivities(indices, distances, self.n_neighbors, self.kernel)
        return diffusion_map(W, self.n_comps, self.seed)

    def _evaluate(self, plan: ContextPlan, X: np.ndarray, F: np.ndarray, graph_recipe: str) -> list[Metric]:
        """Metrics from raw features ``X`` (ridge) and graph features ``F`` (DPT, smoothness)."""
        if X.shape[0] != plan.n_cells:
            msg = f"layer has {X.shape[0]} rows for a plan of {plan.n_cells} cells"
            raise ValueError(msg)
        t = time_values(plan.obs[self.time_key], self.time_key)
        d = self.draws(plan)

        neighbours = knn_search(F, self.n_neighbors)
        dm = self._diffusion_map(F, neighbours)
        indices, _ = without_self(*neighbours)
        pt = dpt_pseudotime(dm, d["roots"], self.n_dcs)
        k = self.smoothness_k
        gaps = neighbour_gaps(t, indices[:, :k] if k < self.n_neighbors else knn_graph(F, k + 1)[0])
        values = {"dpt_spearman_time": spearman(pt, t), "time_smoothness": time_smoothness(gaps, t)}
        stats = {
            "dpt_spearman_time": lambda c: spearman_boot(pt, t, c),
            "time_smoothness": lambda c: time_smoothness_boot(gaps, t, c),
        }
        if "reference_dpt" in plan.reference:
            r = plan.reference["reference_dpt"]
            values["dpt_spearman_reference"] = spearman(pt, r)
            stats["dpt_spearman_reference"] = lambda c: spearman_boot(pt, r, c)
        if "boot_roots" in d:  # root="robust": every replicate draws its roots too
            for name in ("dpt_spearman_time", "dpt_spearman_reference"):
                stats.pop(name, None)
        reps = bootstrap_replicates(stats, d["boot"], plan.n_cells)
        if "boot_roots" in d:
            ref_dm = plan.reference.get("reference_dm") if "reference_dpt" in plan.reference else None
            reps.update(dpt_root_replicates(dm, ref_dm, t, d["boot"], d["boot_roots"], self.n_dcs))

        rows, tr = d["ridge_rows"], t[d["ridge_rows"]]
        folds = list(KFold(self.ridge_folds, shuffle=True, random_state=self.seed).split(rows))
        pred, alphas = ridge_cv_predict(X[rows], tr, folds, RIDGE_ALPHAS)
        values.update(ridge_r2=r2(tr, pred), ridge_spearman=spearman(pred, tr))
        ridge_stats = {
            "ridge_r2": lambda c: r2_boot(tr, pred, c),
            "ridge_spearman": lambda c: spearman_boot(pred, tr, c),
        }
        reps.update(bootstrap_replicates(ridge_stats, d["ridge_boot"], len(rows)))

        graph = {"n_graph_components": float(dm.n_components), "frac_unreachable": float(np.isinf(pt).mean())}
        fit = {"alpha_median": float(np.median(alphas))}
        extra = {"dpt_spearman_time": graph, "dpt_spearman_reference": graph, "ridge_r2": fit, "ridge_spearman": fit}
        return [
            Metric(
                plan.context,
                spec.name,
                cast(float, values[spec.name]),  # 1-D inputs: a float (numpy's float64)
                spec.n_cells,
                replicates=reps[spec.name] if len(reps[spec.name]) else None,
                higher_is_better=spec.higher_is_better,
                features=spec.features,
                extra=dict(extra.get(spec.name, {})),
            )
            for spec in self._specs(plan, graph_recipe)
        ]

    # ------------------------------------------------------------ helpers

    def _seed(self, context: str, *salt: str) -> np.random.SeedSequence:
        """The plan seed of ``context`` before its plan exists."""
        return ContextPlan(self.name, context, np.zeros(0, np.int64), pd.DataFrame()).seed_for(self.seed, *salt)

    def _check_context(self, context: str, t: np.ndarray, n_total: int) -> None:
        """Refuse (:class:`SmallContextError`: skipped) a context without enough timed cells or time points."""
        where = f"context {context!r}"
        if len(t) == 0:
            reason = f"{where}: none of its {n_total} cells has a time in {self.time_key!r} (all NaN)"
            raise SmallContextError(self.name, reason)
        if len(t) < self.min_cells:
            reason = (
                f"{where}: {len(t)} cells with a time ({n_total} in all); DPT on a {self.n_neighbors}-neighbour "
                f"graph needs at least {self.min_cells}"
            )
            value = len(t) // 3 if len(t) >= 6 else None  # min_cells = 3 * n_neighbors, n_neighbors >= 2
            raise SmallContextError(self.name, reason, setting=f"{self.name}.n_neighbors", value=value)
        if len(np.unique(t)) < 2:
            reason = f"{where}: all {len(t)} cells have the same time ({t[0]:g}) in {self.time_key!r}; need two or more"
            raise SmallContextError(self.name, reason)
