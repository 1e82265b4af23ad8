"""Graceful stop on SIGINT / SIGTERM.

The first signal only records a request; the run checks it between batches (:meth:`StopRequest.check`),
lets the chunks already handed to the writer commit, and leaves with :class:`Interrupted`. A second
signal stops at once. Recording instead of raising in the handler matters: an exception raised by a
handler lands wherever the main thread happens to be, and inside a finalizer (``__del__``) or a
library's retry loop it is swallowed, so a run could ignore Ctrl-C and finish.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

log = logging.getLogger("cellstrata")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal; ``signum`` is the signal (exit status ``128 + signum``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """Whether a stop was asked for, and by which signal."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.acted = False  # an Interrupted was raised for it (check, or a second signal)

    def __bool__(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise :class:`Interrupted` if a stop was asked for."""
        if self.signum is not None:
            self.acted = True
            raise Interrupted(self.signum)


def _install(handler: Any) -> dict[int, Any]:
    """Install ``handler`` for :data:`SIGNALS`; returns the handlers it replaced (for :func:`_restore`)."""
    previous: dict[int, Any] = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, handler)
    return previous


def _restore(previous: dict[int, Any]) -> None:
    for s, h in previous.items():
        # None: a handler installed outside Python, which cannot be put back; the default is the closest
        signal.signal(s, signal.SIG_DFL if h is None else h)


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set the returned request instead of raising.

    A second signal restores the previous handlers and raises :class:`Interrupted` at once. The previous
    handlers are back on every exit from the block, and a request the block did not act on (the signal
    came after its last :meth:`~StopRequest.check` and the block ended normally) is passed on: the signal
    is raised again for the handler that was installed before (Python's ``KeyboardInterrupt``, a test
    runner's, the CLI's, or the default action), so a Ctrl-C is never swallowed. Outside the main thread
    (where handlers cannot be installed) the request is never set and the default behaviour is kept.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    leaving = threading.Event()  # set while the handlers are being restored: a signal is then only recorded

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.signum is None or leaving.is_set():
            stop.signum = stop.signum or signum
            return
        # asked twice: stop now; the previous handlers go back first, so that wherever this exception
        # lands (even in the restoring code below) no handler of this block is left behind
        _restore(previous)
        stop.acted = True
        raise Interrupted(signum)

    previous = _install(handler)
    ended = False
    try:
        yield stop
        ended = True
    finally:
        leaving.set()
        _restore(previous)
    if ended and stop.signum is not None and not stop.acted:
        signal.raise_signal(stop.signum)


class CommandSignals:
    """SIGINT and SIGTERM raise :class:`Interrupted` until :meth:`settle`; see :func:`command_signals`."""

    def __init__(self, *, ignore_when_settled: bool = False) -> None:
        self.settled = False
        self.late: int | None = None  # a signal that came after settle()
        self.ignore_when_settled = ignore_when_settled

    def settle(self) -> None:
        """The command is over: from now on a signal is recorded, not raised (the exit status is decided)."""
        self.settled = True
        if self.ignore_when_settled and threading.current_thread() is threading.main_thread():
            # ignored by the operating system, in every thread, until the process ends (Python puts back
            # the default action of signals with a Python handler while it shuts down; not of ignored ones)
            for s in SIGNALS:
                signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def command_signals(*, restore: bool = True) -> Iterator[CommandSignals]:
    """Handlers for a whole command-line command; the previous ones are restored on exit.

    Within the block the first SIGINT or SIGTERM raises :class:`Interrupted` (exit status ``128 +
    signum``) wherever the command is, start-up and shutdown included; a run's :func:`graceful_stop` takes over while
    it extracts and passes an unacted request back here. Once :meth:`CommandSignals.settle` was called,
    signals are only recorded, so one arriving while the command prints its last line cannot raise
    through it. ``restore=False`` (the command is the whole process): settling ignores both signals until
    the process ends, so one that comes while the interpreter shuts down changes neither the exit status
    nor the output. Outside the main thread nothing is installed.
    """
    state = CommandSignals(ignore_when_settled=not restore)
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if state.settled:
            state.late = signum
            return
        raise Interrupted(signum)

    previous = _install(handler)
    try:
        yield state
    finally:
        state.settle()
        if restore:
            _restore(previous)


class StartupInterrupted(Interrupted):
    """A signal arrived during start-up (imports, opening the input, loading the model): nothing was written."""

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name} during start-up; nothing was written"


@contextlib.contextmanager
def during_startup() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`StartupInterrupted` (the run's own handler comes later).

    Without it SIGTERM would end the process silently while the input opens or the model loads. The
    previous handlers are restored on exit. Outside the main thread nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise StartupInterrupted(signum)

    previous = _install(handler)
    try:
        yield
    finally:
        _restore(previous)
