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


def answer_line(task: str, context: str, pooling: str, answer: str) -> str:
    """One answer as the CLI prints it: ``task [context, pooling]: answer``."""
    return f"{task} [{context}, {pooling}]: {answer}"


def summary_markdown(results: ProbeResults, summary: pd.DataFrame) -> str:
    """Markdown: the one-line answers first, then the store, a table per task, how to read them, the caps and
    settings that produced them."""
    s = results.store
    random = " — RANDOM WEIGHTS" if is_random(s) else ""
    lines = [f"# Layer-wise probe report{random}", "", "## Answers", ""]
    for _, r in summary.iterrows():
        lines.append(f"- {answer_line(r['task'], r['context'], r['pooling'], r['answer'])}")
    lines += [
        "",
        "## Store",
        "",
        f"Store `{s['path']}`: {s['model']} ({s.get('preset') or 'custom'}), {s['n_layers']} blocks, "
        f"{s['n_cells']} cells. Layer 0 is the embedding output, layer k the output of block k (depth = k / "
        f"{s['n_layers']}); the model's own embedding layer is {s.get('official_layer')}.",
        "",
        weights_line(s),
    ]
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


#: line styles of the contexts (solid, long dashes, dots, dash-dot-dot); the baseline is a thin grey dashed line
#: and the chance level a grey dash-dotted one, so neither is mistaken for a context's coloured line
CONTEXT_STYLES: list[Any] = ["-", (0, (6, 2)), (0, (1, 1.5)), (0, (5, 1.5, 1, 1.5, 1, 1.5))]
CONTEXT_MARKERS = ["o", "s", "^", "D", "v", "P"]
BASELINE_STYLE: Any = (0, (3, 3))
CHANCE_STYLE = "-."
PANEL_SIZE = (5.2, 3.8)  # inches per task panel
LEGEND_WIDTH = 2.6  # inches right of the panels for the shared legend
DPI = 130


def figure_size(n_tasks: int) -> tuple[float, float]:
    """The size in inches of ``layers.png``: up to 3 panels a row, the shared legend to their right."""
    n = max(n_tasks, 1)
    ncols = min(n, 3)
    return PANEL_SIZE[0] * ncols + LEGEND_WIDTH, PANEL_SIZE[1] * math.ceil(n / ncols)


def plot_layers(results: ProbeResults, summary: pd.DataFrame, path: str | Path) -> None:
    """Write ``layers.png`` (:func:`layers_figure`) at 130 dpi."""
    import matplotlib.pyplot as plt

    fig = layers_figure(results, summary)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def layers_figure(results: ProbeResults, summary: pd.DataFrame) -> Any:
    """Each task's primary metric vs depth, one panel per task: one colour per pooling and one line style (and
    marker) per context, the same in every panel; CI bands, each line's best layer starred, the chance level grey
    dash-dotted, the HVG-PCA baseline thin grey dashed (with the context's marker), layers with constant features
    crossed at the bottom. One legend for the figure, right of the panels. Returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    table = results.table
    tasks = list(dict.fromkeys(table["task"]))
    layer_rows_all = table[table["pooling"] != BASELINE_POOLING]
    contexts = list(dict.fromkeys(table["context"]))
    poolings = list(dict.fromkeys(layer_rows_all["pooling"]))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {p: palette[i % len(palette)] for i, p in enumerate(poolings)}
    style = {c: CONTEXT_STYLES[i % len(CONTEXT_STYLES)] for i, c in enumerate(contexts)}
    marker = {c: CONTEXT_MARKERS[i % len(CONTEXT_MARKERS)] for i, c in enumerate(contexts)}
    several = len(contexts) > 1

    n = max(len(tasks), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    width, height = figure_size(n)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    L = results.n_layers
    drawn: dict[str, Any] = {"chance": False, "baseline": set(), "constant": False, "star": False}
    for ax, task in zip(axes.ravel(), tasks, strict=False):
        metric = results.primary[task]
        t = table[(table["task"] == task) & (table["metric"] == metric)]
        layer_rows = t[t["pooling"] != BASELINE_POOLING]
        for (context, pooling), g in layer_rows.groupby(["context", "pooling"], sort=False):
            g = g.sort_values("layer")
            c = color[pooling]
            x = g["layer"].astype(float).to_numpy() / L
            ax.plot(
                x, g["value"], ls=style[context], marker=marker[context], ms=3, lw=1.4, color=c,
                label=f"{context} · {pooling}",
            )  # fmt: skip
            ax.fill_between(x, g["ci_low"].astype(float), g["ci_high"].astype(float), color=c, alpha=0.08, lw=0)
            row = summary[(summary["task"] == task) & (summary["context"] == context) & (summary["pooling"] == pooling)]
            if len(row) and np.isfinite(float(row.iloc[0]["value"])):
                r = row.iloc[0]
                ax.plot(
                    [r["depth"]], [r["value"]], marker="*", ms=13, color=c, mec="black", mew=0.6, ls="none",
                    zorder=5, label="_best",
                )  # fmt: skip
                drawn["star"] = True
        if "chance" in layer_rows:
            chance = layer_rows.drop_duplicates("context")
            levels = chance["chance"].astype(float)
            same = bool(levels.notna().all() and levels.nunique() == 1)
            for _, ch in chance.iterrows():
                level = float(ch["chance"])
                if not np.isfinite(level):
                    continue
                m = None if same or not several else marker[ch["context"]]
                ax.axhline(level, ls=CHANCE_STYLE, lw=1.1, color="dimgrey", alpha=0.9, label="_chance")
                if m is not None:
                    ax.plot([1.0], [level], marker=m, ms=4, color="dimgrey", ls="none", clip_on=False,
                            transform=ax.get_yaxis_transform(), label="_chance_marker")  # fmt: skip
                drawn["chance"] = True
                if same:
                    break
        if "constant_features" in layer_rows:
            flat = layer_rows[layer_rows["constant_features"] == 1]
            if len(flat):
                xs = sorted(set(flat["layer"].astype(float) / L))
                ax.plot(
                    xs, [0.03] * len(xs), ls="none", marker="x", ms=7, mew=1.5, color="crimson",
                    transform=ax.get_xaxis_transform(), label="_constant",
                )  # fmt: skip
                drawn["constant"] = True
        base = t[t["pooling"] == BASELINE_POOLING].drop_duplicates("context")
        for _, b in base.iterrows():
            v = float(b["value"])
            if not np.isfinite(v):
                continue
            ax.axhline(v, ls=BASELINE_STYLE, lw=0.9, color="grey", label="_baseline")
            if several:
                # the context's marker at both ends says whose baseline it is
                ax.plot([0.0, 1.0], [v, v], marker=marker[b["context"]], ms=4, color="grey", ls="none",
                        clip_on=False, transform=ax.get_yaxis_transform(), label="_baseline_marker")  # fmt: skip
            drawn["baseline"].add(b["context"])
        ax.set_title(f"{task}: {metric}", fontsize=10)
        ax.set_xlabel(f"depth (layer / {L})")
        ax.set_ylabel(metric + ("" if t["higher_is_better"].all() else " (lower is better)"))
        ax.set_xlim(-0.03, 1.03)
        ax.grid(alpha=0.3)

    handles, labels = [], []

    def header(text: str) -> None:
        handles.append(Line2D([], [], ls="none"))
        labels.append(text)

    header("$\\bf{pooling}$ (colour)")
    for p in poolings:
        handles.append(Line2D([], [], color=color[p], lw=2.5))
        labels.append(p)
    header("$\\bf{context}$ (line, marker)")
    for c in contexts:
        handles.append(Line2D([], [], color="black", ls=style[c], marker=marker[c], ms=4, lw=1.4))
        labels.append(c)
    header("$\\bf{reference}$")
    if drawn["star"]:
        handles.append(Line2D([], [], marker="*", ms=11, color="white", mec="black", mew=0.8, ls="none"))
        labels.append("best layer")
    if drawn["chance"]:
        handles.append(Line2D([], [], ls=CHANCE_STYLE, lw=1.1, color="dimgrey"))
        labels.append("chance level")
    if drawn["baseline"]:
        if several:
            for c in [c for c in contexts if c in drawn["baseline"]]:
                handles.append(Line2D([], [], ls=BASELINE_STYLE, lw=0.9, color="grey", marker=marker[c], ms=4))
                labels.append(f"HVG-PCA(50) · {c}")
        else:
            handles.append(Line2D([], [], ls=BASELINE_STYLE, lw=0.9, color="grey"))
            labels.append("HVG-PCA(50) baseline")
    if drawn["constant"]:
        handles.append(Line2D([], [], marker="x", ms=7, mew=1.5, color="crimson", ls="none"))
        labels.append("NaN: constant features")
    handles.append(Line2D([], [], ls="none"))
    labels.append("shaded: 95% CI")
    legend_frac = LEGEND_WIDTH / width
    fig.legend(
        handles, labels, loc="center left", bbox_to_anchor=(1 - legend_frac + 0.01, 0.5), fontsize=8,
        frameon=False, handlelength=3.2, borderaxespad=0.0,
    )  # fmt: skip
    s = results.store
    weights = " — RANDOM WEIGHTS (init-checkpoint)" if is_random(s) else ""
    fig.suptitle(
        f"{s['model']} ({s.get('preset') or 'custom'}), {s['n_cells']} cells: which layer is best{weights}",
        fontsize=11,
        color="crimson" if weights else "black",
    )
    fig.tight_layout(rect=(0, 0, 1 - legend_frac, 1))
    return fig


def best_layers(summary: pd.DataFrame) -> dict[tuple[str, str, str], int]:
    """``{(task, context, pooling): best layer}`` from a summary table."""
    return {
        (r.task, r.context, r.pooling): int(r.best_layer) for r in summary.itertuples() if np.isfinite(r.best_layer)
    }


def print_answers(summary: Any) -> None:
    """Print the summary's one-line answers, one per task, context and pooling (as ``summary.md`` lists them)."""
    for r in summary.itertuples():
        print(answer_line(r.task, r.context, r.pooling, r.answer))
