"""The only code that writes data into a store: whole chunks, as Dask tasks, then the commit flag.

``ChunkWriter.submit`` hands one complete cell chunk (every pooling, every layer, and the per-cell
arrays) to a Dask task that encodes and writes it, then its checksums (:mod:`engine.checksums`), and
only then sets ``done[c] = 1``. At most ``max_pending`` chunks are in flight: ``submit`` waits for
the oldest when the queue is full, which bounds host memory (backpressure) while the forward pass of
the next chunks overlaps the writes; the time it waits is the run's writer wait.

Inside a chunk's task, zarr encodes the store chunks of one array side by side on its own threads
(``async.concurrency``); with ``threads`` > 1 the poolings' arrays, the per-cell arrays and the
checksums run at the same time as well, so the slowest part sets the time instead of their sum
(``benchmarks/writer.py``). The codec and so the bytes written are the same either way.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from ..errors import WriteError
from .checksums import checksum_array, write_checksums
from .location import member_array
from .store import name_arrays


@dataclass
class ChunkData:
    """One cell chunk ``c`` covering cells ``[start, stop)``; ``pooled[name]`` is ``[L+1, stop-start, W]``."""

    index: int
    start: int
    stop: int
    pooled: dict[str, np.ndarray]
    obs_names: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.pooled.values())


WRITE_THREADS = 4  # a chunk's parts written side by side: poolings, per-cell arrays, checksums


def _run_all(calls: list[Callable[[], None]], threads: int) -> None:
    """Run ``calls`` in order, or on ``threads`` threads; every call finishes before the first error is raised."""
    if threads <= 1 or len(calls) <= 1:
        for call in calls:
            call()
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(calls)), thread_name_prefix="cellstrata-part") as pool:
        futures = [pool.submit(call) for call in calls]
    for future in futures:
        future.result()


def write_chunk(path: str, chunk: ChunkData, *, threads: int | None = None) -> int:
    """Write every array's region of ``chunk`` and its checksums, then its ``done`` flag (inside a Dask task).

    ``threads`` (default :data:`WRITE_THREADS`) > 1 writes the poolings, the per-cell arrays and the
    checksums side by side; 1 writes them one after the other. The bytes written are the same.
    """
    threads = WRITE_THREADS if threads is None else threads
    group = zarr.open_group(path, mode="r+", use_consolidated=False)  # the store's own files, not its index
    sl = slice(chunk.start, chunk.stop)
    arrays = {name: member_array(group, "pooled", name) for name in chunk.pooled}
    # the digests cover the values as stored
    stored = {name: np.asarray(data, dtype=arrays[name].dtype) for name, data in chunk.pooled.items()}

    def pooled(name: str) -> Callable[[], None]:
        def put() -> None:
            arrays[name][:, sl, :] = chunk.pooled[name]

        return put

    def per_cell() -> None:
        for name in name_arrays(group):  # obs_names, and from store format 2 on the cell coordinates
            member_array(group, name)[sl] = chunk.obs_names
        member_array(group, "n_tokens")[sl] = chunk.n_tokens
        member_array(group, "truncated")[sl] = chunk.truncated

    calls = [pooled(name) for name in chunk.pooled] + [per_cell]
    checksums = checksum_array(group)
    if checksums is not None:  # stores written before checksums existed have none

        def sums() -> None:
            n_tokens = np.asarray(chunk.n_tokens, dtype=np.int32)
            truncated = np.asarray(chunk.truncated, dtype=bool)
            write_checksums(checksums, chunk.index, stored, chunk.obs_names, n_tokens, truncated)

        calls.append(sums)
    _run_all(calls, threads)
    member_array(group, "done")[chunk.index : chunk.index + 1] = np.ones(1, dtype=np.uint8)
    return chunk.index


def _explain(err: BaseException, chunk_index: int) -> str:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        cause = "the disk is full"
    elif isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = "the store is not writable"
    else:
        cause = f"{type(err).__name__}: {err}"
    return (
        f"writing cell chunk {chunk_index} failed ({cause}); chunks already committed are intact — "
        "fix the cause and re-run the same command to resume"
    )


class ChunkWriter:
    """Submit chunk writes to a Dask client or a thread pool, with a bounded number in flight."""

    def __init__(self, path: str, client: Any, *, max_pending: int = 2):
        self.path = path
        self.client = client
        self.max_pending = max(1, max_pending)
        self._pending: collections.deque[tuple[int, Any]] = collections.deque()
        self.written: list[int] = []
        self.wait_seconds = 0.0

    def submit(self, chunk: ChunkData) -> None:
        """Queue ``chunk`` for writing; blocks while ``max_pending`` writes are in flight."""
        while len(self._pending) >= self.max_pending:
            t0 = time.perf_counter()
            self._wait_oldest()
            self.wait_seconds += time.perf_counter() - t0
        if hasattr(self.client, "scatter"):  # a Dask client
            # Scatter the chunk first: its arrays travel as data, not inside the task graph.
            data = self.client.scatter(chunk, hash=False)
            future = self.client.submit(write_chunk, self.path, data, pure=False, key=f"write-chunk-{chunk.index}")
        else:  # a concurrent.futures executor (inside a Dask worker)
            future = self.client.submit(write_chunk, self.path, chunk)
        self._pending.append((chunk.index, future))

    def _wait_oldest(self) -> None:
        index, future = self._pending.popleft()
        try:
            self.written.append(future.result())
        except Exception as err:
            self._drain()
            raise WriteError(_explain(err, index)) from err

    def _drain(self) -> None:
        """Let the other in-flight writes finish (each commits or fails on its own)."""
        while self._pending:
            _, fut = self._pending.popleft()
            with contextlib.suppress(Exception):  # the first failure is the one reported
                self.written.append(fut.result())

    def flush(self) -> None:
        """Wait for every queued write; raises :class:`WriteError` on the first failure."""
        while self._pending:
            self._wait_oldest()
