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

    def __bool__(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise :class:`Interrupted` if a stop was asked for."""
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set the returned request instead of raising.

    Outside the main thread (where handlers cannot be installed) the request is never set and the
    default behaviour is kept.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.signum is not None:  # asked twice: stop now
            raise Interrupted(signum)
        stop.signum = signum

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
