"""The run driver: one lifecycle for every extraction, whatever runs its chunks.

:func:`extract` checks its :class:`ExtractSettings` before anything is loaded, then hands :func:`drive`
an executor: :class:`LocalExecutor` (this process's :class:`Extraction`: the model loaded here, its
:class:`~.pipeline.DeviceLoop`, writes through a Dask client) or :class:`~.cluster.ShardExecutor`
(Dask shards; the model is loaded on the workers). :func:`drive` is the lifecycle both share: stop
handling, the executor's start (preflight, plan), a foreign ``--out`` refused, the lease, create or
resume the store, the pending chunks, the start lines, the progress line, the executor's chunks, then
the run's telemetry and completeness in the store's attributes.
"""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from .. import kernels
from .device.budget import auto_max_tokens
from .device.pipeline import DeviceLoop, autocast, resolve_device
from .errors import ConfigError
from .input.sources import CellSource, open_source
from .interrupts import StopRequest, during_startup, graceful_stop
from .models import get_family
from .models.attention import ATTENTION_CHOICES, resolve_attention
from .models.base import CellModel, GeneMapping, LoadedModel
from .models.hub import load_checkpoint
from .plan import (
    DevicePlan,
    ModelFacts,
    RunPlan,
    duplicate_counts,
    duplicate_notes,
    gene_overlap,
    pool_layout,
    resolve_poolings,
    store_spec,
)
from .progress import ExtractProgress, ExtractTotals, busy_label
from .storage.lease import Lease
from .storage.location import StoreLocation
from .storage.store import (
    ATTR_KEY,
    Store,
    create_or_resume,
    default_chunk_cells,
    describe_truncation,
    pending_chunks,
    refuse_foreign,
    update_attrs,
)
from .telemetry import Telemetry, describe_utilisation

log = logging.getLogger("cellstrata")

EMPTY_POLICIES = ("nan", "error")
PREFLIGHT_CELLS = 256


# ------------------------------------------------------------------------------------------ the lifecycle
class Executor(Protocol):
    """What runs a store's pending chunks for :func:`drive` (this process, or Dask shards)."""

    def start(self) -> RunPlan:
        """Check the input's first cells and plan the store (before the store is touched)."""
        ...

    def begin(self, pending: np.ndarray) -> None:
        """Get ready to run ``pending`` (the store exists, the lease is held; the clock has not started)."""
        ...

    def execute(self, pending: np.ndarray, bar: ExtractProgress, stop: StopRequest) -> tuple[Telemetry, dict[str, Any]]:
        """Extract ``pending``; returns the run's counters and extra telemetry entries."""
        ...

    def close(self) -> None:
        """Release what :meth:`start` and :meth:`begin` acquired (called once, also after an error)."""
        ...


def drive(out: Any, executor: Executor, *, overwrite: bool, break_lock: bool, progress: bool) -> Store:
    """Create or resume the store ``out`` under its lease and have ``executor`` extract every pending chunk."""
    location = StoreLocation.of(out)
    with graceful_stop() as stop:
        try:
            plan = executor.start()
            spec = plan.spec
            refuse_foreign(location)  # before the lease: a foreign --out is not written, even briefly
            with Lease.acquire(location, break_lock=break_lock):
                group, resumed = create_or_resume(location, spec, overwrite=overwrite)
                pending = pending_chunks(group)
                log_start(out, plan.mapping, resumed=resumed, n_pending=len(pending), total=spec.n_chunks)
                for note in plan.input_notes:
                    log.warning("%s", note)
                executor.begin(pending)
                t_start = time.perf_counter()
                totals = ExtractTotals(
                    cells=spec.n_cells,
                    chunks=spec.n_chunks,
                    cells_before=spec.n_cells - spec.cells_in(pending),
                    chunks_before=spec.n_chunks - len(pending),
                    busy_label=busy_label(plan.device_type),
                )
                with ExtractProgress(totals, enabled=progress) as bar:
                    telemetry, extra = executor.execute(pending, bar, stop)
                telemetry.seconds = time.perf_counter() - t_start
                record_run(group, telemetry, resumed=resumed, **extra)
        finally:
            executor.close()
    return Store(location)


def log_start(out: Any, mapping: GeneMapping, *, resumed: bool, n_pending: int, total: int) -> None:
    """Say what a run starts from: chunks already written, and the input's overlap with the vocabulary."""
    if resumed:
        log.info("resuming %s: %d of %d chunks already written", out, total - n_pending, total)
    log.info("%s", mapping.report())
    if mapping.fraction < 0.5:
        log.warning("only %.1f%% of the input genes are in the vocabulary", 100 * mapping.fraction)


def record_run(group: Any, telemetry: Telemetry, *, resumed: bool, **extra: Any) -> None:
    """Store the run's completeness and telemetry in the store's attributes and warn about what needs it."""
    done = np.asarray(group["done"][:])
    if resumed and telemetry.cells == 0:  # nothing was left to do: keep the last real run's numbers
        update_attrs(group, complete=bool(done.all()))
        return
    tele = {**telemetry.as_dict(), **extra}
    truncation = dict(group.attrs[ATTR_KEY]).get("truncation") or {}
    tele["truncated_to_tokens"] = truncation.get("max_length")
    tele["truncation_rule"] = truncation.get("rule")
    update_attrs(group, complete=bool(done.all()), telemetry=tele)
    log.info(
        "%d cells in %.1f s: %.1f cells/s, %.0f tokens/s, padding %.1f%%; %s; device waited %.1f s for input "
        "and %.1f s for the writer",
        tele["cells"],
        tele["seconds"],
        tele["cells_per_s"],
        tele["tokens_per_s"],
        100 * tele["padding_fraction"],
        describe_utilisation(tele),
        tele["input_wait_seconds"],
        tele["writer_wait_seconds"],
    )
    if tele["float16_overflows"]:
        log.warning(
            "%d pooled values exceeded float16 range and were stored as inf (%s); "
            "re-run with --dtype float32 to keep them",
            tele["float16_overflows"],
            ", ".join(tele["overflow_layers"]),
        )
    if tele["truncated_cells"] or truncation.get("max_length") is not None:
        log.info(
            "this run: %s",
            describe_truncation(
                tele["truncated_cells"],
                tele["cells"],
                truncation.get("max_length"),
                truncation.get("rule"),
                genes_median=tele.get("truncated_genes_median"),
                genes_max=tele.get("truncated_genes_max"),
            ),
        )
    if tele["empty_cells"]:
        log.warning(
            "%d cells had no expressed vocabulary gene; they are stored as NaN with n_tokens 0", tele["empty_cells"]
        )


# ------------------------------------------------------------------------------------------ this process
def head_dim(model: torch.nn.Module) -> int:
    """Attention head size of a family's model (every family's attention module has ``n_heads``)."""
    for module in model.modules():
        heads = getattr(module, "n_heads", None)
        if isinstance(heads, int) and heads > 0:
            return int(cast(CellModel, model).hidden_size) // heads
    msg = f"{type(model).__name__} has no attention module with n_heads"
    raise TypeError(msg)


def local_client() -> Any:
    """An in-process Dask client (threads) that runs the chunk writes beside the forward pass."""
    from distributed import Client

    return Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0", silence_logs=logging.ERROR
    )


class LocalExecutor:
    """This process runs the chunks: the :class:`Extraction`'s device loop, writes on a Dask client's threads."""

    def __init__(self, run: Extraction, client: Any = None):
        self.run = run
        self.client = client
        self.own_client: Any = None  # the in-process client started for this run, if any

    def start(self) -> RunPlan:
        self.run.preflight()
        return self.run.run_plan()

    def begin(self, pending: np.ndarray) -> None:
        if self.client is None and len(pending):
            self.own_client = local_client()

    def execute(self, pending: np.ndarray, bar: ExtractProgress, stop: StopRequest) -> tuple[Telemetry, dict[str, Any]]:
        loop = self.run.loop
        loop.stop = stop
        try:
            loop.process(pending, self.client or self.own_client, bar)
        finally:
            self.close()
        return loop.telemetry, {}

    def close(self) -> None:
        if self.own_client is not None:
            client, self.own_client = self.own_client, None
            client.close()


class Extraction:
    """One extraction run in this process: the input open, the model loaded, the store planned.

    See :func:`extract` for the parameters. :meth:`run` creates or resumes the store and extracts every
    pending chunk here; Dask workers open one each and run shards of chunks through :attr:`loop`.
    """

    def __init__(
        self,
        source: CellSource,
        loaded: LoadedModel,
        out: str | Path,
        *,
        poolings: Sequence[str] | None,
        dtype: str,
        device: torch.device,
        max_tokens: int | None,
        chunk_cells: int | None,
        n_cells: int,
        empty_cells: str,
        require_counts: bool,
        compression: str,
        overwrite: bool,
        progress: bool,
        client: Any = None,
        break_lock: bool = False,
        attention: str = "auto",
        input_workers: int | None = None,
    ):
        if empty_cells not in EMPTY_POLICIES:
            msg = f"empty_cells must be one of {', '.join(EMPTY_POLICIES)}, got {empty_cells!r}"
            raise ConfigError(msg)
        if dtype not in kernels.OUT_DTYPES:
            msg = f"unknown dtype {dtype!r}; choose float16 or float32"
            raise ConfigError(msg)
        self.source = source
        self.loaded = loaded
        self.out = str(out)
        self.poolings = resolve_poolings(loaded.family, loaded.pooling_names, loaded.default_poolings, poolings)
        self.device = device
        self.n_cells = n_cells
        self.overwrite = overwrite
        self.progress = progress
        self.client = client
        self.break_lock = break_lock
        hidden = loaded.hidden_size
        if chunk_cells is None:  # an explicit value is never replaced (ExtractSettings.check refuses 0)
            chunk_cells = default_chunk_cells(n_cells, hidden, dtype)
        self.chunk_cells = int(chunk_cells)
        if self.chunk_cells < 1:
            msg = f"chunk_cells must be >= 1, got {self.chunk_cells}"
            raise ConfigError(msg)
        self.mapping: GeneMapping = loaded.tokenizer.map_genes(list(source.gene_names))
        self.input_notes = duplicate_notes(source, loaded.family)  # warned at the start of every run
        custom_widths = {n: loaded.custom_poolings[n].width for n in self.poolings if n not in loaded.pool_ops}
        layout = pool_layout(
            self.poolings,
            loaded.pool_ops,
            custom_widths,
            hidden,
            n_leading=loaded.layout.n_leading,
            n_trailing=loaded.layout.n_trailing,
        )
        self.precision = "float32" if device.type == "cpu" else "bfloat16"
        try:
            self.attention, self.varlen = resolve_attention(
                attention, device, getattr(torch, self.precision), head_dim(loaded.model)
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if max_tokens is not None and max_tokens < 1:
            msg = f"max_tokens must be >= 1, got {max_tokens}"
            raise ConfigError(msg)
        if max_tokens is None:
            packed = self.attention == "packed"
            max_tokens = auto_max_tokens(loaded, device, packed=packed, varlen=self.varlen, autocast=self.autocast)
        self.max_tokens = int(max_tokens)
        pool_backend = kernels.resolve_backend(device)
        self.plan = DevicePlan(
            layout=layout,
            dtype=dtype,
            precision=self.precision,
            attention=self.attention,
            varlen=self.varlen,
            max_tokens=self.max_tokens,
            pool_backend=pool_backend,
            empty_cells=empty_cells,
            require_counts=require_counts,
            input_workers=input_workers,
        )
        self.store_spec = store_spec(
            ModelFacts.of(loaded),
            layout,
            dtype=dtype,
            precision=self.precision,
            chunk_cells=self.chunk_cells,
            n_cells=n_cells,
            empty_cells=empty_cells,
            source={**source.fingerprint(), **duplicate_counts(source)},
            gene_overlap=gene_overlap(self.mapping),
            pool_backend=pool_backend,
            compression=compression,
        )
        self.loop = DeviceLoop(source, loaded, self.mapping, self.plan, self.store_spec, self.out, device)

    def autocast(self) -> Any:
        """The forward pass's precision (:func:`~.pipeline.autocast`)."""
        return autocast(self.device, self.precision)

    @property
    def telemetry(self) -> Telemetry:
        """The device loop's counters."""
        return self.loop.telemetry

    def preflight(self) -> None:
        """Read, check and tokenize the first cells before any store is created or changed."""
        self.loop.preflight(PREFLIGHT_CELLS)

    def run_plan(self) -> RunPlan:
        """What the run driver needs before it touches the store."""
        return RunPlan(self.store_spec, self.mapping, self.device.type, self.input_notes)

    def run(self) -> Store:
        """Create or resume the store under its lease and extract every pending chunk in this process."""
        executor = LocalExecutor(self, self.client)
        return drive(self.out, executor, overwrite=self.overwrite, break_lock=self.break_lock, progress=self.progress)

    def close(self) -> None:
        """Release the input's file handles."""
        self.source.close()


# ------------------------------------------------------------------------------------------ the entry
#: ``(setting, minimum, meaning)`` of the numeric extraction options checked by :meth:`ExtractSettings.check`.
NUMERIC_OPTIONS: tuple[tuple[str, int, str], ...] = (
    ("chunk_cells", 1, "cells per store chunk; leave it out for chunks of about 4 MB"),
    ("max_tokens", 1, "the token budget of a batch; leave it out for the measured or size-based default"),
    ("max_length", 1, "the model's context in tokens; leave it out for the model's own"),
    ("input_workers", 0, "processes that read the input; 0 for two threads, leave it out for the default"),
    ("seed", 0, "the seed of the per-cell tokenizer randomness"),
    ("limit", 1, "the number of cells to extract; leave it out for every cell"),
)


def check_whole_number(name: str, value: Any, minimum: int, meaning: str) -> None:
    """Refuse ``value`` unless it is None or a whole number >= ``minimum`` (one line naming the option)."""
    if value is None:
        return
    flag = "--" + name.replace("_", "-")
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < minimum:
        msg = f"{flag} must be a whole number >= {minimum}, got {value!r} ({meaning})"
        raise ConfigError(msg)


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that defines an extraction run, picklable so Dask workers can rebuild it."""

    data: Any
    model: str
    checkpoint: str
    out: str
    poolings: tuple[str, ...] | None = None
    dtype: str = "float16"
    device: str = "auto"
    max_tokens: int | None = None
    chunk_cells: int | None = None
    layer: str | None = None
    gene_column: str | None = None
    limit: int | None = None
    seed: int = 0
    max_length: int | None = None
    model_options: tuple[tuple[str, Any], ...] = ()
    empty_cells: str = "nan"
    allow_noncounts: bool = False
    compression: str = "zstd"
    attention: str = "auto"
    input_workers: int | None = None

    def check(self) -> None:
        """Refuse settings that cannot work, before anything is loaded.

        Numeric options are whole numbers in their range or None (the default); a value out of range is
        refused, never replaced by the default.
        """
        for name, minimum, meaning in NUMERIC_OPTIONS:
            check_whole_number(name, getattr(self, name), minimum, meaning)
        if self.attention not in ATTENTION_CHOICES:
            msg = f"unknown attention layout {self.attention!r}; choose from {', '.join(ATTENTION_CHOICES)}"
            raise ConfigError(msg)
        get_family(self.model)

    def open(
        self, *, overwrite: bool = False, progress: bool = False, client: Any = None, break_lock: bool = False
    ) -> Extraction:
        """Load the model, open the input and return the :class:`Extraction` (call ``close()`` after)."""
        family = get_family(self.model)
        dev = resolve_device(self.device)
        source = open_source(self.data, layer=self.layer, gene_column=self.gene_column)
        try:
            n_cells = min(source.n_cells, self.limit) if self.limit else source.n_cells
            if n_cells == 0:
                msg = "the input has no cells"
                raise ConfigError(msg)
            loaded = load_checkpoint(
                family,
                self.checkpoint,
                device=dev,
                max_length=self.max_length,
                seed=self.seed,
                **dict(self.model_options),
            )
            return Extraction(
                source,
                loaded,
                self.out,
                poolings=self.poolings,
                dtype=self.dtype,
                device=dev,
                max_tokens=self.max_tokens,
                chunk_cells=self.chunk_cells,
                n_cells=n_cells,
                empty_cells=self.empty_cells,
                # a tokenizer that takes normalised input (scFoundation pre_normalized=T) does not need counts
                require_counts=bool(getattr(loaded.tokenizer, "require_counts", True)) and not self.allow_noncounts,
                compression=self.compression,
                overwrite=overwrite,
                progress=progress,
                client=client,
                break_lock=break_lock,
                attention=self.attention,
                input_workers=self.input_workers,
            )
        except BaseException:
            source.close()
            raise


def extract(
    data: Any,
    *,
    model: str = "scgpt",
    checkpoint: str | Path | None = None,
    out: str | Path,
    poolings: Sequence[str] | None = None,
    dtype: str = "float16",
    device: str = "auto",
    max_tokens: int | None = None,
    chunk_cells: int | None = None,
    layer: str | None = None,
    gene_column: str | None = None,
    overwrite: bool = False,
    limit: int | None = None,
    seed: int = 0,
    max_length: int | None = None,
    model_options: Mapping[str, Any] | None = None,
    empty_cells: str = "nan",
    allow_noncounts: bool = False,
    compression: str = "zstd",
    progress: bool = True,
    client: Any = None,
    cluster: Any = None,
    break_lock: bool = False,
    attention: str = "auto",
    input_workers: int | None = None,
) -> Store:
    """Extract every layer of ``model`` for every cell of ``data`` into the store ``out``.

    ``data`` is an ``.h5ad`` path, an AnnData ``.zarr`` path or an ``AnnData``; ``layer`` picks
    ``layers[...]`` or ``raw`` and ``gene_column`` a ``var`` column of gene identifiers. ``out`` is a
    local path or any URL zarr/fsspec opens (``s3://``, ``gs://``, ``memory://``). ``poolings`` are
    store names offered by the family (``all`` for every one); ``model_options`` go to the family's
    loader (e.g. scFoundation's ``pre_normalized``). Re-running the same call resumes; another
    configuration on an existing store is refused unless ``overwrite``. One run at a time holds the
    store's lease; ``break_lock`` takes over a lease left by a run that died on another machine.

    ``cluster`` runs the chunks as Dask distributed tasks: ``"local:N"`` starts N local worker
    processes (one per GPU with dask-cuda), an address such as ``"tcp://host:8786"`` connects to a
    running scheduler, and a ``distributed.Client`` is used as is. ``client`` (without ``cluster``) is
    the Dask client that runs the writes of a single-process run.

    ``attention`` is ``auto`` (packed varlen batches on CUDA, padded on CPU), ``packed`` or ``padded``;
    ``max_tokens`` is the token budget of a batch (default: measured from the free device memory on
    CUDA; on CPU from the model's size, 2,048 to 16,384). ``input_workers`` is the number of processes
    that read and tokenize ahead of the device (0: two threads; default: one per core beyond two on CUDA
    for long runs, threads otherwise).
    Returns the :class:`~.store.Store`.
    """
    if checkpoint is None:
        get_family(model)
        msg = (
            f"pass --checkpoint DIR, the official {model} checkpoint folder; for a random one to try the tool, "
            f"run: cellstrata init-checkpoint --model {model} --preset tiny --out DIR"
        )
        raise ConfigError(msg)
    settings = ExtractSettings(
        data=str(data) if isinstance(data, Path) else data,
        model=model,
        checkpoint=str(checkpoint),
        out=StoreLocation.of(out).url,
        poolings=tuple(poolings) if poolings else None,
        dtype=dtype,
        device=device,
        max_tokens=max_tokens,
        chunk_cells=chunk_cells,
        layer=layer,
        gene_column=gene_column,
        limit=limit,
        seed=seed,
        max_length=max_length,
        model_options=tuple(sorted(dict(model_options or {}).items())),
        empty_cells=empty_cells,
        allow_noncounts=allow_noncounts,
        compression=compression,
        attention=attention,
        input_workers=input_workers,
    )
    settings.check()
    if cluster is not None:
        from .cluster import ShardExecutor

        shards = ShardExecutor(settings, cluster)
        return drive(shards.settings.out, shards, overwrite=overwrite, progress=progress, break_lock=break_lock)
    with during_startup():  # a signal while the input opens or the model loads: one line, nothing written
        run = settings.open(overwrite=overwrite, progress=progress, client=client, break_lock=break_lock)
    try:
        return run.run()
    finally:
        run.close()


__all__ = [
    "Executor",
    "ExtractSettings",
    "Extraction",
    "LocalExecutor",
    "drive",
    "extract",
    "record_run",
]
