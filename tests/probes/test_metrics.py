"""Probe metrics against scikit-learn/scipy or hand-computed values; confidence, caps and feature recipes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import norm
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    balanced_accuracy_score,
    f1_score,
    normalized_mutual_info_score,
)
from sklearn.metrics.cluster import contingency_matrix

from cellstrata.probes.base import Metric
from cellstrata.probes.confidence import (
    best_index_distribution,
    bootstrap,
    bootstrap_indices,
    fdr_bh,
    gain_basis,
    percentile_ci,
    permutation_test,
    relative_gain,
    reported_gain,
    selection_adjusted,
    tied_with_best,
)
from cellstrata.probes.features import (
    as_float32,
    highly_variable_genes,
    hvg_pca,
    log1p_cpm,
    pca_recipe,
)
from cellstrata.probes.metrics import contingency, encode, label_metrics, partition_metrics
from cellstrata.probes.sampling import random_cap, stratified_cap

# --------------------------------------------------------------------------------------------------
# sklearn oracles
# --------------------------------------------------------------------------------------------------


def sk_label_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        return {
            "macro_f1": f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true), zero_division=0),
            "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
            "accuracy": accuracy_score(y_true, y_pred),
        }


def sk_partition_metrics(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    return {
        "ari": adjusted_rand_score(labels, clusters),
        "nmi": normalized_mutual_info_score(labels, clusters, average_method="arithmetic"),
    }


def noisy_predictions(rng: np.random.Generator, n: int, k: int, extra: int = 0, p_right: float = 0.6) -> tuple:
    """String labels with ``k`` classes and predictions that are right with ``p_right``, else any of ``k + extra``."""
    names = np.array([f"type_{i:02d}" for i in range(k + extra)])
    y = names[rng.integers(0, k, n)]
    wrong = names[rng.integers(0, k + extra, n)]
    pred = np.where(rng.random(n) < p_right, y, wrong)
    return y, pred


@pytest.mark.parametrize("n", [2, 7, 13, 101, 1000])
@pytest.mark.parametrize("k", [2, 3, 9])
def test_label_metrics_match_sklearn(n, k):
    rng = np.random.default_rng(1000 * n + k)
    y, pred = noisy_predictions(rng, n, k)
    got = label_metrics(y, pred)
    want = sk_label_metrics(y, pred)
    for name, value in want.items():
        assert got[name].shape == (1,)
        assert got[name][0] == pytest.approx(value, abs=1e-12), name


def test_label_metrics_with_a_predicted_class_absent_from_truth():
    rng = np.random.default_rng(3)
    y, pred = noisy_predictions(rng, 211, 4, extra=2, p_right=0.4)
    assert set(np.unique(pred)) - set(np.unique(y)), "the predictions must hold a class absent from truth"
    got = label_metrics(y, pred)
    for name, value in sk_label_metrics(y, pred).items():
        assert got[name][0] == pytest.approx(value, abs=1e-12), name
    # a class of truth that is never predicted counts as F1 = 0 and recall = 0
    y = np.array(["a", "a", "b", "b", "c"])
    pred = np.array(["a", "z", "b", "z", "z"])
    got = label_metrics(y, pred)
    # F1: a = 2*1/(2+1), b = 2*1/(2+1), c = 0 -> mean 4/9; recall: 1/2, 1/2, 0 -> 1/3; accuracy 2/5
    assert got["macro_f1"][0] == pytest.approx(4 / 9)
    assert got["balanced_accuracy"][0] == pytest.approx(1 / 3)
    assert got["accuracy"][0] == pytest.approx(2 / 5)
    for name, value in sk_label_metrics(y, pred).items():
        assert got[name][0] == pytest.approx(value), name


def test_label_metrics_single_class_edges():
    y = np.array(["a"] * 5)
    perfect = label_metrics(y, y)
    assert {k: float(v[0]) for k, v in perfect.items()} == {"macro_f1": 1.0, "balanced_accuracy": 1.0, "accuracy": 1.0}
    wrong = label_metrics(y, np.array(["b"] * 5))
    assert {k: float(v[0]) for k, v in wrong.items()} == {"macro_f1": 0.0, "balanced_accuracy": 0.0, "accuracy": 0.0}
    mixed = np.array(["a", "b", "a", "b", "b"])
    got = label_metrics(y, mixed)
    for name, value in sk_label_metrics(y, mixed).items():
        assert got[name][0] == pytest.approx(value), name
    # one cell
    one = label_metrics(np.array(["x"]), np.array(["x"]))
    assert all(float(v[0]) == 1.0 for v in one.values())


def test_label_metrics_accept_integer_and_mixed_width_labels():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.5, y, rng.integers(0, 7, 300))
    got = label_metrics(y, pred)
    for name, value in sk_label_metrics(y, pred).items():
        assert got[name][0] == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("n", [1, 2, 9, 57, 400])
def test_partition_metrics_match_sklearn(n):
    rng = np.random.default_rng(n)
    labels = np.array(["t1", "t2", "t3", "t4"])[rng.integers(0, 4, n)]
    # clusters: labels with some noise, more clusters than labels, integer ids
    clusters = np.where(rng.random(n) < 0.7, np.unique(labels, return_inverse=True)[1], rng.integers(0, 6, n))
    got = partition_metrics(labels, clusters)
    for name, value in sk_partition_metrics(labels, clusters).items():
        assert got[name].shape == (1,)
        assert got[name][0] == pytest.approx(value, abs=1e-10), name


@pytest.mark.parametrize(
    ("labels", "clusters"),
    [
        ([0, 0, 0, 0], [1, 1, 1, 1]),  # both trivial
        ([0, 0, 0, 0], [0, 1, 2, 3]),  # one class, all singletons
        ([0, 1, 2, 3], [0, 1, 2, 3]),  # all singletons on both sides
        ([0, 0, 1, 1], [1, 1, 0, 0]),  # relabelled perfect
        ([0, 0, 1, 1], [0, 1, 0, 1]),  # independent
        ([0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]),  # one cluster
    ],
)
def test_partition_metrics_edge_cases(labels, clusters):
    labels, clusters = np.array(labels), np.array(clusters)
    got = partition_metrics(labels, clusters)
    for name, value in sk_partition_metrics(labels, clusters).items():
        assert got[name][0] == pytest.approx(value, abs=1e-12), (name, labels, clusters)


def test_bootstrap_batched_rows_equal_sklearn_on_each_resample():
    rng = np.random.default_rng(11)
    n = 97
    y, pred = noisy_predictions(rng, n, 5, extra=1, p_right=0.55)
    idx = bootstrap_indices(n, 150, 7)  # > 2 batches of 64 replicates
    got = label_metrics(y, pred, idx)
    assert all(v.shape == (150,) for v in got.values())
    for b in range(len(idx)):
        want = sk_label_metrics(y[idx[b]], pred[idx[b]])
        for name, value in want.items():
            assert got[name][b] == pytest.approx(value, abs=1e-12), (name, b)
    clusters = np.where(rng.random(n) < 0.6, np.unique(y, return_inverse=True)[1], rng.integers(0, 8, n))
    part = partition_metrics(y, clusters, idx)
    for b in range(len(idx)):
        want = sk_partition_metrics(y[idx[b]], clusters[idx[b]])
        for name, value in want.items():
            assert part[name][b] == pytest.approx(value, abs=1e-10), (name, b)


def test_encode_and_contingency_match_sklearn():
    rng = np.random.default_rng(2)
    a = np.array(["x", "y", "z"])[rng.integers(0, 3, 50)]
    b = rng.integers(10, 14, 50)
    ca, cb = encode(a, b)
    assert ca.dtype == np.int64 and ca.max() == 2 and cb.max() == 3
    table = contingency(ca, cb)
    assert table.shape == (1, 3, 4)
    np.testing.assert_array_equal(table[0], contingency_matrix(a, b))
    sq = contingency(ca, cb, square=True)
    assert sq.shape == (1, 4, 4) and sq[0, :3].sum() == 50 and sq[0, 3].sum() == 0
    idx = bootstrap_indices(50, 3, 0)
    batched = contingency(ca, cb, idx)
    for r in range(3):
        expected = np.zeros((3, 4))
        np.add.at(expected, (ca[idx[r]], cb[idx[r]]), 1)
        np.testing.assert_array_equal(batched[r], expected)


# --------------------------------------------------------------------------------------------------
# confidence
# --------------------------------------------------------------------------------------------------


def test_bootstrap_indices_and_bootstrap():
    idx = bootstrap_indices(10, 40, 3)
    assert idx.shape == (40, 10) and idx.dtype == np.int64 and idx.min() >= 0 and idx.max() < 10
    np.testing.assert_array_equal(idx, bootstrap_indices(10, 40, 3))
    assert not np.array_equal(idx, bootstrap_indices(10, 40, 4))
    assert bootstrap_indices(0, 5, 0).shape == (5, 0)
    x = np.arange(10.0)
    reps = bootstrap(np.mean, (x,), idx)
    np.testing.assert_allclose(reps, x[idx].mean(axis=1))
    reps2 = bootstrap(lambda a, b: float((a * b).sum()), (x, x + 1), idx[:3])
    np.testing.assert_allclose(reps2, [(x[i] * (x[i] + 1)).sum() for i in idx[:3]])


def test_percentile_ci_plain_and_bias_corrected():
    reps = np.arange(1.0, 101.0)  # 1..100
    lo, hi = percentile_ci(reps)
    # numpy's linear quantile: position q*(n-1) -> 0.025*99 = 2.475 -> 3.475; 0.975*99 = 96.525 -> 97.525
    assert (lo, hi) == pytest.approx((3.475, 97.525))
    assert percentile_ci(reps, 0.5) == pytest.approx(tuple(np.quantile(reps, [0.25, 0.75])))
    # non-finite replicates are ignored
    with_nan = np.concatenate([reps, [np.nan, np.inf]])
    assert percentile_ci(with_nan) == pytest.approx((lo, hi))
    # bias-corrected percentile (Efron's BC): 39 replicates below 40 and one equal -> share 0.395,
    # z0 = Phi^-1(0.395), quantile levels Phi(2 z0 -+ 1.96)
    z0 = norm.ppf(0.395)
    levels = norm.cdf([2 * z0 - norm.ppf(0.975), 2 * z0 + norm.ppf(0.975)])
    lo_c, hi_c = percentile_ci(reps, center=40.0)
    assert (lo_c, hi_c) == pytest.approx(tuple(np.quantile(reps, levels)))
    assert lo_c < lo and hi_c < hi and lo_c <= 40.0 <= hi_c
    # the interval is made of replicate values, so it never leaves their range ...
    assert reps.min() <= lo_c and hi_c <= reps.max()
    # ... except to reach the estimate when every replicate lies on one side of it
    assert percentile_ci(reps, center=150.0)[1] == 150.0
    assert percentile_ci(reps, center=-3.0)[0] == -3.0
    # a non-finite center leaves the replicates alone; no finite replicate -> NaN
    assert percentile_ci(reps, center=float("nan")) == pytest.approx((lo, hi))
    assert all(np.isnan(percentile_ci(np.array([np.nan, np.nan]))))
    assert all(np.isnan(percentile_ci(np.array([]), center=1.0)))


@pytest.mark.parametrize("pred", ["aaabbbcca", "aabbbbccc"])
def test_bounded_metric_cis_stay_in_range_in_a_9_cell_context(pred):
    # one error in nine cells: the resamples' mean is below the estimate, and shifting them by that bias
    # (the former interval) put macro-F1 at 1.02 and accuracy at 1.004
    y, y_pred = np.array(list("aaabbbccc")), np.array(list(pred))
    values = label_metrics(y, y_pred)
    reps = label_metrics(y, y_pred, bootstrap_indices(9, 200, 0))
    for name in ("macro_f1", "balanced_accuracy", "accuracy"):
        assert reps[name].mean() < values[name][0]  # the case that broke the shifted interval
        m = Metric(context="all", metric=name, value=float(values[name][0]), n_cells=9, replicates=reps[name])
        assert 0.0 <= m.ci_low <= m.value <= m.ci_high <= 1.0, name


def test_metric_ci_is_the_bias_corrected_interval_of_its_replicates():
    reps = np.linspace(0.7, 0.9, 51)  # mean 0.8
    m = Metric(context="all", metric="macro_f1", value=0.75, n_cells=10, replicates=reps)
    assert (m.ci_low, m.ci_high) == pytest.approx(percentile_ci(reps, center=0.75))
    assert m.ci_low <= m.value <= m.ci_high
    assert m.ci_low >= 0.7  # the shifted interval reached 0.655, below every replicate
    # explicit CIs are kept; the JSON round trip keeps everything
    m2 = Metric(context="c", metric="m", value=1.0, n_cells=3, replicates=reps, ci_low=0.1, ci_high=0.2)
    assert (m2.ci_low, m2.ci_high) == (0.1, 0.2)
    back = Metric.from_json(m.to_json())
    assert back.value == m.value and back.ci_low == m.ci_low and back.ci_high == m.ci_high
    np.testing.assert_array_equal(back.replicates, m.replicates)


def test_tied_with_best_on_a_hand_made_replicate_matrix():
    rng = np.random.default_rng(0)
    B = 400
    base = 0.8 + 0.02 * rng.standard_normal(B)
    reps = np.vstack(
        [
            base - 0.30,  # 0: clearly worse
            base + 0.005 * rng.standard_normal(B),  # 1: tied (small jitter)
            base,  # 2: the best
            base - 0.05 + 0.001 * rng.standard_normal(B),  # 3: consistently worse by 0.05
            base + 0.03 * rng.standard_normal(B) - 0.01,  # 4: noisy, paired CI straddles 0
        ]
    )
    tied = tied_with_best(reps, 2)
    assert tied.tolist() == [1, 2, 4]
    # the same by hand: the 2.5% quantile of best - layer reaches 0
    diff = reps[2] - reps
    by_hand = [i for i in range(5) if i == 2 or np.quantile(diff[i], 0.025) <= 0]
    assert tied.tolist() == by_hand
    # lower is better: negate the matrix, same ties
    assert tied_with_best(-reps, 2, higher_is_better=False).tolist() == [1, 2, 4]
    # the best layer is always in the set, even when the matrix is constant
    assert tied_with_best(np.ones((3, 10)), 0).tolist() == [0, 1, 2]


def test_best_index_distribution():
    reps = np.array([[1.0, 5.0, 3.0, np.nan], [2.0, 4.0, 3.5, 9.0], [0.0, 6.0, 1.0, 1.0]])
    assert best_index_distribution(reps).tolist() == [1, 2, 1]  # NaN column skipped
    assert best_index_distribution(reps, higher_is_better=False).tolist() == [2, 1, 2]
    assert best_index_distribution(np.full((2, 3), np.nan)).size == 0


def test_permutation_test_by_hand():
    null = np.arange(1.0, 11.0)  # 1..10
    out = permutation_test(5.0, null)
    # null >= 5: 5..10 -> 6 values; p = (1 + 6) / (1 + 10)
    assert out["p_perm"] == pytest.approx(7 / 11)
    assert out["null_mean"] == pytest.approx(5.5)
    assert out["z_perm"] == pytest.approx((5.0 - 5.5) / np.std(null, ddof=1))
    low = permutation_test(5.0, null, higher_is_better=False)  # null <= 5: 1..5
    assert low["p_perm"] == pytest.approx(6 / 11)
    assert low["z_perm"] == pytest.approx(out["z_perm"])
    assert permutation_test(100.0, null)["p_perm"] == pytest.approx(1 / 11)  # the smallest possible p
    # non-finite nulls are dropped; nothing left or a non-finite observation -> NaN
    assert permutation_test(5.0, np.append(null, np.nan))["p_perm"] == pytest.approx(7 / 11)
    assert np.isnan(permutation_test(float("nan"), null)["p_perm"])
    assert np.isnan(permutation_test(1.0, np.array([np.nan]))["z_perm"])
    assert np.isnan(permutation_test(1.0, np.ones(5))["z_perm"])  # zero spread: no z


def bh_by_hand(p: np.ndarray) -> np.ndarray:
    m = len(p)
    order = np.argsort(p)
    adjusted = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        adjusted[i] = running
    return adjusted


def test_fdr_bh_matches_a_hand_computation():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5, 0.04, 0.9])
    np.testing.assert_allclose(fdr_bh(p), bh_by_hand(p))
    # the worked example: sorted 0.005, 0.01, 0.03, 0.04, 0.04, 0.5, 0.9 with m = 7
    assert fdr_bh(p)[3] == pytest.approx(0.035)  # 0.005 * 7 / 1 = 0.035, min over later ranks
    assert fdr_bh(p)[6] == pytest.approx(0.9)
    rng = np.random.default_rng(4)
    q = rng.random(60) ** 3
    np.testing.assert_allclose(fdr_bh(q), bh_by_hand(q))
    assert fdr_bh(np.array([])).size == 0


def test_relative_gain():
    assert relative_gain(0.9, 0.6) == pytest.approx(0.5)
    assert relative_gain(-0.5, -1.0) == pytest.approx(0.5)  # |final| in the denominator
    assert relative_gain(0.3, 0.6) == pytest.approx(-0.5)
    assert np.isnan(relative_gain(1.0, 0.0))
    assert isinstance(relative_gain(1.0, 2.0), float)
    out = relative_gain(np.array([1.0, 2.0, 3.0]), np.array([2.0, 0.0, -3.0]))
    np.testing.assert_allclose(out, [-0.5, np.nan, 2.0])


def test_gain_basis_relative_only_for_a_final_away_from_zero_and_of_the_same_sign():
    # +310% from 0.031 over 0.010 is what the old rule printed; now the difference is what counts
    assert relative_gain(0.041, 0.010) == pytest.approx(3.1)
    assert gain_basis(0.041, 0.010) == "absolute" and np.isnan(reported_gain(0.041, 0.010))
    assert gain_basis(0.9, 0.6) == "relative" and reported_gain(0.9, 0.6) == pytest.approx(0.5)
    assert gain_basis(0.2, -0.3) == "absolute"  # a sign change has no relative reading
    assert gain_basis(-0.2, -0.4) == "relative" and reported_gain(-0.2, -0.4) == pytest.approx(0.5)
    assert gain_basis(0.3, 0.1) == "relative" and gain_basis(0.3, 0.0999) == "absolute"  # |final| >= 0.1
    assert gain_basis(0.0, 0.5) == "absolute"
    out = gain_basis(np.array([0.9, 0.041, 0.2]), np.array([0.6, 0.01, -0.3]))
    assert out.tolist() == ["relative", "absolute", "absolute"]
    np.testing.assert_allclose(reported_gain(np.array([0.9, 0.041]), np.array([0.6, 0.01])), [0.5, np.nan])


def test_nan_layers_are_neither_tied_nor_winners():
    rng = np.random.default_rng(0)
    B = 300
    reps = 0.6 + 0.05 * rng.standard_normal((4, B))
    reps[2] += 0.3  # layer 2 is clearly best
    reps[0] = np.nan  # layer 0: constant features, NaN everywhere
    assert tied_with_best(reps, 2).tolist() == [2]
    winners = best_index_distribution(reps)
    assert winners.shape == (B,) and (winners == 2).all()  # the NaN row does not drop every column


def test_selection_adjusted_reselects_the_best_layer_in_each_replicate_and_scores_it_in_the_next():
    rng = np.random.default_rng(1)
    B = 400
    shared = 0.02 * rng.standard_normal(B)
    # eight layers of equal true value: the naive best wins by noise alone
    equal = 0.7 + shared + 0.03 * rng.standard_normal((8, B))
    out = selection_adjusted(equal, final=7)
    pick = np.argmax(equal, axis=0)
    nxt = np.roll(equal, -1, axis=1)
    chosen = nxt[pick, np.arange(B)]
    assert out["n_candidates"] == 8
    assert (out["value_ci_low"], out["value_ci_high"]) == pytest.approx(percentile_ci(chosen))
    assert (out["diff_ci_low"], out["diff_ci_high"]) == pytest.approx(percentile_ci(chosen - nxt[7]))
    # the naive paired difference of the observed winner is optimistic; the adjusted one covers 0
    values = equal.mean(axis=1)
    best = int(np.argmax(values))
    naive_lo, _ = percentile_ci(equal[best] - equal[7])
    assert out["diff_ci_low"] < 0 < out["diff_ci_high"]
    assert out["diff_ci_low"] < naive_lo
    # a clearly better layer keeps a positive adjusted difference
    clear = equal.copy()
    clear[3] += 0.2
    out = selection_adjusted(clear, final=7)
    assert out["diff_ci_low"] > 0.1
    # lower is better; NaN rows are not candidates; too few replicates -> NaN
    out = selection_adjusted(-clear, final=7, higher_is_better=False)
    assert out["diff_ci_high"] < -0.1
    with_nan = np.vstack([np.full(B, np.nan), clear])
    assert selection_adjusted(with_nan, final=8)["n_candidates"] == 8
    assert np.isnan(selection_adjusted(clear[:, :1], final=7)["value_ci_low"])


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------


def make_labels(sizes: dict[str, int], seed: int = 0) -> np.ndarray:
    labels = np.concatenate([[k] * v for k, v in sizes.items()])
    return np.random.default_rng(seed).permutation(labels)


def test_stratified_cap_respects_caps_and_keeps_every_class():
    sizes = {"a": 500, "b": 120, "c": 30, "d": 3, "e": 1}
    labels = make_labels(sizes)
    idx, report = stratified_cap(labels, max_per_class=100, max_total=None, seed=0)
    assert np.all(np.diff(idx) > 0) and idx.dtype == np.int64  # sorted, unique
    kept = dict(zip(*np.unique(labels[idx], return_counts=True)))
    assert kept == {"a": 100, "b": 100, "c": 30, "d": 3, "e": 1}
    assert report == {
        "n_available": 654,
        "n_used": 234,
        "max_per_class": 100,
        "max_total": None,
        "subsampled": True,
    }
    idx2, report2 = stratified_cap(labels, max_per_class=100, max_total=120, seed=0)
    kept2 = dict(zip(*np.unique(labels[idx2], return_counts=True)))
    assert set(kept2) == set(sizes)  # every class keeps at least one cell
    assert len(idx2) <= 120 and report2["n_used"] == len(idx2)
    assert all(kept2[k] <= min(v, 100) for k, v in sizes.items())
    assert kept2["a"] == kept2["b"] > kept2["c"]  # proportional to the per-class quota
    assert np.all(np.diff(idx2) > 0)


def test_stratified_cap_is_deterministic_by_seed_and_uncapped_keeps_all():
    labels = make_labels({"x": 300, "y": 200, "z": 50}, seed=1)
    a, _ = stratified_cap(labels, max_per_class=40, max_total=100, seed=5)
    b, _ = stratified_cap(labels, max_per_class=40, max_total=100, seed=5)
    c, _ = stratified_cap(labels, max_per_class=40, max_total=100, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    d, _ = stratified_cap(labels, max_per_class=40, max_total=100, seed=np.random.SeedSequence(5))
    e, _ = stratified_cap(labels, max_per_class=40, max_total=100, seed=np.random.SeedSequence(5))
    np.testing.assert_array_equal(d, e)
    every, report = stratified_cap(labels, max_per_class=None, max_total=None, seed=0)
    np.testing.assert_array_equal(every, np.arange(len(labels)))
    assert report["subsampled"] is False and report["n_used"] == len(labels)


def test_random_cap():
    np.testing.assert_array_equal(random_cap(5, None, 0), np.arange(5))
    np.testing.assert_array_equal(random_cap(5, 10, 0), np.arange(5))
    r = random_cap(100, 17, 3)
    assert len(r) == 17 and np.all(np.diff(r) > 0) and r.max() < 100
    np.testing.assert_array_equal(r, random_cap(100, 17, 3))


# --------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------


def test_log1p_cpm_matches_a_dense_hand_computation():
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.8, size=(30, 12)).astype(np.float32)
    dense[4] = 0  # an empty cell stays zero
    got = log1p_cpm(sp.csr_matrix(dense))
    assert sp.issparse(got) and got.format == "csr"
    totals = dense.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.where(totals > 0, np.log1p(dense / totals * 1e4), 0.0)
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log1p_cpm(dense, target=100.0).toarray()[0], np.log1p(dense[0] / totals[0] * 100), 1e-5)
    assert not np.isnan(got.toarray()).any()


def test_highly_variable_genes_finds_planted_high_dispersion_genes():
    rng = np.random.default_rng(0)
    n_cells, n_genes = 600, 1000  # ~50 genes per mean bin, so one outlier stands out within its bin
    means = np.exp(rng.uniform(np.log(0.2), np.log(20), n_genes))
    counts = rng.poisson(means, size=(n_cells, n_genes)).astype(np.float32)  # Poisson: low dispersion
    planted = np.array([7, 41, 88, 120, 170, 199, 512, 999])
    for g in planted:  # bursty genes: same mean, expressed in 5% of the cells only
        on = rng.random(n_cells) < 0.05
        counts[:, g] = np.where(on, rng.poisson(means[g] / 0.05, n_cells), 0)
    counts[:, 3] = 0  # a gene never expressed is never chosen
    logX = log1p_cpm(counts)
    top = highly_variable_genes(logX, n_top=len(planted))
    np.testing.assert_array_equal(top, planted)
    wide = highly_variable_genes(logX, n_top=50)
    assert set(planted) <= set(wide) and np.all(np.diff(wide) > 0) and 3 not in wide
    assert len(highly_variable_genes(logX, n_top=10_000)) == n_genes - 1  # every expressed gene


def test_highly_variable_genes_agree_with_scanpy_seurat_flavour():
    sc = pytest.importorskip("scanpy")
    import anndata as ad

    from cellstrata.engine.input.datasets import synthetic_dataset

    logX = log1p_cpm(synthetic_dataset(800, 600, seed=3).X)
    for n_top in (50, 200):
        ours = highly_variable_genes(logX, n_top=n_top)
        ref = ad.AnnData(logX.copy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.highly_variable_genes(ref, n_top_genes=n_top, flavor="seurat")
        theirs = np.flatnonzero(ref.var["highly_variable"].to_numpy())
        # the same recipe; single-gene bins and ties at the cut-off may differ
        assert len(ours) == n_top and len(set(ours) & set(theirs)) >= 0.95 * n_top


def test_hvg_pca_and_pca_recipe_shapes():
    rng = np.random.default_rng(1)
    counts = sp.csr_matrix(rng.poisson(1.0, size=(80, 120)).astype(np.float32))
    Z = hvg_pca(counts, n_top=100)
    assert Z.shape == (80, 50) and Z.dtype == np.float32
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-4)  # PCA scores are centred
    assert hvg_pca(counts, n_top=20).shape == (80, 20)  # fewer HVGs than components
    assert hvg_pca(counts[:30], n_top=100).shape == (30, 29)  # fewer cells than components
    np.testing.assert_array_equal(hvg_pca(counts, n_top=100, seed=0), Z)
    X = rng.standard_normal((40, 64)).astype(np.float32) * 100
    P = pca_recipe(X)
    assert P.shape == (40, 39) and P.dtype == np.float32
    assert pca_recipe(X[:, :8]).shape == (40, 8)
    with pytest.raises(ValueError, match="NaN/inf"):
        as_float32(np.array([[1.0, np.nan]]))
    assert as_float32(np.ones((2, 2), dtype=np.float64)).dtype == np.float32
