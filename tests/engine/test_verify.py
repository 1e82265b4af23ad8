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
from cellstrata.engine.errors import StoreCorruptError
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.models import get_family
from cellstrata.engine.storage.checksums import CHECKSUM, chunk_digests, digest, part_names
from cellstrata.engine.storage.metadata_backup import BACKUP_KEY, BACKUP_NODE
from cellstrata.engine.storage.store import ATTR_KEY, StoreSpec, config_hash, create_or_resume
from cellstrata.engine.storage.verify import DamagedChunk, verify_store
from cellstrata.engine.storage.writer import ChunkData, write_chunk

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
    """Every file of the store but the root metadata and its backup (their attributes hold per-run telemetry)."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in store.rglob("*")
        if p.is_file() and p.parent not in (store, store / BACKUP_NODE)
    }


def all_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()}


def cut(path: Path, keep: float) -> None:
    """Truncate a file to ``keep`` of its bytes (0: empty)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def extract_argv(h5ad: Path, ckpt: Path, out: Path) -> list[str]:
    return [
        "extract", str(h5ad), "--model", "scgpt", "--checkpoint", str(ckpt), "--out", str(out),
        "--pool", "all", "--chunk-cells", str(CHUNK), "--quiet",
    ]  # fmt: skip


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


def test_deleted_array_is_restored_and_its_chunks_rewritten(store, original, h5ad, ckpt, capsys):
    shutil.rmtree(store / "pooled" / "cls")
    (store / "truncated" / "zarr.json").unlink()
    report = verify_store(store)
    assert not report.is_clean and report.damaged == 0 and not report.structure
    assert {(d.node, d.reason, d.restorable) for d in report.metadata} == {
        ("pooled/cls", "missing", True),
        ("truncated", "missing", True),
    }
    assert report.ok == 4  # the other parts still match
    code, line = cli_error(capsys, ["info", str(store), "--verify", "--quiet"])
    assert code == 3 and "pooled/cls/zarr.json (pooled/cls) is missing" in line and "--verify --repair" in line
    code, line = cli_error(capsys, ["info", str(store)])  # the plain summary fails: say how to find out
    assert code == 3 and "--verify" in line
    report = verify_store(store, repair=True)
    assert {d.node for d in report.restored} == {"pooled/cls", "truncated"}
    # pooled/cls's chunks are gone (but chunk 3's, all NaN, was never written): those are rewritten
    assert [(d.index, set(d.parts.values())) for d in report.damaged_chunks] == [(c, {"missing"}) for c in range(3)]
    assert report.repaired
    run(h5ad, ckpt, store)
    assert files(store) == files(original) and verify_store(store).is_clean


def test_deleted_array_without_backup_is_a_damaged_layout(store, capsys):
    shutil.rmtree(store / BACKUP_NODE)  # a store written before metadata backups
    shutil.rmtree(store / "pooled" / "cls")
    report = verify_store(store, repair=True)
    assert [(d.node, d.restorable) for d in report.metadata] == [("pooled/cls", False)] and not report.restored
    code, line = cli_error(capsys, ["info", str(store), "--verify", "--quiet"])
    assert code == 3 and "pooled/cls" in line and "new --out" in line


def test_array_of_another_shape_is_a_damaged_layout(store, capsys):
    zarr.open_group(str(store), mode="r+").create_array("n_tokens", shape=(7,), dtype="int32", overwrite=True)
    report = verify_store(store)
    assert [s.split(" has ")[0] for s in report.structure] == ["n_tokens"] and not report.metadata
    code, line = cli_error(capsys, ["info", str(store), "--verify", "--quiet"])
    assert code == 3 and "n_tokens" in line and "new --out" in line


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
    shutil.rmtree(store / CHECKSUM)  # a store written before checksums existed (and metadata backups)
    shutil.rmtree(store / BACKUP_NODE)
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


# ------------------------------------------------------------------------------------ checksum rows


def tamper_row(store: Path, c: int, fn) -> None:
    group = zarr.open_group(str(store), mode="r+")
    row = np.asarray(group[CHECKSUM][c, :])
    group[CHECKSUM][c : c + 1, :] = np.asarray(fn(row), dtype=np.uint64)[None, :]


def test_checksum_row_matching_no_part_is_a_damaged_checksum_row(store, original, h5ad, ckpt, capsys):
    tamper_row(store, 1, lambda row: row + np.uint64(1))  # decodes, but every digest is off
    report = verify_store(store)
    (bad,) = report.damaged_chunks
    assert bad.index == 1 and bad.checksum_row
    assert bad.parts == {CHECKSUM: "row damaged: matches none of the 25 parts that decode"}
    assert report.damaged_checksum_rows == 1 and "1 with a damaged checksum row" in report.describe()
    assert "chunk 1 (cells 16-31): checksum row damaged" in report.describe()
    code, line = cli_error(capsys, ["info", str(store), "--verify", "--quiet"])
    assert code == 3 and "damaged checksum row" in line and "--verify --repair" in line
    # the data may be damaged too: never trusted, the chunk is rewritten (data and checksums)
    code, line = cli_error(capsys, ["info", str(store), "--verify", "--repair", "--quiet"])
    assert code == 3 and "re-run the same extract command" in line
    assert zarr.open_group(str(store), mode="r")["done"][:].tolist() == [1, 0, 1, 1]
    assert run(h5ad, ckpt, store).attrs["telemetry"]["cells"] == 16
    assert files(store) == files(original) and verify_store(store).ok == 4


def test_undecodable_checksum_row_is_a_damaged_checksum_row(store):
    chunk_file(store, CHECKSUM, 2, 0).write_bytes(b"not zstd")
    (bad,) = verify_store(store).damaged_chunks
    assert bad.index == 2 and list(bad.parts) == [CHECKSUM] and bad.parts[CHECKSUM].startswith("row unreadable: ")
    assert "checksum row unreadable" in bad.describe()


def test_zero_digest_is_a_damaged_checksum_row(store):
    tamper_row(store, 0, lambda row: np.where(np.arange(row.size) == 3, 0, row))
    (bad,) = verify_store(store).damaged_chunks
    assert bad.parts == {CHECKSUM: "row damaged: 1 of its 25 digests are 0, which the writer never writes"}


def test_one_mismatching_part_is_damaged_data_not_the_row(store):
    # the row matches every other part, so it is trusted: one wrong digest reads as that part changed
    tamper_row(store, 2, lambda row: np.where(np.arange(row.size) == 6, row ^ np.uint64(1), row))
    (bad,) = verify_store(store).damaged_chunks
    part = zarr.open_group(str(store), mode="r")[CHECKSUM].attrs["parts"][6]
    assert not bad.checksum_row and bad.parts == {part: "changed"}


def test_missing_data_with_a_row_matching_nothing_lists_both(store):
    tamper_row(store, 1, lambda row: row + np.uint64(1))
    chunk_file(store, "obs_names", 1).unlink()
    (bad,) = verify_store(store).damaged_chunks
    assert bad.parts == {"obs_names": "missing", CHECKSUM: "row damaged: matches none of the 24 parts that decode"}


# ------------------------------------------------------------------------------------------ metadata


def test_backup_holds_every_zarr_json_and_follows_the_attributes(original):
    backup = zarr.open_group(str(original), mode="r", use_consolidated=False)[BACKUP_NODE].attrs[BACKUP_KEY]
    root = zarr.open_group(str(original), mode="r")
    assert backup["root"]["attributes"][ATTR_KEY] == dict(root.attrs[ATTR_KEY])  # the last run's telemetry too
    assert "telemetry" in backup["root"]["attributes"][ATTR_KEY]
    names = ["pooled", "pooled/mean", "obs_names", "n_tokens", "truncated", "done", CHECKSUM]
    assert set(names) <= set(backup["nodes"])
    import json

    for name in names:
        assert backup["nodes"][name] == json.loads((original / name / "zarr.json").read_bytes())


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["half", "empty"])
def test_damaged_root_metadata_is_reported_and_restored(store, original, h5ad, ckpt, capsys, keep):
    cut(store / "zarr.json", keep)
    before = all_files(store)
    report = verify_store(store)
    (d,) = report.metadata
    assert d.node == "" and d.restorable and not report.is_clean
    assert report.ok == 4  # the chunks are checked with the attribute's copy
    for argv in (["info", str(store)], ["info", str(store), "--verify", "--quiet"], extract_argv(h5ad, ckpt, store)):
        code, line = cli_error(capsys, argv)
        assert code == 3 and "zarr.json (the store's root metadata) is " in line
        assert ("truncated or not JSON" if keep else "empty (0 bytes)") in line
        assert f"cellstrata info {store} --verify --repair" in line
    with pytest.raises(StoreCorruptError, match=r"--verify --repair` to restore it from metadata_backup/"):
        cs.open_store(store)
    assert all_files(store) == before  # nothing was changed
    code, line = cli_error(capsys, ["info", str(store), "--verify", "--repair", "--quiet"])
    assert code == 3 and "restored zarr.json" in line and "the store is whole again" in line
    assert main(["info", str(store), "--verify", "--quiet"]) == 0
    assert dict(zarr.open_group(str(store), mode="r").attrs[ATTR_KEY]) == dict(
        zarr.open_group(str(original), mode="r").attrs[ATTR_KEY]
    )
    assert main(extract_argv(h5ad, ckpt, store)) == 0  # resumes: nothing left to do
    assert files(store) == files(original)


@pytest.mark.parametrize("node", ["pooled/mean", "done", CHECKSUM, "pooled", "obs_names"])
def test_damaged_array_metadata_is_reported_and_restored(store, original, h5ad, ckpt, capsys, node):
    cut(store / node / "zarr.json", 0.5)
    before = all_files(store)
    report = verify_store(store)
    assert [(d.node, d.restorable) for d in report.metadata] == [(node, True)] and not report.structure
    for argv in (["info", str(store), "--verify", "--quiet"], extract_argv(h5ad, ckpt, store)):
        code, line = cli_error(capsys, argv)
        assert code == 3 and f"{node}/zarr.json ({node}) is truncated or not JSON" in line
        assert "--verify --repair" in line
    assert all_files(store) == before
    report = verify_store(store, repair=True)
    assert [d.node for d in report.restored] == [node] and not report.metadata and not report.damaged_chunks
    assert verify_store(store).is_clean and verify_store(store).ok == 4
    assert main(extract_argv(h5ad, ckpt, store)) == 0
    assert files(store) == files(original)


def test_missing_done_array_is_restored_and_every_chunk_rewritten(store, original, h5ad, ckpt, capsys):
    shutil.rmtree(store / "done")
    code, line = cli_error(capsys, ["info", str(store), "--verify", "--quiet"])
    assert code == 3 and "done/zarr.json (done) is missing" in line
    code, line = cli_error(capsys, extract_argv(h5ad, ckpt, store))
    assert code == 3 and "done/zarr.json (done) is missing" in line
    report = verify_store(store, repair=True)
    # the commit flags are gone: no chunk is trusted as written, the re-run rewrites them all
    assert [d.node for d in report.restored] == ["done"] and report.pending == 4
    assert "re-run the same extract command to write the 4 chunks not written" in report.describe()
    assert zarr.open_group(str(store), mode="r").attrs[ATTR_KEY]["complete"] is False
    assert run(h5ad, ckpt, store).attrs["telemetry"]["cells"] == N_CELLS
    assert files(store) == files(original) and verify_store(store).is_clean


def test_damaged_root_without_backup_says_what_to_do(store, h5ad, ckpt, capsys):
    shutil.rmtree(store / BACKUP_NODE)  # a store written before metadata backups
    cut(store / "zarr.json", 0.5)
    before = all_files(store)
    for argv in (
        ["info", str(store)],
        ["info", str(store), "--verify", "--quiet"],
        ["info", str(store), "--verify", "--repair", "--quiet"],
        extract_argv(h5ad, ckpt, store),
    ):
        code, line = cli_error(capsys, argv)
        assert code == 3 and "zarr.json (the store's root metadata) is truncated or not JSON" in line
        assert "no backup" in line and "new --out" in line
    assert all_files(store) == before


def test_old_store_without_backup_gets_one_at_the_next_run(store, h5ad, ckpt):
    shutil.rmtree(store / BACKUP_NODE)
    assert verify_store(store).is_clean  # not damage
    zarr.open_group(str(store), mode="r+")["done"][1:2] = np.zeros(1, dtype=np.uint8)
    run(h5ad, ckpt, store)
    assert (store / BACKUP_NODE / "zarr.json").exists()
