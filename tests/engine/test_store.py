"""Store creation, resume/refusal rules, chunk writes with commit flags, and the read side."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import xarray as xr
import zarr

from cellstrata.engine import writer as writer_mod
from cellstrata.engine.errors import IncompleteStoreError, StoreConfigMismatchError, StoreError, WriteError
from cellstrata.engine.store import (
    ATTR_KEY,
    FORMAT_VERSION,
    StoreSpec,
    config_hash,
    create_or_resume,
    default_chunk_cells,
    open_store,
    pending_chunks,
)
from cellstrata.engine.writer import ChunkData, ChunkWriter, write_chunk

N, L, H, C = 23, 3, 6, 5


def make_spec(**change) -> StoreSpec:
    numbers = {"model": "x", "dtype": "float16", **change}
    attrs = {
        "format_version": FORMAT_VERSION,
        "model": {"family": "scgpt", "preset": "tiny", "n_layers": L, "hidden": H},
        "poolings": ["mean", "cls"],
        "dtype": "float16",
        "chunk_cells": C,
        "n_cells": N,
        "source": {"path": "x.h5ad", "n_cells": N, "n_genes": 10},
        "config_hash": config_hash(numbers),
    }
    return StoreSpec(N, L, H, {"mean": H, "cls": H}, "float16", C, "zstd", attrs)


def chunk(c: int, rng) -> ChunkData:
    start, stop = c * C, min((c + 1) * C, N)
    k = stop - start
    return ChunkData(
        index=c,
        start=start,
        stop=stop,
        pooled={n: rng.standard_normal((L + 1, k, H)).astype(np.float16) for n in ("mean", "cls")},
        obs_names=np.array([f"cell{i}" for i in range(start, stop)]),
        n_tokens=np.arange(start, stop, dtype=np.int32),
        truncated=np.zeros(k, dtype=bool),
    )


def test_layout_matches_the_contract(tmp_path):
    group, resumed = create_or_resume(tmp_path / "s.zarr", make_spec())
    assert not resumed
    arr = group["pooled"]["mean"]
    assert arr.shape == (L + 1, N, H) and arr.chunks == (1, C, H) and arr.dtype == np.float16
    assert arr.metadata.dimension_names == ("layer", "cell", "feature")
    assert group["done"].shape == (5,) and group["done"].chunks == (1,)
    assert group["obs_names"].metadata.dimension_names == ("cell",)
    assert group["n_tokens"].dtype == np.int32 and group["truncated"].dtype == bool
    attrs = group.attrs[ATTR_KEY]
    assert attrs["format_version"] == 1 and attrs["complete"] is False and "created" in attrs
    assert pending_chunks(group).tolist() == [0, 1, 2, 3, 4]


def test_resume_refuse_overwrite(tmp_path):
    path = tmp_path / "s.zarr"
    group, _ = create_or_resume(path, make_spec())
    write_chunk(str(path), chunk(1, np.random.default_rng(0)))
    group, resumed = create_or_resume(path, make_spec())
    assert resumed and pending_chunks(group).tolist() == [0, 2, 3, 4]
    with pytest.raises(StoreConfigMismatchError, match="--overwrite"):
        create_or_resume(path, make_spec(dtype="float32"))
    assert open_store(path).done.tolist() == [0, 1, 0, 0, 0]  # refusal changed nothing
    group, resumed = create_or_resume(path, make_spec(dtype="float32"), overwrite=True)
    assert not resumed and pending_chunks(group).size == 5


def test_never_deletes_a_foreign_directory(tmp_path):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a cellstrata store"):
        create_or_resume(foreign, make_spec(), overwrite=True)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_writer_roundtrip_and_readers(tmp_path):
    from distributed import Client

    path = tmp_path / "s.zarr"
    create_or_resume(path, make_spec())
    rng = np.random.default_rng(1)
    chunks = [chunk(c, rng) for c in range(5)]
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
        w = ChunkWriter(str(path), client, max_pending=2)
        for ch in chunks[:4]:
            w.submit(ch)
        w.flush()
    store = open_store(path)
    assert store.done.tolist() == [1, 1, 1, 1, 0]
    with pytest.raises(IncompleteStoreError, match="4 of 5"):
        store.require_complete()
    write_chunk(str(path), chunks[4])
    store.require_complete()
    want = np.concatenate([ch.pooled["mean"] for ch in chunks], axis=1)
    np.testing.assert_array_equal(store.layers("mean").compute(), want)
    np.testing.assert_array_equal(store.layers("mean")[2].compute(), want[2])
    ds = store.to_xarray()
    assert ds["cls"].dims == ("layer", "cell", "feature")
    assert list(ds.cell.values[:2]) == ["cell0", "cell1"]
    np.testing.assert_array_equal(ds["n_tokens"].values, np.arange(N))
    plain = xr.open_zarr(str(path), group="pooled", consolidated=False)
    assert plain["mean"].shape == (L + 1, N, H)
    assert "INCOMPLETE" not in store.summary()


def test_write_error_is_one_clear_message_and_keeps_committed(tmp_path, monkeypatch):
    from distributed import Client

    path = tmp_path / "s.zarr"
    create_or_resume(path, make_spec())
    real = writer_mod.write_chunk

    def disk_full(p, ch):
        if ch.index >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(p, ch)

    monkeypatch.setattr(writer_mod, "write_chunk", disk_full)
    rng = np.random.default_rng(2)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        w = ChunkWriter(str(path), client, max_pending=1)
        with pytest.raises(WriteError, match=r"disk is full.*re-run"):
            for c in range(5):
                w.submit(chunk(c, rng))
            w.flush()
    assert zarr.open_group(str(path))["done"][:].tolist() == [1, 1, 0, 0, 0]


def test_default_chunk_size_targets_a_few_megabytes():
    c = default_chunk_cells(10_000_000, 512, "float16")
    assert 2 * 2**20 <= c * 512 * 2 <= 8 * 2**20
    assert default_chunk_cells(100, 512, "float16") == 100


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a cellstrata store"):
        open_store(tmp_path / "other.zarr")
