"""Layer-wise probes over extracted stores (docs/design.md section 7): which layer is best for which task.

```python
import cellstrata as cs
from cellstrata.probes import CellTypeTask, TrajectoryTask, summarize, write_report

res = cs.probe("run.zarr", "atlas.h5ad", [CellTypeTask(context_key="cell_state"), TrajectoryTask(time_key="day")])
res.table                 # task, context, pooling, layer, depth, metric, value, ci_low, ci_high, n_cells, ...
summarize(res)            # best layer, depth, gain over the final layer with CI, tied layers
write_report(res, "probe-report")
```
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "probe": ("runner", "probe"),
    "ProbeResults": ("runner", "ProbeResults"),
    "summarize": ("summary", "summarize"),
    "write_report": ("report", "write_report"),
    "make_task": ("tasks", "make_task"),
    "task_names": ("tasks", "task_names"),
    "Task": ("base", "Task"),
    "Metric": ("base", "Metric"),
    "CellTypeTask": ("celltype", "CellTypeTask"),
    "KnnTransferTask": ("clustering", "KnnTransferTask"),
    "ClusteringTask": ("clustering", "ClusteringTask"),
    "TrajectoryTask": ("trajectory", "TrajectoryTask"),
    "PerturbationTask": ("perturbation", "PerturbationTask"),
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        module, attr = _PUBLIC[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
