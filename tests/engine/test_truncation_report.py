"""Truncation is visible: how many cells exceeded the context, to how many tokens, by which rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.input.sources import open_source
from cellstrata.engine.models import get_family
from cellstrata.engine.models.base import NO_TRUNCATION, RANDOM_SUBSAMPLE, TOP_RANKED
from cellstrata.engine.storage.store import ATTR_KEY, describe_truncation, open_store, update_attrs
from cellstrata.engine.telemetry import Telemetry

N_CELLS = 120
CHUNK = 40


@pytest.fixture(scope="module")
def adata():
    # genes_per_cell=150 against the tiny presets' 256-token context: some cells are longer, most are not
    return synthetic_dataset(N_CELLS, 2000, seed=11, genes_per_cell=150)


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory, adata) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def scgpt_ckpt(tmp_path_factory) -> Path:
    return get_family("scgpt").init_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "scgpt", seed=1)


def expressed_vocab_genes(adata, mapping) -> np.ndarray:
    """Per cell, the number of vocabulary genes with a non-zero value (computed from the matrix alone)."""
    X = sp.csr_matrix(adata.X)[:, np.flatnonzero(mapping.token_ids >= 0)]
    return np.diff((X > 0).tocsr().indptr)


def test_tiny_scgpt_context_is_256_tokens(scgpt_ckpt):
    loaded = get_family("scgpt").load(scgpt_ckpt)
    assert loaded.tokenizer.max_length == 256
    assert loaded.tokenizer.truncation_rule == RANDOM_SUBSAMPLE


def test_extract_and_info_report_truncated_cells(h5ad, adata, scgpt_ckpt, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    tok = get_family("scgpt").load(scgpt_ckpt).tokenizer
    n_genes = expressed_vocab_genes(adata, tok.map_genes(list(adata.var_names)))
    long = n_genes > 255  # <cls> + 255 genes fill the 256-token context
    assert 0 < long.sum() < N_CELLS
    want = f"{int(long.sum())} of {N_CELLS} cells truncated to 256 tokens (random subsample, seeded per cell)"
    detail = f"; expressed genes of those cells: median {np.median(n_genes[long]):g}, max {n_genes[long].max()}"

    args = ["extract", str(h5ad), "--model", "scgpt", "--checkpoint", str(scgpt_ckpt), "--out", str(out)]
    rc = main([*args, "--chunk-cells", str(CHUNK), "--device", "cpu", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr()
    assert f"truncation  {want}{detail}\n" in printed.out
    assert f"this run: {want}{detail}" in printed.err

    store = open_store(out)
    np.testing.assert_array_equal(np.asarray(store.group["truncated"][:]), long)
    t = store.attrs["telemetry"]
    assert t["truncated_cells"] == long.sum()
    assert t["truncated_to_tokens"] == 256 and t["truncation_rule"] == RANDOM_SUBSAMPLE
    assert t["truncated_genes_median"] == np.median(n_genes[long])
    assert t["truncated_genes_max"] == n_genes[long].max()
    assert store.attrs["truncation"] == {"max_length": 256, "rule": RANDOM_SUBSAMPLE}

    assert main(["info", str(out)]) == 0
    assert f"truncation  {want}{detail}\n" in capsys.readouterr().out


def test_info_on_a_store_without_the_truncation_fields(h5ad, adata, scgpt_ckpt, tmp_path, capsys):
    """Stores written before the report existed: the count comes from the committed chunks of ``truncated``."""
    store = cs.extract(
        h5ad, model="scgpt", checkpoint=scgpt_ckpt, out=tmp_path / "old.zarr", chunk_cells=CHUNK, progress=False
    )
    flags = np.asarray(store.group["truncated"][:])
    group = store.location.open_group("r+")
    attrs = dict(group.attrs[ATTR_KEY])
    attrs.pop("truncation")
    for key in ("truncated_to_tokens", "truncation_rule", "truncated_genes_median", "truncated_genes_max"):
        attrs["telemetry"].pop(key)
    group.attrs[ATTR_KEY] = attrs
    assert main(["info", str(tmp_path / "old.zarr")]) == 0
    want = f"{int(flags.sum())} of {N_CELLS} cells truncated to 256 tokens (rule not recorded in this store)\n"
    assert f"truncation  {want}" in capsys.readouterr().out

    # an uncommitted chunk's cells are not counted, whatever its flags hold
    group["done"][1] = 0
    update_attrs(group, complete=False)
    report = open_store(tmp_path / "old.zarr").truncation()
    assert report["cells"] == N_CELLS - CHUNK
    assert report["truncated"] == flags[:CHUNK].sum() + flags[2 * CHUNK :].sum()
    assert report["max_length"] == 256 and report["rule"] is None


@pytest.mark.parametrize(
    ("family", "gene_column", "options", "rule", "n_special"),
    [
        ("scgpt", None, {"max_length": 100}, RANDOM_SUBSAMPLE, 1),
        ("tahoe-x1", "ensembl_id", {"max_length": 100}, RANDOM_SUBSAMPLE, 1),
        ("geneformer", "ensembl_id", {"max_length": 100}, TOP_RANKED, 2),
        ("scfoundation", None, {"max_length": 100}, RANDOM_SUBSAMPLE, 2),
        ("scfoundation", None, {}, NO_TRUNCATION, 2),
    ],
)
def test_each_tokenizer_states_its_rule_and_counts_genes_before_truncation(
    adata, tmp_path, family, gene_column, options, rule, n_special
):
    ckpt = get_family(family).init_checkpoint("tiny", tmp_path / family, seed=0)
    tok = get_family(family).load(ckpt, **options).tokenizer
    assert tok.truncation_rule == rule
    with open_source(adata, gene_column=gene_column) as src:
        mapping = tok.map_genes(list(src.gene_names))
        tokens = tok.tokenize(src.read(0, N_CELLS), mapping)
    n_genes = expressed_vocab_genes(adata, mapping)
    np.testing.assert_array_equal(tokens.n_expressed, n_genes)
    if rule == NO_TRUNCATION:
        assert tok.max_length is None and not tokens.truncated.any()
    else:
        np.testing.assert_array_equal(tokens.truncated, n_genes > 100 - n_special)
        assert tokens.truncated.any() and (tokens.lengths[tokens.truncated] == 100).all()


def test_describe_truncation_lines():
    assert describe_truncation(0, 10, None, NO_TRUNCATION) == (
        "0 of 10 cells truncated (no context limit: every expressed gene is a token)"
    )
    assert describe_truncation(3, 10, 2048, TOP_RANKED, genes_median=2100.5, genes_max=2500) == (
        "3 of 10 cells truncated to 2048 tokens (top-ranked genes kept); "
        "expressed genes of those cells: median 2100.5, max 2500"
    )


def test_cluster_counters_merge_into_the_exact_median():
    """Workers send their truncated cells' gene counts as a histogram; the driver's median is the exact one."""
    rng = np.random.default_rng(0)
    parts = [rng.integers(257, 900, size=n) for n in (7, 12, 1)]
    driver = Telemetry()
    for part in parts:
        worker = Telemetry(truncated_cells=len(part))
        genes, cells = np.unique(part, return_counts=True)
        worker.count_truncated(dict(zip(genes.tolist(), cells.tolist())))
        driver.add(worker.counters())
    everything = np.concatenate(parts)
    d = driver.as_dict()
    assert d["truncated_cells"] == len(everything)
    assert d["truncated_genes_median"] == np.median(everything)
    assert d["truncated_genes_max"] == everything.max()
    assert "truncated_genes_median" not in Telemetry().as_dict()
