"""Geneformer family: presets vs the published files, checkpoint reading/writing, dictionaries, tokens, end to end."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.errors import (
    CheckpointError,
    ConfigError,
    GeneOverlapError,
    StoreConfigMismatchError,
)
from cellstrata.engine.input.datasets import ensembl_id_of, gene_ensembl_ids, gene_symbols, synthetic_dataset
from cellstrata.engine.input.sources import CellBlock
from cellstrata.engine.models.base import SpecialLayout
from cellstrata.engine.models.geneformer import (
    FAMILY,
    PRESETS,
    DuplicateGenesWarning,
    GeneDictionaries,
    GeneformerConfig,
    GeneformerModel,
    GeneformerTokenizer,
    official_key_shapes,
)

# ------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return FAMILY.init_checkpoint("tiny", tmp_path_factory.mktemp("gf") / "tiny", seed=3)


def _copy(folder: Path, dest: Path) -> Path:
    return Path(shutil.copytree(folder, dest))


def _edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def _hand_dicts(special: bool = True) -> GeneDictionaries:
    specials = ["<pad>", "<mask>", "<cls>", "<eos>"] if special else ["<pad>", "<mask>"]
    token = {t: i for i, t in enumerate(specials)}
    genes = gene_ensembl_ids(5)
    token.update({g: 4 + i for i, g in enumerate(genes)})  # G0..G4 -> 4..8 in both layouts
    median = dict(zip(genes, [2.0, 0.5, 1.0, 5.0, 1.0]))
    return GeneDictionaries(token, median)


def _symbol_adata(n_cells: int = 60):
    return synthetic_dataset(n_cells, 2000, seed=5, genes_per_cell=120)


# ------------------------------------------------------------------------------------------------
# registry and presets


def _safetensors_size(shapes: dict[str, tuple[int, ...]], int64: frozenset[str] = frozenset()) -> int:
    """Bytes of the file ``save_pretrained`` writes for these float32 (and int64) tensors."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in [*sorted(int64), *sorted(k for k in shapes if k not in int64)]:  # 8-byte dtypes first
        nbytes = (8 if name in int64 else 4) * math.prod(shapes[name])
        dtype = "I64" if name in int64 else "F32"
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    n = len(json.dumps(header, separators=(",", ":")))
    return 8 + n + (-n) % 8 + offset


@pytest.mark.parametrize(
    ("preset", "published_bytes", "position_ids"),
    [("v1-10m", 41_183_536, True), ("v2-104m", 417_571_156, False), ("v2-316m", 1_265_455_076, False)],
)
def test_released_presets_reproduce_the_published_files(preset, published_bytes, position_ids):
    """Our key list and shapes give exactly the byte size of each released model.safetensors
    (Hugging Face ctheodoris/Geneformer; V1's file also holds the int64 position_ids buffer)."""
    cfg = PRESETS[preset]
    shapes = official_key_shapes(cfg, position_ids=position_ids)
    extra = frozenset({"bert.embeddings.position_ids"}) if position_ids else frozenset()
    assert _safetensors_size(shapes, extra) == published_bytes
    with torch.device("meta"):
        model = GeneformerModel(cfg)
    ours = {"bert." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: v for k, v in shapes.items() if k.startswith("bert.") and k != "bert.embeddings.position_ids"}
    assert (model.n_layers, model.hidden_size) == (cfg.num_hidden_layers, cfg.hidden_size)


def test_v2_316m_tensor_inventory():
    shapes = official_key_shapes(PRESETS["v2-316m"])
    assert len(shapes) == 298 and sum(math.prod(s) for s in shapes.values()) == 316_354_867


def test_preset_values():
    v1 = PRESETS["v1-10m"]
    assert (v1.num_hidden_layers, v1.hidden_size, v1.num_attention_heads, v1.intermediate_size) == (6, 256, 4, 512)
    assert (v1.max_position_embeddings, v1.vocab_size, v1.hidden_act, v1.layer_norm_eps) == (2048, 25426, "relu", 1e-12)
    assert (v1.type_vocab_size, v1.pad_token_id) == (2, 0)
    for name, dims in (("v2-104m", (12, 768, 12, 3072)), ("v2-316m", (18, 1152, 18, 4608))):
        c = PRESETS[name]
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == dims
        assert (c.max_position_embeddings, c.vocab_size) == (4096, 20275)
    assert set(PRESETS) == {"v1-10m", "v2-104m", "v2-316m", "tiny"}
    t = PRESETS["tiny"]
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.intermediate_size) == (4, 64, 4, 128)
    assert t.vocab_size == 2004 and t.max_position_embeddings == 2048


def test_config_round_trip_and_errors():
    cfg = PRESETS["v2-104m"]
    assert GeneformerConfig.from_config(cfg.to_config()) == cfg
    raw = cfg.to_config()
    del raw["intermediate_size"]
    with pytest.raises(CheckpointError, match=r"lacks the field.*intermediate_size"):
        GeneformerConfig.from_config(raw)
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        GeneformerConfig.from_config({**cfg.to_config(), "model_type": "gpt2"})
    with pytest.raises(CheckpointError, match="hidden_act 'swish'"):
        GeneformerConfig.from_config({**cfg.to_config(), "hidden_act": "swish"})
    with pytest.raises(CheckpointError, match="not divisible"):
        GeneformerConfig.from_config({**cfg.to_config(), "num_attention_heads": 5})
    no_act = {k: v for k, v in cfg.to_config().items() if k != "hidden_act"}
    assert GeneformerConfig.from_config(no_act).hidden_act == "gelu"  # BertConfig's default


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_init_checkpoint_round_trip(tiny):
    names = sorted(p.name for p in tiny.iterdir())
    assert names == [
        "config.json",
        "gene_median_dictionary_gc104M.pkl",
        "model.safetensors",
        "token_dictionary_gc104M.pkl",
    ]
    with (tiny / "token_dictionary_gc104M.pkl").open("rb") as f:
        token = pickle.load(f)
    assert list(token)[:6] == ["<pad>", "<mask>", "<cls>", "<eos>", "ENSG00000000000", "ENSG00000000001"]
    assert token["<pad>"] == 0 and len(token) == 2004 and type(token["ENSG00000000000"]) is int

    loaded = FAMILY.load(tiny)
    assert loaded.family == "geneformer" and loaded.preset == "tiny"
    assert (loaded.n_layers, loaded.hidden_size, loaded.official_layer) == (4, 64, 3)
    assert loaded.layout == SpecialLayout(1, 1, True)
    assert dict(loaded.pool_ops) == {"mean": "mean", "max": "max", "cls": "first", "official": "first"}
    assert loaded.pooling_names == ("mean", "max", "cls", "official") and loaded.default_poolings == ("mean", "cls")
    assert not loaded.custom_poolings
    ck = loaded.checkpoint
    assert ck["sha256"] == hashlib.sha256((tiny / "model.safetensors").read_bytes()).hexdigest()
    assert ck["weights_file"] == "model.safetensors" and ck["genes_without_median"] == 0
    assert set(ck["files"]) == {"config.json", "model.safetensors", "token_dictionary", "gene_median_dictionary"}
    assert ck["ignored_keys"] == sorted(k for k in official_key_shapes(PRESETS["tiny"]) if k.startswith("cls."))
    assert loaded.tokenizer.max_length == 2048 and loaded.config["preset"] == "tiny"
    from safetensors.torch import load_file

    raw = load_file(str(tiny / "model.safetensors"))
    state = loaded.model.state_dict()
    assert set(raw) == set(official_key_shapes(PRESETS["tiny"]))
    assert all(torch.equal(state[k[5:]], v) for k, v in raw.items() if k.startswith("bert."))
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    assert FAMILY.load(tiny, max_length=100).tokenizer.settings()["max_length"] == 100


def test_init_checkpoint_puts_the_four_specials_before_the_genes(tmp_path):
    a = FAMILY.init_checkpoint("tiny", tmp_path / "a", seed=1, genes=gene_ensembl_ids(30))
    assert FAMILY.load(a).model.embeddings.word_embeddings.weight.shape == (34, 64)
    with (a / "token_dictionary_gc104M.pkl").open("rb") as f:
        assert list(pickle.load(f)) == ["<pad>", "<mask>", "<cls>", "<eos>", *gene_ensembl_ids(30)]


def test_dictionaries_of_a_hugging_face_snapshot_are_found_by_vocabulary_size(tiny, tmp_path):
    """Model folders beside geneformer/ (V2 dictionaries) and geneformer/gene_dictionaries_30m/ (V1)."""
    snap = tmp_path / "snapshot"
    model = _copy(tiny, snap / "Geneformer-V2-tiny")
    (snap / "geneformer" / "gene_dictionaries_30m").mkdir(parents=True)
    for f in ("token_dictionary_gc104M.pkl", "gene_median_dictionary_gc104M.pkl"):
        (model / f).rename(snap / "geneformer" / f)
    v1 = FAMILY.init_checkpoint("v1-10m", tmp_path / "v1", genes=gene_ensembl_ids(10))
    for f in ("token_dictionary_gc30M.pkl", "gene_median_dictionary_gc30M.pkl"):
        shutil.copy(v1 / f, snap / "geneformer" / "gene_dictionaries_30m" / f)
    shutil.copy(v1 / "token_dictionary_gc30M.pkl", snap / "geneformer" / "token_dictionary.pkl")  # wrong size
    loaded = FAMILY.load(model)
    assert loaded.checkpoint["files"]["token_dictionary"]["path"] == str(
        snap / "geneformer" / "token_dictionary_gc104M.pkl"
    )
    assert loaded.tokenizer.special

    (snap / "geneformer" / "token_dictionary_gc104M.pkl").unlink()
    with pytest.raises(CheckpointError) as err:
        FAMILY.load(model)
    msg = str(err.value)
    assert "2004 tokens" in msg and "token_dictionary.pkl (12 tokens)" in msg and "token_dictionary=" in msg


def test_explicit_dictionary_options(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "f")
    elsewhere = tmp_path / "dicts"
    elsewhere.mkdir()
    for f in ("token_dictionary_gc104M.pkl", "gene_median_dictionary_gc104M.pkl"):
        (folder / f).rename(elsewhere / f)
    with pytest.raises(CheckpointError, match="no Geneformer token dictionary"):
        FAMILY.load(folder)
    loaded = FAMILY.load(folder, token_dictionary=elsewhere / "token_dictionary_gc104M.pkl")
    assert loaded.checkpoint["files"]["gene_median_dictionary"]["path"].startswith(str(elsewhere))
    (elsewhere / "gene_median_dictionary_gc104M.pkl").rename(tmp_path / "m.pkl")
    with pytest.raises(CheckpointError, match="gene_median_dictionary="):
        FAMILY.load(folder, token_dictionary=elsewhere / "token_dictionary_gc104M.pkl")
    loaded = FAMILY.load(
        folder, token_dictionary=elsewhere / "token_dictionary_gc104M.pkl", gene_median_dictionary=tmp_path / "m.pkl"
    )
    assert loaded.tokenizer.n_vocab_genes == 2000
    with pytest.raises(CheckpointError, match="does not exist"):
        FAMILY.load(folder, token_dictionary=tmp_path / "nope.pkl")


def test_real_dictionary_pickles_with_numpy_scalars(tiny, tmp_path):
    """The released pickles hold numpy int16 token ids and numpy float64 medians."""
    folder = _copy(tiny, tmp_path / "np")
    with (folder / "token_dictionary_gc104M.pkl").open("rb") as f:
        token = pickle.load(f)
    with (folder / "gene_median_dictionary_gc104M.pkl").open("rb") as f:
        median = pickle.load(f)
    with (folder / "token_dictionary_gc104M.pkl").open("wb") as f:
        pickle.dump({k: (v if k.startswith("<") else np.int16(v)) for k, v in token.items()}, f)
    with (folder / "gene_median_dictionary_gc104M.pkl").open("wb") as f:
        pickle.dump({k: np.float64(v) for k, v in median.items()}, f)
    a, b = FAMILY.load(tiny).tokenizer, FAMILY.load(folder).tokenizer
    assert a.settings() == b.settings()


def test_old_bin_file_and_bare_bert_model_load_the_same_weights(tiny, tmp_path):
    from safetensors.torch import load_file

    ref = FAMILY.load(tiny).model.state_dict()
    raw = load_file(str(tiny / "model.safetensors"))
    old = _copy(tiny, tmp_path / "old")
    (old / "model.safetensors").unlink()
    torch.save({**raw, "bert.embeddings.position_ids": torch.arange(2048)[None]}, old / "pytorch_model.bin")
    loaded = FAMILY.load(old)
    assert loaded.checkpoint["weights_file"] == "pytorch_model.bin"
    assert "bert.embeddings.position_ids" in loaded.checkpoint["ignored_keys"]
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in ref.items())

    bare = _copy(tiny, tmp_path / "bare")
    _edit_weights(
        bare, lambda s: [s.__setitem__(k[5:], s.pop(k)) if k.startswith("bert.") else s.pop(k) for k in list(s)]
    )
    other = FAMILY.load(bare)
    assert other.checkpoint["ignored_keys"] == [] and all(
        torch.equal(other.model.state_dict()[k], v) for k, v in ref.items()
    )


_RAN: list[str] = []


def _side_effect() -> dict:
    _RAN.append("ran")
    return {}


class _Payload:
    def __reduce__(self):
        return (_side_effect, ())


def test_code_bearing_files_are_refused_not_run(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    torch.save(
        {"bert.embeddings.word_embeddings.weight": torch.zeros(1), "x": _Payload()}, folder / "pytorch_model.bin"
    )
    with pytest.raises(CheckpointError, match="weights_only=True"):
        FAMILY.load(folder)
    folder = _copy(tiny, tmp_path / "evil_dict")
    with (folder / "gene_median_dictionary_gc104M.pkl").open("wb") as f:
        pickle.dump({"ENSG00000000000": _Payload()}, f)
    with pytest.raises(CheckpointError, match="only plain data"):
        FAMILY.load(folder)
    assert _RAN == []
    (folder / "gene_median_dictionary_gc104M.pkl").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read Geneformer gene median dictionary"):
        FAMILY.load(folder)


def test_a_missing_weights_file_names_both_released_names_and_max_length_is_checked(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"lacks model\.safetensors or pytorch_model\.bin"):
        FAMILY.load(folder)
    with pytest.raises(ConfigError, match="between 1 and 2048"):
        FAMILY.load(tiny, max_length=5000)
    with pytest.raises(ConfigError, match=">= 3"):
        FAMILY.load(tiny, max_length=2)


# ------------------------------------------------------------------------------------------------
# tokenizer


def test_tokens_hand_computed():
    """x = counts / n_counts * 1e4 / median; G0..G4 medians 2, 0.5, 1, 5, 1; an unknown gene last."""
    names = [*gene_ensembl_ids(5), "ENSG99999999999"]
    X = sp.csr_matrix(np.array([[4, 2, 0, 8, 3, 3], [0, 0, 5, 0, 0, 9], [0, 0, 0, 0, 0, 7], [0] * 6], dtype=np.float32))
    # cell 0 (n = 20): G0 1000, G1 2000, G3 800, G4 1500 -> G1, G4, G0, G3
    v2 = GeneformerTokenizer(_hand_dicts(), max_length=4096)
    out = v2.tokenize(CellBlock(np.arange(4), X), v2.map_genes(names))
    assert [g.tolist() for g in out.genes] == [[2, 5, 8, 4, 7, 3], [2, 6, 3], [2, 3], [2, 3]]
    assert out.empty.tolist() == [False, False, True, True] and not out.truncated.any()
    assert all(v.dtype == np.float32 and not v.any() and len(v) == len(g) for v, g in zip(out.values, out.genes))
    short = GeneformerTokenizer(_hand_dicts(), max_length=4)
    cut = short.tokenize(CellBlock(np.arange(4), X), short.map_genes(names))
    assert cut.genes[0].tolist() == [2, 5, 8, 3] and cut.truncated.tolist() == [True, False, False, False]
    v1 = GeneformerTokenizer(_hand_dicts(special=False), max_length=3)
    one = v1.tokenize(CellBlock(np.arange(4), X), v1.map_genes(names))
    assert [g.tolist() for g in one.genes] == [[5, 8, 4], [6], [], []] and one.truncated.tolist()[0]
    assert (v2.pad_id, v2.cls_id, v2.eos_id, v1.cls_id) == (0, 2, 3, None)


def test_duplicates_symbols_mapping_and_case():
    """Duplicate ids are separate tokens (summed with duplicate_genes=sum); ids are matched upper-cased;
    symbols need the symbol dictionary."""
    d = _hand_dicts()
    ids = gene_ensembl_ids(5)
    X = sp.csr_matrix(np.array([[1, 0, 0, 0, 0, 2, 3], [0, 0, 4, 1, 0, 4, 1]], dtype=np.float32))
    tok = GeneformerTokenizer(d, max_length=100)
    names = [ids[0], ids[1], ids[2], ids[3], ids[4], ids[2].lower(), ids[3]]
    with pytest.warns(DuplicateGenesWarning) as rec:
        m = tok.map_genes(names)
    msg = str(rec[0].message)
    assert msg.startswith("2 genes are given by several input columns") and "\n" not in msg
    assert f"{ids[2]} = {ids[2].lower()} (2 columns)" in msg and f"{ids[3]} (2 columns)" in msg
    assert m.token_ids.tolist() == [4, 5, 6, 7, 8, 6, 7]
    # cell 0 (n = 6): G0 = 1/6*1e4/2 = 833, G2 (lower-case copy) = 3333, G3 (second copy) = 1000
    # cell 1 (n = 10): both G2 copies 4000, both G3 copies 200: two tokens each, adjacent
    out = tok.tokenize(CellBlock(np.arange(2), X), m)
    assert [g.tolist() for g in out.genes] == [[2, 6, 7, 4, 3], [2, 6, 6, 7, 7, 3]]
    summing = GeneformerTokenizer(d, max_length=100, duplicate_genes="sum")
    with pytest.warns(DuplicateGenesWarning, match="summed"):
        m = summing.map_genes(names)
    # summed: G2 8000, G3 400 (the summed slots come after the single ones, which only matters for ties)
    assert [g.tolist() for g in summing.tokenize(CellBlock(np.arange(2), X), m).genes] == [
        [2, 6, 7, 4, 3],
        [2, 6, 7, 3],
    ]
    symbols = [f"GENE{i}" for i in range(5)]
    with pytest.raises(GeneOverlapError) as err:
        tok.map_genes(symbols)
    msg = str(err.value)
    assert "0 of 5 input genes" in msg and "Ensembl" in msg and "--gene-column ensembl_id" in msg
    assert "no symbol dictionary" in msg and "\n" not in msg
    d.symbol_to_id = dict(zip(symbols, ids))
    d.ensembl_mapping = {ids[0]: ids[1], **{g: g for g in ids[1:]}}  # ids[0] retired onto ids[1]
    with pytest.warns(DuplicateGenesWarning, match="merges different input ids"):
        mapped = GeneformerTokenizer(d, max_length=100).map_genes([*symbols, "GENE9"])
    assert mapped.token_ids.tolist() == [5, 5, 6, 7, 8, -1] and mapped.examples_missing == ("GENE9",)
    assert mapped.report() == "5 of 6 input genes (83.3%) are in the model's vocabulary of 5 genes"


def test_identifiers_with_lower_case_letters_are_found():
    """The vocabulary is compared upper-cased like the input (exact match first): symbols such as C20orf96
    in a vocabulary or a name dictionary are found in any case; names differing only by case match exactly."""
    token = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "C20orf96": 4, "ACTB": 5, "Mt1": 6, "MT1": 7}
    median = {g: 1.0 for g in token if not g.startswith("<")}
    tok = GeneformerTokenizer(GeneDictionaries(token, median), max_length=100)
    names = ["C20orf96", "c20orf96", "C20ORF96", "actb", "Mt1", "MT1", "mt1", "ACTG1"]
    with pytest.warns(DuplicateGenesWarning):
        m = tok.map_genes(names)
    assert m.token_ids.tolist() == [4, 4, 4, 5, 6, 7, -1, -1]
    ids = gene_ensembl_ids(2)
    d = GeneDictionaries(
        {"<pad>": 0, "<mask>": 1, ids[0]: 2, ids[1]: 3},
        {ids[0]: 1.0, ids[1]: 1.0},
        symbol_to_id={"C20orf96": ids[0], "ACTB": ids[1].lower()},
    )
    with pytest.warns(DuplicateGenesWarning, match="C20orf96 = c20orf96"):
        m = GeneformerTokenizer(d, max_length=10).map_genes(["C20orf96", "c20orf96", "Actb", "ACTB2"])
    assert m.token_ids.tolist() == [2, 2, 3, -1]  # the symbol's Ensembl id (lower-case here) is matched too


def test_settings_describe_tokens(tiny):
    s = FAMILY.load(tiny).tokenizer.settings()
    json.dumps(s)
    assert s["max_length"] == 2048 and s["special_tokens"] and (s["cls_id"], s["eos_id"], s["pad_id"]) == (2, 3, 0)
    assert s["target_sum"] == 10_000 and len(s["token_dictionary_sha256"]) == 64
    other = GeneformerTokenizer(_hand_dicts(), max_length=2048).settings()
    assert other["gene_median_dictionary_sha256"] != s["gene_median_dictionary_sha256"]


# ------------------------------------------------------------------------------------------------
# model and poolings


# ------------------------------------------------------------------------------------------------
# end to end


def _transformers():
    """``transformers`` imported with the repository root off ``sys.path`` (its ``kernels`` probe)."""
    root = Path(__file__).resolve().parents[2]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        module = pytest.importorskip("transformers")
        importlib.import_module("transformers.models.bert.modeling_bert")
        return module
    finally:
        sys.path[:] = saved


def test_extract_end_to_end_with_ensembl_ids(tiny, tmp_path):
    adata = _symbol_adata()
    assert adata.var["ensembl_id"].iloc[0] == ensembl_id_of(adata.var_names[0])
    store = cs.extract(
        adata,
        model="geneformer",
        checkpoint=tiny,
        out=tmp_path / "s.zarr",
        poolings=["all"],
        gene_column="ensembl_id",
        dtype="float32",
        chunk_cells=16,
        progress=False,
    )
    assert store.poolings == ["mean", "max", "cls", "official"]
    layers = {p: store.layers(p).compute() for p in store.poolings}
    assert all(v.shape == (5, 60, 64) for v in layers.values())
    np.testing.assert_array_equal(layers["official"], layers["cls"])  # V2: EmbExtractor's emb_mode="cls"
    assert store.attrs["official_layer"] == 3 and store.attrs["model"]["family"] == "geneformer"
    assert store.attrs["pool_ops"]["official"] == "first" and store.attrs["tokenizer"]["duplicate_genes"] == "official"
    n_tokens = np.asarray(store.group["n_tokens"][:])

    loaded = FAMILY.load(tiny)
    tok = loaded.tokenizer
    tb = tok.tokenize(CellBlock(np.arange(60), sp.csr_matrix(adata.X)), tok.map_genes(list(adata.var["ensembl_id"])))
    np.testing.assert_array_equal(n_tokens, tb.lengths)
    hf = _transformers().BertForMaskedLM.from_pretrained(str(tiny), output_hidden_states=True).eval()
    for i in (0, 17, 59):
        with torch.no_grad():
            hs = hf(input_ids=torch.from_numpy(tb.genes[i])[None]).hidden_states
        for layer in (0, 3, 4):
            h = hs[layer][0].double()
            for name, ref in (("mean", h[1:-1].mean(0)), ("max", h[1:-1].max(0).values), ("cls", h[0])):
                got = torch.from_numpy(layers[name][layer, i]).double()
                assert float((got - ref).abs().max()) <= 1e-5 * float(h.abs().max()), (i, layer, name)


def test_cli_symbols_without_symbol_dictionary_is_one_clear_error(tiny, tmp_path, capsys):
    path = tmp_path / "cells.h5ad"
    _symbol_adata(30).write_h5ad(path)
    argv = ["extract", str(path), "--model", "geneformer", "--checkpoint", str(tiny), "--out", str(tmp_path / "x.zarr")]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("cellstrata: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "0 of 2000 input genes" in lines[0] and "Ensembl" in lines[0] and "--gene-column" in lines[0]
    assert not (tmp_path / "x.zarr").exists()
    assert main([*argv, "--gene-column", "ensembl_id", "--quiet", "--limit", "10"]) == 0
    with_symbols = _copy(tiny, tmp_path / "sym")
    with (with_symbols / "gene_name_id_dict_gc104M.pkl").open("wb") as f:
        pickle.dump({s: ensembl_id_of(s) for s in gene_symbols(2000)}, f)
    argv[5] = str(with_symbols)
    assert main([*argv, "--quiet", "--limit", "10", "--overwrite"]) == 0


def test_tokenizer_options_from_the_command_line_and_an_older_recipe_is_not_resumed(
    tiny, tmp_path, capsys, monkeypatch
):
    """duplicate_genes / stored_zeros through --model-option: recorded in the store, part of its config hash
    (a store written with another rule is refused, not mixed); a bad value is one line naming the choices."""
    adata = _symbol_adata(30)
    ens = adata.var["ensembl_id"].astype(str).tolist()
    a, b = np.argsort(-np.asarray((adata.X > 0).sum(0)).ravel(), kind="stable")[:2]
    ens[b] = ens[a]  # one Ensembl id in two columns, both often expressed
    adata.var["ensembl_id"] = ens
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "s.zarr"
    argv = ["extract", str(path), "--model", "geneformer", "--checkpoint", str(tiny), "--out", str(out)]
    argv += ["--gene-column", "ensembl_id", "--pool", "mean,official", "--dtype", "float32", "--quiet"]
    with pytest.warns(DuplicateGenesWarning, match=f"1 genes are given by several input columns: {ens[a]} "):
        assert main(argv) == 0
    kept = cs.open_store(out)
    n_kept, hash_kept = np.asarray(kept.group["n_tokens"][:]), kept.attrs["config_hash"]
    assert kept.attrs["tokenizer"]["duplicate_genes"] == "official"
    assert kept.attrs["tokenizer"]["stored_zeros"] == "keep"
    capsys.readouterr()
    with pytest.warns(DuplicateGenesWarning, match="duplicate_genes=sum"):
        assert main([*argv, "--model-option", "duplicate_genes=sum"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another configuration" in err[0] and "--overwrite" in err[0], err
    with pytest.warns(DuplicateGenesWarning):
        assert main([*argv, "--model-option", "duplicate_genes=sum", "--overwrite"]) == 0
    summed = cs.open_store(out)
    assert summed.attrs["tokenizer"]["duplicate_genes"] == "sum"
    assert summed.attrs["config_hash"] != hash_kept
    both = np.flatnonzero((adata.X[:, a].toarray() > 0).ravel() & (adata.X[:, b].toarray() > 0).ravel())
    n_summed = np.asarray(summed.group["n_tokens"][:])
    assert len(both) > 3 and (n_summed[both] == n_kept[both] - 1).all()
    capsys.readouterr()
    assert main([*argv, "--model-option", "duplicate_genes=mean", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "duplicate_genes must be one of official, sum" in err[0], err
    assert main([*argv, "--model-option", "stored_zeros=no", "--overwrite"]) == 2
    assert "stored_zeros must be one of keep, drop" in capsys.readouterr().err

    # a store whose `official` was the V2 gene-token mean (before this recipe) is not resumed
    original = FAMILY.load

    def old_recipe(*args, **kwargs):
        loaded = original(*args, **kwargs)
        loaded.pool_ops = {**loaded.pool_ops, "official": "mean"}
        return loaded

    fresh = tmp_path / "fresh.zarr"
    kwargs = {"model": "geneformer", "checkpoint": tiny, "poolings": ["official"], "gene_column": "ensembl_id"}
    kwargs |= {"dtype": "float32", "progress": False, "limit": 8}
    monkeypatch.setattr(FAMILY, "load", old_recipe)
    with pytest.warns(DuplicateGenesWarning):
        old = cs.extract(adata, out=fresh, **kwargs)
    assert old.attrs["pool_ops"] == {"official": "mean"}
    monkeypatch.setattr(FAMILY, "load", original)
    with pytest.warns(DuplicateGenesWarning), pytest.raises(StoreConfigMismatchError, match="another configuration"):
        cs.extract(adata, out=fresh, **kwargs)
