"""The input side in worker processes: the same store as on threads, its errors, and when it is used."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp

import cellstrata as cs
from cellstrata.demo import GENE_COLUMN
from cellstrata.engine.errors import EmptyCellError
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.input.prepare import MIN_WINDOWS_FOR_PROCESSES, InputSpec, input_processes
from cellstrata.engine.input.sources import open_source
from cellstrata.engine.models import get_family


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    ckpt = get_family("scgpt").init_checkpoint("tiny", root / "ckpt", seed=2)
    adata = synthetic_dataset(140, 2000, seed=9, genes_per_cell=90)
    data = root / "cells.h5ad"
    adata.write_h5ad(data)
    return data, ckpt, adata


def run(data, ckpt, out, **kw):
    return cs.extract(data, model="scgpt", checkpoint=ckpt, out=out, chunk_cells=8, progress=False, **kw)


@pytest.mark.slow
def test_worker_processes_write_the_same_store_as_threads(case, tmp_path):
    data, ckpt, _ = case
    threads = run(data, ckpt, tmp_path / "threads.zarr", input_workers=0)
    procs = run(data, ckpt, tmp_path / "procs.zarr", input_workers=2)
    assert threads.attrs["telemetry"]["input_processes"] == 0
    assert procs.attrs["telemetry"]["input_processes"] == 2
    assert procs.is_complete
    for name in threads.poolings:
        np.testing.assert_array_equal(procs.layers(name).compute(), threads.layers(name).compute())
    for key in ("obs_names", "n_tokens", "truncated"):
        np.testing.assert_array_equal(procs.group[key][:], threads.group[key][:])


def test_in_memory_input_stays_on_threads(case, tmp_path):
    _, ckpt, adata = case
    store = run(adata[:40].copy(), ckpt, tmp_path / "mem.zarr", input_workers=2)
    assert store.attrs["telemetry"]["input_processes"] == 0 and store.is_complete


@pytest.mark.slow
def test_an_error_in_a_worker_is_the_same_one_clear_error(case, tmp_path):
    _, ckpt, adata = case
    bad = adata[:60].copy()
    X = sp.csr_matrix(bad.X).tolil()
    X[37, :] = 0  # an empty cell in the fifth chunk
    bad.X = X.tocsr()
    path = tmp_path / "bad.h5ad"
    bad.write_h5ad(path)
    with pytest.raises(EmptyCellError, match=r"cell 37 .* no expressed gene"):
        run(path, ckpt, tmp_path / "bad.zarr", input_workers=2, empty_cells="error")
    store = run(path, ckpt, tmp_path / "bad.zarr", input_workers=2, overwrite=True)  # empty cells as NaN
    assert store.is_complete and np.isnan(store.layers("mean")[:, 37].compute()).all()


def test_when_processes_are_used(case):
    data, _, adata = case
    with open_source(data) as src:
        assert input_processes(None, "cpu", src, 100) == 0  # CPU: the cores run the forward pass
        assert input_processes(None, "cuda", src, MIN_WINDOWS_FOR_PROCESSES - 1) == 0  # too short to pay off
        assert input_processes(None, "cuda", src, 100) >= 0
        assert input_processes(3, "cpu", src, 1) == 3  # asked for
    with open_source(adata) as src:
        assert input_processes(3, "cuda", src, 100) == 0  # an in-memory AnnData can't be reopened


@pytest.mark.parametrize("family", ["scgpt", "tahoe-x1", "scfoundation", "geneformer"])
def test_every_tokenizer_travels_to_a_worker(family, tmp_path, case):
    data, _, _ = case
    loaded = get_family(family).load(get_family(family).init_checkpoint("tiny", tmp_path / family, seed=1))
    with open_source(data, gene_column=GENE_COLUMN[family]) as src:
        mapping = loaded.tokenizer.map_genes(list(src.gene_names))
        block = src.read(0, 20)
    spec = InputSpec(loaded.tokenizer, mapping, True, "nan")
    copy = pickle.loads(pickle.dumps(spec))
    a, b = spec.tokenizer.tokenize(block, mapping), copy.tokenizer.tokenize(block, copy.mapping)
    for x, y in zip(a.genes + a.values, b.genes + b.values):
        np.testing.assert_array_equal(x, y)
