"""The documentation points only at files the repository has, and the design's module map is complete.

(a) every repository path that README.md or docs/design.md cites in backticks exists;
(b) README.md points at the design as ``docs/design.md``, never at a top-level ``DESIGN.md``;
(c) every module of the package folders and of benchmarks/ has its line in docs/design.md's module map.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/design.md")
PREFIXES = ("cellstrata/", "engine/", "kernels/", "probes/", "benchmarks/", "tests/", "docs/", ".ci/")
MODULE_DIRS = ("cellstrata", "engine", "engine/models", "kernels", "probes", "benchmarks")

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_SPAN = re.compile(r"`([^`\n]+)`")
_BRACES = re.compile(r"\{([^{}]*,[^{}]*)\}")
_PLACEHOLDER = re.compile(r"<[^<>/]*>")


def _text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def cited_paths(text: str) -> list[str]:
    """Repository paths cited in inline backticks (fenced blocks skipped): each word of a span that starts
    with one of :data:`PREFIXES` and contains a ``/`` or ends with ``.py`` / ``.md``."""
    found = []
    for span in _SPAN.findall(_FENCE.sub("", text)):
        for word in span.split():
            word = word.rstrip(".,;:)")
            if word.startswith(PREFIXES) and ("/" in word or word.endswith((".py", ".md"))):
                found.append(word)
    return found


def _expand(path: str) -> list[str]:
    """``a.{json,md}`` -> ``a.json``, ``a.md``; ``<name>`` placeholders become ``*``."""
    match = _BRACES.search(path)
    if match is None:
        return [_PLACEHOLDER.sub("*", path)]
    head, tail = path[: match.start()], path[match.end() :]
    return list(itertools.chain.from_iterable(_expand(head + alt + tail) for alt in match.group(1).split(",")))


def _exists(pattern: str) -> bool:
    pattern = pattern.rstrip("/")
    if "*" in pattern:
        return any(ROOT.glob(pattern))
    return (ROOT / pattern).exists()


@pytest.mark.parametrize("doc", DOCS)
def test_cited_paths_exist(doc):
    assert (ROOT / doc).is_file(), f"{doc} is missing"
    paths = cited_paths(_text(doc))
    missing = sorted({p for p in paths if not all(_exists(x) for x in _expand(p))})
    assert not missing, f"{doc} cites paths the repository lacks: {', '.join(missing)}"


def test_cited_paths_parser():
    text = "see `engine/run.py`, `python benchmarks/throughput.py --quick` and `pooled/<name>`\n```\n`tests/x`\n```\n"
    assert cited_paths(text) == ["engine/run.py", "benchmarks/throughput.py"]
    assert _expand("results/a-{cpu,h100}.md") == ["results/a-cpu.md", "results/a-h100.md"]
    assert _expand("engine/models/<family>.py") == ["engine/models/*.py"]
    assert not _exists("engine/no_such_module.py")


def test_readme_points_at_docs_design():
    readme = _text("README.md")
    stray = [
        f"line {readme.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for m in re.finditer(r"(?<!docs/)\bDESIGN\.md\b", readme, re.I)
    ]
    assert not stray, "README.md cites a DESIGN.md the repository lacks (cite docs/design.md): " + "; ".join(stray)
    assert "docs/design.md" in readme, "README.md should point at the design, docs/design.md"


def _modules() -> list[str]:
    """The tracked modules of :data:`MODULE_DIRS` (files on disk where this is not a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--", *(f"{d}/*.py" for d in MODULE_DIRS)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = [str(p.relative_to(ROOT)) for d in MODULE_DIRS for p in (ROOT / d).glob("*.py")]
    return sorted(p for p in out if str(Path(p).parent) in MODULE_DIRS)


def test_design_module_map_is_complete():
    design = _text("docs/design.md")
    modules = _modules()
    assert modules, "no modules found"
    missing = [m for m in modules if f"`{m}`" not in design]
    assert not missing, f"docs/design.md's module map lacks a line for: {', '.join(missing)}"
