"""The ``cellstrata`` command: extract, info, init-checkpoint, demo.

User mistakes end with one line on stderr and a non-zero exit, never a traceback; an interrupted
extraction keeps every committed chunk and says how to resume.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .engine.errors import CellstrataError

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
    p.add_argument("--checkpoint", help="the official checkpoint folder (see README)")
    p.add_argument("--out", required=True, help="the store to write (a .zarr folder)")
    p.add_argument(
        "--pool", type=_csv, default=None, help="poolings, comma-separated, or 'all' (default: the model's own)"
    )
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="store dtype")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--max-tokens", type=int, default=None, help="padded tokens per batch (B x S budget)")
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
        "tgthighres=a5; geneformer: token_dictionary=PATH)",
    )
    p.add_argument("--empty-cells", default="nan", choices=["nan", "error"], help="cells with no vocabulary gene")
    p.add_argument("--allow-noncounts", action="store_true", help="accept a non-integer (normalised) matrix")
    p.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "none"])
    p.add_argument("--limit", type=int, default=None, help="only the first N cells")
    p.add_argument("--overwrite", action="store_true", help="replace a store written with another configuration")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)


def _cmd_extract(args: argparse.Namespace) -> int:
    from .engine.pipeline import extract

    store = extract(
        args.input,
        model=args.model,
        checkpoint=args.checkpoint,
        out=args.out,
        poolings=args.pool,
        dtype=args.dtype,
        device=args.device,
        max_tokens=args.max_tokens,
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
    )
    print(store.summary())
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a store: model, shape, poolings, completeness")
    p.add_argument("store", help="a store written by cellstrata extract")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from .engine.store import open_store

    print(open_store(args.store).summary())
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
    p.set_defaults(func=_cmd_init)


def _cmd_init(args: argparse.Namespace) -> int:
    from .engine.models import get_family

    family = get_family(args.model)
    genes = None
    if args.genes_from:
        from .engine.sources import open_source

        with open_source(args.genes_from, gene_column=args.gene_column) as src:
            genes = [str(g) for g in src.gene_names]
    out = family.init_checkpoint(args.preset, args.out, seed=args.seed, genes=genes)
    print(f"wrote a {args.model} '{args.preset}' checkpoint with RANDOM weights to {out}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in end-to-end example (synthetic data, random tiny model)",
        description="Generate a synthetic dataset, write a tiny random checkpoint of --model (default scgpt), "
        "extract every layer and describe the store.",
    )
    p.add_argument("--model", default="scgpt", help="scgpt, tahoe-x1, scfoundation or geneformer")
    p.add_argument("--out", default="cellstrata-demo", help="folder for the demo's files")
    p.add_argument("--cells", type=int, default=2000, help="number of synthetic cells")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), model=args.model, n_cells=args.cells, progress=not args.quiet)
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
    _add_init(sub)
    _add_demo(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (robust to redirection)."""

    @property
    def stream(self):  # type: ignore[override]
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cellstrata`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except CellstrataError as err:
        print(f"cellstrata: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(
            "cellstrata: interrupted; every committed chunk is kept — re-run the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
