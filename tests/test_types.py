"""The package type-checks: ``mypy -p cellstrata`` with the ``[tool.mypy]`` settings of pyproject.toml is clean.

The source folders are mapped onto the package (pyproject's ``package-dir``: ``engine/`` is
``cellstrata.engine`` and so on), which mypy cannot follow through setuptools' editable finder; the test
checks a tree of symlinks laid out as the installed package instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("engine", "kernels", "probes")  # cellstrata.<name> lives in <name>/


def package_tree(dest: Path) -> Path:
    """``dest/cellstrata``: symlinks to ``cellstrata/*.py`` and to the subpackage folders; returns ``dest``."""
    pkg = dest / "cellstrata"
    pkg.mkdir(parents=True)
    for module in sorted((ROOT / "cellstrata").glob("*.py")):
        (pkg / module.name).symlink_to(module)
    for name in SUBPACKAGES:
        (pkg / name).symlink_to(ROOT / name, target_is_directory=True)
    return dest


def test_mypy_clean(tmp_path):
    tree = package_tree(tmp_path / "tree")
    cmd = [sys.executable, "-m", "mypy", "-p", "cellstrata", "--config-file", str(ROOT / "pyproject.toml")]
    cmd += ["--cache-dir", str(tmp_path / "mypy_cache")]
    res = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    assert "No module named mypy" not in res.stderr, "mypy is part of the test extras; install them"
    assert res.returncode == 0, res.stdout + res.stderr
