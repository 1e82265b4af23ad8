"""``python -m benchmarks.tokenizing --quick``: every family and path measured, tokens compared, results written
(no timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("scgpt", "tahoe-x1", "scfoundation", "geneformer")
PATHS = ("before", "reference", "vectorised", "read+tokenize")


@pytest.mark.slow
def test_quick_run_measures_every_path_and_compares_the_tokens(tmp_path):
    seed = int(np.random.default_rng().integers(1 << 20))
    cells = 157  # odd: blocks of 128 + 29
    cmd = [sys.executable, "-m", "benchmarks.tokenizing", "--quick", "--cells", str(cells), "--seed", str(seed)]
    cmd += ["--results", str(tmp_path / "results"), "--workdir", str(tmp_path / "work")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tokens identical: reference = vectorised = read+tokenize" in done.stdout
    assert not (tmp_path / "work").exists()  # the owned work folder is removed

    [json_file] = (tmp_path / "results").glob("tokenize-cpu-*-quick.json")
    assert json_file.with_suffix(".md").read_text().startswith("# Tokenizing per core")
    payload = json.loads(json_file.read_text())
    assert payload["benchmark"] == "tokenize" and payload["quick"] is True and payload["repeats"] == 1
    result = payload["result"]
    assert result["cells"] == cells and result["block"] == 128 and result["before_commit"] == "ef841b4"
    assert 500 <= result["expressed_genes"]["min"] <= result["expressed_genes"]["max"] <= 3000
    assert set(result["families"]) == set(FAMILIES)
    for family, row in result["families"].items():
        assert row["cells"] == cells and row["tokens"] > cells, family
        assert set(row["paths"]) == set(PATHS), family
        for path, rate in row["paths"].items():
            assert rate["tokens_per_s"] > 0 and rate["cells_per_s"] > 0, (family, path)
            assert rate["tokens_per_s"] == pytest.approx(row["tokens"] / rate["seconds"]), (family, path)
            assert rate["wall_tokens_per_s"] == pytest.approx(row["tokens"] / rate["wall_seconds"]), (family, path)
        assert row["identical_reference_vectorised"] and row["identical_read_vectorised"], family
        assert "/before/cellstrata" in row["before_package"], family  # the exported tree, not the checkout
        diff = row["before_vs_now"]
        assert diff["cells"] == cells
        # cells short enough for the context keep their genes: draws only choose the subset of longer cells
        assert diff["same_untruncated_cells"]["genes"] == diff["untruncated_cells"], family
        assert diff["same_cells"]["length"] == cells, family
    by = result["families"]
    # deterministic tokenizers: nothing changed; scGPT's bin tie-breaks draw, so its values changed
    assert by["scfoundation"]["before_vs_now"]["columns_that_differ"] == []
    assert by["geneformer"]["before_vs_now"]["columns_that_differ"] == []
    assert "values" in by["scgpt"]["before_vs_now"]["columns_that_differ"]
    tahoe = by["tahoe-x1"]["before_vs_now"]
    assert tahoe["same_untruncated_cells"]["values"] == tahoe["untruncated_cells"]
    judged = {(t["family"], t["path"], t["target"].startswith(">= 1.5 M")) for t in result["targets"]}
    for path in ("vectorised", "read+tokenize"):
        assert {("scgpt", path, True), ("geneformer", path, True), ("tahoe-x1", path, False)} <= judged
    assert all(isinstance(t["met"], bool) and t["needed"] > 0 for t in result["targets"])
