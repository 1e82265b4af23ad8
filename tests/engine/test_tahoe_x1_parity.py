"""Tahoe-X1 against the official equations (the official package cannot be installed beside current torch).

Everything official here is re-derived in this file from ``tahoebio/tahoe-x1`` (``data/dataloader.py``
``CountDataset``, ``data/collator.py`` ``DataCollator``/``binning``, ``model/blocks.py`` ``TXBlock``,
``TXEncoder``, ``GeneEncoder``, ``ContinuousValueEncoder``, ``model/model.py`` ``transformer_generate``,
``scripts/inference/predict_embeddings.py``) and llm-foundry's ``GroupedQueryAttention``; the model is
computed in float64 from the safetensors file by the official key names, never through our module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

from cellstrata.engine.input.datasets import gene_ensembl_ids
from cellstrata.engine.input.sources import CellBlock
from cellstrata.engine.models.base import TokenBatch
from cellstrata.engine.models.tahoe_x1 import (
    FAMILY,
    PRESETS,
    TahoeX1Model,
    TahoeX1Tokenizer,
    bin_values,
    official_key_shapes,
)

REL_TOL = 1e-5


# ------------------------------------------------------------------------------------------------
# the official collator, re-derived (inference: do_mlm=False, do_binning=True, right_binning=False)


def _official_binning(row: torch.Tensor, n_bins: int) -> torch.Tensor:
    grades = torch.linspace(0, 1, n_bins - 1, dtype=torch.float32)
    if row.min() <= 0:
        nz = row.nonzero()
        digits = torch.bucketize(row[nz], torch.quantile(row[nz], grades))
        out = torch.zeros_like(row, dtype=digits.dtype)
        out[nz] = digits
    else:
        out = torch.bucketize(row, torch.quantile(row, grades))
    return out + 1


def _official_cell(X: sp.csr_matrix, i: int, gene_ids: np.ndarray, cls_id: int, keep: int, n_bins: int):
    """``CountDataset.__getitem__`` + the binning step of ``DataCollator.__call__`` for one cell (no sampling)."""
    row = X.getrow(i)
    genes = np.insert(gene_ids[row.indices], 0, cls_id)
    values = np.insert(row.data, 0, -2)
    genes = torch.tensor(genes, dtype=torch.long)
    expr = torch.tensor(values, dtype=torch.float)
    if len(expr) > keep:
        expr[keep:] = _official_binning(expr[keep:], n_bins).to(expr.dtype)
    return genes.numpy(), expr.numpy()


def _vocab(n: int) -> dict[str, int]:
    vocab = {g: i for i, g in enumerate(gene_ensembl_ids(n))}
    for t in ("<pad>", "<cls>", "<eoc>"):
        vocab[t] = len(vocab)
    return vocab


def _counts(n_cells: int, n_genes: int, seed: int, kind: str, max_density: float = 0.6) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    mask = rng.random((n_cells, n_genes)) < rng.uniform(0.01, max_density, (n_cells, 1))
    if kind == "poisson":
        vals = rng.poisson(2, (n_cells, n_genes)) + 1.0
    elif kind == "heavy":  # large counts: the quantile lerp rounds
        vals = np.floor(rng.lognormal(2, 2.5, (n_cells, n_genes))) + 1.0
    else:  # non-integer "counts" (e.g. ambient-corrected)
        vals = rng.lognormal(0, 2, (n_cells, n_genes))
    dense = np.where(mask, vals, 0).astype(np.float32)
    dense[0] = 0  # an empty cell
    dense[1] = 0
    dense[1, 3] = 5.0  # a one-gene cell
    return sp.csr_matrix(dense)


def _with_stored_zeros(n_cells: int, n_genes: int, seed: int, zero_fraction: float = 0.3) -> sp.csr_matrix:
    """Counts whose CSR arrays also store explicit zeros, built from (data, indices, indptr) so they stay stored.

    Cell 0 stores nothing, cell 1 stores only zeros, cell 2 stores a zero as its first entry; the other
    cells mix counts with stored zeros anywhere in the row (any column order of the entries is kept sorted).
    """
    rng = np.random.default_rng(seed)
    data, indices, indptr = [], [], [0]
    for i in range(n_cells):
        n = 0 if i == 0 else int(rng.integers(2, min(n_genes, 40 + 7 * i)))
        cols = np.sort(rng.choice(n_genes, n, replace=False))
        vals = (np.floor(rng.lognormal(1, 1.5, n)) + 1).astype(np.float32)
        vals[rng.random(n) < zero_fraction] = 0
        if i == 1:
            vals[:] = 0
        elif n:
            vals[0], vals[-1] = 0, max(vals[-1], 1)  # a leading zero, and at least one count
        data.append(vals)
        indices.append(cols)
        indptr.append(indptr[-1] + n)
    X = sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices).astype(np.int32), np.array(indptr)), shape=(n_cells, n_genes)
    )
    assert (X.data == 0).sum() > n_cells and X.has_canonical_format  # the zeros are stored
    return X


@pytest.mark.parametrize("keep", [1, 2])
def test_stored_zeros_are_tokens_in_bin_one_as_official(keep):
    """``CountDataset`` takes every stored entry (``row.indices``/``row.data``), zeros included, and
    ``binning`` puts a zero in bin 1 while the quantile edges come from the non-zero values only."""
    n_genes, n_cells = 300, 23
    X = _with_stored_zeros(n_cells, n_genes, seed=10 + keep)
    vocab = _vocab(n_genes)
    tok = TahoeX1Tokenizer(vocab, max_length=10_000, keep_first_n_tokens=keep)
    got = tok.tokenize(CellBlock(np.arange(n_cells), X), tok.map_genes(gene_ensembl_ids(n_genes)))
    # cells 0 (nothing stored) and 1 (only zeros): the official binning raises on them; stored as empty
    assert got.empty.tolist() == [True, True] + [False] * (n_cells - 2)
    assert got.genes[0].tolist() == got.genes[1].tolist() == [vocab["<cls>"]]
    n_zero_tokens = 0
    for i in range(2, n_cells):
        genes, values = _official_cell(X, i, np.arange(n_genes), vocab["<cls>"], keep, 51)
        np.testing.assert_array_equal(got.genes[i], genes, err_msg=f"cell {i}")
        np.testing.assert_array_equal(got.values[i], values, err_msg=f"cell {i}")
        zero = X.getrow(i).data[keep - 1 :] == 0
        assert np.all(values[keep:][zero] == 1)
        n_zero_tokens += int(zero.sum())
    assert n_zero_tokens > 50
    # keep_first_n_tokens=2: a stored zero in first place stays a raw 0, as the official collator leaves it
    assert keep == 1 or all(got.values[i][1] == 0 for i in range(2, n_cells))


@pytest.mark.parametrize(("kind", "keep"), [("poisson", 1), ("heavy", 1), ("float", 1), ("heavy", 2)])
def test_tokens_match_official_collator(kind, keep):
    n_genes = 600
    X = _counts(60, n_genes, seed=len(kind) + keep, kind=kind)
    vocab = _vocab(n_genes)
    # the input's columns: vocabulary genes in a shuffled order plus genes outside it (dropped, as
    # predict_embeddings.py subsets adata to id_in_vocab >= 0 first)
    perm = np.random.default_rng(0).permutation(n_genes)
    names = [gene_ensembl_ids(n_genes)[j] for j in perm]
    names[::50] = [f"ENSG9{j:010d}" for j in range(len(names[::50]))]
    tok = TahoeX1Tokenizer(vocab, max_length=10_000, keep_first_n_tokens=keep)
    got = tok.tokenize(CellBlock(np.arange(60), X), tok.map_genes(names))
    in_vocab = np.array([n in vocab for n in names])
    X_off = X[:, np.flatnonzero(in_vocab)]
    gene_ids = np.array([vocab[n] for n, ok in zip(names, in_vocab) if ok])
    for i in range(60):
        if X_off.getrow(i).nnz == 0:
            assert got.empty[i] and got.genes[i].tolist() == [vocab["<cls>"]]
            continue
        genes, values = _official_cell(X_off, i, gene_ids, vocab["<cls>"], keep, 51)
        np.testing.assert_array_equal(got.genes[i], genes)
        np.testing.assert_array_equal(got.values[i], values)


def test_batched_quantile_equals_torch_quantile_per_cell():
    """The vectorised edges are bit-identical to ``torch.quantile`` on each cell, even where lerp rounds."""
    rng = np.random.default_rng(11)
    counts = rng.integers(1, 4000, 600)
    values = np.concatenate(
        [
            rng.lognormal(0, 3, counts[:200].sum()),
            np.floor(rng.lognormal(3, 3, counts[200:400].sum())) + 1,
            rng.poisson(1, counts[400:].sum()) + 1.0,
        ]
    ).astype(np.float32)
    digits = bin_values(values, counts, 51)
    grades = torch.linspace(0, 1, 50)
    starts = np.concatenate(([0], np.cumsum(counts)))
    for i in range(len(counts)):
        cell = torch.from_numpy(values[starts[i] : starts[i + 1]].copy())
        ref = torch.bucketize(cell, torch.quantile(cell, grades)) + 1
        np.testing.assert_array_equal(digits[starts[i] : starts[i + 1]], ref.numpy(), err_msg=f"cell {i}")


def test_ambiguous_lerp_falls_back_to_torch_quantile(monkeypatch):
    import cellstrata.engine.models.tahoe_x1.tokenizer as mod

    real = mod._lerp_both_paths

    def disagree(below, above, weight):
        vec, scalar = real(below, above, weight)
        vec = vec.clone()
        vec[::3, 7] = 123.0  # pretend the two roundings differ for every third cell
        return vec, scalar

    monkeypatch.setattr(mod, "_lerp_both_paths", disagree)
    rng = np.random.default_rng(2)
    counts = rng.integers(1, 300, 50)
    values = rng.lognormal(0, 2, counts.sum()).astype(np.float32)
    edges = mod.quantile_edges(values, counts, 51)
    starts = np.concatenate(([0], np.cumsum(counts)))
    for i in range(50):
        ref = torch.quantile(torch.from_numpy(values[starts[i] : starts[i + 1]].copy()), torch.linspace(0, 1, 50))
        np.testing.assert_array_equal(edges[i], ref.numpy())


def test_over_long_cells_follow_the_sampling_rule():
    """``_sample``: the first keep_first_n_tokens stay, the rest is a random subset of the binned sequence."""
    n_genes, max_length = 500, 64
    X = _counts(20, n_genes, seed=4, kind="heavy")
    vocab = _vocab(n_genes)
    names = gene_ensembl_ids(n_genes)
    for keep in (1, 2):
        tok = TahoeX1Tokenizer(vocab, max_length=max_length, keep_first_n_tokens=keep, seed=3)
        got = tok.tokenize(CellBlock(np.arange(20), X), tok.map_genes(names))
        gene_ids = np.arange(n_genes)
        for i in range(20):
            genes, values = _official_cell(X, i, gene_ids, vocab["<cls>"], keep, 51)
            if len(genes) <= max_length:
                assert not got.truncated[i] and np.array_equal(got.genes[i], genes)
                continue
            assert got.truncated[i] and len(got.genes[i]) == max_length
            np.testing.assert_array_equal(got.genes[i][:keep], genes[:keep])
            np.testing.assert_array_equal(got.values[i][:keep], values[:keep])
            pos = {g: j for j, g in enumerate(genes.tolist())}
            idx = [pos[g] for g in got.genes[i][keep:].tolist()]
            assert len(set(idx)) == max_length - keep and min(idx) >= keep
            np.testing.assert_array_equal(got.values[i][keep:], values[idx])


# ------------------------------------------------------------------------------------------------
# the official model, re-derived in float64 from the safetensors file


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _act(name: str):
    return {"relu": torch.relu, "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / np.sqrt(2.0)))}[name]


def official_states(state: dict[str, torch.Tensor], genes, values, n_heads, act, expr_act) -> list[torch.Tensor]:
    """Per-layer ``[S, d]`` float64 states of one unpadded cell (the flash path's unpadded sequence).

    ``transformer_generate``: ``h0 = enc_norm(embedding(genes)) + norm(linear2(act(linear1(clamp(v, max=512)))))``
    (+ ``flag_encoder(1) * gen_mask`` = 0); ``TXBlock`` pre-norm: ``x + out_proj(attn(norm1 x))``,
    ``x + down_proj(act(up_proj(norm2 x)))``; attention: ``Wqkv`` split [q | k | v], heads ``(h d)``,
    softmax(q k^T / sqrt(d/h)). Returns h0 and every block output (before ``transformer_encoder.norm``).
    """
    p = {k[len("model.") :]: v.double() for k, v in state.items()}
    a, ea = _act(act), _act(expr_act)
    g = p["gene_encoder.embedding.weight"][torch.as_tensor(genes)]
    g = _ln(g, p["gene_encoder.enc_norm.weight"], p["gene_encoder.enc_norm.bias"])
    v = torch.as_tensor(values, dtype=torch.float64)[:, None].clamp(max=512)
    e = ea(v @ p["expression_encoder.linear1.weight"].T + p["expression_encoder.linear1.bias"])
    e = e @ p["expression_encoder.linear2.weight"].T + p["expression_encoder.linear2.bias"]
    e = _ln(e, p["expression_encoder.norm.weight"], p["expression_encoder.norm.bias"])
    x = g + e
    out = [x]
    n_layers = 1 + max(int(k.split(".")[2]) for k in p if k.startswith("transformer_encoder.layers."))
    s, d = x.shape
    hd = d // n_heads
    for i in range(n_layers):
        q = f"transformer_encoder.layers.{i}."
        y = _ln(x, p[q + "norm1.weight"], p[q + "norm1.bias"])
        qkv = y @ p[q + "self_attn.Wqkv.weight"].T + p[q + "self_attn.Wqkv.bias"]
        qh, kh, vh = (qkv[:, j * d : (j + 1) * d].reshape(s, n_heads, hd).transpose(0, 1) for j in range(3))
        att = torch.softmax(qh @ kh.transpose(1, 2) / np.sqrt(hd), dim=-1) @ vh
        att = att.transpose(0, 1).reshape(s, d)
        x = x + att @ p[q + "self_attn.out_proj.weight"].T + p[q + "self_attn.out_proj.bias"]
        y = _ln(x, p[q + "norm2.weight"], p[q + "norm2.bias"])
        ff = a(y @ p[q + "up_proj.weight"].T + p[q + "up_proj.bias"])
        x = x + ff @ p[q + "down_proj.weight"].T + p[q + "down_proj.bias"]
        out.append(x)
    return out


def published_cell_embedding(state: dict[str, torch.Tensor], last: torch.Tensor) -> np.ndarray:
    """``predict_embeddings.py``: ``cell_emb`` = CLS of ``transformer_encoder.norm(output)``, divided by its norm."""
    emb = _ln(
        last[0],
        state["model.transformer_encoder.norm.weight"].double(),
        state["model.transformer_encoder.norm.bias"].double(),
    )
    emb = emb.float().numpy()
    return emb / np.linalg.norm(emb)


@pytest.fixture(scope="module", params=["relu", "gelu"])
def checkpoint(request, tmp_path_factory) -> Path:
    folder = FAMILY.init_checkpoint("tiny", tmp_path_factory.mktemp(request.param) / "tx", seed=21)
    if request.param == "gelu":  # the 3b activations on the tiny size
        import yaml

        cfg = yaml.safe_load((folder / "model_config.yml").read_text())
        cfg["transformer_activation"] = "gelu"
        cfg["expression_encoder"]["activation"] = "gelu"
        (folder / "model_config.yml").write_text(yaml.safe_dump(cfg))
    return folder


def _batch(tb, rows: list[int], pad_id: int, pad_value: float) -> TokenBatch:
    lengths = [len(tb.genes[i]) for i in rows]
    s = max(lengths)
    genes = torch.full((len(rows), s), pad_id)
    values = torch.full((len(rows), s), pad_value)
    for j, i in enumerate(rows):
        genes[j, : lengths[j]] = torch.from_numpy(tb.genes[i])
        values[j, : lengths[j]] = torch.from_numpy(tb.values[i])
    return TokenBatch(genes, values, torch.tensor(lengths), np.arange(len(rows)))


def _run(model, batch) -> dict[int, torch.Tensor]:
    states: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        model(batch, lambda layer, h: states.__setitem__(layer, h.clone()))
    return states


def test_every_layer_matches_official_equations(checkpoint):
    loaded = FAMILY.load(checkpoint)
    state = load_file(str(checkpoint / "model.safetensors"))
    cfg = loaded.model.config
    tok = loaded.tokenizer
    X = _counts(8, 2000, seed=8, kind="heavy", max_density=0.2)
    tb = tok.tokenize(CellBlock(np.arange(8), X), tok.map_genes(gene_ensembl_ids(2000)))
    rows = [i for i in range(8) if not tb.empty[i]]
    batch = _batch(tb, rows, tok.pad_id, tok.pad_value)
    assert len(set(batch.lengths.tolist())) > 2  # a padded batch
    ours = _run(loaded.model, batch)
    official = loaded.custom_poolings["official"]
    for j, i in enumerate(rows):
        ref = official_states(
            state, tb.genes[i], tb.values[i], cfg.n_heads, cfg.transformer_activation, cfg.expression_activation
        )
        n = len(tb.genes[i])
        for layer, r in enumerate(ref):
            got = ours[layer][j, :n].double()
            rel = float((got - r).abs().max() / r.abs().max())
            assert rel <= REL_TOL, (i, layer, rel)
        # the official pooling at layer L is the published cell embedding
        out = torch.empty(1, cfg.d_model)
        official(ours[cfg.n_layers][j : j + 1], batch.lengths[j : j + 1], out, None, "torch")
        np.testing.assert_allclose(out[0].numpy(), published_cell_embedding(state, ref[-1]), atol=2e-6)


def test_cells_with_stored_zeros_match_official_at_every_layer(checkpoint):
    """End to end on a CSR input with stored zeros: the official tokens (every stored entry, zeros in
    bin 1) through the official equations, against our tokenizer and model."""
    loaded = FAMILY.load(checkpoint)
    state = load_file(str(checkpoint / "model.safetensors"))
    cfg, tok = loaded.model.config, loaded.tokenizer
    n_cells = 9
    X = _with_stored_zeros(n_cells, 2000, seed=5)
    tb = tok.tokenize(CellBlock(np.arange(n_cells), X), tok.map_genes(gene_ensembl_ids(2000)))
    rows = list(range(2, n_cells))  # cells 0 and 1 store no count: empty
    assert not tb.truncated.any() and tb.empty[:2].all() and not tb.empty[2:].any()
    ours = _run(loaded.model, _batch(tb, rows, tok.pad_id, tok.pad_value))
    for j, i in enumerate(rows):
        genes, values = _official_cell(X, i, np.arange(2000), tok.cls_id, cfg.keep_first_n_tokens, cfg.num_bins)
        ref = official_states(state, genes, values, cfg.n_heads, cfg.transformer_activation, cfg.expression_activation)
        n = len(genes)
        assert len(tb.genes[i]) == n
        for layer, r in enumerate(ref):
            rel = float((ours[layer][j, :n].double() - r).abs().max() / r.abs().max())
            assert rel <= REL_TOL, (i, layer, rel)


def test_padded_batch_equals_each_cell_alone(checkpoint):
    loaded = FAMILY.load(checkpoint)
    tok = loaded.tokenizer
    X = _counts(10, 2000, seed=3, kind="poisson", max_density=0.2)
    tb = tok.tokenize(CellBlock(np.arange(10), X), tok.map_genes(gene_ensembl_ids(2000)))
    rows = [i for i in range(10) if not tb.empty[i]]
    together = _run(loaded.model, _batch(tb, rows, tok.pad_id, tok.pad_value))
    for j, i in enumerate(rows):
        alone = _run(loaded.model, _batch(tb, [i], tok.pad_id, tok.pad_value))
        n = len(tb.genes[i])
        for layer in alone:
            torch.testing.assert_close(together[layer][j, :n], alone[layer][0], rtol=1e-5, atol=1e-5)


def test_flag_encoder_adds_nothing_at_inference(checkpoint):
    """``flag_embs = gen_masks * flag_encoder(1)`` with every gen_mask False: zero, whatever the weights."""
    state = load_file(str(checkpoint / "model.safetensors"))
    flag = state["model.flag_encoder.weight"][1]
    assert float(flag.abs().max()) > 0
    gen_masks = torch.zeros(2, 7, dtype=torch.bool)  # DataCollator: do_mlm=False -> zeros_like(expressions)
    assert float((gen_masks.unsqueeze(-1).float() * flag.reshape(1, 1, -1)).abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------
# released key lists


def published_keys(d: int, n_layers: int, vocab: int, decoder_layers: int = 1) -> dict[str, tuple[int, ...]]:
    """The ``ComposerTX`` state dict of the released configs (use_norm encoders, mvc inner product)."""
    keys = {
        "model.gene_encoder.embedding.weight": (vocab, d),
        "model.gene_encoder.enc_norm.weight": (d,),
        "model.gene_encoder.enc_norm.bias": (d,),
        "model.flag_encoder.weight": (2, d),
        "model.expression_encoder.linear1.weight": (d, 1),
        "model.expression_encoder.linear1.bias": (d,),
        "model.expression_encoder.linear2.weight": (d, d),
        "model.expression_encoder.linear2.bias": (d,),
        "model.expression_encoder.norm.weight": (d,),
        "model.expression_encoder.norm.bias": (d,),
        "model.transformer_encoder.norm.weight": (d,),
        "model.transformer_encoder.norm.bias": (d,),
        "model.expression_decoder.out_proj.weight": (1, d),
        "model.expression_decoder.out_proj.bias": (1,),
        "model.mvc_decoder.gene2query.weight": (d, d),
        "model.mvc_decoder.gene2query.bias": (d,),
        "model.mvc_decoder.W.weight": (d, d),
    }
    for j in range(decoder_layers):
        keys[f"model.expression_decoder.linear_layers.{j}.weight"] = (d, d)
        keys[f"model.expression_decoder.linear_layers.{j}.bias"] = (d,)
    for i in range(n_layers):
        p = f"model.transformer_encoder.layers.{i}."
        keys[p + "self_attn.Wqkv.weight"] = (3 * d, d)
        keys[p + "self_attn.Wqkv.bias"] = (3 * d,)
        keys[p + "self_attn.out_proj.weight"] = (d, d)
        keys[p + "self_attn.out_proj.bias"] = (d,)
        keys[p + "up_proj.weight"] = (4 * d, d)
        keys[p + "up_proj.bias"] = (4 * d,)
        keys[p + "down_proj.weight"] = (d, 4 * d)
        keys[p + "down_proj.bias"] = (d,)
        for n in ("norm1", "norm2"):
            keys[p + n + ".weight"] = (d,)
            keys[p + n + ".bias"] = (d,)
    return keys


@pytest.mark.parametrize(("preset", "d", "n_layers"), [("70m", 512, 12), ("1b", 2048, 24), ("3b", 2560, 32)])
def test_released_presets_have_the_published_keys(preset, d, n_layers):
    cfg = PRESETS[preset]
    expected = published_keys(d, n_layers, cfg.vocab_size)
    assert official_key_shapes(cfg) == expected
    with torch.device("meta"):
        model = TahoeX1Model(cfg, pad_id=cfg.vocab_size - 3)
    ours = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    heads = {k: s for k, s in expected.items() if k.startswith(("model.expression_decoder.", "model.mvc_decoder."))}
    assert ours == {k: s for k, s in expected.items() if k not in heads}
    assert len(heads) == 7
    n_params = sum(int(np.prod(s)) for s in expected.values())
    assert {"70m": 60e6 < n_params < 110e6, "1b": 1.1e9 < n_params < 1.5e9, "3b": 2.5e9 < n_params < 3.2e9}[preset]
