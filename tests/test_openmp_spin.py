"""The ``cellstrata`` command lets torch's idle CPU threads sleep soon, unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cellstrata.cli import GOMP_SPINCOUNT, short_openmp_spin

SCRIPT = (
    "import os, sys\n"
    "from cellstrata.cli import main\n"
    "sys.argv = ['cellstrata', 'info', sys.argv[1]]\n"
    "rc = main()\n"
    "print(rc, os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)\n"
)


def test_setdefault_keeps_a_users_choice() -> None:
    env: dict[str, str] = {}
    short_openmp_spin(env)
    assert env == {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    env = {"GOMP_SPINCOUNT": "77"}
    short_openmp_spin(env)
    assert env == {"GOMP_SPINCOUNT": "77"}


@pytest.mark.parametrize(("given", "want"), [(None, GOMP_SPINCOUNT), ("77", "77")])
def test_the_command_sets_it_before_torch_loads(tmp_path, given, want) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    env["CELLSTRATA_LOG_DIR"] = str(tmp_path)
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "missing.zarr")], capture_output=True, text=True, env=env
    )
    rc, value, _ = res.stdout.split()
    assert rc == "2" and value == want, res.stdout + res.stderr
