"""Geneformer against the official recipe: tokens vs a restatement of ``TranscriptomeTokenizer``, and every
layer's hidden states vs ``transformers.BertForMaskedLM`` / ``BertModel`` loaded from our checkpoint folder.

The geneformer package has no PyPI release (its code lives on Hugging Face and needs loompy, datasets,
scanpy, ...), so its tokenizer is restated here from ``tokenizer.py`` (``sum_ensembl_ids`` h5ad path,
``tokenize_anndata``, ``rank_genes``, ``create_dataset.format_cell_features``) and its pooled cell
embedding from ``emb_extractor.get_embs`` + ``perturber_utils.mean_nonpadding_embs``. The model is
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

from cellstrata.engine.datasets import gene_ensembl_ids
from cellstrata.engine.models.base import TokenBatch, TokenizedBlock
from cellstrata.engine.models.geneformer import FAMILY, GeneDictionaries, GeneformerTokenizer
from cellstrata.engine.sources import CellBlock
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
) -> list[np.ndarray]:
    """``TranscriptomeTokenizer(collapse_gene_ids=True).tokenize_anndata`` + ``format_cell_features``."""
    # __init__: mapping dict (identity when absent), filtered to values in the token dictionary
    gene_mapping = mapping_dict if mapping_dict is not None else {k: k for k in token_dict}
    gene_mapping = {k: v for k, v in gene_mapping.items() if v in token_dict}
    # sum_ensembl_ids, h5ad branch
    in_map = [g for g in ensembl_ids if g in gene_mapping]
    if len(set(in_map)) == len({gene_mapping[g] for g in in_map}):
        collapsed = [gene_mapping.get(g.upper()) for g in ensembl_ids]
        cols = [j for j, c in enumerate(collapsed) if c is not None]
        ids = [collapsed[j] for j in cols]
        M = X[:, cols].toarray().astype(np.float64)
    else:
        collapsed = [gene_mapping.get(g.upper()) for g in ensembl_ids]
        kept = [j for j, c in enumerate(collapsed) if c is not None]
        names = [collapsed[j] for j in kept]
        dups = [g for g, n in Counter(names).items() if n > 1]
        dense = X[:, kept].toarray().astype(np.float64)
        single = [k for k, g in enumerate(names) if g not in dups]
        summed = [dense[:, [k for k, g in enumerate(names) if g == d]].sum(1) for d in dups]
        M = np.column_stack([dense[:, single], *summed]) if summed else dense[:, single]
        ids = [names[k] for k in single] + dups
    # tokenize_anndata
    loc = [j for j, g in enumerate(ids) if g in token_dict]
    norm_factor_vector = np.array([median_dict[ids[j]] for j in loc])
    tokens = np.array([token_dict[ids[j]] for j in loc])
    X_view = sp.csr_matrix(M[:, loc])
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty cell has n_counts 0
        X_norm = sp.csr_matrix(X_view / n_counts[:, None] * 10_000 / norm_factor_vector)
    cells = [tokens[X_norm[i].indices][np.argsort(-X_norm[i].data)] for i in range(X_norm.shape[0])]
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
    ours = tok.tokenize(CellBlock(np.arange(100, 140), X), tok.map_genes(names))
    ref = official_tokenize(X, names, n_counts, d.token, d.median, mapping, max_length, special)
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

    # the published cell embedding: get_embs(emb_mode="cell") at layer quant_layers + emb_layer(-1)
    official_layer = loaded.official_layer
    assert official_layer == loaded.n_layers - 1
    embs = ref[official_layer]
    ref_emb = _mean_nonpadding_embs(embs[:, 1:, :], batch.lengths - 2)  # <cls> and <eos> present
    spec = PoolSpec((loaded.pool_ops["official"],), n_leading=1, n_trailing=1)
    out = pool_cast_torch(ours[official_layer], None, batch.lengths, spec, torch.float32)[0]
    err = float((out - ref_emb).abs().max() / ref_emb.abs().max())
    assert err <= REL_TOL, err
    # cls (emb_mode="cls": hidden_states[layer][:, 0]) and mean via the kernel's ops
    spec = PoolSpec(("mean", "first"), n_leading=1, n_trailing=1)
    pooled = pool_cast_torch(ours[official_layer], None, batch.lengths, spec, torch.float32)
    torch.testing.assert_close(pooled[0], out, rtol=0, atol=0)
    torch.testing.assert_close(pooled[1], embs[:, 0, :], rtol=1e-5, atol=1e-5)


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
    ref_emb = _mean_nonpadding_embs(ref[loaded.official_layer], batch.lengths)  # no <cls>: first `length`
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
