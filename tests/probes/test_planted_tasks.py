"""One hand-built store, a different planted best layer per task and per cell state, recovered by the runner.

Pooling ``z`` is three blocks of features, each ``strength[task][layer] * signal + noise`` (fresh noise
per layer): cell-type means peak at layer 2; a time curve of the lineage cells peaks at layer 5;
perturbation shifts (one direction per planted module, so perturbations sharing a module are similar)
peak at layer 1 in resting cells and at layer 3 in activated cells, the context-dependence the paper
reports. The runner must find each of these layers, with CIs that contain the estimate and gains over
the final layer whose CIs exclude 0.

The cell-type signal is planted only in the cell types off the time course (the lineage types follow
time, so their means would be a second time signal). For perturbations the test ranks layers by the
detection metrics (AUROC, energy tests): the similarity metrics compare against a DE reference computed
from the counts, which is only as informative as the synthetic screen's cells per perturbation allow;
their planted-structure recovery is tested on a dedicated screen in test_perturbation.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from store_fixture import write_store

from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.probes import summarize
from cellstrata.probes.celltype import CellTypeTask
from cellstrata.probes.perturbation import PerturbationTask
from cellstrata.probes.runner import probe
from cellstrata.probes.trajectory import TrajectoryTask

N_CELLS, N_GENES, L = 1500, 300, 6
CELL_TYPE = (0.1, 0.3, 1.0, 0.4, 0.25, 0.15, 0.1)
TIME = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 0.3)
PERTURBATION = {"resting": (0.2, 1.0, 0.35, 0.2, 0.1, 0.1, 0.05), "activated": (0.05, 0.2, 0.35, 1.0, 0.3, 0.2, 0.1)}
BEST = {"cell_type": 2, "trajectory": 5, ("perturbation", "resting"): 1, ("perturbation", "activated"): 3}


def _unit_directions(rng: np.random.Generator, k: int, width: int) -> np.ndarray:
    d = rng.standard_normal((k, width))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    adata = synthetic_dataset(N_CELLS, N_GENES, seed=3)
    obs = adata.obs
    rng = np.random.default_rng(11)
    n = adata.n_obs
    # cell-type block: class means in 8 dims
    truth = adata.uns["synthetic"]
    types, y = np.unique(obs["cell_type"].astype(str), return_inverse=True)
    type_means = 3.0 * rng.standard_normal((len(types), 8))
    lineage = {str(truth["progenitor"]), *map(str, truth["fates"])}
    type_means[[i for i, name in enumerate(types) if name in lineage]] = 0.0
    # time block: lineage cells on a curve in 6 dims, other cells at random points of it (no time label)
    t = obs["time"].to_numpy(dtype=np.float64)
    curve_t = np.where(np.isnan(t), rng.random(n), t)
    freqs = np.arange(1, 4)
    curve = 3.5 * np.column_stack([np.cos(np.pi * curve_t[:, None] * freqs), np.sin(np.pi * curve_t[:, None] * freqs)])
    # perturbation block: one direction per planted module plus a small individual part, zero for control
    module_dirs = _unit_directions(rng, int(truth["perturbation_module"].max()) + 1, 10)
    shift = {
        p: 2.0 * (module_dirs[m] + 0.3 * _unit_directions(rng, 1, 10)[0])
        for p, m in zip(truth["perturbations"], truth["perturbation_module"], strict=True)
    }
    pert = obs["perturbation"].astype(str).to_numpy()
    pert_shift = np.array([shift.get(p, np.zeros(10)) for p in pert])
    state = obs["cell_state"].astype(str).to_numpy()
    layers = np.empty((L + 1, n, 24), dtype=np.float32)
    for layer in range(L + 1):
        p_strength = np.array([PERTURBATION[s][layer] for s in state])[:, None]
        layers[layer] = np.hstack(
            [CELL_TYPE[layer] * type_means[y], TIME[layer] * curve, p_strength * pert_shift]
        ) + rng.standard_normal((n, 24))
    path = tmp_path_factory.mktemp("planted-tasks") / "store.zarr"
    write_store(path, {"z": layers}, adata.obs_names, adata=adata, chunk_cells=256)
    tasks = [
        CellTypeTask(n_boot=100),
        TrajectoryTask(time_key="time", context_key="cell_state", n_boot=100),
        PerturbationTask(context_key="cell_state", n_boot=100, n_permutations=50),
    ]
    res = probe(path, adata, tasks, pooling="z")
    return res, summarize(res, metrics="all")


def _row(summary, task, context, metric):
    rows = summary[(summary["task"] == task) & (summary["context"] == context) & (summary["metric"] == metric)]
    assert len(rows) == 1
    return rows.iloc[0]


@pytest.mark.parametrize(
    ("task", "context", "metric", "best"),
    [
        ("cell_type", "all", "macro_f1", BEST["cell_type"]),
        ("trajectory", "resting", "dpt_spearman_time", BEST["trajectory"]),
        ("trajectory", "activated", "dpt_spearman_time", BEST["trajectory"]),
        ("trajectory", "activated", "ridge_r2", BEST["trajectory"]),
        ("perturbation", "resting", "auroc_median", BEST[("perturbation", "resting")]),
        ("perturbation", "activated", "auroc_median", BEST[("perturbation", "activated")]),
        ("perturbation", "resting", "energy_distance_ratio", BEST[("perturbation", "resting")]),
        ("perturbation", "activated", "energy_distance_ratio", BEST[("perturbation", "activated")]),
    ],
)
def test_each_task_and_state_finds_its_planted_layer(planted, task, context, metric, best):
    _, summary = planted
    r = _row(summary, task, context, metric)
    assert r["best_layer"] == best, r["answer"]
    assert r["depth"] == pytest.approx(best / L)
    assert r["ci_low"] <= r["value"] <= r["ci_high"]
    # the final layer carries much less of the planted signal: the paired difference excludes 0
    assert r["diff_vs_final"] > 0 and r["diff_ci_low"] > 0, r["answer"]
    assert str(L) not in r["tied_layers"].replace("-", ",").split(", ")


def test_context_dependent_optimum_is_reported_per_state(planted):
    _, summary = planted
    p = summary[summary["metric"] == "auroc_median"].set_index("context")["best_layer"]
    assert p["resting"] != p["activated"]


def test_every_metric_row_has_a_ci_around_its_value(planted):
    res, _ = planted
    rows = res.table[res.table["layer"].notna() & res.table["ci_low"].notna()]
    assert len(rows) > 0
    assert ((rows["ci_low"] <= rows["value"] + 1e-9) & (rows["value"] <= rows["ci_high"] + 1e-9)).all()
