"""A store's creation cut short at any of its writes: the same command creates it again, equal to a store
written without interruption; a foreign folder is still never touched.

The cut is aimed at the k-th file zarr writes (``LocalStore.set``), for every k of a creation, so the
tests do not depend on how the engine orders its steps. In-process the write raises; the slow test kills
a subprocess with SIGKILL at the same points, so the lease and the marker stay behind as after a crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from zarr.storage import LocalStore

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine import run
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.models import get_family

POOLINGS = ["mean", "cls"]


class Cut(BaseException):
    """Stands for the process dying at a write."""


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("creation")
    ckpt = get_family("scgpt").init_checkpoint("tiny", root / "ckpt", seed=3)
    data = root / "cells.h5ad"
    synthetic_dataset(50, 800, seed=4, genes_per_cell=60).write_h5ad(data)
    kw = {"model": "scgpt", "checkpoint": ckpt, "chunk_cells": 20, "poolings": POOLINGS, "progress": False}
    ref = cs.extract(data, out=root / "ref.zarr", **kw)
    return data, kw, ref


class WriteCounter:
    """Counts zarr's file writes; raises :class:`Cut` at write ``cut_at`` (1-based) if set."""

    def __init__(self, monkeypatch, cut_at: int | None = None):
        self.n = 0
        self.cut_at = cut_at
        original = LocalStore.set

        async def counted(store, key, value, *args, **kwargs):
            self.n += 1
            if self.n == self.cut_at:
                raise Cut(key)
            return await original(store, key, value, *args, **kwargs)

        monkeypatch.setattr(LocalStore, "set", counted)


def creation_writes(case, tmp_path, monkeypatch) -> int:
    """How many files zarr writes while a store is created (before the first chunk)."""
    data, kw, _ = case
    counter = WriteCounter(monkeypatch)
    seen = []
    original = run.create_or_resume

    def recorded(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(counter.n)
        return out

    with monkeypatch.context() as m:
        m.setattr(run, "create_or_resume", recorded)
        cs.extract(data, out=tmp_path / "count.zarr", **kw)
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0] >= 8, seen  # root, pooled, 2 poolings, 4 cell arrays, checksum, attributes
    return seen[0]


def same_store(a: cs.Store, b: cs.Store) -> None:
    assert a.is_complete and a.attrs["config_hash"] == b.attrs["config_hash"]
    for name in b.poolings:
        np.testing.assert_array_equal(a.group["pooled"][name][:], b.group["pooled"][name][:])
    for name in ("obs_names", "n_tokens", "truncated", "done", "checksum"):
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:])
    assert files(a.path) == files(b.path)


def files(folder) -> list[str]:
    """Every file in a local store, by its path inside the store."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_creation_cut_at_any_write_is_created_again_by_the_same_command(case, tmp_path, monkeypatch):
    data, kw, ref = case
    n = creation_writes(case, tmp_path, monkeypatch)
    for k in range(1, n + 1):
        out = tmp_path / f"cut{k}.zarr"
        with monkeypatch.context() as m:
            WriteCounter(m, cut_at=k)
            with pytest.raises(Cut):
                cs.extract(data, out=out, **kw)
        store = cs.extract(data, out=out, **kw)  # the same command, no manual step
        same_store(store, ref)
        assert not (out / ".cellstrata-creating").exists()


def test_the_cli_recreates_a_cut_creation_with_one_warning(case, tmp_path, monkeypatch, capsys):
    data, kw, ref = case
    out = tmp_path / "cli.zarr"
    argv = ["extract", str(data), "--model", "scgpt", "--checkpoint", str(kw["checkpoint"]), "--out", str(out)]
    argv += ["--chunk-cells", "20", "--pool", ",".join(POOLINGS), "--quiet"]
    with monkeypatch.context() as m:
        WriteCounter(m, cut_at=3)
        try:
            code = main(argv)  # main may report the cut as an unexpected error
        except Cut:
            code = None
        assert code != 0
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "interrupted while it created this store; creating it again" in err and "Traceback" not in err
    same_store(cs.open_store(out), ref)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from zarr.storage import LocalStore
    from cellstrata.cli import main

    cut_at, n = int(sys.argv[1]), [0]
    original = LocalStore.set

    async def counted(store, key, value, *args, **kwargs):
        n[0] += 1
        if n[0] == cut_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(store, key, value, *args, **kwargs)

    LocalStore.set = counted
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.slow
def test_sigkill_during_creation_then_the_same_command_resumes(case, tmp_path, monkeypatch):
    data, kw, ref = case
    n = creation_writes(case, tmp_path, monkeypatch)
    argv = ["extract", str(data), "--model", "scgpt", "--checkpoint", str(kw["checkpoint"])]
    argv += ["--chunk-cells", "20", "--pool", ",".join(POOLINGS), "--quiet"]
    for k in sorted({1, 2, n // 2, n - 1, n}):
        out = tmp_path / f"kill{k}.zarr"
        cmd = [sys.executable, "-c", KILLER, str(k), *argv, "--out", str(out)]
        killed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert (out / "lease" / "zarr.json").exists()  # a crash leaves its lease behind
        again = subprocess.run(
            [sys.executable, "-m", "cellstrata", *argv, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        assert again.returncode == 0, again.stderr[-2000:]
        assert "Traceback" not in again.stderr
        same_store(cs.open_store(out), ref)
