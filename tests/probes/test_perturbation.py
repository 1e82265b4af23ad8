"""Perturbation-response task: pure metrics against scipy/scikit-learn or brute force, the task on a
semi-synthetic screen with a known module structure (protocol §3), and every refusal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from perturbation_fixture import CONTROL, Screen, expression_features, noise_features, semi_synthetic_screen
from scipy.spatial.distance import cdist
from scipy.stats import rankdata, spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.model_selection import PredefinedSplit, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cellstrata.engine.errors import ProbeError
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.probes.base import ContextPlan, Metric
from cellstrata.probes.confidence import fdr_bh, permutation_test
from cellstrata.probes.correlation import spearman
from cellstrata.probes.features import log1p_cpm
from cellstrata.probes.perturbation import PerturbationTask
from cellstrata.probes.perturbation_metrics import (
    analytic_p_value,
    bootstrap_agreement,
    centroid_agreement_null,
    centroid_similarity,
    cosine_similarity_matrix,
    energy_distance,
    energy_from_labels,
    energy_test,
    fraction_significant,
    fraction_significant_rows,
    group_mean_var,
    group_means,
    logistic_fit,
    mean_within_distance,
    oof_auroc,
    oof_scores,
    paper_de_similarity,
    permuted_codes,
    rank_cosine_similarity,
    shift_similarity,
    similarity_agreement,
    top_genes,
    upper_triangle,
    welch_t,
)

METRICS = {
    "semantic_similarity": "raw",
    "semantic_similarity_delta": "std",
    "auroc_median": "std",
    "auroc_frac_above_0_6": "std",
    "energy_fraction_significant": "pca50",
    "energy_distance_ratio": "pca50",
}


def best_agreement(truth: np.ndarray) -> float:
    """The largest Spearman a tie-free similarity matrix can reach against a binary (tied) truth."""
    return similarity_agreement(truth + 1e-6 * np.random.default_rng(0).random(truth.shape), truth)


# --------------------------------------------------------------------------------------------------
# similarity matrices and their agreement
# --------------------------------------------------------------------------------------------------


def test_upper_triangle_cosine_and_spearman_match_numpy_sklearn_scipy():
    rng = np.random.default_rng(0)
    V = rng.normal(size=(7, 5))
    V[3] = 0.0  # a zero centroid is 0 to everything
    S = cosine_similarity_matrix(V)
    np.testing.assert_allclose(S, cosine_similarity(V), atol=1e-12)
    i, j = np.triu_indices(7, k=1)
    np.testing.assert_array_equal(upper_triangle(S), S[i, j])
    assert len(upper_triangle(S)) == 21
    a, b = rng.normal(size=40), rng.integers(0, 4, 40).astype(float)  # ties in b
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert np.isnan(spearman(a, np.ones(40)))


def test_similarity_agreement_is_spearman_of_upper_triangles():
    rng = np.random.default_rng(1)
    A, B = cosine_similarity_matrix(rng.normal(size=(9, 6))), cosine_similarity_matrix(rng.normal(size=(9, 6)))
    expected = spearmanr(upper_triangle(A), upper_triangle(B)).statistic
    assert similarity_agreement(A, B) == pytest.approx(expected, abs=1e-12)
    assert similarity_agreement(A, A) == pytest.approx(1.0)
    assert analytic_p_value(A, B) == pytest.approx(spearmanr(upper_triangle(A), upper_triangle(B)).pvalue)


def test_bootstrap_agreement_drops_self_pairs_and_matches_a_loop():
    rng = np.random.default_rng(2)
    A, B = cosine_similarity_matrix(rng.normal(size=(6, 4))), cosine_similarity_matrix(rng.normal(size=(6, 4)))
    indices = np.array([[0, 0, 1, 2, 2, 5], [3, 3, 4, 4, 5, 0], [1, 1, 1, 1, 1, 1], [0, 1, 2, 3, 4, 5]])
    got = bootstrap_agreement(A, B, indices)
    for row, value in zip(indices, got, strict=True):
        pairs = [(a, b) for k, a in enumerate(row) for b in row[k + 1 :] if a != b]
        if len(pairs) < 3:
            assert np.isnan(value)  # one perturbation drawn six times: no pair left
            continue
        x = [A[a, b] for a, b in pairs]
        y = [B[a, b] for a, b in pairs]
        assert value == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert got[3] == pytest.approx(similarity_agreement(A, B))
    assert np.isnan(got[2])
    assert np.isnan(bootstrap_agreement(A, B, np.array([[3, 3, 3, 4, 4, 4]]))[0])  # one distinct pair: constant


def test_rank_cosine_similarity_is_the_papers_spearman():
    rng = np.random.default_rng(3)
    D = rng.normal(size=(5, 30))
    R = rankdata(D, axis=1)
    np.testing.assert_allclose(rank_cosine_similarity(D), cosine_similarity(R), atol=1e-12)
    # without ties it is an increasing affine map of the true Spearman, so the ordering of pairs is equal
    true = spearmanr(D.T).statistic
    assert spearman(upper_triangle(rank_cosine_similarity(D)), upper_triangle(true)) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# DE references
# --------------------------------------------------------------------------------------------------


def _dense_group_stats(X: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    mean = np.stack([X[codes == g].mean(axis=0) for g in range(k)])
    var = np.stack([X[codes == g].var(axis=0, ddof=1) for g in range(k)])
    return mean, var


def test_group_mean_var_and_welch_t_match_numpy():
    rng = np.random.default_rng(4)
    X = rng.poisson(2.0, size=(60, 12)).astype(np.float64)
    codes = rng.integers(-1, 4, 60)  # -1: ignored
    mean, var, n = group_mean_var(sp.csr_matrix(X.astype(np.float32)), codes, 4)
    m_ref, v_ref = _dense_group_stats(X, codes, 4)
    np.testing.assert_allclose(mean, m_ref, atol=1e-10)
    np.testing.assert_allclose(var, v_ref, atol=1e-10)
    np.testing.assert_array_equal(n, np.bincount(codes[codes >= 0], minlength=4))
    delta, t = welch_t(mean, var, n, control=3)
    for p in range(3):
        d = m_ref[p] - m_ref[3]
        se = np.sqrt(v_ref[3] / n[3] + v_ref[p] / n[p])
        np.testing.assert_allclose(delta[p], d, atol=1e-10)
        np.testing.assert_allclose(t[p], np.abs(d) / (se + 1e-8), rtol=1e-10)


def test_paper_de_similarity_by_hand():
    """Raw-count mean differences, top-k Welch t per perturbation, zero fill, rank cosine (paper v1)."""
    rng = np.random.default_rng(5)
    X = rng.poisson(3.0, size=(80, 20)).astype(np.float64)
    codes = np.repeat([0, 1, 2, 3], 20)  # 3 = control
    X[codes == 0, :4] += 5
    X[codes == 1, 2:6] += 5
    S, genes = paper_de_similarity(sp.csr_matrix(X), codes, 3, n_top=4)
    mean, var = _dense_group_stats(X, codes, 4)
    profiles = {}
    for p in range(3):
        d = mean[p] - mean[3]
        t = np.abs(d) / (np.sqrt(var[3] / 20 + var[p] / 20) + 1e-8)
        top = np.argsort(-t, kind="stable")[:4]
        profiles[p] = pd.Series(d[top], index=top)
    union = sorted(set().union(*(set(s.index) for s in profiles.values())))
    table = np.stack([profiles[p].reindex(union, fill_value=0.0).to_numpy() for p in range(3)])
    np.testing.assert_array_equal(genes, union)
    np.testing.assert_allclose(S, cosine_similarity(rankdata(table, axis=1)), atol=1e-12)


def test_top_genes_keeps_k_per_row():
    t = np.array([[0.1, 5.0, 3.0, 3.0], [9.0, 0.0, 1.0, 2.0]])
    np.testing.assert_array_equal(top_genes(t, 2), [[False, True, True, False], [True, False, False, True]])
    assert top_genes(t, 10).all()


def test_shift_similarity_by_hand():
    rng = np.random.default_rng(6)
    L = rng.normal(size=(60, 15))
    codes = np.repeat([0, 1, 2, -1], 15)  # the last 15 cells: other half, ignored
    codes[30:45] = 2  # control = P = 2
    S, genes = shift_similarity(L, codes, 2, n_top=5)
    mean, var = _dense_group_stats(L, codes, 3)
    t = [np.abs(mean[p] - mean[2]) / (np.sqrt(var[2] / 15 + var[p] / 15) + 1e-8) for p in range(2)]
    union = np.union1d(np.argsort(-t[0], kind="stable")[:5], np.argsort(-t[1], kind="stable")[:5])
    np.testing.assert_array_equal(genes, union)
    delta = (mean[:2] - mean[2])[:, union]
    np.testing.assert_allclose(S, cosine_similarity(delta), atol=1e-12)


# --------------------------------------------------------------------------------------------------
# centroids and the permutation null
# --------------------------------------------------------------------------------------------------


def test_group_means_keep_float64_precision_under_a_large_common_offset():
    """Raw centroids share a large common part; their cosines differ in digits float32 sums would lose."""
    rng = np.random.default_rng(7)
    X = (1e4 + rng.normal(size=(90, 6))).astype(np.float32)
    codes = np.repeat(np.arange(3), 30)
    exact = _dense_group_stats(X.astype(np.float64), codes, 3)[0]
    np.testing.assert_allclose(group_means(X, codes, 3), exact, rtol=0, atol=1e-5)
    X64 = 1e4 + rng.normal(size=(90, 6))  # float64 input: only the deviations are rounded
    np.testing.assert_allclose(group_means(X64, codes, 3), _dense_group_stats(X64, codes, 3)[0], rtol=0, atol=1e-6)
    one_minus = 1.0 - upper_triangle(centroid_similarity(X, codes, 3))  # about 1e-9
    np.testing.assert_allclose(one_minus, 1.0 - upper_triangle(cosine_similarity(exact)), rtol=1e-3)
    center = exact.mean(axis=0)
    np.testing.assert_allclose(centroid_similarity(X, codes, 3, center), cosine_similarity(exact - center), atol=1e-6)


def test_permuted_codes_shuffle_only_labelled_cells():
    codes = np.array([-1, 0, 0, 1, 1, 1, -1, 2])
    perms = permuted_codes(codes, 50, 11)
    assert perms.shape == (50, 8)
    assert (perms[:, codes < 0] == -1).all()
    for row in perms:
        np.testing.assert_array_equal(np.sort(row[codes >= 0]), np.sort(codes[codes >= 0]))
    assert len({tuple(r) for r in perms}) > 10
    np.testing.assert_array_equal(perms, permuted_codes(codes, 50, 11))


def test_centroid_agreement_null_matches_a_loop():
    rng = np.random.default_rng(8)
    X = (5.0 + rng.normal(size=(60, 9))).astype(np.float32)
    codes = np.repeat(np.arange(5), 12)
    S_ref = cosine_similarity_matrix(rng.normal(size=(5, 3)))
    perms = permuted_codes(codes, 7, 1)
    center = rng.normal(size=9)
    for c in (None, center):
        got = centroid_agreement_null(X, perms, 5, S_ref, center=c)
        for row, value in zip(perms, got, strict=True):
            C = _dense_group_stats(X.astype(np.float64), row, 5)[0]
            S = cosine_similarity(C if c is None else C - c)
            assert value == pytest.approx(spearmanr(upper_triangle(S), upper_triangle(S_ref)).statistic, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# discrimination
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [6, 300])  # narrow, and wider than the training folds (row-space path)
def test_oof_scores_match_the_sklearn_pipeline(width):
    rng = np.random.default_rng(9)
    m = 40
    X = rng.normal(size=(2 * m, width)) * rng.uniform(0.5, 20, width) + rng.normal(size=width)
    X[:m, :3] += 0.8
    X[:, 5] = 1.0  # a constant feature (scale 1, as StandardScaler does)
    y = np.repeat([1, 0], m)
    folds = np.concatenate([rng.permutation(m) % 5, rng.permutation(m) % 5])
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-12, max_iter=100_000))
    expected = cross_val_predict(pipe, X, y, cv=PredefinedSplit(folds), method="decision_function")
    got = oof_scores(X, y, folds, C=0.5)
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    assert oof_auroc(X, y, folds, C=0.5) == pytest.approx(roc_auc_score(y, expected), abs=1e-9)


def test_logistic_fit_matches_sklearn_coefficients():
    rng = np.random.default_rng(10)
    A = rng.normal(size=(70, 4))
    y = (A[:, 0] + 0.5 * rng.normal(size=70) > 0).astype(float)
    w, b = logistic_fit(A, y, C=2.0)
    ref = LogisticRegression(C=2.0, tol=1e-12, max_iter=10_000).fit(A, y)
    np.testing.assert_allclose(w, ref.coef_[0], rtol=1e-5)
    assert b == pytest.approx(ref.intercept_[0], rel=1e-5)
    # separable data: the penalty keeps the optimum finite
    w_sep, _ = logistic_fit(np.r_[A[:, :1] + 5, A[:, :1] - 5], np.repeat([1.0, 0.0], 70))
    assert np.isfinite(w_sep).all()


# --------------------------------------------------------------------------------------------------
# energy distance
# --------------------------------------------------------------------------------------------------


def brute_energy(A: np.ndarray, B: np.ndarray) -> float:
    """scPerturb's definition from the three distance matrices (sqeuclidean, N(N-1) within groups)."""
    n, m = len(A), len(B)
    return float(
        2 * cdist(A, B, "sqeuclidean").mean()
        - cdist(A, A, "sqeuclidean").sum() / (n * (n - 1))
        - cdist(B, B, "sqeuclidean").sum() / (m * (m - 1))
    )


def test_energy_distance_equals_brute_force_and_the_mean_shift_identity():
    rng = np.random.default_rng(12)
    A, B = rng.normal(size=(13, 4)) + 100.0, rng.normal(size=(21, 4)) + 100.5  # far from 0: no cancellation
    assert energy_distance(A, B) == pytest.approx(brute_energy(A, B), rel=1e-9)
    # E = 2 (||mean A - mean B||^2 - tr cov A / n_A - tr cov B / n_B) for squared distances
    shift = ((A.mean(0) - B.mean(0)) ** 2).sum()
    bias = A.var(0, ddof=1).sum() / 13 + B.var(0, ddof=1).sum() / 21
    assert energy_distance(A, B) == pytest.approx(2 * (shift - bias), rel=1e-9)
    assert mean_within_distance(B) == pytest.approx(cdist(B, B, "sqeuclidean").sum() / (21 * 20), rel=1e-12)


def test_energy_from_labels_equals_brute_force_for_every_relabeling():
    rng = np.random.default_rng(13)
    Z = rng.normal(size=(25, 3))
    labels = np.zeros((6, 25))
    for row in labels:
        row[rng.choice(25, 9, replace=False)] = 1.0
    got = energy_from_labels(Z, labels, 9)
    for row, value in zip(labels, got, strict=True):
        assert value == pytest.approx(brute_energy(Z[row == 1], Z[row == 0]), rel=1e-9)


def test_energy_test_p_values_are_valid_and_deterministic():
    rng = np.random.default_rng(14)
    control = rng.normal(size=(80, 5))
    shifted, same = rng.normal(size=(30, 5)) + 1.0, rng.normal(size=(30, 5))
    e, null = energy_test(shifted, control, 199, 3)
    assert e == pytest.approx(energy_distance(shifted, control))
    assert null.shape == (199,)
    p = permutation_test(e, null)["p_perm"]
    assert p == pytest.approx(1 / 200)  # the smallest attainable: (1 + 0) / (1 + B)
    e2, null2 = energy_test(shifted, control, 199, 3)
    assert e2 == e and np.array_equal(null, null2)
    # under exchangeability the p-values are roughly uniform, never below 1 / (B + 1)
    ps = []
    for seed in range(40):
        a, b = np.random.default_rng([seed, 5]).normal(size=(2, 30, 5))
        ps.append(permutation_test(*energy_test(a, b, 99, seed))["p_perm"])
    ps = np.array(ps)
    assert ps.min() >= 1 / 100 and ps.max() <= 1.0
    assert 0.25 < ps.mean() < 0.75 and (ps < 0.05).mean() <= 0.15
    assert abs(null.mean()) < 0.1 * e  # the null is centred near 0 (unbiased estimator)
    e_same, _ = energy_test(same, control, 0, 0)
    assert abs(e_same) < e


def test_fraction_significant_rows_match_fdr_bh():
    rng = np.random.default_rng(15)
    P = rng.random((300, 9)) ** 4
    P[::5, 2] = np.nan
    expected = [np.mean(fdr_bh(r[np.isfinite(r)]) < 0.05) for r in P]
    np.testing.assert_allclose(fraction_significant_rows(P, 0.05), expected)
    np.testing.assert_allclose([fraction_significant(r, 0.05) for r in P], expected)
    assert np.isnan(fraction_significant(np.array([np.nan])))


# --------------------------------------------------------------------------------------------------
# the task on a semi-synthetic screen
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def screen() -> Screen:
    return semi_synthetic_screen(seed=0)


@pytest.fixture(scope="module")
def task() -> PerturbationTask:
    return PerturbationTask(control=CONTROL, n_boot=200, n_permutations=200)


@pytest.fixture(scope="module")
def prepared(screen: Screen, task: PerturbationTask) -> ContextPlan:
    [plan] = task.plan(screen.obs, chunk_cells=256)
    task.prepare(plan, screen.counts[plan.rows], screen.var_names)
    return plan


@pytest.fixture(scope="module")
def signal(screen: Screen, prepared: ContextPlan, task: PerturbationTask) -> dict[str, Metric]:
    return _by_name(task.evaluate(prepared, expression_features(screen.counts[prepared.rows])))


@pytest.fixture(scope="module")
def noise(prepared: ContextPlan, task: PerturbationTask) -> dict[str, Metric]:
    return _by_name(task.evaluate(prepared, noise_features(prepared.n_cells)))


def _by_name(metrics: list[Metric]) -> dict[str, Metric]:
    return {m.metric: m for m in metrics}


def test_plan_keeps_perturbations_with_enough_cells_and_caps_them():
    rng = np.random.default_rng(16)
    sizes = {"ctrl": 50, "A": 40, "B": 12, "C": 11, "D": 9, "E": 3}
    labels = np.concatenate([[k] * v for k, v in sizes.items()] * 2).astype(object)
    states = np.repeat(["rest", "stim"], len(labels) // 2)
    labels[:5] = None  # unlabelled cells are skipped (five "ctrl" cells of "rest")
    order = rng.permutation(len(labels))
    obs = pd.DataFrame({"guide": labels[order], "state": states[order]})
    task = PerturbationTask(
        perturbation_key="guide",
        control="ctrl",
        context_key="state",
        min_cells=10,
        max_cells_per_perturbation=20,
        max_control_cells=30,
    )
    plans = task.plan(obs, chunk_cells=64)
    assert [p.context for p in plans] == ["rest", "stim"]
    for plan in plans:
        assert (np.diff(plan.rows) > 0).all()
        assert (obs["state"].iloc[plan.rows] == plan.context).all()
        assert plan.obs["guide"].value_counts().to_dict() == {"ctrl": 30, "A": 20, "B": 12, "C": 11}
        assert plan.caps["perturbations"] == ["A", "B", "C"]
        assert plan.caps["dropped_perturbations"] == {"D": 9, "E": 3}
        assert plan.caps["n_control_used"] == 30 and plan.caps["n_perturbed_used"] == 43
        assert plan.caps["caps"][0] == "max_cells_per_perturbation=20: 1 of 3 perturbations subsampled"
    assert [p.caps["caps"][1] for p in plans] == [
        "max_control_cells=30: 30 of 45 control cells",
        "max_control_cells=30: 30 of 50 control cells",
    ]
    assert [p.caps["n_control_available"] for p in plans] == [45, 50]
    again = task.plan(obs, chunk_cells=64)
    assert all(np.array_equal(a.rows, b.rows) for a, b in zip(plans, again, strict=True))


def test_plan_uses_every_cell_by_default_as_the_paper():
    """Perturbations with >= 5 cells, every control and every perturbed cell; no cap is reported."""
    sizes = {"ctrl": 3000, "A": 700, "B": 5, "C": 6, "D": 4}
    obs = pd.DataFrame({"perturbation": np.concatenate([[k] * v for k, v in sizes.items()])})
    [plan] = PerturbationTask(control="ctrl").plan(obs, chunk_cells=64)
    assert plan.obs["perturbation"].value_counts().to_dict() == {"ctrl": 3000, "A": 700, "C": 6, "B": 5}
    assert plan.caps["dropped_perturbations"] == {"D": 4}
    assert plan.caps["caps"] == [] and not plan.caps["subsampled"]
    assert plan.caps["metric_subsamples"] == [
        "auroc: 1 of 3 perturbations (>= auroc_min_cells=20 cells), each a balanced sample of at most "
        "auroc_max_cells=200 perturbed and as many control cells",
        "energy: 1 of 3 perturbations subsampled to energy_max_cells_per_perturbation=500, 2000 of 3000 "
        "controls (energy_max_control_cells=2000)",
    ]


def test_plan_max_perturbations_is_a_reported_random_subset():
    obs = pd.DataFrame({"perturbation": ["control"] * 20 + [f"g{i}" for i in range(8) for _ in range(10)]})
    [plan] = PerturbationTask(max_perturbations=5).plan(obs, chunk_cells=64)
    assert plan.caps["n_perturbations"] == 5 and plan.caps["n_unselected_perturbations"] == 3
    assert plan.caps["caps"] == ["max_perturbations=5: 5 of 8 perturbations (random)"]
    assert plan.n_cells == 20 + 5 * 10


def test_references_recover_the_planted_modules(screen, prepared):
    """(a) Both DE references rank same-module pairs above the others (ceiling: a binary truth with ties)."""
    ceiling = best_agreement(screen.truth)
    assert 0.65 < ceiling < 0.75
    order = [screen.perturbations.index(p) for p in prepared.reference["perturbations"]]
    truth = screen.truth[np.ix_(order, order)]
    assert similarity_agreement(prepared.reference["similarity_paper"], truth) > 0.5
    assert similarity_agreement(prepared.reference["similarity_delta"], truth) > 0.5
    # every group (control included) is split in two, the held-out half being the larger one
    codes, held = prepared.reference["codes"], prepared.reference["held_out"]
    for g in np.unique(codes):
        n = (codes == g).sum()
        assert held[codes == g].sum() == n - n // 2


def test_signal_features_score_high_and_noise_features_score_at_chance(prepared, task, signal, noise):
    """(b, c) features that carry the expression shift vs pure noise, with CIs and permutation z."""
    for metrics in (signal, noise):
        assert set(metrics) == set(METRICS)
        for name, m in metrics.items():
            assert m.features == METRICS[name] and m.context == "all" and m.higher_is_better
            assert m.replicates is not None and len(m.replicates) == task.n_boot
            assert m.ci_low <= m.value <= m.ci_high, name
    for name in ("semantic_similarity", "semantic_similarity_delta"):
        assert signal[name].value > 0.35 and signal[name].extra["z_perm"] > 3.0, name
        assert signal[name].extra["p_perm"] == pytest.approx(1 / (task.n_permutations + 1))
        assert abs(noise[name].value) < 0.25 and abs(noise[name].extra["z_perm"]) < 2.0, name
        assert noise[name].ci_low < 0 < noise[name].ci_high
    assert signal["auroc_median"].value > 0.75 and signal["auroc_frac_above_0_6"].value >= 0.75
    assert abs(noise["auroc_median"].value - 0.5) < 0.05 and noise["auroc_frac_above_0_6"].value <= 0.2
    assert signal["energy_fraction_significant"].value >= 0.75
    assert noise["energy_fraction_significant"].value <= 0.1
    assert signal["energy_distance_ratio"].value > 10 * abs(noise["energy_distance_ratio"].value)
    # cells used: the replica reads perturbed cells; the delta version the held-out half; E-tests all
    codes, held = prepared.reference["codes"], prepared.reference["held_out"]
    assert signal["semantic_similarity"].n_cells == (codes >= 0).sum()
    assert signal["semantic_similarity_delta"].n_cells == held.sum()
    assert signal["energy_fraction_significant"].n_cells == prepared.n_cells
    assert signal["auroc_median"].extra["n_perturbations"] == 16


def test_evaluate_is_deterministic_and_the_baseline_runs(prepared, task, noise):
    again = _by_name(task.evaluate(prepared, noise_features(prepared.n_cells)))
    assert {k: m.to_json() for k, m in again.items()} == {k: m.to_json() for k, m in noise.items()}
    baseline = _by_name(task.evaluate_baseline(prepared))
    assert baseline["semantic_similarity_delta"].extra["z_perm"] > 3.0
    assert task.primary_metric in baseline


def test_the_papers_statistic_is_circular_on_a_null_screen():
    """No perturbation changes anything, yet features computed from the same counts make the paper's
    statistic look significant (its reference shares the cells' sampling noise); the held-out delta
    version does not."""
    null = semi_synthetic_screen(effect=False, seed=0)
    task = PerturbationTask(control=CONTROL, n_boot=20, n_permutations=200)
    [plan] = task.plan(null.obs, chunk_cells=256)
    task.prepare(plan, null.counts[plan.rows], null.var_names)
    metrics = _by_name(task.evaluate_baseline(plan))
    paper, delta = metrics["semantic_similarity"], metrics["semantic_similarity_delta"]
    assert paper.extra["z_perm"] > 2.5 and paper.extra["p_analytic"] < 0.01  # a false discovery, either way
    assert abs(delta.extra["z_perm"]) < 2.0 and delta.extra["p_perm"] > 0.05


def test_contexts_of_synthetic_dataset_use_its_ground_truth():
    """Per cell state, with ``synthetic_dataset``'s own planted per-state perturbation similarity."""
    adata = synthetic_dataset(3000, 600, seed=3, genes_per_cell=180)
    truth = adata.uns["synthetic"]
    task = PerturbationTask(context_key="cell_state", control=truth["control"], n_boot=20, n_permutations=20)
    plans = task.plan(adata.obs, chunk_cells=512)
    assert [p.context for p in plans] == list(adata.obs["cell_state"].cat.categories)
    names = list(truth["perturbations"])
    for plan in plans:
        task.prepare(plan, adata.X[plan.rows], list(adata.var_names))
        order = [names.index(p) for p in plan.reference["perturbations"]]
        s = list(truth["cell_states"]).index(plan.context)
        planted = truth["perturbation_similarity"][s][np.ix_(order, order)]
        assert similarity_agreement(plan.reference["similarity_delta"], planted) > 0.25
        metrics = task.evaluate_baseline(plan)
        assert {m.context for m in metrics} == {plan.context}


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------


def _obs(labels: dict[str, int]) -> pd.DataFrame:
    return pd.DataFrame({"perturbation": np.concatenate([[k] * v for k, v in labels.items()])})


def test_missing_column_is_refused():
    with pytest.raises(ProbeError, match=r"obs has no column 'guide'.*it has: perturbation"):
        PerturbationTask(perturbation_key="guide").plan(_obs({"control": 20}), chunk_cells=64)
    with pytest.raises(ProbeError, match=r"no column 'state'"):
        PerturbationTask(context_key="state").plan(_obs({"control": 20}), chunk_cells=64)


def test_missing_control_lists_the_closest_labels_first():
    obs = _obs({"KO_A": 30, "non-targeting": 30, "KO_B": 30, "NT_2": 30})
    with pytest.raises(ProbeError) as err:
        PerturbationTask(control="non_targeting").plan(obs, chunk_cells=64)
    message = str(err.value)
    assert "no cell has perturbation='non_targeting'" in message
    assert "(closest first): 'non-targeting' (30 cells)" in message
    assert "Set `control`" in message


def test_too_few_perturbations_or_controls_are_refused():
    with pytest.raises(ProbeError, match=r"only 2 of 4 perturbations have at least min_cells=5 cells.*need 3"):
        PerturbationTask().plan(_obs({"control": 30, "a": 12, "b": 10, "c": 4, "d": 2}), chunk_cells=64)
    with pytest.raises(ProbeError, match=r"only 4 control cells.*min_cells=5.*`--set perturbation.min_cells=4`"):
        PerturbationTask().plan(_obs({"control": 4, "a": 12, "b": 10, "c": 19}), chunk_cells=64)
    with pytest.raises(
        ProbeError, match=r"c: 3\); the similarity .* Merge or drop this context \(min_cells cannot go below 4\)$"
    ):
        PerturbationTask().plan(_obs({"control": 30, "a": 12, "b": 10, "c": 3}), chunk_cells=64)


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        ({"min_cells": 2}, "min_cells=2"),
        ({"auroc_min_cells": 4}, "auroc_min_cells=4"),
        ({"max_control_cells": 3}, "max_control_cells=3"),
        ({"energy_max_control_cells": 4}, "energy_max_control_cells=4"),
        ({"n_boot": -1}, "n_boot=-1"),
        ({"max_perturbations": 2}, "max_perturbations=2"),
    ],
)
def test_invalid_settings_are_refused(settings, pattern):
    with pytest.raises(ProbeError, match=pattern):
        PerturbationTask(**settings)


def test_prepare_and_evaluate_refuse_bad_inputs(screen, prepared, task):
    with pytest.raises(ProbeError, match="needs the raw counts"):
        task.prepare(prepared, None, screen.var_names)
    with pytest.raises(ProbeError, match=r"counts are 10 x 1000 but the plan has"):
        task.prepare(prepared, screen.counts[:10], screen.var_names)
    negative = log1p_cpm(screen.counts[prepared.rows])
    negative.data -= 1.0
    with pytest.raises(ProbeError, match="negative or non-finite"):
        task.prepare(prepared, negative, screen.var_names)
    with pytest.raises(ProbeError, match=r"got 5 feature rows"):
        task.evaluate(prepared, np.zeros((5, 8), np.float32))
    bad = noise_features(prepared.n_cells)
    bad[3, 2] = np.nan
    with pytest.raises(ProbeError, match="NaN/inf"):
        task.evaluate(prepared, bad)
