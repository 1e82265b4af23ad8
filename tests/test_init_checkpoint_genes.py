"""init-checkpoint --genes-from: repeated gene identifiers are named, or kept once with --dedupe first."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cellstrata.cli import main
from cellstrata.engine.models import get_family

FAMILIES = ("scgpt", "tahoe-x1", "geneformer", "scfoundation")


def gene_file(path, names, *, column=None):
    """A 3-cell AnnData whose var_names (or var[column], var_names then unique) are ``names``."""
    var = pd.DataFrame(index=[f"id{i}" for i in range(len(names))])
    if column:
        var[column] = names
    adata = ad.AnnData(X=np.ones((3, len(names)), dtype=np.float32), var=var)
    if not column:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata warns about non-unique var_names
            adata.var_names = names
    adata.write_h5ad(path)
    return path


# 7 identifiers repeated, in order of first occurrence: GENE2, GENE4, ..., GENE14; 9 extra columns
NAMES = [f"GENE{i}" for i in range(40)]
REPEATS = {42: "GENE2", 43: "GENE4", 44: "GENE6", 45: "GENE8", 46: "GENE10", 47: "GENE12", 48: "GENE14"}
REPEATS.update({49: "GENE2", 50: "GENE2"})
for pos, name in sorted(REPEATS.items()):
    NAMES.insert(pos, name)


def test_repeated_identifiers_are_named_counted_and_the_option_offered(tmp_path, capsys):
    src = gene_file(tmp_path / "g.h5ad", NAMES)
    out = tmp_path / "ckpt"
    rc = main(["init-checkpoint", "--model", "scgpt", "--out", str(out), "--genes-from", str(src)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.startswith("cellstrata: error: ") and err.count("\n") == 1
    assert "lists 7 gene identifiers more than once (9 extra columns)" in err
    assert "GENE2 (4 times), GENE4 (2 times), GENE6 (2 times), GENE8 (2 times), GENE10 (2 times) and 2 more" in err
    assert "GENE12" not in err and "GENE14" not in err
    assert "--dedupe first" in err


def test_the_gene_column_is_named(tmp_path, capsys):
    src = gene_file(tmp_path / "g.h5ad", ["A", "B", "A"], column="symbol")
    args = ["init-checkpoint", "--model", "scfoundation", "--out", str(tmp_path / "c")]
    assert main([*args, "--genes-from", str(src), "--gene-column", "symbol"]) == 2
    err = capsys.readouterr().err
    assert "(var column 'symbol') lists 1 gene identifier more than once (1 extra column): A (2 times)" in err


@pytest.mark.parametrize("family", FAMILIES)
def test_dedupe_first_keeps_each_gene_once_in_first_occurrence_order(tmp_path, family):
    src = gene_file(tmp_path / "g.h5ad", NAMES)
    out = tmp_path / "ckpt"
    args = ["init-checkpoint", "--model", family, "--out", str(out), "--genes-from", str(src)]
    assert main([*args, "--dedupe", "first"]) == 0
    first = [f"GENE{i}" for i in range(40)]  # keeping the last occurrences would move GENE2, GENE4, ... to the end
    mapping = get_family(family).load(out).tokenizer.map_genes(first)
    assert mapping.n_vocab_genes == 40  # each gene once
    assert (mapping.token_ids >= 0).all() and (np.diff(mapping.token_ids) > 0).all()  # in first-occurrence order
