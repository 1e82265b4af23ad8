"""Per task, context and pooling: the best layer, its depth, its gain over the final layer, with confidence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import pandas as pd

from .confidence import (
    CI_LEVEL,
    REL_GAIN_MIN_FINAL,
    best_index_distribution,
    gain_basis,
    percentile_ci,
    relative_gain,
    reported_gain,
    selection_adjusted,
    tied_with_best,
)
from .runner import BASELINE_POOLING, ProbeResults

SUMMARY_COLUMNS = [
    "task", "context", "pooling", "metric", "best_layer", "n_layers", "depth", "depth_ci_low", "depth_ci_high",
    "value", "ci_low", "ci_high", "final_value", "diff_vs_final", "diff_ci_low", "diff_ci_high",
    "gain_vs_final", "gain_ci_low", "gain_ci_high", "gain_basis", "n_candidates", "sel_ci_low", "sel_ci_high",
    "sel_diff_ci_low", "sel_diff_ci_high", "tied_layers", "best_support", "baseline", "chance", "constant_layers",
    "n_cells", "answer",
]  # fmt: skip


def summarize(results: ProbeResults, *, metrics: str = "primary") -> pd.DataFrame:
    """One row per (task, context, pooling, metric): ``metrics="primary"`` (each task's ranking metric) or ``"all"``.

    - ``best_layer``: the layer with the best value; ``depth`` = layer / L (0 = embedding output, 1 = last block);
      ``depth_ci_*``: the 2.5/97.5 % quantiles of the winning layer's depth over the bootstrap replicates;
    - ``diff_vs_final``: best - final, and ``gain_vs_final``: (best - final) / |final|, each with a CI from the
      paired replicates (the same resampled cells for every layer); ``gain_basis`` says which one the answer
      prints: the relative gain only when |final| >= 0.1 and best and final have the same sign (else NaN);
    - ``n_candidates``: the layers the best was picked from (those with a finite value); ``sel_ci_*`` and
      ``sel_diff_ci_*``: selection-adjusted intervals of the best value and of best - final, the layer
      re-chosen in each bootstrap replicate and scored in the next (:func:`.confidence.selection_adjusted`);
    - ``tied_layers``: layers whose paired difference with the best has a CI reaching 0;
    - ``best_support``: the fraction of replicates the best layer wins;
    - ``chance``: the metric's chance level (:mod:`.chance`); ``constant_layers``: layers whose features are
      the same for every cell (their metrics are NaN, never the best).
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
        flat = "constant_features" in g and bool((g["constant_features"] == 1).any())
        note = "no finite values" + (" (constant features)" if flat else "")
        return {"task": task, "context": context, "pooling": pooling, "metric": metric, "answer": note}
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
    gain = reported_gain(values[b], final_value) if len(final_pos) else float("nan")
    basis = str(gain_basis(values[b], final_value)) if np.isfinite(final_value) else ""
    gain_lo = gain_hi = diff_lo = diff_hi = float("nan")
    diff = float(values[b] - final_value) if len(final_pos) else float("nan")
    tied = np.array([b])
    depth_lo = depth_hi = float("nan")
    support = float("nan")
    sel = {"n_candidates": float(finite.sum())}
    if reps is not None:
        if len(final_pos):
            if basis == "relative":
                # relative_gain of two arrays is an array
                gain_lo, gain_hi = percentile_ci(
                    cast(np.ndarray, relative_gain(reps[b], reps[final_pos[0]])), center=float(gain)
                )
            diff_lo, diff_hi = percentile_ci(reps[b] - reps[final_pos[0]], center=diff)
        final_row = int(final_pos[0]) if len(final_pos) else None
        sel = selection_adjusted(reps, final_row, higher_is_better=higher, level=CI_LEVEL)
        tied = tied_with_best(reps, b, higher_is_better=higher, level=CI_LEVEL)
        winners = best_index_distribution(reps, higher_is_better=higher)
        if winners.size:
            depth_lo, depth_hi = (float(q) / L for q in np.quantile(layers[winners], [0.025, 0.975]))
            support = float(np.mean(winners == b))
    base = g["baseline"].iloc[0] if "baseline" in g else float("nan")
    chance = g["chance"].iloc[0] if "chance" in g else float("nan")
    flagged = g["constant_features"].to_numpy(dtype=np.float64) == 1 if "constant_features" in g else ~finite
    constant = format_layers(layers[flagged & ~finite])
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
        "gain_basis": basis,
        "n_candidates": int(sel["n_candidates"]),
        "sel_ci_low": float(sel.get("value_ci_low", float("nan"))),
        "sel_ci_high": float(sel.get("value_ci_high", float("nan"))),
        "sel_diff_ci_low": float(sel.get("diff_ci_low", float("nan"))),
        "sel_diff_ci_high": float(sel.get("diff_ci_high", float("nan"))),
        "tied_layers": format_layers(layers[tied]),
        "best_support": support,
        "baseline": float(base) if base is not None and pd.notna(base) else float("nan"),
        "chance": float(chance) if chance is not None and pd.notna(chance) else float("nan"),
        "constant_layers": constant,
        "n_cells": int(best["n_cells"]),
    }
    row["answer"] = answer(row, higher)
    return row


def format_layers(layers: np.ndarray | Sequence[int]) -> str:
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


def _interval(lo: float, hi: float, fmt: Any = _signed) -> str:
    return f"[{fmt(lo)}, {fmt(hi)}]"


def _plain(x: float) -> str:
    return f"{x:.3f}" if np.isfinite(x) else "n/a"


def answer(row: dict[str, Any], higher_is_better: bool = True) -> str:
    """The one-line answer, e.g. "layer 15 of 24 (62% depth), best of 25 layers: m 0.76 [0.72, 0.79]
    (selection-adjusted [0.70, 0.79]); +0.180 (+31%) over the final layer (0.584), CI [...], selection-adjusted
    [...]; ...; chance 0"."""
    L = row["n_layers"]
    n_cand = row.get("n_candidates")
    picked = f", best of {int(n_cand)} layers" if n_cand is not None and np.isfinite(n_cand) and n_cand > 1 else ""
    text = (
        f"layer {row['best_layer']} of {L} ({100 * row['depth']:.0f}% depth){picked}: {row['metric']} "
        f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    )
    sel_lo, sel_hi = row.get("sel_ci_low", float("nan")), row.get("sel_ci_high", float("nan"))
    if np.isfinite(sel_lo):
        text += f" (selection-adjusted {_interval(sel_lo, sel_hi, _plain)})"
    if row["best_layer"] == L:
        text += "; the final layer is best"
    elif np.isfinite(row["final_value"]):
        word = "over" if higher_is_better else "vs"
        if row.get("gain_basis", "relative") == "relative" and np.isfinite(row["gain_vs_final"]):
            change = f"{_signed(row['diff_vs_final'])} ({_pct(row['gain_vs_final'])})"
        else:
            small = abs(row["final_value"]) < REL_GAIN_MIN_FINAL
            why = "final value near 0" if small else "best and final of opposite signs"
            change = f"{_signed(row['diff_vs_final'])} (absolute; {why})"
        text += (
            f"; {change} {word} the final layer ({row['final_value']:.3f}), "
            f"CI {_interval(row['diff_ci_low'], row['diff_ci_high'])}"
        )
        d_lo, d_hi = row.get("sel_diff_ci_low", float("nan")), row.get("sel_diff_ci_high", float("nan"))
        if np.isfinite(d_lo):
            text += f", selection-adjusted {_interval(d_lo, d_hi)}"
    if row["tied_layers"] and row["tied_layers"] != str(row["best_layer"]):
        text += f"; statistically tied: layers {row['tied_layers']}"
    if np.isfinite(row.get("chance", float("nan"))):
        text += f"; chance {row['chance']:.3g}"
    if np.isfinite(row.get("baseline", float("nan"))):
        text += f"; HVG-PCA baseline {row['baseline']:.3f}"
    if row.get("constant_layers"):
        text += f"; NaN at layer(s) {row['constant_layers']}: constant features"
    return text
