"""``cellstrata probe --task trajectory`` end to end: the paper's numbers by default, the options through
``--set`` (recorded in the report), one-line errors for bad values and for counts without expressed genes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr
from store_fixture import write_store
from test_trajectory_paper import LAYERS, paper_pipeline, trajectory_data

from cellstrata.cli import main

ad = pytest.importorskip("anndata")

N = 300


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """A store (pooling ``mean``: an uninformative layer 0, then the three layers) and its AnnData."""
    root = tmp_path_factory.mktemp("trajectory-cli")
    data = trajectory_data(N)
    names = [f"cell{i}" for i in range(N)]
    adata = ad.AnnData(data["counts"], obs=pd.DataFrame({"day": data["obs"]["day"].to_numpy()}, index=names))
    adata.var_names = [f"g{i}" for i in range(adata.n_vars)]
    path = root / "cells.h5ad"
    adata.write_h5ad(path)
    noise = np.random.default_rng(9).normal(size=(N, 64)).astype(np.float32)
    pooled = {"mean": np.stack([noise, *(data["layers"][k] for k in LAYERS)])}
    store = root / "cells.zarr"
    write_store(store, pooled, names, adata=str(path), chunk_cells=128)
    empty = ad.AnnData(sp.csr_matrix(adata.shape, dtype=np.float32), obs=adata.obs.copy())
    empty.var_names = adata.var_names
    empty_path = root / "empty.h5ad"
    empty.write_h5ad(empty_path)
    empty_store = root / "empty.zarr"
    write_store(empty_store, pooled, names, adata=str(empty_path), chunk_cells=128)
    return {"data": data, "h5ad": path, "store": store, "empty_h5ad": empty_path, "empty_store": empty_store}


def probe_args(store, h5ad, out, *extra: str) -> list[str]:
    return ["probe", str(store), "--adata", str(h5ad), "--task", "trajectory", "--time-key", "day",
            "--out", str(out), "--no-cache", "--n-boot", "20", *extra]  # fmt: skip


def settings_in(summary: str) -> dict:
    line = next(x for x in summary.splitlines() if x.startswith("- `trajectory`: "))
    return json.loads(line.split(": ", 1)[1])


def test_default_run_reports_the_papers_numbers(case, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    assert main(probe_args(case["store"], case["h5ad"], out)) == 0
    table = pd.read_csv(out / "results.csv")
    ref = table[(table["metric"] == "dpt_spearman_reference") & (table["pooling"] == "mean")].set_index("layer")
    data = case["data"]
    paper = paper_pipeline(data["counts"], data["obs"]["day"].to_numpy(), data["layers"])
    for layer, name in enumerate(LAYERS, start=1):
        want = spearmanr(paper["reference"], paper[name]).statistic
        assert ref.loc[layer, "value"] == pytest.approx(want, abs=1e-6)
        assert ref.loc[layer, "features"] == "raw"
    baseline = table[(table["pooling"] == "hvg_pca50") & (table["metric"] == "dpt_spearman_reference")]
    assert baseline["value"].iloc[0] == pytest.approx(1.0)
    got = settings_in((out / "summary.md").read_text())
    assert {k: got[k] for k in ("root", "kernel", "features", "hvg_genes", "n_neighbors")} == {
        "root": "first", "kernel": "umap", "features": "raw", "hvg_genes": 2500, "n_neighbors": 30,
    }  # fmt: skip
    assert "trajectory [all, mean]: layer" in capsys.readouterr().out


def test_options_are_set_and_recorded(case, tmp_path) -> None:
    out = tmp_path / "report"
    extra = ["--set", "trajectory.root=robust", "--set", "trajectory.kernel=gauss", "--set",
             "trajectory.features=pca50", "--set", "trajectory.hvg_genes=2000", "--no-baseline"]  # fmt: skip
    assert main(probe_args(case["store"], case["h5ad"], out, *extra)) == 0
    got = settings_in((out / "summary.md").read_text())
    assert {k: got[k] for k in ("root", "kernel", "features", "hvg_genes")} == {
        "root": "robust", "kernel": "gauss", "features": "pca50", "hvg_genes": 2000,
    }  # fmt: skip
    table = pd.read_csv(out / "results.csv")
    graph = table[table["metric"].isin(["dpt_spearman_time", "dpt_spearman_reference", "time_smoothness"])]
    assert set(graph["features"]) == {"pca50"}


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("trajectory.kernel=cosine", "kernel must be one of umap, gauss, got 'cosine'"),
        ("trajectory.root=auto", "root must be one of first, robust, got 'auto'"),
        ("trajectory.features=pca", "features must be one of raw, pca50, got 'pca'"),
        ("trajectory.hvg_genes=many", "trajectory.hvg_genes: cannot read 'many' as int"),
    ],
)
def test_bad_option_values_are_one_line(case, tmp_path, capsys, setting: str, fragment: str) -> None:
    out = tmp_path / "report"
    assert main(probe_args(case["store"], case["h5ad"], out, "--set", setting)) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_counts_without_expressed_genes_are_one_clear_error(case, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    assert main(probe_args(case["empty_store"], case["empty_h5ad"], out, "--no-baseline")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "task trajectory, context 'all': the HVG-PCA reference pseudotime cannot be built" in err
    assert "no expressed genes" in err and "--counts-layer" in err
    assert not out.exists()
