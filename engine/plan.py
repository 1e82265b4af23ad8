"""What a run will write, decided before any batch runs: poolings, buffer columns, store attributes.

Pure functions of the settings and a few facts about the model (:class:`ModelFacts`), so they can be
checked without loading one:

- :func:`resolve_poolings`: the store names asked for (``all``, the family's defaults) -> the run's poolings;
- :func:`pool_layout`: which pooling goes to which columns of the device buffer ``[L+1, B, F]`` and the
  :class:`~cellstrata.kernels.PoolSpec` of the kernel's ops (:class:`PoolLayout`);
- :func:`store_spec`: the store's shape, chunking and ``cellstrata`` attribute, ``config_hash`` included;
- :func:`duplicate_notes` / :func:`duplicate_counts`: what the run says and records about repeated names.

:class:`RunPlan` is what the run driver needs from an executor before it touches the store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import __version__, kernels
from .errors import ConfigError
from .input.sources import CellSource
from .models.base import GeneMapping, LoadedModel
from .models.hub import hub_attrs
from .models.weights import random_init_of
from .storage.store import StoreSpec, store_attributes

ENGINE_VERSION = __version__  # one version source: cellstrata/__init__.py


def resolve_poolings(
    family: str, offered: Sequence[str], defaults: Sequence[str], requested: Sequence[str] | None
) -> tuple[str, ...]:
    """The run's store names: ``requested`` (``all`` for every one of ``offered``) or the family's defaults."""
    names = tuple(requested) if requested else tuple(defaults)
    if "all" in names:
        names = tuple(offered)
    unknown = [n for n in names if n not in offered]
    if unknown:
        msg = f"{family} has no pooling {', '.join(unknown)}; choose from {', '.join(offered)} or all"
        raise ConfigError(msg)
    if len(set(names)) != len(names):
        msg = f"pooling listed twice in {','.join(names)}"
        raise ConfigError(msg)
    return names


@dataclass(frozen=True)
class PoolLayout:
    """Where each pooling of a run lives in the device buffer's feature axis.

    The kernel's distinct ops come first (one launch writes them as a ``[P, B, H]`` view; store names
    that alias one op share its columns), then the custom poolings, each as wide as it says. Overflow
    counters follow the same order (:attr:`overflow_names`).
    """

    poolings: tuple[str, ...]
    kernel_poolings: tuple[str, ...]
    custom_poolings: tuple[str, ...]
    widths: dict[str, int]  # store name -> features
    columns: dict[str, tuple[int, int]]  # store name -> [lo, hi) of the buffer's feature axis
    spec: kernels.PoolSpec | None  # the kernel's ops; None when every pooling is custom
    overflow_names: tuple[str, ...]  # one per overflow counter: an op's store names joined by "/", or a custom
    width: int  # the buffer's feature axis

    @property
    def n_kernel_ops(self) -> int:
        return len(self.spec.ops) if self.spec is not None else 0


def pool_layout(
    poolings: Sequence[str],
    pool_ops: Mapping[str, str],
    custom_widths: Mapping[str, int],
    hidden: int,
    *,
    n_leading: int,
    n_trailing: int,
) -> PoolLayout:
    """The buffer layout of ``poolings``: names in ``pool_ops`` go to the kernel, the others are custom."""
    names = tuple(poolings)
    kernel_poolings = tuple(n for n in names if n in pool_ops)
    custom_poolings = tuple(n for n in names if n not in pool_ops)
    kernel_ops = tuple(dict.fromkeys(pool_ops[n] for n in kernel_poolings))
    widths = {n: int(custom_widths[n]) for n in custom_poolings}
    widths.update(dict.fromkeys(kernel_poolings, hidden))
    columns = {
        n: (kernel_ops.index(pool_ops[n]) * hidden, (kernel_ops.index(pool_ops[n]) + 1) * hidden)
        for n in kernel_poolings
    }
    offset = len(kernel_ops) * hidden
    for name in custom_poolings:
        columns[name] = (offset, offset + widths[name])
        offset += widths[name]
    spec = kernels.PoolSpec(ops=kernel_ops, n_leading=n_leading, n_trailing=n_trailing) if kernel_ops else None
    overflow_names = (
        *("/".join(n for n in kernel_poolings if pool_ops[n] == op) for op in kernel_ops),
        *custom_poolings,
    )
    return PoolLayout(names, kernel_poolings, custom_poolings, widths, columns, spec, overflow_names, offset)


@dataclass(frozen=True)
class ModelFacts:
    """What the store records about a loaded model (``ModelFacts.of(loaded)``), as plain data."""

    model: dict[str, Any]  # family, preset, n_layers, hidden, config, checkpoint, sha256
    tokenizer: dict[str, Any]  # the tokenizer's settings (hashed)
    pool_ops: dict[str, str]  # every store name the family offers -> its kernel op
    layout: tuple[int, int]  # special tokens before and after the genes
    official_layer: int | None
    truncation: dict[str, Any]  # max_length, rule
    weights: dict[str, Any]  # random-init record, or {"weights": "as given"}
    hub: dict[str, Any] = field(default_factory=dict)  # {"hub": ...} when the checkpoint came from the hub

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelFacts:
        checkpoint = loaded.checkpoint
        tok = loaded.tokenizer
        return cls(
            model={
                "family": loaded.family,
                "preset": loaded.preset,
                "n_layers": loaded.n_layers,
                "hidden": loaded.hidden_size,
                "config": dict(loaded.config),
                "checkpoint": str(checkpoint.get("path")),
                "sha256": checkpoint.get("sha256"),
            },
            tokenizer=tok.settings(),
            pool_ops=dict(loaded.pool_ops),
            layout=(loaded.layout.n_leading, loaded.layout.n_trailing),
            official_layer=loaded.official_layer,
            truncation={"max_length": tok.max_length, "rule": tok.truncation_rule},
            weights=random_init_of(checkpoint.get("path")) or {"weights": "as given"},
            hub=hub_attrs(checkpoint),
        )


def store_spec(
    facts: ModelFacts,
    layout: PoolLayout,
    *,
    dtype: str,
    precision: str,
    chunk_cells: int,
    n_cells: int,
    empty_cells: str,
    source: Mapping[str, Any],
    gene_overlap: Mapping[str, int],
    pool_backend: str,
    compression: str,
) -> StoreSpec:
    """The store a run writes: its arrays' shapes and chunking, and its ``cellstrata`` attribute."""
    attrs = store_attributes(
        model=facts.model,
        tokenizer=facts.tokenizer,
        pool_ops={n: facts.pool_ops.get(n, "custom") for n in layout.poolings},
        layout=list(facts.layout),
        dtype=dtype,
        precision=precision,
        chunk_cells=chunk_cells,
        n_cells=n_cells,
        empty_cells=empty_cells,
        source=source,
        official_layer=facts.official_layer,
        pool_backend=pool_backend,
        gene_overlap=gene_overlap,
        engine_version=ENGINE_VERSION,
        truncation=facts.truncation,
        weights=facts.weights,
        **facts.hub,
    )
    return StoreSpec(
        n_cells=n_cells,
        n_layers=int(facts.model["n_layers"]),
        hidden=int(facts.model["hidden"]),
        widths={n: layout.widths[n] for n in layout.poolings},
        dtype=dtype,
        chunk_cells=chunk_cells,
        compression=compression,
        attrs=attrs,
    )


def gene_overlap(mapping: GeneMapping) -> dict[str, int]:
    """The store's ``gene_overlap`` record: input genes, those matched, the vocabulary's genes."""
    return {"n_input": mapping.n_input, "n_matched": mapping.n_matched, "n_vocab_genes": mapping.n_vocab_genes}


# What each family's official tokenizer does with a gene identifier given by several input columns
# (Geneformer's tokenizer warns itself, naming the duplicates and its rule).
DUPLICATE_GENE_RULES = {
    "scgpt": "each column is its own token with that gene's id, as scGPT's official tokenizer does",
    "tahoe-x1": "each column is its own token with that gene's id, as Tahoe-X1's official tokenizer does",
    "scfoundation": "only the first column of each is read, as scFoundation's official gene-list alignment does",
}


def duplicate_counts(source: CellSource) -> dict[str, int]:
    """The store's record of repeated names: ``duplicate_obs_names`` / ``duplicate_var_names`` (extra entries)."""
    cells, genes = source.duplicates()
    return {"duplicate_obs_names": cells.extra, "duplicate_var_names": genes.extra}


def duplicate_notes(source: CellSource, family: str) -> tuple[str, ...]:
    """One warning line per kind of repeated name in the input (none when every name is unique)."""
    cells, genes = source.duplicates()
    notes = []
    if cells:
        notes.append(
            f"{cells.describe('cell')}; every cell is extracted in input order and the store's obs_names repeat "
            "them: make them unique (AnnData.obs_names_make_unique) to tell those cells apart by name"
        )
    rule = DUPLICATE_GENE_RULES.get(family)
    if genes and rule is not None:
        notes.append(f"{genes.describe('column')}; {rule} (identifiers outside the vocabulary are not read)")
    return tuple(notes)


@dataclass(frozen=True)
class DevicePlan:
    """How the device loop runs a store's chunks: buffer layout, dtypes, batch shape, input side."""

    layout: PoolLayout
    dtype: str  # the store's dtype (the pooled values' one cast)
    precision: str  # the forward pass: "float32" (CPU) or "bfloat16" autocast (CUDA)
    attention: str  # "padded" or "packed"
    varlen: str  # the attention backend ("sdpa" when padded)
    max_tokens: int  # token budget of a batch
    pool_backend: str  # "torch" or "triton"
    empty_cells: str  # "nan" or "error"
    require_counts: bool  # the input must hold raw counts
    input_workers: int | None = None  # processes that read the input (None: the default)

    @property
    def attention_label(self) -> str:
        """The telemetry's ``attention``: ``padded`` or ``packed (<backend>)``."""
        return self.attention if self.attention == "padded" else f"packed ({self.varlen})"


@dataclass(frozen=True)
class RunPlan:
    """What the run driver needs before it touches the store: the spec, what to report, the device type."""

    spec: StoreSpec
    mapping: GeneMapping  # the input's genes against the vocabulary (reported at the start)
    device_type: str  # "cuda" or "cpu": what the progress line's utilisation measures
    input_notes: tuple[str, ...] = ()  # warnings about the input, repeated at the start of every run


__all__ = [
    "DUPLICATE_GENE_RULES",
    "ENGINE_VERSION",
    "DevicePlan",
    "ModelFacts",
    "PoolLayout",
    "RunPlan",
    "duplicate_counts",
    "duplicate_notes",
    "gene_overlap",
    "pool_layout",
    "resolve_poolings",
    "store_spec",
]
