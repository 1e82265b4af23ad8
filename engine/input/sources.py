"""Read cells from AnnData inputs as row blocks, never loading the whole matrix.

:func:`open_source` accepts an ``.h5ad`` file, an AnnData ``.zarr`` directory (zarr format 2 or 3) or an
in-memory :class:`anndata.AnnData` (dense, sparse or backed) and returns a :class:`CellSource`. On disk,
only the pieces a block needs are read: the row slice of ``indptr`` and the matching slices of ``data``
and ``indices`` (CSR), the row slice of a dense array, or — for column-compressed (CSC) matrices, which
cannot be sliced by row — a bounded column-wise scan of the file per window of rows (slow; a warning
says so). ``anndata.read_h5ad(backed="r")`` is deliberately *not* used: it loads ``layers``, ``obsm`` and
``uns`` into memory. A source keeps the path and options, so it can be pickled and reopened in another
process (open handles are dropped and reopened lazily).

:func:`check_values` validates a block's values (finite, non-negative, and integer counts when the model
needs raw counts), vectorised over the CSR ``data``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError, InvalidValuesError, NotCountsError, UnreadableInputError


@dataclass
class CellBlock:
    """Rows ``indices`` (global cell indices, ascending) of the input as CSR ``X [n, n_genes]``.

    ``layer`` is the matrix the rows come from (None for ``X``) and ``layers`` the matrices the source
    offers (used by :func:`check_values` to suggest a counts layer).
    """

    indices: np.ndarray
    X: sp.csr_matrix
    layer: str | None = None
    layers: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class DuplicateNames:
    """Names that occur more than once in ``where`` (``obs_names``, ``var_names`` or a var column).

    ``extra``: entries whose name occurred before (0 when every name is unique); ``repeated``: how many
    distinct names occur more than once; ``shown``: the first few of them, in input order, with their counts.
    """

    where: str
    extra: int = 0
    repeated: int = 0
    shown: tuple[tuple[str, int], ...] = ()

    def __bool__(self) -> bool:
        return self.extra > 0

    def describe(self, unit: str) -> str:
        """e.g. ``2 names occur more than once in obs_names (3 extra cells): c1 (2 times), c7 (3 times)``."""
        listed = ", ".join(f"{name} ({n} times)" for name, n in self.shown)
        more = f" and {self.repeated - len(self.shown)} more" if self.repeated > len(self.shown) else ""
        names = "name occurs" if self.repeated == 1 else "names occur"
        units = unit if self.extra == 1 else f"{unit}s"
        return f"{self.repeated} {names} more than once in {self.where} ({self.extra} extra {units}): {listed}{more}"


def duplicate_names(names: Sequence[Any] | np.ndarray, where: str, show: int = 5) -> DuplicateNames:
    """The repeated entries of ``names`` (compared as strings)."""
    index = pd.Index(np.asarray(names, dtype=object).astype(str))
    dup = index.duplicated(keep="first")
    extra = int(dup.sum())
    if not extra:
        return DuplicateNames(where)
    repeated = pd.unique(index[dup])
    counts = index.value_counts()
    shown = tuple((str(name), int(counts[name])) for name in repeated[:show])
    return DuplicateNames(where, extra, len(repeated), shown)


class SlowInputWarning(UserWarning):
    """The input's storage layout makes row-block reading slow (a column-compressed matrix)."""


#: Layer names that hold raw counts by convention; offered as suggestions by :func:`check_values`.
COUNT_LAYER_NAMES: tuple[str, ...] = ("counts", "raw_counts", "count", "umi", "umis", "raw")

_EXPECTED = "expected an AnnData .h5ad file or an AnnData .zarr directory"
_CSC_WINDOW_NNZ = 1 << 23  # entries decoded per window of rows when scanning a CSC matrix
_HASH_CHUNK = 1 << 16


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def open_source(data: Any, *, layer: str | None = None, gene_column: str | None = None) -> CellSource:
    """Open ``data`` (a path to ``.h5ad``/``.zarr``, an AnnData, or a CellSource) for row-block reading.

    ``layer``: None for ``X``, a name in ``layers``, or ``"raw"`` for ``raw.X`` (with ``raw.var``).
    ``gene_column``: a ``var`` column holding the gene identifiers (default: ``var_names``).
    """
    if isinstance(data, CellSource):
        if layer is not None or gene_column is not None:
            if (layer, gene_column) == (data.layer, data.gene_column):
                return data
            raise InputError("open_source: pass layer/gene_column when opening the input, not for an open source")
        return data
    if isinstance(data, (str, os.PathLike)):
        return _FileSource(data, layer=layer, gene_column=gene_column)
    import anndata as ad

    if isinstance(data, ad.AnnData):
        if data.isbacked and not data.is_view:
            return _FileSource(data.filename, layer=layer, gene_column=gene_column)
        return _MemorySource(data, layer=layer, gene_column=gene_column)
    raise InputError(f"cannot read input of type {type(data).__name__}: {_EXPECTED}, or an AnnData object")


def check_values(block: CellBlock, *, require_counts: bool, layers: Sequence[str] | None = None) -> None:
    """Raise if ``block`` holds negative/NaN/inf values, or non-integers when ``require_counts``.

    ``layers`` overrides ``block.layers`` as the list of matrices the input offers (for the suggestion
    in :class:`~cellstrata.engine.errors.NotCountsError`).
    """
    X = block.X
    data = X.data
    if data.size == 0:
        return
    lo, hi = data.min(), data.max()
    if not (lo >= 0 and hi < np.inf):  # NaN fails both comparisons
        bad = ~np.isfinite(data) | (data < 0)
        pos = int(np.argmax(bad))
        row, value = _row_of(X, pos), data[pos]
        kind = "NaN" if np.isnan(value) else "infinite" if np.isinf(value) else "negative"
        raise InvalidValuesError(
            f"cell {int(block.indices[row])} has a {kind} expression value ({float(value):g}, gene column "
            f"{int(X.indices[pos])}; {int(bad.sum())} invalid value(s) in cells {_span(block)}): "
            "the expression matrix must hold finite values >= 0"
        )
    if not require_counts:
        return
    nonint = data != np.rint(data)
    if not nonint.any():
        return
    pos = int(np.argmax(nonint))
    row, value = _row_of(X, pos), float(data[pos])
    looks = "log-transformed" if float(hi) <= 30 else "normalised"
    available = tuple(block.layers if layers is None else layers)
    candidates = [
        name
        for name in available
        if name != block.layer and (name.lower() in COUNT_LAYER_NAMES or "count" in name.lower())
    ]
    if candidates:
        hint = "use " + " or ".join(f"--layer {name}" for name in candidates) + " to read the raw counts"
    elif available:
        hint = f"choose a raw-count matrix with --layer (available: {', '.join(available)})"
    else:
        hint = "give the raw-count matrix (this input has no other layers)"
    raise NotCountsError(
        f"the model expects raw integer counts, but the matrix looks {looks} (max {float(hi):g}; "
        f"cell {int(block.indices[row])} has {value:g}): {hint}, or pass --allow-noncounts to proceed anyway"
    )


class CellSource:
    """Row-block reader over one expression matrix of an AnnData input.

    Attributes: ``n_cells``, ``n_genes``, ``gene_names`` (str array), ``obs_names`` (str array, all
    cells), ``path`` (resolved path or None in memory), ``layer``, ``gene_column``, ``layers`` (names
    of the matrices the input offers: its ``layers`` plus ``"raw"`` when ``raw.X`` exists), ``format``
    (``"h5ad"``, ``"zarr"`` or ``"memory"``), ``storage`` (``"csr"``, ``"csc"``, ``"dense"``, ...)
    and ``dtype`` (float32 or float64, the dtype of the blocks).
    """

    n_cells: int
    n_genes: int
    gene_names: np.ndarray
    path: str | None
    layer: str | None
    gene_column: str | None
    layers: tuple[str, ...]
    format: str
    storage: str
    dtype: np.dtype

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._fingerprint: dict[str, Any] | None = None
        self._duplicates: tuple[DuplicateNames, DuplicateNames] | None = None

    # -- reading -------------------------------------------------------------------------------
    @property
    def obs_names(self) -> np.ndarray:
        """Cell identifiers of every cell, in input order (object array of str)."""
        raise NotImplementedError

    def read(self, start: int, stop: int) -> CellBlock:
        """Rows ``[start, stop)`` as a :class:`CellBlock` (CSR float32, or float64 when stored so)."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_cells:
            raise ValueError(f"rows [{start}, {stop}) out of range for {self.n_cells} cells")
        if start == stop:
            X = sp.csr_matrix((0, self.n_genes), dtype=self.dtype)
        else:
            X = _as_float_csr(self._read_rows(start, stop), (stop - start, self.n_genes))
        return CellBlock(np.arange(start, stop, dtype=np.int64), X, layer=self.layer, layers=self.layers)

    def iter_blocks(self, block_size: int, start: int = 0, stop: int | None = None) -> Iterator[CellBlock]:
        """Consecutive blocks of at most ``block_size`` rows covering ``[start, stop)``."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        stop = self.n_cells if stop is None else stop
        if not 0 <= start <= stop <= self.n_cells:
            raise ValueError(f"rows [{start}, {stop}) out of range for {self.n_cells} cells")
        for s in range(start, stop, block_size):
            yield self.read(s, min(s + block_size, stop))

    def read_obs(self, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """The ``obs`` table (all columns, or ``columns``), indexed by ``obs_names``."""
        raise NotImplementedError

    def duplicates(self) -> tuple[DuplicateNames, DuplicateNames]:
        """Repeated cell names (``obs_names``) and repeated gene identifiers (``var_names`` or ``gene_column``)."""
        if self._duplicates is None:
            genes = "var_names" if self.gene_column is None else f"var column {self.gene_column!r}"
            self._duplicates = (
                duplicate_names(self.obs_names, "obs_names"),
                duplicate_names(self.gene_names, genes),
            )
        return self._duplicates

    def fingerprint(self) -> dict[str, Any]:
        """Cheap deterministic identity of the input (path, shape, options, sha256 of cell and gene names)."""
        if self._fingerprint is None:
            self._fingerprint = {
                "path": self.path,
                "n_cells": int(self.n_cells),
                "n_genes": int(self.n_genes),
                "layer": self.layer,
                "gene_column": self.gene_column,
                "obs_names_sha256": _hash_names(self.obs_names),
                "gene_names_sha256": _hash_names(self.gene_names),
            }
        return dict(self._fingerprint)

    # -- lifecycle -----------------------------------------------------------------------------
    def _read_rows(self, start: int, stop: int) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Release open file handles (a later read reopens them)."""

    def __enter__(self) -> CellSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n_cells

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "in memory"
        layer = "X" if self.layer is None else self.layer
        return (
            f"CellSource({self.format}: {where}, {layer}, {self.n_cells} cells x {self.n_genes} genes, {self.storage})"
        )


# --------------------------------------------------------------------------------------------------
# Files: .h5ad (h5py) and .zarr (zarr v2/v3)
# --------------------------------------------------------------------------------------------------


class _FileSource(CellSource):
    """A matrix in an ``.h5ad`` file or AnnData ``.zarr`` store, read lazily through h5py or zarr."""

    path: str

    def __init__(self, path: str | os.PathLike[str], *, layer: str | None, gene_column: str | None) -> None:
        super().__init__()
        p = Path(path).expanduser()
        if not p.exists():
            raise UnreadableInputError(f"input not found: {p} ({_EXPECTED})")
        self.path = str(p.resolve())
        self.layer, self.gene_column = layer, gene_column
        self.format = "zarr" if p.is_dir() else "h5ad"
        self._root: Any = None
        self._matrix: Any = None
        self._obs_names: np.ndarray | None = None
        try:
            root = self._open_root()
            self._inspect(root)
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------------
    def _open_root(self) -> Any:
        if self._root is not None:
            return self._root
        if self.format == "zarr":
            import zarr

            try:
                root = zarr.open_group(self.path, mode="r")
            except Exception as err:
                raise UnreadableInputError(
                    f"cannot read {self.path}: not a zarr store ({_one_line(err)}); {_EXPECTED}"
                ) from err
        else:
            import h5py

            try:
                is_hdf5 = h5py.is_hdf5(self.path)
            except OSError as err:
                raise UnreadableInputError(f"cannot read {self.path}: {_one_line(err)}; {_EXPECTED}") from err
            if not is_hdf5:
                raise UnreadableInputError(
                    f"cannot read {self.path}: not an HDF5 file (no HDF5 signature); {_EXPECTED}"
                )
            try:
                root = h5py.File(self.path, "r", rdcc_nbytes=64 << 20)
            except OSError as err:
                raise UnreadableInputError(
                    f"cannot read {self.path}: the HDF5 file is truncated or corrupt ({_one_line(err)}); {_EXPECTED}"
                ) from err
        self._root = root
        return root

    def _inspect(self, root: Any) -> None:
        """Validate the layout once and record shape, names and options (no matrix values are read)."""
        try:
            self._inspect_unchecked(root)
        except InputError:
            raise
        except Exception as err:  # h5py/zarr/anndata errors on a damaged file
            raise UnreadableInputError(
                f"cannot read {self.path}: the file is corrupt or not AnnData ({_one_line(err)}); {_EXPECTED}"
            ) from err

    def _inspect_unchecked(self, root: Any) -> None:
        keys = set(root.keys())
        layer_group: Any = root["layers"] if "layers" in keys and _is_group(root["layers"]) else None
        layer_names = tuple(layer_group.keys()) if layer_group is not None else ()
        has_raw = "raw" in keys and _is_group(root["raw"]) and "X" in root["raw"]
        self.layers = layer_names + (("raw",) if has_raw else ())
        if "obs" not in keys or "var" not in keys or ("X" not in keys and not self.layers):
            raise UnreadableInputError(f"cannot read {self.path}: {_not_anndata_reason(root, keys)}; {_EXPECTED}")

        if self.layer is None:
            if "X" not in keys:
                raise UnreadableInputError(
                    f"cannot read {self.path}: the AnnData has no X matrix; choose one with --layer "
                    f"(available: {', '.join(self.layers)})"
                )
            node, var_group, where = root["X"], root["var"], "X"
        elif self.layer in layer_names and not (self.layer == "raw" and has_raw):
            node, var_group, where = layer_group[self.layer], root["var"], f"layers/{self.layer}"
        elif self.layer == "raw" and has_raw:
            raw = root["raw"]
            if "var" not in raw:
                raise UnreadableInputError(f"cannot read {self.path}: raw has no var table (corrupt file)")
            node, var_group, where = raw["X"], raw["var"], "raw/X"
        else:
            raise InputError(f"layer {self.layer!r} not found in {self.path}; {_available_layers(self.layers)}")
        self._where = where

        n_obs = _index_length(root["obs"], self.path, "obs")
        n_var = _index_length(var_group, self.path, "raw/var" if where == "raw/X" else "var")
        self._matrix = _disk_matrix(node, where, self.path)
        shape = self._matrix.shape
        if shape != (n_obs, n_var):
            raise UnreadableInputError(
                f"cannot read {self.path}: {where} has shape {shape} but obs/var describe {(n_obs, n_var)} "
                "(corrupt file)"
            )
        self.n_cells, self.n_genes = int(shape[0]), int(shape[1])
        self.storage = self._matrix.storage
        self.dtype = _float_dtype(self._matrix.value_dtype)
        self.gene_names = _read_gene_names(var_group, self.gene_column, self.path, where)
        if self.storage == "csc":
            warnings.warn(
                f"{where} in {self.path} is stored column-wise (CSC): reading cells scans the whole matrix "
                "once per window of rows, which is slow for large inputs; convert it once to CSR "
                "(adata.X = adata.X.tocsr(); adata.write_h5ad(...)) for fast streaming",
                SlowInputWarning,
                stacklevel=5,
            )

    def _ensure_matrix(self) -> _DiskMatrix:
        """The row reader, reopening the file after unpickling or :meth:`close`."""
        with self._lock:
            if self._matrix is None:
                root = self._open_root()
                try:
                    node = root
                    for part in self._where.split("/"):
                        node = node[part]
                    matrix = _disk_matrix(node, self._where, self.path)
                except InputError:
                    raise
                except Exception as err:
                    raise UnreadableInputError(f"cannot reopen {self._where} in {self.path}: {_one_line(err)}") from err
                if matrix.shape != (self.n_cells, self.n_genes):
                    raise UnreadableInputError(
                        f"{self.path} changed since it was opened: {self._where} is now {matrix.shape}, "
                        f"was {(self.n_cells, self.n_genes)}"
                    )
                self._matrix = matrix
            return self._matrix

    # -- reading -------------------------------------------------------------------------------
    @property
    def obs_names(self) -> np.ndarray:
        if self._obs_names is None:
            with self._lock:
                root = self._open_root()
                try:
                    self._obs_names = _read_index(root["obs"])
                except Exception as err:
                    raise UnreadableInputError(
                        f"cannot read the cell names (obs index) of {self.path}: {_one_line(err)}"
                    ) from err
        return self._obs_names

    def read_obs(self, columns: Iterable[str] | None = None) -> pd.DataFrame:
        from anndata.io import read_elem

        with self._lock:
            obs = self._open_root()["obs"]
            available = [str(c) for c in _attr_list(obs, "column-order")]
            wanted = available if columns is None else list(columns)
            missing = [c for c in wanted if c not in available]
            if missing:
                raise InputError(
                    f"obs column(s) {', '.join(map(repr, missing))} not found in {self.path}; "
                    f"available: {', '.join(available) or 'none'}"
                )
            frame = pd.DataFrame({c: read_elem(obs[c]) for c in wanted}, index=pd.Index(self.obs_names))
        return frame

    def _read_rows(self, start: int, stop: int) -> Any:
        matrix = self._ensure_matrix()
        try:
            with self._lock:
                return matrix.read(start, stop)
        except InputError:
            raise
        except Exception as err:
            raise UnreadableInputError(
                f"cannot read cells {start}-{stop - 1} of {self._where} in {self.path}: the file looks "
                f"corrupt or truncated ({_one_line(err)})"
            ) from err

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        root, self._root, self._matrix = self._root, None, None
        if root is not None and hasattr(root, "close"):
            root.close()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_root=None, _matrix=None, _obs_names=None)
        return state


def _disk_matrix(node: Any, where: str, path: str) -> _DiskMatrix:
    """Wrap an h5py/zarr node holding a matrix in the matching row reader."""
    attrs = _attrs(node)
    if _is_group(node):
        encoding = str(attrs.get("encoding-type", attrs.get("h5sparse_format", "")))
        shape = attrs.get("shape", attrs.get("h5sparse_shape"))
        if encoding in ("csr_matrix", "csr") and shape is not None:
            return _CSRMatrix(node, (int(shape[0]), int(shape[1])))
        if encoding in ("csc_matrix", "csc") and shape is not None:
            return _CSCMatrix(node, (int(shape[0]), int(shape[1])))
        raise UnreadableInputError(
            f"cannot read {where} in {path}: unsupported matrix encoding {encoding or 'unknown'!r} "
            "(expected a CSR/CSC sparse matrix or a dense array)"
        )
    if len(node.shape) != 2:
        raise UnreadableInputError(f"cannot read {where} in {path}: expected a 2-D matrix, got shape {node.shape}")
    return _DenseMatrix(node)


class _DiskMatrix:
    """Row-slice reader over a matrix stored in an HDF5 or zarr node."""

    shape: tuple[int, int]
    storage: str
    value_dtype: np.dtype

    def read(self, start: int, stop: int) -> Any:
        raise NotImplementedError


class _CSRMatrix(_DiskMatrix):
    """CSR group: reads ``indptr[start:stop+1]`` and the matching ``data``/``indices`` slices only."""

    storage = "csr"

    def __init__(self, group: Any, shape: tuple[int, int]) -> None:
        self.data, self.indices, self.indptr = group["data"], group["indices"], group["indptr"]
        self.shape, self.value_dtype = shape, np.dtype(self.data.dtype)
        nnz = self.data.shape[0]
        if self.indptr.shape[0] != shape[0] + 1 or self.indices.shape[0] != nnz:
            raise ValueError(f"CSR arrays do not match shape {shape}")
        if int(self.indptr[shape[0]]) != nnz:
            raise ValueError(f"indptr ends at {int(self.indptr[shape[0]])} but data holds {nnz} values")

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        indptr = np.asarray(self.indptr[start : stop + 1], dtype=np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        data = np.asarray(self.data[lo:hi])
        indices = np.asarray(self.indices[lo:hi])
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self.shape[1]))


class _CSCMatrix(_DiskMatrix):
    """CSC group: decodes a window of rows with one bounded column-wise scan, then serves blocks from it."""

    storage = "csc"

    def __init__(self, group: Any, shape: tuple[int, int]) -> None:
        self.data, self.indices = group["data"], group["indices"]
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self.shape, self.value_dtype = shape, np.dtype(self.data.dtype)
        if self.indptr.shape[0] != shape[1] + 1 or int(self.indptr[-1]) != self.data.shape[0]:
            raise ValueError(f"CSC arrays do not match shape {shape}")
        self._window: tuple[int, int, sp.csr_matrix] | None = None

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        w = self._window
        if w is None or not (w[0] <= start and stop <= w[1]):
            nnz = max(int(self.indptr[-1]), 1)
            per_row = nnz / max(self.shape[0], 1)
            rows = max(stop - start, int(_CSC_WINDOW_NNZ / max(per_row, 1e-9)))
            w_stop = min(self.shape[0], start + rows)
            self._window = w = (start, w_stop, self._scan(start, w_stop))
        return w[2][start - w[0] : stop - w[0]]

    def _scan(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` of the CSC matrix, reading the columns in pieces of bounded size."""
        rows_out, cols_out, vals_out = [], [], []
        n_cols, ip = self.shape[1], self.indptr
        c0 = 0
        while c0 < n_cols:
            limit = ip[c0] + _CSC_WINDOW_NNZ
            c1 = max(c0 + 1, int(np.searchsorted(ip, limit, side="right")) - 1)
            c1 = min(c1, n_cols)
            lo, hi = int(ip[c0]), int(ip[c1])
            if hi > lo:
                rows = np.asarray(self.indices[lo:hi])
                keep = (rows >= start) & (rows < stop)
                if keep.any():
                    cols = np.repeat(np.arange(c0, c1, dtype=np.int64), np.diff(ip[c0 : c1 + 1]))
                    rows_out.append(rows[keep] - start)
                    cols_out.append(cols[keep])
                    vals_out.append(np.asarray(self.data[lo:hi])[keep])
            c0 = c1
        shape = (stop - start, n_cols)
        if not rows_out:
            return sp.csr_matrix(shape, dtype=self.value_dtype)
        coo = sp.coo_matrix((np.concatenate(vals_out), (np.concatenate(rows_out), np.concatenate(cols_out))), shape)
        return coo.tocsr()


class _DenseMatrix(_DiskMatrix):
    """Dense 2-D dataset/array: reads ``node[start:stop]``."""

    storage = "dense"

    def __init__(self, node: Any) -> None:
        self.node = node
        self.shape = (int(node.shape[0]), int(node.shape[1]))
        self.value_dtype = np.dtype(node.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.node[start:stop])


# --------------------------------------------------------------------------------------------------
# In-memory AnnData
# --------------------------------------------------------------------------------------------------


class _MemorySource(CellSource):
    """A matrix of an in-memory AnnData (dense, sparse, dask, or the backed X of a non-view AnnData)."""

    def __init__(self, adata: Any, *, layer: str | None, gene_column: str | None) -> None:
        super().__init__()
        if adata.isbacked:
            raise InputError(
                "a view of a backed AnnData cannot be streamed; pass the backed AnnData itself, its path, "
                "or call .to_memory() on the view"
            )
        self.path, self.format, self.layer, self.gene_column = None, "memory", layer, gene_column
        layer_names = tuple(str(k) for k in adata.layers)
        has_raw = adata.raw is not None
        self.layers = layer_names + (("raw",) if has_raw else ())
        if layer is None:
            matrix, var = adata.X, adata.var
            if matrix is None:
                raise InputError(
                    f"the AnnData has no X matrix; choose one with --layer ({_available_layers(self.layers)})"
                )
        elif layer in layer_names and not (layer == "raw" and has_raw):
            matrix, var = adata.layers[layer], adata.var
        elif layer == "raw" and has_raw:
            matrix, var = adata.raw.X, adata.raw.var
        else:
            raise InputError(f"layer {layer!r} not found in the AnnData; {_available_layers(self.layers)}")
        if sp.issparse(matrix) and matrix.format != "csr":
            matrix = sp.csr_matrix(matrix)  # CSC/COO cannot be sliced by row cheaply: one conversion
        self._matrix = matrix
        self.n_cells, self.n_genes = int(matrix.shape[0]), int(matrix.shape[1])
        if sp.issparse(matrix):
            self.storage = "csr"
        else:
            self.storage = "dense" if isinstance(matrix, np.ndarray) else type(matrix).__name__.lower()
        self.dtype = _float_dtype(np.dtype(matrix.dtype))
        self._obs_names = np.asarray(adata.obs_names.astype(str), dtype=object)
        self._obs = adata.obs
        if gene_column is None:
            self.gene_names = np.asarray(var.index.astype(str), dtype=object)
        elif gene_column in var.columns:
            self.gene_names = _as_str_array(var[gene_column].to_numpy())
        else:
            raise InputError(
                f"gene column {gene_column!r} not found in var; available columns: "
                f"{', '.join(map(str, var.columns)) or 'none'}"
            )

    @property
    def obs_names(self) -> np.ndarray:
        return self._obs_names

    def read_obs(self, columns: Iterable[str] | None = None) -> pd.DataFrame:
        wanted = list(self._obs.columns) if columns is None else list(columns)
        missing = [c for c in wanted if c not in self._obs.columns]
        if missing:
            raise InputError(
                f"obs column(s) {', '.join(map(repr, missing))} not found; available: "
                f"{', '.join(map(str, self._obs.columns)) or 'none'}"
            )
        return self._obs[wanted].copy()

    def _read_rows(self, start: int, stop: int) -> Any:
        rows = self._matrix[start:stop]
        if hasattr(rows, "compute"):  # dask
            rows = rows.compute()
        return rows


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _as_float_csr(x: Any, shape: tuple[int, int]) -> sp.csr_matrix:
    """``x`` (sparse or dense rows) as a ``csr_matrix`` of float32, or float64 when stored as float64."""
    if sp.issparse(x):
        out = x if isinstance(x, sp.csr_matrix) else sp.csr_matrix(x)
    else:
        out = sp.csr_matrix(np.asarray(x))
    if out.shape != shape:
        raise ValueError(f"read {out.shape} rows, expected {shape}")
    target = _float_dtype(out.dtype)
    if out.dtype != target:
        out = out.astype(target)
    return out


def _float_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _row_of(X: sp.csr_matrix, pos: int) -> int:
    return int(np.searchsorted(X.indptr, pos, side="right")) - 1


def _span(block: CellBlock) -> str:
    return f"{int(block.indices[0])}-{int(block.indices[-1])}" if len(block) else "(none)"


def _hash_names(names: np.ndarray) -> str:
    """sha256 of the names, each UTF-8 encoded and NUL-terminated."""
    h = hashlib.sha256()
    for i in range(0, len(names), _HASH_CHUNK):
        chunk = names[i : i + _HASH_CHUNK]
        h.update(("\0".join(map(str, chunk)) + "\0").encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _available_layers(layers: Sequence[str]) -> str:
    return f"available layers: {', '.join(layers)}" if layers else "the input has no layers and no raw"


def _is_group(node: Any) -> bool:
    import h5py
    import zarr

    return isinstance(node, (h5py.Group, zarr.Group))


def _attrs(node: Any) -> dict[str, Any]:
    return {str(k): v for k, v in node.attrs.items()}


def _attr_list(group: Any, key: str) -> list[Any]:
    value = _attrs(group).get(key, [])
    if isinstance(value, (str, bytes)):
        return [value]
    return list(np.asarray(value).tolist()) if len(value) else []


def _not_anndata_reason(root: Any, keys: set[str]) -> str:
    """Why an HDF5/zarr root is not AnnData, with a hint for the formats people confuse it with."""
    if "matrix" in keys and _is_group(root["matrix"]):
        return "this looks like a 10x Genomics .h5 file, not AnnData (convert it with scanpy.read_10x_h5)"
    if "matrix" in keys and "row_attrs" in keys:
        return "this looks like a .loom file, not AnnData (convert it with anndata.read_loom)"
    missing = [k for k in ("X", "obs", "var") if k not in keys]
    return f"no {'/'.join(missing)} in the file, so it is not AnnData"


def _index_length(df_group: Any, path: str, where: str) -> int:
    if not _is_group(df_group):
        raise UnreadableInputError(
            f"cannot read {path}: {where} is in a legacy AnnData layout; re-save the file with a current anndata"
        )
    name = _attrs(df_group).get("_index")
    if name is None or name not in df_group:
        raise UnreadableInputError(f"cannot read {path}: {where} has no index (corrupt file)")
    return int(df_group[name].shape[0])


def _read_index(df_group: Any) -> np.ndarray:
    from anndata.io import read_elem

    return _as_str_array(read_elem(df_group[_attrs(df_group)["_index"]]))


def _read_gene_names(var_group: Any, gene_column: str | None, path: str, where: str) -> np.ndarray:
    from anndata.io import read_elem

    if gene_column is None:
        return _read_index(var_group)
    columns = [str(c) for c in _attr_list(var_group, "column-order")]
    if gene_column not in columns:
        table = "raw.var" if where == "raw/X" else "var"
        raise InputError(
            f"gene column {gene_column!r} not found in {table} of {path}; available columns: "
            f"{', '.join(columns) or 'none'}"
        )
    return _as_str_array(read_elem(var_group[gene_column]))


def _as_str_array(values: Any) -> np.ndarray:
    """Any 1-D column (ndarray, Categorical, pandas array) as an object array of str."""
    if isinstance(values, np.ndarray) and values.dtype == object and all(isinstance(v, str) for v in values):
        return values
    return np.asarray(pd.Series(values).astype(str).to_numpy(), dtype=object)
