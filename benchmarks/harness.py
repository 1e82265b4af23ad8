"""The benchmarks' harness: machine facts, load, worker processes and result files.

Every benchmark is a module of the package ``benchmarks`` and runs as ``python -m benchmarks.NAME`` from the
repository root; its worker processes run the same module (:func:`module_command`, :func:`module_env`), and
its results go to ``RESULTS/NAME-....{json,md}`` (:func:`result_name`, :func:`save_results`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import remove_owned

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGE = "benchmarks"


# ---------------------------------------------------------------------------------------------------- machine
def shell_out(cmd: list[str]) -> str:
    """The stripped stdout of ``cmd``; "" when it cannot run."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def version(module: str) -> str | None:
    """The installed version of a distribution; None when it is not installed."""
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(module)
    return None


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else ``platform.processor()``, else "cpu"."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return model or platform.processor() or "cpu"


def meminfo_gib(key: str) -> float | None:
    """A ``kB`` field of ``/proc/meminfo`` (``MemTotal``, ``MemAvailable``) in GiB; None off Linux."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 2**20
    return None


def git_commit(short: int | None = None) -> str:
    """The checkout's ``HEAD`` commit (abbreviated to ``short`` digits when given); "" outside git."""
    opt = [f"--short={short}"] if short else []
    return shell_out(["git", "-C", str(ROOT), "rev-parse", *opt, "HEAD"])


def machine_info(modules: Iterable[str], *, device: str = "cpu", torch_threads: bool = False) -> dict[str, Any]:
    """CPU model and count, memory, library versions of ``modules``, torch threads (if asked), git commit."""
    model = cpu_model()
    mem = meminfo_gib("MemTotal")
    cores = os.cpu_count()
    info: dict[str, Any] = {
        "device": device,
        "device_name": f"{model}, {cores} CPUs",
        "cpu_model": model,
        "cpu_count": cores,
        "memory_gib": None if mem is None else round(mem, 1),
    }
    if torch_threads:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    info.update(
        python=platform.python_version(),
        platform=platform.platform(),
        versions={m: version(m) for m in modules},
        cellstrata_version=version("cellstrata"),
        git_commit=git_commit(),
        git_dirty=bool(shell_out(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])),
    )
    return info


def torch_machine_info(device: str) -> dict[str, Any]:
    """The machine facts of the model benchmarks (throughput, device sprint): CPU from ``lscpu``, memory, torch
    and its threads, the device's name and CUDA version, cellstrata's version and the commit."""
    import torch

    cpu_model = ""
    for line in shell_out(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            cpu_model = line.split(":", 1)[1].strip()
    mem = meminfo_gib("MemTotal")
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": cpu_model,
        "memory_gb": None if mem is None else round(mem, 1),
        "device": device,
        "device_name": cpu_model or platform.processor() or "cpu",
    }
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    import cellstrata

    info["cellstrata_version"] = cellstrata.__version__
    info["git_commit"] = git_commit()
    return info


def device_slug(device: str) -> str:
    """ "cpu", or the CUDA card's name in lower case with dashes (``nvidia-h100-80gb-hbm3``): a result's tag."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return name_slug(torch.cuda.get_device_name(0), "cuda")


def name_slug(name: str, fallback: str) -> str:
    """``name`` in lower case, every run of other characters than letters and digits one dash."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or fallback


# ---------------------------------------------------------------------------------------------------- load
def loadavg() -> float | None:
    """1-minute load average: above the CPU count, other processes were competing for the cores."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


def loadavgs() -> list[float] | None:
    """1, 5 and 15-minute load averages."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def cpu_pressure() -> float | None:
    """Share of the last 60 s in which some runnable task waited for a CPU (Linux PSI), in %."""
    with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(dict(kv.split("=") for kv in line.split()[1:])["avg60"])
    return None


# ---------------------------------------------------------------------------------------------------- processes
def module_command(name: str, *args: str) -> list[str]:
    """The command line that runs the benchmark ``name`` (``python -m benchmarks.NAME ARGS``)."""
    return [sys.executable, "-m", f"{PACKAGE}.{name}", *args]


def module_env(env: dict[str, str] | None = None, *, first: Sequence[str] = ()) -> dict[str, str]:
    """``env`` (default: this process's) with ``PYTHONPATH`` = ``first``, the repository root, then its own:
    a :func:`module_command` then runs from any working folder."""
    env = dict(os.environ if env is None else env)
    parts = [*first, str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


# ---------------------------------------------------------------------------------------------------- result files
def utc_now() -> dt.datetime:
    """Now, in UTC: the ``created`` of a result file and the date in its name."""
    return dt.datetime.now(dt.timezone.utc)


def result_name(benchmark: str, tag: str, stamp: dt.datetime, suffix: str = "") -> str:
    """``BENCHMARK-TAG-YYYY-MM-DDSUFFIX``: the stem of a result's ``.json`` and ``.md``."""
    return f"{benchmark}-{tag}-{stamp.strftime('%Y-%m-%d')}{suffix}"


def command_line(name: str, argv: Sequence[str] | None = None) -> str:
    """The command a result file records: ``python -m benchmarks.NAME ARGS`` (``argv`` default: ``sys.argv``)."""
    return " ".join(["python", "-m", f"{PACKAGE}.{name}", *(sys.argv[1:] if argv is None else argv)])


def free_name(out: Path, name: str) -> str:
    """``name``, else ``name-2``, ``name-3``, ...: the first stem with neither a ``.json`` nor a ``.md`` in ``out``."""
    stem, k = name, 1
    while (out / f"{stem}.json").exists() or (out / f"{stem}.md").exists():
        k += 1
        stem = f"{name}-{k}"
    return stem


def save_results(
    out_dir: Path | str,
    name: str,
    payload: dict[str, Any],
    markdown: str,
    *,
    default: Callable[[Any], Any] | None = float,
    note: str = "",
    echo: bool = True,
) -> Path:
    """Write ``NAME.json`` (indented, one final newline) and ``NAME.md`` into ``out_dir`` and, when ``echo``,
    say so (with ``note``); their stem. An earlier result of that name is kept: the new one is ``NAME-2``
    (``-3``, ...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = free_name(out, name)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=default) + "\n")
    (out / f"{name}.md").write_text(markdown)
    if echo:
        print(f"saved {out / name}.json and .md{note}")
    return out / name


# ---------------------------------------------------------------------------------------------------- workers
def json_default(x: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays as Python values, anything else as ``str``."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def write_spec(spec: dict[str, Any], work: Path, benchmark: str, prefix: str) -> tuple[Path, Path, list[str]]:
    """Write ``spec`` for a worker under ``work``: its path, the result path, the ``--worker`` command line of
    the module ``benchmarks.BENCHMARK`` (run it with ``env=`` :func:`module_env`)."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".json", dir=work)
    os.close(fd)
    spec_path = Path(path)
    out_path = spec_path.with_suffix(".result.json")
    spec_path.write_text(json.dumps({**spec, "result_path": str(out_path)}))
    return spec_path, out_path, module_command(benchmark, "--worker", str(spec_path))


def read_result(
    spec: dict[str, Any], spec_path: Path, out_path: Path, failure: str | None, stderr: str | None
) -> dict[str, Any]:
    """The worker's result (both files removed), marked failed with ``failure`` and its stderr tail if it failed."""
    try:
        result = json.loads(out_path.read_text())
    except (OSError, ValueError):
        result = {"spec": spec, "ok": False, "error": failure or "no result written"}
    finally:
        for p in (spec_path, out_path):
            remove_owned(p)
    if failure and result.get("ok", False):
        result.update(ok=False, error=failure)
    if not result.get("ok"):
        result["stderr_tail"] = (stderr or "")[-3000:]
    return result


def worker_main(spec_path: str, worker: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Run ``worker`` on the spec at ``spec_path`` and write its result where the spec says; 0 when it went ok."""
    spec = json.loads(Path(spec_path).read_text())
    result = worker(spec)
    Path(spec["result_path"]).write_text(json.dumps(result, default=json_default))
    return 0 if result.get("ok") else 1
