"""Feature recipes applied identically to every layer, and the HVG-PCA(50) baseline from counts.

Recipes (recorded with every result):

- ``std``: ``StandardScaler``; supervised probes fit it inside each training fold (a pipeline step);
- ``pca50``: ``StandardScaler`` then ``PCA(50)`` on the plan's cells, for graphs, kNN, clustering,
  silhouette and energy distances. Standardising first keeps a few huge residual-stream dimensions from
  dominating Euclidean distances, and PCA equalises width across models (768-d vs 2048-d).

The HVG-PCA(50) baseline (:func:`hvg_pca`) is scanpy's ``normalize_total(1e4)`` -> ``log1p`` ->
``highly_variable_genes`` (default ``seurat`` flavour) -> ``pca`` restated without scanpy, equal to it gene for
gene and to float32 rounding (the tests run scanpy as the oracle); 2,000 genes by default, 2,500 for the
trajectory task's reference (the paper's).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from ..engine.errors import ProbeError

PCA_COMPONENTS = 50
HVG_GENES = 2000
CPM_TARGET = 1e4


class BaselineFeatures(np.ndarray):
    """HVG-PCA(50) coordinates of the counts: already what ``pca50`` produces, so :func:`pca_recipe`
    passes them through unchanged (standardising the 50 PCs would give noise PCs the weight of the
    leading ones; the paper uses ``X_pca`` as is)."""


def as_float32(X: np.ndarray) -> np.ndarray:
    """``X`` as C-contiguous float32 with non-finite values rejected."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X).all(axis=1)).sum())
        msg = f"{bad} cells have NaN/inf features (unwritten or overflowed store rows)"
        raise ValueError(msg)
    return X


def pca_recipe(X: np.ndarray, n_components: int = PCA_COMPONENTS, seed: int = 0) -> np.ndarray:
    """``StandardScaler`` -> ``PCA(n_components)`` (fewer when the data has fewer cells or dimensions).

    :class:`BaselineFeatures` (and slices of them) are returned as they are.
    """
    if isinstance(X, BaselineFeatures):
        return as_float32(np.asarray(X))
    X = StandardScaler().fit_transform(as_float32(X))
    k = int(min(n_components, X.shape[0] - 1, X.shape[1]))
    if k < 1:
        return X.astype(np.float32)
    with warnings.catch_warnings():  # a layer constant over cells (e.g. CLS at the embedding) has no variance
        warnings.simplefilter("ignore", RuntimeWarning)
        return PCA(n_components=k, random_state=seed, svd_solver="auto").fit_transform(X).astype(np.float32)


def log1p_cpm(counts: sp.spmatrix | np.ndarray, target: float = CPM_TARGET) -> sp.csr_matrix:
    """``log1p(counts / total * target)`` per cell (cells with no counts stay zero), as CSR.

    The arithmetic of ``sc.pp.normalize_total(target_sum=target)`` then ``sc.pp.log1p`` (scanpy 1.11): integer
    counts become float32, floating counts keep their precision; each cell's total (summed in float64, stored
    in the matrix's precision) is divided by ``target`` and the cell's values by that factor.
    """
    X = sp.csr_matrix(counts, copy=True)
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float32)
    X.sum_duplicates()
    cell = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    per_cell = np.bincount(cell, weights=X.data.astype(np.float64), minlength=X.shape[0])  # sequential, float64
    factor = per_cell.astype(X.dtype) / X.dtype.type(target)
    factor = factor + (factor == 0)  # scanpy: empty cells are divided by 1
    X.data = np.log1p(X.data / np.repeat(factor, np.diff(X.indptr)))
    return X


def highly_variable_genes(logX: sp.spmatrix | np.ndarray, n_top: int = HVG_GENES, n_bins: int = 20) -> np.ndarray:
    """Column indices (sorted) of the highly variable genes of log1p data, scanpy's default ``flavor="seurat"``.

    A restatement of ``sc.pp.highly_variable_genes(n_top_genes=n_top, n_bins=n_bins)`` of scanpy 1.11 on
    ``logX`` (:func:`log1p_cpm`): on ``expm1(logX)`` (in the matrix's precision) each gene's mean and
    variance (ddof 1, in float64); a mean of 0 becomes ``1e-12``; dispersion = variance / mean, a dispersion
    of 0 is NaN; then ``log`` of the dispersion and ``log1p`` of the mean. Genes fall into ``n_bins``
    equal-width bins of that log mean (``pd.cut``, over every gene, expressed or not); within each bin the
    dispersion is z-scored (mean and sample sd of the bin's non-NaN dispersions), and a gene alone in its bin
    gets a normalised dispersion of 1. The genes at or above the ``n_top``-th highest normalised dispersion
    are chosen, so ties at the cut-off can add genes, as in scanpy; genes with a NaN normalised dispersion
    (never expressed, or constant) never are. Raises :class:`ProbeError` when no gene has a dispersion (no
    gene is expressed in two or more cells at different levels): then these are not counts.
    """
    X = sp.csr_matrix(logX)
    n, n_genes = X.shape
    v = np.expm1(X.data)  # the matrix's precision, as scanpy's ``np.expm1`` of the copied matrix
    sums = np.bincount(X.indices, weights=v.astype(np.float64), minlength=n_genes)
    squares = np.bincount(X.indices, weights=(v * v).astype(np.float64), minlength=n_genes)
    mean = sums / n
    var = squares / n - mean**2
    if n != 1:
        var *= n / (n - 1)
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
    df = pd.DataFrame({"means": np.log1p(mean), "dispersions": dispersion})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    alone = stats["dev"].isnull()  # one gene (one non-NaN dispersion) in the bin: normalised to 1
    stats.loc[alone, "dev"] = stats.loc[alone, "avg"]
    stats.loc[alone, "avg"] = 0
    per_gene = stats.loc[df["mean_bin"]].set_index(df.index)
    norm = ((df["dispersions"] - per_gene["avg"]) / per_gene["dev"]).to_numpy(dtype=np.float64)
    finite = norm[~np.isnan(norm)]
    if finite.size == 0:
        msg = (
            f"none of the {n_genes} genes varies across these {n} cells (every value is zero or constant), "
            "so no highly variable genes can be chosen: the HVG-PCA features need raw counts"
        )
        raise ProbeError(msg)
    cut = np.sort(finite)[::-1][min(n_top, finite.size) - 1]
    return np.flatnonzero(np.nan_to_num(norm, nan=-np.inf) >= cut)


def hvg_pca(
    counts: sp.spmatrix | np.ndarray, n_top: int = HVG_GENES, n_components: int = PCA_COMPONENTS, seed: int = 0
) -> np.ndarray:
    """The baseline representation as :class:`BaselineFeatures` (float32), the paper's reference recipe.

    ``sc.pp.normalize_total(target_sum=1e4)`` -> ``sc.pp.log1p`` -> ``sc.pp.highly_variable_genes(
    n_top_genes=n_top, subset=True)`` -> ``sc.pp.pca(n_comps=n_components)`` restated (:func:`log1p_cpm`,
    :func:`highly_variable_genes`): scanpy's PCA centres the genes but does not scale them, and runs
    scikit-learn's ``PCA(svd_solver="arpack", random_state=seed)`` on the sparse matrix. Fewer cells or
    genes than ``n_components`` give ``min(n_cells - 1, n_genes)`` components (``svd_solver="full"`` where
    ARPACK cannot take that many; scanpy refuses). Raises :class:`ProbeError` when the counts have no
    expressed genes.
    """
    logX = log1p_cpm(counts)
    if logX.nnz == 0:
        msg = (
            f"the counts of these {logX.shape[0]} cells have no expressed genes (every value of the matrix is "
            "zero): the HVG-PCA features need raw counts; pass the AnnData layer that holds them "
            "(--counts-layer NAME) or an AnnData whose X holds them"
        )
        raise ProbeError(msg)
    genes = highly_variable_genes(logX, n_top)
    Xh = logX[:, genes]
    n, p = Xh.shape
    k = int(min(n_components, n - 1, p))
    if k < 1:
        return Xh.toarray().astype(np.float32).view(BaselineFeatures)
    if k < min(n, p):
        pca = PCA(n_components=k, svd_solver="arpack", random_state=seed)
        Z = pca.fit_transform(Xh)
    else:
        Z = PCA(n_components=k, svd_solver="full", random_state=seed).fit_transform(Xh.toarray())
    return np.asarray(Z, dtype=np.float32).view(BaselineFeatures)
