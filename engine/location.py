"""Where a store lives: a local path or any URL fsspec understands (``s3://``, ``gs://``, ``memory://``, ...).

zarr opens every location itself (``zarr.open_group(url)``); this module adds the few file operations
zarr does not offer (does it exist, what is inside, remove it, exclusive create of one small file)
through the location's fsspec filesystem. ``file://`` URLs become local paths, which zarr writes with
its faster local store. Credentials for remote filesystems come from the environment or fsspec's
configuration, as for any fsspec user.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import zarr

from .errors import StoreError


def normalize(path_or_url: str | os.PathLike[str]) -> str:
    """The store location as zarr should see it: a URL kept as given, ``file://`` and paths made local."""
    s = os.fspath(path_or_url)
    if s.startswith("file://"):
        s = s[len("file://") :]
    if "://" in s:
        return s.rstrip("/")
    return str(Path(s).expanduser().absolute())


@dataclass(frozen=True)
class StoreLocation:
    """A store's location (``url``: a local absolute path or a URL) and its fsspec filesystem."""

    url: str

    @classmethod
    def of(cls, path_or_url: str | os.PathLike[str] | StoreLocation) -> StoreLocation:
        if isinstance(path_or_url, StoreLocation):
            return path_or_url
        return cls(normalize(path_or_url))

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    @property
    def protocol(self) -> str:
        return "file" if self.is_local else self.url.split("://", 1)[0]

    def _fs(self) -> tuple[Any, str]:
        import fsspec

        try:
            return fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as err:
            msg = f"cannot open {self.url}: {err}; install the fsspec filesystem for {self.protocol}:// (s3fs, gcsfs)"
            raise StoreError(msg) from None

    def child(self, *parts: str) -> str:
        """Filesystem path of ``parts`` inside the location."""
        _, root = self._fs()
        return str(PurePosixPath(root, *parts))

    def exists(self) -> bool:
        fs, root = self._fs()
        return bool(fs.exists(root))

    def names(self) -> list[str]:
        """Names of the entries directly inside the location (empty if it does not exist)."""
        fs, root = self._fs()
        if not fs.exists(root) or not fs.isdir(root):
            return []
        return sorted(PurePosixPath(str(p).rstrip("/")).name for p in fs.ls(root, detail=False))

    def is_dir(self) -> bool:
        fs, root = self._fs()
        return bool(fs.exists(root) and fs.isdir(root))

    def remove(self, name: str | None = None) -> None:
        """Delete the entry ``name`` inside the location, or the whole location."""
        fs, root = self._fs()
        target = self.child(name) if name else root
        if fs.exists(target):
            fs.rm(target, recursive=True)

    def read_bytes(self, name: str) -> bytes | None:
        """The file ``name`` inside the location, or None if there is none."""
        fs, _ = self._fs()
        try:
            with fs.open(self.child(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, name: str, data: bytes, *, exclusive: bool = False) -> bool:
        """Write the file ``name``; with ``exclusive``, only if it does not exist (returns False if it did)."""
        fs, _ = self._fs()
        path = self.child(name)
        fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        try:
            with fs.open(path, "xb" if exclusive else "wb") as f:
                f.write(data)
        except FileExistsError:
            return False
        return True

    def open_group(self, mode: str, **kwargs: Any) -> zarr.Group:
        return zarr.open_group(self.url, mode=mode, **kwargs)

    def __str__(self) -> str:
        return self.url
