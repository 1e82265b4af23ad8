"""Geneformer (Theodoris et al. 2023; V2: Chen et al. 2024): tokenizer, per-layer model, checkpoint reader/writer.

The model is ``transformers.BertForMaskedLM`` (post-LN BERT) run on rank-value-encoded cells. This module
reproduces the official ``geneformer`` package (Hugging Face ``ctheodoris/Geneformer``, 2025-06 code):

- tokenization = ``tokenizer.TranscriptomeTokenizer.tokenize_anndata`` (+ ``sum_ensembl_ids`` with
  ``collapse_gene_ids=True``, ``rank_genes`` and ``create_dataset``'s ``format_cell_features``);
- the layers are those of ``BertForMaskedLM(output_hidden_states=True)``: layer 0 is
  ``hidden_states[0]`` (the embedding output), layer k is ``hidden_states[k]``;
- the published cell embedding is ``EmbExtractor``'s default, read at ``hidden_states[N - 1]``
  (``quant_layers(model) + emb_layer``, ``emb_layer=-1``), stored as ``official`` with
  ``official_layer = N - 1``. Since October 2024 ``EmbExtractor`` defaults to ``emb_mode="cls"`` and
  ``model_version="V2"``: for V2 (a dictionary with ``<cls>``/``<eos>``) ``official`` is the ``<cls>``
  token as it is (pool op ``first``, the same numbers as ``cls``); ``model_version="V1"`` switches
  ``"cls"`` to ``"cell"``, so for V1 ``official`` is the mean over the gene tokens (the same numbers as
  ``mean``). The V2 gene-token mean (``emb_mode="cell"``, the default before October 2024) is ``mean``.

Input rules, as ``tokenize_anndata`` (each restated in tests/engine/test_geneformer_parity.py):

- stored zeros: every stored entry of a vocabulary gene is ranked, so an explicitly stored zero
  (``data == 0`` in the CSR) is a token, ranked after every expressed gene (ties in ``np.argsort(-x)``
  order). A summed duplicate whose sum is zero holds no entry. ``tokenize_loom``'s ``tokenize_cell``
  drops zeros (``np.nonzero``): option ``stored_zeros="drop"``. A cell whose stored values are all zero
  (``n_counts`` 0, where the official code ranks ``0 / 0``) is an empty cell.
- duplicate genes: ``sum_ensembl_ids`` sums columns only when its Ensembl mapping merges different input
  ids (then every duplicate, identical ids too, is summed into one column appended after the others);
  otherwise every column is its own token, so an id given twice is two tokens (adjacent when their values
  tie). Option ``duplicate_genes="sum"`` always sums. Either way a warning names the duplicates.
- case: input ids are matched upper-cased, as ``ensembl_id.str.upper().map(...)``; the vocabulary (and the
  symbol dictionary) is compared upper-cased too, an exact match first, so identifiers with lower-case
  letters in a custom vocabulary (``C20orf96``) are found. Identifiers that differ only by case map by exact
  match only.

Checkpoint folder (as published): ``config.json`` (``BertConfig`` fields), ``model.safetensors`` or
``pytorch_model.bin`` and the gene dictionaries of the model's generation, found by :func:`find_dictionaries`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ..datasets import gene_ensembl_ids
from ..errors import CheckpointError, ConfigError, GeneOverlapError, InvalidValuesError
from .attention import AttentionLayout, attend
from .base import (
    TOP_RANKED,
    GeneMapping,
    LoadedModel,
    SpecialLayout,
    Tap,
    TokenBatch,
    TokenizedBlock,
    canonical_rows,
    concat_blocks,
    row_pieces,
)
from .checkpoints import (
    check_state_dict,
    describe_files,
    load_plain_pickle,
    load_state_dict,
    read_json,
    refuse_unknown_options,
    save_safetensors,
)

if TYPE_CHECKING:
    from ..sources import CellBlock

FAMILY_NAME = "geneformer"
CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # first present wins
PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN = "<pad>", "<mask>", "<cls>", "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN)
TARGET_SUM = 10_000  # tokenize_anndata(target_sum=10_000)
TOKENIZER_VERSION = "geneformer-rank-value-2"  # 2: duplicate columns, stored zeros and case as tokenize_anndata
DUPLICATE_GENES = ("official", "sum")  # the duplicate_genes= option; official = sum_ensembl_ids' rule
STORED_ZEROS = ("keep", "drop")  # the stored_zeros= option; keep = tokenize_anndata, drop = tokenize_loom
PRESET_KEY = "cellstrata_preset"  # config.json key written by init_checkpoint
SUPPORTED_ACTS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh")

# Dictionary file names as shipped in the geneformer package, per generation: V2 (gc104M), the 2024
# 95M series (gc95M), V1 (gc30M, in gene_dictionaries_30m/) and the original V1 names (no suffix).
DICT_SUFFIXES = ("_gc104M", "_gc95M", "_gc30M", "")
DICT_ROLES = {
    "token_dictionary": "token_dictionary{}.pkl",
    "gene_median_dictionary": "gene_median_dictionary{}.pkl",
    "gene_name_id_dictionary": "gene_name_id_dict{}.pkl",
    "ensembl_mapping_dictionary": "ensembl_mapping_dict{}.pkl",
}
# where dictionaries are looked for, relative to the checkpoint folder (a Hugging Face snapshot keeps
# them in geneformer/ beside the model folders, V1's in geneformer/gene_dictionaries_30m/)
DICT_DIRS = (
    ".",
    "geneformer",
    "geneformer/gene_dictionaries_30m",
    "../geneformer",
    "../geneformer/gene_dictionaries_30m",
)


# ------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class GeneformerConfig:
    """The ``BertConfig`` fields the encoder needs (official ``config.json`` names)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.02
    initializer_range: float = 0.02
    position_embedding_type: str = "absolute"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            if int(getattr(self, name)) <= 0:
                msg = f"Geneformer config: {name} must be > 0, got {getattr(self, name)!r}"
                raise ConfigError(msg)
        if self.hidden_size % self.num_attention_heads:
            msg = (
                f"Geneformer config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
            raise ConfigError(msg)
        if self.hidden_act not in SUPPORTED_ACTS:
            msg = f"Geneformer config: hidden_act {self.hidden_act!r} is not supported; use one of {SUPPORTED_ACTS}"
            raise ConfigError(msg)
        if self.position_embedding_type != "absolute":
            msg = (
                f"Geneformer config: position_embedding_type {self.position_embedding_type!r} is not supported; "
                "the released models use 'absolute'"
            )
            raise ConfigError(msg)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> GeneformerConfig:
        """Build from an official ``config.json`` dict (missing optional fields take ``BertConfig``'s defaults)."""
        required = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        )
        missing = [k for k in required if k not in cfg]
        if missing:
            msg = (
                f"Geneformer {CONFIG_FILE} lacks the field(s) {', '.join(missing)}; it must give {', '.join(required)}"
            )
            raise CheckpointError(msg)
        model_type = cfg.get("model_type", "bert")
        if model_type != "bert":
            msg = f"Geneformer {CONFIG_FILE} has model_type {model_type!r}; Geneformer checkpoints are 'bert'"
            raise CheckpointError(msg)
        try:
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=int(cfg["num_attention_heads"]),
                intermediate_size=int(cfg["intermediate_size"]),
                max_position_embeddings=int(cfg["max_position_embeddings"]),
                hidden_act=str(cfg.get("hidden_act", "gelu")),  # BertConfig's default
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                type_vocab_size=int(cfg.get("type_vocab_size", 2)),
                pad_token_id=int(cfg.get("pad_token_id", 0) or 0),
                hidden_dropout_prob=float(cfg.get("hidden_dropout_prob", 0.1)),
                attention_probs_dropout_prob=float(cfg.get("attention_probs_dropout_prob", 0.1)),
                initializer_range=float(cfg.get("initializer_range", 0.02)),
                position_embedding_type=str(cfg.get("position_embedding_type", "absolute")),
            )
        except (TypeError, ValueError) as exc:
            msg = f"Geneformer {CONFIG_FILE} has an invalid value: {exc}"
            raise CheckpointError(msg) from None
        except ConfigError as exc:
            raise CheckpointError(f"{CONFIG_FILE}: {exc}") from None

    def to_config(self) -> dict[str, Any]:
        """The official ``config.json`` content (as ``BertForMaskedLM.save_pretrained`` writes it)."""
        return {
            "architectures": ["BertForMaskedLM"],
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "classifier_dropout": None,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "bert",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": self.position_embedding_type,
            "torch_dtype": "float32",
            "type_vocab_size": self.type_vocab_size,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def architecture(self) -> tuple[int, ...]:
        return (
            self.num_hidden_layers,
            self.hidden_size,
            self.num_attention_heads,
            self.intermediate_size,
            self.max_position_embeddings,
            self.vocab_size,
        )


PRESETS: dict[str, GeneformerConfig] = {
    # Geneformer-V1-10M (= gf-6L-30M-i2048): config.json verbatim; gc30M dictionaries, no special tokens
    "v1-10m": GeneformerConfig(
        vocab_size=25426,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=2048,
    ),
    # Geneformer-V2-104M / -316M: layers, hidden, heads, input size from the model card; intermediate
    # sizes and vocabulary reproduce the published model.safetensors byte sizes exactly (see tests)
    "v2-104m": GeneformerConfig(
        vocab_size=20275,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=4096,
    ),
    "v2-316m": GeneformerConfig(
        vocab_size=20275,
        hidden_size=1152,
        num_hidden_layers=18,
        num_attention_heads=18,
        intermediate_size=4608,
        max_position_embeddings=4096,
    ),
    # random test model: V2-style special tokens, vocabulary = the synthetic genes' Ensembl-style ids
    "tiny": GeneformerConfig(
        vocab_size=2000 + len(SPECIAL_TOKENS),
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=2048,
    ),
}
# which dictionary generation a preset's init_checkpoint writes
_PRESET_SUFFIX = {"v1-10m": "_gc30M", "v2-104m": "_gc104M", "v2-316m": "_gc104M", "tiny": "_gc104M"}


def official_key_shapes(config: GeneformerConfig, *, position_ids: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``BertForMaskedLM``'s saved state dict (the released ``model.safetensors``).

    The MLM head keys ``cls.predictions.*`` are included (the decoder weight is tied to the word
    embeddings and not saved). ``position_ids=True`` adds the ``bert.embeddings.position_ids`` buffer
    (int64 ``[1, max_position_embeddings]``) that older files carry.
    """
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "bert.embeddings.word_embeddings.weight": (v, h),
        "bert.embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "bert.embeddings.LayerNorm.weight": (h,),
        "bert.embeddings.LayerNorm.bias": (h,),
    }
    if position_ids:
        shapes["bert.embeddings.position_ids"] = (1, config.max_position_embeddings)
    for layer in range(config.num_hidden_layers):
        p = f"bert.encoder.layer.{layer}."
        for name in ("query", "key", "value"):
            shapes[f"{p}attention.self.{name}.weight"] = (h, h)
            shapes[f"{p}attention.self.{name}.bias"] = (h,)
        shapes[p + "attention.output.dense.weight"] = (h, h)
        shapes[p + "attention.output.dense.bias"] = (h,)
        shapes[p + "attention.output.LayerNorm.weight"] = (h,)
        shapes[p + "attention.output.LayerNorm.bias"] = (h,)
        shapes[p + "intermediate.dense.weight"] = (i, h)
        shapes[p + "intermediate.dense.bias"] = (i,)
        shapes[p + "output.dense.weight"] = (h, i)
        shapes[p + "output.dense.bias"] = (h,)
        shapes[p + "output.LayerNorm.weight"] = (h,)
        shapes[p + "output.LayerNorm.bias"] = (h,)
    shapes["cls.predictions.bias"] = (v,)
    shapes["cls.predictions.transform.dense.weight"] = (h, h)
    shapes["cls.predictions.transform.dense.bias"] = (h,)
    shapes["cls.predictions.transform.LayerNorm.weight"] = (h,)
    shapes["cls.predictions.transform.LayerNorm.bias"] = (h,)
    return shapes


# ------------------------------------------------------------------------------------------------
# gene dictionaries


@dataclass
class GeneDictionaries:
    """The plain-data dictionaries of one model generation and the files they came from.

    ``token``: Ensembl id or special token -> token id; ``median``: Ensembl id -> non-zero median
    (normalisation factor); ``symbol_to_id``: gene symbol -> Ensembl id (optional); ``ensembl_mapping``:
    Ensembl id -> collapsed Ensembl id (optional; identity when absent, as the official tokenizer).
    """

    token: dict[str, int]
    median: dict[str, float]
    symbol_to_id: dict[str, str] | None = None
    ensembl_mapping: dict[str, str] | None = None
    paths: dict[str, Path] | None = None


def _read_dictionary(path: Path, what: str, value: type) -> dict[str, Any]:
    """A pickled ``dict`` of str -> ``value`` (numpy scalars are converted); refuses anything else."""
    raw = load_plain_pickle(path, what)
    if not isinstance(raw, dict) or not raw:
        msg = f"{what} {path} must be a non-empty pickled dict"
        raise CheckpointError(msg)
    out: dict[str, Any] = {}
    for key, val in raw.items():
        if not isinstance(key, str):
            msg = f"{what} {path}: keys must be strings, found {key!r}"
            raise CheckpointError(msg)
        try:
            if value is str:
                if not isinstance(val, str):
                    raise TypeError(f"value of {key!r} is not a string")
                out[key] = val
            elif value is int:
                if isinstance(val, bool) or int(val) != val:
                    raise TypeError(f"value of {key!r} is not an integer")
                out[key] = int(val)
            else:
                out[key] = float(val)
        except (TypeError, ValueError) as exc:
            msg = f"{what} {path}: {exc}"
            raise CheckpointError(msg) from None
    return out


def find_dictionaries(
    folder: Path, vocab_size: int, overrides: Mapping[str, str | Path | None] | None = None
) -> dict[str, Path]:
    """Locate the dictionaries of a checkpoint folder; ``{role: path}`` for the roles found.

    Rule: an explicit option (``token_dictionary=``, ``gene_median_dictionary=``,
    ``gene_name_id_dictionary=``, ``ensembl_mapping_dictionary=``) wins. Otherwise the token dictionary
    is the first file named ``token_dictionary{suffix}.pkl`` (suffix ``_gc104M``, ``_gc95M``, ``_gc30M``,
    none) in the folder, its ``geneformer/`` and ``geneformer/gene_dictionaries_30m/`` subfolders, or those
    of its parent (a Hugging Face snapshot), whose size equals ``config.json``'s ``vocab_size``; the other
    dictionaries are taken from the same folder with the same suffix.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    found: dict[str, Path] = {}
    for role, p in overrides.items():
        path = Path(p).expanduser()
        if not path.is_file():
            msg = f"Geneformer {role.replace('_', ' ')} {path} does not exist"
            raise CheckpointError(msg)
        found[role] = path
    if "token_dictionary" in found:
        base, name = found["token_dictionary"].parent, found["token_dictionary"].name
        suffix = next((sfx for sfx in DICT_SUFFIXES if name == DICT_ROLES["token_dictionary"].format(sfx)), None)
    else:
        base, suffix, seen = None, None, []
        for rel in DICT_DIRS:
            d = (folder / rel).resolve()
            for sfx in DICT_SUFFIXES:
                p = d / DICT_ROLES["token_dictionary"].format(sfx)
                if p.is_file():
                    n = len(load_plain_pickle(p, "Geneformer token dictionary") or {})
                    seen.append(f"{p} ({n} tokens)")
                    if n == vocab_size and base is None:
                        base, suffix = d, sfx
        if base is None:
            found_txt = "; found " + ", ".join(seen) if seen else ""
            msg = (
                f"no Geneformer token dictionary with {vocab_size} tokens (config.json vocab_size) next to "
                f"{folder}{found_txt}. Copy the dictionaries of this model's generation from the geneformer "
                "package (V2: token_dictionary_gc104M.pkl and gene_median_dictionary_gc104M.pkl; V1: "
                "gene_dictionaries_30m/token_dictionary_gc30M.pkl and gene_median_dictionary_gc30M.pkl) into "
                "the checkpoint folder, or pass token_dictionary= and gene_median_dictionary="
            )
            raise CheckpointError(msg)
        found["token_dictionary"] = base / DICT_ROLES["token_dictionary"].format(suffix)
    for role, pattern in DICT_ROLES.items():
        if role in found:
            continue
        sfxs = (suffix,) if suffix is not None else DICT_SUFFIXES
        for sfx in sfxs:
            p = base / pattern.format(sfx)
            if p.is_file():
                found[role] = p
                break
    if "gene_median_dictionary" not in found:
        msg = (
            f"no Geneformer gene median dictionary beside {found['token_dictionary']}; expected "
            f"{DICT_ROLES['gene_median_dictionary'].format(suffix or '')} there (from the same geneformer "
            "package release), or pass gene_median_dictionary="
        )
        raise CheckpointError(msg)
    return found


def read_dictionaries(paths: Mapping[str, Path]) -> GeneDictionaries:
    """Read the dictionaries found by :func:`find_dictionaries` (plain data only)."""
    token = _read_dictionary(paths["token_dictionary"], "Geneformer token dictionary", int)
    median = _read_dictionary(paths["gene_median_dictionary"], "Geneformer gene median dictionary", float)
    symbols = ensembl = None
    if "gene_name_id_dictionary" in paths:
        symbols = _read_dictionary(paths["gene_name_id_dictionary"], "Geneformer gene name dictionary", str)
    if "ensembl_mapping_dictionary" in paths:
        ensembl = _read_dictionary(paths["ensembl_mapping_dictionary"], "Geneformer Ensembl mapping dictionary", str)
    return GeneDictionaries(token, median, symbols, ensembl, dict(paths))


def _dict_sha256(d: Mapping[str, Any] | None) -> str | None:
    if d is None:
        return None
    items = sorted((k, float(v).hex() if isinstance(v, float) else v) for k, v in d.items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# tokenizer


@dataclass(frozen=True)
class _Layout:
    """Where each input column lands after ``sum_ensembl_ids``: its slot, and the slot's token.

    Without collapsing, every column in the vocabulary is its own slot, in input order (an id given twice
    is two slots). Collapsing (``collapse_gene_ids=True`` when the mapping merges ids, h5ad path): the
    columns whose id occurs once keep their input order; ids occurring several times are summed into one
    slot each (slots ``n_single`` and up), appended in order of first occurrence. The order only matters
    for ties in the ranking.
    """

    col_slot: np.ndarray  # [n_input] slot of each input column, -1 = not in the vocabulary
    slot_token: np.ndarray  # [n_slots] token id of each slot
    has_duplicates: bool  # slots fed by several columns (summed)
    n_single: int  # slots below this hold one column each


def _layout(token_ids: np.ndarray, *, collapse: bool) -> _Layout:
    ids = np.asarray(token_ids, dtype=np.int64)
    valid = np.flatnonzero(ids >= 0)
    toks = ids[valid]
    col_slot = np.full(len(ids), -1, dtype=np.int64)
    if not collapse:
        col_slot[valid] = np.arange(len(valid))
        return _Layout(col_slot, toks.copy(), False, len(valid))
    uniq, first, inverse, counts = np.unique(toks, return_index=True, return_inverse=True, return_counts=True)
    dup = counts[inverse] > 1
    n_single = int((~dup).sum())
    col_slot[valid[~dup]] = np.arange(n_single)
    dup_tokens = np.flatnonzero(counts > 1)
    dup_tokens = dup_tokens[np.argsort(first[dup_tokens], kind="stable")]  # by first occurrence
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[dup_tokens] = np.arange(len(dup_tokens))
    col_slot[valid[dup]] = n_single + rank[inverse[dup]]
    slot_token = np.empty(n_single + len(dup_tokens), dtype=np.int64)
    slot_token[col_slot[valid]] = toks
    return _Layout(col_slot, slot_token, bool(dup.any()), n_single)


def _case_folded(table: Mapping[str, Any]) -> dict[str, Any]:
    """``table`` keyed by upper-cased keys; a key whose upper-case form is shared by entries with
    different values is left out (those identifiers match exactly only)."""
    folded: dict[str, Any] = {}
    clash: set[str] = set()
    for key, value in table.items():
        up = key.upper()
        if up in folded and folded[up] != value:
            clash.add(up)
        folded.setdefault(up, value)
    for up in clash:
        del folded[up]
    return folded


class DuplicateGenesWarning(UserWarning):
    """Several input columns resolve to one Geneformer gene (kept as separate tokens or summed)."""


class GeneformerTokenizer:
    """Rank value encoding as ``TranscriptomeTokenizer.tokenize_anndata`` (see the module docstring).

    Per cell: ``x = counts / n_counts * 10_000 / median[gene]`` over the stored entries of the vocabulary
    genes (float64), ranked by ``np.argsort(-x)`` (the call of ``rank_genes``, so ties order as there),
    truncated to ``max_length`` tokens; with ``<cls>``/``<eos>`` in the dictionary (V2) the ranking is cut
    to ``max_length - 2`` and wrapped as ``<cls> genes <eos>``.

    ``duplicate_genes``: ``"official"`` (``sum_ensembl_ids``: columns resolving to one id are separate
    tokens unless the Ensembl mapping merges different input ids, then every duplicate is summed) or
    ``"sum"`` (always summed). ``stored_zeros``: ``"keep"`` (``tokenize_anndata``: a stored zero is a
    token, ranked last) or ``"drop"`` (``tokenize_loom``'s nonzero mask).

    Differences from the official pipeline, all documented in :meth:`settings`: ``n_counts`` is the
    cell's total of raw counts over all input genes (the official code reads ``obs["n_counts"]``, which
    conventionally holds exactly that); a cell whose ``n_counts`` is 0 is empty (the official code ranks
    ``0 / 0``). ``values`` of the tokenized cells are zeros: Geneformer's input is the token order alone.
    No randomness is involved.
    """

    pad_value = 0.0
    truncation_rule = TOP_RANKED

    def __init__(
        self,
        dictionaries: GeneDictionaries,
        *,
        max_length: int,
        pad_token_id: int = 0,
        duplicate_genes: str = "official",
        stored_zeros: str = "keep",
    ) -> None:
        if duplicate_genes not in DUPLICATE_GENES:
            msg = (
                f"Geneformer duplicate_genes must be one of {', '.join(DUPLICATE_GENES)}, got {duplicate_genes!r} "
                "(official: as Geneformer's tokenizer; sum: sum every column of one gene)"
            )
            raise ConfigError(msg)
        if stored_zeros not in STORED_ZEROS:
            msg = (
                f"Geneformer stored_zeros must be one of {', '.join(STORED_ZEROS)}, got {stored_zeros!r} "
                "(keep: a stored zero is a token, as tokenize_anndata; drop: as tokenize_loom)"
            )
            raise ConfigError(msg)
        self.duplicate_genes = duplicate_genes
        self.stored_zeros = stored_zeros
        token = dictionaries.token
        self.special = CLS_TOKEN in token and EOS_TOKEN in token
        self.n_special = 2 if self.special else 0
        if int(max_length) < self.n_special + 1:
            msg = f"Geneformer max_length must be >= {self.n_special + 1}, got {max_length}"
            raise ConfigError(msg)
        self.max_length = int(max_length)
        self.n_keep = self.max_length - self.n_special
        self.pad_id = int(token.get(PAD_TOKEN, pad_token_id))
        self.cls_id = int(token[CLS_TOKEN]) if self.special else None
        self.eos_id = int(token[EOS_TOKEN]) if self.special else None
        self.vocab_size = max(token.values()) + 1
        medians = np.full(self.vocab_size, np.nan)
        genes: dict[str, int] = {}
        for gene, tok in token.items():
            if gene in SPECIAL_TOKENS or gene not in dictionaries.median:
                continue
            m = dictionaries.median[gene]
            if not (math.isfinite(m) and m > 0):
                msg = f"Geneformer gene median dictionary: the median of {gene} is {m}; medians must be positive"
                raise CheckpointError(msg)
            medians[tok] = m
            genes[gene] = tok
        if not genes:
            msg = "no gene of the Geneformer token dictionary has a median in the gene median dictionary"
            raise CheckpointError(msg)
        self._medians = medians
        self.n_without_median = sum(1 for g in token if g not in SPECIAL_TOKENS and g not in dictionaries.median)
        # input id -> token id, through the Ensembl mapping when present (sum_ensembl_ids' gene_mapping_dict)
        if dictionaries.ensembl_mapping is not None:
            self._resolve = {k: genes[v] for k, v in dictionaries.ensembl_mapping.items() if v in genes}
        else:
            self._resolve = dict(genes)
        self._resolve_folded = _case_folded(self._resolve)
        self._symbols = dictionaries.symbol_to_id
        self._symbols_folded = _case_folded(self._symbols) if self._symbols is not None else None
        self._n_genes = len(genes)
        self._example_ids = [g for g, _ in sorted(genes.items(), key=lambda kv: kv[1])[:3]]
        self._hashes = {
            "token_dictionary_sha256": _dict_sha256(token),
            "gene_median_dictionary_sha256": _dict_sha256(dictionaries.median),
            "ensembl_mapping_sha256": _dict_sha256(dictionaries.ensembl_mapping),
            "gene_name_id_sha256": _dict_sha256(dictionaries.symbol_to_id),
        }
        # layout per mapping, keyed by the mapping's token ids (the collapse decision needs the input
        # names, so it is taken in map_genes; the key survives pickling to input workers)
        self._collapse: dict[bytes, bool] = {}
        self._cached: tuple[GeneMapping, _Layout] | None = None

    @property
    def n_vocab_genes(self) -> int:
        return self._n_genes

    def settings(self) -> dict[str, Any]:
        collapse = {
            "official": "columns of one (mapped) Ensembl id summed only when the mapping merges different input "
            "ids (sum_ensembl_ids), otherwise one token per column",
            "sum": "columns of one (mapped) Ensembl id always summed",
        }
        zeros = {
            "keep": "a stored zero of a vocabulary gene is a token, ranked last (tokenize_anndata)",
            "drop": "stored zeros dropped (tokenize_loom)",
        }
        return {
            "family": FAMILY_NAME,
            "version": TOKENIZER_VERSION,
            "max_length": self.max_length,
            "special_tokens": self.special,
            "cls_id": self.cls_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "target_sum": TARGET_SUM,
            "n_counts": "per cell, the sum of its raw counts over all input genes; a cell with 0 is empty",
            "collapse_gene_ids": collapse[self.duplicate_genes],
            "duplicate_genes": self.duplicate_genes,
            "stored_zeros": self.stored_zeros,
            "stored_zeros_rule": zeros[self.stored_zeros],
            "gene_id_case": "input ids upper-cased, vocabulary compared upper-cased, exact match first",
            "ranking": "np.argsort(-x), x = counts / n_counts * 10000 / median, float64",
            "vocab_size": self.vocab_size,
            **self._hashes,
        }

    def _key_of(self, name: str) -> tuple[str | None, int]:
        """``(id as matched exactly or None, token id or -1)`` of one input identifier.

        Exact match first, then the upper-cased identifier against the upper-cased vocabulary; symbols
        (with a gene name dictionary) the same way, then their Ensembl id.
        """
        if name in self._resolve:
            return name, self._resolve[name]
        tok = self._resolve_folded.get(name.upper(), -1)
        if tok >= 0 or self._symbols is None or self._symbols_folded is None:
            return None, tok
        ens = self._symbols.get(name)
        if ens is None:
            ens = self._symbols_folded.get(name.upper())
        if ens is None:
            return None, -1
        if ens in self._resolve:
            return ens, self._resolve[ens]
        return None, self._resolve_folded.get(ens.upper(), -1)

    def map_genes(self, gene_names: Sequence[str]) -> GeneMapping:
        names = list(gene_names)
        keys: list[str | None] = []
        ids = np.full(len(names), -1, dtype=np.int64)
        for j, g in enumerate(names):
            key, tok = self._key_of(g) if isinstance(g, str) else (None, -1)
            keys.append(key)
            ids[j] = tok
        mapping = GeneMapping.from_ids(ids, names, self._n_genes)
        if mapping.n_matched == 0:
            raise GeneOverlapError(self._no_overlap_message(names, mapping))
        # sum_ensembl_ids collapses when the ids found as given in the mapping map onto fewer ids
        exact = {k for k in keys if k is not None}
        merges = len(exact) != len({self._resolve[k] for k in exact})
        collapse = merges or self.duplicate_genes == "sum"
        self._collapse[ids.tobytes()] = collapse
        self._cached = (mapping, _layout(ids, collapse=collapse))
        self._warn_duplicates(names, ids, collapse, merges)
        return mapping

    def _warn_duplicates(self, names: list[Any], ids: np.ndarray, collapse: bool, merges: bool) -> None:
        valid = np.flatnonzero(ids >= 0)
        toks, first, counts = np.unique(ids[valid], return_index=True, return_counts=True)
        dup = toks[counts > 1][np.argsort(first[counts > 1], kind="stable")]
        if not len(dup):
            return
        shown = []
        for t in dup[:5]:
            cols = valid[ids[valid] == t]
            shown.append(" = ".join(dict.fromkeys(str(names[j]) for j in cols)) + f" ({len(cols)} columns)")
        more = f" and {len(dup) - 5} more" if len(dup) > 5 else ""
        if not collapse:
            what = (
                "each column is its own token, as Geneformer's tokenizer does when its Ensembl mapping merges "
                "no two input ids; --model-option duplicate_genes=sum sums them (Python: "
                "model_options={'duplicate_genes': 'sum'})"
            )
        elif merges:
            what = (
                "their counts are summed into one token, as Geneformer's tokenizer does when its Ensembl mapping "
                "merges different input ids"
            )
        else:
            what = (
                "their counts are summed into one token (duplicate_genes=sum; Geneformer's tokenizer keeps one "
                "token per column unless its Ensembl mapping merges different input ids)"
            )
        msg = f"{len(dup)} genes are given by several input columns: {'; '.join(shown)}{more}; {what}"
        warnings.warn(msg, DuplicateGenesWarning, stacklevel=3)

    def _no_overlap_message(self, names: list[Any], mapping: GeneMapping) -> str:
        ex_in = ", ".join(str(g) for g in names[:5]) or "(none)"
        looks_ensembl = sum(str(g).upper().startswith("ENS") for g in names[:100]) > min(50, len(names) // 2)
        if looks_ensembl:
            hint = " The input looks like Ensembl ids, but none is in this model's dictionary."
        elif self._symbols is None:
            hint = (
                " The input looks like gene symbols; this checkpoint folder has no symbol dictionary "
                "(gene_name_id_dict*.pkl) to translate them."
            )
        else:
            hint = ""
        return (
            f"no input gene is in the Geneformer vocabulary: {mapping.report()}. Input genes look like: {ex_in}; "
            f"the vocabulary holds Ensembl ids, e.g. {', '.join(self._example_ids)}.{hint} Geneformer expects "
            "Ensembl gene ids: pick the column of adata.var that holds them with --gene-column, e.g. "
            "--gene-column ensembl_id (Python: gene_column=...)."
        )

    def _layout_of(self, mapping: GeneMapping) -> _Layout:
        if self._cached is None or self._cached[0] is not mapping:
            collapse = self._collapse.get(mapping.token_ids.tobytes())
            if collapse is None:
                msg = "map the genes with this tokenizer's map_genes before tokenizing with its mapping"
                raise ValueError(msg)
            self._cached = (mapping, _layout(mapping.token_ids, collapse=collapse))
        return self._cached[1]

    def tokenize(self, block: CellBlock, mapping: GeneMapping) -> TokenizedBlock:
        """Token sequences of a block: normalisation, duplicate sums and assembly over the whole block at
        once, the ranking per cell (:meth:`_rank`)."""
        X, indices = canonical_rows(block, mapping)
        layout = self._layout_of(mapping)
        return concat_blocks([self._tokenize_rows(Xp, ip, layout) for Xp, ip in row_pieces(X, indices)])

    def _tokenize_rows(self, X: sp.csr_matrix, indices: np.ndarray, layout: _Layout) -> TokenizedBlock:
        """:meth:`tokenize` of canonical rows ``X`` (cells ``indices``)."""
        x, tok, counts = self._prepare(X, indices, layout)
        kept = np.minimum(counts, self.n_keep)
        out_off = np.concatenate(([0], np.cumsum(kept + self.n_special))).astype(np.int64)
        genes = np.empty(int(out_off[-1]), dtype=np.int64)
        if self.special:
            genes[out_off[:-1]] = self.cls_id
            genes[out_off[1:] - 1] = self.eos_id
        lead = 1 if self.special else 0
        self._rank(x, tok, counts, genes, out_off[:-1] + lead)
        bounds = list(itertools.pairwise(out_off.tolist()))
        zeros = np.zeros(len(genes), dtype=np.float32)
        return TokenizedBlock(
            indices=indices.copy(),
            genes=[genes[a:b] for a, b in bounds],
            values=[zeros[a:b] for a, b in bounds],
            truncated=counts > self.n_keep,
            empty=counts == 0,
            n_expressed=counts,
        )

    def tokenize_reference(self, block: CellBlock, mapping: GeneMapping) -> TokenizedBlock:
        """The same tokens, one cell at a time: ``tokenize_anndata``'s rule restated per cell.

        The per-cell path :meth:`tokenize` is checked and benchmarked against; every step is the
        official one on a single row (sums in column order, ``np.argsort(-x)`` on the cell's values).
        """
        X, indices = canonical_rows(block, mapping)
        layout = self._layout_of(mapping)
        genes: list[np.ndarray] = []
        counts = np.zeros(X.shape[0], dtype=np.int64)
        for i in range(X.shape[0]):
            lo, hi = int(X.indptr[i]), int(X.indptr[i + 1])
            data = np.asarray(X.data[lo:hi], dtype=np.float64)
            if not np.isfinite(data).all():
                msg = f"the expression matrix holds NaN or infinite values (first in cell {int(indices[i])})"
                raise InvalidValuesError(msg)
            n_counts = float(np.cumsum(data)[-1]) if len(data) else 0.0  # summed in column order
            slot = layout.col_slot[X.indices[lo:hi]]
            keep = slot >= 0
            if self.stored_zeros == "drop":
                keep &= data != 0
            slot, vals = slot[keep], data[keep]
            if n_counts == 0:
                slot, vals = slot[:0], vals[:0]
            if layout.has_duplicates and len(slot):
                order = np.argsort(slot, kind="stable")
                slot, start = np.unique(slot[order], return_index=True)
                vals = np.add.reduceat(vals[order], start)
                nonzero = (vals != 0) | (slot < layout.n_single)
                slot, vals = slot[nonzero], vals[nonzero]
            tok = layout.slot_token[slot]
            x = vals / n_counts * TARGET_SUM / self._medians[tok] if len(tok) else vals
            cell = tok[np.argsort(-x)][: self.n_keep]  # rank_genes, then format_cell_features' cut
            if self.special:
                cell = np.concatenate(([self.cls_id], cell, [self.eos_id]))
            genes.append(np.asarray(cell, dtype=np.int64))
            counts[i] = len(tok)
        return TokenizedBlock(
            indices=indices.copy(),
            genes=genes,
            values=[np.zeros(len(g), dtype=np.float32) for g in genes],
            truncated=counts > self.n_keep,
            empty=counts == 0,
            n_expressed=counts,
        )

    def _prepare(
        self, X: sp.csr_matrix, indices: np.ndarray, layout: _Layout
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x, tokens, counts)``: every ranked entry of canonical rows ``X``, cell after cell, in column
        (slot) order within a cell, with its normalised value ``x`` and token; ``counts`` per cell."""
        n_cells = X.shape[0]
        data = np.asarray(X.data, dtype=np.float64)
        rows_all = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(X.indptr))
        if not np.isfinite(data).all():
            bad = int(indices[rows_all[~np.isfinite(data)][0]])
            msg = f"the expression matrix holds NaN or infinite values (first in cell {bad})"
            raise InvalidValuesError(msg)
        n_counts = np.bincount(rows_all, weights=data, minlength=n_cells)
        slot = layout.col_slot[X.indices]
        keep = slot >= 0  # stored zeros stay (tokenize_anndata ranks them)
        if not n_counts.all():
            keep &= (n_counts != 0)[rows_all]
        if self.stored_zeros == "drop":
            keep &= data != 0
        every = bool(keep.all())
        rows, slot, vals = (rows_all, slot, data) if every else (rows_all[keep], slot[keep], data[keep])
        if layout.has_duplicates:  # sum_ensembl_ids: one column per id, duplicates appended
            n_slots = len(layout.slot_token)
            key = rows * n_slots + slot
            order = np.argsort(key, kind="stable")
            key, vals = key[order], vals[order]
            key, start = np.unique(key, return_index=True)
            vals = np.add.reduceat(vals, start) if len(vals) else vals
            rows, slot = key // n_slots, key % n_slots
            nonzero = (vals != 0) | (slot < layout.n_single)  # a summed column comes from a dense frame
            rows, slot, vals = rows[nonzero], slot[nonzero], vals[nonzero]
        tok = layout.slot_token[slot]
        # tokenize_anndata: X_view / n_counts * target_sum / norm_factor_vector, in this order
        x = vals / n_counts[rows] * TARGET_SUM / self._medians[tok]
        if every and not layout.has_duplicates:
            counts = np.diff(X.indptr).astype(np.int64)
        else:
            counts = np.bincount(rows, minlength=n_cells).astype(np.int64)
        return x, tok, counts

    def _rank(self, x: np.ndarray, tok: np.ndarray, counts: np.ndarray, out: np.ndarray, starts: np.ndarray) -> None:
        """Write each cell's first ``n_keep`` tokens in ``rank_genes`` order to ``out[starts[i]:]``.

        The order is ``np.argsort(-x)`` on the cell's own values, the official call. numpy's default sort
        is not stable and the order it gives equal values depends on the host's SIMD sort (AVX-512, AVX2
        and plain introsort give three different orders, the first from 5 or so values up), so ties are
        only ordered as the official code orders them on the same host by that very call on that cell.
        The loop is also the fastest exact ranking measured: each cell's sort runs in cache, where one
        packed-key sort of the whole block (plus re-ranking the cells with ties) took twice as long and
        ``np.lexsort`` over the block thirty times as long.
        """
        neg = -x
        offsets = np.concatenate(([0], np.cumsum(counts))).tolist()
        n_keep = self.n_keep
        for lo, hi, start in zip(offsets[:-1], offsets[1:], starts.tolist()):
            if hi - lo > 1:
                order = neg[lo:hi].argsort()  # = np.argsort(-x) of the cell
                if hi - lo > n_keep:
                    order = order[:n_keep]
                out[start : start + len(order)] = tok[lo:hi][order]
            elif hi > lo:
                out[start] = tok[lo]


# ------------------------------------------------------------------------------------------------
# model (module and parameter names follow transformers' BertModel, so keys map one to one)


def _activation(name: str) -> Any:
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    return lambda x: F.gelu(x, approximate="tanh")  # gelu_new, gelu_pytorch_tanh


class _Embeddings(nn.Module):
    def __init__(self, c: GeneformerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``LayerNorm(word[ids] + token_type[0] + position[pos])`` (BertEmbeddings' order of sums).

        ``pos`` is ``0..S-1`` for every row, or ``position_ids`` (each token's index in its own cell, packed).
        """
        h = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]
        if position_ids is None:
            h = h + self.position_embeddings.weight[: ids.shape[1]]
        else:
            h = h + self.position_embeddings(position_ids)
        return self.LayerNorm(h)


class _SelfAttention(nn.Module):
    def __init__(self, c: GeneformerConfig) -> None:
        super().__init__()
        self.n_heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        b, s, d = x.shape
        shape = (b, s, self.n_heads, d // self.n_heads)
        q, k, v = self.query(x).view(shape), self.key(x).view(shape), self.value(x).view(shape)
        return attend(q, k, v, layout).reshape(b, s, d)  # scale 1/sqrt(head_dim)


class _DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (BertSelfOutput / BertOutput)."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: GeneformerConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _DenseNorm(c.hidden_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        return self.output(self.self(x, layout), x)


class _Intermediate(nn.Module):
    def __init__(self, c: GeneformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = _activation(c.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    """One post-LN BERT block."""

    def __init__(self, c: GeneformerConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        x = self.attention(x, layout)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, c: GeneformerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class GeneformerModel(nn.Module):
    """The BERT encoder of ``BertForMaskedLM``; ``forward(batch, tap)`` taps ``hidden_states[0..N]``."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.config = config
        self.n_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, batch: TokenBatch, tap: Tap) -> None:
        if batch.max_len > self.config.max_position_embeddings:
            msg = (
                f"a cell of {batch.max_len} tokens exceeds Geneformer's {self.config.max_position_embeddings} positions"
            )
            raise ValueError(msg)
        layout = batch.attention_layout()
        h = self.embeddings(batch.genes, batch.position_ids() if batch.packed else None)
        tap(0, h)
        for i, layer in enumerate(self.encoder.layer, start=1):
            h = layer(h, layout)
            tap(i, h)
        del h


# ------------------------------------------------------------------------------------------------
# checkpoints


def _match_preset(cfg: Mapping[str, Any], config: GeneformerConfig) -> str | None:
    named = cfg.get(PRESET_KEY)
    if isinstance(named, str) and named in PRESETS and PRESETS[named].architecture()[:5] == config.architecture()[:5]:
        return named
    for name, p in PRESETS.items():
        if p.architecture() == config.architecture():
            return name
    return None


def _encoder_state(
    raw: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], path: Path
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keys of ``raw`` under ``bert.`` (or a bare ``BertModel`` file) -> the model's; the rest is ignored.

    Encoder keys (``embeddings.*``, ``encoder.*``) are checked by name and shape; the MLM head
    (``cls.*``), a pooler and the ``position_ids``/``token_type_ids`` buffers of old files are ignored.
    """
    prefix = "bert." if any(k.startswith("bert.") for k in raw) else ""
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    buffers = ("embeddings.position_ids", "embeddings.token_type_ids")
    for key, tensor in raw.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name is None or name in buffers or not name.startswith(("embeddings.", "encoder.")):
            ignored.append(key)
        else:
            state[name] = tensor
    check_state_dict(
        state,
        expected,
        what=f"Geneformer checkpoint {path}",
        hint=f"Check that {CONFIG_FILE} and the weights come from the same model folder.",
    )
    return state, sorted(ignored)


class GeneformerFamily:
    """The ``FAMILY`` object of Geneformer (see :class:`~cellstrata.engine.models.base.ModelFamily`)."""

    name = FAMILY_NAME
    presets: Mapping[str, GeneformerConfig] = PRESETS
    default_poolings: tuple[str, ...] = ("mean",)

    def load(
        self,
        checkpoint: str | Path,
        *,
        device: torch.device | str = "cpu",
        max_length: int | None = None,
        seed: int = 0,
        token_dictionary: str | Path | None = None,
        gene_median_dictionary: str | Path | None = None,
        gene_name_id_dictionary: str | Path | None = None,
        ensembl_mapping_dictionary: str | Path | None = None,
        duplicate_genes: str = "official",
        stored_zeros: str = "keep",
        **unknown: Any,
    ) -> LoadedModel:
        """Load an official Geneformer folder (``config.json``, weights, dictionaries; see :func:`find_dictionaries`).

        ``max_length`` is the model input size (default: ``max_position_embeddings``, as the official
        tokenizer's ``model_input_size``); ``seed`` is accepted for the common interface (no randomness).
        ``duplicate_genes`` (``official`` or ``sum``) and ``stored_zeros`` (``keep`` or ``drop``) are the
        tokenizer's options (see :class:`GeneformerTokenizer`).
        """
        refuse_unknown_options(
            "geneformer",
            unknown,
            (
                "max_length",
                "token_dictionary",
                "gene_median_dictionary",
                "gene_name_id_dictionary",
                "ensembl_mapping_dictionary",
                "duplicate_genes",
                "stored_zeros",
            ),
        )
        del seed
        folder = Path(checkpoint).expanduser()
        if not folder.is_dir():
            msg = (
                f"Geneformer checkpoint folder {folder} does not exist or is not a folder; it must contain "
                f"{CONFIG_FILE} and {' or '.join(WEIGHTS_FILES)} (a released model folder such as Geneformer-V2-104M)"
            )
            raise CheckpointError(msg)
        weights = next((folder / f for f in WEIGHTS_FILES if (folder / f).is_file()), None)
        if not (folder / CONFIG_FILE).is_file() or weights is None:
            absent = [CONFIG_FILE] if not (folder / CONFIG_FILE).is_file() else []
            absent += [" or ".join(WEIGHTS_FILES)] if weights is None else []
            msg = (
                f"Geneformer checkpoint folder {folder} lacks {', '.join(absent)}; it must contain {CONFIG_FILE} "
                f"(model settings) and {' or '.join(WEIGHTS_FILES)} (weights)"
            )
            raise CheckpointError(msg)
        cfg = read_json(folder / CONFIG_FILE, "Geneformer settings")
        if not isinstance(cfg, dict):
            msg = f"Geneformer {folder / CONFIG_FILE} must be a JSON object"
            raise CheckpointError(msg)
        config = GeneformerConfig.from_config(cfg)
        preset = _match_preset(cfg, config)
        if max_length is None:
            max_length = config.max_position_embeddings
        if not 1 <= int(max_length) <= config.max_position_embeddings:
            msg = f"Geneformer max_length must be between 1 and {config.max_position_embeddings}, got {max_length}"
            raise ConfigError(msg)

        paths = find_dictionaries(
            folder,
            config.vocab_size,
            {
                "token_dictionary": token_dictionary,
                "gene_median_dictionary": gene_median_dictionary,
                "gene_name_id_dictionary": gene_name_id_dictionary,
                "ensembl_mapping_dictionary": ensembl_mapping_dictionary,
            },
        )
        dictionaries = read_dictionaries(paths)
        if max(dictionaries.token.values()) >= config.vocab_size or min(dictionaries.token.values()) < 0:
            msg = (
                f"the Geneformer token dictionary {paths['token_dictionary']} holds ids outside 0.."
                f"{config.vocab_size - 1} ({CONFIG_FILE} vocab_size); use the dictionary of this model's generation"
            )
            raise CheckpointError(msg)
        tokenizer = GeneformerTokenizer(
            dictionaries,
            max_length=int(max_length),
            pad_token_id=config.pad_token_id,
            duplicate_genes=str(duplicate_genes),
            stored_zeros=str(stored_zeros),
        )

        model = GeneformerModel(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        raw = load_state_dict(weights)
        state, ignored = _encoder_state(raw, expected, weights)
        model.load_state_dict(state, strict=True)
        del raw, state
        model.requires_grad_(False)
        model.eval()
        model.to(device)

        layout = (
            SpecialLayout(n_leading=1, n_trailing=1, has_cls=True) if tokenizer.special else SpecialLayout(0, 0, False)
        )
        # official: EmbExtractor's default, emb_mode="cls" for V2 (the <cls> token, an alias of cls) and "cell"
        # for V1 (model_version="V1" switches cls to cell: the mean over gene tokens, an alias of mean)
        pool_ops = (
            {"mean": "mean", "max": "max"}
            | ({"cls": "first"} if tokenizer.special else {})
            | {"official": "first" if tokenizer.special else "mean"}
        )
        files = describe_files(folder, [CONFIG_FILE, weights.name])
        for role, p in paths.items():
            files[role] = {"path": str(p.resolve()), **describe_files(p.parent, [p.name])[p.name]}
        cfg_out = dict(config.to_config())
        cfg_out.update({"preset": preset, "max_length": tokenizer.max_length})
        return LoadedModel(
            family=FAMILY_NAME,
            preset=preset,
            model=model,
            tokenizer=tokenizer,
            config=cfg_out,
            layout=layout,
            pool_ops=pool_ops,
            default_poolings=("mean", "cls") if tokenizer.special else ("mean",),
            checkpoint={
                "path": str(folder.resolve()),
                "sha256": files[weights.name]["sha256"],
                "weights_file": weights.name,
                "files": files,
                "ignored_keys": ignored,
                "genes_without_median": tokenizer.n_without_median,
            },
            official_layer=config.num_hidden_layers - 1,  # hidden_states[quant_layers + emb_layer(-1)], V1 and V2
        )

    def init_checkpoint(
        self,
        preset: str,
        out: str | Path,
        *,
        seed: int = 0,
        genes: Sequence[str] | None = None,
    ) -> Path:
        """Write a random-weight folder for ``preset``: ``config.json``, ``model.safetensors``, dictionaries.

        The vocabulary is ``genes`` (Ensembl ids) or the synthetic genes' ids (``gene_ensembl_ids``);
        the dictionaries carry the preset's generation names (``*_gc104M.pkl`` with ``<cls>``/``<eos>``
        for V2 and ``tiny``, ``*_gc30M.pkl`` without them for V1). Medians are random (seeded).
        """
        if preset not in PRESETS:
            msg = f"unknown geneformer preset {preset!r}; known presets: {', '.join(PRESETS)}"
            raise ConfigError(msg)
        config = PRESETS[preset]
        suffix = _PRESET_SUFFIX[preset]
        specials = (PAD_TOKEN, MASK_TOKEN) if suffix == "_gc30M" else SPECIAL_TOKENS
        gene_list = list(genes) if genes is not None else gene_ensembl_ids(config.vocab_size - len(specials))
        if len(set(gene_list)) != len(gene_list) or set(gene_list) & set(SPECIAL_TOKENS):
            msg = "genes must be unique and must not contain the special tokens <pad>, <mask>, <cls>, <eos>"
            raise ConfigError(msg)
        if not gene_list:
            raise ConfigError("genes must not be empty")
        config = replace(config, vocab_size=len(gene_list) + len(specials))
        folder = Path(out).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        token = {t: i for i, t in enumerate(specials)}
        token.update({g: len(specials) + i for i, g in enumerate(gene_list)})
        rng = np.random.default_rng((int(seed), 7))
        medians = np.exp(rng.normal(0.5, 0.7, len(gene_list)))
        median = {g: float(m) for g, m in zip(gene_list, medians)}
        for role, d in (("token_dictionary", token), ("gene_median_dictionary", median)):
            with (folder / DICT_ROLES[role].format(suffix)).open("wb") as f:
                pickle.dump(d, f, protocol=4)
        cfg = config.to_config()
        cfg[PRESET_KEY] = preset
        cfg["random_init_seed"] = int(seed)
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        save_safetensors(random_state_dict(config, seed=seed), folder / WEIGHTS_FILES[0])
        return folder


def random_state_dict(config: GeneformerConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights with the released key set and non-trivial activations.

    Linear weights ~ N(0, 1/fan_in) (so attention is far from uniform), embeddings ~ N(0, 0.5²),
    LayerNorm weights 1 ± 0.1 and biases ± 0.05, so a swapped or ignored parameter shows in every layer.
    """
    gen = torch.Generator().manual_seed(int(seed))
    state: dict[str, torch.Tensor] = {}
    for key, shape in official_key_shapes(config).items():
        last = key.rsplit(".", 1)[-1]
        if "LayerNorm" in key and last == "weight":
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif last == "bias":
            t = 0.05 * torch.randn(shape, generator=gen)
        elif "embeddings" in key:
            t = 0.5 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        state[key] = t.contiguous()
    return state


FAMILY = GeneformerFamily()

__all__ = [
    "FAMILY",
    "PRESETS",
    "SPECIAL_TOKENS",
    "DuplicateGenesWarning",
    "GeneDictionaries",
    "GeneformerConfig",
    "GeneformerFamily",
    "GeneformerModel",
    "GeneformerTokenizer",
    "find_dictionaries",
    "official_key_shapes",
    "random_state_dict",
    "read_dictionaries",
]
