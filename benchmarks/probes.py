"""Time and peak memory of the layer-wise probes (``cellstrata.probes``) per layer and task, 10k / 100k / 1M cells.

For every size the script builds, once, into a work folder (reused when present):

- an ``.h5ad`` of raw counts with the synthetic annotations (``engine.datasets.write_synthetic_h5ad``:
  obs ``cell_type``, ``time``, ``cell_state``, ``perturbation`` (control ``engine.datasets.CONTROL``),
  ``donor``), 2,000 genes and a median of 50 expressed genes per cell, so that 1M cells stay ~0.55 GB;
- a valid cellstrata store of the same cells written directly (no model run): ``L`` blocks (``L + 1``
  layers), one pooling ``mean`` of width 256, float16, zstd, ``engine.store.default_chunk_cells``
  chunking, created with ``StoreSpec`` + ``create_or_resume`` and filled chunk by chunk with
  ``engine.writer.write_chunk`` (data, then the ``done`` flag), as ``engine.pipeline`` does, so
  ``cellstrata info`` reads it and an interrupted build resumes. Layer ``l`` of a cell is a random
  projection of the log1p-CPM of the planted program genes (a few hundred), rotating slowly with depth,
  scaled by a depth-dependent signal (weak at the embeddings, strongest at 65% depth, weaker at the last
  layer), plus a per-layer offset and fresh Gaussian noise: the probes do real work on real structure.

Then it measures ``cellstrata.probes.probe(store, h5ad, tasks, ...)`` with the tasks' default settings
and caps, every task per ``cell_state`` (as the demo runs them), each measurement in a fresh Python
process whose peak RSS is its own high-water mark, reset after its imports (nothing leaks between
measurements; :func:`peak_rss` says why not ``ru_maxrss``):

1. each task alone on ONE layer (``--probe-layer``, default the last), ``n_jobs=1``, ``cache=False``:
   the per-layer cost (``ProbeResults.timings["layers_s"]``), plus the layer-independent references
   (counts read once, HVG-PCA baseline, DE profiles, ...) and the baseline evaluation;
2. all tasks on all layers (``--total-layers``), ``cache=False``, ``n_jobs`` as given (default: the runner's);
3. the cache pair: all tasks with ``cache=True`` on an empty cache (computes and writes the results into
   the store), then the same again, every result read from the cache (should be ~free). ``--cache-check
   layer`` (default) runs the pair on the probe layer, ``all`` on the ``--total-layers`` (one more full
   computation per size), ``none`` skips it.

Reported per size and task: seconds per layer, references and baseline seconds, peak RSS (and its growth
over the process after its imports, and per runner phase from a 20 ms RSS sampler), and the cells each
task used (the runner's caps: ``n_used`` of ``n_available`` per context), which is why memory and time
stay bounded at 1M cells. Results: ``benchmarks/results/probes-cpu-<date>.{json,md}``.

    python -m benchmarks.probes                      # 10k, 100k and 1M cells, 13 layers (~1-1.5 h, ~7.5 GiB)
    python -m benchmarks.probes --quick              # smoke run: 10k cells, 5 layers
    python -m benchmarks.probes --sizes 100000 --workdir /data/probe-bench   # keep and reuse the inputs
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as a file (``cellstrata bench`` does): the same as ``python -m benchmarks.probes``
    _path = os.pathsep.join(filter(None, (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))))
    os.execve(
        sys.executable, [sys.executable, "-m", "benchmarks.probes", *sys.argv[1:]], {**os.environ, "PYTHONPATH": _path}
    )

from .common import (
    du,
    growth,
    ints,
    make_owned_dir,
    make_temp_dir,
    maxrss,
    mib,
    peak_rss,
    print_failure,
    remove_owned,
    reset_peak_rss,
    rss_now,
)
from .harness import (
    RESULTS,
    command_line,
    cpu_pressure,
    json_default,
    loadavg,
    machine_info,
    module_env,
    read_result,
    result_name,
    save_results,
    utc_now,
    worker_main,
    write_spec,
)

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000,)
N_LAYERS = 12  # blocks; the store has N_LAYERS + 1 layers (0 = embedding output)
QUICK_LAYERS = 4
WIDTH = 256
DTYPE = "float16"
# the benchmark's own (marked) folder inside --workdir: the stores, partial inputs and worker files; only
# what carries the marker is ever deleted or overwritten (common.remove_owned)
SCRATCH = "probes-work"
POOLING = "mean"
N_GENES = 2000
GENES_PER_CELL = 50
COMPRESSION = "zstd"
RSS_INTERVAL_S = 0.02

# every task per cell state, with the columns the demo uses (cellstrata/demo.py DEMO_TASKS)
CONTEXT_KEY = "cell_state"
TASKS: dict[str, dict[str, Any]] = {
    "cell_type": {"label_key": "cell_type", "group_key": "donor"},
    "knn_transfer": {"label_key": "cell_type"},
    "clustering": {"label_key": "cell_type"},
    "trajectory": {"time_key": "time"},
    "perturbation": {"perturbation_key": "perturbation"},  # control: engine.datasets.CONTROL, set in task_shared
}
PHASES = ("plan", "references", "layers", "baseline", "assemble")


# ---------------------------------------------------------------------------------------------------- machine
# ---------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class BuildSettings:
    n_cells: int
    n_layers: int
    width: int
    n_genes: int
    genes_per_cell: float
    seed: int

    @property
    def h5ad_name(self) -> str:
        return f"cells-{self.n_cells}-g{self.n_genes}-e{self.genes_per_cell:g}-s{self.seed}.h5ad"

    @property
    def store_name(self) -> str:
        cells = f"{self.n_cells}-g{self.n_genes}-e{self.genes_per_cell:g}"
        return f"store-{cells}-L{self.n_layers}-W{self.width}-s{self.seed}.zarr"


def signal_strength(n_layers: int) -> np.ndarray:
    """Per store layer: 0.25 + 2 exp(-((depth - 0.65) / 0.3)^2); weak at 0, peak at 65% depth, 0.76 at the end."""
    depth = np.arange(n_layers + 1) / n_layers
    return 0.25 + 2.0 * np.exp(-(((depth - 0.65) / 0.3) ** 2))


class LayerModel:
    """Synthetic layer features from counts: ``s_l * gain * (log1p-CPM[:, genes] @ P_l) + offset_l + N(0, 1)``.

    ``genes`` are the planted program genes (var ``program`` non-empty: markers, time, activation,
    perturbation modules, cycling, targets); ``P_l = cos(a_l) P_a + sin(a_l) P_b`` rotates from one random
    projection to another over depth (``a_l = pi/2 * l/L``); ``gain`` makes the projected signal unit sd;
    ``offset_l`` is a per-layer mean (two dimensions grow with depth, like a residual stream's large
    dimensions). Noise is seeded per (chunk, layer), so a resumed build writes identical values.
    """

    def __init__(self, var: Any, first_counts: Any, settings: BuildSettings) -> None:
        L, W = settings.n_layers, settings.width
        rng = np.random.default_rng([settings.seed, 17])
        self.genes = np.flatnonzero(var["program"].astype(str).to_numpy() != "")
        self.settings = settings
        g = len(self.genes)
        self.proj_a = (rng.standard_normal((g, W)) / math.sqrt(g)).astype(np.float32)
        self.proj_b = (rng.standard_normal((g, W)) / math.sqrt(g)).astype(np.float32)
        depth = np.arange(L + 1) / L
        self.strength = signal_strength(L)
        self.angle = 0.5 * math.pi * depth
        offset = rng.normal(0.0, 0.5, (L + 1, W)) * (0.5 + depth)[:, None]
        offset[:, 0] += 8.0 * depth
        offset[:, 1] -= 6.0 * depth
        self.offset = offset.astype(np.float32)
        sample = self._expression(first_counts) @ self.proj_a
        self.gain = float(1.0 / max(float(sample.std()), 1e-6))

    def _expression(self, counts: Any) -> np.ndarray:
        from cellstrata.probes.features import log1p_cpm

        return np.asarray(log1p_cpm(counts)[:, self.genes].toarray(), dtype=np.float32)

    def layers(self, counts: Any, chunk_index: int) -> np.ndarray:
        """``[L + 1, n, W]`` float16 features of the cells of ``counts`` (CSR ``[n, genes]``)."""
        Z = self._expression(counts)
        A, B = Z @ self.proj_a, Z @ self.proj_b
        n, L = Z.shape[0], self.settings.n_layers
        out = np.empty((L + 1, n, self.settings.width), dtype=DTYPE)
        for layer in range(L + 1):
            rng = np.random.default_rng([self.settings.seed, 29, chunk_index, layer])
            x = rng.standard_normal((n, self.settings.width), dtype=np.float32)
            s = np.float32(self.strength[layer] * self.gain)
            x += s * np.float32(math.cos(self.angle[layer])) * A
            x += s * np.float32(math.sin(self.angle[layer])) * B
            x += self.offset[layer]
            out[layer] = x
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "features": "s_l * gain * (log1p_cpm(counts)[:, program genes] @ P_l) + offset_l + N(0, 1), float16",
            "n_signal_genes": len(self.genes),
            "signal_strength": [round(float(s), 4) for s in self.strength],
            "rotation_angle": [round(float(a), 4) for a in self.angle],
            "gain": self.gain,
        }


def scratch_dir(work: Path) -> Path:
    """The benchmark's own folder in ``work``, marked as such (see ``SCRATCH``)."""
    return make_owned_dir(work / SCRATCH)


def store_location(settings: BuildSettings, work: Path) -> Path:
    """Where the store of ``settings`` lives: in the scratch folder, so its probe cache may be cleared."""
    return work / SCRATCH / settings.store_name


def build_h5ad(settings: BuildSettings, work: Path) -> tuple[Path, float, bool]:
    """The counts + annotations file (written to a partial name first, so a finished file is always whole)."""
    from cellstrata.engine.input.datasets import write_synthetic_h5ad

    path = work / settings.h5ad_name
    if path.exists():
        return path, 0.0, False
    partial = scratch_dir(work) / (path.stem + ".partial.h5ad")
    remove_owned(partial)  # a leftover of a cut-short run; always owned
    t0 = time.perf_counter()
    write_synthetic_h5ad(
        partial, settings.n_cells, n_genes=settings.n_genes, genes_per_cell=settings.genes_per_cell, seed=settings.seed
    )
    partial.replace(path)
    return path, time.perf_counter() - t0, True


def _store_spec(settings: BuildSettings, source: Any, model: LayerModel) -> Any:
    import cellstrata
    from cellstrata.engine.storage.store import StoreSpec, default_chunk_cells, store_attributes

    L, W = settings.n_layers, settings.width
    chunk_cells = default_chunk_cells(settings.n_cells, W, DTYPE)
    fp = source.fingerprint()
    synthetic = {"builder": "benchmarks/probes.py", **vars(settings), **model.describe()}
    model_attrs = {
        "family": "synthetic",
        "preset": f"L{L}-W{W}",
        "n_layers": L,
        "hidden": W,
        "config": {"n_layers": L, "hidden": W, "synthetic": synthetic},
        "checkpoint": None,
        "sha256": None,
    }
    attrs = store_attributes(
        model=model_attrs,
        tokenizer={},
        pool_ops={POOLING: "mean"},
        layout=[0, 0],
        dtype=DTYPE,
        precision="float32",
        chunk_cells=chunk_cells,
        n_cells=settings.n_cells,
        empty_cells="nan",
        source=fp,
        official_layer=L,
        pool_backend="synthetic",
        gene_overlap={"n_input": settings.n_genes, "n_matched": settings.n_genes, "n_vocab_genes": settings.n_genes},
        engine_version=cellstrata.__version__,
        synthetic=synthetic,
    )
    return StoreSpec(
        n_cells=settings.n_cells,
        n_layers=L,
        hidden=W,
        widths={POOLING: W},
        dtype=DTYPE,
        chunk_cells=chunk_cells,
        compression=COMPRESSION,
        attrs=attrs,
    )


def build_store(settings: BuildSettings, h5ad: Path, work: Path) -> tuple[Path, float, int]:
    """The store of the h5ad's cells; returns (path, seconds, chunks written now). Resumes a partial build."""
    from cellstrata.engine.input.sources import open_source
    from cellstrata.engine.storage.store import create_or_resume, open_store, pending_chunks, update_attrs
    from cellstrata.engine.storage.writer import ChunkData, write_chunk

    path = scratch_dir(work) / settings.store_name
    source = open_source(h5ad)
    first = source.read(0, min(settings.n_cells, 4096)).X
    model = LayerModel(_read_var(h5ad), first, settings)
    spec = _store_spec(settings, source, model)
    group, _ = create_or_resume(path, spec, overwrite=True)
    pending = pending_chunks(group)
    if len(pending) == 0:
        return path, 0.0, 0
    names = np.asarray(source.obs_names).astype(str)
    c = spec.chunk_cells
    t0 = time.perf_counter()

    def make_and_write(index: int, start: int, stop: int, counts: Any) -> int:
        chunk = ChunkData(
            index=index,
            start=start,
            stop=stop,
            pooled={POOLING: model.layers(counts, index)},
            obs_names=names[start:stop],
            n_tokens=(np.diff(counts.indptr) + 1).astype(np.int32),  # expressed genes + a CLS token
            truncated=np.zeros(stop - start, dtype=bool),
        )
        return write_chunk(str(path), chunk)

    workers = max(1, min(os.cpu_count() or 1, 4))
    in_flight: list[Future[int]] = []
    done = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe-bench-build") as pool:
        for index in map(int, pending):
            start, stop = index * c, min((index + 1) * c, settings.n_cells)
            counts = source.read(start, stop).X  # h5py reads stay on this thread
            in_flight.append(pool.submit(make_and_write, index, start, stop, counts))
            while len(in_flight) >= 2 * workers:
                in_flight.pop(0).result()
                done += 1
                _progress(f"  store: {done}/{len(pending)} chunks", done, len(pending))
        for fut in in_flight:
            fut.result()
            done += 1
            _progress(f"  store: {done}/{len(pending)} chunks", done, len(pending))
    update_attrs(group, complete=True)
    open_store(path).require_complete()
    return path, time.perf_counter() - t0, len(pending)


def _read_var(h5ad: Path) -> Any:
    import h5py
    from anndata.io import read_elem

    with h5py.File(h5ad, "r") as f:
        return read_elem(f["var"])


def _progress(text: str, i: int, n: int) -> None:
    if sys.stdout.isatty():
        print("\r" + text, end="\n" if i == n else "", flush=True)
    elif i == n or i % max(1, n // 10) == 0:
        print(text, flush=True)


def estimate_disk(settings: BuildSettings) -> int:
    """Upper bound of the bytes the inputs of one size take (store uncompressed; h5ad ~8 bytes per value)."""
    store = (settings.n_layers + 1) * settings.n_cells * settings.width * np.dtype(DTYPE).itemsize
    h5ad = int(settings.n_cells * settings.genes_per_cell * 1.15 * 8) + settings.n_cells * 64
    return store + h5ad


# ---------------------------------------------------------------------------------------------------- worker
class RssSampler(threading.Thread):
    """Samples this process's RSS every ``interval`` s (timestamps from ``time.perf_counter``)."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = rss_now()
            if rss is not None:
                self.samples.append((time.perf_counter(), rss))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def peak_between(self, t0: float, t1: float) -> int | None:
        vals = [r for t, r in self.samples if t0 <= t <= t1]
        return max(vals) if vals else None


def task_shared() -> dict[str, Any]:
    from cellstrata.engine.input.datasets import CONTROL

    return {"context_key": CONTEXT_KEY, "control": CONTROL}


def make_tasks(names: list[str], settings: dict[str, dict[str, str]] | None = None) -> list[Any]:
    """The tasks, as ``cellstrata probe`` builds them: shared columns, then ``--set TASK.SETTING=VALUE``."""
    from cellstrata.probes.tasks import make_task

    shared = task_shared()
    settings = settings or {}
    return [make_task(n, {**shared, **TASKS.get(n, {})}, settings.get(n)) for n in names]


def cap_summary(caps: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: contexts, cells used / available (summed over contexts), the cap settings, per context."""
    out: dict[str, dict[str, Any]] = {}
    for key, c in caps.items():
        task, _, context = key.partition("/")
        t = out.setdefault(task, {"contexts": 0, "n_used": 0, "n_available": 0, "caps": {}, "per_context": {}})
        t["contexts"] += 1
        t["n_used"] += int(c.get("n_used", 0) or 0)
        t["n_available"] += int(c.get("n_available", 0) or 0)
        t["caps"].update({k: v for k, v in c.items() if k.startswith("max_") and not isinstance(v, (list, dict))})
        t["per_context"][context] = {k: v for k, v in c.items() if isinstance(v, (int, float, bool, str)) or v is None}
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this (fresh) process: ``probe(...)`` once; time, RSS, caps."""
    t_imp = time.perf_counter()
    import logging
    import warnings

    # the libraries the probes use count toward the process's baseline, not the measurement
    for module in ("anndata", "dask", "zarr", "sklearn.cluster", "sklearn.linear_model", "sklearn.neighbors", "igraph"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    from cellstrata.probes.runner import probe

    warnings.simplefilter("ignore", FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    tasks = make_tasks(spec["tasks"], spec.get("settings"))
    import_s = time.perf_counter() - t_imp
    rss_imports, peak_imports = rss_now(), peak_rss()
    # from here on the peak is the probe's own: the imports' temporaries do not count
    peak_scope = "probe (VmHWM reset after the imports)" if reset_peak_rss() else "process (imports included)"
    sampler = RssSampler(RSS_INTERVAL_S)
    sampler.start()
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "spec": spec,
        "import_s": import_s,
        "rss_after_imports": rss_imports,
        "peak_rss_imports": peak_imports,
        "peak_rss_scope": peak_scope,
    }
    try:
        res = probe(
            spec["store"],
            spec["h5ad"],
            tasks,
            layers=spec["layers"],
            pooling=POOLING,
            n_jobs=spec["n_jobs"],
            cache=spec["cache"],
            baseline=True,
        )
    except Exception as err:
        sampler.stop()
        result.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=8))
        result.update(wall_s=time.perf_counter() - t0, peak_rss=peak_rss())
        return result
    t1 = time.perf_counter()
    sampler.stop()
    tm = dict(res.timings)
    bounds = [0.0]
    for key in ("plan_s", "references_s", "layers_s", "baseline_s"):
        bounds.append(bounds[-1] + tm[key])
    bounds.append(t1 - t0)
    phase_peaks = {
        ph: sampler.peak_between(t0 + bounds[i], t0 + bounds[i + 1] + RSS_INTERVAL_S) for i, ph in enumerate(PHASES)
    }
    result.update(
        ok=True,
        wall_s=t1 - t0,
        timings=tm,
        peak_rss=peak_rss(),
        ru_maxrss=maxrss(),
        phase_peak_rss=phase_peaks,
        rss_samples=len(sampler.samples),
        caps=cap_summary(res.caps),
        n_result_rows=len(res.table),
        layers=list(res.layers),
    )
    return result


def run_worker(spec: dict[str, Any], work: Path, timeout: float | None) -> dict[str, Any]:
    """``worker(spec)`` in a fresh interpreter; its result, or the reason it failed."""
    spec_path, out_path, cmd = write_spec(spec, work, "probes", "probe-spec-")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=module_env())
        failure = None if proc.returncode == 0 else f"worker exited with status {proc.returncode}"
        stderr = proc.stderr
    except subprocess.TimeoutExpired as exc:
        failure, stderr = f"timed out after {timeout:.0f} s", str(exc.stderr or "")
    process_s = time.perf_counter() - t0
    result = read_result(spec, spec_path, out_path, failure, stderr)
    result["process_s"] = process_s
    return result


# ---------------------------------------------------------------------------------------------------- report
def _s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:,.0f}"


def _cells(c: dict[str, Any] | None) -> str:
    if not c:
        return "–"
    return f"{c['n_used']:,} of {c['n_available']:,}"


def _caps_text(c: dict[str, Any] | None) -> str:
    if not c or not c["caps"]:
        return "–"
    return ", ".join(
        f"{k.removeprefix('max_')}={'none' if v is None else f'{v:,}'}" for k, v in sorted(c["caps"].items())
    )


def task_table(sizes: list[dict[str, Any]]) -> str:
    lines = [
        "| cells | task | contexts | cells used (of available) | caps | s / layer | references s | baseline s | "
        "total s | peak RSS MiB | growth MiB | peak RSS in layer phase MiB |",
        "|--:|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for size in sizes:
        for name, r in size["single"].items():
            if not r.get("ok"):
                fail = f"failed: {r.get('error', '?')[:80]}"
                lines.append(f"| {size['n_cells']:,} | {name} | – | – | – | {fail} |" + " – |" * 6)
                continue
            c = r["caps"].get(name)
            tm = r["timings"]
            lines.append(
                f"| {size['n_cells']:,} | {name} | {c['contexts'] if c else '–'} | {_cells(c)} | {_caps_text(c)} | "
                f"{_s(tm['layers_s'])} | {_s(tm['references_s'])} | {_s(tm['baseline_s'])} | {_s(tm['total_s'])} | "
                f"{mib(r['peak_rss'])} | {mib(growth(r))} | {mib(r['phase_peak_rss'].get('layers'))} |"
            )
    return "\n".join(lines) + "\n"


TOTAL_RUNS = {
    "nocache": "all tasks, cache off",
    "cold": "all tasks, cache on, empty cache (computes + writes)",
    "cached": "all tasks, cache on, re-run (reads the cache)",
}


def total_table(sizes: list[dict[str, Any]]) -> str:
    lines = [
        "| cells | run | tasks | layers | evaluations computed / cached | plan s | references s | layers s | "
        "s / layer | baseline s | total s | Σ single-task estimate s | peak RSS MiB | growth MiB |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for size in sizes:
        for key, label in TOTAL_RUNS.items():
            r = size["total"].get(key)
            if r is None:
                continue
            if not r.get("ok"):
                fail = f"failed: {r.get('error', '?')[:80]}"
                lines.append(f"| {size['n_cells']:,} | {label} | {fail} |" + " – |" * 11)
                continue
            tm = r["timings"]
            n_eval = tm["layer_evaluations"]
            per_layer = tm["layers_s"] / n_eval if n_eval else None
            est = size.get("serial_estimate_s") if key == "nocache" else None
            lines.append(
                f"| {size['n_cells']:,} | {label} | {len(r['spec']['tasks'])} | {len(r['layers'])} | "
                f"{n_eval:.0f} / {tm['layer_evaluations_cached']:.0f} | {_s(tm['plan_s'])} | "
                f"{_s(tm['references_s'])} | "
                f"{_s(tm['layers_s'])} | {_s(per_layer)} | {_s(tm['baseline_s'])} | {_s(tm['total_s'])} | "
                f"{_s(est)} | {mib(r['peak_rss'])} | {mib(growth(r))} |"
            )
    return "\n".join(lines) + "\n"


def input_table(sizes: list[dict[str, Any]]) -> str:
    lines = [
        "| cells | layers | width | chunk cells | chunks | .h5ad MiB | store MiB | build s (h5ad / store) |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for size in sizes:
        i = size["inputs"]
        lines.append(
            f"| {size['n_cells']:,} | {i['n_layers'] + 1} | {i['width']} | {i['chunk_cells']:,} | {i['n_chunks']} | "
            f"{mib(i['h5ad_bytes'])} | {mib(i['store_bytes'])} | {_s(i['h5ad_build_s'])} / {_s(i['store_build_s'])} |"
        )
    return "\n".join(lines) + "\n"


def serial_estimate(single: dict[str, dict[str, Any]], n_layers: int) -> float | None:
    """Σ over tasks of references + (L + 1) x per-layer + baseline, from the single-task runs."""
    ok = [r for r in single.values() if r.get("ok")]
    if not ok:
        return None
    return float(
        sum(
            r["timings"]["references_s"] + (n_layers + 1) * r["timings"]["layers_s"] + r["timings"]["baseline_s"]
            for r in ok
        )
    )


# ---------------------------------------------------------------------------------------------------- main
def available_tasks(names: list[str], settings: dict[str, dict[str, str]]) -> tuple[list[str], dict[str, str]]:
    """Tasks that can be built here, and a note per skipped task (e.g. its module is not written yet)."""
    from cellstrata.engine.errors import CellstrataError

    ok, skipped = [], {}
    for n in names:
        try:
            make_tasks([n], settings)
        except ImportError as err:
            skipped[n] = f"module missing ({err})"
        except (CellstrataError, TypeError, ValueError) as err:
            skipped[n] = f"cannot build the task ({type(err).__name__}: {err})"
        else:
            ok.append(n)
    return ok, skipped


def measure_size(settings: BuildSettings, work: Path, tasks: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from cellstrata.engine.storage.store import open_store

    n = settings.n_cells
    print(f"\n== {n:,} cells: inputs in {work}")
    h5ad, h5ad_s, h5ad_new = build_h5ad(settings, work)
    print(
        f"  {'wrote' if h5ad_new else 'reusing'} {h5ad.name} ({du(h5ad) / 2**20:,.0f} MiB)"
        + (f" in {h5ad_s:.1f} s" if h5ad_new else "")
    )
    store_path, store_s, n_written = build_store(settings, h5ad, work)
    st = open_store(store_path)
    print(
        f"  {'wrote ' + str(n_written) + ' chunks of' if n_written else 'reusing'} {store_path.name} "
        f"({du(store_path) / 2**20:,.0f} MiB, {st.n_layers + 1} layers x {n:,} x {settings.width}, chunks of "
        f"{st.chunk_cells:,} cells)" + (f" in {store_s:.1f} s" if n_written else "")
    )
    inputs = {
        "h5ad": str(h5ad),
        "store": str(store_path),
        "n_layers": settings.n_layers,
        "width": settings.width,
        "n_genes": settings.n_genes,
        "genes_per_cell": settings.genes_per_cell,
        "chunk_cells": st.chunk_cells,
        "n_chunks": int(st.done.size),
        "h5ad_bytes": du(h5ad),
        "h5ad_build_s": h5ad_s if h5ad_new else None,
        "store_build_s": store_s if n_written else None,
        "store_chunks_written": n_written,
        "signal_strength": [round(float(s), 3) for s in signal_strength(settings.n_layers)],
    }
    _clear_cache(store_path)
    inputs["store_bytes"] = du(store_path)
    base = {"store": str(store_path), "h5ad": str(h5ad), "settings": settings_of(args)}
    L = settings.n_layers
    layer = args.probe_layer if args.probe_layer is not None else L
    layer = layer % (L + 1)
    timeout = args.timeout or None

    total_layers: str | list[int] = "all" if args.total_layers == "all" else ints(args.total_layers)
    n_total = L + 1 if total_layers == "all" else len({x % (L + 1) for x in total_layers})
    cache_layers = {"layer": [layer], "all": total_layers}.get(args.cache_check)

    single: dict[str, dict[str, Any]] = {}
    for name in tasks:
        spec = {**base, "tasks": [name], "layers": [layer], "n_jobs": 1, "cache": False}
        r = run_worker(spec, scratch_dir(work), timeout)
        single[name] = r
        _print_run(f"{name}, layer {layer}", r, name)
    size: dict[str, Any] = {
        "n_cells": n,
        "inputs": inputs,
        "probe_layer": layer,
        "total_layers": total_layers,
        "cache_layers": cache_layers,
        "single": single,
        "total": {},
    }
    size["serial_estimate_s"] = serial_estimate(single, n_total)
    good = [t for t in tasks if single[t].get("ok")]
    if not good:
        print("  no task ran alone; skipping the all-task runs")
        return size
    runs = [("nocache", False, total_layers, args.n_jobs)]
    if cache_layers is not None:
        runs += [("cold", True, cache_layers, args.n_jobs), ("cached", True, cache_layers, args.n_jobs)]
    for key, cache, layers, n_jobs in runs:
        if key == "cold":
            _clear_cache(store_path)
        spec = {**base, "tasks": good, "layers": layers, "n_jobs": n_jobs, "cache": cache}
        r = run_worker(spec, scratch_dir(work), timeout)
        size["total"][key] = r
        _print_run(TOTAL_RUNS[key], r, None)
    _clear_cache(store_path)
    return size


def settings_of(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    from cellstrata.probes.tasks import parse_settings

    return parse_settings(args.set)


def _clear_cache(store_path: Path) -> None:
    from cellstrata.probes.runner import CACHE_GROUP

    remove_owned(store_path / CACHE_GROUP)


def _print_run(label: str, r: dict[str, Any], task: str | None) -> None:
    if print_failure(label, r, tail=6):
        return
    tm = r["timings"]
    caps = r["caps"]
    used = _cells(caps.get(task)) if task else f"{sum(c['n_used'] for c in caps.values()):,} (sum over tasks)"
    print(
        f"  [{label}] layers {_s(tm['layers_s'])} s ({tm['layer_evaluations']:.0f} computed, "
        f"{tm['layer_evaluations_cached']:.0f} cached), references {_s(tm['references_s'])} s, baseline "
        f"{_s(tm['baseline_s'])} s, total {_s(tm['total_s'])} s; peak RSS {mib(r['peak_rss'])} MiB "
        f"(+{mib(growth(r))} over imports); cells {used}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default=None, help=f"cells per store, comma list (default {','.join(map(str, SIZES))})")
    ap.add_argument("--quick", action="store_true", help="smoke run: 10k cells, 5 layers (4 blocks)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma list (default {','.join(TASKS)})")
    ap.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"blocks L; the store has L+1 layers (default {N_LAYERS}, --quick {QUICK_LAYERS})",
    )
    ap.add_argument("--width", type=int, default=WIDTH, help=f"feature width W (default {WIDTH})")
    ap.add_argument("--n-genes", type=int, default=N_GENES, help=f"genes in the .h5ad (default {N_GENES})")
    ap.add_argument(
        "--genes-per-cell",
        type=float,
        default=GENES_PER_CELL,
        help=f"median expressed genes per cell (default {GENES_PER_CELL})",
    )
    ap.add_argument(
        "--probe-layer", type=int, default=None, help="the layer of the single-task runs (default: the last)"
    )
    ap.add_argument("--n-jobs", type=int, default=None, help="n_jobs of the all-task runs (default: the runner's)")
    ap.add_argument(
        "--total-layers",
        default="all",
        help="layers of the all-task runs: 'all' (default) or indices, e.g. 0,6,12 (per-layer costs come from the\n"
        "single-task runs either way)",
    )
    ap.add_argument(
        "--cache-check",
        choices=("layer", "all", "none"),
        default="layer",
        help="the cache=True pair (empty cache, then re-run): all tasks on the probe layer (default), on the\n"
        "--total-layers (one more full computation per size), or none",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TASK.SETTING=VALUE",
        help="a task setting, as `cellstrata probe --set` (repeatable), e.g. clustering.max_cells=20000",
    )
    ap.add_argument("--timeout", type=float, default=0, help="seconds per measurement, 0 = none (default 0)")
    ap.add_argument(
        "--workdir",
        default=None,
        help=f"keep the inputs here and reuse them; the stores go to its {SCRATCH}/ (default: a temp dir, removed)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON and Markdown go")
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, worker)

    sizes = ints(args.sizes) if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
    n_layers = args.layers or (QUICK_LAYERS if args.quick else N_LAYERS)
    wanted = [t.strip().lower().replace("-", "_") for t in args.tasks.split(",") if t.strip()]
    info = machine_info(
        ("numpy", "scipy", "scikit-learn", "pandas", "zarr", "anndata", "dask", "igraph", "threadpoolctl")
    )
    t_start = time.perf_counter()
    load0, psi0 = loadavg(), cpu_pressure()
    settings_arg = settings_of(args)
    unknown = sorted(set(settings_arg) - set(wanted))
    if unknown:
        ap.error(f"--set names task(s) {', '.join(unknown)} that are not in --tasks")
    tasks, skipped = available_tasks(wanted, settings_arg)
    print(
        f"device: {info['device_name']}, {info['memory_gib']} GiB; python {info['python']}, numpy "
        f"{info['versions']['numpy']}, scikit-learn {info['versions']['scikit-learn']}"
    )
    print(
        f"sizes {', '.join(f'{n:,}' for n in sizes)}; store {n_layers + 1} layers x {args.width} {DTYPE}, pooling "
        f"{POOLING}; tasks {', '.join(tasks) or 'none'} (per {CONTEXT_KEY})"
    )
    for name, why in skipped.items():
        print(f"note: task {name} skipped: {why}")
    if not tasks:
        print("no task can run; nothing to measure")
        return 1
    if load0 is not None and info["cpu_count"] and load0 > info["cpu_count"] * 0.75:
        print(f"note: load average {load0} on {info['cpu_count']} CPUs: other work competes for the cores")

    own_work = args.workdir is None
    work = make_temp_dir("cellstrata-probes-") if own_work else Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    settings = [BuildSettings(n, n_layers, args.width, args.n_genes, args.genes_per_cell, args.seed) for n in sizes]
    need = sum(estimate_disk(s) for s in settings if not store_location(s, work).exists())
    free = shutil.disk_usage(work).free
    print(f"work folder {work}: inputs need up to {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    if need > free:
        print("note: the inputs may not fit on this disk (the store estimate is uncompressed; zstd saves ~10%)")

    results: list[dict[str, Any]] = []
    context = {
        "argv": sys.argv[1:] if argv is None else argv,
        "info": info,
        "t_start": t_start,
        "load0": load0,
        "psi0": psi0,
        "tasks": tasks,
        "skipped": skipped,
        "task_settings": settings_arg,
        "n_layers": n_layers,
        "sizes": sizes,
    }
    try:
        for s in settings:
            results.append(measure_size(s, work, tasks, args))
            if not args.no_save and len(results) < len(settings):
                save(results, args, context, final=False)  # a long run that is cut short keeps what it measured
    finally:
        if own_work:
            remove_owned(work)
    print()
    print(input_table(results))
    print(task_table(results))
    print(total_table(results))
    all_ok = all(r.get("ok") for s in results for r in [*s["single"].values(), *s["total"].values()])
    if not args.no_save:
        save(results, args, context, final=True)
    print(f"done in {(time.perf_counter() - t_start) / 60:.1f} min; all runs ok: {'yes' if all_ok else 'NO'}")
    return 0 if all_ok else 1


def save(results: list[dict[str, Any]], args: argparse.Namespace, ctx: dict[str, Any], *, final: bool) -> None:
    """``probes-cpu-<date>.{json,md}`` under ``--results`` (rewritten after every size; ``complete`` once all ran)."""
    info, tasks, skipped, n_layers = ctx["info"], ctx["tasks"], ctx["skipped"], ctx["n_layers"]
    load1, psi1 = loadavg(), cpu_pressure()
    elapsed = time.perf_counter() - ctx["t_start"]
    all_ok = all(r.get("ok") for s in results for r in [*s["single"].values(), *s["total"].values()])
    stamp = utc_now()
    command = command_line("probes", ctx["argv"])
    payload = {
        "benchmark": "probes",
        "created": stamp.isoformat(timespec="seconds"),
        "command": command,
        "complete": final,
        "seconds": elapsed,
        "machine": info,
        "loadavg_1min": [ctx["load0"], load1],
        "cpu_pressure_some_avg60_pct": [ctx["psi0"], psi1],
        "settings": {
            "quick": args.quick,
            "sizes": ctx["sizes"],
            "n_layers": n_layers,
            "width": args.width,
            "dtype": DTYPE,
            "pooling": POOLING,
            "compression": COMPRESSION,
            "n_genes": args.n_genes,
            "genes_per_cell": args.genes_per_cell,
            "tasks": tasks,
            "skipped_tasks": skipped,
            "task_columns": {t: TASKS.get(t, {}) for t in tasks},
            "shared": task_shared(),
            "task_settings": ctx["task_settings"],
            "n_jobs_all_tasks": args.n_jobs,
            "total_layers": args.total_layers,
            "cache_check": args.cache_check,
            "probe_layer": args.probe_layer,
            "rss": "peak = VmHWM of the measurement's own fresh process, reset after its imports (so the peak of "
            "the probe call, libraries included); growth = peak - RSS after imports; phase peaks from a "
            f"{RSS_INTERVAL_S * 1000:.0f} ms VmRSS sampler",
            "seed": args.seed,
        },
        "sizes": results,
        "all_ok": all_ok,
    }
    done = ", ".join(f"{r['n_cells']:,}" for r in results)
    head = (
        f"# Probe runner: time and peak memory per layer and task ({stamp.strftime('%Y-%m-%d')}, "
        f"{info['device_name']})\n\n`{command}`\n\n"
        + ("" if final else f"**Incomplete: written after the sizes {done}; the run went on.**\n\n")
        + f"Synthetic stores: {n_layers + 1} layers x {args.width} {DTYPE}, pooling `{POOLING}`; "
        f"tasks {', '.join(tasks)} with their default caps"
        + (f" and {ctx['task_settings']}" if ctx["task_settings"] else "")
        + f", per `{CONTEXT_KEY}`"
        + (f"; skipped: {', '.join(f'{k} ({v})' for k, v in skipped.items())}" if skipped else "")
        + f". Python {info['python']}, numpy {info['versions']['numpy']}, scikit-learn "
        f"{info['versions']['scikit-learn']}; 1-min load average {ctx['load0']}-{load1}; "
        f"{elapsed / 60:.1f} min in all. Peak RSS: the measurement process's `VmHWM`, reset after its imports; "
        "growth: over its RSS after the imports.\n\n"
    )
    body = (
        head
        + "## Inputs\n\n"
        + input_table(results)
        + "\n## Each task alone on one layer (`n_jobs=1`, `cache=False`)\n\n"
        + task_table(results)
        + "\n## All tasks\n\n"
        + total_table(results)
    )
    note = "" if final else " (so far)"
    save_results(args.results, result_name("probes", "cpu", stamp), payload, body, default=json_default, note=note)


if __name__ == "__main__":
    sys.exit(main())
