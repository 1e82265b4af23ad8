"""Per task, context and pooling: the best layer, its depth, its gain over the final layer, with confidence."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .confidence import CI_LEVEL, best_index_distribution, percentile_ci, relative_gain, tied_with_best
from .runner import BASELINE_POOLING, ProbeResults

SUMMARY_COLUMNS = [
    "task", "context", "pooling", "metric", "best_layer", "n_layers", "depth", "depth_ci_low", "depth_ci_high",
    "value", "ci_low", "ci_high", "final_value", "diff_vs_final", "diff_ci_low", "diff_ci_high",
    "gain_vs_final", "gain_ci_low", "gain_ci_high",
    "tied_layers", "best_support", "baseline", "n_cells", "answer",
]  # fmt: skip


def summarize(results: ProbeResults, *, metrics: str = "primary") -> pd.DataFrame:
    """One row per (task, context, pooling, metric): ``metrics="primary"`` (each task's ranking metric) or ``"all"``.

    - ``best_layer``: the layer with the best value; ``depth`` = layer / L (0 = embedding output, 1 = last block);
      ``depth_ci_*``: the 2.5/97.5 % quantiles of the winning layer's depth over the bootstrap replicates;
    - ``diff_vs_final``: best - final, and ``gain_vs_final``: (best - final) / |final|, each with a CI from the
      paired replicates (the same resampled cells for every layer); the relative gain is unstable when the
      final value is near 0, the difference is not;
    - ``tied_layers``: layers whose paired difference with the best has a CI reaching 0;
    - ``best_support``: the fraction of replicates the best layer wins.
    """
    table = results.table
    layer_rows = table[table["pooling"] != BASELINE_POOLING]
    if metrics == "primary":
        wanted = layer_rows["metric"] == layer_rows["task"].map(results.primary)
        layer_rows = layer_rows[wanted]
    rows = []
    for (task, context, pooling, metric), g in layer_rows.groupby(["task", "context", "pooling", "metric"], sort=False):
        rows.append(_summarize_series(results, task, context, pooling, metric, g))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _summarize_series(
    results: ProbeResults, task: str, context: str, pooling: str, metric: str, g: pd.DataFrame
) -> dict[str, Any]:
    L = results.n_layers
    higher = bool(results.higher_is_better.get((task, metric), True))
    g = g.sort_values("layer")
    layers = g["layer"].astype(int).to_numpy()
    values = g["value"].to_numpy(dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return {"task": task, "context": context, "pooling": pooling, "metric": metric, "answer": "no finite values"}
    masked = np.where(finite, values, -np.inf if higher else np.inf)
    b = int(np.argmax(masked) if higher else np.argmin(masked))
    best = g.iloc[b]
    reps = results.replicates.get((task, context, pooling, metric))
    if reps is not None and reps.shape[0] == len(results.layers):
        pos = [results.layers.index(int(x)) for x in layers]
        reps = reps[pos]
    else:
        reps = None
    final_pos = np.flatnonzero(layers == L)
    final_value = float(values[final_pos[0]]) if len(final_pos) else float("nan")
    gain = relative_gain(values[b], final_value) if len(final_pos) else float("nan")
    gain_lo = gain_hi = diff_lo = diff_hi = float("nan")
    diff = float(values[b] - final_value) if len(final_pos) else float("nan")
    tied = np.array([b])
    depth_lo = depth_hi = float("nan")
    support = float("nan")
    if reps is not None:
        if len(final_pos):
            gain_lo, gain_hi = percentile_ci(relative_gain(reps[b], reps[final_pos[0]]), center=float(gain))
            diff_lo, diff_hi = percentile_ci(reps[b] - reps[final_pos[0]], center=diff)
        tied = tied_with_best(reps, b, higher_is_better=higher, level=CI_LEVEL)
        winners = best_index_distribution(reps, higher_is_better=higher)
        if winners.size:
            depth_lo, depth_hi = (float(q) / L for q in np.quantile(layers[winners], [0.025, 0.975]))
            support = float(np.mean(winners == b))
    base = g["baseline"].iloc[0] if "baseline" in g else float("nan")
    row = {
        "task": task,
        "context": context,
        "pooling": pooling,
        "metric": metric,
        "best_layer": int(layers[b]),
        "n_layers": L,
        "depth": int(layers[b]) / L,
        "depth_ci_low": depth_lo,
        "depth_ci_high": depth_hi,
        "value": float(values[b]),
        "ci_low": float(best["ci_low"]),
        "ci_high": float(best["ci_high"]),
        "final_value": final_value,
        "diff_vs_final": diff,
        "diff_ci_low": float(diff_lo),
        "diff_ci_high": float(diff_hi),
        "gain_vs_final": float(gain),
        "gain_ci_low": float(gain_lo),
        "gain_ci_high": float(gain_hi),
        "tied_layers": format_layers(layers[tied]),
        "best_support": support,
        "baseline": float(base) if base is not None and pd.notna(base) else float("nan"),
        "n_cells": int(best["n_cells"]),
    }
    row["answer"] = answer(row, higher)
    return row


def format_layers(layers: np.ndarray) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    layers = sorted({int(x) for x in layers})
    if not layers:
        return ""
    runs, start, prev = [], layers[0], layers[0]
    for x in layers[1:]:
        if x == prev + 1:
            prev = x
            continue
        runs.append((start, prev))
        start = prev = x
    runs.append((start, prev))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _signed(x: float) -> str:
    return f"{x:+.3f}" if np.isfinite(x) else "n/a"


def _pct(x: float) -> str:
    return f"{100 * x:+.0f}%" if np.isfinite(x) else "n/a"


def answer(row: dict[str, Any], higher_is_better: bool = True) -> str:
    """The one-line answer: "layer 15 of 24 (62% depth), 0.76 [0.72, 0.79], +30% over final [CI ...]"."""
    L = row["n_layers"]
    text = (
        f"layer {row['best_layer']} of {L} ({100 * row['depth']:.0f}% depth): {row['metric']} "
        f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    )
    if row["best_layer"] == L:
        text += "; the final layer is best"
    elif np.isfinite(row["final_value"]):
        word = "over" if higher_is_better else "vs"
        text += (
            f"; {_signed(row['diff_vs_final'])} ({_pct(row['gain_vs_final'])}) {word} the final layer "
            f"({row['final_value']:.3f}), CI [{_signed(row['diff_ci_low'])}, {_signed(row['diff_ci_high'])}]"
        )
    if row["tied_layers"] and row["tied_layers"] != str(row["best_layer"]):
        text += f"; statistically tied: layers {row['tied_layers']}"
    if np.isfinite(row.get("baseline", float("nan"))):
        text += f"; HVG-PCA baseline {row['baseline']:.3f}"
    return text
