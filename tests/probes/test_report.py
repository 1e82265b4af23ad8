"""The summary (best layer, paired gain, ties, answers) on hand-made results, and the report files."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pandas as pd
import pytest
from store_fixture import BEST, N_LAYERS, planted
from threadpoolctl import threadpool_limits

from cellstrata.probes.celltype import CellTypeTask
from cellstrata.probes.clustering import ClusteringTask
from cellstrata.probes.confidence import percentile_ci, selection_adjusted
from cellstrata.probes.report import DPI, best_layers, figure_size, layers_figure, summary_markdown, write_report
from cellstrata.probes.runner import BASELINE_POOLING, TABLE_COLUMNS, ProbeResults, probe
from cellstrata.probes.summary import SUMMARY_COLUMNS, answer, format_layers, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    with threadpool_limits(limits=1):
        yield


# --------------------------------------------------------------------------------------------------
# hand-made results
# --------------------------------------------------------------------------------------------------


def hand_results(
    values: list[float],
    reps: np.ndarray,
    *,
    higher: bool = True,
    baseline: float = 0.55,
    metric: str = "m",
    task: str = "t",
) -> ProbeResults:
    """Results of one task/context/pooling series with ``len(values)`` layers (L = len - 1)."""
    L = len(values) - 1
    rows = []
    for layer, v in enumerate(values):
        lo, hi = percentile_ci(reps[layer], center=v)
        rows.append(
            {
                "task": task, "context": "all", "pooling": "p", "layer": layer, "depth": layer / L, "metric": metric,
                "value": v, "ci_low": lo, "ci_high": hi, "n_cells": 100, "features": "std",
                "higher_is_better": higher, "baseline": baseline, "final_value": values[-1],
                "gain_vs_final": (v - values[-1]) / abs(values[-1]),
            }
        )  # fmt: skip
    rows.append(
        {
            "task": task, "context": "all", "pooling": BASELINE_POOLING, "layer": None, "depth": None,
            "metric": metric, "value": baseline, "ci_low": baseline - 0.05, "ci_high": baseline + 0.05,
            "n_cells": 100, "features": "std", "higher_is_better": higher, "baseline": float("nan"),
            "final_value": float("nan"), "gain_vs_final": float("nan"),
        }
    )  # fmt: skip
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    table["layer"] = table["layer"].astype("Int64")
    return ProbeResults(
        table=table,
        replicates={(task, "all", "p", metric): np.asarray(reps, dtype=np.float64)},
        layers=list(range(L + 1)),
        n_layers=L,
        primary={task: metric},
        higher_is_better={(task, metric): higher},
        caps={f"{task}/all": {"n_available": 120, "n_used": 100}},
        settings={task: {"task": task, "seed": 0}},
        store={"path": "/x.zarr", "model": "scgpt", "preset": None, "n_layers": L, "official_layer": L, "n_cells": 120},
        timings={"total_s": 1.5, "layer_evaluations": 4.0, "layer_evaluations_cached": 0.0},
    )


def paired_reps(values: list[float], B: int = 200, jitter: float = 0.005, seed: int = 0) -> np.ndarray:
    """Replicates with a shared per-replicate shift (paired) plus a little independent noise."""
    rng = np.random.default_rng(seed)
    shared = 0.03 * rng.standard_normal(B)
    return np.asarray(values)[:, None] + shared[None, :] + jitter * rng.standard_normal((len(values), B))


def test_summarize_hand_case_higher_is_better():
    values = [0.5, 0.7, 0.9, 0.6]
    reps = paired_reps(values)
    res = hand_results(values, reps)
    s = summarize(res)
    assert list(s.columns) == SUMMARY_COLUMNS and len(s) == 1
    r = s.iloc[0]
    assert (r["task"], r["context"], r["pooling"], r["metric"]) == ("t", "all", "p", "m")
    assert r["best_layer"] == 2 and r["n_layers"] == 3 and r["depth"] == pytest.approx(2 / 3)
    assert r["value"] == 0.9 and r["final_value"] == 0.6
    assert r["gain_vs_final"] == pytest.approx(0.5)
    lo, hi = percentile_ci((reps[2] - reps[3]) / np.abs(reps[3]), center=0.5)
    assert (r["gain_ci_low"], r["gain_ci_high"]) == pytest.approx((lo, hi))
    assert r["diff_vs_final"] == pytest.approx(0.3)
    dlo, dhi = percentile_ci(reps[2] - reps[3], center=0.3)
    assert (r["diff_ci_low"], r["diff_ci_high"]) == pytest.approx((dlo, dhi))
    assert r["tied_layers"] == "2" and r["best_support"] == 1.0
    assert r["depth_ci_low"] == pytest.approx(2 / 3) and r["depth_ci_high"] == pytest.approx(2 / 3)
    assert r["baseline"] == 0.55 and r["n_cells"] == 100
    assert r["gain_basis"] == "relative" and r["n_candidates"] == 4
    sel = selection_adjusted(reps, 3)
    assert (r["sel_ci_low"], r["sel_ci_high"]) == pytest.approx((sel["value_ci_low"], sel["value_ci_high"]))
    assert (r["sel_diff_ci_low"], r["sel_diff_ci_high"]) == pytest.approx((sel["diff_ci_low"], sel["diff_ci_high"]))
    assert r["answer"] == (
        f"layer 2 of 3 (67% depth), best of 4 layers: m 0.900 [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
        f"(selection-adjusted [{r['sel_ci_low']:.3f}, {r['sel_ci_high']:.3f}]); +0.300 (+50%) over the final "
        f"layer (0.600), CI [{dlo:+.3f}, {dhi:+.3f}], selection-adjusted [{r['sel_diff_ci_low']:+.3f}, "
        f"{r['sel_diff_ci_high']:+.3f}]; HVG-PCA baseline 0.550"
    )
    assert best_layers(s) == {("t", "all", "p"): 2}


def test_summarize_ties_depth_ci_and_lower_is_better():
    # layers 1 and 2 are indistinguishable; layer 2 wins on the point estimate
    values = [0.5, 0.899, 0.9, 0.6]
    reps = paired_reps(values, jitter=0.02, seed=1)
    r = summarize(hand_results(values, reps)).iloc[0]
    assert r["best_layer"] == 2 and r["tied_layers"] == "1-2"
    assert "statistically tied: layers 1-2" in r["answer"]
    winners = np.where(reps[1] > reps[2], 1, 2)  # the other layers never win
    assert r["best_support"] == pytest.approx(np.mean(winners == 2))
    assert (r["depth_ci_low"], r["depth_ci_high"]) == pytest.approx(tuple(np.quantile(winners, [0.025, 0.975]) / 3))
    # lower is better (e.g. a distance): the smallest value wins, the gain is negative
    low = [0.9, 0.3, 0.5, 0.6]
    r = summarize(hand_results(low, paired_reps(low, seed=2), higher=False)).iloc[0]
    assert r["best_layer"] == 1 and r["tied_layers"] == "1"
    assert r["gain_vs_final"] == pytest.approx(-0.5) and r["gain_ci_high"] < 0
    assert "vs the final layer" in r["answer"]


def test_summarize_final_layer_best_and_no_finite_values():
    values = [0.2, 0.4, 0.6, 0.8]
    r = summarize(hand_results(values, paired_reps(values))).iloc[0]
    assert r["best_layer"] == 3 and r["gain_vs_final"] == 0.0
    assert "the final layer is best" in r["answer"] and "over the final layer" not in r["answer"]
    nan = [float("nan")] * 4
    r = summarize(hand_results(nan, np.full((4, 10), np.nan))).iloc[0]
    assert r["answer"] == "no finite values"


def test_summarize_primary_or_all_metrics():
    values = [0.5, 0.7, 0.9, 0.6]
    res = hand_results(values, paired_reps(values))
    extra = res.table.copy()
    extra["metric"] = "other"
    res.table = pd.concat([res.table, extra], ignore_index=True)
    assert summarize(res)["metric"].tolist() == ["m"]
    assert summarize(res, metrics="all")["metric"].tolist() == ["m", "other"]


@pytest.mark.parametrize(
    ("layers", "text"),
    [
        ([], ""),
        ([4], "4"),
        ([3, 4, 5, 9], "3-5, 9"),
        ([9, 3, 5, 4], "3-5, 9"),
        ([0, 2, 4], "0, 2, 4"),
        ([1, 2, 5, 6, 7, 10], "1-2, 5-7, 10"),
        (np.array([7, 6], dtype=np.int64), "6-7"),
        ([3, 4, 4, 5], "3-5"),
    ],
)
def test_format_layers(layers, text):
    assert format_layers(layers) == text


def test_answer_hand_case():
    row = {
        "best_layer": 15, "n_layers": 24, "depth": 15 / 24, "metric": "macro_f1", "value": 0.76, "ci_low": 0.72,
        "ci_high": 0.79, "final_value": 0.5846, "gain_vs_final": 0.3, "diff_vs_final": 0.1754,
        "diff_ci_low": 0.11, "diff_ci_high": 0.23, "tied_layers": "14-16", "baseline": 0.7,
    }  # fmt: skip
    assert answer(row) == (
        "layer 15 of 24 (62% depth): macro_f1 0.760 [0.720, 0.790]; +0.175 (+30%) over the final layer (0.585), "
        "CI [+0.110, +0.230]; statistically tied: layers 14-16; HVG-PCA baseline 0.700"
    )
    row.update(tied_layers="15", baseline=float("nan"), diff_ci_low=float("nan"))
    assert answer(row) == (
        "layer 15 of 24 (62% depth): macro_f1 0.760 [0.720, 0.790]; +0.175 (+30%) over the final layer (0.585), "
        "CI [n/a, +0.230]"
    )
    row.update(
        n_candidates=25, sel_ci_low=0.70, sel_ci_high=0.78, sel_diff_ci_low=-0.01, sel_diff_ci_high=0.2, chance=0.125,
        constant_layers="0", diff_ci_low=0.11,
    )  # fmt: skip
    assert answer(row) == (
        "layer 15 of 24 (62% depth), best of 25 layers: macro_f1 0.760 [0.720, 0.790] (selection-adjusted "
        "[0.700, 0.780]); +0.175 (+30%) over the final layer (0.585), CI [+0.110, +0.230], selection-adjusted "
        "[-0.010, +0.200]; chance 0.125; NaN at layer(s) 0: constant features"
    )
    # a final value near 0: the absolute difference, no percentage
    row.update(final_value=0.01, diff_vs_final=0.031, gain_vs_final=float("nan"), gain_basis="absolute")
    text = answer(row)
    assert "+0.031 (absolute; final value near 0) over the final layer (0.010)" in text
    assert "%" not in text.replace("62% depth", "")
    row.update(final_value=-0.2, diff_vs_final=0.96)
    assert "+0.960 (absolute; best and final of opposite signs)" in answer(row)


# --------------------------------------------------------------------------------------------------
# report files
# --------------------------------------------------------------------------------------------------


def check_png(path, size: tuple[int, int]) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    img = mpimg.imread(path)
    assert img.shape[:2] == size and img.shape[2] in (3, 4)
    assert float(img[..., :3].std()) > 0.01  # something is drawn


def check_results_csv(path, table: pd.DataFrame) -> None:
    back = pd.read_csv(path)
    assert list(back.columns) == list(table.columns)
    assert len(back) == len(table)
    expected = table.copy()
    expected["layer"] = expected["layer"].astype("float64")
    for c in expected.columns:
        if expected[c].dtype == object and not expected[c].map(lambda v: isinstance(v, str)).any():
            expected[c] = pd.to_numeric(expected[c])
    pd.testing.assert_frame_equal(back, expected, check_dtype=False, rtol=1e-12, atol=0)


def test_write_report_on_hand_made_results(tmp_path):
    values = [0.5, 0.7, 0.9, 0.6]
    res = hand_results(values, paired_reps(values))
    paths = write_report(res, tmp_path / "report")
    assert set(paths) == {"results", "summary_csv", "summary", "plot"}
    assert all(p.exists() and p.parent == tmp_path / "report" for p in paths.values())
    check_results_csv(paths["results"], res.table)
    summary = summarize(res)
    text = paths["summary"].read_text()
    assert text.startswith("# Layer-wise probe report")
    assert f"- t [all, p]: {summary['answer'].iloc[0]}" in text
    assert "### t" in text and '`t/all`: {"n_available": 120, "n_used": 100}' in text
    assert "Computed in 1.5 s (4 layer evaluations, 0 from the store's cache)" in text
    assert text == summary_markdown(res, summary)
    back = pd.read_csv(paths["summary_csv"])
    assert list(back.columns) == SUMMARY_COLUMNS and back["best_layer"].tolist() == [2]
    # one task: one 5.2 x 3.8 in panel and the legend's 2.6 in to its right, 130 dpi
    check_png(paths["plot"], (round(3.8 * 130), round((5.2 + 2.6) * 130)))


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    store = planted(tmp_path_factory.mktemp("report") / "store.zarr")
    tasks = [CellTypeTask(n_boot=30), ClusteringTask(n_boot=30, resolutions=(0.5, 1.0), kmeans=False)]
    return probe(store.path, store.adata, tasks, pooling="x")


def test_write_report_on_a_probe_run(probed, tmp_path):
    paths = write_report(probed, tmp_path)
    check_results_csv(paths["results"], probed.table)
    summary = summarize(probed)
    assert summary["best_layer"].tolist() == [BEST, BEST]
    text = paths["summary"].read_text()
    for _, r in summary.iterrows():
        assert r["answer"] in text and r["answer"].startswith(f"layer {BEST} of {N_LAYERS}")
    assert "### cell_type" in text and "### clustering" in text
    assert f"{N_LAYERS} blocks, {probed.store['n_cells']} cells" in text
    assert '"resolutions": [0.5, 1.0]' in text  # the settings that produced the numbers
    # two tasks side by side: 2 x 5.2 in wide plus the legend's 2.6 in, 3.8 in high, at 130 dpi
    check_png(paths["plot"], (round(3.8 * 130), round((2 * 5.2 + 2.6) * 130)))
    assert math.isclose(summary["depth"].iloc[0], BEST / N_LAYERS)


# --------------------------------------------------------------------------------------------------
# layers.png read at a glance: 3 contexts x 4 poolings
# --------------------------------------------------------------------------------------------------

GRID_CONTEXTS = ["T_cell", "B_cell", "monocyte"]
GRID_POOLINGS = ["cls", "mean", "max", "x"]
GRID_TASKS = {"cell_type": ("macro_f1", True, 0.25), "clustering": ("leiden_ari", True, 0.0)}


def grid_results(n_layers: int = 12, B: int = 60) -> ProbeResults:
    """Hand-made results: 2 tasks x 3 contexts x 4 poolings, each series peaking at a different depth."""
    rng = np.random.default_rng(0)
    rows, replicates = [], {}
    L = n_layers
    depth = np.arange(L + 1) / L
    for ti, (task, (metric, higher, chance)) in enumerate(GRID_TASKS.items()):
        for ci, context in enumerate(GRID_CONTEXTS):
            for pi, pooling in enumerate(GRID_POOLINGS):
                peak = 0.3 + 0.15 * pi + 0.05 * ci
                values = 0.45 + 0.1 * ti + 0.05 * ci + 0.3 * np.exp(-(((depth - peak) / 0.25) ** 2)) - 0.03 * pi
                reps = paired_reps(list(values), B=B, seed=100 * ti + 10 * ci + pi)
                replicates[(task, context, pooling, metric)] = reps
                for layer, v in enumerate(values):
                    lo, hi = percentile_ci(reps[layer], center=v)
                    rows.append(
                        {
                            "task": task, "context": context, "pooling": pooling, "layer": layer,
                            "depth": layer / L, "metric": metric, "value": float(v), "ci_low": lo, "ci_high": hi,
                            "n_cells": 100, "features": "std", "higher_is_better": higher,
                            "baseline": 0.6 + 0.05 * ci, "chance": chance + 0.02 * ci * (task == "cell_type"),
                            "final_value": float(values[-1]), "constant_features": 0,
                        }
                    )  # fmt: skip
            base = 0.6 + 0.05 * ci + 0.02 * rng.standard_normal()
            rows.append(
                {
                    "task": task, "context": context, "pooling": BASELINE_POOLING, "layer": None, "depth": None,
                    "metric": metric, "value": base, "ci_low": base - 0.03, "ci_high": base + 0.03, "n_cells": 100,
                    "features": "std", "higher_is_better": higher,
                }
            )  # fmt: skip
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    table["layer"] = table["layer"].astype("Int64")
    store = {"path": "/x.zarr", "model": "scgpt", "preset": "tiny", "n_layers": L, "official_layer": L}
    return ProbeResults(
        table=table,
        replicates=replicates,
        layers=list(range(L + 1)),
        n_layers=L,
        primary={task: m for task, (m, _, _) in GRID_TASKS.items()},
        higher_is_better={(task, m): h for task, (m, h, _) in GRID_TASKS.items()},
        caps={},
        settings={},
        store={**store, "n_cells": 300},
        timings={},
    )


def dashes(line) -> tuple:
    """A line's dash pattern (``get_linestyle`` says "--" for every custom pattern)."""
    offset, pattern = line._unscaled_dash_pattern
    return (float(offset), tuple(float(x) for x in pattern) if pattern else None)


def test_layers_figure_colour_per_pooling_style_per_context_legend_outside():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    res = grid_results()
    summary = summarize(res)
    fig = layers_figure(res, summary)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in axes] == ["cell_type: macro_f1", "clustering: leiden_ari"]  # one per task
        colours: dict[str, set[str]] = {}
        styles: dict[str, set[str]] = {}
        for ax in axes:
            series = [ln for ln in ax.get_lines() if " · " in ln.get_label()]
            assert len(series) == len(GRID_CONTEXTS) * len(GRID_POOLINGS)
            for ln in series:
                context, pooling = ln.get_label().split(" · ")
                colours.setdefault(pooling, set()).add(to_hex(ln.get_color()))
                styles.setdefault(context, set()).add((dashes(ln), ln.get_marker()))
            # each line's best layer starred
            stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
            assert len(stars) == len(series)
            # the chance level (dash-dotted) and the HVG-PCA baselines (one per context, dashed grey)
            assert any(ln.get_label() == "_chance" and ln.get_linestyle() == "-." for ln in ax.get_lines())
            baselines = [ln for ln in ax.get_lines() if ln.get_label() == "_baseline"]
            assert len(baselines) == len(GRID_CONTEXTS)
            assert all(ln.get_linestyle() == "--" and to_hex(ln.get_color()) == to_hex("grey") for ln in baselines)
            # neither is drawn like a context's line
            reference = {dashes(ln) for ln in ax.get_lines() if ln.get_label() in ("_chance", "_baseline")}
            assert not reference & {dashes(ln) for ln in series}
        # one colour per pooling (the same in every context and panel), all different
        assert all(len(c) == 1 for c in colours.values()) and len(set().union(*colours.values())) == 4
        # one line style and marker per context, all different
        assert all(len(s) == 1 for s in styles.values()) and len(set().union(*styles.values())) == 3
        # one legend for the figure, outside every panel
        assert all(ax.get_legend() is None for ax in axes)
        assert len(fig.legends) == 1
        legend = fig.legends[0]
        box = legend.get_window_extent(renderer)
        for ax in axes:
            assert not box.overlaps(ax.get_window_extent(renderer))
        assert box.x1 <= fig.bbox.x1 + 1  # and inside the figure
        texts = [t.get_text() for t in legend.get_texts()]
        for name in [*GRID_POOLINGS, *GRID_CONTEXTS, "best layer", "chance level"]:
            assert texts.count(name) == 1
        assert all(texts.count(f"HVG-PCA(50) · {c}") == 1 for c in GRID_CONTEXTS)
        assert "RANDOM" not in fig._suptitle.get_text()
    finally:
        plt.close(fig)
    res.store["weights"] = {"weights": "random", "seed": 0}
    fig = layers_figure(res, summary)
    try:
        assert "RANDOM WEIGHTS" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_summary_md_opens_with_the_answers(tmp_path):
    from cellstrata.probes.report import print_answers

    res = grid_results()
    summary = summarize(res)
    paths = write_report(res, tmp_path)
    lines = [ln for ln in paths["summary"].read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    n = len(GRID_TASKS) * len(GRID_CONTEXTS) * len(GRID_POOLINGS)
    assert len(summary) == n
    # the first lines after the titles are the CLI's one-line answers, in the summary's order
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        print_answers(summary)
    assert lines[:n] == [f"- {ln}" for ln in printed.getvalue().splitlines()]
    assert lines[n].startswith("Store `/x.zarr`")
    w, h = figure_size(len(GRID_TASKS))
    check_png(paths["plot"], (round(h * DPI), round(w * DPI)))
    res.store["weights"] = {"weights": "random", "seed": 0}
    assert summary_markdown(res, summary).startswith("# Layer-wise probe report — RANDOM WEIGHTS\n\n## Answers\n")
