"""The probe report: ``results.csv`` (the tidy table), ``summary.csv``/``summary.md`` and ``layers.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .runner import BASELINE_POOLING, ProbeResults
from .summary import summarize


def write_report(results: ProbeResults, out: str | Path) -> dict[str, Path]:
    """Write the report files into the folder ``out`` (created); returns their paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    paths = {
        "results": out / "results.csv",
        "summary_csv": out / "summary.csv",
        "summary": out / "summary.md",
        "plot": out / "layers.png",
    }
    results.table.to_csv(paths["results"], index=False)
    summary.to_csv(paths["summary_csv"], index=False)
    paths["summary"].write_text(summary_markdown(results, summary))
    plot_layers(results, summary, paths["plot"])
    return paths


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def summary_markdown(results: ProbeResults, summary: pd.DataFrame) -> str:
    """Markdown: the answers, a table per task, the caps and settings that produced them."""
    s = results.store
    lines = [
        "# Layer-wise probe report",
        "",
        f"Store `{s['path']}`: {s['model']} ({s.get('preset') or 'custom'}), {s['n_layers']} blocks, "
        f"{s['n_cells']} cells. Layer 0 is the embedding output, layer k the output of block k (depth = k / "
        f"{s['n_layers']}); the model's own embedding layer is {s.get('official_layer')}.",
        "",
        "## Answers",
        "",
    ]
    for _, r in summary.iterrows():
        lines.append(f"- **{r['task']}** ({r['context']}, {r['pooling']}): {r['answer']}")
    lines += ["", "## Per task", ""]
    cols = [
        "context", "pooling", "metric", "best_layer", "depth", "value", "ci_low", "ci_high", "final_value",
        "diff_vs_final", "diff_ci_low", "diff_ci_high", "gain_vs_final", "tied_layers", "best_support", "baseline",
        "n_cells",
    ]  # fmt: skip
    for task, g in summary.groupby("task", sort=False):
        lines += [f"### {task}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, r in g.iterrows():
            lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
        lines.append("")
    lines += ["## Cells used (caps)", ""]
    for key, cap in results.caps.items():
        lines.append(f"- `{key}`: {json.dumps(cap, default=str)}")
    lines += ["", "## Settings", ""]
    for name, settings in results.settings.items():
        lines.append(f"- `{name}`: {json.dumps(settings, default=str)}")
    t = results.timings
    if t:
        lines += [
            "",
            f"Computed in {t.get('total_s', 0):.1f} s ({int(t.get('layer_evaluations', 0))} layer evaluations, "
            f"{int(t.get('layer_evaluations_cached', 0))} from the store's cache). CIs: 95% bootstrap over cells "
            "(over perturbations for the perturbation task), paired across layers.",
        ]
    return "\n".join(lines) + "\n"


def plot_layers(results: ProbeResults, summary: pd.DataFrame, path: str | Path) -> None:
    """Each task's primary metric vs depth: one line per context and pooling, CI band, best layer starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results.table
    tasks = list(dict.fromkeys(table["task"]))
    n = max(len(tasks), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    L = results.n_layers
    for ax, task in zip(axes.ravel(), tasks, strict=False):
        metric = results.primary[task]
        t = table[(table["task"] == task) & (table["metric"] == metric)]
        layer_rows = t[t["pooling"] != BASELINE_POOLING]
        contexts = list(dict.fromkeys(layer_rows["context"]))
        poolings = list(dict.fromkeys(layer_rows["pooling"]))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        styles = ["-", "--", ":", "-."]
        markers = ["o", "s", "^", "D"]
        for (context, pooling), g in layer_rows.groupby(["context", "pooling"], sort=False):
            g = g.sort_values("layer")
            c = colors[contexts.index(context) % len(colors)]
            k = poolings.index(pooling)
            x = g["layer"].astype(float).to_numpy() / L
            label = pooling if context == "all" else f"{context} · {pooling}"
            ax.plot(x, g["value"], ls=styles[k % 4], marker=markers[k % 4], ms=3, color=c, label=label)
            ax.fill_between(x, g["ci_low"].astype(float), g["ci_high"].astype(float), color=c, alpha=0.15, lw=0)
            row = summary[(summary["task"] == task) & (summary["context"] == context) & (summary["pooling"] == pooling)]
            if len(row):
                r = row.iloc[0]
                ax.plot([r["depth"]], [r["value"]], marker="*", ms=14, color=c, mec="black", mew=0.6, zorder=5)
        base = t[t["pooling"] == BASELINE_POOLING].drop_duplicates("context")
        for _, b in base.iterrows():
            c = colors[contexts.index(b["context"]) % len(colors)] if b["context"] in contexts else "grey"
            name = "HVG-PCA(50)" if b["context"] == "all" else f"HVG-PCA(50) · {b['context']}"
            ax.axhline(float(b["value"]), ls=(0, (1, 2)), lw=1.2, color=c, label=name)
        ax.set_title(f"{task}: {metric}", fontsize=10)
        ax.set_xlabel(f"depth (layer / {L})")
        ax.set_ylabel(metric + ("" if t["higher_is_better"].all() else " (lower is better)"))
        ax.set_xlim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    s = results.store
    fig.suptitle(
        f"{s['model']} ({s.get('preset') or 'custom'}), {s['n_cells']} cells: which layer is best", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def best_layers(summary: pd.DataFrame) -> dict[tuple[str, str, str], int]:
    """``{(task, context, pooling): best layer}`` from a summary table."""
    return {
        (r.task, r.context, r.pooling): int(r.best_layer) for r in summary.itertuples() if np.isfinite(r.best_layer)
    }
