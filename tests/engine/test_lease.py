"""One extraction at a time per store: the lease refuses a live holder and takes over a dead one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.errors import StoreLockedError
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.models import get_family
from cellstrata.engine.storage import lease as lease_mod
from cellstrata.engine.storage.lease import LEASE_FILE, Lease, read_holder, stale_reason
from cellstrata.engine.storage.location import StoreLocation


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("lease")
    ckpt = get_family("scgpt").init_checkpoint("tiny", root / "ckpt", seed=2)
    data = root / "cells.h5ad"
    synthetic_dataset(300, 2000, seed=8, genes_per_cell=120).write_h5ad(data)
    common = ["extract", str(data), "--model", "scgpt", "--checkpoint", str(ckpt), "--chunk-cells", "20", "--quiet"]
    assert main([*common, "--out", str(root / "ref.zarr")]) == 0
    return common, cs.open_store(root / "ref.zarr")


def same_numbers(a, b) -> None:
    assert a.is_complete
    for name in b.poolings:
        np.testing.assert_array_equal(a.group["pooled"][name][:], b.group["pooled"][name][:])


def fake_lease(location: StoreLocation, **holder) -> None:
    body = {"token": "x", "host": "elsewhere", "pid": 1, "acquired": time.time(), "renewed": time.time(), **holder}
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"cellstrata_lease": body}}
    assert location.write_bytes(LEASE_FILE, json.dumps(doc).encode(), exclusive=True)


@pytest.mark.parametrize("url", ["local", "memory://cs-lease/a.zarr"])
def test_lease_is_exclusive_renewed_and_released(tmp_path, monkeypatch, url):
    location = StoreLocation.of(tmp_path / "a.zarr" if url == "local" else url)
    monkeypatch.setattr(lease_mod, "RENEW_SECONDS", 0.05)
    with Lease.acquire(location) as lease:
        first = read_holder(location)["renewed"]
        with pytest.raises(StoreLockedError, match="being written by another extraction, pid"):
            Lease.acquire(location)
        time.sleep(0.3)
        assert lease.held and read_holder(location)["renewed"] > first  # renewed in the background
    assert read_holder(location) is None and location.names() == []


def test_live_lease_refuses_extract_and_nothing_is_created(case, tmp_path, capsys):
    common, _ = case
    out = tmp_path / "s.zarr"
    with Lease.acquire(StoreLocation.of(out)):
        assert main([*common, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "being written by another extraction" in err and "--break-lock" in err
        assert StoreLocation.of(out).names() == ["lease"]  # the store itself was not created
    assert main([*common, "--out", str(out)]) == 0


@pytest.mark.slow
def test_stale_leases_are_taken_over(case, tmp_path, caplog):
    common, ref = case
    # a process on this host that is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    a = StoreLocation.of(tmp_path / "a.zarr")
    fake_lease(a, host=__import__("socket").gethostname(), pid=dead.pid)
    assert "is gone" in stale_reason(read_holder(a))
    assert main([*common, "--out", a.url]) == 0
    same_numbers(cs.open_store(a.url), ref)
    assert read_holder(a) is None  # released at the end
    # another host: live while renewed, taken over once not renewed for STALE_SECONDS
    b = StoreLocation.of(tmp_path / "b.zarr")
    fake_lease(b)
    assert main([*common, "--out", b.url]) == 2
    b.remove("lease")
    fake_lease(b, renewed=time.time() - lease_mod.STALE_SECONDS - 5)
    assert main([*common, "--out", b.url]) == 0
    # --break-lock takes over a live lease
    c = StoreLocation.of(tmp_path / "c.zarr")
    fake_lease(c)
    assert main([*common, "--out", c.url, "--break-lock"]) == 0
    same_numbers(cs.open_store(c.url), ref)


@pytest.mark.slow
def test_two_concurrent_extracts_on_one_new_store(case, tmp_path):
    common, ref = case
    out = tmp_path / "race.zarr"
    cmd = [sys.executable, "-m", "cellstrata", *common, "--out", str(out)]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=tmp_path)]
    procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=tmp_path))
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    # either one was refused while the other wrote, or the second started after the first finished
    assert codes in ([0, 0], [0, 2]), results
    for code, err in results:
        assert "Traceback" not in err, err
        if code == 2:
            assert "being written by another extraction" in err
    same_numbers(cs.open_store(out), ref)
    assert not Path(out, "lease").exists()


def test_unwritable_location_is_one_clear_error(case, capsys):
    common, _ = case
    assert main([*common, "--out", "/proc/cellstrata-test.zarr"]) == 2
    err = capsys.readouterr().err
    assert "check the --out path is writable" in err and "Traceback" not in err


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_user_folder_named_lease_is_never_touched(case, tmp_path, capsys):
    common, _ = case
    # --out holds only a folder lease/ of user data
    out = tmp_path / "mine"
    (out / "lease").mkdir(parents=True)
    (out / "lease" / "notes.txt").write_text("keep me")
    before = _tree(out)
    assert main([*common, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not a cellstrata" in err and "nothing was changed" in err and "Traceback" not in err
    assert _tree(out) == before and sorted(p.name for p in out.rglob("*")) == ["lease", "notes.txt"]
    # beside other user files
    (out / "results.csv").write_text("a,b\n1,2\n")
    before = _tree(out)
    assert main([*common, "--out", str(out)]) == 2
    assert "nothing was changed" in capsys.readouterr().err
    assert _tree(out) == before and sorted(p.name for p in out.rglob("*")) == ["lease", "notes.txt", "results.csv"]


def test_a_foreign_zarr_group_named_lease_is_never_touched(case, tmp_path, capsys):
    common, _ = case
    out = tmp_path / "zarrs"
    import zarr

    zarr.open_group(out / "lease", mode="w").attrs["owner"] = "me"  # lease/zarr.json, not a cellstrata lease
    before = _tree(out)
    assert main([*common, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not a cellstrata" in err and "nothing was changed" in err and "Traceback" not in err
    assert _tree(out) == before
    # the same foreign lease/zarr.json inside a cellstrata store is neither taken over nor deleted
    store = tmp_path / "store.zarr"
    assert main([*common, "--out", str(store)]) == 0
    zarr.open_group(store / "lease", mode="w").attrs["owner"] = "me"
    before = _tree(store / "lease")
    assert main([*common, "--out", str(store)]) == 2
    err = capsys.readouterr().err
    assert "not a cellstrata lease" in err and "Traceback" not in err
    assert _tree(store / "lease") == before


def test_release_deletes_only_the_lease_file_it_wrote(tmp_path):
    location = StoreLocation.of(tmp_path / "a.zarr")
    with Lease.acquire(location):
        (tmp_path / "a.zarr" / "lease" / "notes.txt").write_text("added while the run held the lease")
    assert read_holder(location) is None
    assert [p.name for p in (tmp_path / "a.zarr" / "lease").iterdir()] == ["notes.txt"]
    # a lease that is no longer ours (taken over) is left alone
    other = StoreLocation.of(tmp_path / "b.zarr")
    lease = Lease.acquire(other)
    other.remove(LEASE_FILE)
    fake_lease(other)
    lease.release()
    assert read_holder(other)["token"] == "x"
