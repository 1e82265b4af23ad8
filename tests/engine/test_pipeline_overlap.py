"""The pipeline's telemetry measures where the device waited: on the input side or on the writer."""

from __future__ import annotations

import time

import pytest

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine import writer as writer_mod
from cellstrata.engine.datasets import synthetic_dataset
from cellstrata.engine.models import get_family
from cellstrata.engine.pipeline import Extraction


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    ckpt = get_family("scgpt").init_checkpoint("tiny", root / "ckpt", seed=1)
    data = root / "cells.h5ad"
    synthetic_dataset(100, 2000, seed=4, genes_per_cell=80).write_h5ad(data)
    return data, ckpt


def run(case, out):
    data, ckpt = case
    return cs.extract(data, model="scgpt", checkpoint=ckpt, out=out, chunk_cells=10, progress=False)


def test_slow_writer_shows_as_writer_wait(case, tmp_path, monkeypatch):
    real = writer_mod.write_chunk

    def slow(path, chunk):
        time.sleep(1.5)
        return real(path, chunk)

    monkeypatch.setattr(writer_mod, "write_chunk", slow)
    tele = run(case, tmp_path / "w.zarr").attrs["telemetry"]
    # 10 chunks, 2 in flight on 2 writer threads: the forward pass outruns 1.5 s writes and waits for them
    assert tele["writer_wait_seconds"] > 1.0, tele
    assert tele["input_wait_seconds"] < tele["writer_wait_seconds"]


def test_slow_input_shows_as_input_wait(case, tmp_path, monkeypatch):
    real = Extraction._prepare

    def slow(self, chunks):
        time.sleep(0.5)
        return real(self, chunks)

    monkeypatch.setattr(Extraction, "_prepare", slow)
    store = run(case, tmp_path / "i.zarr")
    tele = store.attrs["telemetry"]
    assert tele["input_wait_seconds"] >= 0.4, tele
    for key in ("cells_per_s", "tokens_per_s", "padding_fraction", "float16_overflows", "forward_seconds"):
        assert key in tele
    assert tele["cells"] == 100 and 0 <= tele["padding_fraction"] < 1


def test_info_prints_the_pipeline_telemetry(case, tmp_path, capsys):
    store = run(case, tmp_path / "s.zarr")
    assert main(["info", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "cells/s" in out and "waited" in out and "for the writer" in out
