"""Check a store against its checksums: find tampered, deleted or undecodable chunks, optionally reset them.

:func:`verify_store` checks the structure (every array of docs/design.md section 3 exists with its shape,
dtype and chunking, in the layout of the store's format, 1 or 2; a format 2 store's ``layer`` and ``depth``
coordinates hold their values), then reads every committed cell chunk back part by part (one pooling layer at
a time, a few chunks in parallel) and compares each part's digest with the one the writer recorded
(:mod:`engine.checksums`). ``repair=True`` sets ``done[c] = 0`` for every damaged chunk, so the same
extract command rewrites exactly those chunks. Everything is read through zarr, so any location zarr
opens can be verified.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import zarr
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage._common import StorePath

from ..errors import StoreCorruptError, StoreError
from .checksums import CELL_COORDS, CHECKSUM, digest, part_names
from .location import member_array
from .metadata_backup import BACKUP_NODE, MetadataDamage, metadata_damage, read_json, restore_metadata, store_path
from .store import ATTR_KEY, layer_values, update_attrs

MAX_LISTED = 20  # damaged chunks listed one per line by describe()


@dataclass
class DamagedChunk:
    """A committed cell chunk whose data does not match its checksums; ``parts`` maps part to reason.

    The part ``checksum`` is the chunk's checksum row itself (see :func:`_check_chunk` for the rule).
    """

    index: int
    start: int
    stop: int
    parts: dict[str, str]

    @property
    def checksum_row(self) -> bool:
        """True when the chunk's checksum row is damaged (its data cannot be verified)."""
        return CHECKSUM in self.parts

    def describe(self) -> str:
        by_reason: dict[str, list[str]] = {}
        for part, why in self.parts.items():
            by_reason.setdefault(why, []).append(part)
        parts = "; ".join(f"{_compact(names)} {why}" for why, names in by_reason.items())
        return f"chunk {self.index} (cells {self.start}-{self.stop - 1}): {parts}"


def _compact(parts: list[str]) -> str:
    """``pooled/mean/0, pooled/mean/1, pooled/mean/3, obs_names`` -> ``pooled/mean/[0-1,3], obs_names``."""
    layers: dict[str, list[int]] = {}
    out: list[str] = []
    for part in parts:
        name, layer = _array_of(part)
        if layer is None:
            out.append(part)
        else:
            if name not in layers:
                out.append(name)
            layers.setdefault(name, []).append(layer)
    return ", ".join(f"{p}/{_ranges(layers[p])}" if p in layers else p for p in out)


def _ranges(values: list[int]) -> str:
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    text = ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return text if len(runs) == 1 else f"[{text}]"


@dataclass
class VerifyReport:
    """What :func:`verify_store` found: chunk counts, damaged chunks, metadata and structural problems.

    ``metadata`` lists the nodes whose ``zarr.json`` is damaged (missing, empty, not JSON); ``restored`` those
    that ``repair`` wrote back from the store's metadata backup (:mod:`.metadata_backup`).
    """

    path: str
    n_chunks: int
    ok: int = 0
    pending: int = 0
    unchecked: int = 0
    damaged_chunks: list[DamagedChunk] = field(default_factory=list)
    structure: list[str] = field(default_factory=list)
    metadata: list[MetadataDamage] = field(default_factory=list)
    restored: list[MetadataDamage] = field(default_factory=list)
    has_checksums: bool = True
    repaired: bool = False

    @property
    def damaged(self) -> int:
        return len(self.damaged_chunks)

    @property
    def damaged_checksum_rows(self) -> int:
        return sum(d.checksum_row for d in self.damaged_chunks)

    @property
    def is_clean(self) -> bool:
        """True when nothing damaged was found (pending chunks are not damage; repaired damage was found)."""
        return not self.damaged_chunks and not self.structure and not self.metadata and not self.restored

    def _chunk_todo(self) -> str:
        rows = self.damaged_checksum_rows
        why = (
            f" ({rows} with a damaged checksum row: data that cannot be verified is rewritten, never trusted)"
            if rows
            else ""
        )
        return f"{self.damaged} damaged chunks{why}"

    def describe(self) -> str:
        """Multi-line human-readable report (what ``cellstrata info --verify`` prints): one line per finding."""
        rows = self.damaged_checksum_rows
        lines = [
            f"verify      {self.n_chunks} cell chunks: {self.ok} ok, {self.damaged} damaged"
            + (f" ({rows} with a damaged checksum row)" if rows else "")
            + f", {self.pending} pending (not yet written), {self.unchecked} unchecked"
        ]
        if not self.has_checksums:
            lines.append("            no checksums: only structure checked (store written before checksums existed)")
        lines += [f"restored    {d.file} ({d.reason}) from {BACKUP_NODE}/" for d in self.restored]
        lines += [f"metadata    {d.describe()}; {self._metadata_todo(d)}" for d in self.metadata]
        lines += [f"structure   {problem}" for problem in self.structure]
        lines += [f"damaged     {d.describe()}" for d in self.damaged_chunks[:MAX_LISTED]]
        if self.damaged > MAX_LISTED:
            lines.append(f"damaged     ... and {self.damaged - MAX_LISTED} more chunks")
        if self.damaged_chunks and self.repaired:
            lines.append(
                f"repaired    {self._chunk_todo()} marked as not written: re-run the same extract "
                "command to rewrite exactly those chunks"
            )
        elif self.damaged_chunks:
            lines.append(
                f"repair      run `cellstrata info {self.path} --verify --repair`, then the same extract "
                "command, to rewrite the damaged chunks"
            )
        if self.restored and not self.damaged_chunks and not self.structure and not self.metadata:
            lines.append(f"repaired    metadata restored; {self._after_restore()}")
        if self.structure:
            lines.append(
                "            the store's layout is damaged, which a re-run cannot rewrite: extract again into a "
                "new --out (or delete this store first)"
            )
        if self.is_clean:
            lines.append("result      no damage found")
        return "\n".join(lines)

    def _metadata_todo(self, d: MetadataDamage) -> str:
        if d.restorable:
            return f"`cellstrata info {self.path} --verify --repair` restores it from {BACKUP_NODE}/"
        return (
            "no copy of it exists (a store written before metadata backups): extract again into a new --out, "
            "or put back this file from a copy of the store"
        )

    def _after_restore(self) -> str:
        if self.pending:
            return f"re-run the same extract command to write the {self.pending} chunks not written"
        return "the store is whole again"

    def error_message(self) -> str:
        """One line for :class:`~.errors.StoreCorruptError`: what was found and what to do."""
        found = []
        if self.restored:
            found.append("restored " + ", ".join(f"{d.file} ({d.reason})" for d in self.restored))
        if self.metadata:
            found.append("damaged metadata: " + "; ".join(d.describe() for d in self.metadata))
        if self.structure:
            found.append("damaged layout (" + "; ".join(self.structure) + ")")
        if self.damaged_chunks:
            first = self.damaged_chunks[0].describe()
            more = f" (and {self.damaged - 1} more)" if self.damaged > 1 else ""
            rows = self.damaged_checksum_rows
            kind = f" ({rows} with a damaged checksum row)" if rows else ""
            found.append(f"{self.damaged} of {self.n_chunks} cell chunks damaged{kind}, first {first}{more}")
        todo = []
        if any(d.restorable for d in self.metadata):
            todo.append(f"run `cellstrata info {self.path} --verify --repair` to restore the metadata from its backup")
        if any(not d.restorable for d in self.metadata):
            todo.append("no backup of the damaged metadata exists: extract again into a new --out")
        if self.damaged_chunks and self.repaired:
            todo.append("the damaged chunks were marked as not written: re-run the same extract command")
        elif self.damaged_chunks:
            todo.append(f"run `cellstrata info {self.path} --verify --repair`, then re-run the same extract command")
        if self.structure:
            todo.append("extract again into a new --out (a re-run cannot rewrite a damaged layout)")
        if self.restored and not todo:
            todo.append(self._after_restore())
        return f"{self.path} is damaged: {', '.join(found)}; " + "; ".join(todo)


@dataclass
class _Layout:
    """The store's arrays (None where damaged) and the numbers their shapes follow from."""

    n_cells: int
    chunk_cells: int
    n_layers: int
    n_chunks: int
    parts: list[str]
    arrays: dict[str, zarr.Array | None]
    checksum: zarr.Array | None
    has_checksums: bool  # the store has a checksum array (possibly damaged: then ``checksum`` is None)

    def bounds(self, c: int) -> tuple[int, int]:
        return c * self.chunk_cells, min((c + 1) * self.chunk_cells, self.n_cells)


class _Nodes:
    """The store's arrays opened by path, so a damaged root or ``pooled`` group does not hide them.

    Nodes whose ``zarr.json`` is damaged are reported under metadata, once; opening one raises :class:`_Damaged`.
    """

    def __init__(self, root: StorePath, damaged: set[str]):
        self.root = root
        self.damaged = damaged

    def __getitem__(self, name: str) -> zarr.Array:
        if name in self.damaged:
            raise _Damaged(name)
        meta, why = read_json(self.root, name)
        if meta is None and why == "missing":
            raise KeyError(name)
        return zarr.open_array(self.root.store, path=name, mode="r+" if not self.root.read_only else "r")


class _Damaged(Exception):
    """A node whose metadata is damaged (reported under metadata)."""


def _open_array(group: zarr.Group | _Nodes, name: str, structure: list[str]) -> zarr.Array | None:
    try:
        arr = group[name]
    except _Damaged:
        return None
    except KeyError:
        structure.append(f"{name} is missing")
        return None
    except Exception as err:  # a deleted or corrupt zarr.json raises several types
        structure.append(f"{name} is unreadable ({type(err).__name__}: {err})")
        return None
    if not isinstance(arr, zarr.Array):
        structure.append(f"{name} is not an array")
        return None
    return arr


def _check_array(
    group: zarr.Group | _Nodes,
    name: str,
    shape: tuple[int | None, ...],
    chunks: tuple[int | None, ...],
    kind: Callable[[np.dtype], bool],
    structure: list[str],
) -> zarr.Array | None:
    """Open ``name`` and check its shape, chunks and dtype (None entries: any size, equal in both)."""
    arr = _open_array(group, name, structure)
    if arr is None:
        return None
    want_shape = tuple(s if s is not None else got for s, got in zip(shape, arr.shape))
    want_chunks = tuple(s if s is not None else got for s, got in zip(chunks, arr.chunks))
    if len(arr.shape) != len(shape) or arr.shape != want_shape or arr.chunks != want_chunks:
        structure.append(f"{name} has shape {arr.shape} in chunks {arr.chunks}; expected {shape} in chunks {chunks}")
        return None
    if not kind(arr.dtype):
        structure.append(f"{name} has dtype {arr.dtype}")
        return None
    return arr


def _layout(group: zarr.Group | _Nodes, attrs: dict[str, Any], structure: list[str]) -> _Layout:
    n, c, n_layers = int(attrs["n_cells"]), int(attrs["chunk_cells"]), int(attrs["model"]["n_layers"])
    n_chunks = -(-n // c)
    poolings = list(attrs["poolings"])
    hidden = int(attrs["model"].get("hidden", 0))
    dtype = np.dtype(attrs["dtype"])
    arrays: dict[str, zarr.Array | None] = {}
    for name in poolings:
        arr = _check_array(
            group, f"pooled/{name}", (n_layers + 1, n, None), (1, c, None), lambda d: d == dtype, structure
        )
        if arr is not None and arr.shape[2] != arr.chunks[2]:
            structure.append(f"pooled/{name} is chunked {arr.chunks} along its features; expected whole rows")
            arr = None
        # a store is zarr format 3 (create_or_resume), whose array metadata names the dimensions
        dims = cast(ArrayV3Metadata, arr.metadata).dimension_names if arr is not None else None
        if arr is not None and dims and dims[-1] == "feature" and hidden and arr.shape[2] != hidden:
            structure.append(f"pooled/{name} has {arr.shape[2]} features; the model's hidden size is {hidden}")
            arr = None
        arrays[f"pooled/{name}"] = arr
    arrays["obs_names"] = _check_array(group, "obs_names", (n,), (c,), lambda d: d.kind in "OUT", structure)
    version = int(attrs.get("format_version", 1))
    if version >= 2:
        for name in CELL_COORDS:
            arrays[name] = _check_array(group, name, (n,), (c,), lambda d: d.kind in "OUT", structure)
        _check_layer_coords(group, n_layers, structure)
    arrays["n_tokens"] = _check_array(group, "n_tokens", (n,), (c,), lambda d: d == np.int32, structure)
    arrays["truncated"] = _check_array(group, "truncated", (n,), (c,), lambda d: d == np.bool_, structure)
    arrays["done"] = _check_array(group, "done", (n_chunks,), (1,), lambda d: d == np.uint8, structure)
    parts = part_names(poolings, n_layers, format_version=version)
    checksum = None
    has_checksums = _has_member(group, CHECKSUM)
    if has_checksums:
        k = len(parts)
        checksum = _check_array(group, CHECKSUM, (n_chunks, k), (1, k), lambda d: d == np.uint64, structure)
        if checksum is not None and list(cast(Sequence[str], checksum.attrs.get("parts", []))) != parts:
            structure.append(f"{CHECKSUM} lists other parts than the store's poolings and layers")
            checksum = None
    return _Layout(n, c, n_layers, n_chunks, parts, arrays, checksum, has_checksums)


def _check_layer_coords(group: zarr.Group | _Nodes, n_layers: int, structure: list[str]) -> None:
    """Format 2: ``pooled/layer`` and ``pooled/depth`` exist and hold 0..L and layer / L (written at creation)."""
    for name, want in zip(("pooled/layer", "pooled/depth"), layer_values(n_layers)):
        kind = (lambda d: d.kind in "iu") if name.endswith("layer") else (lambda d: d.kind == "f")
        arr = _check_array(group, name, want.shape, want.shape, kind, structure)
        if arr is None:
            continue
        try:
            got = np.asarray(arr[:])
        except Exception as err:  # corrupt bytes raise inside zarr's codecs
            structure.append(f"{name} is unreadable ({type(err).__name__}: {err})")
            continue
        if not np.array_equal(got, want):
            structure.append(f"{name} holds {got.tolist()}; expected {want.tolist()}")


def _has_member(group: zarr.Group | _Nodes, name: str) -> bool:
    try:
        group[name]
    except _Damaged:
        return True
    except KeyError:
        return False
    except Exception:  # present but with unreadable metadata: _check_array reports it
        return True
    return True


def _array_of(part: str) -> tuple[str, int | None]:
    """``pooled/<name>/<layer>`` -> (``pooled/<name>``, layer); a per-cell part (``pooled/cell`` too) -> (part,
    None)."""
    if part.startswith("pooled/") and part.count("/") == 2:
        name, layer = part.rsplit("/", 1)
        return name, int(layer)
    return part, None


def _read_part(arr: zarr.Array, layer: int | None, start: int, stop: int) -> np.ndarray:
    return np.asarray(arr[layer, start:stop, :] if layer is not None else arr[start:stop])


def _chunk_exists(arr: zarr.Array, coords: tuple[int, ...]) -> bool:
    key = arr.metadata.encode_chunk_key(coords)
    return bool(sync((arr.store_path / key).exists()))


def _check_chunk(layout: _Layout, c: int) -> dict[str, str]:
    """Parts of committed chunk ``c`` that are missing, unreadable or changed (empty: the chunk is ok).

    The checksum row itself is damaged (key ``checksum``) when it does not decode, is missing, holds a 0 (the
    writer never writes one), or matches none of the chunk's parts although at least two of them decode: one
    changed part is damaged data, every part "changed" at once is the row. Parts whose chunk file is missing
    or does not decode are damaged data whatever the row says.
    """
    assert layout.checksum is not None
    try:
        want = np.asarray(layout.checksum[c, :])
    except Exception as err:
        return {CHECKSUM: f"row unreadable: {type(err).__name__}: {err}"}
    if not want.any():  # written before done[c], so a zero row of a committed chunk was removed
        if not _chunk_exists(layout.checksum, (c, 0)):
            return {CHECKSUM: "missing"}
        return {CHECKSUM: "row damaged: all its digests are 0, which the writer never writes"}
    start, stop = layout.bounds(c)
    found: dict[str, str] = {}
    for part, expected in zip(layout.parts, want.tolist()):
        name, layer = _array_of(part)
        arr = layout.arrays[name]
        if arr is None:  # a damaged array is reported once, under structure
            continue
        try:
            got = digest(_read_part(arr, layer, start, stop))
        except Exception as err:  # corrupt bytes raise inside zarr's codecs
            found[part] = f"unreadable: {type(err).__name__}: {err}"
            continue
        if got == expected:
            found[part] = "ok"
        else:
            coords = (layer, c, 0) if layer is not None else (c,)
            found[part] = "changed" if _chunk_exists(arr, coords) else "missing"
    bad = {part: why for part, why in found.items() if why != "ok"}
    zeros = int((want == 0).sum())
    decoded = [why for why in found.values() if why in ("ok", "changed")]
    if zeros:
        bad = {part: why for part, why in bad.items() if why != "changed"}
        bad[CHECKSUM] = f"row damaged: {zeros} of its {want.size} digests are 0, which the writer never writes"
    elif len(decoded) >= 2 and "ok" not in decoded:
        bad = {part: why for part, why in bad.items() if why != "changed"}
        bad[CHECKSUM] = f"row damaged: matches none of the {len(decoded)} parts that decode"
    return bad


def _read_done(done: zarr.Array, n_chunks: int) -> tuple[np.ndarray, dict[int, str]]:
    """The ``done`` flags, and the chunks whose flag cannot be read (they count as damaged)."""
    try:
        return np.asarray(done[:]), {}
    except Exception:
        flags = np.zeros(n_chunks, dtype=np.uint8)
        unreadable: dict[int, str] = {}
        for c in range(n_chunks):
            try:
                flags[c] = np.asarray(done[c : c + 1])[0]
            except Exception as err:
                unreadable[c] = f"unreadable: {type(err).__name__}: {err}"
        return flags, unreadable


def verify_store(
    path: str | os.PathLike[str], *, repair: bool = False, progress: bool = False, threads: int = 4
) -> VerifyReport:
    """Verify the metadata and every committed chunk of the store at ``path`` (a local path or a URL zarr opens).

    Damaged metadata: a node's ``zarr.json`` that is missing, empty or not JSON (the root's also when it lost the
    ``cellstrata`` attribute); the chunks are then checked with the attribute's copy in the metadata backup.
    Damaged chunk: a part whose chunk file is missing (where the data was not the fill value), does not
    decode, or decodes to other values than were written, or a damaged checksum row. Chunks with
    ``done == 0`` are pending. ``repair`` first writes the backup's copy over each damaged ``zarr.json``
    (only over those), then sets ``done[c] = 0`` (and the ``complete`` attribute to False) for each damaged
    chunk, so the same extract command rewrites its data and its checksums.
    Memory: one pooling layer of one cell chunk per thread.
    """
    url = os.fspath(path)
    try:
        root = store_path(url, writable=repair)
        damage, attrs = metadata_damage(root)
    except Exception as err:
        msg = f"{url} is not a readable cellstrata store ({type(err).__name__}); check the path"
        raise StoreError(msg) from None
    if attrs is None:
        root_damage = [d for d in damage if d.node == ""]
        if not root_damage or root_damage[0].reason == "missing":
            msg = f"{url} is not a readable cellstrata store (no '{ATTR_KEY}' attribute); check the path"
            raise StoreError(msg)
        msg = (
            f"{url} is damaged: {root_damage[0].describe()} and no backup of it exists (a store written before "
            "metadata backups): extract again into a new --out, or put back zarr.json from a copy of the store"
        )
        raise StoreCorruptError(msg)
    restored = restore_metadata(root, damage) if repair else []
    damage = [d for d in damage if d not in restored]
    structure: list[str] = []
    nodes = _Nodes(root, {d.node for d in damage})
    try:
        layout = _layout(nodes, attrs, structure)
    except (KeyError, TypeError, ValueError) as err:
        msg = (
            f"{url} has a damaged '{ATTR_KEY}' attribute ({type(err).__name__}: {err}); extract again into a new --out"
        )
        raise StoreCorruptError(msg) from None
    report = VerifyReport(
        url,
        layout.n_chunks,
        structure=structure,
        metadata=damage,
        restored=restored,
        has_checksums=layout.has_checksums,
    )
    done_arr = layout.arrays["done"]
    if done_arr is None:  # without commit flags nothing can be told apart
        report.unchecked = layout.n_chunks
        return report
    flags, bad_flags = _read_done(done_arr, layout.n_chunks)
    for c, why in bad_flags.items():
        report.damaged_chunks.append(DamagedChunk(c, *layout.bounds(c), {"done": why}))
    committed = [int(c) for c in np.flatnonzero(flags == 1) if int(c) not in bad_flags]
    report.pending = int(layout.n_chunks - len(committed) - len(bad_flags))
    if layout.checksum is None:
        report.unchecked = len(committed)
    else:
        report.ok = _check_all(layout, committed, report, progress=progress, threads=threads)
    report.damaged_chunks.sort(key=lambda d: d.index)
    if repair and report.damaged_chunks and not any(d.node == "" for d in damage):
        _reset(url, [d.index for d in report.damaged_chunks])
        report.repaired = True
    elif repair and restored and not any(d.node == "" for d in damage):
        update_attrs(zarr.open_group(url, mode="r+"), complete=bool(flags.all()) and not bad_flags)
    return report


def _check_all(layout: _Layout, chunks: list[int], report: VerifyReport, *, progress: bool, threads: int) -> int:
    from tqdm.auto import tqdm

    ok = 0
    with (
        ThreadPoolExecutor(max_workers=max(1, threads)) as pool,
        tqdm(total=len(chunks), unit="chunk", desc="verify", dynamic_ncols=True, disable=not progress) as bar,
    ):
        for c, bad in zip(chunks, pool.map(lambda c: _check_chunk(layout, c), chunks)):
            if bad:
                report.damaged_chunks.append(DamagedChunk(c, *layout.bounds(c), bad))
            else:
                ok += 1
            bar.update(1)
    return ok


def _reset(url: str, chunks: list[int]) -> None:
    """Mark ``chunks`` as not written, so the same extract command rewrites them."""
    group = zarr.open_group(url, mode="r+")
    done = member_array(group, "done")
    for c in chunks:
        done[c : c + 1] = np.zeros(1, dtype=np.uint8)
    update_attrs(group, complete=False)
