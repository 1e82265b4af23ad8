"""scFoundation family: presets, models.ckpt reading/writing, gene mapping, tokens, poolings."""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellstrata.engine.errors import CheckpointError, ConfigError, GeneOverlapError, InvalidValuesError
from cellstrata.engine.input.datasets import gene_symbols
from cellstrata.engine.input.sources import CellBlock
from cellstrata.engine.models.base import SpecialLayout, TokenBatch
from cellstrata.engine.models.scfoundation import (
    FAMILY,
    GENE_LIST_FILE,
    PRESETS,
    WEIGHTS_FILE,
    OfficialPooling,
    ScFoundationConfig,
    ScFoundationModel,
    ScFoundationTokenizer,
    flatten_config,
    official_key_shapes,
)

# ------------------------------------------------------------------------------------------------
# helpers


def _tok(n_genes: int = 10, **kw) -> ScFoundationTokenizer:
    return ScFoundationTokenizer(gene_symbols(n_genes), **kw)


def _tokenize(tok: ScFoundationTokenizer, dense: np.ndarray, names: list[str], indices=None):
    idx = np.arange(len(dense)) if indices is None else np.asarray(indices)
    return tok.tokenize(CellBlock(idx, sp.csr_matrix(dense)), tok.map_genes(names))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return FAMILY.init_checkpoint("tiny", tmp_path_factory.mktemp("scf_tiny"), seed=3)


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _edit(folder: Path, edit) -> None:
    ckpt = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, folder / WEIGHTS_FILE)


# ------------------------------------------------------------------------------------------------
# registry, presets, published key list

# The released models.ckpt 'cell' key list (models.md, from the official module tree), written out
# independently of official_key_shapes.
_PUBLISHED_ENCODER = {
    "token_emb.mlp.weight": (100, 1),
    "token_emb.mlp.bias": (100,),
    "token_emb.mlp2.weight": (100, 100),
    "token_emb.mlp2.bias": (100,),
    "token_emb.emb.weight": (100, 768),
    "token_emb.emb_mask.weight": (1, 768),
    "token_emb.emb_pad.weight": (1, 768),
    "pos_emb.weight": (19267, 768),
    "encoder.norm.weight": (768,),
    "encoder.norm.bias": (768,),
}
for _i in range(12):
    _p = f"encoder.transformer_encoder.{_i}."
    _PUBLISHED_ENCODER.update(
        {
            _p + "self_attn.in_proj_weight": (2304, 768),
            _p + "self_attn.in_proj_bias": (2304,),
            _p + "self_attn.out_proj.weight": (768, 768),
            _p + "self_attn.out_proj.bias": (768,),
            _p + "linear1.weight": (3072, 768),
            _p + "linear1.bias": (3072,),
            _p + "linear2.weight": (768, 3072),
            _p + "linear2.bias": (768,),
            _p + "norm1.weight": (768,),
            _p + "norm1.bias": (768,),
            _p + "norm2.weight": (768,),
            _p + "norm2.bias": (768,),
        }
    )


def test_100m_preset_matches_published_keys():
    cfg = PRESETS["100m"]
    assert (cfg.hidden_dim, cfg.depth, cfg.heads, cfg.ffn_dim, cfg.seq_len, cfg.pos_rows) == (
        768,
        12,
        12,
        3072,
        19266,
        19267,
    )
    assert (cfg.bin_num, cfg.bin_alpha, cfg.pad_token_id, cfg.mask_token_id, cfg.layer_norm_eps) == (
        100,
        1.0,
        103,
        102,
        1e-5,
    )
    shapes = official_key_shapes(cfg)
    encoder = {k: v for k, v in shapes.items() if k.startswith(("token_emb.", "pos_emb.", "encoder."))}
    assert encoder == _PUBLISHED_ENCODER
    # decoder side: performer 512 / 6 layers / 8 heads x 64, nb_features = int(64 ln 64) = 266
    assert shapes["decoder_embed.weight"] == (512, 768) and shapes["to_final.weight"] == (1, 512)
    assert shapes["decoder.performer.net.layers.5.0.fn.fast_attention.projection_matrix"] == (266, 64)
    assert shapes["decoder.performer.net.layers.0.0.fn.to_q.weight"] == (512, 512)
    assert shapes["decoder.performer.net.layers.0.1.fn.fn.w1.weight"] == (2048, 512)
    assert shapes["decoder.performer.calls_since_last_redraw"] == ()
    assert "decoder.performer.net.layers.6.0.norm.weight" not in shapes
    assert {"norm.weight", "norm.bias", "decoder.norm.weight", "to_final.bias"} <= shapes.keys()
    n_encoder = sum(math.prod(s) for s in encoder.values())
    assert 99e6 < n_encoder < 101e6
    with torch.device("meta"):
        model = ScFoundationModel(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _PUBLISHED_ENCODER
    assert (model.n_layers, model.hidden_size) == (12, 768)


def test_tiny_preset_and_config_round_trip():
    cfg = PRESETS["tiny"]
    assert (cfg.hidden_dim, cfg.depth, cfg.heads, cfg.ffn_dim, cfg.n_genes) == (64, 4, 4, 256, 2000)
    for preset in PRESETS.values():
        nested = preset.to_nested()
        assert set(nested) == {"model", "model_config", "dataset_config"}
        flat = flatten_config(nested)
        assert flat["model_type"] == "mae_autobin" and flat["pos_embed"] is False
        assert ScFoundationConfig.from_flat(flat) == preset
    with pytest.raises(ConfigError, match="divisible"):
        ScFoundationConfig(hidden_dim=10, depth=1, heads=3, seq_len=5)


def test_config_missing_fields_are_named():
    flat = flatten_config(PRESETS["tiny"].to_nested())
    del flat["pad_token_id"]
    del flat["encoder"]["heads"]
    with pytest.raises(CheckpointError, match=r"missing field\(s\) encoder.heads, pad_token_id"):
        ScFoundationConfig.from_flat(flat)
    flat = flatten_config(PRESETS["tiny"].to_nested())
    flat["encoder"]["module_type"] = "performer"
    with pytest.raises(CheckpointError, match="module_type"):
        ScFoundationConfig.from_flat(flat)


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_init_checkpoint_round_trip(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == sorted([WEIGHTS_FILE, GENE_LIST_FILE])
    lines = (tiny / GENE_LIST_FILE).read_text().splitlines()
    assert lines[:3] == ["gene_name\tindex", "SG00000\t0", "SG00001\t1"] and len(lines) == 2001
    raw = torch.load(tiny / WEIGHTS_FILE, weights_only=True)  # nested plain-dict configs pass
    assert set(raw) == {"cell", "rde", "gene"}
    for entry in raw.values():
        assert set(entry) == {"config", "state_dict"}
        assert entry["config"]["model"] == "mae_autobin"
        assert {k.removeprefix("model.") for k in entry["state_dict"]} == set(official_key_shapes(PRESETS["tiny"]))
        assert all(k.startswith("model.") for k in entry["state_dict"])
    assert not torch.equal(
        raw["cell"]["state_dict"]["model.pos_emb.weight"], raw["rde"]["state_dict"]["model.pos_emb.weight"]
    )

    loaded = FAMILY.load(tiny)
    assert loaded.family == "scfoundation" and loaded.preset == "tiny"
    assert (loaded.n_layers, loaded.hidden_size, loaded.official_layer) == (4, 64, 4)
    assert loaded.layout == SpecialLayout(0, 2, False)
    assert dict(loaded.pool_ops) == {"mean": "mean", "max": "max", "s_token": "from_end:1", "t_token": "from_end:2"}
    assert loaded.pooling_names == ("mean", "max", "s_token", "t_token", "official")
    assert loaded.custom_poolings["official"].width == 256
    assert loaded.default_poolings == ("mean", "official")
    ck = loaded.checkpoint
    assert ck["sha256"] == hashlib.sha256((tiny / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert set(ck["files"]) == {WEIGHTS_FILE, GENE_LIST_FILE} and ck["entry"] == "cell"
    decoder = {k for k in official_key_shapes(PRESETS["tiny"]) if k.startswith(("decoder", "norm.", "to_final."))}
    assert set(ck["ignored_keys"]) == decoder and "decoder.performer.calls_since_last_redraw" in decoder
    assert loaded.config["entry"] == "cell" and loaded.config["seq_len"] == 2002
    state = loaded.model.state_dict()
    for key, value in raw["cell"]["state_dict"].items():
        name = key.removeprefix("model.")
        if name in state:
            assert torch.equal(state[name], value), key
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    assert loaded.tokenizer.n_genes == 2000 and loaded.tokenizer.pad_id == 2002 and loaded.tokenizer.pad_value == 103

    rde = FAMILY.load(tiny / WEIGHTS_FILE, version="rde", max_length=50, seed=4, tgthighres="a5")
    assert rde.checkpoint["entry"] == "rde" and rde.config["version"] == "rde"
    assert torch.equal(rde.model.pos_emb.weight, raw["rde"]["state_dict"]["model.pos_emb.weight"])
    s = rde.tokenizer.settings()
    assert (s["max_length"], s["seed"], s["tgthighres"], s["pre_normalized"]) == (50, 4, "a5", "F")


def test_init_checkpoint_keeps_the_gene_order_and_adds_the_t_s_and_pad_rows(tmp_path):
    a = FAMILY.init_checkpoint("tiny", tmp_path / "a", seed=1, genes=["B", "A", "C"])
    state = torch.load(a / WEIGHTS_FILE, weights_only=True)["cell"]["state_dict"]
    assert state["model.pos_emb.weight"].shape == (6, 64)  # 3 genes + T + S + pad row
    assert FAMILY.load(a).tokenizer.genes == ["B", "A", "C"]


def test_a_missing_gene_list_says_where_it_comes_from(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "nolist")
    (folder / GENE_LIST_FILE).unlink()
    with pytest.raises(CheckpointError) as err:
        FAMILY.load(folder)
    msg = str(err.value)
    assert GENE_LIST_FILE in msg and "official scFoundation repository" in msg and "biomap-research" in msg


def test_gene_list_must_match_and_be_well_formed(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "short")
    lines = (folder / GENE_LIST_FILE).read_text().splitlines()
    (folder / GENE_LIST_FILE).write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(CheckpointError, match="lists 1999 genes but the checkpoint's seq_len 2002"):
        FAMILY.load(folder)
    (folder / GENE_LIST_FILE).write_text("symbol\tid\nA\t0\n")
    with pytest.raises(CheckpointError, match="gene_name and index"):
        FAMILY.load(folder)
    (folder / GENE_LIST_FILE).write_text("gene_name\tindex\nA\t0\nB\t2\n")
    with pytest.raises(CheckpointError, match=r"0\.\.1 in order"):
        FAMILY.load(folder)


def test_decoder_keys_are_ignored_and_only_the_chosen_entry_is_checked(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "bad")

    def damage(ckpt):
        s = ckpt["cell"]["state_dict"]
        del s["model.token_emb.emb_pad.weight"]
        s["model.decoder.performer.net.layers.0.0.norm.weight"] = torch.zeros(3)  # decoder: ignored

    _edit(folder, damage)
    with pytest.raises(CheckpointError) as err:
        FAMILY.load(folder)
    msg = str(err.value)
    assert "missing: token_emb.emb_pad.weight" in msg and "decoder.performer" not in msg
    FAMILY.load(folder, version="rde")  # the other entry is intact


def test_config_and_weights_disagree(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "depth")
    _edit(folder, lambda c: c["cell"]["config"]["model_config"]["mae_autobin"]["encoder"].update(depth=3))
    with pytest.raises(CheckpointError, match=r"unexpected: encoder\.transformer_encoder\.3\."):
        FAMILY.load(folder)


def test_a_file_without_the_models_ckpt_entries_is_refused(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "other")
    torch.save({"a": torch.zeros(1)}, folder / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=r"not scFoundation's models\.ckpt"):
        FAMILY.load(folder)
    ckpt = torch.load(tiny / WEIGHTS_FILE, weights_only=True)
    del ckpt["rde"]
    torch.save(ckpt, folder / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="no 'rde' weights"):
        FAMILY.load(folder, version="rde")


def test_options_are_checked(tiny):
    with pytest.raises(ConfigError, match=r"ce .* or rde"):
        FAMILY.load(tiny, version="gene")
    with pytest.raises(ConfigError, match="extra last column"):
        FAMILY.load(tiny, pre_normalized="A")
    with pytest.raises(ConfigError, match="tgthighres 'x4'"):
        FAMILY.load(tiny, tgthighres="x4")
    with pytest.raises(ConfigError, match="tgthighres 'tfoo'"):
        FAMILY.load(tiny, tgthighres="tfoo")
    with pytest.raises(ConfigError, match="tgthighres 'f0'"):
        FAMILY.load(tiny, tgthighres="f0")
    with pytest.raises(ConfigError, match="max_length must be >= 3"):
        FAMILY.load(tiny, max_length=2)


# ------------------------------------------------------------------------------------------------
# gene mapping


def test_gene_mapping_by_symbol_first_column_wins():
    tok = _tok(100)
    names = ["SG00005", "FOO", *gene_symbols(3), "SG00005", "SG00099"]
    m = tok.map_genes(names)
    assert m.token_ids.tolist() == [5, -1, 0, 1, 2, -1, 99]
    assert (m.n_input, m.n_matched, m.n_vocab_genes) == (7, 5, 100)
    assert m.examples_missing == ("FOO", "SG00005")


def test_no_overlap_names_symbols_and_the_vocabulary():
    tok = _tok(100)
    with pytest.raises(GeneOverlapError) as err:
        tok.map_genes([f"ENSG{i:011d}" for i in range(200)])
    msg = str(err.value)
    assert "SG00000" in msg and "HGNC gene symbol" in msg and "Ensembl" in msg


# ------------------------------------------------------------------------------------------------
# tokenizer


def _expected_cell(counts: dict[int, float], kind: str, v: float, mode: str = "F") -> tuple[list, list]:
    """Hand-written get_embedding.py arithmetic for one cell (gene index -> value)."""
    total = sum(counts.values())
    s = math.log10(total)
    if kind == "t":
        t = v
    elif kind == "f":
        t = math.log10(total * v)
    else:
        t = math.log10(total) + v
    genes = sorted(g for g, x in counts.items() if x > 0)
    vals = [math.log1p(counts[g] / total * 1e4) if mode == "F" else counts[g] for g in genes]
    return [*genes, 10, 11], [np.float32(x) for x in (*vals, t, s)]


@pytest.mark.parametrize("tgthighres", ["t4", "t4.5", "f1", "f0.5", "a5", "a-0.25"])
def test_tokens_match_hand_computed_values(tgthighres):
    # input columns: genes 7, 2, an unknown gene, 0, 9, 4 of a 10-gene list
    names = ["SG00007", "SG00002", "UNKNOWN", "SG00000", "SG00009", "SG00004"]
    dense = np.array(
        [
            [3, 0, 100, 1, 0, 5],  # the unknown gene's counts are not part of the total
            [0, 0, 0, 0, 1, 0],  # a single count: S = log10(1) = 0 is still kept
            [0, 0, 7, 0, 0, 0],  # nothing in the gene list: empty
            [2, 2, 0, 2, 2, 2],
        ],
        dtype=np.float32,
    )
    tok = _tok(10, tgthighres=tgthighres)
    out = _tokenize(tok, dense, names)
    kind, v = tgthighres[0], float(tgthighres[1:])
    cells = {0: {7: 3, 0: 1, 4: 5}, 1: {9: 1}, 3: {7: 2, 2: 2, 0: 2, 9: 2, 4: 2}}
    for i, counts in cells.items():
        genes, values = _expected_cell(counts, kind, v)
        assert out.genes[i].tolist() == genes
        np.testing.assert_array_equal(out.values[i], np.array(values, dtype=np.float32))
        assert out.genes[i].dtype == np.int64 and out.values[i].dtype == np.float32
    assert out.empty.tolist() == [False, False, True, False]
    assert len(out.genes[2]) == 0 and out.lengths.tolist() == [5, 3, 0, 7]
    assert out.values[1][-1] == 0.0  # S of a one-count cell
    assert not out.truncated.any()


def test_pre_normalized_t_uses_values_and_their_sum():
    names = gene_symbols(6)
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((5, 6)) < 0.6, np.log1p(rng.integers(1, 50, (5, 6)) * 3.7), 0.0)
    dense[0, 0] = 0.7
    tok = _tok(6, pre_normalized="T", tgthighres="f2")
    assert not tok.require_counts and _tok(6).require_counts
    out = _tokenize(tok, dense, names)
    for i, row in enumerate(dense):
        total = row.sum()  # the official quirk: the sum of the given (log) values
        nz = np.flatnonzero(row)
        assert out.genes[i].tolist() == [*nz.tolist(), 6, 7]
        expected = np.array([*row[nz], math.log10(total * 2), math.log10(total)], dtype=np.float32)
        np.testing.assert_array_equal(out.values[i], expected)
    with pytest.raises(InvalidValuesError, match="pre_normalized='F'"):
        _tokenize(tok, np.array([[3.0, 250.0, 0, 0, 0, 0]]), names)


def test_negative_values_are_refused():
    with pytest.raises(InvalidValuesError, match=r"cell 42 has an invalid expression value \(-1"):
        _tokenize(_tok(4), np.array([[1.0, -1.0, 0, 0]]), gene_symbols(4), indices=[42])


def test_stored_zeros_are_no_tokens():
    rng = np.random.default_rng()
    dense = np.where(rng.random((6, 50)) < 0.5, rng.integers(1, 9, (6, 50)), 0).astype(np.float32)
    stored = sp.csr_matrix(dense)
    stored.data[rng.random(stored.nnz) < 0.3] = 0
    tok = _tok(50)
    out = tok.tokenize(CellBlock(np.arange(6), stored), tok.map_genes(gene_symbols(50)))
    ref = _tokenize(tok, stored.toarray(), gene_symbols(50))
    assert stored.nnz > np.count_nonzero(stored.data)
    for i in range(6):
        np.testing.assert_array_equal(out.genes[i], ref.genes[i])
        np.testing.assert_array_equal(out.values[i], ref.values[i])


def test_max_length_keeps_a_seeded_subset_then_t_and_s():
    names = gene_symbols(300)
    rng = np.random.default_rng(3)
    dense = np.where(rng.random((12, 300)) < 0.3, rng.integers(1, 20, (12, 300)), 0).astype(np.float32)
    dense[4, 10:] = 0  # a short cell
    full = _tokenize(_tok(300), dense, names, indices=np.arange(100, 112))
    cut = _tokenize(_tok(300, max_length=40, seed=7), dense, names, indices=np.arange(100, 112))
    other_seed = _tokenize(_tok(300, max_length=40, seed=8), dense, names, indices=np.arange(100, 112))
    assert cut.truncated.sum() == 11 and not cut.truncated[4] and not full.truncated.any()
    for i in range(12):
        if not cut.truncated[i]:
            np.testing.assert_array_equal(cut.genes[i], full.genes[i])
            continue
        g, v = cut.genes[i], cut.values[i]
        assert len(g) == 40 and g[-2:].tolist() == [300, 301] and (np.diff(g[:-2]) > 0).all()
        np.testing.assert_array_equal(v[-2:], full.values[i][-2:])  # T and S from the whole cell
        pairs = dict(zip(full.genes[i].tolist(), full.values[i].tolist()))
        assert all(pairs[a] == b for a, b in zip(g.tolist(), v.tolist()))  # values from the whole cell
    assert any(not np.array_equal(cut.genes[i], other_seed.genes[i]) for i in range(12))
    # a cell's subset depends on its global index only, not on its block
    part = _tokenize(_tok(300, max_length=40, seed=7), dense[[9, 2]], names, indices=[109, 102])
    np.testing.assert_array_equal(part.genes[0], cut.genes[9])
    np.testing.assert_array_equal(part.genes[1], cut.genes[2])


def test_settings_describe_tokens():
    s = _tok(20, max_length=300, seed=3, tgthighres="a5").settings()
    assert (s["max_length"], s["seed"], s["tgthighres"], s["pre_normalized"]) == (300, 3, "a5", "F")
    assert (s["n_genes"], s["t_position"], s["s_position"], s["pad_id"], s["pad_value"]) == (20, 20, 21, 22, 103.0)
    assert len(s["gene_list_sha256"]) == 64 and _tok(21).settings()["gene_list_sha256"] != s["gene_list_sha256"]
    assert _tok(20).settings()["max_length"] is None


# ------------------------------------------------------------------------------------------------
# model and poolings


def _batch(tok: ScFoundationTokenizer, n_cells: int, seed: int) -> TokenBatch:
    from cellstrata.engine.device.batching import collate

    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n_cells, tok.n_genes)) < 0.05, rng.poisson(3, (n_cells, tok.n_genes)) + 1, 0)
    tb = _tokenize(tok, dense.astype(np.float32), list(tok.genes))
    return collate(tb, np.arange(n_cells), tok.pad_id, tok.pad_value)


def test_mask_and_pad_values_take_their_embeddings(tiny):
    model = FAMILY.load(tiny).model
    values = torch.tensor([[1.5, 102.0, 103.0, 0.25]])
    e = model.token_emb(values)
    torch.testing.assert_close(e[0, 1], model.token_emb.emb_mask.weight[0])
    torch.testing.assert_close(e[0, 2], model.token_emb.emb_pad.weight[0])
    assert not torch.allclose(e[0, 0], e[0, 3])


def test_official_pooling_writes_a_strided_view_and_counts_overflow(tiny):
    loaded = FAMILY.load(tiny)
    pooling: OfficialPooling = loaded.custom_poolings["official"]  # type: ignore[assignment]
    batch = _batch(loaded.tokenizer, 5, seed=2)
    states: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        loaded.model(batch, lambda layer, h: states.__setitem__(layer, h.clone()))
        wide = torch.full((5, 3 * 256), -7.0)
        pooling(states[2], batch.lengths, wide[:, 256:512], None, "torch")
        normed = loaded.model.encoder.norm(states[2])
    assert (wide[:, :256] == -7).all() and (wide[:, 512:] == -7).all()
    out = wide[:, 256:512]
    for b in range(5):
        n = int(batch.lengths[b])
        g = normed[b, :n]
        ref = torch.cat([g[-1], g[-2], g[:-2].amax(0), g[:-2].mean(0)])
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-6)

    big = OfficialPooling(torch.nn.LayerNorm(64))
    with torch.no_grad():
        big.norm.weight.fill_(1e5)
    half = torch.empty(5, 256, dtype=torch.float16)
    overflow = torch.zeros((), dtype=torch.int64)
    with torch.inference_mode():
        big(states[1], batch.lengths, half, overflow, "torch")
    assert int(overflow) == int(torch.isinf(half).sum()) > 0
