"""Length-sorted, token-budget micro-batches inside a window of cells.

Cells of a window are sorted by token count (longest first, ties by position so the order is
deterministic) and cut greedily into batches whose padded size ``B x S`` stays within ``max_tokens``;
a cell longer than the budget gets a batch of its own. Padding is masked everywhere downstream, so a
cell's output does not depend on which batch it lands in.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .models.base import TokenBatch, TokenizedBlock


def plan_batches(lengths: np.ndarray, max_tokens: int, *, max_cells: int | None = None) -> list[np.ndarray]:
    """Split window positions into batches; each is an array of positions, longest cell first."""
    if max_tokens < 1:
        msg = f"max_tokens must be >= 1, got {max_tokens}"
        raise ValueError(msg)
    order = np.lexsort((np.arange(len(lengths)), -np.asarray(lengths)))
    batches: list[np.ndarray] = []
    i = 0
    n = len(order)
    while i < n:
        longest = max(int(lengths[order[i]]), 1)
        size = max(1, max_tokens // longest)
        if max_cells is not None:
            size = min(size, max_cells)
        batches.append(order[i : i + size])
        i += size
    return batches


def collate(tokens: TokenizedBlock, positions: np.ndarray, pad_id: int, pad_value: float) -> TokenBatch:
    """Right-pad the sequences at ``positions`` of ``tokens`` into a :class:`TokenBatch`."""
    lengths = np.array([len(tokens.genes[p]) for p in positions], dtype=np.int64)
    s = int(lengths.max()) if len(lengths) else 0
    genes = np.full((len(positions), s), pad_id, dtype=np.int64)
    values = np.full((len(positions), s), pad_value, dtype=np.float32)
    for row, p in enumerate(positions):
        k = lengths[row]
        genes[row, :k] = tokens.genes[p]
        values[row, :k] = tokens.values[p]
    return TokenBatch(
        genes=torch.from_numpy(genes),
        values=torch.from_numpy(values),
        lengths=torch.from_numpy(lengths),
        positions=np.asarray(positions),
    )


def iter_batches(
    tokens: TokenizedBlock, max_tokens: int, pad_id: int, pad_value: float, *, max_cells: int | None = None
) -> Iterator[TokenBatch]:
    """Batches covering every cell of ``tokens`` once."""
    for positions in plan_batches(tokens.lengths, max_tokens, max_cells=max_cells):
        yield collate(tokens, positions, pad_id, pad_value)
