"""scFoundation (xTrimoGene, Hao et al. 2024): tokenizer, per-layer encoder and checkpoint reader/writer.

Reproduces the official single-cell cell-embedding path of ``biomap-research/scFoundation``
(``model/get_embedding.py`` with ``--input_type singlecell --output_type cell``: ``main_gene_selection``
-> per-cell normalisation and the T/S resolution tokens -> ``load.gatherData`` -> ``token_emb`` +
``pos_emb`` -> ``pytorchTransformerModule``), batched with a key-padding mask instead of one cell at a
time. Only the encoder is built; the MAE decoder's keys are read, checked for presence and ignored.

Checkpoint folder: ``models.ckpt`` as released (a torch pickle holding the three weight sets ``cell``,
``rde`` and ``gene``, each ``{'config': {...}, 'state_dict': {'model.<key>': tensor}}``; read with
``weights_only=True``) and the gene list ``OS_scRNA_gene_index.19264.tsv`` (columns ``gene_name``,
``index``) copied beside it from the official repository.

Departures from the official script (each documented where it is implemented):

- genes are always matched by symbol (the script only reorders inputs with fewer than 19264 columns);
  a symbol repeated in the input is read from its first column only;
- the T and S tokens are always kept; ``gatherData`` drops any token whose value is <= 0, which for
  T/S only happens in degenerate cells (a total count <= 1, or a ``tgthighres`` that makes T <= 0), and
  would shift the official S/T pooling onto a gene token;
- ``max_length`` (off by default, as the official code never truncates) keeps a random subset of a
  cell's genes drawn from :mod:`.counter_rng` (keyed by seed, cell index and position, so a cell's subset
  does not depend on its block).

Stored zeros: the script densifies the input (``adata.X.toarray()`` into a DataFrame, which also sums
duplicate entries) and ``gatherData`` keeps the positions whose value is > 0, so an explicit zero stored
in a sparse matrix is no token and adds nothing to the total count. cellstrata drops stored zeros too
(``value > 0`` after normalisation), on in-memory and on-disk (h5ad, zarr) matrices alike; a cell storing
only zeros is empty (NaN).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ... import kernels
from ..datasets import gene_symbols
from ..errors import CheckpointError, ConfigError, GeneOverlapError, InvalidValuesError
from .base import (
    NO_TRUNCATION,
    RANDOM_SUBSAMPLE,
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
from .checkpoints import check_state_dict, describe_files, load_torch_weights, refuse_unknown_options
from .counter_rng import RNG_NAME, random_bits, random_order
from .layers import TorchEncoderLayer

if TYPE_CHECKING:
    from ..sources import CellBlock

FAMILY_NAME = "scfoundation"
WEIGHTS_FILE = "models.ckpt"
GENE_LIST_FILE = "OS_scRNA_gene_index.19264.tsv"
OFFICIAL_REPO = "https://github.com/biomap-research/scFoundation"
# get_embedding.py --version -> entry of models.ckpt (output_type cell)
VERSIONS: dict[str, str] = {"ce": "cell", "rde": "rde"}
ENTRIES = ("cell", "rde", "gene")
PRE_NORMALIZED = ("F", "T", "A")
DEFAULT_TGTHIGHRES = "t4"
TOKENIZER_VERSION = "scfoundation-gather-2"  # 2: the subset kept over max_length from counter_rng draws
STATE_PREFIX = "model."
# keys of the MAE decoder side (read and ignored: cell embeddings use the encoder only)
DECODER_PREFIXES = ("decoder.", "decoder_embed.", "norm.", "to_final.")
# config key written by init_checkpoint so a random checkpoint is recognised as its preset
PRESET_KEY = "cellstrata_preset"
# counter_rng stream of the subset kept over max_length
SUBSET_STREAM = 0
# a T-mode input whose values exceed this is not log1p-normalised (log1p(1e13) ~ 30)
MAX_LOG1P_VALUE = 30.0


# ------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ScFoundationConfig:
    """Architecture of ``MaeAutobin`` (official flattened config names in :meth:`to_nested`).

    The encoder is ``pytorchTransformerModule``: ``select_module`` passes it only ``hidden_dim``,
    ``depth`` and ``heads``, so its FFN is always ``4 * hidden_dim`` (ReLU, post-norm, eps 1e-5) and
    ``dim_head``/``norm_first`` of the config do not change it. ``seq_len`` = genes + T + S.
    """

    hidden_dim: int
    depth: int
    heads: int
    seq_len: int
    dim_head: int = 64
    bin_num: int = 100
    bin_alpha: float = 1.0
    pad_token_id: int = 103
    mask_token_id: int = 102
    n_class: int = 104
    decoder_hidden_dim: int = 512
    decoder_depth: int = 6
    decoder_heads: int = 8
    decoder_dim_head: int = 64
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "depth", "heads", "bin_num", "decoder_hidden_dim", "decoder_heads"):
            if int(getattr(self, name)) <= 0:
                msg = f"scFoundation config: {name} must be > 0, got {getattr(self, name)!r}"
                raise ConfigError(msg)
        if self.decoder_depth < 0 or self.decoder_dim_head <= 0:
            msg = "scFoundation config: decoder depth must be >= 0 and dim_head > 0"
            raise ConfigError(msg)
        if self.seq_len < 3:
            msg = f"scFoundation config: seq_len must be >= 3 (genes + T + S), got {self.seq_len}"
            raise ConfigError(msg)
        if self.hidden_dim % self.heads:
            msg = f"scFoundation config: hidden_dim {self.hidden_dim} is not divisible by heads {self.heads}"
            raise ConfigError(msg)

    @property
    def n_genes(self) -> int:
        return self.seq_len - 2

    @property
    def ffn_dim(self) -> int:
        return 4 * self.hidden_dim  # pytorchTransformerModule(ff_mult=4)

    @property
    def pos_rows(self) -> int:
        return self.seq_len + 1  # nn.Embedding(max_seq_len + 1, dim)

    @property
    def nb_features(self) -> int:
        """Performer random features per decoder head (``FastAttention``: int(d * ln d))."""
        return int(self.decoder_dim_head * math.log(self.decoder_dim_head))

    @classmethod
    def from_flat(cls, config: Mapping[str, Any]) -> ScFoundationConfig:
        """Build from the config ``convertconfig`` flattens; ``CheckpointError`` names what is missing."""
        problems = []
        if config.get("model", "mae_autobin") != "mae_autobin":
            problems.append(f"model is {config.get('model')!r}, only 'mae_autobin' is released")
        enc, dec = config.get("encoder"), config.get("decoder")
        if not isinstance(enc, Mapping) or not isinstance(dec, Mapping):
            msg = "scFoundation config lacks the 'encoder'/'decoder' sections of model_config.mae_autobin"
            raise CheckpointError(msg)
        if enc.get("module_type", "transformer") != "transformer":
            problems.append(f"encoder module_type is {enc.get('module_type')!r}, cellstrata builds 'transformer'")
        required = {
            "encoder.hidden_dim": enc.get("hidden_dim"),
            "encoder.depth": enc.get("depth"),
            "encoder.heads": enc.get("heads"),
            "decoder.hidden_dim": dec.get("hidden_dim"),
            "decoder.depth": dec.get("depth"),
            "decoder.heads": dec.get("heads"),
            "seq_len": config.get("seq_len"),
            "bin_num": config.get("bin_num"),
            "bin_alpha": config.get("bin_alpha"),
            "pad_token_id": config.get("pad_token_id"),
            "mask_token_id": config.get("mask_token_id"),
        }
        missing = [k for k, v in required.items() if v is None]
        if missing:
            problems.append("missing field(s) " + ", ".join(missing))
        if problems:
            msg = f"scFoundation checkpoint config cannot be used: {'; '.join(problems)}"
            raise CheckpointError(msg)
        try:
            return cls(
                hidden_dim=int(enc["hidden_dim"]),
                depth=int(enc["depth"]),
                heads=int(enc["heads"]),
                seq_len=int(config["seq_len"]),
                dim_head=int(enc.get("dim_head", 64)),
                bin_num=int(config["bin_num"]),
                bin_alpha=float(config["bin_alpha"]),
                pad_token_id=int(config["pad_token_id"]),
                mask_token_id=int(config["mask_token_id"]),
                n_class=int(config.get("n_class", 104)),
                decoder_hidden_dim=int(dec["hidden_dim"]),
                decoder_depth=int(dec["depth"]),
                decoder_heads=int(dec["heads"]),
                decoder_dim_head=int(dec.get("dim_head", 64)),
            )
        except (TypeError, ValueError, ConfigError) as exc:
            msg = f"scFoundation checkpoint config has an invalid value: {exc}"
            raise CheckpointError(msg) from None

    def to_nested(self) -> dict[str, Any]:
        """The official per-entry ``config`` (``model``/``model_config``/``dataset_config``)."""
        model = {
            "model": "mae_autobin",
            "encoder": {
                "hidden_dim": self.hidden_dim,
                "depth": self.depth,
                "heads": self.heads,
                "dim_head": self.dim_head,
                "module_type": "transformer",
                "seq_len": self.seq_len,
                "norm_first": False,
            },
            "decoder": {
                "hidden_dim": self.decoder_hidden_dim,
                "depth": self.decoder_depth,
                "heads": self.decoder_heads,
                "dim_head": self.decoder_dim_head,
                "module_type": "performer",
                "seq_len": self.seq_len,
                "norm_first": False,
            },
            "n_class": self.n_class,
            "pad_token_id": self.pad_token_id,
            "mask_token_id": self.mask_token_id,
            "bin_num": self.bin_num,
            "bin_alpha": self.bin_alpha,
            "mask_gene_name": False,
        }
        dataset = {
            "seq_len": self.seq_len,
            "gene_num": self.seq_len,
            "mae_encoder_max_seq_len": 15000,
            "bin_num": self.bin_num,
            "bin_type": "auto_bin",
            "value_mask_prob": 0.3,
            "zero_mask_prob": 0.03,
            "replace_prob": 0.8,
            "random_token_prob": 0.1,
            "mask_ignore_token_ids": [0],
            "decoder_add_zero": True,
            "train_data_path": None,
        }
        return {"model": "mae_autobin", "model_config": {"mae_autobin": model}, "dataset_config": {"rnaseq": dataset}}

    def architecture(self) -> tuple[int, ...]:
        return (self.hidden_dim, self.depth, self.heads, self.seq_len, self.bin_num)


def flatten_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``load.convertconfig``: ``model_config[model]`` then ``dataset_config['rnaseq']`` in one dict."""
    if not isinstance(config, Mapping):
        msg = "scFoundation checkpoint entry's config must be a dict"
        raise CheckpointError(msg)
    model = config.get("model")
    sections = config.get("model_config")
    data = config.get("dataset_config")
    if not isinstance(sections, Mapping) or model not in sections or not isinstance(sections[model], Mapping):
        msg = f"scFoundation checkpoint config has no model_config[{model!r}] section"
        raise CheckpointError(msg)
    flat = dict(sections[model])
    rnaseq = data.get("rnaseq") if isinstance(data, Mapping) else None
    if isinstance(rnaseq, Mapping):
        flat.update(rnaseq)
    flat.setdefault("model", model)
    flat["model_type"] = model
    flat["pos_embed"] = False
    return flat


PRESETS: dict[str, ScFoundationConfig] = {
    # the released models.ckpt 'cell' (and 'rde', 'gene') weights: 19264 genes + T + S
    "100m": ScFoundationConfig(hidden_dim=768, depth=12, heads=12, seq_len=19266),
    # random test model over the synthetic genes of engine/datasets.gene_symbols (FFN 4 x 64, as official)
    "tiny": ScFoundationConfig(
        hidden_dim=64,
        depth=4,
        heads=4,
        seq_len=2000 + 2,
        dim_head=16,
        decoder_hidden_dim=32,
        decoder_depth=2,
        decoder_heads=2,
        decoder_dim_head=16,
    ),
}


def official_key_shapes(config: ScFoundationConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official ``MaeAutobin`` state dict (after ``convertconfig`` strips ``model.``).

    Encoder (``token_emb``, ``pos_emb``, ``encoder.*``) and decoder side (``decoder_embed``, the
    ``PerformerModule`` keys incl. its ``projection_matrix`` and ``calls_since_last_redraw`` buffers,
    ``norm``, ``to_final``).
    """
    d, f, b = config.hidden_dim, config.ffn_dim, config.bin_num
    shapes: dict[str, tuple[int, ...]] = {
        "token_emb.mlp.weight": (b, 1),
        "token_emb.mlp.bias": (b,),
        "token_emb.mlp2.weight": (b, b),
        "token_emb.mlp2.bias": (b,),
        "token_emb.emb.weight": (b, d),
        "token_emb.emb_mask.weight": (1, d),
        "token_emb.emb_pad.weight": (1, d),
        "pos_emb.weight": (config.pos_rows, d),
    }
    for i in range(config.depth):
        p = f"encoder.transformer_encoder.{i}."
        shapes[p + "self_attn.in_proj_weight"] = (3 * d, d)
        shapes[p + "self_attn.in_proj_bias"] = (3 * d,)
        shapes[p + "self_attn.out_proj.weight"] = (d, d)
        shapes[p + "self_attn.out_proj.bias"] = (d,)
        shapes[p + "linear1.weight"] = (f, d)
        shapes[p + "linear1.bias"] = (f,)
        shapes[p + "linear2.weight"] = (d, f)
        shapes[p + "linear2.bias"] = (d,)
        for n in ("norm1", "norm2"):
            shapes[p + n + ".weight"] = (d,)
            shapes[p + n + ".bias"] = (d,)
    shapes["encoder.norm.weight"] = (d,)
    shapes["encoder.norm.bias"] = (d,)
    e = config.decoder_hidden_dim
    inner = config.decoder_heads * config.decoder_dim_head
    shapes["decoder_embed.weight"] = (e, d)
    shapes["decoder_embed.bias"] = (e,)
    for i in range(config.decoder_depth):
        p = f"decoder.performer.net.layers.{i}."
        shapes[p + "0.norm.weight"] = (e,)
        shapes[p + "0.norm.bias"] = (e,)
        shapes[p + "0.fn.fast_attention.projection_matrix"] = (config.nb_features, config.decoder_dim_head)
        for proj in ("to_q", "to_k", "to_v"):
            shapes[p + f"0.fn.{proj}.weight"] = (inner, e)
            shapes[p + f"0.fn.{proj}.bias"] = (inner,)
        shapes[p + "0.fn.to_out.weight"] = (e, inner)
        shapes[p + "0.fn.to_out.bias"] = (e,)
        shapes[p + "1.norm.weight"] = (e,)
        shapes[p + "1.norm.bias"] = (e,)
        shapes[p + "1.fn.fn.w1.weight"] = (4 * e, e)
        shapes[p + "1.fn.fn.w1.bias"] = (4 * e,)
        shapes[p + "1.fn.fn.w2.weight"] = (e, 4 * e)
        shapes[p + "1.fn.fn.w2.bias"] = (e,)
    shapes["decoder.performer.calls_since_last_redraw"] = ()
    shapes["decoder.norm.weight"] = (e,)
    shapes["decoder.norm.bias"] = (e,)
    shapes["norm.weight"] = (e,)
    shapes["norm.bias"] = (e,)
    shapes["to_final.weight"] = (1, e)
    shapes["to_final.bias"] = (1,)
    return shapes


# ------------------------------------------------------------------------------------------------
# gene list and tokenizer


def _parse_tgthighres(tgthighres: str) -> tuple[str, float]:
    """``t<v>`` / ``f<v>`` / ``a<v>`` -> (kind, v); ``ConfigError`` otherwise."""
    text = str(tgthighres).strip()
    kind, rest = text[:1], text[1:]
    try:
        value = float(rest)
    except ValueError:
        value = math.nan
    if kind not in ("t", "f", "a") or not math.isfinite(value) or (kind == "f" and value <= 0):
        msg = (
            f"tgthighres {tgthighres!r} is not valid: use t<v> (T = v), f<v> (T = log10(total count x v), v > 0) "
            f"or a<v> (T = log10(total count) + v), e.g. {DEFAULT_TGTHIGHRES} (the official default)"
        )
        raise ConfigError(msg)
    return kind, value


def check_options(*, pre_normalized: str, tgthighres: str, max_length: int | None, seed: int) -> None:
    """``ConfigError`` for a tokenizer option the official script (or an AnnData input) cannot take."""
    if pre_normalized not in PRE_NORMALIZED:
        msg = f"pre_normalized must be F (raw counts) or T (log1p-normalised values), got {pre_normalized!r}"
        raise ConfigError(msg)
    if pre_normalized == "A":
        msg = (
            "pre_normalized='A' reads each cell's total count from an extra last column of the official "
            "CSV/npy input, which an AnnData does not have; give raw counts with pre_normalized='F' "
            "(the total is their sum) or log1p-normalised values with pre_normalized='T'"
        )
        raise ConfigError(msg)
    _parse_tgthighres(tgthighres)
    if max_length is not None and int(max_length) < 3:
        msg = f"scFoundation max_length must be >= 3 (one gene plus T and S), got {max_length}"
        raise ConfigError(msg)
    if int(seed) < 0:
        msg = f"seed must be a non-negative integer, got {seed}"
        raise ConfigError(msg)


def _gene_list_sha256(genes: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(genes), ensure_ascii=False).encode()).hexdigest()


class ScFoundationTokenizer:
    """Official ``get_embedding.py`` single-cell input preparation, vectorised over a block of cells.

    Per cell, over the genes of the gene list (``main_gene_selection``: matched by symbol, missing genes
    are zero, other input genes are dropped):

    - ``pre_normalized='F'`` (raw counts): ``values = log1p(x / x.sum() * 1e4)``, ``total = x.sum()``;
      ``'T'`` (already log1p-normalised): ``values = x`` and, as the official script, ``total = x.sum()``
      of those normalised values; ``'A'`` (total count appended as an extra last column) is refused: an
      AnnData holds no such column;
    - ``S = log10(total)``; ``T`` from ``tgthighres``: ``t<v>`` -> ``v``, ``f<v>`` -> ``log10(total * v)``,
      ``a<v>`` -> ``log10(total) + v``;
    - ``gatherData``: the genes with value > 0 in gene-list order, then T, then S; position ids are the
      genes' list indices, ``n_genes`` for T and ``n_genes + 1`` for S.

    Arithmetic is float64 (the script's pandas rows and its float64 ``torch.tensor`` of values + [T, S])
    cast once to float32 (``token_emb(x.float())``); the total is summed in column order (pandas sums
    pairwise, so a non-integer total may differ in its last float64 bit, which the float32 cast almost
    always hides). ``T`` input with values above 30 (not log1p-normalised) is refused.
    Padding uses value ``pad_token_id`` (103, embedded as ``emb_pad``) and position id ``seq_len``, the
    extra ``pos_emb`` row ``getEncoerDecoderData`` gives padded encoder positions (the cell path's
    ``gatherData`` would give the position id 103, but runs one cell at a time and never pads; padded
    keys are masked, so the choice does not change any real token).
    """

    def __init__(
        self,
        genes: Sequence[str],
        *,
        pre_normalized: str = "F",
        tgthighres: str = DEFAULT_TGTHIGHRES,
        max_length: int | None = None,
        seed: int = 0,
        pad_token_id: int = 103,
        mask_token_id: int = 102,
    ) -> None:
        check_options(pre_normalized=pre_normalized, tgthighres=tgthighres, max_length=max_length, seed=seed)
        self.genes = list(genes)
        if len(set(self.genes)) != len(self.genes):
            msg = "the scFoundation gene list holds a gene twice"
            raise ConfigError(msg)
        self.index: dict[str, int] = {g: i for i, g in enumerate(self.genes)}
        self.n_genes = len(self.genes)
        self.pre_normalized = pre_normalized
        self.tgthighres = str(tgthighres).strip()
        self._t_kind, self._t_value = _parse_tgthighres(self.tgthighres)
        self.max_length = None if max_length is None else int(max_length)
        self.seed = int(seed)
        self.t_position = self.n_genes
        self.s_position = self.n_genes + 1
        self.pad_id = self.n_genes + 2  # = seq_len
        self.pad_value = float(pad_token_id)
        self.mask_value = float(mask_token_id)
        self.gene_list_sha256 = _gene_list_sha256(self.genes)

    @property
    def require_counts(self) -> bool:
        """``F`` normalises raw counts itself; ``T`` expects log1p-normalised values."""
        return self.pre_normalized == "F"

    def settings(self) -> dict[str, Any]:
        return {
            "family": FAMILY_NAME,
            "version": TOKENIZER_VERSION,
            "pre_normalized": self.pre_normalized,
            "tgthighres": self.tgthighres,
            "max_length": self.max_length,
            "seed": self.seed,
            "rng": RNG_NAME,
            "over_length": "keep a random subset of genes (gene-list order), then T and S",
            "count_tokens": "T and S always kept",
            "n_genes": self.n_genes,
            "gene_list_sha256": self.gene_list_sha256,
            "t_position": self.t_position,
            "s_position": self.s_position,
            "pad_id": self.pad_id,
            "pad_value": self.pad_value,
        }

    # -------------------------------------------------------------------------------- genes
    def map_genes(self, gene_names: Sequence[str]) -> GeneMapping:
        """Input columns -> gene-list index by symbol; a symbol seen again maps to -1 (first one wins)."""
        names = list(gene_names)
        get = self.index.get
        ids = np.fromiter((get(g, -1) if isinstance(g, str) else -1 for g in names), dtype=np.int64, count=len(names))
        hit = np.flatnonzero(ids >= 0)
        if len(hit):
            _, first = np.unique(ids[hit], return_index=True)
            repeated = np.setdiff1d(hit, hit[first], assume_unique=True)
            ids[repeated] = -1
        mapping = GeneMapping.from_ids(ids, names, self.n_genes)
        if mapping.n_matched == 0:
            raise GeneOverlapError(self._no_overlap_message(names, mapping))
        return mapping

    def _no_overlap_message(self, names: list[Any], mapping: GeneMapping) -> str:
        ex_in = ", ".join(str(g) for g in names[:5]) or "(none)"
        looks_ensembl = sum(str(g).upper().startswith("ENS") for g in names[:100]) > min(50, len(names) // 2)
        hint = " The input looks like Ensembl ids;" if looks_ensembl else ""
        return (
            f"no input gene is in the scFoundation gene list: {mapping.report()}. Input genes look like: "
            f"{ex_in}; the gene list holds e.g.: {', '.join(self.genes[:5])}.{hint} scFoundation matches genes "
            f"by HGNC gene symbol ({GENE_LIST_FILE}): pick the column of adata.var that holds symbols with "
            "--gene-column (Python: gene_column=...)."
        )

    # -------------------------------------------------------------------------------- tokens
    def _check_values(self, data: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> None:
        if data.size == 0:
            return
        bad = ~np.isfinite(data) | (data < 0)
        if bad.any():
            pos = int(np.argmax(bad))
            msg = (
                f"cell {int(indices[rows[pos]])} has an invalid expression value ({float(data[pos]):g}): "
                "scFoundation needs finite values >= 0"
            )
            raise InvalidValuesError(msg)
        if self.pre_normalized == "T" and float(data.max()) > MAX_LOG1P_VALUE:
            pos = int(np.argmax(data))
            msg = (
                f"pre_normalized='T' expects log1p-normalised values, but cell {int(indices[rows[pos]])} has "
                f"{float(data[pos]):g}; give raw counts with pre_normalized='F' (the default)"
            )
            raise InvalidValuesError(msg)

    def _count_tokens(self, total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T, S) per cell from its total (float64, > 0), as ``get_embedding.py``; cast to float32."""
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.log10(total)
            if self._t_kind == "t":
                t = np.full_like(total, self._t_value)
            elif self._t_kind == "f":
                t = np.log10(total * self._t_value)
            else:
                t = s + self._t_value
        return t.astype(np.float32), s.astype(np.float32)

    def tokenize(self, block: CellBlock, mapping: GeneMapping) -> TokenizedBlock:
        """Token sequences of a block, every step over many cells at once (no loop per cell), in
        cache-sized pieces of rows (:func:`~.base.row_pieces`)."""
        X, indices = canonical_rows(block, mapping)
        ids = np.asarray(mapping.token_ids, dtype=np.int64)
        in_order = _ascending(ids)
        return concat_blocks([self._tokenize_rows(Xp, ip, ids, in_order) for Xp, ip in row_pieces(X, indices)])

    def _tokenize_rows(self, X: sp.csr_matrix, indices: np.ndarray, ids: np.ndarray, in_order: bool) -> TokenizedBlock:
        """:meth:`tokenize` of canonical rows ``X`` (cells ``indices``); ``in_order``: ``ids`` ascending."""
        n_cells = X.shape[0]
        genes = ids[X.indices]
        data = np.asarray(X.data, dtype=np.float64)
        rows = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(X.indptr))
        keep = genes >= 0  # main_gene_selection: only the gene list's genes
        if not keep.all():
            genes, data, rows = genes[keep], data[keep], rows[keep]
        self._check_values(data, indices, rows)
        total = np.bincount(rows, weights=data, minlength=n_cells)  # column order, as the reference
        if self.pre_normalized == "F":
            with np.errstate(divide="ignore", invalid="ignore"):
                values64 = np.log1p(data / total[rows] * 1e4)
        else:
            values64 = data
        expressed = values64 > 0  # gatherData keeps value > 0 (of the float64 input tensor): no stored zero
        genes, rows = genes[expressed], rows[expressed]
        values = values64[expressed].astype(np.float32)  # token_emb(x.float())
        if not in_order:  # columns not in gene-list order
            rows, genes, values = _sort_by_gene(rows, genes, values, self.n_genes)
        counts = np.bincount(rows, minlength=n_cells).astype(np.int64)
        truncated = np.zeros(n_cells, dtype=bool)
        if self.max_length is not None and bool((counts > self.max_length - 2).any()):
            chosen, truncated = self._subset(rows, counts, indices)
            genes, values, rows = genes[chosen], values[chosen], rows[chosen]
        kept = np.bincount(rows, minlength=n_cells).astype(np.int64)
        empty = counts == 0
        t_val, s_val = self._count_tokens(np.where(empty, 1.0, total))
        lengths = np.where(empty, 0, kept + 2)
        ends = np.cumsum(lengths)
        t_pos = (ends - 2)[~empty]
        is_gene = np.ones(int(ends[-1]) if n_cells else 0, dtype=bool)
        is_gene[t_pos] = False
        is_gene[t_pos + 1] = False
        out_genes = np.empty(len(is_gene), dtype=np.int64)
        out_values = np.empty(len(is_gene), dtype=np.float32)
        out_genes[is_gene], out_values[is_gene] = genes, values
        out_genes[t_pos], out_values[t_pos] = self.t_position, t_val[~empty]
        out_genes[t_pos + 1], out_values[t_pos + 1] = self.s_position, s_val[~empty]
        bounds = list(itertools.pairwise([0, *ends.tolist()]))
        return TokenizedBlock(
            indices=indices.copy(),
            genes=[out_genes[a:b] for a, b in bounds],
            values=[out_values[a:b] for a, b in bounds],
            truncated=truncated,
            empty=empty,
            n_expressed=counts,
        )

    def tokenize_reference(self, block: CellBlock, mapping: GeneMapping) -> TokenizedBlock:
        """The same tokens, one cell at a time: ``get_embedding.py``'s per-cell rule restated.

        The per-cell path :meth:`tokenize` is checked and benchmarked against; the subset kept over
        ``max_length`` uses the same counter draws (:meth:`_subset_of_cell`).
        """
        X, indices = canonical_rows(block, mapping)
        ids = np.asarray(mapping.token_ids, dtype=np.int64)
        n_cells = X.shape[0]
        genes_out: list[np.ndarray] = []
        values_out: list[np.ndarray] = []
        truncated = np.zeros(n_cells, dtype=bool)
        counts = np.zeros(n_cells, dtype=np.int64)
        for i in range(n_cells):
            lo, hi = int(X.indptr[i]), int(X.indptr[i + 1])
            genes = ids[X.indices[lo:hi]]
            data = np.asarray(X.data[lo:hi], dtype=np.float64)
            genes, data = genes[genes >= 0], data[genes >= 0]
            self._check_values(data, indices[i : i + 1], np.zeros(len(data), dtype=np.int64))
            total = float(np.cumsum(data)[-1]) if len(data) else 0.0  # summed in column order
            if self.pre_normalized == "F":
                with np.errstate(divide="ignore", invalid="ignore"):
                    values64 = np.log1p(data / total * 1e4)
            else:
                values64 = data
            order = np.argsort(genes)  # gene-list order
            genes, values64 = genes[order], values64[order]
            genes, values = genes[values64 > 0], values64[values64 > 0].astype(np.float32)
            counts[i] = len(genes)
            if not len(genes):
                genes_out.append(np.zeros(0, dtype=np.int64))
                values_out.append(np.zeros(0, dtype=np.float32))
                continue
            if self.max_length is not None and len(genes) > self.max_length - 2:
                chosen = self._subset_of_cell(int(indices[i]), len(genes))
                genes, values = genes[chosen], values[chosen]
                truncated[i] = True
            t_val, s_val = self._count_tokens(np.array([total]))
            genes_out.append(np.concatenate((genes, [self.t_position, self.s_position])).astype(np.int64))
            values_out.append(np.concatenate((values, t_val, s_val)).astype(np.float32))
        return TokenizedBlock(
            indices=indices.copy(),
            genes=genes_out,
            values=values_out,
            truncated=truncated,
            empty=counts == 0,
            n_expressed=counts,
        )

    @property
    def truncation_rule(self) -> str:
        """None by default (the official code never truncates); a seeded random subset with ``max_length``."""
        return NO_TRUNCATION if self.max_length is None else RANDOM_SUBSAMPLE

    def _subset_of_cell(self, cell: int, n: int) -> np.ndarray:
        """Positions (ascending) of the ``max_length - 2`` genes a cell of ``n`` expressed genes keeps.

        Not in the official code, which never truncates. The genes with the smallest counter draws
        ``random_bits(seed, SUBSET_STREAM, cell, position)`` are kept (position = the gene's place among
        the cell's expressed genes in gene-list order; equal draws by position), in gene-list order.
        """
        keys = random_bits(self.seed, SUBSET_STREAM, np.full(n, cell, dtype=np.int64), np.arange(n))
        assert self.max_length is not None
        return np.sort(np.argsort(keys, kind="stable")[: self.max_length - 2])

    def _subset(self, rows: np.ndarray, counts: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_subset_of_cell` for a whole block: (kept flat positions ascending, truncated per cell)."""
        assert self.max_length is not None
        n_keep = self.max_length - 2
        over = counts > n_keep
        in_over = over[rows]
        over_cells = np.flatnonzero(over)
        segment = np.cumsum(over) - 1  # cell -> its index among the over-length cells
        seg_rows = segment[rows[in_over]]
        seg_counts = counts[over_cells]
        perm = random_order(self.seed, SUBSET_STREAM, indices[over_cells], seg_rows, seg_counts)
        seg_off = np.concatenate(([0], np.cumsum(seg_counts)))
        rank = np.arange(len(perm)) - seg_off[seg_rows]  # rank of perm[p] in its cell's random order
        keep_over = np.zeros(len(perm), dtype=bool)
        keep_over[perm[rank < n_keep]] = True
        keep = np.ones(len(rows), dtype=bool)
        keep[in_over] = keep_over
        return np.flatnonzero(keep), over


def _sort_by_gene(
    rows: np.ndarray, genes: np.ndarray, values: np.ndarray, n_genes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cell's genes in gene-list order (a cell holds a gene once).

    One sort of uint64 keys ``(cell, gene, the float32 value's bits)`` carries the values along without
    an argsort and its gathers; blocks whose ``cells x genes`` exceed 32 bits take an argsort.
    """
    cell_gene = rows * n_genes + genes
    if len(rows) and (int(rows[-1]) + 1) * n_genes > 1 << 32:  # rows ascending: the last is the largest
        order = np.argsort(cell_gene)
        return rows[order], genes[order], values[order]
    key = (cell_gene.astype(np.uint64) << np.uint64(32)) | values.view(np.uint32).astype(np.uint64)
    key.sort()
    cell_gene = (key >> np.uint64(32)).astype(np.int64)
    values = (key & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
    return cell_gene // n_genes, cell_gene % n_genes, values


def _ascending(token_ids: np.ndarray) -> bool:
    """Whether the mapped columns come in gene-list order (then canonical rows need no sort)."""
    mapped = token_ids[token_ids >= 0]
    return bool((mapped[1:] > mapped[:-1]).all())


# ------------------------------------------------------------------------------------------------
# model


class AutoDiscretizationEmbedding(nn.Module):
    """``AutoDiscretizationEmbedding2``: a soft assignment of each value to ``bin_num`` learned bins.

    ``h = LeakyReLU_0.1(mlp(v))``; ``w = softmax(bin_alpha * h + mlp2(h))``; ``e = w @ emb.weight``;
    tokens whose value equals the mask / pad value get ``emb_mask`` / ``emb_pad`` instead.
    """

    def __init__(self, dim: int, bin_num: int, bin_alpha: float, mask_value: float, pad_value: float) -> None:
        super().__init__()
        self.mlp = nn.Linear(1, bin_num)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.emb = nn.Embedding(bin_num, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)
        self.bin_alpha = float(bin_alpha)
        self.mask_value = float(mask_value)
        self.pad_value = float(pad_value)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.mlp(values.unsqueeze(-1)), 0.1)
        weight = torch.softmax(self.bin_alpha * h + self.mlp2(h), dim=-1)
        x = torch.matmul(weight, self.emb.weight.to(weight.dtype))
        x = torch.where((values == self.mask_value).unsqueeze(-1), self.emb_mask.weight[0].to(x.dtype), x)
        return torch.where((values == self.pad_value).unsqueeze(-1), self.emb_pad.weight[0].to(x.dtype), x)


class _Encoder(nn.Module):
    """``pytorchTransformerModule``: ``transformer_encoder`` (a ModuleList) and the final ``norm``."""

    def __init__(self, layers: Iterable[nn.Module], d: int, eps: float) -> None:
        super().__init__()
        self.transformer_encoder = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d, eps=eps)


class ScFoundationModel(nn.Module):
    """scFoundation's encoder; ``forward(batch, tap)`` taps the embedding (0) and each block 1..L.

    ``batch.values`` are the token values, ``batch.genes`` the position ids. ``encoder.norm`` (the final
    LayerNorm) is not applied to the taps; the ``official`` pooling applies it.
    """

    def __init__(self, config: ScFoundationConfig) -> None:
        super().__init__()
        d = config.hidden_dim
        self.config = config
        self.n_layers = config.depth
        self.hidden_size = d
        self.token_emb = AutoDiscretizationEmbedding(
            d, config.bin_num, config.bin_alpha, config.mask_token_id, config.pad_token_id
        )
        self.pos_emb = nn.Embedding(config.pos_rows, d)
        self.encoder = _Encoder(
            (TorchEncoderLayer(d, config.heads, config.ffn_dim, config.layer_norm_eps) for _ in range(config.depth)),
            d,
            config.layer_norm_eps,
        )

    def embed(self, batch: TokenBatch) -> torch.Tensor:
        """Layer 0: ``token_emb(values) + pos_emb(position ids)``."""
        return self.token_emb(batch.values.to(torch.float32)) + self.pos_emb(batch.genes)

    def forward(self, batch: TokenBatch, tap: Tap) -> None:
        layout = batch.attention_layout()
        h = self.embed(batch)
        tap(0, h)
        for i, layer in enumerate(self.encoder.transformer_encoder, start=1):
            h = layer(h, layout)
            tap(i, h)
        del h


# ------------------------------------------------------------------------------------------------
# poolings

# S, T, max and mean over the genes: get_embedding.py's pool_type 'all' concat order
OFFICIAL_SPEC = kernels.PoolSpec(("from_end:1", "from_end:2", "max", "mean"), n_leading=0, n_trailing=2)


class OfficialPooling:
    """The published ``pool_type='all'`` embedding at every layer: ``[S, T, max, mean]`` of ``encoder.norm(h)``.

    ``get_embedding.py`` concatenates ``geneemb[:, -1]`` (S), ``geneemb[:, -2]`` (T) and the max and the
    mean over ``geneemb[:, :-2]`` (the genes) of the encoder output (after its final LayerNorm); at
    layer L this is that embedding, at layer ℓ the same recipe on ``encoder.norm(h_ℓ)``.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        self.norm = norm
        self.width = 4 * int(norm.normalized_shape[0])

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
        normed = self.norm(hidden)
        view = out.unflatten(-1, (4, hidden.shape[-1])).transpose(0, 1)  # [4, B, H] view of [B, 4H]
        ovf = torch.zeros(4, dtype=torch.int64, device=hidden.device) if overflow is not None else None
        kernels.pool_cast(normed, starts, lengths, OFFICIAL_SPEC, out.dtype, view, ovf, backend=backend)
        del normed
        if overflow is not None and ovf is not None:
            overflow += ovf.sum()


# ------------------------------------------------------------------------------------------------
# checkpoints


def read_gene_list(path: Path) -> list[str]:
    """``OS_scRNA_gene_index.19264.tsv``: columns ``gene_name`` and ``index`` (0..n-1 in order)."""
    import pandas as pd

    if not path.is_file():
        msg = (
            f"scFoundation gene list {path} is missing: copy {GENE_LIST_FILE} from the official scFoundation "
            f"repository ({OFFICIAL_REPO}, top level or model/) into the checkpoint folder beside {WEIGHTS_FILE}"
        )
        raise CheckpointError(msg)
    try:
        table = pd.read_csv(path, sep="\t", header=0, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        msg = f"cannot read scFoundation gene list {path}: {exc}"
        raise CheckpointError(msg) from None
    if not {"gene_name", "index"} <= set(table.columns):
        msg = f"scFoundation gene list {path} must have the columns gene_name and index (tab-separated)"
        raise CheckpointError(msg)
    if table["index"].tolist() != [str(i) for i in range(len(table))]:
        msg = f"scFoundation gene list {path}: the index column must be 0..{len(table) - 1} in order"
        raise CheckpointError(msg)
    genes = table["gene_name"].tolist()
    if len(set(genes)) != len(genes) or "" in genes:
        msg = f"scFoundation gene list {path}: gene names must be unique and non-empty"
        raise CheckpointError(msg)
    return genes


def write_gene_list(genes: Sequence[str], path: Path) -> None:
    lines = ["gene_name\tindex", *(f"{g}\t{i}" for i, g in enumerate(genes))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _json_safe(value: Any) -> Any:
    """Plain JSON data (config values go into store attributes)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _read_entry(raw: Any, entry: str, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The flattened config and the ``model.``-stripped state dict of one entry of ``models.ckpt``."""
    if not isinstance(raw, Mapping) or not any(k in raw for k in ENTRIES):
        msg = (
            f"{path} is not scFoundation's models.ckpt: expected a dict with the entries "
            f"{', '.join(ENTRIES)} (each a config and a state_dict)"
        )
        raise CheckpointError(msg)
    if entry not in raw:
        msg = f"{path} has no {entry!r} weights (it holds {', '.join(map(str, raw))})"
        raise CheckpointError(msg)
    item = raw[entry]
    if not isinstance(item, Mapping) or "config" not in item or "state_dict" not in item:
        msg = f"{path} entry {entry!r} must be a dict with 'config' and 'state_dict'"
        raise CheckpointError(msg)
    state = item["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        msg = f"{path} entry {entry!r}: state_dict must map parameter names to tensors"
        raise CheckpointError(msg)
    stripped = {k[len(STATE_PREFIX) :] if k.startswith(STATE_PREFIX) else k: v for k, v in state.items()}
    return flatten_config(item["config"]), stripped


def _split_state(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encoder keys (kept, incl. unexpected ones so they are refused) and the decoder keys (ignored)."""
    ours: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, tensor in state.items():
        if key not in expected and key.startswith(DECODER_PREFIXES):
            ignored.append(key)
        else:
            ours[key] = tensor
    return ours, sorted(ignored)


def _match_preset(marker: Any, config: ScFoundationConfig) -> str | None:
    if (
        isinstance(marker, str)
        and marker in PRESETS
        and PRESETS[marker].architecture()[:3] == config.architecture()[:3]
    ):
        return marker
    for name, p in PRESETS.items():
        if p.architecture() == config.architecture():
            return name
    return None


class ScFoundationFamily:
    """The ``FAMILY`` object of scFoundation (see :class:`~cellstrata.engine.models.base.ModelFamily`)."""

    name = FAMILY_NAME
    presets: Mapping[str, ScFoundationConfig] = PRESETS
    default_poolings: tuple[str, ...] = ("mean", "official")
    pool_ops: Mapping[str, str] = {"mean": "mean", "max": "max", "s_token": "from_end:1", "t_token": "from_end:2"}
    options = ("max_length", "seed", "version", "pre_normalized", "tgthighres")

    def load(
        self,
        checkpoint: str | Path,
        *,
        device: torch.device | str = "cpu",
        max_length: int | None = None,
        seed: int = 0,
        version: str = "ce",
        pre_normalized: str = "F",
        tgthighres: str = DEFAULT_TGTHIGHRES,
        **unknown: Any,
    ) -> LoadedModel:
        """Load the official folder (``models.ckpt`` + ``OS_scRNA_gene_index.19264.tsv``).

        ``version``: ``ce`` (entry ``cell``, default) or ``rde`` (read-depth enhancement weights);
        ``pre_normalized`` / ``tgthighres``: as ``get_embedding.py`` (see :class:`ScFoundationTokenizer`).
        """
        refuse_unknown_options("scfoundation", unknown, self.options)
        if version not in VERSIONS:
            msg = f"scFoundation version must be ce (cell embeddings) or rde (read-depth enhancement), got {version!r}"
            raise ConfigError(msg)
        folder = Path(checkpoint).expanduser()
        if folder.is_file() and folder.name == WEIGHTS_FILE:
            folder = folder.parent
        if not folder.is_dir():
            msg = (
                f"scFoundation checkpoint folder {folder} does not exist or is not a folder; it must contain "
                f"{WEIGHTS_FILE} (the released weights) and {GENE_LIST_FILE} (from the official repository)"
            )
            raise CheckpointError(msg)
        if not (folder / WEIGHTS_FILE).is_file():
            msg = (
                f"scFoundation checkpoint folder {folder} lacks {WEIGHTS_FILE}; put the released weights "
                f"file there (download link in model/models/download.txt of {OFFICIAL_REPO})"
            )
            raise CheckpointError(msg)
        tokenizer_args = {"pre_normalized": pre_normalized, "tgthighres": tgthighres, "max_length": max_length}
        check_options(seed=seed, **tokenizer_args)  # before reading the weights
        genes = read_gene_list(folder / GENE_LIST_FILE)

        entry = VERSIONS[version]
        raw = load_torch_weights(folder / WEIGHTS_FILE)
        flat, state = _read_entry(raw, entry, folder / WEIGHTS_FILE)
        marker = raw[entry]["config"].get(PRESET_KEY)
        del raw
        config = ScFoundationConfig.from_flat(flat)
        if config.n_genes != len(genes):
            msg = (
                f"{GENE_LIST_FILE} lists {len(genes)} genes but the checkpoint's seq_len {config.seq_len} "
                f"means {config.n_genes} genes (+ T and S); use the gene list that came with these weights"
            )
            raise CheckpointError(msg)
        model = ScFoundationModel(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        ours, ignored = _split_state(state, expected)
        del state
        check_state_dict(
            ours,
            expected,
            what=f"scFoundation {folder / WEIGHTS_FILE} ({entry!r} weights)",
            hint="Check that the file is the released models.ckpt (or written by cellstrata init-checkpoint).",
        )
        model.load_state_dict(ours, strict=True)
        del ours
        model.requires_grad_(False)
        model.eval()
        model.to(device)

        tokenizer = ScFoundationTokenizer(
            genes, seed=seed, pad_token_id=config.pad_token_id, mask_token_id=config.mask_token_id, **tokenizer_args
        )
        preset = _match_preset(marker, config)
        files = describe_files(folder, [WEIGHTS_FILE, GENE_LIST_FILE])
        cfg_out = _json_safe(flat)
        cfg_out.update({"preset": preset, "version": version, "entry": entry, "n_genes": config.n_genes})
        return LoadedModel(
            family=FAMILY_NAME,
            preset=preset,
            model=model,
            tokenizer=tokenizer,
            config=cfg_out,
            layout=SpecialLayout(n_leading=0, n_trailing=2, has_cls=False),
            pool_ops=dict(self.pool_ops),
            default_poolings=self.default_poolings,
            checkpoint={
                "path": str(folder.resolve()),
                "sha256": files[WEIGHTS_FILE]["sha256"],
                "files": files,
                "entry": entry,
                "ignored_keys": ignored,
            },
            custom_poolings={"official": OfficialPooling(model.encoder.norm)},
            official_layer=config.depth,
        )

    def init_checkpoint(
        self,
        preset: str,
        out: str | Path,
        *,
        seed: int = 0,
        genes: Sequence[str] | None = None,
    ) -> Path:
        """Write ``models.ckpt`` (entries cell, rde, gene with random weights) and the gene list."""
        if preset not in PRESETS:
            msg = f"unknown scfoundation preset {preset!r}; known presets: {', '.join(PRESETS)}"
            raise ConfigError(msg)
        config = PRESETS[preset]
        gene_list = list(genes) if genes is not None else gene_symbols(config.n_genes)
        if (
            not gene_list
            or len(set(gene_list)) != len(gene_list)
            or any(not str(g) or "\t" in str(g) for g in gene_list)
        ):
            msg = "genes must be a non-empty list of unique gene symbols (no tabs)"
            raise ConfigError(msg)
        config = replace(config, seq_len=len(gene_list) + 2)
        folder = Path(out).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        write_gene_list([str(g) for g in gene_list], folder / GENE_LIST_FILE)
        ckpt = {}
        for k, entry in enumerate(ENTRIES):
            cfg = config.to_nested()
            cfg[PRESET_KEY] = preset
            cfg["random_init_seed"] = int(seed)
            state = random_state_dict(config, seed=int(seed) * len(ENTRIES) + k)
            ckpt[entry] = {"config": cfg, "state_dict": OrderedDict((STATE_PREFIX + n, t) for n, t in state.items())}
        torch.save(ckpt, folder / WEIGHTS_FILE)
        return folder


def random_state_dict(config: ScFoundationConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights with the official key set (decoder included) and non-trivial activations."""
    gen = torch.Generator().manual_seed(int(seed))
    state: dict[str, torch.Tensor] = {}
    for key, shape in official_key_shapes(config).items():
        last = key.rsplit(".", 1)[-1]
        is_norm = len(shape) == 1 and (".norm" in key or key.startswith("norm."))
        if key.endswith("calls_since_last_redraw"):
            t = torch.tensor(0, dtype=torch.int64)
        elif is_norm and last == "weight":
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif is_norm or last.endswith("bias"):
            t = 0.05 * torch.randn(shape, generator=gen)
        elif key.startswith(("token_emb.emb", "pos_emb.")) or last == "projection_matrix":
            t = 0.5 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        state[key] = t.contiguous()
    return state


FAMILY = ScFoundationFamily()

__all__ = [
    "FAMILY",
    "GENE_LIST_FILE",
    "OFFICIAL_SPEC",
    "PRESETS",
    "WEIGHTS_FILE",
    "AutoDiscretizationEmbedding",
    "OfficialPooling",
    "ScFoundationConfig",
    "ScFoundationFamily",
    "ScFoundationModel",
    "ScFoundationTokenizer",
    "flatten_config",
    "official_key_shapes",
    "random_state_dict",
    "read_gene_list",
]
