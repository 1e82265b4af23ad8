"""What the report tells a reader beyond the numbers: constant-feature layers, chance levels, the weights.

A store built by hand holds two poolings over the synthetic cells: ``x`` with a planted best layer, and
``cls`` whose layer 0 is one vector for every cell (as Tahoe-X1's ``<cls>`` token at the embedding
output). The probes must give NaN for that layer, flagged and noted, for in-memory and streaming tasks;
every row carries its metric's chance level; a store from an ``init-checkpoint`` folder says random weights.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from store_fixture import BEST, N_LAYERS, planted_layers, synthetic_adata, write_store
from threadpoolctl import threadpool_limits

from cellstrata.engine.models.weights import MARKER, mark_random_init, random_init_of, weights_provenance
from cellstrata.engine.storage.store import open_store, update_attrs
from cellstrata.probes import chance as chance_mod
from cellstrata.probes.celltype import CellTypeTask
from cellstrata.probes.chance import chance_level, chance_rule
from cellstrata.probes.clustering import ClusteringTask
from cellstrata.probes.constant import is_constant
from cellstrata.probes.report import summary_markdown, weights_line, write_report
from cellstrata.probes.runner import probe
from cellstrata.probes.summary import summarize


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def flat_store(tmp_path_factory):
    """Poolings ``x`` (planted, best layer BEST) and ``cls`` (= ``x`` but layer 0 constant over cells)."""
    adata = synthetic_adata()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    x = planted_layers(labels, seed=1)
    cls = x.copy()
    cls[0] = np.linspace(-1.0, 1.0, x.shape[2], dtype=np.float32)[None, :]  # the same vector for every cell
    path = tmp_path_factory.mktemp("flat") / "store.zarr"
    write_store(path, {"x": x, "cls": cls}, adata.obs_names, adata=adata)
    return path, adata


@pytest.fixture(scope="module")
def flat_probe(flat_store):
    path, adata = flat_store
    tasks = [
        CellTypeTask(context_key="cell_state", n_boot=30),
        ClusteringTask(context_key="cell_state", n_boot=30, resolutions=(0.5, 1.0), kmeans=False),
    ]
    return probe(path, adata, tasks, cache=False)


def test_is_constant():
    assert is_constant(np.ones((5, 3), np.float32))
    assert not is_constant(np.eye(3, dtype=np.float32))
    assert not is_constant(np.ones((1, 3)))  # one cell: nothing to compare
    X = np.ones((4, 2))
    X[3, 1] = 1.0 + 1e-6
    assert not is_constant(X)


def test_constant_layer_gives_nan_with_a_note_for_every_task_and_context(flat_probe, tmp_path):
    t = flat_probe.table
    layer_rows = t[t["pooling"].isin(["x", "cls"])]
    flat = layer_rows[(layer_rows["pooling"] == "cls") & (layer_rows["layer"] == 0)]
    assert set(flat["task"]) == {"cell_type", "clustering"} and set(flat["context"]) == {"activated", "resting"}
    assert flat["value"].isna().all() and flat["ci_low"].isna().all() and flat["ci_high"].isna().all()
    assert (flat["constant_features"] == 1).all()
    # the same metrics as the other layers (names come from the task, not made up)
    other = layer_rows[(layer_rows["pooling"] == "cls") & (layer_rows["layer"] == 1)]
    assert sorted(flat["metric"]) == sorted(other["metric"])
    # every other layer and the whole x pooling are untouched
    rest = layer_rows[~layer_rows.index.isin(flat.index)]
    assert rest["value"].notna().all() and rest["constant_features"].isna().all()
    # the NaN layer's replicates are NaN and do not spoil the paired statistics of the others
    for key, reps in flat_probe.replicates.items():
        if key[2] == "cls":
            assert np.isnan(reps[0]).all() and np.isfinite(reps[1:]).all()
    s = summarize(flat_probe)
    cls_rows = s[s["pooling"] == "cls"]
    assert (cls_rows["constant_layers"] == "0").all()
    assert (cls_rows["n_candidates"] == N_LAYERS).all()  # layers 1..L; layer 0 is not a candidate
    assert (s[s["pooling"] == "x"]["n_candidates"] == N_LAYERS + 1).all()
    assert (s[s["task"] == "cell_type"]["best_layer"] == BEST).all()
    assert all("NaN at layer(s) 0: constant features" in a for a in cls_rows["answer"])
    assert not any("0" in str(x).split(", ") for x in cls_rows["tied_layers"])
    text = summary_markdown(flat_probe, s)
    assert "**Constant features.**" in text and "cell_type (" in text and "cls): layer(s) 0" in text
    paths = write_report(flat_probe, tmp_path)
    back = pd.read_csv(paths["results"])
    assert back.loc[(back["pooling"] == "cls") & (back["layer"] == 0), "value"].isna().all()


def test_constant_layer_in_a_streaming_task(flat_store):
    path, adata = flat_store
    task = CellTypeTask(learner="sgd", n_boot=20, epochs=1, max_per_class=None, max_cells=None)
    res = probe(path, adata, task, pooling="cls", layers=[0, BEST], cache=False, baseline=False)
    t = res.table
    zero, best = t[t["layer"] == 0], t[t["layer"] == BEST]
    assert zero["value"].isna().all() and (zero["constant_features"] == 1).all()
    assert sorted(zero["metric"]) == sorted(best["metric"]) and best["value"].notna().all()


def test_chance_levels_by_definition():
    counts = {"a": 60, "b": 30, "c": 10}
    assert chance_level("macro_f1", counts) == pytest.approx(1 / 3)
    assert chance_level("balanced_accuracy", counts) == pytest.approx(1 / 3)
    assert chance_level("accuracy", counts) == pytest.approx(0.6)
    assert chance_level("knn_accuracy", np.array([60, 30, 10, 0])) == pytest.approx(0.6)  # empty classes ignored
    assert np.isnan(chance_level("macro_f1", None))
    for metric, value in [
        ("leiden_ari", 0.0), ("kmeans_nmi", 0.0), ("silhouette", 0.0), ("dpt_spearman_time", 0.0),
        ("dpt_spearman_reference", 0.0), ("ridge_r2", 0.0), ("ridge_spearman", 0.0), ("time_smoothness", 1.0),
        ("semantic_similarity", 0.0), ("semantic_similarity_delta", 0.0), ("auroc_median", 0.5),
    ]:  # fmt: skip
        assert chance_level(metric) == value, metric
    assert np.isnan(chance_level("energy_distance_ratio")) and np.isnan(chance_level("unknown"))
    assert chance_rule("knn_macro_f1").startswith("1/K") and chance_rule("energy_distance_ratio").startswith("none")


def test_stratified_guessing_reaches_the_macro_f1_chance_level():
    # the definition, checked by simulation: guessing each class with its frequency
    from cellstrata.probes.metrics import label_metrics

    rng = np.random.default_rng(0)
    p = np.array([0.6, 0.3, 0.1])
    y = rng.choice(3, size=200_000, p=p)
    guess = rng.choice(3, size=y.size, p=p)
    m = label_metrics(y, guess)
    counts = np.bincount(y)
    assert float(m["macro_f1"][0]) == pytest.approx(chance_level("macro_f1", counts), abs=0.01)
    assert float(m["balanced_accuracy"][0]) == pytest.approx(chance_level("balanced_accuracy", counts), abs=0.01)
    majority = label_metrics(y, np.zeros_like(y))
    assert float(majority["accuracy"][0]) == pytest.approx(chance_level("accuracy", counts))


def test_every_row_carries_its_chance_level_with_the_context_class_counts(flat_probe, flat_store):
    _, adata = flat_store
    t = flat_probe.table
    for context, obs in adata.obs.groupby("cell_state", observed=True):
        counts = obs["cell_type"].astype(str).value_counts()
        counts = counts[counts >= 10]
        rows = t[(t["task"] == "cell_type") & (t["context"] == str(context))]
        f1 = rows[rows["metric"] == "macro_f1"]["chance"]
        acc = rows[rows["metric"] == "accuracy"]["chance"]
        assert np.allclose(f1, 1 / len(counts)) and np.allclose(acc, counts.max() / counts.sum())
    clus = t[t["task"] == "clustering"]
    assert (clus[clus["metric"].isin(["leiden_ari", "leiden_nmi", "silhouette"])]["chance"] == 0.0).all()
    s = summarize(flat_probe)
    assert s["chance"].notna().all()
    text = summary_markdown(flat_probe, s)
    assert "**Chance levels**" in text and "`macro_f1`: 1/K" in text
    assert all("; chance " in a for a in s["answer"])
    # tasks without labels have no class counts
    assert (
        chance_mod.class_counts_of(ClusteringTask(), adata.obs)["T_cell"] == (adata.obs["cell_type"] == "T_cell").sum()
    )
    assert chance_mod.class_counts_of(object(), adata.obs) is None


def test_init_checkpoint_marker_and_config_seed(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    assert random_init_of(folder) is None
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8, "random_init_seed": 4}))
    assert random_init_of(folder) == {"weights": "random", "seed": 4, "evidence": "config.json random_init_seed"}
    mark_random_init(folder, family="scfoundation", preset="tiny", seed=7)
    assert json.loads((folder / MARKER).read_text())["weights"] == "random"
    assert random_init_of(folder)["seed"] == 7 and random_init_of(folder)["evidence"] == MARKER
    assert random_init_of(tmp_path / "absent") is None and random_init_of(None) is None
    # a store's attributes: the recorded attribute first, then the recorded config, then the folder
    assert weights_provenance({"weights": {"weights": "random", "seed": 1}})["seed"] == 1
    assert weights_provenance({"model": {"config": {"random_init_seed": 2}}})["seed"] == 2
    assert weights_provenance({"model": {"config": {}, "checkpoint": str(folder)}})["seed"] == 7
    assert weights_provenance({"model": {"config": {}, "checkpoint": "hand-built"}}) is None


def test_init_checkpoint_command_writes_the_marker(tmp_path):
    from cellstrata.cli import main

    out = tmp_path / "gf"
    assert main(["init-checkpoint", "--model", "geneformer", "--preset", "tiny", "--out", str(out)]) == 0
    assert random_init_of(out)["evidence"] == MARKER


def test_report_says_random_weights(flat_store, tmp_path):
    path, adata = flat_store
    res = probe(path, adata, CellTypeTask(n_boot=10), pooling="x", layers=[BEST, N_LAYERS], baseline=False)
    assert res.store["weights"] is None
    text = summary_markdown(res, summarize(res))
    assert "Weights: as given" in text and "random weights" not in text
    folder = tmp_path / "random-ckpt"
    folder.mkdir()
    mark_random_init(folder, family="scgpt", preset="tiny", seed=3)
    st = open_store(path)
    group = st.location.open_group("r+")
    model = dict(st.attrs["model"])
    update_attrs(group, model={**model, "checkpoint": str(folder)})
    try:
        res = probe(path, adata, CellTypeTask(n_boot=10), pooling="x", layers=[BEST, N_LAYERS], baseline=False)
        assert res.store["weights"]["weights"] == "random"
        text = summary_markdown(res, summarize(res))
        assert "Weights: **random weights** (written by `cellstrata init-checkpoint`, seed 3)" in text
        assert weights_line(res.store) in text
        paths = write_report(res, tmp_path / "report")
        assert paths["plot"].stat().st_size > 5000
    finally:
        update_attrs(group, model=model)


def test_a_store_extracted_from_an_init_checkpoint_folder_reports_random_weights(tmp_path, capsys):
    # scFoundation keeps its config inside models.ckpt, so only init-checkpoint's marker tells
    from cellstrata.cli import main
    from cellstrata.engine.input.datasets import write_synthetic_h5ad
    from cellstrata.engine.run import extract

    data = tmp_path / "cells.h5ad"
    write_synthetic_h5ad(data, n_cells=240, seed=0, genes_per_cell=60)
    ckpt = tmp_path / "scf"
    assert main(["init-checkpoint", "--model", "scfoundation", "--preset", "tiny", "--out", str(ckpt)]) == 0
    store = extract(data, model="scfoundation", checkpoint=ckpt, out=tmp_path / "s.zarr", progress=False)
    # the extraction records the weights in the store, so the report does not need the folder any more
    assert store.attrs["weights"] == {"weights": "random", "seed": 0, "evidence": MARKER}
    (ckpt / MARKER).unlink()
    res = probe(store.path, data, CellTypeTask(n_boot=10, n_folds=3), layers=[0, -1], baseline=False)
    assert res.store["weights"] == {"weights": "random", "seed": 0, "evidence": MARKER}
    assert "random weights" in summary_markdown(res, summarize(res))
