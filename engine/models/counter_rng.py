"""Counter-based random draws for tokenizers: one value per (seed, stream, cell index, position).

The official tokenizers draw per cell from a stateful generator (scGPT's binning tie-break, the random
subset kept when a cell is longer than the context). Creating a generator per cell costs tens of
microseconds, which caps a host at a few thousand cells per second. Here every draw is a pure function
of its counter, hashed with the SplitMix64 finaliser (Steele, Lea & Flood 2014) applied in two rounds:
the draws of a whole CSR block come from a handful of vectorised integer operations, and a cell's draws
do not depend on its batch, its block or the order cells are read in.

``stream`` separates independent uses inside one tokenizer (e.g. bin tie-breaks and the truncation
order), so their draws are uncorrelated even at equal positions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["RNG_NAME", "bits_at", "cell_keys", "random_bits", "random_order", "random_subset", "to_uniform", "uniform"]

RNG_NAME = "splitmix64(seed, stream, cell_index, position)"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic, a bijection of 64-bit words).

    Works in place on ``z`` (callers pass a fresh array) with one scratch array: at block sizes the
    allocations of a chain of temporaries cost as much as the arithmetic.
    """
    z = np.asarray(z, dtype=np.uint64)
    if z.ndim == 0:
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        return z ^ (z >> _S31)
    t = np.right_shift(z, _S30)
    z ^= t
    z *= _M1
    np.right_shift(z, _S27, out=t)
    z ^= t
    z *= _M2
    np.right_shift(z, _S31, out=t)
    z ^= t
    return z


def _as_u64(x: np.ndarray | int) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        msg = f"counters must be integers, got dtype {a.dtype}"
        raise TypeError(msg)
    if a.dtype.kind == "i" and a.size and int(a.min()) < 0:
        msg = "counters must be non-negative"
        raise ValueError(msg)
    return a.astype(np.uint64, copy=False)


def cell_keys(seed: int, stream: int, cells: np.ndarray) -> np.ndarray:
    """The per-cell half of :func:`random_bits`: one uint64 key per ``(seed, stream, cells[i])``."""
    with np.errstate(over="ignore"):
        key = _mix(_as_u64(seed) * _GOLDEN + _as_u64(stream) + _GOLDEN)
        return _mix(key ^ (_as_u64(cells) + np.uint64(1)) * _GOLDEN)


def bits_at(keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The per-position half of :func:`random_bits`: ``keys`` from :func:`cell_keys` (broadcast)."""
    with np.errstate(over="ignore"):
        z = _as_u64(positions) + np.uint64(1)
        z *= _M2
        z ^= np.asarray(keys, dtype=np.uint64)
        return _mix(z)


def random_bits(seed: int, stream: int, cells: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """64 random bits per element: a hash of ``(seed, stream, cells[i], positions[i])`` (broadcast)."""
    return bits_at(cell_keys(seed, stream, cells), positions)


def to_uniform(bits: np.ndarray) -> np.ndarray:
    """Uniform float64 in ``[0, 1)`` from the top 53 of 64 random bits."""
    return (bits >> _S11).astype(np.float64) * (1.0 / (1 << 53))


def uniform(seed: int, stream: int, cells: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Uniform float64 draws in ``[0, 1)`` (53 random bits each), one per counter."""
    return to_uniform(random_bits(seed, stream, cells, positions))


def random_order(seed: int, stream: int, cells: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """A random permutation inside each segment of a flat array, as one index array.

    The flat array holds the elements of cell ``k`` at ``offsets[k]:offsets[k + 1]`` (``counts`` per
    cell, ``rows`` the segment of each element, non-decreasing); ``cells[k]`` is cell ``k``'s global
    index. The result ``perm`` keeps segments in place and orders the elements of each by the random
    key of (cell index, position in the cell), ties by position, so ``perm[offsets[k]:offsets[k] + m]``
    is a uniformly random ``m``-subset of cell ``k`` in random order, whatever block the cell was read in.
    """
    counts = np.asarray(counts, dtype=np.int64)
    return _segment_order(seed, stream, np.asarray(cells), counts, lambda: np.asarray(rows, dtype=np.int64))


def _segment_order(
    seed: int, stream: int, cells: np.ndarray, counts: np.ndarray, rows: Callable[[], np.ndarray]
) -> np.ndarray:
    """:func:`random_order` from the segment sizes (per-element cell keys and positions by ``np.repeat``,
    no gathers); ``rows()`` gives the segment of each element for the rare two-key fallback."""
    n = int(counts.sum())
    if not n:
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    # bits_at(cell_keys(...)[rows], position), fused: one array, updated in place
    with np.errstate(over="ignore"):
        keys = np.arange(1, n + 1, dtype=np.uint64)
        keys -= np.repeat(starts.astype(np.uint64), counts)  # position + 1
        keys *= _M2
        keys ^= np.repeat(cell_keys(seed, stream, cells), counts)
        keys = _mix(keys)
    # One uint64 sort of (segment | top bits of the key | flat index) instead of a two-key lexsort: the
    # segment keeps segments in place, the index says where each sorted element came from.
    row_bits = int(len(counts) - 1).bit_length()
    index_bits = int(n - 1).bit_length()
    key_bits = 64 - row_bits - index_bits
    if key_bits < 16:
        return np.lexsort((keys, rows()))
    packed = keys >> np.uint64(64 - key_bits)
    packed <<= np.uint64(index_bits)
    index = np.arange(n, dtype=np.uint64)
    if row_bits:  # segment | flat index (the index takes the low bits only)
        index += np.repeat(np.arange(len(counts), dtype=np.uint64) << np.uint64(key_bits + index_bits), counts)
    packed |= index
    del index
    packed.sort()
    perm = (packed & np.uint64((1 << index_bits) - 1)).astype(np.int64)
    if key_bits < 64:  # equal top bits (rare): order those runs by the whole key, then position
        head = packed >> np.uint64(index_bits)
        tie = head[1:] == head[:-1]
        if tie.any():
            slots = np.flatnonzero(np.concatenate((tie, [False])) | np.concatenate(([False], tie)))
            members = perm[slots]
            perm[slots] = members[np.lexsort((members, keys[members], head[slots]))]
    return perm


def random_subset(seed: int, stream: int, cells: np.ndarray, counts: np.ndarray, size: np.ndarray | int) -> np.ndarray:
    """Flat indices of the elements each segment keeps: all in order, or a random ``size``-subset.

    Segment ``k`` (``counts[k]`` elements, global cell index ``cells[k]``) keeps its elements in place
    when ``counts[k] <= size[k]``, else the first ``size[k]`` of its :func:`random_order` (random
    subset, random order). The result lists the kept elements segment after segment.
    """
    counts = np.asarray(counts, dtype=np.int64)
    size = np.broadcast_to(np.asarray(size, dtype=np.int64), counts.shape)
    total = int(counts.sum())
    long = counts > size
    if not long.any():
        return np.arange(total, dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    n_kept = np.where(long, size, counts)
    kept_offsets = np.concatenate(([0], np.cumsum(n_kept)))
    out = np.empty(int(kept_offsets[-1]), dtype=np.int64)
    # segments that fit: their elements in place
    short = np.flatnonzero(~long)
    span = counts[short]
    local = np.arange(int(span.sum()), dtype=np.int64) - np.repeat(np.cumsum(span) - span, span)
    out[np.repeat(kept_offsets[short], span) + local] = np.repeat(offsets[short], span) + local
    # longer segments: the first size[k] of their random order
    lng = np.flatnonzero(long)
    span, keep = counts[lng], size[lng]
    first = np.cumsum(span) - span  # where each long segment starts among the long segments' elements
    packed_first = np.cumsum(keep) - keep  # ... and among their kept elements
    perm = _segment_order(seed, stream, np.asarray(cells)[lng], span, lambda: np.repeat(np.arange(len(lng)), span))
    j = np.arange(int(keep.sum()), dtype=np.int64)
    kept = perm[j + np.repeat(first - packed_first, keep)]
    kept += np.repeat(offsets[lng] - first, keep)
    if not len(short):
        return kept
    out[j + np.repeat(kept_offsets[lng] - packed_first, keep)] = kept
    return out
