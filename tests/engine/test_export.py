"""Store -> AnnData hand-off: obsm per layer matched by cell name, provenance in uns, scanpy on the result."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import zarr

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.errors import CellMismatchError, ConfigError, IncompleteStoreError, IncompleteStoreWarning
from cellstrata.engine.input.datasets import synthetic_dataset

N_CELLS = 60


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "scgpt"
    assert main(["init-checkpoint", "--model", "scgpt", "--preset", "tiny", "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def adata():
    return synthetic_dataset(N_CELLS, 500, seed=7, genes_per_cell=60)


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory, adata) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def store(h5ad, ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "run.zarr"
    return cs.extract(
        h5ad, model="scgpt", checkpoint=ckpt, out=out, poolings=["mean", "cls"], dtype="float16", chunk_cells=16,
        progress=False,
    )  # fmt: skip


def test_obsm_per_layer_equals_the_store_rows_with_provenance(store, adata):
    a = adata.copy()
    out = store.to_anndata(a, layers=[1, -1], pooling="cls")
    assert out is a
    last = store.n_layers
    assert {"X_scgpt_L1", f"X_scgpt_L{last}"} <= set(a.obsm)
    ref = store.layers("cls").compute()
    for layer in (1, last):
        got = a.obsm[f"X_scgpt_L{layer}"]
        assert got.dtype == np.float32 and got.shape == (N_CELLS, ref.shape[2])
        np.testing.assert_array_equal(got, ref[layer].astype(np.float32))
    rec = a.uns["cellstrata"]["X_scgpt"]
    assert rec["family"] == "scgpt" and rec["preset"] == "tiny" and rec["pooling"] == "cls"
    assert list(rec["layers"]) == [1, last] and rec["dtype"] == "float32" and rec["store_dtype"] == "float16"
    assert rec["config_hash"] == store.attrs["config_hash"] and rec["format_version"] == 2
    assert rec["checkpoint_sha256"] == store.attrs["model"]["sha256"] and rec["weights"] == "random"
    assert rec["store"] == str(store.path)


def test_all_layers_default_key_and_copy(store, adata):
    a = adata.copy()
    b = store.to_anndata(a, layers="all", pooling="mean", key="X_tiny", copy=True)
    assert b is not a and not any(k.startswith("X_tiny") for k in a.obsm)
    assert sorted(b.obsm) == sorted(f"X_tiny_L{i}" for i in range(store.n_layers + 1))


def test_permuted_anndata_gets_the_values_of_its_own_cells(store, adata):
    rng = np.random.default_rng(0)
    perm = rng.permutation(N_CELLS)
    shuffled = adata[perm].copy()
    store.to_anndata(shuffled, layers=[2], pooling="cls")
    ref = store.layers("cls")[2].compute().astype(np.float32)
    np.testing.assert_array_equal(shuffled.obsm["X_scgpt_L2"], ref[perm])
    # the same cells in the store's order give the unpermuted rows: values follow the names
    same = adata.copy()
    store.to_anndata(same, layers=[2], pooling="cls")
    np.testing.assert_array_equal(same[shuffled.obs_names].obsm["X_scgpt_L2"], shuffled.obsm["X_scgpt_L2"])


@pytest.mark.parametrize("case", ["subset", "renamed", "duplicated"])
def test_different_cells_are_refused_in_one_line(store, adata, case):
    a = adata.copy()
    if case == "subset":
        a = a[:-1].copy()
    elif case == "renamed":
        a.obs_names = [f"x{i}" for i in range(N_CELLS)]
    else:
        names = list(a.obs_names)
        names[1] = names[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # anndata's own note on repeated names
            a.obs_names = names
    with pytest.raises(CellMismatchError) as err:
        store.to_anndata(a, layers=[1], pooling="cls")
    assert "\n" not in str(err.value)
    assert not any(k.startswith("X_scgpt") for k in a.obsm) and "cellstrata" not in a.uns


def test_bad_options_are_refused(store, adata):
    a = adata.copy()
    with pytest.raises(ConfigError, match="layer 99 is not in the store"):
        store.to_anndata(a, layers=[99], pooling="cls")
    with pytest.raises(ConfigError, match="pass pooling="):
        store.to_anndata(a, layers=[1])
    with pytest.raises(ConfigError, match="pooling 'max' is not in"):
        store.to_anndata(a, layers=[1], pooling="max")
    with pytest.raises(ConfigError, match="'all' or layer indices"):
        store.to_anndata(a, layers="best", pooling="cls")


def test_incomplete_store_is_refused_unless_allowed(store, adata, tmp_path):
    import shutil

    copy = tmp_path / "partial.zarr"
    shutil.copytree(Path(store.path), copy)
    done = zarr.open_group(str(copy), mode="r+")["done"]
    flags = np.asarray(done[:])
    flags[-1] = 0
    done[:] = flags
    partial = cs.open_store(copy)
    with pytest.raises(IncompleteStoreError, match="allow_incomplete=True"):
        partial.to_anndata(adata.copy(), layers=[1], pooling="cls")
    with pytest.warns(IncompleteStoreWarning):
        a = partial.to_anndata(adata.copy(), layers=[1], pooling="cls", allow_incomplete=True)
    missing = ~partial.committed
    assert missing.any() and np.isnan(a.obsm["X_scgpt_L1"][missing]).all()
    assert np.isfinite(a.obsm["X_scgpt_L1"][~missing]).all()


def test_scanpy_neighbors_and_umap_run_on_the_result(store, adata):
    sc = pytest.importorskip("scanpy")
    a = adata.copy()
    store.to_anndata(a, layers=[2], pooling="cls", key="X_scgpt")
    sc.pp.neighbors(a, use_rep="X_scgpt_L2", n_neighbors=10)
    sc.tl.umap(a, random_state=0)
    assert a.obsm["X_umap"].shape == (N_CELLS, 2) and np.isfinite(a.obsm["X_umap"]).all()


def test_cli_writes_an_h5ad_that_reads_back(store, h5ad, tmp_path, capsys):
    before = h5ad.read_bytes()
    out = tmp_path / "out.h5ad"
    args = ["export", str(store.path), "--adata", str(h5ad), "--layers", "1,2", "--pooling", "cls", "--out", str(out)]
    assert main(args) == 0
    assert "X_scgpt_L1, X_scgpt_L2" in capsys.readouterr().out
    back = ad.read_h5ad(out)
    np.testing.assert_array_equal(back.obsm["X_scgpt_L2"], store.layers("cls")[2].compute().astype(np.float32))
    assert back.obsm["X_scgpt_L1"].dtype == np.float32
    rec = back.uns["cellstrata"]["X_scgpt"]
    assert rec["pooling"] == "cls" and list(rec["layers"]) == [1, 2] and rec["family"] == "scgpt"
    assert h5ad.read_bytes() == before  # the input is never modified

    assert main(args) == 2  # an existing --out is kept
    err = capsys.readouterr().err.strip()
    assert "exists; pass --overwrite" in err and "\n" not in err
    assert main([*args, "--overwrite", "--key", "X_s"]) == 0
    assert "X_s_L1" in ad.read_h5ad(out).obsm

    same = ["export", str(store.path), "--adata", str(h5ad), "--pooling", "cls", "--out", str(h5ad), "--overwrite"]
    assert main(same) == 2
    assert "never modifies its input" in capsys.readouterr().err
    assert h5ad.read_bytes() == before


def test_only_the_requested_layers_are_read(store, adata, monkeypatch):
    pooled = store.group["pooled"]["cls"]
    read: set[int] = set()
    original = type(pooled).__getitem__

    def recording(self, index):
        if self.path == pooled.path and isinstance(index, tuple):
            layer = index[0]
            read.update(range(*layer.indices(self.shape[0])) if isinstance(layer, slice) else [int(layer)])
        return original(self, index)

    monkeypatch.setattr(type(pooled), "__getitem__", recording)
    store.to_anndata(adata.copy(), layers=[1, 3], pooling="cls")
    assert read == {1, 3}


def test_store_to_umap_before_and_after(store, h5ad):
    """The README's "store -> UMAP coloured by cell type", by hand (before) and with to_anndata (after)."""
    pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    path = str(store.path)

    # before: 15 statements of user code (no provenance recorded)
    import numpy as np
    import pandas as pd
    import scanpy as sc

    import cellstrata as cs

    adata = sc.read_h5ad(h5ad)
    store = cs.open_store(path)
    store.require_complete()
    names = pd.Index(store.obs_names())
    if names.has_duplicates or adata.obs_names.has_duplicates or set(names) != set(adata.obs_names):
        raise ValueError("the store's cells are not the AnnData's cells")
    adata.obsm["X_scgpt_L2"] = np.asarray(store.layers("cls")[2].compute(), np.float32)[
        names.get_indexer(adata.obs_names)
    ]
    sc.pp.neighbors(adata, use_rep="X_scgpt_L2")
    sc.tl.umap(adata)
    sc.pl.umap(adata, color="cell_type", show=False)
    before = adata

    # after: 7 statements of user code
    import scanpy as sc

    import cellstrata as cs

    adata = sc.read_h5ad(h5ad)
    cs.open_store(path).to_anndata(adata, layers=[2], pooling="cls")
    sc.pp.neighbors(adata, use_rep="X_scgpt_L2")
    sc.tl.umap(adata)
    sc.pl.umap(adata, color="cell_type", show=False)

    np.testing.assert_array_equal(adata.obsm["X_scgpt_L2"], before.obsm["X_scgpt_L2"])
    assert adata.obsm["X_umap"].shape == (N_CELLS, 2)
    matplotlib.pyplot.close("all")
