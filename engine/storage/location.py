"""Where a store lives: a local path or any URL fsspec understands (``s3://``, ``gs://``, ``memory://``, ...).

zarr opens every location itself (``zarr.open_group(url)``); this module adds the few file operations
zarr does not offer (does it exist, what is inside, exclusive create of one small file, remove one file or
an empty folder) through the location's fsspec filesystem. ``file://`` URLs become local paths, which
zarr writes with its faster local store. Credentials for remote filesystems come from the environment or
fsspec's configuration, as for any fsspec user.

The engine deletes single files, each one it can prove it wrote (:mod:`.lease`, :mod:`.store`), and
folders only once they are empty.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, cast

import zarr

from ..errors import StoreError


def normalize(path_or_url: str | os.PathLike[str]) -> str:
    """The store location as zarr should see it: a URL kept as given, ``file://`` and paths made local."""
    s = os.fspath(path_or_url)
    if s.startswith("file://"):
        s = s[len("file://") :]
    if "://" in s:
        return s.rstrip("/")
    return str(Path(s).expanduser().absolute())


TEMP_SUFFIX = ".cellstrata-tmp"


def temp_name(name: str) -> str:
    """Name of the temporary file an atomic write of ``name`` goes through: ``.<name>.<random>.cellstrata-tmp``."""
    return f".{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"


def is_temp_name(entry: str, name: str) -> bool:
    """Whether ``entry`` is the name of a temporary file of an atomic write of ``name``."""
    return entry.startswith(f".{name}.") and entry.endswith(TEMP_SUFFIX)


def _open_write(fs: Any, path: str, data: bytes, *, exclusive: bool) -> bool:
    try:
        with fs.open(path, "xb" if exclusive else "wb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


def member_array(group: zarr.Group, *names: str) -> zarr.Array:
    """``group[names[0]][names[1]]...``, typed as the array a store's layout keeps there (zarr types a group's
    member as an array or a group)."""
    node: Any = group
    for name in names:
        node = node[name]
    return cast(zarr.Array, node)


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

    def exists(self, name: str | None = None) -> bool:
        """Whether the location (or the entry ``name`` inside it) exists."""
        fs, root = self._fs()
        return bool(fs.exists(self.child(name) if name else root))

    def names(self, name: str | None = None) -> list[str]:
        """Names of the entries directly inside the location, or inside its folder ``name`` (empty if none)."""
        fs, root = self._fs()
        target = self.child(name) if name else root
        if not fs.exists(target) or not fs.isdir(target):
            return []
        return sorted(PurePosixPath(str(p).rstrip("/")).name for p in fs.ls(target, detail=False))

    def files(self) -> list[str]:
        """Paths, relative to the location, of every file at any depth inside it (empty if it does not exist)."""
        fs, root = self._fs()
        if not fs.exists(root) or not fs.isdir(root):
            return []
        base = PurePosixPath(root)
        return sorted(str(PurePosixPath(str(p)).relative_to(base)) for p in fs.find(root))

    def is_dir(self, name: str | None = None) -> bool:
        """Whether the location (or the entry ``name`` inside it) is a folder."""
        fs, root = self._fs()
        target = self.child(name) if name else root
        return bool(fs.exists(target) and fs.isdir(target))

    def remove(self, name: str | None = None) -> None:
        """Delete the entry ``name`` inside the location, or the whole location, with everything in it.

        For callers that own the whole location (tests, scratch stores); the engine itself removes only
        single files (:meth:`remove_file`) and empty folders (:meth:`remove_empty_dirs`).
        """
        fs, root = self._fs()
        target = self.child(name) if name else root
        if fs.exists(target):
            fs.rm(target, recursive=True)

    def remove_file(self, name: str) -> None:
        """Delete the single file ``name`` inside the location (nothing if it is gone already)."""
        fs, _ = self._fs()
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(self.child(name))

    def remove_files(self, names: list[str]) -> None:
        """Delete the files ``names`` inside the location, in that order (object stores: in batches)."""
        fs, _ = self._fs()
        paths = [self.child(n) for n in names]
        if self.is_local:
            for path in paths:
                Path(path).unlink(missing_ok=True)
        else:
            fs.rm(paths)

    def remove_empty_dirs(self, name: str | None = None) -> None:
        """Delete the folder ``name`` (or the location itself) and its sub-folders, bottom up, where empty.

        A folder that holds any file is kept, with every folder above it. On object stores, where folders
        are only prefixes of file names, there is nothing to do.
        """
        fs, root = self._fs()
        target = self.child(name) if name else root
        if not fs.exists(target) or not fs.isdir(target):
            return
        dirs = [
            target,
            *(str(p) for p, info in fs.find(target, withdirs=True, detail=True).items() if info["type"] == "directory"),
        ]
        for d in sorted(set(dirs), key=lambda p: p.count("/"), reverse=True):
            try:
                if fs.isdir(d) and not fs.ls(d, detail=False):
                    fs.rmdir(d)
            except (OSError, NotImplementedError):  # not empty after all, or folders are not objects here
                pass

    def read_bytes(self, name: str) -> bytes | None:
        """The file ``name`` inside the location, or None if there is none."""
        fs, _ = self._fs()
        try:
            with fs.open(self.child(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, name: str, data: bytes, *, exclusive: bool = False, atomic: bool = False) -> bool:
        """Write the file ``name``; with ``exclusive``, only if it does not exist (returns False if it did).

        With ``atomic``, readers see the file whole or not at all, never part of it: on a local or shared
        filesystem it is written as a temporary file beside it (:func:`temp_name`), then renamed (or,
        ``exclusive``, hard-linked) into place; object stores put an object whole anyway.
        """
        fs, _ = self._fs()
        path = self.child(name)
        fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        if atomic and self.is_local:
            tmp = Path(PurePosixPath(path).parent, temp_name(PurePosixPath(path).name))
            tmp.write_bytes(data)
            try:
                if not exclusive:
                    tmp.replace(path)
                    return True
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                except OSError:  # no hard links on this filesystem: an exclusive create in place
                    return _open_write(fs, path, data, exclusive=True)
                return True
            finally:
                tmp.unlink(missing_ok=True)
        return _open_write(fs, path, data, exclusive=exclusive)

    def open_group(self, mode: Literal["r", "r+", "a", "w", "w-"], **kwargs: Any) -> zarr.Group:
        """The zarr group here, read from its own files: a store's consolidated metadata, an index for readers
        such as xarray, lists only its data nodes (docs/design.md section 3), not the probe cache."""
        kwargs.setdefault("use_consolidated", False)
        return zarr.open_group(self.url, mode=mode, **kwargs)

    def __str__(self) -> str:
        return self.url
