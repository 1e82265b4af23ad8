"""Roofline of the benchmark device: measured matmul rate and copy bandwidth, model FLOPs per cell.

Ceilings, measured here (random data, never zeros):

- **matmul rate**: GPU: ``torch.matmul`` of bfloat16 ``N x N`` matrices (N = 8,192 and 4,096), median of
  10 after a warm-up, timed with CUDA events; CPU: float32 ``2,048^3`` with the threads torch has, median
  of a few. ``2 N^3`` FLOPs per product.
- **copy bandwidth**: ``y.copy_(x)`` of a large buffer (GPU 1 GiB, CPU 256 MiB), bytes read + written per
  second.

Model FLOPs of a forward pass, from the model's shape and the **real** token lengths (no padding),
:func:`forward_flops`: per token and layer ``2 x`` the matmul weights of the block (QKV, output
projection, FFN), plus attention ``4 x len x hidden`` (``QK^T`` and ``AV``), plus the embedding matmuls a
family has (scGPT / Tahoe-X1 value encoder ``Linear(1, d)``, ``Linear(d, d)``; scFoundation's
AutoDiscretization ``Linear(1, bins)``, ``Linear(bins, bins)`` and the ``bins x d`` bin matmul). Norms,
softmax, activations and lookups are left out (they are memory-bound and small against the matmuls).

Given a throughput result (``--throughput results/throughput-<device>-<date>.json``), each configuration's
achieved model FLOP/s is set against the measured matmul rate (and, on an H100 / H200, the card's dense
bfloat16 peak), and cellstrata's extra time over the bare forward against the time its pooling must at
least take: every layer's hidden states read once at the copy bandwidth.

    python -m benchmarks.roofline                       # CPU: ~20 s; GPU: ~30 s
    python -m benchmarks.roofline --throughput benchmarks/results/throughput-cpu-2026-11-25.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as a file (``cellstrata bench`` does): the same as ``python -m benchmarks.roofline``
    _path = os.pathsep.join(filter(None, (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))))
    os.execve(
        sys.executable,
        [sys.executable, "-m", "benchmarks.roofline", *sys.argv[1:]],
        {**os.environ, "PYTHONPATH": _path},
    )

from .harness import (
    RESULTS,
    command_line,
    device_slug,
    git_commit,
    machine_info,
    result_name,
    save_results,
    utc_now,
)

# dense bfloat16 tensor-core peak (no sparsity) of the cards we know, TFLOP/s, by a part of the name
# ``torch.cuda.get_device_name`` gives ("NVIDIA H100 80GB HBM3" is the SXM part); others: measured rate only
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4}
GPU_MATMUL_SIZES = (8192, 4096)
CPU_MATMUL_SIZE = 2048
GPU_COPY_BYTES = 2**30
CPU_COPY_BYTES = 2**28


# ---------------------------------------------------------------------------------------------------- FLOPs
def flop_shape(model: Any) -> dict[str, int]:
    """Matmul weights per token of one block and of the embedding, read off the model's modules.

    Works on the meta device (no weights needed). The blocks are the model's largest ``ModuleList``; every
    ``nn.Linear`` and packed ``in_proj_weight`` inside one of them counts; outside them, every
    ``nn.Linear`` (value encoders, AutoDiscretization MLP) plus scFoundation's bin matmul
    (``token_emb.emb``: ``bins x d`` per token).
    """
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        msg = f"{type(model).__name__} has no ModuleList of blocks"
        raise ValueError(msg)
    blocks = max(lists, key=len)
    in_blocks = {id(m) for blk in blocks for m in blk.modules()}

    def weights(module: nn.Module) -> int:
        n = 0
        for m in module.modules():
            if isinstance(m, nn.Linear):
                n += m.in_features * m.out_features
            w = getattr(m, "in_proj_weight", None)
            if isinstance(w, nn.Parameter) and w.dim() == 2:
                n += int(w.shape[0] * w.shape[1])
        return n

    per_block = [weights(blk) for blk in blocks]
    embed = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in in_blocks
    )
    token_emb = getattr(model, "token_emb", None)
    if token_emb is not None and isinstance(getattr(token_emb, "emb", None), nn.Embedding):
        embed += token_emb.emb.num_embeddings * token_emb.emb.embedding_dim  # softmax(bins) @ emb.weight
    return {
        "n_layers": len(blocks),
        "hidden": int(model.hidden_size),
        "block_weights": int(sum(per_block) // len(per_block)),
        "embed_weights": int(embed),
    }


def forward_flops(shape: dict[str, int], lengths: Any) -> float:
    """FLOPs of one forward pass over cells of these real token lengths (no padding counted)."""
    lengths = np.asarray(lengths, dtype=np.float64).reshape(-1)
    tokens = float(lengths.sum())
    linear = 2.0 * tokens * (shape["n_layers"] * shape["block_weights"] + shape["embed_weights"])
    attention = 4.0 * shape["n_layers"] * shape["hidden"] * float((lengths**2).sum())
    return linear + attention


# ---------------------------------------------------------------------------------------------------- ceilings
def peak_bf16_tflops(device_name: str) -> float | None:
    """The card's dense bfloat16 peak in TFLOP/s when we know it, else None."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def measure_matmul(device: str = "cpu", *, quick: bool = False) -> dict[str, Any]:
    """Measured matmul rate: bf16 on CUDA (N = 8,192 and 4,096, median of 10), float32 on CPU."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    out: dict[str, Any] = {"device": device, "runs": []}
    if device.startswith("cuda"):
        dtype, sizes, reps = torch.bfloat16, GPU_MATMUL_SIZES, 10
    else:
        dtype, sizes, reps = torch.float32, ((1024,) if quick else (CPU_MATMUL_SIZE,)), 3 if quick else 5
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        times = []
        if device.startswith("cuda"):
            for _ in range(5):  # warm-up: clocks up, cuBLAS heuristics chosen
                torch.matmul(a, b)
            torch.cuda.synchronize()
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.matmul(a, b)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
        else:
            torch.matmul(a, b)
            for _ in range(reps):
                t0 = time.perf_counter()
                torch.matmul(a, b)
                times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        out["runs"].append(
            {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": sec, "tflops": 2 * n**3 / sec / 1e12}
        )
        del a, b
    out["dtype"] = str(dtype).replace("torch.", "")
    out["tflops"] = max(r["tflops"] for r in out["runs"])
    out["threads"] = torch.get_num_threads()
    return out


def measure_copy(device: str = "cpu", *, quick: bool = False) -> dict[str, Any]:
    """``y.copy_(x)`` of a large float32 buffer: bytes read + written per second (median)."""
    import torch

    gpu = device.startswith("cuda")
    nbytes = GPU_COPY_BYTES if gpu else (CPU_COPY_BYTES // 4 if quick else CPU_COPY_BYTES)
    x = torch.rand(nbytes // 4, device=device) + 0.5
    y = torch.empty_like(x)
    times = []
    y.copy_(x)
    for _ in range(10 if gpu else 5):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y.copy_(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            y.copy_(x)
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"device": device, "bytes": nbytes, "seconds": sec, "gb_per_s": 2 * nbytes / sec / 1e9}


def measure(device: str, *, quick: bool = False) -> dict[str, Any]:
    """Both ceilings of ``device`` and the card's known peak."""
    import torch

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    t0 = time.perf_counter()
    res = {"matmul": measure_matmul(device, quick=quick), "copy": measure_copy(device, quick=quick)}
    res["device_name"] = name
    res["peak_bf16_tflops"] = peak_bf16_tflops(name) if device.startswith("cuda") else None
    res["seconds"] = time.perf_counter() - t0
    return res


def utilisation(flops: float, seconds: float, ceilings: dict[str, Any] | None) -> dict[str, Any]:
    """Achieved model TFLOP/s, its fraction of the measured matmul rate and (known cards) of the peak."""
    achieved = flops / max(seconds, 1e-12) / 1e12
    out: dict[str, Any] = {"tflops": achieved, "of_matmul": None, "mfu": None}
    if ceilings:
        out["of_matmul"] = achieved / ceilings["matmul"]["tflops"]
        if ceilings.get("peak_bf16_tflops"):
            out["mfu"] = achieved / ceilings["peak_bf16_tflops"]
    return out


# ---------------------------------------------------------------------------------------------------- shapes
def shape_table(families: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """FLOPs per cell for every preset the throughput script knows, at its data's median cell length."""
    from . import throughput as tp

    rows = []
    for fam, presets in (families or {f: list(c) for f, c in tp.CELLS.items()}).items():
        for preset in presets:
            ld = tp.build_in_memory(fam, preset, device="meta", weights=False)
            fs = flop_shape(ld.model)
            n_special = ld.layout.n_leading + ld.layout.n_trailing
            median = tp.DATA[tp.size_class(preset)]["genes_per_cell"] + n_special
            context = ld.tokenizer.max_length
            length = min(median, context) if context else median
            per_cell = forward_flops(fs, [length])
            linear = 2.0 * length * (fs["n_layers"] * fs["block_weights"] + fs["embed_weights"])
            rows.append(
                {
                    "family": fam,
                    "preset": preset,
                    **fs,
                    "median_tokens": int(length),
                    "gflops_per_cell": per_cell / 1e9,
                    "attention_share": 1 - linear / per_cell,
                }
            )
    return rows


def against_throughput(path: Path, ceilings: dict[str, Any]) -> list[dict[str, Any]]:
    """Each configuration of a throughput result against the ceilings measured here."""
    data = json.loads(Path(path).read_text())
    rows = []
    bw = ceilings["copy"]["gb_per_s"] * 1e9
    for sh in data.get("shapes", []):
        if sh.get("skipped"):
            continue
        seconds = {r["variant"]: r for r in sh["rows"]}
        fwd = next((r for r in sh["rows"] if r["variant"].startswith("(a)")), None)
        for r in sh["rows"]:
            flops = r.get("model_flops")
            row: dict[str, Any] = {
                "family": sh["family"],
                "preset": sh["preset"],
                "variant": r["variant"],
                "seconds": r["seconds"],
                "model_flops": flops,
            }
            if flops:
                row.update(utilisation(flops, r["seconds"], ceilings))
            if r["variant"].startswith("(b)") and fwd is not None:
                # pooling reads every layer's hidden states once (float32 taps): its least time at copy bandwidth
                read = 4.0 * (sh["n_layers"] + 1) * r["tokens"] * sh["hidden"]
                row["extra_seconds_over_forward"] = r["seconds"] - fwd["seconds"]
                row["pool_read_bytes"] = read
                row["pool_floor_seconds"] = read / bw
            rows.append(row)
        del seconds
    return rows


def _fmt_pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown(payload: dict[str, Any]) -> str:
    c = payload["ceilings"]
    mm, cp = c["matmul"], c["copy"]
    gpu = payload["device"].startswith("cuda")
    unit = "TFLOP/s" if gpu else "GFLOP/s"
    scale = 1.0 if gpu else 1e3
    lines = [
        f"# Roofline ({payload['created'][:10]}, {c['device_name'] if gpu else payload['machine']['device_name']})",
        "",
        f"`{payload['command']}` ({payload['total_seconds']:.0f} s)",
        "",
        "| ceiling | measured |",
        "|---|--:|",
    ]
    for r in mm["runs"]:
        lines.append(
            f"| matmul {r['dtype']} {r['n']:,}³ ({mm['threads']} threads) | {r['tflops'] * scale:,.1f} {unit} |"
        )
    lines.append(f"| copy `y.copy_(x)`, {cp['bytes'] / 2**20:,.0f} MiB, read + write | {cp['gb_per_s']:,.1f} GB/s |")
    if c.get("peak_bf16_tflops"):
        lines.append(f"| card's dense bf16 peak (data sheet) | {c['peak_bf16_tflops']:,.1f} TFLOP/s |")
    lines += [
        "",
        "FLOPs per cell at the benchmark data's median length (real tokens, no padding): "
        "`2 × tokens × (layers × block weights + embedding weights) + 4 × layers × hidden × tokens²`.",
        "",
        "| family | preset | layers × hidden | block matmul weights | embedding matmul weights | median tokens "
        "| GFLOP / cell | attention share | cells/s at the matmul rate |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in payload["shapes"]:
        ceiling = mm["tflops"] * 1e12 / (r["gflops_per_cell"] * 1e9)
        ceiling_text = f"{ceiling:,.0f}" if ceiling >= 10 else f"{ceiling:.2g}"
        lines.append(
            f"| {r['family']} | {r['preset']} | {r['n_layers']} × {r['hidden']:,} | {r['block_weights']:,} | "
            f"{r['embed_weights']:,} | {r['median_tokens']:,} | {r['gflops_per_cell']:,.3f} | "
            f"{100 * r['attention_share']:.1f}% | {ceiling_text} |"
        )
    if payload.get("configurations"):
        lines += [
            "",
            f"Against `{payload['throughput']}`: achieved model {unit} (wall time of the variant), fraction of the "
            "measured matmul rate, MFU (of the card's peak, where known); for (b), its time over (a) and the least "
            "time its pooling needs (every layer read once at the copy bandwidth).",
            "",
            f"| family | preset | variant | seconds | model {unit} | of matmul rate | MFU | (b) − (a) s "
            "| pooling floor s |",
            "|---|---|---|--:|--:|--:|--:|--:|--:|",
        ]
        for r in payload["configurations"]:
            tf = r.get("tflops")
            extra = r.get("extra_seconds_over_forward")
            floor = r.get("pool_floor_seconds")
            lines.append(
                f"| {r['family']} | {r['preset']} | {r['variant']} | {r['seconds']:.2f} | "
                f"{'–' if tf is None else f'{tf * scale:,.2f}'} | {_fmt_pct(r.get('of_matmul'))} | "
                f"{_fmt_pct(r.get('mfu'))} | "
                f"{'' if extra is None else f'{extra:.2f}'} | {'' if floor is None else f'{floor:.3f}'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="smaller CPU measurements (a few seconds)")
    ap.add_argument("--throughput", default=None, help="a throughput results JSON to set against the ceilings")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON and Markdown go")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    t0 = time.perf_counter()
    ceilings = measure(device, quick=args.quick)
    shapes = shape_table()
    stamp = utc_now()
    command = command_line("roofline", argv)
    payload: dict[str, Any] = {
        "benchmark": "roofline",
        "created": stamp.isoformat(timespec="seconds"),
        "command": command,
        "device": device,
        "machine": machine_info(["torch"], device=device, torch_threads=True),
        "git_commit": git_commit(),
        "ceilings": ceilings,
        "shapes": shapes,
    }
    if args.throughput:
        payload["throughput"] = str(args.throughput)
        payload["configurations"] = against_throughput(Path(args.throughput), ceilings)
    payload["total_seconds"] = time.perf_counter() - t0
    text = markdown(payload)
    print(text)
    if not args.no_save:
        save_results(args.results, result_name("roofline", device_slug(device), stamp), payload, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
