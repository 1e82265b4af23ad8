"""Perturbation response per layer and cell state (protocol §1.5, §1.7, §2.3): similarity, detection, E-tests.

Per context (e.g. Rest / Stim8hr / Stim48hr) the task keeps, as the paper did, every cell of every
perturbation with at least ``min_cells`` (5) cells and every control cell (caps are options, reported when
set), and reports for every layer:

- ``semantic_similarity``: the paper's number (v1), Spearman between the upper triangles of the cosine
  similarities of raw layer centroids and of raw-count DE profiles (rank cosine of Welch-t top genes).
  Its reference is computed from the very cells that were embedded and the centroids are not
  control-subtracted, so it is circular and dominated by the shared mean (§1.7.3). Kept for comparability.
- ``semantic_similarity_delta`` (primary): cosine similarities of control-subtracted centroid shifts
  ``c_p - c_ctrl`` of standardised features on one half of every group's cells, against cosine
  similarities of log1p-CPM mean shifts from the *other* half; the agreement is Spearman (a rank statistic:
  similarities in a layer and in expression space need not be linearly related).
- ``auroc_median`` / ``auroc_frac_above_0_6``: per perturbation, balanced perturbed-vs-control logistic
  regression (standardised, 5-fold out-of-fold scores) ROC AUC, summarised over perturbations.
- ``energy_fraction_significant`` / ``energy_distance_ratio``: scPerturb E-distance (squared Euclidean,
  ``N(N-1)`` within-group terms) on pca50 features, with a permutation E-test per perturbation against
  the controls (BH FDR 0.05), on a fixed random subsample of at most ``energy_max_cells_per_perturbation``
  cells per perturbation and ``energy_max_control_cells`` controls (the E-tests cost ``O(n)`` per
  permutation and perturbation; the subsample is stated in the report); and the median ``E(P, C)`` over
  the controls' mean within-group squared distance ``2 tr(Cov_ctrl)``, i.e. about
  ``||mu_P - mu_C||^2 / tr(Cov_ctrl)``, a scale-free squared signal-to-noise. (The E-distance between
  two halves of the controls is no usable denominator: with the ``N(N-1)`` correction it is an unbiased
  estimate of 0; it is reported as ``extra['control_halves_ratio']``.)

Every metric is higher-is-better and has bootstrap-over-perturbations replicates (the same resamples for
every layer). Both similarity metrics also get a label-permutation null (``p_perm``, ``z_perm``);
``extra['p_analytic']`` is the paper's Spearman p-value, which treats the ``P (P - 1) / 2`` pairs of
``P`` perturbations as independent and is far too small.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..engine.errors import ProbeError
from .base import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_SEED,
    ContextPlan,
    Metric,
    MetricSpec,
    SmallContextError,
    Task,
    plan_contexts,
    require_columns,
)
from .confidence import bootstrap_indices, percentile_ci, permutation_test
from .features import as_float32, hvg_pca, log1p_cpm, pca_recipe
from .perturbation_metrics import (
    analytic_p_value,
    bootstrap_agreement,
    centroid_agreement_null,
    centroid_similarity,
    energy_test,
    fraction_significant,
    fraction_significant_rows,
    mean_within_distance,
    oof_auroc,
    paper_de_similarity,
    permuted_codes,
    shift_similarity,
    similarity_agreement,
)
from .sampling import random_cap, stratified_cap

MIN_PERTURBATIONS = 3  # a similarity matrix needs 3 perturbations for more than one pair
MIN_CELLS = 4  # each half of a group needs 2 cells (the delta metric's disjoint halves)
AUROC_FOLDS = 5
AUROC_THRESHOLD = 0.6
FDR_ALPHA = 0.05
CELL_CAPS = (
    "max_cells_per_perturbation",
    "max_control_cells",
    "energy_max_cells_per_perturbation",
    "energy_max_control_cells",
)


@dataclass(frozen=True)
class PerturbationTask(Task):
    """Perturbation-response probes per context of ``context_key`` (protocol §2.3).

    The primary metric is ``semantic_similarity_delta``: the paper's ``semantic_similarity`` correlates
    centroids of cells with a reference computed from the counts of the *same* cells (shared sampling
    noise inflates it), without control subtraction (every raw centroid is mostly the common mean). The
    delta version compares control-subtracted shifts with a reference from disjoint cells.

    Settings: perturbations with fewer than ``min_cells`` cells in a context are dropped (reported in
    ``plan.caps``); by default every other cell is used, as the paper did (perturbations with >= 5 cells,
    all controls). Optional caps: at most ``max_perturbations`` perturbations (random), at most
    ``max_cells_per_perturbation`` cells each and ``max_control_cells`` controls; the caps set are listed
    in ``plan.caps['caps']`` (and so in the report). ``n_top_genes`` is the per-perturbation DE gene
    count of both references. AUROC uses perturbations with at least ``auroc_min_cells`` cells and a
    balanced sample of at most ``auroc_max_cells`` cells per class; the E-tests at most
    ``energy_max_cells_per_perturbation`` cells per perturbation and ``energy_max_control_cells``
    controls (these metric subsamples are listed in ``plan.caps['metric_subsamples']``). ``n_boot`` bootstrap
    resamples of perturbations, ``n_permutations`` label permutations (similarity nulls and every E-test).
    The smallest E-test p-value is ``1 / (n_permutations + 1)``, so BH at 0.05 can call perturbations only
    when at least ``P / (0.05 (n_permutations + 1))`` of them reach it: use ``n_permutations >= 20 P`` when
    single strong perturbations among many must count.
    """

    name: ClassVar[str] = "perturbation"

    perturbation_key: str = "perturbation"
    control: str = "control"
    context_key: str | None = None
    min_cells: int = 5
    max_perturbations: int | None = None
    max_cells_per_perturbation: int | None = None
    max_control_cells: int | None = None
    n_top_genes: int = 500
    n_boot: int = DEFAULT_BOOTSTRAP
    n_permutations: int = 200
    auroc_min_cells: int = 20
    auroc_max_cells: int = 200
    energy_max_cells_per_perturbation: int | None = 500
    energy_max_control_cells: int | None = 2000
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        problems = []
        if self.min_cells < MIN_CELLS:
            problems.append(f"min_cells={self.min_cells} (need >= {MIN_CELLS}: each half of a group needs 2 cells)")
        if self.max_perturbations is not None and self.max_perturbations < MIN_PERTURBATIONS:
            problems.append(f"max_perturbations={self.max_perturbations} (need >= {MIN_PERTURBATIONS} or None)")
        for field in CELL_CAPS:
            if getattr(self, field) is not None and getattr(self, field) < self.min_cells:
                problems.append(f"{field}={getattr(self, field)} (need >= min_cells={self.min_cells})")
        if self.auroc_min_cells < 2 * AUROC_FOLDS:
            problems.append(f"auroc_min_cells={self.auroc_min_cells} (need >= {2 * AUROC_FOLDS} for 5-fold CV)")
        if self.auroc_max_cells < self.auroc_min_cells:
            problems.append(f"auroc_max_cells={self.auroc_max_cells} (need >= auroc_min_cells)")
        if self.n_top_genes < 1:
            problems.append(f"n_top_genes={self.n_top_genes} (need >= 1)")
        for field in ("n_boot", "n_permutations"):
            if getattr(self, field) < 0:
                problems.append(f"{field}={getattr(self, field)} (need >= 0)")
        if problems:
            raise ProbeError(f"task {self.name}: invalid settings: " + "; ".join(problems))

    @property
    def primary_metric(self) -> str:
        return "semantic_similarity_delta"

    def required_columns(self) -> list[str]:
        return [c for c in (self.perturbation_key, self.context_key) if c]

    # -- plan ------------------------------------------------------------------------------------

    def plan(self, obs: pd.DataFrame, *, chunk_cells: int) -> list[ContextPlan]:
        """Per context: every control and every perturbation with ``>= min_cells`` cells (caps if set).

        A context with too few controls or perturbations is skipped with a warning (:func:`plan_contexts`);
        a control label found in no context at all is an error. ``chunk_cells`` is not needed: the caps
        are stratified by perturbation, not by store chunk.
        """
        require_columns(obs, self.required_columns(), self.name)
        labels = obs[self.perturbation_key]
        has = labels.notna().to_numpy()
        labels = labels.astype(str).to_numpy()
        if not (labels[has] == self.control).any():
            raise ProbeError(self._no_control_message(labels[has]))

        def plan_one(context: str, rows: np.ndarray) -> ContextPlan:
            return self._plan_context(obs, context, rows[has[rows]], labels[rows[has[rows]]])

        return plan_contexts(self.name, obs, self.context_key, plan_one)

    def _plan_context(self, obs: pd.DataFrame, context: str, rows: np.ndarray, labels: np.ndarray) -> ContextPlan:
        where = f" in context {context!r}" if self.context_key else ""
        is_control = labels == self.control
        n_control = int(is_control.sum())
        if n_control == 0:
            raise SmallContextError(self.name, self._no_control_reason(labels, where))
        sizes = pd.Series(labels[~is_control]).value_counts()
        kept, dropped = sizes[sizes >= self.min_cells], sizes[sizes < self.min_cells]
        if n_control < self.min_cells:
            reason = (
                f"only {n_control} control cells ({self.perturbation_key}={self.control!r}){where}; need at least "
                f"min_cells={self.min_cells}"
            )
            raise self._small(reason, n_control, sizes)
        if len(kept) < MIN_PERTURBATIONS:
            largest = ", ".join(f"{k}: {v}" for k, v in sizes.head(6).items()) or "none"
            reason = (
                f"only {len(kept)} of {len(sizes)} perturbations{where} have at least min_cells={self.min_cells} "
                f"cells (largest: {largest}); the similarity metrics need {MIN_PERTURBATIONS}"
            )
            raise self._small(reason, n_control, sizes)
        names = np.sort(kept.index.to_numpy().astype(str))
        unselected = 0
        if self.max_perturbations is not None and len(names) > self.max_perturbations:
            rng = np.random.default_rng(_seed(self.seed, self.name, context, "perturbations"))
            chosen = np.sort(rng.choice(len(names), size=self.max_perturbations, replace=False))
            unselected = len(names) - len(chosen)
            names = names[chosen]
        control_rows = rows[is_control]
        control_rows = control_rows[
            random_cap(n_control, self.max_control_cells, _seed(self.seed, self.name, context, "cap-control"))
        ]
        in_set = np.isin(labels, names)
        pos, report = stratified_cap(
            labels[in_set],
            max_per_class=self.max_cells_per_perturbation,
            max_total=None,
            seed=_seed(self.seed, self.name, context, "cap"),
        )
        chosen_rows = np.sort(np.concatenate([control_rows, rows[in_set][pos]]))
        sizes_used = sizes[names]
        if self.max_cells_per_perturbation is not None:
            after_caps = sizes_used.clip(upper=self.max_cells_per_perturbation)
        else:
            after_caps = sizes_used
        caps = {
            "n_available": len(labels),
            "n_used": len(chosen_rows),
            "subsampled": bool(unselected or len(control_rows) < n_control or report["n_used"] < in_set.sum()),
            "n_perturbations": len(names),
            "perturbations": [str(x) for x in names],
            "dropped_perturbations": {str(k): int(v) for k, v in dropped.items()},
            "n_unselected_perturbations": int(unselected),
            "n_control_available": n_control,
            "n_control_used": len(control_rows),
            "n_perturbed_available": int(in_set.sum()),
            "n_perturbed_used": int(report["n_used"]),
            "min_cells": self.min_cells,
            "max_perturbations": self.max_perturbations,
            "max_cells_per_perturbation": self.max_cells_per_perturbation,
            "max_control_cells": self.max_control_cells,
            "caps": self._caps_in_use(len(kept), unselected, n_control, len(control_rows), sizes_used),
            "metric_subsamples": self._metric_subsamples(len(control_rows), after_caps),
        }
        return ContextPlan(task=self.name, context=context, rows=chosen_rows, obs=obs.iloc[chosen_rows], caps=caps)

    def _small(self, reason: str, n_control: int, sizes: pd.Series) -> SmallContextError:
        """The too-small error, with the largest ``min_cells`` that keeps the context (if any is allowed)."""
        third = int(sizes.iloc[MIN_PERTURBATIONS - 1]) if len(sizes) >= MIN_PERTURBATIONS else 0
        value = min(n_control, third)
        return SmallContextError(
            self.name,
            reason,
            setting=f"{self.name}.min_cells",
            value=value if value >= MIN_CELLS else None,
            otherwise=f"merge or drop this context (min_cells cannot go below {MIN_CELLS})",
        )

    def _caps_in_use(
        self, n_kept: int, unselected: int, n_control: int, n_control_used: int, sizes: pd.Series
    ) -> list[str]:
        """The caps that are set, each with what it did in this context (empty: every cell, as the paper)."""
        out = []
        if self.max_perturbations is not None:
            out.append(
                f"max_perturbations={self.max_perturbations}: {n_kept - unselected} of {n_kept} perturbations (random)"
            )
        if self.max_cells_per_perturbation is not None:
            n_capped = int((sizes > self.max_cells_per_perturbation).sum())
            out.append(
                f"max_cells_per_perturbation={self.max_cells_per_perturbation}: {n_capped} of {len(sizes)} "
                "perturbations subsampled"
            )
        if self.max_control_cells is not None:
            out.append(f"max_control_cells={self.max_control_cells}: {n_control_used} of {n_control} control cells")
        return out

    def _metric_subsamples(self, n_control: int, sizes: pd.Series) -> list[str]:
        """The fixed per-metric subsamples of the AUROC and E-tests (the similarity metrics use every cell)."""
        n_auroc = int((np.minimum(sizes, n_control) >= self.auroc_min_cells).sum())
        out = [
            f"auroc: {n_auroc} of {len(sizes)} perturbations (>= auroc_min_cells={self.auroc_min_cells} cells), "
            f"each a balanced sample of at most auroc_max_cells={self.auroc_max_cells} perturbed and as many "
            "control cells"
        ]
        cap_p, cap_c = self.energy_max_cells_per_perturbation, self.energy_max_control_cells
        n_capped = 0 if cap_p is None else int((sizes > cap_p).sum())
        used_c = n_control if cap_c is None else min(n_control, cap_c)
        out.append(
            f"energy: {n_capped} of {len(sizes)} perturbations subsampled to energy_max_cells_per_perturbation="
            f"{cap_p}, {used_c} of {n_control} controls (energy_max_control_cells={cap_c})"
        )
        return out

    def _no_control_message(self, labels: np.ndarray) -> str:
        return (
            f"task {self.name}: {self._no_control_reason(labels, '')}. Set `control` to the label of the control "
            "(non-targeting) cells"
        )

    def _no_control_reason(self, labels: np.ndarray, where: str) -> str:
        values = pd.Series(labels).value_counts()
        target = self.control.lower()
        order = sorted(values.index, key=lambda v: -difflib.SequenceMatcher(None, target, str(v).lower()).ratio())
        shown = ", ".join(f"{v!r} ({values[v]} cells)" for v in order[:10]) or "none"
        more = f" and {len(order) - 10} more" if len(order) > 10 else ""
        return (
            f"no cell has {self.perturbation_key}={self.control!r}{where}; the labels there are (closest first): "
            f"{shown}{more}"
        )

    # -- prepare ---------------------------------------------------------------------------------

    def prepare(self, plan: ContextPlan, counts: sp.csr_matrix | None, var_names: Sequence[str]) -> None:
        """Layer-independent references: codes, halves, both DE similarity matrices, resamples, seeds."""
        counts = self._check_counts(plan, counts, var_names)
        ref = plan.reference
        labels = plan.obs[self.perturbation_key].astype(str).to_numpy()
        names = list(plan.caps["perturbations"])
        P = len(names)
        codes = pd.Categorical(labels, categories=names).codes.astype(np.int64)  # control: -1
        paper_codes = np.where(codes >= 0, codes, P)  # control last, as the reference functions expect
        held_out = _half_split(paper_codes, plan.seed_for(self.seed, "halves"))

        ref["perturbations"] = names
        ref["codes"] = codes
        ref["held_out"] = held_out
        ref["baseline"] = hvg_pca(counts, seed=self.seed)
        ref["similarity_paper"], genes = paper_de_similarity(counts, paper_codes, P, self.n_top_genes)
        ref["n_genes_paper"] = len(genes)
        reference_half = np.where(held_out, -1, paper_codes)
        ref["similarity_delta"], genes = shift_similarity(log1p_cpm(counts), reference_half, P, self.n_top_genes)
        ref["n_genes_delta"] = len(genes)
        ref["boot"] = bootstrap_indices(P, self.n_boot, plan.seed_for(self.seed, "boot"))
        ref["null_seeds"] = {
            m: plan.seed_for(self.seed, "null", m).generate_state(4)
            for m in ("semantic_similarity", "semantic_similarity_delta")
        }
        ref["energy_seed"] = plan.seed_for(self.seed, "energy").generate_state(4)
        ref["energy_rows"] = self._energy_rows(plan, codes, P)
        ref["auroc"] = self._auroc_sets(plan, codes, names)
        controls = np.flatnonzero(codes[ref["energy_rows"]] < 0)  # positions among the E-test cells
        half = np.random.default_rng(plan.seed_for(self.seed, "control-halves")).permutation(controls)
        ref["control_halves"] = (np.sort(half[: len(half) // 2]), np.sort(half[len(half) // 2 :]))

    def _check_counts(
        self, plan: ContextPlan, counts: sp.spmatrix | np.ndarray | None, var_names: Sequence[str]
    ) -> sp.csr_matrix:
        if counts is None:
            msg = f"task {self.name} needs the raw counts of the plan's cells (its DE references come from them)"
            raise ProbeError(msg)
        csr = sp.csr_matrix(counts)
        if csr.shape[0] != plan.n_cells or csr.shape[1] != len(var_names):
            msg = (
                f"task {self.name}, context {plan.context!r}: counts are {csr.shape[0]} x {csr.shape[1]} "
                f"but the plan has {plan.n_cells} cells and there are {len(var_names)} gene names"
            )
            raise ProbeError(msg)
        if csr.nnz and (not np.isfinite(csr.data).all() or csr.data.min() < 0):
            msg = (
                f"task {self.name}: the counts have negative or non-finite values; the DE references need "
                "raw counts (use .raw or the counts layer)"
            )
            raise ProbeError(msg)
        return csr

    def _energy_rows(self, plan: ContextPlan, codes: np.ndarray, P: int) -> np.ndarray:
        """Sorted positions (into the plan) of the E-test cells: a fixed random subsample of at most
        ``energy_max_cells_per_perturbation`` cells per perturbation and ``energy_max_control_cells``
        controls (all cells when the caps are ``None`` or not reached)."""
        rng = np.random.default_rng(plan.seed_for(self.seed, "energy-cells"))
        parts = []
        for g in range(-1, P):
            members = np.flatnonzero(codes == g)
            cap = self.energy_max_control_cells if g < 0 else self.energy_max_cells_per_perturbation
            if cap is not None and len(members) > cap:
                members = rng.choice(members, cap, replace=False)
            parts.append(members)
        return np.sort(np.concatenate(parts)).astype(np.int64)

    def _auroc_sets(self, plan: ContextPlan, codes: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
        """Balanced perturbed/control samples and stratified fold ids, per eligible perturbation."""
        controls = np.flatnonzero(codes < 0)
        sets = []
        for p, name in enumerate(names):
            members = np.flatnonzero(codes == p)
            m = min(len(members), len(controls), self.auroc_max_cells)
            if min(len(members), len(controls)) < self.auroc_min_cells:
                continue
            rng = np.random.default_rng(plan.seed_for(self.seed, "auroc", name))
            cells = np.concatenate([rng.choice(members, m, replace=False), rng.choice(controls, m, replace=False)])
            folds = np.concatenate([rng.permutation(m) % AUROC_FOLDS, rng.permutation(m) % AUROC_FOLDS])
            y = np.repeat(np.array([1, 0], dtype=np.int64), m)
            sets.append({"perturbation": p, "cells": cells, "y": y, "folds": folds})
        return sets

    # -- evaluate --------------------------------------------------------------------------------

    def metric_specs(self, plan: ContextPlan) -> list[MetricSpec]:
        """The metrics of one layer, in :meth:`evaluate`'s order; replicates resample perturbations."""
        n_boot = len(plan.reference["boot"])
        cells = _metric_cells(plan)
        recipes = {
            "semantic_similarity": "raw",
            "semantic_similarity_delta": "std",
            "auroc_median": "std",
            "auroc_frac_above_0_6": "std",
            "energy_fraction_significant": "pca50",
            "energy_distance_ratio": "pca50",
        }
        return [MetricSpec(name, cells[name], n_boot, features) for name, features in recipes.items()]

    def evaluate(self, plan: ContextPlan, X: np.ndarray) -> list[Metric]:
        """All metrics of one layer (``X [plan.n_cells, W]`` in plan order)."""
        if X.shape[0] != plan.n_cells:
            msg = f"task {self.name}, context {plan.context!r}: got {X.shape[0]} feature rows for {plan.n_cells} cells"
            raise ProbeError(msg)
        try:
            X = as_float32(X)
        except ValueError as err:
            raise ProbeError(f"task {self.name}, context {plan.context!r}: {err}") from err
        return [
            self._semantic_similarity(plan, X),
            self._semantic_similarity_delta(plan, X),
            *self._auroc(plan, X),
            *self._energy(plan, X),
        ]

    def _similarity_metric(
        self,
        plan: ContextPlan,
        name: str,
        X: np.ndarray,
        codes: np.ndarray,
        S_ref: np.ndarray,
        *,
        center: np.ndarray | None,
        n_cells: int,
        features: str,
    ) -> Metric:
        P = S_ref.shape[0]
        S = centroid_similarity(X, codes, P, center)
        value = similarity_agreement(S, S_ref)
        reps = bootstrap_agreement(S, S_ref, plan.reference["boot"])
        seed = np.random.SeedSequence(plan.reference["null_seeds"][name])
        null = centroid_agreement_null(X, permuted_codes(codes, self.n_permutations, seed), P, S_ref, center=center)
        extra = {
            **permutation_test(value, null),
            "p_analytic": analytic_p_value(S, S_ref),
            "n_perturbations": float(P),
            "n_permutations": float(len(null)),
        }
        return _metric(plan, name, value, reps, n_cells=n_cells, features=features, extra=extra, bounds=(-1.0, 1.0))

    def _semantic_similarity(self, plan: ContextPlan, X: np.ndarray) -> Metric:
        """Paper replica: raw centroids of all perturbed cells vs the raw-count DE reference."""
        codes = plan.reference["codes"]
        perturbed = codes >= 0
        return self._similarity_metric(
            plan,
            "semantic_similarity",
            X[perturbed],
            codes[perturbed],
            plan.reference["similarity_paper"],
            center=None,
            n_cells=_metric_cells(plan)["semantic_similarity"],
            features="raw",
        )

    def _semantic_similarity_delta(self, plan: ContextPlan, X: np.ndarray) -> Metric:
        """Control-subtracted shifts of standardised features on the held-out half vs the other half's DE."""
        codes, held_out = plan.reference["codes"], plan.reference["held_out"]
        Z = _standardise(X)[held_out]
        codes = codes[held_out]
        control = Z[codes < 0].mean(axis=0, dtype=np.float64)
        perturbed = codes >= 0
        return self._similarity_metric(
            plan,
            "semantic_similarity_delta",
            Z[perturbed],
            codes[perturbed],
            plan.reference["similarity_delta"],
            center=control,
            n_cells=_metric_cells(plan)["semantic_similarity_delta"],
            features="std",
        )

    def _auroc(self, plan: ContextPlan, X: np.ndarray) -> list[Metric]:
        """Per-perturbation AUROC; the median and the fraction above 0.6 over the eligible perturbations."""
        sets = plan.reference["auroc"]
        auroc = np.full(len(plan.reference["perturbations"]), np.nan)
        for s in sets:
            auroc[s["perturbation"]] = oof_auroc(X[s["cells"]], s["y"], s["folds"])
        resampled = auroc[plan.reference["boot"]]  # ineligible perturbations stay NaN and are skipped
        finite = np.isfinite(resampled)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN replicates (no eligible perturbation)
            median = float(np.nanmedian(auroc)) if sets else np.nan
            median_reps = np.nanmedian(resampled, axis=1)
            above = float(np.mean(auroc[np.isfinite(auroc)] > AUROC_THRESHOLD)) if sets else np.nan
            above_reps = ((resampled > AUROC_THRESHOLD) & finite).sum(axis=1) / finite.sum(axis=1)
        extra = {"n_perturbations": float(len(sets)), "mean_auroc": float(np.nanmean(auroc)) if sets else np.nan}
        common: dict[str, Any] = {
            "n_cells": _metric_cells(plan)["auroc_median"],
            "features": "std",
            "bounds": (0.0, 1.0),
        }
        return [
            _metric(plan, "auroc_median", median, median_reps, extra=dict(extra), **common),
            _metric(plan, "auroc_frac_above_0_6", above, above_reps, extra=dict(extra), **common),
        ]

    def _energy(self, plan: ContextPlan, X: np.ndarray) -> list[Metric]:
        """E-tests of every perturbation against the controls, and the median E-distance over control spread."""
        names = plan.reference["perturbations"]
        rows = plan.reference["energy_rows"]
        Z = pca_recipe(X[rows], seed=self.seed)
        codes = plan.reference["codes"][rows]
        control = Z[codes < 0]
        energy, p_values = np.empty(len(names)), np.full(len(names), np.nan)
        root = np.random.SeedSequence(plan.reference["energy_seed"])
        for p, seed in enumerate(root.spawn(len(names))):
            energy[p], null = energy_test(Z[codes == p], control, self.n_permutations, seed)
            if len(null):
                p_values[p] = permutation_test(energy[p], null)["p_perm"]
        scale = float(mean_within_distance(control))
        scale = scale if scale > 0 else float("nan")  # a layer constant over the controls has no spread
        half_a, half_b = plan.reference["control_halves"]
        boot = plan.reference["boot"]
        ratio = energy / scale
        extra = {
            "n_perturbations": float(len(names)),
            "n_permutations": float(self.n_permutations),
            "min_p_value": 1.0 / (1 + self.n_permutations),
            "median_energy": float(np.median(energy)),
            "control_spread": float(scale),
            "control_halves_ratio": float(energy_test(Z[half_a], Z[half_b], 0, 0)[0] / scale),
        }
        common: dict[str, Any] = {"n_cells": _metric_cells(plan)["energy_distance_ratio"], "features": "pca50"}
        return [
            _metric(
                plan,
                "energy_fraction_significant",
                fraction_significant(p_values, FDR_ALPHA),
                fraction_significant_rows(p_values[boot], FDR_ALPHA),
                extra=dict(extra),
                bounds=(0.0, 1.0),
                **common,
            ),
            _metric(
                plan,
                "energy_distance_ratio",
                float(np.median(ratio)),
                np.median(ratio[boot], axis=1),
                extra=dict(extra),
                **common,
            ),
        ]


def _metric_cells(plan: ContextPlan) -> dict[str, int]:
    """The cells each metric of a prepared plan uses: perturbed cells (paper similarity), the held-out
    half (delta), the cells of the AUROC sets, the E-test rows."""
    codes, sets = plan.reference["codes"], plan.reference["auroc"]
    auroc = len(np.unique(np.concatenate([s["cells"] for s in sets]))) if sets else 0
    energy = len(plan.reference["energy_rows"])
    return {
        "semantic_similarity": int((codes >= 0).sum()),
        "semantic_similarity_delta": int(plan.reference["held_out"].sum()),
        "auroc_median": auroc,
        "auroc_frac_above_0_6": auroc,
        "energy_fraction_significant": energy,
        "energy_distance_ratio": energy,
    }


def _metric(
    plan: ContextPlan,
    name: str,
    value: float,
    replicates: np.ndarray,
    *,
    n_cells: int,
    features: str,
    extra: dict[str, float],
    bounds: tuple[float, float] | None = None,
) -> Metric:
    """A higher-is-better metric with its bias-corrected percentile CI, kept inside the metric's range.

    The BC interval is made of replicate values (or ``value``), so it already stays inside ``bounds``; the
    clip is a guard for replicates computed in another precision than ``value``.
    """
    low, high = percentile_ci(replicates, center=value)
    if bounds is not None and np.isfinite(low):
        low, high = float(np.clip(low, *bounds)), float(np.clip(high, *bounds))
    return Metric(
        context=plan.context,
        metric=name,
        value=value,
        n_cells=n_cells,
        replicates=replicates,
        features=features,
        ci_low=low,
        ci_high=high,
        extra=extra,
    )


def _standardise(X: np.ndarray) -> np.ndarray:
    """Columns z-scored over the plan's cells (constant columns become 0); the ``std`` recipe, unsupervised."""
    mean = X.mean(axis=0, dtype=np.float64)
    sd = X.std(axis=0, dtype=np.float64)
    return ((X - mean) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def _half_split(codes: np.ndarray, seed: np.random.SeedSequence) -> np.ndarray:
    """``True`` for the held-out half of every group of ``codes`` (the larger half when odd)."""
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(codes), dtype=bool)
    for g in np.unique(codes[codes >= 0]):
        members = rng.permutation(np.flatnonzero(codes == g))
        held_out[members[len(members) // 2 :]] = True
    return held_out


def _seed(seed: int, task: str, context: str, salt: str) -> np.random.SeedSequence:
    return ContextPlan(task=task, context=context, rows=np.zeros(0), obs=pd.DataFrame()).seed_for(seed, salt)
