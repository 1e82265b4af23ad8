"""Run the Triton kernels through the interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before triton is first imported, so this happens here, before any
test module is collected. On a machine with CUDA the kernels run compiled on the GPU instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (``-n N``) each worker takes its share of the cores, so N workers do not each start a
# thread per core for torch and BLAS; a serial run keeps the defaults.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max((os.cpu_count() or 1) // _XDIST_WORKERS, 1) if _XDIST_WORKERS > 1 else None
if _THREADS is not None:
    torch.set_num_threads(_THREADS)

# The repository root holds the source folder ``kernels/`` (installed as ``cellstrata.kernels``).
# ``python -m pytest`` puts the root on sys.path, where ``kernels`` would shadow the Hugging Face
# package of that name that ``transformers`` probes for; the tests import the installed package only.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]


@pytest.fixture(autouse=True, scope="session")
def _blas_share():
    """BLAS thread pools limited to the worker's share of the cores under pytest-xdist (no limit when serial)."""
    if _THREADS is None:
        yield
        return
    with threadpool_limits(limits=_THREADS):
        yield


@pytest.fixture(autouse=True, scope="session")
def _command_logs(tmp_path_factory):
    """Error logs of the ``cellstrata`` command go under the session's temp folder, not the user's state folder."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CELLSTRATA_LOG_DIR", str(tmp_path_factory.mktemp("cellstrata-logs")))
    yield
    patch.undo()
