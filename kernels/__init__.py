"""Per-layer pooling + cast: the fused Triton kernels (CUDA, or the interpreter in tests) and their torch path.

A leaf package: it imports nothing of cellstrata but :mod:`cellstrata.errors` (``tests/test_import_graph.py``).
:mod:`.spec` (what a call asks for, the checks), :mod:`.reference` (the torch path), :mod:`.pool_cast_triton`
(the Triton kernels and their launcher, imported on first use), :mod:`.pool_cast` (which path runs).
"""

from __future__ import annotations

from .pool_cast import (
    BACKEND_ENV,
    FLOAT16_MAX,
    OUT_DTYPES,
    PoolSpec,
    pool_cast,
    pool_cast_layers,
    pool_cast_torch,
    resolve_backend,
)

__all__ = [
    "BACKEND_ENV",
    "FLOAT16_MAX",
    "OUT_DTYPES",
    "PoolSpec",
    "pool_cast",
    "pool_cast_layers",
    "pool_cast_torch",
    "resolve_backend",
]
