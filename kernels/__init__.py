"""Per-layer pooling + cast (torch reference now; the compiled Triton path plugs in behind ``pool_cast``)."""

from __future__ import annotations

from .pool_cast import FLOAT16_MAX, OUT_DTYPES, PoolSpec, pool_cast, pool_cast_torch

__all__ = ["FLOAT16_MAX", "OUT_DTYPES", "PoolSpec", "pool_cast", "pool_cast_torch"]
