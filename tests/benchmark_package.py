"""The package ``benchmarks`` for the tests, imported from its folder.

conftest.py takes the repository root off ``sys.path`` (its ``kernels/`` would shadow a Hugging Face package),
so ``import benchmarks`` cannot find the folder there; nothing here puts it back.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "benchmarks"


def package() -> ModuleType:
    """``benchmarks`` (benchmarks/__init__.py), loaded once from the checkout."""
    found = sys.modules.get("benchmarks")
    if found is not None and Path(found.__file__ or "").resolve().parent == FOLDER:
        return found
    spec = importlib.util.spec_from_file_location(
        "benchmarks", FOLDER / "__init__.py", submodule_search_locations=[str(FOLDER)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)
    return module


def benchmark(name: str) -> ModuleType:
    """The module ``benchmarks.NAME`` (``throughput``, ``harness``, ``common``, ...)."""
    package()
    return importlib.import_module(f"benchmarks.{name}")
