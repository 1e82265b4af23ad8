"""The package's import graph: ``kernels/`` is a leaf, errors have one home, no private names cross modules, no cycles.

The graph is built from the source (``ast``), not by importing: every ``import`` and ``from ... import``
of the package folders (``cellstrata/``, ``engine/`` and its subfolders, ``kernels/``, ``probes/``,
named as the installed ``cellstrata.*`` modules), module level and inside functions alike, since a
deferred import is a dependency all the same. Imports by string (``importlib.import_module`` in the
lazy registries) are not edges; importing ``a.b.c`` is an edge to ``a.b.c`` only, not to its packages.

The only cycles allowed are those within a line of :data:`NOT_YET_ACYCLIC` (issue 18 removes them); deleting
a line once its cycle is gone makes the check cover those modules too.
"""

from __future__ import annotations

import ast
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed package -> source folder (pyproject.toml's package-dir)
PACKAGE_DIRS = {
    "cellstrata": "cellstrata",
    "cellstrata.engine": "engine",  # with its subpackages: engine/models/ is cellstrata.engine.models, ...
    "cellstrata.kernels": "kernels",
    "cellstrata.probes": "probes",
}
KERNEL_DEPENDENCIES = {"torch", "triton", "numpy"}  # besides the standard library and cellstrata.errors
# modules still on an import cycle (issue 18): one line per cycle, deleted once the cycle is gone
NOT_YET_ACYCLIC: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Import:
    """One module taking something from another: ``names`` when ``from target import names``."""

    importer: str
    target: str
    names: tuple[str, ...]
    line: int
    internal: bool  # target is a module of the package (else: the top-level name of a distribution)

    def __str__(self) -> str:
        what = f"from {self.target} import {', '.join(self.names)}" if self.names else f"import {self.target}"
        return f"{self.importer} (line {self.line}): {what}"


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> source file, for every ``.py`` file of :data:`PACKAGE_DIRS` and the packages below them."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def _in_package(name: str, modules: set[str]) -> bool:
    return name == "cellstrata" or name.startswith("cellstrata.") or name in modules


def _longest_module(name: str, modules: set[str]) -> str:
    """``name`` itself or its longest prefix that is a module (``a.b.C`` -> ``a.b``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return name


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports_of(module: str, path: Path, modules: set[str]) -> list[Import]:
    """Every import in ``path`` (the module ``module``), resolved to modules of the package or distributions.

    A private attribute read through an imported module (``m._name`` after ``from . import m``) is
    recorded as ``from m import _name``: the same reach into another module's internals.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found = []
    bound: dict[str, str] = {}  # local name -> package module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                internal = _in_package(alias.name, modules)
                target = _longest_module(alias.name, modules) if internal else alias.name.partition(".")[0]
                found.append(Import(module, target, (), node.lineno, internal))
                if internal:
                    bound[alias.asname or alias.name.partition(".")[0]] = target if alias.asname else "cellstrata"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not _in_package(base, modules):
                found.append(Import(module, base.partition(".")[0], (), node.lineno, False))
                continue
            names = []
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:  # a submodule: an edge to it
                    found.append(Import(module, f"{base}.{alias.name}", (), node.lineno, True))
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
                else:
                    names.append(alias.name)
            if names:
                found.append(Import(module, _longest_module(base, modules), tuple(names), node.lineno, True))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and _is_private(node.attr)
        ):
            found.append(Import(module, bound[node.value.id], (node.attr,), node.lineno, True))
    return found


def all_imports(root: Path = ROOT) -> list[Import]:
    modules = package_modules(root)
    return [imp for name, path in modules.items() for imp in imports_of(name, path, set(modules))]


def import_graph(modules: list[str] | set[str], imports: list[Import]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, for every module of ``modules``."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.internal and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    return graph


def package_graph(root: Path = ROOT) -> dict[str, set[str]]:
    return import_graph(set(package_modules(root)), all_imports(root))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of ``graph`` with more than one module (each a cycle or several), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative (a long chain exceeds the recursion limit)
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    part = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        part.append(member)
                        if member == node:
                            break
                    if len(part) > 1:
                        found.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def private_imports(imports: list[Import]) -> list[Import]:
    """Private names taken from another module of the package (dunder names such as ``__version__`` are public)."""
    bad = []
    for imp in imports:
        private = tuple(n for n in imp.names if _is_private(n))
        if imp.internal and private and imp.target != imp.importer:
            bad.append(Import(imp.importer, imp.target, private, imp.line, True))
    return bad


# ---------------------------------------------------------------------------------------------------- the rules
def test_graph_covers_the_package():
    graph = package_graph()
    assert len(graph) > 40
    for name in ("cellstrata.errors", "cellstrata.engine.errors", "cellstrata.kernels.pool_cast"):
        assert name in graph
    # relative imports resolve to the package's modules (``from ..errors import``, ``from .spec import``)
    assert {"cellstrata.errors", "cellstrata.kernels.spec"} <= graph["cellstrata.kernels.pool_cast"]
    assert "cellstrata.kernels.pool_cast" in graph["cellstrata.kernels"]
    assert all(t in graph for targets in graph.values() for t in targets)


def test_kernels_import_only_errors_torch_triton_numpy():
    imports = [i for i in all_imports() if i.importer.startswith("cellstrata.kernels")]
    inside = {i.target for i in imports if i.internal}
    outside = {i.target for i in imports if not i.internal}
    assert "cellstrata.errors" in inside and "torch" in outside and "triton" in outside
    assert all(t == "cellstrata.errors" or t.startswith("cellstrata.kernels") for t in inside), sorted(inside)
    assert outside - KERNEL_DEPENDENCIES <= set(sys.stdlib_module_names), sorted(outside - KERNEL_DEPENDENCIES)


def test_errors_have_one_home():
    graph = package_graph()
    assert graph["cellstrata.errors"] == set()  # a leaf: every part of the package may raise these
    assert graph["cellstrata.engine.errors"] == {"cellstrata.errors"}  # the former home only re-exports
    new, old = importlib.import_module("cellstrata.errors"), importlib.import_module("cellstrata.engine.errors")
    defined = {n for n, v in vars(new).items() if isinstance(v, type) and v.__module__ == new.__name__}
    assert {"CellstrataError", "ConfigError", "ProbeError", "IncompleteStoreWarning"} <= defined
    assert set(old.__all__) == defined
    assert all(getattr(old, n) is getattr(new, n) for n in defined)  # the same classes: except clauses match
    assert not [n for n, v in vars(old).items() if isinstance(v, type) and v.__module__ == old.__name__]


def test_kernel_names_keep_their_import_paths():
    """The split keeps every name other code imports, at its former path (the benchmarks' imports included)."""
    kernels = importlib.import_module("cellstrata.kernels")
    dispatch = importlib.import_module("cellstrata.kernels.pool_cast")
    spec = importlib.import_module("cellstrata.kernels.spec")
    reference = importlib.import_module("cellstrata.kernels.reference")
    triton_module = importlib.import_module("cellstrata.kernels.pool_cast_triton")
    assert kernels.pool_cast is dispatch.pool_cast  # the package attribute is the function, not the module
    for name in ("PoolSpec", "FLOAT16_MAX", "OUT_DTYPES"):
        assert getattr(kernels, name) is getattr(dispatch, name) is getattr(spec, name)
    assert kernels.pool_cast_torch is dispatch.pool_cast_torch is reference.pool_cast_torch
    for name in ("BACKEND_ENV", "resolve_backend", "pool_cast_layers", "triton_installed"):
        assert getattr(dispatch, name) is not None
    assert kernels.resolve_backend is dispatch.resolve_backend and kernels.pool_cast_layers is dispatch.pool_cast_layers
    for name in ("pool_cast_triton", "auto_segments", "block_sizes", "segment_count", "INTERPRETING"):
        assert hasattr(triton_module, name), name
    assert triton_module.PoolSpec is spec.PoolSpec


def test_no_private_names_across_modules():
    bad = private_imports(all_imports())
    assert not bad, "\n".join(map(str, bad))


def test_no_import_cycles():
    """Every cycle lies within a line of NOT_YET_ACYCLIC: no new one, and none through a module outside them."""
    graph = package_graph()
    listed = {m for line in NOT_YET_ACYCLIC for m in line}
    assert listed <= set(graph), sorted(listed - set(graph))
    new = [part for part in cycles(graph) if not any(set(part) <= set(line) for line in NOT_YET_ACYCLIC)]
    assert not new, new


def test_the_checks_find_a_planted_cycle_and_private_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}, "f": {"g"}, "g": {"f"}}
    assert cycles(graph) == [["a", "b", "c"], ["f", "g"]]
    assert cycles({m: t - {"c", "f"} for m, t in graph.items() if m not in ("c", "f")}) == []
    chain = {f"m{i}": {f"m{i + 1}"} for i in range(5000)} | {"m5000": {"m0"}}
    assert len(cycles(chain)) == 1 and len(cycles(chain)[0]) == 5001
    for folder in PACKAGE_DIRS.values():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "kernels" / "spec.py").write_text("from ..engine.store import _create, Store\nimport numpy\n")
    (tmp_path / "engine" / "store.py").write_text("from .. import kernels\nfrom ..kernels import spec as s\ns._x\n")
    imports = all_imports(tmp_path)
    graph = package_graph(tmp_path)
    assert graph["cellstrata.kernels.spec"] == {"cellstrata.engine.store"}
    assert graph["cellstrata.engine.store"] == {"cellstrata.kernels", "cellstrata.kernels.spec"}
    assert cycles(graph) == [["cellstrata.engine.store", "cellstrata.kernels.spec"]]
    assert [str(i) for i in private_imports(imports)] == [
        "cellstrata.engine.store (line 3): from cellstrata.kernels.spec import _x",
        "cellstrata.kernels.spec (line 1): from cellstrata.engine.store import _create",
    ]


def test_every_source_package_is_installed():
    """``pyproject.toml`` lists every package folder, so a non-editable install carries all of them."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in package_modules().items() if path.name == "__init__.py"}
    assert found == listed, f"only in the tree: {sorted(found - listed)}; only in pyproject: {sorted(listed - found)}"
