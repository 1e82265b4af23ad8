"""The pipeline's telemetry measures where the device waited: on the input side or on the writer."""

from __future__ import annotations

import time

import pytest

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.device.pipeline import DeviceLoop
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.models import get_family
from cellstrata.engine.storage import writer as writer_mod


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


@pytest.mark.slow
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
    real = DeviceLoop._prepare

    def slow(self, chunks):
        time.sleep(0.5)
        return real(self, chunks)

    monkeypatch.setattr(DeviceLoop, "_prepare", slow)
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


def test_batches_land_after_the_next_one_is_queued_across_chunks(case, tmp_path, monkeypatch):
    """The CUDA order on CPU: each batch lands after the next is queued, chunk boundaries included.

    Transfers are made deferred (as pinned-memory copies are on CUDA), with budgets small enough that
    chunks hold several batches; the store must equal the one written batch by batch, and no chunk
    may reach the writer before its last batch landed.
    """
    import numpy as np

    from cellstrata.engine.device import transfer as transfer_mod

    data, ckpt = case
    ref = cs.extract(
        data,
        model="scgpt",
        checkpoint=ckpt,
        out=tmp_path / "ref.zarr",
        chunk_cells=16,
        max_tokens=700,
        poolings=["all"],
        progress=False,
    )
    events: list[tuple[str, int]] = []
    real_land, real_submit = DeviceLoop._land, DeviceLoop._submit

    def land(self, transfer, job, rows, writer, bar):
        events.append(("land", job.index))
        return real_land(self, transfer, job, rows, writer, bar)

    def submit(self, job, writer, bar):
        assert job.outstanding == 0 and job.enqueued
        events.append(("submit", job.index))
        return real_submit(self, job, writer, bar)

    def deferred(self, view):
        return transfer_mod.Transfer(view.clone(), None)

    real_start = DeviceLoop._start_chunk

    def start(self, c, bounds, tokens):
        events.append(("start", c))
        return real_start(self, c, bounds, tokens)

    monkeypatch.setattr(DeviceLoop, "_start_chunk", start)
    monkeypatch.setattr(DeviceLoop, "_land", land)
    monkeypatch.setattr(DeviceLoop, "_submit", submit)
    monkeypatch.setattr(transfer_mod.PooledBuffers, "to_host", deferred)
    real_init = transfer_mod.PooledBuffers.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.on_host = False  # as on CUDA: land later

    monkeypatch.setattr(transfer_mod.PooledBuffers, "__init__", init)
    got = cs.extract(
        data,
        model="scgpt",
        checkpoint=ckpt,
        out=tmp_path / "got.zarr",
        chunk_cells=16,
        max_tokens=700,
        poolings=["all"],
        progress=False,
    )
    assert got.is_complete
    for name in ref.poolings:
        np.testing.assert_array_equal(got.layers(name).compute(), ref.layers(name).compute())
    submitted = [c for kind, c in events if kind == "submit"]
    assert sorted(submitted) == list(range(7))  # 100 cells in chunks of 16, each written once
    lands = [c for kind, c in events if kind == "land"]
    assert len(lands) > len(submitted)  # several batches per chunk
    # every chunk but the last lands its last batch only after the next chunk was started on the device
    for c in range(6):
        last_land = max(i for i, e in enumerate(events) if e == ("land", c))
        assert events.index(("start", c + 1)) < last_land < events.index(("submit", c)) + 1
