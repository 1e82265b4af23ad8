"""Time and peak memory of ``cellstrata.extract`` against the number of cells, and 1 vs 2 local Dask workers.

Does extraction stay linear in time and flat in memory as the input grows, and what do local Dask
workers (``--cluster local:N``) buy on this machine? The model is scGPT ``tiny`` (4 blocks x 64, random
weights from ``get_family("scgpt").init_checkpoint("tiny", DIR)``), every pooling it offers
(``poolings=["all"]``: mean, max, cls, official), float16, zstd, the default chunking and token budget.

Inputs, written once per size into the work folder (reused when present): synthetic raw counts,
``engine.datasets.write_synthetic_h5ad(path, n_cells, n_genes=2000, genes_per_cell=GENES_PER_CELL)``
(median expressed genes per cell, lognormal spread 0.5; streamed to disk, never held in memory), and
the random tiny checkpoint. Cheap cells (~63 tokens each) keep the 500k-cell run to ~8 min on 2 quiet
cores: the point is how cost grows with the cell count, which the genes per cell do not change.

Measurements, each in a fresh Python process (``python -m benchmarks.scale --worker SPEC``) that
imports the libraries first, then times one call, end to end, into a fresh store:

    cellstrata.extract(h5ad, model="scgpt", checkpoint=DIR, out=STORE, poolings=["all"], dtype="float16",
                       device="cpu", progress=False, cluster=None | "local:1" | "local:2")

1. single process (``cluster=None``) at every size (``--sizes``, default 20,000 / 100,000 / 500,000);
2. ``local:1`` and ``local:2`` at one size (``--cluster-size``, default 100,000): the driver starts a
   Dask ``LocalCluster`` of N worker processes (1 Dask thread each, ``cpu_count // N`` torch threads
   meant; the torch threads each worker really uses are asked of it during the run and reported),
   plans the store on a worker and submits one task per shard of whole chunks;
3. the same two clusters with ``MALLOC_TRIM_THRESHOLD_`` unset for their workers ("no-trim";
   ``--skip-no-trim`` leaves them out): Dask's nannies start every worker process with
   ``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``), which on this workload
   halves the forward pass's speed (glibc returns freed memory to the system after every batch and
   faults it back in); the measurement process sets that config key to ``None`` before ``extract``
   creates the cluster. What the engine would gain by doing the same.

At the cluster size all runs go round robin ``--repeats`` times (default 2) and the fastest run of each
kind is reported (every run is saved): on a shared machine one run can meet other work that the next
does not.

Reported per run: wall seconds of the ``extract`` call (model loading, store planning and, for
clusters, the cluster's start and stop included), the store's own run time (``telemetry["seconds"]``:
the chunks only) and the difference ("setup": input opened, model loaded, first cells checked, store
created, Dask client or cluster started and stopped), cells/s, the store's telemetry (tokens/s,
padding, forward / input-wait / writer-wait seconds, float16 overflows, for clusters workers, shards,
worker processes and model loads), store size on disk, and:

- peak RSS of the measurement process: its ``VmHWM``, **reset after its imports**
  (``/proc/self/clear_refs``), so it is the peak during ``extract``, libraries included. For a cluster
  run this is the driver, which never loads the model;
- for cluster runs, the peak RSS of each Dask worker process: the ``VmHWM`` of the driver's child
  processes that run ``multiprocessing.spawn`` (the LocalCluster's nannies live in the driver, so the
  workers are its children), read every 0.2 s until they exit (``VmHWM`` only grows, so the last read is
  the peak), and as a cross-check ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` after ``extract`` returned
  (the cluster is closed and its processes reaped): the largest peak of any finished child, where Linux
  counts for each child the larger of its own peak and the driver's peak when it was started (the
  ``exec`` inherits the high-water mark), so it is an upper bound of the largest worker;
- CPU seconds of the call (user + system, the Dask worker processes included), and the "other load":
  the machine's busy CPU time during the measurement (``/proc/stat``) minus the measurement's own, per
  second of it: how many of the cores other work took meanwhile. Times measured with other load
  near a whole core are not comparable with quiet ones (torch's intra-op threads wait for each other
  when one of them is descheduled).

Every store is checked: complete (every chunk's ``done`` flag, the ``complete`` attribute, telemetry
cells = input cells), and the ``local:1`` / ``local:2`` stores are compared with the single-process
store of the same size (the first one), array by array (every pooling, layer by layer, NaN equal to
NaN; ``obs_names``, ``n_tokens``, ``truncated``, ``done``), as are repeated single-process runs:
"identical: yes" means bit-identical.

Ratios in the table: time per cell relative to the smallest size (linear => ~1.0; the end-to-end figure
also carries the fixed setup, which weighs most at the smallest size), peak RSS relative to the smallest
size (bounded => ~1.0), and each cluster run's speed relative to the single process and to ``local:1``.
Results (JSON with machine info, load average, command line and settings; the tables as Markdown) go to
``benchmarks/results/scale-cpu-<date>.{json,md}``, rewritten after every measurement (``"complete":
false`` until the last one), so a long run that is cut short keeps what it measured.

    python -m benchmarks.scale                 # 20k, 100k, 500k cells + the clusters at 100k: ~35 min on 2 cores
    python -m benchmarks.scale --quick         # smoke run: 2,000 and 5,000 cells, clusters at 2,000; < 2 min
    python -m benchmarks.scale --sizes 50000,200000 --cluster-size 50000 --workdir /data/scale-bench --keep
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as a file (``cellstrata bench`` does): the same as ``python -m benchmarks.scale``
    _path = os.pathsep.join(filter(None, (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))))
    os.execve(
        sys.executable, [sys.executable, "-m", "benchmarks.scale", *sys.argv[1:]], {**os.environ, "PYTHONPATH": _path}
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
    status_bytes,
)
from .harness import (
    RESULTS,
    ROOT,
    command_line,
    cpu_pressure,
    git_commit,
    json_default,
    loadavgs,
    machine_info,
    module_env,
    read_result,
    save_results,
    utc_now,
    worker_main,
    write_spec,
)

SIZES = (20_000, 100_000, 500_000)
QUICK_SIZES = (2_000, 5_000)
CLUSTER_SIZE = 100_000
QUICK_CLUSTER_SIZE = 2_000
CLUSTERS = ("local:1", "local:2")
# Dask's nannies start every worker process with MALLOC_TRIM_THRESHOLD_=65536 (its default
# ``distributed.nanny.pre-spawn-environ``); on this CPU workload that halves the forward's speed. The
# "no-trim" runs unset it in the driver's Dask config before ``extract`` starts the cluster
# (--skip-no-trim skips them)
NO_TRIM_SUFFIX = " no-trim"
NO_TRIM_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
REPEATS = 2
MODEL = "scgpt"
PRESET = "tiny"
POOLINGS = ("all",)
DTYPE = "float16"
DEVICE = "cpu"
N_GENES = 2000
# median expressed genes per cell (lognormal spread 0.5, cut to the tiny model's 256-token context):
# ~63 tokens a cell, cheap enough for 500k cells in ~8 min on 2 quiet cores (1,100 cells/s), long enough
# that the forward pass (95% of the run), not per-cell Python, dominates
GENES_PER_CELL = 50.0
SEED = 0
# the benchmark's own (marked) folder inside --workdir: the stores and partial inputs; only what carries
# the marker is ever deleted (common.remove_owned), so a user's folder named like a store is left alone
SCRATCH = "scale-work"
CHILD_INTERVAL_S = 0.2
COMPARE_ARRAYS = ("obs_names", "n_tokens", "truncated", "done")


# ---------------------------------------------------------------------------------------------------- machine
def busy_cpu_s() -> float | None:
    """CPU-seconds all CPUs of the machine have been busy since boot (``/proc/stat``: all but idle, iowait)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return None


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------------------- inputs
def scratch_dir(work: Path) -> Path:
    """The benchmark's own folder in ``work`` (marked): partial inputs and the stores go there."""
    return make_owned_dir(work / SCRATCH)


def partial_path(work: Path, name: str) -> Path:
    """Where the input ``name`` is written before it is renamed into ``work``: free, inside the scratch folder."""
    tmp = scratch_dir(work) / f"{name}.partial"
    remove_owned(tmp)  # a leftover of a cut-short run; always owned
    return tmp


def build_checkpoint(work: Path) -> tuple[Path, float | None]:
    """The random tiny scGPT checkpoint (written once; ``init_checkpoint`` is deterministic per seed)."""
    from cellstrata.engine.models import get_family

    folder = work / f"{MODEL}-{PRESET}-seed{SEED}"
    if folder.exists():
        return folder, None
    t0 = time.perf_counter()
    tmp = partial_path(work, folder.name)
    get_family(MODEL).init_checkpoint(PRESET, tmp, seed=SEED)
    tmp.rename(folder)
    return folder, time.perf_counter() - t0


def build_h5ad(n_cells: int, genes_per_cell: float, work: Path) -> tuple[Path, float | None]:
    """``n_cells`` synthetic cells as an ``.h5ad`` (written once, under a temporary name until complete)."""
    from cellstrata.engine.input.datasets import write_synthetic_h5ad

    path = work / f"cells-{n_cells}-g{genes_per_cell:g}-n{N_GENES}-seed{SEED}.h5ad"
    if path.exists():
        return path, None
    tmp = partial_path(work, path.name)
    t0 = time.perf_counter()
    write_synthetic_h5ad(tmp, n_cells, N_GENES, genes_per_cell=genes_per_cell, seed=SEED)
    tmp.rename(path)
    return path, time.perf_counter() - t0


def tokens_per_cell(h5ad: Path) -> dict[str, float]:
    """Expressed genes per cell of the input (from the CSR ``indptr``): median, p10, p90, max."""
    import h5py

    with h5py.File(h5ad, "r") as f:
        nnz = np.diff(f["X"]["indptr"][:])
    return {
        "median": float(np.median(nnz)),
        "p10": float(np.percentile(nnz, 10)),
        "p90": float(np.percentile(nnz, 90)),
        "max": int(nnz.max()),
    }


# ---------------------------------------------------------------------------------------------------- worker
def _torch_threads() -> int:
    """Run on each Dask worker: the torch intra-op threads its forward passes use."""
    import torch

    return torch.get_num_threads()


class ChildWatcher(threading.Thread):
    """Reads the ``VmHWM`` of this process's children every ``interval`` s; keeps the last value per pid.

    It also samples this process's own RSS (a timeline: a leak climbs, a transient peak does not).

    With ``n_workers``, it also asks the cluster's client (the default client ``extract`` created) once
    for each worker's torch thread count, as soon as all ``n_workers`` workers have registered.
    """

    def __init__(self, interval: float, n_workers: int = 0) -> None:
        super().__init__(daemon=True, name="child-watcher")
        self.interval = interval
        self.me = os.getpid()
        self.children: dict[int, dict[str, Any]] = {}
        self.n_workers = n_workers
        self.torch_threads: dict[str, int] | None = None
        self.own_rss: list[tuple[float, int]] = []  # (seconds since start, this process's RSS)
        self.t0 = time.perf_counter()
        self._stop_event = threading.Event()

    def _probe_threads(self) -> None:
        from distributed import default_client

        try:
            got = default_client().run(_torch_threads)
        except Exception:  # no client yet, or a worker is still starting: try again on the next scan
            return
        if len(got) >= self.n_workers:
            self.torch_threads = dict(got)

    def _scan(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid != self.me:
                    continue
                pid = int(entry.name)
                hwm = status_bytes("VmHWM", pid)
                rec = self.children.get(pid)
                if rec is None:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    rec = self.children[pid] = {"pid": pid, "cmdline": cmd[:200], "peak_rss": None}
                if hwm is not None:
                    rec["peak_rss"] = max(rec["peak_rss"] or 0, hwm)
            except (OSError, ValueError, IndexError):
                continue  # exited between the listing and the read

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = rss_now()
            if rss is not None:
                self.own_rss.append((time.perf_counter() - self.t0, rss))
            self._scan()
            if self.n_workers and self.torch_threads is None and self.workers():
                self._probe_threads()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def workers(self) -> list[dict[str, Any]]:
        """Children that ran ``multiprocessing.spawn`` (the Dask worker processes), by pid."""
        return [c for c in sorted(self.children.values(), key=lambda c: c["pid"]) if "spawn_main" in c["cmdline"]]


def _timeline(samples: list[tuple[float, int]], wall: float) -> dict[str, Any]:
    """RSS samples summarised: median, and the largest sample in each tenth of the run (does it climb?)."""
    if not samples:
        return {}
    t = np.array([x for x, _ in samples])
    rss = np.array([r for _, r in samples], dtype=np.float64)
    tenth = np.minimum((10 * t / max(wall, 1e-9)).astype(int), 9)
    by_tenth = [float(rss[tenth == k].max()) if (tenth == k).any() else None for k in range(10)]
    return {"samples": len(samples), "median": float(np.median(rss)), "max_by_tenth": by_tenth}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this (fresh) process: ``extract`` once; time, RSS, telemetry."""
    t_imp = time.perf_counter()
    import logging
    import warnings

    import anndata  # noqa: F401
    import dask
    import distributed  # noqa: F401
    import h5py  # noqa: F401
    import torch
    import zarr  # noqa: F401

    import cellstrata as cs
    import cellstrata.engine.cluster
    import cellstrata.engine.device.pipeline
    import cellstrata.engine.models.scgpt

    warnings.simplefilter("ignore", FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    import_s = time.perf_counter() - t_imp
    rss_imports = rss_now()
    # from here on the peak is the extraction's own: the imports' temporaries do not count
    peak_scope = "extract (VmHWM reset after the imports)" if reset_peak_rss() else "process (imports included)"
    n_workers = int(spec["cluster"].partition(":")[2]) if spec["cluster"] else 0
    watcher = ChildWatcher(CHILD_INTERVAL_S, n_workers)
    watcher.start()
    result: dict[str, Any] = {
        "spec": spec,
        "import_s": import_s,
        "rss_after_imports": rss_imports,
        "peak_rss_scope": peak_scope,
        "torch_threads": torch.get_num_threads(),
        "children_maxrss_before": maxrss(resource.RUSAGE_CHILDREN),
    }
    if spec.get("dask_config"):
        dask.config.set(spec["dask_config"])  # read by the nannies that extract's LocalCluster creates here
    cpu0 = _cpu_s(resource.RUSAGE_SELF) + _cpu_s(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        store = cs.extract(
            spec["h5ad"],
            model=MODEL,
            checkpoint=spec["checkpoint"],
            out=spec["out"],
            poolings=list(POOLINGS),
            dtype=DTYPE,
            device=DEVICE,
            progress=False,
            cluster=spec["cluster"],
        )
    except Exception as err:
        watcher.stop()
        result.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=12))
        result.update(wall_s=time.perf_counter() - t0, peak_rss=peak_rss())
        return result
    wall = time.perf_counter() - t0
    peak = peak_rss()
    children_maxrss = maxrss(resource.RUSAGE_CHILDREN)  # the cluster is closed: its processes are reaped
    cpu_s = _cpu_s(resource.RUSAGE_SELF) + _cpu_s(resource.RUSAGE_CHILDREN) - cpu0
    watcher.stop()
    tele = dict(store.attrs.get("telemetry") or {})
    result.update(
        ok=True,
        wall_s=wall,
        run_s=tele.get("seconds"),
        cpu_s=cpu_s,
        setup_s=wall - tele["seconds"] if "seconds" in tele else None,
        peak_rss=peak,
        children_maxrss=children_maxrss,
        workers=watcher.workers(),
        worker_torch_threads=watcher.torch_threads,
        rss_timeline=_timeline(watcher.own_rss, wall),
        other_children=[c for c in watcher.children.values() if "spawn_main" not in c["cmdline"]],
        telemetry=tele,
    )
    return result


def run_worker(spec: dict[str, Any], work: Path, timeout: float | None) -> dict[str, Any]:
    """``worker(spec)`` in a fresh interpreter (its own process group); its result, or why it failed."""
    spec_path, out_path, cmd = write_spec(spec, work, "scale", "scale-spec-")
    commit = git_commit(short=10)  # what this run imports
    load0, psi0 = loadavgs(), cpu_pressure()
    cpu0, busy0 = _cpu_s(resource.RUSAGE_CHILDREN), busy_cpu_s()
    t0 = time.perf_counter()
    failure = None
    # its own session: a run that times out is killed with its Dask workers
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=module_env()
    ) as proc:
        try:
            _, stderr = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                failure = f"worker exited with status {proc.returncode}"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
            failure = f"timed out after {timeout:.0f} s"
    process_s = time.perf_counter() - t0
    # CPU time of the measurement process and its reaped children (the Dask workers), and of everything else
    process_cpu_s = _cpu_s(resource.RUSAGE_CHILDREN) - cpu0
    busy1 = busy_cpu_s()
    other = None if busy0 is None or busy1 is None else max(busy1 - busy0 - process_cpu_s, 0.0) / process_s
    result = read_result(spec, spec_path, out_path, failure, stderr)
    result.update(
        process_s=process_s,
        git_commit=commit,
        process_cpu_s=process_cpu_s,
        other_load_cores=other,
        loadavg_before=load0,
        loadavg_after=loadavgs(),
        cpu_pressure=[psi0, cpu_pressure()],
    )
    return result


# ---------------------------------------------------------------------------------------------------- checks
def check_store(path: Path, n_cells: int) -> dict[str, Any]:
    """Is the store complete: every ``done`` flag, the ``complete`` attribute, telemetry cells = input cells."""
    import cellstrata as cs

    try:
        st = cs.open_store(path)
        done = st.done
        tele = st.attrs.get("telemetry") or {}
        out = {
            "chunks": int(done.size),
            "chunks_done": int(done.sum()),
            "complete_attr": bool(st.attrs.get("complete")),
            "n_cells": st.n_cells,
            "telemetry_cells": tele.get("cells"),
            "poolings": st.poolings,
            "chunk_cells": st.chunk_cells,
        }
    except Exception as err:
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    out["ok"] = bool(
        done.all() and out["complete_attr"] and out["n_cells"] == n_cells and out["telemetry_cells"] == n_cells
    )
    return out


def compare_stores(a: Path, b: Path) -> dict[str, Any]:
    """Bit-identity of two stores: every pooling layer by layer (NaN == NaN) and the per-cell arrays."""
    import cellstrata as cs

    sa, sb = cs.open_store(a), cs.open_store(b)
    arrays: dict[str, bool] = {}
    if sorted(sa.poolings) != sorted(sb.poolings):
        return {"identical": False, "arrays": {}, "why": f"poolings {sa.poolings} vs {sb.poolings}"}
    for name in sa.poolings:
        xa, xb = sa.group["pooled"][name], sb.group["pooled"][name]
        same = xa.shape == xb.shape and xa.dtype == xb.dtype
        for layer in range(xa.shape[0]):
            if not same:
                break
            same = bool(np.array_equal(xa[layer], xb[layer], equal_nan=True))
        arrays[f"pooled/{name}"] = same
    for name in COMPARE_ARRAYS:
        ya, yb = np.asarray(sa.group[name][:]), np.asarray(sb.group[name][:])
        arrays[name] = ya.shape == yb.shape and bool(np.array_equal(ya, yb))
    return {"identical": all(arrays.values()), "arrays": arrays}


# ---------------------------------------------------------------------------------------------------- report
def _s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}" if x < 100 else f"{x:,.0f}"


def _r(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _worker_peaks(r: dict[str, Any]) -> list[int]:
    return [w["peak_rss"] for w in r.get("workers", []) if w.get("peak_rss")]


def single_rows(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The single-process runs with their ratios to the smallest size."""
    rows = [s["single"] | {"n_cells": s["n_cells"], "store_bytes": s.get("store_bytes")} for s in sizes]
    base = next((r for r in rows if r.get("ok")), None)
    for r in rows:
        if not r.get("ok") or base is None:
            continue
        n, n0 = r["n_cells"], base["n_cells"]
        r["time_per_cell_ratio"] = _ratio(r["wall_s"] / n, base["wall_s"] / n0)
        r["run_time_per_cell_ratio"] = _ratio((r["run_s"] or 0) / n, (base["run_s"] or 0) / n0)
        r["peak_rss_ratio"] = _ratio(r["peak_rss"], base["peak_rss"])
        r["peak_growth_ratio"] = _ratio(growth(r), growth(base))
    return rows


def _other(r: dict[str, Any]) -> str:
    x = r.get("other_load_cores")
    return "–" if x is None else f"{x:.2f}"


def _cpu_per_k(r: dict[str, Any], n: int) -> str:
    return "–" if r.get("cpu_s") is None else f"{1000 * r['cpu_s'] / n:.2f}"


def single_table(sizes: list[dict[str, Any]]) -> str:
    lines = [
        "| cells | seconds | setup s | run s | cells/s | tokens/s | time/cell vs smallest (end to end / run) | "
        "CPU s / 1k cells | peak RSS MiB | growth MiB | peak RSS vs smallest | median RSS MiB | "
        "RSS max in 1st / last tenth MiB | store MiB | bytes/cell | other load (cores) | complete |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in single_rows(sizes):
        n = r["n_cells"]
        if not r.get("ok"):
            lines.append(f"| {n:,} | failed: {str(r.get('error', '?'))[:100]} |" + " – |" * 15)
            continue
        t = r["telemetry"]
        sb = r.get("store_bytes")
        tl = r.get("rss_timeline") or {}
        tenths = tl.get("max_by_tenth") or [None]
        lines.append(
            f"| {n:,} | {_s(r['wall_s'])} | {_s(r['setup_s'])} | {_s(r['run_s'])} | {n / r['wall_s']:,.0f} | "
            f"{t.get('tokens_per_s', 0):,.0f} | {_r(r.get('time_per_cell_ratio'))} / "
            f"{_r(r.get('run_time_per_cell_ratio'))} | {_cpu_per_k(r, n)} | {mib(r['peak_rss'])} | "
            f"{mib(growth(r))} | {_r(r.get('peak_rss_ratio'))} | {mib(tl.get('median'))} | "
            f"{mib(tenths[0])} / {mib(tenths[-1])} | {mib(sb)} | "
            f"{'–' if sb is None else f'{sb / n:,.0f}'} | {_other(r)} | "
            f"{'yes' if r.get('check', {}).get('ok') else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def cluster_rows(size: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("single process", size["single"]), *size["clusters"].items()]


def _procs(r: dict[str, Any], workers: int | None, cpu_count: int) -> str:
    """``N × T``: worker processes × the torch threads each reported (``?`` when the probe got no answer)."""
    threads = r.get("worker_torch_threads")
    if not workers:
        return "–"
    if not threads:
        return f"{workers} × ? (meant {cpu_count // workers})"
    values = sorted(set(threads.values()))
    return f"{workers} × {'/'.join(map(str, values))}"


def cluster_table(size: dict[str, Any], cpu_count: int) -> str:
    """Speed of each run at the cluster size, relative to the single process and to ``local:1``."""
    n = size["n_cells"]
    single = size["single"]
    lines = [
        "| run | processes × torch threads | seconds | setup s | run s | cells/s | "
        "speed vs single (end to end / run) | speed vs local:1 of the same setting (end to end / run) | "
        "CPU s / 1k cells | "
        "other load (cores) | identical |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for label, r in cluster_rows(size):
        if not r.get("ok"):
            lines.append(f"| {label} | failed: {str(r.get('error', '?'))[:100]} |" + " – |" * 9)
            continue
        workers = (r["telemetry"].get("cluster") or {}).get("workers")
        procs = f"1 × {r.get('torch_threads')}" if label == "single process" else _procs(r, workers, cpu_count)
        vs = []
        local1 = size["clusters"].get("local:1" + (NO_TRIM_SUFFIX if label.endswith(NO_TRIM_SUFFIX) else ""), {})
        for ref in (single, local1):
            if label == "single process" or not ref.get("ok") or ref is r:
                vs.append("–")
                continue
            vs.append(f"{_r(_ratio(ref['wall_s'], r['wall_s']))} / {_r(_ratio(ref['run_s'], r['run_s']))}")
        if label == "single process":
            ident = "(reference)"
        else:
            cmp = size.get("identical", {}).get(label)
            ident = "–" if cmp is None else ("yes" if cmp["identical"] else "NO")
        lines.append(
            f"| {label} | {procs} | {_s(r['wall_s'])} | {_s(r['setup_s'])} | {_s(r['run_s'])} | "
            f"{n / r['wall_s']:,.0f} | {vs[0]} | {vs[1]} | {_cpu_per_k(r, n)} | {_other(r)} | {ident} |"
        )
    return "\n".join(lines) + "\n"


def cluster_memory_table(size: dict[str, Any]) -> str:
    """Peak RSS of the driver and of each worker, and the runs' telemetry, at the cluster size."""
    lines = [
        "| run | driver peak RSS MiB | worker peak RSS MiB (each) | RUSAGE_CHILDREN MiB | shards | "
        "worker processes | model loads | forward s | input wait s | writer wait s | float16 overflows |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for label, r in cluster_rows(size):
        if not r.get("ok"):
            continue
        t = r["telemetry"]
        c = t.get("cluster") or {}
        single = label == "single process"
        wpeak = "–" if single else " / ".join(mib(p) for p in _worker_peaks(r)) or "–"
        rch = "–" if single else mib(r.get("children_maxrss"))
        lines.append(
            f"| {label} | {mib(r['peak_rss'])} | {wpeak} | {rch} | {c.get('shards', '–')} | "
            f"{c.get('worker_processes', '–')} | {c.get('model_loads', '–')} | {_s(t.get('forward_seconds'))} | "
            f"{_s(t.get('input_wait_seconds'))} | {_s(t.get('writer_wait_seconds'))} | "
            f"{t.get('float16_overflows', '–')} |"
        )
    return "\n".join(lines) + "\n"


def runs_table(size: dict[str, Any]) -> str:
    """Every run at the cluster size, in the order they ran."""
    n = size["n_cells"]
    lines = [
        "| round | run | seconds | run s | cells/s | CPU s | other load (cores) | peak RSS MiB (driver / workers) | "
        "identical |",
        "|--:|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in size.get("runs", []):
        label = "single process" if r["mode"] == "single" else r["mode"]
        if not r.get("ok"):
            lines.append(f"| {r['round']} | {label} | failed: {str(r.get('error', '?'))[:100]} |" + " – |" * 6)
            continue
        peaks = " / ".join(mib(p) for p in [r["peak_rss"], *_worker_peaks(r)])
        cmp = r.get("identical")
        ident = "(reference)" if cmp is None and r["round"] == 1 else ("yes" if cmp and cmp["identical"] else "NO")
        lines.append(
            f"| {r['round']} | {label} | {_s(r['wall_s'])} | {_s(r['run_s'])} | {n / r['wall_s']:,.0f} | "
            f"{_s(r.get('cpu_s'))} | {_other(r)} | {peaks} | {ident} |"
        )
    return "\n".join(lines) + "\n"


def input_table(sizes: list[dict[str, Any]]) -> str:
    lines = [
        "| cells | .h5ad MiB | written in s | expressed genes / cell: median (p10–p90, max) | tokens / cell | "
        "cells cut to 256 | chunks × cells | padding |",
        "|--:|--:|--:|---|--:|--:|---|--:|",
    ]
    for s in sizes:
        i = s["inputs"]
        g = i["genes_per_cell"]
        r = s["single"]
        t = r.get("telemetry") or {}
        ck = r.get("check") or {}
        chunks = f"{ck['chunks']} × {ck['chunk_cells']:,}" if "chunks" in ck else "–"
        lines.append(
            f"| {s['n_cells']:,} | {mib(i['h5ad_bytes'])} | {_s(i['h5ad_build_s'])} | {g['median']:.0f} "
            f"({g['p10']:.0f}–{g['p90']:.0f}, {g['max']:,}) | "
            f"{_r(_ratio(t.get('tokens'), t.get('cells')))} | {t.get('truncated_cells', '–')} | {chunks} | "
            f"{_pct(t.get('padding_fraction'))} |"
        )
    return "\n".join(lines) + "\n"


def _print_run(label: str, r: dict[str, Any]) -> None:
    if print_failure(label, r, tail=8):
        return
    t = r["telemetry"]
    n = t.get("cells") or 0
    extra = ""
    if r.get("workers"):
        extra = f"; workers' peak RSS {' / '.join(mib(p) for p in _worker_peaks(r))} MiB"
        extra += f" (RUSAGE_CHILDREN {mib(r.get('children_maxrss'))} MiB)"
    print(
        f"  [{label}] {_s(r['wall_s'])} s (setup {_s(r['setup_s'])} s, run {_s(r['run_s'])} s): "
        f"{n / r['wall_s']:,.0f} cells/s end to end, {t.get('cells_per_s', 0):,.0f} in the run; peak RSS "
        f"{mib(r['peak_rss'])} MiB (+{mib(growth(r))} over imports){extra}; CPU {_s(r.get('cpu_s'))} s; other "
        f"load {_other(r)} cores, load average {r.get('loadavg_before')}"
    )


# ---------------------------------------------------------------------------------------------------- driver
def measure_size(
    n: int, with_clusters: bool, work: Path, checkpoint: Path, args: argparse.Namespace, on_result: Any
) -> dict[str, Any]:
    print(f"\n== {n:,} cells")
    h5ad, h5ad_s = build_h5ad(n, args.genes_per_cell, work)
    print(
        f"  {'wrote' if h5ad_s is not None else 'reusing'} {h5ad.name} ({du(h5ad) / 2**20:,.0f} MiB)"
        + (f" in {h5ad_s:.1f} s" if h5ad_s is not None else "")
    )
    size: dict[str, Any] = {
        "n_cells": n,
        "inputs": {
            "h5ad": str(h5ad),
            "h5ad_bytes": du(h5ad),
            "h5ad_build_s": h5ad_s,
            "genes_per_cell": tokens_per_cell(h5ad),
        },
        "single": {},
        "clusters": {},
        "identical": {},
    }
    timeout = args.timeout or None
    scratch = scratch_dir(work)
    reference = scratch / f"store-{n}-single.zarr"  # the first single-process store: what the others must equal
    rounds = max(args.repeats, 1) if with_clusters else 1
    modes: list[tuple[str, str | None, dict[str, Any]]] = [("single", None, {})]
    if with_clusters:
        modes += [(m, m, {}) for m in CLUSTERS]
        if not args.skip_no_trim:
            modes += [(m + NO_TRIM_SUFFIX, m, NO_TRIM_CONFIG) for m in CLUSTERS]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m, _, _ in modes}

    def one(mode: str, cluster: str | None, config: dict[str, Any], i: int) -> dict[str, Any]:
        slug = "".join(ch if ch.isalnum() else "-" for ch in mode)
        out = reference if mode == "single" and i == 0 else scratch / f"store-{n}-{slug}-{i + 1}.zarr"
        remove_owned(out)
        spec = {
            "h5ad": str(h5ad),
            "checkpoint": str(checkpoint),
            "out": str(out),
            "cluster": cluster,
            "dask_config": config,
            "n_cells": n,
        }
        r = run_worker(spec, scratch, timeout)
        r.update(mode=mode, round=i + 1)
        if out.exists():
            r["store_bytes"] = du(out)
            r["check"] = check_store(out, n)
        _print_run(mode if rounds == 1 else f"{mode}, round {i + 1}", r)
        if r.get("ok") and not r["check"]["ok"]:
            print(f"      store check failed: {r['check']}")
        if out != reference and out.exists():
            if r.get("ok") and runs["single"] and runs["single"][0].get("ok"):
                cmp = compare_stores(reference, out)
                r["identical"] = cmp
                print(
                    f"      identical to the single-process store: {'yes' if cmp['identical'] else 'NO'}"
                    + ("" if cmp["identical"] else f" ({cmp})")
                )
            if not args.keep:
                remove_owned(out)
        return r

    def summarise() -> None:
        """The fastest run of each mode (by wall time) stands for it; every run stays in ``runs``."""
        ok = {m: [r for r in rs if r.get("ok")] for m, rs in runs.items()}
        best = {m: min(ok[m], key=lambda r: r["wall_s"]) if ok[m] else (rs[0] if rs else {}) for m, rs in runs.items()}
        size["single"] = best["single"]
        size["store_bytes"] = best["single"].get("store_bytes")
        size["clusters"] = {m: best[m] for m, _, _ in modes[1:] if runs.get(m)}
        size["identical"] = {
            m: {
                "identical": all(r.get("identical", {}).get("identical", False) for r in ok[m]) and bool(ok[m]),
                "runs": [r.get("identical") for r in runs[m]],
            }
            for m, _, _ in modes[1:]
            if ok.get(m)
        }
        size["rounds"] = rounds
        size["runs"] = [r for i in range(rounds) for m, _, _ in modes for r in runs[m] if r["round"] == i + 1]
        if rounds > 1:  # repeated single-process runs must match the first one too
            size["single_repeats_identical"] = all(r.get("identical", {}).get("identical") for r in ok["single"][1:])

    try:
        for i in range(rounds):
            for mode, cluster, config in modes:
                runs[mode].append(one(mode, cluster, config, i))
                summarise()
                on_result(size)
    finally:
        if not args.keep:
            remove_owned(reference)
    return size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default=None, help=f"cells per input, comma list (default {','.join(map(str, SIZES))})")
    ap.add_argument(
        "--cluster-size",
        type=int,
        default=None,
        help=f"cells of the local:1 / local:2 runs (default {CLUSTER_SIZE:,}; --quick {QUICK_CLUSTER_SIZE:,}); "
        "0 = none",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {', '.join(f'{n:,}' for n in QUICK_SIZES)} cells, clusters at {QUICK_CLUSTER_SIZE:,}",
    )
    ap.add_argument(
        "--genes-per-cell",
        type=float,
        default=GENES_PER_CELL,
        help=f"median expressed genes per synthetic cell (default {GENES_PER_CELL:g})",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"rounds of single / local:1 / local:2 at the cluster size, round robin; the fastest run of each is\n"
        f"reported, every run is saved (default {REPEATS}, --quick 1): on a shared machine one round can meet\n"
        "other work that the next one does not",
    )
    ap.add_argument(
        "--skip-no-trim",
        action="store_true",
        help="skip the local:1 / local:2 runs with Dask's MALLOC_TRIM_THRESHOLD_=65536 for workers unset",
    )
    ap.add_argument("--timeout", type=float, default=0, help="seconds per measurement, 0 = none (default 0)")
    ap.add_argument(
        "--workdir",
        default=None,
        help=f"keep the inputs (.h5ad per size, checkpoint) here and reuse them; the stores go to its {SCRATCH}/\n"
        "(default: a temp dir, removed)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the stores (and a temporary work folder)")
    ap.add_argument(
        "--results",
        default=None,
        help=f"where the JSON and Markdown go (default {RESULTS.relative_to(ROOT)}; --quick saves only when given)",
    )
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, worker)
    if args.repeats is None:
        args.repeats = 1 if args.quick else REPEATS
    if args.results is None:  # a smoke run does not overwrite the day's measured results
        args.no_save = args.no_save or args.quick
        args.results = str(RESULTS)

    sizes = sorted(set(ints(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else SIZES)))
    cluster_size = (
        args.cluster_size if args.cluster_size is not None else (QUICK_CLUSTER_SIZE if args.quick else CLUSTER_SIZE)
    )
    if cluster_size and cluster_size not in sizes:
        sizes = sorted({*sizes, cluster_size})  # the cluster stores are compared with a single-process one
    info = machine_info(
        ("torch", "numpy", "dask", "distributed", "zarr", "numcodecs", "anndata", "h5py", "fsspec"),
        device=DEVICE,
        torch_threads=True,
    )
    t_start = time.perf_counter()
    load0, psi0 = loadavgs(), cpu_pressure()
    print(
        f"device: {info['device_name']}, {info['memory_gib']} GiB; torch {info['versions']['torch']} "
        f"({info['torch_threads']} threads), dask {info['versions']['dask']}, zarr {info['versions']['zarr']}"
    )
    clusters = (
        f"{' and '.join(CLUSTERS)}{' (and no-trim)' if not args.skip_no_trim else ''} at {cluster_size:,} cells, "
        f"{args.repeats} round(s)"
        if cluster_size
        else "no cluster runs"
    )
    print(
        f"{MODEL} {PRESET}, poolings {','.join(POOLINGS)}, {DTYPE}; sizes {', '.join(f'{n:,}' for n in sizes)}; "
        f"{clusters}; median {args.genes_per_cell:g} expressed genes per cell"
    )
    if load0 is not None and info["cpu_count"] and load0[0] > info["cpu_count"] * 0.5:
        print(f"note: load average {load0} on {info['cpu_count']} CPUs: other work competes for the cores")

    own_work = args.workdir is None
    work = make_temp_dir("cellstrata-scale-") if own_work else Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, ckpt_s = build_checkpoint(work)
    print(f"work folder {work}; checkpoint {checkpoint.name}" + (f" written in {ckpt_s:.1f} s" if ckpt_s else ""))
    context = {
        "argv": sys.argv[1:] if argv is None else argv,
        "info": info,
        "t_start": t_start,
        "load0": load0,
        "psi0": psi0,
        "sizes": sizes,
        "cluster_size": cluster_size,
        "date": utc_now().strftime("%Y-%m-%d"),
    }
    results: list[dict[str, Any]] = []

    def on_result(size: dict[str, Any]) -> None:
        if args.no_save:
            return
        save([*results, size], args, context, final=False)  # a long run that is cut short keeps what it measured

    try:
        for n in sizes:
            results.append(measure_size(n, n == cluster_size, work, checkpoint, args, on_result))
    finally:
        if own_work and not args.keep:
            remove_owned(work)
        elif args.keep:
            print(f"kept {work}")
    print()
    print(input_table(results))
    print(single_table(results))
    csize = next((s for s in results if s["clusters"]), None)
    if csize is not None:
        print(cluster_table(csize, info["cpu_count"] or 1))
        print(cluster_memory_table(csize))
        if csize.get("rounds", 1) > 1:
            print(runs_table(csize))
    ok = all_ok(results)
    if not args.no_save:
        save(results, args, context, final=True)
    print(f"done in {(time.perf_counter() - t_start) / 60:.1f} min; all runs ok and identical: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


def _all_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for s in results for r in s.get("runs", [])]


def all_ok(results: list[dict[str, Any]]) -> bool:
    """Every run finished with a complete store, and every store equals the single-process one of its size."""
    checks = all(r.get("ok") and r.get("check", {}).get("ok") for r in _all_runs(results))
    same = all(c["identical"] for s in results for c in s["identical"].values())
    missing = any(len(s["identical"]) != len(s["clusters"]) for s in results)
    repeats = all(s.get("single_repeats_identical", True) for s in results)
    return checks and same and not missing and repeats


def save(results: list[dict[str, Any]], args: argparse.Namespace, ctx: dict[str, Any], *, final: bool) -> None:
    """``scale-cpu-<date>.{json,md}`` under ``--results`` (rewritten after every run; ``complete`` once all ran)."""
    info = ctx["info"]
    load1, psi1 = loadavgs(), cpu_pressure()
    elapsed = time.perf_counter() - ctx["t_start"]
    stamp = utc_now()
    name = f"scale-{DEVICE}-{ctx['date']}"  # the start's date: a run past midnight rewrites the same files
    command = command_line("scale", ctx["argv"])
    runs = _all_runs(results)
    loads = [x[0] for r in runs for x in (r.get("loadavg_before"), r.get("loadavg_after")) if x]
    payload = {
        "benchmark": "scale",
        "created": stamp.isoformat(timespec="seconds"),
        "command": command,
        "complete": final,
        "seconds": elapsed,
        "machine": info,
        "loadavg_start_end": [ctx["load0"], load1],
        "loadavg_1min_range_during_runs": [min(loads), max(loads)] if loads else None,
        "cpu_pressure_some_avg60_pct": [ctx["psi0"], psi1],
        "settings": {
            "quick": args.quick,
            "sizes": ctx["sizes"],
            "cluster_size": ctx["cluster_size"],
            "clusters": list(CLUSTERS),
            "no_trim_runs": not args.skip_no_trim,
            "no_trim_config": NO_TRIM_CONFIG,
            "repeats": args.repeats,
            "model": MODEL,
            "preset": PRESET,
            "poolings": list(POOLINGS),
            "dtype": DTYPE,
            "device": DEVICE,
            "n_genes": N_GENES,
            "genes_per_cell": args.genes_per_cell,
            "genes_per_cell_sigma": 0.5,
            "seed": SEED,
            "timeout": args.timeout,
            "rss": "peak_rss = VmHWM of the measurement's own fresh process, reset after its imports (the extract "
            "call's peak, libraries included; for cluster runs the driver); growth = peak - RSS after the imports; "
            f"workers[].peak_rss = VmHWM of each Dask worker process (a child of the driver), read every "
            f"{CHILD_INTERVAL_S} s until it exited; children_maxrss = getrusage(RUSAGE_CHILDREN).ru_maxrss after "
            "extract returned: the largest peak of the driver's reaped children, each at least the driver's peak "
            "when it was started (exec keeps the larger high-water mark)",
            "times": "wall_s = the extract call end to end; run_s = telemetry['seconds'] (the chunks: for clusters "
            "from the first shard's submission to the last result); setup_s = wall_s - run_s (input opened, model "
            "loaded, store planned and created, Dask client or cluster started and closed)",
        },
        "sizes": results,
        "all_ok": all_ok(results),
    }
    done = ", ".join(f"{r['n_cells']:,}" for r in results)
    load_text = f"{min(loads):.2f}–{max(loads):.2f}" if loads else "–"
    commits = list(dict.fromkeys(str(r.get("git_commit")) for r in runs if r.get("git_commit")))
    commits_text = f" (the runs imported {', '.join(commits)})" if len(commits) > 1 else ""
    head = (
        f"# Extraction at scale: time and peak memory vs cells, single process vs local Dask workers "
        f"({ctx['date']}, {info['device_name']})\n\n`{command}` ({elapsed / 60:.1f} min)\n\n"
        + ("" if final else f"**Incomplete: written after the runs at {done} cells; the run went on.**\n\n")
        + f"scGPT `{PRESET}` (random weights), poolings `{','.join(POOLINGS)}`, {DTYPE}, device {DEVICE}; synthetic "
        f"counts, {N_GENES:,} genes, median {args.genes_per_cell:g} expressed genes per cell. {info['memory_gib']} "
        f"GiB; torch {info['versions']['torch']}, dask {info['versions']['dask']}, distributed "
        f"{info['versions']['distributed']}, zarr {info['versions']['zarr']}; commit "
        f"{str(info['git_commit'])[:10]}{' (dirty)' if info['git_dirty'] else ''}{commits_text}. Shared machine: "
        f"1-min load average {load_text} at the starts and ends of the runs. Each run in a fresh process; seconds = "
        "the `extract` call end to end, run = the store's telemetry (the chunks), setup = the difference. Peak RSS: "
        "the process's `VmHWM`, reset after its imports (growth: over its RSS after the imports); for cluster "
        "runs the driver, with each worker's `VmHWM` read while it ran. CPU s: user + system time of the call, "
        "its Dask worker processes included. Other load: the machine's busy CPU time during the measurement "
        "minus the measurement's own, per second, i.e. how many of the cores other work took meanwhile."
        + (
            " `no-trim` runs: the same cluster with Dask's default `MALLOC_TRIM_THRESHOLD_=65536` for worker "
            "processes (`distributed.nanny.pre-spawn-environ`) unset in the driver's Dask config."
            if not args.skip_no_trim
            else ""
        )
        + "\n\n"
    )
    body = head + "## Inputs\n\n" + input_table(results) + "\n## Single process, by size\n\n" + single_table(results)
    csize = next((s for s in results if s["clusters"]), None)
    if csize is not None:
        body += (
            f"\n## Local Dask workers at {csize['n_cells']:,} cells\n\n"
            + cluster_table(csize, info["cpu_count"] or 1)
            + "\n"
            + cluster_memory_table(csize)
            + (
                f"\nEvery run at {csize['n_cells']:,} cells ({csize['rounds']} rounds, round robin; the tables above "
                "show the fastest run of each):\n\n" + runs_table(csize)
                if csize.get("rounds", 1) > 1
                else ""
            )
            + "\nRUSAGE_CHILDREN: the driver's `getrusage(RUSAGE_CHILDREN).ru_maxrss` after the cluster closed, "
            "the largest peak of its finished child processes (each at least the driver's RSS when it was "
            "started). Forward / wait seconds are summed over the workers.\n"
        )
    save_results(args.results, name, payload, body, default=json_default, echo=final)


if __name__ == "__main__":
    sys.exit(main())
