"""Throughput and memory of all-layer extraction, side by side: forward only, cellstrata, the peers' approach.

For scGPT at each preset (``tiny``; ``whole-human`` = the released shape: 12 layers, hidden 512, a
1,200-token context), on the same synthetic cells written to an ``.h5ad`` first, three variants run in
one invocation, each in its own subprocess (so peak RSS is per variant) after a small warm-up:

(a) **forward only**: cellstrata's input path (row blocks per store chunk, the family tokenizer,
    ``engine.batching.iter_batches`` with the same ``max_tokens``), the model's forward with a no-op
    tap, nothing pooled or stored. The floor: what the model alone costs on these batches.
(b) **cellstrata**: ``cellstrata.extract(h5ad, model="scgpt", poolings=["all"], dtype="float16")``
    into a compressed store: the wall clock of the call (model load, reading, tokenizing, pooling every
    layer four ways, writing and committing chunks).
(c) **the peers' approach** (scGPT ``embed_data``, Helical, Geneformer ``EmbExtractor``, the paper's
    scripts): the whole ``.h5ad`` read into memory, fixed-size batches (64 cells, like ``embed_data``)
    in input order padded to the batch maximum, the model asked for *all* hidden states (every layer's
    ``[B, S, H]`` kept until the forward returns, as ``output_hidden_states=True``), then each layer
    pooled (masked mean over gene tokens, and CLS) in torch and copied to the host one layer at a time,
    everything accumulated in Python lists and written at the end (one ``np.save`` per pooling, float32).
    Same model object, same tokenizer: only the approach differs.

Reported per variant: cells, real tokens, padding fraction, seconds, cells/s, tokens/s, peak RSS
(``ru_maxrss`` of the variant's process) and, where known, the time inside the forward pass. Ratios:
``b/a`` (cellstrata's throughput relative to the bare forward: the price of pooling every layer and
writing) and ``c/b`` (the peers' throughput relative to cellstrata). A check compares the outputs:
(a) and (b) must have run the same tokens and batches; (b) and (c) must agree, layer by layer, on the
``mean`` and ``cls`` of a sample of cells within float16 rounding.

The checkpoints have **random weights** (``init_checkpoint``): the numbers are throughput only, which
does not depend on the weights' values. Results (JSON with machine info, command line and settings, and
the same table as Markdown) go to ``benchmarks/results/throughput-<device>-<date>.{json,md}``.

    python benchmarks/throughput.py                  # tiny 5,000 + whole-human 64 cells, 2 repeats: ~8 min on 2 cores
    python benchmarks/throughput.py --quick          # smoke run, under a minute (~50 s here)
    python benchmarks/throughput.py --presets tiny --cells tiny=20000 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("forward", "cellstrata", "peers")
LABELS = {
    "forward": "(a) forward only",
    "cellstrata": "(b) cellstrata extract",
    "peers": "(c) peers' approach",
}
# Synthetic data per preset: genes in the matrix, median expressed genes per cell (lognormal spread
# ``sigma``), so part of the cells exceed the context (256 tokens for tiny, 1,200 for whole-human).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"cells": 5000, "quick_cells": 200, "n_genes": 2000, "genes_per_cell": 150, "sigma": 0.5},
    "whole-human": {"cells": 64, "quick_cells": 1, "n_genes": 20000, "genes_per_cell": 1500, "sigma": 0.5},
}
WARMUP_CELLS = 2
REPEATS = 2
QUICK_WARMUP_CELLS = 1
PEER_BATCH = 64
CHECK_CELLS = 16
# cellstrata stores float16, the peers keep float32: they must agree within one float16 step (ULP) of the
# value, plus a floor for values near zero (float32 sums over differently padded batches differ by ~1e-7)
CHECK_ULPS = 1.0
CHECK_ATOL = 1e-5
ULP_REPORT_MIN = 1e-2  # ULP errors are reported for |values| above this (below it the absolute floor rules)


# ----------------------------------------------------------------------------------------------------
# worker side (one variant in its own process)


def _rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the peak)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return _peak_rss_mb()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _loadavg() -> float | None:
    """1-minute load average: above the CPU count, other processes were competing for the cores."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


def _autocast(device: Any) -> Any:
    """The precision cellstrata's pipeline uses: bf16 autocast on CUDA, float32 on CPU."""
    import torch

    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_forward_only(spec: dict[str, Any], n_cells: int) -> dict[str, Any]:
    """(a): cellstrata's reading, tokenizing and batching; forward with a no-op tap; nothing kept."""
    import torch

    from cellstrata.engine.batching import iter_batches
    from cellstrata.engine.models import get_family
    from cellstrata.engine.pipeline import DEFAULT_MAX_TOKENS, _select, resolve_device
    from cellstrata.engine.sources import check_values, open_source
    from cellstrata.engine.store import default_chunk_cells

    t0 = time.perf_counter()
    device = resolve_device(spec["device"])
    source = open_source(spec["h5ad"])
    loaded = get_family("scgpt").load(spec["checkpoint"], device=device)
    t_load = time.perf_counter() - t0
    tok = loaded.tokenizer
    mapping = tok.map_genes(list(source.gene_names))
    max_tokens = int(spec["max_tokens"] or DEFAULT_MAX_TOKENS[device.type])
    chunk = default_chunk_cells(n_cells, loaded.hidden_size, spec["dtype"])

    def noop(layer: int, hidden: torch.Tensor) -> None:
        pass

    tokens = padded = batches = 0
    t_input = t_forward = 0.0
    for start in range(0, n_cells, chunk):
        t1 = time.perf_counter()
        block = source.read(start, min(start + chunk, n_cells))
        check_values(block, require_counts=True)
        toks = tok.tokenize(block, mapping)
        if toks.empty.any():
            toks = _select(toks, np.flatnonzero(~toks.empty))
        t_input += time.perf_counter() - t1
        for batch in iter_batches(toks, max_tokens, tok.pad_id, tok.pad_value):
            t2 = time.perf_counter()
            dev = batch.to(device)
            with torch.inference_mode(), _autocast(device):
                loaded.model.forward(dev, noop)
            _sync(device)
            t_forward += time.perf_counter() - t2
            b, s = batch.genes.shape
            tokens += int(batch.lengths.sum())
            padded += b * s
            batches += 1
    source.close()
    return {
        "cells": n_cells,
        "tokens": tokens,
        "padded_tokens": padded,
        "batches": batches,
        "max_tokens": max_tokens,
        "seconds": time.perf_counter() - t0,
        "breakdown": {"load_s": t_load, "read_tokenize_s": t_input, "forward_s": t_forward},
        "forward_seconds": t_forward,
    }


def run_cellstrata(spec: dict[str, Any], n_cells: int, out: str) -> dict[str, Any]:
    """(b): the public call, timed from the outside; the store's telemetry says where the time went."""
    import cellstrata as cs

    t0 = time.perf_counter()
    cs.extract(
        spec["h5ad"],
        model="scgpt",
        checkpoint=spec["checkpoint"],
        out=out,
        poolings=["all"],
        dtype=spec["dtype"],
        device=spec["device"],
        max_tokens=spec["max_tokens"],
        limit=n_cells,
        overwrite=True,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    attrs = cs.open_store(out).attrs
    tele = attrs["telemetry"]
    return {
        "cells": int(tele["cells"]),
        "tokens": int(tele["tokens"]),
        "padded_tokens": int(tele["padded_tokens"]),
        "batches": int(tele["batches"]),
        "seconds": seconds,
        "forward_seconds": float(tele["forward_seconds"]),
        "breakdown": {
            "setup_s": seconds - float(tele["seconds"]),  # model load, store creation, Dask client
            "pipeline_s": float(tele["seconds"]),
            "forward_and_pool_s": float(tele["forward_seconds"]),
            "input_wait_s": float(tele["input_wait_seconds"]),
            "writer_wait_s": float(tele["writer_wait_seconds"]),
        },
        "telemetry": tele,
        "poolings": attrs["poolings"],
        "chunk_cells": attrs["chunk_cells"],
        "store_bytes": sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()),
    }


def _keep_every_layer(hidden_states: list[Any]) -> Any:
    """A tap that keeps every layer's ``[B, S, H]`` until the forward returns (``output_hidden_states``)."""

    def tap(layer: int, hidden: Any) -> None:
        hidden_states.append(hidden)

    return tap


def run_peers(spec: dict[str, Any], n_cells: int, out: str) -> dict[str, Any]:
    """(c): the whole input in memory, fixed batches in input order, all hidden states, pool per layer."""
    import anndata as ad
    import torch

    from cellstrata.engine.batching import collate
    from cellstrata.engine.models import get_family
    from cellstrata.engine.pipeline import resolve_device
    from cellstrata.engine.sources import CellBlock

    t0 = time.perf_counter()
    device = resolve_device(spec["device"])
    loaded = get_family("scgpt").load(spec["checkpoint"], device=device)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    adata = ad.read_h5ad(spec["h5ad"])  # embed_data reads the whole file
    tok = loaded.tokenizer
    mapping = tok.map_genes(list(adata.var_names))
    X = adata.X[:n_cells]
    tokens = tok.tokenize(CellBlock(indices=np.arange(n_cells), X=X), mapping)
    t_input = time.perf_counter() - t1
    n_layers = loaded.n_layers
    means: list[list[np.ndarray]] = [[] for _ in range(n_layers + 1)]
    clss: list[list[np.ndarray]] = [[] for _ in range(n_layers + 1)]
    batch_size = int(spec["peer_batch"])
    n_tokens = padded = batches = 0
    t_forward = t_pool = 0.0
    for i in range(0, n_cells, batch_size):
        batch = collate(tokens, np.arange(i, min(i + batch_size, n_cells)), tok.pad_id, tok.pad_value)
        t2 = time.perf_counter()
        dev = batch.to(device)
        hidden_states: list[torch.Tensor] = []  # what output_hidden_states=True returns
        with torch.inference_mode(), _autocast(device):
            loaded.model.forward(dev, _keep_every_layer(hidden_states))
        _sync(device)
        t3 = time.perf_counter()
        t_forward += t3 - t2
        with torch.inference_mode():
            b, s = dev.genes.shape
            pos = torch.arange(s, device=device)
            gene = ((pos[None, :] >= 1) & (pos[None, :] < dev.lengths[:, None])).to(torch.float32)  # no CLS, no pad
            count = gene.sum(1, keepdim=True)
            for layer, h in enumerate(hidden_states):
                h = h.float()
                # copy=True: on a CPU run ``.cpu()`` of a view would keep the whole [B, S, H] alive
                means[layer].append(((h * gene[:, :, None]).sum(1) / count).to("cpu", copy=True).numpy())
                clss[layer].append(h[:, 0].to("cpu", copy=True).numpy())
        del hidden_states
        t_pool += time.perf_counter() - t3
        n_tokens += int(batch.lengths.sum())
        padded += b * s
        batches += 1
    t4 = time.perf_counter()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, parts in (("mean", means), ("cls", clss)):
        np.save(folder / f"{name}.npy", np.stack([np.concatenate(p) for p in parts]))  # [L+1, N, H] float32
    t_write = time.perf_counter() - t4
    return {
        "cells": n_cells,
        "tokens": n_tokens,
        "padded_tokens": padded,
        "batches": batches,
        "batch_size": batch_size,
        "seconds": time.perf_counter() - t0,
        "forward_seconds": t_forward,
        "breakdown": {
            "load_s": t_load,
            "read_tokenize_s": t_input,
            "forward_s": t_forward,
            "pool_copy_s": t_pool,
            "write_s": t_write,
        },
    }


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import warnings

    import torch

    # cellstrata's in-process Dask client asks for a dashboard; a busy default port only moves it elsewhere
    warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    variant, work = spec["variant"], Path(spec["work"])
    warm_n = min(int(spec["warmup_cells"]), int(spec["cells"]))
    # an existing store with the same configuration would be resumed (nothing left to do): start empty
    for old in (work / "warmup-cellstrata.zarr", work / "warmup-peers", Path(spec["out"])):
        shutil.rmtree(old, ignore_errors=True)
    t0 = time.perf_counter()
    if variant == "forward":
        run_forward_only(spec, warm_n)
    elif variant == "cellstrata":
        run_cellstrata(spec, warm_n, str(work / "warmup-cellstrata.zarr"))
    else:
        run_peers(spec, warm_n, str(work / "warmup-peers"))
    warm_s = time.perf_counter() - t0
    rss_before = _rss_mb()
    load_before = _loadavg()
    device_peak = None
    if spec["device"] != "cpu" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    n = int(spec["cells"])
    if variant == "forward":
        res = run_forward_only(spec, n)
    elif variant == "cellstrata":
        res = run_cellstrata(spec, n, spec["out"])
    else:
        res = run_peers(spec, n, spec["out"])
    if spec["device"] != "cpu" and torch.cuda.is_available():
        device_peak = torch.cuda.max_memory_allocated() / 2**20
    res.update(
        variant=variant,
        warmup_cells=warm_n,
        warmup_seconds=warm_s,
        rss_before_mb=rss_before,
        peak_rss_mb=_peak_rss_mb(),
        loadavg_1min=[load_before, _loadavg()],
        device_peak_mb=device_peak,
        torch_threads=torch.get_num_threads(),
    )
    Path(spec["result"]).write_text(json.dumps(res, indent=2, default=float))


# ----------------------------------------------------------------------------------------------------
# driver side


def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(device: str) -> dict[str, Any]:
    import torch

    cpu_model = ""
    for line in _sh(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            cpu_model = line.split(":", 1)[1].strip()
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": cpu_model,
        "memory_gb": mem_gb,
        "device": device,
        "device_name": cpu_model or platform.processor() or "cpu",
    }
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    import cellstrata

    info["cellstrata_version"] = cellstrata.__version__
    info["git_commit"] = _sh(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    return info


def _device_slug(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(0).lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def prepare_inputs(preset: str, n_cells: int, work: Path, seed: int) -> dict[str, Any]:
    """Random-weight checkpoint of ``preset`` and the synthetic cells as an .h5ad (with their statistics)."""
    import anndata as ad

    from cellstrata.engine.datasets import write_synthetic_h5ad
    from cellstrata.engine.models import get_family

    p = PRESETS[preset]
    ckpt = get_family("scgpt").init_checkpoint(preset, work / f"ckpt-{preset}", seed=seed)
    h5ad = work / f"cells-{preset}.h5ad"
    write_synthetic_h5ad(
        h5ad, n_cells, p["n_genes"], seed=seed, genes_per_cell=p["genes_per_cell"], genes_per_cell_sigma=p["sigma"]
    )
    adata = ad.read_h5ad(h5ad)
    expressed = np.diff(adata.X.indptr)
    max_length = get_family("scgpt").presets[preset].max_length
    return {
        "checkpoint": str(ckpt),
        "h5ad": str(h5ad),
        "data": {
            "n_cells": n_cells,
            "n_genes": p["n_genes"],
            "genes_per_cell": p["genes_per_cell"],
            "genes_per_cell_sigma": p["sigma"],
            "seed": seed,
            "expressed_genes": {
                "median": float(np.median(expressed)),
                "p10": float(np.percentile(expressed, 10)),
                "p90": float(np.percentile(expressed, 90)),
                "max": int(expressed.max()),
            },
            "context_tokens": max_length,
            "cells_over_context": float(np.mean(expressed > max_length - 1)),
        },
    }


def run_variant(variant: str, base: dict[str, Any], work: Path) -> dict[str, Any]:
    spec = dict(base, variant=variant)
    spec["out"] = str(work / (f"{variant}-out" + (".zarr" if variant == "cellstrata" else "")))
    spec["result"] = str(work / f"{variant}-result.json")
    spec["work"] = str(work)
    spec_path = work / f"{variant}-spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)], check=False)
    if proc.returncode != 0:
        msg = f"variant {variant} failed with exit code {proc.returncode}"
        raise RuntimeError(msg)
    res = json.loads(Path(spec["result"]).read_text())
    res["process_seconds"] = time.perf_counter() - t0
    res["out"] = spec["out"]
    return res


def check_outputs(results: dict[str, dict[str, Any]], n_cells: int) -> dict[str, Any]:
    """(a) ran cellstrata's batches; (b) and (c) agree on mean and CLS at every layer for sampled cells."""
    import cellstrata as cs

    a, b, c = (results[v] for v in VARIANTS)
    same_batches = all(a[k] == b[k] for k in ("tokens", "padded_tokens", "batches"))
    store = cs.open_store(b["out"])
    cells = np.unique(np.linspace(0, n_cells - 1, min(CHECK_CELLS, n_cells)).round().astype(int))
    report: dict[str, Any] = {
        "forward_same_tokens_and_batches_as_cellstrata": bool(same_batches),
        "peers_same_tokens_as_cellstrata": bool(b["tokens"] == c["tokens"]),
        "cells_compared": [int(i) for i in cells],
        "tolerance": f"{CHECK_ULPS:g} float16 ULP of the value + {CHECK_ATOL:g}",
        "ulps_reported_for_values_above": ULP_REPORT_MIN,
    }
    ok = same_batches and report["peers_same_tokens_as_cellstrata"]
    for name in ("mean", "cls"):
        ours = np.asarray(store.group["pooled"][name][:, cells, :], dtype=np.float32)
        theirs = np.load(Path(c["out"]) / f"{name}.npy", mmap_mode="r")[:, cells, :].astype(np.float32)
        diff = np.abs(ours - theirs)
        ulp = np.spacing(np.maximum(np.abs(ours), np.abs(theirs)).astype(np.float16)).astype(np.float32)
        close = bool(np.all(diff <= CHECK_ULPS * ulp + CHECK_ATOL))
        big = np.maximum(np.abs(ours), np.abs(theirs)) >= ULP_REPORT_MIN
        report[name] = {
            "layers": int(ours.shape[0]),
            "max_abs_diff": float(diff.max()),
            "max_float16_ulps": float((diff / ulp)[big].max()) if big.any() else 0.0,
            "max_abs_diff_small_values": float(diff[~big].max()) if (~big).any() else 0.0,
            "max_abs_value": float(np.abs(theirs).max()),
            "last_layer_max_abs_diff": float(diff[-1].max()),
            "close": close,
        }
        ok = ok and close
    report["ok"] = bool(ok)
    return report


def summarize(preset: str, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for v in VARIANTS:
        r = results[v]
        s = max(r["seconds"], 1e-9)
        rows.append(
            {
                "preset": preset,
                "variant": LABELS[v],
                "cells": r["cells"],
                "tokens": r["tokens"],
                "padding": 1 - r["tokens"] / max(r["padded_tokens"], 1),
                "batches": r["batches"],
                "seconds": r["seconds"],
                "forward_seconds": r.get("forward_seconds"),
                "cells_per_s": r["cells"] / s,
                "tokens_per_s": r["tokens"] / s,
                "peak_rss_mb": r["peak_rss_mb"],
                "rss_growth_mb": r["peak_rss_mb"] - r["rss_before_mb"],
                "device_peak_mb": r.get("device_peak_mb"),
                "loadavg_1min": r.get("loadavg_1min"),
            }
        )
    return rows


def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def markdown(rows: list[dict[str, Any]], ratios: dict[str, dict[str, float]], checks: dict[str, Any]) -> str:
    gpu = any(r["device_peak_mb"] is not None for r in rows)
    head = (
        "| preset | variant | cells | tokens | padding | batches | seconds | in forward (s) | cells/s | tokens/s "
        "| peak RSS MB (growth) |"
    )
    sep = "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    if gpu:
        head += " GPU peak MB |"
        sep += "--:|"
    lines = [head, sep]
    for r in rows:
        fwd = "" if r["forward_seconds"] is None else _fmt(r["forward_seconds"])
        line = (
            f"| {r['preset']} | {r['variant']} | {r['cells']:,} | {r['tokens']:,} | {100 * r['padding']:.1f}% | "
            f"{r['batches']} | {_fmt(r['seconds'])} | {fwd} | {_fmt(r['cells_per_s'])} | "
            f"{_fmt(r['tokens_per_s'], 0)} | {_fmt(r['peak_rss_mb'], 0)} (+{_fmt(r['rss_growth_mb'], 0)}) |"
        )
        if gpu:
            line += f" {_fmt(r['device_peak_mb'] or 0, 0)} |"
        lines.append(line)
    lines += [
        "",
        "| preset | b/a: cellstrata vs forward only | c/b: peers vs cellstrata | peak RSS c/b | outputs agree |",
        "|---|--:|--:|--:|---|",
    ]
    for preset, q in ratios.items():
        ck = checks[preset]
        agree = (
            f"{'yes' if ck['ok'] else 'NO'}: mean ≤ {ck['mean']['max_float16_ulps']:.2f}, cls ≤ "
            f"{ck['cls']['max_float16_ulps']:.2f} float16 ULP ({len(ck['cells_compared'])} cells × "
            f"{ck['mean']['layers']} layers)"
        )
        lines.append(f"| {preset} | {q['b_over_a']:.2f} | {q['c_over_b']:.2f} | {q['rss_c_over_b']:.2f} | {agree} |")
    return "\n".join(lines) + "\n"


def parse_cells(text: str | None, presets: list[str]) -> dict[str, int]:
    if not text:
        return {}
    out: dict[str, int] = {}
    parts = [p.strip() for p in text.split(",") if p.strip()]
    for i, part in enumerate(parts):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = int(v)
        elif i < len(presets):
            out[presets[i]] = int(part)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", default="tiny,whole-human", help="comma list of scGPT presets (tiny, whole-human)")
    ap.add_argument(
        "--cells",
        default=None,
        help="cells per preset: 'tiny=5000,whole-human=64' or values in --presets order (defaults: "
        + ", ".join(f"{k}={v['cells']}" for k, v in PRESETS.items())
        + ")",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run under a minute (few cells)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--max-tokens", type=int, default=None, help="cellstrata's batch budget (default: its own)")
    ap.add_argument("--peer-batch", type=int, default=PEER_BATCH, help="peers' cells per batch (embed_data: 64)")
    ap.add_argument(
        "--warmup-cells", type=int, default=None, help=f"cells of the warm-up run per variant (default {WARMUP_CELLS})"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every variant (default: torch's)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"runs per variant, round robin; the fastest is reported (default {REPEATS}, --quick 1)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep inputs and outputs here (default: a temporary folder)")
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON and Markdown go")
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0

    from cellstrata.engine.pipeline import resolve_device

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        ap.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    cells = parse_cells(args.cells, presets)
    warmup = args.warmup_cells or (QUICK_WARMUP_CELLS if args.quick else WARMUP_CELLS)
    repeats = args.repeats or (1 if args.quick else REPEATS)
    device = str(resolve_device(args.device))
    own_tmp = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="cellstrata-bench-")) if own_tmp else Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    info = machine_info(device)
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpu_model'] or info['processor']}), torch {info['torch_version']} "
        f"with {args.threads or info['torch_threads']} threads, device {info['device_name']}"
    )
    print("random-weight checkpoints: throughput only (speed does not depend on the weights)")
    load = _loadavg()
    if load is not None and info["cpu_count"] and load > info["cpu_count"]:
        print(f"WARNING: load average {load} exceeds the {info['cpu_count']} CPUs: other work competes for the cores")
    print()
    all_rows: list[dict[str, Any]] = []
    ratios: dict[str, dict[str, float]] = {}
    checks: dict[str, Any] = {}
    per_preset: dict[str, Any] = {}
    try:
        for preset in presets:
            n = cells.get(preset) or PRESETS[preset]["quick_cells" if args.quick else "cells"]
            work = root / preset
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            t0 = time.perf_counter()
            inputs = prepare_inputs(preset, n, work, args.seed)
            d = inputs["data"]
            print(
                f"[{preset}] {n} cells, {d['n_genes']} genes, expressed genes per cell median "
                f"{d['expressed_genes']['median']:.0f} (p10 {d['expressed_genes']['p10']:.0f}, p90 "
                f"{d['expressed_genes']['p90']:.0f}); {100 * d['cells_over_context']:.0f}% over the "
                f"{d['context_tokens']}-token context; inputs ready in {time.perf_counter() - t0:.1f} s"
            )
            base = {
                "preset": preset,
                "cells": n,
                "h5ad": inputs["h5ad"],
                "checkpoint": inputs["checkpoint"],
                "device": device,
                "dtype": "float16",
                "max_tokens": args.max_tokens,
                "peer_batch": args.peer_batch,
                "warmup_cells": warmup,
                "threads": args.threads,
            }
            results: dict[str, dict[str, Any]] = {}
            for rep in range(repeats):  # round robin, so slow phases of a busy machine hit every variant
                for v in VARIANTS:
                    r = run_variant(v, base, work)
                    load = r["loadavg_1min"]
                    print(
                        f"[{preset}] {LABELS[v]:<24} {r['seconds']:8.1f} s  {r['cells'] / r['seconds']:9.1f} cells/s  "
                        f"{r['tokens'] / r['seconds']:9.0f} tokens/s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                        f"(process {r['process_seconds']:.0f} s, load avg {load[0]} -> {load[1]}"
                        + (f", repeat {rep + 1}/{repeats})" if repeats > 1 else ")")
                    )
                    seconds = [*results.get(v, {}).get("all_seconds", []), r["seconds"]]
                    if v not in results or r["seconds"] < results[v]["seconds"]:
                        results[v] = r
                    results[v]["all_seconds"] = seconds
            rows = summarize(preset, results)
            all_rows += rows
            a, b, c = rows
            ratios[preset] = {
                "b_over_a": b["tokens_per_s"] / a["tokens_per_s"],
                "c_over_b": c["tokens_per_s"] / b["tokens_per_s"],
                "rss_c_over_b": c["peak_rss_mb"] / b["peak_rss_mb"],
            }
            checks[preset] = check_outputs(results, n)
            ck = checks[preset]
            print(
                f"[{preset}] check: forward ran cellstrata's tokens and batches: "
                f"{ck['forward_same_tokens_and_batches_as_cellstrata']}; cellstrata vs peers at "
                f"{len(ck['cells_compared'])} cells x {ck['mean']['layers']} layers: mean max |diff| "
                f"{ck['mean']['max_abs_diff']:.2e} ({ck['mean']['max_float16_ulps']:.2f} float16 ULP), cls "
                f"{ck['cls']['max_abs_diff']:.2e} ({ck['cls']['max_float16_ulps']:.2f} ULP); tolerance "
                f"{ck['tolerance']} -> {'OK' if ck['ok'] else 'MISMATCH'}"
            )
            bt = results["cellstrata"]["breakdown"]
            print(
                f"[{preset}] cellstrata telemetry: setup {bt['setup_s']:.1f} s, pipeline {bt['pipeline_s']:.1f} s "
                f"(forward+pool {bt['forward_and_pool_s']:.1f} s, input wait {bt['input_wait_s']:.1f} s, "
                f"writer wait {bt['writer_wait_s']:.1f} s)\n"
            )
            per_preset[preset] = {"data": d, "settings": base, "results": results, "check": ck}
    finally:
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)

    table = markdown(all_rows, ratios, checks)
    print(table)
    if not args.no_save:
        stamp = dt.datetime.now(dt.timezone.utc)
        name = f"throughput-{_device_slug(device)}-{stamp.strftime('%Y-%m-%d')}"
        out_dir = Path(args.results)
        out_dir.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python", "benchmarks/throughput.py", *(sys.argv[1:] if argv is None else argv)])
        payload = {
            "benchmark": "throughput",
            "created": stamp.isoformat(timespec="seconds"),
            "command": command,
            "note": "random-weight checkpoints: throughput only (speed does not depend on the weights)",
            "machine": info,
            "settings": {
                "quick": args.quick,
                "device": device,
                "max_tokens": args.max_tokens,
                "peer_batch": args.peer_batch,
                "warmup_cells": warmup,
                "threads": args.threads,
                "seed": args.seed,
                "repeats": repeats,
                "cellstrata_poolings": "all",
                "cellstrata_dtype": "float16",
                "peers_poolings": ["mean", "cls"],
                "peers_dtype": "float32",
            },
            "rows": all_rows,
            "ratios": ratios,
            "presets": per_preset,
        }
        (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
        loads = [x for r in all_rows for x in (r["loadavg_1min"] or []) if x is not None]
        load_text = f"; 1-min load average {min(loads):.2f}-{max(loads):.2f} during the runs" if loads else ""
        header = (
            f"# Throughput ({stamp.strftime('%Y-%m-%d')}, {info['device_name']}, {info['cpu_count']} CPUs, "
            f"torch {info['torch_version']}, {info['torch_threads'] if not args.threads else args.threads} threads)"
            f"\n\n`{command}`\n\nRandom-weight scGPT checkpoints: throughput only. Each variant in its own process "
            f"after a warm-up; fastest of {repeats} round-robin run(s){load_text}.\n\n"
        )
        (out_dir / f"{name}.md").write_text(header + table)
        print(f"saved {out_dir / name}.json and .md")
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
