"""scGPT (Cui et al. 2024): tokenizer, per-layer model and checkpoint reader/writer.

Reproduces the official embedding path of ``scgpt==0.2.4``
(``tasks/cell_emb.embed_data`` -> ``get_batch_cell_embeddings`` -> ``DataCollator(do_binning=True,
do_mlm=False, keep_first_n_tokens=1, sampling=True)`` -> ``preprocess.binning(n_bins=51)`` ->
``TransformerModel._encode``), with one deliberate difference: every random draw (the tie-break of
``_digitize(side="both")`` and the random subset of over-long cells) is a counter-based draw
(:mod:`.counter_rng`) keyed by (seed, stream, cell index, position in the cell's expressed genes), so a
cell's tokens do not depend on its batch, block or order. :meth:`ScGPTTokenizer.tokenize` works on the
whole block at once; :meth:`ScGPTTokenizer.tokenize_reference` restates the per-cell rule with the same
draws (tests and ``benchmarks/tokenizing.py`` compare the two).

Checkpoint folder (as released): ``best_model.pt`` (a plain state dict, flash-attn ``Wqkv`` layout or
torch ``in_proj_`` layout), ``args.json`` (model settings) and ``vocab.json`` (token -> id).

Stored zeros: ``get_batch_cell_embeddings`` densifies ``adata.X`` (``toarray()``, which also sums
duplicate entries) and keeps ``np.nonzero(row)`` of each row, so an explicit zero stored in a sparse
matrix is no token and takes no part in the binning (``tokenize_and_pad_batch`` with its default
``include_zero_gene=False`` uses the same ``np.nonzero`` rule). cellstrata drops stored zeros too, on
in-memory and on-disk (h5ad, zarr) matrices alike; a cell storing only zeros is empty (NaN).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..datasets import gene_symbols
from ..errors import CheckpointError, ConfigError, GeneOverlapError, InvalidValuesError
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
    checkpoint_folder,
    load_state_dict,
    read_json,
    read_vocab_json,
    refuse_unknown_options,
    sha256_file,
)
from .counter_rng import RNG_NAME, bits_at, cell_keys, random_order, random_subset, to_uniform, uniform
from .layers import ContinuousValueEncoder, GeneEncoder, TorchEncoderLayer

if TYPE_CHECKING:
    from ..sources import CellBlock

FAMILY_NAME = "scgpt"
PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)
WEIGHTS_FILE = "best_model.pt"
ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
REQUIRED_FILES = (WEIGHTS_FILE, ARGS_FILE, VOCAB_FILE)
OFFICIAL_N_BINS = 51  # DataCollator hard-codes binning(n_bins=51), whatever args.json says
OFFICIAL_MAX_LENGTH = 1200  # embed_data's default
TOKENIZER_VERSION = "scgpt-binning-2"  # 2: counter-based draws (were numpy default_rng per cell)
TIE_STREAM = 0  # counter_rng stream of the binning tie-break
SUBSET_STREAM = 1  # counter_rng stream of the random subset kept from an over-long cell
# args.json key written by init_checkpoint so a random checkpoint is recognised as its preset
PRESET_ARG = "cellstrata_preset"


# ------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ScGPTConfig:
    """Architecture and tokenization settings (official ``args.json`` names in :meth:`to_args`)."""

    embsize: int
    nheads: int
    d_hid: int
    nlayers: int
    vocab_size: int
    n_layers_cls: int = 3
    n_bins: int = OFFICIAL_N_BINS
    dropout: float = 0.2
    pad_token: str = PAD_TOKEN
    pad_value: float = -2
    mask_value: float = -1
    max_length: int = OFFICIAL_MAX_LENGTH
    input_style: str = "binned"
    input_emb_style: str = "continuous"
    mvc: bool = True
    explicit_zero_prob: bool = False
    pre_norm: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("embsize", "nheads", "d_hid", "nlayers", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                msg = f"scGPT config: {name} must be > 0, got {getattr(self, name)!r}"
                raise ConfigError(msg)
        if self.embsize % self.nheads:
            msg = f"scGPT config: embsize {self.embsize} is not divisible by nheads {self.nheads}"
            raise ConfigError(msg)

    @property
    def head_dim(self) -> int:
        return self.embsize // self.nheads

    @classmethod
    def from_args(cls, args: Mapping[str, Any], vocab_size: int) -> ScGPTConfig:
        """Build from an official ``args.json`` dict; ``CheckpointError`` names missing fields."""
        required = ("embsize", "nheads", "d_hid", "nlayers")
        missing = [k for k in required if k not in args]
        if missing:
            msg = (
                f"scGPT {ARGS_FILE} lacks the field(s) {', '.join(missing)}; it must give "
                f"{', '.join(required)} (the model size)"
            )
            raise CheckpointError(msg)
        try:
            return cls(
                embsize=int(args["embsize"]),
                nheads=int(args["nheads"]),
                d_hid=int(args["d_hid"]),
                nlayers=int(args["nlayers"]),
                vocab_size=int(vocab_size),
                n_layers_cls=int(args.get("n_layers_cls", 3)),
                n_bins=int(args.get("n_bins", OFFICIAL_N_BINS)),
                dropout=float(args.get("dropout", 0.2)),
                pad_token=str(args.get("pad_token", PAD_TOKEN)),
                pad_value=float(args.get("pad_value", -2)),
                mask_value=float(args.get("mask_value", -1)),
                input_style=str(args.get("input_style", "binned")),
                input_emb_style=str(args.get("input_emb_style", "continuous")),
                mvc=bool(args.get("MVC", True)),
                explicit_zero_prob=bool(args.get("explicit_zero_prob", False)),
                pre_norm=bool(args.get("pre_norm", False)),
            )
        except (TypeError, ValueError) as exc:
            msg = f"scGPT {ARGS_FILE} has an invalid value: {exc}"
            raise CheckpointError(msg) from None

    def to_args(self) -> dict[str, Any]:
        """The official ``args.json`` fields for this config."""
        return {
            "embsize": self.embsize,
            "nheads": self.nheads,
            "d_hid": self.d_hid,
            "nlayers": self.nlayers,
            "n_layers_cls": self.n_layers_cls,
            "n_bins": self.n_bins,
            "dropout": self.dropout,
            "pad_token": self.pad_token,
            "pad_value": _json_number(self.pad_value),
            "mask_value": _json_number(self.mask_value),
            "max_seq_len": self.max_length,
            "input_style": self.input_style,
            "input_emb_style": self.input_emb_style,
            "MVC": self.mvc,
            "explicit_zero_prob": self.explicit_zero_prob,
            "pre_norm": self.pre_norm,
            "fast_transformer": True,
        }

    def architecture(self) -> tuple[int, ...]:
        return (self.embsize, self.nheads, self.d_hid, self.nlayers, self.vocab_size)


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


PRESETS: dict[str, ScGPTConfig] = {
    # the released whole-human model (and its organ-specific siblings): 60697 tokens incl. specials
    "whole-human": ScGPTConfig(embsize=512, nheads=8, d_hid=512, nlayers=12, vocab_size=60697),
    # random test model over the synthetic genes of engine/datasets.gene_symbols; its context is 256 tokens
    # (<cls> + 255 genes; the released model's is 1,200): longer cells keep a seeded random subset
    "tiny": ScGPTConfig(
        embsize=64, nheads=4, d_hid=128, nlayers=4, vocab_size=2000 + len(SPECIAL_TOKENS), max_length=256
    ),
}


def official_key_shapes(config: ScGPTConfig, *, layout: str = "flash") -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of the official ``TransformerModel(..., do_mvc=config.mvc)``.

    ``layout="flash"`` gives the released file's ``self_attn.Wqkv.*`` names, ``"torch"`` gives
    ``self_attn.in_proj_*``. Heads (decoder, cls_decoder, mvc_decoder) are included.
    """
    if layout not in ("flash", "torch"):
        msg = f"layout must be 'flash' or 'torch', got {layout!r}"
        raise ValueError(msg)
    d, h, v = config.embsize, config.d_hid, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.embedding.weight": (v, d),
        "encoder.enc_norm.weight": (d,),
        "encoder.enc_norm.bias": (d,),
        "value_encoder.linear1.weight": (d, 1),
        "value_encoder.linear1.bias": (d,),
        "value_encoder.linear2.weight": (d, d),
        "value_encoder.linear2.bias": (d,),
        "value_encoder.norm.weight": (d,),
        "value_encoder.norm.bias": (d,),
    }
    qkv_w, qkv_b = ("Wqkv.weight", "Wqkv.bias") if layout == "flash" else ("in_proj_weight", "in_proj_bias")
    for i in range(config.nlayers):
        p = f"transformer_encoder.layers.{i}."
        shapes[p + "self_attn." + qkv_w] = (3 * d, d)
        shapes[p + "self_attn." + qkv_b] = (3 * d,)
        shapes[p + "self_attn.out_proj.weight"] = (d, d)
        shapes[p + "self_attn.out_proj.bias"] = (d,)
        shapes[p + "linear1.weight"] = (h, d)
        shapes[p + "linear1.bias"] = (h,)
        shapes[p + "linear2.weight"] = (d, h)
        shapes[p + "linear2.bias"] = (d,)
        for n in ("norm1", "norm2"):
            shapes[p + n + ".weight"] = (d,)
            shapes[p + n + ".bias"] = (d,)
    mlps = ["decoder.fc"] + (["decoder.zero_logit"] if config.explicit_zero_prob else [])
    for head in mlps:
        for j, (o, i_) in zip((0, 2, 4), ((d, d), (d, d), (1, d))):
            shapes[f"{head}.{j}.weight"] = (o, i_)
            shapes[f"{head}.{j}.bias"] = (o,)
    for j in range(config.n_layers_cls - 1):
        shapes[f"cls_decoder._decoder.{3 * j}.weight"] = (d, d)
        shapes[f"cls_decoder._decoder.{3 * j}.bias"] = (d,)
        shapes[f"cls_decoder._decoder.{3 * j + 2}.weight"] = (d,)
        shapes[f"cls_decoder._decoder.{3 * j + 2}.bias"] = (d,)
    shapes["cls_decoder.out_layer.weight"] = (1, d)
    shapes["cls_decoder.out_layer.bias"] = (1,)
    if config.mvc:
        shapes["mvc_decoder.gene2query.weight"] = (d, d)
        shapes["mvc_decoder.gene2query.bias"] = (d,)
        shapes["mvc_decoder.W.weight"] = (d, d)
        if config.explicit_zero_prob:
            shapes["mvc_decoder.W_zero_logit.weight"] = (d, d)
            shapes["mvc_decoder.W_zero_logit.bias"] = (d,)
    return shapes


# ------------------------------------------------------------------------------------------------
# vocabulary and tokenizer


def _vocab_sha256(vocab: Mapping[str, int]) -> str:
    ordered = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return hashlib.sha256(json.dumps(ordered, ensure_ascii=False).encode()).hexdigest()


def _float_order_key(x: np.ndarray) -> np.ndarray:
    """float32 -> uint32 whose unsigned order is the float order (finite values; -0 and +0 differ)."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32)
    if not np.signbit(f).any():  # the common case (counts): set the sign bit
        return u | np.uint32(0x80000000)
    return np.where(u >> np.uint32(31) != 0, ~u, u | np.uint32(0x80000000))


def _float_from_order_key(k: np.ndarray) -> np.ndarray:
    u = np.where(k >> np.uint32(31) != 0, k & np.uint32(0x7FFFFFFF), ~k).astype(np.uint32)
    return u.view(np.float32)


def _round_to_float32(x: np.ndarray, direction: float) -> np.ndarray:
    """Nearest float32 at or above (``direction=+inf``) / below (``-inf``) each float64 of ``x``."""
    f = x.astype(np.float32)
    back = f.astype(np.float64)
    step = np.nextafter(f, np.float32(direction))
    return np.where(back < x, step, f) if direction > 0 else np.where(back > x, step, f)


def _bin_edges_digits(
    values: np.ndarray, rows: np.ndarray, counts: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left/right ``np.digitize`` indices of every value against its own cell's quantile bins.

    ``values`` (float32, non-zero) are the expressed genes of all cells, cell by cell (``rows`` gives
    each value's cell, ascending; ``counts`` the number of values per cell). Per cell this equals
    ``bins = np.quantile(cell_values, np.linspace(0, 1, n_bins - 1))`` followed by
    ``np.digitize(x, bins)`` and ``np.digitize(x, bins, right=True)``, bit for bit (numpy's 'linear'
    quantile: float32 differences, float64 interpolation), but vectorised over the block.
    """
    origin, left_sorted, right_sorted = _sorted_digits(values, rows, counts, n_bins)
    left = np.empty(len(values), dtype=np.int64)
    right = np.empty(len(values), dtype=np.int64)
    left[origin] = left_sorted
    right[origin] = right_sorted
    return left, right


def _sorted_digits(
    values: np.ndarray, rows: np.ndarray, counts: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_bin_edges_digits` in sorted order: ``(origin, left, right)``.

    Every cell's values sorted ascending, cells kept in order: ``origin[j]`` is the flat index of the
    ``j``-th sorted value (so ``rows`` is also the cell of each sorted value), ``left[j]``/``right[j]``
    its two ``np.digitize`` indices.
    """
    n_edges = n_bins - 1
    n = len(values)
    nonempty = np.flatnonzero(counts)
    nc = counts[nonempty].astype(np.int64)
    starts_all = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    # Sort every cell's values: key (cell, value) and, when it fits, the value's flat index in the low
    # bits, so one uint64 sort also tells where each sorted value came from.
    index_bits = int(max(n - 1, 1)).bit_length()
    shift = np.uint64(index_bits)
    if int(len(counts) - 1).bit_length() + 32 + index_bits <= 64:
        hay = rows.astype(np.uint64)
        hay <<= np.uint64(32)
        hay |= _float_order_key(values)
        hay <<= shift
        hay |= np.arange(n, dtype=np.uint64)
        hay.sort()
        origin = (hay & np.uint64((1 << index_bits) - 1)).astype(np.int64)
    else:
        shift = np.uint64(0)
        vkeys = (rows.astype(np.uint64) << np.uint64(32)) | _float_order_key(values).astype(np.uint64)
        origin = np.argsort(vkeys, kind="stable")
        hay = vkeys[origin]

    q = np.linspace(0.0, 1.0, n_edges)
    virtual = (nc - 1)[:, None] * q[None, :]
    prev = np.floor(virtual)
    gamma = virtual - prev
    prev_i = prev.astype(np.int64)
    next_i = prev_i + 1
    above = virtual >= (nc - 1)[:, None]
    last = np.broadcast_to((nc - 1)[:, None], virtual.shape)
    prev_i[above] = last[above]
    next_i[above] = last[above]
    starts = starts_all[nonempty][:, None]

    mask32 = np.uint64(0xFFFFFFFF)
    a = _float_from_order_key(((hay[starts + prev_i] >> shift) & mask32).astype(np.uint32))
    b = _float_from_order_key(((hay[starts + next_i] >> shift) & mask32).astype(np.uint32))
    diff = b - a  # float32, as numpy's _lerp on a float32 array
    edges = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)  # float64

    # x >= edge  <=>  x >= ceil32(edge);  x > edge  <=>  x > floor32(edge)   (x is float32)
    row_key = (nonempty.astype(np.uint64) << np.uint64(32))[:, None]
    up = (row_key | _float_order_key(_round_to_float32(edges, np.inf)).astype(np.uint64)).ravel()
    down = (row_key | _float_order_key(_round_to_float32(edges, -np.inf)).astype(np.uint64)).ravel()
    low = (np.uint64(1) << shift) - np.uint64(1)
    # Place each edge among the sorted values; the values at or after an edge's place are >= (up)
    # or > (down) it, so the number of edges placed at or before a sorted value is np.digitize of it
    # plus the edges of earlier cells (all placed before this cell's values, later cells' after).
    up_at = np.searchsorted(hay, up << shift, side="left")
    down_at = np.searchsorted(hay, (down << shift) | low, side="right")
    del hay
    placed = np.arange(len(up) + 1, dtype=np.int64)
    base = np.repeat(np.cumsum(counts > 0) - 1, counts) * n_edges  # the sorted values keep the cell order
    left = np.repeat(placed, np.diff(up_at, prepend=0, append=n))
    left -= base
    right = np.repeat(placed, np.diff(down_at, prepend=0, append=n))
    right -= base
    return origin, left, right


class ScGPTTokenizer:
    """Official scGPT input preparation (see the module docstring), seeded per cell.

    Per cell: the expressed (non-zero; stored zeros dropped) vocabulary genes in column order, each
    value binned against quantiles of the cell's own expressed values (``n_bins - 1`` edges, random
    tie-break), ``<cls>`` first with value ``pad_value``; cells longer than ``max_length`` keep ``<cls>``
    plus a random subset in random order.
    """

    truncation_rule = RANDOM_SUBSAMPLE

    def __init__(
        self,
        vocab: Mapping[str, int],
        *,
        max_length: int = OFFICIAL_MAX_LENGTH,
        seed: int = 0,
        n_bins: int = OFFICIAL_N_BINS,
        pad_token: str = PAD_TOKEN,
        pad_value: float = -2,
    ) -> None:
        if int(max_length) < 2:
            msg = f"scGPT max_length must be >= 2 (<cls> plus at least one gene), got {max_length}"
            raise ConfigError(msg)
        if int(seed) < 0:
            msg = f"seed must be a non-negative integer, got {seed}"
            raise ConfigError(msg)
        if int(n_bins) < 2:
            msg = f"n_bins must be >= 2, got {n_bins}"
            raise ConfigError(msg)
        for tok in (pad_token, CLS_TOKEN):
            if tok not in vocab:
                msg = f"the scGPT vocabulary has no {tok!r} token"
                raise ConfigError(msg)
        self.vocab: dict[str, int] = dict(vocab)
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.n_bins = int(n_bins)
        self.pad_token = pad_token
        self.pad_id = int(vocab[pad_token])
        self.cls_id = int(vocab[CLS_TOKEN])
        self.pad_value = float(pad_value)
        self._specials = {t for t in (*SPECIAL_TOKENS, pad_token) if t in self.vocab}
        self.vocab_sha256 = _vocab_sha256(self.vocab)

    @property
    def n_vocab_genes(self) -> int:
        return len(self.vocab) - len(self._specials)

    def settings(self) -> dict[str, Any]:
        return {
            "family": FAMILY_NAME,
            "version": TOKENIZER_VERSION,
            "n_bins": self.n_bins,
            "max_length": self.max_length,
            "seed": self.seed,
            "rng": RNG_NAME,
            "over_length": "keep <cls> + random subset, random order",
            "pad_token": self.pad_token,
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
            (get(g, -1) if isinstance(g, str) and g not in self._specials else -1 for g in names),
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
        ex_vocab = [t for t, _ in by_id if t not in self._specials][:5]
        looks_ensembl = sum(str(g).upper().startswith("ENS") for g in names[:100]) > 50
        hint = " The input looks like Ensembl ids;" if looks_ensembl else ""
        return (
            f"no input gene is in the scGPT vocabulary: {mapping.report()}. Input genes look like: "
            f"{ex_in}; the vocabulary holds e.g.: {', '.join(ex_vocab)}.{hint} scGPT matches genes by "
            "gene symbol: pick the column of adata.var that holds symbols with --gene-column "
            "(Python: gene_column=...)."
        )

    def _expressed(
        self, X: sp.csr_matrix, indices: np.ndarray, mapping: GeneMapping
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every cell's expressed vocabulary genes, cell after cell: ``(genes, values, rows, counts, indices)``."""
        n_cells = X.shape[0]
        tok = mapping.token_ids[X.indices]
        data = np.asarray(X.data).astype(np.float32, copy=False)  # official: torch .float()
        keep = (tok >= 0) & (data != 0)  # np.nonzero of the dense row: stored zeros are no tokens
        selector, counts = kept_entries(X.indptr, keep)
        genes, values = (tok, data) if selector is None else (tok[selector], data[selector])
        rows = np.repeat(np.arange(n_cells, dtype=np.int64), counts)
        if not np.isfinite(values).all():
            bad = int(indices[rows[~np.isfinite(values)][0]])
            msg = f"the expression matrix holds NaN or infinite values (first in cell {bad})"
            raise InvalidValuesError(msg)
        return genes, values, rows, counts, indices

    def tokenize(self, block: CellBlock, mapping: GeneMapping) -> TokenizedBlock:
        """Token sequences of every cell, vectorised over the block (same tokens as :meth:`tokenize_reference`),
        in cache-sized pieces of rows (:func:`~.base.row_pieces`)."""
        X, indices = canonical_rows(block, mapping)
        return concat_blocks([self._tokenize_rows(Xp, ip, mapping) for Xp, ip in row_pieces(X, indices)])

    def _tokenize_rows(self, X: sp.csr_matrix, indices: np.ndarray, mapping: GeneMapping) -> TokenizedBlock:
        genes, values, rows, counts, indices = self._expressed(X, indices, mapping)
        n_keep = self.max_length - 1
        kept = random_subset(self.seed, SUBSET_STREAM, indices, counts, n_keep)  # flat indices, cell by cell
        n_kept = np.minimum(counts, n_keep)
        bins = np.zeros(len(kept), dtype=np.float32)
        if len(values):
            # digits of every value against its cell's edges, in sorted order (origin: each sorted
            # value's flat index); only the kept genes need their bin: _digitize(side="both") is
            # ceil(u * (right - left) + left), a random bin of the span of edges equal to the value
            # (``left`` where there is none), u drawn for the gene's position in its cell's expressed genes
            origin, left, right = _sorted_digits(values, rows, counts, self.n_bins)
            where = np.empty(len(values), dtype=np.int64)
            where[origin] = np.arange(len(values), dtype=np.int64)
            at = where[kept]
            position = kept - np.repeat(np.cumsum(counts) - counts, n_kept)
            u = to_uniform(bits_at(np.repeat(cell_keys(self.seed, TIE_STREAM, indices), n_kept), position))
            low = left[at]
            u *= right[at] - low
            u += low
            bins[:] = np.ceil(u)
        return leading_token_block(
            indices,
            self.cls_id,
            self.pad_value,
            genes[kept],
            bins,
            n_kept,
            truncated=counts > n_kept,
            empty=counts == 0,
            n_expressed=counts,
        )

    def tokenize_reference(self, block: CellBlock, mapping: GeneMapping) -> TokenizedBlock:
        """The official per-cell rule, one cell at a time, with the draws of :meth:`tokenize` (tests, benchmarks).

        Per cell: ``bins = np.quantile(x, np.linspace(0, 1, n_bins - 1))``, ``_digitize(side="both")``
        with ``u = uniform(seed, TIE_STREAM, cell, position)``, then ``<cls>`` + the first
        ``max_length - 1`` of ``random_order(seed, SUBSET_STREAM, ...)`` when the cell is longer.
        """
        X, indices = canonical_rows(block, mapping)
        genes_out: list[np.ndarray] = []
        values_out: list[np.ndarray] = []
        truncated = np.zeros(len(indices), dtype=bool)
        counts = np.zeros(len(indices), dtype=np.int64)
        n_keep = self.max_length - 1
        for i, cell in enumerate(indices.tolist()):
            sl = slice(int(X.indptr[i]), int(X.indptr[i + 1]))
            ids = mapping.token_ids[X.indices[sl]]
            x = np.asarray(X.data[sl]).astype(np.float32)
            nz = (ids >= 0) & (x != 0)
            g, x = ids[nz], x[nz]
            if not np.isfinite(x).all():
                msg = f"the expression matrix holds NaN or infinite values (first in cell {cell})"
                raise InvalidValuesError(msg)
            n = len(x)
            counts[i] = n
            digits = np.zeros(0, dtype=np.int64)
            if n:
                bins = np.quantile(x, np.linspace(0, 1, self.n_bins - 1))
                left, right = np.digitize(x, bins), np.digitize(x, bins, right=True)
                u = uniform(self.seed, TIE_STREAM, np.full(n, cell), np.arange(n))
                digits = np.ceil(u * (right - left) + left).astype(np.int64)
            if n > n_keep:
                sel = random_order(self.seed, SUBSET_STREAM, [cell], np.zeros(n, dtype=np.int64), [n])[:n_keep]
                g, digits = g[sel], digits[sel]
                truncated[i] = True
            genes_out.append(np.concatenate(([self.cls_id], g)).astype(np.int64))
            values_out.append(np.concatenate(([self.pad_value], digits)).astype(np.float32))
        return TokenizedBlock(
            indices=indices.copy(),
            genes=genes_out,
            values=values_out,
            truncated=truncated,
            empty=counts == 0,
            n_expressed=counts,
        )


# ------------------------------------------------------------------------------------------------
# model


class _Encoder(nn.Module):
    def __init__(self, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class ScGPTModel(nn.Module):
    """scGPT's embedding path; ``forward(batch, tap)`` taps layer 0 (embeddings) and each block 1..L."""

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        if config.input_emb_style != "continuous":
            msg = (
                f"scGPT input_emb_style {config.input_emb_style!r} is not supported; the released models "
                "(and embed_data) use 'continuous'"
            )
            raise CheckpointError(msg)
        d = config.embsize
        self.config = config
        self.n_layers = config.nlayers
        self.hidden_size = d
        self.encoder = GeneEncoder(config.vocab_size, d)
        self.value_encoder = ContinuousValueEncoder(d)
        self.transformer_encoder = _Encoder(
            TorchEncoderLayer(d, config.nheads, config.d_hid, config.layer_norm_eps, pre_norm=config.pre_norm)
            for _ in range(config.nlayers)
        )

    def forward(self, batch: TokenBatch, tap: Tap) -> None:
        layout = batch.attention_layout()
        h = self.encoder(batch.genes) + self.value_encoder(batch.values.to(torch.float32))
        tap(0, h)
        for i, layer in enumerate(self.transformer_encoder.layers, start=1):
            h = layer(h, layout)
            tap(i, h)
        del h


# ------------------------------------------------------------------------------------------------
# checkpoints


def _read_vocab(path: Path) -> tuple[dict[str, int], list[str]]:
    """``vocab.json`` with ``<pad>``, ``<cls>``, ``<eoc>`` appended when missing, as the official scripts do."""
    return read_vocab_json(path, "scGPT vocabulary", SPECIAL_TOKENS)


def _to_torch_layout(key: str) -> str:
    """Flash-attn names (PyPI ``self_attn.Wqkv``, GitHub HEAD ``self_attn._impl.*``) -> torch names."""
    key = key.replace("self_attn._impl.", "self_attn.")
    return key.replace("self_attn.Wqkv.", "self_attn.in_proj_")


def _match_preset(args: Mapping[str, Any], config: ScGPTConfig) -> str | None:
    named = args.get(PRESET_ARG)
    if isinstance(named, str) and named in PRESETS:
        p = PRESETS[named]
        if p.architecture()[:4] == config.architecture()[:4]:
            return named
    for name, p in PRESETS.items():
        if p.architecture() == config.architecture():
            return name
    return None


def _check_and_convert(
    raw: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], path: Path
) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """Map ``raw`` onto the model's keys; raise naming every missing/mis-shaped key."""
    converted: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    ours = ("encoder.", "value_encoder.", "transformer_encoder.")
    flash = any(".self_attn.Wqkv." in k or ".self_attn._impl." in k for k in raw)
    for key, tensor in raw.items():
        name = _to_torch_layout(key)
        if name in expected:
            converted[name] = tensor
        elif name.startswith(ours):
            unexpected.append(key)
        else:
            ignored.append(key)
    problems = []
    missing = [k for k in expected if k not in converted]
    if missing:
        problems.append("missing: " + ", ".join(missing))
    misshaped = [
        f"{k} {tuple(converted[k].shape)} (expected {tuple(shape)})"
        for k, shape in expected.items()
        if k in converted and converted[k].shape != shape
    ]
    if misshaped:
        problems.append("wrong shape: " + ", ".join(misshaped))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if problems:
        msg = (
            f"scGPT checkpoint {path} does not match the model described by {ARGS_FILE} and "
            f"{VOCAB_FILE} ({'; '.join(problems)}). Check that the three files come from the same "
            "model folder."
        )
        raise CheckpointError(msg)
    return converted, sorted(ignored), "flash" if flash else "torch"


class ScGPTFamily:
    """The ``FAMILY`` object of scGPT (see :class:`~cellstrata.engine.models.base.ModelFamily`)."""

    name = FAMILY_NAME
    presets: Mapping[str, ScGPTConfig] = PRESETS
    default_poolings: tuple[str, ...] = ("mean", "cls")
    pool_ops: Mapping[str, str] = {"mean": "mean", "max": "max", "cls": "first", "official": "first_l2"}

    def load(
        self,
        checkpoint: str | Path,
        *,
        device: torch.device | str = "cpu",
        max_length: int | None = None,
        seed: int = 0,
        **unknown: Any,
    ) -> LoadedModel:
        """Load an official scGPT folder (``best_model.pt``, ``args.json``, ``vocab.json``)."""
        refuse_unknown_options("scgpt", unknown, ("max_length", "seed"))
        folder = checkpoint_folder(
            checkpoint,
            REQUIRED_FILES,
            model="scGPT",
            origin=f"{WEIGHTS_FILE} weights, {ARGS_FILE} settings, {VOCAB_FILE} gene vocabulary, as released",
        )
        args = read_json(folder / ARGS_FILE, "scGPT settings")
        if not isinstance(args, dict):
            msg = f"scGPT {folder / ARGS_FILE} must be a JSON object"
            raise CheckpointError(msg)
        vocab, appended = _read_vocab(folder / VOCAB_FILE)
        try:
            config = ScGPTConfig.from_args(args, vocab_size=len(vocab))
        except ConfigError as exc:
            raise CheckpointError(f"{folder / ARGS_FILE}: {exc}") from None
        preset = _match_preset(args, config)
        if max_length is None:
            max_length = PRESETS[preset].max_length if preset else OFFICIAL_MAX_LENGTH
        config = replace(config, max_length=int(max_length))
        if config.pad_token not in vocab:
            msg = f"scGPT pad_token {config.pad_token!r} of {ARGS_FILE} is not in {VOCAB_FILE}"
            raise CheckpointError(msg)

        model = ScGPTModel(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        raw = load_state_dict(folder / WEIGHTS_FILE)
        state, ignored, layout = _check_and_convert(raw, expected, folder / WEIGHTS_FILE)
        model.load_state_dict(state, strict=True)
        del raw, state
        model.requires_grad_(False)
        model.eval()
        model.to(device)

        tokenizer = ScGPTTokenizer(
            vocab,
            max_length=config.max_length,
            seed=seed,
            n_bins=OFFICIAL_N_BINS,
            pad_token=config.pad_token,
            pad_value=config.pad_value,
        )
        files = {}
        for f in REQUIRED_FILES:
            p = folder / f
            files[f] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        cfg_out = dict(args)
        cfg_out.update({"preset": preset, "vocab_size": len(vocab), "max_length": config.max_length})
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
                "weights_layout": layout,
                "ignored_keys": ignored,
                "appended_special_tokens": appended,
            },
            official_layer=config.nlayers,
        )

    def init_checkpoint(
        self,
        preset: str,
        out: str | Path,
        *,
        seed: int = 0,
        genes: Sequence[str] | None = None,
    ) -> Path:
        """Write a random-weight scGPT folder for ``preset`` in the released file format."""
        if preset not in PRESETS:
            msg = f"unknown scgpt preset {preset!r}; known presets: {', '.join(PRESETS)}"
            raise ConfigError(msg)
        config = PRESETS[preset]
        n_specials = len(SPECIAL_TOKENS)
        gene_list = list(genes) if genes is not None else gene_symbols(config.vocab_size - n_specials)
        if len(set(gene_list)) != len(gene_list) or set(gene_list) & set(SPECIAL_TOKENS):
            msg = "genes must be unique and must not contain the special tokens <pad>, <cls>, <eoc>"
            raise ConfigError(msg)
        config = replace(config, vocab_size=len(gene_list) + n_specials)
        folder = Path(out).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        vocab = {g: i for i, g in enumerate(gene_list)}
        for tok in SPECIAL_TOKENS:
            vocab[tok] = len(vocab)
        (folder / VOCAB_FILE).write_text(json.dumps(vocab, indent=2), encoding="utf-8")
        args = config.to_args()
        args[PRESET_ARG] = preset
        args["random_init_seed"] = int(seed)
        (folder / ARGS_FILE).write_text(json.dumps(args, indent=2), encoding="utf-8")
        torch.save(random_state_dict(config, seed=seed, layout="flash"), folder / WEIGHTS_FILE)
        return folder


def random_state_dict(config: ScGPTConfig, *, seed: int = 0, layout: str = "flash") -> dict[str, torch.Tensor]:
    """Seeded random weights with the official key set (heads included) and non-trivial activations."""
    gen = torch.Generator().manual_seed(int(seed))
    state: dict[str, torch.Tensor] = {}
    for key, shape in official_key_shapes(config, layout=layout).items():
        last = key.rsplit(".", 1)[-1]
        in_norm = ".norm" in key or "enc_norm" in key or key.startswith("cls_decoder._decoder")
        is_norm = len(shape) == 1 and in_norm
        if is_norm and last == "weight":
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif is_norm or last.endswith("bias"):
            t = 0.05 * torch.randn(shape, generator=gen)
        elif key == "encoder.embedding.weight":
            t = 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        state[key] = t.contiguous()
    return state


FAMILY = ScGPTFamily()

__all__ = [
    "FAMILY",
    "PRESETS",
    "SPECIAL_TOKENS",
    "ScGPTConfig",
    "ScGPTFamily",
    "ScGPTModel",
    "ScGPTTokenizer",
    "official_key_shapes",
    "random_state_dict",
]
