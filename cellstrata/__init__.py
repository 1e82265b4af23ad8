"""cellstrata: every layer of single-cell foundation models, streamed into chunked zarr stores.

```python
import cellstrata as cs
store = cs.extract("atlas.h5ad", model="scgpt", checkpoint="scGPT_human", out="run.zarr", poolings=["mean", "cls"])
gf = cs.extract("atlas.h5ad", model="geneformer", checkpoint="hf:ctheodoris/Geneformer/Geneformer-V2-104M", out="g")
store = cs.open_store("run.zarr")
store.layers("mean")   # dask array [L+1, N, H]
store.to_xarray()
store.to_anndata(adata, layers=[7, 12], pooling="cls")   # adata.obsm["X_scgpt_L7"], ["X_scgpt_L12"] (float32)
res = cs.probe("run.zarr", "atlas.h5ad", tasks)   # which layer is best, per task and cell state (cellstrata.probes)
```
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"  # the one version source (pyproject.toml reads it; see CHANGELOG.md)

_PUBLIC = {
    "extract": ("cellstrata.engine.run", "extract"),
    "open_store": ("cellstrata.engine.storage.store", "open_store"),
    "Store": ("cellstrata.engine.storage.store", "Store"),
    "CellstrataError": ("cellstrata.engine.errors", "CellstrataError"),
    "synthetic_dataset": ("cellstrata.engine.input.datasets", "synthetic_dataset"),
    "probe": ("cellstrata.probes.runner", "probe"),
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    """Import the public API on first use, so ``import cellstrata.kernels`` stays light."""
    if name in _PUBLIC:
        import importlib

        module, attr = _PUBLIC[name]
        return getattr(importlib.import_module(module), attr)
    msg = f"module 'cellstrata' has no attribute {name!r}"
    raise AttributeError(msg)
