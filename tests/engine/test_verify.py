"""Per-chunk checksums and ``cellstrata info --verify``: tampered, deleted and undecodable chunks are found."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.checksums import CHECKSUM, chunk_digests, digest, part_names
from cellstrata.engine.datasets import synthetic_dataset
from cellstrata.engine.models import get_family
from cellstrata.engine.store import ATTR_KEY, StoreSpec, config_hash, create_or_resume
from cellstrata.engine.verify import DamagedChunk, verify_store
from cellstrata.engine.writer import ChunkData, write_chunk

N_CELLS, CHUNK = 60, 16  # 4 chunks, the last one partial (12 cells)
EMPTY = slice(48, 60)  # the last chunk's cells express no vocabulary gene: its mean/max chunks are all NaN


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return get_family("scgpt").init_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "scgpt", seed=3)


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory) -> Path:
    adata = synthetic_dataset(N_CELLS, 2000, seed=5, genes_per_cell=150)
    x = sp.lil_matrix(adata.X)
    x[EMPTY, :] = 0
    adata.X = sp.csr_matrix(x)
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def run(h5ad: Path, ckpt: Path, out: Path):
    return cs.extract(
        h5ad, model="scgpt", checkpoint=ckpt, out=out, poolings=["all"], chunk_cells=CHUNK, progress=False
    )


@pytest.fixture(scope="module")
def original(tmp_path_factory, h5ad, ckpt) -> Path:
    out = tmp_path_factory.mktemp("orig") / "s.zarr"
    run(h5ad, ckpt, out)
    return out


@pytest.fixture
def store(original, tmp_path) -> Path:
    """A fresh copy of the original store, to tamper with."""
    return Path(shutil.copytree(original, tmp_path / "s.zarr"))


def chunk_file(store: Path, array: str, *coords: int) -> Path:
    """The file of one zarr v3 chunk (default chunk key encoding ``c/<i>/<j>/...``)."""
    return store.joinpath(array, "c", *map(str, coords))


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data), 7):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def files(store: Path) -> dict[str, bytes]:
    """Every file of the store but the root metadata (whose attributes hold per-run telemetry)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file() and p.parent != store}


def cli_error(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("cellstrata: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


# ------------------------------------------------------------------------------------------- checksums


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_digests_of_data_read_back_equal_digests_written(tmp_path, dtype):
    n, c, w, n_layers = 23, 5, 7, 2  # odd sizes: a partial last chunk
    rng = np.random.default_rng(0)
    data = rng.standard_normal((n_layers + 1, n, w)).astype(dtype)
    data[:, [3, 11], :] = np.nan  # NaN rows (empty cells)
    data[1, 15:20, :] = np.nan  # one whole chunk NaN: zarr skips writing it
    data[2, 15:20, :] = -np.full((5, w), np.nan, dtype=dtype)  # another NaN bit pattern, also skipped
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    arr = group.create_array("p", shape=data.shape, chunks=(1, c, w), dtype=dtype, fill_value=np.nan)
    names = group.create_array("s", shape=(n,), chunks=(c,), dtype=str)
    arr[:] = data
    names[:] = np.array([f"cell-{i}é" for i in range(n)])
    assert not (tmp_path / "g.zarr" / "p" / "c" / "1" / "3").exists()  # the all-NaN chunk was not written
    for start in range(0, n, c):
        sl = slice(start, min(start + c, n))
        for layer in range(n_layers + 1):
            assert digest(arr[layer, sl, :]) == digest(data[layer, sl, :])
        assert digest(names[sl]) == digest(np.array([f"cell-{i}é" for i in range(sl.start, sl.stop)]))
    row = data[:, 0:5, :]
    assert digest(row[:, :4]) != digest(row) != digest(row.astype("float64"))  # shape and dtype count
    assert digest(np.array(["ab", "c"])) != digest(np.array(["a", "bc"]))
    got = chunk_digests({"p": data[:, 0:5]}, names[0:5], np.arange(5, dtype=np.int32), np.zeros(5, dtype=bool))
    assert got.dtype == np.uint64 and got.size == len(part_names(["p"], n_layers)) == n_layers + 4


def test_write_chunk_records_the_digests_of_what_it_wrote(tmp_path):
    n, c, h, n_layers = 12, 5, 3, 1
    attrs = {"format_version": 1, "model": {"n_layers": n_layers, "hidden": h}, "poolings": ["mean", "cls"]}
    attrs |= {"dtype": "float16", "chunk_cells": c, "n_cells": n, "config_hash": config_hash({"x": 1})}
    spec = StoreSpec(n, n_layers, h, {"mean": h, "cls": h}, "float16", c, "zstd", attrs)
    path = tmp_path / "s.zarr"
    group, _ = create_or_resume(path, spec)
    ck = group[CHECKSUM]
    assert ck.shape == (3, 2 * (n_layers + 1) + 3) and ck.chunks == (1, ck.shape[1]) and ck.dtype == np.uint64
    assert ck.metadata.dimension_names == ("cell_chunk", "part")
    assert ck.attrs["parts"] == part_names(["mean", "cls"], n_layers)
    rng = np.random.default_rng(1)
    # float32 handed to a float16 store, poolings in another order than the store's: digests follow the store
    pooled = {p: rng.standard_normal((n_layers + 1, 5, h)).astype(np.float32) for p in ("cls", "mean")}
    chunk = ChunkData(1, 5, 10, pooled, np.array(list("abcde")), np.arange(5), np.ones(5, dtype=bool))
    write_chunk(str(path), chunk)
    stored = {p: pooled[p].astype(np.float16) for p in ("mean", "cls")}
    want = chunk_digests(stored, chunk.obs_names, np.arange(5, dtype=np.int32), chunk.truncated)
    np.testing.assert_array_equal(zarr.open_group(str(path))[CHECKSUM][1], want)
    assert verify_store(path).ok == 1


# ----------------------------------------------------------------------------------------------- verify


def test_fresh_store_verifies_clean(store, capsys):
    assert not chunk_file(store, "pooled/mean", 0, 3, 0).exists()  # all-NaN chunk skipped by zarr, still ok
    report = verify_store(store)
    assert (report.ok, report.damaged, report.pending, report.unchecked) == (4, 0, 0, 0)
    assert report.is_clean and "no damage found" in report.describe()
    assert main(["info", str(store), "--verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "4 ok, 0 damaged" in out and "checksums" in out


def test_flipped_bytes_are_found(store):
    flip_bytes(chunk_file(store, "pooled/mean", 2, 1, 0))
    report = verify_store(store)
    assert (report.ok, report.damaged) == (3, 1)
    bad = report.damaged_chunks[0]
    assert (bad.index, bad.start, bad.stop) == (1, 16, 32)
    assert list(bad.parts) == ["pooled/mean/2"]
    assert bad.parts["pooled/mean/2"] == "changed" or bad.parts["pooled/mean/2"].startswith("unreadable: ")
    assert "chunk 1 (cells 16-31): pooled/mean/2" in report.describe()


def test_corrupt_compressed_bytes_are_unreadable(store):
    path = chunk_file(store, "pooled/cls", 0, 2, 0)
    data = bytearray(path.read_bytes())
    data[:16] = bytes(16)  # the blosc header: decoding raises inside zarr
    path.write_bytes(bytes(data))
    (bad,) = verify_store(store).damaged_chunks
    assert bad.index == 2 and bad.parts["pooled/cls/0"].startswith("unreadable: ")


def test_valid_but_different_data_is_changed(store):
    group = zarr.open_group(str(store), mode="r+")
    arr = group["pooled/max"]
    arr[3, 32:48, :] = arr[3, 32:48, :] + np.float16(1)  # re-encoded by zarr, decodes fine
    group["obs_names"][0:2] = np.array(["evil0", "evil1"])
    report = verify_store(store)
    assert {d.index: d.parts for d in report.damaged_chunks} == {
        0: {"obs_names": "changed"},
        2: {"pooled/max/3": "changed"},
    }


def test_deleted_chunk_files_are_missing(store):
    chunk_file(store, "pooled/max", 0, 0, 0).unlink()
    chunk_file(store, "n_tokens", 2).unlink()
    chunk_file(store, CHECKSUM, 1, 0).unlink()
    report = verify_store(store)
    assert {d.index: d.parts for d in report.damaged_chunks} == {
        0: {"pooled/max/0": "missing"},
        1: {CHECKSUM: "missing"},
        2: {"n_tokens": "missing"},
    }
    assert report.ok == 1


def test_damage_is_described_compactly():
    parts = {f"pooled/mean/{layer}": "missing" for layer in (0, 1, 2, 4)}
    parts |= {"pooled/max/0": "changed", "obs_names": "missing"}
    text = DamagedChunk(3, 48, 60, parts).describe()
    assert text == "chunk 3 (cells 48-59): pooled/mean/[0-2,4], obs_names missing; pooled/max/0 changed"


def test_deleted_array_is_reported_without_traceback(store, capsys):
    shutil.rmtree(store / "pooled" / "cls")
    (store / "truncated" / "zarr.json").unlink()
    report = verify_store(store)
    assert not report.is_clean and report.damaged == 0
    assert any("pooled/cls" in s and "missing" in s for s in report.structure)
    assert any(s.startswith("truncated") for s in report.structure)
    assert report.ok == 4  # the other parts still match
    code, line = cli_error(capsys, ["info", str(store), "--verify", "--quiet"])
    assert code == 3 and "pooled/cls" in line and "new --out" in line
    code, line = cli_error(capsys, ["info", str(store)])  # the plain summary fails: say how to find out
    assert code == 3 and "--verify" in line


def test_unreadable_done_flag_is_damage_and_repairable(store):
    chunk_file(store, "done", 2).write_bytes(b"not zstd")
    report = verify_store(store, repair=True)
    assert [(d.index, list(d.parts)) for d in report.damaged_chunks] == [(2, ["done"])]
    assert report.damaged_chunks[0].parts["done"].startswith("unreadable: ") and report.repaired
    assert zarr.open_group(str(store), mode="r")["done"][:].tolist() == [1, 1, 0, 1]


def test_damaged_attribute_is_one_error_line(store, capsys):
    group = zarr.open_group(str(store), mode="r+")
    group.attrs[ATTR_KEY] = {k: v for k, v in group.attrs[ATTR_KEY].items() if k != "chunk_cells"}
    code, line = cli_error(capsys, ["info", str(store), "--verify", "--quiet"])
    assert code == 3 and "chunk_cells" in line


def test_cli_damage_exits_nonzero_with_one_error_line(store, capsys):
    chunk_file(store, "pooled/official", 1, 0, 0).unlink()
    code, line = cli_error(capsys, ["info", str(store), "--verify", "--quiet"])
    assert code == 3
    assert "1 of 4 cell chunks damaged" in line and "pooled/official/1 missing" in line
    assert "--verify --repair" in line and "same extract command" in line
    code, line = cli_error(capsys, ["info", str(store), "--repair"])
    assert code == 2 and "--verify" in line


def test_repair_then_rerun_restores_an_identical_store(store, original, h5ad, ckpt, capsys):
    flip_bytes(chunk_file(store, "pooled/mean", 4, 1, 0))
    chunk_file(store, "obs_names", 3).unlink()
    code, line = cli_error(capsys, ["info", str(store), "--verify", "--repair", "--quiet"])
    assert code == 3 and "re-run the same extract command" in line
    group = zarr.open_group(str(store), mode="r")
    assert group["done"][:].tolist() == [1, 0, 1, 0]  # exactly the damaged chunks
    assert group.attrs[ATTR_KEY]["complete"] is False
    rerun = run(h5ad, ckpt, store)
    assert rerun.attrs["telemetry"]["cells"] == 16 + 12  # only chunks 1 and 3 were computed again
    assert files(store) == files(original)
    assert verify_store(store).is_clean and verify_store(store).ok == 4


def test_store_without_checksums_reads_resumes_and_verifies(store, original, h5ad, ckpt, capsys):
    shutil.rmtree(store / CHECKSUM)  # a store written before checksums existed
    old = cs.open_store(store)
    np.testing.assert_array_equal(old.layers("mean").compute(), cs.open_store(original).layers("mean").compute())
    report = verify_store(store)
    assert report.is_clean and not report.has_checksums and report.unchecked == 4 and report.ok == 0
    assert "no checksums: only structure checked" in report.describe()
    assert main(["info", str(store), "--verify", "--quiet"]) == 0
    zarr.open_group(str(store), mode="r+")["done"][1:2] = np.zeros(1, dtype=np.uint8)
    resumed = run(h5ad, ckpt, store)
    assert resumed.is_complete and CHECKSUM not in zarr.open_group(str(store), mode="r")
    assert files(store) == {k: v for k, v in files(original).items() if not k.startswith(CHECKSUM)}
