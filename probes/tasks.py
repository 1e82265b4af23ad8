"""The task registry: names -> task classes, and building tasks from column names and ``KEY=VALUE`` settings."""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from ..engine.errors import ProbeError
from .base import Task

TASKS: dict[str, tuple[str, str]] = {
    "cell_type": ("celltype", "CellTypeTask"),
    "knn_transfer": ("clustering", "KnnTransferTask"),
    "clustering": ("clustering", "ClusteringTask"),
    "trajectory": ("trajectory", "TrajectoryTask"),
    "perturbation": ("perturbation", "PerturbationTask"),
}


def task_names() -> list[str]:
    return list(TASKS)


def task_class(name: str) -> type[Task]:
    """The task class registered as ``name``."""
    key = name.strip().lower().replace("-", "_")
    if key not in TASKS:
        raise ProbeError(f"unknown probe task {name!r}; choose from {', '.join(TASKS)}")
    module, attr = TASKS[key]
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


def make_task(name: str, shared: Mapping[str, Any] | None = None, settings: Mapping[str, Any] | None = None) -> Task:
    """Build task ``name``: ``shared`` values go to the fields it has (e.g. ``context_key``, ``seed``),
    ``settings`` must all be its fields (strings are converted to the field's type)."""
    cls = task_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in (shared or {}).items():
        if key in fields and value is not None:
            kwargs[key] = _convert(value, hints[key], f"{cls.name}.{key}")
    for key, value in (settings or {}).items():
        if key not in fields:
            msg = f"task {cls.name} has no setting {key!r}; it has: {', '.join(fields)}"
            raise ProbeError(msg)
        kwargs[key] = _convert(value, hints[key], f"{cls.name}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        missing = [f.name for f in fields.values() if f.default is dataclasses.MISSING and f.name not in kwargs]
        if missing:
            opts = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise ProbeError(f"task {cls.name} needs {', '.join(missing)} (pass {opts})") from None
        raise ProbeError(f"task {cls.name}: {err}") from None


def parse_settings(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["cell_type.C=0.5", "trajectory.n_neighbors=15"]`` -> ``{task: {field: "value"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        task, dot, field = key.partition(".")
        if not sep or not dot or not task or not field:
            raise ProbeError(f"expected TASK.SETTING=VALUE (e.g. cell_type.C=0.5), got {item!r}")
        out.setdefault(task.strip().replace("-", "_"), {})[field.strip().replace("-", "_")] = value.strip()
    return out


def _convert(value: Any, hint: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = origin in (typing.Union, types.UnionType) and len(typing.get_args(hint)) > len(args)
    if optional and value.lower() in ("none", "null", ""):
        return None
    target = args[0] if optional and args else hint
    try:
        if target is bool:
            if value.lower() in ("1", "true", "yes", "t"):
                return True
            if value.lower() in ("0", "false", "no", "f"):
                return False
            raise ValueError(value)
        if target in (int, float, str):
            return target(value)
        if typing.get_origin(target) is tuple:
            inner = typing.get_args(target)[0]
            return tuple(inner(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ProbeError(f"{where}: cannot read {value!r} as {getattr(target, '__name__', target)}") from None
    return value
