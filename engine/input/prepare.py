"""The input side of an extraction: read and tokenize windows of cell chunks ahead of the device.

Tokenizing is Python work per cell (the official rules: ranking, binning, sampling), about 500-2,000
cells/s per core for released-size inputs, while one GPU runs a small or medium model at several thousand
cells/s. Windows are therefore prepared either on threads of this process (CPU runs: the cores belong to
the forward pass; in-memory AnnData; Dask workers) or, on CUDA hosts, in worker processes that each
open the input file themselves, so tokenizing scales with the host's cores (:class:`InputPool`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from ..errors import EmptyCellError
from ..models.base import GeneMapping, TokenizedBlock, Tokenizer
from .sources import CellSource, check_values, open_source

THREADS = 2  # windows prepared ahead on threads
MAX_PROCESSES = 8
MIN_WINDOWS_FOR_PROCESSES = 8  # below this, starting worker processes costs more than it saves


@dataclass
class Window:
    """Pending chunks processed together: ``parts[i]`` holds the tokens of cells ``bounds[i]``."""

    chunks: list[int]
    bounds: list[tuple[int, int]]
    parts: list[TokenizedBlock]


@dataclass(frozen=True)
class InputSpec:
    """What preparing a window needs besides the source (picklable, for worker processes)."""

    tokenizer: Tokenizer
    mapping: GeneMapping
    require_counts: bool
    empty_cells: str


def prepare_window(
    source: CellSource, spec: InputSpec, chunks: Sequence[int], bounds: Sequence[tuple[int, int]]
) -> Window:
    """Read, check and tokenize the cells of ``chunks`` (``bounds[i]`` = chunk ``i``'s cell range)."""
    parts: list[TokenizedBlock] = []
    for start, stop in bounds:
        block = source.read(start, stop)
        check_values(block, require_counts=spec.require_counts)
        tokens = spec.tokenizer.tokenize(block, spec.mapping)
        if spec.empty_cells == "error" and tokens.empty.any():
            first = int(tokens.indices[np.argmax(tokens.empty)])
            msg = (
                f"cell {first} ({source.obs_names[first]}) has no expressed gene in the model's "
                f"vocabulary ({int(tokens.empty.sum())} such cells in cells {start}-{stop - 1}); "
                "filter them out or pass --empty-cells nan to store them as NaN"
            )
            raise EmptyCellError(msg)
        parts.append(tokens)
    return Window(list(chunks), list(bounds), parts)


# ---------------------------------------------------------------------------------------- worker processes
_WORKER: dict[str, Any] = {}


def _init_worker(path: str, layer: str | None, gene_column: str | None, spec: InputSpec) -> None:
    # Ctrl-C / SIGTERM are for the driver, which stops gracefully and shuts the pool down
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _WORKER["source"] = open_source(path, layer=layer, gene_column=gene_column)
    _WORKER["spec"] = spec


def _prepare_in_worker(chunks: Sequence[int], bounds: Sequence[tuple[int, int]]) -> Window:
    return prepare_window(_WORKER["source"], _WORKER["spec"], chunks, bounds)


def input_processes(requested: int | None, device_type: str, source: CellSource, n_windows: int) -> int:
    """Worker processes for the input side; 0 = threads of this process.

    ``requested`` None (auto): on CUDA, with an input file and at least :data:`MIN_WINDOWS_FOR_PROCESSES`
    windows to do, one process per core beyond two (kept for the forward pass and the writer), at most
    :data:`MAX_PROCESSES`; else threads. Processes need a file the workers can open and a driver that may
    start them (not a daemonic Dask worker).
    """
    if source.path is None or mp.current_process().daemon:
        return 0
    if requested is not None:
        return max(0, int(requested))
    if device_type != "cuda" or n_windows < MIN_WINDOWS_FOR_PROCESSES:
        return 0
    return max(0, min(MAX_PROCESSES, (os.cpu_count() or 1) - 2))


class InputPool:
    """Prepares windows on :data:`THREADS` threads or on ``processes`` worker processes (see the module docstring).

    On threads, windows are prepared by ``prepare(chunks)`` (the extraction's own method); in worker
    processes by :func:`prepare_window` over the worker's own copy of ``source``.
    """

    def __init__(
        self, prepare: Callable[[list[int]], Window], source: CellSource, spec: InputSpec, processes: int = 0
    ) -> None:
        self.prepare = prepare
        self.processes = processes
        self.ahead = processes or THREADS  # windows in preparation at a time
        self._pool: Executor
        if processes:
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            # processes only for a source with a file (input_processes): its path is a str
            init = (cast(str, source.path), getattr(source, "layer", None), getattr(source, "gene_column", None), spec)
            self._pool = ProcessPoolExecutor(processes, mp_context=ctx, initializer=_init_worker, initargs=init)
        else:
            self._pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="cellstrata-input")

    def submit(self, chunks: Sequence[int], bounds: Sequence[tuple[int, int]]) -> Future:
        if self.processes:
            return self._pool.submit(_prepare_in_worker, list(chunks), list(bounds))
        return self._pool.submit(self.prepare, list(chunks))

    def __enter__(self) -> InputPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
