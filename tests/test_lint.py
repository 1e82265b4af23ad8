"""The code base stays ruff clean and ruff formatted; one version source, named in the CHANGELOG."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    beside = Path(sys.executable).parent / "ruff"
    ruff = str(beside) if beside.exists() else shutil.which("ruff")
    assert ruff, "ruff is part of the test extras; install them with the README's test command"
    return ruff


def test_ruff_clean():
    res = subprocess.run([_ruff(), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_formatted():
    res = subprocess.run([_ruff(), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, "run `ruff format .`:\n" + res.stdout + res.stderr


def test_one_version_source_and_its_changelog_entry():
    import cellstrata
    from cellstrata.engine.plan import ENGINE_VERSION

    assert "dynamic" in (ROOT / "pyproject.toml").read_text() and cellstrata.__version__ == ENGINE_VERSION
    head = re.search(r"^## \[?(\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert head and head.group(1) == cellstrata.__version__, "add the version's entry at the top of CHANGELOG.md"


def test_no_script_shadows_a_standard_library_module():
    """A folder on sys.path puts its modules ahead of the standard library's, and spawned Dask workers inherit
    that path: a ``benchmarks/tokenize.py`` once replaced the standard library's ``tokenize`` in every local
    worker. ``python benchmarks/NAME.py`` still puts benchmarks/ first, so its module names are checked too."""
    for folder in ("benchmarks", "docs/examples", "tests"):
        names = {p.stem for p in (ROOT / folder).rglob("*.py")}
        assert not names & set(sys.stdlib_module_names), (
            f"{folder}: rename {sorted(names & set(sys.stdlib_module_names))}"
        )


def test_no_benchmark_changes_sys_path():
    """The benchmarks are a package run as ``python -m benchmarks.NAME``: none puts a folder (benchmarks/ itself
    least of all) on sys.path, where its module names would shadow others in every process that inherits it."""
    pattern = re.compile(r"\bsys\.path\b")
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sorted((ROOT / "benchmarks").rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line.split("#", 1)[0])
    ]
    assert not found, f"sys.path used in {', '.join(found)}: import the package's modules relatively"
