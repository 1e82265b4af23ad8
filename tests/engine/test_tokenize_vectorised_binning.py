"""scGPT and Tahoe-X1: the block-vectorised tokenizers against their per-cell references (same counter draws)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import cellstrata.engine.models.counter_rng as counter_rng
from cellstrata.engine.input.datasets import gene_ensembl_ids, gene_symbols
from cellstrata.engine.input.sources import CellBlock
from cellstrata.engine.models.base import TokenizedBlock
from cellstrata.engine.models.scgpt import ScGPTTokenizer
from cellstrata.engine.models.tahoe_x1 import TahoeX1Tokenizer

N_VOCAB = 700
PINNED_BITS = [601575, 642046, 325373]  # random_bits as committed with counter_rng (last six digits)
PINNED_ORDER = [5, 1, 3, 2, 4, 0, 9, 8, 7, 6]


def _vocab(names: list[str]) -> dict[str, int]:
    vocab = {g: i for i, g in enumerate(names)}
    for t in ("<pad>", "<cls>", "<eoc>"):
        vocab[t] = len(vocab)
    return vocab


def _messy_block(seed: int, n_cells: int, n_cols: int, max_len: int) -> CellBlock:
    """Cells of every kind: empty, one gene, longer than the context, tie-heavy, float, stored zeros,
    duplicate and unsorted columns (not canonical CSR), at scattered global indices."""
    rng = np.random.default_rng(seed)
    data, indices, indptr = [], [], [0]
    for i in range(n_cells):
        kind = i % 7
        n = [0, 1, int(rng.integers(2, 30)), int(rng.integers(max_len, 3 * max_len))][kind % 4]
        n = min(n, n_cols) if kind != 5 else int(rng.integers(2, 3 * max_len))
        cols = rng.choice(n_cols, n, replace=kind == 5)  # kind 5: duplicate columns, summed
        if kind in (1, 3):
            vals = rng.integers(1, 4, n).astype(np.float64)  # ties
        elif kind == 4:
            vals = rng.lognormal(0, 2, n)  # floats
        else:
            vals = np.floor(rng.lognormal(1, 1.5, n)) + 1
        vals[rng.random(n) < (1.0 if kind == 6 and i % 2 else 0.2)] = 0  # stored zeros, one cell only zeros
        if kind != 5:
            cols = np.sort(cols) if rng.random() < 0.5 else cols  # unsorted columns too
        data.append(vals)
        indices.append(cols)
        indptr.append(indptr[-1] + n)
    X = sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices).astype(np.int32), np.array(indptr)), shape=(n_cells, n_cols)
    )
    cell_index = np.sort(rng.choice(10**7, n_cells, replace=False))
    return CellBlock(cell_index, X)


def _assert_same(got: TokenizedBlock, ref: TokenizedBlock) -> None:
    assert len(got) == len(ref)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.truncated, ref.truncated)
    np.testing.assert_array_equal(got.empty, ref.empty)
    np.testing.assert_array_equal(got.n_expressed, ref.n_expressed)
    for i in range(len(ref)):
        np.testing.assert_array_equal(got.genes[i], ref.genes[i], err_msg=f"cell {i}")
        np.testing.assert_array_equal(got.values[i], ref.values[i], err_msg=f"cell {i}")
        assert got.genes[i].dtype == np.int64 and got.values[i].dtype == np.float32


def _scgpt(seed: int, max_length: int) -> tuple[ScGPTTokenizer, list[str]]:
    names = gene_symbols(N_VOCAB)
    return ScGPTTokenizer(_vocab(names), max_length=max_length, seed=seed), names


def _tahoe(seed: int, max_length: int, keep: int = 1, stored_zeros: str = "keep") -> tuple[TahoeX1Tokenizer, list]:
    names = gene_ensembl_ids(N_VOCAB)
    tok = TahoeX1Tokenizer(
        _vocab(names), max_length=max_length, seed=seed, keep_first_n_tokens=keep, stored_zeros=stored_zeros
    )
    return tok, names


def _columns(names: list[str], n_cols: int, seed: int) -> list[str]:
    """Input columns: vocabulary genes in shuffled order and genes the vocabulary lacks."""
    rng = np.random.default_rng(seed)
    cols = [names[j] for j in rng.permutation(len(names))] + [f"ENSG9{j:010d}" for j in range(n_cols - len(names))]
    return [cols[j] for j in rng.permutation(n_cols)]


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
@pytest.mark.parametrize("n_cells", [1, 23, 61])
def test_scgpt_vectorised_equals_reference(seed, n_cells):
    tok, names = _scgpt(seed, max_length=37)
    block = _messy_block(seed + n_cells, n_cells, 811, max_len=37)
    mapping = tok.map_genes(_columns(names, 811, seed))
    got, ref = tok.tokenize(block, mapping), tok.tokenize_reference(block, mapping)
    _assert_same(got, ref)
    if n_cells > 20:  # the block holds every case the test means to cover
        assert got.truncated.any() and got.empty.any() and (~got.truncated & ~got.empty).any()
        assert any(len(np.unique(v[1:])) < len(v) - 1 for v in got.values)  # ties


@pytest.mark.parametrize("family", ["scgpt", "tahoe-x1"])
@pytest.mark.parametrize("piece_entries", [1, 97, 1000])
def test_pieces_of_rows_give_the_same_tokens(family, piece_entries, monkeypatch):
    """tokenize works through a block in pieces of rows (base.row_pieces): any piece size, same tokens."""
    import cellstrata.engine.models.base as base

    tok, names = _scgpt(4, 33) if family == "scgpt" else _tahoe(4, 33, keep=2)
    block = _messy_block(8, 53, 740, max_len=33)
    mapping = tok.map_genes(_columns(names, 740, 3))
    ref = tok.tokenize_reference(block, mapping)
    whole = tok.tokenize(block, mapping)
    monkeypatch.setattr(base, "PIECE_ENTRIES", piece_entries)
    assert len(list(base.row_pieces(*base.canonical_rows(block, mapping)))) >= {1: 30, 97: 5, 1000: 2}[piece_entries]
    _assert_same(tok.tokenize(block, mapping), ref)
    _assert_same(whole, ref)


@pytest.mark.parametrize("family", ["scgpt", "tahoe-x1"])
def test_a_block_of_no_cells_or_only_empty_cells(family):
    tok, names = _scgpt(0, 20) if family == "scgpt" else _tahoe(0, 20)
    mapping = tok.map_genes(names)
    for X in (sp.csr_matrix((0, len(names)), dtype=np.float32), sp.csr_matrix((3, len(names)), dtype=np.float32)):
        block = CellBlock(np.arange(X.shape[0]), X)
        got, ref = tok.tokenize(block, mapping), tok.tokenize_reference(block, mapping)
        _assert_same(got, ref)
        assert len(got) == X.shape[0] and got.empty.all() and all(g.tolist() == [tok.cls_id] for g in got.genes)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
@pytest.mark.parametrize(("keep", "stored_zeros"), [(1, "keep"), (2, "keep"), (1, "drop"), (3, "keep")])
def test_tahoe_x1_vectorised_equals_reference(seed, keep, stored_zeros):
    tok, names = _tahoe(seed, max_length=41, keep=keep, stored_zeros=stored_zeros)
    block = _messy_block(seed + keep, 57, 777, max_len=41)
    mapping = tok.map_genes(_columns(names, 777, seed))
    got, ref = tok.tokenize(block, mapping), tok.tokenize_reference(block, mapping)
    _assert_same(got, ref)
    assert got.truncated.any() and got.empty.any() and (~got.truncated & ~got.empty).any()
    if stored_zeros == "keep":  # stored zeros are tokens in bin 1
        assert any((v[keep:] == 1).sum() > 0 for v, e in zip(got.values, got.empty) if not e)


@pytest.mark.parametrize("family", ["scgpt", "tahoe-x1"])
def test_tokens_do_not_depend_on_the_block_split_or_order(family):
    tok, names = _scgpt(11, 29) if family == "scgpt" else _tahoe(11, 29, keep=2)
    block = _messy_block(5, 45, 750, max_len=29)
    mapping = tok.map_genes(_columns(names, 750, 1))
    whole = tok.tokenize(block, mapping)
    rng = np.random.default_rng(9)
    order = rng.permutation(45)
    for part in np.array_split(order, [1, 8, 9, 30]):
        got = tok.tokenize(CellBlock(block.indices[part], block.X[part]), mapping)
        for j, i in enumerate(part):
            np.testing.assert_array_equal(got.genes[j], whole.genes[i])
            np.testing.assert_array_equal(got.values[j], whole.values[i])
            assert got.truncated[j] == whole.truncated[i]


@pytest.mark.parametrize("family", ["scgpt", "tahoe-x1"])
def test_draws_differ_across_seeds_and_cell_indices(family):
    make = _scgpt if family == "scgpt" else _tahoe
    (a, names), (b, _) = make(1, 25), make(2, 25)
    block = _messy_block(3, 40, 720, max_len=25)
    mapping = a.map_genes(_columns(names, 720, 2))
    ta, tb = a.tokenize(block, mapping), b.tokenize(block, mapping)
    moved = a.tokenize(CellBlock(block.indices + 1, block.X), mapping)
    long = np.flatnonzero(ta.truncated)
    assert len(long) > 3
    for other in (tb, moved):
        assert all(not np.array_equal(ta.genes[i], other.genes[i]) for i in long)  # another subset or order
        for i in np.flatnonzero(~ta.truncated):  # the genes of a cell that fits never change
            np.testing.assert_array_equal(ta.genes[i], other.genes[i])
    if family == "scgpt":  # tie-breaks too: some bin of a cell that fits differs
        short = np.flatnonzero(~ta.truncated & ~ta.empty)
        assert any(not np.array_equal(ta.values[i], tb.values[i]) for i in short)


def test_random_order_breaks_equal_top_bits_by_the_whole_key(monkeypatch):
    """The packed sort keeps only the top bits of each key; runs that agree there follow the whole key
    (then the position), exactly as a two-key lexsort of (segment, key)."""
    real = counter_rng._mix
    kept_bits = np.uint64(0xC0000000000000FF)  # two top bits and eight low bits: many equal top bits
    monkeypatch.setattr(counter_rng, "_mix", lambda z: real(z) & kept_bits)
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 60, 50)
    rows = np.repeat(np.arange(50), counts)
    cells = rng.integers(0, 10**6, 50)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    keys = counter_rng.random_bits(3, 1, cells[rows], np.arange(len(rows)) - offsets[rows])
    assert len(np.unique(keys)) < len(keys)  # equal whole keys too: the position decides
    np.testing.assert_array_equal(counter_rng.random_order(3, 1, cells, rows, counts), np.lexsort((keys, rows)))


@pytest.mark.parametrize("seed", [0, 5])
def test_random_order_equals_lexsort_and_random_subset_its_prefix(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 400, 97)
    counts[::10] = 0
    rows = np.repeat(np.arange(97), counts)
    cells = rng.integers(0, 10**9, 97)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    keys = counter_rng.random_bits(seed, 2, cells[rows], np.arange(len(rows)) - offsets[rows])
    perm = counter_rng.random_order(seed, 2, cells, rows, counts)
    np.testing.assert_array_equal(perm, np.lexsort((keys, rows)))
    size = rng.integers(1, 300, 97)
    kept = counter_rng.random_subset(seed, 2, cells, counts, size)
    expected = [
        perm[offsets[k] : offsets[k] + size[k]] if counts[k] > size[k] else np.arange(offsets[k], offsets[k + 1])
        for k in range(97)
    ]
    np.testing.assert_array_equal(kept, np.concatenate(expected))


@pytest.mark.slow
def test_tahoe_x1_binning_of_a_huge_block_matches_torch_per_cell():
    """A block whose (cell, value, index) key exceeds 64 bits is binned in parts; same buckets as torch."""
    import torch

    from cellstrata.engine.models.tahoe_x1 import bin_values

    rng = np.random.default_rng(6)
    counts = rng.integers(1, 6, 70_000)
    values = (rng.poisson(2, counts.sum()) + 1).astype(np.float32)
    assert int(len(counts) - 1).bit_length() + 32 + int(len(values) - 1).bit_length() > 64
    digits = bin_values(values, counts, 51)
    starts = np.concatenate(([0], np.cumsum(counts)))
    grades = torch.linspace(0, 1, 50)
    for c in rng.choice(len(counts), 300, replace=False):
        cell = torch.from_numpy(values[starts[c] : starts[c + 1]].copy())
        expected = (torch.bucketize(cell, torch.quantile(cell, grades)) + 1).numpy()
        np.testing.assert_array_equal(digits[starts[c] : starts[c + 1]], expected)


def test_draws_are_pinned():
    """The counter draws are part of the stored tokens' definition (tokenizer versions scgpt-binning-2 and
    tahoe-x1-binning-3): these values must never change without a version bump."""
    bits = counter_rng.random_bits(7, 1, np.array([0, 5, 10**9]), np.array([0, 3, 1199]))
    assert [int(b) % 10**6 for b in bits] == PINNED_BITS
    order = counter_rng.random_order(3, 1, np.array([42, 7]), np.repeat([0, 1], [6, 4]), np.array([6, 4]))
    assert order.tolist() == PINNED_ORDER


@pytest.mark.parametrize("share", [1.0, 0.9, 0.0])
def test_kept_entries_counts_each_rows_kept_entries(share):
    from cellstrata.engine.models.base import kept_entries

    rng = np.random.default_rng(int(share * 10))
    row_nnz = rng.integers(0, 9, 41)
    row_nnz[[0, 7, 40]] = 0  # empty rows, first and last included
    indptr = np.concatenate(([0], np.cumsum(row_nnz)))
    keep = rng.random(indptr[-1]) < share
    selector, counts = kept_entries(indptr, keep)
    np.testing.assert_array_equal(counts, [keep[indptr[i] : indptr[i + 1]].sum() for i in range(41)])
    assert (selector is None) == bool(keep.all())
    if selector is not None:
        np.testing.assert_array_equal(selector, np.flatnonzero(keep))
