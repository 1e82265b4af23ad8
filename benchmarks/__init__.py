"""The benchmarks of cellstrata: speed and memory, measured side by side in one run and saved as JSON and Markdown
under ``benchmarks/results/`` (method and findings in ``benchmarks/README.md``).

Run each from the repository root as ``python -m benchmarks.NAME [--help]``:

- ``throughput``: forward only vs cellstrata vs the peers' approach, every family and size (``cellstrata bench``).
- ``roofline``: matmul rate, copy bandwidth and model FLOPs per cell (``cellstrata bench roofline``).
- ``device_sprint``: the throughput variants in one process per model, for a short GPU loan.
- ``device_parity``: the same extraction on CUDA and on CPU, per family: how far apart the stores are.
- ``kernels``: ``pool_cast`` speed against the torch a user would write.
- ``scale``: extraction time and memory against cell count; 1 vs 2 local Dask workers.
- ``tokenizing``: tokenizing per core, every family, before and after vectorising.
- ``writer``: committing whole chunks: parts in turn vs side by side vs Blosc threads; a device loop's writer wait.
- ``probes``: probe time and peak memory per layer and task at 10k / 100k / 1M cells.

:mod:`benchmarks.harness` holds what they share: machine facts, load, worker processes (which run the
same module, ``python -m benchmarks.NAME --worker SPEC``) and result files; :mod:`benchmarks.common` holds
process memory, owned (marked) folders and formatting. No module here changes the import path.
"""

BENCHMARKS = (
    "throughput",
    "roofline",
    "device_sprint",
    "device_parity",
    "kernels",
    "scale",
    "tokenizing",
    "writer",
    "probes",
)
