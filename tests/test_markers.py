"""The fast subset keeps its promise: ``pytest -m "not slow"`` still runs what catches a broken family or core path.

The selection is collected in a subprocess (as a user runs it), by a small plugin that prints each collected
test's node id and whether it carries the ``slow`` mark, so one collection gives both sides of the split.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cellstrata.engine.models import family_names

ROOT = Path(__file__).resolve().parents[1]

# Files whose fast tests the daily subset must keep: every family's parity file, the store, extraction, probes.
CORE = (
    "tests/engine/test_store.py",
    "tests/engine/test_extract.py",
    "tests/probes/test_runner.py",
    "tests/probes/test_probe_cli.py",
)

_COLLECT = """
import json, sys
import pytest

class Record:
    def __init__(self):
        self.items = []

    def pytest_collection_finish(self, session):
        self.items = [(item.nodeid, item.get_closest_marker("slow") is not None) for item in session.items]

record = Record()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[record])
print("\\nCOLLECTED " + json.dumps(record.items))
sys.exit(int(code))
"""


def parity_file(family: str) -> str:
    return f"tests/engine/test_{family.replace('-', '_')}_parity.py"


@pytest.fixture(scope="module")
def split() -> dict[str, bool]:
    """Node id -> carries ``slow``, for the parity files, the core files and a file made of slow tests only."""
    files = [parity_file(f) for f in family_names()] + [*CORE, "tests/engine/test_crash_consistency.py"]
    res = subprocess.run([sys.executable, "-c", _COLLECT, *files], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("COLLECTED "))
    return dict(json.loads(line.removeprefix("COLLECTED ")))


def test_slow_and_gpu_markers_are_declared(pytestconfig):
    declared = {line.split(":", 1)[0].strip() for line in pytestconfig.getini("markers")}
    assert {"slow", "gpu"} <= declared


def test_fast_subset_has_a_parity_test_of_every_layer_for_each_family(split):
    fast = [nodeid for nodeid, slow in split.items() if not slow]
    assert fast
    for family in family_names():
        mine = [n for n in fast if n.startswith(parity_file(family) + "::")]
        assert any("every_layer" in n for n in mine), f"{family}: no fast every-layer parity test in {mine}"


@pytest.mark.parametrize("path", CORE)
def test_fast_subset_keeps_the_core_store_extract_and_probe_tests(split, path):
    assert any(n.startswith(path + "::") and not slow for n, slow in split.items()), f"{path} has no fast test"


def test_the_slow_tests_are_left_out_of_the_fast_subset(split):
    crash = [n for n in split if n.startswith("tests/engine/test_crash_consistency.py::")]
    assert crash and all(split[n] for n in crash)
    assert 0 < sum(split.values()) < len(split)
