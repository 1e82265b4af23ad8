"""scGPT family: presets, checkpoint reading/writing, gene mapping, per-cell deterministic tokens."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellstrata.engine.errors import CheckpointError, ConfigError, GeneOverlapError
from cellstrata.engine.input.datasets import gene_symbols
from cellstrata.engine.input.sources import CellBlock
from cellstrata.engine.models.base import SpecialLayout
from cellstrata.engine.models.scgpt import (
    FAMILY,
    PRESETS,
    ScGPTModel,
    ScGPTTokenizer,
    bin_edges_digits,
    official_key_shapes,
)

# ------------------------------------------------------------------------------------------------
# helpers


def _vocab(n_genes: int) -> dict[str, int]:
    vocab = {g: i for i, g in enumerate(gene_symbols(n_genes))}
    for t in ("<pad>", "<cls>", "<eoc>"):
        vocab[t] = len(vocab)
    return vocab


def _block(n_cells: int, n_genes: int, seed: int = 0, start: int = 0) -> CellBlock:
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n_cells, n_genes)) < 0.3, rng.poisson(2, (n_cells, n_genes)) + 1, 0)
    return CellBlock(np.arange(start, start + n_cells), sp.csr_matrix(dense.astype(np.float32)))


def _tokens(tok: ScGPTTokenizer, X: sp.csr_matrix, indices: np.ndarray, names: list[str]):
    return tok.tokenize(CellBlock(np.asarray(indices), X), tok.map_genes(names))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return FAMILY.init_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), seed=3)


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _edit_state(folder: Path, edit) -> None:
    state = torch.load(folder / "best_model.pt", weights_only=True)
    edit(state)
    torch.save(state, folder / "best_model.pt")


# ------------------------------------------------------------------------------------------------
# registry and presets


def test_whole_human_preset_matches_published_keys():
    cfg = PRESETS["whole-human"]
    shapes = official_key_shapes(cfg)
    assert shapes["encoder.embedding.weight"] == (60697, 512)
    assert shapes["value_encoder.linear1.weight"] == (512, 1)
    for i in range(12):
        p = f"transformer_encoder.layers.{i}."
        assert shapes[p + "self_attn.Wqkv.weight"] == (1536, 512)
        assert shapes[p + "self_attn.Wqkv.bias"] == (1536,)
        assert shapes[p + "self_attn.out_proj.weight"] == (512, 512)
        assert shapes[p + "linear1.weight"] == (512, 512)
        assert shapes[p + "linear2.weight"] == (512, 512)
    assert "transformer_encoder.layers.12.norm1.weight" not in shapes
    assert {"decoder.fc.0.weight", "mvc_decoder.gene2query.weight", "mvc_decoder.W.weight"} <= shapes.keys()
    n_params = sum(math.prod(s) for s in shapes.values())
    assert 50e6 < n_params < 53e6  # best_model.pt is ~196 MB of float32
    with torch.device("meta"):
        model = ScGPTModel(cfg)
    torch_shapes = official_key_shapes(cfg, layout="torch")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: v for k, v in torch_shapes.items() if k.startswith(("encoder.", "value_encoder.", "transformer_"))
    }
    assert (model.n_layers, model.hidden_size) == (12, 512)
    assert cfg.max_length == 1200 and cfg.n_bins == 51 and cfg.pad_value == -2


def test_tiny_preset():
    cfg = PRESETS["tiny"]
    assert (cfg.embsize, cfg.nheads, cfg.d_hid, cfg.nlayers, cfg.max_length) == (64, 4, 128, 4, 256)
    assert cfg.vocab_size == 2003


def test_config_args_round_trip():
    from cellstrata.engine.models.scgpt import ScGPTConfig

    cfg = PRESETS["whole-human"]
    back = ScGPTConfig.from_args(cfg.to_args(), vocab_size=cfg.vocab_size)
    assert back == cfg
    args = cfg.to_args()
    for key in ("embsize", "nheads", "d_hid", "nlayers", "n_layers_cls", "n_bins", "dropout", "pad_token"):
        assert key in args
    assert args["MVC"] is True and args["input_emb_style"] == "continuous" and args["pad_value"] == -2


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_init_checkpoint_round_trip(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == ["args.json", "best_model.pt", "vocab.json"]
    vocab = json.loads((tiny / "vocab.json").read_text())
    assert list(vocab)[:3] == gene_symbols(3) and list(vocab)[-3:] == ["<pad>", "<cls>", "<eoc>"]
    raw = torch.load(tiny / "best_model.pt", weights_only=True)
    assert set(raw) == set(official_key_shapes(PRESETS["tiny"]))
    assert "transformer_encoder.layers.0.self_attn.Wqkv.weight" in raw

    loaded = FAMILY.load(tiny)
    assert loaded.family == "scgpt" and loaded.preset == "tiny"
    assert (loaded.n_layers, loaded.hidden_size) == (4, 64)
    assert loaded.layout == SpecialLayout(1, 0, True)
    assert dict(loaded.pool_ops) == {"mean": "mean", "max": "max", "cls": "first", "official": "first_l2"}
    assert loaded.default_poolings == ("mean", "cls")
    ck = loaded.checkpoint
    assert ck["sha256"] == hashlib.sha256((tiny / "best_model.pt").read_bytes()).hexdigest()
    assert ck["weights_layout"] == "flash" and ck["appended_special_tokens"] == []
    assert set(ck["files"]) == {"best_model.pt", "args.json", "vocab.json"}
    assert set(ck["ignored_keys"]) == {k for k in raw if k.startswith(("decoder.", "cls_decoder.", "mvc_decoder."))}
    assert loaded.config["embsize"] == 64 and loaded.config["preset"] == "tiny"
    assert loaded.tokenizer.max_length == 256 and loaded.tokenizer.seed == 0
    state = loaded.model.state_dict()
    for key, value in raw.items():
        name = key.replace("Wqkv.", "in_proj_")
        if name in state:
            assert torch.equal(state[name], value), key
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training

    again = FAMILY.load(tiny, max_length=100, seed=9)
    assert again.tokenizer.max_length == 100 and again.tokenizer.settings()["seed"] == 9


def test_init_checkpoint_puts_the_three_specials_after_the_genes(tmp_path):
    a = FAMILY.init_checkpoint("tiny", tmp_path / "a", seed=1, genes=gene_symbols(50))
    assert torch.load(a / "best_model.pt", weights_only=True)["encoder.embedding.weight"].shape == (53, 64)
    assert list(json.loads((a / "vocab.json").read_text()))[-4:] == ["SG00049", "<pad>", "<cls>", "<eoc>"]


def test_layouts_load_to_identical_weights(tiny, tmp_path):
    """Released flash layout (Wqkv), GitHub HEAD's self_attn._impl.*, torch in_proj_* are one model."""
    flash = FAMILY.load(tiny).model.state_dict()
    renames = {
        "torch": lambda k: k.replace("self_attn.Wqkv.", "self_attn.in_proj_"),
        "head": lambda k: k.replace("self_attn.", "self_attn._impl."),
    }
    for name, rename in renames.items():
        folder = _copy(tiny, tmp_path / name)
        _edit_state(folder, lambda s, r=rename: [s.__setitem__(r(k), s.pop(k)) for k in list(s)])
        loaded = FAMILY.load(folder)
        other = loaded.model.state_dict()
        assert other.keys() == flash.keys()
        assert all(torch.equal(other[k], flash[k]) for k in flash), name
        assert loaded.checkpoint["weights_layout"] == ("torch" if name == "torch" else "flash")


def test_a_missing_file_is_named_with_the_released_files(tiny, tmp_path):
    for f in ("vocab.json", "args.json", "best_model.pt"):
        folder = _copy(tiny, tmp_path / f.replace(".", "_"))
        (folder / f).unlink()
        with pytest.raises(CheckpointError) as err:
            FAMILY.load(folder)
        msg = str(err.value)
        assert f"lacks {f}" in msg and "best_model.pt" in msg and "args.json" in msg and "vocab.json" in msg


def test_args_vocab_weights_disagree(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "vocab")
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["EXTRA"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match=r"encoder.embedding.weight \(2003, 64\) \(expected \(2004, 64\)\)"):
        FAMILY.load(folder)

    folder = _copy(tiny, tmp_path / "layers")
    args = json.loads((folder / "args.json").read_text())
    args["nlayers"] = 3
    (folder / "args.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match=r"unexpected: transformer_encoder\.layers\.3"):
        FAMILY.load(folder)

    del args["embsize"]
    (folder / "args.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match=r"lacks the field.*embsize"):
        FAMILY.load(folder)


def test_vocab_without_specials_gets_them_appended(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "nospecial")
    vocab = json.loads((folder / "vocab.json").read_text())
    genes_only = {k: v for k, v in vocab.items() if not k.startswith("<")}
    (folder / "vocab.json").write_text(json.dumps(genes_only))
    loaded = FAMILY.load(folder)
    assert loaded.checkpoint["appended_special_tokens"] == ["<pad>", "<cls>", "<eoc>"]
    assert loaded.tokenizer.vocab == vocab


def test_a_torch_file_that_is_not_a_state_dict_is_refused(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "nested")
    torch.save({"model": {"a": torch.zeros(1)}}, folder / "best_model.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        FAMILY.load(folder)


def test_max_length_is_checked(tiny):
    with pytest.raises(ConfigError, match="max_length"):
        FAMILY.load(tiny, max_length=1)


# ------------------------------------------------------------------------------------------------
# gene mapping


def test_gene_mapping_overlap_report():
    tok = ScGPTTokenizer(_vocab(100))
    names = [*gene_symbols(30), "FOO", "BAR", "<pad>", "SG00031"]
    m = tok.map_genes(names)
    assert (m.n_input, m.n_matched, m.n_vocab_genes) == (34, 31, 100)
    assert m.token_ids.tolist() == [*range(30), -1, -1, -1, 31]
    assert m.examples_missing == ("FOO", "BAR", "<pad>")
    assert m.report() == "31 of 34 input genes (91.2%) are in the model's vocabulary of 100 genes"


def test_no_overlap_shows_the_vocabulary_and_spots_ensembl_ids():
    tok = ScGPTTokenizer(_vocab(100))
    with pytest.raises(GeneOverlapError) as err:
        tok.map_genes([f"ENSG{i:011d}" for i in range(200)])
    assert "SG00000" in str(err.value) and "Ensembl" in str(err.value)


# ------------------------------------------------------------------------------------------------
# tokenizer


def test_the_same_cell_at_another_index_is_another_draw():
    tok = ScGPTTokenizer(_vocab(300), max_length=92, seed=5)
    names = gene_symbols(300)
    whole = _block(20, 300, seed=1, start=100)
    ref = tok.tokenize(whole, tok.map_genes(names))
    moved = tok.tokenize(CellBlock(whole.indices[[7]] + 1, whole.X[[7]]), tok.map_genes(names))
    assert not np.array_equal(moved.values[0], ref.values[7])


def test_seed_changes_only_tie_breaks():
    names = gene_symbols(300)
    block = _block(15, 300, seed=2)
    a = ScGPTTokenizer(_vocab(300), seed=0, max_length=1000).tokenize(
        block, ScGPTTokenizer(_vocab(300)).map_genes(names)
    )
    b = ScGPTTokenizer(_vocab(300), seed=1, max_length=1000).tokenize(
        block, ScGPTTokenizer(_vocab(300)).map_genes(names)
    )
    n_diff = 0
    for i in range(len(block)):
        np.testing.assert_array_equal(a.genes[i], b.genes[i])
        x = block.X[i].data
        counts = np.array([len(x)])
        left, right = bin_edges_digits(x, np.zeros(len(x), dtype=np.int64), counts, 51)
        fixed = left == right
        np.testing.assert_array_equal(a.values[i][1:][fixed], left[fixed])  # no tie: exact bin
        np.testing.assert_array_equal(b.values[i][1:][fixed], left[fixed])
        tie = a.values[i][1:][~fixed]
        assert ((tie > right[~fixed]) & (tie <= left[~fixed])).all()  # a bin the value's ties span
        n_diff += int((a.values[i] != b.values[i]).sum())
    assert n_diff > 0


def test_truncation_keeps_cls_first():
    vocab = _vocab(300)
    names = gene_symbols(300)
    block = _block(10, 300, seed=3)
    t0 = ScGPTTokenizer(vocab, max_length=16, seed=0).tokenize(block, ScGPTTokenizer(vocab).map_genes(names))
    t1 = ScGPTTokenizer(vocab, max_length=16, seed=1).tokenize(block, ScGPTTokenizer(vocab).map_genes(names))
    assert t0.truncated.all() and (t0.lengths == 16).all()
    for i in range(10):
        assert t0.genes[i][0] == vocab["<cls>"] and t0.values[i][0] == -2
        assert vocab["<cls>"] not in t0.genes[i][1:].tolist()
        assert len(set(t0.genes[i].tolist())) == 16
    assert any(not np.array_equal(t0.genes[i], t1.genes[i]) for i in range(10))
    exact = ScGPTTokenizer(vocab, max_length=int(max(t0.lengths.max(), 1)), seed=0)
    assert exact.max_length == 16


def test_stored_zeros_are_no_tokens_and_an_empty_cell_is_cls_alone():
    vocab = _vocab(50)
    tok = ScGPTTokenizer(vocab, seed=4)
    rng = np.random.default_rng()
    dense = np.where(rng.random((6, 50)) < 0.5, rng.integers(1, 9, (6, 50)), 0).astype(np.float32)
    dense[5] = 0
    ref = _tokens(tok, sp.csr_matrix(dense), np.arange(6), gene_symbols(50))
    assert ref.empty.tolist() == [False] * 5 + [True]
    assert ref.genes[5].tolist() == [vocab["<cls>"]] and ref.values[5].tolist() == [-2.0]
    stored = sp.csr_matrix(dense)
    stored.data[rng.random(stored.nnz) < 0.3] = 0  # zeros stored in the matrix: read like absent entries
    out = _tokens(tok, stored, np.arange(6), gene_symbols(50))
    dropped = _tokens(tok, sp.csr_matrix(stored.toarray()), np.arange(6), gene_symbols(50))
    assert stored.nnz > np.count_nonzero(stored.data)
    for i in range(6):
        np.testing.assert_array_equal(out.genes[i], dropped.genes[i])
        np.testing.assert_array_equal(out.values[i], dropped.values[i])


def test_settings_describe_tokens():
    vocab = _vocab(20)
    s = ScGPTTokenizer(vocab, max_length=300, seed=3).settings()
    assert s["n_bins"] == 51 and s["max_length"] == 300 and s["seed"] == 3
    assert s["pad_id"] == vocab["<pad>"] and s["pad_value"] == -2 and s["cls_id"] == vocab["<cls>"]
    assert s["vocab_size"] == 23 and len(s["vocab_sha256"]) == 64
    assert ScGPTTokenizer(_vocab(21)).settings()["vocab_sha256"] != s["vocab_sha256"]
    json.dumps(s)


# ------------------------------------------------------------------------------------------------
# model
