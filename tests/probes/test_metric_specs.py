"""Every task declares the metrics it returns (``metric_specs``): the constant-layer NaN rows are built
from these declarations, so they must match what an evaluation returns, metric by metric, in order."""

from __future__ import annotations

import numpy as np
import pytest
from store_fixture import synthetic_adata
from threadpoolctl import threadpool_limits

from cellstrata.probes.base import LayerRows, StreamingTask, Task
from cellstrata.probes.celltype import CellTypeTask, StreamingCellTypeTask
from cellstrata.probes.clustering import ClusteringTask, KnnTransferTask
from cellstrata.probes.constant import FLAG, evaluate, evaluate_stream
from cellstrata.probes.perturbation import PerturbationTask
from cellstrata.probes.trajectory import TrajectoryTask

CHUNK = 97  # odd, so plans cross chunk boundaries unevenly


@pytest.fixture(scope="module")
def adata():
    return synthetic_adata(n_cells=523, n_genes=150, seed=11)


def tasks(control: str) -> list[Task]:
    return [
        CellTypeTask(context_key="cell_state", n_boot=7, max_per_class=40),
        CellTypeTask(learner="sgd", n_boot=9, epochs=1, max_per_class=None, max_cells=None, baseline_max_cells=200),
        KnnTransferTask(n_boot=5, n_neighbors=7),
        ClusteringTask(n_boot=6, resolutions=(0.5,), kmeans=False, silhouette_max_cells=101),
        ClusteringTask(n_boot=4, resolutions=(0.5, 1.0), select="max"),
        TrajectoryTask(time_key="time", n_boot=8, n_neighbors=10, smoothness_k=5),
        TrajectoryTask(time_key="time", n_boot=0, n_neighbors=10, root="robust", features="pca50"),
        TrajectoryTask(time_key="time", n_boot=5, n_neighbors=10, root="robust", n_roots=3, ridge_max_cells=120),
        PerturbationTask(control=control, n_boot=6, n_permutations=5),
    ]


def _prepared(task: Task, adata) -> list:
    plans = task.plan(adata.obs, chunk_cells=CHUNK)
    for p in plans:
        task.prepare(p, adata.X[p.rows[task.counts_rows(p)]], list(adata.var_names))
    return plans


def _declared(metrics) -> list[tuple]:
    return [
        (m.metric, m.n_cells, None if m.replicates is None else len(m.replicates), m.features, m.higher_is_better)
        for m in metrics
    ]


def test_declared_metrics_match_an_evaluation_and_the_constant_layer(adata):
    rng = np.random.default_rng(5)
    with threadpool_limits(limits=1):
        for task in tasks(adata.uns["synthetic"]["control"]):
            for plan in _prepared(task, adata):
                X = rng.standard_normal((adata.n_obs, 24)).astype(np.float32)
                flat = np.broadcast_to(rng.standard_normal(24).astype(np.float32), X.shape)
                specs = [
                    (s.name, s.n_cells, s.n_replicates, s.features, s.higher_is_better) for s in task.metric_specs(plan)
                ]
                if isinstance(task, StreamingTask):
                    got = task.evaluate_stream(plan, LayerRows(lambda r, X=X: X[r], plan.rows, CHUNK))
                    nan = evaluate_stream(task, plan, lambda r, flat=flat: flat[r], CHUNK)
                else:
                    got = task.evaluate(plan, X[plan.rows])
                    nan = evaluate(task, plan, flat[plan.rows])
                assert _declared(got) == specs, (task.name, plan.context)
                assert _declared(nan) == specs
                assert all(np.isnan(m.value) and m.extra == {FLAG: 1.0} for m in nan)
                assert all(m.replicates is None or np.isnan(m.replicates).all() for m in nan)
                assert {m.context for m in nan} == {plan.context}


def test_the_sgd_learner_is_a_streaming_task_with_the_same_settings():
    sgd = CellTypeTask(learner="sgd", seed=3)
    assert type(sgd) is StreamingCellTypeTask and isinstance(sgd, StreamingTask)
    assert not isinstance(CellTypeTask(), StreamingTask)
    assert sgd.settings() == StreamingCellTypeTask(seed=3).settings() and sgd.name == "cell_type"
    assert sgd.settings()["learner"] == "sgd"
    with pytest.raises(Exception, match="learner='sgd'"):
        StreamingCellTypeTask(learner="logistic")
