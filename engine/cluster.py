"""Extraction on Dask distributed: one task per shard of whole chunks, Dask owns workers and retries.

:class:`ShardExecutor` is the run driver's executor (:func:`~.run.drive`) for ``--cluster``. The
driver never loads the model: a first task plans the store on a worker (which loads the model once and
keeps it), the driver creates or resumes the store under its lease, then submits one task per shard of
consecutive pending chunks. Each task reads its rows straight from the input, runs the same
:class:`~.pipeline.DeviceLoop` as a single-process run (so every chunk is bit-identical to one on the
same device type) and writes straight into the store. A task skips chunks already committed, so a
shard retried after a worker died, or a re-run after the driver died, redoes only what is missing.

``--cluster local:N`` starts N local worker processes (dask-cuda's ``LocalCUDACluster``, one worker
per GPU, when the device is CUDA and dask-cuda is installed); an address connects to a running
scheduler whose workers all see the input and the store (a shared filesystem or an object store).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, ClassVar, Protocol

import numpy as np

from .device.pipeline import DeviceLoop
from .errors import CellstrataError, ConfigError, StoreConfigMismatchError, WriteError
from .interrupts import Interrupted, StopRequest
from .models.base import GeneMapping
from .plan import RunPlan
from .progress import ExtractProgress, ExtractStatus
from .storage.location import StoreLocation, member_array
from .storage.store import StoreSpec
from .telemetry import Telemetry

log = logging.getLogger("cellstrata")

NO_WORKERS_SECONDS = 120.0  # a cluster without a single worker this long ends the run instead of waiting forever
RETRIES = 2  # a shard whose task raised is retried this often (a killed worker is rescheduled by Dask)
SHARDS_PER_WORKER = 4  # enough shards to balance uneven workers, few enough to keep scheduling cheap
MAX_SHARD_CHUNKS = 64
WRITER_THREADS = 2
TORCH_THREADS_ENV = "CELLSTRATA_TORCH_THREADS"
# local worker processes print to the driver's stderr; a failed shard reaches the driver with its traceback
# (reported in one line, the trace in the CLI's log file), so the workers' own logs are silenced
QUIET_WORKERS = logging.CRITICAL


class ShardRun(Protocol):
    """What a worker uses of an opened run (:class:`~.run.Extraction`)."""

    store_spec: StoreSpec
    mapping: GeneMapping
    device: Any
    input_notes: tuple[str, ...]
    loop: DeviceLoop

    def preflight(self) -> None: ...

    def close(self) -> None: ...


class ShardSettings(Protocol):
    """What the shard executor uses of a run's settings (:class:`~.run.ExtractSettings`, a frozen dataclass)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # a dataclass: dataclasses.replace derives new settings

    @property
    def data(self) -> Any: ...

    @property
    def out(self) -> str: ...

    @property
    def checkpoint(self) -> str: ...

    @property
    def device(self) -> str: ...

    def open(self, *, progress: bool = False) -> ShardRun: ...


# keyed by repr(settings) (option values need not be hashable); the lock runs one shard at a time per
# loaded model: a worker with several threads (or threaded workers sharing this process) would otherwise
# share its buffers and counters
_CACHE: dict[str, tuple[ShardRun, threading.Lock]] = {}
_CACHE_LOCK = threading.Lock()
_LOADS = {"count": 0}


# ------------------------------------------------------------------------------------------ worker side
def _worker_settings(settings: ShardSettings) -> ShardSettings:
    """Spread workers over GPUs when each sees several (without dask-cuda): worker ``name`` mod count."""
    import torch

    if settings.device not in ("auto", "cuda") or torch.cuda.device_count() < 2:
        return settings
    from distributed import get_worker

    with contextlib.suppress(ValueError):
        name = get_worker().name
        if isinstance(name, int) or str(name).isdigit():
            return replace(settings, device=f"cuda:{int(name) % torch.cuda.device_count()}")
    return settings


def worker_extraction(settings: ShardSettings) -> tuple[ShardRun, threading.Lock]:
    """This process's opened run (:class:`~.run.Extraction`) for ``settings`` and its lock: loaded once, reused."""
    key = repr(settings)
    with _CACHE_LOCK:
        if key not in _CACHE:
            for old, _ in _CACHE.values():
                old.close()
            _CACHE.clear()
            threads = os.environ.get(TORCH_THREADS_ENV)
            if threads:  # set by connect(): torch may have been imported before the worker's math settings
                import torch

                torch.set_num_threads(int(threads))
            _CACHE[key] = (_worker_settings(settings).open(progress=False), threading.Lock())
            _LOADS["count"] += 1
        return _CACHE[key]


def plan_task(settings: ShardSettings) -> dict[str, Any]:
    """On a worker: check the input's first cells and return the store spec the workers will write."""
    run, _ = worker_extraction(settings)
    run.preflight()
    return {
        "spec": run.store_spec,
        "mapping": run.mapping,
        "device": str(run.device),
        "overflow_names": run.loop.layout.overflow_names,
        "input_notes": run.input_notes,
    }


def shard_task(settings: ShardSettings, chunks: Sequence[int], config_hash: str) -> dict[str, Any]:
    """On a worker: extract the chunks of ``chunks`` not yet committed; returns the shard's counters."""
    run, lock = worker_extraction(settings)
    with lock:
        return run_shard(run, settings, chunks, config_hash)


def run_shard(run: ShardRun, settings: ShardSettings, chunks: Sequence[int], config_hash: str) -> dict[str, Any]:
    have = run.store_spec.attrs["config_hash"]
    if have != config_hash:
        msg = (
            f"a worker would write other numbers than the store was planned for (config {have[:12]} vs "
            f"{config_hash[:12]}, device {run.device}): every worker needs the same device type, model "
            "checkpoint and package versions"
        )
        raise StoreConfigMismatchError(msg)
    done = np.asarray(member_array(StoreLocation.of(settings.out).open_group("r"), "done")[:])
    todo = [int(c) for c in chunks if not done[c]]
    loop = run.loop
    loop.telemetry = loop.fresh_telemetry()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="cellstrata-write") as pool:
        loop.process(todo, pool)
    counters = loop.telemetry.counters()
    counters.update(chunks=len(todo), skipped=len(chunks) - len(todo), seconds=time.perf_counter() - t0)
    counters.update(model_loads=_LOADS["count"], pid=os.getpid())
    return counters


# ------------------------------------------------------------------------------------------ driver side
def _local_workers(spec: str) -> int:
    count = spec.partition(":")[2]
    if not count:
        return 0
    if not count.isdigit() or int(count) < 1:
        msg = f"--cluster {spec!r}: expected local or local:N with N >= 1 workers"
        raise ConfigError(msg)
    return int(count)


@contextlib.contextmanager
def _worker_environment(threads: int) -> Iterator[None]:
    """Start local workers with ``threads`` math threads and glibc's own malloc tuning; leave ours as it was.

    Dask's nannies export ``MALLOC_TRIM_THRESHOLD_=65536`` to workers by default; setting it switches off
    glibc's adaptive mmap threshold, so every large activation is a fresh zeroed mapping and the forward
    pass runs at half speed (measured: ``benchmarks/scale.py``). Nannies also write these variables into
    the driver's own environment before spawning; it is restored on leaving.
    """
    import dask

    saved = dict(os.environ)
    n = str(threads)
    environ = {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in environ.items()}):
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _restoring(close: Callable[[], Any], saved: dict[str, str]) -> Callable[[], None]:
    def closer() -> None:
        try:
            close()
        finally:  # a nanny that restarted a worker exported its variables again
            os.environ.clear()
            os.environ.update(saved)

    return closer


def connect(cluster: Any, device: str) -> tuple[Any, Callable[[], None]]:
    """A Dask client for ``cluster`` (``local[:N]``, a scheduler address or a ``Client``) and its closer."""
    from distributed import Client, LocalCluster

    if isinstance(cluster, Client):
        return cluster, lambda: None
    spec = str(cluster).strip()
    if spec == "local" or spec.startswith("local:"):
        import torch

        n = _local_workers(spec)
        saved = dict(os.environ)
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                log.info("dask-cuda is not installed: workers are spread over the GPUs by worker number")
            else:
                with _worker_environment(max((os.cpu_count() or 1) // max(torch.cuda.device_count(), 1), 1)):
                    lc = LocalCUDACluster(n_workers=n or None, threads_per_worker=1, silence_logs=QUIET_WORKERS)
                client = Client(lc)
                return client, _restoring(lambda: (client.close(), lc.close()), saved)
            n = n or max(torch.cuda.device_count(), 1)
        n = n or max((os.cpu_count() or 1) // 4, 1)
        threads = max((os.cpu_count() or 1) // n, 1)  # torch threads per worker process
        with _worker_environment(threads):
            lc = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=QUIET_WORKERS,
                env={TORCH_THREADS_ENV: str(threads)},
            )
        client = Client(lc)
        return client, _restoring(lambda: (client.close(), lc.close()), saved)
    try:
        client = Client(spec, timeout="30s")
    except OSError as err:
        msg = f"cannot reach the Dask scheduler at {spec} ({err}); start one with `dask scheduler` or use local:N"
        raise ConfigError(msg) from None
    return client, client.close


def shards(pending: np.ndarray, n_workers: int) -> list[list[int]]:
    """Split ``pending`` into shards of consecutive chunks, about ``SHARDS_PER_WORKER`` per worker."""
    if len(pending) == 0:
        return []
    size = min(max(math.ceil(len(pending) / (SHARDS_PER_WORKER * max(n_workers, 1))), 1), MAX_SHARD_CHUNKS)
    return [list(map(int, pending[i : i + size])) for i in range(0, len(pending), size)]


def _check_inputs(settings: ShardSettings, cluster: Any) -> ShardSettings:
    if not isinstance(settings.data, str):
        msg = "--cluster needs the input as a path (or URL) every worker can read, not an in-memory AnnData"
        raise ConfigError(msg)
    location = StoreLocation.of(settings.out)
    if location.protocol == "memory" and isinstance(cluster, str):
        msg = "a memory:// store lives inside one process; with --cluster write to a path or a shared URL"
        raise ConfigError(msg)
    # workers may run elsewhere: give them absolute paths
    data = settings.data if "://" in settings.data else os.path.abspath(settings.data)  # noqa: PTH100
    checkpoint = settings.checkpoint if "://" in settings.checkpoint else os.path.abspath(settings.checkpoint)  # noqa: PTH100
    return replace(settings, data=data, checkpoint=checkpoint)


def _fail(err: BaseException, shard: list[int]) -> CellstrataError:
    """The one message a failed shard ends the run with."""
    if isinstance(err, CellstrataError):
        return err
    what = f"chunks {shard[0]}-{shard[-1]}"
    if type(err).__name__ == "KilledWorker":
        msg = (
            f"the workers running {what} died repeatedly ({err}); this is usually memory: lower --max-tokens "
            "or use fewer workers per machine. Committed chunks are kept: re-run the same command to resume"
        )
    else:
        msg = (
            f"extracting {what} failed on a worker ({type(err).__name__}: {err}); committed chunks are kept: "
            "fix the cause and re-run the same command to resume"
        )
    return WriteError(msg) if isinstance(err, OSError) else CellstrataError(msg)


class WorkerWatch:
    """Ends a run whose cluster has had no worker at all for ``patience`` seconds.

    Dask keeps tasks waiting while no worker exists (e.g. every local worker failed to start), which
    would hang the run; a cluster with workers is waited on for as long as its tasks take.
    """

    def __init__(self, client: Any, patience: float = NO_WORKERS_SECONDS) -> None:
        self.client, self.patience = client, patience
        self.alone_since: float | None = None

    def check(self) -> None:
        if self.client.scheduler_info(n_workers=-1).get("workers"):
            self.alone_since = None
            return
        now = time.monotonic()
        self.alone_since = self.alone_since or now
        if now - self.alone_since > self.patience:
            msg = (
                f"the Dask cluster has had no worker for {self.patience:.0f} s, so nothing can run; check that "
                "workers can start (memory, the worker logs of your scheduler) and re-run the same command to resume"
            )
            raise CellstrataError(msg)


def await_result(client: Any, future: Any, *, patience: float = NO_WORKERS_SECONDS) -> Any:
    """``future.result()``, checking every 2 s that the cluster still has a worker (:class:`WorkerWatch`)."""
    watch = WorkerWatch(client, patience)
    while True:
        try:
            return future.result(timeout=2)
        except TimeoutError:
            watch.check()


def shard_status(telemetry: Telemetry, chunks: int, seconds: float, workers: int) -> ExtractStatus:
    """The progress line's counters once some shards have finished (busy and wait summed over workers)."""
    cuda = telemetry.device_type == "cuda"
    return ExtractStatus(
        cells=telemetry.cells,
        tokens=telemetry.tokens,
        chunks=chunks,
        seconds=seconds,
        busy_seconds=telemetry.device_busy_seconds if cuda else telemetry.forward_seconds,
        writer_wait_seconds=telemetry.writer_wait_seconds,
        workers=workers,
    )


class ShardExecutor:
    """The run driver's executor on Dask: plans on a worker, one task per shard, counters merged here."""

    def __init__(self, settings: ShardSettings, cluster: Any):
        self.settings = _check_inputs(settings, cluster)
        self.cluster = cluster
        self.client: Any = None
        self._close: Callable[[], None] | None = None
        self.n_workers = 1
        self.plan: dict[str, Any] = {}
        self.work: list[list[int]] = []

    def start(self) -> RunPlan:
        """Connect, then check the input and plan the store on a worker (which keeps the model loaded)."""
        self.client, self._close = connect(self.cluster, self.settings.device)
        self.n_workers = max(len(self.client.scheduler_info(n_workers=-1).get("workers", {})), 1)
        self.plan = await_result(self.client, self.client.submit(plan_task, self.settings, pure=False, retries=RETRIES))
        return RunPlan(
            spec=self.plan["spec"],
            mapping=self.plan["mapping"],
            device_type=str(self.plan["device"]).split(":")[0],
            input_notes=tuple(self.plan["input_notes"]),
        )

    def begin(self, pending: np.ndarray) -> None:
        self.work = shards(pending, self.n_workers)
        log.info(
            "%d chunks in %d shards on %d Dask workers (%s)",
            len(pending),
            len(self.work),
            self.n_workers,
            self.plan["device"],
        )

    def execute(self, pending: np.ndarray, bar: ExtractProgress, stop: StopRequest) -> tuple[Telemetry, dict[str, Any]]:
        """One task per shard; each finished shard's counters are added and advance the line."""
        from distributed import wait

        client, work, n_workers = self.client, self.work, self.n_workers
        spec = self.plan["spec"]
        device_type = str(self.plan["device"]).split(":")[0]
        telemetry = Telemetry(
            pooling_names=tuple(self.plan["overflow_names"]), device_type=device_type, workers=n_workers
        )
        cells_in = {i: spec.cells_in(shard) for i, shard in enumerate(work)}
        token = uuid.uuid4().hex[:8]
        futures = {
            client.submit(
                shard_task,
                self.settings,
                shard,
                spec.attrs["config_hash"],
                pure=False,
                retries=RETRIES,
                key=f"cellstrata-shard-{shard[0]}-{shard[-1]}-{token}",
            ): i
            for i, shard in enumerate(work)
        }
        loads: dict[int, int] = {}  # worker process -> models it loaded
        watch = WorkerWatch(client)
        chunks_done = 0
        try:
            remaining = set(futures)
            while remaining:
                with contextlib.suppress(TimeoutError):  # wake up to check for a stop request
                    wait(list(remaining), timeout=0.5, return_when="FIRST_COMPLETED")
                stop.check()
                watch.check()
                finished = {f for f in remaining if f.done()}
                remaining -= finished
                for fut in finished:
                    i = futures[fut]
                    try:
                        counters = fut.result()
                    except Exception as err:
                        raise _fail(err, work[i]) from err
                    telemetry.add(counters)
                    loads[counters["pid"]] = max(loads.get(counters["pid"], 0), counters["model_loads"])
                    chunks_done += len(work[i])
                    bar.advance(cells_in[i], shard_status(telemetry, chunks_done, bar.elapsed(), n_workers))
        except BaseException as err:
            client.cancel(list(futures))
            if isinstance(err, Interrupted):
                log.warning("stopping: cancelled the shards not yet finished; committed chunks are kept")
            raise
        cluster = {
            "workers": n_workers,
            "shards": len(work),
            "worker_processes": len(loads),
            "model_loads": sum(loads.values()),
        }
        return telemetry, {"cluster": cluster}

    def close(self) -> None:
        """Close the client (and the local workers it started)."""
        if self._close is not None:
            close, self._close = self._close, None
            close()


__all__ = [
    "ShardExecutor",
    "await_result",
    "connect",
    "plan_task",
    "shard_status",
    "shard_task",
    "shards",
    "worker_extraction",
]
