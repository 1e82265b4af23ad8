"""The ``cellstrata`` command: extract, info, export, probe, init-checkpoint, demo, bench.

User mistakes end with one line on stderr and a non-zero exit, never a traceback; an interrupted
extraction keeps every committed chunk and says how to resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

from .engine.errors import CellstrataError, ProbeError

log = logging.getLogger("cellstrata")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _key_value(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key.strip():
        msg = f"expected KEY=VALUE, got {value!r}"
        raise argparse.ArgumentTypeError(msg)
    return key.strip().replace("-", "_"), val.strip()


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="extract every layer of a model for every cell into a zarr store",
        description="Extract every layer of a model for every cell of INPUT into the zarr store --out. "
        "Re-running the same command resumes an interrupted run.",
    )
    p.add_argument("input", help="an .h5ad file or an AnnData .zarr folder")
    p.add_argument("--model", required=True, help="model family: scgpt, tahoe-x1, scfoundation, geneformer")
    p.add_argument(
        "--checkpoint",
        help="the official checkpoint folder, or hf:ORG/REPO[/SUBFOLDER][@REVISION] from the Hugging Face hub "
        "(Geneformer, Tahoe-X1; uses the hub cache and HF_HUB_OFFLINE; see README)",
    )
    p.add_argument("--out", required=True, help="the store to write: a .zarr folder or a URL (s3://, gs://, ...)")
    p.add_argument(
        "--pool", type=_csv, default=None, help="poolings, comma-separated, or 'all' (default: the model's own)"
    )
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="store dtype")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="token budget of a batch (padded: B x S; packed: real tokens); default: measured from the free "
        "device memory on CUDA; on CPU 2048 (released sizes) to 16384 (tiny models)",
    )
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "packed", "padded"],
        help="batch layout: packed cells with varlen attention (no compute on padding; default on CUDA) "
        "or padded (default on CPU)",
    )
    p.add_argument(
        "--input-workers",
        type=int,
        default=None,
        help="processes that read and tokenize ahead of the device (0: two threads; default: one per core "
        "beyond two on CUDA for long runs)",
    )
    p.add_argument("--chunk-cells", type=int, default=None, help="cells per store chunk (default: ~4 MB chunks)")
    p.add_argument("--layer", default=None, help="read layers[NAME] instead of X ('raw' for raw.X)")
    p.add_argument("--gene-column", default=None, help="var column holding gene identifiers (default: var_names)")
    p.add_argument("--max-length", type=int, default=None, help="override the model's context length")
    p.add_argument("--seed", type=int, default=0, help="global seed of the per-cell tokenizer randomness")
    p.add_argument(
        "--model-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a family's own loading option, repeatable (e.g. scfoundation: version=rde, pre_normalized=T, "
        "tgthighres=a5; geneformer: token_dictionary=PATH, duplicate_genes=sum, stored_zeros=drop; "
        "tahoe-x1: stored_zeros=drop)",
    )
    p.add_argument("--empty-cells", default="nan", choices=["nan", "error"], help="cells with no vocabulary gene")
    p.add_argument("--allow-noncounts", action="store_true", help="accept a non-integer (normalised) matrix")
    p.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "none"])
    p.add_argument("--limit", type=int, default=None, help="only the first N cells")
    p.add_argument("--overwrite", action="store_true", help="replace a store written with another configuration")
    p.add_argument(
        "--cluster",
        default=None,
        metavar="local:N|ADDRESS",
        help="run on Dask distributed: local:N starts N local worker processes (one per GPU with dask-cuda), "
        "an address such as tcp://host:8786 uses a running scheduler (workers must see the input and the store)",
    )
    p.add_argument(
        "--break-lock",
        action="store_true",
        help="take over the store's lease from a run that died on another machine (same-host leases are "
        "taken over automatically once their process is gone)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)


def _cmd_extract(args: argparse.Namespace) -> int:
    from .engine.interrupts import during_startup

    with during_startup():  # importing torch takes seconds; extract() guards its own start-up the same way
        from .engine.run import extract

    store = extract(
        args.input,
        model=args.model,
        checkpoint=args.checkpoint,
        out=args.out,
        poolings=args.pool,
        dtype=args.dtype,
        device=args.device,
        max_tokens=args.max_tokens,
        attention=args.attention,
        input_workers=args.input_workers,
        chunk_cells=args.chunk_cells,
        layer=args.layer,
        gene_column=args.gene_column,
        overwrite=args.overwrite,
        limit=args.limit,
        seed=args.seed,
        max_length=args.max_length,
        model_options=dict(args.model_option),
        empty_cells=args.empty_cells,
        allow_noncounts=args.allow_noncounts,
        compression=args.compression,
        progress=not args.quiet,
        cluster=args.cluster,
        break_lock=args.break_lock,
    )
    print(_summary(store))
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe a store: model, shape, poolings, completeness; --verify checks every chunk",
        description="Describe STORE. With --verify, read every committed chunk back and check it against the "
        "checksums written with it (exit status 3 if anything is damaged); --repair then marks the damaged "
        "chunks as not written, so re-running the same extract command rewrites exactly those.",
    )
    p.add_argument("store", help="a store written by cellstrata extract")
    p.add_argument("--verify", action="store_true", help="check every committed chunk against its checksums")
    p.add_argument(
        "--repair", action="store_true", help="with --verify: mark damaged chunks for the next extract run to rewrite"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_info)


def _summary(store: Any) -> str:
    """``store.summary()`` and, for a checkpoint named on the Hugging Face hub, where it came from."""
    from .engine.models.hub import describe_hub

    hub = describe_hub(store.attrs)
    return store.summary() + (f"\n{hub}" if hub else "")


def _cmd_info(args: argparse.Namespace) -> int:
    from .engine.errors import ConfigError, StoreCorruptError, StoreError
    from .engine.storage.store import open_store

    if args.repair and not args.verify:
        raise ConfigError(f"--repair needs --verify: cellstrata info {args.store} --verify --repair")
    try:
        store = open_store(args.store)
    except StoreError:  # a damaged root zarr.json: --verify says what, --repair restores it
        from .engine.storage.metadata_backup import metadata_problem

        problem = metadata_problem(args.store)
        if problem is None:
            raise
        if not args.verify:
            raise StoreCorruptError(problem) from None
        print(f"store       {args.store}\nsummary     unavailable (damaged metadata: see below)")
        return _verify(args)
    try:
        print(_summary(store))
    except Exception as err:  # a deleted or unreadable array: --verify says which
        if not args.verify:
            msg = (
                f"{args.store} cannot be described ({type(err).__name__}: {err}); "
                f"run cellstrata info {args.store} --verify to see what is damaged"
            )
            raise StoreCorruptError(msg) from None
        print(f"store       {args.store}\nsummary     unavailable ({type(err).__name__}: {err})")
    if not args.verify:
        return 0
    return _verify(args)


def _verify(args: argparse.Namespace) -> int:
    from .engine.errors import StoreCorruptError
    from .engine.storage.verify import verify_store

    report = verify_store(args.store, repair=args.repair, progress=not args.quiet)
    print(report.describe())
    if not report.is_clean:
        raise StoreCorruptError(report.error_message())
    return 0


def _layers_arg(value: str) -> str | list[int]:
    if value.strip() == "all":
        return "all"
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        msg = f"expected 'all' or comma-separated layer indices, got {value!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _add_probe(sub: argparse._SubParsersAction) -> None:
    from .probes.tasks import task_names

    p = sub.add_parser(
        "probe",
        help="evaluate probe tasks on every layer of a store: which layer is best, per task and cell state",
        description="Evaluate probe tasks on every layer of STORE lazily (only the needed rows of the needed "
        "layers are read; results are cached in the store) and write results.csv, summary.md and layers.png "
        "into --out. Tasks: " + ", ".join(task_names()) + ".",
    )
    p.add_argument("store", help="a store written by cellstrata extract")
    p.add_argument("--adata", required=True, help="the .h5ad/.zarr AnnData the store was extracted from (obs, counts)")
    p.add_argument("--task", type=_csv, required=True, help="tasks, comma-separated (e.g. cell_type,trajectory)")
    p.add_argument("--out", required=True, help="folder for the report")
    p.add_argument("--pooling", type=_csv, default=None, help="poolings to probe, comma-separated (default: all)")
    p.add_argument("--layers", type=_layers_arg, default="all", help="'all' or layer indices, e.g. 0,6,12")
    p.add_argument("--label-key", default=None, help="obs column of cell labels (cell_type, knn_transfer, clustering)")
    p.add_argument("--context-key", default=None, help="obs column of cell states: every task runs per state")
    p.add_argument("--group-key", default=None, help="obs column of donors/batches: folds hold out whole groups")
    p.add_argument("--time-key", default=None, help="obs column of real time (trajectory)")
    p.add_argument("--perturbation-key", default=None, help="obs column of perturbation labels (perturbation)")
    p.add_argument("--control", default=None, help="the control label in --perturbation-key (perturbation)")
    p.add_argument("--counts-layer", default=None, help="matrix holding raw counts (default: the one extracted)")
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap replicates for CIs (default 200)")
    p.add_argument("--seed", type=int, default=None, help="seed of folds, subsamples and bootstraps (default 0)")
    p.add_argument("--n-jobs", type=int, default=None, help="layers evaluated in parallel (default: cores)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TASK.SETTING=VALUE",
        help="any other task setting, repeatable (e.g. cell_type.C=0.5, trajectory.n_neighbors=15)",
    )
    p.add_argument("--no-cache", action="store_true", help="recompute and do not write results into the store")
    p.add_argument("--no-baseline", action="store_true", help="skip the HVG-PCA(50) baseline rows")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_probe)


def _cmd_probe(args: argparse.Namespace) -> int:
    from .probes.report import write_report
    from .probes.runner import probe
    from .probes.summary import summarize
    from .probes.tasks import make_task, parse_settings

    shared = {
        "label_key": args.label_key,
        "context_key": args.context_key,
        "group_key": args.group_key,
        "time_key": args.time_key,
        "perturbation_key": args.perturbation_key,
        "control": args.control,
        "n_boot": args.n_boot,
        "seed": args.seed,
    }
    settings = parse_settings(args.set)
    unknown = set(settings) - {t.strip().lower().replace("-", "_") for t in args.task}
    if unknown:
        raise ProbeError(f"--set names task(s) {', '.join(sorted(unknown))} that are not in --task")
    tasks = [make_task(t, shared, settings.get(t.strip().lower().replace("-", "_"))) for t in args.task]
    results = probe(
        args.store,
        args.adata,
        tasks,
        layers=args.layers,
        pooling=args.pooling,
        counts_layer=args.counts_layer,
        n_jobs=args.n_jobs,
        cache=not args.no_cache,
        baseline=not args.no_baseline,
        progress=not args.quiet,
    )
    paths = write_report(results, args.out)
    from .probes.report import print_answers

    print_answers(summarize(results))
    print(f"report: {paths['summary']}, {paths['results']}, {paths['plot']}")
    return 0


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init-checkpoint",
        help="write a checkpoint with random weights in the model's official file format",
        description="Write random weights in the official checkpoint layout (for tests, demos and benchmarks; "
        "the numbers carry no biology).",
    )
    p.add_argument("--model", required=True, help="model family: scgpt, tahoe-x1, scfoundation, geneformer")
    p.add_argument("--preset", default="tiny", help="tiny or a released size (scgpt: whole-human)")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--genes-from", default=None, help="use the genes of this .h5ad/.zarr as the vocabulary")
    p.add_argument("--gene-column", default=None, help="var column of --genes-from holding gene identifiers")
    p.add_argument(
        "--dedupe",
        default=None,
        choices=["first"],
        help="when --genes-from lists a gene identifier more than once, keep its first occurrence "
        "(default: refuse, naming the repeated identifiers)",
    )
    p.set_defaults(func=_cmd_init)


def _cmd_init(args: argparse.Namespace) -> int:
    from .engine.models import get_family
    from .engine.models.weights import mark_random_init

    family = get_family(args.model)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        from .engine.errors import ConfigError

        what = "is a file" if not out.is_dir() else "is not empty"
        msg = f"{out} {what}; init-checkpoint writes a new folder and replaces no file: choose another --out"
        raise ConfigError(msg + " (nothing was changed)")
    genes = None
    if args.genes_from:
        from .engine.input.sources import open_source

        with open_source(args.genes_from, gene_column=args.gene_column) as src:
            genes = [str(g) for g in src.gene_names]
        where = f"{args.genes_from}" + (f" (var column {args.gene_column!r})" if args.gene_column else "")
        genes = vocabulary_genes(genes, dedupe=args.dedupe, where=where)
    out = family.init_checkpoint(args.preset, args.out, seed=args.seed, genes=genes)
    mark_random_init(out, family=family.name, preset=args.preset, seed=args.seed)
    print(f"wrote a {args.model} '{args.preset}' checkpoint with RANDOM weights to {out}")
    return 0


def vocabulary_genes(genes: Sequence[str], *, dedupe: str | None, where: str) -> list[str]:
    """``genes`` for a vocabulary, each identifier once.

    A repeated identifier is refused with a message naming the first five (and how many there are)
    unless ``dedupe="first"``, which keeps each identifier at its first occurrence, in input order.
    """
    from collections import Counter

    from .engine.errors import InputError

    counts = Counter(genes)
    repeated = [g for g in dict.fromkeys(genes) if counts[g] > 1]
    if not repeated:
        return list(genes)
    extra = sum(counts[g] - 1 for g in repeated)
    n = f"{len(repeated)} gene identifier{'s' if len(repeated) > 1 else ''}"
    if dedupe == "first":
        log.info("%s: kept the first occurrence of %s listed more than once (%d dropped)", where, n, extra)
        return list(dict.fromkeys(genes))
    shown = ", ".join(f"{g} ({counts[g]} times)" for g in repeated[:5])
    more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
    msg = (
        f"{where} lists {n} more than once ({extra} extra column{'s' if extra > 1 else ''}): {shown}{more}; "
        "a vocabulary holds each gene once: pass --dedupe first to keep each identifier's first occurrence, "
        "or choose a column of unique identifiers with --gene-column"
    )
    raise InputError(msg)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in end-to-end example (synthetic data, random tiny model)",
        description="Generate a synthetic dataset, write a tiny random checkpoint of --model (default scgpt), "
        "extract every layer, describe the store, and probe every layer (cell type, kNN transfer, clustering, "
        "trajectory, perturbation, per cell state) into a report.",
    )
    p.add_argument("--model", default="scgpt", help="scgpt, tahoe-x1, scfoundation or geneformer")
    p.add_argument("--out", default="cellstrata-demo", help="folder for the demo's files")
    p.add_argument("--cells", type=int, default=2000, help="number of synthetic cells")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-probe", action="store_true", help="stop after the extraction (no probe report)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), model=args.model, n_cells=args.cells, progress=not args.quiet, probe=not args.no_probe)
    return 0


BENCH_SCRIPTS = {"throughput": "throughput.py", "roofline": "roofline.py"}


def benchmarks_dir() -> Path:
    """The source checkout's ``benchmarks/`` folder (next to the ``cellstrata`` package of an editable install)."""
    import cellstrata

    return Path(cellstrata.__file__).resolve().parents[1] / "benchmarks"


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        add_help=False,  # --help goes to the benchmark script, with every option it takes
        help="run the benchmark suite (benchmarks/throughput.py; 'bench roofline' runs benchmarks/roofline.py)",
        description="Run benchmarks/throughput.py with ARGS (e.g. --quick, --device cuda), or benchmarks/roofline.py "
        "with 'bench roofline ARGS'. Needs a source checkout (editable install): the scripts are not packaged.",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark script")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    rest = list(args.args)
    name = rest.pop(0) if rest and rest[0] in BENCH_SCRIPTS else "throughput"
    folder = benchmarks_dir()
    script = folder / BENCH_SCRIPTS[name]
    if not script.is_file():
        print(
            f"cellstrata: error: the benchmarks are not installed ({script} does not exist); run "
            "'cellstrata bench' from a source checkout (git clone, then pip install -e .)",
            file=sys.stderr,
        )
        return 2
    if rest and rest[0] in ("-h", "--help"):
        print(f"cellstrata bench [roofline] ARGS: runs {script} with ARGS; its options:\n", flush=True)
    return subprocess.call([sys.executable, str(script), *rest])


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a store's layers into an AnnData's obsm (float32, matched by obs_names) as a new .h5ad",
        description="Read --adata IN.h5ad, add obsm[KEY_L<layer>] for each of --layers of --pooling from STORE "
        "(rows matched to IN's cells by obs_names) and the provenance in uns['cellstrata'][KEY], and write "
        "OUT.h5ad. IN is never modified.",
    )
    p.add_argument("store", help="a store written by cellstrata extract")
    p.add_argument("--adata", required=True, help="the .h5ad whose cells the store holds (read, never modified)")
    p.add_argument("--layers", type=_layers_arg, default="all", help="comma-separated layer indices or 'all'")
    p.add_argument("--pooling", help="one pooling of the store (needed when it has several)")
    p.add_argument("--key", help="obsm key prefix (default X_<family>, e.g. X_scgpt -> X_scgpt_L7)")
    p.add_argument("--out", required=True, help="the .h5ad to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--allow-incomplete", action="store_true", help="export an incomplete store (missing cells NaN)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    import anndata as ad

    from .engine.errors import ConfigError, UnreadableInputError
    from .engine.storage.export import default_key
    from .engine.storage.store import open_store

    src, out = Path(args.adata), Path(args.out)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ConfigError(f"--out {out} is the --adata input; export never modifies its input: pick another --out")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it, or pick another --out")
    store = open_store(args.store)
    if not src.is_file():
        raise UnreadableInputError(f"--adata {src} does not exist or is not a file; pass an .h5ad")
    try:
        adata = ad.read_h5ad(src)
    except Exception as err:
        raise UnreadableInputError(f"--adata {src} is not a readable .h5ad ({type(err).__name__})") from None
    store.to_anndata(
        adata, layers=args.layers, pooling=args.pooling, key=args.key, allow_incomplete=args.allow_incomplete
    )
    tmp = out.with_name(f".{out.name}.partial")  # a cut write leaves no half-written OUT
    try:
        adata.write_h5ad(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    key = args.key or default_key(store)
    keys = list(adata.uns["cellstrata"][key]["obsm_keys"])
    print(f"wrote {out}: {adata.n_obs} cells, obsm {', '.join(keys)}; provenance in uns['cellstrata']['{key}']")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellstrata",
        description="Extract every layer of single-cell foundation models into chunked zarr stores.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_extract(sub)
    _add_info(sub)
    _add_export(sub)
    _add_probe(sub)
    _add_init(sub)
    _add_demo(sub)
    _add_bench(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (robust to redirection)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("cellstrata: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def _parse_args(argv: list[str]) -> argparse.Namespace:
    if "bench" in argv and all(a.startswith("-") for a in argv[: argv.index("bench")]):
        # everything after 'bench' belongs to the benchmark script (argparse would take its --options)
        i = argv.index("bench")
        args = build_parser().parse_args([*argv[:i], "bench"])
        args.args = argv[i + 1 :]
        return args
    return build_parser().parse_args(argv)


GOMP_SPINCOUNT = "1000"


def short_openmp_spin(environ: MutableMapping[str, str]) -> None:
    """Let torch's idle CPU threads sleep soon (``GOMP_SPINCOUNT``), unless the user set it.

    libgomp spins up to 300,000 times before a waiting thread sleeps while its threads do not outnumber
    the cores; on a shared host the spinning thread holds the core its partner needs, and a small model's
    forward ran 3-50x slower (a busy 2-core host, README "Small models on a busy CPU"). 1000 is libgomp's own count for
    oversubscribed hosts. It takes effect only before torch is loaded, i.e. for the ``cellstrata`` command.
    """
    environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cellstrata`` command; returns the exit code."""
    as_program = argv is None  # the console script and python -m: main's return ends the process
    argv = list(sys.argv[1:] if argv is None else argv)
    if as_program:
        short_openmp_spin(os.environ)
    from .engine.interrupts import StartupInterrupted, during_startup

    try:
        with during_startup():  # building the parser imports the probes (about a second): a signal says so
            args = _parse_args(argv)
    except StartupInterrupted as err:
        print(f"cellstrata: {err}", file=sys.stderr)
        return 128 + err.signum
    _setup_logging(args.verbose)
    from .engine.interrupts import command_signals
    from .runlog import RunLog

    # Library logs (Dask's failed tasks, shutdown chatter) and uncatchable exceptions are kept for the log
    # file. Called in a Python process, main gives back the previous loggers, hooks and signal handlers
    # however it returns; as the program, it keeps them to the end, so a signal or a library's message
    # while the interpreter shuts down changes neither the exit status nor the output.
    runlog = RunLog(argv, echo=args.verbose, dask=args.command in ("extract", "demo"), restore=not as_program)
    with command_signals(restore=not as_program) as signals, runlog:
        try:
            try:
                return int(args.func(args))
            finally:
                signals.settle()  # the exit status is decided: a signal now must not raise through the report
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as err:
            return _report_failure(err, args, runlog)


def _report_failure(err: BaseException, args: argparse.Namespace, runlog: Any) -> int:
    """Print one line for ``err`` (naming the log file with the full trace, when there is one); the exit status."""
    if isinstance(err, KeyboardInterrupt):
        from .engine.interrupts import StartupInterrupted

        code = 128 + getattr(err, "signum", signal.SIGINT)
        if isinstance(err, StartupInterrupted):  # before the run opened its store: nothing to resume
            line = f"cellstrata: {err}"
        elif args.command in ("extract", "demo"):
            line = "cellstrata: interrupted; every committed chunk is kept — re-run the same command to resume"
        else:
            line = "cellstrata: interrupted"
        keep = runlog.has_problems  # where it stopped is no news; what went wrong meanwhile is
    elif isinstance(err, CellstrataError):
        code, line = err.exit_code, f"cellstrata: error: {err}"
        # a user mistake is the whole story; an error caused by another one (an OSError, a worker's
        # failure) or one accompanied by library errors has a trace worth keeping
        keep = err.__cause__ is not None or runlog.has_problems
    else:
        first = (str(err).strip().splitlines() or [""])[0]
        code = 1
        line = f"cellstrata: error: unexpected {type(err).__name__}: {first}; please report it with the log file"
        keep = True
    if keep:
        path, why = runlog.write(line, err)
        line += f" (full trace: {path})" if path is not None else f" (the full trace could not be written: {why})"
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
