"""Hand a store's layers to an AnnData: float32 ``obsm`` entries named as scverse would, provenance in ``uns``.

``Store.to_anndata(adata, layers=[7, 12], pooling="cls")`` writes ``adata.obsm["X_scgpt_L7"]`` and
``adata.obsm["X_scgpt_L12"]`` (rows in ``adata``'s order, matched by ``obs_names``) and records where they
came from in ``adata.uns["cellstrata"]["X_scgpt"]``. Only the requested layers are read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import CellMismatchError, ConfigError, IncompleteStoreError
from ..models.weights import weights_provenance

if TYPE_CHECKING:
    from anndata import AnnData


class Store(Protocol):
    """What the hand-off reads of a :class:`~.store.Store` (named here so export does not import store)."""

    attrs: dict[str, Any]
    path: Any

    @property
    def poolings(self) -> list[str]: ...

    @property
    def n_layers(self) -> int: ...

    @property
    def done(self) -> np.ndarray: ...

    @property
    def complete(self) -> bool: ...

    def layers(self, pooling: str) -> Any: ...

    def obs_names(self) -> np.ndarray: ...


UNS_KEY = "cellstrata"


def default_key(store: Store) -> str:
    """``X_<family>`` from the store's model attributes, e.g. ``X_scgpt``, ``X_tahoe_x1``."""
    family = str(store.attrs["model"]["family"])
    return "X_" + family.replace("-", "_").lower()


def resolve_layers(layers: int | str | Sequence[int], n_layers: int) -> list[int]:
    """Layer indices in ``0..n_layers`` from ints (negative counts from the last), or ``"all"``."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(n_layers + 1))
        msg = f"layers must be 'all' or layer indices, got {layers!r}"
        raise ConfigError(msg)
    items = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
    if not items:
        msg = "layers is empty; pass layer indices such as [7, 12] or 'all'"
        raise ConfigError(msg)
    out: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            msg = f"layers must be whole numbers or 'all', got {item!r}"
            raise ConfigError(msg)
        index = int(item) + (n_layers + 1 if item < 0 else 0)
        if not 0 <= index <= n_layers:
            msg = (
                f"layer {int(item)} is not in the store: it has layers 0..{n_layers} "
                "(0 = embedding output, k = output of block k; negative indices count from the last)"
            )
            raise ConfigError(msg)
        if index not in out:
            out.append(index)
    return out


def align(store_names: np.ndarray, adata_names: Sequence[str]) -> np.ndarray | None:
    """Store rows in ``adata``'s order: None when the names are already in the same order, else the store
    position of each AnnData cell; refuses (one line) when the cells are not a permutation of each other."""
    ours = np.asarray(store_names, dtype=str)
    theirs = np.asarray(adata_names, dtype=str)
    if ours.shape == theirs.shape and np.array_equal(ours, theirs) and len(set(ours.tolist())) == ours.size:
        return None
    for where, names in (("the store", ours), ("the AnnData", theirs)):
        uniq, counts = np.unique(names, return_counts=True)
        if (counts > 1).any():
            first = uniq[counts > 1][0]
            msg = (
                f"{where} has {int((counts > 1).sum())} repeated cell names (e.g. {first!r}): cells cannot be "
                "matched by obs_names; make them unique (AnnData.obs_names_make_unique) and extract again"
            )
            raise CellMismatchError(msg)
    position = {name: i for i, name in enumerate(ours.tolist())}
    missing = [n for n in theirs.tolist() if n not in position]
    if missing or ours.size != theirs.size:
        extra = ours.size - (theirs.size - len(missing))
        msg = (
            f"the store's {ours.size} cells are not the AnnData's {theirs.size} cells: {len(missing)} of the "
            f"AnnData's names are not in the store (e.g. {missing[0]!r})"
            if missing
            else f"the store's {ours.size} cells are not the AnnData's {theirs.size} cells"
        )
        msg += f" and {extra} store cells are not in the AnnData; pass the AnnData the store was extracted from"
        raise CellMismatchError(msg)
    return np.fromiter((position[n] for n in theirs.tolist()), dtype=np.int64, count=theirs.size)


def provenance(store: Store, *, pooling: str, layers: list[int], keys: list[str]) -> dict[str, Any]:
    """What ``uns["cellstrata"][key]`` records (h5ad-writable: no None values)."""
    a = store.attrs
    m = a.get("model", {})
    record: dict[str, Any] = {
        "store": str(store.path),
        "family": m.get("family"),
        "preset": m.get("preset"),
        "checkpoint": m.get("checkpoint"),
        "checkpoint_sha256": m.get("sha256"),
        "pooling": pooling,
        "layers": np.asarray(layers, dtype=np.int64),
        "obsm_keys": np.asarray(keys, dtype=object),
        "n_layers": m.get("n_layers"),
        "store_dtype": a.get("dtype"),
        "dtype": "float32",
        "config_hash": a.get("config_hash"),
        "format_version": a.get("format_version"),
        "engine_version": a.get("engine_version"),
        "layer_index": a.get("layer_index"),
    }
    weights = weights_provenance(a)
    if weights:
        record["weights"] = str(weights.get("weights", "unknown"))  # "random" or "as given"
        record["weights_record"] = json.dumps(weights, default=str, sort_keys=True)
    return {k: v for k, v in record.items() if v is not None}


def to_anndata(
    store: Store,
    adata: AnnData,
    *,
    layers: int | str | Sequence[int] = "all",
    pooling: str | None = None,
    key: str | None = None,
    allow_incomplete: bool = False,
    copy: bool = False,
) -> AnnData:
    """Write the store's ``layers`` of ``pooling`` into ``adata.obsm`` as float32, matched by cell name.

    Sets ``adata.obsm[f"{key}_L{layer}"]`` (``[n_obs, W]`` float32, one per layer, in ``adata``'s cell
    order) and ``adata.uns["cellstrata"][key]`` (store, model, checkpoint sha256, pooling, layers, dtype,
    config hash, format version, weights). ``key`` defaults to ``X_<family>``; ``pooling`` to the store's
    only pooling (required when it has several). An incomplete store is refused unless
    ``allow_incomplete=True``: then its uncommitted cells are NaN, with an ``IncompleteStoreWarning``.
    Returns ``adata`` (modified in place), or a modified copy with ``copy=True``.
    """
    if pooling is None:
        if len(store.poolings) != 1:
            msg = f"pass pooling=: {store.path} has {', '.join(store.poolings)}"
            raise ConfigError(msg)
        pooling = store.poolings[0]
    if pooling not in store.poolings:
        msg = f"pooling {pooling!r} is not in {store.path}; it has {', '.join(store.poolings)}"
        raise ConfigError(msg)
    key = key or default_key(store)
    if not isinstance(key, str) or not key:
        msg = f"key must be a non-empty string such as 'X_scgpt', got {key!r}"
        raise ConfigError(msg)
    indices = resolve_layers(layers, store.n_layers)
    order = align(store.obs_names(), list(adata.obs_names))
    if not allow_incomplete and not store.complete:
        done = store.done
        msg = (
            f"{store.path} is incomplete: {int(done.sum())} of {done.size} cell chunks are written; re-run the "
            "same extract command to finish it, or pass allow_incomplete=True (--allow-incomplete) to get NaN "
            "for the missing cells"
        )
        raise IncompleteStoreError(msg)
    if copy:
        adata = adata.copy()
    arr = store.layers(pooling)  # lazy [L+1, N, W]; only the chunks of the layers asked for are read
    keys = [f"{key}_L{i}" for i in indices]
    for i, name in zip(indices, keys, strict=True):
        values = np.asarray(arr[i].compute(), dtype=np.float32)
        adata.obsm[name] = values if order is None else values[order]
    uns = adata.uns.setdefault(UNS_KEY, {})
    uns[key] = provenance(store, pooling=pooling, layers=indices, keys=keys)
    return adata
