"""scFoundation against independent restatements of the official code (it is not on PyPI).

- tokens: ``get_embedding.py``'s single-cell path restated with pandas and torch, one cell at a time
  (``main_gene_selection`` -> normalisation -> ``torch.tensor(values + [T, S])`` -> keep value > 0);
- layers: torch's own ``nn.TransformerEncoderLayer(d, heads, 4d, batch_first=True, norm_first=False)``
  (what the official ``pytorchTransformerModule`` stacks) after a float64 re-derivation of
  ``AutoDiscretizationEmbedding2`` + ``pos_emb``, with weights read by the official key names;
- the published ``pool_type='all'`` embedding: ``concat(S, T, max, mean)`` of ``encoder.norm`` output;
- end to end through ``cellstrata.extract`` and the CLI.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.device.batching import collate
from cellstrata.engine.input.datasets import gene_symbols, synthetic_dataset
from cellstrata.engine.input.sources import CellBlock
from cellstrata.engine.models.scfoundation import FAMILY, WEIGHTS_FILE, ScFoundationTokenizer

REL_TOL = 1e-5

# ------------------------------------------------------------------------------------------------
# the official recipe, restated


def _official_table(dense: np.ndarray, names: list[str], gene_list: list[str]) -> pd.DataFrame:
    """``main_gene_selection``: missing list genes appended as zero columns, then the list's columns."""
    df = pd.DataFrame(dense, columns=names)
    to_fill = list(set(gene_list) - set(df.columns))
    padding = pd.DataFrame(np.zeros((df.shape[0], len(to_fill))), columns=to_fill, index=df.index)
    df = pd.DataFrame(
        np.concatenate([d.values for d in (df, padding)], axis=1), columns=list(df.columns) + list(padding.columns)
    )
    return df[gene_list]


def _official_cell(row: pd.Series, pre_normalized: str, tgthighres: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and position ids ``get_embedding.py`` feeds the encoder for one cell (batch size 1)."""
    tmp = (np.log1p(row / row.sum() * 1e4) if pre_normalized == "F" else row).tolist()
    total = row.sum()
    kind, v = tgthighres[0], float(tgthighres[1:])
    if kind == "f":
        extra = [np.log10(total * v), np.log10(total)]
    elif kind == "a":
        extra = [np.log10(total) + v, np.log10(total)]
    else:
        extra = [v, np.log10(total)]
    x = torch.tensor(tmp + extra).unsqueeze(0)  # float64: the list ends in numpy float64 scalars
    labels = x > 0
    ids = torch.arange(x.shape[1]).repeat(1, 1)
    # gatherData of one row keeps the labelled positions in column order; token_emb gets x.float()
    return x[labels].float(), ids[labels]


def _counts(n_cells: int, names_in_list: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dense = np.zeros((n_cells, names_in_list))
    for i in range(n_cells):
        density = rng.choice([0.02, 0.05, 0.15])
        counts = rng.poisson(rng.choice([1, 4, 30]), names_in_list) + 1
        dense[i] = np.where(rng.random(names_in_list) < density, counts, 0)
    return dense


def _input_names(n_list: int, n_extra: int) -> tuple[list[str], list[str]]:
    """A gene list and input columns: a shuffled part of the list plus genes it lacks."""
    gene_list = gene_symbols(n_list)
    rng = np.random.default_rng(1)
    names = [gene_list[i] for i in rng.permutation(n_list)[: int(0.8 * n_list)]] + [
        f"XG{i:05d}" for i in range(n_extra)
    ]
    return gene_list, [names[i] for i in rng.permutation(len(names))]


@pytest.mark.parametrize(("pre_normalized", "tgthighres"), [("F", "t4"), ("F", "a5"), ("F", "f1"), ("T", "t4.5")])
def test_tokens_match_official_script(pre_normalized, tgthighres):
    gene_list, names = _input_names(400, 30)
    dense = _counts(30, len(names), seed=2)
    dense[3] = 0  # an empty cell
    dense[4] = 0
    dense[4, names.index("XG00000")] = 9  # counts only outside the gene list: empty too
    if pre_normalized == "T":
        dense = np.log1p(dense / np.maximum(dense.sum(1, keepdims=True), 1) * 1e4)
    dense = dense.astype(np.float32).astype(np.float64)  # an AnnData's float32 X, read by both
    table = _official_table(dense, names, gene_list)
    tok = ScFoundationTokenizer(gene_list, pre_normalized=pre_normalized, tgthighres=tgthighres)
    block, mapping = CellBlock(np.arange(30), sp.csr_matrix(dense.astype(np.float32))), tok.map_genes(names)
    for ours in (tok.tokenize(block, mapping), tok.tokenize_reference(block, mapping)):  # block and per-cell paths
        n_compared = 0
        for i in range(30):
            row = table.iloc[i, :]
            if row.sum() == 0:
                assert ours.empty[i]
                continue
            values, ids = _official_cell(row, pre_normalized, tgthighres)
            np.testing.assert_array_equal(ours.genes[i], ids.numpy())
            np.testing.assert_array_equal(ours.values[i], values.numpy())
            n_compared += 1
        assert n_compared >= 25


@pytest.mark.parametrize("pre_normalized", ["F", "T"])
def test_stored_zeros_are_not_tokens_as_official(pre_normalized):
    """A CSR input that stores explicit zeros: the script densifies ``adata.X`` (``toarray()``) and
    ``gatherData`` keeps value > 0, so a stored zero is no token and adds nothing to the total."""
    gene_list, names = _input_names(300, 20)
    rng = np.random.default_rng(17)
    n_cells, data, indices, indptr = 21, [], [], [0]
    for i in range(n_cells):
        cols = np.sort(rng.choice(len(names), int(rng.integers(2, 120)), replace=False))
        vals = (rng.poisson(rng.choice([1, 4, 30]), len(cols)) + 1).astype(np.float32)
        if pre_normalized == "T":
            vals = np.log1p(vals / vals.sum() * 1e4).astype(np.float32)
        vals[rng.random(len(cols)) < (1.0 if i == 6 else 0.4)] = 0  # cell 6 stores only zeros
        vals[-1] = 0  # a stored zero at the end of every row
        data.append(vals)
        indices.append(cols)
        indptr.append(indptr[-1] + len(cols))
    X = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.array(indptr)), shape=(n_cells, len(names)))
    in_list = np.isin(np.array(names)[X.indices], gene_list)
    assert X.has_canonical_format and int(((X.data == 0) & in_list).sum()) > 150
    tok = ScFoundationTokenizer(gene_list, pre_normalized=pre_normalized, tgthighres="t4")
    ours = tok.tokenize(CellBlock(np.arange(n_cells), X), tok.map_genes(names))
    table = _official_table(X.toarray().astype(np.float64), names, gene_list)
    n_compared = 0
    for i in range(n_cells):
        row = table.iloc[i, :]
        if row.sum() == 0:
            assert ours.empty[i] and ours.genes[i].size == 0
            continue
        values, ids = _official_cell(row, pre_normalized, "t4")
        np.testing.assert_array_equal(ours.genes[i], ids.numpy())
        np.testing.assert_array_equal(ours.values[i], values.numpy())
        n_compared += 1
    assert ours.empty[6] and n_compared >= 18


def test_one_count_cell_keeps_s_where_the_official_script_drops_it():
    """Documented departure: S = log10(1) = 0 would be dropped by gatherData (value > 0)."""
    gene_list = gene_symbols(20)
    dense = np.zeros((1, 20))
    dense[0, 4] = 1
    values, ids = _official_cell(_official_table(dense, gene_list, gene_list).iloc[0, :], "F", "t4")
    assert ids.tolist() == [4, 20]  # the official sequence: the gene and T only
    tok = ScFoundationTokenizer(gene_list)
    ours = tok.tokenize(CellBlock(np.arange(1), sp.csr_matrix(dense)), tok.map_genes(gene_list))
    assert ours.genes[0].tolist() == [4, 20, 21] and ours.values[0][-1] == 0
    np.testing.assert_array_equal(ours.values[0][:2], values.numpy())


# ------------------------------------------------------------------------------------------------
# the official encoder, rebuilt from torch


class _Oracle:
    """Float64 embedding equations + ``nn.TransformerEncoderLayer`` stack + ``encoder.norm``."""

    def __init__(self, folder: Path, entry: str = "cell", dtype: torch.dtype = torch.float64) -> None:
        raw = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)[entry]
        state = {k.split("model.")[1]: v for k, v in raw["state_dict"].items()}  # convertconfig
        cfg = raw["config"]["model_config"][raw["config"]["model"]]
        d, heads, depth = cfg["encoder"]["hidden_dim"], cfg["encoder"]["heads"], cfg["encoder"]["depth"]
        self.alpha = float(cfg["bin_alpha"])
        self.pad, self.mask = float(cfg["pad_token_id"]), float(cfg["mask_token_id"])
        self.dtype = dtype
        self.emb = {k: v.to(dtype) for k, v in state.items() if k.startswith(("token_emb.", "pos_emb."))}
        self.layers = []
        for i in range(depth):
            layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=d * 4, batch_first=True, norm_first=False)
            p = f"encoder.transformer_encoder.{i}."
            layer.load_state_dict({k[len(p) :]: v for k, v in state.items() if k.startswith(p)}, strict=True)
            self.layers.append(layer.to(dtype).eval())
        self.norm = nn.LayerNorm(d)
        self.norm.load_state_dict({"weight": state["encoder.norm.weight"], "bias": state["encoder.norm.bias"]})
        self.norm.to(dtype).eval()

    def embed(self, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        e = self.emb
        v = values.to(self.dtype).unsqueeze(-1)
        h = F.leaky_relu(v @ e["token_emb.mlp.weight"].T + e["token_emb.mlp.bias"], negative_slope=0.1)
        z = self.alpha * h + h @ e["token_emb.mlp2.weight"].T + e["token_emb.mlp2.bias"]
        x = torch.softmax(z, dim=-1) @ e["token_emb.emb.weight"]
        x[values == self.mask] = e["token_emb.emb_mask.weight"][0]
        x[values == self.pad] = e["token_emb.emb_pad.weight"][0]
        return x + e["pos_emb.weight"][positions]

    @torch.no_grad()
    def states(self, values: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output for a ``[B, S]`` batch (``padding`` True at pads), layer 0 first."""
        x = self.embed(values, positions)
        out = [x]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
            out.append(x)
        return out

    def cell(self, values: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """One cell, unpadded (the official way: batch size 1); ``[S, H]`` per layer."""
        pad = torch.zeros(1, len(values), dtype=torch.bool)
        return [s[0] for s in self.states(values[None], positions[None], pad)]

    @torch.no_grad()
    def published(self, last: torch.Tensor) -> torch.Tensor:
        """``pool_type='all'``: S, T, max and mean over ``geneemb[:, :-2]`` of the normed output."""
        g = self.norm(last)
        return torch.cat([g[-1], g[-2], g[:-2].max(0).values, g[:-2].mean(0)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return FAMILY.init_checkpoint("tiny", tmp_path_factory.mktemp("scf_parity"), seed=11)


def _block(loaded, n_cells: int, seed: int):
    gene_list = loaded.tokenizer.genes
    rng = np.random.default_rng(seed)
    shape = (n_cells, len(gene_list))
    dense = np.where(rng.random(shape) < rng.uniform(0.005, 0.06, (n_cells, 1)), rng.poisson(5, shape) + 1, 0)
    tok = loaded.tokenizer
    tb = tok.tokenize(CellBlock(np.arange(n_cells), sp.csr_matrix(dense.astype(np.float32))), tok.map_genes(gene_list))
    return tb


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("version", ["ce", "rde"])
def test_every_layer_matches_the_official_encoder_cell_by_cell(tiny, version):
    loaded = FAMILY.load(tiny, version=version)
    oracle = _Oracle(tiny, entry=loaded.checkpoint["entry"])
    tb = _block(loaded, 10, seed=3)
    assert not tb.empty.any() and len(set(tb.lengths.tolist())) > 5
    batch = collate(tb, np.arange(10), loaded.tokenizer.pad_id, loaded.tokenizer.pad_value)
    ours: list[torch.Tensor] = []
    with torch.inference_mode():
        loaded.model(batch, lambda layer, h: ours.append(h.clone()))
    assert len(ours) == loaded.n_layers + 1

    errors = np.zeros((10, len(ours)))
    for b in range(10):
        n = int(tb.lengths[b])
        ref = oracle.cell(torch.from_numpy(tb.values[b]), torch.from_numpy(tb.genes[b]))
        for layer, state in enumerate(ref):
            assert float(state.std()) > 0.1, f"layer {layer} activations trivial"
            errors[b, layer] = _rel(ours[layer][b, :n], state)
        emb = ref[-1]
        # the published embedding = our official pooling at layer L
        out = torch.empty(1, loaded.custom_poolings["official"].width)
        with torch.inference_mode():
            loaded.custom_poolings["official"](ours[-1][b : b + 1, :n], batch.lengths[b : b + 1], out, None, "torch")
        assert _rel(out[0], oracle.published(emb)) <= REL_TOL
    worst = errors.max(0)
    print(f"scFoundation per-layer max relative error vs nn.TransformerEncoderLayer (float64): {worst}")
    assert errors.max() <= REL_TOL, worst
    assert not torch.allclose(ours[1], ours[-1])


def test_official_batched_padding_convention_gives_the_same_states(tiny):
    """getEncoerDecoderData's padding (value 103, position seq_len, key mask) equals our padded path."""
    loaded = FAMILY.load(tiny)
    oracle = _Oracle(tiny, dtype=torch.float32)
    tb = _block(loaded, 7, seed=4)
    tok = loaded.tokenizer
    batch = collate(tb, np.arange(7), tok.pad_id, tok.pad_value)
    assert (batch.genes[batch.padding_mask] == 2002).all() and (batch.values[batch.padding_mask] == 103).all()
    ref = oracle.states(batch.values, batch.genes, batch.values == 103)  # official: padding = value == pad id
    ours: list[torch.Tensor] = []
    with torch.inference_mode():
        loaded.model(batch, lambda layer, h: ours.append(h.clone()))
    real = ~batch.padding_mask
    for layer in range(len(ours)):
        assert _rel(ours[layer][real], ref[layer][real]) <= REL_TOL, layer


def test_padded_batch_equals_per_cell_runs(tiny):
    loaded = FAMILY.load(tiny)
    tok = loaded.tokenizer
    tb = _block(loaded, 9, seed=5)
    together: dict[int, torch.Tensor] = {}
    batch = collate(tb, np.arange(9)[::-1].copy(), tok.pad_id, tok.pad_value)
    with torch.inference_mode():
        loaded.model(batch, lambda layer, h: together.__setitem__(layer, h.clone()))
    for row, cell in enumerate(np.arange(9)[::-1]):
        alone: dict[int, torch.Tensor] = {}
        one = collate(tb, np.array([cell]), tok.pad_id, tok.pad_value)
        with torch.inference_mode():
            loaded.model(one, lambda layer, h, alone=alone: alone.__setitem__(layer, h.clone()))
        n = int(tb.lengths[cell])
        for layer in alone:
            torch.testing.assert_close(together[layer][row, :n], alone[layer][0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def adata():
    return synthetic_dataset(40, 2000, seed=5, genes_per_cell=50, n_unknown_genes=20)


def test_extract_store_matches_the_official_recipe_per_cell(adata, tiny, tmp_path):
    store = cs.extract(
        adata, model="scfoundation", checkpoint=tiny, out=tmp_path / "s.zarr", poolings=["all"], dtype="float32",
        chunk_cells=16, progress=False,
    )  # fmt: skip
    assert store.poolings == ["mean", "max", "s_token", "t_token", "official"]
    pooled = {p: store.layers(p).compute() for p in store.poolings}
    assert pooled["mean"].shape == (5, 40, 64) and pooled["official"].shape == (5, 40, 256)
    assert store.attrs["official_layer"] == 4 and store.attrs["model"]["family"] == "scfoundation"
    assert store.attrs["tokenizer"]["pre_normalized"] == "F"

    oracle = _Oracle(tiny)
    gene_list = FAMILY.load(tiny).tokenizer.genes
    names = list(adata.var_names)
    dense = adata.X[:6].toarray().astype(np.float64)
    table = _official_table(dense, names, gene_list)
    n_tokens = np.asarray(cs.open_store(tmp_path / "s.zarr").group["n_tokens"][:])
    for i in range(6):
        values, ids = _official_cell(table.iloc[i, :], "F", "t4")
        assert n_tokens[i] == len(ids)
        states = oracle.cell(values, ids)
        for layer, h in enumerate(states):
            genes = h[:-2]
            ref = {
                "mean": genes.mean(0),
                "max": genes.max(0).values,
                "s_token": h[-1],
                "t_token": h[-2],
                "official": oracle.published(h),
            }
            for name, want in ref.items():
                got = torch.from_numpy(np.asarray(pooled[name][layer, i]))
                assert _rel(got, want) <= REL_TOL, (i, layer, name)


def test_cli_refuses_ensembl_ids(adata, tiny, tmp_path, capsys):
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "e.zarr"
    args = ["extract", str(path), "--model", "scfoundation", "--checkpoint", str(tiny), "--out", str(out), "--quiet"]
    assert main([*args, "--gene-column", "ensembl_id"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cellstrata: error:") and "\n" not in err
    assert "0 of 2020 input genes" in err and "HGNC gene symbol" in err and "--gene-column" in err
    assert not out.exists()
    assert main([*args, "--limit", "5", "--pool", "s_token,official"]) == 0
    assert cs.open_store(out).poolings == ["s_token", "official"]


def test_the_log_of_the_total_is_what_s_holds(adata, tiny):
    """S of every cell is log10 of its counts over the gene list's genes (unknown genes excluded)."""
    tok = FAMILY.load(tiny).tokenizer
    mapping = tok.map_genes(list(adata.var_names))
    tb = tok.tokenize(CellBlock(np.arange(adata.n_obs), adata.X), mapping)
    known = mapping.token_ids >= 0
    totals = np.asarray(adata.X[:, known].sum(1)).ravel()
    assert (~known).sum() == 20
    got = np.array([v[-1] for v in tb.values])
    np.testing.assert_array_equal(got, np.log10(totals.astype(np.float64)).astype(np.float32))
    assert all(math.isclose(float(v[-2]), 4.0) for v in tb.values)
