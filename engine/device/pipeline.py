"""The device loop: windows of pending chunks -> batches -> one forward pass with per-layer pooling -> writer.

For each window of pending cell chunks: read and tokenize the rows ahead of the device (:mod:`.prepare`:
two threads, or worker processes on CUDA hosts), cut length-sorted token-budget batches (packed for
varlen attention on CUDA), run the model once per batch while the tap pools every layer into one device
buffer ``[L+1, B, F]`` laid out by :class:`~.plan.PoolLayout`, copy that buffer to the host once per
batch, put rows back in cell order while the device runs the next batch (chunk boundaries included), and
hand each completed chunk to the :class:`~.writer.ChunkWriter` (two chunks in flight).

:class:`DeviceLoop` knows nothing of leases, store creation or progress totals: the run driver
(:mod:`.run`) gives it a plan and the pending chunks, in one process or inside Dask workers
(:mod:`.cluster`).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ... import kernels
from ..errors import ConfigError
from ..input.prepare import InputPool, InputSpec, Window, input_processes, prepare_window
from ..input.sources import CellSource, check_values
from ..interrupts import StopRequest
from ..models.base import GeneMapping, LoadedModel, TokenBatch, TokenizedBlock
from ..plan import DevicePlan
from ..progress import DeviceClock, ExtractProgress, ExtractStatus
from ..storage.store import StoreSpec
from ..storage.writer import ChunkData, ChunkWriter
from ..telemetry import Telemetry
from .batching import iter_batches
from .transfer import PooledBuffers, Transfer

log = logging.getLogger("cellstrata")

MIN_WINDOW_CELLS = 1024


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; refuses a CUDA request on a machine without one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        msg = "--device cuda was asked for but no CUDA device is available; use --device cpu or auto"
        raise ConfigError(msg)
    if device != "cpu" and not device.startswith("cuda"):
        msg = f"unknown device {device!r}; use auto, cpu or cuda[:N]"
        raise ConfigError(msg)
    return torch.device(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's precision: bfloat16 autocast on CUDA, float32 on CPU.

    Autocast's cache of cast weights is off: it would keep a bfloat16 copy of every layer's weights
    until the forward pass ends, so device memory would grow with the number of layers; casting each
    weight when it is used costs a few milliseconds per batch even at 1B parameters.
    """
    bf16 = device.type == "cuda" and precision == "bfloat16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)


def select_cells(tokens: TokenizedBlock, idx: np.ndarray) -> TokenizedBlock:
    """The cells ``idx`` of ``tokens`` (in that order)."""
    return TokenizedBlock(
        indices=tokens.indices[idx],
        genes=[tokens.genes[i] for i in idx],
        values=[tokens.values[i] for i in idx],
        truncated=tokens.truncated[idx],
        empty=tokens.empty[idx],
        n_expressed=None if tokens.n_expressed is None else tokens.n_expressed[idx],
    )


@dataclass
class ChunkJob:
    """A chunk on the device side: its host arrays fill as its batches land (``outstanding`` not yet landed)."""

    index: int
    bounds: tuple[int, int]
    tokens: TokenizedBlock
    result: dict[str, np.ndarray]
    outstanding: int = 0
    enqueued: bool = False  # every batch of the chunk has been run


class DeviceLoop:
    """Extracts chunks of one store on one device; :meth:`process` runs a list of pending chunks.

    Batches are planned inside each chunk, so a chunk's numbers are bit-identical however the run
    was split, interrupted or resumed. :attr:`telemetry` accumulates over calls (the driver replaces it
    with :meth:`fresh_telemetry` to count one shard).
    """

    def __init__(
        self,
        source: CellSource,
        loaded: LoadedModel,
        mapping: GeneMapping,
        plan: DevicePlan,
        spec: StoreSpec,
        out: str,
        device: torch.device,
    ):
        self.source = source
        self.loaded = loaded
        self.mapping = mapping
        self.plan = plan
        self.layout = plan.layout
        self.spec = spec
        self.out = out
        self.device = device
        self.stop = StopRequest()  # the driver's stop request while it runs; checked between batches
        self.buffers = PooledBuffers(loaded.n_layers + 1, self.layout.width, kernels.OUT_DTYPES[plan.dtype], device)
        self.telemetry = self.fresh_telemetry()
        self.clock = DeviceClock(device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's precision (:func:`autocast`)."""
        return autocast(self.device, self.plan.precision)

    def fresh_telemetry(self) -> Telemetry:
        """Zeroed counters shaped for this run's layers and poolings."""
        return Telemetry(
            overflow=np.zeros((self.loaded.n_layers + 1, len(self.layout.overflow_names)), dtype=np.int64),
            pooling_names=self.layout.overflow_names,
            attention=self.plan.attention_label,
            max_tokens=self.plan.max_tokens,
            device_type=self.device.type,
        )

    def preflight(self, n_cells: int) -> None:
        """Read, check and tokenize the first ``n_cells`` cells (before any store is created or changed)."""
        head = self.source.read(0, min(n_cells, self.spec.n_cells))
        check_values(head, require_counts=self.plan.require_counts)
        self.loaded.tokenizer.tokenize(head, self.mapping)

    # ------------------------------------------------------------------ input side
    def _windows(self, pending: np.ndarray) -> list[list[int]]:
        per = max(1, -(-MIN_WINDOW_CELLS // self.spec.chunk_cells))
        return [list(map(int, pending[i : i + per])) for i in range(0, len(pending), per)]

    def _input_spec(self) -> InputSpec:
        return InputSpec(self.loaded.tokenizer, self.mapping, self.plan.require_counts, self.plan.empty_cells)

    def _prepare(self, chunks: list[int]) -> Window:
        """Read and tokenize the cells of ``chunks`` in this process (the threads' path)."""
        bounds = [self.spec.chunk_bounds(c) for c in chunks]
        return prepare_window(self.source, self._input_spec(), chunks, bounds)

    # ------------------------------------------------------------------ device side
    def _start_chunk(self, c: int, bounds: tuple[int, int], tokens: TokenizedBlock) -> ChunkJob:
        """A chunk's host arrays: NaN rows for its empty cells, every other row written when its batch lands."""
        n = len(tokens)
        np_dtype = np.dtype(self.plan.dtype)
        n_rows = self.loaded.n_layers + 1
        widths = self.layout.widths
        result = {name: np.empty((n_rows, n, widths[name]), dtype=np_dtype) for name in self.layout.poolings}
        if tokens.empty.any():
            for arr in result.values():
                arr[:, tokens.empty, :] = np.nan
        return ChunkJob(c, bounds, tokens, result)

    def _forward(self, batch: TokenBatch, overflow: torch.Tensor) -> Transfer:
        """Run one batch through the model, pooling every layer into the device buffer; start its copy to the host."""
        ld = self.loaded
        n_kernel = self.layout.n_kernel_ops
        hidden = ld.hidden_size
        out_dtype = kernels.OUT_DTYPES[self.plan.dtype]
        customs = [(ld.custom_poolings[name], *self.layout.columns[name]) for name in self.layout.custom_poolings]
        dev = batch.to(self.device)
        buf = self.buffers.device_view(len(batch.positions))
        # the kernel's poolings as one [L+1, P, B, H] strided view of the buffer's first P*H columns
        kernel_out = buf[:, :, : n_kernel * hidden].unflatten(-1, (n_kernel, hidden)).transpose(1, 2)
        lengths, starts = dev.lengths, dev.starts  # starts: None when padded (cell b is row b)
        max_len = batch.max_len

        def tap(layer: int, hidden_state: torch.Tensor) -> None:
            if starts is not None:
                hidden_state = hidden_state[0]  # packed [1, T, H] -> [T, H]
            if self.layout.spec is not None:
                kernels.pool_cast(
                    hidden_state,
                    starts,
                    lengths,
                    self.layout.spec,
                    out_dtype,
                    out=kernel_out[layer],
                    overflow=overflow[layer, :n_kernel],
                    backend=self.plan.pool_backend,
                    max_len=max_len,
                )
            for j, (custom, lo, hi) in enumerate(customs):
                ovf = overflow[layer, n_kernel + j] if out_dtype == torch.float16 else None
                custom(hidden_state, lengths, buf[layer, :, lo:hi], ovf, self.plan.pool_backend, starts=starts)

        started = self.clock.start()
        with torch.inference_mode(), self.autocast():
            ld.model.forward(dev, tap)
        self.clock.stop(started)
        return self.buffers.to_host(buf)

    def _land(
        self, transfer: Transfer, job: ChunkJob, rows: np.ndarray, writer: ChunkWriter, bar: ExtractProgress | None
    ) -> None:
        """Put a batch's pooled rows in place; hand its chunk to the writer once the chunk's last batch landed."""
        host_np = transfer.wait()
        self.clock.collect()  # the batch's copy has finished, so its forward pass has too
        for name, (lo, hi) in self.layout.columns.items():
            job.result[name][:, rows, :] = host_np[:, :, lo:hi]
        job.outstanding -= 1
        if job.enqueued and job.outstanding == 0:
            self._submit(job, writer, bar)

    def _submit(self, job: ChunkJob, writer: ChunkWriter, bar: ExtractProgress | None) -> None:
        start, stop = job.bounds
        tokens = job.tokens
        writer.submit(
            ChunkData(
                index=job.index,
                start=start,
                stop=stop,
                pooled=job.result,
                obs_names=np.asarray(self.source.obs_names[start:stop]).astype(str),
                n_tokens=np.where(tokens.empty, 0, tokens.lengths).astype(np.int32),
                truncated=np.asarray(tokens.truncated, dtype=bool),
            )
        )
        self.telemetry.cells += len(tokens)
        self.telemetry.empty_cells += int(tokens.empty.sum())
        self.telemetry.truncated_cells += int(tokens.truncated.sum())
        if tokens.n_expressed is not None and tokens.truncated.any():
            genes, cells = np.unique(tokens.n_expressed[tokens.truncated], return_counts=True)
            self.telemetry.count_truncated(dict(zip(genes.tolist(), cells.tolist())))
        if bar is not None:
            bar.advance(len(tokens), self._status(writer, bar))

    def _status(self, writer: ChunkWriter, bar: ExtractProgress) -> ExtractStatus:
        """This run's counters for the progress line (device busy on CUDA, forward time on CPU)."""
        tele = self.telemetry
        return ExtractStatus(
            cells=tele.cells,
            tokens=tele.tokens,
            chunks=len(writer.written),
            seconds=bar.elapsed(),
            busy_seconds=self.clock.seconds if self.clock.enabled else tele.forward_seconds,
            writer_wait_seconds=tele.writer_wait_seconds + writer.wait_seconds,
        )

    def _run_window(
        self,
        window: Window,
        writer: ChunkWriter,
        overflow: torch.Tensor,
        in_flight: list[tuple[Transfer, ChunkJob, np.ndarray]],
        bar: ExtractProgress | None,
    ) -> None:
        """Every batch of every chunk of ``window``, each landing while the device runs the next one.

        On CUDA a batch's pooled rows land (and a finished chunk goes to the writer) only after the next
        batch, of the same chunk or the next, has been queued: the device never waits for the host at a
        chunk boundary. ``in_flight`` holds the batch still to land ``(transfer, job, rows)`` across calls.
        On CPU each batch lands at once (the device buffer is the host buffer).
        """
        tok = self.loaded.tokenizer
        plan = self.plan
        packed = plan.attention == "packed"
        for c, bounds, tokens in zip(window.chunks, window.bounds, window.parts):
            job = self._start_chunk(c, bounds, tokens)
            keep = ~tokens.empty
            where = np.flatnonzero(keep)
            sub = select_cells(tokens, where) if not keep.all() else tokens
            batches = iter_batches(sub, plan.max_tokens, tok.pad_id, tok.pad_value, packed=packed, varlen=plan.varlen)
            for batch in batches:
                self.stop.check()
                t0 = time.perf_counter()
                transfer = self._forward(batch, overflow)
                job.outstanding += 1
                rows = where[batch.positions]
                if in_flight:  # the previous batch lands while the device runs this one
                    self._land(*in_flight.pop(), writer, bar)
                if self.buffers.on_host:  # CPU: the buffer is reused by the next batch, land it now
                    self._land(transfer, job, rows, writer, bar)
                else:
                    in_flight.append((transfer, job, rows))
                self.telemetry.forward_seconds += time.perf_counter() - t0
                self.telemetry.batches += 1
                self.telemetry.tokens += int(batch.lengths.sum())
                self.telemetry.padded_tokens += batch.n_slots
            job.enqueued = True
            if job.outstanding == 0:  # every batch landed already (CPU, or a chunk of empty cells)
                self._submit(job, writer, bar)

    def process(self, chunks: Sequence[int] | np.ndarray, executor: Any, bar: ExtractProgress | None = None) -> None:
        """Extract ``chunks`` into the existing store, writing through ``executor``.

        ``executor`` is a Dask client or a ``concurrent.futures`` executor. Reading and tokenizing run
        windows ahead on an :class:`~.prepare.InputPool` (two threads, or one window per worker process),
        the forward pass here, encoding and writing on the executor's threads with at most two chunks in
        flight: bounded queues on both sides.
        """
        windows = self._windows(np.asarray(chunks, dtype=np.int64))
        if not windows:
            return
        self.clock = DeviceClock(self.device)
        writer = ChunkWriter(self.out, executor, max_pending=2)
        # float16 overflow counters of the whole call, read once at the end (reading them per chunk would
        # make the host wait for the device)
        overflow = torch.zeros(
            (self.loaded.n_layers + 1, len(self.layout.overflow_names)), dtype=torch.int64, device=self.device
        )
        in_flight: list[tuple[Transfer, ChunkJob, np.ndarray]] = []
        n_proc = input_processes(self.plan.input_workers, self.device.type, self.source, len(windows))
        self.telemetry.input_processes = n_proc

        def submit(pool: InputPool, w: list[int]) -> Any:
            return pool.submit(w, [self.spec.chunk_bounds(c) for c in w])

        try:
            with InputPool(self._prepare, self.source, self._input_spec(), n_proc) as pool:
                queue = collections.deque(submit(pool, w) for w in windows[: pool.ahead])
                for i in range(len(windows)):
                    t0 = time.perf_counter()
                    window = queue.popleft().result()
                    self.telemetry.input_wait_seconds += time.perf_counter() - t0
                    if i + pool.ahead < len(windows):
                        queue.append(submit(pool, windows[i + pool.ahead]))
                    self._run_window(window, writer, overflow, in_flight, bar)
            if in_flight:
                self._land(*in_flight.pop(), writer, bar)
            writer.flush()
            if bar is not None:  # every chunk is committed now: the line's last word
                bar.advance(0, self._status(writer, bar))
        except BaseException:
            # Chunks already handed to the writer are complete: let them commit before leaving.
            if self.stop:
                log.warning("stopping: committing the chunks already computed (signal again to stop now)")
            with contextlib.suppress(Exception):  # the original error is the one to report
                writer.flush()
            raise
        finally:
            self.telemetry.writer_wait_seconds += writer.wait_seconds
            with contextlib.suppress(Exception):  # after a device error the events may never complete
                self.telemetry.device_busy_seconds += self.clock.collect(wait=True)
            assert self.telemetry.overflow is not None
            self.telemetry.overflow += overflow.cpu().numpy()


# Names that lived here before the run driver (:mod:`.run`), the plan and the telemetry moved out: still
# importable from this module, looked up on first use (:mod:`.run` imports this module, so importing
# them here would make a cycle).
MOVED = {
    "ENGINE_VERSION": "cellstrata.engine.plan",
    "duplicate_notes": "cellstrata.engine.plan",
    "describe_utilisation": "cellstrata.engine.telemetry",
    "ExtractSettings": "cellstrata.engine.run",
    "Extraction": "cellstrata.engine.run",
    "extract": "cellstrata.engine.run",
}


def __getattr__(name: str) -> Any:
    if name in MOVED:
        return getattr(importlib.import_module(MOVED[name]), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = ["ChunkJob", "DeviceLoop", "autocast", "resolve_device", "select_cells"]
