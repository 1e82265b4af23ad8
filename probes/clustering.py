"""kNN label transfer and label-structure metrics: Leiden/k-means ARI and NMI, silhouette (protocol §2.4).

All three work on the layer's ``pca50`` features (StandardScaler then PCA(50) over the context's cells).
Leiden runs on a symmetric k-nearest-neighbour graph over a resolution sweep and reports the best ARI
and NMI (as scib's ``optimize_resolution``); k-means uses as many clusters as there are labels.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_samples
from sklearn.model_selection import cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, kneighbors_graph

from .base import DEFAULT_BOOTSTRAP, DEFAULT_SEED, ContextPlan, Metric
from .celltype import classification_metrics
from .confidence import bootstrap, bootstrap_indices
from .features import pca_recipe
from .labels import LabelTask, splits_of
from .metrics import partition_metrics
from .sampling import random_cap

# the sweep of scib-metrics' nmi_ari_cluster_labels_leiden (resolutions 2x/n, x = 1..n, n = 10)
LEIDEN_RESOLUTIONS = tuple(round(0.2 * i, 1) for i in range(1, 11))
# scanpy's default for the igraph flavour; iterating to convergence takes minutes on noisy 30k-cell graphs
LEIDEN_ITERATIONS = 2
_IGRAPH_RNG = threading.Lock()  # igraph's random generator is process-global


def ari(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Adjusted Rand index."""
    return float(partition_metrics(labels, clusters)["ari"][0])


def nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean of the entropies)."""
    return float(partition_metrics(labels, clusters)["nmi"][0])


def knn_graph(X: np.ndarray, k: int) -> sp.csr_matrix:
    """Symmetric unweighted kNN graph (an edge when either cell is among the other's ``k`` neighbours)."""
    A = kneighbors_graph(X, n_neighbors=min(k, len(X) - 1), mode="connectivity", include_self=False)
    return sp.csr_matrix(A.maximum(A.T))


def to_igraph(graph: sp.csr_matrix) -> Any:
    """An undirected python-igraph graph of a symmetric adjacency matrix."""
    import igraph

    coo = sp.triu(graph, k=1).tocoo()
    return igraph.Graph(n=graph.shape[0], edges=np.column_stack([coo.row, coo.col]).tolist(), directed=False)


def leiden(graph: Any, resolution: float, seed: int) -> np.ndarray:
    """Leiden partition (modularity at ``resolution``, ``LEIDEN_ITERATIONS`` passes) of a python-igraph graph."""
    import igraph

    with _IGRAPH_RNG:
        igraph.set_random_number_generator(random.Random(seed))
        part = graph.community_leiden(
            objective_function="modularity", resolution=resolution, n_iterations=LEIDEN_ITERATIONS
        )
    return np.asarray(part.membership, dtype=np.int64)


def leiden_sweep(graph: sp.csr_matrix, labels: np.ndarray, resolutions: tuple[float, ...], seed: int) -> dict[str, Any]:
    """Leiden at every resolution; the partitions and resolutions that maximise ARI and NMI."""
    g = to_igraph(graph)
    best: dict[str, Any] = {"ari": -np.inf, "nmi": -np.inf}
    for r in resolutions:
        clusters = leiden(g, r, seed)
        scores = partition_metrics(labels, clusters)
        a, m = float(scores["ari"][0]), float(scores["nmi"][0])
        if a > best["ari"]:
            best.update(ari=a, ari_clusters=clusters, ari_resolution=r)
        if m > best["nmi"]:
            best.update(nmi=m, nmi_clusters=clusters, nmi_resolution=r)
    return best


@dataclass(frozen=True)
class KnnTransferTask(LabelTask):
    """kNN label transfer: ``KNeighborsClassifier(k, weights="distance")`` on pca50, cross-validated.

    With ``group_key`` the folds hold out whole donors/batches (transfer to unseen donors).
    """

    name: ClassVar[str] = "knn_transfer"

    label_key: str = "cell_type"
    context_key: str | None = None
    group_key: str | None = None
    n_neighbors: int = 15
    n_folds: int = 5
    min_cells_per_class: int = 10
    max_per_class: int | None = 2000
    max_cells: int | None = 100_000
    n_boot: int = DEFAULT_BOOTSTRAP
    seed: int = DEFAULT_SEED

    @property
    def primary_metric(self) -> str:
        return "knn_macro_f1"

    def evaluate(self, plan: ContextPlan, X: np.ndarray) -> list[Metric]:
        Z = pca_recipe(X, seed=self.seed)
        y, folds = plan.reference["y"], plan.reference["folds"]
        k = int(min(self.n_neighbors, max(1, int(np.bincount(folds).min()) - 1), len(y) - 1))
        clf = KNeighborsClassifier(n_neighbors=max(k, 1), weights="distance")
        y_pred = cross_val_predict(clf, Z, y, cv=splits_of(folds))
        return classification_metrics(plan, y_pred, prefix="knn_", features="pca50")


@dataclass(frozen=True)
class ClusteringTask(LabelTask):
    """How well a layer's geometry separates ``label_key``: Leiden and k-means ARI/NMI, silhouette.

    Leiden runs on a symmetric kNN graph (``n_neighbors``) of the pca50 features at every resolution of
    ``resolutions`` and reports the best; silhouette uses at most ``silhouette_max_cells`` cells.
    """

    name: ClassVar[str] = "clustering"

    label_key: str = "cell_type"
    context_key: str | None = None
    n_neighbors: int = 15
    resolutions: tuple[float, ...] = LEIDEN_RESOLUTIONS
    min_cells_per_class: int = 10
    max_per_class: int | None = 5000
    max_cells: int | None = 50_000
    silhouette_max_cells: int = 5000
    kmeans: bool = True
    n_boot: int = DEFAULT_BOOTSTRAP
    seed: int = DEFAULT_SEED

    @property
    def primary_metric(self) -> str:
        return "leiden_ari"

    def prepare(self, plan: ContextPlan, counts: sp.csr_matrix | None, var_names: Any) -> None:
        super().prepare(plan, counts, var_names)
        sil = random_cap(plan.n_cells, self.silhouette_max_cells, plan.seed_for(self.seed, "silhouette"))
        plan.reference["silhouette_cells"] = sil
        plan.reference["silhouette_boot"] = bootstrap_indices(len(sil), self.n_boot, plan.seed_for(self.seed, "sb"))

    def evaluate(self, plan: ContextPlan, X: np.ndarray) -> list[Metric]:
        Z = pca_recipe(X, seed=self.seed)
        y, boot = plan.reference["y"], plan.reference["boot"]
        out = []

        def add(metric: str, value: float, reps: np.ndarray, n: int, **extra: float) -> None:
            out.append(Metric(plan.context, metric, value, n, replicates=reps, features="pca50", extra=dict(extra)))

        sweep = leiden_sweep(knn_graph(Z, self.n_neighbors), y, tuple(self.resolutions), self.seed)
        for m in ("ari", "nmi"):
            clusters = sweep[f"{m}_clusters"]
            add(
                f"leiden_{m}",
                sweep[m],
                partition_metrics(y, clusters, boot)[m],
                plan.n_cells,
                resolution=sweep[f"{m}_resolution"],
                n_clusters=float(len(np.unique(clusters))),
            )
        if self.kmeans:
            km = KMeans(n_clusters=len(np.unique(y)), n_init=4, random_state=self.seed).fit_predict(Z)
            value, reps = partition_metrics(y, km), partition_metrics(y, km, boot)
            for m in ("ari", "nmi"):
                add(f"kmeans_{m}", float(value[m][0]), reps[m], plan.n_cells)
        sil = plan.reference["silhouette_cells"]
        s = silhouette_samples(Z[sil], y[sil])
        add("silhouette", float(s.mean()), bootstrap(np.mean, (s,), plan.reference["silhouette_boot"]), len(sil))
        return out
