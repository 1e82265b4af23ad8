"""The built-in end-to-end run behind ``cellstrata demo``."""

from __future__ import annotations

import time
from pathlib import Path

from .engine.datasets import write_synthetic_h5ad
from .engine.models import get_family
from .engine.pipeline import extract
from .engine.store import Store

# the var column holding the identifiers each model's users have (symbols are the var_names)
GENE_COLUMN = {"scgpt": None, "scfoundation": None, "tahoe-x1": "ensembl_id", "geneformer": "ensembl_id"}
DEMO_CHUNK_CELLS = 512  # several chunks, so the demo store shows per-chunk commits and resume
RANDOM_WEIGHTS_NOTICE = (
    "NOTE: the demo model has RANDOM weights. The extraction, the store and its layout are real; "
    "the embeddings carry no biology. Use a published checkpoint for real analyses."
)


def run_demo(out: Path, *, model: str = "scgpt", n_cells: int = 2000, progress: bool = True) -> Store:
    """Synthetic data -> tiny random checkpoint of ``model`` -> all-layer store; prints where things are."""
    family = get_family(model)
    model = family.name
    out.mkdir(parents=True, exist_ok=True)
    data = out / "demo.h5ad"
    ckpt = out / f"{model}-tiny"
    store_path = out / ("demo.zarr" if model == "scgpt" else f"demo-{model}.zarr")
    gene_column = GENE_COLUMN.get(model)
    print(RANDOM_WEIGHTS_NOTICE)
    t0 = time.perf_counter()
    if not data.exists():
        write_synthetic_h5ad(data, n_cells=n_cells, seed=0, n_unknown_genes=60, genes_per_cell=180)
        print(f"wrote {n_cells} synthetic cells (cell types, a trajectory, perturbations in 2 states) to {data}")
    if not (ckpt.is_dir() and any(ckpt.iterdir())):
        family.init_checkpoint("tiny", ckpt, seed=0)
        print(f"wrote a tiny {model} checkpoint with random weights to {ckpt}")
    store = extract(
        data,
        model=model,
        checkpoint=ckpt,
        gene_column=gene_column,
        out=store_path,
        poolings=["all"],
        chunk_cells=DEMO_CHUNK_CELLS,
        overwrite=True,
        progress=progress,
    )
    print()
    print(store.summary())
    print()
    print(f"demo finished in {time.perf_counter() - t0:.1f} s. Next:")
    print(f"  cellstrata info {store_path}")
    print(f"  python -c \"import cellstrata as cs; print(cs.open_store('{store_path}').to_xarray())\"")
    genes = f" --gene-column {gene_column}" if gene_column else ""
    print(
        f"  cellstrata extract {data} --model {model} --checkpoint {ckpt}{genes} --out my.zarr --pool all  "
        "# your own run; re-run to resume"
    )
    print(RANDOM_WEIGHTS_NOTICE)
    return store
