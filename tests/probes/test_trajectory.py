"""Trajectory task: metric functions, bootstrap from multiplicities, ridge, plans, planted signal, refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cellstrata.engine.errors import ConfigError, ProbeError
from cellstrata.probes.base import ContextPlan, Metric
from cellstrata.probes.correlation import boot_counts, pearson, spearman, spearman_boot
from cellstrata.probes.trajectory import (
    RIDGE_ALPHAS,
    TrajectoryTask,
    bootstrap_replicates,
    bootstrap_roots,
    choose_roots,
    mean_pair_gap,
    neighbour_gaps,
    r2,
    r2_boot,
    ridge_cv_predict,
    time_smoothness,
    time_smoothness_boot,
    time_values,
)

# the metrics a trajectory evaluation returns, in order
METRICS = ("dpt_spearman_time", "dpt_spearman_reference", "ridge_r2", "ridge_spearman", "time_smoothness")


def simulate(n: int, seed: int = 0, width: int = 48, n_genes: int = 300) -> dict:
    """Cells at six days along a curved programme: a layer encoding it, a noise layer, and counts."""
    rng = np.random.default_rng(seed)
    day = rng.integers(0, 6, n).astype(float)
    s = (day + rng.uniform(-0.5, 0.5, n)) / 6.0
    curve = np.c_[np.cos(np.pi * s), np.sin(np.pi * s), s, s**2]
    signal = curve @ rng.normal(size=(4, width)) + 0.15 * rng.normal(size=(n, width))
    rate = np.exp(0.5 + 0.8 * curve @ rng.normal(size=(4, n_genes)))
    return {
        "obs": pd.DataFrame({"day": day}),
        "signal": signal.astype(np.float32),
        "noise": rng.normal(size=(n, width)).astype(np.float32),
        "counts": sp.csr_matrix(rng.poisson(rate).astype(np.float32)),
    }


def prepared(task: TrajectoryTask, data: dict) -> ContextPlan:
    """The single plan of ``data`` with its references prepared."""
    (plan,) = task.plan(data["obs"], chunk_cells=1024)
    task.prepare(plan, data["counts"][plan.rows], [f"g{i}" for i in range(data["counts"].shape[1])])
    return plan


def by_name(metrics: list[Metric]) -> dict[str, Metric]:
    """Metrics keyed by name."""
    return {m.metric: m for m in metrics}


# ---------------------------------------------------------------- metric functions


def test_correlations_match_scipy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 50).astype(float), rng.normal(size=50)  # a has ties
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    A, B = rng.normal(size=(3, 40)), rng.normal(size=(3, 40))
    np.testing.assert_allclose(spearman(A, B), [spearmanr(x, y).statistic for x, y in zip(A, B)])
    assert np.isnan(spearman(np.ones(10), b[:10]))
    with_inf = np.r_[b[:9], np.inf]  # unreachable cells rank last, as spearmanr ranks scanpy's inf
    assert spearman(with_inf, a[:10]) == pytest.approx(spearmanr(with_inf, a[:10]).statistic)


def test_r2_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    y, y_hat = rng.normal(size=60), rng.normal(size=60)
    assert r2(y, y_hat) == pytest.approx(r2_score(y, y_hat))
    assert r2(y, y) == 1.0
    assert np.isnan(r2(np.ones(5), np.arange(5.0)))


def test_pair_gap_and_smoothness_by_hand() -> None:
    t = np.array([0.0, 1.0, 1.0, 4.0])
    # pairs: |0-1| |0-1| |0-4| |1-1| |1-4| |1-4| = 1 + 1 + 4 + 0 + 3 + 3 = 12 over 6 pairs
    assert mean_pair_gap(t) == pytest.approx(2.0)
    rng = np.random.default_rng(2)
    u = rng.normal(size=30)
    brute = np.abs(u[:, None] - u[None, :])[np.triu_indices(30, 1)].mean()
    assert mean_pair_gap(u) == pytest.approx(brute)
    gaps = neighbour_gaps(t, np.array([[1, 2], [2, 0], [1, 0], [2, 1]]))
    np.testing.assert_allclose(gaps, [1.0, 0.5, 0.5, 3.0])
    assert time_smoothness(gaps, t) == pytest.approx(np.mean([1.0, 0.5, 0.5, 3.0]) / 2.0)


def test_bootstrap_from_counts_equals_resampling() -> None:
    rng = np.random.default_rng(3)
    n = 80
    a = np.r_[rng.integers(0, 6, n - 3).astype(float), np.inf, np.inf, 2.0]  # ties and unreachable cells
    b, c = rng.normal(size=n), rng.normal(size=n)
    boot = rng.integers(0, n, size=(25, n))
    counts = boot_counts(boot, n)
    assert counts.sum(axis=1).tolist() == [n] * 25
    np.testing.assert_allclose(spearman_boot(a, b, counts), [spearman(a[i], b[i]) for i in boot], atol=1e-12)
    np.testing.assert_allclose(r2_boot(b, c, counts), [r2(b[i], c[i]) for i in boot], atol=1e-12)
    gaps = np.abs(c)
    expected = [time_smoothness(gaps[i], b[i]) for i in boot]
    np.testing.assert_allclose(time_smoothness_boot(gaps, b, counts), expected, rtol=1e-12)
    stats = {"rho": lambda k: spearman_boot(a, b, k), "r2": lambda k: r2_boot(b, c, k)}
    whole, blocks = bootstrap_replicates(stats, boot, n), bootstrap_replicates(stats, boot, n, block=3 * n)
    for key in stats:  # blocks only change BLAS summation order
        np.testing.assert_allclose(whole[key], blocks[key], rtol=1e-12)


@pytest.mark.parametrize(("n", "p"), [(120, 10), (60, 100)])
def test_ridge_matches_sklearn_pipeline(n: int, p: int) -> None:
    rng = np.random.default_rng(4)
    X = rng.normal(size=(n, p)) * rng.uniform(0.1, 10, p) + rng.normal(size=p)
    X[:, 0] = 3.0  # a constant feature, as StandardScaler meets dead dimensions
    y = X[:, 1:4] @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=n)
    cv = KFold(5, shuffle=True, random_state=0)
    pipe = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
    pred, alphas = ridge_cv_predict(X, y, list(cv.split(X)), RIDGE_ALPHAS)
    np.testing.assert_allclose(pred, cross_val_predict(pipe, X, y, cv=cv), atol=1e-8)
    expected = [
        make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)).fit(X[tr], y[tr])[-1].alpha_
        for tr, _ in cv.split(X)
    ]
    np.testing.assert_allclose(alphas, expected)


# ---------------------------------------------------------------- time and roots


def test_time_values_accepts_numbers_and_ordered_categories() -> None:
    np.testing.assert_array_equal(time_values(pd.Series([3, 1, 2]), "t"), [3.0, 1.0, 2.0])
    got = time_values(pd.Series([1, None, 4], dtype="Int64"), "t")
    assert got[0] == 1.0 and np.isnan(got[1]) and got[2] == 4.0
    days = pd.Series(pd.Categorical(["d7", "d0", None, "d3"], categories=["d0", "d3", "d7"], ordered=True))
    got = time_values(days, "t")
    np.testing.assert_array_equal(got[[0, 1, 3]], [2.0, 0.0, 1.0])
    assert np.isnan(got[2])
    assert np.isnan(time_values(pd.Series([1.0, np.inf]), "t")[1])


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (pd.Series(pd.Categorical(["d0", "d3"])), ["unordered categorical", "ordered=True", "'week'"]),
        (pd.Series(["d0", "d3"]), ["dtype object", "numeric", "ordered categorical", "'week'"]),
    ],
)
def test_time_values_refuses_unordered_time(values: pd.Series, words: list[str]) -> None:
    with pytest.raises(ProbeError) as err:
        time_values(values, "week")
    for w in words:
        assert w in str(err.value)


def test_choose_roots() -> None:
    t = np.array([2.0, 1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(choose_roots(t, "first", 5, 0), [2])  # the paper's cell
    robust = choose_roots(t, "robust", 5, 0)
    assert len(robust) == 5 and set(robust) <= {2, 4, 5, 6, 7, 8} and np.all(np.diff(robust) > 0)
    np.testing.assert_array_equal(robust, choose_roots(t, "robust", 5, 0))
    continuous = np.array([0.5, 0.1, 0.9, 0.3, 0.2, 0.7])  # fewer than n_roots at the minimum: earliest cells
    np.testing.assert_array_equal(choose_roots(continuous, "robust", 3, 0), [1, 3, 4])
    with pytest.raises(ValueError, match="root must be one of first, robust, got 'auto'"):
        choose_roots(t, "auto", 5, 0)


def test_bootstrap_roots_redraw_among_the_same_candidates() -> None:
    t = np.r_[np.zeros(40), np.ones(60)]
    boot = bootstrap_roots(t, 5, 50, 0)
    assert boot.shape == (50, 5) and boot.max() < 40 and np.all(np.diff(boot, axis=1) > 0)
    assert len({tuple(r) for r in boot}) > 45  # fresh draws per replicate
    np.testing.assert_array_equal(boot, bootstrap_roots(t, 5, 50, 0))
    continuous = np.array([0.5, 0.1, 0.9, 0.3, 0.2, 0.7])  # no randomness left: every replicate the same
    np.testing.assert_array_equal(bootstrap_roots(continuous, 3, 4, 0), np.tile([1, 3, 4], (4, 1)))


# ---------------------------------------------------------------- plans and refusals


def test_plan_drops_missing_time_and_reports_it() -> None:
    obs = pd.DataFrame({"day": np.tile([0.0, 1.0, 2.0, np.nan], 50), "state": np.repeat(["a", "b"], 100)})
    task = TrajectoryTask(time_key="day", context_key="state", n_neighbors=10)
    plans = task.plan(obs, chunk_cells=64)
    assert [p.context for p in plans] == ["a", "b"]
    for p in plans:
        assert p.n_cells == 75 and p.caps["n_missing_time"] == 25 and p.caps["n_in_context"] == 100
        assert np.all(np.diff(p.rows) > 0) and not p.obs["day"].isna().any()
        assert (p.obs["state"] == p.context).all()
    assert task.required_columns() == ["day", "state"]


def test_plan_caps_by_time_and_keeps_the_paper_root() -> None:
    day = np.r_[np.full(3, 1.0), 0.0, np.random.default_rng(5).integers(0, 4, 996).astype(float)]
    obs = pd.DataFrame({"day": day})
    (plan,) = TrajectoryTask(time_key="day", root="first", max_cells=200).plan(obs, chunk_cells=64)
    assert plan.caps["subsampled"] and plan.caps["n_available"] == 1000
    assert 3 in plan.rows and plan.n_cells <= 201
    counts = pd.Series(plan.obs["day"]).value_counts(normalize=True).sort_index()
    np.testing.assert_allclose(counts, pd.Series(day).value_counts(normalize=True).sort_index(), atol=0.02)
    task = TrajectoryTask(time_key="day", root="first", n_boot=0)
    assert task.draws(plan)["roots"].tolist() == [int(np.searchsorted(plan.rows, 3))]


def test_plan_refuses_a_missing_time_column() -> None:
    with pytest.raises(ProbeError, match=r"no column 'week'.*it has: day"):
        TrajectoryTask(time_key="week").plan(pd.DataFrame({"day": [0.0, 1.0]}), chunk_cells=64)


def test_plan_refuses_text_time() -> None:
    with pytest.raises(ProbeError, match=r"time column 'day' has dtype object.*numeric"):
        TrajectoryTask(time_key="day").plan(pd.DataFrame({"day": ["early", "late"] * 60}), chunk_cells=64)


def test_plan_skips_a_context_without_time() -> None:
    obs = pd.DataFrame({"day": np.r_[np.arange(100.0) % 3, np.full(100, np.nan)], "state": np.repeat(["a", "b"], 100)})
    plans = TrajectoryTask(time_key="day", context_key="state").plan(obs, chunk_cells=64)
    assert [p.context for p in plans] == ["a"]
    assert "context 'b': none of its 100 cells has a time in 'day' (all NaN)" in plans.skipped["b"]


def test_plan_refuses_too_few_cells() -> None:
    obs = pd.DataFrame({"day": np.r_[np.arange(60.0) % 3, np.full(40, np.nan)]})
    with pytest.raises(ProbeError, match=r"context 'all': 60 cells with a time \(100 in all\).*at least 90"):
        TrajectoryTask(time_key="day").plan(obs, chunk_cells=64)


def test_plan_refuses_a_single_time_point() -> None:
    with pytest.raises(ProbeError, match="all 100 cells have the same time"):
        TrajectoryTask(time_key="day").plan(pd.DataFrame({"day": np.ones(100)}), chunk_cells=64)


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"root must be one of first, robust, got 'paper'.*n_dcs must be between"):
        TrajectoryTask(time_key="day", root="paper", n_dcs=20)
    with pytest.raises(ConfigError, match=r"kernel must be one of umap, gauss, got 'cos'; features must be one of"):
        TrajectoryTask(time_key="day", kernel="cos", features="pca")
    with pytest.raises(ConfigError, match=r"hvg_genes must be at least 1, got 0"):
        TrajectoryTask(time_key="day", hvg_genes=0)
    with pytest.raises(ConfigError, match=r"max_cells must be at least 3 \* n_neighbors = 90"):
        TrajectoryTask(time_key="day", max_cells=50)
    assert TrajectoryTask(time_key="day").settings()["n_neighbors"] == 30


# ---------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def big() -> tuple[TrajectoryTask, ContextPlan, dict]:
    """600 simulated cells, planned and prepared once for the module."""
    data = simulate(600)
    task = TrajectoryTask(time_key="day")
    return task, prepared(task, data), data


def test_planted_signal_scores_high_and_noise_does_not(big: tuple) -> None:
    task, plan, data = big
    signal, noise = by_name(task.evaluate(plan, data["signal"])), by_name(task.evaluate(plan, data["noise"]))
    assert list(signal) == list(METRICS) and task.primary_metric == "dpt_spearman_time"
    assert signal["dpt_spearman_time"].value > 0.9 and abs(noise["dpt_spearman_time"].value) < 0.3
    assert signal["dpt_spearman_reference"].value > 0.9 and abs(noise["dpt_spearman_reference"].value) < 0.3
    assert signal["ridge_r2"].value > 0.9 and noise["ridge_r2"].value < 0.05
    assert signal["ridge_spearman"].value > 0.9 and abs(noise["ridge_spearman"].value) < 0.3
    assert signal["time_smoothness"].value < 0.3 and noise["time_smoothness"].value > 0.85
    for m in (*signal.values(), *noise.values()):
        assert m.ci_low <= m.value <= m.ci_high, m.metric
        assert m.n_cells == 600 and len(m.replicates) == task.n_boot
        assert m.features == ("std" if m.metric.startswith("ridge") else "raw")
    assert not signal["time_smoothness"].higher_is_better and signal["dpt_spearman_time"].higher_is_better
    assert signal["dpt_spearman_time"].extra == {"n_graph_components": 1.0, "frac_unreachable": 0.0}


def test_intervals_are_wider_for_fewer_cells(big: tuple) -> None:
    task, plan, data = big
    small_data = simulate(150, seed=1)
    small = by_name(task.evaluate(prepared(task, small_data), small_data["signal"]))
    large = by_name(task.evaluate(plan, data["signal"]))
    for name in ("dpt_spearman_time", "ridge_r2", "time_smoothness"):
        assert small[name].ci_high - small[name].ci_low > large[name].ci_high - large[name].ci_low, name


def test_replicates_are_paired_across_layers(big: tuple) -> None:
    task, plan, data = big
    signal = by_name(task.evaluate(plan, data["signal"]))
    again = by_name(task.evaluate(plan, data["signal"]))
    for name in METRICS:
        np.testing.assert_array_equal(signal[name].replicates, again[name].replicates)
    # The resamples depend on the task seed and the context only (a fresh plan draws the same ones) ...
    boot = plan.reference["boot"]
    assert boot.shape == (task.n_boot, plan.n_cells)
    (fresh,) = task.plan(data["obs"], chunk_cells=1024)
    np.testing.assert_array_equal(task.draws(fresh)["boot"], boot)
    # ... and every layer's replicates are its metric on exactly those resamples.
    t = plan.obs["day"].to_numpy()
    folds = list(KFold(task.ridge_folds, shuffle=True, random_state=task.seed).split(t))
    for layer, got in (("signal", signal), ("noise", by_name(task.evaluate(plan, data["noise"])))):
        pred, _ = ridge_cv_predict(data[layer], t, folds, RIDGE_ALPHAS)
        expected = [r2(t[i], pred[i]) for i in boot]
        np.testing.assert_allclose(got["ridge_r2"].replicates, expected, atol=1e-10)


def test_baseline_is_the_reference_graph(big: tuple) -> None:
    task, plan, _ = big
    base = by_name(task.evaluate_baseline(plan))
    assert base["dpt_spearman_reference"].value == pytest.approx(1.0)
    assert base["dpt_spearman_time"].value > 0.9 and base["dpt_spearman_time"].features == "none"
    assert plan.reference["baseline"].shape == (plan.n_cells, 50)
    assert spearman(plan.reference["reference_dpt"], plan.obs["day"].to_numpy()) > 0.9


def test_evaluate_without_prepare_and_with_ridge_cap() -> None:
    data = simulate(300, seed=2)
    task = TrajectoryTask(time_key="day", n_neighbors=15, ridge_max_cells=100, n_boot=20, root="first")
    (plan,) = task.plan(data["obs"], chunk_cells=64)
    got = by_name(task.evaluate(plan, data["signal"]))
    assert "dpt_spearman_reference" not in got  # no reference before prepare
    assert got["ridge_r2"].n_cells <= 100 and got["dpt_spearman_time"].n_cells == 300
    assert len(got["ridge_r2"].replicates) == 20 and got["ridge_r2"].value > 0.8
    with pytest.raises(ValueError, match="299 rows for a plan of 300 cells"):
        task.evaluate(plan, data["signal"][:-1])
