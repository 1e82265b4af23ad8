"""Per-chunk checksums: which parts of a cell chunk are digested, and how.

A cell chunk covering cells ``[start, stop)`` has one part per pooling and layer
(``pooled/<name>/<layer>``, the ``[n, W]`` slice of that layer) and one per per-cell array
(``obs_names``, ``n_tokens``, ``truncated``, and in a format 2 store the two ``cell`` coordinates that
repeat the names, ``cell`` and ``pooled/cell``). A part's digest is the first 8 bytes of a sha256 of
its dtype, its shape and its C-contiguous bytes; strings are digested by their values (UTF-8 joined
by NUL), whatever string dtype zarr reads them back as, so the names' digest is one number in every
format and every copy. NaNs are hashed as
the canonical NaN, because zarr skips a chunk that is all NaN (the fill value) and reads it back as
its own NaN.

The store keeps the digests in ``checksum[c, :]`` (uint64, the part order in the array's ``parts``
attribute); :mod:`engine.writer` writes them before ``done[c]`` and :mod:`engine.verify` recomputes
them from what zarr reads back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import cast

import numpy as np
import zarr

CHECKSUM = "checksum"
PER_CELL = ("obs_names", "n_tokens", "truncated")
CELL_COORDS = ("cell", "pooled/cell")  # format 2: the names again, as the ``cell`` coordinate of each group


def part_names(poolings: Sequence[str], n_layers: int, *, format_version: int = 1) -> list[str]:
    """The checksummed parts of one cell chunk: every pooling's layers 0..L, then the per-cell arrays
    (from store format 2 on, the ``cell`` coordinates too)."""
    per_cell = PER_CELL + (CELL_COORDS if format_version >= 2 else ())
    return [f"pooled/{name}/{layer}" for name in poolings for layer in range(n_layers + 1)] + list(per_cell)


def _nan(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float16:  # a bit test: numpy's float16 isnan converts every value (about 6x slower)
        return (a.view(np.uint16) & 0x7FFF) > 0x7C00
    return np.isnan(a)


def digest(values: np.ndarray) -> int:
    """64-bit digest of one part (never 0, which marks a chunk without checksums)."""
    a = np.asarray(values)
    # sha256 runs on the CPU's SHA extensions: 2.9 ms per 4 MB against 7.4 ms for blake2b (2-core CPU)
    h = hashlib.sha256()
    if a.dtype.kind in "OUT":  # object, fixed-width unicode or numpy's StringDType (what zarr reads back)
        h.update(f"str{a.shape}".encode())
        h.update("\0".join(str(s) for s in a.ravel().tolist()).encode())
    else:
        a = np.ascontiguousarray(a)
        if a.dtype.kind == "f":
            nan = _nan(a)
            if nan.any():
                a = np.where(nan, np.array(np.nan, dtype=a.dtype), a)
        h.update(f"{a.dtype.name}{a.shape}".encode())
        # numpy's stubs give ndarray __buffer__ only for Python >= 3.12; an array is a buffer on every version
        h.update(a.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    return int.from_bytes(h.digest()[:8], "little") or 1


def chunk_digests(
    pooled: Mapping[str, np.ndarray],
    obs_names: np.ndarray,
    n_tokens: np.ndarray,
    truncated: np.ndarray,
    *,
    parts: Sequence[str] | None = None,
) -> np.ndarray:
    """Digests of one chunk in ``parts`` order (default: :func:`part_names` of format 1 for ``pooled``'s
    poolings); ``pooled[name]`` is ``[L+1, n, W]`` in the store dtype. The names are digested once: every
    part that holds them (``obs_names`` and the ``cell`` coordinates) has that digest."""
    n_layers = next(iter(pooled.values())).shape[0] - 1 if pooled else 0
    names = digest(obs_names)
    got = {
        f"pooled/{name}/{layer}": digest(values) for name, data in pooled.items() for layer, values in enumerate(data)
    }
    got |= dict.fromkeys(("obs_names", *CELL_COORDS), names)
    got |= {"n_tokens": digest(n_tokens), "truncated": digest(truncated)}
    order = part_names(list(pooled), n_layers) if parts is None else parts
    return np.array([got[p] for p in order], dtype=np.uint64)


def create_checksum_array(
    group: zarr.Group, poolings: Sequence[str], n_layers: int, n_chunks: int, *, format_version: int
) -> zarr.Array:
    """Add the ``checksum`` array ``[n_chunks, K]`` (one row per cell chunk, 0 = not written) to a new store."""
    parts = part_names(poolings, n_layers, format_version=format_version)
    return group.create_array(
        CHECKSUM,
        shape=(n_chunks, len(parts)),
        chunks=(1, len(parts)),
        dtype="uint64",
        fill_value=0,
        dimension_names=("cell_chunk", "part"),
        attributes={"parts": parts},
    )


def checksum_array(group: zarr.Group) -> zarr.Array | None:
    """The store's ``checksum`` array, or None for a store written before checksums existed."""
    try:
        arr = group[CHECKSUM]
    except KeyError:
        return None
    return arr if isinstance(arr, zarr.Array) else None


def write_checksums(
    arr: zarr.Array,
    index: int,
    pooled: Mapping[str, np.ndarray],
    obs_names: np.ndarray,
    n_tokens: np.ndarray,
    truncated: np.ndarray,
) -> None:
    """Write ``checksum[index, :]`` for one chunk's data, in the order of the array's ``parts`` attribute
    (so the same call serves every store format)."""
    row = chunk_digests(pooled, obs_names, n_tokens, truncated, parts=list(cast(Sequence[str], arr.attrs["parts"])))
    arr[index : index + 1, :] = row[None, :]
