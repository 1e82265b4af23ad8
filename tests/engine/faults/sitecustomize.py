"""Filesystem faults for subprocess tests: a disk that fills up, or turns read-only, in the middle of a run.

Python imports ``sitecustomize`` at start-up from any folder on ``PYTHONPATH``, so a test that puts this
folder there injects the fault into every process of the run: the CLI and its Dask worker processes.
Nothing happens unless ``CELLSTRATA_FAULT_ROOT`` is set:

- ``CELLSTRATA_FAULT_ROOT``: the store folder (absolute path); only paths inside it are affected;
- ``CELLSTRATA_FAULT_ERRNO``: ``ENOSPC`` (a full disk: writes and new folders fail, deletions work) or
  ``EROFS`` (a read-only filesystem: deletions fail too);
- ``CELLSTRATA_FAULT_AFTER``: the fault starts once the commit flag of this chunk is written, which
  creates the file ``CELLSTRATA_FAULT_TRIGGER`` (shared by every process) outside the store.

Writes go through zarr's local store (``zarr.storage._local._put``, ``LocalStore.delete``) and fsspec's
local filesystem (the lease, the store's own files), the two ways the engine writes a local store.
"""

from __future__ import annotations

import os

ROOT = os.environ.get("CELLSTRATA_FAULT_ROOT")

if ROOT:
    import errno
    import functools
    from pathlib import Path

    import fsspec.implementations.local as fsspec_local
    import zarr.storage._local as zarr_local

    ERRNO = getattr(errno, os.environ.get("CELLSTRATA_FAULT_ERRNO", "ENOSPC"))
    TRIGGER = Path(os.environ["CELLSTRATA_FAULT_TRIGGER"])
    AFTER = os.environ.get("CELLSTRATA_FAULT_AFTER", "0")
    COMMIT = str(Path(ROOT, "done", "c", AFTER))

    def _inside(path: object) -> bool:
        p = str(path).removeprefix("file://")
        return (p == ROOT or p.startswith(ROOT + os.sep)) and TRIGGER.exists()

    def _fail(path: object) -> None:
        raise OSError(ERRNO, os.strerror(ERRNO), str(path))

    _put = zarr_local._put

    def put(path, value, exclusive=False):
        if _inside(path):
            _fail(path)
        written = _put(path, value, exclusive=exclusive)
        if str(path) == COMMIT:
            TRIGGER.touch()
        return written

    zarr_local._put = put

    def _guard(owner: type, name: str, *, deletes: bool = False, mode_arg: int | None = None) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def guarded(self, path, *args, **kwargs):
            if mode_arg is not None:
                mode = args[mode_arg] if len(args) > mode_arg else kwargs.get("mode", "rb")
                if not any(c in mode for c in "wxa+"):
                    return real(self, path, *args, **kwargs)
            if _inside(path) and not (deletes and ERRNO == errno.ENOSPC):
                _fail(path)
            return real(self, path, *args, **kwargs)

        setattr(owner, name, guarded)

    _guard(fsspec_local.LocalFileSystem, "_open", mode_arg=0)
    for _name in ("makedirs", "mkdir", "touch", "mv"):
        _guard(fsspec_local.LocalFileSystem, _name)
    for _name in ("rm_file", "rm"):
        _guard(fsspec_local.LocalFileSystem, _name, deletes=True)

    _delete = zarr_local.LocalStore.delete

    async def delete(self, key):
        if ERRNO != errno.ENOSPC and _inside(self.root / key):
            _fail(self.root / key)
        return await _delete(self, key)

    zarr_local.LocalStore.delete = delete
