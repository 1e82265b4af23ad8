"""Bad input to ``extract``: numeric options out of range, duplicated names, a signal during start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.datasets import synthetic_dataset
from cellstrata.engine.errors import ConfigError
from cellstrata.engine.models import get_family

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
    store = cs.extract(h5ad, model="scgpt", checkpoint=ckpt, out=tmp_path / "s.zarr", progress=False, chunk_cells=7)
    assert store.chunk_cells == 7 and store.done.size == -(-N_CELLS // 7)
    assert main(extract_argv(h5ad, ckpt, tmp_path / "t.zarr", "--input-workers", "0", "--seed", "0")) == 0
