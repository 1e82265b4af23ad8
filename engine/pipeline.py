"""Extraction: source -> tokenizer -> batches -> one forward pass with per-layer pooling -> writer.

For each window of pending cell chunks: read and tokenize the rows ahead of the device (:mod:`.prepare`:
two threads, or worker processes on CUDA hosts), cut length-sorted token-budget batches (packed for
varlen attention on CUDA), run the model once per batch while the tap pools every layer into one device
buffer ``[L+1, P, B, H]``, copy that buffer to the host once per batch, put rows back in cell order while
the device runs the next batch (chunk boundaries included), and hand each completed chunk to the
:class:`~.writer.ChunkWriter` (Dask threads, two chunks in flight). The same :meth:`Extraction.process`
runs inside Dask workers (:mod:`.cluster`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import numbers
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, kernels
from .batching import iter_batches
from .budget import auto_max_tokens
from .errors import ConfigError
from .hub import hub_attrs, load_checkpoint
from .interrupts import StopRequest, during_startup, graceful_stop
from .lease import Lease
from .location import StoreLocation
from .models import get_family
from .models.attention import ATTENTION_CHOICES, resolve_attention
from .models.base import GeneMapping, LoadedModel, TokenBatch, TokenizedBlock
from .prepare import InputPool, InputSpec, Window, input_processes, prepare_window
from .progress import DeviceClock, ExtractProgress, ExtractStatus, ExtractTotals, fraction
from .sources import CellSource, check_values, open_source
from .store import (
    ATTR_KEY,
    Store,
    StoreSpec,
    create_or_resume,
    default_chunk_cells,
    describe_truncation,
    pending_chunks,
    refuse_foreign,
    store_attributes,
    update_attrs,
)
from .transfer import PooledBuffers, Transfer
from .weights import random_init_of
from .writer import ChunkData, ChunkWriter

log = logging.getLogger("cellstrata")

ENGINE_VERSION = __version__  # one version source: cellstrata/__init__.py
EMPTY_POLICIES = ("nan", "error")
MIN_WINDOW_CELLS = 1024
PREFLIGHT_CELLS = 256


@dataclass
class Telemetry:
    """Counters of one run (stored in the store's attributes at the end)."""

    cells: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    empty_cells: int = 0
    truncated_cells: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0
    input_wait_seconds: float = 0.0
    writer_wait_seconds: float = 0.0
    device_busy_seconds: float = 0.0  # CUDA: the forward passes' device time (events); 0 on CPU
    overflow: np.ndarray | None = None
    # expressed genes before truncation -> number of truncated cells that had that many
    truncated_genes: dict[int, int] = field(default_factory=dict)
    pooling_names: tuple[str, ...] = field(default_factory=tuple)
    attention: str = ""
    max_tokens: int = 0
    input_processes: int = 0
    device_type: str = "cpu"
    workers: int = 1  # processes whose ``*_seconds`` are summed here (a cluster's worker processes)

    COUNTERS = (
        "cells",
        "tokens",
        "padded_tokens",
        "batches",
        "empty_cells",
        "truncated_cells",
        "forward_seconds",
        "input_wait_seconds",
        "writer_wait_seconds",
        "device_busy_seconds",
    )

    def counters(self) -> dict[str, Any]:
        """The raw counters (what a Dask worker sends back to the driver)."""
        d: dict[str, Any] = {k: getattr(self, k) for k in self.COUNTERS}
        d["overflow"] = None if self.overflow is None else self.overflow.tolist()
        d["truncated_genes"] = dict(self.truncated_genes)
        return d

    def add(self, counters: Mapping[str, Any]) -> None:
        """Add a worker's :meth:`counters` to these."""
        for k in self.COUNTERS:
            setattr(self, k, getattr(self, k) + counters.get(k, 0))
        if counters.get("overflow") is not None:
            ovf = np.asarray(counters["overflow"], dtype=np.int64)
            self.overflow = ovf if self.overflow is None else self.overflow + ovf
        self.count_truncated(counters.get("truncated_genes", {}))

    def count_truncated(self, histogram: Mapping[int, int]) -> None:
        """Add truncated cells by the number of expressed genes they had (``{genes: cells}``)."""
        for genes, cells in histogram.items():
            self.truncated_genes[int(genes)] = self.truncated_genes.get(int(genes), 0) + int(cells)

    def truncated_genes_stats(self) -> tuple[float, int] | None:
        """Median and max expressed genes of the truncated cells (None when no tokenizer counted them)."""
        if not self.truncated_genes:
            return None
        genes = np.array(sorted(self.truncated_genes), dtype=np.int64)
        cum = np.cumsum([self.truncated_genes[g] for g in genes])
        n = int(cum[-1])
        lo = genes[np.searchsorted(cum, (n + 1) // 2)]  # the ((n+1)//2)-th and (n//2+1)-th smallest values
        hi = genes[np.searchsorted(cum, n // 2 + 1)]
        return float((lo + hi) / 2), int(genes[-1])

    def utilisation(self) -> dict[str, float | None]:
        """Shares of wall time (per worker process): forward pass, device busy (CUDA only), writer wait."""
        wall = self.seconds * max(self.workers, 1)
        busy = fraction(self.device_busy_seconds, wall) if self.device_type == "cuda" else None
        return {
            "forward_fraction": fraction(self.forward_seconds, wall),
            "device_busy_fraction": busy,
            "writer_wait_fraction": fraction(self.writer_wait_seconds, wall),
        }

    def as_dict(self) -> dict[str, Any]:
        s = max(self.seconds, 1e-9)
        d: dict[str, Any] = {
            "cells": self.cells,
            "tokens": self.tokens,
            "padded_tokens": self.padded_tokens,
            "batches": self.batches,
            "empty_cells": self.empty_cells,
            "truncated_cells": self.truncated_cells,
            "seconds": round(self.seconds, 3),
            "forward_seconds": round(self.forward_seconds, 3),
            "input_wait_seconds": round(self.input_wait_seconds, 3),
            "writer_wait_seconds": round(self.writer_wait_seconds, 3),
            "device_busy_seconds": round(self.device_busy_seconds, 3),
            **{k: None if v is None else round(v, 4) for k, v in self.utilisation().items()},
            "device_type": self.device_type,
            "cells_per_s": round(self.cells / s, 2),
            "tokens_per_s": round(self.tokens / s, 1),
            "padding_fraction": round(1 - self.tokens / max(self.padded_tokens, 1), 4),
            "attention": self.attention,
            "max_tokens": self.max_tokens,
            "input_processes": self.input_processes,
        }
        stats = self.truncated_genes_stats()
        if stats is not None:
            d["truncated_genes_median"], d["truncated_genes_max"] = stats
        ovf = self.overflow
        d["float16_overflows"] = int(ovf.sum()) if ovf is not None else 0
        if ovf is not None and ovf.any():
            d["overflow_layers"] = {
                f"layer {layer} {self.pooling_names[p]}": int(ovf[layer, p]) for layer, p in zip(*np.nonzero(ovf))
            }
        return d


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


def _resolve_poolings(loaded: LoadedModel, poolings: Sequence[str] | None) -> tuple[str, ...]:
    offered = loaded.pooling_names
    names = tuple(poolings) if poolings else loaded.default_poolings
    if "all" in names:
        names = offered
    unknown = [n for n in names if n not in offered]
    if unknown:
        msg = f"{loaded.family} has no pooling {', '.join(unknown)}; choose from {', '.join(offered)} or all"
        raise ConfigError(msg)
    if len(set(names)) != len(names):
        msg = f"pooling listed twice in {','.join(names)}"
        raise ConfigError(msg)
    return names


@dataclass
class _ChunkJob:
    """A chunk on the device side: its host arrays fill as its batches land (``outstanding`` not yet landed)."""

    index: int
    bounds: tuple[int, int]
    tokens: TokenizedBlock
    result: dict[str, np.ndarray]
    outstanding: int = 0
    enqueued: bool = False  # every batch of the chunk has been run


class Extraction:
    """One extraction run; see :func:`extract` for the parameters.

    Batches are planned inside each chunk, so a chunk's numbers are bit-identical however the run
    was split, interrupted or resumed.
    """

    def __init__(
        self,
        source: CellSource,
        loaded: LoadedModel,
        out: str | Path,
        *,
        poolings: Sequence[str] | None,
        dtype: str,
        device: torch.device,
        max_tokens: int | None,
        chunk_cells: int | None,
        n_cells: int,
        empty_cells: str,
        require_counts: bool,
        compression: str,
        overwrite: bool,
        progress: bool,
        client: Any = None,
        break_lock: bool = False,
        attention: str = "auto",
        input_workers: int | None = None,
    ):
        if empty_cells not in EMPTY_POLICIES:
            msg = f"empty_cells must be one of {', '.join(EMPTY_POLICIES)}, got {empty_cells!r}"
            raise ConfigError(msg)
        if dtype not in kernels.OUT_DTYPES:
            msg = f"unknown dtype {dtype!r}; choose float16 or float32"
            raise ConfigError(msg)
        self.source = source
        self.loaded = loaded
        self.out = str(out)
        self.poolings = _resolve_poolings(loaded, poolings)
        self.dtype = dtype
        self.device = device
        self.input_workers = input_workers
        self.n_cells = n_cells
        self.empty_cells = empty_cells
        self.require_counts = require_counts
        self.progress = progress
        self.client = client
        self.break_lock = break_lock
        self.stop = StopRequest()  # set by SIGINT/SIGTERM during run(); checked between batches
        hidden = loaded.hidden_size
        if chunk_cells is None:  # an explicit value is never replaced (ExtractSettings.check refuses 0)
            chunk_cells = default_chunk_cells(n_cells, hidden, dtype)
        self.chunk_cells = int(chunk_cells)
        if self.chunk_cells < 1:
            msg = f"chunk_cells must be >= 1, got {self.chunk_cells}"
            raise ConfigError(msg)
        self.mapping: GeneMapping = loaded.tokenizer.map_genes(list(source.gene_names))
        self.input_notes = duplicate_notes(source, loaded.family)  # warned at the start of every run
        # Buffer layout: the kernel's distinct ops first (one launch writes them as a [P, B, H] view;
        # names that alias one op share its columns), then the custom poolings. Overflow counters
        # follow the same order.
        self.kernel_poolings = tuple(n for n in self.poolings if n in loaded.pool_ops)
        self.custom_poolings = tuple(n for n in self.poolings if n not in loaded.pool_ops)
        kernel_ops = tuple(dict.fromkeys(loaded.pool_ops[n] for n in self.kernel_poolings))
        self.widths = {n: loaded.custom_poolings[n].width for n in self.custom_poolings}
        self.widths.update(dict.fromkeys(self.kernel_poolings, hidden))
        self.columns: dict[str, tuple[int, int]] = {
            n: (kernel_ops.index(loaded.pool_ops[n]) * hidden, (kernel_ops.index(loaded.pool_ops[n]) + 1) * hidden)
            for n in self.kernel_poolings
        }
        offset = len(kernel_ops) * hidden
        for name in self.custom_poolings:
            self.columns[name] = (offset, offset + self.widths[name])
            offset += self.widths[name]
        self.spec = (
            kernels.PoolSpec(ops=kernel_ops, n_leading=loaded.layout.n_leading, n_trailing=loaded.layout.n_trailing)
            if kernel_ops
            else None
        )
        self.overflow_names = (
            *("/".join(n for n in self.kernel_poolings if loaded.pool_ops[n] == op) for op in kernel_ops),
            *self.custom_poolings,
        )
        self.precision = "float32" if device.type == "cpu" else "bfloat16"
        try:
            self.attention, self.varlen = resolve_attention(
                attention, device, getattr(torch, self.precision), _head_dim(loaded.model)
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if max_tokens is not None and max_tokens < 1:
            msg = f"max_tokens must be >= 1, got {max_tokens}"
            raise ConfigError(msg)
        self.max_tokens = int(max_tokens if max_tokens is not None else self._auto_max_tokens())
        self.pool_backend = kernels.resolve_backend(device)
        self.buffers = PooledBuffers(loaded.n_layers + 1, offset, kernels.OUT_DTYPES[dtype], device)
        self.store_spec = self._store_spec(compression)
        self.overwrite = overwrite
        self.telemetry = self.fresh_telemetry()
        self.clock = DeviceClock(device)

    # ------------------------------------------------------------------ configuration
    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's precision: bfloat16 autocast on CUDA, float32 on CPU.

        Autocast's cache of cast weights is off: it would keep a bfloat16 copy of every layer's weights
        until the forward pass ends, so device memory would grow with the number of layers; casting each
        weight when it is used costs a few milliseconds per batch even at 1B parameters.
        """
        bf16 = self.device.type == "cuda" and self.precision == "bfloat16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)

    def _auto_max_tokens(self) -> int:
        packed = self.attention == "packed"
        return auto_max_tokens(self.loaded, self.device, packed=packed, varlen=self.varlen, autocast=self.autocast)

    def _store_spec(self, compression: str) -> StoreSpec:
        ld = self.loaded
        fp = self.source.fingerprint()
        tokenizer = ld.tokenizer.settings()
        pool_ops = {n: ld.pool_ops.get(n, "custom") for n in self.poolings}
        model_attrs = {
            "family": ld.family,
            "preset": ld.preset,
            "n_layers": ld.n_layers,
            "hidden": ld.hidden_size,
            "config": dict(ld.config),
            "checkpoint": str(ld.checkpoint.get("path")),
            "sha256": ld.checkpoint.get("sha256"),
        }
        attrs = store_attributes(
            model=model_attrs,
            tokenizer=tokenizer,
            pool_ops=pool_ops,
            layout=[ld.layout.n_leading, ld.layout.n_trailing],
            dtype=self.dtype,
            precision=self.precision,
            chunk_cells=self.chunk_cells,
            n_cells=self.n_cells,
            empty_cells=self.empty_cells,
            source={**fp, **duplicate_counts(self.source)},
            official_layer=self.loaded.official_layer,
            pool_backend=self.pool_backend,
            gene_overlap={
                "n_input": self.mapping.n_input,
                "n_matched": self.mapping.n_matched,
                "n_vocab_genes": self.mapping.n_vocab_genes,
            },
            engine_version=ENGINE_VERSION,
            truncation={"max_length": ld.tokenizer.max_length, "rule": ld.tokenizer.truncation_rule},
            weights=random_init_of(ld.checkpoint.get("path")) or {"weights": "as given"},
            **hub_attrs(ld.checkpoint),
        )
        return StoreSpec(
            n_cells=self.n_cells,
            n_layers=ld.n_layers,
            hidden=ld.hidden_size,
            widths={n: self.widths[n] for n in self.poolings},
            dtype=self.dtype,
            chunk_cells=self.chunk_cells,
            compression=compression,
            attrs=attrs,
        )

    # ------------------------------------------------------------------ input side
    def _windows(self, pending: np.ndarray) -> list[list[int]]:
        per = max(1, -(-MIN_WINDOW_CELLS // self.chunk_cells))
        return [list(map(int, pending[i : i + per])) for i in range(0, len(pending), per)]

    def _input_spec(self) -> InputSpec:
        return InputSpec(self.loaded.tokenizer, self.mapping, self.require_counts, self.empty_cells)

    def _prepare(self, chunks: list[int]) -> Window:
        """Read and tokenize the cells of ``chunks`` in this process (the threads' path)."""
        bounds = [self.store_spec.chunk_bounds(c) for c in chunks]
        return prepare_window(self.source, self._input_spec(), chunks, bounds)

    # ------------------------------------------------------------------ device side
    def _start_chunk(self, c: int, bounds: tuple[int, int], tokens: TokenizedBlock) -> _ChunkJob:
        """A chunk's host arrays: NaN rows for its empty cells, every other row written when its batch lands."""
        n = len(tokens)
        np_dtype = np.dtype(self.dtype)
        n_rows = self.loaded.n_layers + 1
        result = {name: np.empty((n_rows, n, self.widths[name]), dtype=np_dtype) for name in self.poolings}
        if tokens.empty.any():
            for arr in result.values():
                arr[:, tokens.empty, :] = np.nan
        return _ChunkJob(c, bounds, tokens, result)

    def _forward(self, batch: TokenBatch, overflow: torch.Tensor) -> Transfer:
        """Run one batch through the model, pooling every layer into the device buffer; start its copy to the host."""
        ld = self.loaded
        n_kernel = len(self.spec.ops) if self.spec is not None else 0
        hidden = ld.hidden_size
        out_dtype = kernels.OUT_DTYPES[self.dtype]
        customs = [(ld.custom_poolings[name], *self.columns[name]) for name in self.custom_poolings]
        dev = batch.to(self.device)
        buf = self.buffers.device_view(len(batch.positions))
        # the kernel's poolings as one [L+1, P, B, H] strided view of the buffer's first P*H columns
        kernel_out = buf[:, :, : n_kernel * hidden].unflatten(-1, (n_kernel, hidden)).transpose(1, 2)
        lengths, starts = dev.lengths, dev.starts  # starts: None when padded (cell b is row b)
        max_len = batch.max_len

        def tap(layer: int, hidden_state: torch.Tensor) -> None:
            if starts is not None:
                hidden_state = hidden_state[0]  # packed [1, T, H] -> [T, H]
            if self.spec is not None:
                kernels.pool_cast(
                    hidden_state,
                    starts,
                    lengths,
                    self.spec,
                    out_dtype,
                    out=kernel_out[layer],
                    overflow=overflow[layer, :n_kernel],
                    backend=self.pool_backend,
                    max_len=max_len,
                )
            for j, (custom, lo, hi) in enumerate(customs):
                ovf = overflow[layer, n_kernel + j] if out_dtype == torch.float16 else None
                custom(hidden_state, lengths, buf[layer, :, lo:hi], ovf, self.pool_backend, starts=starts)

        started = self.clock.start()
        with torch.inference_mode(), self.autocast():
            ld.model.forward(dev, tap)
        self.clock.stop(started)
        return self.buffers.to_host(buf)

    def _land(
        self, transfer: Transfer, job: _ChunkJob, rows: np.ndarray, writer: ChunkWriter, bar: ExtractProgress | None
    ) -> None:
        """Put a batch's pooled rows in place; hand its chunk to the writer once the chunk's last batch landed."""
        host_np = transfer.wait()
        self.clock.collect()  # the batch's copy has finished, so its forward pass has too
        for name, (lo, hi) in self.columns.items():
            job.result[name][:, rows, :] = host_np[:, :, lo:hi]
        job.outstanding -= 1
        if job.enqueued and job.outstanding == 0:
            self._submit(job, writer, bar)

    def _submit(self, job: _ChunkJob, writer: ChunkWriter, bar: ExtractProgress | None) -> None:
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
        self, window: Window, writer: ChunkWriter, overflow: torch.Tensor, in_flight: list, bar: ExtractProgress | None
    ) -> None:
        """Every batch of every chunk of ``window``, each landing while the device runs the next one.

        On CUDA a batch's pooled rows land (and a finished chunk goes to the writer) only after the next
        batch, of the same chunk or the next, has been queued: the device never waits for the host at a
        chunk boundary. ``in_flight`` holds the batch still to land ``(transfer, job, rows)`` across calls.
        On CPU each batch lands at once (the device buffer is the host buffer).
        """
        tok = self.loaded.tokenizer
        packed = self.attention == "packed"
        for c, bounds, tokens in zip(window.chunks, window.bounds, window.parts):
            job = self._start_chunk(c, bounds, tokens)
            keep = ~tokens.empty
            where = np.flatnonzero(keep)
            sub = _select(tokens, where) if not keep.all() else tokens
            batches = iter_batches(sub, self.max_tokens, tok.pad_id, tok.pad_value, packed=packed, varlen=self.varlen)
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

    # ------------------------------------------------------------------ driver
    def _preflight(self) -> None:
        """Read, check and tokenize the first cells before any store is created or changed."""
        head = self.source.read(0, min(PREFLIGHT_CELLS, self.n_cells))
        check_values(head, require_counts=self.require_counts)
        self.loaded.tokenizer.tokenize(head, self.mapping)

    def run(self) -> Store:
        """Create or resume the store under its lease and extract every pending chunk in this process."""
        with graceful_stop() as stop:
            self.stop = stop
            self._preflight()
            refuse_foreign(self.out)  # before the lease: a foreign --out is not written, even briefly
            with Lease.acquire(StoreLocation.of(self.out), break_lock=self.break_lock):
                self.group, self.resumed = create_or_resume(self.out, self.store_spec, overwrite=self.overwrite)
                pending = pending_chunks(self.group)
                log_start(
                    self.out, self.mapping, resumed=self.resumed, n_pending=len(pending), total=self.store_spec.n_chunks
                )
                for note in self.input_notes:
                    log.warning("%s", note)
                client, own_client = self.client, False
                if client is None and len(pending):
                    client, own_client = _local_client(), True
                t_start = time.perf_counter()
                totals = ExtractTotals(
                    cells=self.n_cells,
                    chunks=self.store_spec.n_chunks,
                    cells_before=self.n_cells - self.store_spec.cells_in(pending),
                    chunks_before=self.store_spec.n_chunks - len(pending),
                    busy_label=busy_label(self.device.type),
                )
                try:
                    with ExtractProgress(totals, enabled=self.progress) as bar:
                        self.process(pending, client, bar)
                finally:
                    if own_client:
                        client.close()
                self.telemetry.seconds = time.perf_counter() - t_start
                self._finish()
        return Store(self.out)

    def process(self, chunks: Sequence[int], executor: Any, bar: ExtractProgress | None = None) -> None:
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
            (self.loaded.n_layers + 1, len(self.overflow_names)), dtype=torch.int64, device=self.device
        )
        in_flight: list = []
        n_proc = input_processes(self.input_workers, self.device.type, self.source, len(windows))
        self.telemetry.input_processes = n_proc

        def submit(pool: InputPool, w: list[int]) -> Any:
            return pool.submit(w, [self.store_spec.chunk_bounds(c) for c in w])

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

    def _finish(self) -> None:
        record_run(self.group, self.telemetry, resumed=self.resumed)

    def close(self) -> None:
        """Release the input's file handles."""
        self.source.close()

    def fresh_telemetry(self) -> Telemetry:
        """Zeroed counters shaped for this run's layers and poolings."""
        return Telemetry(
            overflow=np.zeros((self.loaded.n_layers + 1, len(self.overflow_names)), dtype=np.int64),
            pooling_names=self.overflow_names,
            attention=self.attention if self.attention == "padded" else f"packed ({self.varlen})",
            max_tokens=self.max_tokens,
            device_type=self.device.type,
        )


# What each family's official tokenizer does with a gene identifier given by several input columns
# (Geneformer's tokenizer warns itself, naming the duplicates and its rule).
DUPLICATE_GENE_RULES = {
    "scgpt": "each column is its own token with that gene's id, as scGPT's official tokenizer does",
    "tahoe-x1": "each column is its own token with that gene's id, as Tahoe-X1's official tokenizer does",
    "scfoundation": "only the first column of each is read, as scFoundation's official gene-list alignment does",
}


def duplicate_counts(source: CellSource) -> dict[str, int]:
    """The store's record of repeated names: ``duplicate_obs_names`` / ``duplicate_var_names`` (extra entries)."""
    cells, genes = source.duplicates()
    return {"duplicate_obs_names": cells.extra, "duplicate_var_names": genes.extra}


def duplicate_notes(source: CellSource, family: str) -> tuple[str, ...]:
    """One warning line per kind of repeated name in the input (none when every name is unique)."""
    cells, genes = source.duplicates()
    notes = []
    if cells:
        notes.append(
            f"{cells.describe('cell')}; every cell is extracted in input order and the store's obs_names repeat "
            "them: make them unique (AnnData.obs_names_make_unique) to tell those cells apart by name"
        )
    rule = DUPLICATE_GENE_RULES.get(family)
    if genes and rule is not None:
        notes.append(f"{genes.describe('column')}; {rule} (identifiers outside the vocabulary are not read)")
    return tuple(notes)


def log_start(out: Any, mapping: GeneMapping, *, resumed: bool, n_pending: int, total: int) -> None:
    """Say what a run starts from: chunks already written, and the input's overlap with the vocabulary."""
    if resumed:
        log.info("resuming %s: %d of %d chunks already written", out, total - n_pending, total)
    log.info("%s", mapping.report())
    if mapping.fraction < 0.5:
        log.warning("only %.1f%% of the input genes are in the vocabulary", 100 * mapping.fraction)


def record_run(group: Any, telemetry: Telemetry, *, resumed: bool, **extra: Any) -> None:
    """Store the run's completeness and telemetry in the store's attributes and warn about what needs it."""
    done = np.asarray(group["done"][:])
    if resumed and telemetry.cells == 0:  # nothing was left to do: keep the last real run's numbers
        update_attrs(group, complete=bool(done.all()))
        return
    tele = {**telemetry.as_dict(), **extra}
    truncation = dict(group.attrs[ATTR_KEY]).get("truncation") or {}
    tele["truncated_to_tokens"] = truncation.get("max_length")
    tele["truncation_rule"] = truncation.get("rule")
    update_attrs(group, complete=bool(done.all()), telemetry=tele)
    log.info(
        "%d cells in %.1f s: %.1f cells/s, %.0f tokens/s, padding %.1f%%; %s; device waited %.1f s for input "
        "and %.1f s for the writer",
        tele["cells"],
        tele["seconds"],
        tele["cells_per_s"],
        tele["tokens_per_s"],
        100 * tele["padding_fraction"],
        describe_utilisation(tele),
        tele["input_wait_seconds"],
        tele["writer_wait_seconds"],
    )
    if tele["float16_overflows"]:
        log.warning(
            "%d pooled values exceeded float16 range and were stored as inf (%s); "
            "re-run with --dtype float32 to keep them",
            tele["float16_overflows"],
            ", ".join(tele["overflow_layers"]),
        )
    if tele["truncated_cells"] or truncation.get("max_length") is not None:
        log.info(
            "this run: %s",
            describe_truncation(
                tele["truncated_cells"],
                tele["cells"],
                truncation.get("max_length"),
                truncation.get("rule"),
                genes_median=tele.get("truncated_genes_median"),
                genes_max=tele.get("truncated_genes_max"),
            ),
        )
    if tele["empty_cells"]:
        log.warning(
            "%d cells had no expressed vocabulary gene; they are stored as NaN with n_tokens 0", tele["empty_cells"]
        )


def describe_utilisation(tele: Mapping[str, Any]) -> str:
    """``GPU busy 93% of wall time`` (CUDA) or ``forward pass 71% of wall time`` (CPU), from a telemetry dict."""
    busy, forward = tele.get("device_busy_fraction"), tele.get("forward_fraction")
    if busy is not None:
        return f"GPU busy {100 * busy:.0f}% of wall time"
    if forward is not None:
        return f"forward pass {100 * forward:.0f}% of wall time"
    return "utilisation not measured"


def _head_dim(model: torch.nn.Module) -> int:
    """Attention head size of a family's model (every family's attention module has ``n_heads``)."""
    for module in model.modules():
        heads = getattr(module, "n_heads", None)
        if isinstance(heads, int) and heads > 0:
            return int(model.hidden_size) // heads
    msg = f"{type(model).__name__} has no attention module with n_heads"
    raise TypeError(msg)


def _select(tokens: TokenizedBlock, idx: np.ndarray) -> TokenizedBlock:
    return TokenizedBlock(
        indices=tokens.indices[idx],
        genes=[tokens.genes[i] for i in idx],
        values=[tokens.values[i] for i in idx],
        truncated=tokens.truncated[idx],
        empty=tokens.empty[idx],
        n_expressed=None if tokens.n_expressed is None else tokens.n_expressed[idx],
    )


def _local_client() -> Any:
    """An in-process Dask client (threads) that runs the chunk writes beside the forward pass."""
    from distributed import Client

    return Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0", silence_logs=logging.ERROR
    )


def busy_label(device_type: str) -> str:
    """What the progress line's utilisation field measures on ``device_type``."""
    return "GPU busy" if device_type == "cuda" else "forward"


#: ``(setting, minimum, meaning)`` of the numeric extraction options checked by :meth:`ExtractSettings.check`.
NUMERIC_OPTIONS: tuple[tuple[str, int, str], ...] = (
    ("chunk_cells", 1, "cells per store chunk; leave it out for chunks of about 4 MB"),
    ("max_tokens", 1, "the token budget of a batch; leave it out for the measured or size-based default"),
    ("max_length", 1, "the model's context in tokens; leave it out for the model's own"),
    ("input_workers", 0, "processes that read the input; 0 for two threads, leave it out for the default"),
    ("seed", 0, "the seed of the per-cell tokenizer randomness"),
    ("limit", 1, "the number of cells to extract; leave it out for every cell"),
)


def check_whole_number(name: str, value: Any, minimum: int, meaning: str) -> None:
    """Refuse ``value`` unless it is None or a whole number >= ``minimum`` (one line naming the option)."""
    if value is None:
        return
    flag = "--" + name.replace("_", "-")
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < minimum:
        msg = f"{flag} must be a whole number >= {minimum}, got {value!r} ({meaning})"
        raise ConfigError(msg)


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that defines an extraction run, picklable so Dask workers can rebuild it."""

    data: Any
    model: str
    checkpoint: str
    out: str
    poolings: tuple[str, ...] | None = None
    dtype: str = "float16"
    device: str = "auto"
    max_tokens: int | None = None
    chunk_cells: int | None = None
    layer: str | None = None
    gene_column: str | None = None
    limit: int | None = None
    seed: int = 0
    max_length: int | None = None
    model_options: tuple[tuple[str, Any], ...] = ()
    empty_cells: str = "nan"
    allow_noncounts: bool = False
    compression: str = "zstd"
    attention: str = "auto"
    input_workers: int | None = None

    def check(self) -> None:
        """Refuse settings that cannot work, before anything is loaded.

        Numeric options are whole numbers in their range or None (the default); a value out of range is
        refused, never replaced by the default.
        """
        for name, minimum, meaning in NUMERIC_OPTIONS:
            check_whole_number(name, getattr(self, name), minimum, meaning)
        if self.attention not in ATTENTION_CHOICES:
            msg = f"unknown attention layout {self.attention!r}; choose from {', '.join(ATTENTION_CHOICES)}"
            raise ConfigError(msg)
        get_family(self.model)

    def open(
        self, *, overwrite: bool = False, progress: bool = False, client: Any = None, break_lock: bool = False
    ) -> Extraction:
        """Load the model, open the input and return the :class:`Extraction` (call ``close()`` after)."""
        family = get_family(self.model)
        dev = resolve_device(self.device)
        source = open_source(self.data, layer=self.layer, gene_column=self.gene_column)
        try:
            n_cells = min(source.n_cells, self.limit) if self.limit else source.n_cells
            if n_cells == 0:
                msg = "the input has no cells"
                raise ConfigError(msg)
            loaded = load_checkpoint(
                family,
                self.checkpoint,
                device=dev,
                max_length=self.max_length,
                seed=self.seed,
                **dict(self.model_options),
            )
            return Extraction(
                source,
                loaded,
                self.out,
                poolings=self.poolings,
                dtype=self.dtype,
                device=dev,
                max_tokens=self.max_tokens,
                chunk_cells=self.chunk_cells,
                n_cells=n_cells,
                empty_cells=self.empty_cells,
                # a tokenizer that takes normalised input (scFoundation pre_normalized=T) does not need counts
                require_counts=bool(getattr(loaded.tokenizer, "require_counts", True)) and not self.allow_noncounts,
                compression=self.compression,
                overwrite=overwrite,
                progress=progress,
                client=client,
                break_lock=break_lock,
                attention=self.attention,
                input_workers=self.input_workers,
            )
        except BaseException:
            source.close()
            raise


def extract(
    data: Any,
    *,
    model: str = "scgpt",
    checkpoint: str | Path | None = None,
    out: str | Path,
    poolings: Sequence[str] | None = None,
    dtype: str = "float16",
    device: str = "auto",
    max_tokens: int | None = None,
    chunk_cells: int | None = None,
    layer: str | None = None,
    gene_column: str | None = None,
    overwrite: bool = False,
    limit: int | None = None,
    seed: int = 0,
    max_length: int | None = None,
    model_options: Mapping[str, Any] | None = None,
    empty_cells: str = "nan",
    allow_noncounts: bool = False,
    compression: str = "zstd",
    progress: bool = True,
    client: Any = None,
    cluster: Any = None,
    break_lock: bool = False,
    attention: str = "auto",
    input_workers: int | None = None,
) -> Store:
    """Extract every layer of ``model`` for every cell of ``data`` into the store ``out``.

    ``data`` is an ``.h5ad`` path, an AnnData ``.zarr`` path or an ``AnnData``; ``layer`` picks
    ``layers[...]`` or ``raw`` and ``gene_column`` a ``var`` column of gene identifiers. ``out`` is a
    local path or any URL zarr/fsspec opens (``s3://``, ``gs://``, ``memory://``). ``poolings`` are
    store names offered by the family (``all`` for every one); ``model_options`` go to the family's
    loader (e.g. scFoundation's ``pre_normalized``). Re-running the same call resumes; another
    configuration on an existing store is refused unless ``overwrite``. One run at a time holds the
    store's lease; ``break_lock`` takes over a lease left by a run that died on another machine.

    ``cluster`` runs the chunks as Dask distributed tasks: ``"local:N"`` starts N local worker
    processes (one per GPU with dask-cuda), an address such as ``"tcp://host:8786"`` connects to a
    running scheduler, and a ``distributed.Client`` is used as is. ``client`` (without ``cluster``) is
    the Dask client that runs the writes of a single-process run.

    ``attention`` is ``auto`` (packed varlen batches on CUDA, padded on CPU), ``packed`` or ``padded``;
    ``max_tokens`` is the token budget of a batch (default: measured from the free device memory on
    CUDA; on CPU from the model's size, 2,048 to 16,384). ``input_workers`` is the number of processes
    that read and tokenize ahead of the device (0: two threads; default: one per core beyond two on CUDA
    for long runs, threads otherwise).
    Returns the :class:`~.store.Store`.
    """
    if checkpoint is None:
        get_family(model)
        msg = (
            f"pass --checkpoint DIR, the official {model} checkpoint folder; for a random one to try the tool, "
            f"run: cellstrata init-checkpoint --model {model} --preset tiny --out DIR"
        )
        raise ConfigError(msg)
    settings = ExtractSettings(
        data=str(data) if isinstance(data, Path) else data,
        model=model,
        checkpoint=str(checkpoint),
        out=StoreLocation.of(out).url,
        poolings=tuple(poolings) if poolings else None,
        dtype=dtype,
        device=device,
        max_tokens=max_tokens,
        chunk_cells=chunk_cells,
        layer=layer,
        gene_column=gene_column,
        limit=limit,
        seed=seed,
        max_length=max_length,
        model_options=tuple(sorted(dict(model_options or {}).items())),
        empty_cells=empty_cells,
        allow_noncounts=allow_noncounts,
        compression=compression,
        attention=attention,
        input_workers=input_workers,
    )
    settings.check()
    if cluster is not None:
        from .cluster import run_on_cluster

        return run_on_cluster(settings, cluster, overwrite=overwrite, progress=progress, break_lock=break_lock)
    with during_startup():  # a signal while the input opens or the model loads: one line, nothing written
        run = settings.open(overwrite=overwrite, progress=progress, client=client, break_lock=break_lock)
    try:
        return run.run()
    finally:
        run.close()


__all__ = ["ExtractSettings", "Extraction", "Telemetry", "extract", "resolve_device"]
