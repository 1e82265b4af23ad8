"""Stores at fsspec URLs: memory:// and file:// write, resume, read and probe like local paths."""

from __future__ import annotations

import numpy as np
import pytest

import cellstrata as cs
from cellstrata.engine.errors import StoreConfigMismatchError, StoreError
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.models import get_family
from cellstrata.engine.storage.location import StoreLocation, normalize
from cellstrata.engine.storage.verify import verify_store


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    ckpt = get_family("scgpt").init_checkpoint("tiny", root / "ckpt", seed=6)
    adata = synthetic_dataset(120, 2000, seed=9, genes_per_cell=100)
    data = root / "cells.h5ad"
    adata.write_h5ad(data)
    kw = {"model": "scgpt", "checkpoint": ckpt, "chunk_cells": 32, "poolings": ["mean", "cls"], "progress": False}
    ref = cs.extract(data, out=root / "ref.zarr", **kw)
    return data, kw, ref, adata


def test_normalize_keeps_urls_and_makes_paths_local(tmp_path):
    assert normalize("s3://bucket/run.zarr/") == "s3://bucket/run.zarr"
    assert normalize(f"file://{tmp_path}/x.zarr") == f"{tmp_path}/x.zarr"
    assert normalize("rel.zarr").startswith("/") and StoreLocation.of("memory://a/b").protocol == "memory"


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_store_at_a_url_matches_the_local_store(case, tmp_path, scheme):
    data, kw, ref, _ = case
    url = "memory://cs-remote/run.zarr" if scheme == "memory" else f"file://{tmp_path}/run.zarr"
    cs.extract(data, out=url, **kw)
    # as if interrupted: chunks 1 and 3 uncommitted, with garbage in them
    group = StoreLocation.of(url).open_group("r+")
    group["done"][[1, 3]] = 0
    group["pooled"]["mean"][:, 32:64, :] = 7.0
    with pytest.raises(StoreConfigMismatchError):  # the URL refuses another configuration...
        cs.extract(data, out=url, **{**kw, "poolings": ["mean"]})
    store = cs.extract(data, out=url, **kw)  # ...and the same command resumes it
    assert store.is_complete and store.attrs["telemetry"]["cells"] == 32 + 24
    for name in ref.poolings:
        np.testing.assert_array_equal(store.layers(name).compute(), ref.layers(name).compute())
    reopened = cs.open_store(url)
    ds = reopened.to_xarray()
    assert ds["mean"].shape == (ref.n_layers + 1, ref.n_cells, 64) and "checksum" not in ds
    assert verify_store(url).is_clean
    if scheme == "memory":
        StoreLocation.of(url).remove()


@pytest.mark.slow
def test_probe_reads_and_caches_in_a_url_store(case):
    data, kw, _, adata = case
    from cellstrata.probes.celltype import CellTypeTask

    url = "memory://cs-remote/probe.zarr"
    cs.extract(data, out=url, **kw)
    task = CellTypeTask(n_boot=10, min_cells_per_class=5)
    first = cs.probe(url, adata, [task], layers=[0, 4], pooling="mean", baseline=False)
    assert "probes" in StoreLocation.of(url).names()  # cached inside the store
    again = cs.probe(url, adata, [task], layers=[0, 4], pooling="mean", baseline=False)
    np.testing.assert_array_equal(first.table["value"].to_numpy(), again.table["value"].to_numpy())
    StoreLocation.of(url).remove()


def test_missing_url_store_is_one_clear_error():
    with pytest.raises(StoreError, match="does not exist"):
        cs.open_store("memory://cs-remote/nothing.zarr")
