"""The store format (docs/design.md section 3): create, validate, resume, read back.

A store is a zarr v3 group:

- ``pooled/<name>`` ``[L+1, N, W]`` float16/float32, chunks ``(1, C, W)``, dims ``(layer, cell, feature)``;
- ``obs_names`` ``[N]`` strings, ``n_tokens`` ``[N]`` int32, ``truncated`` ``[N]`` bool, chunks ``(C,)``;
- ``done`` ``[ceil(N/C)]`` uint8, chunks ``(1,)``: 1 once every array's chunk of that cell block is written;
- format 2: the coordinates ``cell`` (the names again, at the root and in ``pooled/``), ``pooled/layer``
  (0..L) and ``pooled/depth`` (layer / L), and the root's consolidated metadata, so ``xarray.open_zarr``
  alone gives labelled arrays without a warning;
- group attribute ``cellstrata``: format version, model, tokenizer, poolings, dtype, chunking, source,
  ``truncation`` (the context in tokens and how a longer cell is fitted to it), ``config_hash`` and,
  once finished, ``complete`` and the run's telemetry.

Only :mod:`engine.writer` writes data chunks; this module creates stores and reads them back. Stores of
format 1 are read, verified, exported and resumed (as format 1).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import socket
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from ..errors import (
    ConfigError,
    IncompleteStoreError,
    IncompleteStoreWarning,
    StoreConfigMismatchError,
    StoreCorruptError,
    StoreError,
)
from .checksums import CELL_COORDS, CHECKSUM, create_checksum_array
from .lease import LEASE_NODE, check_lease_folder
from .location import StoreLocation, member_array
from .metadata_backup import expected_nodes, metadata_problem, read_json, write_backup, write_json

FORMAT_VERSION = 2
FORMATS = (1, 2)  # the formats this version reads, resumes and verifies
# The config hash names format 1 whatever the layout: a format changes where the numbers are kept, not the
# numbers, so a format 1 store keeps its hash and the same command resumes it (as format 1).
HASHED_FORMAT = 1
ATTR_KEY = "cellstrata"
STORE_DTYPES = ("float16", "float32")
COMPRESSIONS = ("zstd", "lz4", "none")
TARGET_CHUNK_BYTES = 4 * 2**20
MAX_CHUNK_CELLS = 8192  # bounds the work lost to an interruption and the writer's memory for small models

log = logging.getLogger("cellstrata")


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that changes the stored numbers."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_chunk_cells(n_cells: int, width: int, dtype: str) -> int:
    """Cells per chunk: one ``(1, C, W)`` chunk of about 4 MB (a power of two in [64, 8192], at most N)."""
    itemsize = np.dtype(dtype).itemsize
    c = 2 ** math.floor(math.log2(max(TARGET_CHUNK_BYTES // (width * itemsize), 1)))
    return int(max(1, min(max(c, 64), MAX_CHUNK_CELLS, n_cells)))


def _compressors(compression: str) -> Any:
    if compression == "zstd":
        return BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)
    if compression == "lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)
    if compression == "none":
        return None
    msg = f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}"
    raise ConfigError(msg)


def feature_dim(name: str, width: int, hidden: int) -> str:
    """Dimension name of a pooling's last axis: ``feature`` unless its width differs from the hidden size."""
    return "feature" if width == hidden else f"feature_{name}"


@dataclass(frozen=True)
class StoreSpec:
    """Everything needed to create a store; ``attrs`` become the ``cellstrata`` group attribute."""

    n_cells: int
    n_layers: int
    hidden: int
    widths: Mapping[str, int]
    dtype: str
    chunk_cells: int
    compression: str
    attrs: Mapping[str, Any]

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_cells / self.chunk_cells)

    def chunk_bounds(self, c: int) -> tuple[int, int]:
        """Cells ``[start, stop)`` of chunk ``c``."""
        return c * self.chunk_cells, min((c + 1) * self.chunk_cells, self.n_cells)

    def cells_in(self, chunks: Sequence[int] | np.ndarray) -> int:
        """Number of cells in ``chunks``."""
        return sum(stop - start for start, stop in map(self.chunk_bounds, chunks))


# Source attributes recorded but not hashed: the path, and the counts of repeated names (the names
# themselves are hashed; stores written before the counts existed keep their hash).
SOURCE_UNHASHED = ("path", "duplicate_obs_names", "duplicate_var_names")

LAYER_INDEX = "0 = embedding output; k = output of block k (1-based), before any final norm"


def store_attributes(
    *,
    model: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    pool_ops: Mapping[str, str],
    layout: Sequence[int],
    dtype: str,
    precision: str,
    chunk_cells: int,
    n_cells: int,
    empty_cells: str,
    source: Mapping[str, Any],
    official_layer: int | None,
    pool_backend: str,
    gene_overlap: Mapping[str, int],
    engine_version: str,
    **extra: Any,
) -> dict[str, Any]:
    """The ``cellstrata`` group attribute of a new store, ``config_hash`` included.

    The hash covers what changes the stored numbers: the model without its checkpoint path, the
    tokenizer, the pooling ops, the layout, dtype, precision, chunking, cell count, empty-cell policy
    and the source without its path and repeated-name counts (:data:`SOURCE_UNHASHED`). ``extra`` keys are
    recorded but not hashed.
    """
    numbers = {
        "format_version": HASHED_FORMAT,
        "model": {k: v for k, v in model.items() if k != "checkpoint"},
        "tokenizer": dict(tokenizer),
        "poolings": dict(pool_ops),
        "layout": list(layout),
        "dtype": dtype,
        "precision": precision,
        "chunk_cells": chunk_cells,
        "n_cells": n_cells,
        "empty_cells": empty_cells,
        "source": {k: v for k, v in source.items() if k not in SOURCE_UNHASHED},
    }
    return {
        "format_version": FORMAT_VERSION,
        "model": dict(model),
        "tokenizer": dict(tokenizer),
        "poolings": list(pool_ops),
        "official_layer": official_layer,
        "pool_ops": dict(pool_ops),
        "dtype": dtype,
        "precision": precision,
        "pool_backend": pool_backend,
        "chunk_cells": chunk_cells,
        "n_cells": n_cells,
        "empty_cells": empty_cells,
        "gene_overlap": dict(gene_overlap),
        "source": dict(source),
        "engine_version": engine_version,
        "config_hash": config_hash(numbers),
        "layer_index": LAYER_INDEX,
        **extra,
    }


def describe_truncation(
    n_truncated: int,
    n_cells: int,
    max_length: int | None,
    rule: str | None,
    *,
    genes_median: float | None = None,
    genes_max: int | None = None,
) -> str:
    """One line on the cells longer than the model's context, e.g. ``37 of 500 cells truncated to 256 tokens
    (random subsample, seeded per cell)``, with the expressed genes those cells had when known."""
    if max_length is None:
        return f"{n_truncated} of {n_cells} cells truncated (no context limit: every expressed gene is a token)"
    how = f"({rule})" if rule else "(rule not recorded in this store)"
    line = f"{n_truncated} of {n_cells} cells truncated to {max_length} tokens {how}"
    if n_truncated and genes_median is not None and genes_max is not None:
        line += f"; expressed genes of those cells: median {genes_median:g}, max {genes_max}"
    return line


def _is_store(location: StoreLocation) -> bool:
    try:
        group = location.open_group("r")
    except Exception:
        return False
    return ATTR_KEY in group.attrs


def _hash_of(group: zarr.Group) -> str | None:
    return dict(cast(Mapping[str, Any], group.attrs.get(ATTR_KEY, {}))).get("config_hash")


# Creation marker: the first file a store's creation writes and the last it deletes, so a folder left by a
# creation that was cut short (killed before the group's attributes were written) says whose it is.
CREATING_FILE = ".cellstrata-creating"
CREATING_KEY = "cellstrata_creating"
CREATING_PREFIX = b'{"cellstrata_creating": {"run": "'  # how every marker starts (json.dumps of _marker's dict)
# the nodes of a store that cellstrata writes: its arrays and groups, the probe cache (probes.runner's
# CACHE_GROUP) and the metadata backup; the lease (engine.lease) takes care of its own file
STORE_NODES = ("pooled", "obs_names", "cell", "n_tokens", "truncated", "done", CHECKSUM, "probes", "metadata_backup")


# zarr's local store writes each file as ``<stem>.<uuid4 hex>.partial`` and renames it into place; a kill
# between the two leaves that temporary file behind (``zarr.json`` -> ``zarr.<hex>.partial``, chunk ``3``
# -> ``3.<hex>.partial``).
_PARTIAL_WRITE = re.compile(r"^(zarr|\d+)\.[0-9a-f]{32}\.partial$")


def partial_write(rel: str) -> bool:
    """Whether ``rel`` is a temporary file that zarr left when a write to a store file was cut short."""
    head, _, name = rel.rpartition("/")
    match = _PARTIAL_WRITE.match(name)
    if match is None:
        return False
    stem = "zarr.json" if match.group(1) == "zarr" else match.group(1)
    return owned_file(f"{head}/{stem}" if head else stem, partial=False)


def owned_file(rel: str, *, partial: bool = True) -> bool:
    """Whether ``rel`` (a path inside a store) is one of the files a cellstrata store is made of.

    Those are the root ``zarr.json``, the creation marker and, under :data:`STORE_NODES`, each node's
    ``zarr.json`` and its chunks (``c/<i>/<j>/...``), and (``partial``) zarr's temporary files of those
    left by a cut-short write. A replaced or recreated store deletes these and nothing else: any other
    file in the folder is the user's.
    """
    if partial and partial_write(rel):
        return True
    parts = rel.split("/")
    if rel in ("zarr.json", CREATING_FILE):
        return True
    if len(parts) < 2 or parts[0] not in STORE_NODES:
        return False
    if parts[-1] == "zarr.json":
        return True
    if "c" in parts[1:-1]:
        tail = parts[parts.index("c", 1) + 1 :]
        return all(t.isdigit() for t in tail)
    return False


def _remove_partial_writes(location: StoreLocation) -> None:
    """Delete the temporary files that zarr left in the store's own folders when a run was killed mid-write.

    Only local folders have them (zarr's local store writes through a temporary file), and only files named
    as zarr names them next to a file the store is made of are deleted; readers would otherwise warn about
    an unrecognised object at every listing.
    """
    if location.is_local:
        location.remove_files([rel for rel in location.files() if partial_write(rel)])


def is_marker_bytes(raw: bytes) -> bool:
    """Whether ``raw`` is a creation marker, whole or cut short by a killed run."""
    return raw.startswith(CREATING_PREFIX) or CREATING_PREFIX.startswith(raw)


def _marker(run: str, want: str) -> bytes:
    body = {
        "run": run,
        "config_hash": want,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return json.dumps({CREATING_KEY: body}).encode()


def _marker_of(location: StoreLocation) -> dict[str, Any] | None:
    """The creation marker of ``location``: None if there is none (or the file is not one), ``{}`` if cut short."""
    raw = location.read_bytes(CREATING_FILE)
    if raw is None or not is_marker_bytes(raw):
        return None
    try:
        return dict(json.loads(raw)[CREATING_KEY])
    except (ValueError, KeyError, TypeError):
        return {}


def _foreign(location: StoreLocation) -> str:
    return f"{location} exists and is not a cellstrata store; choose another --out (nothing was changed)"


def _inspect(location: StoreLocation) -> tuple[str, dict[str, Any] | None]:
    """What ``location`` holds: ``("new" | "creating" | "store", marker)``; raises :class:`StoreError` if foreign.

    ``new``: nothing, an empty folder, or one that holds only a cellstrata lease. ``creating``: a store
    whose creation (or replacement) was cut short: its marker is there. ``store``: a cellstrata store.
    Anything else is foreign and refused: a file, a folder of other files, a zarr group without the
    ``cellstrata`` attribute, a ``lease/`` that is not a cellstrata lease.
    """
    if not location.exists():
        return "new", None
    if not location.is_dir():
        raise StoreError(_foreign(location))
    names = set(location.names())
    if LEASE_NODE in names:
        check_lease_folder(location)
    if CREATING_FILE in names:
        marker = _marker_of(location)
        if marker is None:  # a file of that name that cellstrata did not write
            raise StoreError(_foreign(location))
        return "creating", marker
    if names <= {LEASE_NODE}:
        return "new", None
    if _is_store(location):
        return "store", None
    problem = metadata_problem(location.url)  # a store whose root zarr.json is damaged: say so, change nothing
    if problem is not None:
        raise StoreCorruptError(problem)
    raise StoreError(_foreign(location))


def refuse_foreign(path: str | Path | StoreLocation) -> None:
    """Raise :class:`StoreError` (nothing changed) unless ``path`` is new, empty, a store or one being created.

    The drivers call it before they take the lease, so a foreign ``--out`` is not written even briefly.
    """
    _inspect(StoreLocation.of(path))


def _creation_step(name: str) -> None:
    """Called after each step of a store's creation (a no-op); tests replace it to cut a creation short there."""


def create_or_resume(
    path: str | Path | StoreLocation, spec: StoreSpec, *, overwrite: bool = False
) -> tuple[zarr.Group, bool]:
    """Open ``path`` (a local path or a URL) for writing ``spec``; returns ``(group, resumed)``.

    An existing store with the same ``config_hash`` is resumed; one with another hash is refused unless
    ``overwrite``, which deletes only the files a store is made of (:func:`owned_file`; other files in the
    folder are kept). A location that exists but is not a cellstrata store is refused and never changed.
    A store whose creation was cut short (its marker is still there) is created again by the same
    command; if it was replacing a store with data of another configuration, only ``overwrite`` finishes
    that. The store's lease (:mod:`.lease`), if held, is kept.
    """
    location = StoreLocation.of(path)
    if spec.dtype not in STORE_DTYPES:
        msg = f"unknown store dtype {spec.dtype!r}; choose one of {', '.join(STORE_DTYPES)}"
        raise ConfigError(msg)
    want = spec.attrs["config_hash"]
    kind, marker = _inspect(location)
    if kind == "store":
        group = location.open_group("r+")
        have = _hash_of(group)
        if have == want:
            problem = metadata_problem(location.url)  # e.g. done/zarr.json cut short: say what to do
            if problem is not None:
                raise StoreCorruptError(problem)
            _remove_partial_writes(location)
            return group, True
        if not overwrite:
            old = dict(cast(Mapping[str, Any], group.attrs[ATTR_KEY]))
            changed = _tokenizer_change(old.get("tokenizer"), spec.attrs.get("tokenizer"))
            if changed:
                raise StoreConfigMismatchError(f"{location}: {changed}; re-run with --overwrite or a new --out")
            msg = (
                f"{location} was written with another configuration (model "
                f"{old.get('model', {}).get('family')}, poolings {old.get('poolings')}, dtype "
                f"{old.get('dtype')}, config {str(have)[:12]} vs {want[:12]}); pass --overwrite to replace it "
                "or choose another --out"
            )
            raise StoreConfigMismatchError(msg)
    elif kind == "creating":
        theirs = (marker or {}).get("config_hash")
        chunks = [f for f in location.files() if owned_file(f) and not f.endswith("zarr.json") and f != CREATING_FILE]
        if theirs != want and chunks and not overwrite:
            msg = (
                f"{location}: an earlier run was replacing this store (config {str(theirs)[:12]}) and was "
                f"interrupted; {len(chunks)} chunk files of the old store are left. Pass --overwrite to finish "
                "replacing it, or re-run that run's command"
            )
            raise StoreConfigMismatchError(msg)
        log.warning("%s: an earlier run was interrupted while it created this store; creating it again", location)
    return _create(location, spec), False


def _tokenizer_change(old: Any, new: Any) -> str | None:
    """``tokenizer A -> B: why`` when a store of the same family was written by another tokenizer version."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return None
    before, after = old.get("version"), new.get("version")
    if before is None or before == after or old.get("family") != new.get("family"):
        return None
    why = "the per-cell random draws changed" if old.get("rng") != new.get("rng") else "its rules changed"
    return f"tokenizer {before} -> {after}: {why}"


def _clear(location: StoreLocation) -> None:
    """Delete the files of a store (or of a creation cut short) at ``location``: :func:`owned_file` ones only.

    ``done`` goes first, so a store whose replacement is cut short here has no committed chunk left.
    """
    owned = [f for f in location.files() if owned_file(f) and f != CREATING_FILE]
    owned.sort(key=lambda f: (not f.startswith("done/"), f == "zarr.json"))
    if owned:
        location.remove_files(owned)
    for node in STORE_NODES:
        location.remove_empty_dirs(node)


def _create(location: StoreLocation, spec: StoreSpec) -> zarr.Group:
    """Create the store: the marker first, then the old store's files go, the nodes, the attributes, the marker.

    Until the attributes are written the marker names the folder as a cellstrata store being created,
    so a creation cut short at any step is created again by the next run (:func:`_inspect`).
    """
    version = spec.attrs.get("format_version", FORMAT_VERSION)
    if version not in FORMATS:
        msg = f"store format {version!r} cannot be written; this cellstrata writes formats {FORMATS}"
        raise ConfigError(msg)
    comp = _compressors(spec.compression)
    c = spec.chunk_cells
    run = uuid.uuid4().hex
    location.write_bytes(CREATING_FILE, _marker(run, spec.attrs["config_hash"]))
    _creation_step("marker")
    _clear(location)
    _creation_step("clear")
    group = location.open_group("a", zarr_format=3)  # "a": keep the lease and any file of the user's
    _creation_step("group")
    # format 2: xarray reads the non-index coordinate ``depth`` of the group from this attribute
    pooled = group.create_group("pooled", attributes={"coordinates": "depth"} if version >= 2 else None)
    _creation_step("pooled")
    for name, width in spec.widths.items():
        pooled.create_array(
            name,
            shape=(spec.n_layers + 1, spec.n_cells, width),
            chunks=(1, c, width),
            dtype=spec.dtype,
            compressors=comp,
            fill_value=np.nan,
            dimension_names=("layer", "cell", feature_dim(name, width, spec.hidden)),
        )
        _creation_step(f"pooled/{name}")
    group.create_array("obs_names", shape=(spec.n_cells,), chunks=(c,), dtype=str, dimension_names=("cell",))
    _creation_step("obs_names")
    if version >= 2:
        _create_coordinates(group, spec)
    group.create_array(
        "n_tokens", shape=(spec.n_cells,), chunks=(c,), dtype="int32", fill_value=0, dimension_names=("cell",)
    )
    _creation_step("n_tokens")
    group.create_array(
        "truncated", shape=(spec.n_cells,), chunks=(c,), dtype="bool", fill_value=False, dimension_names=("cell",)
    )
    _creation_step("truncated")
    group.create_array(
        "done", shape=(spec.n_chunks,), chunks=(1,), dtype="uint8", fill_value=0, dimension_names=("cell_chunk",)
    )
    _creation_step("done")
    create_checksum_array(group, list(spec.widths), spec.n_layers, spec.n_chunks, format_version=version)
    _creation_step(CHECKSUM)
    attrs = dict(spec.attrs)
    attrs.update(created=datetime.now(timezone.utc).isoformat(timespec="seconds"), complete=False)
    group.attrs[ATTR_KEY] = attrs
    _creation_step("attributes")
    write_consolidated(group)
    write_backup(group)  # a copy of every zarr.json, from which --verify --repair restores a damaged one
    if (_marker_of(location) or {}).get("run") == run:  # the marker this creation wrote goes last
        location.remove_file(CREATING_FILE)
    _creation_step("created")
    return group


def layer_values(n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``layer`` (0..L, int64) and ``depth`` (layer / L, float64) coordinates of a model with L blocks."""
    layer = np.arange(n_layers + 1, dtype=np.int64)
    return layer, layer / max(n_layers, 1)


def _create_coordinates(group: zarr.Group, spec: StoreSpec) -> None:
    """Format 2: the ``cell`` coordinate at the root and in ``pooled/`` (filled by the writer with the names,
    chunk by chunk), and ``pooled/layer`` / ``pooled/depth`` (written here: they follow from L alone)."""
    for node in CELL_COORDS:
        group.create_array(
            node, shape=(spec.n_cells,), chunks=(spec.chunk_cells,), dtype=str, dimension_names=("cell",)
        )
        _creation_step(node)
    layer, depth = layer_values(spec.n_layers)
    describe: dict[str, Any] = {"long_name": "layer", "description": LAYER_INDEX}
    arr = group.create_array(
        "pooled/layer", shape=layer.shape, chunks=layer.shape, dtype="int64", fill_value=-1,
        dimension_names=("layer",), attributes=describe,
    )  # fmt: skip
    arr[:] = layer
    _creation_step("pooled/layer")
    describe = {"long_name": "relative depth", "description": "layer / L: 0 = embedding output, 1 = last block"}
    arr = group.create_array(
        "pooled/depth", shape=depth.shape, chunks=depth.shape, dtype="float64", fill_value=np.nan,
        dimension_names=("layer",), attributes=describe,
    )  # fmt: skip
    arr[:] = depth
    _creation_step("pooled/depth")


def format_of(group: zarr.Group) -> int:
    """The store format of ``group`` (its ``format_version`` attribute; 1 when absent)."""
    return int(dict(cast(Mapping[str, Any], group.attrs.get(ATTR_KEY, {}))).get("format_version", 1))


def name_arrays(group: zarr.Group) -> tuple[str, ...]:
    """The arrays that hold the cell names in ``group``'s format: ``obs_names`` and, from format 2 on, the
    ``cell`` coordinates of the root and of ``pooled/``; :mod:`engine.writer` writes the names into each."""
    return ("obs_names", *CELL_COORDS) if format_of(group) >= 2 else ("obs_names",)


_INLINE = {"kind": "inline", "must_understand": False}


def write_consolidated(group: zarr.Group) -> None:
    """Format 2: put a copy of the data nodes' metadata into the root ``zarr.json`` (zarr's consolidated
    metadata), so ``xarray.open_zarr`` opens the store in one read and without a warning.

    Only the nodes of docs/design.md section 3 are listed (:func:`.metadata_backup.expected_nodes`): their
    metadata never changes after creation. The probe cache, the metadata backup and the lease change, so
    they are left out, and cellstrata itself opens stores without consolidated metadata
    (:meth:`.location.StoreLocation.open_group`). Written again after every change of the root's attributes
    (zarr drops it when a group opened without it writes them). A format 1 store is left as it was.
    """
    root = group.store_path
    meta, _ = read_json(root, "")
    attrs = (meta or {}).get("attributes", {}).get(ATTR_KEY)
    if meta is None or not isinstance(attrs, dict) or int(attrs.get("format_version", 1)) < 2:
        return
    nodes: dict[str, Any] = {}
    for node in expected_nodes(attrs):
        copy, _ = read_json(root, node)
        if copy is None:  # a damaged node: --verify reports it; readers then miss only that node
            continue
        if copy.get("node_type") == "group":
            copy["consolidated_metadata"] = {**_INLINE, "metadata": {}}  # its children are listed here, flat
        nodes[node] = copy
    meta["consolidated_metadata"] = {**_INLINE, "metadata": nodes}
    write_json(root, "zarr.json", meta)


def pending_chunks(group: zarr.Group) -> np.ndarray:
    """Indices of the chunks whose ``done`` flag is 0."""
    return np.flatnonzero(np.asarray(member_array(group, "done")[:]) == 0)


def update_attrs(group: zarr.Group, **values: Any) -> None:
    """Merge ``values`` into the ``cellstrata`` attribute (and its copy in the metadata backup)."""
    attrs = dict(cast(Mapping[str, Any], group.attrs[ATTR_KEY]))
    attrs.update(values)
    group.attrs[ATTR_KEY] = attrs
    write_consolidated(group)
    write_backup(group)


class Store:
    """Read side of a store: lazy dask views per pooling, xarray, completeness."""

    def __init__(self, path: str | Path | StoreLocation):
        self.location = StoreLocation.of(path)
        self.path = self.location.url  # a local absolute path or a URL
        try:
            self.group = self.location.open_group("r")
        except Exception as err:  # zarr raises several types for a non-store path
            problem = metadata_problem(self.path)  # a store whose root zarr.json is damaged: what to do
            if problem is not None:
                raise StoreCorruptError(problem) from None
            msg = f"{self.path} is not a readable zarr store ({type(err).__name__}); check the path"
            raise StoreError(msg) from None
        if ATTR_KEY not in self.group.attrs:
            msg = f"{self.path} is a zarr group but not a cellstrata store (no '{ATTR_KEY}' attribute)"
            raise StoreError(msg)
        self.attrs: dict[str, Any] = dict(cast(Mapping[str, Any], self.group.attrs[ATTR_KEY]))
        self._warned: set[int] = set()  # committed-chunk counts already warned about
        version = self.attrs.get("format_version")
        if version not in FORMATS:
            msg = (
                f"{self.path} has store format {version}; this cellstrata reads formats "
                f"{', '.join(map(str, FORMATS))}: upgrade cellstrata to read it"
            )
            raise StoreError(msg)
        self.format_version = int(version)

    @property
    def poolings(self) -> list[str]:
        return list(self.attrs["poolings"])

    @property
    def n_cells(self) -> int:
        return int(self.attrs["n_cells"])

    @property
    def n_layers(self) -> int:
        return int(self.attrs["model"]["n_layers"])

    @property
    def chunk_cells(self) -> int:
        return int(self.attrs["chunk_cells"])

    @property
    def done(self) -> np.ndarray:
        return np.asarray(member_array(self.group, "done")[:])

    @property
    def complete(self) -> bool:
        """Whether every cell chunk is committed, read from the ``done`` flags now (a store being written
        changes); a reader trusts only committed chunks."""
        return bool(self.done.all())

    @property
    def is_complete(self) -> bool:
        """Same as :attr:`complete`."""
        return self.complete

    @property
    def committed(self) -> np.ndarray:
        """Boolean mask ``[N]`` of the cells whose chunk is committed (``done[c] == 1``), read now."""
        return self._cells_of(self.done)

    def _cells_of(self, done: np.ndarray) -> np.ndarray:
        return np.repeat(np.asarray(done, dtype=bool), self.chunk_cells)[: self.n_cells]

    def _warn_incomplete(self, done: np.ndarray) -> None:
        """Warn once per store object and state that uncommitted cells read as NaN."""
        n_done = int(np.count_nonzero(done))
        if n_done in self._warned:
            return
        self._warned.add(n_done)
        cells = int(self._cells_of(done).sum())
        msg = (
            f"{self.path} is incomplete: {n_done} of {done.size} cell chunks ({cells} of {self.n_cells} cells) "
            f"are committed; the other {self.n_cells - cells} cells read as NaN. Re-run the same extract command "
            "to finish it, or pass committed_only=True to read the committed cells only (Store.committed is their mask)"
        )
        warnings.warn(msg, IncompleteStoreWarning, stacklevel=3)

    def require_complete(self) -> None:
        """Raise :class:`IncompleteStoreError` unless every chunk is committed."""
        done = self.done
        if not done.all():
            msg = (
                f"{self.path} is incomplete: {int(done.sum())} of {done.size} cell chunks are written; "
                "re-run the same extract command to finish it"
            )
            raise IncompleteStoreError(msg)

    def layers(self, pooling: str, *, committed_only: bool = False) -> Any:
        """Dask array ``[L+1, N, W]`` of one pooling (lazy; reads only the chunks you compute).

        On an incomplete store (interrupted, or still being written) the cells of uncommitted chunks read
        as NaN, without reading those chunks, and an :class:`~.errors.IncompleteStoreWarning` says how many
        are committed; the ``done`` flags are read once, at this call. ``committed_only=True`` returns
        ``[L+1, n, W]`` with the committed cells only (in store order; :attr:`committed` is their mask).
        """
        arr = self._pooled(pooling)
        done = self.done
        if done.all():
            return arr
        if committed_only:
            return arr[:, self._cells_of(done)]
        self._warn_incomplete(done)
        return self._nan_uncommitted(arr, done)

    def _pooled(self, pooling: str) -> Any:
        import dask.array as da

        if pooling not in self.poolings:
            msg = f"pooling {pooling!r} is not in {self.path}; it has {', '.join(self.poolings)}"
            raise StoreError(msg)
        return da.from_zarr(member_array(self.group, "pooled", pooling))

    def _nan_uncommitted(self, arr: Any, done: np.ndarray) -> Any:
        """``arr`` with the cells of uncommitted chunks as NaN: committed runs are slices of ``arr``, the others
        lazy NaN blocks on the same chunk grid, so uncommitted chunks are never read."""
        import dask.array as da

        c, n = self.chunk_cells, self.n_cells
        flags = np.asarray(done, dtype=bool)
        edges = [0, *(np.flatnonzero(np.diff(flags)) + 1).tolist(), flags.size]
        pieces = []
        for a, b in itertools.pairwise(edges):
            lo, hi = a * c, min(b * c, n)
            if flags[a]:
                pieces.append(arr[:, lo:hi])
            else:
                shape = (arr.shape[0], hi - lo, arr.shape[2])
                pieces.append(da.full(shape, np.nan, dtype=arr.dtype, chunks=(1, c, arr.shape[2])))
        return da.concatenate(pieces, axis=1)

    def obs_names(self) -> np.ndarray:
        return np.asarray(member_array(self.group, "obs_names")[:]).astype(object).astype(str)

    def truncation(self) -> dict[str, Any]:
        """Cells longer than the model's context, counted over the committed chunks of the ``truncated`` array.

        Returns ``truncated`` and ``cells`` (committed cells), ``max_length`` and ``rule`` (from the
        store's ``truncation`` attribute, or the context from the tokenizer settings of a store written
        before it existed; ``rule`` is then None) and, when the last run's telemetry covers every truncated
        cell, ``genes_median``/``genes_max``: the expressed genes those cells had before truncation.
        """
        done = self.done.astype(bool)
        committed = np.repeat(done, self.chunk_cells)[: self.n_cells]
        flags = np.asarray(member_array(self.group, "truncated")[:], dtype=bool)
        n_truncated = int((flags & committed).sum())
        recorded = self.attrs.get("truncation") or {}
        out: dict[str, Any] = {
            "truncated": n_truncated,
            "cells": int(committed.sum()),
            "max_length": recorded.get("max_length", self.attrs.get("tokenizer", {}).get("max_length")),
            "rule": recorded.get("rule"),
            "genes_median": None,
            "genes_max": None,
        }
        t = self.attrs.get("telemetry") or {}
        if t.get("truncated_cells") == n_truncated and t.get("truncated_genes_max") is not None:
            out["genes_median"] = t.get("truncated_genes_median")
            out["genes_max"] = t.get("truncated_genes_max")
        return out

    def to_xarray(self, *, committed_only: bool = False) -> Any:
        """One ``xarray.Dataset`` with every pooling plus the per-cell arrays, lazily backed by dask.

        Coordinates: ``layer`` (0..L), ``depth`` (layer / L) on ``layer``, ``cell`` (the cell names, so
        ``ds.sel(layer=7, cell="AAACCTG-1")`` picks by label) and ``committed``, which marks the cells of
        committed chunks. A format 2 store carries the first three itself (``xarray.open_zarr`` reads them
        too); for a format 1 store they are made here. On an incomplete store the poolings of the other
        cells read as NaN (their names are empty, ``n_tokens`` 0) with an
        :class:`~.errors.IncompleteStoreWarning`, as :meth:`layers`; ``committed_only=True`` keeps the
        committed cells only.
        """
        import xarray as xr

        done = self.done
        # the per-cell group without its own ``cell`` index: the names are read once, from ``pooled/``
        drop = ["done", CHECKSUM, *(["cell"] if self.format_version >= 2 else [])]
        pooled = xr.open_zarr(self.path, group="pooled", consolidated=False)
        cells = xr.open_zarr(self.path, consolidated=False, drop_variables=drop)
        ds = xr.merge([pooled, cells], compat="override", join="override")
        committed = self._cells_of(done)
        if self.format_version < 2:
            layer, depth = layer_values(self.n_layers)
            ds = ds.assign_coords(cell=self.obs_names(), layer=layer, depth=("layer", depth))
        else:
            ds = ds.assign_coords(depth=ds["depth"].compute())  # L+1 numbers: shown, not a dask graph
        ds = ds.assign_coords(committed=("cell", committed))
        ds.attrs = {"cellstrata": json.dumps(self.attrs, default=str)}
        if done.all():
            return ds
        if committed_only:
            return ds.isel(cell=np.flatnonzero(committed))
        self._warn_incomplete(done)
        for name in self.poolings:
            ds[name] = ds[name].copy(data=self._nan_uncommitted(self._pooled(name), done))
        return ds

    def to_anndata(
        self,
        adata: Any,
        *,
        layers: int | str | Sequence[int] = "all",
        pooling: str | None = None,
        key: str | None = None,
        allow_incomplete: bool = False,
        copy: bool = False,
    ) -> Any:
        """Write ``layers`` of ``pooling`` into ``adata.obsm[f"{key}_L{layer}"]`` (float32, matched by
        ``obs_names``) with provenance in ``adata.uns["cellstrata"][key]``; see :func:`.export.to_anndata`."""
        from .export import to_anndata

        return to_anndata(
            self, adata, layers=layers, pooling=pooling, key=key, allow_incomplete=allow_incomplete, copy=copy
        )

    def summary(self) -> str:
        """Human-readable description (what ``cellstrata info`` prints)."""
        a = self.attrs
        m = a["model"]
        done = self.done
        widths = {n: member_array(self.group, "pooled", n).shape[2] for n in self.poolings}
        lines = [
            f"store       {self.path}",
            f"model       {m['family']} (preset {m.get('preset') or 'custom'}), {m['n_layers']} layers, "
            f"hidden {m['hidden']}; checkpoint {m.get('checkpoint')} sha256 {str(m.get('sha256'))[:12]}",
            f"cells       {a['n_cells']} in chunks of {a['chunk_cells']} "
            f"({done.size} chunks; {int(done.sum())} written)",
            "poolings    " + ", ".join(f"{n} [{m['n_layers'] + 1} x {a['n_cells']} x {w}]" for n, w in widths.items()),
            f"dtype       {a['dtype']}",
            f"source      {a['source'].get('path')} ({a['source'].get('n_cells')} x {a['source'].get('n_genes')})",
            f"config      {a['config_hash'][:16]}",
            f"status      {'complete' if done.all() else 'INCOMPLETE: re-run the same extract command to resume'}",
            f"checksums   {'per cell chunk (check: cellstrata info --verify)' if CHECKSUM in self.group else 'none'}",
        ]
        tr = self.truncation()
        lines.append(
            "truncation  "
            + describe_truncation(
                tr["truncated"],
                tr["cells"],
                tr["max_length"],
                tr["rule"],
                genes_median=tr["genes_median"],
                genes_max=tr["genes_max"],
            )
        )
        t = a.get("telemetry")
        if t:
            lines.append(
                f"last run    {t.get('cells', 0)} cells in {t.get('seconds', 0):.1f} s "
                f"({t.get('cells_per_s', 0):.1f} cells/s, {t.get('tokens_per_s', 0):.0f} tokens/s, "
                f"padding {100 * t.get('padding_fraction', 0):.1f}%)"
            )
            lines.append(
                f"pipeline    forward {t.get('forward_seconds', 0):.1f} s; the device waited "
                f"{t.get('input_wait_seconds', 0):.1f} s for input and {t.get('writer_wait_seconds', 0):.1f} s "
                "for the writer"
            )
            busy, fwd, wait = t.get("device_busy_fraction"), t.get("forward_fraction"), t.get("writer_wait_fraction")
            if busy is not None or fwd is not None:
                share = f"GPU busy {100 * busy:.0f}%" if busy is not None else f"forward pass {100 * fwd:.0f}%"
                lines.append(f"utilisation {share} of wall time, writer wait {100 * (wait or 0):.0f}% of wall time")
            c = t.get("cluster")
            if c:
                lines.append(
                    f"cluster     {c.get('workers')} Dask workers, {c.get('shards')} shards, "
                    f"model loaded {c.get('model_loads')} times in {c.get('worker_processes')} worker processes "
                    "(pipeline times summed over workers)"
                )
            if t.get("empty_cells"):
                lines.append(f"empty cells {t['empty_cells']} (gene poolings NaN, see README)")
            if t.get("float16_overflows"):
                lines.append(f"overflows   {t['float16_overflows']} float16 overflows: {t.get('overflow_layers')}")
        return "\n".join(lines)


def open_store(path: str | os.PathLike[str]) -> Store:
    """Open an extracted store (a local path or a URL such as ``s3://bucket/run.zarr``) for reading."""
    location = StoreLocation.of(path)
    if not location.exists():
        msg = f"{location} does not exist; pass the --out path of an extract run"
        raise StoreError(msg)
    return Store(location)
