"""The README's Python examples are the files in docs/examples/, verbatim, and each one is run by a test."""

from __future__ import annotations

import re
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.input.datasets import synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"scanpy_umap.py", "xarray_layers.py", "hub_checkpoint.py"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_readme_shows_the_example_verbatim(example: Path) -> None:
    blocks = [b.strip() for b in BLOCK.findall((ROOT / "README.md").read_text())]
    assert example.read_text().strip() in blocks, f"README.md lacks docs/examples/{example.name} verbatim"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_each_example_is_run_by_a_test(example: Path) -> None:
    runners = [
        p for p in (ROOT / "tests").rglob("test_*.py") if f'"{example.name}"' in p.read_text() or
        f"examples/{example.name}" in p.read_text()
    ]  # fmt: skip
    assert any("runpy.run_path" in p.read_text() for p in runners), f"no test runs docs/examples/{example.name}"


def test_scanpy_umap_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    adata = synthetic_dataset(48, 400, seed=11, genes_per_cell=50)
    adata.write_h5ad("atlas.h5ad")
    assert main(["init-checkpoint", "--model", "scgpt", "--preset", "tiny", "--out", "ckpt"]) == 0
    store = cs.extract("atlas.h5ad", model="scgpt", checkpoint="ckpt", out="atlas.scgpt.zarr", poolings=["cls"],
                       progress=False)  # fmt: skip
    shutil.rmtree("ckpt")
    out = runpy.run_path(str(ROOT / "docs" / "examples" / "scanpy_umap.py"), run_name="__main__")
    a = out["adata"]
    last = store.n_layers
    assert {"X_scgpt_L2", f"X_scgpt_L{last}", "X_umap"} <= set(a.obsm)
    np.testing.assert_array_equal(a.obsm["X_scgpt_L2"], np.asarray(store.layers("cls")[2], dtype=np.float32))
    assert a.obsm["X_umap"].shape == (48, 2) and np.isfinite(a.obsm["X_umap"]).all()
    assert (tmp_path / "umap_scgpt_L2.png").stat().st_size > 1000
    matplotlib.pyplot.close("all")
