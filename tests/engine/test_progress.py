"""Progress lines and run telemetry: the arithmetic, what the extract line shows, silence off a terminal."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest

import cellstrata as cs
from cellstrata.engine.cluster import shard_status
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.models import get_family
from cellstrata.engine.progress import (
    DeviceClock,
    ExtractProgress,
    ExtractStatus,
    ExtractTotals,
    eta_seconds,
    extract_fields,
    extract_postfix,
    format_count,
    format_duration,
    fraction,
    rate,
)
from cellstrata.engine.storage import writer as writer_mod
from cellstrata.engine.telemetry import Telemetry, describe_utilisation

N_CELLS = 97  # three chunks of 32 and one of 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return get_family("scgpt").init_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "scgpt", seed=11)


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    synthetic_dataset(N_CELLS, 800, seed=13, genes_per_cell=60).write_h5ad(path)
    return path


def extract(h5ad, ckpt, out, **kw):
    kw.setdefault("chunk_cells", 32)
    return cs.extract(h5ad, model="scgpt", checkpoint=ckpt, out=out, poolings=["mean"], dtype="float32", **kw)


# ------------------------------------------------------------------------------------------ arithmetic
def test_rate_eta_and_fraction():
    rng = np.random.default_rng()
    for _ in range(20):
        done, total = sorted(rng.integers(1, 10_000, 2).tolist())
        seconds = float(rng.uniform(0.1, 100))
        r = rate(done, seconds)
        assert r == pytest.approx(done / seconds)
        eta = eta_seconds(done, total, r)
        assert eta == pytest.approx((total - done) / r)
        assert done + eta * r == pytest.approx(total)  # at this rate the run ends at the ETA
    assert rate(5, 0) == 0.0
    assert eta_seconds(3, 10, 0.0) is None  # nothing done yet: unknown, not infinite
    assert eta_seconds(10, 10, 0.0) == 0.0
    assert eta_seconds(12, 10, 1.0) == 0.0
    assert fraction(3, 4) == 0.75 and fraction(5, 4) == 1.0 and fraction(-1, 4) == 0.0
    assert fraction(1, 0) is None


def test_durations_and_counts_read_as_people_write_them():
    assert format_duration(None) == "?"
    assert format_duration(0) == "0:00"
    assert format_duration(59.6) == "1:00"
    assert format_duration(192) == "3:12"
    assert format_duration(3 * 3600 + 5 * 60 + 7) == "3:05:07"
    assert format_count(850) == "850"
    assert format_count(412_345) == "412k"
    assert format_count(1_250_000) == "1.25M"
    assert format_count(3.2e9) == "3.2G"


def test_extract_fields_from_counters():
    rng = np.random.default_rng()
    cells, seconds, workers = int(rng.integers(100, 5000)), float(rng.uniform(1, 50)), int(rng.integers(1, 5))
    status = ExtractStatus(
        cells=cells,
        tokens=cells * 317,
        chunks=7,
        seconds=seconds,
        busy_seconds=0.6 * seconds * workers,
        writer_wait_seconds=1.25,
        workers=workers,
    )
    totals = ExtractTotals(cells=3 * cells, chunks=40, cells_before=cells, chunks_before=13, busy_label="GPU busy")
    f = extract_fields(status, totals)
    assert f["chunks"] == (20, 40)
    assert f["cells_per_s"] == pytest.approx(cells / seconds)
    assert f["tokens_per_s"] == pytest.approx(317 * cells / seconds)
    assert f["eta_s"] == pytest.approx(seconds)  # a third left at the rate of this run's third
    assert f["busy"] == pytest.approx(0.6)  # per worker process
    line = extract_postfix(status, totals)
    assert line.startswith("chunks 20/40 | ")
    for part in ("cells/s", "tok/s", f"ETA {format_duration(seconds)}", "GPU busy 60%", "writer wait 1.2 s"):
        assert part in line


def test_telemetry_utilisation_and_cluster_sums():
    a, b = Telemetry(device_type="cuda"), Telemetry(device_type="cuda")
    for t, (fwd, busy, wait) in zip((a, b), ((3.0, 2.5, 0.5), (5.0, 4.5, 1.5)), strict=True):
        t.forward_seconds, t.device_busy_seconds, t.writer_wait_seconds = fwd, busy, wait
        t.cells, t.tokens = 10, 100
    driver = Telemetry(device_type="cuda", workers=2)
    driver.add(a.counters())
    driver.add(b.counters())
    driver.seconds = 10.0
    u = driver.utilisation()
    assert u["forward_fraction"] == pytest.approx(8 / 20)
    assert u["device_busy_fraction"] == pytest.approx(7 / 20)
    assert u["writer_wait_fraction"] == pytest.approx(2 / 20)
    d = driver.as_dict()
    assert d["device_busy_seconds"] == 7.0 and d["writer_wait_seconds"] == 2.0 and d["device_type"] == "cuda"
    assert describe_utilisation(d) == "GPU busy 35% of wall time"
    status = shard_status(driver, chunks=3, seconds=10.0, workers=2)
    assert status.busy_seconds == 7.0 and status.cells == 20 and status.tokens == 200
    cpu = Telemetry(forward_seconds=2.0, seconds=4.0)
    assert cpu.utilisation()["device_busy_fraction"] is None
    assert describe_utilisation(cpu.as_dict()) == "forward pass 50% of wall time"
    assert shard_status(cpu, chunks=1, seconds=4.0, workers=1).busy_seconds == 2.0


def test_device_clock_is_off_on_cpu():
    clock = DeviceClock("cpu")
    started = clock.start()
    clock.stop(started)
    assert not clock.enabled and started is None and clock.collect(wait=True) == 0.0


# ------------------------------------------------------------------------------------------ the line
def test_forced_line_shows_every_field():
    out = io.StringIO()
    totals = ExtractTotals(cells=500, chunks=5, cells_before=100, chunks_before=1)
    with ExtractProgress(totals, enabled=True, file=out, force=True) as bar:
        assert bar.active
        status = ExtractStatus(
            cells=100, tokens=12_345, chunks=1, seconds=2.0, busy_seconds=1.0, writer_wait_seconds=0.3
        )
        bar.advance(100, status)
    text = out.getvalue()
    assert "extract:" in text and "200/500 cells" in text
    for part in ("chunks 2/5", "50 cells/s", "6.17k tok/s", "ETA 0:06", "forward 50%", "writer wait 0.3 s"):
        assert part in text


def test_no_line_off_a_terminal():
    out = io.StringIO()  # not a TTY
    totals = ExtractTotals(cells=10, chunks=2)
    with ExtractProgress(totals, enabled=True, file=out) as bar:
        assert not bar.active
        bar.advance(5, ExtractStatus(5, 50, 1, 1.0, 0.5, 0.0))
    assert out.getvalue() == ""
    with ExtractProgress(totals, enabled=False, file=out, force=False) as bar:
        bar.advance(5, ExtractStatus(5, 50, 1, 1.0, 0.5, 0.0))
    assert out.getvalue() == ""


# ------------------------------------------------------------------------------------------ a real run
def test_extract_prints_no_progress_into_a_pipe_and_records_telemetry(h5ad, ckpt, tmp_path, capfd):
    store = extract(h5ad, ckpt, tmp_path / "s.zarr", progress=True)
    err = capfd.readouterr().err
    assert "extract:" not in err and "cells/s |" not in err and "\r" not in err
    t = store.attrs["telemetry"]
    assert t["cells"] == N_CELLS and t["cells_per_s"] > 0 and t["tokens_per_s"] > 0
    assert 0 < t["forward_fraction"] <= 1
    assert t["device_type"] == "cpu" and t["device_busy_fraction"] is None and t["device_busy_seconds"] == 0
    assert t["writer_wait_seconds"] >= 0 and t["writer_wait_fraction"] is not None
    assert f"utilisation forward pass {100 * t['forward_fraction']:.0f}% of wall time" in store.summary()


def test_extract_line_when_drawn(h5ad, ckpt, tmp_path, monkeypatch):
    """With the line forced on, each chunk handed to the writer redraws it with this run's counters."""
    from cellstrata.engine import run

    out = io.StringIO()
    seen: list[ExtractProgress] = []

    def forced(totals, *, enabled):
        bar = ExtractProgress(totals, enabled=enabled, file=out, force=enabled)
        seen.append(bar)
        return bar

    monkeypatch.setattr(run, "ExtractProgress", forced)
    extract(h5ad, ckpt, tmp_path / "s.zarr", limit=64, progress=True)
    text = out.getvalue()
    assert "64/64 cells" in text and "chunks " in text and "/2" in text and "forward " in text
    assert "tok/s" in text and "ETA" in text and "writer wait" in text
    assert seen[0].totals.chunks == 2 and seen[0].totals.busy_label == "forward"
    out.truncate(0)
    extract(h5ad, ckpt, tmp_path / "q.zarr", limit=64, progress=False)
    assert out.getvalue() == ""


def test_writer_wait_is_recorded(h5ad, ckpt, tmp_path, monkeypatch):
    """A writer slower than the device makes the device loop wait; the store's telemetry says how long."""
    real = writer_mod.write_chunk

    def slow(path, chunk, **kw):
        time.sleep(0.2)
        return real(path, chunk, **kw)

    monkeypatch.setattr(writer_mod, "write_chunk", slow)
    store = extract(h5ad, ckpt, tmp_path / "s.zarr", chunk_cells=8, progress=False)
    t = store.attrs["telemetry"]
    assert store.is_complete
    assert t["writer_wait_seconds"] > 0 and t["writer_wait_fraction"] > 0
