"""The same extraction on CUDA and on the CPU, per model family: how far apart the stores are.

For each family's ``tiny`` random checkpoint (the one ``cellstrata demo`` writes) and the demo's synthetic
cells, ``cellstrata.extract(..., poolings=["all"], dtype="float32")`` runs four times with the same
``max_tokens`` and ``chunk_cells`` (so the batches are the same everywhere):

- ``cuda`` (the fused Triton kernel pools, bf16 autocast forward) and ``cuda-again`` (the same run once
  more: how reproducible the GPU run is);
- ``cuda-torch`` (``CELLSTRATA_POOL_BACKEND=torch``: the same forward, pooled by the torch path);
- ``cpu`` (float32 forward, torch path), the reference.

Reported per pooling: max |cuda - cpu| and that relative to max |cpu| (the bf16 forward against the
float32 one, not a pooling error), the smallest per-cell cosine similarity of cuda and cpu, and max
|cuda - cuda-torch| and |cuda - cuda-again| (the kernel against the torch path on the same GPU hidden
states). Results: ``benchmarks/results/device-parity-<device>-<date>.{json,md}``.

    python -m benchmarks.device_parity                    # every family, 2,000 cells each
    python -m benchmarks.device_parity --models scgpt --cells 500
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if not __package__:  # run as a file (``cellstrata bench`` does): the same as ``python -m benchmarks.device_parity``
    _path = os.pathsep.join(filter(None, (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))))
    os.execve(
        sys.executable,
        [sys.executable, "-m", "benchmarks.device_parity", *sys.argv[1:]],
        {**os.environ, "PYTHONPATH": _path},
    )

from .harness import RESULTS, command_line, name_slug, result_name, save_results, utc_now

FAMILIES = ("scgpt", "tahoe-x1", "scfoundation", "geneformer")
RUNS = ("cuda", "cuda-again", "cuda-torch", "cpu")


@contextlib.contextmanager
def pool_backend(name: str | None):
    old = os.environ.get("CELLSTRATA_POOL_BACKEND")
    if name is None:
        os.environ.pop("CELLSTRATA_POOL_BACKEND", None)
    else:
        os.environ["CELLSTRATA_POOL_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CELLSTRATA_POOL_BACKEND", None)
        else:
            os.environ["CELLSTRATA_POOL_BACKEND"] = old


def family_parity(family: str, data: Path, work: Path, cells: int, max_tokens: int, chunk: int) -> dict[str, Any]:
    import cellstrata as cs
    from cellstrata.demo import GENE_COLUMN
    from cellstrata.engine.models import get_family

    ckpt = get_family(family).init_checkpoint("tiny", work / f"ckpt-{family}", seed=0)
    stores: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    backends: dict[str, str] = {}
    for run in RUNS:
        device = "cpu" if run == "cpu" else "cuda"
        t0 = time.perf_counter()
        with pool_backend("torch" if run == "cuda-torch" else None):
            store = cs.extract(
                data,
                model=family,
                checkpoint=ckpt,
                gene_column=GENE_COLUMN.get(family),
                out=work / f"{family}-{run}.zarr",
                poolings=["all"],
                dtype="float32",
                device=device,
                max_tokens=max_tokens,
                chunk_cells=chunk,
                limit=cells,
                overwrite=True,
                progress=False,
            )
        seconds[run] = time.perf_counter() - t0
        backends[run] = store.attrs["pool_backend"]
        stores[run] = {p: np.asarray(store.layers(p).compute(), dtype=np.float64) for p in store.poolings}
    per_pooling = {}
    for name, ref in stores["cpu"].items():
        gpu, again, tor = stores["cuda"][name], stores["cuda-again"][name], stores["cuda-torch"][name]
        finite = np.isfinite(ref)
        same_nan = bool(np.array_equal(finite, np.isfinite(gpu)) and np.array_equal(finite, np.isfinite(tor)))
        d = np.abs(gpu - ref)[finite]
        scale = float(np.abs(ref[finite]).max()) if finite.any() else 0.0
        num = np.nansum(gpu * ref, axis=-1)
        den = np.sqrt(np.nansum(gpu * gpu, axis=-1) * np.nansum(ref * ref, axis=-1))
        cos = num[den > 0] / den[den > 0]
        per_pooling[name] = {
            "layers": int(ref.shape[0]),
            "cells": int(ref.shape[1]),
            "width": int(ref.shape[2]),
            "nan_positions_match": same_nan,
            "max_abs_cuda_vs_cpu": float(d.max()) if d.size else 0.0,
            "max_abs_cpu": scale,
            "rel_cuda_vs_cpu": float(d.max()) / scale if d.size and scale else 0.0,
            "min_cosine_cuda_vs_cpu": float(cos.min()) if cos.size else None,
            "max_abs_cuda_vs_cuda_torch": float(np.nanmax(np.abs(gpu - tor))),
            "max_abs_cuda_vs_cuda_again": float(np.nanmax(np.abs(gpu - again))),
        }
    return {"family": family, "seconds": seconds, "pool_backend": backends, "poolings": per_pooling}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| family | pooling | layers × cells × width | max abs cuda − cpu | relative to max abs cpu "
        "| min cosine cuda, cpu | max abs cuda − cuda (torch path) | max abs cuda − cuda (again) | NaNs match |",
        "|---|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        for name, p in r["poolings"].items():
            cos = p["min_cosine_cuda_vs_cpu"]
            lines.append(
                f"| {r['family']} | {name} | {p['layers']} × {p['cells']} × {p['width']} | "
                f"{p['max_abs_cuda_vs_cpu']:.3g} | {p['rel_cuda_vs_cpu']:.2%} | "
                f"{'–' if cos is None else f'{cos:.6f}'} | {p['max_abs_cuda_vs_cuda_torch']:.3g} | "
                f"{p['max_abs_cuda_vs_cuda_again']:.3g} | {'yes' if p['nan_positions_match'] else 'NO'} |"
            )
    lines += ["", "| family | " + " | ".join(f"{r} s" for r in RUNS) + " |", "|---|" + "--:|" * len(RUNS)]
    for r in rows:
        lines.append(f"| {r['family']} | " + " | ".join(f"{r['seconds'][k]:.1f}" for k in RUNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(FAMILIES))
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=16384, help="the same batch budget on both devices")
    ap.add_argument("--chunk-cells", type=int, default=512)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    from cellstrata.engine.input.datasets import write_synthetic_h5ad

    name = torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}")
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cellstrata-parity-") as tmp:
        work = Path(tmp)
        data = write_synthetic_h5ad(
            work / "demo.h5ad", n_cells=args.cells, seed=0, n_unknown_genes=60, genes_per_cell=180
        )
        for fam in (m.strip() for m in args.models.split(",") if m.strip()):
            r = family_parity(fam, data, work, args.cells, args.max_tokens, args.chunk_cells)
            rows.append(r)
            for pname, p in r["poolings"].items():
                print(
                    f"[{fam} {pname}] cuda vs cpu max abs {p['max_abs_cuda_vs_cpu']:.3g} "
                    f"({p['rel_cuda_vs_cpu']:.2%} of max |cpu|), min cosine {p['min_cosine_cuda_vs_cpu']}; "
                    f"cuda vs cuda-torch {p['max_abs_cuda_vs_cuda_torch']:.3g}, "
                    f"cuda vs again {p['max_abs_cuda_vs_cuda_again']:.3g}"
                )
            print(f"[{fam}] seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))
    table = markdown(rows)
    print(table)
    stamp = utc_now()
    command = command_line("device_parity", argv)
    payload = {
        "benchmark": "device_parity",
        "created": stamp.isoformat(timespec="seconds"),
        "command": command,
        "seconds": time.perf_counter() - t_start,
        "device_name": name,
        "torch_version": torch.__version__,
        "settings": vars(args),
        "families": rows,
    }
    head = f"# The same extraction on CUDA and CPU ({stamp.strftime('%Y-%m-%d')}, {name})\n\n`{command}`\n\n"
    save_results(
        args.results, result_name("device-parity", name_slug(name, ""), stamp), payload, head + table, default=None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
