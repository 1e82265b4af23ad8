"""Token-budget batching: every cell exactly once, budget respected, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from cellstrata.engine.device.batching import collate, plan_batches
from cellstrata.engine.models.base import TokenizedBlock


@pytest.mark.parametrize("budget", [1, 50, 333, 10_000])
def test_plan_covers_each_cell_once_within_budget(budget):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 120, size=257)
    batches = plan_batches(lengths, budget)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for b in batches:
        longest = lengths[b].max()
        assert len(b) == 1 or len(b) * longest <= budget
        assert lengths[b[0]] == longest  # longest first
    assert [x.tolist() for x in plan_batches(lengths, budget)] == [x.tolist() for x in batches]


def test_collate_pads_with_pad_id_and_value():
    tokens = TokenizedBlock(
        indices=np.array([10, 11]),
        genes=[np.array([5, 6, 7]), np.array([5])],
        values=[np.array([-2.0, 1.0, 3.0], dtype=np.float32), np.array([-2.0], dtype=np.float32)],
        truncated=np.array([False, False]),
        empty=np.array([False, False]),
    )
    batch = collate(tokens, np.array([1, 0]), pad_id=99, pad_value=-2.0)
    assert batch.genes.tolist() == [[5, 99, 99], [5, 6, 7]]
    assert batch.lengths.tolist() == [1, 3]
    assert batch.padding_mask.tolist() == [[False, True, True], [False, False, False]]
