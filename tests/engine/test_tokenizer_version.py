"""A store written by an older tokenizer version is not resumed, and the refusal says so in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.errors import StoreConfigMismatchError
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.models import get_family, scgpt, tahoe_x1
from cellstrata.engine.models.counter_rng import RNG_NAME


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    synthetic_dataset(9, 2000, seed=4, genes_per_cell=60).write_h5ad(path)
    return path


def _older(monkeypatch, tokenizer: type, version: str, rng: str) -> None:
    """Make ``tokenizer`` describe itself as the older version (its settings as that version recorded them)."""
    current = tokenizer.settings
    monkeypatch.setattr(tokenizer, "settings", lambda self: {**current(self), "version": version, "rng": rng})


@pytest.mark.parametrize(
    ("family", "tokenizer", "old", "new", "gene_column"),
    [
        ("scgpt", scgpt.ScGPTTokenizer, "scgpt-binning-1", "scgpt-binning-2", None),
        ("tahoe-x1", tahoe_x1.TahoeX1Tokenizer, "tahoe-x1-binning-2", "tahoe-x1-binning-3", "ensembl_id"),
    ],
)
def test_resuming_a_store_of_the_old_draws_says_the_tokenizer_changed(
    family, tokenizer, old, new, gene_column, h5ad, tmp_path, monkeypatch, capsys
):
    assert tokenizer(_vocab()).settings()["version"] == new and tokenizer(_vocab()).settings()["rng"] == RNG_NAME
    ckpt = get_family(family).init_checkpoint("tiny", tmp_path / "ckpt", seed=1)
    out = tmp_path / "s.zarr"
    argv = ["extract", str(h5ad), "--model", family, "--checkpoint", str(ckpt), "--out", str(out), "--quiet"]
    argv += ["--gene-column", gene_column] if gene_column else []
    with monkeypatch.context() as m:
        _older(m, tokenizer, old, "numpy default_rng((seed, cell_index))")
        assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"tokenizer {old} -> {new}: the per-cell random draws changed" in err
    assert "--overwrite" in err and "--out" in err
    with pytest.raises(StoreConfigMismatchError, match=f"{old} -> {new}"):
        cs.extract(h5ad, model=family, checkpoint=ckpt, out=out, progress=False, gene_column=gene_column)
    assert main([*argv, "--overwrite"]) == 0  # what the message says to do works
    assert cs.open_store(out).attrs["tokenizer"]["version"] == new


def test_same_draws_other_rules_and_other_settings_are_named_too(h5ad, tmp_path, monkeypatch):
    ckpt = get_family("scgpt").init_checkpoint("tiny", tmp_path / "ckpt", seed=1)
    out = tmp_path / "s.zarr"
    with monkeypatch.context() as m:
        _older(m, scgpt.ScGPTTokenizer, "scgpt-binning-0", RNG_NAME)
        cs.extract(h5ad, model="scgpt", checkpoint=ckpt, out=out, progress=False)
    with pytest.raises(StoreConfigMismatchError, match="tokenizer scgpt-binning-0 -> scgpt-binning-2: its rules"):
        cs.extract(h5ad, model="scgpt", checkpoint=ckpt, out=out, progress=False)
    cs.extract(h5ad, model="scgpt", checkpoint=ckpt, out=out, progress=False, overwrite=True)
    # the same tokenizer version with another setting: the general message, not a tokenizer change
    with pytest.raises(StoreConfigMismatchError, match="another configuration") as err:
        cs.extract(h5ad, model="scgpt", checkpoint=ckpt, out=out, progress=False, seed=5)
    assert "tokenizer" not in str(err.value)


def _vocab() -> dict[str, int]:
    return {"G1": 0, "<pad>": 1, "<cls>": 2, "<eoc>": 3}
