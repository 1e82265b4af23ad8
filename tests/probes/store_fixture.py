"""Real cellstrata stores built by hand for the probe tests, and a store with a planted best layer.

:func:`write_store` writes numpy arrays ``{pooling: [L+1, N, W]}`` through the engine's own APIs: a
:class:`~cellstrata.engine.storage.store.StoreSpec` with the ``cellstrata`` attribute the extraction pipeline
writes (model family, n_layers, hidden, official layer, source fingerprint, config hash, ...),
:func:`~cellstrata.engine.storage.store.create_or_resume`, then
:func:`~cellstrata.engine.storage.writer.write_chunk` per cell chunk (which sets each ``done`` flag after the
chunk's data), then ``complete``, as ``Extraction.run`` does.

:func:`planted` builds a synthetic AnnData (``synthetic_dataset``: six cell types, two states, donors,
perturbations) and a store over the same cells whose layer ``BEST`` carries the cell-type signal most
strongly: layer ``l`` is ``strength[l] * class_mean[cell_type] + noise`` with fresh seeded noise per
layer, so the cell-type probe, kNN transfer and clustering must all find layer ``BEST``, and the final
layer is clearly worse.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellstrata.engine.input.sources import open_source
from cellstrata.engine.plan import ENGINE_VERSION
from cellstrata.engine.storage.store import (
    Store,
    StoreSpec,
    create_or_resume,
    open_store,
    store_attributes,
    update_attrs,
)
from cellstrata.engine.storage.writer import ChunkData, write_chunk

N_CELLS = 1200
N_GENES = 300
N_LAYERS = 6  # blocks; the store has N_LAYERS + 1 layers (0 = embedding output)
WIDTH = 32
CHUNK = 128  # 1200 cells -> 10 chunks, the last one partial (48 cells)
BEST = 4
# signal per store layer: weak early, strongest at BEST, clearly weaker again at the final layer
STRENGTH = (0.0, 0.15, 0.3, 0.5, 1.0, 0.55, 0.35)


def write_store(
    path: str | Path,
    pooled: Mapping[str, np.ndarray],
    obs_names: Sequence[str] | np.ndarray,
    *,
    chunk_cells: int = CHUNK,
    dtype: str = "float32",
    n_tokens: np.ndarray | None = None,
    adata: Any = None,
    family: str = "scgpt",
    official_layer: int | None = None,
    hidden: int | None = None,
) -> Store:
    """A complete store at ``path`` holding ``pooled`` (``{name: [L+1, N, W]}``) for cells ``obs_names``.

    ``adata`` (the input the store is "extracted" from) supplies the source fingerprint, as in a real
    extraction; ``n_tokens`` defaults to a positive count per cell (no empty cells).
    """
    names = np.asarray(obs_names).astype(str)
    arrays = {k: np.asarray(v) for k, v in pooled.items()}
    shapes = {v.shape[:2] for v in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"poolings disagree on [L+1, N]: {shapes}")
    (n_layers_p1, n_cells) = shapes.pop()
    if n_cells != len(names):
        raise ValueError(f"{n_cells} cells in the arrays but {len(names)} obs_names")
    n_layers = n_layers_p1 - 1
    widths = {k: int(v.shape[2]) for k, v in arrays.items()}
    hidden = int(hidden if hidden is not None else max(widths.values()))
    if n_tokens is None:
        n_tokens = 50 + np.arange(n_cells, dtype=np.int32) % 200
    if adata is not None:
        source = open_source(adata)
        fingerprint = source.fingerprint()
    else:
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
        fingerprint = {"path": None, "n_cells": n_cells, "n_genes": 0, "layer": None, "gene_column": None}
        fingerprint["obs_names_sha256"] = digest
    data_sha = hashlib.sha256()
    for k in sorted(arrays):
        data_sha.update(k.encode())
        data_sha.update(np.ascontiguousarray(arrays[k], dtype=dtype).tobytes())
    model_attrs = {
        "family": family,
        "preset": "test",
        "n_layers": n_layers,
        "hidden": hidden,
        "config": {"n_layers": n_layers, "hidden": hidden, "planted": data_sha.hexdigest()},
        "checkpoint": "hand-built",
        "sha256": data_sha.hexdigest(),
    }
    attrs = store_attributes(
        model=model_attrs,
        tokenizer={},
        pool_ops=dict.fromkeys(arrays, "mean"),
        layout=[0, 0],
        dtype=dtype,
        precision="float32",
        chunk_cells=chunk_cells,
        n_cells=n_cells,
        empty_cells="nan",
        source=fingerprint,
        official_layer=n_layers if official_layer is None else official_layer,
        pool_backend="numpy",
        gene_overlap={"n_input": 0, "n_matched": 0, "n_vocab_genes": 0},
        engine_version=ENGINE_VERSION,
    )
    spec = StoreSpec(
        n_cells=n_cells,
        n_layers=n_layers,
        hidden=hidden,
        widths=widths,
        dtype=dtype,
        chunk_cells=chunk_cells,
        compression="zstd",
        attrs=attrs,
    )
    group, resumed = create_or_resume(path, spec)
    assert not resumed, f"{path} already holds a store"
    for c in range(spec.n_chunks):
        start, stop = c * chunk_cells, min((c + 1) * chunk_cells, n_cells)
        chunk = ChunkData(
            index=c,
            start=start,
            stop=stop,
            pooled={k: v[:, start:stop].astype(dtype) for k, v in arrays.items()},
            obs_names=names[start:stop],
            n_tokens=np.asarray(n_tokens[start:stop], dtype=np.int32),
            truncated=np.zeros(stop - start, dtype=bool),
        )
        write_chunk(str(path), chunk)
    update_attrs(group, complete=True, telemetry={"cells": n_cells})
    return open_store(path)


def synthetic_adata(n_cells: int = N_CELLS, n_genes: int = N_GENES, seed: int = 0) -> Any:
    """The engine's synthetic raw-count AnnData (obs cell_type, time, cell_state, perturbation, donor)."""
    from cellstrata.engine.input.datasets import synthetic_dataset

    return synthetic_dataset(n_cells, n_genes, seed=seed)


def planted_layers(
    labels: Sequence[str] | np.ndarray,
    strength: Sequence[float] = STRENGTH,
    *,
    width: int = WIDTH,
    signal_dims: int = 4,
    seed: int = 0,
) -> np.ndarray:
    """``[len(strength), N, width]`` float32: layer ``l`` is ``strength[l] * mean[label] + N(0, 1)``.

    The class means live in a random ``signal_dims``-dimensional subspace (unit-norm directions scaled
    by 3), the same for every layer; the noise is drawn fresh for every layer.
    """
    rng = np.random.default_rng(seed)
    classes, y = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    basis = np.linalg.qr(rng.standard_normal((width, signal_dims)))[0].T  # [signal_dims, width], orthonormal
    means = 3.0 * rng.standard_normal((len(classes), signal_dims)) @ basis
    out = np.empty((len(strength), len(y), width), dtype=np.float32)
    for layer, s in enumerate(strength):
        out[layer] = s * means[y] + rng.standard_normal((len(y), width))
    return out


@dataclass
class Planted:
    """A store with a planted best layer, the AnnData it belongs to and the arrays it holds."""

    path: Path
    adata: Any
    pooled: dict[str, np.ndarray]
    best: int = BEST
    n_layers: int = N_LAYERS
    chunk_cells: int = CHUNK


def planted(path: str | Path, *, adata: Any = None, seed: int = 0, dtype: str = "float32") -> Planted:
    """The planted store: pooling ``x`` carries the signal (best layer ``BEST``); pooling ``y`` is noise."""
    adata = synthetic_adata(seed=seed) if adata is None else adata
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    x = planted_layers(labels, seed=seed + 1)
    y = np.random.default_rng(seed + 2).standard_normal((N_LAYERS + 1, adata.n_obs, 16)).astype(np.float32)
    pooled = {"x": x, "y": y}
    write_store(path, pooled, adata.obs_names, adata=adata, dtype=dtype)
    return Planted(path=Path(path), adata=adata, pooled=pooled)
