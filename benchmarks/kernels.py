"""Speed of ``cellstrata.kernels.pool_cast`` (pool one layer four ways + cast) against the torch a user would write.

For a grid of realistic padded batches (hidden 512/768/2048/2560 x 64-4096 tokens per cell, cells per batch
filling a token budget like cellstrata's length-sorted batches, lengths within ±20% of the nominal; plus a
single cell and a many-cells batch) it times, side by side in one run, one layer's pooling into ``mean``,
``max``, ``cls`` (``first``) and ``official`` (``first_l2``), float16 out, ``n_leading=1``:

- ``cellstrata-torch``: ``pool_cast(..., backend="torch")``, cellstrata's CPU path;
- ``eager``: the straightforward torch (masked mean ``(x * mask).sum(1) / n``, masked max
  ``x.masked_fill(~mask, -inf).amax(1)``, ``x[:, 0]``, its L2 normalisation, each cast separately),
  with ``x.float()`` first so it accumulates in float32 like cellstrata;
- ``compiled``: ``torch.compile(eager, dynamic=True)`` (failures are reported, not fatal);
- ``cellstrata-triton-1seg``: the fused kernel forced to one program per cell span (``n_seg=1``, the
  single pass it had before the token axis was split; CUDA only);
- ``cellstrata-triton``: ``pool_cast(..., backend="triton")``, the fused kernel with its automatic split of
  each cell's span over ``n_seg`` programs (CUDA only; the chosen ``n_seg`` is reported per shape).

Each variant's output is checked against ``cellstrata-torch`` before it is timed. Reported per shape: ms per
layer, GB/s (hidden bytes of the real tokens read + pooled bytes written, over the time), the fraction of
the device's copy bandwidth measured in the same run (``y.copy_(x)``), and speed-ups. A second section
builds the scGPT ``tiny`` and ``whole-human`` (released shape) models with random weights and measures
what pooling every layer costs relative to the forward pass, with the pipeline's exact tap.

Input float32 on CPU, bfloat16 on CUDA. Timing: median of ``--repeats`` after a warm-up on CPU
(``time.perf_counter``), ``triton.testing.do_bench`` (median, 20/80% quantiles) on CUDA. Targets
(reported, never asserted): GPU >= 70% of copy bandwidth and >= 3x eager; CPU pooling of all layers
<= 5% of the forward. Results: ``benchmarks/results/kernels-<device>-<date>.{json,md}``.

    python -m benchmarks.kernels                 # CPU: torch backend, eager, compiled (~3.5 min on 2 cores)
    python -m benchmarks.kernels --quick         # smoke run, under a minute
    python -m benchmarks.kernels --device cuda   # GPU: adds the Triton kernel and the copy-bandwidth fraction
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

if not __package__:  # run as a file (``cellstrata bench`` does): the same as ``python -m benchmarks.kernels``
    _path = os.pathsep.join(filter(None, (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))))
    os.execve(
        sys.executable, [sys.executable, "-m", "benchmarks.kernels", *sys.argv[1:]], {**os.environ, "PYTHONPATH": _path}
    )

from cellstrata.kernels.pool_cast import PoolSpec, pool_cast, resolve_backend

from .harness import (
    RESULTS,
    command_line,
    cpu_model,
    cpu_pressure,
    git_commit,
    loadavg,
    module_command,
    module_env,
    name_slug,
    result_name,
    save_results,
    utc_now,
)

POOLINGS = ("mean", "max", "cls", "official")
SPEC = PoolSpec(ops=("mean", "max", "first", "first_l2"), n_leading=1, n_trailing=0)
OUT_DTYPE = torch.float16
VARIANTS = ("cellstrata-torch", "eager", "compiled", "cellstrata-triton-1seg", "cellstrata-triton")
TRITON_VARIANTS = ("cellstrata-triton-1seg", "cellstrata-triton")
HIDDENS = (512, 768, 2048, 2560)
TOKENS = (64, 256, 1024, 4096)
QUICK_HIDDENS = (512, 2048)
QUICK_TOKENS = (64, 1024)
BUDGET = {"cpu": 16384, "cuda": 65536}  # tokens per padded batch (cells = budget // longest cell)
QUICK_BUDGET = 4096
MANY_CELLS = {"cpu": 1024, "cuda": 32768}  # the many-cells extra shape: this many cells of 64 tokens
SPREAD = 0.2  # lengths uniform within ±20% of the nominal
PAD_VALUE = 10.0  # hidden value at padded positions: a pooling that reads padding fails the check
REPEATS = {"cpu": 9, "cuda": 5}
COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}
# float16 outputs computed in float32 in a different order: within one float16 step
RTOL, ATOL = 1e-3, 1e-4
FORWARD_SECONDS = 90.0  # CPU: about this long per model for the timed forwards (at least 3 per tap)
FORWARD_CELL_TOKENS = {"tiny": 150, "whole-human": 1200}  # nominal tokens per cell of the forward section
SEGMENT_SWEEP = (1, 2, 4, 8, 16, 32, 64)  # --sweep-segments: forced n_seg values
TILE_CONFIGS = [(bt, bh, w) for bt in (16, 32, 64) for bh in (64, 128, 256) for w in (4, 8)]
TARGETS = {"gpu_copy_fraction": 0.70, "gpu_speedup_vs_eager": 3.0, "cpu_pool_pct_of_forward": 5.0}


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Shape:
    """One benchmark case: hidden size, nominal tokens per cell, and a token budget or a fixed cell count."""

    hidden: int
    tokens: int
    budget: int | None = None
    cells: int | None = None
    label: str = "grid"


@dataclass
class Case:
    """A padded batch ``[B, S, H]`` with its lengths and byte counts."""

    shape: Shape
    x: torch.Tensor
    lengths: torch.Tensor

    @property
    def n_cells(self) -> int:
        return int(self.x.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.x.shape[1])

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def bytes_read(self) -> int:
        """Hidden bytes of the real tokens (each read once)."""
        return self.real_tokens * self.shape.hidden * self.x.element_size()

    @property
    def bytes_padded(self) -> int:
        return self.x.numel() * self.x.element_size()

    @property
    def bytes_written(self) -> int:
        return len(SPEC.ops) * self.n_cells * self.shape.hidden * torch.finfo(OUT_DTYPE).bits // 8


def make_case(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int) -> Case:
    """Length-sorted lengths within ±20% of the nominal; random hidden states, padding set to ``PAD_VALUE``."""
    rng = np.random.default_rng((seed, shape.hidden, shape.tokens, shape.cells or 0))
    lo, hi = max(2, round(shape.tokens * (1 - SPREAD))), max(2, round(shape.tokens * (1 + SPREAD)))
    n = shape.cells if shape.cells is not None else max(1, int(shape.budget or 1) // hi)
    lengths = np.sort(rng.integers(lo, hi + 1, size=n))[::-1].copy()
    s = int(lengths.max())
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((n, s, shape.hidden), generator=gen, device=device, dtype=dtype)
    lens = torch.from_numpy(lengths).to(device)
    pad = torch.arange(s, device=device)[None, :] >= lens[:, None]
    x.masked_fill_(pad[:, :, None], PAD_VALUE)
    return Case(shape, x, lens)


def shapes_for(device: str, hiddens: tuple[int, ...], tokens: tuple[int, ...], budget: int, quick: bool) -> list[Shape]:
    """The grid plus the single-cell and many-cells extras."""
    grid = [Shape(h, t, budget=budget) for h in hiddens for t in tokens]
    many = max(1, MANY_CELLS[device] // (8 if quick else 1))
    extra_h = [h for h in (512, 2048) if h in hiddens] or [hiddens[0]]
    extras = [Shape(h, 1024, cells=1, label="1 cell") for h in extra_h]
    extras += [Shape(h, 64, cells=many, label=f"{many} cells") for h in extra_h]
    return grid + extras


# ---------------------------------------------------------------------------------------------------- variants
def eager_pool(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What a user writes: masked mean and max over the gene tokens, CLS and its L2 norm, each cast to float16."""
    x = x.float()
    pos = torch.arange(x.shape[1], device=x.device)
    mask = ((pos[None, :] >= 1) & (pos[None, :] < lengths[:, None]))[:, :, None]
    n = mask.sum(1)
    mean = (x * mask).sum(1) / n
    peak = x.masked_fill(~mask, float("-inf")).amax(1)
    cls = x[:, 0]
    official = cls / cls.norm(dim=-1, keepdim=True)
    return mean.to(OUT_DTYPE), peak.to(OUT_DTYPE), cls.to(OUT_DTYPE), official.to(OUT_DTYPE)


def variant_fns(
    case: Case, compiled: Callable[..., Any] | None, with_triton: bool
) -> dict[str, Callable[[], torch.Tensor]]:
    """Zero-argument callables per variant, each returning ``[P, B, H]`` (stacked for eager/compiled)."""
    x, lengths = case.x, case.lengths
    p, b, h = len(SPEC.ops), case.n_cells, case.shape.hidden
    bufs = {v: torch.empty((p, b, h), dtype=OUT_DTYPE, device=x.device) for v in VARIANTS}
    ovf = {v: torch.zeros(p, dtype=torch.int64, device=x.device) for v in VARIANTS}

    def torch_path() -> torch.Tensor:
        v = "cellstrata-torch"
        return pool_cast(x, None, lengths, SPEC, OUT_DTYPE, out=bufs[v], overflow=ovf[v], backend="torch")

    def triton_path() -> torch.Tensor:
        v = "cellstrata-triton"
        return pool_cast(x, None, lengths, SPEC, OUT_DTYPE, out=bufs[v], overflow=ovf[v], backend="triton")

    def triton_1seg() -> torch.Tensor:
        from cellstrata.kernels.pool_cast_triton import pool_cast_triton

        v = "cellstrata-triton-1seg"
        out, o = bufs[v][None], ovf[v][None]
        return pool_cast_triton(x[None], None, lengths, SPEC, OUT_DTYPE, out=out, overflow=o, n_seg=1)[0]

    fns: dict[str, Callable[[], Any]] = {"cellstrata-torch": torch_path, "eager": lambda: eager_pool(x, lengths)}
    if compiled is not None:
        fns["compiled"] = lambda: compiled(x, lengths)
    if with_triton:
        fns["cellstrata-triton-1seg"] = triton_1seg
        fns["cellstrata-triton"] = triton_path
    return fns


def as_stack(res: Any) -> torch.Tensor:
    return torch.stack(res) if isinstance(res, tuple) else res


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    """NaN-aware allclose of two ``[P, B, H]`` outputs, with the largest difference per pooling."""
    a, b = ref.float(), got.float()
    nan_same = bool(torch.equal(torch.isnan(a), torch.isnan(b)))
    close = nan_same and bool(torch.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True))
    diff = (a - b).abs().nan_to_num(0.0)
    return {
        "ok": close,
        "nan_positions_match": nan_same,
        "max_abs_diff": {name: float(diff[i].max()) for i, name in enumerate(POOLINGS)},
        "tolerance": f"allclose(rtol={RTOL:g}, atol={ATOL:g}, equal_nan=True)",
    }


# ---------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _err(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _summary(runs: list[float], timer: str) -> dict[str, Any]:
    q20, q80 = (float(v) for v in np.percentile(runs, [20, 80]))
    return {
        "ms": statistics.median(runs),
        "q20_ms": q20,
        "q80_ms": q80,
        "min_ms": min(runs),
        "runs_ms": runs,
        "timer": timer,
    }


def time_many(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, dict[str, Any]]:
    """Milliseconds per call of each function: median, 20/80% quantiles; ``{"error": ...}`` where one fails.

    CUDA: ``triton.testing.do_bench`` per function (CUDA events without Triton). CPU: one warm-up call
    each, then ``repeats`` rounds calling every function once in turn (round robin, so that a slow phase
    of a shared machine hits every variant alike), timed with ``time.perf_counter``.
    """
    res: dict[str, dict[str, Any]] = {}
    if device.type == "cuda":
        for name, fn in fns.items():
            try:
                res[name] = _time_cuda(fn, device, repeats)
            except Exception as exc:  # reported, the run goes on
                res[name] = {"error": _err(exc)}
                torch.cuda.empty_cache()
        return res
    live = dict(fns)
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for rnd in range(max(repeats, 1) + 1):  # round 0 is the warm-up
        for name, fn in list(live.items()):
            try:
                t0 = time.perf_counter()
                fn()
                dt_ms = (time.perf_counter() - t0) * 1e3
            except Exception as exc:
                res[name] = {"error": _err(exc)}
                del live[name]
                continue
            if rnd:
                runs[name].append(dt_ms)
    for name in live:
        res[name] = _summary(runs[name], "perf_counter, round robin")
    return {name: res[name] for name in fns}


def time_fn(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, Any]:
    """:func:`time_many` of one function; raises its error."""
    t = time_many({"fn": fn}, device, repeats)["fn"]
    if "error" in t:
        raise RuntimeError(t["error"])
    return t


def _time_cuda(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, Any]:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, device, max(repeats, 20))
    med, q20, q80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"ms": float(med), "q20_ms": float(q20), "q80_ms": float(q80), "timer": "triton.testing.do_bench"}


def graph_ms(fn: Callable[[], Any]) -> float | None:
    """GPU time of ``fn`` replayed from a CUDA graph (no host launch overhead); ``None`` where capture fails."""
    try:
        from triton.testing import do_bench_cudagraph

        res = do_bench_cudagraph(fn, rep=50, quantiles=[0.5])  # one quantile: a float (a list in some versions)
        return float(res[0] if isinstance(res, (list, tuple)) else res)
    except Exception:  # reported as missing, the run goes on
        return None


def _time_cuda_events(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    for _ in range(3):
        fn()
    sync(device)
    runs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end))
    return _summary(runs, "cuda events")


def copy_bandwidth(device: torch.device, repeats: int, n_bytes: int) -> dict[str, float]:
    """``y.copy_(x)`` of an ``n_bytes`` float32 tensor; bandwidth counts 2 x size (read + write)."""
    x = torch.randn(n_bytes // 4, device=device)
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), device, max(repeats, 5))
    return {"bytes": n_bytes, "ms": t["ms"], "gb_s": 2 * n_bytes / (t["ms"] * 1e-3) / 1e9}


# ---------------------------------------------------------------------------------------------------- kernel grid
def run_case(
    case: Case,
    device: torch.device,
    repeats: int,
    compiled: Callable[..., Any] | None,
    compile_state: dict[str, Any],
    with_triton: bool,
    copy_gb_s: float,
    per_op: bool,
    sweep_tiles: bool,
    sweep_segments: bool = False,
) -> dict[str, Any]:
    """Check every variant against ``cellstrata-torch``, then time it; optional per-op and tile sweeps."""
    fns = variant_fns(case, compiled, with_triton)
    ref = as_stack(fns["cellstrata-torch"]()).clone()
    checks: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    moved = case.bytes_read + case.bytes_written
    for name, fn in list(fns.items()):  # check each variant once (the compiled one compiles here)
        try:
            t0 = time.perf_counter()
            got = as_stack(fn())
            sync(device)
            if name == "compiled":
                compile_state["first_call_s"].append(round(time.perf_counter() - t0, 3))
            if name != "cellstrata-torch":
                checks[name] = compare(ref, got)
            del got
        except Exception as exc:  # a variant that fails (OOM, compiler) is reported, the run goes on
            timings[name] = {"error": _err(exc)}
            if name == "compiled":
                compile_state["errors"].append(timings[name]["error"])
            if device.type == "cuda":
                torch.cuda.empty_cache()
            del fns[name]
    for name, t in time_many(fns, device, repeats).items():
        if "ms" in t:
            t["gb_s"] = moved / (t["ms"] * 1e-3) / 1e9
            t["gb_s_padded"] = (case.bytes_padded + case.bytes_written) / (t["ms"] * 1e-3) / 1e9
            t["copy_fraction"] = t["gb_s"] / copy_gb_s
            if name in TRITON_VARIANTS and (g := graph_ms(fns[name])) is not None:
                t["graph_ms"] = g  # kernels only: the launches' host time is what splitting adds
                t["graph_gb_s"] = moved / (g * 1e-3) / 1e9
                t["graph_copy_fraction"] = t["graph_gb_s"] / copy_gb_s
        timings[name] = t
    timings = {v: timings[v] for v in VARIANTS if v in timings}
    res: dict[str, Any] = {
        "label": case.shape.label,
        "hidden": case.shape.hidden,
        "tokens_nominal": case.shape.tokens,
        "budget": case.shape.budget,
        "cells": case.n_cells,
        "seq_len": case.seq_len,
        "real_tokens": case.real_tokens,
        "padding": 1 - case.real_tokens / max(case.n_cells * case.seq_len, 1),
        "in_dtype": str(case.x.dtype).replace("torch.", ""),
        "out_dtype": str(OUT_DTYPE).replace("torch.", ""),
        "bytes_read": case.bytes_read,
        "bytes_written": case.bytes_written,
        "bytes_padded": case.bytes_padded,
        "checks": checks,
        "variants": timings,
        "speedups": speedups(timings),
    }
    if per_op:
        res["per_op_torch_ms"] = per_op_times(case, device, repeats)
    if with_triton:
        from cellstrata.kernels.pool_cast_triton import auto_segments, block_sizes

        bt, bh, _ = block_sizes(case.shape.hidden, case.x.element_size())
        res["n_seg_auto"] = auto_segments(case.x[None], case.n_cells, SPEC, bt, bh)
    if sweep_tiles and with_triton:
        res["tile_sweep"] = tile_sweep(case, device, repeats, moved, copy_gb_s)
    if sweep_segments and with_triton:
        res["segment_sweep"] = segment_sweep(case, device, repeats, moved, copy_gb_s)
    return res


def speedups(t: dict[str, Any]) -> dict[str, float]:
    """``a_vs_b`` = time of b / time of a (above 1: a is faster)."""
    ms = {k: v["ms"] for k, v in t.items() if "ms" in v}
    pairs = [
        ("cellstrata-torch", "eager"),
        ("cellstrata-torch", "compiled"),
        ("compiled", "eager"),
        ("cellstrata-triton", "eager"),
        ("cellstrata-triton", "cellstrata-torch"),
        ("cellstrata-triton", "compiled"),
        ("cellstrata-triton", "cellstrata-triton-1seg"),
    ]
    return {f"{a}_vs_{b}": ms[b] / ms[a] for a, b in pairs if a in ms and b in ms}


def per_op_times(case: Case, device: torch.device, repeats: int) -> dict[str, float | None]:
    """``cellstrata-torch`` ms of each op alone, all four, and all four given an explicit ``starts = b * S``."""
    x, lengths = case.x, case.lengths
    n, h = case.n_cells, case.shape.hidden
    starts = torch.arange(n, device=x.device, dtype=torch.int64) * case.seq_len

    def call(ops: tuple[str, ...], st: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
        spec = PoolSpec(ops=ops, n_leading=SPEC.n_leading)
        out = torch.empty((len(ops), n, h), dtype=OUT_DTYPE, device=x.device)
        ovf = torch.zeros(len(ops), dtype=torch.int64, device=x.device)
        return lambda: pool_cast(x, st, lengths, spec, OUT_DTYPE, out=out, overflow=ovf, backend="torch")

    fns = {name: call((op,)) for name, op in zip(POOLINGS, SPEC.ops)}
    fns["all"] = call(SPEC.ops)
    fns["all_starts_tensor"] = call(SPEC.ops, starts)
    return {k: t.get("ms") for k, t in time_many(fns, device, repeats).items()}


def tile_sweep(case: Case, device: torch.device, repeats: int, moved: int, copy_gb_s: float) -> dict[str, Any]:
    """Triton tile overrides ``(block_t, block_h, num_warps)``: GB/s of each, and the best."""
    from cellstrata.kernels.pool_cast_triton import block_sizes, pool_cast_triton

    x, lengths = case.x[None], case.lengths
    out = torch.empty((1, len(SPEC.ops), case.n_cells, case.shape.hidden), dtype=OUT_DTYPE, device=x.device)
    ovf = torch.zeros((1, len(SPEC.ops)), dtype=torch.int64, device=x.device)
    rows = []
    for bt, bh, w in TILE_CONFIGS:
        if bh > max(16, 1 << (case.shape.hidden - 1).bit_length()):
            continue

        def fn(bt: int = bt, bh: int = bh, w: int = w) -> torch.Tensor:
            return pool_cast_triton(
                x, None, lengths, SPEC, OUT_DTYPE, out=out, overflow=ovf, block_t=bt, block_h=bh, num_warps=w
            )

        try:
            ms = time_fn(fn, device, repeats)["ms"]
        except Exception as exc:
            rows.append({"block_t": bt, "block_h": bh, "num_warps": w, "error": str(exc).splitlines()[0][:200]})
            continue
        gb = moved / (ms * 1e-3) / 1e9
        rows.append(
            {"block_t": bt, "block_h": bh, "num_warps": w, "ms": ms, "gb_s": gb, "copy_fraction": gb / copy_gb_s}
        )
    ok = [r for r in rows if "ms" in r]
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    default = block_sizes(case.shape.hidden, case.x.element_size())
    return {
        "default": {"block_t": default[0], "block_h": default[1], "num_warps": default[2]},
        "best": best,
        "all": rows,
    }


def segment_sweep(case: Case, device: torch.device, repeats: int, moved: int, copy_gb_s: float) -> dict[str, Any]:
    """Forced ``n_seg`` values (default tiles): ms (``do_bench``, and replayed from a CUDA graph) and the best."""
    from cellstrata.kernels.pool_cast_triton import pool_cast_triton

    x, lengths = case.x[None], case.lengths
    out = torch.empty((1, len(SPEC.ops), case.n_cells, case.shape.hidden), dtype=OUT_DTYPE, device=x.device)
    ovf = torch.zeros((1, len(SPEC.ops)), dtype=torch.int64, device=x.device)
    rows = []
    for n in SEGMENT_SWEEP:
        if n > 1 and n * 16 > case.seq_len:
            continue

        def fn(n: int = n) -> torch.Tensor:
            return pool_cast_triton(x, None, lengths, SPEC, OUT_DTYPE, out=out, overflow=ovf, n_seg=n)

        try:
            ms = time_fn(fn, device, repeats)["ms"]
        except Exception as exc:
            rows.append({"n_seg": n, "error": str(exc).splitlines()[0][:200]})
            continue
        gb = moved / (ms * 1e-3) / 1e9
        rows.append({"n_seg": n, "ms": ms, "gb_s": gb, "copy_fraction": gb / copy_gb_s, "graph_ms": graph_ms(fn)})
    ok = [r for r in rows if "ms" in r]
    graphed = [r for r in ok if r["graph_ms"] is not None]
    return {
        "best": min(ok, key=lambda r: r["ms"]) if ok else None,
        "best_graph": min(graphed, key=lambda r: r["graph_ms"]) if graphed else None,
        "all": rows,
    }


# ---------------------------------------------------------------------------------------------------- forward section
def forward_overhead(
    preset: str, device: torch.device, max_tokens: int, repeats: int, seed: int, work: Path
) -> dict[str, Any]:
    """One batch's forward with a no-op tap vs the pipeline's pooling tap; plus pooling all layers on its own."""
    from cellstrata.engine.models import get_family
    from cellstrata.engine.models.base import TokenBatch

    family = get_family("scgpt")
    t0 = time.perf_counter()
    loaded = family.load(family.init_checkpoint(preset, work / f"ckpt-{preset}", seed=seed), device=device)
    load_s = time.perf_counter() - t0
    tok = loaded.tokenizer
    n_layers, hidden = loaded.n_layers, loaded.hidden_size
    spec = PoolSpec(
        ops=tuple(loaded.pool_ops[p] for p in POOLINGS),
        n_leading=loaded.layout.n_leading,
        n_trailing=loaded.layout.n_trailing,
    )
    # cells of ~nominal tokens (±20%, capped at the context), as many as the pipeline's token budget takes
    nominal = FORWARD_CELL_TOKENS[preset]
    hi = min(round(nominal * (1 + SPREAD)), tok.max_length)
    lo = min(round(nominal * (1 - SPREAD)), hi)
    rng = np.random.default_rng((seed, nominal))
    n = max(1, max_tokens // hi)
    lens = np.sort(rng.integers(lo, hi + 1, size=n))[::-1].copy()
    s = int(lens.max())
    genes = np.full((n, s), tok.pad_id, dtype=np.int64)
    values = np.full((n, s), tok.pad_value, dtype=np.float32)
    for row, k in enumerate(lens):
        genes[row, 0] = tok.cls_id
        genes[row, 1:k] = rng.choice(tok.n_vocab_genes, size=k - 1, replace=False)
        values[row, 1:k] = rng.integers(1, tok.n_bins, size=k - 1)
    batch = TokenBatch(torch.from_numpy(genes), torch.from_numpy(values), torch.from_numpy(lens), np.arange(n))
    dev = batch.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    dtypes: set[str] = set()

    def noop(layer: int, h: torch.Tensor) -> None:
        pass

    def run(tap: Callable[[int, torch.Tensor], None]) -> None:
        with torch.inference_mode(), autocast:
            loaded.model.forward(dev, tap)
        sync(device)

    backend = resolve_backend(device)  # as the pipeline: triton on CUDA when installed, else torch
    n_pool = len(spec.ops)

    def pipeline_out() -> torch.Tensor:
        """The pipeline's batch buffer ``[L+1, B, P*H]`` seen as ``[L+1, P, B, H]`` (a strided view)."""
        flat = torch.empty((n_layers + 1, n, n_pool * hidden), dtype=OUT_DTYPE, device=device)
        return flat.unflatten(-1, (n_pool, hidden)).transpose(1, 2)

    def pooled() -> None:  # the pipeline's _run_chunk tap: starts=None, the buffer view, overflow counters
        out = pipeline_out()
        overflow = torch.zeros((n_layers + 1, n_pool), dtype=torch.int64, device=device)

        def tap(layer: int, h: torch.Tensor) -> None:
            pool_cast(h, None, dev.lengths, spec, OUT_DTYPE, out=out[layer], overflow=overflow[layer], backend=backend)

        run(tap)

    states: list[torch.Tensor] = []

    def keep(layer: int, h: torch.Tensor) -> None:
        dtypes.add(str(h.dtype).replace("torch.", ""))
        states.append(h.clone())

    t1 = time.perf_counter()
    run(keep)  # warm-up, and the hidden states for the isolated timing
    warm_s = time.perf_counter() - t1
    if device.type == "cpu":  # at least 3 forwards per tap, fewer than `repeats` where a forward takes seconds
        repeats = max(3, min(repeats, int(FORWARD_SECONDS / (2 * warm_s))))
    fwd_t = time_many({"noop": lambda: run(noop), "pool": pooled}, device, repeats)
    fwd, fwd_pool = fwd_t["noop"]["ms"], fwd_t["pool"]["ms"]

    lengths = dev.lengths
    starts = torch.arange(n, device=device, dtype=torch.int64) * s
    out = pipeline_out()
    overflow = torch.zeros((n_layers + 1, n_pool), dtype=torch.int64, device=device)

    def pool_all(st: torch.Tensor | None, be: str) -> Callable[[], None]:
        def fn() -> None:
            with torch.inference_mode():
                for layer, h in enumerate(states):
                    pool_cast(h, st, lengths, spec, OUT_DTYPE, out=out[layer], overflow=overflow[layer], backend=be)

        return fn

    pools = {"pipeline": pool_all(None, backend), "starts": pool_all(starts, backend)}
    if device.type == "cuda" and backend != "torch":
        pools["torch_backend"] = pool_all(None, "torch")
    pool_t = time_many(pools, device, max(repeats, 5))
    iso, iso_starts = pool_t["pipeline"]["ms"], pool_t["starts"]["ms"]
    res: dict[str, Any] = {
        "preset": preset,
        "layers": n_layers,
        "tapped_layers": len(states),
        "hidden": hidden,
        "cells": n,
        "tokens_per_cell_nominal": nominal,
        "seq_len": s,
        "real_tokens": int(lens.sum()),
        "max_tokens": max_tokens,
        "hidden_dtype_in_tap": sorted(dtypes),
        "pool_backend": backend,
        "pool_call": "pool_cast(h, None, lengths, spec, float16, out=<[P, B, H] view of the [L+1, B, P*H] buffer>, "
        "overflow=overflow[layer], backend=resolve_backend(device)), as engine/device/pipeline.py",
        "model_load_s": load_s,
        "forward_noop_ms": fwd,
        "forward_pool_ms": fwd_pool,
        "forward_repeats": repeats,
        "forward_noop_runs_ms": fwd_t["noop"].get("runs_ms"),
        "forward_pool_runs_ms": fwd_t["pool"].get("runs_ms"),
        "overhead_pct_forward_difference": 100 * (fwd_pool - fwd) / fwd,
        "pool_all_layers_ms": iso,
        "pool_pct_of_forward": 100 * iso / fwd,
        "pool_all_layers_starts_tensor_ms": iso_starts,
        "pool_starts_tensor_pct_of_forward": 100 * iso_starts / fwd,
    }
    if device.type == "cuda":
        res["pool_all_layers_torch_backend_ms"] = pool_t["torch_backend"].get("ms")
    res["target_met"] = res["pool_pct_of_forward"] <= TARGETS["cpu_pool_pct_of_forward"]
    return res


# ---------------------------------------------------------------------------------------------------- checks
def triton_smoke() -> dict[str, Any]:
    """The Triton kernel on a tiny shape in its CPU interpreter, against the torch path (correctness only).

    Runs in a child process with ``TRITON_INTERPRET=1``: the interpreter must be chosen before Triton is
    imported, and ``torch.compile`` has imported it here already.
    """
    from cellstrata.kernels.pool_cast import triton_installed

    if not triton_installed():
        return {"ran": False, "reason": "triton is not installed"}
    env = module_env(dict(os.environ, TRITON_INTERPRET="1"))
    cmd = module_command("kernels", "--smoke-worker")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"ran": False, "reason": _err(exc)}
    return {"ran": True, "seconds": time.perf_counter() - t0, **res}


def smoke_worker() -> None:
    """Child side of :func:`triton_smoke`: prints the comparison as one JSON line."""
    from cellstrata.kernels.pool_cast import pool_cast_layers

    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 3, 10, 32), generator=gen)
    lengths = torch.tensor([10, 7, 3])
    got = pool_cast_layers(x, None, lengths, SPEC, OUT_DTYPE, backend="triton")
    ref = pool_cast_layers(x, None, lengths, SPEC, OUT_DTYPE, backend="torch")
    print(json.dumps({"shape": list(x.shape), **compare(ref.flatten(0, 1), got.flatten(0, 1))}))


# ---------------------------------------------------------------------------------------------------- machine
def machine(device: torch.device) -> dict[str, Any]:
    """Device name (GPU name, or CPU model + cores), versions, threads, load."""
    model = cpu_model()
    cores = os.cpu_count()
    info: dict[str, Any] = {
        "device": device.type,
        "device_name": f"{model}, {cores} CPUs",
        "cpu_model": model,
        "cpu_count": cores,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }
    with contextlib.suppress(ImportError):
        import triton

        info["triton_version"] = triton.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cuda_version=torch.version.cuda,
        )
    return info


def device_tag(info: dict[str, Any]) -> str:
    return "cpu" if info["device"] != "cuda" else name_slug(info["device_name"], "cuda")


# ---------------------------------------------------------------------------------------------------- report
def _cell(t: dict[str, Any] | None) -> str:
    if not t:
        return "–"
    if "error" in t:
        return "failed"
    return f"{t['ms']:.3g} ({t['gb_s']:.3g})"


def _x(r: dict[str, Any], key: str) -> str:
    v = r["speedups"].get(key)
    return "–" if v is None else f"{v:.2f}×"


def markdown(rows: list[dict[str, Any]], gpu: bool, copy: dict[str, float]) -> str:
    """The side-by-side table, the per-op table (when measured) and a checks column."""
    shown = [v for v in VARIANTS if gpu or v not in TRITON_VARIANTS]
    head = "| shape | hidden | tokens/cell | cells | real tokens | padding | " + " | ".join(
        f"{v} ms (GB/s)" for v in shown
    )
    if gpu:
        head += (
            " | n_seg | triton vs eager | triton vs torch | triton vs compiled | split vs 1 seg"
            " | 1 seg % of copy | triton % of copy | graph: 1 seg ms | graph: triton ms | graph: split vs 1 seg"
            " | graph: 1 seg % of copy | graph: triton % of copy"
        )
    else:
        head += " | torch vs eager | torch vs compiled | compiled vs eager | torch % of copy"
    head += " | outputs match |"
    n_cols = head.count("|") - 1
    lines = [head, "|---" * 1 + "|--:" * (n_cols - 2) + "|---|"]
    for r in rows:
        t = r["variants"]
        if gpu:
            tr, t1 = t.get("cellstrata-triton", {}), t.get("cellstrata-triton-1seg", {})
            ratio = [
                str(r.get("n_seg_auto", "–")),
                _x(r, "cellstrata-triton_vs_eager"),
                _x(r, "cellstrata-triton_vs_cellstrata-torch"),
                _x(r, "cellstrata-triton_vs_compiled"),
                _x(r, "cellstrata-triton_vs_cellstrata-triton-1seg"),
                f"{100 * t1['copy_fraction']:.0f}%" if "copy_fraction" in t1 else "–",
                f"{100 * tr['copy_fraction']:.0f}%" if "copy_fraction" in tr else "–",
                f"{t1['graph_ms']:.3g}" if "graph_ms" in t1 else "–",
                f"{tr['graph_ms']:.3g}" if "graph_ms" in tr else "–",
                f"{t1['graph_ms'] / tr['graph_ms']:.2f}×" if "graph_ms" in t1 and "graph_ms" in tr else "–",
                f"{100 * t1['graph_copy_fraction']:.0f}%" if "graph_copy_fraction" in t1 else "–",
                f"{100 * tr['graph_copy_fraction']:.0f}%" if "graph_copy_fraction" in tr else "–",
            ]
        else:
            tt = t.get("cellstrata-torch", {})
            ratio = [
                _x(r, "cellstrata-torch_vs_eager"),
                _x(r, "cellstrata-torch_vs_compiled"),
                _x(r, "compiled_vs_eager"),
                f"{100 * tt['copy_fraction']:.1f}%" if "copy_fraction" in tt else "–",
            ]
        bad = [k for k, c in r["checks"].items() if not c["ok"]]
        match = "yes" if not bad else "NO: " + ", ".join(bad)
        cells = [_cell(t.get(v)) for v in shown]
        lines.append(
            f"| {r['label']} | {r['hidden']} | {r['tokens_nominal']} | {r['cells']:,} | {r['real_tokens']:,} | "
            f"{100 * r['padding']:.0f}% | " + " | ".join(cells + ratio) + f" | {match} |"
        )
    lines.append("")
    lines.append(
        f"ms per layer (median); GB/s = (hidden bytes of the real tokens + pooled float16 bytes) / time. "
        f"Measured copy bandwidth (`y.copy_(x)`, {copy['bytes'] / 2**20:.0f} MiB, read + write): "
        f"{copy['gb_s']:.1f} GB/s. `a vs b` = time of b / time of a."
    )
    if gpu:
        lines.append(
            "\n`graph:` columns time the Triton variants replayed from a CUDA graph (`do_bench_cudagraph`): GPU time "
            "of the kernels alone, without the host's launch overhead, which `do_bench` includes where it exceeds "
            "the GPU time (small batches; the split launches two kernels)."
        )
    if any("per_op_torch_ms" in r for r in rows):
        lines += [
            "",
            "cellstrata-torch, ms per op alone, the four together, and the four given an explicit `starts = b * S` "
            "tensor instead of `starts=None` (the path packed layouts take: it gathers a copy of the layer):",
            "",
            "| shape | hidden | tokens/cell | cells | mean | max | cls | official | all four "
            "| all four, `starts` tensor |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in rows:
            p = r.get("per_op_torch_ms")
            if p:
                vals = " | ".join(f"{p[k]:.3g}" for k in (*POOLINGS, "all", "all_starts_tensor"))
                lines.append(f"| {r['label']} | {r['hidden']} | {r['tokens_nominal']} | {r['cells']:,} | {vals} |")
    if any("segment_sweep" in r for r in rows):
        lines += ["", "Forced n_seg (default tiles), ms per value (`do_bench` / CUDA graph) and the best:", ""]
        lines += [
            "| shape | hidden | tokens/cell | cells | auto n_seg | " + " | ".join(f"n_seg={n}" for n in SEGMENT_SWEEP)
        ]
        lines[-1] += " | best (do_bench / graph) | its % of copy (do_bench / graph) |"
        lines += ["|---|--:|--:|--:|--:|" + "--:|" * len(SEGMENT_SWEEP) + "--:|--:|"]
        for r in rows:
            sw = r.get("segment_sweep")
            if sw and sw["best"]:
                by_n = {row["n_seg"]: row for row in sw["all"] if "ms" in row}
                vals = " | ".join(_pair(by_n.get(n)) for n in SEGMENT_SWEEP)
                b, bg = sw["best"], sw.get("best_graph")
                graph = f" / {bg['n_seg']}" if bg else ""
                graph_pct = f"{100 * bg['copy_fraction'] * bg['ms'] / bg['graph_ms']:.0f}%" if bg else "–"
                lines.append(
                    f"| {r['label']} | {r['hidden']} | {r['tokens_nominal']} | {r['cells']:,} | "
                    f"{r.get('n_seg_auto', '–')} | {vals} | {b['n_seg']}{graph} | "
                    f"{100 * b['copy_fraction']:.0f}% / {graph_pct} |"
                )
    if any("tile_sweep" in r for r in rows):
        lines += ["", "Triton tile sweep, best (block_t, block_h, num_warps) per shape:", ""]
        lines += ["| shape | hidden | tokens/cell | default | best | best ms | best GB/s | best % of copy |"]
        lines += ["|---|--:|--:|---|---|--:|--:|--:|"]
        for r in rows:
            sw = r.get("tile_sweep")
            if sw and sw["best"]:
                d, b = sw["default"], sw["best"]
                lines.append(
                    f"| {r['label']} | {r['hidden']} | {r['tokens_nominal']} | "
                    f"{d['block_t']}, {d['block_h']}, {d['num_warps']} | {b['block_t']}, {b['block_h']}, "
                    f"{b['num_warps']} | {b['ms']:.3g} | {b['gb_s']:.0f} | {100 * b['copy_fraction']:.0f}% |"
                )
    return "\n".join(lines) + "\n"


def _pair(row: dict[str, Any] | None) -> str:
    if not row:
        return "–"
    g = row.get("graph_ms")
    return f"{row['ms']:.3g} / {g:.3g}" if g is not None else f"{row['ms']:.3g} / –"


def markdown_overhead(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | layers (+ embeddings) | hidden | cells | tokens/cell | real tokens | forward, no-op tap ms "
        "| forward, pooling tap ms | difference | pooling all layers alone ms | % of forward | "
        "same, explicit `starts` tensor ms | % of forward | ≤ 5% |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['layers']} (+1) | {r['hidden']} | {r['cells']} | ~{r['tokens_per_cell_nominal']} | "
            f"{r['real_tokens']:,} | {r['forward_noop_ms']:.1f} | {r['forward_pool_ms']:.1f} | "
            f"{r['overhead_pct_forward_difference']:+.1f}% | {r['pool_all_layers_ms']:.2f} | "
            f"{r['pool_pct_of_forward']:.1f}% | {r['pool_all_layers_starts_tensor_ms']:.2f} | "
            f"{r['pool_starts_tensor_pct_of_forward']:.1f}% | {'yes' if r['target_met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]], overhead: list[dict[str, Any]], gpu: bool) -> dict[str, Any]:
    """Which of the issue's targets this run met (reported, never asserted)."""
    res: dict[str, Any] = {"thresholds": TARGETS}
    if gpu:
        tr = [r for r in rows if "copy_fraction" in r["variants"].get("cellstrata-triton", {})]
        frac = [r["variants"]["cellstrata-triton"]["copy_fraction"] for r in tr if r["hidden"] >= 512]
        spd = [r["speedups"]["cellstrata-triton_vs_eager"] for r in tr if "cellstrata-triton_vs_eager" in r["speedups"]]
        res["gpu_copy_fraction"] = {
            "met": sum(f >= TARGETS["gpu_copy_fraction"] for f in frac),
            "of": len(frac),
            "min": min(frac, default=None),
            "median": _median(frac),
        }
        one = [r["variants"]["cellstrata-triton-1seg"].get("copy_fraction") for r in tr if r["hidden"] >= 512]
        one = [f for f in one if f is not None]
        res["gpu_copy_fraction_1seg"] = {
            "met": sum(f >= TARGETS["gpu_copy_fraction"] for f in one),
            "of": len(one),
            "min": min(one, default=None),
            "median": _median(one),
        }
        res["gpu_speedup_vs_eager"] = {
            "met": sum(s >= TARGETS["gpu_speedup_vs_eager"] for s in spd),
            "of": len(spd),
            "min": min(spd, default=None),
            "median": _median(spd),
        }
    res["pool_pct_of_forward"] = {r["preset"]: r["pool_pct_of_forward"] for r in overhead}
    res["pool_pct_of_forward_met"] = {r["preset"]: r["target_met"] for r in overhead}
    return res


def _median(v: list[float]) -> float | None:
    return statistics.median(v) if v else None


# ---------------------------------------------------------------------------------------------------- main
def _ints(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip()) if text else default


@dataclass
class Setup:
    """A run's device and sizes, from the options."""

    device: torch.device
    with_triton: bool
    repeats: int
    budget: int
    hiddens: tuple[int, ...]
    tokens: tuple[int, ...]
    in_dtype: torch.dtype

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--quick", action="store_true", help="smoke run under a minute (2 x 2 shapes, small batches)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per variant on CPU, forwards per tap")
    ap.add_argument("--hiddens", default=None, help=f"comma list (default {','.join(map(str, HIDDENS))})")
    ap.add_argument(
        "--tokens", default=None, help=f"tokens per cell, comma list (default {','.join(map(str, TOKENS))})"
    )
    ap.add_argument("--budget", type=int, default=None, help="tokens per padded batch (default: cpu 16384, cuda 65536)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the token budget")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--no-forward", action="store_true", help="skip the forward-pass overhead section")
    ap.add_argument("--no-per-op", action="store_true", help="skip the per-op timings of the torch path (CPU only)")
    ap.add_argument("--sweep-tiles", action="store_true", help="CUDA: also time Triton tile overrides per shape")
    ap.add_argument("--sweep-segments", action="store_true", help="CUDA: also time forced n_seg values per shape")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON and Markdown go")
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--smoke-worker", action="store_true", help=argparse.SUPPRESS)
    return ap, ap.parse_args(argv)


def setup(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Setup:
    """Threads, the device (a missing CUDA stops here with the usage line), the sizes and the input dtype."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA device")
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    gpu = device.type == "cuda"
    with_triton = False
    if gpu:
        from cellstrata.kernels.pool_cast import triton_installed

        with_triton = triton_installed()
    return Setup(
        device=device,
        with_triton=with_triton,
        repeats=args.repeats or (2 if args.quick else REPEATS[device.type]),
        budget=int((args.budget or (QUICK_BUDGET if args.quick else BUDGET[device.type])) * args.scale),
        hiddens=_ints(args.hiddens, QUICK_HIDDENS if args.quick else HIDDENS),
        tokens=_ints(args.tokens, QUICK_TOKENS if args.quick else TOKENS),
        in_dtype=torch.bfloat16 if gpu else torch.float32,
    )


def compile_pool(args: argparse.Namespace) -> tuple[Callable[..., Any] | None, dict[str, Any]]:
    """The ``torch.compile`` variant (None with --no-compile or when compiling fails) and its record."""
    compiled = None
    compile_state: dict[str, Any] = {
        "enabled": not args.no_compile,
        "mode": "dynamic=True",
        "first_call_s": [],
        "errors": [],
    }
    if not args.no_compile:
        try:
            compiled = torch.compile(eager_pool, dynamic=True)
        except Exception as exc:
            compile_state["errors"].append(f"{type(exc).__name__}: {exc}")
    return compiled, compile_state


def run_shapes(st: Setup, args: argparse.Namespace, copy: dict[str, Any]) -> tuple[list[dict[str, Any]], dict]:
    """Every shape's variants, timed and checked; the rows and the compile record."""
    compiled, compile_state = compile_pool(args)
    rows: list[dict[str, Any]] = []
    for i, shape in enumerate(shapes_for(st.device.type, st.hiddens, st.tokens, st.budget, args.quick)):
        if compiled is not None and len(compile_state["errors"]) >= 2:
            compiled = None  # compiling keeps failing: stop trying
        try:
            case = make_case(shape, st.device, st.in_dtype, args.seed + i)
        except torch.cuda.OutOfMemoryError as exc:
            print(f"[{shape.label} h={shape.hidden} t={shape.tokens}] skipped: {exc}")
            continue
        with torch.inference_mode():
            r = run_case(
                case,
                st.device,
                st.repeats,
                compiled,
                compile_state,
                st.with_triton,
                copy["gb_s"],
                per_op=not args.no_per_op and not st.gpu,
                sweep_tiles=args.sweep_tiles,
                sweep_segments=args.sweep_segments,
            )
        del case
        if st.gpu:
            torch.cuda.empty_cache()
        r["loadavg_1min"] = loadavg()
        rows.append(r)
        parts = [f"{v} {_cell(r['variants'].get(v))}" for v in VARIANTS if v in r["variants"]]
        bad = [k for k, c in r["checks"].items() if not c["ok"]]
        print(
            f"[{r['label']:>10} h={r['hidden']:>4} t={r['tokens_nominal']:>4} B={r['cells']:>5}] ms (GB/s): "
            + ", ".join(parts)
            + ("; MISMATCH: " + ", ".join(bad) if bad else "")
        )
    return rows, compile_state


def run_forward(st: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Pooling every layer against the forward pass, per cell length (none with --no-forward)."""
    overhead: list[dict[str, Any]] = []
    if args.no_forward:
        return overhead
    from cellstrata.engine.device.budget import DEFAULT_MAX_TOKENS

    max_tokens = QUICK_BUDGET // 2 if args.quick else DEFAULT_MAX_TOKENS[st.device.type]
    with tempfile.TemporaryDirectory(prefix="cellstrata-kernels-") as work:
        for preset in FORWARD_CELL_TOKENS:
            r = forward_overhead(preset, st.device, max_tokens, st.repeats, args.seed, Path(work))
            overhead.append(r)
            print(
                f"[forward {preset}] {r['cells']} cells x ~{r['tokens_per_cell_nominal']} tokens: forward "
                f"{r['forward_noop_ms']:.1f} ms, with pooling {r['forward_pool_ms']:.1f} ms "
                f"({r['overhead_pct_forward_difference']:+.1f}%); pooling {r['layers'] + 1} layers alone "
                f"{r['pool_all_layers_ms']:.2f} ms = {r['pool_pct_of_forward']:.1f}% of the forward"
            )
    return overhead


def run_smoke(st: Setup) -> dict[str, Any] | None:
    """On the CPU: the Triton kernel through the interpreter on a tiny shape, in its own process."""
    if st.gpu:
        return None
    smoke = triton_smoke()
    if smoke["ran"]:
        print(f"triton interpreter smoke check (tiny shape): {'OK' if smoke['ok'] else 'MISMATCH'}")
    else:
        print(f"triton interpreter smoke check not run: {smoke['reason']}")
    return smoke


def save(args: argparse.Namespace, argv: list[str] | None, st: Setup, run: dict[str, Any], tables: str) -> None:
    """kernels-DEVICE-DATE.{json,md}; ``run`` holds the measured parts (machine, loads, rows, checks)."""
    stamp = utc_now()
    info, (load0, load1) = run["machine"], run["loadavg_1min"]
    command = command_line("kernels", argv)
    payload = {
        "benchmark": "kernels",
        "created": stamp.isoformat(timespec="seconds"),
        "command": command,
        "seconds": run["seconds"],
        "machine": info,
        "loadavg_1min": run["loadavg_1min"],
        "cpu_pressure_some_avg60_pct": run["cpu_pressure_some_avg60_pct"],
        "settings": {
            "quick": args.quick,
            "repeats": st.repeats,
            "budget_tokens": st.budget,
            "hiddens": list(st.hiddens),
            "tokens_per_cell": list(st.tokens),
            "length_spread": SPREAD,
            "pad_value": PAD_VALUE,
            "in_dtype": str(st.in_dtype).replace("torch.", ""),
            "out_dtype": "float16",
            "poolings": dict(zip(POOLINGS, SPEC.ops)),
            "n_leading": SPEC.n_leading,
            "variants": [v for v in VARIANTS if v not in TRITON_VARIANTS or st.with_triton],
            "gb_s": "(real tokens x hidden x input bytes + P x cells x hidden x 2) / time",
            "seed": args.seed,
        },
        **{k: run[k] for k in ("copy_bandwidth", "compile", "shapes", "forward_overhead")},
        **{k: run[k] for k in ("triton_interpreter_smoke", "targets", "all_checks_ok")},
    }
    head = (
        f"# pool_cast kernels ({stamp.strftime('%Y-%m-%d')}, {info['device_name']}, torch "
        f"{info['torch_version']}, {torch.get_num_threads()} threads)\n\n`{command}`\n\n"
        f"Input {str(st.in_dtype)[6:]}, output float16; poolings mean, max, cls (first), official (first_l2), "
        f"n_leading=1; 1-min load average {load0}-{load1}.\n\n"
    )
    save_results(args.results, result_name("kernels", device_tag(info), stamp), payload, head + tables)


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    if args.smoke_worker:
        smoke_worker()
        return 0
    st = setup(ap, args)
    info = machine(st.device)
    t_start = time.perf_counter()
    load0, psi0 = loadavg(), cpu_pressure()
    print(
        f"device: {info['device_name']}; torch {info['torch_version']} ({torch.get_num_threads()} threads), "
        f"triton {info['triton_version']}; input {str(st.in_dtype)[6:]}, output float16, poolings "
        f"{', '.join(POOLINGS)}"
    )
    if load0 is not None and info["cpu_count"] and load0 > info["cpu_count"] * 0.75:
        print(f"note: load average {load0} on {info['cpu_count']} CPUs: other work competes for the cores")
    copy = copy_bandwidth(st.device, st.repeats, COPY_BYTES[st.device.type] // (4 if args.quick else 1))
    print(f"copy bandwidth: {copy['gb_s']:.1f} GB/s (y.copy_(x) of {copy['bytes'] / 2**20:.0f} MiB, read + write)")
    rows, compile_state = run_shapes(st, args, copy)
    overhead = run_forward(st, args)
    smoke = run_smoke(st)
    load1, psi1 = loadavg(), cpu_pressure()
    table = markdown(rows, st.gpu, copy)
    table_fwd = markdown_overhead(overhead) if overhead else ""
    print()
    print(table)
    if table_fwd:
        print(table_fwd)
    all_ok = all(c["ok"] for r in rows for c in r["checks"].values()) and (smoke is None or smoke.get("ok", True))
    if not args.no_save:
        run = {
            "seconds": time.perf_counter() - t_start,
            "machine": info,
            "loadavg_1min": [load0, load1],
            "cpu_pressure_some_avg60_pct": [psi0, psi1],
            "copy_bandwidth": copy,
            "compile": compile_state,
            "shapes": rows,
            "forward_overhead": overhead,
            "triton_interpreter_smoke": smoke,
            "targets": targets(rows, overhead, st.gpu),
            "all_checks_ok": all_ok,
        }
        body = table + ("\n## Pooling every layer vs the forward pass\n\n" + table_fwd if table_fwd else "")
        save(args, argv, st, run, body)
    print(f"done in {time.perf_counter() - t_start:.0f} s; outputs match: {'yes' if all_ok else 'NO'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
