"""The benchmarks delete only what they made: folders carrying the ``.cellstrata-bench`` marker and what
lies inside them. A user's folder in ``--workdir``, even one named like a generated one, is kept (one line
says so) or, where a benchmark would have to create it, refused with one line and left as it is."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmark_package import benchmark

scale = benchmark("scale")
throughput = benchmark("throughput")
probes = benchmark("probes")
common = benchmark("common")
OWNED_MARKER, NotOwnedError = common.OWNED_MARKER, common.NotOwnedError
fresh_owned_dir, is_owned, make_owned_dir = common.fresh_owned_dir, common.is_owned, common.make_owned_dir
make_temp_dir, remove_owned = common.make_temp_dir, common.remove_owned


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder of the user's with a file and a sub-folder; returns its contents."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return tree(path)


def test_marked_folders_and_what_is_inside_them_are_removed(tmp_path):
    owned = make_owned_dir(tmp_path / "scgpt-tiny")
    assert (owned / OWNED_MARKER).read_text().startswith("cellstrata benchmark folder")
    (owned / "store.zarr").mkdir()
    (owned / "store.zarr" / "zarr.json").write_text("{}")
    (owned / "result.json").write_text("{}")
    assert is_owned(owned / "store.zarr" / "zarr.json")
    assert remove_owned(owned / "result.json") and not (owned / "result.json").exists()
    assert remove_owned(owned / "store.zarr") and not (owned / "store.zarr").exists()
    assert remove_owned(owned) and not owned.exists()
    assert remove_owned(tmp_path / "never-there")  # nothing to do
    temp = make_temp_dir("cellstrata-test-")
    (temp / "x").write_text("x")
    assert remove_owned(temp) and not temp.exists()


def test_unmarked_folders_files_and_links_are_kept(tmp_path, capsys):
    user = tmp_path / "store-2000-single.zarr"  # named like a generated store
    files = user_folder(user)
    lone = tmp_path / "cells-tiny.h5ad"
    lone.write_text("user counts")
    assert not remove_owned(user) and not remove_owned(lone)
    assert tree(user) == files and lone.read_text() == "user counts"
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and out.startswith(f"kept {user}: not made by a benchmark")
    # a marker that is not ours (another program's file of that name) does not count
    (user / OWNED_MARKER).write_text("something else")
    assert not remove_owned(user) and (user / "notes.txt").exists()
    # a link inside an owned folder goes, the folder it points to stays
    owned = make_owned_dir(tmp_path / "scale-work")
    (owned / "link").symlink_to(user, target_is_directory=True)
    assert remove_owned(owned / "link") and not (owned / "link").is_symlink()
    assert (user / "notes.txt").read_text() == "mine"


def test_creating_over_a_users_path_is_refused(tmp_path):
    user = tmp_path / "geneformer-tiny"
    files = user_folder(user)
    for make in (make_owned_dir, fresh_owned_dir):
        with pytest.raises(NotOwnedError, match="refusing to"):
            make(user)
    assert tree(user) == files and not (user / OWNED_MARKER).exists()
    a_file = tmp_path / "ckpt-scgpt-tiny"
    a_file.write_text("x")
    with pytest.raises(NotOwnedError):
        make_owned_dir(a_file)
    assert a_file.read_text() == "x"
    # one line, no traceback: the scripts stop with it
    assert issubclass(NotOwnedError, SystemExit)
    # an empty folder holds nothing to lose: it is taken over; an owned one is emptied and reused
    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_owned(make_owned_dir(empty))
    (empty / "old-output").write_text("x")
    assert tree(fresh_owned_dir(empty)) == {OWNED_MARKER: (empty / OWNED_MARKER).read_bytes()}


def test_probes_cache_clear_keeps_a_users_store(tmp_path, capsys):
    """``python -m benchmarks.probes`` clears ``<store>/probes`` before a cold run: not in a store that is not
    its own."""
    from cellstrata.probes.runner import CACHE_GROUP

    store = tmp_path / "store-1000-g2000-e50-L4-W64-s0.zarr"
    files = user_folder(store / CACHE_GROUP)
    probes._clear_cache(store)
    assert tree(store / CACHE_GROUP) == files
    assert "kept" in capsys.readouterr().out
    # the benchmark's own store sits in its marked folder: its cache goes
    own = probes.store_location(probes.BuildSettings(1000, 4, 64, 2000, 50.0, 0), tmp_path)
    assert own.parent.name == probes.SCRATCH
    make_owned_dir(own.parent)
    (own / CACHE_GROUP).mkdir(parents=True)
    probes._clear_cache(own)
    assert not (own / CACHE_GROUP).exists() and own.exists()


def test_scale_inputs_leave_users_folders_intact(tmp_path, capsys):
    """``python -m benchmarks.scale`` writes partial inputs in its marked folder; the old temporary names in the workdir
    (``.<name>.tmp``) and a user folder named like a store are never touched."""
    name = f"cells-20-g5-n{scale.N_GENES}-seed{scale.SEED}.h5ad"
    old_tmp = tmp_path / f".{name}.tmp"
    tmp_files = user_folder(old_tmp)
    store = tmp_path / "store-20-single.zarr"
    store_files = user_folder(store)
    path, seconds = scale.build_h5ad(20, 5.0, tmp_path)
    assert path == tmp_path / name and path.is_file() and seconds is not None
    assert tree(old_tmp) == tmp_files and tree(store) == store_files
    assert is_owned(tmp_path / scale.SCRATCH) and not is_owned(tmp_path)
    assert scale.build_h5ad(20, 5.0, tmp_path) == (path, None)  # reused
    # a user folder where the scratch folder would go: refused before anything is written
    other = tmp_path / "other"
    scratch_files = user_folder(other / scale.SCRATCH)
    with pytest.raises(NotOwnedError):
        scale.build_h5ad(20, 5.0, other)
    assert tree(other) == {f"{scale.SCRATCH}/{k}": v for k, v in scratch_files.items()}
    assert remove_owned(tmp_path / scale.SCRATCH)


def test_throughput_refuses_a_workdir_of_user_files(tmp_path):
    """``python -m benchmarks.throughput`` replaces fixed names (``<family>-<preset>/``, ``cells-<kind>.h5ad``)
    in its work folder, so a ``--workdir`` holding files it did not make is refused before anything is written."""
    work = tmp_path / "bench"
    files = user_folder(work / "scgpt-tiny")
    with pytest.raises(NotOwnedError, match="refusing to use"):
        throughput.main(
            ["--quick", "--models", "scgpt", "--presets", "scgpt=tiny", "--workdir", str(work), "--no-save"]
        )
    assert tree(work) == {f"scgpt-tiny/{k}": v for k, v in files.items()}
