"""The probe report: ``results.csv`` (the tidy table), ``summary.csv``/``summary.md`` and ``layers.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .chance import chance_rule
from .confidence import REL_GAIN_MIN_FINAL
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


def weights_line(store: dict[str, Any]) -> str:
    """ "Weights: RANDOM ..." for a store extracted from an ``init-checkpoint`` folder, else "as given"."""
    w = store.get("weights")
    if isinstance(w, dict) and w.get("weights") == "random":
        seed = f", seed {w['seed']}" if w.get("seed") is not None else ""
        return (
            f"Weights: **random weights** (written by `cellstrata init-checkpoint`{seed}); the numbers describe an "
            "untrained network and carry no biology."
        )
    ckpt = f" (checkpoint `{store['checkpoint']}`)" if store.get("checkpoint") else ""
    return f"Weights: as given{ckpt}."


def is_random(store: dict[str, Any]) -> bool:
    w = store.get("weights")
    return isinstance(w, dict) and w.get("weights") == "random"


def summary_markdown(results: ProbeResults, summary: pd.DataFrame) -> str:
    """Markdown: the answers, a table per task, how to read them, the caps and settings that produced them."""
    s = results.store
    lines = [
        "# Layer-wise probe report",
        "",
        f"Store `{s['path']}`: {s['model']} ({s.get('preset') or 'custom'}), {s['n_layers']} blocks, "
        f"{s['n_cells']} cells. Layer 0 is the embedding output, layer k the output of block k (depth = k / "
        f"{s['n_layers']}); the model's own embedding layer is {s.get('official_layer')}.",
        "",
        weights_line(s),
        "",
        "## Answers",
        "",
    ]
    for _, r in summary.iterrows():
        lines.append(f"- **{r['task']}** ({r['context']}, {r['pooling']}): {r['answer']}")
    lines += ["", "## Per task", ""]
    cols = [
        "context", "pooling", "metric", "best_layer", "n_candidates", "depth", "value", "ci_low", "ci_high",
        "sel_ci_low", "sel_ci_high", "final_value", "diff_vs_final", "diff_ci_low", "diff_ci_high",
        "sel_diff_ci_low", "sel_diff_ci_high", "gain_vs_final", "gain_basis", "tied_layers", "best_support",
        "chance", "baseline", "constant_layers", "n_cells",
    ]  # fmt: skip
    for task, g in summary.groupby("task", sort=False):
        lines += [f"### {task}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, r in g.iterrows():
            lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
        lines.append("")
    lines += reading_notes(results, summary)
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


def reading_notes(results: ProbeResults, summary: pd.DataFrame) -> list[str]:
    """The "How to read" section: selection, gains, chance levels, constant-feature layers."""
    n_layers = len(results.layers)
    out = [
        "## How to read",
        "",
        f"- **Selection.** Each best layer is picked from the layers evaluated ({n_layers} here: layer 0, the "
        "embedding output, and every block), so its own CI (`ci_low`/`ci_high`) is optimistic. `sel_ci_*` and "
        "`sel_diff_ci_*` are selection-adjusted: in every bootstrap replicate the best layer is chosen again and "
        "scored in the next replicate (another resample of the cells), as a held-out split would score it. "
        "When the winner changes from resample to resample these intervals widen and the gain over the final "
        "layer shrinks towards 0.",
        f"- **Gains.** `diff_vs_final` = best - final is always given; the relative gain (best - final) / |final| "
        f"only when |final| >= {REL_GAIN_MIN_FINAL:g} and best and final have the same sign (`gain_basis`), "
        "otherwise the answer prints the absolute difference.",
    ]
    metrics = list(dict.fromkeys(summary["metric"].dropna())) if "metric" in summary else []
    if metrics:
        rules = "; ".join(f"`{m}`: {chance_rule(m)}" for m in metrics)
        out.append(f"- **Chance levels** (`chance`, dash-dotted in layers.png; K = classes in the context): {rules}.")
    flat = results.table
    if "constant_features" in flat:
        flat = flat[flat["constant_features"] == 1]
        if len(flat):
            groups = flat.drop_duplicates(["task", "context", "pooling", "layer"])
            items = [
                f"{task} ({context}, {pooling}): layer(s) {', '.join(str(int(x)) for x in sorted(g['layer']))}"
                for (task, context, pooling), g in groups.groupby(["task", "context", "pooling"], sort=False)
            ]
            out.append(
                "- **Constant features.** Every cell has the same vector at these layers, so their metrics are "
                f"NaN (not computed on features without information): {'; '.join(items)}."
            )
    return [*out, ""]


def plot_layers(results: ProbeResults, summary: pd.DataFrame, path: str | Path) -> None:
    """Each task's primary metric vs depth: one line per context and pooling, CI band, best layer starred,
    the chance level dash-dotted, layers with constant features crossed at the bottom."""
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
        if "chance" in layer_rows:
            chance = layer_rows.drop_duplicates("context")
            levels = chance["chance"].astype(float)
            same = levels.notna().all() and levels.nunique() == 1
            for _, ch in chance.iterrows():
                if not np.isfinite(float(ch["chance"])):
                    continue
                c = "grey" if same else colors[contexts.index(ch["context"]) % len(colors)]
                name = "chance" if same or ch["context"] == "all" else f"chance · {ch['context']}"
                name += f" ({float(ch['chance']):.3g})"
                ax.axhline(float(ch["chance"]), ls="-.", lw=1.0, color=c, alpha=0.8, label=name)
                if same:
                    break
        if "constant_features" in layer_rows:
            flat = layer_rows[layer_rows["constant_features"] == 1]
            if len(flat):
                xs = sorted(set(flat["layer"].astype(float) / L))
                ax.plot(
                    xs, [0.03] * len(xs), ls="none", marker="x", ms=7, mew=1.5, color="crimson",
                    transform=ax.get_xaxis_transform(), label="NaN: constant features",
                )  # fmt: skip
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
    weights = " — RANDOM WEIGHTS (init-checkpoint)" if is_random(s) else ""
    fig.suptitle(
        f"{s['model']} ({s.get('preset') or 'custom'}), {s['n_cells']} cells: which layer is best{weights}",
        fontsize=11,
        color="crimson" if weights else "black",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def best_layers(summary: pd.DataFrame) -> dict[tuple[str, str, str], int]:
    """``{(task, context, pooling): best layer}`` from a summary table."""
    return {
        (r.task, r.context, r.pooling): int(r.best_layer) for r in summary.itertuples() if np.isfinite(r.best_layer)
    }
