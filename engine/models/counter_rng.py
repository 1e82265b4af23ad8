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

import numpy as np

__all__ = ["RNG_NAME", "random_bits", "random_order", "uniform"]

RNG_NAME = "splitmix64(seed, stream, cell_index, position)"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic, a bijection of 64-bit words)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _as_u64(x: np.ndarray | int) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        msg = f"counters must be integers, got dtype {a.dtype}"
        raise TypeError(msg)
    if a.dtype.kind == "i" and a.size and int(a.min()) < 0:
        msg = "counters must be non-negative"
        raise ValueError(msg)
    return a.astype(np.uint64, copy=False)


def random_bits(seed: int, stream: int, cells: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """64 random bits per element: a hash of ``(seed, stream, cells[i], positions[i])`` (broadcast)."""
    with np.errstate(over="ignore"):
        key = _mix(_as_u64(seed) * _GOLDEN + _as_u64(stream) + _GOLDEN)
        key = _mix(key ^ (_as_u64(cells) + np.uint64(1)) * _GOLDEN)
        return _mix(key ^ (_as_u64(positions) + np.uint64(1)) * _M2)


def uniform(seed: int, stream: int, cells: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Uniform float64 draws in ``[0, 1)`` (53 random bits each), one per counter."""
    bits = random_bits(seed, stream, cells, positions)
    return (bits >> _S11).astype(np.float64) * (1.0 / (1 << 53))


def random_order(seed: int, stream: int, cells: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """A random permutation inside each segment of a flat array, as one index array.

    The flat array holds the elements of cell ``k`` at ``offsets[k]:offsets[k + 1]`` (``counts`` per
    cell, ``rows`` the segment of each element, non-decreasing); ``cells[k]`` is cell ``k``'s global
    index. The result ``perm`` keeps segments in place and orders the elements of each by the random
    key of (cell index, position in the cell), so ``perm[offsets[k]:offsets[k] + m]`` is a uniformly
    random ``m``-subset of cell ``k`` in random order, whatever block the cell was read in.
    """
    counts = np.asarray(counts, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    position = np.arange(len(rows), dtype=np.int64) - offsets[rows]
    keys = random_bits(seed, stream, np.asarray(cells)[rows], position)
    return np.lexsort((keys, rows))
