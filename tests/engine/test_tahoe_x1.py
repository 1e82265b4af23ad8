"""Tahoe-X1 family: presets, checkpoint reading/writing, gene mapping, tokens, end to end on Ensembl ids."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import yaml
from safetensors.torch import load_file, save_file

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.errors import (
    CheckpointError,
    ConfigError,
    GeneOverlapError,
    InvalidValuesError,
    StoreConfigMismatchError,
)
from cellstrata.engine.input.datasets import gene_ensembl_ids, gene_symbols, synthetic_dataset
from cellstrata.engine.input.sources import CellBlock
from cellstrata.engine.models.base import SpecialLayout, TokenBatch
from cellstrata.engine.models.counter_rng import RNG_NAME
from cellstrata.engine.models.tahoe_x1 import (
    FAMILY,
    PRESETS,
    TahoeX1Config,
    TahoeX1Tokenizer,
    official_key_shapes,
    random_state_dict,
)

# ------------------------------------------------------------------------------------------------
# helpers


def _vocab(n_genes: int) -> dict[str, int]:
    vocab = {g: i for i, g in enumerate(gene_ensembl_ids(n_genes))}
    for t in ("<pad>", "<cls>", "<eoc>"):
        vocab[t] = len(vocab)
    return vocab


def _block(n_cells: int, n_genes: int, seed: int = 0, start: int = 0, density: float = 0.3) -> CellBlock:
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n_cells, n_genes)) < density, rng.poisson(3, (n_cells, n_genes)) + 1, 0)
    return CellBlock(np.arange(start, start + n_cells), sp.csr_matrix(dense.astype(np.float32)))


def _tokens(tok: TahoeX1Tokenizer, block: CellBlock, names: list[str]):
    return tok.tokenize(block, tok.map_genes(names))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return FAMILY.init_checkpoint("tiny", tmp_path_factory.mktemp("tiny") / "tx", seed=3)


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _edit_state(folder: Path, edit) -> None:
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def _edit_yaml(path: Path, edit) -> None:
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))


# ------------------------------------------------------------------------------------------------
# registry and presets


def test_released_presets_follow_the_training_configs():
    # configs/gcloud/tahoe_x1-70m-merged.yaml, tahoe_x1-1_3b-merged.yaml, configs/mcli/tahoe_x1-3b-v2-cont-train.yaml
    expect = {
        "70m": (512, 12, 8, "relu", "relu", 1),
        "1b": (2048, 24, 16, "relu", "relu", 1),
        "3b": (2560, 32, 20, "gelu", "gelu", 2),
    }
    for name, (d, n_layers, heads, act, expr_act, keep) in expect.items():
        cfg = PRESETS[name]
        got = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.transformer_activation, cfg.expression_activation)
        assert got == (d, n_layers, heads, act, expr_act), name
        assert cfg.keep_first_n_tokens == keep and cfg.expansion_ratio == 4 and cfg.ffn_size == 4 * d
        assert cfg.norm_eps == 1e-5 and cfg.num_bins == 51 and cfg.pad_value == -2 and cfg.max_value == 512
        assert cfg.max_length == 2048  # predict.yaml seq_len_dataset
    assert set(PRESETS) == {"70m", "1b", "3b", "tiny"}
    tiny = PRESETS["tiny"]
    assert (tiny.d_model, tiny.n_layers, tiny.n_heads, tiny.vocab_size) == (64, 4, 4, 2003)


def test_config_files_round_trip():
    for name, cfg in PRESETS.items():
        model_cfg, collator_cfg = cfg.to_configs()
        back = TahoeX1Config.from_configs(model_cfg, collator_cfg, vocab_size=cfg.vocab_size)
        assert back == TahoeX1Config(**{**cfg.__dict__, "max_length": 2048}), name
        for key in ("d_model", "n_layers", "n_heads", "expansion_ratio", "norm_scheme", "transformer_activation"):
            assert key in model_cfg
        assert model_cfg["norm_config"] == {"norm_type": "layernorm", "eps": 1e-5}
        assert collator_cfg["num_bins"] == 51 and collator_cfg["pad_value"] == -2


def test_unsupported_settings_are_refused():
    model_cfg, collator_cfg = PRESETS["tiny"].to_configs()
    cases = [
        ({"norm_scheme": "post"}, {}, "norm_scheme"),
        ({"use_glu": True}, {}, "use_glu"),
        ({"cell_emb_style": "avg-pool"}, {}, "cell_emb_style"),
        ({"norm_config": {"norm_type": "rmsnorm"}}, {}, "rmsnorm"),
        ({"attn_config": {"kv_n_heads": 2}}, {}, "kv_n_heads"),
        ({}, {"do_binning": False, "log_transform": True}, "do_binning"),
        ({}, {"right_binning": True}, "right_binning"),
        ({"transformer_activation": "tanh"}, {}, "tanh"),
    ]
    for m_edit, c_edit, word in cases:
        with pytest.raises((CheckpointError, ConfigError), match=word):
            TahoeX1Config.from_configs({**model_cfg, **m_edit}, {**collator_cfg, **c_edit}, vocab_size=2003)
    with pytest.raises(CheckpointError, match="lacks d_model"):
        TahoeX1Config.from_configs({k: v for k, v in model_cfg.items() if k != "d_model"}, collator_cfg, 2003)
    # the configs write kv_nheads, which TXBlock ignores: it must not be refused
    TahoeX1Config.from_configs({**model_cfg, "attn_config": {"kv_nheads": 1}}, collator_cfg, 2003)


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_init_checkpoint_round_trip(tiny):
    names = sorted(p.name for p in tiny.iterdir())
    assert names == ["collator_config.yml", "model.safetensors", "model_config.yml", "vocab.json"]
    vocab = json.loads((tiny / "vocab.json").read_text())
    assert list(vocab)[:2] == gene_ensembl_ids(2) and list(vocab)[-3:] == ["<pad>", "<cls>", "<eoc>"]
    raw = load_file(str(tiny / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in raw.items()} == official_key_shapes(PRESETS["tiny"])
    assert all(k.startswith("model.") for k in raw)
    collator = yaml.safe_load((tiny / "collator_config.yml").read_text())
    assert collator["pad_token_id"] == vocab["<pad>"]
    assert yaml.safe_load((tiny / "model_config.yml").read_text())["vocab_size"] == len(vocab)

    loaded = FAMILY.load(tiny)
    assert loaded.family == "tahoe-x1" and loaded.preset == "tiny"
    assert (loaded.n_layers, loaded.hidden_size) == (4, 64) and loaded.official_layer == 4
    assert loaded.layout == SpecialLayout(1, 0, True)
    assert dict(loaded.pool_ops) == {"mean": "mean", "max": "max", "cls": "first"}
    assert set(loaded.custom_poolings) == {"official"} and loaded.custom_poolings["official"].width == 64
    assert loaded.pooling_names == ("mean", "max", "cls", "official")
    assert loaded.default_poolings == ("mean", "official")
    ck = loaded.checkpoint
    assert ck["sha256"] == hashlib.sha256((tiny / "model.safetensors").read_bytes()).hexdigest()
    assert set(ck["files"]) == {"model.safetensors", "model_config.yml", "collator_config.yml", "vocab.json"}
    heads = {k for k in raw if k.startswith(("model.expression_decoder.", "model.mvc_decoder."))}
    assert set(ck["ignored_keys"]) == heads and len(heads) == 7
    assert ck["appended_special_tokens"] == [] and ck["chem_token_disabled"] is False
    state = loaded.model.state_dict()
    assert {f"model.{k}" for k in state} == set(raw) - heads
    for key, value in state.items():
        assert torch.equal(value, raw[f"model.{key}"]), key
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    assert loaded.tokenizer.max_length == 256 and loaded.tokenizer.seed == 0
    assert loaded.config["max_length"] == 256 and loaded.config["preset"] == "tiny"

    again = FAMILY.load(tiny, max_length=100, seed=9)
    assert again.tokenizer.max_length == 100 and again.tokenizer.settings()["seed"] == 9


def test_init_checkpoint_writes_the_genes_before_the_specials_and_refuses_angle_brackets(tmp_path):
    genes = [f"ENSG{i:011d}" for i in range(50, 100)]
    a = FAMILY.init_checkpoint("tiny", tmp_path / "a", seed=1, genes=genes)
    assert load_file(str(a / "model.safetensors"))["model.gene_encoder.embedding.weight"].shape == (53, 64)
    assert list(json.loads((a / "vocab.json").read_text())) == [*genes, "<pad>", "<cls>", "<eoc>"]
    with pytest.raises(ConfigError, match="'<'"):
        FAMILY.init_checkpoint("tiny", tmp_path / "f", genes=["A", "<drug>"])


def test_random_weights_keep_the_pad_embedding_zero():
    emb = random_state_dict(PRESETS["tiny"], seed=0, pad_id=2001)["model.gene_encoder.embedding.weight"]
    assert float(emb[2001].abs().max()) == 0 and float(emb[0].abs().max()) > 0


def test_head_keys_are_dropped_and_keys_named_without_the_model_prefix(tiny, tmp_path):
    broken = _copy(tiny, tmp_path / "b")

    def edit(state):
        del state["model.flag_encoder.weight"]
        state["model.mvc_decoder.extra"] = torch.ones(1)  # a head: dropped, never an error

    _edit_state(broken, edit)
    with pytest.raises(CheckpointError) as err:
        FAMILY.load(broken)
    msg = str(err.value)
    assert "missing: flag_encoder.weight" in msg and "mvc_decoder" not in msg


def test_unprefixed_keys_are_refused(tiny, tmp_path):
    broken = _copy(tiny, tmp_path / "b")
    key = "gene_encoder.embedding.weight"
    _edit_state(broken, lambda s: s.update({key: s.pop(f"model.{key}")}))
    with pytest.raises(CheckpointError, match=r"without the 'model\.' prefix.*gene_encoder\.embedding\.weight"):
        FAMILY.load(broken)


def test_drug_encoder_of_the_3b_files_is_ignored(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "chem")
    _edit_state(folder, lambda s: s.update({"model.chem_encoder.fc.weight": torch.randn(64, 16)}))
    _edit_yaml(folder / "collator_config.yml", lambda c: c.update({"use_chem_token": True, "keep_first_n_tokens": 2}))
    loaded = FAMILY.load(folder)
    assert "model.chem_encoder.fc.weight" in loaded.checkpoint["ignored_keys"]
    assert loaded.checkpoint["chem_token_disabled"] is True and loaded.tokenizer.keep_first_n_tokens == 2
    assert loaded.tokenizer.settings()["chem_token"] is False


def test_configs_and_vocab_must_agree(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "v")
    _edit_yaml(folder / "model_config.yml", lambda c: c.update({"vocab_size": 5000}))
    with pytest.raises(CheckpointError, match=r"vocab_size 5000 but vocab\.json holds 2003"):
        FAMILY.load(folder)
    other = _copy(tiny, tmp_path / "w")
    _edit_yaml(other / "model_config.yml", lambda c: c.update({"d_model": 32}))
    with pytest.raises(CheckpointError, match=r"wrong shape: .*\(64,\) \(expected \(32,\)\)"):
        FAMILY.load(other)
    bad = _copy(tiny, tmp_path / "y")
    (bad / "model_config.yml").write_text("d_model: [unclosed\n")
    with pytest.raises(CheckpointError, match="cannot read Tahoe-X1 model config"):
        FAMILY.load(bad)


def test_vocab_without_specials_gets_them_appended(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "v")
    vocab = json.loads((folder / "vocab.json").read_text())
    plain = {t: i for t, i in vocab.items() if not t.startswith("<")}
    (folder / "vocab.json").write_text(json.dumps(plain))
    loaded = FAMILY.load(folder)  # appended in the official order: same ids as the file had
    assert loaded.checkpoint["appended_special_tokens"] == ["<pad>", "<cls>", "<eoc>"]
    assert loaded.tokenizer.cls_id == vocab["<cls>"] and loaded.tokenizer.pad_id == vocab["<pad>"]


def test_max_length_and_stored_zeros_options(tiny):
    with pytest.raises(ConfigError, match="max_length"):
        FAMILY.load(tiny, max_length=1)
    with pytest.raises(ConfigError, match="stored_zeros must be one of keep, drop"):
        FAMILY.load(tiny, stored_zeros="zero")
    assert FAMILY.load(tiny, stored_zeros="drop").tokenizer.stored_zeros == "drop"
    assert FAMILY.load(tiny).tokenizer.stored_zeros == "keep"


# ------------------------------------------------------------------------------------------------
# gene mapping and tokens


def test_gene_mapping_overlap_report():
    tok = TahoeX1Tokenizer(_vocab(100))
    names = [*gene_ensembl_ids(10), "ENSG99999999999", "<cls>", "SG00001"]
    m = tok.map_genes(names)
    assert m.n_input == 13 and m.n_matched == 10 and m.n_vocab_genes == 100
    assert list(m.token_ids[:10]) == list(range(10)) and list(m.token_ids[10:]) == [-1, -1, -1]
    assert m.examples_missing == ("ENSG99999999999", "<cls>", "SG00001")


def test_symbols_raise_with_the_identifier_type():
    tok = TahoeX1Tokenizer(_vocab(100))
    with pytest.raises(GeneOverlapError) as err:
        tok.map_genes(gene_symbols(100))
    assert "Ensembl" in str(err.value) and "gene symbols" in str(err.value)


def test_tokens_by_hand():
    vocab = _vocab(6)
    tok = TahoeX1Tokenizer(vocab, max_length=50)
    X = sp.csr_matrix(np.array([[0, 5, 0, 1, 9, 0], [0, 0, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0]], dtype=np.float32))
    tb = _tokens(tok, CellBlock(np.array([3, 4, 5]), X), gene_ensembl_ids(6))
    cls = vocab["<cls>"]
    assert tb.genes[0].tolist() == [cls, 1, 3, 4] and tb.genes[2].tolist() == [cls, 0]
    # quantiles of (5, 1, 9) over 50 grades: 1 is the first edge -> bin 1, 5 the median edge, 9 the last
    edges = torch.quantile(torch.tensor([5.0, 1.0, 9.0]), torch.linspace(0, 1, 50))
    expected = (torch.bucketize(torch.tensor([5.0, 1.0, 9.0]), edges) + 1).tolist()
    assert tb.values[0].tolist() == [-2, *expected] and expected[1] == 1 and expected[2] == 50
    assert tb.values[2].tolist() == [-2, 1]  # one gene: every edge is its value, bucketize -> 0, + 1
    assert tb.genes[1].tolist() == [cls] and tb.empty.tolist() == [False, True, False]
    assert tb.truncated.tolist() == [False, False, False] and tb.lengths.tolist() == [4, 1, 2]


def test_keep_first_two_tokens_keeps_the_first_gene_raw():
    vocab = _vocab(300)
    tok1 = TahoeX1Tokenizer(vocab, max_length=40, keep_first_n_tokens=1)
    tok2 = TahoeX1Tokenizer(vocab, max_length=40, keep_first_n_tokens=2)
    rng = np.random.default_rng(2)
    dense = np.where(rng.random((6, 300)) < 0.5, rng.poisson(3, (6, 300)) + 1, 0).astype(np.float32)
    dense[:3] = 0  # cells 0..2: a first gene with a large count and one other gene
    dense[0, [10, 11]], dense[1, [20, 21]], dense[2, [30, 31]] = (700, 4), (33, 4), (2, 4)
    block = CellBlock(np.arange(6), sp.csr_matrix(dense))
    a, b = _tokens(tok1, block, gene_ensembl_ids(300)), _tokens(tok2, block, gene_ensembl_ids(300))
    assert [b.values[i][1] for i in range(3)] == [700.0, 33.0, 2.0]  # raw count (the encoder clamps at 512)
    assert [b.values[i][2] for i in range(3)] == [1.0, 1.0, 1.0]  # the rest binned alone
    assert [a.values[i][1] for i in range(3)] == [50.0, 50.0, 1.0]
    for i in range(3, 6):  # long cells: the first gene always kept in place, the rest subsampled
        full = np.flatnonzero(block.X[i].toarray()[0])
        assert b.truncated[i] and len(b.genes[i]) == 40 and b.genes[i][1] == full[0]
        assert b.values[i][1] == dense[i, full[0]]
        rest = b.values[i][2:]
        assert rest.min() >= 1 and rest.max() <= 50 and np.all(rest == np.round(rest))


def test_the_seed_changes_only_which_genes_a_long_cell_keeps():
    names = gene_ensembl_ids(400)
    big = _block(12, 400, seed=5, start=100, density=0.15)
    whole = _tokens(TahoeX1Tokenizer(_vocab(400), max_length=60, seed=7), big, names)
    assert whole.truncated.any() and (~whole.truncated).any()
    other_seed = _tokens(TahoeX1Tokenizer(_vocab(400), max_length=60, seed=8), big, names)
    for i in range(12):
        same = np.array_equal(other_seed.genes[i], whole.genes[i])
        assert same != bool(whole.truncated[i])


def test_truncation_keeps_cls_and_a_subset():
    tok = TahoeX1Tokenizer(_vocab(500), max_length=30, seed=1)
    block = _block(4, 500, seed=9)
    full = _tokens(TahoeX1Tokenizer(_vocab(500), max_length=10_000), block, gene_ensembl_ids(500))
    cut = _tokens(tok, block, gene_ensembl_ids(500))
    for i in range(4):
        assert cut.truncated[i] and len(cut.genes[i]) == 30 and cut.genes[i][0] == tok.cls_id
        pairs = dict(zip(full.genes[i][1:].tolist(), full.values[i][1:].tolist()))
        kept = cut.genes[i][1:].tolist()
        assert len(set(kept)) == 29 and all(pairs[g] == v for g, v in zip(kept, cut.values[i][1:].tolist()))
        assert kept != sorted(kept)  # random order, as torch.randperm


def test_stored_zeros_by_hand():
    """A stored zero is a token in bin 1; the other genes keep the bins of the cell without it."""
    vocab = _vocab(6)
    tok = TahoeX1Tokenizer(vocab, max_length=50)
    cls = vocab["<cls>"]
    # cell 0: 5, (0), 1, 9 with the zero stored in the middle; cell 1: only a stored zero; cell 2: 7, (0)
    X = sp.csr_matrix(
        (np.array([5, 0, 1, 9, 0, 7, 0], np.float32), np.array([1, 2, 3, 4, 5, 0, 5]), np.array([0, 4, 5, 7])),
        shape=(3, 6),
    )
    assert X.nnz == 7
    tb = _tokens(tok, CellBlock(np.array([3, 4, 5]), X), gene_ensembl_ids(6))
    without = _tokens(tok, CellBlock(np.array([3, 4, 5]), sp.csr_matrix(X.toarray())), gene_ensembl_ids(6))
    assert tb.genes[0].tolist() == [cls, 1, 2, 3, 4] and tb.values[0][2] == 1
    assert np.delete(tb.values[0], 2).tolist() == without.values[0].tolist() == [-2, 26, 1, 50]
    assert tb.genes[1].tolist() == [cls] and tb.empty.tolist() == [False, True, False]
    assert tb.genes[2].tolist() == [cls, 0, 5] and tb.values[2].tolist() == [-2, 1, 1]
    assert tb.lengths.tolist() == [5, 1, 3]
    # the option stored_zeros="drop" (a departure) reads the counts alone, as a dense matrix
    dropped = _tokens(
        TahoeX1Tokenizer(vocab, max_length=50, stored_zeros="drop"), CellBlock(np.arange(3), X), gene_ensembl_ids(6)
    )
    for a, b in ((dropped.genes, without.genes), (dropped.values, without.values)):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert dropped.empty.tolist() == [False, True, False]
    # keep_first_n_tokens=2: a zero in first place stays raw; the rest is binned as before
    tb2 = _tokens(
        TahoeX1Tokenizer(vocab, max_length=50, keep_first_n_tokens=2),
        CellBlock(np.arange(2), X[[2, 0]]),
        gene_ensembl_ids(6),
    )
    assert tb2.values[0].tolist() == [-2, 7, 1] and tb2.values[1].tolist() == [-2, 5, 1, 1, 50]


def test_stored_zeros_count_for_length_and_can_be_sampled():
    vocab = _vocab(400)
    names = gene_ensembl_ids(400)
    rng = np.random.default_rng(12)
    n, cols = 7, [np.sort(rng.choice(400, 90, replace=False)) for _ in range(7)]
    data = [np.where(rng.random(90) < 0.6, 0, rng.integers(1, 30, 90)).astype(np.float32) for _ in range(n)]
    X = sp.csr_matrix((np.concatenate(data), np.concatenate(cols), np.arange(n + 1) * 90), shape=(n, 400))
    tok = TahoeX1Tokenizer(vocab, max_length=64, seed=2)
    tb = _tokens(tok, CellBlock(np.arange(n), X), names)
    assert tb.truncated.all() and (tb.lengths == 64).all()  # 90 stored entries, ~36 non-zero each
    zero_genes = [set(c[d == 0].tolist()) for c, d in zip(cols, data)]
    kept_zeros = [sum(g in zero_genes[i] for g in tb.genes[i][1:].tolist()) for i in range(n)]
    assert min(kept_zeros) > 10
    for i in range(n):
        is_zero = np.array([g in zero_genes[i] for g in tb.genes[i][1:].tolist()])
        assert np.all(tb.values[i][1:][is_zero] == 1) and np.all(tb.values[i][1:][~is_zero] >= 1)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr", "memory"])
def test_stored_zeros_survive_every_reader(fmt, tmp_path):
    """The h5ad / zarr readers and in-memory AnnData hand the stored zeros to the tokenizer unchanged."""
    import anndata as ad

    from cellstrata.engine.input.sources import open_source

    rng = np.random.default_rng(31)
    n_cells, n_genes = 29, 150
    X = sp.random(n_cells, n_genes, density=0.25, format="csr", random_state=rng, dtype=np.float64)
    X.data = np.ceil(X.data * 20).astype(np.float32)
    X = sp.csr_matrix((X.data.astype(np.float32), X.indices, X.indptr), shape=X.shape)
    X.data[rng.random(X.nnz) < 0.3] = 0
    adata = ad.AnnData(X, var={"ensembl_id": gene_ensembl_ids(n_genes)})
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    if fmt == "h5ad":
        adata.write_h5ad(tmp_path / "c.h5ad")
        source = open_source(tmp_path / "c.h5ad", gene_column="ensembl_id")
    elif fmt == "zarr":
        adata.write_zarr(tmp_path / "c.zarr")
        source = open_source(tmp_path / "c.zarr", gene_column="ensembl_id")
    else:
        source = open_source(adata, gene_column="ensembl_id")
    tok = TahoeX1Tokenizer(_vocab(n_genes), max_length=1000)
    mapping = tok.map_genes(list(source.gene_names))
    ref = tok.tokenize(CellBlock(np.arange(n_cells), X), mapping)
    assert sum(len(g) - 1 for g in ref.genes) == X.nnz  # every stored entry is a token
    seen, n_stored_zeros = 0, 0
    for block in source.iter_blocks(6):
        n_stored_zeros += int((block.X.data == 0).sum())
        got = tok.tokenize(block, mapping)
        for j, i in enumerate(block.indices):
            assert np.array_equal(got.genes[j], ref.genes[i]) and np.array_equal(got.values[j], ref.values[i])
        seen += len(block)
    assert seen == n_cells and n_stored_zeros == int((X.data == 0).sum()) > 100


def test_negative_values_are_refused():
    tok = TahoeX1Tokenizer(_vocab(10))
    X = sp.csr_matrix(np.array([[1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [2.0, -1.0, 0, 0, 0, 0, 0, 0, 0, 0]]))
    with pytest.raises(InvalidValuesError, match=r"negative.*cell 43"):
        _tokens(tok, CellBlock(np.array([42, 43]), X), gene_ensembl_ids(10))


def test_settings_describe_tokens():
    vocab = _vocab(20)
    s = TahoeX1Tokenizer(vocab, max_length=300, seed=3, keep_first_n_tokens=2).settings()
    assert s["num_bins"] == 51 and s["max_length"] == 300 and s["seed"] == 3 and s["keep_first_n_tokens"] == 2
    assert s["pad_id"] == vocab["<pad>"] and s["pad_value"] == -2 and s["cls_id"] == vocab["<cls>"]
    assert s["vocab_size"] == 23 and len(s["vocab_sha256"]) == 64 and s["chem_token"] is False
    # stored zeros became tokens in version 2, counter-based draws in 3: older stores have another config hash
    assert s["version"] == "tahoe-x1-binning-3" and s["stored_zeros"] == "keep"
    assert s["rng"] == RNG_NAME
    assert TahoeX1Tokenizer(vocab, max_length=300, seed=3, keep_first_n_tokens=2, stored_zeros="drop").settings() == {
        **s,
        "stored_zeros": "drop",
    }
    assert TahoeX1Tokenizer(_vocab(21)).settings()["vocab_sha256"] != s["vocab_sha256"]
    json.dumps(s)


# ------------------------------------------------------------------------------------------------
# model


def test_official_pooling_counts_float16_overflow(tiny):
    pooling = FAMILY.load(tiny).custom_poolings["official"]
    hidden = torch.randn(3, 5, 64)
    out = torch.empty(3, 64, dtype=torch.float16)
    overflow = torch.zeros((), dtype=torch.int64)
    pooling(hidden, torch.tensor([5, 2, 3]), out, overflow, "torch")
    assert int(overflow) == 0 and torch.isfinite(out).all()
    np.testing.assert_allclose(out.float().norm(dim=1).numpy(), 1.0, atol=2e-3)
    strided = torch.zeros(3, 128, dtype=torch.float32)[:, ::2]  # any out strides
    pooling(hidden, torch.tensor([5, 2, 3]), strided, None, "torch")
    np.testing.assert_allclose(strided.numpy(), out.float().numpy(), atol=2e-3)


# ------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def cells():
    return synthetic_dataset(40, 2000, seed=5, genes_per_cell=150)


def test_extract_end_to_end_on_ensembl_ids(tiny, cells, tmp_path):
    store = cs.extract(
        cells,
        model="tahoe-x1",
        checkpoint=tiny,
        out=tmp_path / "s.zarr",
        poolings=["all"],
        dtype="float32",
        progress=False,
        gene_column="ensembl_id",
        chunk_cells=16,
    )
    assert store.poolings == ["mean", "max", "cls", "official"]
    loaded = FAMILY.load(tiny)
    data = {p: store.layers(p).compute() for p in store.poolings}
    assert all(v.shape == (5, 40, 64) for v in data.values())
    assert store.attrs["model"]["n_layers"] == 4 and store.attrs["official_layer"] == 4
    tok = loaded.tokenizer
    X = sp.csr_matrix(cells.X)
    for i in (0, 7, 33):
        tb = tok.tokenize(CellBlock(np.array([i]), X[i]), tok.map_genes(list(cells.var["ensembl_id"])))
        batch = TokenBatch(
            torch.from_numpy(tb.genes[0])[None],
            torch.from_numpy(tb.values[0])[None],
            torch.tensor([tb.lengths[0]]),
            np.arange(1),
        )
        states: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            loaded.model(batch, lambda layer, h, states=states: states.__setitem__(layer, h[0].clone()))
        norm = loaded.model.final_norm
        for layer, h in states.items():
            np.testing.assert_allclose(data["mean"][layer, i], h[1:].mean(0).numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(data["max"][layer, i], h[1:].max(0).values.numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(data["cls"][layer, i], h[0].numpy(), rtol=1e-4, atol=1e-5)
            emb = norm(h[0]).numpy()
            np.testing.assert_allclose(data["official"][layer, i], emb / np.linalg.norm(emb), atol=1e-5)


def test_extract_from_an_h5ad_storing_zeros_uses_them(tiny, tmp_path):
    """Through the whole pipeline from a file: a stored zero is a token (the store's <cls> states equal
    the model on every stored entry, and differ from the model on the counts alone)."""
    import anndata as ad

    rng = np.random.default_rng(8)
    n_cells, n_genes = 11, 2000
    X = sp.random(n_cells, n_genes, density=0.03, format="csr", random_state=rng, dtype=np.float64)
    X = sp.csr_matrix((np.ceil(X.data * 9).astype(np.float32), X.indices, X.indptr), shape=X.shape)
    X.data[rng.random(X.nnz) < 0.4] = 0
    adata = ad.AnnData(X, var={"ensembl_id": gene_ensembl_ids(n_genes)})
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    adata.write_h5ad(tmp_path / "z.h5ad")
    store = cs.extract(
        tmp_path / "z.h5ad",
        model="tahoe-x1",
        checkpoint=tiny,
        out=tmp_path / "z.zarr",
        poolings=["cls"],
        dtype="float32",
        progress=False,
        gene_column="ensembl_id",
        chunk_cells=4,
    )
    cls = store.layers("cls").compute()
    loaded = FAMILY.load(tiny)
    tok = loaded.tokenizer
    mapping = tok.map_genes(gene_ensembl_ids(n_genes))
    for i in (0, 5, 10):
        expected = []
        for matrix in (X[i], sp.csr_matrix(X[i].toarray())):  # every stored entry; the counts alone
            tb = tok.tokenize(CellBlock(np.array([i]), matrix), mapping)
            batch = TokenBatch(
                torch.from_numpy(tb.genes[0])[None],
                torch.from_numpy(tb.values[0])[None],
                torch.tensor([tb.lengths[0]]),
                np.arange(1),
            )
            states: dict[int, torch.Tensor] = {}
            with torch.inference_mode():
                loaded.model(batch, lambda layer, h, states=states: states.__setitem__(layer, h[0, 0].clone()))
            expected.append(states)
        assert len(tb.genes[0]) < X[i].nnz + 1  # the cell stores zeros
        for layer in range(5):
            np.testing.assert_allclose(cls[layer, i], expected[0][layer].numpy(), rtol=1e-4, atol=1e-5)
        assert np.abs(cls[4, i] - expected[1][4].numpy()).max() > 1e-3


def test_a_store_from_the_tokenizer_that_dropped_stored_zeros_is_not_resumed(tiny, cells, tmp_path, monkeypatch):
    """Stored zeros changed the tokens: the tokenizer version is in the config hash, so resuming refuses."""
    kwargs = {"model": "tahoe-x1", "checkpoint": tiny, "out": tmp_path / "s.zarr", "poolings": ["cls"]}
    current = TahoeX1Tokenizer.settings

    def version_one(self):
        s = current(self)
        del s["stored_zeros"]
        return {**s, "version": "tahoe-x1-binning-1"}

    monkeypatch.setattr(TahoeX1Tokenizer, "settings", version_one)
    cs.extract(cells[:8].copy(), gene_column="ensembl_id", progress=False, **kwargs)
    monkeypatch.setattr(TahoeX1Tokenizer, "settings", current)
    with pytest.raises(StoreConfigMismatchError, match="--overwrite"):
        cs.extract(cells[:8].copy(), gene_column="ensembl_id", progress=False, **kwargs)


def test_cli_refuses_symbol_named_genes(tiny, cells, tmp_path, capsys):
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    argv = ["extract", str(path), "--model", "tahoe-x1", "--checkpoint", str(tiny), "--out", str(tmp_path / "o.zarr")]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("cellstrata: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "0 of 2000" in lines[0] and "Ensembl" in lines[0] and "--gene-column" in lines[0]
    assert main([*argv, "--quiet", "--gene-column", "ensembl_id", "--limit", "8"]) == 0
