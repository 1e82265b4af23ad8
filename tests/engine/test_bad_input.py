"""Bad input to ``extract``: numeric options out of range, duplicated names, a signal during start-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.errors import ConfigError
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.input.sources import open_source
from cellstrata.engine.models import get_family
from cellstrata.engine.plan import duplicate_notes
from cellstrata.engine.storage.store import store_attributes

N_CELLS = 40


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return get_family("scgpt").init_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "scgpt", seed=3)


@pytest.fixture(scope="module")
def adata():
    return synthetic_dataset(N_CELLS, 2000, seed=5, genes_per_cell=80)


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory, adata) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def cli_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("cellstrata: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def extract_argv(data, ckpt, out, *extra) -> list[str]:
    return ["extract", str(data), "--model", "scgpt", "--checkpoint", str(ckpt), "--out", str(out), "--quiet", *extra]


# ------------------------------------------------------------------------------------ numeric options

BAD_NUMBERS = [
    ("--chunk-cells", "0"),
    ("--chunk-cells", "-3"),
    ("--max-tokens", "0"),
    ("--max-tokens", "-1"),
    ("--max-length", "0"),
    ("--max-length", "-5"),
    ("--input-workers", "-1"),
    ("--seed", "-1"),
    ("--limit", "0"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_NUMBERS, ids=[f"{f}={v}" for f, v in BAD_NUMBERS])
def test_numeric_option_out_of_range_is_refused_by_name(capsys, tmp_path, h5ad, ckpt, flag, value):
    out = tmp_path / "s.zarr"
    msg = cli_error(capsys, extract_argv(h5ad, ckpt, out, flag, value))
    assert flag in msg and f"got {value}" in msg and "whole number" in msg, msg
    assert not out.exists()  # refused before anything was created


@pytest.mark.parametrize(
    ("name", "value"),
    [("chunk_cells", 0), ("chunk_cells", -2), ("chunk_cells", 2.5), ("chunk_cells", True), ("max_tokens", 0),
     ("max_tokens", "512"), ("input_workers", -1), ("max_length", 0), ("seed", -1), ("limit", 0)],
)  # fmt: skip
def test_python_extract_refuses_the_same_values(tmp_path, h5ad, ckpt, name, value):
    out = tmp_path / "s.zarr"
    with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')} must be a whole number"):
        cs.extract(h5ad, model="scgpt", checkpoint=ckpt, out=out, progress=False, **{name: value})
    assert not out.exists()


def test_explicit_chunk_cells_is_used_as_given(tmp_path, h5ad, ckpt):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    store = cs.extract(h5ad, model="scgpt", checkpoint=ckpt, out=tmp_path / "s.zarr", progress=False, chunk_cells=7)
    assert store.chunk_cells == 7 and store.done.size == -(-N_CELLS // 7)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # start-up and run handlers are restored
    assert main(extract_argv(h5ad, ckpt, tmp_path / "t.zarr", "--input-workers", "0", "--seed", "0")) == 0


# ------------------------------------------------------------------------------------ signal during start-up

# The child runs the real command line with one start-up step made slow: it touches READY, then sleeps
# (inside the step, so the signal lands exactly there).
CHILD = """
import sys, time
from pathlib import Path
import cellstrata.cli as cli
import cellstrata.engine.run as run

ready, step, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]

def stall(*args, **kwargs):
    ready.touch()
    time.sleep(120)

if step == "parser":  # building the parser imports the probes
    cli.build_parser = stall
elif step == "input":
    run.open_source = stall
else:
    real = run.get_family
    def get_family(name):
        family = real(name)
        family.load = stall
        return family
    run.get_family = get_family
sys.exit(cli.main(argv))
"""


@pytest.mark.parametrize(
    "step", [pytest.param("parser", marks=pytest.mark.slow), pytest.param("input", marks=pytest.mark.slow), "model"]
)
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_signal_during_startup_says_so_in_one_line(tmp_path, h5ad, ckpt, step, sig):
    out, ready = tmp_path / "s.zarr", tmp_path / "ready"
    argv = extract_argv(h5ad, ckpt, out)
    # cwd: the installed package, not a same-named folder of the working directory
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(ready), step, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), proc.communicate()[1]
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert err.strip().splitlines() == [f"cellstrata: stopped by {name} during start-up; nothing was written"], err
    assert not out.exists()


# ------------------------------------------------------------------------------------ repeated names


def with_repeats(adata):
    """``adata`` with cell 0's name given to cells 5 and 6, cell 1's to cell 9, and gene 3's to gene 10."""
    a = adata.copy()
    cells = a.obs_names.tolist()
    cells[5] = cells[6] = cells[0]
    cells[9] = cells[1]
    genes = a.var_names.tolist()
    genes[10] = genes[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # AnnData's own note on non-unique names
        a.obs_names, a.var_names = cells, genes
    return a


def test_repeated_names_are_warned_and_recorded(capsys, tmp_path, adata, ckpt):
    a = with_repeats(adata)
    path = tmp_path / "repeats.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a.write_h5ad(path)
    out = tmp_path / "s.zarr"
    assert main(extract_argv(path, ckpt, out, "--chunk-cells", "16")) == 0
    err = capsys.readouterr().err.splitlines()
    c0, c1, g3 = a.obs_names[0], a.obs_names[1], a.var_names[3]
    cells = [ln for ln in err if "obs_names" in ln]
    genes = [ln for ln in err if "var_names" in ln]
    assert cells == [
        f"cellstrata: 2 names occur more than once in obs_names (3 extra cells): {c0} (3 times), {c1} (2 times); "
        "every cell is extracted in input order and the store's obs_names repeat them: make them unique "
        "(AnnData.obs_names_make_unique) to tell those cells apart by name"
    ], err
    assert genes == [
        f"cellstrata: 1 name occurs more than once in var_names (1 extra column): {g3} (2 times); each column is "
        "its own token with that gene's id, as scGPT's official tokenizer does (identifiers outside the "
        "vocabulary are not read)"
    ], err
    store = cs.open_store(out)
    assert store.attrs["source"]["duplicate_obs_names"] == 3 and store.attrs["source"]["duplicate_var_names"] == 1
    assert store.obs_names().tolist() == a.obs_names.tolist()  # every cell kept, in input order
    # the counts are not part of the configuration: the same command resumes (nothing left to do)
    assert main(extract_argv(path, ckpt, out, "--chunk-cells", "16")) == 0
    assert "resuming" in capsys.readouterr().err


def test_unique_names_record_zero_and_say_nothing(capsys, tmp_path, h5ad, ckpt):
    out = tmp_path / "s.zarr"
    assert main(extract_argv(h5ad, ckpt, out)) == 0
    assert "more than once" not in capsys.readouterr().err
    source = cs.open_store(out).attrs["source"]
    assert source["duplicate_obs_names"] == 0 and source["duplicate_var_names"] == 0


def test_repeated_gene_note_per_family(adata):
    src = open_source(with_repeats(adata))
    cells, genes = src.duplicates()
    assert (cells.extra, cells.repeated, genes.extra) == (3, 2, 1)
    assert "each column is its own token" in duplicate_notes(src, "tahoe-x1")[1]
    assert "only the first column of each is read" in duplicate_notes(src, "scfoundation")[1]
    # Geneformer's tokenizer warns itself (DuplicateGenesWarning, with its own rule): no second gene note
    notes = duplicate_notes(src, "geneformer")
    assert len(notes) == 1 and "obs_names" in notes[0]
    gc = open_source(with_repeats(adata), gene_column="gene_symbol")
    assert gc.duplicates()[1].where == "var column 'gene_symbol'"


def test_repeated_name_counts_are_not_hashed():
    common = {
        "model": {"family": "scgpt", "n_layers": 1, "hidden": 2},
        "tokenizer": {},
        "pool_ops": {"mean": "mean"},
        "layout": [1, 0],
        "dtype": "float16",
        "precision": "float32",
        "chunk_cells": 4,
        "n_cells": 8,
        "empty_cells": "nan",
        "official_layer": None,
        "pool_backend": "torch",
        "gene_overlap": {},
        "engine_version": "x",
    }
    plain = store_attributes(source={"path": "a", "obs_names_sha256": "h"}, **common)
    counted = store_attributes(
        source={"path": "b", "obs_names_sha256": "h", "duplicate_obs_names": 3, "duplicate_var_names": 1}, **common
    )
    assert plain["config_hash"] == counted["config_hash"] and counted["source"]["duplicate_obs_names"] == 3
