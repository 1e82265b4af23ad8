"""The run's counters: what one extraction (or one cluster shard) measured, and how counters merge.

A single-process run fills one :class:`Telemetry`; each Dask shard sends its :meth:`Telemetry.counters`
back and the driver adds them (:meth:`Telemetry.add`), so a cluster run's totals are exact sums. The
finished telemetry is stored in the store's attributes (:meth:`Telemetry.as_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .progress import fraction


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


def describe_utilisation(tele: Mapping[str, Any]) -> str:
    """``GPU busy 93% of wall time`` (CUDA) or ``forward pass 71% of wall time`` (CPU), from a telemetry dict."""
    busy, forward = tele.get("device_busy_fraction"), tele.get("forward_fraction")
    if busy is not None:
        return f"GPU busy {100 * busy:.0f}% of wall time"
    if forward is not None:
        return f"forward pass {100 * forward:.0f}% of wall time"
    return "utilisation not measured"


__all__ = ["Telemetry", "describe_utilisation"]
