"""Throughput and memory of all-layer extraction, side by side: forward only, cellstrata, the peers' approach.

Every model family (scGPT, Tahoe-X1, scFoundation, Geneformer) at ``tiny`` and at each released size,
with random weights, on synthetic cells written to an ``.h5ad`` first. Three variants run per shape,
each in its own process (forked from a server that has only imported the libraries, so peak RSS is per
variant), each after a short warm-up on two short cells of a separate file:

(a) **forward only**: cellstrata's input path (row blocks per store chunk, the family tokenizer,
    ``engine.batching.iter_batches`` with the same ``max_tokens``), the model's forward with a no-op
    tap, nothing pooled or stored. The floor: what the model alone costs on these batches.
(b) **cellstrata**: what ``cellstrata.extract(h5ad, model=..., poolings=["all"], dtype="float16")``
    runs once the model is loaded (``open_source`` + ``engine.run.Extraction(...).run()``) into a
    compressed store: reading, tokenizing, pooling every layer every way the family offers, writing and
    committing chunks.
(c) **the peers' approach** (scGPT ``embed_data``, Helical, Geneformer ``EmbExtractor``, the paper's
    scripts): the whole ``.h5ad`` read into memory, fixed-size batches (64 cells, like ``embed_data``)
    in input order padded to the batch maximum, the model asked for *all* hidden states (every layer's
    ``[B, S, H]`` kept until the forward returns, as ``output_hidden_states=True``), then each layer
    pooled in torch (masked mean over the gene tokens, and the family's single-token pooling: CLS, or
    scFoundation's S token) and copied to the host one layer at a time, everything accumulated in Python
    lists and written at the end (one ``np.save`` per pooling, float32). The gene span and the token come
    from the family's ``layout`` and ``pool_ops``. Same model object, same tokenizer: only the approach
    differs.

Model loading is **outside** every timed region (reported separately as ``load_s``). ``tiny`` shapes
load a checkpoint written by the family's ``init_checkpoint`` through the family's ``load``; released
sizes are built in memory (the family's model class on the meta device, its public
``random_state_dict`` assigned without a copy, the family's real tokenizer over the vocabulary
``init_checkpoint`` would write): a multi-GB random checkpoint is not written to disk to be read back.
A check at ``tiny`` size verifies that this builder gives what ``init_checkpoint`` + ``load`` give
(same weights, tokenizer settings, layout, poolings). A shape whose weights plus activations would take
more than ``--mem-fraction`` of the machine's memory is skipped, with the reason printed and saved.

Reported per variant: cells, real tokens, padding fraction, seconds, cells/s, tokens/s, peak RSS
(``ru_maxrss`` of the variant's process) and the time inside the forward pass. Ratios: ``b/a``
(cellstrata's throughput relative to the bare forward: the price of pooling every layer and writing)
and ``c/b`` (the peers' throughput relative to cellstrata). A check compares the outputs: (a) and (b)
must have run the same tokens and batches; (b) and (c) must agree, layer by layer, on the ``mean`` and
the single-token pooling of a sample of cells within one float16 step.

Random weights: the numbers are throughput only, which does not depend on the weights' values. Results
(JSON with machine info, command line and settings, and the tables as Markdown) go to
``benchmarks/results/throughput-<device>-<date>.{json,md}``.

    python -m benchmarks.throughput                    # every family, tiny + released sizes: ~23 min on 2 cores
    python -m benchmarks.throughput --quick            # smoke run of the tiny shapes, under a minute
    python -m benchmarks.throughput --models tahoe-x1 --presets tahoe-x1=tiny,70m,1b
    python -m benchmarks.throughput --models scgpt --cells tiny=20000,whole-human=2000 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as a file (``cellstrata bench`` does): the same as ``python -m benchmarks.throughput``
    _path = os.pathsep.join(filter(None, (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))))
    os.execve(
        sys.executable,
        [sys.executable, "-m", "benchmarks.throughput", *sys.argv[1:]],
        {**os.environ, "PYTHONPATH": _path},
    )

from .common import fresh_owned_dir, make_owned_dir, make_temp_dir, maxrss, remove_owned
from .harness import (
    RESULTS,
    command_line,
    device_slug,
    loadavg,
    meminfo_gib,
    result_name,
    save_results,
    torch_machine_info,
    utc_now,
)
from .roofline import flop_shape, forward_flops, utilisation

VARIANTS = ("forward", "cellstrata", "peers", "official")
LABELS = {
    "forward": "(a) forward only",
    "cellstrata": "(b) cellstrata extract",
    "peers": "(c) peers' approach",
    "official": "(d) official, one cell at a time",
}
# (d) exists for scFoundation only: its get_embedding.py runs one cell per forward pass
OFFICIAL_FAMILIES = ("scfoundation",)
FAMILIES = ("scgpt", "tahoe-x1", "scfoundation", "geneformer")
# how each family's users name genes: scGPT and scFoundation by symbol (var_names), Tahoe-X1 and
# Geneformer by Ensembl id (the synthetic data's var["ensembl_id"])
GENE_COLUMN: dict[str, str | None] = {
    "scgpt": None,
    "tahoe-x1": "ensembl_id",
    "scfoundation": None,
    "geneformer": "ensembl_id",
}
# cells per shape of the default run (released sizes are expensive on a CPU: a 2,048-token cell costs
# ~50 s in Tahoe-X1 1b on 2 cores); --quick runs the tiny shapes only, QUICK_CELLS each
CELLS: dict[str, dict[str, int]] = {
    "scgpt": {"tiny": 2000, "whole-human": 32},
    "tahoe-x1": {"tiny": 2000, "70m": 16, "1b": 2, "3b": 1},
    "scfoundation": {"tiny": 2000, "100m": 4},  # its only (largest) released size; no truncation: long cells
    "geneformer": {"tiny": 2000, "v1-10m": 32, "v2-104m": 8, "v2-316m": 4},
}
QUICK_CELLS = 100
# On CUDA a run must last seconds, not the start-up's fraction of one: cells per shape sized so that every
# variant of the default GPU run (``--device cuda``, the shapes of CUDA_PRESETS) takes ~2-10 s, the whole
# suite ~5 min on an H100 (see benchmarks/README.md)
CUDA_CELLS: dict[str, dict[str, int]] = {
    "scgpt": {"tiny": 10000, "whole-human": 2000},
    "tahoe-x1": {"tiny": 10000, "70m": 1500, "1b": 300, "3b": 150},
    "scfoundation": {"tiny": 10000, "100m": 500},
    "geneformer": {"tiny": 10000, "v1-10m": 4000, "v2-104m": 600, "v2-316m": 300},
}
CUDA_PRESETS: dict[str, list[str]] = {
    "scgpt": ["tiny", "whole-human"],
    "tahoe-x1": ["tiny", "70m", "1b"],
    "scfoundation": ["tiny", "100m"],
    "geneformer": ["tiny", "v2-104m"],
}
# (d), one cell per forward, is launch-bound: it gets the first cells of the shape's input up to this cap
OFFICIAL_CELLS = {"cpu": 200, "cuda": 2000, "quick": 25}
# the peers' batch-size sweep: candidates, and the cells of the short subset each is timed on
PEER_SWEEP = {"cpu": (1, 4, 16, 64), "cuda": (8, 16, 32, 64, 128, 256)}
PEER_SWEEP_CELLS = {"cpu": 64, "cuda": 1024, "quick": 32}
PEER_SWEEP_SECONDS = 0.5  # each candidate: batches (the first untimed) until this much time has passed
# CUDA warm-up: the variant runs untimed on the first cells of the same input (real lengths and batch
# shapes: clocks ramped, kernels loaded and tuned, the caching allocator filled); this share of the cells
CUDA_WARMUP_SHARE = 0.25
CUDA_WARMUP_MIN = 64
# Synthetic data per size class: genes in the matrix, median expressed genes per cell (lognormal spread
# ``sigma``). The tiny vocabularies hold the first 2,000 synthetic genes; released vocabularies cover the
# 20,000 genes of the released-size data (scFoundation's 19,264-gene list: the first 19,264).
DATA: dict[str, dict[str, Any]] = {
    "tiny": {"n_genes": 2000, "genes_per_cell": 150, "sigma": 0.5},
    "released": {"n_genes": 20000, "genes_per_cell": 1500, "sigma": 0.5},
}
WARMUP_FILE_CELLS = 4
WARMUP_GENES_PER_CELL = 48  # short cells: the warm-up costs little even for the largest model
WARMUP_CELLS = 2
QUICK_WARMUP_CELLS = 1
REPEATS = {"tiny": 2, "released": 1}
PEER_BATCH = 64
MEM_FRACTION = 0.6
BASE_RSS_BYTES = 0.6 * 2**30  # a variant's process before the model: interpreter, torch, anndata, dask
CHECK_CELLS = 16
# cellstrata stores float16, the peers keep float32: they must agree within one float16 step (ULP) of the
# value, plus a floor for values near zero (float32 sums over differently padded batches differ by ~1e-7)
CHECK_ULPS = 1.0
CHECK_ATOL = 1e-5
# on CUDA both run the forward under bfloat16 autocast, on differently padded batches (other GEMM shapes): they
# agree to bfloat16 rounding carried through the layers, not to a float16 step; the check there is the cosine
# similarity of every (layer, cell) vector
CHECK_MIN_COSINE_BF16 = 0.999
ULP_REPORT_MIN = 1e-2  # ULP errors are reported for |values| above this (below it the absolute floor rules)
# what the variant processes import before they are forked (once, in the fork server)
PRELOAD = [
    "torch",
    "torch._dynamo",  # the meta-device model build imports it (normal_ of meta tensors)
    "anndata",
    "zarr",
    "distributed",
    "cellstrata.engine.device.pipeline",
    "cellstrata.engine.models.scgpt",
    "cellstrata.engine.models.tahoe_x1",
    "cellstrata.engine.models.scfoundation",
    "cellstrata.engine.models.geneformer",
]


def size_class(preset: str) -> str:
    return "tiny" if preset == "tiny" else "released"


# ----------------------------------------------------------------------------------------------------
# models: released sizes built in memory by the family (build_random), no checkpoint files


def build_in_memory(
    family: str, preset: str, *, seed: int = 0, device: Any = "cpu", max_length: int | None = None, weights: bool = True
) -> Any:
    """A :class:`LoadedModel` of ``family``/``preset`` with random weights, without writing a checkpoint.

    The family's own ``build_random``: what ``init_checkpoint`` + ``load`` give (checked by
    :func:`check_builder`), built on the meta device and given the random tensors without a copy, so peak
    memory is one set of weights; ``weights=False`` leaves it on the meta device (for counting parameters).
    """
    from cellstrata.engine.models import get_family

    options = {} if max_length is None else {"max_length": int(max_length)}
    return get_family(family).build_random(preset, seed=seed, device=device, weights=weights, **options)


def check_builder(family: str, preset: str, folder: Path, seed: int) -> dict[str, Any]:
    """Does the in-memory builder give what ``init_checkpoint`` + ``load`` give? (weights, tokenizer, poolings)"""
    import torch

    from cellstrata.engine.models import get_family

    ref = get_family(family).load(folder, device="cpu", seed=seed)
    ours = build_in_memory(family, preset, seed=seed)
    ref_state, our_state = ref.model.state_dict(), ours.model.state_dict()
    same = {
        "weights": ref_state.keys() == our_state.keys()
        and all(torch.equal(ref_state[k], our_state[k]) for k in ref_state),
        "tokenizer_settings": ref.tokenizer.settings() == ours.tokenizer.settings(),
        "layout": ref.layout == ours.layout,
        "pool_ops": dict(ref.pool_ops) == dict(ours.pool_ops),
        "custom_poolings": set(ref.custom_poolings) == set(ours.custom_poolings),
        "default_poolings": tuple(ref.default_poolings) == tuple(ours.default_poolings),
        "official_layer": ref.official_layer == ours.official_layer,
        "shape": (ref.n_layers, ref.hidden_size) == (ours.n_layers, ours.hidden_size),
    }
    return {"family": family, "preset": preset, **same, "ok": all(same.values())}


def describe_shape(family: str, preset: str, max_length: int | None) -> dict[str, Any]:
    """Layers, hidden size, parameters, widest activation and context of a shape (meta device, no weights)."""
    from torch import nn

    ld = build_in_memory(family, preset, device="meta", max_length=max_length, weights=False)
    model = ld.model
    widest = max(
        [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] + [ld.hidden_size * 3], default=0
    )
    return {
        "flop_shape": flop_shape(model),
        "n_layers": ld.n_layers,
        "hidden": ld.hidden_size,
        "params": int(sum(p.numel() for p in model.parameters())),
        "widest": int(widest),
        "context": ld.tokenizer.max_length,
        "n_special": ld.layout.n_leading + ld.layout.n_trailing,
    }


# ----------------------------------------------------------------------------------------------------
# worker side (one variant in its own process)


def _rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the peak)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return maxrss() / 2**20


def _autocast(device: Any) -> Any:
    """bf16 autocast on CUDA (torch's defaults, as the peers run it), float32 on CPU."""
    import torch

    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _require_counts(loaded: Any) -> bool:
    """As ``extract``: a tokenizer that takes normalised input says so (scFoundation pre_normalized=T)."""
    return bool(getattr(loaded.tokenizer, "require_counts", True))


def load_model(spec: dict[str, Any]) -> Any:
    """``tiny``: the family's ``load`` of the ``init_checkpoint`` folder; released sizes: built in memory."""
    from cellstrata.engine.device.pipeline import resolve_device
    from cellstrata.engine.models import get_family

    device = resolve_device(spec["device"])
    if spec["checkpoint"]:
        return get_family(spec["family"]).load(spec["checkpoint"], device=device, seed=spec["seed"])
    return build_in_memory(spec["family"], spec["preset"], seed=spec["seed"], device=device)


def _extraction(spec: dict[str, Any], loaded: Any, source: Any, n_cells: int, out: str) -> Any:
    """``extract``'s Extraction for these cells (nothing is written until ``run()``)."""
    from cellstrata.engine.device.pipeline import resolve_device
    from cellstrata.engine.run import Extraction

    return Extraction(
        source,
        loaded,
        out,
        poolings=["all"],
        dtype=spec["dtype"],
        device=resolve_device(spec["device"]),
        max_tokens=spec["max_tokens"],
        chunk_cells=None,
        n_cells=n_cells,
        empty_cells="nan",
        require_counts=_require_counts(loaded),
        compression="zstd",
        overwrite=True,
        progress=False,
    )


def run_forward_only(spec: dict[str, Any], loaded: Any, h5ad: str, n_cells: int, out: str) -> dict[str, Any]:
    """(a): the model's forward alone on cellstrata's batches (its max_tokens, attention layout and precision).

    The cells are read, tokenized and collated first (untimed, reported as ``read_tokenize_s``); the timed
    part is every batch's copy to the device and forward pass with a no-op tap, synchronised once at the
    end, so nothing but the model is measured: the floor for (b).
    """
    import torch

    from cellstrata.engine.device.batching import iter_batches
    from cellstrata.engine.device.pipeline import resolve_device
    from cellstrata.engine.device.pipeline import select_cells as _select
    from cellstrata.engine.input.sources import check_values, open_source

    device = resolve_device(spec["device"])
    fshape = flop_shape(loaded.model)
    _sync(device)
    t0 = time.perf_counter()
    source = open_source(h5ad, gene_column=spec["gene_column"])
    n_cells = min(n_cells, source.n_cells)
    ext = _extraction(spec, loaded, source, n_cells, out)  # resolves max_tokens, attention and chunking
    attention = ext.attention
    packed = attention == "packed"
    max_tokens, chunk = int(ext.max_tokens), int(ext.chunk_cells)
    tok = loaded.tokenizer
    mapping = ext.mapping
    counts = _require_counts(loaded)

    def noop(layer: int, hidden: torch.Tensor) -> None:
        pass

    tokens = padded = 0
    flops = 0.0
    all_batches = []
    for start in range(0, n_cells, chunk):  # untimed: the input side, batched as cellstrata batches it
        block = source.read(start, min(start + chunk, n_cells))
        check_values(block, require_counts=counts)
        toks = tok.tokenize(block, mapping)
        if toks.empty.any():
            toks = _select(toks, np.flatnonzero(~toks.empty))
        for batch in iter_batches(toks, max_tokens, tok.pad_id, tok.pad_value, packed=packed, varlen=ext.varlen):
            all_batches.append(batch)
            tokens += int(batch.lengths.sum())
            padded += batch.n_slots
            flops += forward_flops(fshape, batch.lengths.numpy())
    source.close()
    t_input = time.perf_counter() - t0
    _sync(device)
    t1 = time.perf_counter()
    for batch in all_batches:
        dev = batch.to(device)
        with torch.inference_mode(), ext.autocast():
            loaded.model.forward(dev, noop)
    _sync(device)
    t_forward = time.perf_counter() - t1
    return {
        "cells": n_cells,
        "tokens": tokens,
        "padded_tokens": padded,
        "batches": len(all_batches),
        "max_tokens": max_tokens,
        "attention": attention,
        "model_flops": flops,
        "seconds": t_forward,
        "breakdown": {"read_tokenize_s": t_input, "forward_s": t_forward},
        "forward_seconds": t_forward,
    }


def run_cellstrata(spec: dict[str, Any], loaded: Any, h5ad: str, n_cells: int, out: str) -> dict[str, Any]:
    """(b): ``extract``'s body after the model load; the store's telemetry says where the time went."""
    from cellstrata.engine.device.pipeline import resolve_device
    from cellstrata.engine.input.sources import open_source

    device = resolve_device(spec["device"])
    fshape = flop_shape(loaded.model)
    _sync(device)
    t0 = time.perf_counter()
    source = open_source(h5ad, gene_column=spec["gene_column"])
    try:
        ext = _extraction(spec, loaded, source, min(n_cells, source.n_cells), out)
        store = ext.run()
    finally:
        source.close()
    _sync(device)
    seconds = time.perf_counter() - t0
    attrs = store.attrs
    tele = attrs["telemetry"]
    lengths = np.asarray(store.group["n_tokens"][:], dtype=np.int64)  # real tokens per cell (0: empty)
    return {
        "cells": int(tele["cells"]),
        "tokens": int(tele["tokens"]),
        "padded_tokens": int(tele["padded_tokens"]),
        "batches": int(tele["batches"]),
        "max_tokens": int(ext.max_tokens),
        "attention": ext.attention,
        "model_flops": forward_flops(fshape, lengths),
        "truncated_cells": int(tele["truncated_cells"]),
        "empty_cells": int(tele["empty_cells"]),
        "seconds": seconds,
        "forward_seconds": float(tele["forward_seconds"]),
        "breakdown": {
            "setup_s": seconds - float(tele["seconds"]),  # store creation, Dask client
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


def peer_token_pooling(loaded: Any) -> tuple[str, str] | None:
    """The family's first single-token pooling (``cls`` -> ``first``, scFoundation ``s_token`` -> ``from_end:1``)."""
    for name, op in loaded.pool_ops.items():
        if op == "first" or op.startswith("from_end:"):
            return name, op
    return None  # Geneformer V1: no special tokens, mean only


def _keep_every_layer(hidden_states: list[Any]) -> Any:
    """A tap that keeps every layer's ``[B, S, H]`` until the forward returns (``output_hidden_states``)."""

    def tap(layer: int, hidden: Any) -> None:
        hidden_states.append(hidden)

    return tap


def run_peers(
    spec: dict[str, Any],
    loaded: Any,
    h5ad: str,
    n_cells: int,
    out: str,
    *,
    batch_size: int | None = None,
    one_cell: bool = False,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """(c): the whole input in memory, fixed batches in input order, all hidden states, pool per layer.

    ``one_cell`` is (d), scFoundation's ``get_embedding.py``: the input in memory, then per cell its
    tokens (expressed genes + T + S) and one forward pass of batch size 1, pooled and copied to the host.
    ``budget_s`` (the batch-size sweep) stops after the first batch that ends past that many seconds of
    the loop (at least three batches; the first is not timed) and reports the loop's rate only.
    """
    import anndata as ad
    import torch

    from cellstrata.engine.device.batching import collate
    from cellstrata.engine.device.pipeline import resolve_device
    from cellstrata.engine.device.pipeline import select_cells as _select
    from cellstrata.engine.input.sources import CellBlock

    device = resolve_device(spec["device"])
    fshape = flop_shape(loaded.model)
    _sync(device)
    t0 = time.perf_counter()
    adata = ad.read_h5ad(h5ad)  # embed_data and get_embedding.py read the whole file
    n_cells = min(n_cells, adata.n_obs)
    tok = loaded.tokenizer
    column = spec["gene_column"]
    names = adata.var[column].astype(str).tolist() if column else list(adata.var_names)
    mapping = tok.map_genes(names)
    if one_cell:
        tokens = None
        n_kept = n_cells
    else:
        tokens = tok.tokenize(CellBlock(indices=np.arange(n_cells), X=adata.X[:n_cells]), mapping)
        if tokens.empty.any():
            tokens = _select(tokens, np.flatnonzero(~tokens.empty))
        n_kept = len(tokens)
    t_input = time.perf_counter() - t0
    lead, trail = loaded.layout.n_leading, loaded.layout.n_trailing
    picked = peer_token_pooling(loaded)
    names_out = ["mean"] + ([picked[0]] if picked else [])
    from_end = int(picked[1].split(":")[1]) if picked and picked[1].startswith("from_end:") else 0
    n_layers = loaded.n_layers
    pooled: dict[str, list[list[np.ndarray]]] = {n: [[] for _ in range(n_layers + 1)] for n in names_out}
    batch_size = 1 if one_cell else int(batch_size or spec["peer_batch"])
    n_tokens = padded = batches = cells_done = 0
    flops = 0.0
    t_forward = t_pool = t_tokenize = 0.0
    t_loop = time.perf_counter()
    timed_from, timed_cells = None, 0
    for i in range(0, n_kept, batch_size):
        if one_cell:
            t1 = time.perf_counter()
            one = tok.tokenize(CellBlock(indices=np.arange(i, i + 1), X=adata.X[i : i + 1]), mapping)
            t_tokenize += time.perf_counter() - t1
            if one.empty.all():
                continue
            batch = collate(one, np.arange(1), tok.pad_id, tok.pad_value)
        else:
            batch = collate(tokens, np.arange(i, min(i + batch_size, n_kept)), tok.pad_id, tok.pad_value)
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
            # the gene span of the family's layout: no leading (CLS) or trailing (EOS, T, S) token, no pad
            gene = ((pos[None, :] >= lead) & (pos[None, :] < dev.lengths[:, None] - trail)).to(torch.float32)
            count = gene.sum(1, keepdim=True)
            rows = torch.arange(b, device=device)
            for layer, h in enumerate(hidden_states):
                h = h.float()
                # copy=True: on a CPU run ``.cpu()`` of a view would keep the whole [B, S, H] alive
                mean = (h * gene[:, :, None]).sum(1) / count
                pooled["mean"][layer].append(mean.to("cpu", copy=True).numpy())
                if picked:
                    token = h[rows, dev.lengths - from_end] if from_end else h[:, 0]
                    pooled[picked[0]][layer].append(token.to("cpu", copy=True).numpy())
        del hidden_states
        t_pool += time.perf_counter() - t3
        n_tokens += int(batch.lengths.sum())
        flops += forward_flops(fshape, batch.lengths.numpy())
        padded += b * s
        batches += 1
        cells_done += b
        if budget_s is not None:
            now = time.perf_counter()
            if timed_from is None:
                timed_from = now  # the first batch of a size is its warm-up
            else:
                timed_cells += b
            if batches >= 3 and now - t_loop >= budget_s:
                break
    loop_s = time.perf_counter() - (timed_from or t_loop)
    t4 = time.perf_counter()
    if budget_s is None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        for name, parts in pooled.items():
            np.save(folder / f"{name}.npy", np.stack([np.concatenate(p) for p in parts]))  # [L+1, N, H] float32
    t_write = time.perf_counter() - t4
    _sync(device)
    return {
        "cells": n_cells if budget_s is None else cells_done,
        "tokens": n_tokens,
        "padded_tokens": padded,
        "batches": batches,
        "batch_size": batch_size,
        "model_flops": flops,
        "poolings": names_out,
        "seconds": time.perf_counter() - t0,
        "forward_seconds": t_forward,
        "loop_cells_per_s": (timed_cells / loop_s) if budget_s is not None and timed_cells else None,
        "breakdown": {
            "read_tokenize_s": t_input + t_tokenize,
            "forward_s": t_forward,
            "pool_copy_s": t_pool,
            "write_s": t_write,
        },
    }


def sweep_peer_batch(
    spec: dict[str, Any], loaded: Any, h5ad: str, candidates: list[int], n_cells: int, budget_s: float
) -> dict[str, Any]:
    """Time the peers' approach at each batch size on the first ``n_cells`` cells; the fastest wins."""
    rates: dict[int, float] = {}
    for b in candidates:
        r = run_peers(spec, loaded, h5ad, n_cells, "", batch_size=b, budget_s=budget_s)
        rate = r["loop_cells_per_s"]
        if rate is None:  # fewer than two batches of this size: the whole loop, warm-up included
            rate = r["cells"] / max(r["breakdown"]["forward_s"] + r["breakdown"]["pool_copy_s"], 1e-9)
        rates[int(b)] = float(rate)
    return {"cells": n_cells, "budget_s": budget_s, "cells_per_s": rates, "best": pick_best(rates)}


def pick_best(rates: dict[int, float]) -> int:
    """The batch size with the highest rate; ties go to the smaller batch (less memory)."""
    if not rates:
        msg = "no batch size was measured"
        raise ValueError(msg)
    return min(rates, key=lambda b: (-rates[b], b))


def _run(variant: str, spec: dict[str, Any], loaded: Any, h5ad: str, n: int, out: str) -> dict[str, Any]:
    if variant == "forward":
        return run_forward_only(spec, loaded, h5ad, n, out)
    if variant == "cellstrata":
        return run_cellstrata(spec, loaded, h5ad, n, out)
    if variant == "official":
        return run_peers(spec, loaded, h5ad, n, out, one_cell=True)
    return run_peers(spec, loaded, h5ad, n, out)


def worker(spec_path: str) -> None:
    """One variant: load the model (untimed), warm up, (peers) sweep the batch size, then the timed run."""
    spec = json.loads(Path(spec_path).read_text())
    import warnings

    import torch

    # cellstrata's in-process Dask client asks for a dashboard; a busy default port only moves it elsewhere
    warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    variant, work = spec["variant"], Path(spec["work"])
    warm_out = str(work / (f"warmup-{variant}" + (".zarr" if variant == "cellstrata" else "")))
    for old in (Path(warm_out), Path(spec["out"])):  # an existing store would be resumed: start empty
        remove_owned(old)
    gpu = spec["device"] != "cpu" and torch.cuda.is_available()
    t0 = time.perf_counter()
    loaded = load_model(spec)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    t1 = time.perf_counter()
    if spec["warmup_cells"]:
        _run(variant, spec, loaded, spec["warmup_h5ad"], int(spec["warmup_cells"]), warm_out)
        remove_owned(Path(warm_out))
    warm_s = time.perf_counter() - t1
    sweep = None
    if variant == "peers" and spec.get("peer_sweep"):
        sw = spec["peer_sweep"]
        sweep = sweep_peer_batch(spec, loaded, spec["h5ad"], sw["candidates"], int(sw["cells"]), float(sw["budget_s"]))
        spec["peer_batch"] = sweep["best"]
        print(
            f"  peers' batch sweep on {sw['cells']:,} cells (cells/s): "
            + ", ".join(f"{b}: {r:,.1f}" for b, r in sweep["cells_per_s"].items())
            + f" -> {sweep['best']}",
            flush=True,
        )
    n = int(spec["cells"]) if variant != "official" else int(spec["official_cells"])
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    load_before = loadavg()
    device_peak = None
    res = _run(variant, spec, loaded, spec["h5ad"], n, spec["out"])
    if gpu:
        device_peak = torch.cuda.max_memory_allocated() / 2**20
    res.update(
        variant=variant,
        load_seconds=load_s,
        loaded_from=spec["checkpoint"] or "in memory",
        context=loaded.tokenizer.max_length,
        warmup_cells=int(spec["warmup_cells"]),
        warmup_input=spec["warmup_h5ad"],
        warmup_seconds=warm_s,
        peer_sweep=sweep,
        rss_loaded_mb=rss_loaded,
        rss_before_mb=rss_before,
        peak_rss_mb=maxrss() / 2**20,
        loadavg_1min=[load_before, loadavg()],
        device_peak_mb=device_peak,
        torch_threads=torch.get_num_threads(),
    )
    Path(spec["result"]).write_text(json.dumps(res, indent=2, default=float))


# ----------------------------------------------------------------------------------------------------
# driver side


def prepare_data(kind: str, n_cells: int, work: Path, seed: int) -> dict[str, Any]:
    """The synthetic cells of a size class as an .h5ad, a short-cell warm-up file, and expressed genes per cell."""
    import h5py

    from cellstrata.engine.input.datasets import write_synthetic_h5ad

    p = DATA[kind]
    h5ad = work / f"cells-{kind}.h5ad"
    warm = work / f"warmup-{kind}.h5ad"
    write_synthetic_h5ad(
        h5ad, n_cells, p["n_genes"], seed=seed, genes_per_cell=p["genes_per_cell"], genes_per_cell_sigma=p["sigma"]
    )
    write_synthetic_h5ad(
        warm,
        WARMUP_FILE_CELLS,
        p["n_genes"],
        seed=seed + 1,
        genes_per_cell=WARMUP_GENES_PER_CELL,
        genes_per_cell_sigma=0.2,
    )
    with h5py.File(h5ad, "r") as f:
        expressed = np.diff(f["X"]["indptr"][:])
    return {"h5ad": str(h5ad), "warmup_h5ad": str(warm), "expressed": expressed, **p}


def memory_estimate(shape: dict[str, Any], cells: int, peer_batch: int, longest: int) -> dict[str, float]:
    """Bytes a variant needs at most: the weights (float32) plus the peers' hidden states of one batch."""
    rows = min(cells, peer_batch)
    seq = longest if shape["context"] is None else min(longest, int(shape["context"]))
    weights = 4.0 * shape["params"]
    hidden_states = 4.0 * (shape["n_layers"] + 1) * rows * seq * shape["hidden"]
    work = 4.0 * 2 * rows * seq * shape["widest"]  # the widest intermediate (FFN) and its input
    total = BASE_RSS_BYTES + weights + hidden_states + work
    return {
        "weights_gib": weights / 2**30,
        "activations_gib": (hidden_states + work) / 2**30,
        "total_gib": total / 2**30,
    }


def run_variant(ctx: Any, variant: str, base: dict[str, Any], work: Path) -> dict[str, Any]:
    spec = dict(base, variant=variant)
    spec["out"] = str(work / (f"{variant}-out" + (".zarr" if variant == "cellstrata" else "")))
    spec["result"] = str(work / f"{variant}-result.json")
    spec["work"] = str(work)
    spec_path = work / f"{variant}-spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    remove_owned(Path(spec["result"]))
    t0 = time.perf_counter()
    proc = ctx.Process(target=worker, args=(str(spec_path),), name=f"throughput-{variant}")
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        hint = " (killed: out of memory?)" if proc.exitcode and proc.exitcode < 0 else ""
        msg = f"variant {variant} failed with exit code {proc.exitcode}{hint}"
        raise RuntimeError(msg)
    res = json.loads(Path(spec["result"]).read_text())
    res["process_seconds"] = time.perf_counter() - t0
    res["out"] = spec["out"]
    return res


def _compare(ours: np.ndarray, theirs: np.ndarray, gpu: bool) -> dict[str, Any]:
    """One pooling, [L+1, cells, H]: cellstrata's stored values against a peer's float32 values."""
    diff = np.abs(ours - theirs)
    ulp = np.spacing(np.maximum(np.abs(ours), np.abs(theirs)).astype(np.float16)).astype(np.float32)
    num = (ours.astype(np.float64) * theirs).sum(-1)
    den = np.sqrt((ours.astype(np.float64) ** 2).sum(-1) * (theirs.astype(np.float64) ** 2).sum(-1))
    min_cos = float(np.nanmin(num / np.where(den > 0, den, 1.0)))
    if gpu:
        close = bool(np.array_equal(np.isnan(ours), np.isnan(theirs)) and min_cos >= CHECK_MIN_COSINE_BF16)
    else:
        close = bool(np.all(diff <= CHECK_ULPS * ulp + CHECK_ATOL))
    big = np.maximum(np.abs(ours), np.abs(theirs)) >= ULP_REPORT_MIN
    return {
        "layers": int(ours.shape[0]),
        "max_abs_diff": float(diff.max()),
        "max_float16_ulps": float((diff / ulp)[big].max()) if big.any() else 0.0,
        "max_abs_diff_small_values": float(diff[~big].max()) if (~big).any() else 0.0,
        "max_abs_value": float(np.abs(theirs).max()),
        "last_layer_max_abs_diff": float(diff[-1].max()),
        "min_cosine": min_cos,
        "close": close,
    }


def check_outputs(results: dict[str, dict[str, Any]], n_cells: int, gpu: bool = False) -> dict[str, Any]:
    """(a) ran cellstrata's batches; (b) and (c) (and (d)) agree on every pooling the peer made, at every layer.

    CPU (float32 forward): within one float16 step. CUDA (bfloat16 autocast forward): cosine similarity of
    every (layer, cell) vector at least ``CHECK_MIN_COSINE_BF16``; the float16 ULPs are reported either way.
    The model FLOPs counted from the real token lengths must be the same in (a), (b) and (c).
    """
    import cellstrata as cs

    a, b, c = (results[v] for v in ("forward", "cellstrata", "peers"))
    same_batches = all(a[k] == b[k] for k in ("tokens", "padded_tokens", "batches"))
    same_flops = bool(np.isclose(a["model_flops"], b["model_flops"], rtol=1e-9)) and bool(
        np.isclose(b["model_flops"], c["model_flops"], rtol=1e-9)
    )
    store = cs.open_store(b["out"])
    cells = np.unique(np.linspace(0, n_cells - 1, min(CHECK_CELLS, n_cells)).round().astype(int))
    report: dict[str, Any] = {
        "forward_same_tokens_and_batches_as_cellstrata": bool(same_batches),
        "peers_same_tokens_as_cellstrata": bool(b["tokens"] == c["tokens"]),
        "same_model_flops": same_flops,
        "cells_compared": [int(i) for i in cells],
        "poolings_compared": list(c["poolings"]),
        "tolerance": f"cosine >= {CHECK_MIN_COSINE_BF16:g} per layer and cell (bfloat16 forward)"
        if gpu
        else f"{CHECK_ULPS:g} float16 ULP of the value + {CHECK_ATOL:g}",
        "ulps_reported_for_values_above": ULP_REPORT_MIN,
    }
    ok = same_batches and report["peers_same_tokens_as_cellstrata"] and same_flops
    for name in c["poolings"]:
        ours = np.asarray(store.group["pooled"][name][:, cells, :], dtype=np.float32)
        theirs = np.load(Path(c["out"]) / f"{name}.npy", mmap_mode="r")[:, cells, :].astype(np.float32)
        report[name] = _compare(ours, theirs, gpu)
        ok = ok and report[name]["close"]
    d = results.get("official")
    if d is not None:
        # (d) covered the first cells (none of them empty in the synthetic data): compare a sample of them
        n_d = int(d["cells"])
        cells_d = np.unique(np.linspace(0, n_d - 1, min(CHECK_CELLS, n_d)).round().astype(int))
        report["official_cells_compared"] = [int(i) for i in cells_d]
        for name in d["poolings"]:
            ours = np.asarray(store.group["pooled"][name][:, cells_d, :], dtype=np.float32)
            theirs = np.load(Path(d["out"]) / f"{name}.npy", mmap_mode="r")[:, cells_d, :].astype(np.float32)
            report[f"official_{name}"] = _compare(ours, theirs, gpu)
            ok = ok and report[f"official_{name}"]["close"]
    report["ok"] = bool(ok)
    return report


def summarize(
    shape: dict[str, Any], results: dict[str, dict[str, Any]], ceilings: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    rows = []
    for v in VARIANTS:
        if v not in results:
            continue
        r = results[v]
        s = max(r["seconds"], 1e-9)
        rows.append(
            {
                "family": shape["family"],
                "preset": shape["preset"],
                "variant": LABELS[v],
                "key": v,
                "cells": r["cells"],
                "tokens": r["tokens"],
                "padding": 1 - r["tokens"] / max(r["padded_tokens"], 1),
                "batches": r["batches"],
                "batch_size": r.get("batch_size"),
                "max_tokens": r.get("max_tokens"),
                "attention": r.get("attention"),
                "seconds": r["seconds"],
                "forward_seconds": r.get("forward_seconds"),
                "load_seconds": r["load_seconds"],
                "warmup_seconds": r.get("warmup_seconds"),
                "cells_per_s": r["cells"] / s,
                "tokens_per_s": r["tokens"] / s,
                "model_flops": r.get("model_flops"),
                **{f"model_{k}": x for k, x in utilisation(r.get("model_flops") or 0.0, s, ceilings).items()},
                "peak_rss_mb": r["peak_rss_mb"],
                "rss_growth_mb": r["peak_rss_mb"] - r["rss_before_mb"],
                "device_peak_mb": r.get("device_peak_mb"),
                "loadavg_1min": r.get("loadavg_1min"),
            }
        )
    return rows


def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """b/a, c/b, b/c, b/d (tokens/s: (d) runs the first cells only), peak RSS and GPU memory c/b."""
    by = {r["key"]: r for r in rows}
    a, b, c, d = (by.get(k) for k in ("forward", "cellstrata", "peers", "official"))
    out: dict[str, float | None] = {
        "b_over_a": b["tokens_per_s"] / a["tokens_per_s"],
        "c_over_b": c["tokens_per_s"] / b["tokens_per_s"],
        "b_over_c": b["tokens_per_s"] / c["tokens_per_s"],
        "b_over_d": None if d is None else b["tokens_per_s"] / d["tokens_per_s"],
        "rss_c_over_b": c["peak_rss_mb"] / b["peak_rss_mb"],
        "device_c_over_b": None,
    }
    if b.get("device_peak_mb") and c.get("device_peak_mb"):
        out["device_c_over_b"] = c["device_peak_mb"] / b["device_peak_mb"]
    return out


def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def _context_text(shape: dict[str, Any]) -> str:
    if shape["context"] is None:
        longest = shape.get("longest_tokens")
        return "all + 2" + (f" (≤ {longest:,})" if longest else "")
    return f"{int(shape['context']):,}"


def _opt(x: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _rate_text(r: dict[str, Any], gpu: bool) -> str:
    """Model TFLOP/s (GPU) or GFLOP/s (CPU) with the MFU / fraction of the measured matmul rate."""
    tf = r.get("model_tflops")
    if not tf:
        return "–"
    text = f"{tf:,.1f} TF/s" if gpu else f"{tf * 1e3:,.1f} GF/s"
    parts = []
    if r.get("model_mfu") is not None:
        parts.append(f"MFU {100 * r['model_mfu']:.0f}%")
    if r.get("model_of_matmul") is not None:
        parts.append(f"{100 * r['model_of_matmul']:.0f}% of matmul")
    return text + (f" ({', '.join(parts)})" if parts else "")


def summary_table(shapes: list[dict[str, Any]]) -> str:
    """The fixed-format table: one row per shape (skipped shapes say so)."""
    gpu = any(sh.get("device", "cpu").startswith("cuda") for sh in shapes)
    lines = [
        "| family | preset | layers × hidden | context | cells | real tokens | padding b / c "
        "| tok/s (a) forward | tok/s (b) cellstrata | tok/s (c) peers | peer batch | b/a | b/c "
        "| model FLOP/s (b) | peak RSS c/b" + (" | GPU peak MB b / c" if gpu else "") + " | check |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|" + ("--:|" if gpu else "") + "---|",
    ]
    for sh in shapes:
        head = f"| {sh['family']} | {sh['preset']} | {sh['n_layers']} × {sh['hidden']:,} | {_context_text(sh)} |"
        if sh.get("skipped"):
            lines.append(head + " skipped |" + " |" * (11 if gpu else 10) + " " + sh["skipped_short"] + " |")
            continue
        by = {r["key"]: r for r in sh["rows"]}
        a, b, c = by["forward"], by["cellstrata"], by["peers"]
        q = sh["ratios"]
        sweep = " (swept)" if sh["results"]["peers"].get("peer_sweep") else ""
        line = (
            head + f" {b['cells']:,} | {b['tokens']:,} | {100 * b['padding']:.1f}% / {100 * c['padding']:.1f}% | "
            f"{_fmt(a['tokens_per_s'], 0)} | {_fmt(b['tokens_per_s'], 0)} | {_fmt(c['tokens_per_s'], 0)} | "
            f"{c['batch_size']}{sweep} | {q['b_over_a']:.2f} | {q['b_over_c']:.2f} | {_rate_text(b, gpu)} | "
            f"{q['rss_c_over_b']:.2f} |"
        )
        if gpu:
            line += f" {_fmt(b['device_peak_mb'] or 0, 0)} / {_fmt(c['device_peak_mb'] or 0, 0)} |"
        lines.append(line + f" {'ok' if sh['check']['ok'] else 'MISMATCH'} |")
    return "\n".join(lines) + "\n"


def official_table(shapes: list[dict[str, Any]]) -> str:
    """(d), scFoundation's one cell at a time, against cellstrata (b); empty when no shape ran it."""
    rows = [sh for sh in shapes if not sh.get("skipped") and "official" in sh["results"]]
    if not rows:
        return ""
    gpu = any(sh.get("device", "cpu").startswith("cuda") for sh in rows)
    lines = [
        "| family | preset | cells (d) | tok/s (b) cellstrata | tok/s (d) official | cells/s (b) | cells/s (d) | b/d "
        "| model FLOP/s (d) | peak RSS d/b |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    for sh in rows:
        by = {r["key"]: r for r in sh["rows"]}
        b, d = by["cellstrata"], by["official"]
        lines.append(
            f"| {sh['family']} | {sh['preset']} | {d['cells']:,} | {_fmt(b['tokens_per_s'], 0)} | "
            f"{_fmt(d['tokens_per_s'], 0)} | {_fmt(b['cells_per_s'], 1)} | {_fmt(d['cells_per_s'], 1)} | "
            f"{sh['ratios']['b_over_d']:.2f} | {_rate_text(d, gpu)} | {d['peak_rss_mb'] / b['peak_rss_mb']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def sweep_table(shapes: list[dict[str, Any]]) -> str:
    """The peers' batch-size sweep per shape (cells/s on the first cells); empty when none ran."""
    lines = []
    for sh in shapes:
        if sh.get("skipped"):
            continue
        sw = sh["results"]["peers"].get("peer_sweep")
        if not sw:
            continue
        rates = ", ".join(f"{b}: {r:,.1f}" for b, r in sw["cells_per_s"].items())
        lines.append(f"| {sh['family']} | {sh['preset']} | {sw['cells']:,} | {rates} | {sw['best']} |")
    if not lines:
        return ""
    head = ["| family | preset | sweep cells | batch: cells/s | chosen |", "|---|---|--:|---|--:|"]
    return "\n".join(head + lines) + "\n"


# issue 7's targets, checked against the measured values of every shape (never hard-coded results)
TARGETS = {
    "overhead": {"cuda": 0.95, "cpu": 0.90},  # b/a: extraction costs at most 5% (GPU) / 10% (CPU) over forward only
    "peers": {"cuda": 3.0, "cpu": 1.5},  # b/c
    "mfu_1b": 0.40,  # Tahoe-X1 1b extraction (b) on an H100 / H200
}


def targets(shapes: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """One entry per target and shape: the measured value and whether it is met (None: not measurable)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    out = []
    for sh in shapes:
        if sh.get("skipped"):
            continue
        q = sh["ratios"]
        name = f"{sh['family']} {sh['preset']}"
        lim = TARGETS["overhead"][kind]
        out.append(
            {
                "target": f"extraction overhead over forward only ≤ {100 * (1 - lim):.0f}% (b/a ≥ {lim:.2f})",
                "shape": name,
                "value": f"b/a {q['b_over_a']:.2f}",
                "met": q["b_over_a"] >= lim,
            }
        )
        lim = TARGETS["peers"][kind]
        out.append(
            {
                "target": f"cellstrata ≥ {lim:g}× the peers' approach at its best batch (b/c)",
                "shape": name,
                "value": f"b/c {q['b_over_c']:.2f}",
                "met": q["b_over_c"] >= lim,
            }
        )
        if sh["family"] == "tahoe-x1" and sh["preset"] == "1b":
            b = next(r for r in sh["rows"] if r["key"] == "cellstrata")
            mfu = b.get("model_mfu")
            out.append(
                {
                    "target": f"Tahoe-X1 1b extraction at ≥ {100 * TARGETS['mfu_1b']:.0f}% MFU on an H100 / H200",
                    "shape": name,
                    "value": "not an H100 / H200" if mfu is None else f"MFU {100 * mfu:.1f}%",
                    "met": None if mfu is None else mfu >= TARGETS["mfu_1b"],
                }
            )
    return out


def targets_table(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return ""
    lines = ["| target | shape | measured | met |", "|---|---|--:|---|"]
    for e in entries:
        met = "n/a" if e["met"] is None else ("met" if e["met"] else "not met")
        lines.append(f"| {e['target']} | {e['shape']} | {e['value']} | {met} |")
    return "\n".join(lines) + "\n"


def detail_table(shapes: list[dict[str, Any]]) -> str:
    gpu = any(r["device_peak_mb"] is not None for sh in shapes if not sh.get("skipped") for r in sh["rows"])
    head = (
        "| family | preset | variant | cells | tokens | padding | batches | batch / budget | load s | warm-up s "
        "| seconds | in forward (s) | cells/s | tokens/s | model FLOP/s | peak RSS MB (growth) |"
    )
    sep = "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|"
    if gpu:
        head += " GPU peak MB |"
        sep += "--:|"
    lines = [head, sep]
    for sh in shapes:
        if sh.get("skipped"):
            continue
        for r in sh["rows"]:
            fwd = "" if r["forward_seconds"] is None else _fmt(r["forward_seconds"])
            if r["key"] in ("forward", "cellstrata"):
                budget = f"{r['max_tokens']:,} tokens, {r['attention']}" if r.get("max_tokens") else ""
            else:
                budget = f"{r['batch_size']} cells"
            line = (
                f"| {r['family']} | {r['preset']} | {r['variant']} | {r['cells']:,} | {r['tokens']:,} | "
                f"{100 * r['padding']:.1f}% | {r['batches']} | {budget} | {_fmt(r['load_seconds'])} | "
                f"{_fmt(r['warmup_seconds'] or 0)} | {_fmt(r['seconds'])} | "
                f"{fwd} | {_fmt(r['cells_per_s'], 2)} | {_fmt(r['tokens_per_s'], 0)} | {_rate_text(r, gpu)} | "
                f"{_fmt(r['peak_rss_mb'], 0)} (+{_fmt(r['rss_growth_mb'], 0)}) |"
            )
            if gpu:
                line += f" {_fmt(r['device_peak_mb'] or 0, 0)} |"
            lines.append(line)
    return "\n".join(lines) + "\n"


def flops_table(shapes: list[dict[str, Any]], ceilings: dict[str, Any] | None) -> str:
    """FLOPs per cell (median cell of the data) per shape, and the ceilings measured in this run."""
    lines = []
    if ceilings:
        mm, cp = ceilings["matmul"], ceilings["copy"]
        gpu = ceilings["device_name"] != "cpu"
        rate = f"{mm['tflops']:,.1f} TFLOP/s" if gpu else f"{mm['tflops'] * 1e3:,.1f} GFLOP/s"
        lines.append(
            f"Measured on this device: matmul {mm['dtype']} {rate} (best of "
            + ", ".join(f"{r['n']:,}³" for r in mm["runs"])
            + f"), copy {cp['gb_per_s']:,.0f} GB/s (read + write)"
            + (
                f"; data-sheet dense bf16 peak {ceilings['peak_bf16_tflops']:,.1f} TFLOP/s"
                if ceilings.get("peak_bf16_tflops")
                else ""
            )
            + ".\n"
        )
    lines += [
        "| family | preset | median tokens / cell | GFLOP / cell (median cell) | attention share |",
        "|---|---|--:|--:|--:|",
    ]
    for sh in shapes:
        f = sh.get("flops")
        if not f:
            continue
        lines.append(
            f"| {sh['family']} | {sh['preset']} | {f['median_tokens']:,} | {f['gflops_per_cell']:,.4f} | "
            f"{100 * f['attention_share']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def inputs_table(shapes: list[dict[str, Any]]) -> str:
    lines = [
        "| family | preset | parameters | genes by | expressed genes / cell: median (p10–p90, max) | context "
        "| cells cut to context | model | output check |",
        "|---|---|--:|---|---|--:|--:|---|---|",
    ]
    for sh in shapes:
        e = sh["expressed"]
        by = sh["gene_column"] or "symbol (var_names)"
        model = "skipped" if sh.get("skipped") else sh["model_source"]
        if sh.get("skipped"):
            cut, agree = "", sh["skipped_short"]
        else:
            cut = f"{sh['truncated_cells']:,} of {sh['cells']:,}"
            ck = sh["check"]
            ulps = ", ".join(f"{n} ≤ {ck[n]['max_float16_ulps']:.2f}" for n in ck["poolings_compared"])
            cos = min(ck[n].get("min_cosine", 1.0) for n in ck["poolings_compared"])
            agree = (
                f"{'yes' if ck['ok'] else 'NO'}: {ulps} float16 ULP, min cosine {cos:.6f} "
                f"({len(ck['cells_compared'])} cells × {ck['mean']['layers']} layers)"
            )
        lines.append(
            f"| {sh['family']} | {sh['preset']} | {sh['params'] / 1e6:,.1f} M | {by} | {e['median']:,.0f} "
            f"({e['p10']:,.0f}–{e['p90']:,.0f}, {e['max']:,}) | {_context_text(sh)} | {cut} | {model} | {agree} |"
        )
    return "\n".join(lines) + "\n"


def skipped_text(shapes: list[dict[str, Any]]) -> str:
    skipped = [sh for sh in shapes if sh.get("skipped")]
    if not skipped:
        return ""
    return "".join(f"- {sh['family']} {sh['preset']}: {sh['skipped']}\n" for sh in skipped)


def parse_presets(
    values: list[str] | None, families: list[str], quick: bool, defaults: dict[str, list[str]] | None = None
) -> dict[str, list[str]]:
    """``scgpt=tiny,whole-human,tahoe-x1=tiny,70m`` (a name with ``=`` starts a family); defaults per family."""
    chosen: dict[str, list[str]] = {}
    current = None
    for value in values or []:
        for part in (p.strip() for p in value.replace(";", ",").split(",")):
            if not part:
                continue
            if "=" in part:
                current, part = (x.strip() for x in part.split("=", 1))
                chosen.setdefault(current, [])
            if current is None:
                msg = f"--presets: {part!r} has no family; write FAMILY=PRESET,PRESET (e.g. tahoe-x1=tiny,70m)"
                raise ValueError(msg)
            if part:
                chosen[current].append(part)
    out = {}
    for fam in families:
        if fam in chosen:
            out[fam] = chosen[fam]
        else:
            out[fam] = ["tiny"] if quick else list((defaults or CELLS)[fam])
    unused = [f for f in chosen if f not in families]
    if unused:
        msg = f"--presets names {', '.join(unused)}, which --models does not include"
        raise ValueError(msg)
    return out


def parse_cells(text: str | None) -> dict[str, int]:
    """``tiny=3000,tahoe-x1:1b=2,whole-human=64``: keys are PRESET (every family) or FAMILY:PRESET."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        if "=" not in part:
            msg = f"--cells: {part!r} is not KEY=N (KEY = PRESET or FAMILY:PRESET)"
            raise ValueError(msg)
        k, v = part.split("=", 1)
        out[k.strip()] = int(v)
    return out


@dataclass
class Suite:
    """What every step of a run shares: the options, the device, the work folder and the machine."""

    args: argparse.Namespace
    argv: list[str] | None
    device: str
    families: list[str]
    selection: list[tuple[str, str, int]]
    warmup: int
    root: Path = Path()
    own_tmp: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    mem_total: float = float("inf")
    device_total: float | None = None
    ceilings: dict[str, Any] | None = None
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    builder_checks: list[dict[str, Any]] = field(default_factory=list)
    shapes: list[dict[str, Any]] = field(default_factory=list)
    ok: bool = True
    t_start: float = 0.0

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def kind_dev(self) -> str:
        return "cuda" if self.gpu else "cpu"


def _add_shape_options(ap: argparse.ArgumentParser) -> None:
    """What is measured: families, presets, cells, device, the budgets of cellstrata and the peers."""
    ap.add_argument(
        "--models",
        default=",".join(FAMILIES),
        help=f"comma list of model families (default: {','.join(FAMILIES)})",
    )
    ap.add_argument(
        "--presets",
        action="append",
        default=None,
        help="presets per family, e.g. 'tahoe-x1=tiny,70m,1b' (repeatable, or 'scgpt=tiny,tahoe-x1=tiny,70m');\n"
        "families not named run their defaults: "
        + "; ".join(f"{f}={','.join(p)}" for f, p in CELLS.items())
        + " (--quick: tiny)",
    )
    ap.add_argument(
        "--cells",
        default=None,
        help="cells per shape: 'tiny=3000,tahoe-x1:1b=2' (KEY = PRESET or FAMILY:PRESET); defaults:\n"
        + "; ".join(f"{f}: " + ", ".join(f"{p}={n}" for p, n in c.items()) for f, c in CELLS.items())
        + f" (--quick: {QUICK_CELLS} per tiny shape)",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run under a minute: the tiny shapes, few cells")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--max-tokens", type=int, default=None, help="cellstrata's batch budget (default: its own)")
    ap.add_argument(
        "--peer-batch",
        type=int,
        default=None,
        help="peers' cells per batch, no sweep (default: the fastest of a sweep, CPU "
        + ", ".join(map(str, PEER_SWEEP["cpu"]))
        + "; CUDA "
        + ", ".join(map(str, PEER_SWEEP["cuda"]))
        + "; embed_data uses 64)",
    )
    ap.add_argument(
        "--official-cells",
        type=int,
        default=None,
        help="cells of (d), scFoundation's one cell at a time (the first of the input; default "
        f"{OFFICIAL_CELLS['cpu']} on CPU, {OFFICIAL_CELLS['cuda']:,} on CUDA, at most the shape's cells)",
    )


def _add_run_options(ap: argparse.ArgumentParser) -> None:
    """How it is measured and where the files go: ceilings, warm-up, threads, repeats, memory, folders."""
    ap.add_argument("--no-roofline", action="store_true", help="do not measure the matmul rate and copy bandwidth")
    ap.add_argument(
        "--warmup-cells",
        type=int,
        default=None,
        help=f"cells of the untimed warm-up run per variant (CPU: short cells of a separate file, default "
        f"{WARMUP_CELLS}, --quick {QUICK_WARMUP_CELLS}; CUDA: the first cells of the same input, default "
        f"{100 * CUDA_WARMUP_SHARE:.0f}%% of the shape's cells, at least {CUDA_WARMUP_MIN})",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every variant (default: torch's)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"runs per variant, round robin; the fastest is reported (default: {REPEATS['tiny']} for tiny, "
        f"{REPEATS['released']} for released sizes; --quick 1)",
    )
    ap.add_argument(
        "--mem-fraction",
        type=float,
        default=MEM_FRACTION,
        help=f"skip a shape whose weights + activations would exceed this fraction of the machine's memory "
        f"(default {MEM_FRACTION})",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workdir",
        default=None,
        help="keep inputs and outputs here: a new or empty folder, or one an earlier run made "
        "(default: a temporary folder)",
    )
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON and Markdown go")
    ap.add_argument("--no-save", action="store_true", help="print only")


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    _add_shape_options(ap)
    _add_run_options(ap)
    return ap, ap.parse_args(argv)


def plan(ap: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> Suite:
    """The device and the (family, preset, cells) shapes to run; a bad option stops here with its usage line."""
    from cellstrata.engine.device.pipeline import resolve_device
    from cellstrata.engine.models import get_family

    device = str(resolve_device(args.device))
    gpu = device.startswith("cuda")
    families = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    try:
        presets = parse_presets(args.presets, families, args.quick, CUDA_PRESETS if gpu else CELLS)
        cells_opt = parse_cells(args.cells)
    except ValueError as exc:
        ap.error(str(exc))
    selection: list[tuple[str, str, int]] = []
    for fam in families:
        for preset in presets[fam]:
            if preset not in get_family(fam).presets:
                ap.error(f"{fam} has no preset {preset!r}; choose from {', '.join(get_family(fam).presets)}")
            n = cells_opt.get(f"{fam}:{preset}") or cells_opt.get(preset)
            if n is None:
                n = QUICK_CELLS if args.quick and preset == "tiny" else (CUDA_CELLS if gpu else CELLS)[fam].get(preset)
            if n is None:
                ap.error(f"no default cell count for {fam} {preset}: pass --cells {fam}:{preset}=N")
            selection.append((fam, preset, int(n)))
    warmup = (
        args.warmup_cells if args.warmup_cells is not None else (QUICK_WARMUP_CELLS if args.quick else WARMUP_CELLS)
    )
    return Suite(args=args, argv=argv, device=device, families=families, selection=selection, warmup=warmup)


def open_suite(s: Suite) -> None:
    """The work folder, the machine's facts and load, the ceilings (unless --no-roofline), the device's memory."""
    args = s.args
    s.own_tmp = args.workdir is None
    # the work folder is marked as the benchmark's own: only then are the fixed names in it replaced
    s.root = make_temp_dir("cellstrata-bench-") if s.own_tmp else make_owned_dir(Path(args.workdir))
    info = s.info = torch_machine_info(s.device)
    s.mem_total = meminfo_gib("MemTotal") or float("inf")
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpu_model'] or info['processor']}), {info['memory_gb']} GiB, "
        f"torch {info['torch_version']} with {args.threads or info['torch_threads']} threads, device "
        f"{info['device_name']}"
    )
    print("random weights: throughput only (speed does not depend on the weights); model loading is not timed")
    load = loadavg()
    if load is not None and info["cpu_count"] and load > info["cpu_count"]:
        print(f"WARNING: load average {load} exceeds the {info['cpu_count']} CPUs: other work competes for the cores")
    s.t_start = time.perf_counter()  # the total: ceilings, inputs, checks and every variant
    if not args.no_roofline:
        from .roofline import measure as measure_ceilings

        ceilings = s.ceilings = measure_ceilings(s.device, quick=args.quick)
        mm = ceilings["matmul"]
        print(
            f"ceilings: matmul {mm['dtype']} {mm['tflops'] * (1 if s.gpu else 1e3):,.1f} "
            f"{'TFLOP/s' if s.gpu else 'GFLOP/s'}, "
            f"copy {ceilings['copy']['gb_per_s']:,.0f} GB/s"
            + (
                f", data-sheet bf16 peak {ceilings['peak_bf16_tflops']:,.1f} TFLOP/s"
                if ceilings["peak_bf16_tflops"]
                else ""
            )
            + f" ({ceilings['seconds']:.1f} s)"
        )
    if s.gpu:
        import torch

        s.device_total = torch.cuda.get_device_properties(0).total_memory / 2**30


def prepare_inputs(s: Suite) -> None:
    """One input file per size class (each shape reads its first cells), plus short warm-up cells."""
    for kind in ("tiny", "released"):
        need = [n for f, p, n in s.selection if size_class(p) == kind]
        if need:
            t0 = time.perf_counter()
            s.data[kind] = prepare_data(kind, max(need), s.root, s.args.seed)
            print(
                f"inputs ({kind}): {max(need):,} cells x {DATA[kind]['n_genes']:,} genes, "
                f"{time.perf_counter() - t0:.1f} s"
            )


def check_builders(s: Suite) -> None:
    """Tiny checkpoints (the families' real files and load path) and the in-memory builder's check against them."""
    from cellstrata.engine.models import get_family

    seed = s.args.seed
    for fam in dict.fromkeys(f for f, _, _ in s.selection):
        t0 = time.perf_counter()
        folder = get_family(fam).init_checkpoint("tiny", s.root / f"ckpt-{fam}-tiny", seed=seed)
        s.checkpoints[fam] = str(folder)
        s.builder_checks.append(check_builder(fam, "tiny", folder, seed))
        if fam == "geneformer" and any(f == fam and p == "v1-10m" for f, p, _ in s.selection):
            v1 = get_family(fam).init_checkpoint("v1-10m", s.root / "ckpt-geneformer-v1-10m", seed=seed)
            s.builder_checks.append(check_builder(fam, "v1-10m", v1, seed))
            remove_owned(v1)
        verdict = ", ".join(
            f"{bc['preset']} {'ok' if bc['ok'] else 'DIFFERS'}" for bc in s.builder_checks if bc["family"] == fam
        )
        print(
            f"{fam}: tiny checkpoint written; in-memory builder vs init_checkpoint + load: {verdict} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    for bc in s.builder_checks:
        if not bc["ok"]:
            bad = [k for k, v in bc.items() if v is False]
            print(f"WARNING: in-memory {bc['family']} {bc['preset']} differs from init_checkpoint + load: {bad}")
            s.ok = False


def describe_input(s: Suite, fam: str, preset: str, n: int) -> dict[str, Any]:
    """A shape's model, its cells' lengths and its model FLOPs per median cell."""
    d = s.data[size_class(preset)]
    expressed = d["expressed"][:n]
    shape = {"family": fam, "preset": preset, "cells": n, "gene_column": GENE_COLUMN[fam]}
    shape.update(describe_shape(fam, preset, None))
    shape["longest_tokens"] = int(expressed.max()) + shape["n_special"]
    shape["expressed"] = {
        "median": float(np.median(expressed)),
        "p10": float(np.percentile(expressed, 10)),
        "p90": float(np.percentile(expressed, 90)),
        "max": int(expressed.max()),
    }
    shape["data"] = {k: v for k, v in d.items() if k != "expressed"}
    shape["device"] = s.device
    median_len = float(np.median(expressed)) + shape["n_special"]
    if shape["context"] is not None:
        median_len = min(median_len, float(shape["context"]))
    per_cell = forward_flops(shape["flop_shape"], [median_len])
    linear = forward_flops({**shape["flop_shape"], "hidden": 0}, [median_len])
    shape["flops"] = {
        "median_tokens": round(median_len),
        "gflops_per_cell": per_cell / 1e9,
        "attention_share": 1 - linear / per_cell,
    }
    return shape


def peer_batches(s: Suite, shape: dict[str, Any], n: int) -> tuple[list[int], list[int]]:
    """The peers' batch sizes, forced or the sweep's candidates, and those of them that fit the memory; the
    shape's ``memory_estimate`` is set to the largest that fits (else the smallest candidate)."""
    limit = s.args.mem_fraction * s.mem_total
    if s.args.peer_batch:
        candidates = [int(s.args.peer_batch)]
    else:
        cand = PEER_SWEEP[s.kind_dev]
        candidates = sorted({b for b in cand if b < n} | {min(n, max(cand))})
    fits = []
    for b in candidates:
        e = memory_estimate(shape, n, b, shape["longest_tokens"])
        host_ok = e["total_gib"] <= limit if not s.gpu else (e["weights_gib"] + 0.6 <= limit)
        dev_ok = s.device_total is None or e["weights_gib"] + e["activations_gib"] <= 0.8 * s.device_total
        if host_ok and dev_ok:
            fits.append(b)
    shape["memory_estimate"] = memory_estimate(
        shape, n, (fits or candidates)[-1 if fits else 0], shape["longest_tokens"]
    )
    return candidates, fits


def print_shape(shape: dict[str, Any], tag: str) -> None:
    est, n = shape["memory_estimate"], shape["cells"]
    print(
        f"{tag} {shape['n_layers']} layers x {shape['hidden']}, {shape['params'] / 1e6:,.1f} M parameters, "
        f"context {_context_text(shape)}; {n:,} cells, expressed genes per cell median "
        f"{shape['expressed']['median']:,.0f} (p10 {shape['expressed']['p10']:,.0f}, p90 "
        f"{shape['expressed']['p90']:,.0f}); {shape['flops']['gflops_per_cell']:,.3f} GFLOP per median cell; "
        f"needs ~{est['total_gib']:.1f} GiB ({est['weights_gib']:.1f} GiB weights)"
    )


def mark_skipped(s: Suite, shape: dict[str, Any], candidates: list[int], tag: str) -> None:
    """A shape whose smallest batch does not fit the memory: why, at length and in short."""
    est, n = shape["memory_estimate"], shape["cells"]
    limit = s.args.mem_fraction * s.mem_total
    shape["skipped"] = (
        f"{shape['params'] / 1e9:.2f} B parameters = {est['weights_gib']:.1f} GiB of float32 weights; "
        f"with {min(n, candidates[0])} cell(s) of hidden states and the process ~{est['total_gib']:.1f} "
        f"GiB, above {s.args.mem_fraction:.0%} of this machine's {s.mem_total:.1f} GiB (--mem-fraction)"
        + (f" or 80% of the device's {s.device_total:.0f} GiB" if s.device_total else "")
    )
    shape["skipped_short"] = f"skipped: ~{est['total_gib']:.1f} GiB > {limit:.1f} GiB"
    print(f"{tag} SKIPPED: {shape['skipped']}\n")


def variant_settings(s: Suite, fam: str, preset: str, n: int, fits: list[int]) -> dict[str, Any]:
    """What every variant process of a shape is given: input, warm-up, checkpoint, device, budgets, sweep."""
    args, gpu, kind_dev = s.args, s.gpu, s.kind_dev
    d = s.data[size_class(preset)]
    sweep_cells = min(n, PEER_SWEEP_CELLS["quick" if args.quick and not gpu else kind_dev])
    # few cells (CPU, the billion-parameter shapes): one batch of all of them, no sweep
    sweep = None
    if len(fits) > 1 and n >= 8:
        budget = PEER_SWEEP_SECONDS / (2 if args.quick else 1)
        sweep = {"candidates": fits, "cells": sweep_cells, "budget_s": budget}
    if gpu:  # the first cells of the same input: its real lengths and batch shapes
        warm_h5ad = d["h5ad"]
        warm_cells = (
            args.warmup_cells
            if args.warmup_cells is not None
            else min(n, max(CUDA_WARMUP_MIN, int(CUDA_WARMUP_SHARE * n)))
        )
    else:
        warm_h5ad, warm_cells = d["warmup_h5ad"], s.warmup
    return {
        "family": fam,
        "preset": preset,
        "cells": n,
        "official_cells": min(
            n, args.official_cells or OFFICIAL_CELLS["quick" if args.quick and not gpu else kind_dev]
        ),
        "h5ad": d["h5ad"],
        "warmup_h5ad": warm_h5ad,
        "gene_column": GENE_COLUMN[fam],
        "checkpoint": s.checkpoints[fam] if preset == "tiny" else None,
        "device": s.device,
        "dtype": "float16",
        "max_tokens": args.max_tokens,
        "peer_batch": fits[-1],
        "peer_sweep": sweep,
        "warmup_cells": warm_cells,
        "threads": args.threads,
        "seed": args.seed,
    }


def run_round_robin(
    ctx: Any, base: dict[str, Any], work: Path, variants: list[str], repeats: int, tag: str
) -> dict[str, dict[str, Any]]:
    """Every variant ``repeats`` times, in turn, so slow phases of a busy machine hit each; the fastest run of
    each variant, with every run's seconds in ``all_seconds``."""
    results: dict[str, dict[str, Any]] = {}
    for rep in range(repeats):
        for v in variants:
            r = run_variant(ctx, v, base, work)
            la = r["loadavg_1min"]
            print(
                f"{tag} {LABELS[v]:<32} {r['seconds']:8.1f} s  {r['cells'] / r['seconds']:9.2f} cells/s  "
                f"{r['tokens'] / r['seconds']:9.0f} tokens/s  peak RSS {r['peak_rss_mb']:7.0f} MB"
                + (f"  GPU {r['device_peak_mb']:,.0f} MB" if r.get("device_peak_mb") else "")
                + f"  (load {r['load_seconds']:.1f} s, warm-up {r['warmup_seconds']:.1f} s, process "
                f"{r['process_seconds']:.0f} s, load avg {la[0]} -> {la[1]}"
                + (f", repeat {rep + 1}/{repeats})" if repeats > 1 else ")"),
                flush=True,
            )
            seconds = [*results.get(v, {}).get("all_seconds", []), r["seconds"]]
            if v not in results or r["seconds"] < results[v]["seconds"]:
                results[v] = r
            results[v]["all_seconds"] = seconds
    return results


def print_checks(shape: dict[str, Any], results: dict[str, dict[str, Any]], gpu: bool, tag: str) -> None:
    """The output check and cellstrata's telemetry of a measured shape, one line each."""
    ck, rows, n = shape["check"], shape["rows"], shape["cells"]
    ulps = ", ".join(f"{nm} {ck[nm]['max_float16_ulps']:.2f}" for nm in ck["poolings_compared"])
    d_ok = all(v["close"] for k, v in ck.items() if k.startswith("official_") and isinstance(v, dict))
    print(
        f"{tag} check: forward ran cellstrata's tokens and batches: "
        f"{ck['forward_same_tokens_and_batches_as_cellstrata']}; same model FLOPs: {ck['same_model_flops']}; "
        f"cellstrata vs peers at {len(ck['cells_compared'])} cells x {ck['mean']['layers']} layers, "
        f"max float16 ULP: {ulps}, min cosine {min(ck[nm]['min_cosine'] for nm in ck['poolings_compared']):.6f}"
        + (("; vs (d) " + ("ok" if d_ok else "DIFFERS")) if "official" in results else "")
        + f" -> {'OK' if ck['ok'] else 'MISMATCH'}; "
        f"{shape['truncated_cells']:,} of {n:,} cells cut to the context"
    )
    bt = results["cellstrata"]["breakdown"]
    q = shape["ratios"]
    b_row = next(r for r in rows if r["key"] == "cellstrata")
    print(
        f"{tag} cellstrata telemetry: setup {bt['setup_s']:.1f} s, pipeline {bt['pipeline_s']:.1f} s "
        f"(forward+pool {bt['forward_and_pool_s']:.1f} s, input wait {bt['input_wait_s']:.1f} s, "
        f"writer wait {bt['writer_wait_s']:.1f} s); max_tokens {results['cellstrata']['max_tokens']:,}, "
        f"attention {results['cellstrata']['attention']}; b/a {q['b_over_a']:.2f}, b/c {q['b_over_c']:.2f} "
        f"(peer batch {results['peers']['batch_size']})"
        + (f", b/d {q['b_over_d']:.2f}" if q["b_over_d"] is not None else "")
        + f"; model {_rate_text(b_row, gpu)}\n"
    )


def run_shape(s: Suite, ctx: Any, fam: str, preset: str, n: int) -> dict[str, Any]:
    """One shape: its input and memory plan, then every variant (or a skip), the check and the ratios."""
    tag = f"[{fam} {preset}]"
    shape = describe_input(s, fam, preset, n)
    candidates, fits = peer_batches(s, shape, n)
    print_shape(shape, tag)
    if not fits:
        mark_skipped(s, shape, candidates, tag)
        return shape
    work = fresh_owned_dir(s.root / f"{fam}-{preset}")
    base = variant_settings(s, fam, preset, n, fits)
    repeats = s.args.repeats or (1 if s.args.quick or s.gpu else REPEATS[size_class(preset)])
    variants = [v for v in VARIANTS if v != "official" or fam in OFFICIAL_FAMILIES]
    results = run_round_robin(ctx, base, work, variants, repeats, tag)
    rows = summarize(shape, results, s.ceilings)
    ck = check_outputs(results, n, gpu=s.gpu)
    s.ok = s.ok and ck["ok"]
    shape.update(
        rows=rows,
        ratios=ratios(rows),
        check=ck,
        truncated_cells=results["cellstrata"]["truncated_cells"],
        model_source="init_checkpoint + load" if preset == "tiny" else "built in memory",
        settings=base,
        results=results,
        repeats=repeats,
    )
    print_checks(shape, results, s.gpu, tag)
    return shape


def run_suite(s: Suite) -> None:
    """Inputs, checkpoints and every shape's variants in the work folder (removed afterwards when temporary)."""
    try:
        prepare_inputs(s)
        check_builders(s)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        print()
        for fam, preset, n in s.selection:
            s.shapes.append(run_shape(s, ctx, fam, preset, n))
    finally:
        if s.own_tmp:
            remove_owned(s.root)


def print_summary(s: Suite, total_s: float) -> None:
    print(summary_table(s.shapes))
    if official_table(s.shapes):
        print(official_table(s.shapes))
    print(targets_table(targets(s.shapes, s.device)))
    skipped = skipped_text(s.shapes)
    if skipped:
        print("Skipped:\n" + skipped)
    print(f"total {total_s / 60:.1f} min")


def payload(s: Suite, stamp: dt.datetime, command: str, total_s: float) -> dict[str, Any]:
    """The JSON result: machine, ceilings, settings, builder checks, targets and every shape."""
    args, gpu, kind_dev = s.args, s.gpu, s.kind_dev
    return {
        "benchmark": "throughput",
        "created": stamp.isoformat(timespec="seconds"),
        "command": command,
        "total_seconds": total_s,
        "note": "random weights: throughput only (speed does not depend on the weights); model loading not timed",
        "machine": s.info,
        "ceilings": s.ceilings,
        "settings": {
            "quick": args.quick,
            "device": s.device,
            "max_tokens": args.max_tokens,
            "peer_batch": args.peer_batch or "sweep",
            "peer_sweep": {"candidates": PEER_SWEEP[kind_dev], "cells": PEER_SWEEP_CELLS[kind_dev]},
            "official_cells": args.official_cells or OFFICIAL_CELLS[kind_dev],
            "warmup": "first cells of the same input" if gpu else "short cells of a separate file",
            "warmup_cells": args.warmup_cells if args.warmup_cells is not None else (None if gpu else s.warmup),
            "warmup_genes_per_cell": None if gpu else WARMUP_GENES_PER_CELL,
            "threads": args.threads,
            "seed": args.seed,
            "repeats": args.repeats or ("1" if args.quick or gpu else REPEATS),
            "mem_fraction": args.mem_fraction,
            "data": DATA,
            "gene_column": GENE_COLUMN,
            "cellstrata_poolings": "all",
            "cellstrata_dtype": "float16",
            "peers_poolings": "mean + the family's first single-token pooling (cls / s_token), float32",
        },
        "builder_checks": s.builder_checks,
        "targets": targets(s.shapes, s.device),
        "shapes": s.shapes,
    }


def markdown(s: Suite, stamp: dt.datetime, command: str, total_s: float) -> str:
    """The Markdown result: how it was measured, then the tables."""
    args, gpu, info, shapes = s.args, s.gpu, s.info, s.shapes
    loads = [x for sh in shapes for r in sh.get("rows", []) for x in (r["loadavg_1min"] or []) if x is not None]
    load_text = f"; 1-min load average {min(loads):.2f}-{max(loads):.2f} during the runs" if loads else ""
    if args.repeats or args.quick or gpu:
        rep_text = f"fastest of {args.repeats or 1} round-robin run(s)"
    else:
        rep_text = f"fastest of {REPEATS['tiny']} round-robin runs (tiny), {REPEATS['released']} (released sizes)"
    warm_text = (
        "an untimed warm-up run of the same variant on the first cells of the same input"
        if gpu
        else "a warm-up on short cells"
    )
    header = (
        f"# Throughput ({stamp.strftime('%Y-%m-%d')}, {info['device_name']}, {info['cpu_count']} CPUs, "
        f"{info['memory_gb']} GiB, torch {info['torch_version']}, "
        f"{info['torch_threads'] if not args.threads else args.threads} threads)"
        f"\n\n`{command}` ({total_s / 60:.1f} min)\n\nRandom weights: throughput only. Model loading is not "
        f"timed. Each variant in its own process after {warm_text}; the peers' batch size is the fastest of a "
        f"sweep on the first cells unless forced; {rep_text}{load_text}. b/a, b/c, b/d: tokens/s ratios. "
        f"Model FLOP/s: forward FLOPs of the real tokens over the variant's wall time"
        + (" (MFU: of the card's dense bf16 peak)" if gpu else "")
        + ".\n\n"
    )
    skipped = skipped_text(shapes)
    body = summary_table(shapes) + ("\nSkipped:\n\n" + skipped if skipped else "")
    body += "\nTargets:\n\n" + targets_table(targets(shapes, s.device))
    if official_table(shapes):
        body += "\nscFoundation, (d) the official get_embedding.py way (one cell per forward pass):\n\n"
        body += official_table(shapes)
    if sweep_table(shapes):
        body += "\nThe peers' batch-size sweep:\n\n" + sweep_table(shapes)
    body += "\nModel FLOPs:\n\n" + flops_table(shapes, s.ceilings)
    body += "\nInputs and output check:\n\n" + inputs_table(shapes)
    body += "\nPer variant:\n\n" + detail_table(shapes)
    return header + body


def write(s: Suite, total_s: float) -> None:
    """throughput-DEVICE-DATE.{json,md} and, when the ceilings were measured, roofline-DEVICE-DATE.{json,md}."""
    from . import roofline

    stamp = utc_now()
    slug = device_slug(s.device)
    name = result_name("throughput", slug, stamp)
    out_dir = Path(s.args.results)
    command = command_line("throughput", s.argv)
    stem = save_results(out_dir, name, payload(s, stamp, command, total_s), markdown(s, stamp, command, total_s))
    saved = Path(f"{stem}.json")  # the name an earlier result of the day left free
    if s.ceilings is not None:
        rpay = {
            "benchmark": "roofline",
            "created": stamp.isoformat(timespec="seconds"),
            "command": command,
            "device": s.device,
            "machine": s.info,
            "ceilings": s.ceilings,
            "shapes": roofline.shape_table({f: [p for ff, p, _ in s.selection if ff == f] for f in s.families}),
            "throughput": str(saved),
            "configurations": roofline.against_throughput(saved, s.ceilings),
            "total_seconds": s.ceilings["seconds"],
        }
        save_results(out_dir, result_name("roofline", slug, stamp), rpay, roofline.markdown(rpay))


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    suite = plan(ap, args, argv)
    open_suite(suite)
    run_suite(suite)
    total_s = time.perf_counter() - suite.t_start
    print_summary(suite, total_s)
    if not args.no_save:
        write(suite, total_s)
    return 0 if suite.ok else 1


if __name__ == "__main__":
    sys.exit(main())
