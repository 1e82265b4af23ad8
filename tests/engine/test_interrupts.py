"""Graceful stop: the first signal is recorded, not raised; a second one stops at once; handlers are given back."""

from __future__ import annotations

import os
import signal

import pytest

from cellstrata.engine.interrupts import SIGNALS, Interrupted, command_signals, graceful_stop


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_is_recorded_and_raised_at_check(sig):
    before = signal.getsignal(sig)
    with graceful_stop() as stop:
        stop.check()  # nothing asked yet
        os.kill(os.getpid(), sig)
        assert stop and stop.signum == sig
        with pytest.raises(Interrupted) as info:
            stop.check()
        assert info.value.signum == sig and isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(sig) is before  # the previous handler is back


def test_second_signal_raises_immediately():
    with graceful_stop() as stop, pytest.raises(Interrupted):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("the second signal did not raise")


# ------------------------------------------------------------------------ handlers are given back (issue 15.7)
def recorder(seen: list):
    def handler(signum, frame):
        seen.append(signum)

    return handler


@pytest.fixture
def sentinels():
    """Handlers of the caller's own for SIGINT and SIGTERM (recording), put back as they were after the test."""
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    seen: list[int] = []
    mine = {s: recorder(seen) for s in SIGNALS}
    for s, h in mine.items():
        signal.signal(s, h)
    yield mine, seen
    for s, h in saved.items():
        signal.signal(s, h)


def current() -> dict:
    return {s: signal.getsignal(s) for s in SIGNALS}


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_request_the_block_did_not_act_on_is_passed_on(sentinels, sig):
    mine, seen = sentinels
    with graceful_stop() as stop:
        os.kill(os.getpid(), sig)  # after the block's last check: nothing acts on it inside
        assert stop
    assert seen == [sig] and current() == mine


def test_an_unacted_ctrl_c_reaches_python_as_keyboard_interrupt():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt), graceful_stop():
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_handlers_are_back_after_a_stop_a_second_signal_and_an_error(sentinels):
    mine, seen = sentinels
    with pytest.raises(Interrupted), graceful_stop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        stop.check()
    assert current() == mine
    with pytest.raises(Interrupted), graceful_stop():
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:  # a second signal gives the handlers back before it raises, wherever it lands
            assert current() == mine
    with pytest.raises(ValueError), graceful_stop():
        raise ValueError("boom")
    assert current() == mine and seen == []  # acted-on requests are not passed on


def test_command_signals_raise_then_settle(sentinels):
    mine, seen = sentinels
    with command_signals() as state:
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
        assert info.value.signum == signal.SIGTERM
        state.settle()
        os.kill(os.getpid(), signal.SIGINT)  # recorded: the exit status is decided
        assert state.late == signal.SIGINT
    assert current() == mine and seen == []


def test_command_signals_of_the_program_ignore_signals_once_settled(sentinels):
    mine, seen = sentinels
    try:
        with command_signals(restore=False) as state:
            state.settle()
            assert current() == dict.fromkeys(SIGNALS, signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGTERM)  # ignored, even where Python's handlers are gone
        assert current() == dict.fromkeys(SIGNALS, signal.SIG_IGN)  # kept to the end of the process
    finally:
        for s, h in mine.items():
            signal.signal(s, h)
    assert seen == []


# ------------------------------------------------------------------------------------------- entry points
N_CELLS = 150


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from cellstrata.engine.input.datasets import synthetic_dataset
    from cellstrata.engine.models import get_family

    root = tmp_path_factory.mktemp("handlers")
    ckpt = get_family("scgpt").init_checkpoint("tiny", root / "ckpt", seed=3)
    data = root / "cells.h5ad"
    synthetic_dataset(N_CELLS, 2000, seed=5, genes_per_cell=100).write_h5ad(data)
    return {"data": data, "ckpt": ckpt}


def extract(case, out, **kw):
    import cellstrata as cs

    kw.setdefault("chunk_cells", 32)
    kw.setdefault("poolings", ["mean"])
    return cs.extract(case["data"], model="scgpt", checkpoint=case["ckpt"], out=out, progress=False, **kw)


def signal_at_chunk(monkeypatch, index: int, sig: int = signal.SIGINT) -> None:
    """Send ``sig`` to this process while chunk ``index`` is written (from the writer's thread)."""
    from cellstrata.engine.storage import writer

    real = writer.write_chunk

    def write_chunk(path, chunk):
        if chunk.index == index:
            os.kill(os.getpid(), sig)
        return real(path, chunk)

    monkeypatch.setattr(writer, "write_chunk", write_chunk)


def test_extract_gives_the_handlers_back_when_it_returns_or_raises(case, tmp_path, sentinels, monkeypatch):
    from cellstrata.engine.errors import WriteError
    from cellstrata.engine.storage import writer

    mine, seen = sentinels
    assert extract(case, tmp_path / "a.zarr").is_complete
    assert current() == mine
    with pytest.raises(Interrupted):  # stopped by a signal: the run acts on it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            signal_at_chunk(monkeypatch, 0)
            extract(case, tmp_path / "b.zarr")
        finally:
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            signal.signal(signal.SIGINT, mine[signal.SIGINT])
    monkeypatch.undo()

    def full(path, chunk):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "write_chunk", full)
    with pytest.raises(WriteError):
        extract(case, tmp_path / "c.zarr")
    assert current() == mine and seen == []


def test_a_ctrl_c_during_the_last_write_is_not_swallowed(case, tmp_path, monkeypatch):
    """The signal comes after the run's last check: it used to be dropped, and the run returned normally."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal_at_chunk(monkeypatch, N_CELLS // 32)  # the last chunk
    with pytest.raises(KeyboardInterrupt):
        extract(case, tmp_path / "s.zarr")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    from cellstrata.engine.storage.store import open_store

    assert open_store(tmp_path / "s.zarr").done.all()  # the run itself was complete


def test_cli_and_demo_give_the_handlers_back(case, tmp_path, sentinels, monkeypatch, capsys):
    from cellstrata.cli import main

    mine, seen = sentinels
    common = ["extract", str(case["data"]), "--model", "scgpt", "--checkpoint", str(case["ckpt"]), "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a.zarr"), "--pool", "mean"]) == 0
    assert current() == mine
    assert main([*common, "--out", str(tmp_path / "b.zarr"), "--pool", "median"]) == 2  # a user mistake
    assert current() == mine
    assert main(["demo", "--out", str(tmp_path / "demo"), "--cells", "60", "--quiet", "--no-probe"]) == 0
    assert current() == mine and seen == []
    # the CLI acts on a signal that comes during the last write: exit status 130, not 0
    signal_at_chunk(monkeypatch, 0)
    assert main([*common, "--out", str(tmp_path / "c.zarr"), "--pool", "mean", "--chunk-cells", "200"]) == 130
    assert current() == mine and seen == []
    capsys.readouterr()


def test_cluster_run_gives_the_handlers_back(case, tmp_path, sentinels):
    from distributed import Client

    mine, seen = sentinels
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        assert extract(case, tmp_path / "a.zarr", cluster=client).is_complete
    assert current() == mine and seen == []


TWO_RUNS_THEN_CTRL_C = """
import os, signal, sys, time
import cellstrata as cs

data, ckpt, out = sys.argv[1:4]
for i in range(2):
    cs.extract(data, model="scgpt", checkpoint=ckpt, out=f"{out}{i}.zarr", poolings=["mean"], progress=False)
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
    print("swallowed")
except KeyboardInterrupt:
    print("KeyboardInterrupt")
"""


@pytest.mark.slow
def test_ctrl_c_after_two_runs_in_a_script_raises_at_once(case, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "two_runs.py"
    script.write_text(TWO_RUNS_THEN_CTRL_C)
    args = [sys.executable, str(script), str(case["data"]), str(case["ckpt"]), str(tmp_path / "s")]
    res = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "KeyboardInterrupt", res.stderr
