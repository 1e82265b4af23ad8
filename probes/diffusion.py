"""Diffusion pseudotime as scanpy computes it, without scanpy: kNN graph, Gaussian kernel, diffusion map, DPT.

The chain reproduces ``sc.pp.neighbors(method="gauss", knn=True)`` -> ``sc.tl.diffmap`` -> ``sc.tl.dpt``
of scanpy 1.11 (Haghverdi et al. 2016; Wolf et al. 2019), with exact Euclidean neighbours:

- ``n_neighbors`` counts the cell itself, so every cell has ``n_neighbors - 1`` other neighbours;
- kernel widths are adaptive, ``sigma_i^2`` = median squared distance to those neighbours, and the kernel
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

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh
from sklearn.neighbors import NearestNeighbors

N_NEIGHBORS = 30
N_COMPS = 15
N_DCS = 10
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


def knn_graph(X: np.ndarray, n_neighbors: int = N_NEIGHBORS) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean nearest neighbours of every row of ``X [n_cells, n_features]``.

    ``n_neighbors`` counts the cell itself (scanpy's convention). Returns ``(indices, distances)``, both
    ``[n_cells, n_neighbors - 1]``, the cell itself excluded, nearest first.
    """
    n = X.shape[0]
    if not 2 <= n_neighbors <= n:
        msg = f"n_neighbors must be between 2 and the number of cells ({n}), got {n_neighbors}"
        raise ValueError(msg)
    nn = NearestNeighbors(n_neighbors=n_neighbors - 1, algorithm="brute").fit(X)
    distances, indices = nn.kneighbors()  # query = the fitted rows; a row is never its own neighbour
    return indices.astype(np.int64), distances.astype(np.float64)


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
    seed: int = 0,
) -> tuple[np.ndarray, DiffusionMap]:
    """``X [n_cells, n_features]`` -> kNN -> Gaussian kernel -> diffusion map -> DPT pseudotime from ``roots``.

    Returns the pseudotime ``[n_cells]`` (:func:`dpt_pseudotime`) and the diffusion map.
    """
    indices, distances = knn_graph(X, n_neighbors)
    dm = diffusion_map(gauss_connectivities(indices, distances), n_comps, seed)
    return dpt_pseudotime(dm, roots, n_dcs), dm
