"""Crash consistency: an extraction SIGKILLed at any instant resumes, by re-running the same command, to the
store an uninterrupted run writes.

One ``cellstrata extract`` command (tiny scGPT, 160 cells in 32 chunks of 5) runs in a child process and
is killed with SIGKILL at 34 instants drawn from a seeded generator, so a failure is reproducible by its
index. The instants mix two kinds of aim:

- random instants: fractions of the measured duration of an uninterrupted run of the same command (a run
  that ends before its kill, on a machine faster than when the reference ran, is run once more at the
  same fraction of the duration just seen), and delays within the start-up, before the first file;
- aimed kills, watching the run's folder: as soon as the k-th file appears in it (store creation: the
  lease, the group and array metadata, wherever the engine puts them), as soon as the k-th ``done`` flag
  is set (chunk writes), and a random delay after the last flag (the final commit and the exit).

The phase a kill landed in is read from what the killed run left on disk, so it does not depend on how
the engine lays out its writes: ``start-up`` (nothing written), ``store creation`` (something written,
but not yet the store's metadata and every array), ``chunk writes`` (a store with pending chunks) and
``final commit`` (every chunk committed). Every phase must get kills.

Each killed run is followed by the same command, unchanged, run to its end; its store must equal the
reference bit for bit in every array (``pooled/*``, ``obs_names``, ``n_tokens``, ``truncated``,
``done``, ``checksum``), say ``complete``, pass ``cellstrata info --verify``, hold no lease and be made of
the reference's files (zarr's ``*.partial`` files of writes cut short are counted, not refused). All
kills run before anything is asserted, so a failure reports every failing kill with its phase and the
re-run's error; ``CELLSTRATA_CRASH_KILLS=3,14`` runs only those kills of the same plan.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.models import get_family

pytestmark = pytest.mark.slow

N_CELLS, CHUNK = 160, 5  # 32 chunks: many commit points in about 1.5 s of extraction on 2 cores
N_CHUNKS = -(-N_CELLS // CHUNK)
SEED = 15
# kills of each aim (34 in all): random instants over the whole run and within its start-up, the k-th file,
# the k-th done flag, a delay after the last done flag
N_RANDOM, N_STARTUP, N_FILES, N_DONE, N_COMMIT = 10, 4, 8, 6, 6
PHASES = ("start-up", "store creation", "chunk writes", "final commit")
POLL_SECONDS = 0.001
ONLY = "CELLSTRATA_CRASH_KILLS"  # e.g. CELLSTRATA_CRASH_KILLS=3,14: run only those kills (to reproduce one)
RUN_TIMEOUT = 120.0


@dataclass
class Case:
    """The extract command (CLI arguments without ``--out``), the reference store and its run's timeline."""

    argv: list[str]
    reference: Path
    timeline: dict[str, float]
    metadata_files: int  # files of a created store before any chunk is written, the lease included
    zygote: Zygote


@dataclass
class Kill:
    """One planned kill: ``aim`` and its parameter (seconds, or a count), and what happened."""

    index: int
    # "fraction" (of the run's duration), "delay" (seconds after the start), "files" (k-th file), "done"
    # (k-th flag), "commit" (seconds after the last flag)
    aim: str
    param: float
    killed_at: float = float("nan")
    phase: str = "not killed"
    flags: int = 0
    tries: int = 0  # a run that ended before its kill is run again, at the same fraction of the run seen
    state: str = ""  # the killed run's store: its complete attribute and whether the lease is there
    leftovers: int = 0  # zarr's *.partial files of writes the kill cut short, still in the re-run store
    rerun_code: int | None = None
    verify_code: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# A process that imports what an extraction needs once, then forks one child per command: each child runs
# the command line's ``main`` on the command's arguments, its stderr into a file. A killed child costs the
# time up to its kill, not the 2-5 s of imports of a fresh interpreter, so 34 kills fit in a few minutes on
# two cores. It answers ``pid N`` when a child starts and ``exit CODE`` when it ends; ``kill`` on its stdin
# sends SIGKILL to the running child (never reaped before, so never another process).
ZYGOTE = r"""
import json, os, select, signal, sys
import anndata, dask.array, distributed, torch, zarr
import cellstrata.cli, cellstrata.engine.device.pipeline, cellstrata.engine.storage.verify

def requests():
    buf = b""
    while True:
        while b"\n" not in buf:
            more = os.read(0, 65536)
            if not more:
                return
            buf += more
        line, buf = buf.split(b"\n", 1)
        if line.strip() and line.strip() != b"kill":  # a kill that came after its child ended
            yield json.loads(line)

def reply(text):
    os.write(1, (text + "\n").encode())

reply("ready")
for request in requests():
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            code = cellstrata.cli.main(request["argv"])
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    reply(f"pid {pid}")
    while True:
        ended, status = os.waitpid(pid, os.WNOHANG)
        if ended:
            reply(f"exit {os.waitstatus_to_exitcode(status)}")
            break
        if select.select([0], [], [], 0.001)[0] and os.read(0, 64).strip() == b"kill":
            os.kill(pid, signal.SIGKILL)
"""


class Zygote:
    """The test's side of :data:`ZYGOTE`: start a command, see whether it ended, kill it."""

    def __init__(self, cwd: Path):
        # cwd: the installed package, not a same-named folder of the working directory
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=cwd
        )
        self.buf = b""
        self.code: int | None = None
        assert self._line(RUN_TIMEOUT) == "ready"

    def _line(self, timeout: float) -> str | None:
        """The next line of the zygote's answers, or None if none came within ``timeout`` seconds."""
        deadline = time.perf_counter() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.perf_counter()
            if not select.select([fd], [], [], max(left, 0))[0]:
                return None
            more = os.read(fd, 4096)
            if not more:
                pytest.fail(f"the zygote ended with {self.proc.wait()}")
            self.buf += more
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def _send(self, text: str) -> None:
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def start(self, argv: list[str], stderr: Path) -> None:
        self.code = None
        self._send(json.dumps({"argv": argv, "stderr": str(stderr)}))
        answer = self._line(RUN_TIMEOUT)
        assert answer and answer.startswith("pid "), answer

    def ended(self) -> bool:
        if self.code is None:
            line = self._line(0)
            if line is not None:
                self.code = int(line.split()[1])
        return self.code is not None

    def kill(self) -> None:
        self._send("kill")

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        if self.code is None:
            line = self._line(timeout)
            if line is None:
                pytest.fail(f"the command ran for more than {timeout} s")
            self.code = int(line.split()[1])
        return self.code

    def run(self, argv: list[str], stderr: Path) -> int:
        self.start(argv, stderr)
        return self.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def files_under(root: Path) -> list[Path]:
    """Every file under ``root`` but zarr's in-progress ``*.partial`` files (empty if it does not exist)."""
    found = []
    for dirpath, _, names in os.walk(root):
        found.extend(Path(dirpath, n) for n in names if not n.endswith(".partial"))
    return found


def done_flags(out: Path) -> int:
    """Number of ``done`` chunks written (each flag is its own chunk file, absent while 0)."""
    try:
        return sum(p.name.isdigit() for p in (out / "done" / "c").iterdir())
    except OSError:
        return 0


def watch(zygote: Zygote, run_dir: Path, out: Path, fire) -> tuple[float | None, float]:
    """Poll the run's folder until ``fire(elapsed, run_dir, n_flags, t_all_flags)`` or the command ends.

    Returns the elapsed time at which ``fire`` said so while the command still ran (else None), and the
    elapsed time when the watch ended.
    """
    t0 = time.perf_counter()
    t_all = None
    while not zygote.ended():
        elapsed = time.perf_counter() - t0
        if elapsed > RUN_TIMEOUT:
            zygote.kill()
            pytest.fail(f"the extract command ran for more than {RUN_TIMEOUT} s")
        n_flags = done_flags(out)
        if n_flags == N_CHUNKS and t_all is None:
            t_all = elapsed
        if fire(elapsed, run_dir, n_flags, t_all):
            return (None if zygote.ended() else elapsed), elapsed
        time.sleep(POLL_SECONDS)
    return None, time.perf_counter() - t0


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    root = tmp_path_factory.mktemp("crash")
    ckpt = get_family("scgpt").init_checkpoint("tiny", root / "ckpt", seed=3)
    data = root / "cells.h5ad"
    synthetic_dataset(N_CELLS, 2000, seed=11, genes_per_cell=30).write_h5ad(data)
    argv = ["extract", str(data), "--model", "scgpt", "--checkpoint", str(ckpt), "--pool", "all"]
    argv += ["--chunk-cells", str(CHUNK), "--max-tokens", "2048", "--quiet"]
    zygote = Zygote(root)
    # the reference: the same command, never interrupted, timed by the same watcher
    run_dir = root / "reference"
    out = run_dir / "s.zarr"
    zygote.start([*argv, "--out", str(out)], root / "reference.stderr")
    timeline: dict[str, float] = {}

    def record(elapsed, folder, n_flags, t_all):
        if "first_file" not in timeline and files_under(folder):
            timeline["first_file"] = elapsed
        if "first_flag" not in timeline and n_flags:
            timeline["first_flag"] = elapsed
        if t_all is not None:
            timeline.setdefault("last_flag", t_all)
        timeline["exit"] = elapsed
        return False

    watch(zygote, run_dir, out, record)
    assert zygote.wait() == 0, (root / "reference.stderr").read_text()
    assert {"first_file", "first_flag", "last_flag"} <= set(timeline), timeline
    # files of a created store before any chunk: the lease, and every file that is not a chunk
    metadata = [p for p in files_under(out) if "c" not in p.relative_to(out).parts[:-1]]
    yield Case(argv, out, timeline, len(metadata) + 1, zygote)
    zygote.close()


def plan(case: Case) -> list[Kill]:
    """34 kills drawn from a seeded generator; the counts and the measured timeline fix the ranges."""
    rng = np.random.default_rng(SEED)
    t = case.timeline
    # random instants as fractions of the run's duration (the reference's, or the last run's that ended)
    kills = [Kill(0, "fraction", float(f)) for f in rng.uniform(0.0, 0.95, N_RANDOM)]
    kills += [Kill(0, "delay", float(s)) for s in rng.uniform(0.0, 0.5 * t["first_file"], N_STARTUP)]
    # k = 1 is the first file the run writes; the group's attributes come after the last metadata file
    kills += [Kill(0, "files", float(k)) for k in rng.integers(1, case.metadata_files + 1, N_FILES)]
    kills += [Kill(0, "done", float(k)) for k in rng.integers(1, N_CHUNKS, N_DONE)]
    window = max(t["exit"] - t["last_flag"], 0.0)
    kills += [Kill(0, "commit", float(s)) for s in rng.uniform(0.0, 0.5 * window, N_COMMIT)]
    for i, kill in enumerate(kills):
        kill.index = i
    return kills


def trigger(kill: Kill, duration: float):
    """The watcher's condition for ``kill``; ``duration``: the expected duration of an uninterrupted run."""
    if kill.aim == "fraction":
        return lambda elapsed, folder, n_flags, t_all: elapsed >= kill.param * duration
    if kill.aim == "delay":
        return lambda elapsed, folder, n_flags, t_all: elapsed >= kill.param
    if kill.aim == "files":
        return lambda elapsed, folder, n_flags, t_all: len(files_under(folder)) >= kill.param
    if kill.aim == "done":
        return lambda elapsed, folder, n_flags, t_all: n_flags >= kill.param
    return lambda elapsed, folder, n_flags, t_all: t_all is not None and elapsed - t_all >= kill.param


def array_paths(case: Case) -> list[str]:
    group = zarr.open_group(str(case.reference), mode="r")
    return sorted(name for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array))


def phase_left(run_dir: Path, out: Path, case: Case, arrays: list[str]) -> str:
    """The phase a killed run was in, from what it left on disk (whatever the engine's order of writes).

    Nothing: start-up. The store's metadata not all there yet, or entries that a finished store does not
    have (a marker, a folder beside it): store creation. Then chunk writes until every done flag is set.
    """
    if not files_under(run_dir):
        return "start-up"

    def names(folder: Path) -> set[str]:  # but zarr's *.partial files of writes the kill cut short
        return {p.name for p in folder.iterdir() if not p.name.endswith(".partial")}

    created = names(case.reference) | {"lease"}
    if names(run_dir) != {out.name} or not names(out) <= created:
        return "store creation"
    try:
        attrs = json.loads((out / "zarr.json").read_text())["attributes"]["cellstrata"]
    except (OSError, ValueError, KeyError, TypeError):
        return "store creation"
    if "config_hash" not in attrs or not all((out / name / "zarr.json").exists() for name in arrays):
        return "store creation"
    return "chunk writes" if done_flags(out) < N_CHUNKS else "final commit"


def state_left(out: Path) -> str:
    try:
        complete = json.loads((out / "zarr.json").read_text())["attributes"]["cellstrata"].get("complete")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        complete = None
    return f"complete={complete}, lease={'yes' if (out / 'lease').exists() else 'no'}"


def store_files(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()}


def bits(values: np.ndarray) -> np.ndarray:
    """The bytes of numeric arrays (NaN payloads included), the values of string arrays."""
    values = np.asarray(values)
    return values if values.dtype.kind in "OUT" else np.ascontiguousarray(values).view(np.uint8)


def last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


def check_rerun(kill: Kill, case: Case, out: Path, arrays: list[str], logs: Path) -> None:
    """Re-run the same command, unchanged, and compare its store with the reference."""
    err = logs / f"kill{kill.index:02d}.rerun.stderr"
    kill.rerun_code = case.zygote.run([*case.argv, "--out", str(out)], err)
    if kill.rerun_code != 0:
        kill.problems.append(f"re-run exit {kill.rerun_code}: {last_line(err)}")
        return
    if "Traceback" in err.read_text():
        kill.problems.append("the re-run printed a traceback")
    ref = zarr.open_group(str(case.reference), mode="r")
    got = zarr.open_group(str(out), mode="r")
    # each array by name (listing the group's members would warn about the *.partial files a kill leaves;
    # an extra array shows as files the reference does not have, below)
    for name in arrays:
        try:
            a, b = got[name], ref[name]
        except KeyError:
            kill.problems.append(f"{name} is missing")
            continue
        if (a.shape, a.dtype, a.chunks) != (b.shape, b.dtype, b.chunks):
            kill.problems.append(f"{name}: {a.shape} {a.dtype} {a.chunks} instead of {b.shape} {b.dtype} {b.chunks}")
        elif not np.array_equal(bits(a[...]), bits(b[...])):
            kill.problems.append(f"{name} differs from the reference")
    attrs = dict(got.attrs.get("cellstrata", {}))
    if attrs.get("complete") is not True:
        kill.problems.append(f"complete is {attrs.get('complete')!r}")
    if attrs.get("config_hash") != dict(ref.attrs["cellstrata"])["config_hash"]:
        kill.problems.append("another config_hash than the reference")
    err = logs / f"kill{kill.index:02d}.verify.stderr"
    kill.verify_code = case.zygote.run(["info", str(out), "--verify", "--quiet"], err)
    if kill.verify_code != 0:
        kill.problems.append(f"info --verify exit {kill.verify_code}: {last_line(err)}")
    if (out / "lease").exists():
        kill.problems.append("the lease was left behind")
    have_files, want_files = store_files(out), store_files(case.reference)
    partial = {f for f in have_files - want_files if f.endswith(".partial")}
    kill.leftovers = len(partial)
    if have_files - want_files - partial:
        kill.problems.append(f"files the reference does not have: {sorted(have_files - want_files - partial)[:3]}")
    if want_files - have_files:
        kill.problems.append(f"files missing: {sorted(want_files - have_files)[:3]}")


def table(kills: list[Kill]) -> str:
    rows = ["kill | aim | tries | at s | phase | flags | left | re-run | verify | partial | outcome"]
    for k in kills:
        param = {"delay": f"{k.param:.3f} s", "commit": f"{k.param:.3f} s", "fraction": f"{k.param:.2f}"}.get(
            k.aim, f"k={int(k.param)}"
        )
        rows.append(
            f"{k.index:>2} | {k.aim} {param} | {k.tries} | {k.killed_at:.3f} | {k.phase} | {k.flags} | {k.state} | "
            f"{k.rerun_code} | {k.verify_code} | {k.leftovers} | {'identical' if k.ok else '; '.join(k.problems)}"
        )
    summary = ["phase | kills | resumed identical | failed"]
    for phase in (*PHASES, "not killed"):
        mine = [k for k in kills if k.phase == phase]
        if mine:
            good = sum(k.ok for k in mine)
            summary.append(f"{phase} | {len(mine)} | {good} | {len(mine) - good}")
    return "\n".join([*rows, "", *summary])


def test_sigkill_at_any_instant_resumes_to_the_reference_store(case, tmp_path, capsys):
    arrays = array_paths(case)
    coords = {"cell", "pooled/cell", "pooled/layer", "pooled/depth"}  # store format 2
    assert {"done", "checksum", "obs_names", "n_tokens", "truncated", *coords} <= set(arrays)
    assert sum(name.startswith("pooled/") and name not in coords for name in arrays) == 4
    kills = plan(case)
    only = os.environ.get(ONLY)
    if only:
        kills = [k for k in kills if str(k.index) in only.split(",")]
    duration = case.timeline["exit"]
    for kill in kills:
        for tries in (1, 2):  # one more try if the run ended first (a random instant near its end)
            kill.tries = tries
            run_dir = tmp_path / f"kill{kill.index:02d}-{tries}"
            run_dir.mkdir()
            out = run_dir / "s.zarr"
            err = tmp_path / f"kill{kill.index:02d}-{tries}.stderr"
            case.zygote.start([*case.argv, "--out", str(out)], err)
            at, elapsed = watch(case.zygote, run_dir, out, trigger(kill, duration))
            if at is not None:
                case.zygote.kill()
            code = case.zygote.wait()
            if code == -signal.SIGKILL:
                break
            assert code == 0, err.read_text()
            duration = elapsed  # it ended before the kill: the duration of a run now
        else:
            continue  # not killed, not counted
        kill.killed_at = at
        kill.flags = done_flags(out)
        kill.phase = phase_left(run_dir, out, case, arrays)
        kill.state = state_left(out)
        check_rerun(kill, case, out, arrays, tmp_path)
    report = table(kills)
    with capsys.disabled():
        print(f"\ncrash consistency, seed {SEED}, reference timeline {case.timeline}\n{report}")
    killed = [k for k in kills if k.phase != "not killed"]
    if not only:
        assert len(killed) >= 30, report
        assert {k.phase for k in killed} == set(PHASES), report
    assert all(k.ok for k in kills), report
