"""Extraction on Dask distributed: bit-identical to one process, and surviving killed workers and drivers."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.cluster import connect, shards
from cellstrata.engine.errors import ConfigError, WriteError
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.models import get_family
from cellstrata.engine.storage import writer as writer_mod
from cellstrata.engine.storage.lease import read_holder
from cellstrata.engine.storage.location import StoreLocation
from cellstrata.engine.storage.verify import verify_store

pytestmark = pytest.mark.slow
CHUNK = 25


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """600 cells in 24 chunks, a tiny checkpoint, and the store of a single-process run."""
    root = tmp_path_factory.mktemp("cluster")
    ckpt = get_family("scgpt").init_checkpoint("tiny", root / "ckpt", seed=4)
    data = root / "cells.h5ad"
    synthetic_dataset(600, 2000, seed=12, genes_per_cell=120).write_h5ad(data)
    common = ["extract", str(data), "--model", "scgpt", "--checkpoint", str(ckpt), "--pool", "all"]
    common += ["--chunk-cells", str(CHUNK), "--max-tokens", "4096", "--quiet"]
    assert main([*common, "--out", str(root / "ref.zarr")]) == 0
    return {"data": data, "ckpt": ckpt, "common": common, "ref": cs.open_store(root / "ref.zarr")}


def assert_identical(store, ref) -> None:
    assert store.is_complete and store.attrs["complete"] is True
    report = verify_store(store.path)
    assert report.is_clean and report.ok == store.done.size, report.describe()
    assert store.attrs["config_hash"] == ref.attrs["config_hash"]
    for name in ref.poolings:
        np.testing.assert_array_equal(store.group["pooled"][name][:], ref.group["pooled"][name][:])
    for name in ("obs_names", "n_tokens", "truncated"):
        np.testing.assert_array_equal(store.group[name][:], ref.group[name][:])


def extract_kw(case, out, **kw):
    kw.setdefault("poolings", ["all"])
    return dict(
        model="scgpt", checkpoint=case["ckpt"], out=out, chunk_cells=CHUNK, max_tokens=4096, progress=False, **kw
    )


@pytest.fixture
def process_cluster():
    """Two worker processes, one thread each (what --cluster local:2 starts)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as lc,
        Client(lc) as client,
    ):
        yield client


def test_shards_are_consecutive_whole_chunks_covering_the_pending_ones():
    pending = np.array([0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 40])
    parts = shards(pending, n_workers=2)
    assert [c for s in parts for c in s] == pending.tolist()
    assert len(parts) == 6 and max(map(len, parts)) == 2
    assert shards(np.array([], dtype=np.int64), 4) == []
    assert max(map(len, shards(np.arange(10_000), 1))) == 64  # a shard is bounded


def test_local_workers_keep_glibc_malloc_tuning_and_the_driver_environment():
    before = dict(os.environ)
    client, close = connect("local:2", "cpu")
    try:
        seen = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")))
        threads = str(max((os.cpu_count() or 1) // 2, 1))
        assert len(seen) == 2 and set(seen.values()) == {(None, threads)}
    finally:
        close()
    assert dict(os.environ) == before


def test_local_cluster_store_is_bit_identical_to_one_process(case, tmp_path, capsys):
    out = tmp_path / "c.zarr"
    assert main([*case["common"], "--out", str(out), "--cluster", "local:2"]) == 0
    store = cs.open_store(out)
    assert_identical(store, case["ref"])
    tele = store.attrs["telemetry"]
    info = tele["cluster"]
    assert info["workers"] == 2 and info["shards"] >= 4
    # each worker process loaded the model once and reused it for every shard it ran
    assert 1 <= info["model_loads"] == info["worker_processes"] <= 2 < info["shards"]
    assert tele["cells"] == 600 and tele["tokens"] == int(np.asarray(store.group["n_tokens"][:]).sum())
    # the shards' truncation counts add up to the one-process run's
    ref = case["ref"].attrs["telemetry"]
    assert tele["truncated_cells"] == int(np.asarray(store.group["truncated"][:]).sum()) > 0
    for key in ("truncated_cells", "truncated_genes_median", "truncated_genes_max", "truncation_rule"):
        assert tele[key] == ref[key]
    printed = capsys.readouterr().out
    assert "last run" in printed
    assert f"truncation  {tele['truncated_cells']} of 600 cells truncated to 256 tokens" in printed


def test_killed_worker_is_rescheduled_and_the_store_is_identical(case, tmp_path, process_cluster):
    client = process_cluster
    out = tmp_path / "k.zarr"
    result: dict = {}

    def run() -> None:
        try:
            result["store"] = cs.extract(case["data"], **extract_kw(case, out, cluster=client))
        except BaseException as err:  # reported by the assertion below
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():
        try:
            if np.asarray(zarr.open_group(str(out), mode="r")["done"][:]).sum() >= 2:
                break
        except Exception:  # the store does not exist yet
            pass
        time.sleep(0.02)
    assert thread.is_alive(), "the run finished before a worker could be killed"
    pids = client.run(os.getpid)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    assert_identical(result["store"], case["ref"])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_driver_resumes_to_identical_store(case, tmp_path, sig):
    out = tmp_path / "d.zarr"
    cmd = [sys.executable, "-m", "cellstrata", *case["common"], "--out", str(out), "--cluster", "local:2"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                if np.asarray(zarr.open_group(str(out), mode="r")["done"][:]).sum() >= 2:
                    break
            except Exception:
                pass
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
        if sig == signal.SIGTERM:  # graceful: shards cancelled, cluster closed, lease released
            assert proc.returncode == 143 and "re-run the same command" in err and "Traceback" not in err, err
            assert read_holder(StoreLocation.of(out)) is None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver's worker processes (its session) go with it
    partial = cs.open_store(out)
    assert not partial.is_complete
    # the dead driver's lease (same host, process gone) is taken over; the run resumes
    assert main([*case["common"], "--out", str(out), "--cluster", "local:2"]) == 0
    assert_identical(cs.open_store(out), case["ref"])


def test_write_error_on_a_worker_ends_with_one_message_and_resumes(case, tmp_path, monkeypatch):
    from distributed import Client

    real = writer_mod.write_chunk

    def disk_full(path, chunk):
        if chunk.index == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, chunk)

    monkeypatch.setattr(writer_mod, "write_chunk", disk_full)
    out = tmp_path / "w.zarr"
    with Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=":0") as client:
        with pytest.raises(WriteError, match=r"disk is full.*re-run the same command"):
            cs.extract(case["data"], **extract_kw(case, out, cluster=client))
        done = cs.open_store(out).done
        assert done[5] == 0 and done.sum() >= 1
        monkeypatch.setattr(writer_mod, "write_chunk", real)
        store = cs.extract(case["data"], **extract_kw(case, out, cluster=client))
    assert_identical(store, case["ref"])


def test_cluster_refuses_inputs_workers_cannot_reach(case, tmp_path):
    adata = synthetic_dataset(20, 2000, seed=1)
    with pytest.raises(ConfigError, match="as a path"):
        cs.extract(adata, **extract_kw(case, tmp_path / "a.zarr", cluster="local:1"))
    with pytest.raises(ConfigError, match="memory://"):
        cs.extract(case["data"], **extract_kw(case, "memory://cs-test/x.zarr", cluster="local:1"))
    with pytest.raises(ConfigError, match="local:N"):
        cs.extract(case["data"], **extract_kw(case, tmp_path / "b.zarr", cluster="local:zero"))
    assert not Path(tmp_path / "a.zarr").exists() and not Path(tmp_path / "b.zarr").exists()
