"""Where the command line keeps what a user should not have to read: library logs and full traces.

While a command runs, the loggers of the libraries the engine drives (Dask distributed and dask, whose
writer and cluster threads log every failed task with its traceback; tornado and asyncio, which log
connections and tasks cut short at shutdown; bokeh) and Python's hooks for exceptions nobody can catch
(one raised in a finalizer, or in a thread) are captured in memory instead of printed. A failure then
ends with one line on stderr naming a log file that holds the full trace and everything captured:

    cellstrata: error: <what went wrong and what to do> (full trace: /path/to/error-....log)

The log goes to the first of these folders that takes it, so it is written even when the store's disk
is full or read-only: ``$CELLSTRATA_LOG_DIR``; ``$XDG_STATE_HOME/cellstrata/logs`` (default
``~/.local/state/cellstrata/logs``); ``<system temp dir>/cellstrata-<user id>/logs``.
A successful command writes no file and prints nothing of what was captured.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LIBRARY_LOGGERS = ("distributed", "dask", "tornado", "asyncio", "bokeh")
LOG_DIR_ENV = "CELLSTRATA_LOG_DIR"
MAX_ENTRIES = 5000  # the newest entries are kept: a long run's INFO chatter must not grow without bound


def log_dirs() -> list[Path]:
    """The folders tried for a log file, in order (see the module docstring)."""
    dirs = []
    if os.environ.get(LOG_DIR_ENV):
        dirs.append(Path(os.environ[LOG_DIR_ENV]))
    state = os.environ.get("XDG_STATE_HOME") or str(Path("~/.local/state").expanduser())
    dirs.append(Path(state) / "cellstrata" / "logs")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    dirs.append(Path(tempfile.gettempdir()) / f"cellstrata-{uid}" / "logs")
    return dirs


class _Capture(logging.Handler):
    def __init__(self, entries: collections.deque[tuple[int, str]]):
        super().__init__(logging.DEBUG)
        self.entries = entries
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a record that cannot be formatted is dropped, never printed
            self.entries.append((record.levelno, self.format(record)))


def _library_loggers() -> list[logging.Logger]:
    """The top loggers of :data:`LIBRARY_LOGGERS` and every logger below them with handlers of its own."""
    found = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    below = tuple(f"{n}." for n in LIBRARY_LOGGERS)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        # e.g. tornado.application, which distributed gives a handler of its own
        if isinstance(logger, logging.Logger) and name.startswith(below) and (logger.handlers or not logger.propagate):
            found.append(logger)
    return found


def _format(exc_type: Any, exc: BaseException | None, tb: Any) -> str:
    return "".join(traceback.format_exception(exc_type, exc, tb))


class RunLog:
    """Capture library logs and uncatchable exceptions within a ``with`` block; :meth:`write` keeps them.

    ``echo`` (the CLI's ``--verbose``) also leaves the libraries' own handlers in place, so their records
    print as before; ``dask``: the command runs Dask (imported first, see :meth:`__enter__`). Everything is
    restored when the block ends, unless ``restore=False`` (the command is the whole process: what the
    interpreter's shutdown logs is captured too, and dropped).
    """

    def __init__(self, argv: Sequence[str], *, echo: bool = False, dask: bool = False, restore: bool = True):
        self.argv = list(argv)
        self.echo = echo
        self.dask = dask
        self.restore = restore
        self.entries: collections.deque[tuple[int, str]] = collections.deque(maxlen=MAX_ENTRIES)
        self._handler = _Capture(self.entries)
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
        self._hooks: tuple[Any, Any] | None = None
        self.started = time.time()

    # ------------------------------------------------------------------------------------- capture
    def __enter__(self) -> RunLog:
        if self.dask:
            # distributed replaces its loggers' handlers when it is first imported: import it first, so
            # the capture installed below is not replaced mid-run
            with contextlib.suppress(ImportError):
                import distributed  # noqa: F401
        for logger in _library_loggers():
            self._saved.append((logger, list(logger.handlers), logger.propagate))
            logger.handlers[:] = [*logger.handlers, self._handler] if self.echo else [self._handler]
            logger.propagate = False
        self._hooks = (sys.unraisablehook, threading.excepthook)
        sys.unraisablehook = self._unraisable
        threading.excepthook = self._thread_exception
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.restore:  # the command is the whole process: shutdown noise stays out of stderr too
            return
        for logger, handlers, propagate in self._saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate
        self._saved.clear()
        if self._hooks is not None:
            sys.unraisablehook, threading.excepthook = self._hooks
            self._hooks = None

    def _unraisable(self, unraisable: Any) -> None:
        try:
            where = f"{unraisable.err_msg or 'Exception ignored in'}: {unraisable.object!r}"
        except Exception:
            where = "Exception ignored in an object that cannot be shown"
        text = _format(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
        self.entries.append((logging.ERROR, f"{where}\n{text}"))
        if self.echo and self._hooks is not None:
            self._hooks[0](unraisable)

    def _thread_exception(self, args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        text = _format(args.exc_type, args.exc_value, args.exc_traceback)
        self.entries.append((logging.ERROR, f"Exception in thread {name}:\n{text}"))
        if self.echo and self._hooks is not None:
            self._hooks[1](args)

    @property
    def has_problems(self) -> bool:
        """Whether anything at WARNING or above was captured (a trace worth keeping)."""
        return any(level >= logging.WARNING for level, _ in self.entries)

    # --------------------------------------------------------------------------------------- write
    def render(self, message: str, err: BaseException | None) -> str:
        """The log file's text: the command, the message, the full trace, then everything captured."""
        from . import __version__

        head = [
            f"command: cellstrata {' '.join(self.argv)}",
            f"started: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}",
            f"ended:   {time.strftime('%Y-%m-%d %H:%M:%S')}",
            f"cellstrata {__version__}, python {sys.version.split()[0]}, pid {os.getpid()}",
            "",
            message,
            "",
        ]
        if err is not None:
            head += ["full trace:", _format(type(err), err, err.__traceback__)]
        if self.entries:
            head += [f"captured library logs and uncaught exceptions ({len(self.entries)}):", ""]
            head += [text for _, text in self.entries]
        return "\n".join(head) + "\n"

    def write(self, message: str, err: BaseException | None) -> tuple[Path | None, str]:
        """Write the log to the first folder of :func:`log_dirs` that takes it: ``(path, "")`` or ``(None, why)``."""
        text = self.render(message, err)
        stem = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        reasons = []
        for folder in log_dirs():
            created = False
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for n in range(100):  # several failures in one second of one process: -1, -2, ...
                    path = folder / (f"{stem}.log" if n == 0 else f"{stem}-{n}.log")
                    try:
                        f = path.open("x", encoding="utf-8")  # exclusive: never another file
                    except FileExistsError:
                        continue
                    created = True
                    with f:
                        f.write(text)
                    break
                else:
                    raise FileExistsError(f"{folder / stem}*.log: 100 files exist")
            except OSError as exc:
                reasons.append(f"{folder}: {exc.strerror or exc}")
                if created:  # the partial file this call created (its disk is full)
                    with contextlib.suppress(OSError):
                        path.unlink()
                continue
            return path, ""
        return None, "; ".join(reasons)
