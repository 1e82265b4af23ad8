"""Pool every requested reduction of one layer and cast once, into a preallocated buffer: which path runs.

``pool_cast(hidden, starts, lengths, spec, out_dtype, out=...)`` reduces each cell's token segment
of ``hidden`` to every op of ``spec`` and writes ``out[p, b, :]`` in ``out_dtype``, accumulating in
float32. Segments describe both layouts:

- padded ``[B, S, H]``: ``starts = b * S`` (pass ``starts=None`` for exactly that, without building
  it), ``lengths`` = real tokens of row ``b``;
- packed ``[T, H]``: ``starts = cu_seqlens[:-1]``, ``lengths = diff(cu_seqlens)``.

Ops (``PoolSpec.ops``, :mod:`.spec`):

- ``mean`` / ``max`` / ``sum``: over the gene span ``[start + n_leading, start + length - n_trailing)``;
  an empty gene span gives NaN (never a value taken from padding);
- ``first``: the token at ``start`` (a CLS token); ``first_l2``: the same, L2-normalised;
- ``from_end:k``: the token at ``start + length - k`` (scFoundation's S is ``from_end:1``, T is
  ``from_end:2``); NaN when the cell has fewer than ``k`` tokens, so never a padded position.

``pool_cast_layers`` does the same for several layers stacked on a leading axis (``[L, T, H]`` or
``[L, B, S, H]`` into ``out[L, P, B, H]``), in one launch on the Triton backend.

Backends: ``triton`` (the fused kernels of :mod:`.pool_cast_triton`, imported on first use; CUDA, or
Triton's interpreter on CPU when ``TRITON_INTERPRET=1`` was set before triton was imported) and
``torch`` (:mod:`.reference`: the CPU path and the reference of the kernels). ``auto`` picks Triton for
CUDA tensors when Triton is installed, else torch; ``CELLSTRATA_POOL_BACKEND`` or the ``backend=``
argument forces one. Values that are finite in float32 but become inf in float16 are counted into
``overflow`` (one counter per layer and op) so the caller can report them.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

from ..errors import ConfigError
from .reference import pool_cast_layers_torch, pool_cast_torch
from .spec import FLOAT16_MAX, OUT_DTYPES, PoolSpec, check_args

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "CELLSTRATA_POOL_BACKEND"

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "FLOAT16_MAX",
    "OUT_DTYPES",
    "PoolSpec",
    "pool_cast",
    "pool_cast_layers",
    "pool_cast_torch",
    "resolve_backend",
    "triton_installed",
]


@cache
def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """``torch`` or ``triton`` for tensors on ``device`` (argument, then ``CELLSTRATA_POOL_BACKEND``, then auto).

    ``triton`` forced for tensors off CUDA is refused here, before any work, unless Triton runs in its
    interpreter (:func:`~cellstrata.kernels.pool_cast_triton.require_runnable`).
    """
    choice = backend or os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if choice not in BACKENDS:
        msg = f"{BACKEND_ENV}={choice!r} is not a pooling backend; use one of {', '.join(BACKENDS)}"
        raise ConfigError(msg)
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if choice == "triton" and not triton_installed():
        msg = "the triton pooling backend needs the triton package: pip install 'cellstrata[gpu]'"
        raise ConfigError(msg)
    if choice == "triton" and device.type != "cuda":
        from .pool_cast_triton import require_runnable

        require_runnable(device)
    return choice


def pool_cast_layers(
    hidden: torch.Tensor,
    starts: torch.Tensor | None,
    lengths: torch.Tensor,
    spec: PoolSpec,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    overflow: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Pool ``L`` stacked layers into ``out[L, P, B, H]`` (one launch on the Triton backend).

    ``max_len`` (optional host bound on ``lengths``) lets the Triton backend split long cells; ignored by torch.
    """
    if resolve_backend(hidden.device, backend) == "triton":
        from .pool_cast_triton import pool_cast_triton

        return pool_cast_triton(hidden, starts, lengths, spec, out_dtype, out=out, overflow=overflow, max_len=max_len)
    return pool_cast_layers_torch(hidden, starts, lengths, spec, out_dtype, out=out, overflow=overflow)


def pool_cast(
    hidden: torch.Tensor,
    starts: torch.Tensor | None,
    lengths: torch.Tensor,
    spec: PoolSpec,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    overflow: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Pool one layer into ``out[P, B, H]`` (see the module docstring); returns ``out``.

    ``max_len``: an optional host-side bound on ``lengths`` (the longest cell) that lets the Triton
    backend split long cells over several programs (default: ``S`` when padded; packed: no split);
    the torch backend ignores it.
    """
    if resolve_backend(hidden.device, backend) == "triton":
        from .pool_cast_triton import pool_cast_triton

        shape = check_args(hidden, starts, lengths, spec, out_dtype, out, overflow, layered=False)
        if out is None:
            out = torch.empty(shape, dtype=out_dtype, device=hidden.device)
        ovf = overflow.unsqueeze(0) if overflow is not None else None
        pool_cast_triton(
            hidden.unsqueeze(0), starts, lengths, spec, out_dtype, out=out.unsqueeze(0), overflow=ovf, max_len=max_len
        )
        return out
    return pool_cast_torch(hidden, starts, lengths, spec, out_dtype, out=out, overflow=overflow)
