"""Diffusion pseudotime against scanpy 1.11 and umap-learn (the oracles) and against cases checkable by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr

from cellstrata.probes.diffusion import (
    connectivities,
    diffusion_map,
    diffusion_pseudotime,
    dpt_distances,
    dpt_pseudotime,
    gauss_connectivities,
    knn_graph,
    knn_search,
    smooth_knn_dist,
    umap_connectivities,
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


def run_scanpy(X: np.ndarray, root: int, n_neighbors: int, method: str = "gauss") -> dict[str, np.ndarray]:
    """``sc.pp.neighbors(method=method)`` -> ``sc.tl.diffmap`` -> ``sc.tl.dpt`` (n_dcs 10 and 15)."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(np.zeros((X.shape[0], 1), np.float32))
    a.obsm["E"] = X
    # X has < 8192 rows, so scanpy takes its exact brute-force sklearn path ("sklearn" names it explicitly).
    sc.pp.neighbors(a, use_rep="E", n_neighbors=n_neighbors, method=method, transformer="sklearn")
    sc.tl.diffmap(a, n_comps=15)
    a.uns["iroot"] = root
    out = {"connectivities": a.obsp["connectivities"].toarray(), "evals": np.asarray(a.uns["diffmap_evals"])}
    out["evecs"] = np.asarray(a.obsm["X_diffmap"])
    for n_dcs in (10, 15):
        sc.tl.dpt(a, n_dcs=n_dcs)
        out[f"dpt{n_dcs}"] = a.obs["dpt_pseudotime"].to_numpy()
    return out


def scanpy_default_connectivities(X: np.ndarray, n_neighbors: int = 30) -> np.ndarray:
    """``sc.pp.neighbors(use_rep=..., n_neighbors=n_neighbors)`` with every default (UMAP, automatic transformer)."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(np.zeros((X.shape[0], 1), np.float32))
    a.obsm["E"] = X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(a, use_rep="E", n_neighbors=n_neighbors)
    return a.obsp["connectivities"]


@pytest.fixture(scope="module")
def oracle() -> dict[str, dict[str, np.ndarray]]:
    """scanpy's results on the noisy curve and on two disconnected clusters (one import, ~seconds)."""
    pytest.importorskip("scanpy")
    X, _ = noisy_curve()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "curve": run_scanpy(X, root=0, n_neighbors=30),
            "split": run_scanpy(two_clusters(), 3, 15),
            "curve_umap": run_scanpy(X, root=0, n_neighbors=30, method="umap"),
            "split_umap": run_scanpy(two_clusters(), 3, 15, method="umap"),
        }


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
    pt, _ = diffusion_pseudotime(X, 0, n_neighbors=30, n_comps=15, n_dcs=n_dcs, kernel="gauss")
    ref = oracle["curve"][f"dpt{n_dcs}"]
    np.testing.assert_allclose(pt, ref, atol=1e-5)
    assert spearmanr(pt, ref).statistic > 0.9999


def with_duplicates(seed: int = 4) -> np.ndarray:
    """A noisy curve in which some cells appear twice or three times (distance-0 neighbours)."""
    X, _ = noisy_curve(n=300, dims=8, seed=seed)
    return np.r_[X, X[:20], X[:5]]


@pytest.mark.parametrize(
    "X",
    [noisy_curve()[0], noisy_curve(n=1500, dims=50, seed=1)[0], with_duplicates()],
    ids=["curve", "wide", "duplicates"],
)
def test_umap_connectivities_match_scanpy_default(X: np.ndarray) -> None:
    pytest.importorskip("scanpy")
    ref = scanpy_default_connectivities(X, 30)
    W = umap_connectivities(*knn_search(X, 30), 30)
    assert W.dtype == np.float32 and W.shape == ref.shape
    assert ((W != 0) != (ref != 0)).nnz == 0  # the same edges: the fuzzy union of the 30-neighbour lists
    assert abs(W - ref).max() == 0  # umap-learn's arithmetic, bit for bit
    assert abs(W - W.T).max() == 0 and W.data.max() <= 1.0 and W.data.min() > 0
    np.testing.assert_array_equal(W.diagonal(), 0)
    np.testing.assert_array_equal(connectivities(*knn_search(X, 30), 30).toarray(), W.toarray())  # the default


def test_smooth_knn_dist_matches_umap_learn() -> None:
    umap = pytest.importorskip("umap.umap_")
    X = with_duplicates()
    _, dist = knn_search(X, 15)
    D = dist.astype(np.float32)  # the cell itself among them, as scanpy passes it
    D[-1] = 0.0  # a cell whose neighbours all coincide with it: rho = 0, the global floor applies
    want_sigma, want_rho = umap.smooth_knn_dist(D, 15.0)
    sigma, rho = smooth_knn_dist(D, 15.0)
    np.testing.assert_array_equal(rho, want_rho)
    np.testing.assert_array_equal(sigma[:-1], want_sigma[:-1])
    assert sigma[-1] == pytest.approx(want_sigma[-1], rel=1e-6)  # the floor from the mean of every row
    assert rho[-1] == 0 and sigma[-1] == pytest.approx(1e-3 * D.mean(), rel=1e-6)
    # Cells without duplicates: sigma solves sum_j exp(-max(d_ij - rho_i, 0) / sigma_i) = log2(k) over the
    # k - 1 other neighbours (a cell with duplicates has too many at d <= rho for a solution: sigma shrinks).
    single = slice(20, 300)
    excess = np.maximum(D[single, 1:] - rho[single, None], 0)
    np.testing.assert_allclose(np.exp(-excess / sigma[single, None]).sum(axis=1), np.log2(15), atol=1e-4)


def test_umap_kernel_by_hand() -> None:
    # Points 0, 1, 3, 7 on a line with n_neighbors = 3 (the cell and two others): rho_i is the nearest
    # distance; sigma_i solves 1 + exp(-(d_i2 - rho_i) / sigma_i) = log2(3).
    X = np.array([[0.0], [1.0], [3.0], [7.0]])
    W = umap_connectivities(*knn_search(X, 3), 3).toarray().astype(np.float64)
    idx, dist = knn_graph(X, 3)
    rho = dist[:, 0]
    sigma = (dist[:, 1] - rho) / -np.log(np.log2(3) - 1)
    A = np.zeros((4, 4))
    for i in range(4):
        A[i, idx[i, 0]] = 1.0
        A[i, idx[i, 1]] = np.exp(-(dist[i, 1] - rho[i]) / sigma[i])
    np.testing.assert_allclose(W, A + A.T - A * A.T, rtol=1e-4)
    assert W[0, 3] == 0 and W[0, 2] > 0  # 0-2 is an edge of 0's list; 3 is in nobody's list with 0


def test_connectivities_refuse_an_unknown_kernel() -> None:
    with pytest.raises(ValueError, match="kernel must be one of umap, gauss, got 'cosine'"):
        connectivities(*knn_search(np.arange(10.0)[:, None], 3), 3, kernel="cosine")


@pytest.mark.parametrize("n_dcs", [10, 15])
def test_default_dpt_matches_scanpy_default(oracle: dict, n_dcs: int) -> None:
    X, _ = noisy_curve()
    pt, dm = diffusion_pseudotime(X, 0, n_neighbors=30, n_comps=15, n_dcs=n_dcs)  # kernel="umap"
    ref = oracle["curve_umap"]
    np.testing.assert_allclose(dm.eigenvalues, ref["evals"], atol=1e-5)
    np.testing.assert_allclose(pt, ref[f"dpt{n_dcs}"], atol=1e-5)
    assert spearmanr(pt, ref[f"dpt{n_dcs}"]).statistic > 0.99999


@pytest.mark.parametrize("kernel", ["gauss", "umap"])
def test_disconnected_graph_matches_scanpy(oracle: dict, kernel: str) -> None:
    pt, dm = diffusion_pseudotime(two_clusters(), 3, n_neighbors=15, kernel=kernel)
    ref = oracle["split" if kernel == "gauss" else "split_umap"]["dpt10"]
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
