"""A copy of the store's metadata, from which ``cellstrata info --verify --repair`` restores a damaged ``zarr.json``.

The small zarr group ``metadata_backup/`` holds, in its attributes, the store's root metadata (the group's
``zarr.json``, its ``cellstrata`` attribute included) and the ``zarr.json`` of every other node (``pooled``,
each pooling's array, ``obs_names``, ``n_tokens``, ``truncated``, ``done``, ``checksum`` and, from format 2 on,
the coordinates ``cell``, ``pooled/cell``, ``pooled/layer``, ``pooled/depth``). It is written when
the store is created and again whenever the ``cellstrata`` attribute changes (:func:`engine.store.update_attrs`:
each run's end, ``--repair``), in one put of one file: atomic on a local filesystem (zarr writes a temporary file
and renames it) and on object stores. When the backup is rewritten, a node whose ``zarr.json`` no longer parses
keeps its earlier copy, so a damaged file is never copied over a good one.

:func:`metadata_damage` lists the nodes whose ``zarr.json`` is missing, empty or not JSON (the root also when it
lacks the ``cellstrata`` attribute), and whether the backup can restore each; :func:`restore_metadata` writes
the copies back, only over those files. Being a zarr group, the backup does not disturb zarr or xarray readers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage._common import StorePath, make_store_path

BACKUP_NODE = "metadata_backup"
BACKUP_KEY = "cellstrata_metadata_backup"
BACKUP_VERSION = 1
ROOT = ""  # the root node's path
ATTR_KEY = "cellstrata"  # engine.store.ATTR_KEY (store.py imports this module)


@dataclass(frozen=True)
class MetadataDamage:
    """A node whose ``zarr.json`` cannot be used: ``node`` ('' for the root), why, and whether a copy exists."""

    node: str
    reason: str
    restorable: bool

    @property
    def file(self) -> str:
        return f"{self.node}/zarr.json" if self.node else "zarr.json"

    def describe(self) -> str:
        what = "the store's root metadata" if not self.node else self.node
        return f"{self.file} ({what}) is {self.reason}"


def store_path(url: str | os.PathLike[str], *, writable: bool = False) -> StorePath:
    """The zarr store at ``url`` (a local path or a URL), without reading any of its metadata."""
    return sync(make_store_path(os.fspath(url), mode="r+" if writable else "r"))


def read_json(root: StorePath, node: str) -> tuple[dict[str, Any] | None, str]:
    """``node``'s parsed ``zarr.json`` (None if unusable) and, if unusable, why: missing, empty, not JSON."""
    key = f"{node}/zarr.json" if node else "zarr.json"
    try:
        buf = sync((root / key).get(prototype=default_buffer_prototype()))
    except Exception as err:  # an unreadable file: permissions, I/O
        return None, f"unreadable ({type(err).__name__}: {err})"
    if buf is None:
        return None, "missing"
    data = buf.to_bytes()
    if not data.strip():
        return None, f"empty ({len(data)} bytes)"
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, ValueError) as err:
        return None, f"truncated or not JSON ({len(data)} bytes; {type(err).__name__}: {err})"
    if not isinstance(meta, dict) or "node_type" not in meta:
        return None, f"not zarr metadata ({len(data)} bytes)"
    return meta, ""


def write_json(root: StorePath, key: str, meta: dict[str, Any]) -> None:
    """Write ``meta`` as the file ``key`` in one put (a temporary file renamed into place on a local disk)."""
    data = json.dumps(meta, indent=2).encode()
    sync((root / key).set(default_buffer_prototype().buffer.from_bytes(data)))


def expected_nodes(attrs: dict[str, Any], *, checksums: bool = True) -> list[str]:
    """The store's nodes besides the root (docs/design.md section 3), from its ``cellstrata`` attribute:
    from format 2 on, the coordinates ``cell``, ``pooled/cell``, ``pooled/layer`` and ``pooled/depth`` too."""
    nodes = ["pooled", *(f"pooled/{name}" for name in attrs.get("poolings", []))]
    if int(attrs.get("format_version", 1)) >= 2:
        nodes += ["pooled/cell", "pooled/layer", "pooled/depth", "cell"]
    nodes += ["obs_names", "n_tokens", "truncated", "done"]
    return [*nodes, "checksum"] if checksums else nodes


def load_backup(root: StorePath) -> dict[str, Any] | None:
    """The backup (``{"root": metadata, "nodes": {path: metadata}}``), or None if there is none or it is damaged."""
    meta, _ = read_json(root, BACKUP_NODE)
    backup = (meta or {}).get("attributes", {}).get(BACKUP_KEY)
    if not isinstance(backup, dict) or not isinstance(backup.get("root"), dict):
        return None
    if not isinstance(backup["root"].get("attributes", {}).get(ATTR_KEY), dict):
        return None
    if not isinstance(backup.get("nodes"), dict):
        return None
    return backup


def write_backup(group: zarr.Group) -> None:
    """Write (or refresh) ``metadata_backup/`` from the store's current metadata.

    Nodes whose ``zarr.json`` does not parse keep the copy the backup already had; the root is copied only
    when it carries the ``cellstrata`` attribute.
    """
    root = group.store_path
    old = load_backup(root) or {"root": None, "nodes": {}}
    meta, _ = read_json(root, ROOT)
    attrs = (meta or {}).get("attributes", {}).get(ATTR_KEY)
    root_copy = meta if isinstance(attrs, dict) else old["root"]
    if root_copy is None:
        return  # nothing to keep a copy of yet
    nodes = dict(old["nodes"])
    members = expected_nodes(root_copy["attributes"][ATTR_KEY])
    for node in members:
        copy, _ = read_json(root, node)
        if copy is not None:
            nodes[node] = copy
    backup = {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {BACKUP_KEY: {"version": BACKUP_VERSION, "root": root_copy, "nodes": nodes}},
    }
    write_json(root, f"{BACKUP_NODE}/zarr.json", backup)


def metadata_damage(root: StorePath) -> tuple[list[MetadataDamage], dict[str, Any] | None]:
    """Nodes whose ``zarr.json`` is unusable, and the store's ``cellstrata`` attribute (from the backup if need be).

    The attribute is None when neither the root nor a backup has it. A root that parses but lacks the attribute
    counts as damaged only when a backup exists (else the folder is not known to be a cellstrata store).
    """
    backup = load_backup(root)
    damage: list[MetadataDamage] = []
    meta, why = read_json(root, ROOT)
    attrs = (meta or {}).get("attributes", {}).get(ATTR_KEY)
    if not isinstance(attrs, dict):
        attrs = None
        if meta is not None:
            why = f"without its '{ATTR_KEY}' attribute"
        if meta is None or backup is not None:
            damage.append(MetadataDamage(ROOT, why, backup is not None))
        if backup is not None:
            attrs = backup["root"]["attributes"][ATTR_KEY]
    if attrs is None:
        return damage, None
    copies = backup["nodes"] if backup else {}
    for node in expected_nodes(attrs, checksums=True):
        meta, why = read_json(root, node)
        if meta is not None:
            continue
        if node == "checksum" and why == "missing" and node not in copies:
            continue  # written before checksums existed
        damage.append(MetadataDamage(node, why, node in copies))
    return damage, attrs


def restore_metadata(root: StorePath, damage: list[MetadataDamage]) -> list[MetadataDamage]:
    """Write the backup's copy over each restorable damaged ``zarr.json``; returns the nodes restored."""
    backup = load_backup(root)
    if backup is None:
        return []
    restored = []
    for d in damage:
        if not d.restorable:
            continue
        meta, _ = read_json(root, d.node)  # never write over a file that has become readable since
        if meta is not None and (d.node or isinstance(meta.get("attributes", {}).get(ATTR_KEY), dict)):
            continue
        copy = backup["root"] if d.node == ROOT else backup["nodes"].get(d.node)
        if copy is None:
            continue
        write_json(root, f"{d.node}/zarr.json" if d.node else "zarr.json", copy)
        restored.append(d)
    return restored


def metadata_problem(path: str | os.PathLike[str]) -> str | None:
    """One line on a store whose ``zarr.json`` files are damaged (what, and what to do), or None.

    None also when the folder is not known to be a cellstrata store (no readable root attribute, no backup).
    Cheap: reads the small metadata files only. Used where a damaged store is opened (``info``, ``extract``).
    """
    url = os.fspath(path)
    try:
        damage, attrs = metadata_damage(store_path(url))
    except Exception:
        return None
    if attrs is None:
        damage = [d for d in damage if d.reason != "missing"]  # a folder without zarr.json is not a store
    if not damage:
        return None
    what = "; ".join(d.describe() for d in damage[:3]) + (f" (and {len(damage) - 3} more)" if len(damage) > 3 else "")
    if all(d.restorable for d in damage):
        todo = f"run `cellstrata info {url} --verify --repair` to restore it from {BACKUP_NODE}/, then the same command"
    else:
        todo = (
            "no backup of it exists (a store written before metadata backups): extract again into a new --out, "
            "or put back the file from a copy of the store"
        )
    return f"{url} is damaged: {what}; {todo}"
