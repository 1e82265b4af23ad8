"""Store creation, resume/refusal rules, chunk writes with commit flags, and the read side."""

from __future__ import annotations

import errno
import json
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from cellstrata.engine.errors import IncompleteStoreError, StoreConfigMismatchError, StoreError, WriteError
from cellstrata.engine.storage import store as store_mod
from cellstrata.engine.storage import writer as writer_mod
from cellstrata.engine.storage.lease import LEASE_FILE, LEASE_PREFIX
from cellstrata.engine.storage.location import StoreLocation
from cellstrata.engine.storage.store import (
    ATTR_KEY,
    CREATING_FILE,
    FORMAT_VERSION,
    StoreSpec,
    config_hash,
    create_or_resume,
    default_chunk_cells,
    open_store,
    owned_file,
    pending_chunks,
    refuse_foreign,
)
from cellstrata.engine.storage.writer import ChunkData, ChunkWriter, write_chunk

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
    assert attrs["format_version"] == FORMAT_VERSION == 2 and attrs["complete"] is False and "created" in attrs
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


def tree(location: StoreLocation) -> dict[str, bytes]:
    return {f: location.read_bytes(f) for f in location.files()}


def at(tmp_path, url: str, name: str) -> StoreLocation:
    return StoreLocation.of(tmp_path / name if url == "local" else f"memory://cs-store-test/{tmp_path.name}/{name}")


USER_FILES = {
    "notes.txt": b"mine",
    "analysis/umap.csv": b"1,2\n",
    "pooled/README.md": b"about the poolings",
    "done/keep.txt": b"x",
    "lease-notes/zarr.json": b"{}",
}


@pytest.mark.parametrize("url", ["local", "memory"])
def test_overwrite_deletes_only_the_files_of_a_store(tmp_path, url):
    location = at(tmp_path, url, "s.zarr")
    create_or_resume(location, make_spec())
    write_chunk(location.url, chunk(1, np.random.default_rng(0)))
    for rel, data in USER_FILES.items():
        location.write_bytes(rel, data)
    old = set(location.files()) - set(USER_FILES)
    assert "pooled/mean/c/0/1/0" in old and "done/c/1" in old
    group, resumed = create_or_resume(location, make_spec(dtype="float32"), overwrite=True)
    assert not resumed and pending_chunks(group).size == 5
    assert {rel: location.read_bytes(rel) for rel in USER_FILES} == USER_FILES  # every user file kept
    coords = ("pooled/layer/", "pooled/depth/")  # written at creation (format 2)
    assert not any("/c/" in f for f in location.files() if not f.startswith(coords))  # no old chunk is left
    assert CREATING_FILE not in location.names()
    assert open_store(location.url).attrs["config_hash"] == make_spec(dtype="float32").attrs["config_hash"]
    if url == "memory":
        location.remove()


def foreign(tmp_path, kind: str) -> StoreLocation:
    location = StoreLocation.of(tmp_path / "out")
    if kind == "file":
        (tmp_path / "out").write_text("a file, not a folder")
    elif kind == "zarr group":
        zarr.open_group(location.url, mode="w").create_array("x", shape=(3,), dtype="int8")
        location.write_bytes("notes.txt", b"mine")
    elif kind == "user lease folder":
        location.write_bytes("lease/notes.txt", b"mine")
    elif kind == "foreign lease group":
        zarr.open_group(f"{location.url}/lease", mode="w").attrs["owner"] = "me"
    elif kind == "not a marker":
        location.write_bytes(CREATING_FILE, b"someone else's file")
    return location


@pytest.mark.parametrize("kind", ["file", "zarr group", "user lease folder", "foreign lease group", "not a marker"])
def test_a_foreign_location_is_refused_untouched_even_with_overwrite(tmp_path, kind):
    location = foreign(tmp_path, kind)
    before = tree(location) if kind != "file" else (tmp_path / "out").read_bytes()
    for call in (lambda: refuse_foreign(location), lambda: create_or_resume(location, make_spec(), overwrite=True)):
        with pytest.raises(StoreError, match="not a cellstrata") as info:
            call()
        assert "nothing was changed" in str(info.value)
    assert (tree(location) if kind != "file" else (tmp_path / "out").read_bytes()) == before


def test_never_deletes_a_foreign_store_inside_a_cellstrata_name(tmp_path):
    # a cellstrata store's attribute but a lease/ of user files: refused, nothing deleted
    location = StoreLocation.of(tmp_path / "s.zarr")
    create_or_resume(location, make_spec())
    location.write_bytes("lease/notes.txt", b"mine")
    with pytest.raises(StoreError, match="not a cellstrata lease"):
        create_or_resume(location, make_spec(dtype="float32"), overwrite=True)
    assert location.read_bytes("lease/notes.txt") == b"mine" and "zarr.json" in location.names("pooled/mean")
    # a file named like the creation marker that cellstrata did not write
    other = StoreLocation.of(tmp_path / "t.zarr")
    create_or_resume(other, make_spec())
    other.write_bytes(CREATING_FILE, b"someone else's file")
    with pytest.raises(StoreError, match="not a cellstrata store"):
        create_or_resume(other, make_spec(dtype="float32"), overwrite=True)
    assert other.read_bytes(CREATING_FILE) == b"someone else's file" and "zarr.json" in other.names("pooled/mean")


def test_owned_files_are_those_a_store_is_made_of():
    for rel in (
        "zarr.json",
        CREATING_FILE,
        "pooled/zarr.json",
        "pooled/mean/zarr.json",
        "pooled/mean/c/0/12/0",
        "done/c/3",
        "checksum/c/0/0",
        "probes/ab12/zarr.json",
        "metadata_backup/zarr.json",
    ):
        assert owned_file(rel), rel
    for rel in (
        "notes.txt",
        "lease/zarr.json",
        "pooled/README.md",
        "pooled/mean/c/0/x",
        "done/c",
        "analysis/zarr.json",
        "pooled/mean/notes/zarr.txt",
        "obs_names/c/0.bak",
    ):
        assert not owned_file(rel), rel
    assert store_mod.STORE_NODES[-2] == __import__("cellstrata.probes.runner", fromlist=["x"]).CACHE_GROUP


def creation_steps(tmp_path, monkeypatch) -> list[str]:
    steps: list[str] = []
    monkeypatch.setattr(store_mod, "_creation_step", steps.append)
    create_or_resume(tmp_path / "steps.zarr", make_spec())
    monkeypatch.undo()
    return steps


def layout(location: StoreLocation) -> dict[str, object]:
    """Every file of a fresh store but the metadata backup, parsed; the creation time left out."""
    out = {}
    for f in location.files():
        if f.startswith("metadata_backup/"):
            continue
        if "/c/" in f:  # the layer coordinates' chunks, written at creation (format 2)
            out[f] = location.read_bytes(f)
            continue
        doc = json.loads(location.read_bytes(f))
        doc.get("attributes", {}).get(ATTR_KEY, {}).pop("created", None)
        out[f] = doc
    return out


class Cut(BaseException):
    """Stands for the process dying at a step."""


@pytest.mark.parametrize("url", ["local", "memory"])
def test_a_creation_cut_at_every_step_is_created_again(tmp_path, monkeypatch, url, caplog):
    steps = creation_steps(tmp_path, monkeypatch)
    assert steps[:4] == ["marker", "clear", "group", "pooled"] and steps[-2:] == ["attributes", "created"]
    reference = at(tmp_path, url, "reference.zarr")
    create_or_resume(reference, make_spec())
    for k, step in enumerate(steps):
        location = at(tmp_path, url, f"cut-{k}.zarr")

        def cut(name, step=step):
            if name == step:
                raise Cut(name)

        with monkeypatch.context() as m:
            m.setattr(store_mod, "_creation_step", cut)
            with pytest.raises(Cut):
                create_or_resume(location, make_spec())
        if step != "created":
            assert CREATING_FILE in location.names()  # the folder says it is a store being created
        refuse_foreign(location)  # not foreign
        caplog.clear()
        _, resumed = create_or_resume(location, make_spec())
        assert resumed == (step == "created"), step
        assert layout(location) == layout(reference), step
        assert CREATING_FILE not in location.names()
        if step != "created":
            assert "creating it again" in caplog.text
    if url == "memory":
        StoreLocation.of(f"memory://cs-store-test/{tmp_path.name}").remove()


def test_a_cut_creation_keeps_files_added_to_it_and_a_cut_lease_is_no_obstacle(tmp_path, monkeypatch):
    location = StoreLocation.of(tmp_path / "s.zarr")
    with monkeypatch.context() as m:
        m.setattr(
            store_mod, "_creation_step", lambda name: (_ for _ in ()).throw(Cut(name)) if name == "n_tokens" else None
        )
        with pytest.raises(Cut):
            create_or_resume(location, make_spec())
    location.write_bytes("notes.txt", b"mine")
    location.write_bytes(LEASE_FILE, LEASE_PREFIX[:30])  # a lease file a killed run left half-written
    _, resumed = create_or_resume(location, make_spec())
    assert not resumed and location.read_bytes("notes.txt") == b"mine"
    # a marker cut short (even empty) still names the folder as a store being created
    other = StoreLocation.of(tmp_path / "t.zarr")
    other.write_bytes(CREATING_FILE, b"")
    other.write_bytes("zarr.json", b'{"zarr_format": 3, "node_type": "gr')
    create_or_resume(other, make_spec())
    assert open_store(other.url).n_cells == N


def test_an_interrupted_replacement_is_finished_only_when_asked(tmp_path, monkeypatch):
    location = StoreLocation.of(tmp_path / "s.zarr")
    create_or_resume(location, make_spec())
    write_chunk(location.url, chunk(1, np.random.default_rng(0)))
    new = make_spec(dtype="float32")
    with monkeypatch.context() as m:
        m.setattr(
            store_mod, "_creation_step", lambda name: (_ for _ in ()).throw(Cut(name)) if name == "marker" else None
        )
        with pytest.raises(Cut):
            create_or_resume(location, new, overwrite=True)
    before = tree(location)
    # the old configuration does not silently delete what the interrupted replacement left
    with pytest.raises(StoreConfigMismatchError, match=r"interrupted; .* --overwrite"):
        create_or_resume(location, make_spec())
    assert tree(location) == before
    # the interrupted command (or --overwrite) finishes it
    group, resumed = create_or_resume(location, new)
    assert not resumed and pending_chunks(group).size == 5
    assert open_store(location.url).attrs["config_hash"] == new.attrs["config_hash"]


@pytest.mark.filterwarnings("ignore:Object at notes is not recognized")  # the user's folder, kept on purpose
def test_resume_deletes_the_temporary_files_of_cut_writes_and_nothing_else(tmp_path):
    """A kill between zarr's temporary write and its rename leaves ``<stem>.<hex>.partial``; the next run removes it."""
    path = tmp_path / "s.zarr"
    create_or_resume(path, make_spec())
    rng = np.random.default_rng(3)
    for c in range(5):
        write_chunk(str(path), chunk(c, rng))
    hexes = iter(f"{i:032x}" for i in range(1, 100))
    left = [
        f"zarr.{next(hexes)}.partial",
        f"done/c/3.{next(hexes)}.partial",
        f"pooled/mean/zarr.{next(hexes)}.partial",
        f"pooled/cls/c/2/1/0.{next(hexes)}.partial",
    ]
    user = [
        f"notes/zarr.{next(hexes)}.partial",  # not a store node
        "done/c/3.partial",  # not zarr's name
        f"pooled/mean/c/0/0/0.{'x' * 32}.partial",
    ]
    for rel in left + user:
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(b"cut short")
    with pytest.warns(UserWarning, match="partial"):
        open_store(path).to_xarray()  # what a reader sees before the next run cleans up
    before = {rel: (path / rel).read_bytes() for rel in ("done/c/3", "zarr.json", "pooled/mean/zarr.json")}
    _, resumed = create_or_resume(path, make_spec())
    assert resumed
    assert [rel for rel in left if (path / rel).exists()] == []
    assert all((path / rel).read_bytes() == b"cut short" for rel in user)
    assert before == {rel: (path / rel).read_bytes() for rel in before}
    for rel in user:
        (path / rel).unlink()
    (path / "notes").rmdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_store(path).to_xarray()
