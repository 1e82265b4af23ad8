"""What every model family promises, checked once for each registered family (the four built in and a toy).

A family's own test file keeps only what is its own (official files, tokens by hand, parity with the
official code); what the template and the pipeline rely on is asserted here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits
from toy_family import ToyFamily

from cellstrata.demo import GENE_COLUMN
from cellstrata.engine.batching import collate
from cellstrata.engine.datasets import synthetic_dataset, unknown_gene_symbols
from cellstrata.engine.models import family_names, get_family
from cellstrata.engine.models.base import concat_blocks
from cellstrata.engine.models.family import CheckpointFamily
from cellstrata.engine.sources import CellBlock
from cellstrata.errors import CheckpointError, ConfigError, GeneOverlapError

FAMILIES = [*family_names(), "toy"]


def family_of(name: str) -> CheckpointFamily:
    return ToyFamily() if name == "toy" else get_family(name)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> CheckpointFamily:
    return family_of(request.param)


@pytest.fixture(scope="module")
def tiny(family, tmp_path_factory):
    """A tiny checkpoint written by the family, and its random seed."""
    seed = int(np.random.default_rng().integers(0, 10_000))
    folder = family.init_checkpoint("tiny", tmp_path_factory.mktemp(family.name) / "ckpt", seed=seed)
    return folder, seed


@pytest.fixture(scope="module")
def cells(family):
    """Synthetic counts and the gene identifiers the family matches (symbols or Ensembl ids)."""
    adata = synthetic_dataset(24, n_genes=400, seed=11, genes_per_cell=120)
    column = GENE_COLUMN.get(family.name)
    names = list(adata.var[column]) if column else list(adata.var_names)
    return sp.csr_matrix(adata.X), names


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_family_is_a_checkpoint_family_with_a_tiny_preset(family):
    assert isinstance(family, CheckpointFamily)
    assert "tiny" in family.presets and family.default_poolings
    assert set(family.default_poolings) <= set(family.pool_ops) | {"official"}
    if family.name != "toy":
        assert get_family(family.name.upper()) is family


def test_build_random_gives_what_init_checkpoint_then_load_give(family, tiny):
    folder, seed = tiny
    loaded = family.load(folder, seed=seed)
    built = family.build_random("tiny", seed=seed)
    assert states_equal(loaded.model, built.model)
    assert loaded.tokenizer.settings() == built.tokenizer.settings()
    assert dict(loaded.config) == dict(built.config) and list(loaded.config) == list(built.config)
    assert loaded.layout == built.layout and dict(loaded.pool_ops) == dict(built.pool_ops)
    assert tuple(loaded.default_poolings) == tuple(built.default_poolings)
    assert set(loaded.custom_poolings) == set(built.custom_poolings)
    assert (loaded.n_layers, loaded.hidden_size, loaded.official_layer, loaded.preset) == (
        built.n_layers,
        built.hidden_size,
        built.official_layer,
        built.preset,
    )
    assert built.checkpoint["path"] is None and loaded.checkpoint["path"] == str(folder.resolve())
    weights = loaded.checkpoint["files"]
    assert loaded.checkpoint["sha256"] in {f.get("sha256") for f in weights.values()}


def test_init_checkpoint_is_seeded(family, tiny, tmp_path):
    folder, seed = tiny
    again = family.load(family.init_checkpoint("tiny", tmp_path / "again", seed=seed), seed=seed)
    other = family.load(family.init_checkpoint("tiny", tmp_path / "other", seed=seed + 1), seed=seed)
    first = family.load(folder, seed=seed)
    assert states_equal(first.model, again.model) and not states_equal(first.model, other.model)


def test_every_preset_builds_on_the_meta_device(family):
    for preset in family.presets:
        built = family.build_random(preset, device="meta", weights=False)
        assert all(p.is_meta for p in built.model.parameters()), preset
        assert built.n_layers >= 1 and built.hidden_size >= 1 and built.preset == preset
        assert built.official_layer is None or 0 <= built.official_layer <= built.n_layers


def test_unknown_preset_option_and_folder_are_one_clear_error(family, tiny, tmp_path):
    folder, _ = tiny
    with pytest.raises(ConfigError, match=r"known presets: .*tiny"):
        family.init_checkpoint("no-such-preset", tmp_path / "x")
    with pytest.raises(ConfigError, match="colour"):
        family.load(folder, colour="red")
    with pytest.raises(CheckpointError) as err:
        family.load(tmp_path / "missing")
    assert "\n" not in str(err.value) and "missing" in str(err.value)


def test_no_gene_in_the_vocabulary_is_one_line_naming_the_gene_column(family, tiny):
    folder, seed = tiny
    tok = family.load(folder, seed=seed).tokenizer
    with pytest.raises(GeneOverlapError) as err:
        tok.map_genes(unknown_gene_symbols(30))
    assert "\n" not in str(err.value) and "--gene-column" in str(err.value)


def test_tokens_do_not_depend_on_the_block_and_match_the_per_cell_rule(family, tiny, cells):
    folder, seed = tiny
    X, names = cells
    tok = family.load(folder, seed=seed).tokenizer
    mapping = tok.map_genes(names)
    index = np.arange(X.shape[0]) * 3 + 5
    whole = tok.tokenize(CellBlock(index, X), mapping)
    reference = tok.tokenize_reference(CellBlock(index, X), mapping)
    halves = concat_blocks([tok.tokenize(CellBlock(index[s], X[s]), mapping) for s in (slice(0, 9), slice(9, None))])
    rows = np.random.default_rng().permutation(X.shape[0])[:6]
    picked = tok.tokenize(CellBlock(np.sort(index[rows]), X[np.sort(rows)]), mapping)
    for other in (reference, halves):
        np.testing.assert_array_equal(other.indices, whole.indices)
        for a, b, c, d in zip(whole.genes, other.genes, whole.values, other.values):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(c, d)
    for j, r in enumerate(np.sort(rows)):
        np.testing.assert_array_equal(picked.genes[j], whole.genes[r])
        np.testing.assert_array_equal(picked.values[j], whole.values[r])
    assert not whole.empty.any() and json.dumps(tok.settings())


def test_forward_taps_every_layer_in_order_and_runs_under_bf16_autocast(family, tiny, cells):
    folder, seed = tiny
    X, names = cells
    loaded = family.load(folder, seed=seed)
    tok = loaded.tokenizer
    block = tok.tokenize(CellBlock(np.arange(5), X[:5]), tok.map_genes(names))
    batch = collate(block, np.arange(5), tok.pad_id, tok.pad_value)
    real = ~batch.padding_mask
    runs = {}
    for dtype in (None, torch.bfloat16):
        seen: list[tuple[int, torch.Tensor]] = []
        autocast = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        with threadpool_limits(limits=1), torch.inference_mode(), autocast:
            loaded.model(batch, lambda layer, h, seen=seen: seen.append((layer, h.float().clone())))
        assert [layer for layer, _ in seen] == list(range(loaded.n_layers + 1))
        assert all(h.shape == (*batch.genes.shape, loaded.hidden_size) for _, h in seen)
        runs[dtype] = [h for _, h in seen]
    exact, bf16 = runs[None], runs[torch.bfloat16]
    for layer in range(loaded.n_layers + 1):
        assert torch.isfinite(exact[layer][real]).all() and torch.isfinite(bf16[layer][real]).all()
        rel = (bf16[layer][real] - exact[layer][real]).abs().max() / exact[layer][real].abs().max()
        assert rel < 0.1, (layer, float(rel))
        if layer:  # random weights that do something: every layer changes the hidden states
            assert not torch.allclose(exact[layer][real], exact[layer - 1][real], atol=1e-3)
