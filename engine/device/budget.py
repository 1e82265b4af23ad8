"""The token budget of a batch: the largest that fits in the device's free memory.

On CUDA the budget is measured, not guessed: two forward passes of synthetic batches (``PROBE_TOKENS``
and twice that, in the run's own layout and precision, with a tap that allocates what the largest
pooling allocates) give the device bytes per token (the slope) and the fixed part (workspaces); the
budget is what fits in ``FREE_FRACTION`` of the memory free at that moment. Activations are freed layer
by layer (each layer's hidden state is released once its tap returns), so the budget does not depend
on the number of layers. On CPU the budget follows the model's size (:func:`cpu_max_tokens`): about one
cell per batch at released sizes, where small batches are faster (less padding, whose attention cost is
quadratic, and activations that stay in the caches), 16,384 tokens for tiny models, where per-batch costs
count. ``--max-tokens`` overrides both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch

from ..models.base import LoadedModel, TokenBatch, TokenizedBlock
from .batching import collate, collate_packed

log = logging.getLogger("cellstrata")

DEFAULT_MAX_TOKENS = {"cpu": 16384, "cuda": 65536}
# CPU: a batch of about CPU_BATCH_FLOPS, within [MIN_TOKENS, DEFAULT_MAX_TOKENS["cpu"]]: released sizes get
# about one cell per batch, tiny models 16,384 tokens. Measured on 2 cores: Tahoe-X1 70m (16 cells of up to
# 2,048 tokens) ran 0.41 cells/s at 16,384 tokens per batch, 0.48 at 4,096 and 0.66 at 2,048 (padding 20% /
# 6% / 0%, whose attention cost is quadratic, and large batches spill the caches), while the full extraction
# of tiny models lost 25-40% at 2,048 (per-batch costs).
CPU_BATCH_FLOPS = 2e10
PROBE_TOKENS = 8192
PROBE_CELL_TOKENS = 512
FREE_FRACTION = 0.7
MIN_TOKENS = 2048
MAX_TOKENS = 1 << 20
ROUND = 1024


def probe_batch(loaded: LoadedModel, n_tokens: int, *, packed: bool, varlen: str) -> TokenBatch:
    """Synthetic cells of ``PROBE_CELL_TOKENS`` tokens (the last one shorter, so padded batches are masked)."""
    n_cells = max(1, n_tokens // PROBE_CELL_TOKENS)
    lengths = [PROBE_CELL_TOKENS] * n_cells
    lengths[-1] = max(1, PROBE_CELL_TOKENS - 7)
    tok = loaded.tokenizer
    block = TokenizedBlock(
        indices=np.arange(n_cells),
        genes=[np.full(n, 0, dtype=np.int64) for n in lengths],  # id 0 exists in every vocabulary / position table
        values=[np.ones(n, dtype=np.float32) for n in lengths],
        truncated=np.zeros(n_cells, dtype=bool),
        empty=np.zeros(n_cells, dtype=bool),
    )
    positions = np.arange(n_cells)
    if packed:
        return collate_packed(block, positions, varlen)
    return collate(block, positions, tok.pad_id, tok.pad_value)


def _peak_bytes(
    loaded: LoadedModel, batch: TokenBatch, device: torch.device, autocast: Callable[[], AbstractContextManager]
) -> int:
    """Peak device memory above the current allocation during one forward of ``batch``."""

    def tap(layer: int, hidden: torch.Tensor) -> None:
        # the largest pooling allocates about one float32 copy of the layer (a norm before pooling)
        del layer
        scratch = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        del scratch

    dev = batch.to(device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), autocast():
        loaded.model.forward(dev, tap)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def fit_budget(p1: float, t1: int, p2: float, t2: int, free: float) -> tuple[int, float, float]:
    """``(budget, bytes per token, fixed bytes)`` from peaks ``p1``/``p2`` at ``t1``/``t2`` tokens and ``free`` bytes.

    The budget fills ``FREE_FRACTION`` of ``free``, rounded down to a multiple of ``ROUND`` and kept
    within ``[MIN_TOKENS, MAX_TOKENS]``.
    """
    per_token = max((p2 - p1) / max(t2 - t1, 1), 1.0)
    fixed = max(p1 - per_token * t1, 0.0)
    budget = (FREE_FRACTION * free - fixed) / per_token
    return int(min(max(budget // ROUND * ROUND, MIN_TOKENS), MAX_TOKENS)), per_token, fixed


def cpu_max_tokens(model: torch.nn.Module) -> int:
    """The CPU budget: ``CPU_BATCH_FLOPS / (2 x parameters)`` tokens, a power of two in ``[MIN_TOKENS, 16384]``."""
    params = sum(p.numel() for p in model.parameters())
    tokens = CPU_BATCH_FLOPS / max(2 * params, 1)
    return int(min(max(2 ** int(np.log2(max(tokens, 1))), MIN_TOKENS), DEFAULT_MAX_TOKENS["cpu"]))


def auto_max_tokens(
    loaded: LoadedModel,
    device: torch.device,
    *,
    packed: bool,
    varlen: str,
    autocast: Callable[[], AbstractContextManager],
) -> int:
    """The token budget for ``loaded`` on ``device`` (see the module docstring)."""
    if device.type != "cuda":
        return cpu_max_tokens(loaded.model)
    small = probe_batch(loaded, PROBE_TOKENS, packed=packed, varlen=varlen)
    large = probe_batch(loaded, 2 * PROBE_TOKENS, packed=packed, varlen=varlen)
    _peak_bytes(loaded, small, device, autocast)  # warm-up: kernels, workspaces, allocator
    p1 = _peak_bytes(loaded, small, device, autocast)
    p2 = _peak_bytes(loaded, large, device, autocast)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    chosen, per_token, fixed = fit_budget(p1, small.n_slots, p2, large.n_slots, free)
    log.info(
        "token budget %d: %.1f KiB of device memory per token, %.0f MiB fixed, %.1f of %.1f GiB free",
        chosen,
        per_token / 1024,
        fixed / 2**20,
        free / 2**30,
        total / 2**30,
    )
    return chosen
