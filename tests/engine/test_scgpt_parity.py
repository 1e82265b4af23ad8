"""scGPT against the official ``scgpt==0.2.4`` code (tokenization and every layer's hidden states).

The official modules are loaded without running ``scgpt/__init__.py`` (it imports torchtext, which
cannot load beside current torch): a synthetic package whose ``__path__`` is the installed ``scgpt``
(or ``scgpt/model``) directory, so relative imports resolve and nothing else is executed.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from cellstrata.engine.input.datasets import gene_symbols
from cellstrata.engine.input.sources import CellBlock
from cellstrata.engine.models.base import GeneMapping, TokenBatch, TokenizedBlock
from cellstrata.engine.models.counter_rng import uniform
from cellstrata.engine.models.scgpt import FAMILY, TIE_STREAM, ScGPTTokenizer
from cellstrata.kernels import PoolSpec, pool_cast_torch

REL_TOL = 1e-5


def _scgpt_dir() -> Path:
    spec = importlib.util.find_spec("scgpt")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("official scgpt code not installed (pip install --no-deps scgpt==0.2.4)")
    return Path(next(iter(spec.submodule_search_locations)))


def _synthetic_package(name: str, path: Path) -> None:
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg


@pytest.fixture(scope="module")
def official_model_module() -> types.ModuleType:
    """``scgpt/model/model.py`` (needs only torch, numpy, tqdm and its sibling files)."""
    name = "_cellstrata_ref_scgpt_model"
    _synthetic_package(name, _scgpt_dir() / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flash_attn is not installed"
        return importlib.import_module(f"{name}.model")


@pytest.fixture(scope="module")
def official_collator_module() -> types.ModuleType:
    """``scgpt/data_collator.py`` + ``scgpt/preprocess.py``, with their unused imports stubbed.

    ``preprocess.py`` imports scanpy (only for ``Preprocessor``) and ``from scgpt import logger``
    (which would run the broken package ``__init__``); both are stubbed while importing only.
    """
    name = "_cellstrata_ref_scgpt"
    _synthetic_package(name, _scgpt_dir())
    stubs: dict[str, types.ModuleType] = {}
    stubs["scanpy"] = types.ModuleType("scanpy")
    stubs["scanpy.get"] = types.ModuleType("scanpy.get")
    stubs["scanpy.get"]._get_obs_rep = stubs["scanpy.get"]._set_obs_rep = None  # type: ignore[attr-defined]
    stubs["scanpy"].get = stubs["scanpy.get"]  # type: ignore[attr-defined]
    stubs["scgpt"] = types.ModuleType("scgpt")
    stubs["scgpt"].logger = logging.getLogger("scgpt-reference")  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        return importlib.import_module(f"{name}.data_collator")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


# ------------------------------------------------------------------------------------------------
# data


def _counts(n_cells: int, n_genes: int, seed: int) -> sp.csr_matrix:
    """Counts with varied depth: a single-gene cell, an empty cell, tie-heavy and float cells."""
    rng = np.random.default_rng(seed)
    rows = []
    for _i in range(n_cells):
        density = rng.choice([0.01, 0.05, 0.2, 0.5])
        row = np.where(rng.random(n_genes) < density, rng.poisson(rng.choice([0.5, 2, 20]), n_genes) + 1, 0)
        rows.append(row.astype(np.float64))
    rows[1][:] = 0
    rows[1][7] = 3.0  # one expressed gene
    rows[2][:] = 0  # no expressed gene
    rows[3] = np.where(rows[3] > 0, rng.lognormal(0, 2, n_genes), 0)  # non-integer values, > 512 too
    return sp.csr_matrix(np.stack(rows))


def _input_genes(n_vocab_genes: int, n_extra: int) -> list[str]:
    """Input columns: vocabulary genes in shuffled order plus genes the vocabulary lacks."""
    rng = np.random.default_rng(1)
    names = gene_symbols(n_vocab_genes) + [f"NOTINVOCAB{i}" for i in range(n_extra)]
    return [names[i] for i in rng.permutation(len(names))]


def _official_examples(
    dense: np.ndarray, names: list[str], vocab: dict[str, int], pad_value: float
) -> list[dict[str, Any]]:
    """``embed_data`` + ``get_batch_cell_embeddings``'s Dataset, restated (the originals need torchtext).

    ``embed_data`` keeps the columns whose gene is in the vocabulary (in column order); the Dataset
    takes ``np.nonzero(row)`` of each dense row and prepends ``<cls>`` with value ``pad_value``.
    """
    id_in_vocab = np.array([vocab.get(g, -1) for g in names])
    dense = dense[:, id_in_vocab >= 0]
    gene_ids = id_in_vocab[id_in_vocab >= 0]
    out = []
    for idx, row in enumerate(dense):
        nonzero_idx = np.nonzero(row)[0]
        genes = np.insert(gene_ids[nonzero_idx], 0, vocab["<cls>"])
        values = np.insert(row[nonzero_idx], 0, pad_value)
        out.append(
            {"id": idx, "genes": torch.from_numpy(genes).long(), "expressions": torch.from_numpy(values).float()}
        )
    return out


def _pad_batch(tb: TokenizedBlock, rows: list[int], pad_id: int, pad_value: float) -> TokenBatch:
    lengths = np.array([len(tb.genes[i]) for i in rows])
    s = int(lengths.max())
    genes = torch.full((len(rows), s), pad_id, dtype=torch.long)
    values = torch.full((len(rows), s), pad_value, dtype=torch.float32)
    for b, i in enumerate(rows):
        genes[b, : lengths[b]] = torch.from_numpy(tb.genes[i])
        values[b, : lengths[b]] = torch.from_numpy(tb.values[i])
    return TokenBatch(genes, values, torch.from_numpy(lengths), np.arange(len(rows)))


# ------------------------------------------------------------------------------------------------
# tokenizer


def _vocab(n_genes: int) -> dict[str, int]:
    vocab = {g: i for i, g in enumerate(gene_symbols(n_genes))}
    for t in ("<pad>", "<cls>", "<eoc>"):
        vocab[t] = len(vocab)
    return vocab


@pytest.mark.parametrize("seed", [0, 12345])
def test_tokens_match_official_collator(official_collator_module, monkeypatch, seed):
    """Same genes, order and bins as DataCollator(do_binning=True, ...) when its np.random.rand
    draws are our counter-based draws (seed, tie stream, cell index, position in the cell)."""
    vocab = _vocab(600)
    names = _input_genes(600, 150)
    X = _counts(40, len(names), seed=3)
    cell_index = np.arange(1000, 1040)  # global indices of the block's cells
    tok = ScGPTTokenizer(vocab, max_length=10_000, seed=seed)
    mapping = tok.map_genes(names)
    ours = tok.tokenize(CellBlock(cell_index, X), mapping)

    examples = _official_examples(X.toarray(), names, vocab, tok.pad_value)
    nonempty = [i for i in range(len(examples)) if len(examples[i]["genes"]) > 1]
    assert 2 not in nonempty and 1 in nonempty  # the official binning cannot take an empty cell
    draws = iter([int(cell_index[i]) for i in nonempty])
    monkeypatch.setattr(np.random, "rand", lambda n: uniform(seed, TIE_STREAM, np.full(n, next(draws)), np.arange(n)))
    collator = official_collator_module.DataCollator(
        do_padding=True,
        pad_token_id=vocab["<pad>"],
        pad_value=-2,
        do_mlm=False,
        do_binning=True,
        max_length=10_000,
        sampling=True,
        keep_first_n_tokens=1,
    )
    ref = collator([examples[i] for i in nonempty])
    assert next(draws, None) is None  # one draw per cell, consumed in order

    n_ties = 0
    for b, i in enumerate(nonempty):
        n = len(ours.genes[i])
        np.testing.assert_array_equal(ours.genes[i], ref["gene"][b, :n].numpy())
        np.testing.assert_array_equal(ours.values[i], ref["expr"][b, :n].numpy())
        assert (ref["gene"][b, n:] == vocab["<pad>"]).all()
        n_ties += len(np.unique(ours.values[i][1:])) < n - 1
    assert n_ties > 10
    assert ours.empty.tolist() == [i == 2 for i in range(40)]
    assert ours.genes[2].tolist() == [vocab["<cls>"]] and ours.values[2].tolist() == [-2.0]
    assert not ours.truncated.any()


def test_stored_zeros_are_not_tokens_as_official(official_collator_module, monkeypatch):
    """A CSR input that stores explicit zeros: ``get_batch_cell_embeddings`` densifies ``adata.X``
    (``toarray()``) and takes ``np.nonzero(row)``, so a stored zero is no token and changes no bin."""
    vocab = _vocab(400)
    names = _input_genes(400, 60)
    rng = np.random.default_rng(21)
    n_cells, data, indices, indptr = 23, [], [], [0]
    for i in range(n_cells):
        cols = np.sort(rng.choice(len(names), int(rng.integers(3, 160)), replace=False))
        vals = (rng.poisson(rng.choice([0.5, 3, 30]), len(cols)) + 1).astype(np.float32)
        vals[rng.random(len(cols)) < (1.0 if i == 4 else 0.35)] = 0  # cell 4 stores only zeros
        vals[0] = 0  # a stored zero at the start of every row
        data.append(vals)
        indices.append(cols)
        indptr.append(indptr[-1] + len(cols))
    X = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.array(indptr)), shape=(n_cells, len(names)))
    in_vocab = np.array([g in vocab for g in names])[X.indices]
    assert X.has_canonical_format and int(((X.data == 0) & in_vocab).sum()) > 200
    cell_index = np.arange(500, 500 + n_cells)
    tok = ScGPTTokenizer(vocab, max_length=10_000, seed=3)
    ours = tok.tokenize(CellBlock(cell_index, X), tok.map_genes(names))

    examples = _official_examples(X.toarray(), names, vocab, tok.pad_value)
    nonempty = [i for i in range(n_cells) if len(examples[i]["genes"]) > 1]
    assert ours.empty.tolist() == [i not in nonempty for i in range(n_cells)] and ours.empty[4]
    draws = iter([int(cell_index[i]) for i in nonempty])
    monkeypatch.setattr(np.random, "rand", lambda n: uniform(3, TIE_STREAM, np.full(n, next(draws)), np.arange(n)))
    collator = official_collator_module.DataCollator(
        do_padding=True,
        pad_token_id=vocab["<pad>"],
        pad_value=-2,
        do_mlm=False,
        do_binning=True,
        max_length=10_000,
        sampling=True,
        keep_first_n_tokens=1,
    )
    ref = collator([examples[i] for i in nonempty])
    for b, i in enumerate(nonempty):
        n = len(ours.genes[i])
        np.testing.assert_array_equal(ours.genes[i], ref["gene"][b, :n].numpy())
        np.testing.assert_array_equal(ours.values[i], ref["expr"][b, :n].numpy())
        assert (ref["gene"][b, n:] == vocab["<pad>"]).all() and ours.values[i][1:].min() >= 1


def test_truncation_is_a_subset_of_the_official_full_sequence(official_collator_module, monkeypatch):
    """Over-long cells: <cls> first, then max_length - 1 of the official (binned) tokens, shuffled."""
    vocab = _vocab(600)
    names = _input_genes(600, 0)
    X = _counts(30, len(names), seed=4)
    tok = ScGPTTokenizer(vocab, max_length=40, seed=7)
    ours = tok.tokenize(CellBlock(np.arange(30), X), tok.map_genes(names))
    full = ScGPTTokenizer(vocab, max_length=10_000, seed=7).tokenize(CellBlock(np.arange(30), X), tok.map_genes(names))
    long_cells = [i for i in range(30) if len(full.genes[i]) > 40]
    assert len(long_cells) > 5
    for i in range(30):
        if i not in long_cells:
            np.testing.assert_array_equal(ours.genes[i], full.genes[i])
            assert not ours.truncated[i]
            continue
        assert ours.truncated[i] and len(ours.genes[i]) == 40
        assert ours.genes[i][0] == vocab["<cls>"] and ours.values[i][0] == -2
        pairs = dict(zip(full.genes[i][1:].tolist(), full.values[i][1:].tolist()))
        kept = list(zip(ours.genes[i][1:].tolist(), ours.values[i][1:].tolist()))
        assert len({g for g, _ in kept}) == 39
        assert all(pairs[g] == v for g, v in kept)  # bins come from all expressed genes
        order = [full.genes[i].tolist().index(g) for g, _ in kept]
        assert order != sorted(order)  # random order, as the official randperm


def test_quantile_edges_bit_identical_to_numpy():
    """The vectorised binning equals np.quantile + np.digitize on awkward float data."""
    from cellstrata.engine.models.scgpt import bin_edges_digits

    rng = np.random.default_rng(0)
    cells = [
        rng.lognormal(0, 3, rng.integers(1, 400)).astype(np.float32),
        rng.integers(1, 4, 300).astype(np.float32),
        np.full(17, 2.5, dtype=np.float32),
        np.array([1e-30, 3e38, 1.0], dtype=np.float32),
        (rng.random(1000) * 1e-3 + 1).astype(np.float32),
        np.array([7.0], dtype=np.float32),
    ] + [rng.choice([0.1, 0.3, 1 / 3, 7.77, 1e5], rng.integers(2, 90)).astype(np.float32) for _ in range(40)]
    values = np.concatenate(cells)
    counts = np.array([len(c) for c in cells])
    rows = np.repeat(np.arange(len(cells)), counts)
    left, right = bin_edges_digits(values, rows, counts, 51)
    start = 0
    for c in cells:
        bins = np.quantile(c, np.linspace(0, 1, 50))
        np.testing.assert_array_equal(left[start : start + len(c)], np.digitize(c, bins))
        np.testing.assert_array_equal(right[start : start + len(c)], np.digitize(c, bins, right=True))
        start += len(c)


# ------------------------------------------------------------------------------------------------
# model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return FAMILY.init_checkpoint("tiny", tmp_path_factory.mktemp("scgpt_tiny"), seed=11)


def _official_model(module: types.ModuleType, folder: Path, vocab: dict[str, int]) -> torch.nn.Module:
    args = FAMILY.load(folder).config
    model = module.TransformerModel(
        ntoken=len(vocab),
        d_model=args["embsize"],
        nhead=args["nheads"],
        d_hid=args["d_hid"],
        nlayers=args["nlayers"],
        nlayers_cls=args["n_layers_cls"],
        n_cls=1,
        vocab=vocab,
        dropout=args["dropout"],
        pad_token=args["pad_token"],
        pad_value=args["pad_value"],
        do_mvc=True,
        do_dab=False,
        use_batch_labels=False,
        domain_spec_batchnorm=False,
        explicit_zero_prob=False,
        use_fast_transformer=False,
        pre_norm=False,
    )
    state = torch.load(folder / "best_model.pt", map_location="cpu", weights_only=True)
    state = {k.replace("Wqkv.", "in_proj_"): v for k, v in state.items()}  # load_pretrained's rename
    model.load_state_dict(state, strict=True)  # our file has exactly the official key set
    model.transformer_encoder.enable_nested_tensor = False
    model.transformer_encoder.use_nested_tensor = False
    return model.eval()


def _official_hidden(model: torch.nn.Module, batch: TokenBatch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Layer 0 (``total_embs``, the encoder input) and every block's output, plus ``_encode``'s result."""
    states: list[torch.Tensor] = []
    hooks = [model.transformer_encoder.register_forward_pre_hook(lambda m, a: states.append(a[0].detach().clone()))]
    for layer in model.transformer_encoder.layers:
        hooks.append(layer.register_forward_hook(lambda m, a, out: states.append(out.detach().clone())))
    try:
        with torch.no_grad():
            out = model._encode(
                batch.genes, batch.values, src_key_padding_mask=batch.genes.eq(model.encoder.embedding.padding_idx)
            )
    finally:
        for h in hooks:
            h.remove()
    return states, out


def test_every_layer_matches_official_model(official_model_module, tiny_checkpoint):
    loaded = FAMILY.load(tiny_checkpoint)
    tok = loaded.tokenizer
    vocab = tok.vocab
    official = _official_model(official_model_module, tiny_checkpoint, vocab)

    names = _input_genes(2000, 50)
    X = _counts(12, len(names), seed=5)
    tb = tok.tokenize(CellBlock(np.arange(12), X), tok.map_genes(names))
    assert tb.empty[2] and tb.truncated.any()
    assert len(tb.genes[2]) == 1 and max(tb.lengths) == tok.max_length
    batch = _pad_batch(tb, list(range(12)), tok.pad_id, tok.pad_value)
    assert (batch.lengths < batch.genes.shape[1]).any()

    ref_states, ref_out = _official_hidden(official, batch)
    ours: list[torch.Tensor] = []
    with torch.inference_mode():
        loaded.model(batch, lambda layer, h: ours.append(h.clone()))
    assert len(ours) == len(ref_states) == loaded.n_layers + 1

    real = ~batch.padding_mask
    errors = []
    for layer, (a, b) in enumerate(zip(ours, ref_states)):
        a, b = a[real], b[real]
        rel = float((a - b).abs().max() / b.abs().max())
        errors.append(rel)
        assert b.abs().max() > 0.1 and b.std() > 0.1, f"layer {layer} activations trivial"
    worst = max(errors)
    print(f"scGPT per-layer max relative error vs official: {worst:.3e} ({[f'{e:.1e}' for e in errors]})")
    assert worst <= REL_TOL, f"max relative error {worst:.3e} > {REL_TOL} (per layer: {errors})"
    assert not torch.allclose(ours[1][real], ours[-1][real])  # layers differ

    # the published cell embedding: L2-normalised <cls> of the last layer (embed_data)
    spec = PoolSpec(("first_l2",), n_leading=1)
    starts = torch.arange(len(batch.lengths)) * batch.genes.shape[1]
    pooled = pool_cast_torch(ours[-1], starts, batch.lengths, spec, torch.float32)[0]
    ref_emb = F.normalize(ref_out[:, 0, :], p=2, dim=1)
    emb_err = float((pooled - ref_emb).abs().max())
    assert loaded.pool_ops["official"] == "first_l2"
    assert emb_err <= REL_TOL, f"official embedding max abs error {emb_err:.3e}"
    assert torch.allclose(ref_out[real], ref_states[-1][real])


def test_batch_composition_does_not_change_hidden_states(tiny_checkpoint):
    """A cell's hidden states are the same alone, padded beside longer cells, or in another order."""
    loaded = FAMILY.load(tiny_checkpoint)
    tok = loaded.tokenizer
    names = _input_genes(2000, 0)
    X = _counts(8, len(names), seed=6)
    tb = tok.tokenize(CellBlock(np.arange(8), X), tok.map_genes(names))
    short = int(np.argmin(np.where(tb.empty, 10**9, tb.lengths)))

    def last_layer(rows: list[int]) -> torch.Tensor:
        batch = _pad_batch(tb, rows, tok.pad_id, tok.pad_value)
        out: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            loaded.model(batch, lambda layer, h: out.__setitem__(layer, h.clone()))
        b = rows.index(short)
        return out[loaded.n_layers][b, : tb.lengths[short]]

    alone = last_layer([short])
    mixed = last_layer([*[i for i in range(8) if i != short], short])
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)


def test_gene_mapping_matches_embed_data():
    vocab = _vocab(300)
    names = [*_input_genes(300, 40), "<cls>"]
    mapping: GeneMapping = ScGPTTokenizer(vocab).map_genes(names)
    official = np.array([vocab.get(g, -1) for g in names[:-1]])
    np.testing.assert_array_equal(mapping.token_ids[:-1], official)
    assert mapping.token_ids[-1] == -1  # special tokens are not genes


class _FlashMHAStandIn(torch.nn.Module):
    """flash-attn 1.x ``FlashMHA`` restated in plain torch (same parameters: ``Wqkv``, ``out_proj``).

    ``Wqkv`` output is split as ``(three h d)``; ``key_padding_mask`` is True at real tokens.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        bias: bool = True,
        batch_first: bool = True,
        attention_dropout: float = 0.0,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.Wqkv = torch.nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, need_weights: bool = False):
        b, s, d = x.shape
        q, k, v = self.Wqkv(x).view(b, s, 3, self.num_heads, d // self.num_heads).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / (d // self.num_heads) ** 0.5
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, d)
        return self.out_proj(ctx), None


@pytest.mark.parametrize("pre_norm", [False, True])
def test_flash_layer_norm_schemes_match_official(official_model_module, monkeypatch, tmp_path, pre_norm):
    """The official FlashTransformerEncoderLayer (post and pre norm) on the flash-layout file as is."""
    import json

    folder = FAMILY.init_checkpoint("tiny", tmp_path / "ckpt", seed=5, genes=gene_symbols(500))
    args = json.loads((folder / "args.json").read_text())
    args["pre_norm"] = pre_norm
    (folder / "args.json").write_text(json.dumps(args))
    loaded = FAMILY.load(folder)
    tok = loaded.tokenizer

    monkeypatch.setattr(official_model_module, "flash_attn_available", True, raising=False)
    monkeypatch.setattr(official_model_module, "FlashMHA", _FlashMHAStandIn, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official = official_model_module.TransformerModel(
            ntoken=len(tok.vocab),
            d_model=64,
            nhead=4,
            d_hid=128,
            nlayers=4,
            vocab=tok.vocab,
            pad_token="<pad>",
            pad_value=-2,
            do_mvc=True,
            use_fast_transformer=True,
            fast_transformer_backend="flash",
            pre_norm=pre_norm,
        )
    state = torch.load(folder / "best_model.pt", map_location="cpu", weights_only=True)
    official.load_state_dict(state, strict=True)  # flash layout, no renaming
    official.eval()

    names = _input_genes(500, 0)
    X = _counts(10, len(names), seed=8)
    tb = tok.tokenize(CellBlock(np.arange(10), X), tok.map_genes(names))
    batch = _pad_batch(tb, list(range(10)), tok.pad_id, tok.pad_value)
    ref_states, _ = _official_hidden(official, batch)
    ours: list[torch.Tensor] = []
    with torch.inference_mode():
        loaded.model(batch, lambda layer, h: ours.append(h.clone()))
    real = ~batch.padding_mask
    errors = [float((a[real] - b[real]).abs().max() / b[real].abs().max()) for a, b in zip(ours, ref_states)]
    print(f"scGPT flash layer (pre_norm={pre_norm}) max relative error: {max(errors):.3e}")
    assert len(errors) == 5 and max(errors) <= REL_TOL, errors


def test_binning_fallback_for_huge_blocks_matches_numpy():
    """Blocks of >= 65536 cells take the argsort path; same digits as np.quantile + np.digitize."""
    from cellstrata.engine.models.scgpt import bin_edges_digits

    rng = np.random.default_rng(1)
    counts = rng.integers(0, 6, 66_000)
    values = rng.integers(1, 5, counts.sum()).astype(np.float32)
    rows = np.repeat(np.arange(len(counts)), counts)
    left, right = bin_edges_digits(values, rows, counts, 51)
    starts = np.concatenate(([0], np.cumsum(counts)))
    for c in rng.choice(np.flatnonzero(counts), 300, replace=False):
        x = values[starts[c] : starts[c + 1]]
        bins = np.quantile(x, np.linspace(0, 1, 50))
        np.testing.assert_array_equal(left[starts[c] : starts[c + 1]], np.digitize(x, bins))
        np.testing.assert_array_equal(right[starts[c] : starts[c + 1]], np.digitize(x, bins, right=True))
