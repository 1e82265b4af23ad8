"""scGPT's tokenizer: official binning of each cell's expressed genes, vectorised over a block.

See the package docstring for the official path it reproduces and its one deliberate difference (counter-based
draws, so a cell's tokens do not depend on its batch, block or order).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from ...errors import ConfigError, InvalidValuesError
from .. import base
from ..base import GeneMapping, TokenizedBlock
from ..counter_rng import RNG_NAME, bits_at, cell_keys, random_order, random_subset, to_uniform, uniform
from ..family import VocabularyTokenizer, looks_like_ensembl
from .config import (
    CLS_TOKEN,
    FAMILY_NAME,
    OFFICIAL_MAX_LENGTH,
    OFFICIAL_N_BINS,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    SUBSET_STREAM,
    TIE_STREAM,
    TOKENIZER_VERSION,
)

if TYPE_CHECKING:
    from ...input.sources import CellBlock


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


def bin_edges_digits(
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
    """:func:`bin_edges_digits` in sorted order: ``(origin, left, right)``.

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


class ScGPTTokenizer(VocabularyTokenizer):
    """Official scGPT input preparation (see the package docstring), seeded per cell.

    Per cell: the expressed (non-zero; stored zeros dropped) vocabulary genes in column order, each
    value binned against quantiles of the cell's own expressed values (``n_bins - 1`` edges, random
    tie-break), ``<cls>`` first with value ``pad_value``; cells longer than ``max_length`` keep ``<cls>``
    plus a random subset in random order.
    """

    truncation_rule = base.RANDOM_SUBSAMPLE
    title = "scGPT"

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
        limits = (
            (max_length, 2, f"scGPT max_length must be >= 2 (<cls> plus at least one gene), got {max_length}"),
            (seed, 0, f"seed must be a non-negative integer, got {seed}"),
            (n_bins, 2, f"n_bins must be >= 2, got {n_bins}"),
        )
        for value, least, msg in limits:
            if int(value) < least:
                raise ConfigError(msg)
        absent = [tok for tok in (pad_token, CLS_TOKEN) if tok not in vocab]
        if absent:
            msg = f"the scGPT vocabulary has no {absent[0]!r} token"
            raise ConfigError(msg)
        self.vocab: dict[str, int] = dict(vocab)
        self.vocab_size = len(self.vocab)  # special tokens included
        self.vocab_sha256 = _vocab_sha256(self.vocab)
        self._specials = {t for t in (*SPECIAL_TOKENS, pad_token) if t in self.vocab}
        self.pad_token = pad_token
        self.pad_id = int(vocab[pad_token])
        self.cls_id = int(vocab[CLS_TOKEN])
        self.pad_value = float(pad_value)  # also the value of <cls>
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.n_bins = int(n_bins)

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
            "vocab_size": self.vocab_size,
            "vocab_sha256": self.vocab_sha256,
        }

    @property
    def n_vocab_genes(self) -> int:
        return len(self.vocab) - len(self._specials)

    # gene mapping (VocabularyTokenizer.map_genes): exact symbols, special tokens never match
    def gene_ids(self, names: list[Any]) -> np.ndarray:
        get = self.vocab.get
        return np.fromiter(
            (get(g, -1) if isinstance(g, str) and g not in self._specials else -1 for g in names),
            dtype=np.int64,
            count=len(names),
        )

    def vocabulary_examples(self) -> str:
        by_id = sorted(self.vocab.items(), key=lambda kv: kv[1])
        return "holds e.g.: " + ", ".join([t for t, _ in by_id if t not in self._specials][:5])

    def mismatch_hint(self, names: list[Any]) -> str:
        return " The input looks like Ensembl ids;" if looks_like_ensembl(names, threshold=50) else ""

    def matching_rule(self) -> str:
        return (
            "scGPT matches genes by gene symbol: pick the column of adata.var that holds symbols with "
            "--gene-column (Python: gene_column=...)."
        )

    def _expressed(
        self, X: sp.csr_matrix, indices: np.ndarray, mapping: GeneMapping
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every cell's expressed vocabulary genes, cell after cell: ``(genes, values, rows, counts, indices)``."""
        n_cells = X.shape[0]
        tok = mapping.token_ids[X.indices]
        data = np.asarray(X.data).astype(np.float32, copy=False)  # official: torch .float()
        keep = (tok >= 0) & (data != 0)  # np.nonzero of the dense row: stored zeros are no tokens
        selector, counts = base.kept_entries(X.indptr, keep)
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
        X, indices = base.canonical_rows(block, mapping)
        return base.concat_blocks([self._tokenize_rows(Xp, ip, mapping) for Xp, ip in base.row_pieces(X, indices)])

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
        return base.leading_token_block(
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
        X, indices = base.canonical_rows(block, mapping)
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
                cell_n = np.array([cell]), np.zeros(n, dtype=np.int64), np.array([n])  # one cell of n genes
                sel = random_order(self.seed, SUBSET_STREAM, *cell_n)[:n_keep]
                g, digits = g[sel], digits[sel]
                truncated[i] = True
            genes_out.append(np.concatenate(([self.cls_id], g)).astype(np.int64))
            values_out.append(np.concatenate(([self.pad_value], digits)).astype(np.float32))
        return TokenizedBlock(indices.copy(), genes_out, values_out, truncated, counts == 0, n_expressed=counts)
