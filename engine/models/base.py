"""What every model family provides to the pipeline.

A family package (``engine/models/<family>/``) exposes one :class:`ModelFamily` object. The pipeline
only talks to these types, never to a family's internals:

- :class:`GeneMapping` maps the input's gene columns to vocabulary ids (``-1`` = not in vocabulary);
- a tokenizer turns a :class:`~cellstrata.engine.input.sources.CellBlock` into a :class:`TokenizedBlock`
  (one variable-length token sequence per cell, special tokens included);
- :class:`TokenBatch` is a batch of such sequences, right-padded ``[B, S]`` or packed ``[1, T]``;
- the model's ``forward(batch, tap)`` calls ``tap(layer, hidden)`` for layer = 0..L with
  ``hidden`` of shape ``[B, S, H]`` (padded) or ``[1, T, H]`` (packed) and frees each activation after
  the tap returns; its attention follows ``batch.attention_layout()`` (:mod:`.attention`).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import scipy.sparse as sp
import torch

from .attention import AttentionLayout, make_layout

if TYPE_CHECKING:
    from ..input.sources import CellBlock

Tap = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class GeneMapping:
    """Input gene columns -> vocabulary ids.

    ``token_ids[j]`` is the vocabulary id of input column ``j`` or ``-1`` when the gene is not in the
    vocabulary. ``n_input`` genes were offered, ``n_matched`` of them are in the vocabulary.
    """

    token_ids: np.ndarray
    n_input: int
    n_matched: int
    n_vocab_genes: int
    examples_missing: tuple[str, ...] = ()

    @classmethod
    def from_ids(cls, ids: np.ndarray, names: Sequence[Any], n_vocab_genes: int) -> GeneMapping:
        """The mapping given each input column's vocabulary id (``-1`` = not in the vocabulary)."""
        ids = np.asarray(ids, dtype=np.int64)
        return cls(
            token_ids=ids,
            n_input=len(names),
            n_matched=int((ids >= 0).sum()),
            n_vocab_genes=n_vocab_genes,
            examples_missing=tuple(str(names[j]) for j in np.flatnonzero(ids < 0)[:5]),
        )

    @property
    def fraction(self) -> float:
        return self.n_matched / max(self.n_input, 1)

    def report(self) -> str:
        return (
            f"{self.n_matched} of {self.n_input} input genes ({100 * self.fraction:.1f}%) are in the "
            f"model's vocabulary of {self.n_vocab_genes} genes"
        )


# How a tokenizer fits a cell with more expressed genes than its context (its ``truncation_rule``).
RANDOM_SUBSAMPLE = "random subsample, seeded per cell"
TOP_RANKED = "top-ranked genes kept"
NO_TRUNCATION = "no truncation"


@dataclass
class TokenizedBlock:
    """Token sequences of a block of cells, in the block's cell order.

    ``genes[i]``/``values[i]`` include the special tokens (e.g. a leading ``<cls>``);
    ``truncated[i]`` is true when the cell had more tokens than the model's context and was cut or
    subsampled to fit; ``empty[i]`` is true when the cell had no expressed vocabulary gene.
    ``n_expressed[i]``, when the tokenizer gives it, is the number of expressed vocabulary genes the
    cell had before truncation (what the run's truncation report summarises).
    """

    indices: np.ndarray
    genes: list[np.ndarray]
    values: list[np.ndarray]
    truncated: np.ndarray
    empty: np.ndarray
    n_expressed: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.indices)
        if not (len(self.genes) == len(self.values) == len(self.truncated) == len(self.empty) == n):
            msg = "TokenizedBlock fields must all have one entry per cell"
            raise ValueError(msg)
        if self.n_expressed is not None and len(self.n_expressed) != n:
            msg = "TokenizedBlock.n_expressed must have one entry per cell"
            raise ValueError(msg)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(g) for g in self.genes), dtype=np.int64, count=len(self.genes))

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class TokenBatch:
    """A batch of token sequences, right-padded ``[B, S]`` or packed back to back in one ``[1, T]`` row.

    ``genes``/``values`` hold the tokens, ``lengths`` ``[B]`` the real tokens per cell, ``positions`` the
    index of each cell inside the window it came from (so pooled rows can be put back in cell order).
    ``host_lengths`` repeats ``lengths`` on the host (filled by :func:`~cellstrata.engine.device.batching.collate`,
    so building the attention layout never waits for the device). ``packed`` batches carry the name of
    their varlen attention kernel in ``varlen`` (see :mod:`.attention`).
    """

    genes: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    positions: np.ndarray
    host_lengths: tuple[int, ...] = ()
    packed: bool = False
    varlen: str = "reference"
    _layout: AttentionLayout | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def padding_mask(self) -> torch.Tensor:
        """``[B, S]`` bool, True at padded positions (torch's key-padding convention); padded batches only."""
        if self.packed:
            msg = "a packed batch has no padding"
            raise ValueError(msg)
        s = self.genes.shape[1]
        return torch.arange(s, device=self.lengths.device)[None, :] >= self.lengths[:, None]

    @property
    def n_slots(self) -> int:
        """Token positions the model computes: ``B x S`` padded, ``T`` packed."""
        return int(self.genes.numel())

    @property
    def max_len(self) -> int:
        """The longest cell (``S`` when the host lengths are unknown)."""
        return max(self.host_lengths) if self.host_lengths else int(self.genes.shape[1])

    def attention_layout(self) -> AttentionLayout:
        """The layout attention needs (built once per batch, on the batch's device)."""
        if self._layout is None:
            if self.packed:
                self._layout = make_layout(self.lengths, self.host_lengths, self.varlen)
            elif self.host_lengths and min(self.host_lengths) == self.genes.shape[1]:
                self._layout = AttentionLayout()  # no row is padded: no mask
            else:
                pad = self.padding_mask
                self._layout = AttentionLayout(mask=None if not bool(pad.any()) else (~pad)[:, None, None, :])
        return self._layout

    @property
    def starts(self) -> torch.Tensor | None:
        """First token of each cell in the packed row (None when padded: cell ``b`` is row ``b``)."""
        if not self.packed:
            return None
        cu = self.attention_layout().cu_seqlens
        assert cu is not None
        return cu[:-1]

    def position_ids(self) -> torch.Tensor:
        """``[1, T]`` (packed) or ``[1, S]`` (padded) index of each token inside its own cell."""
        n = self.genes.shape[1]
        idx = torch.arange(n, device=self.genes.device)
        if not self.packed:
            return idx[None, :]
        starts = self.starts
        assert starts is not None
        return (idx - starts.repeat_interleave(self.lengths, output_size=n))[None, :]

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            self.genes.to(device, non_blocking=True),
            self.values.to(device, non_blocking=True),
            self.lengths.to(device, non_blocking=True),
            self.positions,
            self.host_lengths,
            self.packed,
            self.varlen,
        )


@dataclass(frozen=True)
class SpecialLayout:
    """Where a family's special tokens sit in every sequence.

    ``n_leading`` tokens at the start (e.g. ``<cls>``) and ``n_trailing`` at each cell's own end
    (e.g. ``<eos>``, scFoundation's T and S) are excluded from the gene span. ``has_cls`` says whether
    position 0 is a CLS token.
    """

    n_leading: int
    n_trailing: int
    has_cls: bool


def canonical_rows(block: CellBlock, mapping: GeneMapping) -> tuple[sp.csr_matrix, np.ndarray]:
    """A block's matrix as canonical CSR (columns ascending within rows, duplicates summed, as densifying
    would) and its cell indices, checked against the gene mapping."""
    X = block.X
    if not sp.issparse(X) or X.format != "csr":
        X = sp.csr_matrix(X)
    indices = np.asarray(block.indices)
    if X.shape[0] != len(indices):
        msg = f"CellBlock has {len(indices)} indices but {X.shape[0]} rows"
        raise ValueError(msg)
    if X.shape[1] != len(mapping.token_ids):
        msg = f"CellBlock has {X.shape[1]} gene columns but the gene mapping has {len(mapping.token_ids)}"
        raise ValueError(msg)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    return X, indices


# stored entries per piece when a tokenizer works through a block piece by piece (:func:`row_pieces`):
# about 1 MB per float64 array, so its element-wise passes stay in cache (measured 1.6x faster than
# passes over a whole block of 1,024 released-size cells)
PIECE_ENTRIES = 1 << 17


def row_pieces(
    X: sp.csr_matrix, indices: np.ndarray, max_entries: int | None = None
) -> Iterator[tuple[sp.csr_matrix, np.ndarray]]:
    """Consecutive row ranges of a canonical CSR block (``canonical_rows``' result) and their cell indices,
    each of about ``max_entries`` (default :data:`PIECE_ENTRIES`) stored entries, one row at least; their
    values and column indices are views of ``X``'s arrays."""
    max_entries = PIECE_ENTRIES if max_entries is None else max(1, int(max_entries))
    n_rows, nnz = X.shape[0], int(X.indptr[-1])
    if nnz <= max_entries or n_rows < 2:
        yield X, indices
        return
    cuts = np.searchsorted(X.indptr, np.arange(max_entries, nnz, max_entries))
    bounds = np.unique(np.concatenate(([0], np.clip(cuts, 1, n_rows - 1), [n_rows]))).tolist()
    for a, b in itertools.pairwise(bounds):
        lo, hi = int(X.indptr[a]), int(X.indptr[b])
        piece = sp.csr_matrix((X.data[lo:hi], X.indices[lo:hi], X.indptr[a : b + 1] - lo), shape=(b - a, X.shape[1]))
        piece.has_canonical_format = True  # rows of a canonical matrix
        yield piece, indices[a:b]


def concat_blocks(parts: Sequence[TokenizedBlock]) -> TokenizedBlock:
    """One :class:`TokenizedBlock` of consecutive parts (cells in the parts' order)."""
    if len(parts) == 1:
        return parts[0]
    counts = [p.n_expressed for p in parts]
    n_expressed = None if any(c is None for c in counts) else np.concatenate(cast(list[np.ndarray], counts))
    return TokenizedBlock(
        indices=np.concatenate([p.indices for p in parts]),
        genes=[g for p in parts for g in p.genes],
        values=[v for p in parts for v in p.values],
        truncated=np.concatenate([p.truncated for p in parts]),
        empty=np.concatenate([p.empty for p in parts]),
        n_expressed=n_expressed,
    )


def kept_entries(indptr: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """The entries a CSR matrix keeps, row by row: ``(selector, counts)``.

    ``selector`` is ``None`` when every entry is kept (use the arrays as they are), else the indices
    of the kept entries; ``counts`` is the number kept per row. Counting the dropped entries (usually
    few: genes outside the vocabulary, stored zeros) is cheaper than a running sum over all entries.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    dropped = np.flatnonzero(~keep)
    counts = np.diff(indptr)
    if not len(dropped):
        return None, counts
    counts -= np.bincount(np.searchsorted(indptr, dropped, side="right") - 1, minlength=len(counts))
    return np.flatnonzero(keep), counts


def leading_token_block(
    indices: np.ndarray,
    token: int,
    token_value: float,
    genes: np.ndarray,
    values: np.ndarray,
    n_genes: np.ndarray,
    *,
    truncated: np.ndarray,
    empty: np.ndarray,
    n_expressed: np.ndarray | None = None,
) -> TokenizedBlock:
    """A :class:`TokenizedBlock` from flat gene tokens (``n_genes`` per cell, cell after cell), each cell
    led by ``token`` with value ``token_value``: int64 genes, float32 values, one split of each array."""
    n_genes = np.asarray(n_genes, dtype=np.int64)
    n_cells = len(n_genes)
    starts = np.concatenate(([0], np.cumsum(n_genes[:-1] + 1))).astype(np.int64) if n_cells else n_genes
    gene_at = np.ones(len(genes) + n_cells, dtype=bool)
    gene_at[starts] = False
    out_genes = np.empty(len(genes) + n_cells, dtype=np.int64)
    out_values = np.empty(len(genes) + n_cells, dtype=np.float32)
    out_genes[starts] = token
    out_values[starts] = token_value
    out_genes[gene_at] = genes
    out_values[gene_at] = values
    return TokenizedBlock(
        indices=np.asarray(indices).copy(),
        genes=np.split(out_genes, starts[1:]) if n_cells else [],
        values=np.split(out_values, starts[1:]) if n_cells else [],
        truncated=np.asarray(truncated, dtype=bool),
        empty=np.asarray(empty, dtype=bool),
        n_expressed=n_expressed,
    )


class Tokenizer(Protocol):
    """Official preprocessing of one family (see each family's module for the exact rules).

    ``max_length`` is the context in tokens, special tokens included (``None``: unlimited);
    ``truncation_rule`` says how a longer cell is fitted to it (:data:`RANDOM_SUBSAMPLE`,
    :data:`TOP_RANKED` or :data:`NO_TRUNCATION`).
    """

    @property
    def pad_id(self) -> int: ...

    @property
    def pad_value(self) -> float: ...

    @property
    def max_length(self) -> int | None: ...

    @property
    def truncation_rule(self) -> str: ...

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the tokens (goes into the store's attributes and config hash)."""
        ...

    def map_genes(self, gene_names: Sequence[str]) -> GeneMapping:
        """Map input gene identifiers to vocabulary ids; raise GeneOverlapError when none match."""
        ...

    def tokenize(self, block: CellBlock, mapping: GeneMapping) -> TokenizedBlock:
        """Token sequences of every cell of ``block`` (randomness seeded per cell), the whole block at once."""
        ...

    def tokenize_reference(self, block: CellBlock, mapping: GeneMapping) -> TokenizedBlock:
        """The same tokens one cell at a time, restating the official per-cell rule (tests, benchmarks)."""
        ...


class CellModel(Protocol):
    """A family's ``nn.Module``."""

    n_layers: int
    hidden_size: int

    def forward(self, batch: TokenBatch, tap: Tap) -> None: ...


@dataclass(frozen=True)
class PoolingCall:
    """One layer's call of a :class:`CustomPooling`: its inputs, where to write and the overflow counts to fill."""

    hidden: torch.Tensor  # padded [B, S, H] (starts None) or packed [T, H]
    starts: torch.Tensor | None  # packed: each cell's first token [B]
    lengths: torch.Tensor  # [B]
    out: torch.Tensor  # [B, width], the store dtype, any strides
    counts: torch.Tensor  # int64 [n_counters]: values that became inf in float16
    backend: str | None  # passed on to kernels.pool_cast


class CustomPooling(ABC):
    """A pooling the fused kernel cannot express alone, e.g. a model's final norm applied before pooling.

    Called once per layer with that layer's ``hidden`` and ``lengths [B]``: padded ``hidden [B, S, H]``
    with ``starts=None``, or packed ``hidden [T, H]`` with ``starts [B]`` (each cell's first token, the
    layout of :func:`~cellstrata.kernels.pool_cast`). Writes ``out [B, width]`` (the store dtype, any
    strides) and adds the number of values that became inf in float16 to ``overflow`` (a 0-d int64
    tensor) when it is given. ``backend`` is passed on to :func:`~cellstrata.kernels.pool_cast`.
    A subclass writes :meth:`pool`; ``n_counters`` is the length of the overflow counts it fills.
    """

    width: int
    n_counters: int = 1

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
        counts = torch.zeros(self.n_counters, dtype=torch.int64, device=hidden.device)
        self.pool(PoolingCall(hidden, starts, lengths, out, counts, backend))
        if overflow is not None:
            overflow += counts.sum()

    @abstractmethod
    def pool(self, call: PoolingCall) -> None:
        """Write ``call.out`` and count float16 overflows into ``call.counts``."""


class FinalNormPooling(CustomPooling):
    """A pooling of the model's final LayerNorm output: ``n_vectors`` vectors of the hidden size side by side."""

    def __init__(self, norm: torch.nn.LayerNorm, n_vectors: int = 1) -> None:
        self.norm = norm
        self.width = n_vectors * int(norm.normalized_shape[0])
        self.n_counters = n_vectors


@dataclass
class LoadedModel:
    """Everything the pipeline needs from a checkpoint.

    ``pool_ops`` maps each store pooling name the family offers (``mean``, ``max``, ``cls``,
    ``official``, ...) to a :class:`~cellstrata.kernels.PoolSpec` op (``mean``, ``max``, ``first``,
    ``first_l2``, ``from_end:K``); these are all computed by one kernel launch per layer.
    ``custom_poolings`` holds the poolings that need more (their own width, a norm first).
    ``checkpoint`` describes the files (path, sha256, ...).
    """

    family: str
    preset: str | None
    model: torch.nn.Module
    tokenizer: Tokenizer
    config: Mapping[str, Any]
    layout: SpecialLayout
    pool_ops: Mapping[str, str]
    default_poolings: tuple[str, ...]
    checkpoint: dict[str, Any] = field(default_factory=dict)
    custom_poolings: Mapping[str, CustomPooling] = field(default_factory=dict)
    official_layer: int | None = None  # the layer the official extractor reads ``official`` from

    @property
    def pooling_names(self) -> tuple[str, ...]:
        """Every pooling this model offers (kernel poolings first)."""
        return (*self.pool_ops, *(n for n in self.custom_poolings if n not in self.pool_ops))

    @property
    def n_layers(self) -> int:
        return int(cast(CellModel, self.model).n_layers)

    @property
    def hidden_size(self) -> int:
        return int(cast(CellModel, self.model).hidden_size)


class ModelFamily(Protocol):
    """The object a family module exports as ``FAMILY``."""

    name: str
    presets: Mapping[str, Any]
    default_poolings: tuple[str, ...]

    def load(
        self, checkpoint: str | Path, *, device: torch.device | str = "cpu", **tokenizer_options: Any
    ) -> LoadedModel:
        """Load the official checkpoint folder (weights only, never pickled code)."""
        ...

    def init_checkpoint(
        self, preset: str, out: str | Path, *, seed: int = 0, genes: Sequence[str] | None = None
    ) -> Path:
        """Write random weights for ``preset`` in the official file layout; return the folder."""
        ...
