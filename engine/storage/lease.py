"""A lease on a store: one extraction at a time writes it.

The lease is the small zarr group ``lease/`` inside the store: one file, ``lease/zarr.json``, whose
attribute ``cellstrata_lease`` names the holder (a random token, host, pid, times). It is created
exclusively (``O_EXCL`` on a local or shared filesystem, the filesystem's exclusive create elsewhere)
before the store itself, so two ``extract`` commands started on the same new store cannot both write it:
the second is refused with a message naming the holder. The holder renews it every
:data:`RENEW_SECONDS` from a daemon thread. A lease is stale, and is taken over with a warning, when its
holder's process is gone (same host) or it was not renewed for :data:`STALE_SECONDS` (another host);
``break_lock`` takes it over regardless. Being a zarr group with attributes, it does not disturb zarr or
xarray readers of the store.

The file is written whole (a temporary file renamed into place, hard-linked for the exclusive create),
so a reader never sees part of a live lease. Only a cellstrata lease is ever deleted: a release deletes
the one file, and only while it still holds this run's token (then the temporary files of lease writes a
killed run left, and the ``lease/`` folder if that is left empty); a takeover deletes the file only if it
is a cellstrata lease (or a lease file cut short by a killed run: empty or a prefix of the lease
format). A ``lease/`` that holds anything else (user data, a foreign zarr group) is refused with one
line and left as it is.
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

from ..errors import StoreError, StoreLockedError
from .location import StoreLocation, is_temp_name

log = logging.getLogger("cellstrata")

LEASE_NODE = "lease"
LEASE_FILE = f"{LEASE_NODE}/zarr.json"
LEASE_KEY = "cellstrata_lease"
# how every lease file starts (json.dumps of _encode's dict): a shorter file that is a prefix of it, or a
# longer one that starts with it, is a lease a killed run left half-written
LEASE_PREFIX = b'{"zarr_format": 3, "node_type": "group", "attributes": {"cellstrata_lease": {"token": "'
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
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {LEASE_KEY: holder}}).encode()


def is_lease_bytes(raw: bytes) -> bool:
    """Whether ``raw`` is a cellstrata lease file, whole or cut short by a killed run."""
    return raw.startswith(LEASE_PREFIX) or LEASE_PREFIX.startswith(raw)


def _not_ours(location: StoreLocation, what: str) -> str:
    return (
        f"{location.child(LEASE_NODE)} {what}, so it is not a cellstrata lease; cellstrata keeps its lease "
        "there: move that folder out, or choose another --out (nothing was changed)"
    )


def read_holder(location: StoreLocation) -> dict[str, Any] | None:
    """The current lease holder of ``location``: None if nobody holds it, ``{}`` for a half-written lease.

    Raises :class:`StoreError` if ``lease/zarr.json`` is there but is not a cellstrata lease.
    """
    raw = location.read_bytes(LEASE_FILE)
    if raw is None:
        return None
    try:
        holder = json.loads(raw)["attributes"][LEASE_KEY]
        if isinstance(holder, dict) and "token" in holder:
            return dict(holder)
    except (ValueError, KeyError, TypeError):
        pass
    if is_lease_bytes(raw):
        return {}  # half-written: a lease with unknown holder
    raise StoreError(_not_ours(location, "holds a zarr.json that cellstrata did not write"))


def _is_lease_temp(location: StoreLocation, entry: str) -> bool:
    """Whether ``lease/<entry>`` is the temporary file of a lease write that a killed run left behind."""
    if not is_temp_name(entry, "zarr.json"):
        return False
    raw = location.read_bytes(f"{LEASE_NODE}/{entry}")
    return raw is not None and is_lease_bytes(raw)


def check_lease_folder(location: StoreLocation) -> None:
    """Raise :class:`StoreError` unless ``lease/`` is absent or holds nothing but a cellstrata lease file."""
    if location.exists(LEASE_NODE) and not location.is_dir(LEASE_NODE):
        raise StoreError(_not_ours(location, "is a file"))
    other = [n for n in location.names(LEASE_NODE) if n != "zarr.json" and not _is_lease_temp(location, n)]
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise StoreError(_not_ours(location, f"holds files cellstrata did not write ({shown})"))
    read_holder(location)


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
    _made_root: bool = False  # whether this run made the location's folder

    @classmethod
    def acquire(cls, location: StoreLocation, *, break_lock: bool = False) -> Lease:
        """Take the lease of ``location`` or raise :class:`StoreLockedError` naming its live holder.

        A ``lease/`` folder that is not a cellstrata lease is refused (:class:`StoreError`), untouched.
        """
        holder = _holder()
        try:
            check_lease_folder(location)
            made_root = not location.exists()
        except OSError as err:
            raise StoreError(_unwritable(location, err)) from None
        for _ in range(3):
            try:
                created = location.write_bytes(LEASE_FILE, _encode(holder), exclusive=True, atomic=True)
            except OSError as err:
                raise StoreError(_unwritable(location, err)) from None
            if created:
                lease = cls(location, holder, threading.Event(), _made_root=made_root)
                lease._start_renewing()
                return lease
            current = read_holder(location)
            if current is None:  # released between our attempt and the read: try again
                continue
            reason = "--break-lock was given" if break_lock else stale_reason(current)
            if reason is None:
                raise StoreLockedError(_locked_message(location, current))
            log.warning("taking over the lease of %s from %s: %s", location, _describe(current), reason)
            if read_holder(location) == current:  # nobody took it over meanwhile; still a cellstrata lease
                location.remove_file(LEASE_FILE)
        msg = f"could not take the lease of {location}: other runs keep taking it; start one run at a time"
        raise StoreLockedError(msg)

    def _start_renewing(self) -> None:
        def renew() -> None:
            while not self._stop.wait(RENEW_SECONDS):
                try:
                    current = read_holder(self.location)
                except StoreError:
                    current = {"token": None}
                if current and current.get("token") != self.holder["token"]:
                    log.warning("the lease of %s was taken over by another run", self.location)
                    return
                self.holder["renewed"] = time.time()
                try:
                    self.location.write_bytes(LEASE_FILE, _encode(self.holder), atomic=True)
                except OSError as err:  # a transient filesystem error: try again next period
                    log.debug("renewing the lease of %s failed: %s", self.location, err)

        self._thread = threading.Thread(target=renew, name="cellstrata-lease", daemon=True)
        self._thread.start()

    @property
    def held(self) -> bool:
        try:
            current = read_holder(self.location)
        except StoreError:  # replaced by a file that is not a lease
            return False
        return current is not None and current.get("token") == self.holder["token"]

    def release(self) -> None:
        """Stop renewing and delete the lease file if it still holds this run's token.

        Then ``lease/`` goes if it is left empty, and so does the location's folder if this run made it
        and nothing else was written there (a run refused before it created its store leaves nothing).
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self.held:
                self.location.remove_file(LEASE_FILE)
                for entry in self.location.names(LEASE_NODE):  # temporary files of writes cut short by a kill
                    if _is_lease_temp(self.location, entry):
                        self.location.remove_file(f"{LEASE_NODE}/{entry}")
                self.location.remove_empty_dirs(LEASE_NODE)
                if self._made_root and not self.location.names():
                    self.location.remove_empty_dirs()
        except OSError as err:
            log.warning("could not release the lease of %s (%s); the next run will take it over", self.location, err)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _unwritable(location: StoreLocation, err: OSError) -> str:
    return f"cannot write to {location} ({type(err).__name__}: {err}); check the --out path is writable"


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
