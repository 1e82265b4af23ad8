"""Length-sorted, token-budget micro-batches inside a window of cells.

Cells of a window are sorted by token count (longest first, ties by position so the order is
deterministic) and cut greedily into batches within ``max_tokens``: padded batches count their padded
size ``B x S``, packed batches (cells back to back, for varlen attention on CUDA) their real tokens. A
cell longer than the budget gets a batch of its own. Padding is masked everywhere downstream and packed
cells attend only to themselves, so a cell's output does not depend on which batch it lands in.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..models.base import TokenBatch, TokenizedBlock


def plan_batches(
    lengths: np.ndarray, max_tokens: int, *, max_cells: int | None = None, packed: bool = False
) -> list[np.ndarray]:
    """Split window positions into batches; each is an array of positions, longest cell first.

    Padded: ``B x`` (the batch's longest cell) ``<= max_tokens``. Packed: the sum of the batch's lengths
    ``<= max_tokens``. Either way at most ``max_cells`` cells, and at least one.
    """
    if max_tokens < 1:
        msg = f"max_tokens must be >= 1, got {max_tokens}"
        raise ValueError(msg)
    lengths = np.asarray(lengths)
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    batches: list[np.ndarray] = []
    i = 0
    n = len(order)
    while i < n:
        if packed:
            total = np.cumsum(np.maximum(lengths[order[i:]], 1))
            size = max(1, int(np.searchsorted(total, max_tokens, side="right")))
        else:
            size = max(1, max_tokens // max(int(lengths[order[i]]), 1))
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
        host_lengths=tuple(lengths.tolist()),
    )


def collate_packed(tokens: TokenizedBlock, positions: np.ndarray, varlen: str = "reference") -> TokenBatch:
    """Pack the sequences at ``positions`` of ``tokens`` back to back into a ``[1, T]`` :class:`TokenBatch`.

    ``varlen`` names the attention kernel the batch will run with (see :mod:`.models.attention`).
    """
    lengths = np.array([len(tokens.genes[p]) for p in positions], dtype=np.int64)
    if (lengths < 1).any():
        msg = "a packed batch cannot hold a cell without tokens"
        raise ValueError(msg)
    genes = np.concatenate([np.asarray(tokens.genes[p], dtype=np.int64) for p in positions] or [np.zeros(0, np.int64)])
    values = np.concatenate(
        [np.asarray(tokens.values[p], dtype=np.float32) for p in positions] or [np.zeros(0, np.float32)]
    )
    return TokenBatch(
        genes=torch.from_numpy(genes)[None, :],
        values=torch.from_numpy(values)[None, :],
        lengths=torch.from_numpy(lengths),
        positions=np.asarray(positions),
        host_lengths=tuple(lengths.tolist()),
        packed=True,
        varlen=varlen,
    )


def iter_batches(
    tokens: TokenizedBlock,
    max_tokens: int,
    pad_id: int,
    pad_value: float,
    *,
    max_cells: int | None = None,
    packed: bool = False,
    varlen: str = "reference",
) -> Iterator[TokenBatch]:
    """Batches covering every cell of ``tokens`` once: padded, or packed for the ``varlen`` kernel."""
    for positions in plan_batches(tokens.lengths, max_tokens, max_cells=max_cells, packed=packed):
        if packed:
            yield collate_packed(tokens, positions, varlen)
        else:
            yield collate(tokens, positions, pad_id, pad_value)
