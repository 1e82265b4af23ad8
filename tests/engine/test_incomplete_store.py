"""Reading a store before every chunk is committed: completeness, the committed mask, NaN for the rest."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.errors import IncompleteStoreWarning
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.models import get_family
from cellstrata.engine.storage import writer as writer_mod
from cellstrata.engine.storage.store import FORMAT_VERSION, StoreSpec, config_hash, create_or_resume, open_store
from cellstrata.engine.storage.writer import ChunkData, write_chunk

N, L, H, C = 23, 3, 6, 5  # 5 chunks, the last of 3 cells


def make_store(path: Path) -> dict[int, ChunkData]:
    """A store with chunks 0, 1 and 3 committed; chunk 2's data written but not committed (a write in flight)."""
    attrs = {
        "format_version": FORMAT_VERSION,
        "model": {"family": "scgpt", "preset": "tiny", "n_layers": L, "hidden": H},
        "poolings": ["mean", "cls"],
        "dtype": "float32",
        "chunk_cells": C,
        "n_cells": N,
        "source": {"path": "x.h5ad", "n_cells": N, "n_genes": 10},
        "config_hash": config_hash({"model": "x"}),
    }
    create_or_resume(path, StoreSpec(N, L, H, {"mean": H, "cls": H}, "float32", C, "zstd", attrs))
    rng = np.random.default_rng(0)
    chunks = {}
    for c in (0, 1, 2, 3):
        start, stop = c * C, min((c + 1) * C, N)
        chunks[c] = ChunkData(
            index=c,
            start=start,
            stop=stop,
            pooled={n: rng.standard_normal((L + 1, stop - start, H)).astype(np.float32) for n in ("mean", "cls")},
            obs_names=np.array([f"cell{i}" for i in range(start, stop)]),
            n_tokens=np.arange(start, stop, dtype=np.int32) + 1,
            truncated=np.zeros(stop - start, dtype=bool),
        )
        write_chunk(str(path), chunks[c])
    zarr.open_group(str(path), mode="r+")["done"][2:3] = np.zeros(1, dtype=np.uint8)
    return chunks


COMMITTED_CELLS = np.r_[0:10, 15:20]


def test_incomplete_store_says_so_and_reads_uncommitted_cells_as_nan(tmp_path):
    chunks = make_store(tmp_path / "s.zarr")
    store = open_store(tmp_path / "s.zarr")
    assert not store.complete and not store.is_complete
    assert np.flatnonzero(store.committed).tolist() == COMMITTED_CELLS.tolist()
    warned = r"3 of 5 cell chunks \(15 of 23 cells\).*other 8 cells read as NaN"
    with pytest.warns(IncompleteStoreWarning, match=warned):
        x = store.layers("mean")
    assert x.shape == (L + 1, N, H) and x.chunks[1] == (5, 5, 5, 5, 3)  # the store's own chunk grid
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per store object: the next reads do not warn again
        values = x.compute()
        store.layers("cls")
    for c in (0, 1, 3):
        np.testing.assert_array_equal(values[:, chunks[c].start : chunks[c].stop], chunks[c].pooled["mean"])
    assert np.isnan(values[:, 10:15]).all()  # written but not committed: not trusted
    assert np.isnan(values[:, 20:]).all()  # never written
    only = store.layers("mean", committed_only=True).compute()
    np.testing.assert_array_equal(only, values[:, COMMITTED_CELLS])


def test_uncommitted_chunks_are_never_read(tmp_path, monkeypatch):
    make_store(tmp_path / "s.zarr")
    store = open_store(tmp_path / "s.zarr")
    with pytest.warns(IncompleteStoreWarning):
        x = store.layers("mean")
    read: list[tuple] = []
    real = zarr.Array.__getitem__

    def spy(self, selection):
        read.append(selection)
        return real(self, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", spy)
    x[:, 10:23].compute(scheduler="synchronous")  # chunks 2 (uncommitted), 3 (committed), 4 (uncommitted)
    cells = {(s[1].start, s[1].stop) for s in read if isinstance(s, tuple) and len(s) == 3}
    assert cells == {(15, 20)}, read


def test_to_xarray_of_an_incomplete_store(tmp_path):
    chunks = make_store(tmp_path / "s.zarr")
    store = open_store(tmp_path / "s.zarr")
    with pytest.warns(IncompleteStoreWarning, match="3 of 5"):
        ds = store.to_xarray()
    assert ds["committed"].dims == ("cell",) and ds["committed"].values.sum() == 15
    mean = ds["mean"].values
    np.testing.assert_array_equal(mean[:, 15:20], chunks[3].pooled["mean"])
    assert np.isnan(mean[:, 10:15]).all() and np.isnan(ds["cls"].values[:, 20:]).all()
    part = store.to_xarray(committed_only=True)
    assert list(part.cell.values) == [f"cell{i}" for i in COMMITTED_CELLS]
    np.testing.assert_array_equal(part["cls"].values, store.layers("cls", committed_only=True).compute())


def test_complete_store_reads_without_warning(tmp_path):
    path = tmp_path / "s.zarr"
    chunks = make_store(path)
    write_chunk(str(path), chunks[2])
    rng = np.random.default_rng(1)
    write_chunk(
        str(path),
        ChunkData(
            index=4,
            start=20,
            stop=N,
            pooled={n: rng.standard_normal((L + 1, 3, H)).astype(np.float32) for n in ("mean", "cls")},
            obs_names=np.array(["cell20", "cell21", "cell22"]),
            n_tokens=np.ones(3, dtype=np.int32),
            truncated=np.zeros(3, dtype=bool),
        ),
    )
    store = open_store(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.complete and store.committed.all()
        assert np.isfinite(store.layers("mean").compute()).all()
        ds = store.to_xarray()
    assert bool(ds["committed"].all()) and ds["mean"].shape == (L + 1, N, H)


def test_probe_refuses_an_incomplete_store_in_one_line(tmp_path, capsys):
    make_store(tmp_path / "s.zarr")
    argv = ["probe", str(tmp_path / "s.zarr"), "--adata", str(tmp_path / "a.h5ad"), "--task", "cell_type"]
    assert main([*argv, "--out", str(tmp_path / "report")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "incomplete: 3 of 5 cell chunks" in err[0] and "re-run the same extract" in err[0], err


def test_reading_while_an_extraction_writes(tmp_path, monkeypatch):
    """A reader opened between two commits of a real run sees the committed chunks and NaN for the rest."""
    ckpt = get_family("scgpt").init_checkpoint("tiny", tmp_path / "ckpt", seed=3)
    adata = synthetic_dataset(40, 2000, seed=5, genes_per_cell=80)
    out, seen = tmp_path / "s.zarr", tmp_path / "seen.npz"
    real = writer_mod.write_chunk

    def write_then_read(path, chunk):  # runs on the writer's Dask thread (a copy: results go through a file)
        index = real(path, chunk)
        if index == 1:  # chunk 3 is submitted only after this write returns: it cannot be committed yet
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IncompleteStoreWarning)
                ds = cs.open_store(path).to_xarray()  # its committed mask is read with the view it masks
            values = ds["mean"].data.compute(scheduler="synchronous")
            np.savez(seen, values=values, committed=ds["committed"].values)
        return index

    monkeypatch.setattr(writer_mod, "write_chunk", write_then_read)
    store = cs.extract(adata, model="scgpt", checkpoint=ckpt, out=out, poolings=["mean"], dtype="float32",
                       chunk_cells=10, progress=False)  # fmt: skip
    final = store.layers("mean").compute()
    snapshot = np.load(seen)
    committed, values = snapshot["committed"], snapshot["values"]
    assert committed[10:20].all() and not committed[30:].any()
    np.testing.assert_array_equal(values[:, committed], final[:, committed])
    assert np.isnan(values[:, ~committed]).all()
