"""Chunk writer: seconds and MB/s to commit whole cell chunks, one part after another vs side by side.

Each cell chunk (``--chunk-mb`` of float16 activations over ``--poolings`` poolings, ``--layers`` + 1
layers and ``--width`` features, about 4 MB per store chunk as the engine sizes them) is written with
:func:`engine.writer.write_chunk` into a store made by :func:`engine.store.create_or_resume` with the
store's codec (``--compression``, Blosc-zstd by default), the way a run commits it: data, checksums,
then the ``done`` flag. Variants, each on a fresh store, in turn, ``--repeats`` times (the best time is
kept, so other load on a shared machine counts least):

- ``serial``: ``threads=1``, the parts of a chunk one after another (zarr still encodes the store
  chunks of one array on its own threads);
- ``parallel``: ``threads=WRITE_THREADS``, the poolings, per-cell arrays and checksums side by side
  (what the engine does);
- ``serial+blosc``: ``threads=1`` with Blosc's own threads switched on (``numcodecs.blosc.use_threads``,
  ``set_nthreads(cores)``);
- ``serial+pipelined``, ``parallel+pipelined``: two chunks in flight, as :class:`engine.writer.ChunkWriter`
  keeps them.

Then the device's view: a loop that "computes" a chunk every ``--device-ms`` (sleeping, so it takes no
CPU, like a GPU) and hands it to a :class:`engine.writer.ChunkWriter` on two threads, as a run does;
the writer wait is the time the loop is blocked in ``submit`` (the run's ``writer_wait_seconds``), with
the chunk's parts written one after another (``WRITE_THREADS = 1``) and side by side (the default).

The values look like embeddings (a per-feature offset plus noise, rounded to float16), so they compress
about as much as real ones. Every variant's store files are compared byte for byte with ``serial``'s,
and the values read back too (Blosc's own threads frame the compressed bytes differently, so that variant
writes other bytes for the same values).

    python -m benchmarks.writer                     # 8 chunks of 64 MB: ~1 min on 2 cores
    python -m benchmarks.writer --chunks 4 --chunk-mb 16 --no-save
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as a file (``cellstrata bench`` does): the same as ``python -m benchmarks.writer``
    _path = os.pathsep.join(filter(None, (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))))
    os.execve(
        sys.executable, [sys.executable, "-m", "benchmarks.writer", *sys.argv[1:]], {**os.environ, "PYTHONPATH": _path}
    )

from .common import make_temp_dir, remove_owned
from .harness import (
    RESULTS,
    command_line,
    cpu_pressure,
    git_commit,
    loadavg,
    machine_info,
    result_name,
    save_results,
    utc_now,
)

VARIANTS = ("serial", "parallel", "serial+blosc", "serial+pipelined", "parallel+pipelined")


def store_spec(n_chunks: int, chunk_cells: int, n_layers: int, width: int, poolings: int, compression: str) -> Any:
    """The spec of a benchmark store: ``poolings`` float16 poolings of ``width`` features, ``n_chunks`` chunks."""
    from cellstrata.engine.storage.store import FORMAT_VERSION, StoreSpec, config_hash

    n = n_chunks * chunk_cells
    names = [f"p{i}" for i in range(poolings)]
    attrs = {
        "format_version": FORMAT_VERSION,
        "model": {"family": "benchmark", "n_layers": n_layers, "hidden": width},
        "poolings": names,
        "dtype": "float16",
        "chunk_cells": chunk_cells,
        "n_cells": n,
        "config_hash": config_hash({"benchmark": "writer", "n": n, "c": chunk_cells, "compression": compression}),
    }
    widths = dict.fromkeys(names, width)
    return StoreSpec(n, n_layers, width, widths, "float16", chunk_cells, compression, attrs)


def make_chunks(spec: Any, seed: int) -> list[Any]:
    """Embedding-like float16 chunks for every chunk of ``spec`` (fresh random values per chunk)."""
    from cellstrata.engine.storage.writer import ChunkData

    rng = np.random.default_rng(seed)
    out = []
    for c in range(spec.n_chunks):
        start, stop = spec.chunk_bounds(c)
        k = stop - start
        pooled = {}
        for name, w in spec.widths.items():
            offset = rng.standard_normal((spec.n_layers + 1, 1, w), dtype=np.float32)
            noise = rng.standard_normal((spec.n_layers + 1, k, w), dtype=np.float32)
            pooled[name] = (offset + 0.3 * noise).astype(np.float16)
        names = np.array([f"cell-{i:09d}" for i in range(start, stop)])
        n_tokens = rng.integers(200, 3000, k).astype(np.int32)
        out.append(ChunkData(c, start, stop, pooled, names, n_tokens, rng.random(k) < 0.1))
    return out


@contextlib.contextmanager
def blosc_threads(enabled: bool) -> Iterator[None]:
    """Switch Blosc's own threads on (one per core) inside the block; restore the previous setting after."""
    import numcodecs.blosc as blosc

    if not enabled:
        yield
        return
    before_use, before_n = blosc.use_threads, blosc.get_nthreads()
    blosc.use_threads = True
    blosc.set_nthreads(os.cpu_count() or 1)
    try:
        yield
    finally:
        blosc.use_threads = before_use
        blosc.set_nthreads(before_n)


def files_digest(path: Path) -> str:
    """sha256 over every file below ``path`` except metadata (relative name and bytes, sorted by name)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json"):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def values_digest(path: Path, names: list[str]) -> str:
    """sha256 of the decoded values of the poolings ``names`` in the store at ``path`` (what a reader gets)."""
    import zarr

    h = hashlib.sha256()
    pooled = zarr.open_group(str(path), mode="r")["pooled"]
    for name in names:
        h.update(np.ascontiguousarray(pooled[name][:]).view(np.uint8))
    return h.hexdigest()


def run_variant(variant: str, spec: Any, chunks: list[Any], work: Path) -> dict[str, Any]:
    """Write every chunk with ``variant`` into a fresh store under ``work``; seconds, CPU seconds, bytes, digest."""
    from cellstrata.engine.storage.store import create_or_resume
    from cellstrata.engine.storage.writer import WRITE_THREADS, write_chunk

    path = work / f"{variant.replace('+', '-')}.zarr"
    remove_owned(path)
    create_or_resume(path, spec)
    threads = 1 if variant.startswith("serial") else WRITE_THREADS
    cpu0, t0 = os.times(), time.perf_counter()
    with blosc_threads(variant.endswith("+blosc")):
        if variant.endswith("+pipelined"):
            with ThreadPoolExecutor(max_workers=2) as pool:
                list(pool.map(lambda ch: write_chunk(str(path), ch, threads=threads), chunks))
        else:
            for ch in chunks:
                write_chunk(str(path), ch, threads=threads)
    seconds = time.perf_counter() - t0
    cpu1 = os.times()
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    result = {
        "variant": variant,
        "seconds": seconds,
        "cpu_seconds": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "stored_bytes": stored,
        "digest": files_digest(path),
        "values_digest": values_digest(path, list(spec.widths)),
    }
    remove_owned(path)
    return result


def device_loop(threads: int, spec: Any, chunks: list[Any], work: Path, device_s: float) -> dict[str, Any]:
    """A device loop producing a chunk every ``device_s`` into a ``ChunkWriter``; its writer wait and seconds."""
    from cellstrata.engine.storage import writer as writer_mod
    from cellstrata.engine.storage.store import create_or_resume

    path = work / f"loop-{threads}.zarr"
    remove_owned(path)
    create_or_resume(path, spec)
    before = writer_mod.WRITE_THREADS
    writer_mod.WRITE_THREADS = threads
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=2) as pool:
            writer = writer_mod.ChunkWriter(str(path), pool, max_pending=2)
            for ch in chunks:
                time.sleep(device_s)  # the device computes the chunk; the host is free
                writer.submit(ch)
            t_flush = time.perf_counter()
            writer.flush()
        seconds = time.perf_counter() - t0
    finally:
        writer_mod.WRITE_THREADS = before
    remove_owned(path)
    return {
        "threads": threads,
        "seconds": seconds,
        "writer_wait_seconds": writer.wait_seconds,
        "final_flush_seconds": seconds - (t_flush - t0),
        "device_seconds": device_s * len(chunks),
        "writer_wait_fraction": writer.wait_seconds / seconds,
    }


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every variant ``args.repeats`` times in turn; the best run of each, and ratios against ``serial``."""
    from cellstrata.engine.storage.writer import WRITE_THREADS

    itemsize = 2
    per_cell = args.poolings * (args.layers + 1) * args.width * itemsize
    chunk_cells = max(int(args.chunk_mb * 2**20 // per_cell), 1)
    spec = store_spec(args.chunks, chunk_cells, args.layers, args.width, args.poolings, args.compression)
    chunks = make_chunks(spec, args.seed)
    raw = sum(ch.nbytes for ch in chunks)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            runs[v].append(run_variant(v, spec, chunks, work))
    loops: dict[int, list[dict[str, Any]]] = {1: [], WRITE_THREADS: []}
    for _ in range(args.repeats):
        for threads in loops:
            loops[threads].append(device_loop(threads, spec, chunks, work, args.device_ms / 1000))
    best = {v: min(rs, key=lambda r: r["seconds"]) for v, rs in runs.items()}
    base = best["serial"]["seconds"]
    rows = []
    for v in VARIANTS:
        b = best[v]
        rows.append(
            {
                **b,
                "all_seconds": [r["seconds"] for r in runs[v]],
                "mb_per_s": raw / 2**20 / b["seconds"],
                "s_per_500mb": b["seconds"] * 500 * 2**20 / raw,
                "speedup_vs_serial": base / b["seconds"],
                "same_bytes_as_serial": b["digest"] == best["serial"]["digest"],
                "same_values_as_serial": b["values_digest"] == best["serial"]["values_digest"],
            }
        )
    return {
        "chunks": args.chunks,
        "chunk_cells": chunk_cells,
        "chunk_mb": raw / args.chunks / 2**20,
        "store_chunk_mb": chunk_cells * args.width * itemsize / 2**20,
        "poolings": args.poolings,
        "layers": args.layers + 1,
        "width": args.width,
        "compression": args.compression,
        "raw_mb": raw / 2**20,
        "compression_ratio": best["serial"]["stored_bytes"] / raw,
        "rows": rows,
        "device_ms": args.device_ms,
        "device_loop": [min(rs, key=lambda r: r["writer_wait_seconds"]) for rs in loops.values()],
    }


def markdown(payload: dict[str, Any]) -> str:
    """The side-by-side table of a result."""
    r = payload["result"]
    m = payload["machine"]
    lines = [
        f"# Chunk writer — {m['device_name']}",
        "",
        f"`{payload['command']}` (commit {payload['git_commit'][:12]}, {payload['created']}; load "
        f"{payload['load_before']} before, {payload['load_after']} after)",
        "",
        f"{r['chunks']} cell chunks of {r['chunk_mb']:.1f} MB ({r['chunk_cells']} cells x {r['poolings']} poolings x "
        f"{r['layers']} layers x {r['width']} features, float16; store chunks of {r['store_chunk_mb']:.1f} MB), "
        f"Blosc-{r['compression']}: stored/raw {r['compression_ratio']:.3f}. Best of {payload['repeats']}.",
        "",
        "| variant | seconds | CPU s | MB/s | s per 500 MB | vs serial | same bytes | same values |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['variant']} | {row['seconds']:.2f} | {row['cpu_seconds']:.2f} | {row['mb_per_s']:.0f} | "
            f"{row['s_per_500mb']:.2f} | {row['speedup_vs_serial']:.2f}x | "
            f"{'yes' if row['same_bytes_as_serial'] else 'no'} | {'yes' if row['same_values_as_serial'] else 'NO'} |"
        )
    lines += [
        "",
        f"Device loop: a chunk every {r['device_ms']:.0f} ms ({r['chunks']} chunks, "
        f"{r['chunks'] * r['device_ms'] / 1000:.2f} s of device time) into a ChunkWriter on two threads, "
        "two chunks in flight:",
        "",
        "| chunk parts | loop seconds | writer wait s | of the loop | final flush s |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in r["device_loop"]:
        how = "one after another" if row["threads"] == 1 else f"side by side ({row['threads']} threads)"
        lines.append(
            f"| {how} | {row['seconds']:.2f} | {row['writer_wait_seconds']:.2f} | "
            f"{100 * row['writer_wait_fraction']:.0f}% | {row['final_flush_seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=8, help="cell chunks written per variant")
    ap.add_argument("--chunk-mb", type=float, default=64, help="MB of activations per cell chunk")
    ap.add_argument("--poolings", type=int, default=2, help="poolings (arrays) per chunk")
    ap.add_argument("--layers", type=int, default=12, help="L: layers 0..L are stored")
    ap.add_argument("--width", type=int, default=512, help="features per pooling")
    ap.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "none"])
    ap.add_argument("--repeats", type=int, default=2, help="runs of every variant (the best is kept)")
    ap.add_argument("--device-ms", type=float, default=200, help="device time per chunk in the device loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="folder for the stores (default: a new temporary folder)")
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON and Markdown go")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args(argv)

    from .common import make_owned_dir

    work = make_owned_dir(Path(args.workdir)) if args.workdir else make_temp_dir("cellstrata-writer-")
    stamp = utc_now()
    load_before = loadavg()
    t0 = time.perf_counter()
    try:
        result = measure(args, work)
    finally:
        remove_owned(work)
    payload: dict[str, Any] = {
        "benchmark": "writer",
        "created": stamp.isoformat(timespec="seconds"),
        "command": command_line("writer", argv),
        "machine": machine_info(["zarr", "numcodecs", "numpy"]),
        "git_commit": git_commit(),
        "repeats": args.repeats,
        "load_before": load_before,
        "load_after": loadavg(),
        "cpu_pressure_avg60": cpu_pressure(),
        "result": result,
        "total_seconds": time.perf_counter() - t0,
    }
    text = markdown(payload)
    print(text)
    if not args.no_save:
        save_results(args.results, result_name("writer", "cpu", stamp), payload, text)
    # the engine's variants must write the same bytes; Blosc's own threads may frame them otherwise
    engine = ("serial", "parallel", "serial+pipelined", "parallel+pipelined")
    bad = [r["variant"] for r in result["rows"] if not r["same_values_as_serial"]]
    bad += [r["variant"] for r in result["rows"] if r["variant"] in engine and not r["same_bytes_as_serial"]]
    if bad:
        print(f"FAILED: {', '.join(sorted(set(bad)))} wrote other data than serial")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
