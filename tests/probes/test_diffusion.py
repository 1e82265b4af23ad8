"""Diffusion pseudotime against scanpy 1.11 (the oracle) and against cases checkable by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr

from cellstrata.probes.diffusion import (
    diffusion_map,
    diffusion_pseudotime,
    dpt_distances,
    dpt_pseudotime,
    gauss_connectivities,
    knn_graph,
)


def noisy_curve(n: int = 400, dims: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 1-D curve (progress ``s``) rotated into ``dims`` dimensions, plus noise."""
    rng = np.random.default_rng(seed)
    s = np.sort(rng.uniform(0.0, 1.0, n))
    curve = np.c_[np.cos(3 * s), np.sin(3 * s), s, s**2, np.zeros((n, dims - 4))]
    rotation = np.linalg.qr(rng.normal(size=(dims, dims)))[0]
    return (curve @ rotation + 0.05 * rng.normal(size=(n, dims))).astype(np.float32), s


def two_clusters(seed: int = 1) -> np.ndarray:
    """Two Gaussian blobs far apart: a graph with two connected components."""
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(size=(150, 5)), rng.normal(size=(100, 5)) + 100.0]


def run_scanpy(X: np.ndarray, root: int, n_neighbors: int) -> dict[str, np.ndarray]:
    """``sc.pp.neighbors(method="gauss")`` -> ``sc.tl.diffmap`` -> ``sc.tl.dpt`` (n_dcs 10 and 15)."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(np.zeros((X.shape[0], 1), np.float32))
    a.obsm["E"] = X
    # X has < 8192 rows, so scanpy takes its exact brute-force sklearn path ("sklearn" names it explicitly).
    sc.pp.neighbors(a, use_rep="E", n_neighbors=n_neighbors, method="gauss", transformer="sklearn")
    sc.tl.diffmap(a, n_comps=15)
    a.uns["iroot"] = root
    out = {"connectivities": a.obsp["connectivities"].toarray(), "evals": np.asarray(a.uns["diffmap_evals"])}
    out["evecs"] = np.asarray(a.obsm["X_diffmap"])
    for n_dcs in (10, 15):
        sc.tl.dpt(a, n_dcs=n_dcs)
        out[f"dpt{n_dcs}"] = a.obs["dpt_pseudotime"].to_numpy()
    return out


@pytest.fixture(scope="module")
def oracle() -> dict[str, dict[str, np.ndarray]]:
    """scanpy's results on the noisy curve and on two disconnected clusters (one import, ~seconds)."""
    pytest.importorskip("scanpy")
    X, _ = noisy_curve()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"curve": run_scanpy(X, root=0, n_neighbors=30), "split": run_scanpy(two_clusters(), 3, 15)}


def test_connectivities_match_scanpy_gauss(oracle: dict) -> None:
    X, _ = noisy_curve()
    W = gauss_connectivities(*knn_graph(X, 30)).toarray()
    ref = oracle["curve"]["connectivities"]
    assert ((W != 0) == (ref != 0)).all()  # same symmetric union of 29-neighbour lists
    np.testing.assert_allclose(W, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(W, W.T)


def test_diffmap_matches_scanpy(oracle: dict) -> None:
    X, _ = noisy_curve()
    dm = diffusion_map(gauss_connectivities(*knn_graph(X, 30)), n_comps=15)
    ref = oracle["curve"]
    # scanpy casts eigenpairs to float32; ours stay float64, the only difference.
    np.testing.assert_allclose(dm.eigenvalues, ref["evals"], atol=1e-6)
    assert dm.eigenvalues[0] == pytest.approx(1.0) and np.all(np.diff(dm.eigenvalues) <= 0)
    for j in range(15):  # eigenvectors agree up to sign
        assert abs(np.corrcoef(dm.eigenvectors[:, j], ref["evecs"][:, j])[0, 1]) > 1 - 1e-6


@pytest.mark.parametrize("n_dcs", [10, 15])
def test_dpt_matches_scanpy(oracle: dict, n_dcs: int) -> None:
    X, _ = noisy_curve()
    pt, _ = diffusion_pseudotime(X, 0, n_neighbors=30, n_comps=15, n_dcs=n_dcs)
    ref = oracle["curve"][f"dpt{n_dcs}"]
    np.testing.assert_allclose(pt, ref, atol=1e-5)
    assert spearmanr(pt, ref).statistic > 0.9999


def test_disconnected_graph_matches_scanpy(oracle: dict) -> None:
    pt, dm = diffusion_pseudotime(two_clusters(), 3, n_neighbors=15)
    ref = oracle["split"]["dpt10"]
    assert dm.n_components == 2
    np.testing.assert_array_equal(np.isinf(pt), np.isinf(ref))  # the other blob is unreachable: inf
    assert np.isinf(pt[150:]).all() and np.isfinite(pt[:150]).all()
    np.testing.assert_allclose(pt[:150], ref[:150], atol=1e-5)
    assert pt[:150].max() == 1.0


def test_pseudotime_tracks_a_line_from_its_end() -> None:
    x = np.linspace(0.0, 1.0, 200)
    pt, _ = diffusion_pseudotime(x[:, None], 0, n_neighbors=30)
    assert pt[0] == 0.0 and np.argmax(pt) >= 190
    # Strictly increasing away from the tips. At the tips DC1 (a cosine) is flat and the unweighted
    # stationary component (scanpy keeps it) wobbles, so a few tip cells swap places, as in scanpy.
    assert np.all(np.diff(pt[10:190]) > 0)
    assert spearmanr(pt, x).statistic > 0.999


def test_pseudotime_follows_the_curve() -> None:
    X, s = noisy_curve()
    pt, _ = diffusion_pseudotime(X, 0)
    assert spearmanr(pt, s).statistic > 0.99


def test_knn_graph_excludes_self_and_sorts() -> None:
    X = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]])
    idx, dist = knn_graph(X, 3)  # n_neighbors counts the cell itself: two others
    np.testing.assert_array_equal(idx, [[1, 2], [0, 2], [1, 0], [2, 1], [3, 2]])
    np.testing.assert_allclose(dist, [[1, 3], [1, 2], [2, 3], [4, 6], [8, 12]])
    with pytest.raises(ValueError, match="n_neighbors"):
        knn_graph(X, 6)


def test_gauss_kernel_by_hand() -> None:
    # Points 0, 1, 3 on a line, two other neighbours each: sigma_i^2 = median of squared distances.
    X = np.array([[0.0], [1.0], [3.0]])
    W = gauss_connectivities(*knn_graph(X, 3)).toarray()
    s2 = np.array([(1 + 9) / 2, (1 + 4) / 2, (4 + 9) / 2])

    def w(i: int, j: int) -> float:
        den = s2[i] + s2[j]
        return np.sqrt(2 * np.sqrt(s2[i] * s2[j]) / den) * np.exp(-((X[i, 0] - X[j, 0]) ** 2) / den)

    expected = np.array([[0, w(0, 1), w(0, 2)], [w(1, 0), 0, w(1, 2)], [w(2, 0), w(2, 1), 0]])
    np.testing.assert_allclose(W, expected)


def test_gauss_kernel_is_finite_with_duplicate_cells() -> None:
    X = np.r_[np.zeros((10, 2)), np.random.default_rng(0).normal(size=(30, 2))]
    W = gauss_connectivities(*knn_graph(X, 6))
    assert np.isfinite(W.data).all() and (W.data > 0).all()


def test_dpt_roots_average_and_determinism() -> None:
    X, _ = noisy_curve(n=300, seed=3)
    dm = diffusion_map(gauss_connectivities(*knn_graph(X, 15)))
    one, two = dpt_pseudotime(dm, 5), dpt_pseudotime(dm, 40)
    np.testing.assert_allclose(dpt_pseudotime(dm, [5, 40]), (one + two) / 2)
    assert dpt_distances(dm, [5, 40]).shape == (2, 300)
    again = diffusion_map(gauss_connectivities(*knn_graph(X, 15)))
    np.testing.assert_array_equal(dm.eigenvalues, again.eigenvalues)
    np.testing.assert_array_equal(dm.eigenvectors, again.eigenvectors)


def test_roots_in_different_components_average_where_they_reach() -> None:
    pt, _ = diffusion_pseudotime(two_clusters(), [3, 200], n_neighbors=15)
    alone_a, _ = diffusion_pseudotime(two_clusters(), 3, n_neighbors=15)
    alone_b, _ = diffusion_pseudotime(two_clusters(), 200, n_neighbors=15)
    assert np.isfinite(pt).all()
    np.testing.assert_allclose(pt[:150], alone_a[:150])
    np.testing.assert_allclose(pt[150:], alone_b[150:])
