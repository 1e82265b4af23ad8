"""The chunk writer's parts side by side: same bytes as one after another, and no commit when a part fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from cellstrata.engine.storage import writer as writer_mod
from cellstrata.engine.storage.store import FORMAT_VERSION, StoreSpec, config_hash, create_or_resume
from cellstrata.engine.storage.verify import verify_store
from cellstrata.engine.storage.writer import ChunkData, write_chunk

POOLINGS = {"mean": 24, "max": 24, "official": 96}  # one pooling wider than the hidden size


def make_spec(n: int, c: int, n_layers: int) -> StoreSpec:
    attrs = {
        "format_version": FORMAT_VERSION,
        "model": {"family": "scgpt", "n_layers": n_layers, "hidden": 24},
        "poolings": list(POOLINGS),
        "dtype": "float16",
        "chunk_cells": c,
        "n_cells": n,
        "config_hash": config_hash({"writer-threads": n, "c": c}),
    }
    return StoreSpec(n, n_layers, 24, POOLINGS, "float16", c, "zstd", attrs)


def make_chunks(spec: StoreSpec, rng: np.random.Generator) -> list[ChunkData]:
    out = []
    for c in range(spec.n_chunks):
        start, stop = spec.chunk_bounds(c)
        k = stop - start
        # float32 handed to a float16 store, some NaN rows (empty cells), poolings in another order than the store's
        pooled = {
            name: rng.standard_normal((spec.n_layers + 1, k, w)).astype(np.float32) * 3
            for name, w in reversed(POOLINGS.items())
        }
        empty = rng.random(k) < 0.1
        for arr in pooled.values():
            arr[:, empty, :] = np.nan
        names = np.array([f"cell-{rng.integers(1e9)}-{i}" for i in range(start, stop)])
        n_tokens = np.where(empty, 0, rng.integers(1, 500, k)).astype(np.int32)
        out.append(ChunkData(c, start, stop, pooled, names, n_tokens, rng.random(k) < 0.3))
    return out


def data_files(path: Path) -> dict[str, bytes]:
    """Every file of the store except metadata (zarr.json holds the creation time)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in path.rglob("*") if f.is_file() and f.name != "zarr.json"}


def test_threads_write_the_same_bytes(tmp_path):
    rng = np.random.default_rng()
    n_layers = int(rng.integers(1, 5))
    c = int(rng.integers(5, 40))
    n = int(rng.integers(2 * c + 1, 5 * c))  # the last chunk is partial
    spec = make_spec(n, c, n_layers)
    chunks = make_chunks(spec, rng)
    written = {}
    for threads in (1, 4):
        path = tmp_path / f"t{threads}.zarr"
        create_or_resume(path, spec)
        for ch in reversed(chunks):  # any order of chunks
            assert write_chunk(str(path), ch, threads=threads) == ch.index
        written[threads] = data_files(path)
        assert verify_store(path).ok == spec.n_chunks
    assert written[1].keys() == written[4].keys()
    assert any(k.startswith("pooled/official/") for k in written[1])
    for name, raw in written[1].items():
        assert written[4][name] == raw, name
    values = zarr.open_group(str(tmp_path / "t4.zarr"), mode="r")
    for name in POOLINGS:
        got = values["pooled"][name][:]
        want = np.concatenate([ch.pooled[name] for ch in chunks], axis=1).astype(np.float16)
        np.testing.assert_array_equal(got, want)
    assert (values["done"][:] == 1).all()


@pytest.mark.parametrize("threads", [1, 3])
def test_a_failed_part_leaves_the_chunk_uncommitted(tmp_path, monkeypatch, threads):
    rng = np.random.default_rng()
    spec = make_spec(30, 10, 2)
    path = tmp_path / "s.zarr"
    create_or_resume(path, spec)
    chunks = make_chunks(spec, rng)
    write_chunk(str(path), chunks[0], threads=threads)

    def broken(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_mod, "write_checksums", broken)
    with pytest.raises(OSError, match="No space"):
        write_chunk(str(path), chunks[1], threads=threads)
    done = zarr.open_group(str(path), mode="r")["done"][:]
    assert done.tolist() == [1, 0, 0]
