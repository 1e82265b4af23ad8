"""Geneformer's tokenizer: rank value encoding as ``TranscriptomeTokenizer.tokenize_anndata``.

Gene mapping goes through :class:`~cellstrata.engine.models.family.VocabularyTokenizer` (exact match, then
case-folded, then the symbol dictionary; a warning names duplicate columns); the vectorised
:meth:`GeneformerTokenizer.tokenize` and the per-cell :meth:`GeneformerTokenizer.tokenize_reference` give
the same tokens.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from ...errors import CheckpointError, ConfigError, InvalidValuesError
from ..base import TOP_RANKED, GeneMapping, TokenizedBlock, canonical_rows, concat_blocks, row_pieces
from ..family import VocabularyTokenizer, looks_like_ensembl
from .config import (
    CLS_TOKEN,
    DUPLICATE_GENES,
    EOS_TOKEN,
    FAMILY_NAME,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    STORED_ZEROS,
    TARGET_SUM,
    TOKENIZER_VERSION,
)

if TYPE_CHECKING:
    from ...input.sources import CellBlock


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


def has_special_tokens(token: Mapping[str, int]) -> bool:
    """Does a token dictionary hold ``<cls>`` and ``<eos>`` (V2, ``<cls> genes <eos>``) or not (V1)?"""
    return CLS_TOKEN in token and EOS_TOKEN in token


class DuplicateGenesWarning(UserWarning):
    """Several input columns resolve to one Geneformer gene (kept as separate tokens or summed)."""


class GeneformerTokenizer(VocabularyTokenizer):
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

    title = "Geneformer"
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
        self.special = has_special_tokens(token)
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
        self._keys: tuple[list[Any], list[str | None]] | None = None  # gene_ids -> after_mapping

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

    def gene_ids(self, names: list[Any]) -> np.ndarray:
        """Token id of each input identifier (``-1``: none), by :meth:`_key_of`; the ids matched exactly are
        kept for :meth:`after_mapping` (``sum_ensembl_ids``' collapse decision)."""
        keys: list[str | None] = []
        ids = np.full(len(names), -1, dtype=np.int64)
        for j, g in enumerate(names):
            key, tok = self._key_of(g) if isinstance(g, str) else (None, -1)
            keys.append(key)
            ids[j] = tok
        self._keys = (names, keys)
        return ids

    def after_mapping(self, names: list[Any], mapping: GeneMapping) -> None:
        """Decide the layout of this mapping (collapsed or not) and warn about duplicate columns."""
        if self._keys is None or self._keys[0] is not names:
            self.gene_ids(names)
        assert self._keys is not None
        keys, self._keys = self._keys[1], None
        ids = mapping.token_ids
        # sum_ensembl_ids collapses when the ids found as given in the mapping map onto fewer ids
        exact = {k for k in keys if k is not None}
        merges = len(exact) != len({self._resolve[k] for k in exact})
        collapse = merges or self.duplicate_genes == "sum"
        self._collapse[ids.tobytes()] = collapse
        self._cached = (mapping, _layout(ids, collapse=collapse))
        self._warn_duplicates(names, ids, collapse, merges)

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
        warnings.warn(msg, DuplicateGenesWarning, stacklevel=4)

    def vocabulary_examples(self) -> str:
        return f"holds Ensembl ids, e.g. {', '.join(self._example_ids)}"

    def mismatch_hint(self, names: list[Any]) -> str:
        if looks_like_ensembl(names, threshold=min(50, len(names) // 2)):
            return " The input looks like Ensembl ids, but none is in this model's dictionary."
        if self._symbols is None:
            return (
                " The input looks like gene symbols; this checkpoint folder has no symbol dictionary "
                "(gene_name_id_dict*.pkl) to translate them."
            )
        return ""

    def matching_rule(self) -> str:
        return (
            "Geneformer expects Ensembl gene ids: pick the column of adata.var that holds them with --gene-column, "
            "e.g. --gene-column ensembl_id (Python: gene_column=...)."
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
            assert self.cls_id is not None and self.eos_id is not None
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
                assert self.cls_id is not None and self.eos_id is not None
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
