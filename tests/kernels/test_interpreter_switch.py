"""Triton's interpreter is the caller's choice: importing the kernels never sets it, and CPU without it is refused.

``TRITON_INTERPRET=1`` must be in the environment before triton is first imported; the test
configuration sets it for CPU runs (``tests/conftest.py``). These checks run in fresh interpreters, with
and without it, because this test process imported triton long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cellstrata.kernels import pool_cast_triton

CHILD = r"""
import json, os, sys
before = dict(os.environ)
import torch
from cellstrata.errors import CellstrataError
from cellstrata.kernels import PoolSpec, pool_cast, resolve_backend

x, lens, spec = torch.randn(2, 5, 8), torch.tensor([5, 3]), PoolSpec(("mean", "max"))
auto = pool_cast(x, None, lens, spec, torch.float32)  # auto on CPU tensors: the torch path
res = {"auto_imported_triton": "triton" in sys.modules}
from cellstrata.kernels import pool_cast_triton as m
res["environ_unchanged"] = dict(os.environ) == before
res["interpreting"] = m.INTERPRETING
res["kernel_type"] = type(m._pool_cast_kernel).__name__
outcomes = []
for call in (
    lambda: resolve_backend(torch.device("cpu"), "triton"),
    lambda: pool_cast(x, None, lens, spec, torch.float32, backend="triton"),
    lambda: m.pool_cast_triton(x[None], None, lens, spec, torch.float32)[0],
):
    try:
        got = call()
        outcomes.append(got if isinstance(got, str) else bool(torch.equal(got, auto)))
    except CellstrataError as exc:
        outcomes.append([type(exc).__name__, str(exc)])
res["outcomes"] = outcomes
print(json.dumps(res))
"""


def child_env(interpret: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CELLSTRATA_POOL_BACKEND")}
    return {**env, "TRITON_INTERPRET": "1"} if interpret else env


def run_child(interpret: bool, cwd) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,  # the installed package, not the checkout's folders (python -c puts cwd first on sys.path)
        env=child_env(interpret),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_the_interpreter_cpu_calls_are_refused_with_what_to_do(tmp_path):
    res = run_child(interpret=False, cwd=tmp_path)
    assert not res["auto_imported_triton"]  # the torch path never imports triton
    assert res["environ_unchanged"]  # importing the kernel module wrote nothing into os.environ
    assert not res["interpreting"] and res["kernel_type"] == "JITFunction"
    for name, msg in res["outcomes"]:  # the dispatch, pool_cast and the launcher: the same one-line error
        assert name == "ConfigError"
        assert "CUDA tensors, not cpu" in msg and "CELLSTRATA_POOL_BACKEND=torch" in msg
        assert "TRITON_INTERPRET=1" in msg and "\n" not in msg


def test_with_the_interpreter_cpu_calls_run_the_kernel(tmp_path):
    res = run_child(interpret=True, cwd=tmp_path)
    assert not res["auto_imported_triton"]
    assert res["environ_unchanged"]
    assert res["interpreting"] and res["kernel_type"] == "InterpretedFunction"
    # resolve_backend says triton; pool_cast and the launcher run it (mean and max of 5 and 3 tokens: equal)
    assert res["outcomes"] == ["triton", True, True]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this session chose the compiled kernels (CUDA present)")
def test_test_session_runs_the_kernels_in_the_interpreter_on_cpu():
    """The CPU test runs interpret the kernels because the test configuration asked, not the kernel module."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert pool_cast_triton.INTERPRETING
    assert type(pool_cast_triton._pool_cast_kernel).__name__ == "InterpretedFunction"


def test_cli_on_cpu_without_the_interpreter_is_one_line(tmp_path):
    """``CELLSTRATA_POOL_BACKEND=triton`` on a CPU-only run: exit 2 and one line, before the store is created."""
    env = {**child_env(interpret=False), "CELLSTRATA_POOL_BACKEND": "triton", "CUDA_VISIBLE_DEVICES": ""}
    env["CELLSTRATA_LOG_DIR"] = str(tmp_path / "logs")
    cmd = [sys.executable, "-m", "cellstrata", "demo", "--out", str(tmp_path / "demo"), "--cells", "12"]
    proc = subprocess.run([*cmd, "--no-probe", "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("cellstrata: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "CELLSTRATA_POOL_BACKEND=torch" in errors[0] and "TRITON_INTERPRET=1" in errors[0]
    assert (tmp_path / "demo" / "demo.h5ad").is_file() and not (tmp_path / "demo" / "demo.zarr").exists()
