"""Tahoe-X1's tokenizer: gene mapping, the official binning (vectorised and per cell) and over-long cells.

Per cell, as ``data.dataloader.CountDataset`` + ``data.collator.DataCollator`` (``do_mlm=False``,
``binning``) of ``tahoebio/tahoe-x1``; the stored-zeros rule and the counter-based subset are described in
the package docstring.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch

from ...errors import ConfigError, InvalidValuesError
from ..base import (
    RANDOM_SUBSAMPLE,
    TokenizedBlock,
    canonical_rows,
    concat_blocks,
    kept_entries,
    leading_token_block,
    row_pieces,
)
from ..counter_rng import RNG_NAME, random_order, random_subset
from ..family import VocabularyTokenizer, looks_like_ensembl
from .config import (
    CLS_TOKEN,
    FAMILY_NAME,
    INFERENCE_MAX_LENGTH,
    PAD_TOKEN,
    STORED_ZEROS,
    SUBSET_STREAM,
    TOKENIZER_VERSION,
)

if TYPE_CHECKING:
    from ...input.sources import CellBlock
    from ..base import GeneMapping


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


def is_special(token: str) -> bool:
    """Is ``token`` a special token rather than a gene?"""
    return token.startswith("<")  # the collator's rule for non-gene tokens (<pad>, <cls>, <drug>, <junkN>)


class TahoeX1Tokenizer(VocabularyTokenizer):
    """Official Tahoe-X1 input preparation (see the package docstring), seeded per cell.

    Per cell (``CountDataset.__getitem__`` + ``DataCollator.__call__``): the stored vocabulary entries
    (explicit zeros included) in column order with their raw counts, ``<cls>`` first with value
    ``pad_value``; every value after the first ``keep_first_n_tokens`` tokens binned against the
    quantiles of the non-zero ones, a zero in bin 1 (``binning``); cells longer than ``max_length`` keep
    their first ``keep_first_n_tokens`` tokens plus a random subset of the rest in random order
    (``_sample``). A cell with no non-zero vocabulary value is empty. ``stored_zeros="drop"`` reads only
    the non-zero entries (a departure, off by default).
    """

    title = "Tahoe-X1"
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
        self._genes = {t: i for t, i in self.vocab.items() if not is_special(t)}  # special tokens never match
        self.vocab_sha256 = _vocab_sha256(self.vocab)

    @property
    def n_vocab_genes(self) -> int:
        return len(self._genes)

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

    def gene_ids(self, names: list[Any]) -> np.ndarray:
        genes = self._genes
        return np.fromiter((genes.get(g, -1) if isinstance(g, str) else -1 for g in names), np.int64, len(names))

    def vocabulary_examples(self) -> str:
        return "holds e.g.: " + ", ".join(sorted(self._genes, key=self._genes.__getitem__)[:3])

    def mismatch_hint(self, names: list[Any]) -> str:
        return "" if looks_like_ensembl(names) else " The input looks like gene symbols, not Ensembl ids."

    def matching_rule(self) -> str:
        return (
            "Tahoe-X1 matches genes by Ensembl gene id: pick the column of adata.var that holds Ensembl ids "
            "with --gene-column (Python: gene_column=...), e.g. ensembl_id."
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
                rows = np.zeros(m, dtype=np.int64)
                order = random_order(self.seed, SUBSET_STREAM, np.array([cell]), rows, np.array([m]))
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
