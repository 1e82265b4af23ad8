"""scFoundation's tokenizer: the official ``get_embedding.py`` single-cell input preparation.

:class:`ScFoundationTokenizer` matches genes by symbol against the gene list (through
:class:`~cellstrata.engine.models.family.VocabularyTokenizer`), normalises each cell, appends the T and S
resolution tokens and gathers the expressed genes as ``load.gatherData`` does, vectorised over a block
(:meth:`~ScFoundationTokenizer.tokenize`) and restated one cell at a time
(:meth:`~ScFoundationTokenizer.tokenize_reference`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from ...errors import ConfigError, InvalidValuesError
from ..base import (
    NO_TRUNCATION,
    RANDOM_SUBSAMPLE,
    GeneMapping,
    TokenizedBlock,
    canonical_rows,
    concat_blocks,
    row_pieces,
)
from ..counter_rng import RNG_NAME, random_bits, random_order
from ..family import VocabularyTokenizer, looks_like_ensembl
from .config import (
    DEFAULT_TGTHIGHRES,
    FAMILY_NAME,
    GENE_LIST_FILE,
    MAX_LOG1P_VALUE,
    PRE_NORMALIZED,
    SUBSET_STREAM,
    TOKENIZER_VERSION,
)

if TYPE_CHECKING:
    from ...input.sources import CellBlock


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


class ScFoundationTokenizer(VocabularyTokenizer):
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

    title = "scFoundation"
    vocabulary_name = "gene list"

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
    @property
    def n_vocab_genes(self) -> int:
        return self.n_genes

    def gene_ids(self, names: list[Any]) -> np.ndarray:
        """Input columns -> gene-list index by symbol; a symbol seen again maps to -1 (first one wins)."""
        get = self.index.get
        ids = np.fromiter((get(g, -1) if isinstance(g, str) else -1 for g in names), dtype=np.int64, count=len(names))
        hit = np.flatnonzero(ids >= 0)
        if len(hit):
            _, first = np.unique(ids[hit], return_index=True)
            repeated = np.setdiff1d(hit, hit[first], assume_unique=True)
            ids[repeated] = -1
        return ids

    def vocabulary_examples(self) -> str:
        return f"holds e.g.: {', '.join(self.genes[:5])}"

    def mismatch_hint(self, names: list[Any]) -> str:
        ensembl = looks_like_ensembl(names, threshold=min(50, len(names) // 2))
        return " The input looks like Ensembl ids;" if ensembl else ""

    def matching_rule(self) -> str:
        return (
            f"scFoundation matches genes by HGNC gene symbol ({GENE_LIST_FILE}): pick the column of adata.var "
            "that holds symbols with --gene-column (Python: gene_column=...)."
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
            rows, genes, values = sort_by_gene(rows, genes, values, self.n_genes)
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


def sort_by_gene(
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
