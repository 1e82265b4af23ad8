"""Every failure of the command ends with one line on stderr, never a traceback; the full trace goes to a log file.

The CLI runs in a subprocess (as a user runs it). Faults: a disk that fills up and a filesystem that turns
read-only in the middle of a run (``tests/engine/faults/sitecustomize.py``, injected into every process
of the run, Dask workers included), a second SIGTERM (sent by the parent, and aimed into a finalizer),
library noise at shutdown, and an unexpected exception. Allowed on stderr: the command's own lines
(``cellstrata: ...``; ``--quiet`` turns off the progress bar), of which the last is the one error line.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellstrata import cli
from cellstrata.cli import main
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.models import get_family
from cellstrata.runlog import LIBRARY_LOGGERS, LOG_DIR_ENV, RunLog

FAULTS = Path(__file__).resolve().parent / "faults"
CHUNK = 20


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """400 cells (20 chunks) and a tiny scGPT checkpoint."""
    root = tmp_path_factory.mktemp("oneline")
    ckpt = get_family("scgpt").init_checkpoint("tiny", root / "ckpt", seed=3)
    data = root / "cells.h5ad"
    synthetic_dataset(400, 2000, seed=11, genes_per_cell=100).write_h5ad(data)
    common = ["extract", str(data), "--model", "scgpt", "--checkpoint", str(ckpt)]
    return {"common": [*common, "--chunk-cells", str(CHUNK), "--max-tokens", "2048", "--quiet"]}


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env[LOG_DIR_ENV] = str(tmp_path / "logs")
    env.update(extra)
    return env


def start(args: list[str], tmp_path: Path, *, script: Path | None = None, **env: str) -> subprocess.Popen:
    head = [sys.executable, str(script)] if script else [sys.executable, "-m", "cellstrata"]
    # cwd: the installed package, not a same-named folder of the working directory
    return subprocess.Popen(
        [*head, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=environment(tmp_path, **env),
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def one_line(err: str, first: str = "cellstrata: error:") -> str:
    """The single final line of ``err``; every other line is one of the command's own."""
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = err.splitlines()
    assert lines and all(ln.startswith("cellstrata: ") for ln in lines), err
    finals = [ln for ln in lines if ln.startswith(("cellstrata: error:", "cellstrata: interrupted"))]
    assert finals == [lines[-1]] and lines[-1].startswith(first), err
    return lines[-1]


def trace_of(line: str, tmp_path: Path) -> str:
    """The log file the line names (it must be in the log folder, outside the store), as text."""
    found = re.search(r"\(full trace: (.+)\)$", line)
    assert found, line
    path = Path(found.group(1))
    assert path.parent == tmp_path / "logs" and path.is_file(), line
    return path.read_text()


def committed(out: Path) -> int:
    try:
        return int(np.asarray(zarr.open_group(str(out), mode="r")["done"][:]).sum())
    except Exception:  # not created yet
        return 0


def fault_env(tmp_path: Path, out: Path, errno_name: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "PYTHONPATH": path,
        "CELLSTRATA_FAULT_ROOT": str(out),
        "CELLSTRATA_FAULT_ERRNO": errno_name,
        "CELLSTRATA_FAULT_AFTER": "1",
        "CELLSTRATA_FAULT_TRIGGER": str(tmp_path / "fault-on"),
    }


# ------------------------------------------------------------------------------ full and read-only disks
@pytest.mark.parametrize(
    ("errno_name", "cause"),
    [("ENOSPC", "the disk is full"), pytest.param("EROFS", "the store is not writable", marks=pytest.mark.slow)],
)
def test_full_or_read_only_disk_ends_in_one_line(case, tmp_path, errno_name, cause):
    out = tmp_path / "s.zarr"
    proc = start([*case["common"], "--out", str(out)], tmp_path, **fault_env(tmp_path, out, errno_name))
    code, err = finish(proc)
    assert (tmp_path / "fault-on").exists(), "the fault was not injected"
    assert code == 2, err
    line = one_line(err)
    assert cause in line and "re-run the same command" in line
    trace = trace_of(line, tmp_path)
    # the full trace: our error, the OSError behind it, and the Dask writer's own report of the task
    assert "Traceback" in trace and "WriteError" in trace and os.strerror(getattr(errno, errno_name)) in trace
    assert "Compute Failed" in trace and "write-chunk-" in trace
    assert committed(out) >= 2  # chunks committed before the fault are kept


@pytest.mark.slow
def test_full_disk_on_a_local_cluster_ends_in_one_line(case, tmp_path):
    out = tmp_path / "s.zarr"
    args = [*case["common"], "--out", str(out), "--cluster", "local:2"]
    code, err = finish(start(args, tmp_path, **fault_env(tmp_path, out, "ENOSPC")))
    assert (tmp_path / "fault-on").exists(), "the fault was not injected"
    assert code == 2, err
    line = one_line(err)
    assert "the disk is full" in line and "re-run the same command" in line
    trace = trace_of(line, tmp_path)
    assert "Traceback" in trace and "shard_task" in trace  # the worker's traceback, sent back with the error


# ------------------------------------------------------------------------------------------ signals
@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.0, 0.3], ids=["at-once", "after-0.3s"])
def test_second_sigterm_ends_in_one_line(case, tmp_path, gap):
    out = tmp_path / "s.zarr"
    proc = start([*case["common"], "--out", str(out)], tmp_path)
    deadline = time.time() + 120
    while proc.poll() is None and committed(out) < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    time.sleep(gap)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err
    assert "re-run the same command" in one_line(err, "cellstrata: interrupted")


SECOND_SIGNAL_WHILE_EXITING = """
import atexit, os, signal, sys, time
from cellstrata.engine.storage import writer

real_write = writer.write_chunk

def write_chunk(path, chunk):
    done = real_write(path, chunk)
    if chunk.index == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal: a graceful stop
    return done

def second():  # the second signal comes while the interpreter shuts down, after the last line was printed
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)

writer.write_chunk = write_chunk
atexit.register(second)
from cellstrata.cli import main
sys.exit(main())
"""


@pytest.mark.slow
def test_second_sigterm_while_the_process_exits_keeps_its_status(case, tmp_path):
    script = tmp_path / "second_signal.py"
    script.write_text(SECOND_SIGNAL_WHILE_EXITING)
    code, err = finish(start([*case["common"], "--out", str(tmp_path / "s.zarr")], tmp_path, script=script))
    assert code == 128 + signal.SIGTERM, err  # not killed by the second signal (-15)
    one_line(err, "cellstrata: interrupted")


SECOND_SIGNAL_IN_A_FINALIZER = """
import os, signal, sys
from cellstrata.engine.storage import writer

class Finalized:
    def __del__(self):  # the second signal lands while a finalizer runs, where an exception is lost
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10000):
            pass

real_write, real_flush = writer.write_chunk, writer.ChunkWriter.flush

def write_chunk(path, chunk):
    done = real_write(path, chunk)
    if chunk.index == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal: a graceful stop
    return done

def flush(self):
    Finalized()
    return real_flush(self)

writer.write_chunk, writer.ChunkWriter.flush = write_chunk, flush
from cellstrata.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_second_sigterm_in_a_finalizer_ends_in_one_line(case, tmp_path):
    script = tmp_path / "second_signal.py"
    script.write_text(SECOND_SIGNAL_IN_A_FINALIZER)
    code, err = finish(start([*case["common"], "--out", str(tmp_path / "s.zarr")], tmp_path, script=script))
    assert code == 128 + signal.SIGTERM, err
    line = one_line(err, "cellstrata: interrupted")
    assert "Exception ignored" in trace_of(line, tmp_path)  # the lost exception is in the log, not on stderr


# ---------------------------------------------------------------------------------------- success
@pytest.mark.parametrize("cluster", [None, pytest.param("local:2", marks=pytest.mark.slow)], ids=["local", "cluster"])
def test_successful_run_prints_only_its_own_lines(case, tmp_path, cluster):
    args = [*case["common"], "--out", str(tmp_path / "s.zarr"), *(["--cluster", cluster] if cluster else [])]
    code, err = finish(start(args, tmp_path))
    assert code == 0, err
    assert "Traceback" not in err and all(ln.startswith("cellstrata: ") for ln in err.splitlines()), err
    assert not (tmp_path / "logs").exists()  # nothing went wrong: no log file


SHUTDOWN_NOISE = """
import asyncio, gc, logging, sys, threading
import distributed

real_close = distributed.Client.close

class Finalized:
    def __del__(self):
        raise RuntimeError("a finalizer failed at shutdown")

def close(self, *args, **kwargs):
    # what a loaded machine can produce while a client and its workers shut down
    try:
        raise distributed.comm.CommClosedError("in <TCP (closed) ConnectionPool.heartbeat_worker>")
    except Exception:
        logging.getLogger("distributed.worker").error("Failed to communicate with scheduler", exc_info=True)
    logging.getLogger("distributed.core").warning("Event loop was unresponsive in Worker for 12.3s")
    pipe = OSError(32, "Broken pipe")
    logging.getLogger("tornado.application").error("Exception in callback", exc_info=(OSError, pipe, None))
    logging.getLogger("asyncio").error("Task was destroyed but it is pending!")
    thread = threading.Thread(target=lambda: 1 / 0, name="heartbeat")
    thread.start()
    thread.join()
    Finalized()
    gc.collect()
    return real_close(self, *args, **kwargs)

distributed.Client.close = close
from cellstrata.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_shutdown_noise_of_a_successful_run_is_not_printed(case, tmp_path):
    script = tmp_path / "noisy.py"
    script.write_text(SHUTDOWN_NOISE)
    code, err = finish(start([*case["common"], "--out", str(tmp_path / "s.zarr")], tmp_path, script=script))
    assert code == 0, err
    assert "Traceback" not in err and all(ln.startswith("cellstrata: ") for ln in err.splitlines()), err


# ------------------------------------------------------------------------------ in process: the pieces
def test_unexpected_error_is_one_line_naming_the_trace(tmp_path, monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something nobody expected\nwith a second line")

    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path / "logs"))
    monkeypatch.setattr(cli, "_cmd_info", broken)
    assert main(["info", str(tmp_path / "x.zarr")]) == 1
    err = capsys.readouterr().err
    line = one_line(err)
    assert "unexpected RuntimeError: something nobody expected" in line and "second line" not in line
    trace = trace_of(line, tmp_path)
    assert "Traceback" in trace and "with a second line" in trace and "command: cellstrata info" in trace


def test_user_mistake_is_one_line_without_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path / "logs"))
    assert main(["info", str(tmp_path / "x.zarr"), "--repair"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--repair needs --verify" in line and "full trace" not in line
    assert not (tmp_path / "logs").exists()


def test_log_goes_to_the_first_folder_that_takes_it(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(LOG_DIR_ENV, str(blocked / "logs"))  # cannot be created, even by root
    monkeypatch.setenv("XDG_STATE_HOME", str(blocked / "state"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    with RunLog(["extract"]) as runlog:
        logging.getLogger("distributed.worker").error("Compute Failed")
    path, why = runlog.write("cellstrata: error: x", None)
    assert path is not None and path.is_relative_to(tmp_path / "tmp") and why == ""
    assert "Compute Failed" in path.read_text()
    monkeypatch.setattr("tempfile.tempdir", str(blocked / "tmp"))
    path, why = runlog.write("cellstrata: error: x", None)
    assert path is None and str(blocked / "logs") in why and str(blocked / "tmp") in why


def test_run_log_restores_loggers_and_hooks():
    names = [*LIBRARY_LOGGERS, "tornado.application", "distributed.worker"]
    before = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in names}
    hooks = (sys.unraisablehook, threading.excepthook)
    with RunLog(["info"]):
        assert sys.unraisablehook is not hooks[0]
    assert {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in names} == before
    assert (sys.unraisablehook, threading.excepthook) == hooks


def test_failures_in_the_same_second_get_their_own_logs(tmp_path, monkeypatch):
    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path / "logs"))
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20260101-000000" if "%H" in fmt else "2026-01-01")
    with RunLog(["extract"]) as runlog:
        pass
    paths = [runlog.write(f"cellstrata: error: {i}", None)[0] for i in range(3)]
    assert len(set(paths)) == 3 and all(p.parent == tmp_path / "logs" for p in paths)
    assert [p.read_text().count(f"error: {i}") for i, p in enumerate(paths)] == [1, 1, 1]
