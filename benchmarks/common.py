"""Helpers of the benchmarks beside the harness (:mod:`benchmarks.harness`): file sizes, process memory, owned
(marked) folders, report formatting.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any


# ---------------------------------------------------------------------------------------------------- files
def du(path: Path) -> int:
    """Bytes of a file, or of every file below a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------- memory
def rss_now() -> int | None:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return None


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``, ``VmRSS``) in bytes; None off Linux or once gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def maxrss(who: int = resource.RUSAGE_SELF) -> int:
    """``getrusage(who).ru_maxrss`` in bytes (kB on Linux, bytes on macOS)."""
    r = resource.getrusage(who).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def peak_rss() -> int:
    """Peak RSS of this process image in bytes: ``VmHWM`` where Linux has it, else ``ru_maxrss``.

    ``ru_maxrss`` of a process started by ``subprocess`` also counts the *parent's* peak (Linux keeps the
    larger of the pre-exec image's high-water mark and the new one), so after the parent has built a
    large input every child would report the parent's peak. ``VmHWM`` is the new image's own.
    """
    hwm = status_bytes("VmHWM")
    return hwm if hwm is not None else maxrss(resource.RUSAGE_SELF)


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0, ``/proc/self/clear_refs``); True when it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- owned folders
OWNED_MARKER = ".cellstrata-bench"
_MARKER_HEAD = "cellstrata benchmark folder"


class NotOwnedError(SystemExit):
    """A path a benchmark would create or delete exists and was not made by a benchmark.

    A ``SystemExit`` so that the script stops with this one line instead of a traceback.
    """


def _has_marker(folder: Path) -> bool:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return (folder / OWNED_MARKER).read_text().startswith(_MARKER_HEAD)
    return False


def is_owned(path: Path) -> bool:
    """True when ``path`` or a folder above it carries the marker that :func:`make_owned_dir` writes.

    Everything below a marked folder was put there by a benchmark; a folder without the marker, or a file
    beside one, may be the user's.
    """
    path = Path(path).absolute()  # no symlinks resolved: a link is judged by where it sits
    return any(_has_marker(p) for p in (path, *path.parents))


def make_owned_dir(path: Path) -> Path:
    """Create the folder ``path`` with the marker file in it; an owned or empty existing folder is (re)used.

    Raises :class:`NotOwnedError` when ``path`` exists as a file, a link or a folder with files in it
    that no benchmark made: nothing there is changed.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise NotOwnedError(f"refusing to use {path}: it exists and is not a folder a benchmark made; nothing changed")
    if path.is_dir():
        if is_owned(path):
            return path
        if any(path.iterdir()):
            raise NotOwnedError(
                f"refusing to use {path}: it holds files that no benchmark made (no {OWNED_MARKER} file); "
                "nothing changed: move it or pick another --workdir"
            )
    path.mkdir(parents=True, exist_ok=True)
    (path / OWNED_MARKER).write_text(f"{_MARKER_HEAD}\npid {os.getpid()}\ntoken {secrets.token_hex(8)}\n")
    return path


def make_temp_dir(prefix: str) -> Path:
    """A new temporary folder, marked as owned so that :func:`remove_owned` may delete it."""
    return make_owned_dir(Path(tempfile.mkdtemp(prefix=prefix)))


def remove_owned(path: Path) -> bool:
    """Delete ``path`` (a folder with everything in it, a file, or a link itself) when a benchmark owns it.

    A path that is not owned (see :func:`is_owned`) is kept and one line says so. True when ``path`` is
    gone afterwards (also when it was not there).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return True
    if not is_owned(path):
        print(f"kept {path}: not made by a benchmark (no {OWNED_MARKER} file in it or above it)")
        return False
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return not path.exists() and not path.is_symlink()


def fresh_owned_dir(path: Path) -> Path:
    """An empty owned folder at ``path``: an owned one there is deleted first, anything else is refused."""
    if not remove_owned(path):
        raise NotOwnedError(f"refusing to replace {path}: it is not a folder a benchmark made; nothing changed")
    return make_owned_dir(path)


# ---------------------------------------------------------------------------------------------------- report
def mib(x: float | None) -> str:
    """Bytes as whole MiB with thousands separators; "–" for None."""
    return "–" if x is None else f"{x / 2**20:,.0f}"


def growth(r: dict[str, Any]) -> int | None:
    """A run's peak RSS over its RSS after the imports, in bytes; None when either is missing."""
    if r.get("peak_rss") is None or r.get("rss_after_imports") is None:
        return None
    return r["peak_rss"] - r["rss_after_imports"]


def ints(text: str) -> list[int]:
    """Comma-separated numbers (``1e5`` allowed) as ints."""
    return [int(float(x)) for x in text.split(",") if x.strip()]


def print_failure(label: str, r: dict[str, Any], tail: int) -> bool:
    """Print a failed run's error and the last ``tail`` lines of its traceback or stderr; True if it failed."""
    if r.get("ok"):
        return False
    print(f"  [{label}] FAILED: {r.get('error')}")
    for line in (r.get("traceback") or r.get("stderr_tail") or "").strip().splitlines()[-tail:]:
        print(f"      {line}")
    return True
