"""The lazy layer-wise runner on hand-built stores: planted best layers, laziness, cache, alignment, errors."""

from __future__ import annotations

import shutil
import warnings
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import zarr
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    balanced_accuracy_score,
    f1_score,
    normalized_mutual_info_score,
)
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from store_fixture import BEST, CHUNK, N_LAYERS, planted, write_store
from threadpoolctl import threadpool_limits
from zarr.storage import LocalStore

from cellstrata.engine.errors import CellstrataError, IncompleteStoreError, ProbeError, StoreError
from cellstrata.probes.celltype import CellTypeTask
from cellstrata.probes.clustering import ClusteringTask, KnnTransferTask
from cellstrata.probes.runner import BASELINE_POOLING, TABLE_COLUMNS, probe, read_layer_rows
from cellstrata.probes.summary import summarize

N_BOOT = 50
RESOLUTIONS = (0.2, 0.5, 1.0)
PRIMARY = {"cell_type": "macro_f1", "knn_transfer": "knn_macro_f1", "clustering": "leiden_ari"}


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Two shared cores: BLAS threads that spin-wait on a busy machine cost more than they bring."""
    with threadpool_limits(limits=1):
        yield


def fast_tasks(**change):
    return [
        CellTypeTask(n_boot=N_BOOT, **change),
        KnnTransferTask(n_boot=N_BOOT, **change),
        ClusteringTask(n_boot=N_BOOT, resolutions=RESOLUTIONS, **change),
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return planted(tmp_path_factory.mktemp("planted") / "store.zarr")


@pytest.fixture(scope="module")
def results(store):
    return probe(store.path, store.adata, fast_tasks(), pooling="x")


@pytest.fixture
def fresh(store, tmp_path):
    """A copy of the planted store with an empty cache."""
    path = tmp_path / "copy.zarr"
    shutil.copytree(store.path, path)
    if (path / "probes").exists():
        shutil.rmtree(path / "probes")
    return path


@contextmanager
def recorded_reads(monkeypatch):
    """Every key read from a zarr LocalStore while the block runs (data chunks and metadata)."""
    keys: list[str] = []
    original = LocalStore.get

    async def get(self, key, prototype=None, byte_range=None):
        keys.append(key)
        return await original(self, key, prototype, byte_range)

    with monkeypatch.context() as m:
        m.setattr(LocalStore, "get", get)
        yield keys


def chunk_reads(keys: list[str], prefix: str = "pooled/") -> Counter:
    return Counter(k for k in keys if k.startswith(prefix) and "/c/" in k)


# --------------------------------------------------------------------------------------------------
# (a) the planted best layer is recovered, with confidence
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["cell_type", "knn_transfer", "clustering"])
def test_planted_best_layer_is_recovered_with_confidence(results, task):
    summary = summarize(results)
    row = summary[(summary["task"] == task) & (summary["pooling"] == "x")]
    assert len(row) == 1
    r = row.iloc[0]
    assert r["metric"] == PRIMARY[task] and r["context"] == "all"
    assert r["best_layer"] == BEST and r["n_layers"] == N_LAYERS
    assert r["depth"] == pytest.approx(BEST / N_LAYERS)
    # the CIs contain the truth: the estimate and the planted depth
    assert r["ci_low"] <= r["value"] <= r["ci_high"]
    assert r["depth_ci_low"] <= BEST / N_LAYERS <= r["depth_ci_high"]
    assert r["best_support"] > 0.9
    # every other layer carries clearly less planted signal: none is tied with the best
    tied = {int(x) for part in r["tied_layers"].split(", ") for x in _expand(part)}
    assert tied == {BEST}
    # the final layer is worse, and the paired CI of the gain says so
    t = results.table
    final = t[(t["task"] == task) & (t["pooling"] == "x") & (t["metric"] == PRIMARY[task]) & (t["layer"] == N_LAYERS)]
    assert r["final_value"] == pytest.approx(float(final["value"].iloc[0]))
    assert r["diff_vs_final"] > 0 and r["diff_ci_low"] > 0 and r["sel_diff_ci_low"] > 0
    assert r["diff_ci_low"] <= r["diff_vs_final"] <= r["diff_ci_high"]
    if abs(r["final_value"]) >= 0.1:  # a relative gain only for a final value away from 0
        assert r["gain_basis"] == "relative"
        assert r["gain_vs_final"] == pytest.approx((r["value"] - r["final_value"]) / abs(r["final_value"]))
        assert r["gain_vs_final"] > 0 and r["gain_ci_low"] > 0
        assert r["gain_ci_low"] <= r["gain_vs_final"] <= r["gain_ci_high"]
    else:
        assert r["gain_basis"] == "absolute" and np.isnan(r["gain_vs_final"]) and "absolute" in r["answer"]
    assert f"layer {BEST} of {N_LAYERS}" in r["answer"]
    # the series follows the planted strength: it rises to the planted layer and falls after it
    series = t[(t["task"] == task) & (t["pooling"] == "x") & (t["metric"] == PRIMARY[task])].sort_values("layer")
    values = series["value"].to_numpy()
    assert np.all(np.diff(values[: BEST + 1]) > -0.02) and np.all(np.diff(values[BEST:]) < 0.02)
    assert values[BEST] - max(values[BEST - 1], values[BEST + 1]) > 0.1
    reps = results.replicates[(task, "all", "x", PRIMARY[task])]
    assert reps.shape == (N_LAYERS + 1, N_BOOT) and np.isfinite(reps).all()


def _expand(part: str) -> range:
    lo, _, hi = part.partition("-")
    return range(int(lo), int(hi or lo) + 1)


def test_values_equal_an_independent_sklearn_computation(store, results):
    """The runner's numbers at the best layer are the protocol's recipes, computed here directly."""
    X = store.pooled["x"][BEST]
    y = store.adata.obs["cell_type"].astype(str).to_numpy()
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    t = results.table

    def value(task: str, metric: str) -> float:
        row = t[(t["task"] == task) & (t["pooling"] == "x") & (t["layer"] == BEST) & (t["metric"] == metric)]
        assert len(row) == 1 and int(row["n_cells"].iloc[0]) == len(y)
        return float(row["value"].iloc[0])

    # (a) linear probe: StandardScaler -> LogisticRegression(C=1), 5-fold stratified, macro-F1 etc.
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = cross_val_predict(pipe, X, y, cv=cv)
    assert value("cell_type", "macro_f1") == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-9)
    assert value("cell_type", "balanced_accuracy") == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-9)
    assert value("cell_type", "accuracy") == pytest.approx(accuracy_score(y, pred), abs=1e-9)
    # (d) kNN transfer and k-means on pca50 (StandardScaler -> PCA, here all 32 dimensions)
    Z = PCA(n_components=X.shape[1], random_state=0).fit_transform(StandardScaler().fit_transform(X))
    knn = cross_val_predict(KNeighborsClassifier(n_neighbors=15, weights="distance"), Z, y, cv=cv)
    assert value("knn_transfer", "knn_macro_f1") == pytest.approx(f1_score(y, knn, average="macro"), abs=1e-6)
    km = KMeans(n_clusters=len(np.unique(y)), n_init=4, random_state=0).fit_predict(Z.astype(np.float32))
    assert value("clustering", "kmeans_ari") == pytest.approx(adjusted_rand_score(y, km), abs=1e-6)
    assert value("clustering", "kmeans_nmi") == pytest.approx(normalized_mutual_info_score(y, km), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# (g) the tidy table
# --------------------------------------------------------------------------------------------------


def test_table_schema(results):
    t = results.table
    required = [
        "task", "context", "pooling", "layer", "depth", "metric", "value", "ci_low", "ci_high", "n_cells",
        "baseline", "final_value", "gain_vs_final",
    ]  # fmt: skip
    assert set(required) <= set(t.columns)
    assert list(t.columns[: len(TABLE_COLUMNS)]) == TABLE_COLUMNS
    assert set(t["pooling"]) == {"x", BASELINE_POOLING}
    base = t[t["pooling"] == BASELINE_POOLING]
    layered = t[t["pooling"] != BASELINE_POOLING]
    assert len(base) and base["layer"].isna().all() and base["depth"].isna().all()
    assert base["final_value"].isna().all() and base["gain_vs_final"].isna().all()
    assert set(base["features"]) == {"std", "pca50"}
    assert layered["layer"].notna().all()
    assert sorted(layered["layer"].unique()) == list(range(N_LAYERS + 1))
    np.testing.assert_allclose(layered["depth"].astype(float), layered["layer"].astype(float) / N_LAYERS)
    assert (layered["ci_low"] <= layered["value"] + 1e-12).all() and (
        layered["value"] <= layered["ci_high"] + 1e-12
    ).all()
    # every layer row carries its series' baseline and final-layer value
    for (task, metric), g in layered.groupby(["task", "metric"]):
        b = base[(base["task"] == task) & (base["metric"] == metric)]
        assert len(b) == 1 and np.allclose(g["baseline"].astype(float), float(b["value"].iloc[0]))
        final = float(g.loc[g["layer"] == N_LAYERS, "value"].iloc[0])
        assert np.allclose(g["final_value"].astype(float), final)
    assert set(t["task"]) == set(PRIMARY) and set(t["context"]) == {"all"}
    assert {"macro_f1", "balanced_accuracy", "accuracy", "knn_macro_f1", "leiden_ari", "leiden_nmi"} <= set(t["metric"])
    assert (t["n_cells"] == store_cells(results)).all()
    assert results.layers == list(range(N_LAYERS + 1)) and results.n_layers == N_LAYERS
    assert results.primary == PRIMARY
    assert results.store["model"] == "scgpt" and results.store["n_cells"] == store_cells(results)


def store_cells(results) -> int:
    return int(results.store["n_cells"])


# --------------------------------------------------------------------------------------------------
# (b) laziness
# --------------------------------------------------------------------------------------------------


def test_one_layer_reads_only_that_layers_chunks(store, monkeypatch):
    adata = store.adata.copy()
    with recorded_reads(monkeypatch) as keys:
        probe(store.path, adata, CellTypeTask(n_boot=20), layers=[3], pooling="x", cache=False, baseline=False)
    reads = chunk_reads(keys)
    n_chunks = -(-adata.n_obs // CHUNK)
    assert set(reads) == {f"pooled/x/c/3/{j}/0" for j in range(n_chunks)}  # layer 3 of x, nothing else
    assert all(v == 1 for v in reads.values()), reads  # each chunk read once


def test_only_chunks_holding_planned_cells_are_read(store, monkeypatch):
    adata = store.adata.copy()
    rows = np.arange(adata.n_obs)
    # labels only for cells of chunks 0, 1 and 5: the plan holds no cell of any other chunk
    in_plan = (rows < 2 * CHUNK) | ((rows >= 5 * CHUNK) & (rows < 6 * CHUNK))
    adata.obs["early_type"] = adata.obs["cell_type"].astype(object).where(in_plan)
    with recorded_reads(monkeypatch) as keys:
        res = probe(
            store.path,
            adata,
            CellTypeTask(label_key="early_type", n_boot=20),
            layers=[-2],
            pooling="x",
            cache=False,
            baseline=False,
        )
    assert set(chunk_reads(keys)) == {"pooled/x/c/5/0/0", "pooled/x/c/5/1/0", "pooled/x/c/5/5/0"}
    assert res.layers == [5] and res.caps["cell_type/all"]["n_unlabelled"] == int((~in_plan).sum())
    assert (res.table["n_cells"] == int(in_plan.sum())).all()


def test_read_layer_rows_equals_direct_indexing(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((3, 103, 5)).astype(np.float32)
    arr = zarr.create_array(tmp_path / "a.zarr", shape=data.shape, chunks=(1, 7, 5), dtype="float32")
    arr[:] = data
    arr = zarr.open_array(tmp_path / "a.zarr", mode="r")
    for trial in range(6):
        rows = np.sort(rng.choice(103, size=int(rng.integers(1, 60)), replace=False))
        layer = trial % 3
        with recorded_reads(monkeypatch) as keys:
            got = read_layer_rows(arr, layer, rows, 7)
        assert got.dtype == np.float32 and got.shape == (len(rows), 5)
        np.testing.assert_array_equal(got, data[layer][rows])
        reads = Counter(k for k in keys if "/" in k and k.startswith("c/"))
        assert set(reads) == {f"c/{layer}/{j}/0" for j in np.unique(rows // 7)}
        assert all(v == 1 for v in reads.values())
    edge = np.array([0, 6, 7, 13, 14, 98, 102])  # chunk boundaries and the partial last chunk
    np.testing.assert_array_equal(read_layer_rows(arr, 2, edge, 7), data[2][edge])
    np.testing.assert_array_equal(read_layer_rows(arr, 1, np.arange(103), 7), data[1])
    assert read_layer_rows(arr, 0, np.zeros(0, np.int64), 7).shape == (0, 5)
    half = zarr.create_array(tmp_path / "h.zarr", shape=data.shape, chunks=(1, 10, 5), dtype="float16")
    half[:] = data.astype(np.float16)
    rows = np.array([3, 9, 10, 55, 99, 100])
    got = read_layer_rows(half, 1, rows, 10)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, data[1][rows].astype(np.float16).astype(np.float32))


# --------------------------------------------------------------------------------------------------
# (c) the cache
# --------------------------------------------------------------------------------------------------


def test_cache_reuses_results_and_recomputes_on_new_settings(store, fresh, monkeypatch):
    task = CellTypeTask(n_boot=30)
    first = probe(fresh, store.adata, task, layers=[2, 4, 6], pooling="x")
    assert first.timings["layer_evaluations"] == 3 and first.timings["layer_evaluations_cached"] == 0
    with recorded_reads(monkeypatch) as keys:
        second = probe(fresh, store.adata, task, layers=[2, 4, 6], pooling="x")
    assert second.timings["layer_evaluations"] == 0 and second.timings["layer_evaluations_cached"] == 3
    assert not chunk_reads(keys)  # a cached re-run reads no layer
    pd.testing.assert_frame_equal(first.table, second.table)  # the baseline rows came from the cache too
    for k, v in first.replicates.items():
        np.testing.assert_array_equal(v, second.replicates[k])
    # adding a layer computes only that layer
    more = probe(fresh, store.adata, task, layers=[2, 3, 4, 6], pooling="x", baseline=False)
    assert more.timings["layer_evaluations"] == 1
    old = first.table[first.table["pooling"] == "x"].reset_index(drop=True)
    kept = more.table[more.table["layer"] != 3].reset_index(drop=True)
    assert kept["baseline"].isna().all() and kept["baseline"].dtype == np.float64  # run without the baseline
    pd.testing.assert_frame_equal(kept.drop(columns="baseline"), old.drop(columns="baseline"))
    # another seed or C is another probe: every layer is recomputed
    seed = probe(fresh, store.adata, CellTypeTask(n_boot=30, seed=1), layers=[2, 4, 6], pooling="x", baseline=False)
    assert seed.timings["layer_evaluations"] == 3
    other_c = probe(fresh, store.adata, CellTypeTask(n_boot=30, C=0.01), layers=[2, 4, 6], pooling="x", baseline=False)
    assert other_c.timings["layer_evaluations"] == 3
    assert not np.allclose(other_c.table["value"], old["value"])
    # a run with one more task (reading another obs column) keeps the first task's cached results
    calls = []
    evaluate = CellTypeTask.evaluate
    monkeypatch.setattr(CellTypeTask, "evaluate", lambda self, plan, X: calls.append(1) or evaluate(self, plan, X))
    both = probe(fresh, store.adata, [task, KnnTransferTask(n_boot=30, context_key="cell_state")], layers=[2, 4, 6],
                 pooling="x")  # fmt: skip
    assert not calls and both.timings["layer_evaluations"] == 3  # only the new task's layers were computed
    monkeypatch.undo()
    # cache=False neither reads nor writes the cache
    off = probe(fresh, store.adata, task, layers=[4], pooling="x", cache=False, baseline=False)
    assert off.timings["layer_evaluations"] == 1


# --------------------------------------------------------------------------------------------------
# (e) alignment of obs to the store's cells
# --------------------------------------------------------------------------------------------------


def test_obs_in_another_order_is_realigned(store):
    tasks = [CellTypeTask(n_boot=20), KnnTransferTask(n_boot=20)]
    aligned = probe(store.path, store.adata, tasks, layers=[1, 4], pooling="x", cache=False)
    perm = np.random.default_rng(3).permutation(store.adata.n_obs)
    shuffled = store.adata[perm].copy()
    assert not (shuffled.obs_names == store.adata.obs_names).all()
    realigned = probe(store.path, shuffled, tasks, layers=[1, 4], pooling="x", cache=False)
    pd.testing.assert_frame_equal(aligned.table, realigned.table, check_exact=False, rtol=1e-9, atol=1e-12)
    # a superset of the store's cells (extra cells in the annotations) is fine too
    import anndata as ad

    extra = store.adata[:50].copy()
    extra.obs_names = [f"extra-{i}" for i in range(50)]
    bigger = ad.concat([shuffled, extra])
    bigger_res = probe(store.path, bigger, tasks[:1], layers=[4], pooling="x", cache=False, baseline=False)
    a = aligned.table
    want = a[(a["task"] == "cell_type") & (a["layer"] == 4)].reset_index(drop=True)
    got = bigger_res.table.reset_index(drop=True)
    np.testing.assert_allclose(got["value"], want["value"])


# --------------------------------------------------------------------------------------------------
# (f) bad input: one clear error each, before any layer is read
# --------------------------------------------------------------------------------------------------


def probe_error(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match) as info:
        probe(*args, **kwargs)
    assert isinstance(info.value, CellstrataError)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600
    return message


def test_missing_label_column(store, monkeypatch):
    with recorded_reads(monkeypatch) as keys:
        msg = probe_error(ProbeError, "'cell_kind'", store.path, store.adata, CellTypeTask(label_key="cell_kind"))
    assert "cell_type" in msg  # names the columns that exist
    assert not chunk_reads(keys)
    probe_error(ProbeError, "'batch'", store.path, store.adata, KnnTransferTask(group_key="batch"))


def test_too_few_cells_per_class(store):
    msg = probe_error(
        ProbeError, "at least 1000 cells", store.path, store.adata, CellTypeTask(min_cells_per_class=1000)
    )
    assert "T_cell" in msg and "min_cells_per_class" in msg  # class sizes and the knob to turn
    adata = store.adata.copy()
    adata.obs["one_type"] = "T_cell"
    probe_error(ProbeError, "1 class", store.path, adata, ClusteringTask(label_key="one_type"))
    probe_error(
        ProbeError,
        "in context '(activated|resting)'",
        store.path,
        store.adata,
        CellTypeTask(context_key="cell_state", min_cells_per_class=200),
    )


def test_incomplete_store(store, fresh):
    group = zarr.open_group(str(fresh), mode="r+")
    group["done"][3] = 0
    msg = probe_error(IncompleteStoreError, "incomplete", fresh, store.adata, CellTypeTask())
    assert "9 of 10" in msg and "re-run" in msg
    assert issubclass(IncompleteStoreError, StoreError)


def test_obs_not_aligned_with_the_store(store):
    other = store.adata.copy()
    other.obs_names = [f"other-{i}" for i in range(other.n_obs)]
    msg = probe_error(ProbeError, "not aligned", store.path, other, CellTypeTask())
    assert "1200 of the store's 1200 cells" in msg and repr(str(store.adata.obs_names[0])) in msg
    assert "Pass the AnnData the store was extracted from" in msg
    fewer = store.adata[: store.adata.n_obs - 10].copy()
    probe_error(ProbeError, r"10 of the store's 1200 cells", store.path, fewer, CellTypeTask())
    dup = store.adata.copy()
    dup.obs_names = ["same"] * 2 + list(dup.obs_names[2:])
    probe_error(ProbeError, "not unique", store.path, dup, CellTypeTask())


def test_unknown_pooling_and_layer_out_of_range(store):
    probe_error(ProbeError, "pooling 'cls' is not in", store.path, store.adata, CellTypeTask(), pooling="cls")
    probe_error(ProbeError, "layer 7 is not in", store.path, store.adata, CellTypeTask(), layers=[7])
    probe_error(ProbeError, "layer -8 is not in", store.path, store.adata, CellTypeTask(), layers=[0, -8])
    probe_error(ProbeError, "no layer selected", store.path, store.adata, CellTypeTask(), layers=[])
    probe_error(ProbeError, "layers must be 'all'", store.path, store.adata, CellTypeTask(), layers="last")


def test_group_key_with_one_group(store):
    adata = store.adata.copy()
    adata.obs["one_donor"] = "donor_1"
    probe_error(ProbeError, "group column 'one_donor'", store.path, adata, CellTypeTask(group_key="one_donor"))


def test_no_task_duplicate_tasks_and_not_a_store(store, tmp_path):
    probe_error(ProbeError, "no probe task", store.path, store.adata, [])
    probe_error(ProbeError, "once per run", store.path, store.adata, [CellTypeTask(), CellTypeTask(seed=1)])
    probe_error(StoreError, "does not exist", tmp_path / "missing.zarr", store.adata, CellTypeTask())
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    probe_error(StoreError, "not a cellstrata store", tmp_path / "plain.zarr", store.adata, CellTypeTask())


def test_non_finite_rows_are_reported(store, tmp_path):
    x = store.pooled["x"][:, :, :].copy()
    x[2, 17, 3] = np.inf
    path = tmp_path / "inf.zarr"
    write_store(path, {"x": x}, store.adata.obs_names, adata=store.adata)
    probe_error(
        ProbeError,
        "1 cells have NaN or inf in pooling 'x' at layer 2",
        path,
        store.adata,
        CellTypeTask(),
        layers=[2, 3],
        baseline=False,
    )


def test_cells_without_gene_tokens_are_left_out(store, tmp_path):
    """Empty cells (n_tokens 0) hold NaN in the store; the runner plans around them instead of failing."""
    empty = np.array([0, 1, 200, 640, 1199])
    x = store.pooled["x"].copy()
    x[:, empty] = np.nan
    n_tokens = np.full(x.shape[1], 100, dtype=np.int32)
    n_tokens[empty] = 0
    path = tmp_path / "empty.zarr"
    write_store(path, {"x": x}, store.adata.obs_names, adata=store.adata, n_tokens=n_tokens)
    res = probe(path, store.adata, CellTypeTask(n_boot=20), layers=[BEST], cache=False)
    assert res.caps["cell_type/all"]["excluded_empty_cells"] == len(empty)
    assert (res.table["n_cells"] == x.shape[1] - len(empty)).all()
    assert np.isfinite(res.table["value"]).all()


def test_grouped_folds_and_contexts_run(store):
    """Donor-grouped folds and per-state contexts: one series per context, the planted layer still best."""
    task = CellTypeTask(group_key="donor", context_key="cell_state", n_boot=20)
    res = probe(store.path, store.adata, task, layers=[2, 4, 6], pooling="x", cache=False, baseline=False)
    assert set(res.table["context"]) == {"activated", "resting"}
    assert res.caps["cell_type/resting"]["n_groups"] == 3
    summary = summarize(res)
    assert (summary["best_layer"] == BEST).all() and len(summary) == 2


def test_streaming_learner_reads_chunk_by_chunk_and_finds_the_planted_layer(store, monkeypatch):
    """``learner="sgd"``: every planned chunk of the asked layers only, and the planted layer still wins."""
    adata = store.adata.copy()
    rows = np.arange(adata.n_obs)
    adata.obs["late_type"] = adata.obs["cell_type"].astype(object).where(rows >= 4 * CHUNK)
    task = CellTypeTask(label_key="late_type", learner="sgd", epochs=3, n_boot=20, max_per_class=None, max_cells=None)
    with recorded_reads(monkeypatch) as keys:
        res = probe(store.path, adata, task, layers=[1, BEST, N_LAYERS], pooling="x", cache=False, baseline=False)
    n_chunks = -(-adata.n_obs // CHUNK)
    reads = chunk_reads(keys)
    assert set(reads) == {f"pooled/x/c/{layer}/{j}/0" for layer in (1, BEST, N_LAYERS) for j in range(4, n_chunks)}
    summary = summarize(res)
    assert summary["best_layer"].tolist() == [BEST]
    t = res.table
    assert (t["n_cells"] < int((rows >= 4 * CHUNK).sum())).all()  # metrics on the held-out fold
