"""The ``cellstrata probe`` command and the demo's probe report, end to end on a tiny extracted store."""

from __future__ import annotations

import pandas as pd
import pytest

from cellstrata.cli import main
from cellstrata.demo import run_demo


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe-cli")
    run_demo(out, n_cells=700, progress=False, probe=False)
    return out / "demo.zarr", out / "demo.h5ad"


def test_probe_command_writes_the_report(demo_store, tmp_path, capsys):
    store, data = demo_store
    out = tmp_path / "report"
    args = [
        "probe", str(store), "--adata", str(data), "--task", "cell_type,clustering", "--context-key", "cell_state",
        "--pooling", "mean", "--layers", "0,2,-1", "--n-boot", "30", "--out", str(out),
        "--set", "clustering.resolutions=0.5,1.0", "--set", "cell_type.n_folds=3",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "cell_type [resting, mean]: layer" in printed and "clustering [activated, mean]" in printed
    table = pd.read_csv(out / "results.csv")
    assert set(table["task"]) == {"cell_type", "clustering"}
    assert set(table["context"]) == {"resting", "activated"}
    assert set(table["layer"].dropna().astype(int)) == {0, 2, 4}
    assert (table.loc[table["pooling"] == "hvg_pca50", "layer"].isna()).all()
    lay = table[table["layer"].notna()]
    assert ((lay["ci_low"] <= lay["value"] + 1e-9) & (lay["value"] <= lay["ci_high"] + 1e-9)).all()
    assert "## Answers" in (out / "summary.md").read_text()
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the settings reached the tasks (and are recorded)
    assert '"n_folds": 3' in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--task", "cell_typo"], "unknown probe task 'cell_typo'"),
        (["--task", "cell_type", "--set", "cell_type.nope=1"], "has no setting 'nope'"),
        (["--task", "cell_type", "--set", "clustering.n_neighbors=5"], "not in --task"),
        (["--task", "cell_type", "--set", "cell_type.C=abc"], "cannot read 'abc' as float"),
        (["--task", "cell_type", "--label-key", "celltype"], "'celltype' (needed by cell_type)"),
        (["--task", "cell_type", "--pooling", "nope"], "pooling 'nope' is not in"),
        (["--task", "cell_type", "--layers", "9"], "layer 9 is not in"),
        (["--task", "trajectory", "--time-key", "day"], "'day' (needed by trajectory)"),
    ],
)
def test_probe_command_bad_input_is_one_clear_error(demo_store, tmp_path, capsys, extra, fragment):
    store, data = demo_store
    assert main(["probe", str(store), "--adata", str(data), "--out", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_demo_ends_with_the_probe_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--cells", "1200", "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = tmp_path / "demo" / "probe-scgpt"
    table = pd.read_csv(report / "results.csv")
    assert set(table["task"]) == {"cell_type", "knn_transfer", "clustering", "trajectory", "perturbation"}
    assert set(table["context"]) == {"resting", "activated"}
    assert set(table["pooling"]) == {"mean", "official", "hvg_pca50"}
    assert set(table["layer"].dropna().astype(int)) == set(range(5))  # tiny scGPT: 4 blocks
    for task in ("cell_type", "trajectory", "perturbation"):
        assert f"{task} [resting, mean]: layer" in printed
    assert "probe report:" in printed and (report / "layers.png").stat().st_size > 10_000
