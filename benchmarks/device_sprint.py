"""The throughput suite's variants in one process per run, for a GPU lent for a few minutes.

``throughput.py`` runs every variant in its own process (clean peak-memory numbers, ~10-20 s of start-up
and model building per variant); this script loads each shape's model **once** and runs, in the same
process and on the same synthetic cells, (a) forward only, (b) cellstrata's full extraction into a
compressed store and (c) the peers' approach at a fixed batch size, each after an untimed warm-up pass on
the first cells of the same input. Model FLOPs come from the real token lengths; MFU is against the
card's data-sheet dense bf16 peak and the measured matmul rate. Results are written after every shape
(JSON + Markdown), so a run cut short keeps what it measured.

    python -m benchmarks.device_sprint --device cuda --results DIR \
        --shapes tahoe-x1:1b=600,scgpt:whole-human=2000,geneformer:v2-104m=600,tahoe-x1:tiny=10000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (``cellstrata bench`` does): the same as ``python -m benchmarks.device_sprint``
    _path = os.pathsep.join(filter(None, (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))))
    os.execve(
        sys.executable,
        [sys.executable, "-m", "benchmarks.device_sprint", *sys.argv[1:]],
        {**os.environ, "PYTHONPATH": _path},
    )

from .harness import RESULTS, command_line, torch_machine_info, utc_now
from .roofline import measure
from .throughput import (
    GENE_COLUMN,
    build_in_memory,
    prepare_data,
    run_cellstrata,
    run_forward_only,
    run_peers,
    size_class,
)

WARMUP_SHARE = 0.2


def _peak_mb(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def run_shape(family: str, preset: str, n: int, data: dict[str, Any], work: Path, args: Any, ceilings: Any) -> dict:
    """(a), (b), (c) of one shape on one loaded model."""
    import torch

    from cellstrata.engine.device.pipeline import resolve_device

    device = resolve_device(args.device)
    t0 = time.perf_counter()
    loaded = build_in_memory(family, preset, seed=0, device=device)
    load_s = time.perf_counter() - t0
    spec = {
        "family": family,
        "preset": preset,
        "device": args.device,
        "gene_column": GENE_COLUMN[family],
        "dtype": "float16",
        "max_tokens": args.max_tokens,
        "seed": 0,
    }
    warm = max(32, int(WARMUP_SHARE * n))
    runners = {
        "forward": lambda cells, out: run_forward_only(spec, loaded, data["h5ad"], cells, out),
        "cellstrata": lambda cells, out: run_cellstrata(spec, loaded, data["h5ad"], cells, out),
        "peers": lambda cells, out: run_peers(spec, loaded, data["h5ad"], cells, out, batch_size=args.peer_batch),
    }
    row: dict[str, Any] = {"family": family, "preset": preset, "cells": n, "load_s": load_s, "variants": {}}
    for name, fn in runners.items():
        fn(warm, str(work / f"{family}-{preset}-{name}-warm.zarr"))
        _reset(device)
        r = fn(n, str(work / f"{family}-{preset}-{name}.zarr"))
        r = {k: v for k, v in r.items() if isinstance(v, (int, float, str, dict, list, type(None)))}
        r["device_peak_mb"] = _peak_mb(device)
        flops = float(r.get("model_flops") or 0.0)
        r["model_tflops_per_s"] = flops / r["seconds"] / 1e12
        if ceilings:
            peak = ceilings.get("peak_bf16_tflops")
            r["mfu"] = r["model_tflops_per_s"] / peak if peak else None
            r["of_measured_matmul"] = r["model_tflops_per_s"] / ceilings["matmul"]["tflops"]
        r["cells_per_s"] = r["cells"] / r["seconds"]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        row["variants"][name] = r
        print(
            f"[{family} {preset}] {name:<10} {r['seconds']:7.2f} s {r['cells_per_s']:9.1f} cells/s "
            f"{r['tokens_per_s']:11,.0f} tok/s  {r['model_tflops_per_s']:7.1f} TFLOP/s"
            + (f"  MFU {r['mfu']:.1%}" if r.get("mfu") is not None else "")
            + f"  padding {1 - r['tokens'] / max(r['padded_tokens'], 1):.1%}"
            + (f"  GPU peak {r['device_peak_mb']:,.0f} MB" if r["device_peak_mb"] else "")
            + (f"  [{r.get('attention')}, max_tokens {r.get('max_tokens')}]" if name != "peers" else ""),
            flush=True,
        )
    v = row["variants"]
    row["b_over_a"] = v["forward"]["seconds"] / v["cellstrata"]["seconds"]
    row["b_over_c"] = v["peers"]["seconds"] / v["cellstrata"]["seconds"]
    print(f"[{family} {preset}] b/a {row['b_over_a']:.3f}  b/c {row['b_over_c']:.2f}", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| family | preset | cells | tok/s (a) forward | tok/s (b) cellstrata | tok/s (c) peers | MFU (a) | MFU (b) "
        "| padding (b) / (c) | GPU peak MB (b) / (c) | b/a | b/c |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['preset']} | {r['cells']} | error: {r['error'][:80]} |")
            continue
        a, b, c = (r["variants"][k] for k in ("forward", "cellstrata", "peers"))

        def mfu(x: dict) -> str:
            return f"{x['mfu']:.1%}" if x.get("mfu") is not None else "–"

        def pad(x: dict) -> str:
            return f"{1 - x['tokens'] / max(x['padded_tokens'], 1):.1%}"

        lines.append(
            f"| {r['family']} | {r['preset']} | {r['cells']:,} | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} "
            f"| {c['tokens_per_s']:,.0f} | {mfu(a)} | {mfu(b)} | {pad(b)} / {pad(c)} "
            f"| {b['device_peak_mb'] or 0:,.0f} / {c['device_peak_mb'] or 0:,.0f} | {r['b_over_a']:.3f} "
            f"| {r['b_over_c']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", required=True, help="FAMILY:PRESET=CELLS, comma-separated, run in this order")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--peer-batch", type=int, default=64)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    shapes = []
    for item in args.shapes.split(","):
        key, n = item.split("=")
        fam, preset = key.split(":")
        shapes.append((fam, preset, int(n)))
    info = torch_machine_info(args.device)
    ceilings = measure(args.device)
    print(
        f"device {info.get('device_name')}: matmul {ceilings['matmul']['tflops']:.0f} TFLOP/s, copy "
        f"{ceilings['copy']['gb_per_s']:,.0f} GB/s, data-sheet bf16 {ceilings.get('peak_bf16_tflops')}",
        flush=True,
    )
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = utc_now()
    name = f"device-sprint-{stamp.strftime('%Y-%m-%d')}"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cellstrata-sprint-") as tmp:
        work = Path(tmp)
        data: dict[str, dict[str, Any]] = {}
        for kind in ("tiny", "released"):
            need = [n for f, p, n in shapes if size_class(p) == kind]
            if need:
                data[kind] = prepare_data(kind, max(need), work, 0)
        for fam, preset, n in shapes:
            try:
                rows.append(run_shape(fam, preset, n, data[size_class(preset)], work, args, ceilings))
            except Exception as exc:  # keep the other shapes' numbers
                traceback.print_exc()
                rows.append({"family": fam, "preset": preset, "cells": n, "error": repr(exc)})
            payload = {
                "benchmark": "device_sprint",
                "created": stamp.isoformat(timespec="seconds"),
                "command": command_line("device_sprint", argv or None),
                "machine": info,
                "ceilings": ceilings,
                "rows": rows,
            }
            (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
            (out_dir / f"{name}.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
