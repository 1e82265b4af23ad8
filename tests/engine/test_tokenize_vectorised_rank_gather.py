"""scFoundation's and Geneformer's block tokenizers against their per-cell references.

``tokenize`` works on a whole CSR block; ``tokenize_reference`` restates the official per-cell rule one cell
at a time (with the same counter draws). Both must give the same tokens on fresh random blocks of odd
sizes with empty cells, cells over the context, ties, stored zeros and duplicate columns, and a cell's
tokens must not depend on the block it is read in or the order of the cells.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from cellstrata.engine.input.datasets import gene_ensembl_ids, gene_symbols
from cellstrata.engine.input.sources import CellBlock
from cellstrata.engine.models import base, scfoundation
from cellstrata.engine.models.base import TokenizedBlock
from cellstrata.engine.models.counter_rng import RNG_NAME, random_bits
from cellstrata.engine.models.geneformer import DuplicateGenesWarning, GeneDictionaries, GeneformerTokenizer
from cellstrata.engine.models.scfoundation import TOKENIZER_VERSION, ScFoundationTokenizer


def _block(n_cells: int, n_cols: int, seed: int, *, zeros: float = 0.0, log1p: bool = False) -> sp.csr_matrix:
    """Random counts: varied depth and density, an empty cell, a cell of one gene, optional stored zeros."""
    rng = np.random.default_rng(seed)
    indptr, indices, data = [0], [], []
    for i in range(n_cells):
        k = 0 if i % 7 == 3 else 1 if i % 7 == 5 else int(rng.integers(2, n_cols + 1) * rng.choice([0.05, 0.3, 1.0]))
        cols = np.sort(rng.choice(n_cols, max(k, 0), replace=False))
        vals = (rng.negative_binomial(rng.choice([1, 3]), rng.choice([0.2, 0.6]), len(cols)) + 1).astype(np.float64)
        if zeros:
            vals[rng.random(len(cols)) < zeros] = 0.0
        if log1p:
            vals = np.log1p(vals * 1.7)
        indices.append(cols)
        data.append(vals.astype(np.float32))
        indptr.append(indptr[-1] + len(cols))
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr), shape=(n_cells, n_cols))


def _assert_same(a: TokenizedBlock, b: TokenizedBlock) -> None:
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.truncated, b.truncated)
    np.testing.assert_array_equal(a.empty, b.empty)
    np.testing.assert_array_equal(a.n_expressed, b.n_expressed)
    for i in range(len(a)):
        assert a.genes[i].dtype == b.genes[i].dtype == np.int64
        assert a.values[i].dtype == b.values[i].dtype == np.float32
        np.testing.assert_array_equal(a.genes[i], b.genes[i], err_msg=f"cell {i}")
        np.testing.assert_array_equal(a.values[i], b.values[i], err_msg=f"cell {i}")


def _cells_of(out: TokenizedBlock) -> dict[int, tuple[list[int], list[float], bool]]:
    return {
        int(c): (g.tolist(), v.tolist(), bool(t))
        for c, g, v, t in zip(out.indices, out.genes, out.values, out.truncated)
    }


def _splits_and_permutation(tok, X: sp.csr_matrix, indices: np.ndarray, mapping, seed: int) -> None:
    """Every cell's tokens are the same read whole, in uneven blocks, and in shuffled order."""
    whole = _cells_of(tok.tokenize(CellBlock(indices, X), mapping))
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, X.shape[0]), 3, replace=False))
    parts: dict[int, tuple[list[int], list[float], bool]] = {}
    for rows in np.split(np.arange(X.shape[0]), cuts):
        parts |= _cells_of(tok.tokenize(CellBlock(indices[rows], X[rows]), mapping))
    assert parts == whole
    perm = rng.permutation(X.shape[0])
    assert _cells_of(tok.tokenize(CellBlock(indices[perm], X[perm]), mapping)) == whole


# ------------------------------------------------------------------------------------------------
# scFoundation


def _scf_names(n_genes: int, seed: int, *, shuffled: bool) -> list[str]:
    """Gene-list symbols (shuffled or in list order), a repeated symbol (read once) and unknown symbols."""
    genes = gene_symbols(n_genes)
    rng = np.random.default_rng(seed)
    names = [genes[i] for i in (rng.permutation(n_genes) if shuffled else range(n_genes))][: n_genes - 7]
    return [*names, names[4], "NOT_A_GENE", "ALSO_NOT"]


@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize(("pre_normalized", "tgthighres"), [("F", "t4"), ("F", "f1.5"), ("T", "a2")])
@pytest.mark.parametrize("max_length", [None, 23, 150])
def test_scfoundation_block_equals_per_cell_reference(shuffled, pre_normalized, tgthighres, max_length):
    names = _scf_names(211, seed=1, shuffled=shuffled)
    tok = ScFoundationTokenizer(gene_symbols(211), pre_normalized=pre_normalized, tgthighres=tgthighres,
                                max_length=max_length, seed=5)  # fmt: skip
    mapping = tok.map_genes(names)
    X = _block(67, len(names), seed=2, zeros=0.2, log1p=pre_normalized == "T")
    indices = np.arange(1000, 1067) * 3
    block = CellBlock(indices, X)
    out = tok.tokenize(block, mapping)
    _assert_same(out, tok.tokenize_reference(block, mapping))
    assert out.empty.any() and not out.empty.all()
    full = ~out.empty
    assert all(g[-2:].tolist() == [tok.t_position, tok.s_position] for g in np.array(out.genes, dtype=object)[full])
    assert all((np.diff(g[:-2]) > 0).all() for g in out.genes if len(g))  # gene-list order
    if max_length is not None:
        assert out.truncated.any() and (out.lengths[out.truncated] == max_length).all()
        assert (out.n_expressed[out.truncated] > max_length - 2).all()


def test_scfoundation_tokens_do_not_depend_on_the_block_or_cell_order():
    names = _scf_names(300, seed=3, shuffled=True)
    tok = ScFoundationTokenizer(gene_symbols(300), max_length=41, seed=2)
    mapping = tok.map_genes(names)
    X = _block(53, len(names), seed=4, zeros=0.1)
    out = tok.tokenize(CellBlock(np.arange(53) + 17, X), mapping)
    assert out.truncated.sum() > 10
    _splits_and_permutation(tok, X, np.arange(53) + 17, mapping, seed=5)


def test_scfoundation_subset_is_uniform_and_follows_seed_and_cell():
    """Over many identical cells, every expressed gene is kept with probability n_keep / n; the subset
    changes with the seed and the cell index, and records the counter-based draws in the settings."""
    n_genes, n_cells, max_length = 30, 3000, 12
    tok = ScFoundationTokenizer(gene_symbols(n_genes), max_length=max_length, seed=9)
    mapping = tok.map_genes(gene_symbols(n_genes))
    X = sp.csr_matrix(np.ones((n_cells, n_genes), dtype=np.float32))
    out = tok.tokenize(CellBlock(np.arange(n_cells), X), mapping)
    kept = np.bincount(np.concatenate([g[:-2] for g in out.genes]), minlength=n_genes) / n_cells
    assert np.allclose(kept, (max_length - 2) / n_genes, atol=0.04)
    assert len({tuple(g.tolist()) for g in out.genes[:50]}) == 50
    for cell in (0, 1234, n_cells - 1):  # the genes with the smallest draws of (seed, stream 0, cell, position)
        keys = random_bits(9, 0, np.full(n_genes, cell), np.arange(n_genes))
        np.testing.assert_array_equal(out.genes[cell][:-2], np.sort(np.argsort(keys)[: max_length - 2]))
    other = ScFoundationTokenizer(gene_symbols(n_genes), max_length=max_length, seed=10)
    assert not np.array_equal(other.tokenize(CellBlock(np.arange(1), X[:1]), mapping).genes[0], out.genes[0])
    s = tok.settings()
    assert (s["version"], s["rng"]) == (TOKENIZER_VERSION, RNG_NAME) == ("scfoundation-gather-2", RNG_NAME)


# ------------------------------------------------------------------------------------------------
# Geneformer


def _gf_dictionaries(n_genes: int, seed: int, *, special: bool, tied_medians: bool) -> GeneDictionaries:
    rng = np.random.default_rng(seed)
    specials = ["<pad>", "<mask>", "<cls>", "<eos>"] if special else ["<pad>", "<mask>"]
    genes = gene_ensembl_ids(n_genes)
    token = {t: i for i, t in enumerate(specials)} | {g: len(specials) + i for i, g in enumerate(genes)}
    pool = np.exp(rng.normal(0.3, 0.8, 6 if tied_medians else n_genes))
    return GeneDictionaries(token, {g: float(m) for g, m in zip(genes, rng.choice(pool, n_genes))})


@pytest.mark.parametrize(("special", "max_length"), [(True, 4096), (True, 19), (False, 2048), (False, 8)])
@pytest.mark.parametrize("tied_medians", [True, False])
@pytest.mark.parametrize("stored_zeros", ["keep", "drop"])
def test_geneformer_block_equals_per_cell_reference(special, max_length, tied_medians, stored_zeros):
    d = _gf_dictionaries(157, seed=1, special=special, tied_medians=tied_medians)
    tok = GeneformerTokenizer(d, max_length=max_length, stored_zeros=stored_zeros)
    names = gene_ensembl_ids(157)
    names = [names[i] for i in np.random.default_rng(2).permutation(157)] + ["ENSG7000000000X"]
    mapping = tok.map_genes(names)
    X = _block(61, len(names), seed=3, zeros=0.15).tolil()
    X[9, :40] = 0.0  # a cell storing only zeros (n_counts 0): empty
    X = sp.csr_matrix(X)
    block = CellBlock(np.arange(61) * 5 + 2, X)
    out = tok.tokenize(block, mapping)
    _assert_same(out, tok.tokenize_reference(block, mapping))
    assert out.empty[9] and out.empty[3] and not out.empty.all()
    if max_length < 100:
        assert out.truncated.any() and (out.lengths[out.truncated] == max_length).all()


@pytest.mark.parametrize("duplicate_genes", ["official", "sum"])
@pytest.mark.parametrize("merge", [False, True])
def test_geneformer_duplicate_columns_block_equals_reference(duplicate_genes, merge):
    """An id given twice (two tokens, or summed), ids merged by the Ensembl mapping (always summed)."""
    d = _gf_dictionaries(120, seed=4, special=True, tied_medians=True)
    genes = gene_ensembl_ids(120)
    if merge:
        d.ensembl_mapping = {g: g for g in genes} | {f"ENSG8{i:010d}": genes[20 + i] for i in range(4)}
    tok = GeneformerTokenizer(d, max_length=40, duplicate_genes=duplicate_genes)
    extra = [f"ENSG8{i:010d}" for i in range(4)] if merge else []
    names = [*genes, genes[7], genes[7], genes[50].lower(), *extra]
    names = [names[i] for i in np.random.default_rng(5).permutation(len(names))]
    with pytest.warns(DuplicateGenesWarning):
        mapping = tok.map_genes(names)
    dense = _block(45, len(names), seed=6, zeros=0.1).toarray()
    dense[0, [j for j, g in enumerate(names) if g.upper() == genes[7]]] = 3.0  # every column of one gene
    X = sp.csr_matrix(dense)
    block = CellBlock(np.arange(45), X)
    out = tok.tokenize(block, mapping)
    _assert_same(out, tok.tokenize_reference(block, mapping))
    seven = d.token[genes[7]]
    assert int((out.genes[0] == seven).sum()) == (1 if (merge or duplicate_genes == "sum") else 3)


def test_geneformer_ties_follow_argsort_not_a_stable_order_and_block_order_does_not_matter():
    """Cells of few distinct values: both paths give np.argsort(-x)'s order of ties, which is not a
    stable sort's (so the comparison checks the tie order), in any block split and cell order."""
    d = _gf_dictionaries(200, seed=7, special=True, tied_medians=True)
    for g in d.median:
        d.median[g] = 2.0
    tok = GeneformerTokenizer(d, max_length=4096)
    names = gene_ensembl_ids(200)
    mapping = tok.map_genes(names)
    rng = np.random.default_rng(8)
    X = sp.csr_matrix(np.where(rng.random((37, 200)) < 0.4, rng.integers(1, 4, (37, 200)), 0).astype(np.float32))
    out = tok.tokenize(CellBlock(np.arange(37), X), mapping)
    _assert_same(out, tok.tokenize_reference(CellBlock(np.arange(37), X), mapping))
    stable_differs = 0
    for i in range(37):
        row = X[i]
        x = row.data.astype(np.float64) / row.data.sum() * 10_000 / 2.0
        np.testing.assert_array_equal(
            out.genes[i][1:-1], np.array([d.token[names[j]] for j in row.indices])[np.argsort(-x)]
        )
        stable = np.array([d.token[names[j]] for j in row.indices])[np.argsort(-x, kind="stable")]
        stable_differs += not np.array_equal(out.genes[i][1:-1], stable)
    assert stable_differs > 0
    _splits_and_permutation(tok, X, np.arange(37) * 2, mapping, seed=9)


# ------------------------------------------------------------------------------------------------
# pieces of a block


def test_row_pieces_cover_the_block_in_order():
    X = _block(50, 90, seed=11)
    X.sum_duplicates()
    indices = np.arange(50) * 3 + 1
    pieces = list(base.row_pieces(X, indices, 101))
    assert len(pieces) > 5
    assert all(p.nnz <= 101 + 90 for p, _ in pieces)  # one row more at most
    assert all(p.has_canonical_format for p, _ in pieces)
    np.testing.assert_array_equal(np.concatenate([i for _, i in pieces]), indices)
    assert (sp.vstack([p for p, _ in pieces]) != X).nnz == 0
    assert [len(i) for _, i in base.row_pieces(X[:0], indices[:0], 101)] == [0]


def test_tokenize_in_small_pieces_equals_the_reference(monkeypatch):
    """Blocks cut into pieces of a few entries (a piece boundary inside every few cells) give the same tokens."""
    monkeypatch.setattr(base, "PIECE_ENTRIES", 97)
    names = _scf_names(211, seed=12, shuffled=True)
    scf = ScFoundationTokenizer(gene_symbols(211), max_length=30, seed=3)
    X = _block(71, len(names), seed=13, zeros=0.1)
    block, mapping = CellBlock(np.arange(71) + 5, X), scf.map_genes(names)
    assert len(list(base.row_pieces(X, block.indices))) > 10
    _assert_same(scf.tokenize(block, mapping), scf.tokenize_reference(block, mapping))
    gf = GeneformerTokenizer(_gf_dictionaries(157, seed=14, special=True, tied_medians=True), max_length=25)
    mapping = gf.map_genes(gene_ensembl_ids(157))
    block = CellBlock(np.arange(71), _block(71, 157, seed=15, zeros=0.1))
    _assert_same(gf.tokenize(block, mapping), gf.tokenize_reference(block, mapping))


@pytest.mark.parametrize("n_genes", [19_264, 3_000_000_019])  # packed uint64 sort, and the argsort beyond 32 bits
def test_scfoundation_sort_by_gene_orders_each_cell(n_genes):
    rng = np.random.default_rng(16)
    counts = rng.integers(0, 40, 1500)
    rows = np.repeat(np.arange(1500), counts)
    genes = np.concatenate([rng.choice(min(n_genes, 10**6), k, replace=False) for k in counts]) * (
        n_genes // 10**6 or 1
    )
    values = rng.random(len(rows)).astype(np.float32)
    r, g, v = scfoundation._sort_by_gene(rows, genes, values, n_genes)
    order = np.lexsort((genes, rows))
    np.testing.assert_array_equal(r, rows[order])
    np.testing.assert_array_equal(g, genes[order])
    np.testing.assert_array_equal(v, values[order])
    assert v.dtype == np.float32
