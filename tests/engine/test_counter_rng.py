"""Counter-based draws: pure functions of their counters, uniform, independent across streams."""

from __future__ import annotations

import numpy as np
import pytest

from cellstrata.engine.models.counter_rng import random_bits, random_order, uniform


def test_draws_depend_only_on_their_counters() -> None:
    rng = np.random.default_rng(3)
    cells = rng.integers(0, 10**9, size=1001)
    pos = rng.integers(0, 5000, size=1001)
    whole = uniform(7, 0, cells, pos)
    perm = rng.permutation(1001)
    assert np.array_equal(uniform(7, 0, cells[perm], pos[perm]), whole[perm])
    parts = np.concatenate([uniform(7, 0, cells[s], pos[s]) for s in np.array_split(np.arange(1001), 7)])
    assert np.array_equal(parts, whole)
    assert not np.array_equal(uniform(8, 0, cells, pos), whole)
    assert not np.array_equal(uniform(7, 1, cells, pos), whole)


def test_uniform_is_uniform_and_uncorrelated_across_neighbours() -> None:
    cells = np.repeat(np.arange(400), 250)
    pos = np.tile(np.arange(250), 400)
    u = uniform(0, 0, cells, pos)
    assert u.min() >= 0.0 and u.max() < 1.0
    hist = np.bincount((u * 20).astype(int), minlength=20)
    chi2 = float(((hist - len(u) / 20) ** 2 / (len(u) / 20)).sum())
    assert chi2 < 60.0  # 19 degrees of freedom: p < 1e-6 above ~55
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02
    v = uniform(0, 1, cells, pos)
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.02
    bits = random_bits(0, 0, cells, pos)
    assert len(np.unique(bits)) == len(bits)


def test_random_order_permutes_inside_segments_only() -> None:
    counts = np.array([5, 0, 1, 17, 3], dtype=np.int64)
    rows = np.repeat(np.arange(len(counts)), counts)
    cells = np.array([11, 4, 90, 2, 35])
    perm = random_order(5, 2, cells, rows, counts)
    off = np.concatenate(([0], np.cumsum(counts)))
    assert np.array_equal(np.sort(perm), np.arange(counts.sum()))
    for k in range(len(counts)):
        seg = perm[off[k] : off[k + 1]]
        assert np.array_equal(np.sort(seg), np.arange(off[k], off[k + 1]))
    # the order of a cell does not depend on the cells read beside it
    alone = random_order(5, 2, cells[3:4], np.zeros(17, dtype=np.int64), counts[3:4])
    assert np.array_equal(alone, perm[off[3] : off[4]] - off[3])


def test_random_subsets_are_uniform() -> None:
    n, m, trials = 9, 3, 6000
    counts = np.full(trials, n, dtype=np.int64)
    rows = np.repeat(np.arange(trials), n)
    perm = random_order(1, 0, np.arange(trials), rows, counts).reshape(trials, n) % n
    first = np.bincount(perm[:, :m].ravel(), minlength=n) / (trials * m)
    assert np.allclose(first, 1 / n, atol=0.01)


def test_negative_or_float_counters_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        uniform(0, 0, np.array([-1]), np.array([0]))
    with pytest.raises(TypeError, match="integers"):
        uniform(0, 0, np.array([0.5]), np.array([0]))
