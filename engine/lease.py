"""A lease on a store: one extraction at a time writes it.

The lease is the small zarr group ``lease/`` inside the store, created exclusively (``O_EXCL`` on a local
or shared filesystem, the filesystem's exclusive create elsewhere) before the store itself, so two
``extract`` commands started on the same new store cannot both write it: the second is refused with a
message naming the holder. The holder renews it every :data:`RENEW_SECONDS` from a daemon thread. A
lease is stale, and is taken over with a warning, when its holder's process is gone (same host) or it
was not renewed for :data:`STALE_SECONDS` (another host); ``break_lock`` takes it over regardless.
Being a zarr group with attributes, it does not disturb zarr or xarray readers of the store.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import StoreError, StoreLockedError
from .location import StoreLocation

log = logging.getLogger("cellstrata")

LEASE_NODE = "lease"
LEASE_FILE = f"{LEASE_NODE}/zarr.json"
RENEW_SECONDS = 20.0
STALE_SECONDS = 120.0


def _holder() -> dict[str, Any]:
    now = time.time()
    return {
        "token": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "acquired": now,
        "renewed": now,
    }


def _encode(holder: dict[str, Any]) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"cellstrata_lease": holder}}).encode()


def read_holder(location: StoreLocation) -> dict[str, Any] | None:
    """The current lease holder of ``location`` (None if nobody holds it or the lease is unreadable)."""
    raw = location.read_bytes(LEASE_FILE)
    if raw is None:
        return None
    try:
        return dict(json.loads(raw)["attributes"]["cellstrata_lease"])
    except (ValueError, KeyError, TypeError):
        return {}  # half-written: treat as a lease with unknown holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(holder: dict[str, Any], *, now: float | None = None) -> str | None:
    """Why ``holder``'s lease may be taken over, or None while it is live."""
    now = time.time() if now is None else now
    if not holder:
        return "the lease file is unreadable"
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return f"its process {holder.get('pid')} on this host is gone"
    age = now - float(holder.get("renewed", 0))
    if age > STALE_SECONDS:
        return f"it was last renewed {age:.0f} s ago"
    return None


@dataclass
class Lease:
    """A held lease; :meth:`release` (or leaving the ``with`` block) gives it back."""

    location: StoreLocation
    holder: dict[str, Any]
    _stop: threading.Event
    _thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, location: StoreLocation, *, break_lock: bool = False) -> Lease:
        """Take the lease of ``location`` or raise :class:`StoreLockedError` naming its live holder."""
        holder = _holder()
        for _ in range(3):
            try:
                created = location.write_bytes(LEASE_FILE, _encode(holder), exclusive=True)
            except OSError as err:
                msg = f"cannot write to {location} ({type(err).__name__}: {err}); check the --out path is writable"
                raise StoreError(msg) from None
            if created:
                lease = cls(location, holder, threading.Event())
                lease._start_renewing()
                return lease
            current = read_holder(location)
            if current is None:  # released between our attempt and the read: try again
                continue
            reason = "--break-lock was given" if break_lock else stale_reason(current)
            if reason is None:
                raise StoreLockedError(_locked_message(location, current))
            log.warning("taking over the lease of %s from %s: %s", location, _describe(current), reason)
            if read_holder(location) == current:  # nobody took it over meanwhile
                location.remove(LEASE_FILE)
        msg = f"could not take the lease of {location}: other runs keep taking it; start one run at a time"
        raise StoreLockedError(msg)

    def _start_renewing(self) -> None:
        def renew() -> None:
            while not self._stop.wait(RENEW_SECONDS):
                current = read_holder(self.location)
                if current and current.get("token") != self.holder["token"]:
                    log.warning("the lease of %s was taken over by another run", self.location)
                    return
                self.holder["renewed"] = time.time()
                try:
                    self.location.write_bytes(LEASE_FILE, _encode(self.holder))
                except OSError as err:  # a transient filesystem error: try again next period
                    log.debug("renewing the lease of %s failed: %s", self.location, err)

        self._thread = threading.Thread(target=renew, name="cellstrata-lease", daemon=True)
        self._thread.start()

    @property
    def held(self) -> bool:
        current = read_holder(self.location)
        return current is not None and current.get("token") == self.holder["token"]

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self.held:
                self.location.remove(LEASE_NODE)
        except OSError as err:
            log.warning("could not release the lease of %s (%s); the next run will take it over", self.location, err)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unknown run"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("acquired", 0))))
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {started})"


def _locked_message(location: StoreLocation, holder: dict[str, Any]) -> str:
    age = time.time() - float(holder.get("renewed", 0))
    return (
        f"{location} is being written by another extraction, {_describe(holder)}, lease renewed {age:.0f} s ago; "
        "wait for it to finish (re-running then resumes), or, if that run is dead on another machine, "
        f"pass --break-lock (a lease not renewed for {STALE_SECONDS:.0f} s is taken over automatically)"
    )
