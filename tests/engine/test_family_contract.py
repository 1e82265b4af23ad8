"""What every model family promises, checked once for each registered family (the four built in and a toy).

A family's own test file keeps only what is its own (official files, tokens by hand, parity with the
official code); what the template and the pipeline rely on is asserted here.
"""

from __future__ import annotations

import itertools
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits
from toy_family import ToyFamily

from cellstrata.demo import GENE_COLUMN
from cellstrata.engine.device.batching import collate
from cellstrata.engine.input.datasets import synthetic_dataset, unknown_gene_symbols
from cellstrata.engine.input.sources import CellBlock
from cellstrata.engine.models import family_names, get_family
from cellstrata.engine.models.base import NO_TRUNCATION, concat_blocks
from cellstrata.engine.models.family import CheckpointFamily, expected_shapes
from cellstrata.errors import CheckpointError, ConfigError, GeneOverlapError, InvalidValuesError

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


def file_hashes(loaded) -> dict[str, str]:
    return {name: f["sha256"] for name, f in loaded.checkpoint["files"].items()}


def weights_file(loaded) -> str:
    """The name of the file whose sha256 names the weights."""
    return next(n for n, h in file_hashes(loaded).items() if h == loaded.checkpoint["sha256"])


def one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def test_family_is_a_checkpoint_family_with_a_tiny_preset(family):
    assert isinstance(family, CheckpointFamily)
    assert "tiny" in family.presets and family.default_poolings
    assert set(family.default_poolings) <= set(family.pool_ops) | {"official"}
    if family.name != "toy":
        assert get_family(family.name.upper()) is family and get_family(family.title) is family
        with pytest.raises(ConfigError, match=rf"unknown model 'no-such-model'; known models: .*{family.name}"):
            get_family("no-such-model")


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
    assert file_hashes(first) == file_hashes(again)  # every file, heads the model ignores included
    assert first.checkpoint["sha256"] != other.checkpoint["sha256"]


def test_init_checkpoint_takes_genes_and_refuses_duplicates(family, tiny, cells, tmp_path):
    folder, seed = tiny
    _, names = cells
    genes = list(np.random.default_rng().choice(names, 37, replace=False))
    loaded = family.load(family.init_checkpoint("tiny", tmp_path / "genes", seed=seed, genes=genes), seed=seed)
    mapping = loaded.tokenizer.map_genes(names)
    assert mapping.n_vocab_genes == 37 and mapping.n_matched == 37
    assert sorted(np.asarray(names)[mapping.token_ids >= 0]) == sorted(genes)
    assert loaded.tokenizer.settings() != family.load(folder, seed=seed).tokenizer.settings()
    with pytest.raises(ConfigError, match="unique"):
        family.init_checkpoint("tiny", tmp_path / "twice", genes=[genes[0], *genes[:3]])


def test_random_weights_are_non_trivial(family, tiny):
    folder, seed = tiny
    model = family.load(folder, seed=seed).model
    state = model.state_dict()
    assert all(v.is_floating_point() and torch.isfinite(v).all() and v.abs().max() > 0 for v in state.values())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) >= 2 * model.n_layers
    for m in norms:  # around 1, each its own draw, and a bias that does something
        assert 0.5 < float(m.weight.mean()) < 1.5 and float(m.weight.std()) > 0.01
        assert m.bias is not None and float(m.bias.abs().max()) > 0.01
    assert all(not torch.equal(a.weight, b.weight) for a, b in itertools.combinations(norms, 2))


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
    with pytest.raises(ConfigError) as err:
        family.load(folder, colour="red")
    one_line(err, "colour", *family.options)
    with pytest.raises(CheckpointError) as err:
        family.load(tmp_path / "missing")
    one_line(err, "missing", "does not exist")


def test_each_missing_file_is_one_clear_error(family, tiny, tmp_path):
    folder, seed = tiny
    weights = weights_file(family.load(folder, seed=seed))
    written = sorted(p.name for p in folder.iterdir())
    assert set(family.required_files) | {weights} <= set(written)
    for i, name in enumerate(written):
        broken = Path(shutil.copytree(folder, tmp_path / f"without-{i}"))
        (broken / name).unlink()
        with pytest.raises(CheckpointError) as err:
            family.load(broken, seed=seed)
        one_line(err, str(broken), *([name] if name in family.required_files or name == weights else []))


def test_missing_misshaped_and_unexpected_keys_are_all_named(family, tiny):
    """The family's weights check (:meth:`module_state`) names every key the module and the file disagree on."""
    folder, seed = tiny
    ckpt = family.read_checkpoint(folder, {"seed": seed})
    with torch.device("meta"):
        expected = dict(expected_shapes(family.build_model(ckpt)))
    norms = [k for k in expected if "norm" in k.lower() and len(expected[k]) == 1]
    dropped, reshaped = np.random.default_rng().choice(norms, 2, replace=False)
    good = tuple(expected.pop(dropped)), tuple(expected[reshaped])
    expected[reshaped] = torch.Size((good[1][0] + 3,))
    expected["no_such_block.weight"] = torch.Size((4, 2))
    with pytest.raises(CheckpointError) as err:
        family.module_state(folder, ckpt, expected)
    msg = one_line(err)
    assert "missing: no_such_block.weight" in msg
    assert f"{reshaped} {good[1]} (expected {(good[1][0] + 3,)})" in msg
    assert "unexpected: " in msg and dropped in msg.split("unexpected: ", 1)[1]


class _RunsCode:
    """A pickled object whose unpickling would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_code_in_the_weights_file_is_refused_not_run(family, tiny, tmp_path):
    folder, seed = tiny
    weights = weights_file(family.load(folder, seed=seed))
    marker = tmp_path / "ran"
    evil = Path(shutil.copytree(folder, tmp_path / "evil"))
    payload = {"weight": torch.randn(3), "x": _RunsCode(marker)}
    writers = (
        lambda f: torch.save(payload, f),
        lambda f: f.write_bytes(pickle.dumps(payload, protocol=2)),
        lambda f: f.write_bytes(np.random.default_rng().bytes(64)),
    )
    for write in writers:
        write(evil / weights)
        with pytest.raises(CheckpointError) as err:
            family.load(evil, seed=seed)
        one_line(err, weights)
    assert not marker.exists()


def test_no_gene_in_the_vocabulary_is_one_line_naming_the_gene_column(family, tiny):
    folder, seed = tiny
    tok = family.load(folder, seed=seed).tokenizer
    unknown = unknown_gene_symbols(30)
    with pytest.raises(GeneOverlapError) as err:
        tok.map_genes(unknown)
    one_line(err, "0 of 30 input genes (0.0%)", unknown[0], "--gene-column")


def same_tokens(a, b, rows=None) -> None:
    """``b``'s cells equal ``a``'s cells ``rows`` (all): genes, values, dtypes, truncated and empty flags."""
    rows = np.arange(len(a.genes)) if rows is None else np.asarray(rows)
    assert len(b.genes) == len(rows)
    np.testing.assert_array_equal(b.indices, a.indices[rows])
    np.testing.assert_array_equal(b.truncated, a.truncated[rows])
    np.testing.assert_array_equal(b.empty, a.empty[rows])
    for j, r in enumerate(rows):
        np.testing.assert_array_equal(b.genes[j], a.genes[r])
        np.testing.assert_array_equal(b.values[j], a.values[r])
        assert b.genes[j].dtype == np.int64 and b.values[j].dtype == np.float32


@pytest.mark.parametrize("max_length", [None, 60])
def test_tokens_do_not_depend_on_the_block_and_match_the_per_cell_rule(family, tiny, cells, max_length):
    folder, seed = tiny
    X, names = cells
    options = {} if max_length is None else {"max_length": max_length}
    tok = family.load(folder, seed=seed, **options).tokenizer
    mapping = tok.map_genes(names)
    index = np.arange(X.shape[0]) * 3 + 5
    whole = tok.tokenize(CellBlock(index, X), mapping)
    reference = tok.tokenize_reference(CellBlock(index, X), mapping)
    halves = concat_blocks([tok.tokenize(CellBlock(index[s], X[s]), mapping) for s in (slice(0, 9), slice(9, None))])
    rows = np.random.default_rng().permutation(X.shape[0])[:6]  # a few cells, in another order
    picked = tok.tokenize(CellBlock(index[rows], X[rows]), mapping)
    same_tokens(whole, reference)
    same_tokens(whole, halves)
    same_tokens(whole, picked, rows)
    assert not whole.empty.any() and json.dumps(tok.settings())
    if max_length is not None and tok.truncation_rule != NO_TRUNCATION:
        assert whole.truncated.any() and (whole.lengths <= max_length).all()


def test_matrix_variants_give_the_same_tokens(family, tiny, cells):
    """CSR with unsorted and duplicate entries, CSC, dense, float64 and int32 counts read like canonical CSR;
    an unknown gene column is left out and a cell without counts is empty."""
    folder, seed = tiny
    X, names = cells
    rng = np.random.default_rng()
    X = sp.hstack([X[:10], sp.csr_matrix(rng.integers(1, 9, (10, 1)).astype(np.float32))], format="csr")
    X = X.multiply(sp.csr_matrix(rng.integers(1, 4, X.shape[1]).astype(np.float32))).tocsr()  # fresh counts
    X.data[X.indptr[3] : X.indptr[4]] = 0  # a cell without counts
    X.eliminate_zeros()
    tok = family.load(folder, seed=seed, max_length=60).tokenizer
    mapping = tok.map_genes([*names, "NOT-A-GENE"])
    index = rng.permutation(1000)[:10]
    ref = tok.tokenize(CellBlock(index, X), mapping)
    assert ref.empty.tolist() == [i == 3 for i in range(10)]
    coo = X.tocoo()  # every count in two entries, the entries of a row in random order
    half = np.floor(coo.data / 2)
    rows, cols, vals = np.tile(coo.row, 2), np.tile(coo.col, 2), np.concatenate([half, coo.data - half])
    order = rng.permutation(len(vals))
    order = order[np.argsort(rows[order], kind="stable")]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=X.shape[0]))])
    messy = sp.csr_matrix((vals[order], cols[order], indptr), shape=X.shape)
    assert not messy.has_canonical_format and (messy.toarray() == X.toarray()).all()
    dense = X.toarray()
    for variant in (messy, X.tocsc(), dense, dense.astype(np.float64), dense.astype(np.int32), X.astype(np.int64)):
        same_tokens(ref, tok.tokenize(CellBlock(index, variant), mapping))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_infinite_values_are_one_line_naming_the_cell(family, tiny, cells, bad):
    folder, seed = tiny
    X, names = cells
    tok = family.load(folder, seed=seed).tokenizer
    mapping = tok.map_genes(names)
    X = X[:4].copy().astype(np.float32)
    row = int(np.random.default_rng().integers(1, 4))
    matched = np.flatnonzero(mapping.token_ids[X[row].indices] >= 0)
    X.data[X.indptr[row] + matched[len(matched) // 2]] = bad
    with pytest.raises(InvalidValuesError) as err:
        tok.tokenize(CellBlock(np.arange(4) + 70, X), mapping)
    one_line(err, f"cell {70 + row}")


def test_forward_taps_every_layer_in_order_and_runs_under_bf16_autocast(family, tiny, cells):
    folder, seed = tiny
    X, names = cells
    loaded = family.load(folder, seed=seed)
    tok = loaded.tokenizer
    block = tok.tokenize(CellBlock(np.arange(5), X[:5]), tok.map_genes(names))
    batch = collate(block, np.arange(5), tok.pad_id, tok.pad_value)
    real = ~batch.padding_mask
    assert (~real).any() and real.any(1).all()  # cells of different lengths: padding is left out
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
            assert float((exact[layer][real] - exact[layer - 1][real]).abs().mean()) > 1e-2, layer
