"""The built-in end-to-end run behind ``cellstrata demo``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .engine.errors import ProbeError
from .engine.input.datasets import CONTROL, write_synthetic_h5ad
from .engine.models import get_family
from .engine.models.weights import mark_random_init
from .engine.run import extract
from .engine.storage.store import Store

# the var column holding the identifiers each model's users have (symbols are the var_names)
GENE_COLUMN = {"scgpt": None, "scfoundation": None, "tahoe-x1": "ensembl_id", "geneformer": "ensembl_id"}
DEMO_CHUNK_CELLS = 512  # several chunks, so the demo store shows per-chunk commits and resume
RANDOM_WEIGHTS_NOTICE = (
    "NOTE: the demo model has RANDOM weights. The extraction, the store and its layout are real; "
    "the embeddings carry no biology. Use a published checkpoint for real analyses."
)


# the probe tasks the demo runs on the synthetic annotations (engine/input/datasets.py), every one per cell state
DEMO_TASKS: dict[str, dict[str, Any]] = {
    "cell_type": {"label_key": "cell_type", "group_key": "donor"},
    "knn_transfer": {"label_key": "cell_type"},
    "clustering": {"label_key": "cell_type"},
    "trajectory": {"time_key": "time"},
    "perturbation": {"perturbation_key": "perturbation", "control": CONTROL},
}
DEMO_POOLINGS = ("mean", "official")


def run_demo(
    out: Path, *, model: str = "scgpt", n_cells: int = 2000, progress: bool = True, probe: bool = True
) -> Store:
    """Synthetic data -> tiny random checkpoint of ``model`` -> all-layer store -> probe report.

    Prints where everything is; the probe report (every task, per cell state) lands in ``out/probe-<model>``.
    """
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
        mark_random_init(ckpt, family=model, preset="tiny", seed=0)
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
    if probe:
        report = out / f"probe-{model}"
        run_demo_probe(store, data, report)
        print(f"probe report: {report / 'summary.md'}, {report / 'results.csv'}, {report / 'layers.png'}")
        print()
    print(f"demo finished in {time.perf_counter() - t0:.1f} s. Next:")
    print(f"  cellstrata info {store_path}")
    print(f"  python -c \"import cellstrata as cs; print(cs.open_store('{store_path}').to_xarray())\"")
    genes = f" --gene-column {gene_column}" if gene_column else ""
    print(
        f"  cellstrata extract {data} --model {model} --checkpoint {ckpt}{genes} --out my.zarr --pool all  "
        "# your own run; re-run to resume"
    )
    print(
        f"  cellstrata probe {store_path} --adata {data} --task cell_type,trajectory --label-key cell_type "
        "--time-key time --context-key cell_state --out my-probe  # which layer is best"
    )
    print(RANDOM_WEIGHTS_NOTICE)
    return store


def run_demo_probe(store: Store, data: Path, report: Path) -> None:
    """Every probe task on the demo store, per cell state; prints the answers and writes the report."""
    from .probes.report import print_answers, write_report
    from .probes.runner import probe
    from .probes.summary import summarize
    from .probes.tasks import make_task

    tasks = [make_task(name, {"context_key": "cell_state", **cols}) for name, cols in DEMO_TASKS.items()]
    poolings = [p for p in DEMO_POOLINGS if p in store.poolings] or store.poolings[:1]
    print(f"probing {len(tasks)} tasks x {len(poolings)} poolings x {store.n_layers + 1} layers, per cell state ...")
    try:
        results = probe(store, data, tasks, pooling=poolings)
    except ProbeError as err:
        print(f"probe skipped: {err} (the demo's probes need about 1000 cells or more: --cells)")
        return
    write_report(results, report)
    print()
    print_answers(summarize(results))
    print(
        "(random weights: expect the HVG-PCA baseline to beat every layer; with a published checkpoint these "
        "lines answer which layer to use)"
    )
