"""Diffusion pseudotime as scanpy computes it, without scanpy: kNN graph, connectivities, diffusion map, DPT.

The chain reproduces ``sc.pp.neighbors(n_neighbors)`` -> ``sc.tl.diffmap`` -> ``sc.tl.dpt`` of scanpy 1.11
(Haghverdi et al. 2016; Wolf et al. 2019) with exact Euclidean neighbours, which is what scanpy itself uses
below 8,192 cells (a brute-force ``KNeighborsTransformer``); from 8,192 cells on scanpy switches to
pynndescent's approximate neighbours, and this module stays exact.

- ``n_neighbors`` counts the cell itself, so every cell has ``n_neighbors - 1`` other neighbours;
- connectivities (``kernel``): ``"umap"``, scanpy's default ``method="umap"``, is UMAP's
  ``fuzzy_simplicial_set`` as scanpy calls it (:func:`umap_connectivities`); ``"gauss"`` is
  ``method="gauss"`` (:func:`gauss_connectivities`);
- Gaussian kernel widths are adaptive, ``sigma_i^2`` = median squared distance to those neighbours, and the kernel
  ``sqrt(2 s_i s_j / (s_i^2 + s_j^2)) exp(-d_ij^2 / (s_i^2 + s_j^2))`` is made symmetric over the union
  of both cells' neighbour lists (the kernel itself is symmetric, so the union is the only choice);
- the diffusion map is the top ``n_comps`` eigenpairs (largest magnitude, as ``eigsh(which="LM")``) of
  the density-normalised symmetric transition matrix ``Z^-1/2 D^-1 K D^-1 Z^-1/2``; the first,
  stationary component (eigenvalue 1) is kept, as scanpy keeps it in ``X_diffmap[:, 0]``;
- the DPT distance from a root uses the first ``n_dcs`` components: components with eigenvalue below
  0.9994 are weighted by ``lambda / (1 - lambda)``, the (near-)stationary ones enter unweighted; the
  pseudotime is that distance divided by its largest finite value.

Disconnected graphs behave as in scanpy: cells outside the root's connected component get pseudotime
``inf``. All steps are deterministic (the eigensolver starts from a fixed seeded vector).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh
from sklearn.neighbors import NearestNeighbors

N_NEIGHBORS = 30
N_COMPS = 15
N_DCS = 10
KERNELS = ("umap", "gauss")
STATIONARY_EVAL = 0.9994  # scanpy: eigenvalues at or above this count as stationary (float32 precision)


@dataclass(frozen=True)
class DiffusionMap:
    """The diffusion map of one graph (scanpy ``X_diffmap`` / ``diffmap_evals``) and its components.

    ``eigenvalues`` ``[n_comps]`` in decreasing order, ``eigenvectors`` ``[n_cells, n_comps]`` (columns,
    the first one stationary), ``components`` ``[n_cells]`` connected-component label of every cell.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    components: np.ndarray

    @property
    def n_components(self) -> int:
        """Number of connected components of the graph."""
        return int(self.components.max()) + 1 if self.components.size else 0


def knn_search(X: np.ndarray, n_neighbors: int = N_NEIGHBORS) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean nearest neighbours of every row of ``X``, the row itself included, as scanpy finds them.

    ``sc.pp.neighbors`` (below 8,192 cells) runs ``KNeighborsTransformer(n_neighbors, algorithm="brute")``,
    which queries ``n_neighbors + 1`` neighbours of every row with the row itself among them, and keeps the
    first ``n_neighbors``: that is restated here, ties at the cut included, so duplicated cells get scanpy's
    lists. Returns ``(indices, distances)``, both ``[n_cells, n_neighbors]``, nearest first; the row itself
    has distance 0 (scanpy zeroes it) and is usually, not always (duplicates), in the first column.
    """
    n = X.shape[0]
    if not 2 <= n_neighbors <= n:
        msg = f"n_neighbors must be between 2 and the number of cells ({n}), got {n_neighbors}"
        raise ValueError(msg)
    nn = NearestNeighbors(n_neighbors=min(n_neighbors + 1, n), algorithm="brute").fit(X)
    distances, indices = nn.kneighbors(X)
    indices, distances = indices[:, :n_neighbors].astype(np.int64), distances[:, :n_neighbors].astype(np.float64)
    distances[indices == np.arange(n)[:, None]] = 0.0
    return indices, distances


def without_self(indices: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn_search` lists less the cell itself (less the farthest neighbour where the cell is absent)."""
    n, k = indices.shape
    is_self = indices == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), np.argmax(is_self, axis=1), k - 1)
    keep = np.ones((n, k), dtype=bool)
    keep[np.arange(n), drop] = False
    return indices[keep].reshape(n, k - 1), distances[keep].reshape(n, k - 1)


def knn_graph(X: np.ndarray, n_neighbors: int = N_NEIGHBORS) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean nearest neighbours of every row of ``X [n_cells, n_features]``, the row itself left out.

    ``n_neighbors`` counts the cell itself (scanpy's convention). Returns ``(indices, distances)``, both
    ``[n_cells, n_neighbors - 1]``, nearest first (:func:`knn_search` less the cell itself).
    """
    return without_self(*knn_search(X, n_neighbors))


def gauss_connectivities(indices: np.ndarray, distances: np.ndarray) -> sp.csr_matrix:
    """Symmetric Gaussian-kernel connectivities ``[n, n]`` from kNN lists (scanpy ``method="gauss"``).

    ``indices``/``distances`` are ``[n, m]`` neighbour lists without the cell itself (:func:`knn_graph`).
    Each width is ``sigma_i^2 = median_j d_ij^2``; a zero width (more than half the neighbours are
    duplicates of the cell) is raised to the smallest positive width so that the kernel stays finite.
    """
    n, m = indices.shape
    d_sq = np.asarray(distances, dtype=np.float64) ** 2
    sigmas_sq = np.median(d_sq, axis=1)
    positive = sigmas_sq[sigmas_sq > 0]
    sigmas_sq = np.where(sigmas_sq > 0, sigmas_sq, positive.min() if positive.size else 1.0)
    sigmas = np.sqrt(sigmas_sq)
    rows = np.repeat(np.arange(n), m)
    cols = indices.ravel()
    den = sigmas_sq[rows] + sigmas_sq[cols]
    w = np.sqrt(2.0 * sigmas[rows] * sigmas[cols] / den) * np.exp(-d_sq.ravel() / den)
    W = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    return sp.csr_matrix(W.maximum(W.T))


SMOOTH_K_TOLERANCE = 1e-5  # umap-learn's constants
MIN_K_DIST_SCALE = 1e-3
SMOOTH_K_ITERATIONS = 64
FLOAT32_MAX = np.float32(np.finfo(np.float32).max)


@functools.cache
def _libm_expf() -> Callable[[float], float] | None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("m")
    try:
        f = ctypes.CDLL(name).expf if name else None
    except (OSError, AttributeError):
        return None
    if f is not None:
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    return f


def expf(x: np.ndarray) -> np.ndarray:
    """The C library's float32 ``expf`` (what umap-learn's compiled membership strengths call), elementwise.

    The float64 exponential rounded to float32 differs from ``expf`` in the last bit for about 1 value in
    2,000, and a Leiden partition can change with one such bit; it is the fallback when ctypes finds no C
    math library.
    """
    x = np.asarray(x, dtype=np.float32)
    f = _libm_expf()
    if f is None:
        return np.exp(x.astype(np.float64)).astype(np.float32)
    return np.fromiter(map(f, x.ravel().tolist()), dtype=np.float32, count=x.size).reshape(x.shape)


def smooth_knn_dist(distances: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's ``smooth_knn_dist`` (``local_connectivity=1``, ``bandwidth=1``): per-cell ``(sigma, rho)``.

    ``distances [n, k]`` (float32) include the cell itself in column 0 (distance 0), nearest first.
    ``rho`` is the distance to the nearest neighbour at a positive distance (0 when there is none).
    ``sigma`` is found by bisection so that ``sum_{j >= 1} exp(-max(d_ij - rho_i, 0) / sigma_i) = log2(k)``,
    stopping when within ``1e-5`` or after 64 steps; it is then floored at ``1e-3`` times the mean distance
    of the row (of all rows when ``rho`` is 0). The arithmetic is that of umap-learn's compiled loop, which
    agrees to the last bit: ``d_ij - rho_i`` in float32, the bisection, the exponentials and the running
    sum in float64 (numba types the parallel loop's locals as float64), summed sequentially over
    neighbours; vectorised over cells.
    """
    d = np.ascontiguousarray(distances, dtype=np.float32)
    n = d.shape[0]
    target = np.log2(k)
    positive = d > 0
    rho = np.where(positive.any(axis=1), d[np.arange(n), np.argmax(positive, axis=1)], 0.0).astype(np.float32)
    excess = (d[:, 1:] - rho[:, None]).astype(np.float64)  # float32 differences, as umap-learn
    fmax = float(FLOAT32_MAX)
    lo, hi, mid = np.zeros(n), np.full(n, fmax), np.ones(n)
    active = np.arange(n)
    for _ in range(SMOOTH_K_ITERATIONS):
        if active.size == 0:
            break
        ex, m = excess[active], mid[active]
        psum = np.zeros(active.size)
        with np.errstate(over="ignore", under="ignore"):
            for j in range(ex.shape[1]):
                psum += np.where(ex[:, j] > 0, np.exp(-(ex[:, j] / m)), 1.0)
        going = np.abs(psum - target) >= SMOOTH_K_TOLERANCE
        active, psum, m = active[going], psum[going], m[going]
        above = psum > target
        hi[active[above]] = m[above]
        lo[active[~above]] = m[~above]
        unbounded = ~above & (hi[active] >= fmax)
        mid[active] = np.where(unbounded, m * 2.0, (lo[active] + hi[active]) / 2.0)
    sigma = mid.astype(np.float32)
    # umap-learn's row mean sums the float32 row in float32, left to right (the mean over every row, used
    # when rho is 0, i.e. all of a cell's neighbours coincide with it, agrees to ~1e-7 only)
    row_mean = np.cumsum(d, axis=1, dtype=np.float32)[:, -1].astype(np.float64) / d.shape[1]
    floor = MIN_K_DIST_SCALE * np.where(rho > 0, row_mean, d.mean(dtype=np.float64))
    return np.where(sigma < floor, floor.astype(np.float32), sigma), rho


def umap_connectivities(indices: np.ndarray, distances: np.ndarray, n_neighbors: int) -> sp.csr_matrix:
    """UMAP connectivities ``[n, n]`` (float32), scanpy's default ``sc.pp.neighbors(method="umap")``.

    scanpy 1.11 calls ``umap.fuzzy_simplicial_set`` with the ``n_neighbors`` nearest neighbours *including
    the cell itself* (:func:`knn_search`), ``n_neighbors`` as ``k``, ``set_op_mix_ratio=1`` and
    ``local_connectivity=1``; scib-metrics' ``NeighborsResults.knn_graph_connectivities`` makes the same
    call. Restated here: :func:`smooth_knn_dist` (which skips the first column), then membership strengths
    ``a_ij = exp(-(d_ij - rho_i) / sigma_i)`` (float32 quotient and :func:`expf`; 1 when ``d_ij <= rho_i``,
    0 for the cell itself), then the fuzzy union ``A + A^T - A * A^T`` (elementwise product), in float32.
    Equal to umap-learn's matrix bit for bit.
    """
    n, k = indices.shape
    idx = np.asarray(indices, dtype=np.int64)
    dist = np.ascontiguousarray(distances, dtype=np.float32)
    sigma, rho = smooth_knn_dist(dist, float(n_neighbors))
    excess = dist - rho[:, None]
    decays = (excess > 0) & (sigma[:, None] != 0)
    vals = np.ones((n, k), dtype=np.float32)
    vals[decays] = expf(-excess[decays] / np.broadcast_to(sigma[:, None], excess.shape)[decays])
    vals[idx == np.arange(n)[:, None]] = 0.0  # the cell itself
    A = sp.coo_matrix((vals.ravel(), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n))
    A.eliminate_zeros()
    At = A.transpose()
    union = sp.csr_matrix(A + At - A.multiply(At), dtype=np.float32)
    union.eliminate_zeros()
    return union


def connectivities(indices: np.ndarray, distances: np.ndarray, n_neighbors: int, kernel: str = "umap") -> sp.csr_matrix:
    """Connectivities from :func:`knn_search` lists with ``kernel`` ``"umap"`` (scanpy's default) or ``"gauss"``."""
    if kernel == "umap":
        return umap_connectivities(indices, distances, n_neighbors)
    if kernel == "gauss":
        return gauss_connectivities(*without_self(indices, distances))
    msg = f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}"
    raise ValueError(msg)


def diffusion_map(connectivities: sp.spmatrix, n_comps: int = N_COMPS, seed: int = 0) -> DiffusionMap:
    """Top ``n_comps`` eigenpairs of the density-normalised symmetric transition matrix (``sc.tl.diffmap``).

    ``K = D^-1 W D^-1`` (``D`` = degrees of ``W``) removes the sampling density (Coifman and Lafon 2006);
    ``T = Z^-1/2 K Z^-1/2`` with ``Z`` the degrees of ``K``. ``n_comps`` is capped at ``n_cells - 1``.
    ``eigsh`` starts from ``RandomState(seed).standard_normal(n)``, scanpy's own start vector.
    """
    W = sp.csr_matrix(connectivities, dtype=np.float64)
    n = W.shape[0]
    inv_dens = 1.0 / np.asarray(W.sum(axis=0)).ravel()
    K = sp.diags(inv_dens) @ W @ sp.diags(inv_dens)
    inv_z = 1.0 / np.sqrt(np.asarray(K.sum(axis=0)).ravel())
    T = sp.csr_matrix(sp.diags(inv_z) @ K @ sp.diags(inv_z))
    k = int(min(n - 1, n_comps))
    v0 = np.random.RandomState(seed).standard_normal(n)
    evals, evecs = eigsh(T, k=k, which="LM", v0=v0)
    order = np.argsort(-evals, kind="stable")
    _, labels = connected_components(W, directed=False)
    return DiffusionMap(evals[order], np.ascontiguousarray(evecs[:, order]), labels.astype(np.int64))


def dpt_distances(dm: DiffusionMap, roots: np.ndarray | int, n_dcs: int = N_DCS) -> np.ndarray:
    """DPT distances ``[n_roots, n_cells]`` from each root over the first ``n_dcs`` components.

    ``inf`` for cells outside the root's connected component (scanpy ``DPT.distances_dpt``).
    """
    roots = np.atleast_1d(np.asarray(roots, dtype=np.int64))
    lam = dm.eigenvalues[:n_dcs]
    psi = dm.eigenvectors[:, :n_dcs]
    stationary = lam >= STATIONARY_EVAL
    weight = np.divide(lam, 1.0 - lam, out=np.ones_like(lam), where=~stationary)
    diff = (psi[roots][:, None, :] - psi[None, :, :]) * weight
    dist = np.sqrt(np.einsum("rnc,rnc->rn", diff, diff))
    same = dm.components[roots][:, None] == dm.components[None, :]
    return np.where(same, dist, np.inf)


def dpt_pseudotime(dm: DiffusionMap, roots: np.ndarray | int, n_dcs: int = N_DCS) -> np.ndarray:
    """Pseudotime ``[n_cells]`` in ``[0, 1]`` (``inf`` where unreachable), averaged over ``roots``.

    Per root this is ``sc.tl.dpt``'s ``dpt_pseudotime``: the DPT distance divided by its largest finite
    value. With several roots a cell gets the mean over the roots whose component holds it, and ``inf``
    only when no root reaches it.
    """
    dist = dpt_distances(dm, roots, n_dcs)
    finite = np.isfinite(dist)
    top = np.where(finite, dist, 0.0).max(axis=1, keepdims=True)
    pt = np.divide(dist, top, out=np.zeros_like(dist), where=finite & (top > 0))
    pt[~finite] = np.nan
    n_reach = finite.sum(axis=0)
    mean = np.nansum(pt, axis=0) / np.maximum(n_reach, 1)
    return np.where(n_reach > 0, mean, np.inf)


def diffusion_pseudotime(
    X: np.ndarray,
    roots: np.ndarray | int,
    *,
    n_neighbors: int = N_NEIGHBORS,
    n_comps: int = N_COMPS,
    n_dcs: int = N_DCS,
    kernel: str = "umap",
    seed: int = 0,
) -> tuple[np.ndarray, DiffusionMap]:
    """``X [n_cells, n_features]`` -> kNN -> connectivities (``kernel``) -> diffusion map -> DPT from ``roots``.

    With the defaults this is ``sc.pp.neighbors(use_rep=..., n_neighbors=30)`` -> ``sc.tl.diffmap`` ->
    ``sc.tl.dpt``. Returns the pseudotime ``[n_cells]`` (:func:`dpt_pseudotime`) and the diffusion map.
    """
    dm = diffusion_map(connectivities(*knn_search(X, n_neighbors), n_neighbors, kernel), n_comps, seed)
    return dpt_pseudotime(dm, roots, n_dcs), dm
