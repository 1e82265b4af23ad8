"""Tahoe-X1 (Tahoe Therapeutics 2025): tokenizer, per-layer model and checkpoint reader/writer.

Reproduces the official embedding path of ``tahoebio/tahoe-x1`` (``scripts/inference/predict_embeddings.py``
-> ``utils.util.loader_from_adata`` -> ``data.dataloader.CountDataset`` -> ``data.collator.DataCollator``
(``do_mlm=False``, ``binning``) -> ``model.TXModel.transformer_generate`` -> ``cell_emb``), with one
deliberate difference: the random subset kept from an over-long cell is a counter-based draw
(:mod:`.counter_rng`, keyed by seed, stream, cell index and position) instead of an unseeded
``torch.randperm``, so a cell's tokens do not depend on its batch, block or order (the rule is the same,
the drawn subset differs from any one official run). :meth:`TahoeX1Tokenizer.tokenize` works on the whole
block at once; :meth:`TahoeX1Tokenizer.tokenize_reference` restates the per-cell rule with the same draws.
The chemical (drug) token of the 3b model is not used: ``ComposerTX.from_hf`` and
``utils.util.load_model`` switch it off by default (``use_chem_inf=False``), and so do we.

Checkpoint folder (as published on Hugging Face, ``tahoebio/Tahoe-x1/{70m,1b,3b}-model/``):
``model.safetensors`` (a ``ComposerTX`` state dict, every key prefixed ``model.``), ``model_config.yml``,
``collator_config.yml`` and ``vocab.json`` (Ensembl gene id -> index).

Stored zeros: ``CountDataset`` takes every entry a CSR row stores (``row.indices``, ``row.data``), so an
explicit zero is a gene token like any other: it lengthens the cell, can be drawn when an over-long cell
is subsampled, and ``binning`` gives it bin 1 (the quantile edges come from the cell's non-zero values
only, so the other genes' bins do not change). cellstrata does the same, on in-memory and on-disk
(h5ad, zarr) matrices alike; a dense matrix stores no zero. Two cases where the official code raises
instead of giving a number: a cell storing only zeros is stored as empty (NaN, as a cell with no
vocabulary gene), and with ``keep_first_n_tokens=2`` a cell whose genes after the first are all zero
gets bin 1 for each of them. Duplicate entries of one gene in a row are summed (canonical CSR). The
loading option ``stored_zeros="drop"`` (``--model-option stored_zeros=drop``) departs on purpose: it
reads only the non-zero entries, as if the matrix had been densified.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import PoolSpec, pool_cast
from ..datasets import gene_ensembl_ids
from ..errors import CheckpointError, ConfigError, GeneOverlapError, InvalidValuesError
from .attention import AttentionLayout, attend
from .base import (
    RANDOM_SUBSAMPLE,
    GeneMapping,
    LoadedModel,
    SpecialLayout,
    Tap,
    TokenBatch,
    TokenizedBlock,
    canonical_rows,
    concat_blocks,
    kept_entries,
    leading_token_block,
    row_pieces,
)
from .checkpoints import (
    check_state_dict,
    checkpoint_folder,
    describe_files,
    load_state_dict,
    read_vocab_json,
    read_yaml,
    refuse_unknown_options,
    save_safetensors,
)
from .counter_rng import RNG_NAME, random_order, random_subset
from .layers import ContinuousValueEncoder, GeneEncoder

if TYPE_CHECKING:
    from ..sources import CellBlock

FAMILY_NAME = "tahoe-x1"
PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)  # appended in this order when absent (prepare_for_inference)
WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.yml"
COLLATOR_CONFIG_FILE = "collator_config.yml"
VOCAB_FILE = "vocab.json"
REQUIRED_FILES = (WEIGHTS_FILE, MODEL_CONFIG_FILE, COLLATOR_CONFIG_FILE, VOCAB_FILE)
KEY_PREFIX = "model."  # ComposerTX wraps TXModel as ``self.model``
# heads and the drug encoder: in the released files, never used for embeddings (skip_decoders, use_chem_inf=False)
IGNORED_PREFIXES = ("expression_decoder.", "mvc_decoder.", "chem_encoder.")
INFERENCE_MAX_LENGTH = 2048  # scripts/inference/configs/predict.yaml: predict.seq_len_dataset
STORED_ZEROS = ("keep", "drop")  # keep: official CountDataset (every stored entry); drop: non-zero entries only
TOKENIZER_VERSION = "tahoe-x1-binning-3"  # 2: stored zeros are tokens in bin 1; 3: counter-based draws
SUBSET_STREAM = 1  # counter_rng stream of the random subset kept from an over-long cell
PRESET_FIELD = "cellstrata_preset"  # model_config.yml field written by init_checkpoint
# torch.nn.functional names the official ``resolve_ffn_act_fn({"name": ...})`` resolves (default arguments)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
}
_LAYERNORMS = ("layernorm", "low_precision_layernorm")  # identical in float32 (llm-foundry norms registry)


# ------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class TahoeX1Config:
    """Architecture and tokenization settings (official ``model_config.yml`` / ``collator_config.yml`` names)."""

    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int
    expansion_ratio: int = 4
    transformer_activation: str = "relu"
    expression_activation: str = "relu"
    decoder_activation: str = "leaky_relu"
    decoder_layers: int = 1
    norm_eps: float = 1e-5
    max_value: float = 512.0
    gene_norm: bool = True
    expression_norm: bool = True
    mvc: bool = True
    pad_value: float = -2.0
    num_bins: int = 51
    keep_first_n_tokens: int = 1
    train_max_length: int = 1024
    max_length: int = INFERENCE_MAX_LENGTH

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "vocab_size", "expansion_ratio", "num_bins"):
            if int(getattr(self, name)) <= 0:
                msg = f"Tahoe-X1 config: {name} must be > 0, got {getattr(self, name)!r}"
                raise ConfigError(msg)
        if self.d_model % self.n_heads:
            msg = f"Tahoe-X1 config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}"
            raise ConfigError(msg)
        for name in ("transformer_activation", "expression_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                msg = f"Tahoe-X1 config: {name} {getattr(self, name)!r} is not one of {', '.join(ACTIVATIONS)}"
                raise ConfigError(msg)
        if self.num_bins < 3:
            msg = f"Tahoe-X1 config: num_bins must be >= 3, got {self.num_bins}"
            raise ConfigError(msg)
        if self.keep_first_n_tokens < 1:
            msg = (
                f"Tahoe-X1 config: keep_first_n_tokens {self.keep_first_n_tokens} is not supported "
                "(>= 1 keeps <cls> out of the binning, as every released model)"
            )
            raise ConfigError(msg)
        if self.max_length <= self.keep_first_n_tokens:
            msg = (
                f"Tahoe-X1 max_length must be > keep_first_n_tokens ({self.keep_first_n_tokens}), got {self.max_length}"
            )
            raise ConfigError(msg)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_size(self) -> int:
        return self.d_model * self.expansion_ratio

    def architecture(self) -> tuple[Any, ...]:
        return (self.d_model, self.n_layers, self.n_heads, self.expansion_ratio, self.transformer_activation)

    @classmethod
    def from_configs(
        cls, model_cfg: Mapping[str, Any], collator_cfg: Mapping[str, Any], vocab_size: int
    ) -> TahoeX1Config:
        """Build from the official YAML dicts; ``CheckpointError`` names missing or unsupported fields."""
        required = ("d_model", "n_layers", "n_heads", "expansion_ratio")
        missing = [k for k in required if k not in model_cfg]
        if missing:
            msg = f"Tahoe-X1 {MODEL_CONFIG_FILE} lacks {', '.join(missing)} (it must give {', '.join(required)})"
            raise CheckpointError(msg)
        _check_supported(model_cfg, collator_cfg)
        norm = dict(model_cfg.get("norm_config") or {})
        expr = dict(model_cfg.get("expression_encoder") or {})
        gene = dict(model_cfg.get("gene_encoder") or {})
        dec = dict(model_cfg.get("expression_decoder") or {})
        try:
            return cls(
                d_model=int(model_cfg["d_model"]),
                n_layers=int(model_cfg["n_layers"]),
                n_heads=int(model_cfg["n_heads"]),
                vocab_size=int(vocab_size),
                expansion_ratio=_as_int(model_cfg["expansion_ratio"], "expansion_ratio"),
                transformer_activation=str(model_cfg.get("transformer_activation", "gelu")),
                expression_activation=str(expr.get("activation", "relu")),
                decoder_activation=str(dec.get("activation", "leaky_relu")),
                decoder_layers=int(dec.get("n_layers", 2)),
                norm_eps=float(norm.get("eps", 1e-5)),
                max_value=float(expr.get("max_value", 512)),
                gene_norm=bool(gene.get("use_norm", False)),
                expression_norm=bool(expr.get("use_norm", False)),
                mvc=model_cfg.get("mvc") is not None,
                pad_value=float(collator_cfg["pad_value"]),
                num_bins=int(collator_cfg.get("num_bins", 51)),
                keep_first_n_tokens=int(collator_cfg.get("keep_first_n_tokens", 1)),
                train_max_length=int(collator_cfg.get("max_length", 1024)),
            )
        except (TypeError, ValueError, KeyError) as exc:
            msg = f"Tahoe-X1 config has an invalid or missing value: {exc}"
            raise CheckpointError(msg) from None

    def to_configs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(model_config.yml, collator_config.yml)`` dicts for this config (fields of the released files)."""
        model_cfg: dict[str, Any] = {
            "name": "tahoe_x1",
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "init_device": "cpu",
            "expansion_ratio": self.expansion_ratio,
            "standard_scale_outputs": False,
            "transformer_activation": self.transformer_activation,
            "n_heads": self.n_heads,
            "norm_scheme": "pre",
            "use_generative_training": False,
            "use_glu": False,
            "cell_emb_style": "cls",
            "attn_config": {
                "attn_impl": "flash",
                "use_attn_mask": False,
                "attn_type": "grouped_query_attention",
                "kv_nheads": self.n_heads,
                "attn_pdrop": 0.0,
            },
            "norm_config": {"norm_type": "layernorm", "eps": self.norm_eps},
            "expression_encoder": {
                "input_emb_style": "continuous",
                "dropout": 0.1,
                "max_value": _yaml_number(self.max_value),
                "activation": self.expression_activation,
                "use_norm": self.expression_norm,
            },
            "gene_encoder": {"use_norm": self.gene_norm},
            "mvc": {"arch_style": "inner product", "query_activation": "sigmoid", "scaled_dot_product": True}
            if self.mvc
            else None,
            "expression_decoder": {
                "n_outputs": 1,
                "n_layers": self.decoder_layers,
                "activation": self.decoder_activation,
            },
            "vocab_size": self.vocab_size,
            "precision": "amp_bf16",
        }
        collator_cfg: dict[str, Any] = {
            "do_padding": True,
            "pad_value": _yaml_number(self.pad_value),
            "do_mlm": True,
            "do_binning": True,
            "mlm_probability": 0.5,
            "mask_value": -1,
            "max_length": self.train_max_length,
            "sampling": True,
            "num_bins": self.num_bins,
            "right_binning": False,
            "use_junk_tokens": False,
            "keep_first_n_tokens": self.keep_first_n_tokens,
        }
        return model_cfg, collator_cfg


def _as_int(x: Any, name: str) -> int:
    if float(x) != int(float(x)):
        msg = f"Tahoe-X1 {name} must be a whole number, got {x!r}"
        raise CheckpointError(msg)
    return int(float(x))


def _yaml_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _check_supported(model_cfg: Mapping[str, Any], collator_cfg: Mapping[str, Any]) -> None:
    """Refuse settings that change the official computation in ways this module does not implement."""
    problems = []
    if model_cfg.get("norm_scheme", "pre") != "pre":
        problems.append(f"norm_scheme {model_cfg.get('norm_scheme')!r} (only 'pre')")
    if model_cfg.get("use_glu", False):
        problems.append("use_glu: true")
    if model_cfg.get("cell_emb_style", "cls") != "cls":
        problems.append(f"cell_emb_style {model_cfg.get('cell_emb_style')!r} (only 'cls')")
    norm_type = str((model_cfg.get("norm_config") or {}).get("norm_type", "low_precision_layernorm")).lower()
    if norm_type not in _LAYERNORMS:
        problems.append(f"norm_config.norm_type {norm_type!r} (only {', '.join(_LAYERNORMS)})")
    attn = model_cfg.get("attn_config") or {}
    # TXBlock reads kv_n_heads (the released configs write kv_nheads, which it ignores)
    if "kv_n_heads" in attn and int(attn["kv_n_heads"]) != int(model_cfg["n_heads"]):
        problems.append(f"attn_config.kv_n_heads {attn['kv_n_heads']} != n_heads (grouped-query attention)")
    if (model_cfg.get("gene_encoder") or {}).get("embeddings"):
        problems.append("gene_encoder.embeddings (extra pretrained gene embeddings)")
    expr = model_cfg.get("expression_encoder") or {}
    if expr.get("input_emb_style", "continuous") != "continuous":
        problems.append(f"expression_encoder.input_emb_style {expr.get('input_emb_style')!r}")
    if not collator_cfg.get("do_binning", True) or collator_cfg.get("log_transform", False):
        problems.append("collator without do_binning (log_transform inputs)")
    if collator_cfg.get("right_binning", False):
        problems.append("right_binning: true")
    if "pad_value" not in collator_cfg:
        problems.append("collator pad_value missing")
    if problems:
        msg = f"Tahoe-X1 checkpoint settings not supported: {'; '.join(problems)}"
        raise CheckpointError(msg)


PRESETS: dict[str, TahoeX1Config] = {
    # configs/gcloud/tahoe_x1-70m-merged.yaml; vocab 62720 incl. specials (tutorial printout)
    "70m": TahoeX1Config(d_model=512, n_layers=12, n_heads=8, vocab_size=62720),
    # configs/gcloud/tahoe_x1-1_3b-merged.yaml (same vocabulary file)
    "1b": TahoeX1Config(d_model=2048, n_layers=24, n_heads=16, vocab_size=62720),
    # configs/mcli/tahoe_x1-3b-v2-cont-train.yaml: gelu everywhere, trained with the drug token after <cls>
    # (keep_first_n_tokens 2, vocabulary + <drug>)
    "3b": TahoeX1Config(
        d_model=2560,
        n_layers=32,
        n_heads=20,
        vocab_size=62721,
        transformer_activation="gelu",
        expression_activation="gelu",
        decoder_activation="gelu",
        keep_first_n_tokens=2,
        train_max_length=2048,
    ),
    # random test model over the synthetic Ensembl ids of engine/datasets.gene_ensembl_ids; its context is
    # 256 tokens (<cls> + 255 genes; the released models' is 2,048): longer cells keep a seeded random subset
    "tiny": TahoeX1Config(
        d_model=64, n_layers=4, n_heads=4, vocab_size=2000 + len(SPECIAL_TOKENS), train_max_length=256, max_length=256
    ),
}


def official_key_shapes(config: TahoeX1Config) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official ``ComposerTX`` state dict (``model.`` prefix, heads included).

    The drug encoder of a model trained with ``use_chem_token`` is not listed (it is dropped at inference).
    """
    d, f, v = config.d_model, config.ffn_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"gene_encoder.embedding.weight": (v, d)}
    if config.gene_norm:
        shapes.update({"gene_encoder.enc_norm.weight": (d,), "gene_encoder.enc_norm.bias": (d,)})
    shapes["flag_encoder.weight"] = (2, d)
    shapes.update(
        {
            "expression_encoder.linear1.weight": (d, 1),
            "expression_encoder.linear1.bias": (d,),
            "expression_encoder.linear2.weight": (d, d),
            "expression_encoder.linear2.bias": (d,),
        }
    )
    if config.expression_norm:
        shapes.update({"expression_encoder.norm.weight": (d,), "expression_encoder.norm.bias": (d,)})
    for i in range(config.n_layers):
        p = f"transformer_encoder.layers.{i}."
        for name, (o, n_in) in {
            "self_attn.Wqkv": (3 * d, d),
            "self_attn.out_proj": (d, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
        }.items():
            shapes[f"{p}{name}.weight"] = (o, n_in)
            shapes[f"{p}{name}.bias"] = (o,)
        for name in ("norm1", "norm2"):
            shapes[f"{p}{name}.weight"] = (d,)
            shapes[f"{p}{name}.bias"] = (d,)
    shapes["transformer_encoder.norm.weight"] = (d,)
    shapes["transformer_encoder.norm.bias"] = (d,)
    for j in range(config.decoder_layers):
        shapes[f"expression_decoder.linear_layers.{j}.weight"] = (d, d)
        shapes[f"expression_decoder.linear_layers.{j}.bias"] = (d,)
    shapes["expression_decoder.out_proj.weight"] = (1, d)
    shapes["expression_decoder.out_proj.bias"] = (1,)
    if config.mvc:
        shapes["mvc_decoder.gene2query.weight"] = (d, d)
        shapes["mvc_decoder.gene2query.bias"] = (d,)
        shapes["mvc_decoder.W.weight"] = (d, d)
    return {KEY_PREFIX + k: s for k, s in shapes.items()}


# ------------------------------------------------------------------------------------------------
# binning (data/collator.py ``binning``), vectorised over cells and equal to torch.quantile per cell

_EDGE_GROUP = 256  # cells per vectorised group: 64 * 256 lerp elements stay under torch's 32768 grain
_LERP_WIDTH = 64  # columns per cell in the contiguous lerp: a multiple of every CPU vector loop step


def _lerp_both_paths(below: torch.Tensor, above: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``torch.lerp`` of ``[g, K]`` float32 operands once through the vectorised and once the scalar CPU loop.

    torch's CPU lerp computes an element with a fused multiply-add in its vector loop and without one
    in its scalar loop (the remainder of a contiguous tensor, or any strided tensor), so a single
    ``torch.quantile`` call can round an edge either way depending on its position. Contiguous rows
    padded to 64 columns run entirely through the vector loop; stride-2 views run entirely scalar.
    """
    g, k = below.shape
    wide = [torch.zeros((g, _LERP_WIDTH), dtype=torch.float32) for _ in range(3)]
    for w, src in zip(wide, (below, above, weight)):
        w[:, :k] = src
    vec = torch.lerp(wide[0], wide[1], wide[2])[:, :k]
    strided = [torch.zeros((g, k, 2), dtype=torch.float32) for _ in range(3)]
    for s, src in zip(strided, (below, above, weight)):
        s[..., 0] = src
    scalar = strided[0][..., 0]
    scalar.lerp_(strided[1][..., 0], strided[2][..., 0])
    return vec, scalar.clone()


def _sort_within_cells(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each cell's values sorted ascending, cells kept in order (one uint64 sort: cell, then value bits)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows = np.repeat(np.arange(len(counts), dtype=np.uint64), counts)
    if len(values) and values.min() > 0:  # positive float32 bit patterns sort like the floats
        keys = (rows << np.uint64(32)) | values.view(np.uint32).astype(np.uint64)
        keys.sort()
        return (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
    return values[np.lexsort((values, rows))]


def quantile_edges(
    values: np.ndarray, counts: np.ndarray, num_bins: int, *, sorted_values: np.ndarray | None = None
) -> np.ndarray:
    """``torch.quantile(cell, torch.linspace(0, 1, num_bins - 1))`` of every cell, bit for bit.

    ``values`` (float32) are the cells' values one cell after the other, ``counts`` (each >= 1) how many
    belong to each cell; ``sorted_values``, when given, are the same values sorted within each cell.
    Returns ``[n_cells, num_bins - 1]`` float32. The quantile's steps (sort, ``ranks = q * (n - 1)`` in
    float32, ``floor``/``ceil`` gathers, ``lerp``) run batched; where the two possible lerp roundings of
    an edge differ, that cell is computed by ``torch.quantile`` itself.
    """
    grades = torch.linspace(0, 1, num_bins - 1, dtype=torch.float32)
    counts = np.asarray(counts, dtype=np.int64)
    n_cells = len(counts)
    out = np.empty((n_cells, num_bins - 1), dtype=np.float32)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    sorted_vals = _sort_within_cells(values, counts) if sorted_values is None else sorted_values
    for lo in range(0, n_cells, _EDGE_GROUP):
        hi = min(lo + _EDGE_GROUP, n_cells)
        c = counts[lo:hi]
        last = torch.from_numpy((c - 1).astype(np.float32))[:, None]
        ranks = grades[None, :] * last  # float32, as ``q * last_index``
        below_i = ranks.to(torch.int64)
        weight = ranks - below_i
        above_i = ranks.ceil().to(torch.int64)
        base = torch.from_numpy(starts[lo:hi])[:, None]
        flat = torch.from_numpy(sorted_vals)
        below = flat[base + below_i]
        above = flat[base + above_i]
        vec, scalar = _lerp_both_paths(below, above, weight)
        edges = vec.numpy().copy()
        ambiguous = np.flatnonzero((vec != scalar).any(dim=1).numpy())
        for j in ambiguous:  # exceedingly rare: let torch.quantile decide exactly as the official call
            s = starts[lo + j]
            cell = torch.from_numpy(values[s : s + c[j]].copy())
            edges[j] = torch.quantile(cell, grades).numpy()
        out[lo:hi] = edges
    return out


def bin_values(values: np.ndarray, counts: np.ndarray, num_bins: int) -> np.ndarray:
    """Official ``binning(row, n_bins, right=False)`` of every cell: ``bucketize(v, edges) + 1`` (1..num_bins-1).

    ``values`` (float32, all > 0) grouped by cell as in :func:`quantile_edges`. ``bucketize(v, edges)``
    (``right=False``) is the number of the cell's edges below ``v``: every cell's values are sorted once
    (key: cell, value bits, flat index), the edges placed among them, and a running count of placed
    edges gives each sorted value its bucket.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    counts = np.asarray(counts, dtype=np.int64)
    n, n_cells, n_edges = len(values), len(counts), num_bins - 1
    if not n:
        return np.zeros(0, dtype=np.int64)
    index_bits = int(max(n - 1, 1)).bit_length()
    if int(n_cells - 1).bit_length() + 32 + index_bits > 64:  # a huge block: in parts that fit
        half = n_cells // 2
        cut = int(counts[:half].sum())
        return np.concatenate(
            (bin_values(values[:cut], counts[:half], num_bins), bin_values(values[cut:], counts[half:], num_bins))
        )
    shift = np.uint64(index_bits)
    rows = np.repeat(np.arange(n_cells, dtype=np.uint64), counts)
    hay = rows << np.uint64(32)
    hay |= values.view(np.uint32)  # positive float32 bit patterns sort like the floats
    hay <<= shift
    hay |= np.arange(n, dtype=np.uint64)
    hay.sort()
    origin = (hay & np.uint64((1 << index_bits) - 1)).astype(np.int64)
    sorted_values = ((hay >> shift) & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
    edges = quantile_edges(values, counts, num_bins, sorted_values=sorted_values)
    # values <= edge sort before (cell | edge bits | all index bits set): the values after an edge's
    # place are above it, so the edges placed at or before a sorted value are the edges below it
    # (plus those of earlier cells, all placed before this cell's values)
    edge_keys = (np.arange(n_cells, dtype=np.uint64)[:, None] << np.uint64(32)) | edges.view(np.uint32)
    placed = np.searchsorted(hay, (edge_keys.ravel() << shift) | ((np.uint64(1) << shift) - np.uint64(1)), "right")
    below = np.repeat(np.arange(len(placed) + 1, dtype=np.int64), np.diff(placed, prepend=0, append=n))
    below -= np.repeat(np.arange(n_cells, dtype=np.int64) * n_edges, counts) - 1  # bucketize + 1
    out = np.empty(n, dtype=np.int64)
    out[origin] = below
    return out


# ------------------------------------------------------------------------------------------------
# vocabulary and tokenizer


def _vocab_sha256(vocab: Mapping[str, int]) -> str:
    ordered = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return hashlib.sha256(json.dumps(ordered, ensure_ascii=False).encode()).hexdigest()


def _is_special(token: str) -> bool:
    return token.startswith("<")  # the collator's rule for non-gene tokens (<pad>, <cls>, <drug>, <junkN>)


class TahoeX1Tokenizer:
    """Official Tahoe-X1 input preparation (see the module docstring), seeded per cell.

    Per cell (``CountDataset.__getitem__`` + ``DataCollator.__call__``): the stored vocabulary entries
    (explicit zeros included) in column order with their raw counts, ``<cls>`` first with value
    ``pad_value``; every value after the first ``keep_first_n_tokens`` tokens binned against the
    quantiles of the non-zero ones, a zero in bin 1 (``binning``); cells longer than ``max_length`` keep
    their first ``keep_first_n_tokens`` tokens plus a random subset of the rest in random order
    (``_sample``). A cell with no non-zero vocabulary value is empty. ``stored_zeros="drop"`` reads only
    the non-zero entries (a departure, off by default).
    """

    truncation_rule = RANDOM_SUBSAMPLE

    def __init__(
        self,
        vocab: Mapping[str, int],
        *,
        max_length: int = INFERENCE_MAX_LENGTH,
        seed: int = 0,
        num_bins: int = 51,
        keep_first_n_tokens: int = 1,
        pad_token_id: int | None = None,
        pad_value: float = -2.0,
        stored_zeros: str = "keep",
    ) -> None:
        if stored_zeros not in STORED_ZEROS:
            msg = f"stored_zeros must be one of {', '.join(STORED_ZEROS)}, got {stored_zeros!r}"
            raise ConfigError(msg)
        if int(keep_first_n_tokens) < 1:
            msg = f"keep_first_n_tokens must be >= 1, got {keep_first_n_tokens}"
            raise ConfigError(msg)
        if int(max_length) <= int(keep_first_n_tokens):
            msg = (
                f"Tahoe-X1 max_length must be > keep_first_n_tokens ({keep_first_n_tokens}) "
                f"(<cls> plus at least one gene), got {max_length}"
            )
            raise ConfigError(msg)
        if int(seed) < 0:
            msg = f"seed must be a non-negative integer, got {seed}"
            raise ConfigError(msg)
        if int(num_bins) < 3:
            msg = f"num_bins must be >= 3, got {num_bins}"
            raise ConfigError(msg)
        for tok in (PAD_TOKEN, CLS_TOKEN):
            if tok not in vocab:
                msg = f"the Tahoe-X1 vocabulary has no {tok!r} token"
                raise ConfigError(msg)
        self.vocab: dict[str, int] = dict(vocab)
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.num_bins = int(num_bins)
        self.keep_first_n_tokens = int(keep_first_n_tokens)
        self.pad_id = int(vocab[PAD_TOKEN] if pad_token_id is None else pad_token_id)
        self.cls_id = int(vocab[CLS_TOKEN])
        self.pad_value = float(pad_value)
        self.stored_zeros = stored_zeros
        self._n_genes = sum(not _is_special(t) for t in self.vocab)
        self.vocab_sha256 = _vocab_sha256(self.vocab)

    @property
    def n_vocab_genes(self) -> int:
        return self._n_genes

    def settings(self) -> dict[str, Any]:
        return {
            "family": FAMILY_NAME,
            "version": TOKENIZER_VERSION,
            "num_bins": self.num_bins,
            "binning": "torch.quantile(values, linspace(0, 1, num_bins - 1)); bucketize(right=False) + 1",
            "stored_zeros": self.stored_zeros,  # keep: tokens in bin 1, edges from the non-zero values
            "keep_first_n_tokens": self.keep_first_n_tokens,
            "max_length": self.max_length,
            "seed": self.seed,
            "rng": RNG_NAME,
            "over_length": "keep the first keep_first_n_tokens + random subset, random order",
            "chem_token": False,
            "pad_id": self.pad_id,
            "pad_value": self.pad_value,
            "cls_id": self.cls_id,
            "cls_value": self.pad_value,
            "vocab_size": len(self.vocab),
            "vocab_sha256": self.vocab_sha256,
        }

    def map_genes(self, gene_names: Sequence[str]) -> GeneMapping:
        names = list(gene_names)
        get = self.vocab.get
        ids = np.fromiter(
            (get(g, -1) if isinstance(g, str) and not _is_special(g) else -1 for g in names),
            dtype=np.int64,
            count=len(names),
        )
        mapping = GeneMapping.from_ids(ids, names, self.n_vocab_genes)
        if mapping.n_matched == 0:
            raise GeneOverlapError(self._no_overlap_message(names, mapping))
        return mapping

    def _no_overlap_message(self, names: list[Any], mapping: GeneMapping) -> str:
        ex_in = ", ".join(str(g) for g in names[:5]) or "(none)"
        by_id = sorted(self.vocab.items(), key=lambda kv: kv[1])
        ex_vocab = [t for t, _ in by_id if not _is_special(t)][:3]
        head = [str(g) for g in names[:100]]
        looks_ensembl = sum(g.upper().startswith("ENS") for g in head) > len(head) / 2
        hint = "" if looks_ensembl else " The input looks like gene symbols, not Ensembl ids."
        return (
            f"no input gene is in the Tahoe-X1 vocabulary: {mapping.report()}. Input genes look like: "
            f"{ex_in}; the vocabulary holds e.g.: {', '.join(ex_vocab)}.{hint} Tahoe-X1 matches genes by "
            "Ensembl gene id: pick the column of adata.var that holds Ensembl ids with --gene-column "
            "(Python: gene_column=...), e.g. ensembl_id."
        )

    def tokenize(self, block: CellBlock, mapping: GeneMapping) -> TokenizedBlock:
        """Token sequences of every cell, vectorised over the block (same tokens as :meth:`tokenize_reference`),
        in cache-sized pieces of rows (:func:`~.base.row_pieces`)."""
        X, indices = canonical_rows(block, mapping)
        return concat_blocks([self._tokenize_rows(Xp, ip, mapping) for Xp, ip in row_pieces(X, indices)])

    def _tokenize_rows(self, X: sp.csr_matrix, indices: np.ndarray, mapping: GeneMapping) -> TokenizedBlock:
        n_cells = X.shape[0]
        tok = mapping.token_ids[X.indices]
        data = np.asarray(X.data).astype(np.float32, copy=False)  # official: torch.tensor(dtype=torch.float)
        keep = tok >= 0  # every stored entry, explicit zeros included (CountDataset: row.indices, row.data)
        if self.stored_zeros == "drop":
            keep &= data != 0
        selector, counts = kept_entries(X.indptr, keep)
        genes, values = (tok, data) if selector is None else (tok[selector], data[selector])
        rows = np.repeat(np.arange(n_cells, dtype=np.int64), counts)
        _check_counts(values, rows, indices)
        empty = np.bincount(rows[values != 0], minlength=n_cells) == 0
        if empty[rows].any():  # cells storing only zeros: the official binning raises; stored as empty
            full = ~empty[rows]
            genes, values, rows = genes[full], values[full], rows[full]
            counts = np.where(empty, 0, counts)
        offsets = np.concatenate(([0], np.cumsum(counts)))

        # binned: every gene at position >= keep_first_n_tokens of [<cls>, genes...]; a zero goes to bin 1,
        # the others to their bucket among the quantiles of the cell's non-zero binned values
        k = self.keep_first_n_tokens
        pos_in_cell = np.arange(len(values)) - np.repeat(offsets[:-1], counts)
        binned = pos_in_cell >= k - 1
        out_values = values.copy()
        out_values[binned & (values == 0)] = 1.0
        nonzero = binned & (values != 0)
        if nonzero.any():
            n_binned = np.bincount(rows[nonzero], minlength=n_cells)
            out_values[nonzero] = bin_values(values[nonzero], n_binned[n_binned > 0], self.num_bins).astype(np.float32)

        # over-long cells: the first k - 1 genes stay, then a random subset of the rest in random order
        head = np.minimum(counts, k - 1)
        kept_tail = random_subset(self.seed, SUBSET_STREAM, indices, counts - head, self.max_length - k)
        n_tail = np.minimum(counts - head, self.max_length - k)
        if k == 1:
            kept = kept_tail
        else:
            tail_start = np.concatenate(([0], np.cumsum(counts - head)))
            n_out = head + n_tail
            out_start = np.concatenate(([0], np.cumsum(n_out)))
            kept = np.empty(int(out_start[-1]), dtype=np.int64)
            is_head = pos_in_cell < k - 1
            kept[out_start[rows[is_head]] + pos_in_cell[is_head]] = np.flatnonzero(is_head)
            tail_rows = np.repeat(np.arange(n_cells, dtype=np.int64), n_tail)
            rank = np.arange(len(kept_tail)) - np.repeat(np.concatenate(([0], np.cumsum(n_tail)[:-1])), n_tail)
            origin = kept_tail - tail_start[tail_rows] + offsets[tail_rows] + head[tail_rows]
            kept[out_start[tail_rows] + head[tail_rows] + rank] = origin
        return leading_token_block(
            indices,
            self.cls_id,
            self.pad_value,
            genes[kept],
            out_values[kept],
            head + n_tail,
            truncated=counts + 1 > self.max_length,
            empty=empty,
            n_expressed=counts,  # gene tokens before sampling: stored zeros included, they take context too
        )

    def tokenize_reference(self, block: CellBlock, mapping: GeneMapping) -> TokenizedBlock:
        """The official per-cell rule, one cell at a time, with the draws of :meth:`tokenize` (tests, benchmarks).

        Per cell: ``[<cls>, stored entries...]``, ``binning`` of the values after the first
        ``keep_first_n_tokens`` (``torch.quantile`` of the non-zero ones, ``bucketize + 1``, zeros in bin 1),
        then the first ``keep_first_n_tokens`` tokens + the first ``max_length - keep_first_n_tokens`` of
        ``random_order(seed, SUBSET_STREAM, ...)`` over the rest when the cell is longer.
        """
        X, indices = canonical_rows(block, mapping)
        k = self.keep_first_n_tokens
        grades = torch.linspace(0, 1, self.num_bins - 1, dtype=torch.float32)
        genes_out: list[np.ndarray] = []
        values_out: list[np.ndarray] = []
        n_cells = len(indices)
        truncated, empty = np.zeros(n_cells, dtype=bool), np.zeros(n_cells, dtype=bool)
        counts = np.zeros(n_cells, dtype=np.int64)
        for i, cell in enumerate(indices.tolist()):
            sl = slice(int(X.indptr[i]), int(X.indptr[i + 1]))
            ids = mapping.token_ids[X.indices[sl]]
            x = np.asarray(X.data[sl]).astype(np.float32)
            stored = ids >= 0 if self.stored_zeros == "keep" else (ids >= 0) & (x != 0)
            g, x = ids[stored], x[stored]
            _check_counts(x, np.zeros(len(x), dtype=np.int64), np.array([cell]))
            if not (x != 0).any():
                genes_out.append(np.array([self.cls_id], dtype=np.int64))
                values_out.append(np.array([self.pad_value], dtype=np.float32))
                empty[i] = True
                continue
            counts[i] = len(x)
            seq_genes = np.concatenate(([self.cls_id], g)).astype(np.int64)
            expr = torch.from_numpy(np.concatenate(([self.pad_value], x)).astype(np.float32))
            rest = expr[k:]
            nz = rest != 0
            binned = torch.ones_like(rest)
            if bool(nz.any()):
                edges = torch.quantile(rest[nz], grades)
                binned[nz] = (torch.bucketize(rest[nz], edges) + 1).to(torch.float32)
            expr[k:] = binned
            seq_values = expr.numpy()
            if len(seq_genes) > self.max_length:
                m = len(seq_genes) - k
                order = random_order(self.seed, SUBSET_STREAM, [cell], np.zeros(m, dtype=np.int64), [m])
                sel = np.concatenate((np.arange(k), order[: self.max_length - k] + k))
                seq_genes, seq_values = seq_genes[sel], seq_values[sel]
                truncated[i] = True
            genes_out.append(seq_genes)
            values_out.append(seq_values)
        return TokenizedBlock(
            indices=indices.copy(),
            genes=genes_out,
            values=values_out,
            truncated=truncated,
            empty=empty,
            n_expressed=counts,
        )


def _check_counts(values: np.ndarray, rows: np.ndarray, indices: np.ndarray) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        cell = int(indices[rows[np.flatnonzero(bad)[0]]])
        msg = f"the expression matrix holds NaN or infinite values (first in cell {cell})"
        raise InvalidValuesError(msg)
    neg = values < 0
    if neg.any():
        cell = int(indices[rows[np.flatnonzero(neg)[0]]])
        msg = f"the expression matrix holds negative values (first in cell {cell}); Tahoe-X1 needs raw counts"
        raise InvalidValuesError(msg)


# ------------------------------------------------------------------------------------------------
# model


class _Attention(nn.Module):
    """llm-foundry ``GroupedQueryAttention`` with ``kv_n_heads == n_heads``: fused ``Wqkv``, SDPA."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.Wqkv = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        b, s, d = x.shape
        h = self.n_heads
        q, k, v = (t.view(b, s, h, d // h) for t in self.Wqkv(x).split(d, dim=-1))
        return self.out_proj(attend(q, k, v, layout).reshape(b, s, d))  # scale 1/sqrt(d/h)


class _Block(nn.Module):
    """``TXBlock`` with ``norm_scheme='pre'``: ``x + attn(norm1(x))``, then ``x + down(act(up(norm2(x))))``."""

    def __init__(self, d: int, n_heads: int, ffn: int, eps: float, activation: str) -> None:
        super().__init__()
        self.self_attn = _Attention(d, n_heads)
        self.up_proj = nn.Linear(d, ffn)
        self.down_proj = nn.Linear(ffn, d)
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), layout)
        return x + self.down_proj(self.activation(self.up_proj(self.norm2(x))))


class _Encoder(nn.Module):
    def __init__(self, layers: Iterable[nn.Module], d: int, eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d, eps=eps)


class TahoeX1Model(nn.Module):
    """``TXModel.transformer_generate`` at inference; ``forward(batch, tap)`` taps layer 0 and each block 1..L.

    The flag encoder is loaded but adds nothing: at inference every ``gen_mask`` is False, so
    ``flag_embs = gen_masks * flag`` is zero. Taps come before the final ``transformer_encoder.norm``.
    """

    def __init__(self, config: TahoeX1Config, pad_id: int) -> None:
        super().__init__()
        d = config.d_model
        self.config = config
        self.n_layers = config.n_layers
        self.hidden_size = d
        self.gene_encoder = GeneEncoder(config.vocab_size, d, pad_id=pad_id, use_norm=config.gene_norm)
        self.flag_encoder = nn.Embedding(2, d)
        self.expression_encoder = ContinuousValueEncoder(
            d,
            activation=ACTIVATIONS[config.expression_activation],
            max_value=float(config.max_value),
            use_norm=config.expression_norm,
        )
        self.transformer_encoder = _Encoder(
            (
                _Block(d, config.n_heads, config.ffn_size, config.norm_eps, config.transformer_activation)
                for _ in range(config.n_layers)
            ),
            d,
            config.norm_eps,
        )

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.transformer_encoder.norm

    def forward(self, batch: TokenBatch, tap: Tap) -> None:
        layout = batch.attention_layout()
        h = self.gene_encoder(batch.genes) + self.expression_encoder(batch.values.to(torch.float32))
        tap(0, h)
        for i, layer in enumerate(self.transformer_encoder.layers, start=1):
            h = layer(h, layout)
            tap(i, h)
        del h


class OfficialPooling:
    """The published cell embedding at any layer: ``L2-normalise(final_norm(h[:, 0]))``.

    At the last layer this is ``predict_embeddings.py``'s ``cell_emb`` (CLS of the final-norm output)
    divided by its norm. LayerNorm works per token, so norming the CLS token alone is exact.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        self.norm = norm
        self.width = int(norm.normalized_shape[0])

    def __call__(
        self,
        hidden: torch.Tensor,
        lengths: torch.Tensor,
        out: torch.Tensor,
        overflow: torch.Tensor | None,
        backend: str | None,
        *,
        starts: torch.Tensor | None = None,
    ) -> None:
        n = self.norm
        first = hidden[:, 0, :] if starts is None else hidden[starts]
        cls = F.layer_norm(first.float(), n.normalized_shape, n.weight.float(), n.bias.float(), n.eps)
        ones = torch.ones(cls.shape[0], dtype=lengths.dtype, device=cls.device)
        ovf = torch.zeros(1, dtype=torch.int64, device=cls.device)
        spec = PoolSpec(("first_l2",))
        pool_cast(cls.unsqueeze(1), None, ones, spec, out.dtype, out.unsqueeze(0), ovf, backend=backend)
        if overflow is not None:
            overflow += ovf.sum()


# ------------------------------------------------------------------------------------------------
# checkpoints


def _read_vocab(path: Path) -> tuple[dict[str, int], list[str]]:
    """``vocab.json`` with ``<pad>``, ``<cls>``, ``<eoc>`` appended when missing, as the official scripts do."""
    return read_vocab_json(path, "Tahoe-X1 vocabulary", SPECIAL_TOKENS)


def _read_config(path: Path, what: str) -> dict[str, Any]:
    cfg = read_yaml(path, what)
    if not isinstance(cfg, dict):
        msg = f"Tahoe-X1 {path} must be a YAML mapping"
        raise CheckpointError(msg)
    return cfg


def _match_preset(model_cfg: Mapping[str, Any], config: TahoeX1Config) -> str | None:
    named = model_cfg.get(PRESET_FIELD)
    if isinstance(named, str) and named in PRESETS and PRESETS[named].architecture() == config.architecture():
        return named
    for name, p in PRESETS.items():
        if name != "tiny" and p.architecture() == config.architecture():
            return name
    return None


def _split_state(raw: Mapping[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip ``model.``; drop the heads and the drug encoder (returned by their file names)."""
    unprefixed = [k for k in raw if not k.startswith(KEY_PREFIX)]
    if unprefixed:
        msg = (
            f"Tahoe-X1 checkpoint {path} has keys without the '{KEY_PREFIX}' prefix of a ComposerTX state dict "
            f"({', '.join(unprefixed[:5])}{', ...' if len(unprefixed) > 5 else ''}); use the model.safetensors "
            "published with the model"
        )
        raise CheckpointError(msg)
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, tensor in raw.items():
        name = key[len(KEY_PREFIX) :]
        if name.startswith(IGNORED_PREFIXES):
            ignored.append(key)
        else:
            state[name] = tensor
    return state, sorted(ignored)


class TahoeX1Family:
    """The ``FAMILY`` object of Tahoe-X1 (see :class:`~cellstrata.engine.models.base.ModelFamily`)."""

    name = FAMILY_NAME
    presets: Mapping[str, TahoeX1Config] = PRESETS
    default_poolings: tuple[str, ...] = ("mean", "official")
    pool_ops: Mapping[str, str] = {"mean": "mean", "max": "max", "cls": "first"}

    def load(
        self,
        checkpoint: str | Path,
        *,
        device: torch.device | str = "cpu",
        max_length: int | None = None,
        seed: int = 0,
        stored_zeros: str = "keep",
        **unknown: Any,
    ) -> LoadedModel:
        """Load a published Tahoe-X1 folder (``model.safetensors``, the two YAML configs, ``vocab.json``).

        ``stored_zeros``: ``keep`` (official: explicit zeros of a sparse input are tokens in bin 1) or
        ``drop`` (only the non-zero entries).
        """
        refuse_unknown_options("tahoe-x1", unknown, ("max_length", "seed", "stored_zeros"))
        folder = checkpoint_folder(
            checkpoint, REQUIRED_FILES, model="Tahoe-X1", origin="as tahoebio/Tahoe-x1/<size>-model on Hugging Face"
        )
        model_cfg = _read_config(folder / MODEL_CONFIG_FILE, "Tahoe-X1 model config")
        collator_cfg = _read_config(folder / COLLATOR_CONFIG_FILE, "Tahoe-X1 collator config")
        vocab, appended = _read_vocab(folder / VOCAB_FILE)
        config = self._config(folder, model_cfg, collator_cfg, vocab)
        preset = _match_preset(model_cfg, config)
        if max_length is None:
            max_length = PRESETS[preset].max_length if preset else INFERENCE_MAX_LENGTH
        config = replace(config, max_length=int(max_length))
        pad_id = int(collator_cfg.get("pad_token_id", vocab[PAD_TOKEN]))
        if not 0 <= pad_id < len(vocab):
            msg = (
                f"Tahoe-X1 {COLLATOR_CONFIG_FILE}: pad_token_id {pad_id} is outside the vocabulary "
                f"(0..{len(vocab) - 1})"
            )
            raise CheckpointError(msg)

        model = TahoeX1Model(config, pad_id)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        state, ignored = _split_state(load_state_dict(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
        check_state_dict(
            state,
            expected,
            what=f"Tahoe-X1 checkpoint {folder / WEIGHTS_FILE} (keys without the '{KEY_PREFIX}' prefix)",
            hint=(
                f"Check that the four files come from the same model folder; the weights must be a ComposerTX "
                f"state dict (every key prefixed '{KEY_PREFIX}')."
            ),
        )
        model.load_state_dict(state, strict=True)
        del state
        model.requires_grad_(False)
        model.eval()
        model.to(device)

        tokenizer = TahoeX1Tokenizer(
            vocab,
            max_length=config.max_length,
            seed=seed,
            num_bins=config.num_bins,
            keep_first_n_tokens=config.keep_first_n_tokens,
            pad_token_id=pad_id,
            pad_value=config.pad_value,
            stored_zeros=stored_zeros,
        )
        files = describe_files(folder, list(REQUIRED_FILES))
        cfg_out = {k: v for k, v in model_cfg.items() if k != "chemical_encoder"}
        cfg_out.update(
            {
                "preset": preset,
                "vocab_size": len(vocab),
                "max_length": config.max_length,
                "keep_first_n_tokens": config.keep_first_n_tokens,
                "num_bins": config.num_bins,
                "chem_token": False,
            }
        )
        return LoadedModel(
            family=FAMILY_NAME,
            preset=preset,
            model=model,
            tokenizer=tokenizer,
            config=cfg_out,
            layout=SpecialLayout(n_leading=1, n_trailing=0, has_cls=True),
            pool_ops=dict(self.pool_ops),
            default_poolings=self.default_poolings,
            checkpoint={
                "path": str(folder.resolve()),
                "sha256": files[WEIGHTS_FILE]["sha256"],
                "files": files,
                "ignored_keys": ignored,
                "appended_special_tokens": appended,
                "chem_token_disabled": bool(collator_cfg.get("use_chem_token", False)),
            },
            custom_poolings={"official": OfficialPooling(model.final_norm)},
            official_layer=config.n_layers,
        )

    @staticmethod
    def _config(
        folder: Path, model_cfg: Mapping[str, Any], collator_cfg: Mapping[str, Any], vocab: Mapping[str, int]
    ) -> TahoeX1Config:
        try:
            config = TahoeX1Config.from_configs(model_cfg, collator_cfg, vocab_size=len(vocab))
        except ConfigError as exc:
            raise CheckpointError(f"{folder / MODEL_CONFIG_FILE}: {exc}") from None
        declared = model_cfg.get("vocab_size")
        if declared is not None and int(declared) != len(vocab):
            msg = (
                f"Tahoe-X1 {MODEL_CONFIG_FILE} says vocab_size {declared} but {VOCAB_FILE} holds {len(vocab)} "
                "tokens (special tokens included); check that both files come from the same model folder"
            )
            raise CheckpointError(msg)
        return config

    def init_checkpoint(
        self,
        preset: str,
        out: str | Path,
        *,
        seed: int = 0,
        genes: Sequence[str] | None = None,
    ) -> Path:
        """Write a random-weight Tahoe-X1 folder for ``preset`` in the published file layout."""
        if preset not in PRESETS:
            msg = f"unknown tahoe-x1 preset {preset!r}; known presets: {', '.join(PRESETS)}"
            raise ConfigError(msg)
        config = PRESETS[preset]
        n_specials = len(SPECIAL_TOKENS)
        gene_list = list(genes) if genes is not None else gene_ensembl_ids(config.vocab_size - n_specials)
        if len(set(gene_list)) != len(gene_list) or any(_is_special(str(g)) for g in gene_list):
            msg = "genes must be unique and must not start with '<' (reserved for special tokens)"
            raise ConfigError(msg)
        config = replace(config, vocab_size=len(gene_list) + n_specials)
        folder = Path(out).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        vocab = {str(g): i for i, g in enumerate(gene_list)}
        for tok in SPECIAL_TOKENS:
            vocab[tok] = len(vocab)
        (folder / VOCAB_FILE).write_text(json.dumps(vocab, indent=2), encoding="utf-8")
        model_cfg, collator_cfg = config.to_configs()
        model_cfg[PRESET_FIELD] = preset
        model_cfg["random_init_seed"] = int(seed)
        collator_cfg["pad_token_id"] = vocab[PAD_TOKEN]
        import yaml

        (folder / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(model_cfg, sort_keys=False), encoding="utf-8")
        (folder / COLLATOR_CONFIG_FILE).write_text(yaml.safe_dump(collator_cfg, sort_keys=False), encoding="utf-8")
        save_safetensors(random_state_dict(config, seed=seed, pad_id=vocab[PAD_TOKEN]), folder / WEIGHTS_FILE)
        return folder


def random_state_dict(config: TahoeX1Config, *, seed: int = 0, pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Seeded random weights with the official key set (``model.`` prefix, heads included).

    Linear weights ~ N(0, 1/fan_in), biases and LayerNorm biases ~ N(0, 0.05), LayerNorm weights ~
    1 + N(0, 0.1), embeddings ~ N(0, 0.1) (the padding row zero, as ``nn.Embedding(padding_idx=...)``).
    """
    gen = torch.Generator().manual_seed(int(seed))
    state: dict[str, torch.Tensor] = {}
    for key, shape in official_key_shapes(config).items():
        last = key.rsplit(".", 1)[-1]
        is_norm = len(shape) == 1 and ("norm" in key.rsplit(".", 2)[-2])
        if is_norm and last == "weight":
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif last == "bias":
            t = 0.05 * torch.randn(shape, generator=gen)
        elif key.endswith(("embedding.weight", "flag_encoder.weight")):
            t = 0.1 * torch.randn(shape, generator=gen)
            if pad_id is not None and key.endswith("gene_encoder.embedding.weight"):
                t[pad_id] = 0.0
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        state[key] = t.contiguous()
    return state


FAMILY = TahoeX1Family()

__all__ = [
    "FAMILY",
    "PRESETS",
    "SPECIAL_TOKENS",
    "OfficialPooling",
    "TahoeX1Config",
    "TahoeX1Family",
    "TahoeX1Model",
    "TahoeX1Tokenizer",
    "bin_values",
    "official_key_shapes",
    "quantile_edges",
    "random_state_dict",
]
