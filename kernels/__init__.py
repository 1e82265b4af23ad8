"""Per-layer pooling + cast: the fused Triton kernel (CUDA, or the interpreter in tests) and its torch path."""

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
