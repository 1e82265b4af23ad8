"""kNN label transfer and label-structure metrics: Leiden/k-means ARI and NMI, silhouette (protocol §2.4).

All three work on the layer's ``pca50`` features (StandardScaler then PCA(50) over the context's cells).

Leiden is scib-metrics' ``nmi_ari_cluster_labels_leiden`` (scib-metrics 0.5, as its ``Benchmarker``
calls it) with exact neighbours:

- the graph is the UMAP fuzzy-union connectivities (``NeighborsResults.knn_graph_connectivities``, umap's
  ``fuzzy_simplicial_set``; :func:`~.diffusion.umap_connectivities`, equal to it bit for bit) of exact
  ``n_neighbors``-nearest-neighbour lists (``n_neighbors`` counts the cell itself, as pynndescent's lists
  in ``NeighborsResults`` and scanpy's do; the Benchmarker passes 15, from an approximate pynndescent
  search where cellstrata searches exactly);
- igraph ``Weighted_Adjacency(mode="directed")`` then ``to_undirected(mode="each")``, and
  ``community_leiden(objective_function="modularity", weights="weight", resolution=r)`` (two iterations,
  igraph's default) with igraph's generator seeded by ``random.Random(42)`` before every resolution;
- resolutions ``2x/10``, ``x = 1..10``; the reported ARI **and** NMI are those of the partition at the
  resolution of best NMI (the first one on ties), as scib-metrics and scib's
  ``cluster_optimal_resolution`` (which optimises NMI) report them.

``select="max"`` instead reports the largest ARI and the largest NMI over the sweep, each at its own
resolution, as ``leiden_ari_max`` / ``leiden_nmi_max`` (an optimistic upper bound, not scib's number).
k-means uses as many clusters as there are labels.
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
from sklearn.neighbors import KNeighborsClassifier

from ..engine.errors import ProbeError
from .base import DEFAULT_BOOTSTRAP, DEFAULT_SEED, ContextPlan, Metric, MetricSpec
from .celltype import classification_metrics, classification_specs
from .confidence import bootstrap, bootstrap_indices
from .diffusion import knn_search, umap_connectivities
from .features import pca_recipe
from .labels import LabelTask, splits_of
from .metrics import PARTITION_METRICS, partition_metrics
from .sampling import random_cap

# scib-metrics' nmi_ari_cluster_labels_leiden sweep: resolutions 2x/n, x = 1..n, n = 10
LEIDEN_RESOLUTIONS = tuple(round(0.2 * i, 1) for i in range(1, 11))
# igraph's community_leiden default, which scib-metrics keeps (scanpy's igraph flavour uses 2 as well)
LEIDEN_ITERATIONS = 2
LEIDEN_SEED = 42  # scib-metrics' default seed
SELECTIONS = ("nmi", "max")
_IGRAPH_RNG = threading.Lock()  # igraph's random generator is process-global


def leiden_graph(connectivities: sp.spmatrix) -> Any:
    """The python-igraph graph scib-metrics clusters: each stored entry an edge, then made undirected.

    ``Weighted_Adjacency(mode="directed")`` + ``to_undirected(mode="each")`` keeps both directions of every
    symmetric pair as parallel edges (as scanpy's ``get_igraph_from_adjacency``), in the matrix's order.
    """
    import igraph

    g = igraph.Graph.Weighted_Adjacency(sp.csr_matrix(connectivities), mode="directed")
    g.to_undirected(mode="each")
    return g


def leiden(graph: Any, resolution: float, seed: int = LEIDEN_SEED) -> np.ndarray:
    """Leiden partition of a weighted python-igraph graph (modularity at ``resolution``), seeded as scib-metrics."""
    import igraph

    with _IGRAPH_RNG:
        igraph.set_random_number_generator(random.Random(seed))
        part = graph.community_leiden(
            objective_function="modularity",
            weights="weight",
            resolution=resolution,
            n_iterations=LEIDEN_ITERATIONS,
        )
    return np.asarray(part.membership, dtype=np.int64)


@dataclass(frozen=True)
class LeidenResult:
    """The partition a selection rule picked: its score, resolution and cluster ids."""

    value: float
    resolution: float
    clusters: np.ndarray


def leiden_sweep(
    graph: Any, labels: np.ndarray, resolutions: tuple[float, ...], seed: int = LEIDEN_SEED, select: str = "nmi"
) -> dict[str, LeidenResult]:
    """Leiden at every resolution; ``{"ari": ..., "nmi": ...}`` of the partition(s) ``select`` picks.

    ``select="nmi"`` (scib): both scores of the partition with the best NMI, the first on ties.
    ``select="max"``: the best ARI and the best NMI, each of its own partition.
    """
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    runs = []
    for r in resolutions:
        clusters = leiden(graph, r, seed)
        scores = partition_metrics(labels, clusters)
        runs.append((float(scores["ari"][0]), float(scores["nmi"][0]), float(r), clusters))
    by_nmi = runs[int(np.argmax([run[1] for run in runs]))]
    by_ari = runs[int(np.argmax([run[0] for run in runs]))] if select == "max" else by_nmi
    return {
        "ari": LeidenResult(by_ari[0], by_ari[2], by_ari[3]),
        "nmi": LeidenResult(by_nmi[1], by_nmi[2], by_nmi[3]),
    }


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

    def metric_specs(self, plan: ContextPlan) -> list[MetricSpec]:
        return classification_specs(plan, prefix="knn_", features="pca50")

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

    Leiden runs as scib-metrics runs it (module docstring) on the UMAP connectivities of the
    ``n_neighbors``-nearest-neighbour lists (the cell itself counted) of the pca50 features, at every
    resolution of ``resolutions``, seeded with ``leiden_seed``. ``select="nmi"`` reports ``leiden_ari`` and
    ``leiden_nmi`` of the partition with the best NMI (scib's numbers); ``select="max"`` reports
    ``leiden_ari_max`` / ``leiden_nmi_max``, each the best over the sweep. Silhouette uses at most
    ``silhouette_max_cells`` cells.
    """

    name: ClassVar[str] = "clustering"

    label_key: str = "cell_type"
    context_key: str | None = None
    n_neighbors: int = 15
    resolutions: tuple[float, ...] = LEIDEN_RESOLUTIONS
    min_cells_per_class: int = 10
    max_per_class: int | None = 5000
    max_cells: int | None = 50_000
    select: str = "nmi"
    leiden_seed: int = LEIDEN_SEED
    silhouette_max_cells: int = 5000
    kmeans: bool = True
    n_boot: int = DEFAULT_BOOTSTRAP
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ProbeError(f"clustering select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.n_neighbors < 2:
            raise ProbeError(
                f"clustering n_neighbors counts the cell itself and must be at least 2, got {self.n_neighbors}"
            )

    @property
    def primary_metric(self) -> str:
        return self._leiden_name("ari")

    def _leiden_name(self, score: str) -> str:
        return f"leiden_{score}" if self.select == "nmi" else f"leiden_{score}_max"

    def prepare(self, plan: ContextPlan, counts: sp.csr_matrix | None, var_names: Any) -> None:
        super().prepare(plan, counts, var_names)
        sil = random_cap(plan.n_cells, self.silhouette_max_cells, plan.seed_for(self.seed, "silhouette"))
        plan.reference["silhouette_cells"] = sil
        plan.reference["silhouette_boot"] = bootstrap_indices(len(sil), self.n_boot, plan.seed_for(self.seed, "sb"))

    def metric_specs(self, plan: ContextPlan) -> list[MetricSpec]:
        n, n_boot = plan.n_cells, len(plan.reference["boot"])
        names = [self._leiden_name(m) for m in PARTITION_METRICS]
        if self.kmeans:
            names += [f"kmeans_{m}" for m in PARTITION_METRICS]
        specs = [MetricSpec(name, n, n_boot, "pca50") for name in names]
        sil = len(plan.reference["silhouette_cells"])
        return [*specs, MetricSpec("silhouette", sil, len(plan.reference["silhouette_boot"]), "pca50")]

    def evaluate(self, plan: ContextPlan, X: np.ndarray) -> list[Metric]:
        Z = pca_recipe(X, seed=self.seed)
        y, boot = plan.reference["y"], plan.reference["boot"]
        out = []

        def add(metric: str, value: float, reps: np.ndarray, n: int, **extra: float) -> None:
            out.append(Metric(plan.context, metric, value, n, replicates=reps, features="pca50", extra=dict(extra)))

        k = min(self.n_neighbors, plan.n_cells)
        graph = leiden_graph(umap_connectivities(*knn_search(Z, k), k))
        sweep = leiden_sweep(graph, y, tuple(self.resolutions), self.leiden_seed, self.select)
        for m in PARTITION_METRICS:
            best = sweep[m]
            add(
                self._leiden_name(m),
                best.value,
                partition_metrics(y, best.clusters, boot)[m],
                plan.n_cells,
                resolution=best.resolution,
                n_clusters=float(len(np.unique(best.clusters))),
            )
        if self.kmeans:
            km = KMeans(n_clusters=len(np.unique(y)), n_init=4, random_state=self.seed).fit_predict(Z)
            value, reps = partition_metrics(y, km), partition_metrics(y, km, boot)
            for m in PARTITION_METRICS:
                add(f"kmeans_{m}", float(value[m][0]), reps[m], plan.n_cells)
        sil = plan.reference["silhouette_cells"]
        s = silhouette_samples(Z[sil], y[sil])
        add("silhouette", float(s.mean()), bootstrap(np.mean, (s,), plan.reference["silhouette_boot"]), len(sil))
        return out
