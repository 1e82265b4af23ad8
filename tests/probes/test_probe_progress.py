"""The probe run's progress line: it names the task, context, pooling and layer, and stays off a pipe."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from store_fixture import N_LAYERS, planted
from threadpoolctl import threadpool_limits

from cellstrata.engine import progress as progress_mod
from cellstrata.engine.progress import ProbeProgress, open_bar, probe_label
from cellstrata.probes import runner
from cellstrata.probes.celltype import CellTypeTask


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with threadpool_limits(limits=1):
        yield planted(tmp_path_factory.mktemp("progress") / "store.zarr")


def test_label_names_task_context_pooling_and_layer():
    assert probe_label("cell_type", "all", "mean", 7, 12) == "cell_type | mean | layer 7/12"
    assert probe_label("trajectory", "T cells", "cls", 0, 6) == "trajectory/T cells | cls | layer 0/6"
    assert probe_label("clustering", "all", "hvg_pca50", None, 6) == "clustering | hvg_pca50 | baseline"


def test_tracker_counts_and_names_from_threads():
    from concurrent.futures import ThreadPoolExecutor

    out = io.StringIO()
    n = int(np.random.default_rng().integers(5, 30))
    bar = open_bar(n, enabled=True, desc="probe", unit="evaluations", file=out, force=True)
    tracker = ProbeProgress(bar, 12)

    def one(i: int) -> None:
        tracker.start("cell_type", "all", "mean", i % 13)
        tracker.finish()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(n)))
    bar.close()
    assert bar.n == n
    assert f"{n}/{n} evaluations" in out.getvalue()
    assert re.search(r"cell_type \| mean \| layer \d+/12", out.getvalue())


def test_probe_line_names_what_it_evaluates(store, monkeypatch):
    out = io.StringIO()

    def forced(total, *, enabled, desc, unit, **kw):
        return progress_mod.progress_bar(total, enabled=enabled, desc=desc, unit=unit, file=out, force=enabled)

    monkeypatch.setattr(runner, "progress_bar", forced)
    layers = [1, N_LAYERS]
    tasks = [CellTypeTask(n_boot=20, n_folds=3)]
    with threadpool_limits(limits=1):
        runner.probe(store.path, store.adata, tasks, layers=layers, pooling="x", cache=False, progress=True)
    text = out.getvalue()
    total = len(layers) + 1  # every layer and the HVG-PCA baseline of the one task and context
    assert f"{total}/{total} evaluations" in text
    assert f"cell_type | x | layer {N_LAYERS}/{N_LAYERS}" in text or f"cell_type | x | layer 1/{N_LAYERS}" in text
    assert "cell_type | hvg_pca50 | baseline" in text


def test_probe_prints_no_progress_into_a_pipe(store, capfd):
    with threadpool_limits(limits=1):
        runner.probe(
            store.path, store.adata, [CellTypeTask(n_boot=20, n_folds=3)], layers=[2], cache=False, progress=True
        )
    err = capfd.readouterr().err
    # The bar's count ("2/2 evaluations") must be absent; a log line from a handler an earlier test
    # installed ("2 of 2 layer evaluations computed") is not progress and may be there.
    assert not re.search(r"\d+/\d+ evaluations", err) and "probe:" not in err and "\r" not in err
