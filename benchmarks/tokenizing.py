"""Host tokenizing speed per core, every family: the tokenizers before vectorising vs per-cell vs vectorised.

Each family's tokenizer is built over a released-size vocabulary (random weights need none: only the
gene panel matters) and tokenizes the same synthetic cells: a 10x-like panel of 36,601 genes, 500-3,000
expressed genes per cell with negative-binomial-like counts, in blocks of 1,024 cells. Paths per family:

- ``before``: ``tokenize`` of the tokenizers at commit ``ef841b4`` (before the vectorising; their tree is
  exported with ``git archive`` and imported in its own process, so both versions run on this machine);
- ``reference``: ``tokenize_reference``, the per-cell loop with the current draws;
- ``vectorised``: ``tokenize``, whole CSR blocks;
- ``read+tokenize``: ``CellSource.read`` of each block from an ``.h5ad`` written once, then ``tokenize``
  (the host's whole preparation of a block).

Every worker process is pinned to one core with torch and BLAS threads at 1, so the rates are per core.
The run asserts that ``reference``, ``vectorised`` and ``read+tokenize`` give identical tokens, and says
per family which token columns differ between ``before`` and now (only where random draws are involved).

    python -m benchmarks.tokenizing                 # 4,096 cells per family, best of 3: 1.5 min on 2 idle cores
    python -m benchmarks.tokenizing --quick         # smoke run: 384 cells, blocks of 128, one repeat
    python -m benchmarks.tokenizing --families scgpt,geneformer --cells 8192 --no-save
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as a file (``cellstrata bench`` does): the same as ``python -m benchmarks.tokenizing``
    _path = os.pathsep.join(filter(None, (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))))
    os.execve(
        sys.executable,
        [sys.executable, "-m", "benchmarks.tokenizing", *sys.argv[1:]],
        {**os.environ, "PYTHONPATH": _path},
    )

from .common import make_owned_dir, make_temp_dir, remove_owned
from .harness import (
    RESULTS,
    ROOT,
    command_line,
    cpu_pressure,
    git_commit,
    loadavg,
    machine_info,
    module_command,
    module_env,
    result_name,
    save_results,
    utc_now,
)

FAMILIES = ("scgpt", "tahoe-x1", "scfoundation", "geneformer")
BEFORE_COMMIT = "ef841b4"  # the last commit before the tokenizers were vectorised (issue 17)
PATHS = ("before", "reference", "vectorised", "read+tokenize")
# released panels: scGPT whole-human, Tahoe-X1 70m/1b/3b, scFoundation's gene list, Geneformer V2
RELEASED = {"scgpt": "whole-human", "tahoe-x1": "1b", "scfoundation": "100m", "geneformer": "v2-104m"}
# the input genes each family matches: symbols (var_names) or Ensembl ids (var["ensembl_id"])
GENE_COLUMN = {"scgpt": None, "tahoe-x1": "ensembl_id", "scfoundation": None, "geneformer": "ensembl_id"}
PANEL_GENES = 36_601  # a 10x human panel
SHARED_GENES = 19_000  # the first genes: in every family's vocabulary (scFoundation's list has 19,264)
# issue 17's targets: host preparation >= 3x the device's forward token rate with the cores of one GPU host,
# i.e. >= 1.5 M tokens/s per core for scGPT- and Geneformer-like inputs
TARGET_PER_CORE = 1.5e6
TARGET_FAMILIES = ("scgpt", "geneformer")
# scGPT whole-human forward only on one H200, results/device-sprint-h200-2026-11-26.md, (a)
H200_SCGPT_FORWARD = 3_372_491
HOST_CORES = 16  # the GPU hosts' cores
DEVICE_MULTIPLE = 3


# ---------------------------------------------------------------------------------------------------- inputs
def synthetic_cells(n_cells: int, n_genes: int, lo: int, hi: int, seed: int) -> Any:
    """CSR counts ``[n_cells, n_genes]``: ``lo..hi`` expressed genes per cell, negative-binomial-like counts.

    90% of a cell's expressed genes come from the first ``SHARED_GENES`` columns (in every vocabulary),
    drawn by a lognormal popularity; counts are ``1 + NB(2, mean)`` with the mean following the gene's
    popularity and the cell's size, so small counts repeat (ties at the bin edges) as in real data.
    """
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    shared = min(SHARED_GENES, n_genes)
    log_pop = rng.normal(0.0, 1.5, n_genes)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    cols, vals = [], []
    for i in range(n_cells):
        m = int(rng.integers(lo, hi + 1))
        m_in = min(round(0.9 * m), shared)
        m_out = min(m - m_in, n_genes - shared)
        keys = log_pop + rng.gumbel(size=n_genes)  # Gumbel top-k: draws without replacement by popularity
        g = np.argpartition(-keys[:shared], m_in - 1)[:m_in]
        if m_out:
            g = np.concatenate((g, shared + np.argpartition(-keys[shared:], m_out - 1)[:m_out]))
        g.sort()
        mean = np.exp(0.6 * log_pop[g] + rng.normal(0.0, 0.5))
        counts = 1 + rng.negative_binomial(2, 2.0 / (2.0 + mean))
        cols.append(g.astype(np.int32))
        vals.append(counts.astype(np.float32))
        indptr[i + 1] = indptr[i] + len(g)
    return sp.csr_matrix((np.concatenate(vals), np.concatenate(cols), indptr), shape=(n_cells, n_genes))


def write_inputs(work: Path, X: Any) -> tuple[Path, Path]:
    """The cells as ``cells.npz`` (CSR arrays) and as ``cells.h5ad`` (symbols + ``var['ensembl_id']``)."""
    import anndata as ad
    import pandas as pd

    from cellstrata.engine.input.datasets import gene_ensembl_ids, gene_symbols

    npz = work / "cells.npz"
    np.savez(npz, data=X.data, indices=X.indices, indptr=X.indptr, shape=np.array(X.shape))
    var = pd.DataFrame({"ensembl_id": gene_ensembl_ids(X.shape[1])}, index=gene_symbols(X.shape[1]))
    obs = pd.DataFrame(index=[f"cell{i:07d}" for i in range(X.shape[0])])
    h5ad = work / "cells.h5ad"
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(h5ad)
    return npz, h5ad


def export_tree(commit: str, dest: Path) -> Path:
    """The package at ``commit`` laid out as an importable ``cellstrata`` under ``dest`` (``git archive``)."""
    pkg = dest / "cellstrata"
    for folder, prefix in (("cellstrata", ""), ("engine", "engine/"), ("kernels", "kernels/"), ("probes", "probes/")):
        tar = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", f"--prefix={prefix}", f"{commit}:{folder}"],
            check=True,
            capture_output=True,
        ).stdout
        with tarfile.open(fileobj=BytesIO(tar)) as t:
            t.extractall(pkg, filter="data")
    return dest


# ---------------------------------------------------------------------------------------------------- worker
def build_tokenizer(family: str, seed: int) -> Any:
    """The family's tokenizer over the vocabulary ``init_checkpoint`` writes for its released preset."""
    from cellstrata.engine.input.datasets import gene_ensembl_ids, gene_symbols

    preset = RELEASED[family]
    if family == "scgpt":
        from cellstrata.engine.models import scgpt as m

        cfg = m.PRESETS[preset]
        vocab = {g: i for i, g in enumerate(gene_symbols(cfg.vocab_size - len(m.SPECIAL_TOKENS)))}
        vocab.update({t: len(vocab) + k for k, t in enumerate(m.SPECIAL_TOKENS)})
        return m.ScGPTTokenizer(vocab, max_length=cfg.max_length, seed=seed, pad_value=cfg.pad_value)
    if family == "tahoe-x1":
        from cellstrata.engine.models import tahoe_x1 as m

        cfg = m.PRESETS[preset]
        vocab = {g: i for i, g in enumerate(gene_ensembl_ids(cfg.vocab_size - len(m.SPECIAL_TOKENS)))}
        vocab.update({t: len(vocab) + k for k, t in enumerate(m.SPECIAL_TOKENS)})
        return m.TahoeX1Tokenizer(
            vocab,
            max_length=cfg.max_length,
            seed=seed,
            num_bins=cfg.num_bins,
            keep_first_n_tokens=cfg.keep_first_n_tokens,
            pad_token_id=vocab[m.PAD_TOKEN],
            pad_value=cfg.pad_value,
        )
    if family == "scfoundation":
        from cellstrata.engine.models import scfoundation as m

        cfg = m.PRESETS[preset]
        return m.ScFoundationTokenizer(
            gene_symbols(cfg.n_genes), seed=seed, pad_token_id=cfg.pad_token_id, mask_token_id=cfg.mask_token_id
        )
    from cellstrata.engine.models import geneformer as m

    cfg = m.PRESETS[preset]
    genes = gene_ensembl_ids(cfg.vocab_size - len(m.SPECIAL_TOKENS))
    token = {t: i for i, t in enumerate(m.SPECIAL_TOKENS)}
    token.update({g: len(m.SPECIAL_TOKENS) + i for i, g in enumerate(genes)})
    medians = np.exp(np.random.default_rng((seed, 7)).normal(0.5, 0.7, len(genes)))  # as init_checkpoint
    dictionaries = m.GeneDictionaries(token=token, median={g: float(x) for g, x in zip(genes, medians)})
    return m.GeneformerTokenizer(dictionaries, max_length=cfg.max_position_embeddings, pad_token_id=cfg.pad_token_id)


def digests(tokens: Any) -> dict[str, list[str] | list[int]]:
    """Per cell: hashes of its gene ids, of its gene set, of its values; its length and truncation flag."""

    def h(a: np.ndarray) -> str:
        return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=8).hexdigest()

    return {
        "genes": [h(np.asarray(g, dtype=np.int64)) for g in tokens.genes],
        "gene_set": [h(np.sort(np.asarray(g, dtype=np.int64))) for g in tokens.genes],
        "values": [h(np.asarray(v, dtype=np.float32)) for v in tokens.values],
        "length": [len(g) for g in tokens.genes],
        "truncated": [int(t) for t in np.asarray(tokens.truncated)],
    }


def same_tokens(a: Any, b: Any) -> bool:
    """Bit-identical token blocks: ids, values (dtype and bytes), flags and counts."""
    if len(a.genes) != len(b.genes) or not np.array_equal(a.indices, b.indices):
        return False
    for ga, gb, va, vb in zip(a.genes, b.genes, a.values, b.values):
        if ga.dtype != gb.dtype or va.dtype != vb.dtype or ga.tobytes() != gb.tobytes() or va.tobytes() != vb.tobytes():
            return False
    fields = ("truncated", "empty", "n_expressed")
    return all(np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f))) for f in fields)


def pin_one_core() -> int:
    """Pin this process to one core (the lowest it may use) with torch at one thread; the core's number."""
    import torch

    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    return core


def worker(args: argparse.Namespace) -> int:
    """Time the paths of this tree (``--worker before`` or ``now``) on every family; write ``--out`` JSON."""
    import scipy.sparse as sp

    import cellstrata
    from cellstrata.engine.input.datasets import gene_ensembl_ids, gene_symbols
    from cellstrata.engine.input.sources import CellBlock, open_source

    core = pin_one_core()
    z = np.load(args.npz)
    X = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
    n_cells, n_genes = X.shape
    names = {None: gene_symbols(n_genes), "ensembl_id": gene_ensembl_ids(n_genes)}
    bounds = [(s, min(s + args.block, n_cells)) for s in range(0, n_cells, args.block)]
    blocks = [CellBlock(indices=np.arange(s, e), X=X[s:e]) for s, e in bounds]
    paths = ("before",) if args.worker == "before" else ("reference", "vectorised", "read+tokenize")
    out: dict[str, Any] = {"tree": args.worker, "package": str(Path(cellstrata.__file__).parent), "core": core}
    for family in args.families.split(","):
        tok = build_tokenizer(family, args.seed)
        mapping = tok.map_genes(names[GENE_COLUMN[family]])
        source = open_source(args.h5ad, gene_column=GENE_COLUMN[family])

        def run(path: str, n: int, keep: bool, tok: Any = tok, mapping: Any = mapping, source: Any = source) -> Any:
            """Tokenize the first ``n`` blocks by ``path``; the token blocks when ``keep``."""
            kept = []
            for (s, e), b in zip(bounds[:n], blocks[:n]):
                if path == "read+tokenize":
                    t = tok.tokenize(source.read(s, e), mapping)
                elif path == "reference":
                    t = tok.tokenize_reference(b, mapping)
                else:
                    t = tok.tokenize(b, mapping)
                if keep:
                    kept.append(t)
            return kept

        for path in paths:  # warm-up on the first block: imports, first calls, caches
            run(path, 1, keep=False)
        kept = {p: run(p, len(blocks), keep=True) for p in paths}  # untimed: the tokens to compare
        n_tokens = sum(int(t.lengths.sum()) for t in kept[paths[0]])
        # per core: this process's CPU seconds (one thread on one core); the wall clock also counts the turns
        # other processes take on that core, which on a shared machine says more about them than about us
        cpu: dict[str, list[float]] = {p: [] for p in [*paths, "read"]}
        wall: dict[str, list[float]] = {p: [] for p in [*paths, "read"]}
        for _ in range(args.repeats):
            for path in [*paths, "read"]:
                c0, w0 = time.process_time(), time.perf_counter()
                if path == "read":
                    for s, e in bounds:
                        source.read(s, e)
                else:
                    run(path, len(blocks), keep=False)
                cpu[path].append(time.process_time() - c0)
                wall[path].append(time.perf_counter() - w0)
        source.close()
        row: dict[str, Any] = {"cells": n_cells, "tokens": n_tokens, "cpu_seconds": cpu, "wall_seconds": wall}
        row["vocab_genes"] = int(mapping.n_vocab_genes)
        row["matched_genes"] = int(mapping.n_matched)
        row["max_length"] = getattr(tok, "max_length", None)
        row["truncated_cells"] = int(sum(int(np.asarray(t.truncated).sum()) for t in kept[paths[0]]))
        row["digests"] = _merge_digests([digests(t) for t in kept[paths[0]]])
        if args.worker != "before":
            row["identical_reference_vectorised"] = all(
                same_tokens(a, b) for a, b in zip(kept["reference"], kept["vectorised"])
            )
            row["identical_read_vectorised"] = all(
                same_tokens(a, b) for a, b in zip(kept["read+tokenize"], kept["vectorised"])
            )
            same = row["identical_reference_vectorised"] and row["identical_read_vectorised"]
            print(f"{family}: reference, vectorised and read+tokenize tokens {'identical' if same else 'DIFFER'}")
        out[family] = row
    Path(args.out).write_text(json.dumps(out))
    return 0


def _merge_digests(parts: list[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    return {k: [x for p in parts for x in p[k]] for k in parts[0]} if parts else {}


# ---------------------------------------------------------------------------------------------------- parent
def run_worker(tree: str, pythonpath: Path | None, work: Path, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """One worker process (its own interpreter, one core, one thread); its JSON."""
    work = work.resolve()
    out = work / f"result-{tree}-{tag}.json"
    env = dict(os.environ)
    env.update(dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), "1"))
    env.pop("PYTHONPATH", None)
    # the tree's package first; the working folder (first on a ``-m`` run's path) is not the repository root
    env = module_env(env, first=[str(pythonpath)] if pythonpath is not None else [])
    cmd = module_command("tokenizing", "--worker", tree, "--out", str(out))
    cmd += ["--npz", str(work / "cells.npz"), "--h5ad", str(work / "cells.h5ad"), "--families", args.families]
    cmd += ["--block", str(args.block), "--repeats", "1", "--seed", str(args.seed)]
    subprocess.run(cmd, check=True, env=env, cwd=work)
    return json.loads(out.read_text())


def compare(before: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """Per token column: how many cells hold the same value before and now."""
    n = len(now["length"])
    same = {k: sum(a == b for a, b in zip(before[k], now[k])) for k in ("genes", "gene_set", "values", "length")}
    same["truncated"] = sum(a == b for a, b in zip(before["truncated"], now["truncated"]))
    truncated = [bool(t) for t in now["truncated"]]
    untruncated = [i for i in range(n) if not truncated[i]]
    same_untruncated = {k: sum(before[k][i] == now[k][i] for i in untruncated) for k in ("genes", "gene_set", "values")}
    differ = [k for k in ("genes", "gene_set", "values", "length", "truncated") if same[k] < n]
    return {
        "cells": n,
        "same_cells": same,
        "untruncated_cells": len(untruncated),
        "same_untruncated_cells": same_untruncated,
        "columns_that_differ": differ,
    }


def best_rate(seconds: list[float], amount: int) -> float:
    return amount / min(seconds)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Inputs once, the before tree exported, then the two workers in turn ``args.repeats`` times."""
    t0 = time.perf_counter()
    X = synthetic_cells(args.cells, args.genes, args.min_genes, args.max_genes, args.seed)
    write_inputs(work, X)
    expressed = np.diff(X.indptr)
    tree = export_tree(args.before, work / "before") if args.before != "none" else None
    runs: dict[str, list[dict[str, Any]]] = {"now": [], "before": []}
    for r in range(args.repeats):
        runs["now"].append(run_worker("now", None, work, args, str(r)))
        if tree is not None:
            runs["before"].append(run_worker("before", tree, work, args, str(r)))
            package = Path(runs["before"][-1]["package"])
            if tree.resolve() not in package.resolve().parents:
                msg = f"the 'before' worker imported cellstrata from {package}, not from the exported {tree}"
                raise RuntimeError(msg)
    families: dict[str, Any] = {}
    for family in args.families.split(","):
        now = [r[family] for r in runs["now"]]
        first = now[0]
        row: dict[str, Any] = {
            "preset": RELEASED[family],
            "vocab_genes": first["vocab_genes"],
            "matched_genes": first["matched_genes"],
            "max_length": first["max_length"],
            "cells": first["cells"],
            "tokens": first["tokens"],
            "truncated_cells": first["truncated_cells"],
            "identical_reference_vectorised": all(r["identical_reference_vectorised"] for r in now),
            "identical_read_vectorised": all(r["identical_read_vectorised"] for r in now),
            "paths": {},
        }
        for path in PATHS[1:]:
            row["paths"][path] = _rates(now, path)
        row["read_only"] = _rates(now, "read")
        if runs["before"]:
            before = [r[family] for r in runs["before"]]
            row["paths"]["before"] = _rates(before, "before")
            row["before_package"] = runs["before"][0]["package"]
            row["before_vs_now"] = compare(before[0]["digests"], first["digests"])
        vec = row["paths"]["vectorised"]["tokens_per_s"]
        row["vectorised_vs_reference"] = vec / row["paths"]["reference"]["tokens_per_s"]
        if "before" in row["paths"]:
            row["vectorised_vs_before"] = vec / row["paths"]["before"]["tokens_per_s"]
            row["read_tokenize_vs_before"] = (
                row["paths"]["read+tokenize"]["tokens_per_s"] / row["paths"]["before"]["tokens_per_s"]
            )
        families[family] = row
    return {
        "cells": args.cells,
        "block": args.block,
        "panel_genes": args.genes,
        "expressed_genes": {
            "min": int(expressed.min()),
            "median": float(np.median(expressed)),
            "max": int(expressed.max()),
        },
        "before_commit": args.before,
        "core": runs["now"][0]["core"],
        "families": families,
        "targets": targets(families),
        "seconds": time.perf_counter() - t0,
    }


def _rates(rows: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """Best rates of ``path`` over the workers' ``rows``: per CPU second (per core) and per wall second."""
    cpu = [s for r in rows for s in r["cpu_seconds"][path]]
    wall = [s for r in rows for s in r["wall_seconds"][path]]
    cells, tokens = rows[0]["cells"], rows[0]["tokens"]
    return {
        "seconds": min(cpu),
        "all_seconds": cpu,
        "cells_per_s": best_rate(cpu, cells),
        "tokens_per_s": best_rate(cpu, tokens),
        "wall_seconds": min(wall),
        "all_wall_seconds": wall,
        "wall_tokens_per_s": best_rate(wall, tokens),
    }


def targets(families: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 17's targets against the vectorised and the read+tokenize rates."""
    per_core_device = DEVICE_MULTIPLE * H200_SCGPT_FORWARD / HOST_CORES
    rows = []
    for family, row in families.items():
        for path in ("vectorised", "read+tokenize"):
            rate = row["paths"][path]["tokens_per_s"]
            if family in TARGET_FAMILIES:
                rows.append(
                    {
                        "target": f">= {TARGET_PER_CORE / 1e6:.1f} M tokens/s per core",
                        "family": family,
                        "path": path,
                        "measured": rate,
                        "needed": TARGET_PER_CORE,
                        "met": rate >= TARGET_PER_CORE,
                    }
                )
            rows.append(
                {
                    "target": f"{HOST_CORES} cores >= {DEVICE_MULTIPLE}x the H200 scGPT whole-human forward rate "
                    f"({H200_SCGPT_FORWARD:,} tokens/s)",
                    "family": family,
                    "path": path,
                    "measured": rate,
                    "needed": per_core_device,
                    "met": rate >= per_core_device,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------------- report
def _k(x: float) -> str:
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x / 1e3:,.0f} k"


def markdown(payload: dict[str, Any]) -> str:
    """The side-by-side tables of a result."""
    r = payload["result"]
    m = payload["machine"]
    e = r["expressed_genes"]
    lines = [
        f"# Tokenizing per core — {m['device_name']}",
        "",
        f"`{payload['command']}` (commit {payload['git_commit'][:12]}, {payload['created']}; "
        f"{payload['total_seconds']:.0f} s; 1-min load {payload['load_before']} before, {payload['load_after']} after)",
        "",
        f"{r['cells']:,} synthetic cells, {r['panel_genes']:,} input genes, {e['min']:,}-{e['max']:,} expressed "
        f"genes per cell (median {e['median']:,.0f}), blocks of {r['block']:,} cells; released-size vocabularies. "
        f"Each path in its own process pinned to core {r['core']}, torch and BLAS at one thread; best of "
        f"{payload['repeats']}. `before`: the tokenizers at commit {r['before_commit']}. Per core = tokens over "
        "the worker's CPU seconds (one thread on one core); the wall clock also counts other processes' turns on "
        "that core (last columns).",
        "",
        "Tokens/s per core (cells/s):",
        "",
        "| family | vocab genes (matched) | context | truncated cells | before | reference | vectorised | "
        "read+tokenize | vectorised / before | vectorised / reference | read+tokenize / before | tokens | "
        "wall clock: vectorised | wall clock: read+tokenize |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for family, row in r["families"].items():
        p = row["paths"]

        def cell(path: str, p: dict[str, Any] = p) -> str:
            if path not in p:
                return "–"
            return f"{_k(p[path]['tokens_per_s'])} ({p[path]['cells_per_s']:,.0f})"

        ident = "identical" if row["identical_reference_vectorised"] and row["identical_read_vectorised"] else "DIFFER"
        vb = f"{row['vectorised_vs_before']:.1f}x" if "vectorised_vs_before" in row else "–"
        rb = f"{row['read_tokenize_vs_before']:.1f}x" if "read_tokenize_vs_before" in row else "–"
        context = "all" if row["max_length"] is None else f"{row['max_length']:,}"
        lines.append(
            f"| {family} | {row['vocab_genes']:,} ({row['matched_genes']:,}) | {context} | "
            f"{row['truncated_cells']:,} of {row['cells']:,} | {cell('before')} | {cell('reference')} | "
            f"{cell('vectorised')} | {cell('read+tokenize')} | {vb} | {row['vectorised_vs_reference']:.1f}x | {rb} | "
            f"{ident} | {_k(p['vectorised']['wall_tokens_per_s'])} | {_k(p['read+tokenize']['wall_tokens_per_s'])} |"
        )
    lines += [
        "",
        "`tokens`: reference, vectorised and read+tokenize give bit-identical tokens (asserted by the run). "
        "Reading alone (`CellSource.read` of every block):",
        "",
        "| family | read tokens/s | read cells/s |",
        "|---|--:|--:|",
    ]
    for family, row in r["families"].items():
        ro = row["read_only"]
        lines.append(f"| {family} | {_k(ro['tokens_per_s'])} | {ro['cells_per_s']:,.0f} |")
    if any("before_vs_now" in row for row in r["families"].values()):
        lines += [
            "",
            "Before vs now, cells with the same value per token column (`gene set`: the same genes in any order):",
            "",
            "| family | cells | genes | gene set | values | length | truncated | untruncated cells: genes / values "
            "| columns that differ |",
            "|---|--:|--:|--:|--:|--:|--:|---|---|",
        ]
        for family, row in r["families"].items():
            c = row.get("before_vs_now")
            if c is None:
                continue
            s, u = c["same_cells"], c["same_untruncated_cells"]
            lines.append(
                f"| {family} | {c['cells']:,} | {s['genes']:,} | {s['gene_set']:,} | {s['values']:,} | "
                f"{s['length']:,} | {s['truncated']:,} | {u['genes']:,} / {u['values']:,} of "
                f"{c['untruncated_cells']:,} | {', '.join(c['columns_that_differ']) or 'none'} |"
            )
    lines += [
        "",
        f"Targets (issue 17; the H200's scGPT whole-human forward-only rate is {H200_SCGPT_FORWARD:,} tokens/s, "
        f"`results/device-sprint-h200-2026-11-26.md`; {DEVICE_MULTIPLE}x that over {HOST_CORES} cores is "
        f"{_k(DEVICE_MULTIPLE * H200_SCGPT_FORWARD / HOST_CORES)} tokens/s per core):",
        "",
        "| target | family | path | measured tokens/s | needed per core | met |",
        "|---|---|---|--:|--:|---|",
    ]
    for t in r["targets"]:
        lines.append(
            f"| {t['target']} | {t['family']} | {t['path']} | {_k(t['measured'])} | {_k(t['needed'])} | "
            f"{'met' if t['met'] else 'not met'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma list of families")
    ap.add_argument("--cells", type=int, default=4096, help="synthetic cells per family")
    ap.add_argument("--block", type=int, default=1024, help="cells per block")
    ap.add_argument("--genes", type=int, default=PANEL_GENES, help="input genes (columns)")
    ap.add_argument("--min-genes", type=int, default=500, help="fewest expressed genes per cell")
    ap.add_argument("--max-genes", type=int, default=3000, help="most expressed genes per cell")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every path (the best is kept)")
    ap.add_argument("--before", default=BEFORE_COMMIT, help="commit of the 'before' tokenizers ('none': skip)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 384 cells, blocks of 128, one repeat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="folder for the inputs (default: a new temporary folder)")
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON and Markdown go")
    ap.add_argument("--no-save", action="store_true", help="print only")
    # a worker process (started by this script)
    ap.add_argument("--worker", choices=["now", "before"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--npz", help=argparse.SUPPRESS)
    ap.add_argument("--h5ad", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    unknown = sorted(set(args.families.split(",")) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    if args.quick:
        args.cells, args.block, args.repeats = min(args.cells, 384), min(args.block, 128), 1

    work = make_owned_dir(Path(args.workdir)) if args.workdir else make_temp_dir("cellstrata-tokenize-")
    stamp = utc_now()
    load_before = loadavg()
    t0 = time.perf_counter()
    try:
        result = measure(args, work)
    finally:
        remove_owned(work)
    payload: dict[str, Any] = {
        "benchmark": "tokenize",
        "created": stamp.isoformat(timespec="seconds"),
        "command": command_line("tokenizing", argv),
        "machine": machine_info(["numpy", "scipy", "torch", "anndata", "h5py"]),
        "git_commit": git_commit(),
        "repeats": args.repeats,
        "quick": args.quick,
        "load_before": load_before,
        "load_after": loadavg(),
        "cpu_pressure_avg60": cpu_pressure(),
        "result": result,
        "total_seconds": time.perf_counter() - t0,
    }
    text = markdown(payload)
    print(text)
    if not args.no_save:
        name = result_name("tokenize", "cpu", stamp, "-quick" if args.quick else "")
        save_results(args.results, name, payload, text)
    bad = [
        f
        for f, row in result["families"].items()
        if not (row["identical_reference_vectorised"] and row["identical_read_vectorised"])
    ]
    if bad:
        print(f"FAILED: reference, vectorised and read+tokenize tokens differ for {', '.join(bad)}")
        return 1
    print("tokens identical: reference = vectorised = read+tokenize for " + ", ".join(result["families"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
