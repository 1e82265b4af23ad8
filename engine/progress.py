"""Live progress lines of ``extract`` and ``probe``, and the arithmetic behind them.

The numbers on the line come from small pure functions (:func:`rate`, :func:`eta_seconds`,
:func:`fraction`, :func:`extract_postfix`) so they can be checked without a terminal. A bar draws only
when asked for *and* stderr is a terminal (tqdm's ``disable=None``): piped into a log file, a run
prints no progress at all, and the end-of-run summary line is the record. While a bar is shown, log
records go through ``tqdm.write`` so they do not tear the line. ``force=True`` draws into any file
(tests).

Device utilisation: on CUDA, :class:`DeviceClock` times each batch's forward pass and pooling on the
device's stream with CUDA events (device busy); on CPU the forward pass's share of wall time stands for
it. Both are fractions of the run's wall time, per worker process on a cluster.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}]{postfix}"  # ", " + postfix
REFRESH_S = 0.5  # the line is redrawn at most this often


# ------------------------------------------------------------------------------------------ arithmetic
def rate(count: float, seconds: float) -> float:
    """``count`` per second; 0 before any time has passed."""
    return count / seconds if seconds > 0 else 0.0


def eta_seconds(done: float, total: float, per_second: float) -> float | None:
    """Seconds left to reach ``total`` from ``done`` at ``per_second``; None while the rate is unknown."""
    left = max(total - done, 0)
    if left == 0:
        return 0.0
    return left / per_second if per_second > 0 else None


def fraction(part: float, whole: float) -> float | None:
    """``part / whole`` clipped to [0, 1]; None when ``whole`` is 0."""
    if whole <= 0:
        return None
    return min(max(part / whole, 0.0), 1.0)


def busy_label(device_type: str) -> str:
    """What the extract line's utilisation field measures on ``device_type``."""
    return "GPU busy" if device_type == "cuda" else "forward"


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` or ``m:ss``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_count(x: float) -> str:
    """A rate with a k/M/G suffix and three significant digits (``412k``, ``1.25M``)."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= limit:
            return f"{x / limit:.3g}{suffix}"
    return f"{x:.3g}"


@dataclass(frozen=True)
class ExtractStatus:
    """Counters of the running extraction, for one progress line (``*_seconds`` summed over workers)."""

    cells: int  # computed in this run
    tokens: int
    chunks: int  # committed in this run
    seconds: float  # wall time of this run
    busy_seconds: float  # device busy (CUDA events) or forward time (CPU), summed over workers
    writer_wait_seconds: float
    workers: int = 1


@dataclass(frozen=True)
class ExtractTotals:
    """What the whole run covers: cells and chunks, and those already committed when it started."""

    cells: int
    chunks: int
    cells_before: int = 0
    chunks_before: int = 0
    busy_label: str = "forward"  # "GPU busy" on CUDA


def extract_fields(status: ExtractStatus, totals: ExtractTotals) -> dict[str, Any]:
    """The numbers on an extraction's progress line: rates, ETA, chunks, utilisation, writer wait."""
    cells_per_s = rate(status.cells, status.seconds)
    return {
        "chunks": (totals.chunks_before + status.chunks, totals.chunks),
        "cells_per_s": cells_per_s,
        "tokens_per_s": rate(status.tokens, status.seconds),
        "eta_s": eta_seconds(totals.cells_before + status.cells, totals.cells, cells_per_s),
        "busy": fraction(status.busy_seconds, status.seconds * max(status.workers, 1)),
        "writer_wait_s": status.writer_wait_seconds,
    }


def probe_label(task: str, context: str, pooling: str, layer: int | None, n_layers: int) -> str:
    """``cell_type/T cells | mean | layer 7/12`` (the context is left out when it is every cell)."""
    where = "baseline" if layer is None else f"layer {layer}/{n_layers}"
    ctx = "" if context in ("", "all") else f"/{context}"
    return f"{task}{ctx} | {pooling} | {where}"


def extract_postfix(status: ExtractStatus, totals: ExtractTotals) -> str:
    """``chunks 3/40 | 850 cells/s | 412k tok/s | ETA 3:12 | GPU busy 93% | writer wait 1.2 s``."""
    f = extract_fields(status, totals)
    busy = "?" if f["busy"] is None else f"{100 * f['busy']:.0f}%"
    return (
        f"chunks {f['chunks'][0]}/{f['chunks'][1]} | {format_count(f['cells_per_s'])} cells/s | "
        f"{format_count(f['tokens_per_s'])} tok/s | ETA {format_duration(f['eta_s'])} | "
        f"{totals.busy_label} {busy} | writer wait {f['writer_wait_s']:.1f} s"
    )


# ------------------------------------------------------------------------------------------ bars
def bar_disabled(enabled: bool, *, force: bool = False) -> bool | None:
    """tqdm's ``disable``: off unless ``enabled``; when enabled, drawn only on a terminal (None) or ``force``."""
    if force:
        return False
    return None if enabled else True


def open_bar(
    total: int,
    *,
    enabled: bool,
    desc: str,
    unit: str,
    initial: int = 0,
    file: TextIO | None = None,
    force: bool = False,
) -> Any:
    """A tqdm bar that draws only on a terminal (see :func:`bar_disabled`); its postfix is ours."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=file,
        dynamic_ncols=True,
        mininterval=REFRESH_S,
        bar_format=BAR_FORMAT,
        disable=bar_disabled(enabled, force=force),
    )


@contextlib.contextmanager
def progress_bar(
    total: int, *, enabled: bool, desc: str, unit: str, file: TextIO | None = None, force: bool = False
) -> Iterator[Any]:
    """:func:`open_bar` for the duration of the block, with log records printed above the line."""
    bar = open_bar(total, enabled=enabled, desc=desc, unit=unit, file=file, force=force)
    try:
        with _logs_through(bar):
            yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def _logs_through(bar: Any) -> Iterator[None]:
    """Send the ``cellstrata`` loggers' console records through ``tqdm.write`` while ``bar`` draws."""
    if bar.disable:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logging.getLogger("cellstrata")]):
        yield


class ExtractProgress:
    """The extraction's progress line: cells done, with :func:`extract_postfix` after the bar.

    :meth:`advance` after each chunk handed to the writer; :meth:`close` (or leave the ``with`` block)
    at the end. While the line is drawn, log records are printed above it. A disabled line costs
    nothing beyond the arithmetic.
    """

    def __init__(self, totals: ExtractTotals, *, enabled: bool, file: TextIO | None = None, force: bool = False):
        self.totals = totals
        self.bar = open_bar(
            totals.cells,
            enabled=enabled,
            desc="extract",
            unit="cells",
            initial=totals.cells_before,
            file=file,
            force=force,
        )
        self.t0 = time.perf_counter()
        self._logs: contextlib.ExitStack | None = contextlib.ExitStack()
        self._logs.enter_context(_logs_through(self.bar))

    @property
    def active(self) -> bool:
        return not self.bar.disable

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def advance(self, cells: int, status: ExtractStatus) -> None:
        """Count ``cells`` more and show ``status``."""
        if self.active:
            self.bar.set_postfix_str(extract_postfix(status, self.totals), refresh=False)
        self.bar.update(cells)

    def __enter__(self) -> ExtractProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()
        if self._logs is not None:
            self._logs.close()
            self._logs = None


class ProbeProgress:
    """A probe run's line: one step per (task, context, pooling, layer) evaluation, naming the last one started.

    Thread-safe: the layers are evaluated on several threads.
    """

    def __init__(self, bar: Any, n_layers: int):
        self.bar = bar
        self.n_layers = n_layers
        self._lock = threading.Lock()
        self._drawn = 0.0

    def start(self, task: str, context: str, pooling: str, layer: int | None) -> None:
        """Name the evaluation starting now (redrawn at most every ``REFRESH_S``)."""
        if self.bar.disable:
            return
        with self._lock:
            self.bar.set_postfix_str(probe_label(task, context, pooling, layer, self.n_layers), refresh=False)
            now = time.monotonic()
            if now - self._drawn >= REFRESH_S:
                self.bar.refresh()
                self._drawn = now

    def finish(self) -> None:
        """Count one evaluation done."""
        with self._lock:
            self.bar.update(1)


class DeviceClock:
    """Device time of each batch's forward pass and pooling, from CUDA events (nothing on CPU).

    :meth:`start` / :meth:`stop` record events on the current stream around the work; :meth:`collect`
    adds the batches whose end event has passed (never waits unless ``wait``), so reading the clock
    does not make the host wait for the device.
    """

    def __init__(self, device: Any):
        self.device = device
        self.enabled = getattr(device, "type", str(device)) == "cuda"
        self.seconds = 0.0
        self._pending: collections.deque[tuple[Any, Any]] = collections.deque()

    def start(self) -> Any:
        if not self.enabled:
            return None
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def stop(self, start: Any) -> None:
        if start is None:
            return
        import torch

        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        self._pending.append((start, end))

    def collect(self, *, wait: bool = False) -> float:
        """Add the finished batches' device time; returns the seconds counted so far."""
        while self._pending:
            start, end = self._pending[0]
            if wait:
                end.synchronize()
            elif not end.query():
                break
            self._pending.popleft()
            self.seconds += start.elapsed_time(end) / 1000.0
        return self.seconds


__all__ = [
    "DeviceClock",
    "ExtractProgress",
    "ExtractStatus",
    "ExtractTotals",
    "ProbeProgress",
    "busy_label",
    "eta_seconds",
    "extract_fields",
    "extract_postfix",
    "format_count",
    "format_duration",
    "fraction",
    "open_bar",
    "probe_label",
    "progress_bar",
    "rate",
]
