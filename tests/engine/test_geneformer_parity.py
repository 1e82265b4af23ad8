"""Geneformer against the official recipe: tokens vs a restatement of ``TranscriptomeTokenizer``, and every
layer's hidden states vs ``transformers.BertForMaskedLM`` / ``BertModel`` loaded from our checkpoint folder.

The geneformer package has no PyPI release (its code lives on Hugging Face and needs loompy, datasets,
scanpy, ...), so its tokenizer is restated here from ``tokenizer.py`` (``sum_ensembl_ids`` h5ad path,
``tokenize_anndata``, ``rank_genes``, ``create_dataset.format_cell_features``; ``tokenize_loom`` for the
``stored_zeros="drop"`` option) and its pooled cell embedding from ``EmbExtractor``'s defaults,
``emb_extractor.get_embs`` and ``perturber_utils.mean_nonpadding_embs`` (the 2025-06 code). The model is
``transformers`` itself, as the official ``perturber_utils.load_model`` uses it.
"""

from __future__ import annotations

import importlib
import json
import pickle
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellstrata.engine.input.datasets import gene_ensembl_ids
from cellstrata.engine.input.sources import CellBlock
from cellstrata.engine.models.base import TokenBatch, TokenizedBlock
from cellstrata.engine.models.geneformer import FAMILY, DuplicateGenesWarning, GeneDictionaries, GeneformerTokenizer
from cellstrata.kernels import PoolSpec, pool_cast_torch


def _import_transformers():
    """``transformers`` with its BERT code imported while the repository root is off ``sys.path``.

    ``transformers`` probes for the Hugging Face ``kernels`` package by importing ``kernels``; with the
    repository root on ``sys.path`` (``python -m pytest``) that finds this repository's ``kernels/`` folder.
    """
    root = Path(__file__).resolve().parents[2]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        module = pytest.importorskip("transformers")
        importlib.import_module("transformers.models.bert.modeling_bert")
        return module
    finally:
        sys.path[:] = saved


transformers = _import_transformers()

REL_TOL = 1e-5


# ------------------------------------------------------------------------------------------------
# the official tokenizer, restated


def official_tokenize(
    X: sp.csr_matrix,
    ensembl_ids: list[str],
    n_counts: np.ndarray,
    token_dict: dict[str, int],
    median_dict: dict[str, float],
    mapping_dict: dict[str, str] | None,
    model_input_size: int,
    special_token: bool,
    *,
    file_format: str = "h5ad",
    collapse: bool | None = None,
) -> list[np.ndarray]:
    """``TranscriptomeTokenizer(collapse_gene_ids=True).tokenize_data`` + ``format_cell_features``.

    ``file_format="h5ad"`` is ``tokenize_anndata``: the matrix stays sparse through ``sum_ensembl_ids`` and
    the normalisation (scipy keeps explicitly stored zeros through column selection, ``/ n_counts`` and
    ``/ norm_factor_vector``), and ``rank_genes`` ranks every stored entry of a row; a duplicate column
    summed from a dense frame keeps no zero. ``"loom"`` is ``tokenize_loom``: ``tokenize_cell`` masks
    the dense row with ``np.nonzero`` first. ``collapse=True`` sums every duplicate whatever the mapping
    (cellstrata's ``duplicate_genes="sum"``, not an official setting); ``None`` is the official decision.
    """
    X = sp.csr_matrix(X)
    # __init__: mapping dict (identity when absent), filtered to values in the token dictionary
    gene_mapping = mapping_dict if mapping_dict is not None else {k: k for k in token_dict}
    gene_mapping = {k: v for k, v in gene_mapping.items() if v in token_dict}
    # sum_ensembl_ids: the collapse test compares the ids as given, the mapping uses them upper-cased
    in_map = [g for g in ensembl_ids if g in gene_mapping]
    collapsed = [gene_mapping.get(g.upper()) for g in ensembl_ids]
    kept = [j for j, c in enumerate(collapsed) if c is not None]
    names = [collapsed[j] for j in kept]
    if collapse is None:
        collapse = len(set(in_map)) != len({gene_mapping[g] for g in in_map})
    if not collapse:
        M, ids = X[:, kept], names  # every column kept, duplicated ids included
    else:
        dups = [g for g, n in Counter(names).items() if n > 1]
        M = X[:, kept]
        single = [k for k, g in enumerate(names) if g not in dups]
        summed = np.column_stack([np.asarray(M[:, [k for k, g in enumerate(names) if g == d]].sum(1)) for d in dups])
        M = sp.hstack([M[:, single], sp.csr_matrix(summed)], format="csr")  # dense -> sparse drops zeros
        ids = [names[k] for k in single] + dups
    # tokenize_anndata / tokenize_loom
    loc = [j for j, g in enumerate(ids) if g in token_dict]
    norm_factor_vector = np.array([median_dict[ids[j]] for j in loc])
    tokens = np.array([token_dict[ids[j]] for j in loc])
    X_view = M[:, loc]
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty cell has n_counts 0
        if file_format == "h5ad":
            X_norm = sp.csr_matrix(X_view / n_counts[:, None] * 10_000 / norm_factor_vector)
            cells = [tokens[X_norm[i].indices][np.argsort(-X_norm[i].data)] for i in range(X_norm.shape[0])]
        else:
            dense = X_view.toarray() / n_counts[:, None] * 10_000 / norm_factor_vector
            cells = []
            for row in dense:
                nz = np.nonzero(row)[0]
                cells.append(tokens[nz][np.argsort(-row[nz])])
    # create_dataset.format_cell_features
    out = []
    for c in cells:
        if special_token:
            c = np.insert(c[: model_input_size - 2], 0, token_dict["<cls>"])
            c = np.insert(c, len(c), token_dict["<eos>"])
        else:
            c = c[:model_input_size]
        out.append(np.asarray(c, dtype=np.int64))
    return out


def official_cell_embedding(
    hidden_states: tuple[torch.Tensor, ...],
    lengths: torch.Tensor,
    token_dict: dict[str, int],
    input_ids: torch.Tensor,
    *,
    model_version: str = "V2",
    emb_mode: str = "cls",
    emb_layer: int = -1,
) -> torch.Tensor:
    """``EmbExtractor(model_version=..., emb_mode=..., emb_layer=...)`` + ``get_embs`` for one batch.

    ``EmbExtractor`` defaults to ``emb_mode="cls"`` and ``model_version="V2"``; with ``"V1"`` it switches
    ``"cls"`` to ``"cell"`` (V1 has no ``<cls>``). The layer is ``quant_layers(model) + emb_layer``
    (``quant_layers`` = number of encoder layers, ``hidden_states`` has one more entry). ``"cls"`` is
    position 0 as it is (no normalisation); ``"cell"`` is ``mean_nonpadding_embs`` over the gene tokens.
    """
    if model_version == "V1" and emb_mode == "cls":
        emb_mode = "cell"
    embs = hidden_states[len(hidden_states) - 1 + emb_layer]
    cls_present = "<cls>" in token_dict
    if emb_mode == "cls":
        assert cls_present and int(input_ids[0, 0]) == token_dict["<cls>"]
        return embs[:, 0, :].clone()
    if cls_present:
        n = lengths - (2 if "<eos>" in token_dict else 1)
        return _mean_nonpadding_embs(embs[:, 1:, :], n)
    return _mean_nonpadding_embs(embs, lengths)


def _dictionaries(n_genes: int, seed: int, *, special: bool = True) -> GeneDictionaries:
    """Ensembl-style ids; medians drawn from a small set so equal values (ties) are common."""
    rng = np.random.default_rng(seed)
    specials = ["<pad>", "<mask>", "<cls>", "<eos>"] if special else ["<pad>", "<mask>"]
    genes = gene_ensembl_ids(n_genes)
    token = {t: i for i, t in enumerate(specials)} | {g: len(specials) + i for i, g in enumerate(genes)}
    pool = np.exp(rng.normal(0.3, 0.8, n_genes // 4))
    median = {g: float(rng.choice(pool)) for g in genes}
    return GeneDictionaries(token, median)


def _counts(n_cells: int, n_genes: int, seed: int) -> sp.csr_matrix:
    """Integer counts with varied depth; cell 1 has one expressed gene, cell 2 none."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_cells):
        density = rng.choice([0.02, 0.1, 0.3, 0.6])
        rows.append(np.where(rng.random(n_genes) < density, rng.poisson(rng.choice([0.5, 2.0, 15.0]), n_genes) + 1, 0))
    rows[1][:] = 0
    rows[1][5] = 4
    rows[2][:] = 0
    return sp.csr_matrix(np.stack(rows).astype(np.float32))


@pytest.mark.parametrize(("special", "max_length"), [(True, 4096), (True, 60), (False, 2048), (False, 45)])
def test_tokens_equal_official_tokenizer(special, max_length):
    """Genes in shuffled order, unknown ids, lower-case ids, ids collapsed by the mapping dictionary and
    an id given twice: tokens (order included, ties too) equal the restated official pipeline."""
    d = _dictionaries(400, seed=1, special=special)
    genes = gene_ensembl_ids(400)
    rng = np.random.default_rng(2)
    mapping = {g: g for g in genes}
    alias = [f"ENSG8{i:010d}" for i in range(5)]
    for i, a in enumerate(alias):  # retired ids collapsed onto current ones
        mapping[a] = genes[10 + i]
    d.ensembl_mapping = mapping
    names = [*genes[:380], *alias, genes[3], "ENSG7000000000X", genes[390].lower()]
    order = rng.permutation(len(names))
    names = [names[i] for i in order]
    X = _counts(40, len(names), seed=3)
    n_counts = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()  # what obs["n_counts"] holds

    tok = GeneformerTokenizer(d, max_length=max_length)
    with pytest.warns(DuplicateGenesWarning, match="6 genes .* summed into one token"):
        gene_map = tok.map_genes(names)
    ours = tok.tokenize(CellBlock(np.arange(100, 140), X), gene_map)
    ref = official_tokenize(X, names, n_counts, d.token, d.median, mapping, max_length, special)
    per_cell = tok.tokenize_reference(CellBlock(np.arange(100, 140), X), gene_map)
    for i in range(40):  # the per-cell reference path gives the same tokens
        np.testing.assert_array_equal(per_cell.genes[i], ours.genes[i], err_msg=f"cell {i}")
    n_ties = 0
    for i in range(40):
        if i == 2:  # no expressed gene: the official code would yield [] / [<cls>, <eos>]
            assert ours.empty[i] and len(ref[i]) == (2 if special else 0)
            continue
        np.testing.assert_array_equal(ours.genes[i], ref[i], err_msg=f"cell {i}")
        row = X[i].toarray().ravel()
        n_ties += len(np.unique(row[row > 0])) < (row > 0).sum()
    assert n_ties > 5
    assert ours.genes[1].tolist() == ref[1].tolist() and len(ref[1]) == 1 + (2 if special else 0)
    lengths = ours.lengths
    assert (lengths <= max_length).all()
    if max_length < 100:
        assert ours.truncated.any() and (lengths[ours.truncated] == max_length).all()
    else:
        assert not ours.truncated.any()


def test_ranking_ties_follow_numpy_argsort():
    """Cells of few distinct values: the order is np.argsort(-x)'s, not a stable sort's."""
    d = _dictionaries(300, seed=4)
    for g in d.median:
        d.median[g] = 1.5
    names = gene_ensembl_ids(300)
    rng = np.random.default_rng(5)
    X = sp.csr_matrix(np.where(rng.random((6, 300)) < 0.5, rng.integers(1, 4, (6, 300)), 0).astype(np.float32))
    tok = GeneformerTokenizer(d, max_length=4096)
    ours = tok.tokenize(CellBlock(np.arange(6), X), tok.map_genes(names))
    n = np.asarray(X.sum(axis=1)).ravel()
    ref = official_tokenize(X, names, n, d.token, d.median, None, 4096, True)
    stable_differs = 0
    for i in range(6):
        np.testing.assert_array_equal(ours.genes[i], ref[i])
        cols = X[i].indices[np.argsort(-X[i].data, kind="stable")]
        stable = np.array([d.token[names[j]] for j in cols])
        stable_differs += not np.array_equal(ours.genes[i][1:-1], stable)
    assert stable_differs > 0  # numpy's quicksort does reorder ties here, so this checks something


def _with_stored_zeros(X: sp.csr_matrix, seed: int, per_row: int) -> sp.csr_matrix:
    """``X`` with ``per_row`` explicitly stored zeros added to each row (canonical: sorted, no duplicates)."""
    rng = np.random.default_rng(seed)
    dense = X.toarray()
    indptr, indices, data = [0], [], []
    for row in dense:
        zeros = rng.choice(np.flatnonzero(row == 0), size=per_row, replace=False)
        cols = np.sort(np.concatenate([np.flatnonzero(row), zeros]))
        indices.append(cols)
        data.append(row[cols])
        indptr.append(indptr[-1] + len(cols))
    out = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.array(indptr)), shape=X.shape)
    assert out.has_canonical_format and int((out.data == 0).sum()) == per_row * X.shape[0]
    return out


@pytest.mark.parametrize("special", [True, False])
def test_duplicate_ids_stay_separate_tokens_unless_the_mapping_merges_ids(special):
    """No two different input ids map to one id: ``sum_ensembl_ids`` keeps every column, so an id given
    twice (or once upper- and once lower-case) is two tokens; ``duplicate_genes="sum"`` sums them instead."""
    d = _dictionaries(300, seed=21, special=special)
    genes = gene_ensembl_ids(300)
    d.ensembl_mapping = {g: g for g in genes}
    names = [*genes[:290], genes[7], genes[40], genes[40].lower(), genes[123]]
    X = _counts(30, len(names), seed=22).tolil()
    for j, k in ((290, 7), (291, 40)):  # the copies equal their originals in some cells: tied values
        X[::3, j] = X[::3, k]
    X = X.tocsr()
    n_counts = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    tok = GeneformerTokenizer(d, max_length=4096)
    with pytest.warns(DuplicateGenesWarning) as rec:
        mapping = tok.map_genes(names)
    msg = str(rec[0].message)
    assert "3 genes" in msg and genes[7] in msg and genes[40] in msg and "duplicate_genes=sum" in msg, msg
    ours = tok.tokenize(CellBlock(np.arange(30), X), mapping)
    ref = official_tokenize(X, names, n_counts, d.token, d.median, d.ensembl_mapping, 4096, special)
    adjacent = 0
    for i in range(30):
        if ours.empty[i]:
            assert len(ref[i]) == (2 if special else 0)
            continue
        np.testing.assert_array_equal(ours.genes[i], ref[i], err_msg=f"cell {i}")
        g = ours.genes[i]
        adjacent += int((g[1:] == g[:-1]).sum())
    assert adjacent > 3  # tied copies sit at adjacent ranks: two tokens of one gene side by side

    summing = GeneformerTokenizer(d, max_length=4096, duplicate_genes="sum")
    with pytest.warns(DuplicateGenesWarning, match="summed"):
        mapping = summing.map_genes(names)
    summed = summing.tokenize(CellBlock(np.arange(30), X), mapping)
    ref_sum = official_tokenize(X, names, n_counts, d.token, d.median, d.ensembl_mapping, 4096, special, collapse=True)
    for i in range(30):
        if not summed.empty[i]:
            np.testing.assert_array_equal(summed.genes[i], ref_sum[i], err_msg=f"cell {i}")
            assert len(np.unique(summed.genes[i])) == len(summed.genes[i])
    assert summing.settings()["duplicate_genes"] == "sum" and tok.settings()["duplicate_genes"] == "official"


@pytest.mark.parametrize("merging_alias", [False, True])
def test_stored_zeros_are_tokens_as_in_tokenize_anndata(merging_alias):
    """Explicitly stored zeros of vocabulary genes are ranked (last) by ``tokenize_anndata``; a summed
    duplicate holds no zero; ``stored_zeros="drop"`` is ``tokenize_loom``'s ``np.nonzero`` mask."""
    d = _dictionaries(200, seed=31)
    genes = gene_ensembl_ids(200)
    d.ensembl_mapping = {g: g for g in genes} | {"ENSG80000000001": genes[5]}
    names = [*genes[:195], genes[60], genes[61]] + (["ENSG80000000001"] if merging_alias else [])
    X = _with_stored_zeros(_counts(25, len(names), seed=32), seed=33, per_row=4)
    X.data[X.indptr[3] : X.indptr[4]] = 0  # cell 3: every stored entry is zero (n_counts 0)
    n_counts = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    tok = GeneformerTokenizer(d, max_length=4096)
    with pytest.warns(DuplicateGenesWarning):
        mapping = tok.map_genes(names)
    ours = tok.tokenize(CellBlock(np.arange(25), X), mapping)
    ref = official_tokenize(X, names, n_counts, d.token, d.median, d.ensembl_mapping, 4096, True)
    n_zero_tokens = 0
    for i in range(25):
        if n_counts[i] == 0:  # cells 2 and 3: the official code ranks 0 / 0 (NaN); cellstrata: an empty cell
            assert ours.empty[i] and len(ref[i]) > 2
            continue
        np.testing.assert_array_equal(ours.genes[i], ref[i], err_msg=f"cell {i}")
        n_zero_tokens += len(ref[i]) - 2 - int((X[i].data != 0).sum())
    assert n_zero_tokens > 25  # the stored zeros were tokens (fewer where a summed duplicate absorbed one)
    assert ours.n_expressed is not None and ours.n_expressed[0] == len(ours.genes[0]) - 2

    dropping = GeneformerTokenizer(d, max_length=4096, stored_zeros="drop")
    with pytest.warns(DuplicateGenesWarning):
        mapping = dropping.map_genes(names)
    dropped = dropping.tokenize(CellBlock(np.arange(25), X), mapping)
    loom = official_tokenize(X, names, n_counts, d.token, d.median, d.ensembl_mapping, 4096, True, file_format="loom")
    dense = official_tokenize(
        sp.csr_matrix(X.toarray()), names, n_counts, d.token, d.median, d.ensembl_mapping, 4096, True
    )
    for i in range(25):
        if n_counts[i] != 0:
            np.testing.assert_array_equal(dropped.genes[i], loom[i], err_msg=f"cell {i}")
            np.testing.assert_array_equal(dropped.genes[i], dense[i], err_msg=f"cell {i}")
    assert (n_counts == 0).sum() == 2 and dropped.empty[n_counts == 0].all() and ours.empty.sum() == 2
    assert tok.settings()["stored_zeros"] == "keep"
    assert dropping.settings()["stored_zeros"] == "drop"


# ------------------------------------------------------------------------------------------------
# model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return FAMILY.init_checkpoint("tiny", tmp_path_factory.mktemp("gf_tiny"), seed=11)


def _pad(tb: TokenizedBlock, rows: list[int], pad_id: int) -> TokenBatch:
    lengths = np.array([len(tb.genes[i]) for i in rows])
    s = int(lengths.max())
    genes = torch.full((len(rows), s), pad_id, dtype=torch.long)
    for b, i in enumerate(rows):
        genes[b, : lengths[b]] = torch.from_numpy(tb.genes[i])
    return TokenBatch(genes, torch.zeros(genes.shape), torch.from_numpy(lengths), np.arange(len(rows)))


def _ours(loaded, batch: TokenBatch) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        loaded.model(batch, lambda layer, h: out.append(h.clone()))
    return out


def _hf(folder: Path, batch: TokenBatch, *, cls=None, attn: str = "eager"):
    cls = cls or transformers.BertForMaskedLM
    extra = {"add_pooling_layer": False} if cls is transformers.BertModel else {}
    model, info = cls.from_pretrained(
        str(folder), output_hidden_states=True, attn_implementation=attn, output_loading_info=True, **extra
    )
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    model.eval()
    mask = (~batch.padding_mask).long()  # perturber_utils.gen_attention_mask
    with torch.no_grad():
        return model(input_ids=batch.genes, attention_mask=mask).hidden_states


def _rel_errors(ours, ref, real) -> list[float]:
    errs = []
    for layer, (a, b) in enumerate(zip(ours, ref)):
        a, b = a[real], b[real]
        assert b.std() > 0.5, f"layer {layer} activations trivial"
        errs.append(float((a - b).abs().max() / b.abs().max()))
    return errs


def _mean_nonpadding_embs(embs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """perturber_utils.mean_nonpadding_embs, restated."""
    mask = torch.arange(embs.size(1)) < lengths.unsqueeze(1)
    return embs.masked_fill(~mask.unsqueeze(2), 0.0).sum(1) / lengths.view(-1, 1).float()


def _tokens(loaded, n_cells: int, seed: int) -> TokenizedBlock:
    tok = loaded.tokenizer
    names = gene_ensembl_ids(2000)
    X = _counts(n_cells, 2000, seed)
    return tok.tokenize(CellBlock(np.arange(n_cells), X), tok.map_genes(names))


@pytest.mark.parametrize("reference", ["BertForMaskedLM-eager", "BertModel-sdpa"])
def test_every_layer_matches_transformers(tiny, reference):
    loaded = FAMILY.load(tiny, max_length=300)
    tb = _tokens(loaded, 10, seed=6)
    rows = [i for i in range(10) if not tb.empty[i]]
    batch = _pad(tb, rows, loaded.tokenizer.pad_id)
    assert len(set(batch.lengths.tolist())) > 3 and int(batch.lengths.min()) == 3  # <cls> gene <eos>
    cls, attn = reference.split("-")
    ref = _hf(tiny, batch, cls=getattr(transformers, cls), attn=attn)
    ours = _ours(loaded, batch)
    assert len(ours) == len(ref) == loaded.n_layers + 1
    real = ~batch.padding_mask
    errs = _rel_errors(ours, ref, real)
    print(f"Geneformer vs transformers {reference}: max relative error {max(errs):.2e} per layer {errs}")
    assert max(errs) <= REL_TOL, errs
    assert not torch.allclose(ours[1][real], ours[-1][real])

    # the published V2 cell embedding: EmbExtractor's defaults (model_version="V2", emb_mode="cls",
    # emb_layer=-1) read the <cls> token of hidden_states[quant_layers - 1]
    official_layer = loaded.official_layer
    assert official_layer == loaded.n_layers - 1 and loaded.pool_ops["official"] == "first"
    token_dict = pickle.loads((tiny / "token_dictionary_gc104M.pkl").read_bytes())
    ref_cls = official_cell_embedding(ref, batch.lengths, token_dict, batch.genes)
    spec = PoolSpec((loaded.pool_ops["official"], "mean"), n_leading=1, n_trailing=1)
    out, mean = pool_cast_torch(ours[official_layer], None, batch.lengths, spec, torch.float32)
    err = float((out - ref_cls).abs().max() / ref_cls.abs().max())
    assert err <= REL_TOL, err
    # emb_mode="cell" (the V2 default before October 2024, V1's): the mean over the gene tokens, kept as `mean`
    ref_mean = official_cell_embedding(ref, batch.lengths, token_dict, batch.genes, emb_mode="cell")
    assert float((mean - ref_mean).abs().max() / ref_mean.abs().max()) <= REL_TOL
    assert float((ref_cls - ref_mean).abs().max()) > 0.1  # the two recipes differ, so this checks which one


@pytest.fixture(scope="module")
def v1_relu(tmp_path_factory) -> Path:
    """A V1-style folder (gc30M dictionaries without <cls>/<eos>) with a small vocabulary."""
    return FAMILY.init_checkpoint("v1-10m", tmp_path_factory.mktemp("gf_v1"), seed=2, genes=gene_ensembl_ids(600))


def _v1_folder(v1_relu: Path, tmp_path: Path, act: str) -> Path:
    if act == "relu":
        return v1_relu
    folder = Path(shutil.copytree(v1_relu, tmp_path / act))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_act"] = act
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_v1_layout_matches_transformers(v1_relu, tmp_path, act):
    folder = _v1_folder(v1_relu, tmp_path, act)
    with (folder / "token_dictionary_gc30M.pkl").open("rb") as f:
        assert "<cls>" not in pickle.load(f)
    loaded = FAMILY.load(folder, max_length=200)
    assert not loaded.tokenizer.special and loaded.layout.n_leading == 0 and "cls" not in loaded.pool_ops
    tok = loaded.tokenizer
    X = _counts(8, 600, seed=9)
    tb = tok.tokenize(CellBlock(np.arange(8), X), tok.map_genes(gene_ensembl_ids(600)))
    rows = [i for i in range(8) if not tb.empty[i]]
    batch = _pad(tb, rows, tok.pad_id)
    assert int(batch.lengths.min()) == 1
    ref = _hf(folder, batch)
    ours = _ours(loaded, batch)
    errs = _rel_errors(ours, ref, ~batch.padding_mask)
    assert len(errs) == 7 and max(errs) <= REL_TOL, errs
    # EmbExtractor(model_version="V1") switches its default emb_mode "cls" to "cell": the gene-token mean
    assert loaded.pool_ops["official"] == "mean" and loaded.official_layer == 5
    ref_emb = official_cell_embedding(ref, batch.lengths, {"<pad>": 0, "<mask>": 1}, batch.genes, model_version="V1")
    spec = PoolSpec((loaded.pool_ops["official"],), n_leading=0, n_trailing=0)
    out = pool_cast_torch(ours[loaded.official_layer], None, batch.lengths, spec, torch.float32)[0]
    assert float((out - ref_emb).abs().max() / ref_emb.abs().max()) <= REL_TOL


def test_padding_and_batch_mates_do_not_change_a_cell(tiny):
    loaded = FAMILY.load(tiny, max_length=300)
    tb = _tokens(loaded, 8, seed=12)
    rows = [i for i in range(8) if not tb.empty[i]]
    short = min(rows, key=lambda i: tb.lengths[i])
    alone = _ours(loaded, _pad(tb, [short], loaded.tokenizer.pad_id))
    mixed = _ours(loaded, _pad(tb, [*[r for r in rows if r != short], short], loaded.tokenizer.pad_id))
    n = int(tb.lengths[short])
    for a, b in zip(alone, mixed):
        torch.testing.assert_close(b[-1, :n], a[0, :n], rtol=1e-5, atol=1e-5)
