"""Leiden clustering metrics against a restatement of scib-metrics' ``nmi_ari_cluster_labels_leiden``.

The oracle below is scib-metrics 0.5's code path (``NeighborsResults.knn_graph_connectivities`` with
umap's own ``fuzzy_simplicial_set`` -> ``_compute_clustering_leiden`` over ``2x/10`` resolutions -> ARI
and NMI at the resolution of best NMI) applied to the same neighbour lists cellstrata uses (exact ones;
scib-metrics' Benchmarker finds approximate ones with pynndescent). Leiden partitions change with the
last bit of a weight, so the lists are shared and the numbers must agree exactly.
"""

from __future__ import annotations

import random

import igraph
import numpy as np
import pandas as pd
import pytest
from scipy.sparse import coo_matrix
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from umap.umap_ import fuzzy_simplicial_set

from cellstrata.engine.errors import ProbeError
from cellstrata.probes.base import ContextPlan
from cellstrata.probes.clustering import (
    LEIDEN_RESOLUTIONS,
    ClusteringTask,
    leiden_graph,
    leiden_sweep,
)
from cellstrata.probes.confidence import bootstrap_indices
from cellstrata.probes.diffusion import knn_search, umap_connectivities
from cellstrata.probes.features import pca_recipe

SCIB_RESOLUTIONS = [2 * x / 10 for x in range(1, 11)]


def scib_connectivities(indices: np.ndarray, distances: np.ndarray):
    """scib-metrics' ``NeighborsResults.knn_graph_connectivities``."""
    n, k = indices.shape
    conn, _, _ = fuzzy_simplicial_set(
        coo_matrix(([], ([], [])), shape=(n, 1)),
        n_neighbors=k,
        random_state=None,
        metric=None,
        knn_indices=indices,
        knn_dists=distances,
        set_op_mix_ratio=1.0,
        local_connectivity=1.0,
    )
    return conn


def scib_leiden_sweep(indices: np.ndarray, distances: np.ndarray, labels: np.ndarray, seed: int = 42) -> np.ndarray:
    """``[(nmi, ari) per resolution]`` as scib-metrics' ``nmi_ari_cluster_labels_leiden`` computes them from
    ``NeighborsResults(indices, distances)``."""
    conn = scib_connectivities(indices, distances)
    out = []
    for r in SCIB_RESOLUTIONS:
        igraph.set_random_number_generator(random.Random(seed))
        g = igraph.Graph.Weighted_Adjacency(conn, mode="directed")
        g.to_undirected(mode="each")
        pred = np.asarray(
            g.community_leiden(objective_function="modularity", weights="weight", resolution=r).membership
        )
        out.append(
            (normalized_mutual_info_score(labels, pred, average_method="arithmetic"), adjusted_rand_score(labels, pred))
        )
    return np.array(out)


def scib_nmi_ari(sweep: np.ndarray) -> tuple[float, float]:
    nmi, ari = sweep[np.argmax(sweep[:, 0])]
    return float(nmi), float(ari)


def nested_types(seed: int, n_per_sub: int = 25, d: int = 20, scale: float = 1.6, spread: float = 1.4):
    """Four labelled types, each made of three sub-states: fine resolutions split types, coarse merge them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, d)) * scale
    X, y = [], []
    for t in range(4):
        for _ in range(3):
            sub = centres[t] + rng.normal(size=d) * spread
            X.append(sub + rng.normal(size=(n_per_sub, d)))
            y += [f"type{t}"] * n_per_sub
    return np.vstack(X).astype(np.float32), np.array(y)


def unbalanced_types(seed: int, sizes: tuple[int, ...] = (150, 80, 40, 30), d: int = 20, scale: float = 0.6):
    """Overlapping Gaussian types of unequal sizes: NMI and ARI peak at different resolutions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), d)) * scale
    X = np.vstack([centres[i] + rng.normal(size=(n, d)) for i, n in enumerate(sizes)])
    return X.astype(np.float32), np.repeat([f"type{i}" for i in range(len(sizes))], sizes)


# --------------------------------------------------------------------------------------------------
# graph
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [5, 15])
def test_umap_connectivities_equal_umap(k: int) -> None:
    X, _ = nested_types(0)
    idx, dist = knn_search(X, k)
    got, want = umap_connectivities(idx, dist, idx.shape[1]), scib_connectivities(idx, dist)
    assert got.dtype == np.float32 and (abs(got - got.T) > 0).nnz == 0
    assert (got != 0).toarray().tolist() == (want != 0).toarray().tolist()
    np.testing.assert_array_equal(got.toarray(), want.toarray())  # umap's float32 weights, bit for bit
    # weighted: not the 0/1 adjacency of a plain kNN graph
    assert (got.data == 1).any() and (got.data < 0.5).mean() > 0.1


def test_umap_connectivities_duplicate_cells_equal_umap() -> None:
    """Cells at distance 0 from a neighbour (rho from the first positive distance) and cells whose
    every neighbour is a duplicate (rho = 0, width floored at 1e-3 of the mean distance) as umap."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 6))
    X[10:13] = X[9]  # four copies: with k = 4 each copy sees only copies
    X[40] = X[41]
    idx, dist = knn_search(X, 4)
    got, want = umap_connectivities(idx, dist, idx.shape[1]), scib_connectivities(idx, dist)
    assert (got != 0).toarray().tolist() == (want != 0).toarray().tolist()
    np.testing.assert_array_equal(got.toarray(), want.toarray())  # umap's float32 weights, bit for bit


def test_leiden_graph_has_both_directions_of_every_pair() -> None:
    X, _ = nested_types(2)
    conn = umap_connectivities(*knn_search(X, 15), 15)
    g = leiden_graph(conn)
    assert not g.is_directed() and g.ecount() == conn.nnz
    assert sorted(g.es["weight"]) == pytest.approx(sorted(conn.data.astype(float)))


# --------------------------------------------------------------------------------------------------
# Leiden sweep and the task's numbers
# --------------------------------------------------------------------------------------------------


def test_resolutions_are_scib_metrics() -> None:
    assert list(LEIDEN_RESOLUTIONS) == pytest.approx(SCIB_RESOLUTIONS)


@pytest.mark.parametrize("case", ["nested-3", "nested-4", "unbalanced-0", "unbalanced-1", "unbalanced-4"])
def test_leiden_sweep_equals_scib_metrics(case: str) -> None:
    kind, seed = case.split("-")
    X, y = (nested_types if kind == "nested" else unbalanced_types)(int(seed))
    idx, dist = knn_search(X, 15)
    want = scib_leiden_sweep(idx, dist, y)
    got = leiden_sweep(leiden_graph(umap_connectivities(idx, dist, idx.shape[1])), y, LEIDEN_RESOLUTIONS)
    nmi, ari = scib_nmi_ari(want)
    assert got["nmi"].value == pytest.approx(nmi, abs=1e-12)
    assert got["ari"].value == pytest.approx(ari, abs=1e-12)
    # both numbers come from the one partition at the resolution of best NMI
    best = float(SCIB_RESOLUTIONS[int(np.argmax(want[:, 0]))])
    assert got["ari"].resolution == got["nmi"].resolution == pytest.approx(best)
    assert np.array_equal(got["ari"].clusters, got["nmi"].clusters)
    # select="max": each score's own best over the same sweep
    high = leiden_sweep(leiden_graph(umap_connectivities(idx, dist, idx.shape[1])), y, LEIDEN_RESOLUTIONS, select="max")
    assert high["ari"].value == pytest.approx(want[:, 1].max(), abs=1e-12)
    assert high["nmi"].value == pytest.approx(want[:, 0].max(), abs=1e-12)


def plan_for(y: np.ndarray) -> ContextPlan:
    n = len(y)
    plan = ContextPlan(task="clustering", context="all", rows=np.arange(n), obs=pd.DataFrame({"cell_type": y}))
    plan.reference.update(
        y=y,
        boot=bootstrap_indices(n, 20, 0),
        silhouette_cells=np.arange(n),
        silhouette_boot=bootstrap_indices(n, 20, 1),
    )
    return plan


def test_task_reports_scib_metrics_leiden_numbers() -> None:
    """leiden_ari / leiden_nmi are scib-metrics' numbers on the pca50 features, and on this case the
    ARI at the best-NMI resolution is not the largest ARI of the sweep (the two rules disagree)."""
    X, y = unbalanced_types(0)
    want = scib_leiden_sweep(*knn_search(pca_recipe(X, seed=0), 15), y)
    nmi, ari = scib_nmi_ari(want)
    assert want[:, 1].max() > ari + 0.01  # the case tells the selection rules apart
    got = {m.metric: m for m in ClusteringTask(n_boot=20, kmeans=False).evaluate(plan_for(y), X)}
    assert got["leiden_ari"].value == pytest.approx(ari, abs=1e-12)
    assert got["leiden_nmi"].value == pytest.approx(nmi, abs=1e-12)
    res = SCIB_RESOLUTIONS[int(np.argmax(want[:, 0]))]
    assert got["leiden_ari"].extra["resolution"] == got["leiden_nmi"].extra["resolution"] == pytest.approx(res)
    assert got["leiden_ari"].ci_low <= ari <= got["leiden_ari"].ci_high

    high = ClusteringTask(n_boot=20, kmeans=False, select="max")
    assert high.primary_metric == "leiden_ari_max" and ClusteringTask().primary_metric == "leiden_ari"
    got = {m.metric: m for m in high.evaluate(plan_for(y), X)}
    assert "leiden_ari" not in got and "leiden_nmi" not in got
    assert got["leiden_ari_max"].value == pytest.approx(want[:, 1].max(), abs=1e-12)
    assert got["leiden_nmi_max"].value == pytest.approx(want[:, 0].max(), abs=1e-12)


def test_task_settings_name_the_rule_and_reject_unknown_ones() -> None:
    settings = ClusteringTask().settings()
    assert settings["select"] == "nmi" and settings["leiden_seed"] == 42 and settings["n_neighbors"] == 15
    with pytest.raises(ProbeError, match="select must be one of nmi, max"):
        ClusteringTask(select="best")
    with pytest.raises(ProbeError, match="at least 2"):
        ClusteringTask(n_neighbors=1)
