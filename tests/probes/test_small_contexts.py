"""A context too small for a task is skipped with a warning naming the ``--set`` threshold; the other
contexts are probed; when every context is too small, one clear error. Per task in Python, then end to
end through ``probe`` and the ``cellstrata probe --context-key`` command."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest
from store_fixture import planted, synthetic_adata

from cellstrata.cli import main
from cellstrata.engine.errors import ProbeError
from cellstrata.probes import ClusteringTask, KnnTransferTask
from cellstrata.probes.base import SmallContextError
from cellstrata.probes.celltype import CellTypeTask
from cellstrata.probes.perturbation import PerturbationTask
from cellstrata.probes.runner import probe
from cellstrata.probes.trajectory import TrajectoryTask


class Records(logging.Handler):
    """The warnings logged on ``cellstrata.probes`` (attached directly: the CLI stops propagation)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_logged():
    handler = Records()
    logger = logging.getLogger("cellstrata.probes")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def label_obs() -> pd.DataFrame:
    """Context ``big``: classes a (30), b (20); ``small``: a (12), b (6), c (1)."""
    big = [("big", "a")] * 30 + [("big", "b")] * 20
    small = [("small", "a")] * 12 + [("small", "b")] * 6 + [("small", "c")]
    return pd.DataFrame(big + small, columns=["state", "cell_type"])


# --------------------------------------------------------------------------------------------------
# per task, in Python
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [CellTypeTask, KnnTransferTask, ClusteringTask])
def test_label_task_skips_a_context_with_one_class_large_enough(cls, warnings_logged):
    task = cls(label_key="cell_type", context_key="state")
    plans = task.plan(label_obs(), chunk_cells=64)
    assert [p.context for p in plans] == ["big"]
    [message] = warnings_logged
    assert f"task {task.name}: column 'cell_type' in context 'small' has 1 class(es) with at least 10 cells" in message
    assert "this context is skipped, the other contexts are probed" in message
    # the threshold that would keep two classes of the small context: its second class has 6 cells
    assert f"`--set {task.name}.min_cells_per_class=6` (in Python `min_cells_per_class=6`)" in message
    assert plans.skipped == {"small": message} and plans[0].caps["skipped_contexts"] == {"small": message}
    # the suggested value does keep it
    lowered = cls(label_key="cell_type", context_key="state", min_cells_per_class=6).plan(label_obs(), chunk_cells=64)
    assert [p.context for p in lowered] == ["big", "small"] and not lowered.skipped


def test_label_task_skips_a_context_with_one_donor(warnings_logged):
    obs = label_obs()
    obs["donor"] = ["d1", "d2"] * 25 + ["d1"] * 19
    task = CellTypeTask(label_key="cell_type", context_key="state", group_key="donor", min_cells_per_class=5)
    assert [p.context for p in task.plan(obs, chunk_cells=64)] == ["big"]
    [message] = warnings_logged
    assert "group column 'donor' in context 'small' has 1 value" in message
    assert message.endswith("To include it: drop --group-key or choose another column")


def test_label_task_with_every_context_too_small_is_one_error():
    obs = label_obs()
    with pytest.raises(ProbeError) as err:
        CellTypeTask(label_key="cell_type", context_key="state", min_cells_per_class=25).plan(obs, chunk_cells=64)
    message = str(err.value)
    assert not isinstance(err.value, SmallContextError)
    assert message.startswith("task cell_type: every context of 'state' is too small to probe: column")
    assert "in context 'big' has 1 class(es)" in message and "in context 'small' has 0 class(es)" in message
    assert message.endswith("(`--set cell_type.min_cells_per_class=20`, in Python `min_cells_per_class=20`) or pick "
                            "another column or drop the context")  # fmt: skip
    # without a context column, the one context's own message
    with pytest.raises(ProbeError, match=r"^task cell_type: column 'cell_type' has 1 class\(es\).*=26`"):
        CellTypeTask(label_key="cell_type", min_cells_per_class=30).plan(obs, chunk_cells=64)
    # many contexts: three are listed
    many = pd.DataFrame({"state": [f"s{i}" for i in range(10)] * 3, "cell_type": ["a"] * 30})
    with pytest.raises(ProbeError, match=r"context 's2' has 0 class\(es\).*; and 7 more contexts\. Pick another"):
        CellTypeTask(label_key="cell_type", context_key="state").plan(many, chunk_cells=64)


def perturbation_obs() -> pd.DataFrame:
    """``rest``: 30 controls, 4 perturbations of 8; ``stim``: 3 controls; ``late``: 2 perturbations, no control."""
    rest = [("rest", "ctrl")] * 30 + [("rest", g) for g in "ABCD" for _ in range(8)]
    stim = [("stim", "ctrl")] * 3 + [("stim", g) for g in "ABCD" for _ in range(8)]
    late = [("late", g) for g in "AB" for _ in range(8)]
    return pd.DataFrame(rest + stim + late, columns=["state", "guide"])


def test_perturbation_skips_contexts_without_enough_controls_or_perturbations(warnings_logged):
    task = PerturbationTask(perturbation_key="guide", control="ctrl", context_key="state")
    plans = task.plan(perturbation_obs(), chunk_cells=64)
    assert [p.context for p in plans] == ["rest"]
    late, stim = warnings_logged  # contexts in sorted order
    assert "no cell has guide='ctrl' in context 'late'" in late
    assert late.endswith("this context is skipped, the other contexts are probed")
    assert "only 3 control cells (guide='ctrl') in context 'stim'; need at least min_cells=5" in stim
    assert stim.endswith("Lowering `perturbation.min_cells` cannot include it")  # min_cells >= 4
    assert set(plans[0].caps["skipped_contexts"]) == {"late", "stim"}


def test_perturbation_hint_names_the_min_cells_that_keeps_the_context(warnings_logged):
    obs = perturbation_obs()
    obs.loc[obs["state"] == "stim", "guide"] = ["ctrl"] * 7 + ["A"] * 4 + ["B"] * 20 + ["C"] * 4
    plans = PerturbationTask(perturbation_key="guide", control="ctrl", context_key="state").plan(obs, chunk_cells=64)
    assert [p.context for p in plans] == ["rest"]
    assert "only 1 of 3 perturbations in context 'stim' have at least min_cells=5 cells" in warnings_logged[1]
    assert warnings_logged[1].endswith("To include it: `--set perturbation.min_cells=4` (in Python `min_cells=4`)")


def test_perturbation_with_every_context_too_small_is_one_error():
    obs = perturbation_obs()
    with pytest.raises(
        ProbeError, match=r"^task perturbation: every context of 'state' is too small to probe: no cell"
    ):
        PerturbationTask(perturbation_key="guide", control="ctrl", context_key="state", min_cells=10).plan(
            obs, chunk_cells=64
        )
    # a control label found nowhere is a mistake in the settings, not a small context
    with pytest.raises(ProbeError, match=r"no cell has guide='NTC'; .*Set `control`"):
        PerturbationTask(perturbation_key="guide", control="NTC", context_key="state").plan(obs, chunk_cells=64)


def test_trajectory_skips_contexts_with_too_few_timed_cells_or_one_time(warnings_logged):
    day = np.r_[np.arange(200) % 4, np.arange(50) % 4, np.ones(120)].astype(float)
    obs = pd.DataFrame({"day": day, "state": ["a"] * 200 + ["b"] * 50 + ["c"] * 120})
    plans = TrajectoryTask(time_key="day", context_key="state").plan(obs, chunk_cells=64)
    assert [p.context for p in plans] == ["a"]
    b, c = warnings_logged
    assert "context 'b': 50 cells with a time (50 in all); DPT on a 30-neighbour graph needs at least 90" in b
    assert b.endswith("To include it: `--set trajectory.n_neighbors=16` (in Python `n_neighbors=16`)")
    assert "context 'c': all 120 cells have the same time (1) in 'day'; need two or more" in c
    lowered = TrajectoryTask(time_key="day", context_key="state", n_neighbors=16).plan(obs, chunk_cells=64)
    assert [p.context for p in lowered] == ["a", "b"]
    with pytest.raises(ProbeError, match=r"^task trajectory: every context of 'state' is too small to probe: "):
        TrajectoryTask(time_key="day", context_key="state", n_neighbors=70).plan(obs, chunk_cells=64)


# --------------------------------------------------------------------------------------------------
# end to end: probe() and the command
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_context_store(tmp_path_factory):
    """The planted store; obs ``part``: the two cell states and 40 cells in a third part ``tiny``; ``pieces``:
    100 contexts of 12 cells."""
    adata = synthetic_adata()
    part = adata.obs["cell_state"].astype(str).to_numpy().copy()
    part[np.random.default_rng(5).choice(adata.n_obs, 40, replace=False)] = "tiny"
    adata.obs["part"] = pd.Categorical(part)
    adata.obs["pieces"] = pd.Categorical([f"p{i:03d}" for i in np.arange(adata.n_obs) % 100])  # 12 cells each
    root = tmp_path_factory.mktemp("small-contexts")
    adata.write_h5ad(root / "data.h5ad")
    store = planted(root / "store.zarr", adata=adata)
    return store.path, root / "data.h5ad", adata


TASKS = "cell_type,knn_transfer,clustering,trajectory,perturbation"


@pytest.mark.slow
def test_probe_skips_the_tiny_context_of_every_task(small_context_store, warnings_logged):
    path, _, adata = small_context_store
    tasks = [
        CellTypeTask(context_key="part", n_boot=5, n_folds=3),
        TrajectoryTask(time_key="time", context_key="part", n_boot=5),
        PerturbationTask(context_key="part", n_boot=5, n_permutations=10),
    ]
    res = probe(path, adata, tasks, layers=[0, 4], pooling="x", baseline=False, cache=False)
    for task in ("cell_type", "trajectory", "perturbation"):
        assert set(res.table.loc[res.table["task"] == task, "context"]) == {"activated", "resting"}, task
        assert "tiny" in res.caps[f"{task}/resting"]["skipped_contexts"]
    assert len(warnings_logged) == 3 and all("context 'tiny'" in m for m in warnings_logged)


@pytest.mark.slow
def test_probe_command_skips_the_tiny_context_and_names_each_threshold(small_context_store, tmp_path, capsys):
    path, data, _ = small_context_store
    out = tmp_path / "report"
    args = [
        "probe", str(path), "--adata", str(data), "--out", str(out), "--task", TASKS, "--context-key", "part",
        "--label-key", "cell_type", "--time-key", "time", "--perturbation-key", "perturbation",
        "--control", "control", "--pooling", "x", "--layers", "0,4", "--n-boot", "5", "--no-baseline",
        "--no-cache", "--set", "perturbation.n_permutations=10", "--set", "clustering.resolutions=0.5,1.0",
    ]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "context 'tiny'" in line]
    assert len(warned) == 5 and all(line.startswith("cellstrata: task ") for line in warned)
    for task in ("cell_type", "knn_transfer", "clustering"):
        assert any(re.search(rf"`--set {task}\.min_cells_per_class=\d+`", line) for line in warned), task
    assert any("`--set trajectory.n_neighbors=" in line for line in warned)
    assert any("`--set perturbation.min_cells=4`" in line for line in warned)
    table = pd.read_csv(out / "results.csv")
    for task in TASKS.split(","):
        assert set(table.loc[table["task"] == task, "context"]) == {"activated", "resting"}, task
    assert "tiny]" not in captured.out and "[resting, x]" in captured.out
    assert '"skipped_contexts": {"tiny": "task cell_type: column' in (out / "summary.md").read_text()


@pytest.mark.slow
def test_probe_command_with_every_context_too_small_is_one_error(small_context_store, tmp_path, capsys):
    path, data, _ = small_context_store
    args = [
        "probe", str(path), "--adata", str(data), "--out", str(tmp_path / "r"), "--task", "cell_type",
        "--context-key", "pieces", "--label-key", "cell_type", "--no-baseline", "--no-cache",
    ]  # fmt: skip
    assert main(args) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("cellstrata: error: task cell_type: every context of 'pieces' is too small to probe: column")
    assert "in context 'p002' has 0 class(es)" in err and "; and 97 more contexts." in err
    assert re.search(r"`--set cell_type\.min_cells_per_class=\d+`", err) and len(err) < 1000
