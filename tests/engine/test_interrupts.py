"""Graceful stop: the first signal is recorded, not raised; a second one stops at once."""

from __future__ import annotations

import os
import signal

import pytest

from cellstrata.engine.interrupts import Interrupted, graceful_stop


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
