"""Feature recipes applied identically to every layer, and the HVG-PCA(50) baseline from counts.

Recipes (recorded with every result):

- ``std``: ``StandardScaler``; supervised probes fit it inside each training fold (a pipeline step);
- ``pca50``: ``StandardScaler`` then ``PCA(50)`` on the plan's cells, for graphs, kNN, clustering,
  silhouette and energy distances. Standardising first keeps a few huge residual-stream dimensions from
  dominating Euclidean distances, and PCA equalises width across models (768-d vs 2048-d).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

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
    """``log1p(counts / total * target)`` per cell (cells with no counts stay zero)."""
    X = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(target, totals, out=np.zeros_like(totals), where=totals > 0)
    X = sp.diags(scale.astype(np.float32)) @ X
    X.data = np.log1p(X.data)
    return sp.csr_matrix(X)


def highly_variable_genes(logX: sp.csr_matrix, n_top: int = HVG_GENES, n_bins: int = 20) -> np.ndarray:
    """Column indices of the ``n_top`` genes of highest normalised dispersion (Seurat flavour).

    Dispersion = var/mean of ``expm1(logX)``; it is z-scored within ``n_bins`` bins of log mean
    expression, so highly expressed genes do not win by level alone. Genes never expressed are skipped.
    """
    X = sp.csr_matrix(logX)
    Xe = X.copy()
    Xe.data = np.expm1(Xe.data)
    mean = np.asarray(Xe.mean(axis=0)).ravel().astype(np.float64)
    sq = np.asarray(Xe.multiply(Xe).mean(axis=0)).ravel()
    n = X.shape[0]
    var = (sq - mean**2) * (n / max(n - 1, 1))
    expressed = mean > 0
    disp = np.full_like(mean, np.nan)
    disp[expressed] = np.log(np.maximum(var[expressed], 1e-12) / mean[expressed])
    logmean = np.log1p(mean)
    bins = pd.cut(pd.Series(logmean[expressed]), bins=n_bins, labels=False)
    d = pd.Series(disp[expressed])
    grp = d.groupby(bins.values)
    mu, sd = grp.transform("mean"), grp.transform("std")
    z = ((d - mu) / sd.replace(0, np.nan)).fillna(0.0).to_numpy()
    norm = np.full_like(mean, -np.inf)
    norm[expressed] = z
    k = int(min(n_top, expressed.sum()))
    order = np.argsort(-norm, kind="stable")[:k]
    return np.sort(order)


def hvg_pca(
    counts: sp.spmatrix | np.ndarray, n_top: int = HVG_GENES, n_components: int = PCA_COMPONENTS, seed: int = 0
) -> np.ndarray:
    """The baseline representation: log1p-CPM -> top ``n_top`` HVGs -> PCA(``n_components``) (centred),
    as :class:`BaselineFeatures`."""
    logX = log1p_cpm(counts)
    genes = highly_variable_genes(logX, n_top)
    Xh = logX[:, genes].toarray()
    k = int(min(n_components, Xh.shape[0] - 1, Xh.shape[1]))
    if k < 1:
        return Xh.astype(np.float32).view(BaselineFeatures)
    return PCA(n_components=k, random_state=seed).fit_transform(Xh).astype(np.float32).view(BaselineFeatures)
