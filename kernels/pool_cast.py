"""Pool every requested reduction of one layer and cast once, into a preallocated buffer.

``pool_cast(hidden, starts, lengths, spec, out_dtype, out=...)`` reduces each cell's token segment
of ``hidden`` to every op of ``spec`` and writes ``out[p, b, :]`` in ``out_dtype``, accumulating in
float32. Segments describe both layouts:

- padded ``[B, S, H]``: ``starts = b * S`` (pass ``starts=None`` for exactly that, without building
  it), ``lengths`` = real tokens of row ``b``;
- packed ``[T, H]``: ``starts = cu_seqlens[:-1]``, ``lengths = diff(cu_seqlens)``.

Ops (``PoolSpec.ops``):

- ``mean`` / ``max`` / ``sum``: over the gene span ``[start + n_leading, start + length - n_trailing)``;
  an empty gene span gives NaN (never a value taken from padding);
- ``first``: the token at ``start`` (a CLS token); ``first_l2``: the same, L2-normalised;
- ``from_end:k``: the token at ``start + length - k`` (scFoundation's S is ``from_end:1``, T is
  ``from_end:2``); NaN when the cell has fewer than ``k`` tokens, so never a padded position.

``pool_cast_layers`` does the same for several layers stacked on a leading axis (``[L, T, H]`` or
``[L, B, S, H]`` into ``out[L, P, B, H]``), in one launch on the Triton backend.

Backends: ``triton`` (the fused kernel of :mod:`.pool_cast_triton`; CUDA, or the Triton interpreter on
CPU) and ``torch`` (this module: the vectorised CPU path and the reference for the kernel). ``auto``
picks Triton for CUDA tensors when Triton is installed, else torch; ``CELLSTRATA_POOL_BACKEND`` or the
``backend=`` argument forces one. Values that are finite in float32 but become inf in float16 are
counted into ``overflow`` (one counter per layer and op) so the caller can report them.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
from dataclasses import dataclass
from functools import cache

import torch

from ..engine.errors import ConfigError

FLOAT16_MAX = 65504.0
_FROM_END = re.compile(r"^from_end:([1-9][0-9]*)$")
_SIMPLE_OPS = frozenset({"mean", "max", "sum", "first", "first_l2"})
OUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "CELLSTRATA_POOL_BACKEND"


@dataclass(frozen=True)
class PoolSpec:
    """Which reductions to compute and which tokens are special.

    ``ops`` are computed in this order into ``out[0..P-1]``; ``n_leading``/``n_trailing`` special
    tokens are excluded from the gene span of ``mean``/``max``/``sum``.
    """

    ops: tuple[str, ...]
    n_leading: int = 0
    n_trailing: int = 0

    def __post_init__(self) -> None:
        if not self.ops:
            msg = "PoolSpec needs at least one op"
            raise ValueError(msg)
        for op in self.ops:
            if op not in _SIMPLE_OPS and not _FROM_END.match(op):
                msg = f"unknown pooling op {op!r}; expected one of {sorted(_SIMPLE_OPS)} or 'from_end:K'"
                raise ValueError(msg)
        if len(set(self.ops)) != len(self.ops):
            msg = f"PoolSpec ops must be distinct, got {self.ops}"
            raise ValueError(msg)
        if self.n_leading < 0 or self.n_trailing < 0:
            msg = "n_leading and n_trailing must be >= 0"
            raise ValueError(msg)

    @property
    def picks(self) -> tuple[tuple[int, bool, int, bool], ...]:
        """``(slot, from_end, offset, l2)`` of every single-token op, in slot order."""
        res = []
        for p, op in enumerate(self.ops):
            if op in ("first", "first_l2"):
                res.append((p, False, 0, op == "first_l2"))
            elif op.startswith("from_end:"):
                res.append((p, True, int(op.split(":")[1]), False))
        return tuple(res)

    def slot(self, op: str) -> int:
        """Output slot of ``op``, or -1 when it is not requested."""
        return self.ops.index(op) if op in self.ops else -1


# ---------------------------------------------------------------------------------------- checks
def check_args(
    hidden: torch.Tensor,
    starts: torch.Tensor | None,
    lengths: torch.Tensor,
    spec: PoolSpec,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
    overflow: torch.Tensor | None,
    *,
    layered: bool,
) -> tuple[int, ...]:
    """Validate a call; returns the expected ``out`` shape (``[L, P, B, H]`` or ``[P, B, H]``)."""
    lead = 1 if layered else 0
    if hidden.dim() not in (2 + lead, 3 + lead):
        layout = "[L, T, H] (packed) or [L, B, S, H] (padded)" if layered else "[T, H] (packed) or [B, S, H] (padded)"
        msg = f"hidden must be {layout}, got shape {tuple(hidden.shape)}"
        raise ValueError(msg)
    if hidden.dtype not in IN_DTYPES:
        msg = f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}"
        raise TypeError(msg)
    if out_dtype not in OUT_DTYPES.values():
        msg = f"out_dtype must be torch.float16 or torch.float32, got {out_dtype}"
        raise TypeError(msg)
    if lengths.dim() != 1 or lengths.dtype not in (torch.int32, torch.int64):
        msg = f"lengths must be a 1-D int32/int64 tensor, got {tuple(lengths.shape)} {lengths.dtype}"
        raise TypeError(msg)
    padded = hidden.dim() == 3 + lead
    if starts is None:
        if not padded:
            msg = "starts=None means the padded layout (starts = b * S); the packed layout needs starts"
            raise ValueError(msg)
        if lengths.shape[0] != hidden.shape[lead]:
            msg = f"padded layout: lengths must have one entry per row ({hidden.shape[lead]}), got {lengths.shape[0]}"
            raise ValueError(msg)
    elif starts.shape != lengths.shape or starts.dtype not in (torch.int32, torch.int64):
        msg = f"starts must be int32/int64 shaped like lengths {tuple(lengths.shape)}, got {tuple(starts.shape)}"
        raise ValueError(msg)
    for name, t in (("starts", starts), ("lengths", lengths), ("out", out), ("overflow", overflow)):
        if t is not None and t.device != hidden.device:
            msg = f"{name} is on {t.device} but hidden is on {hidden.device}"
            raise ValueError(msg)
    n_layers = (hidden.shape[0],) if layered else ()
    shape = (*n_layers, len(spec.ops), lengths.shape[0], hidden.shape[-1])
    if out is not None and (tuple(out.shape) != shape or out.dtype != out_dtype):
        msg = f"out must be {shape} {out_dtype}, got {tuple(out.shape)} {out.dtype}"
        raise ValueError(msg)
    if overflow is not None and (tuple(overflow.shape) != shape[:-2] or overflow.dtype != torch.int64):
        msg = f"overflow must be {shape[:-2]} int64, got {tuple(overflow.shape)} {overflow.dtype}"
        raise ValueError(msg)
    return shape


# ---------------------------------------------------------------------------------------- torch path
def _segments(hidden: torch.Tensor, starts: torch.Tensor | None, lengths: torch.Tensor) -> torch.Tensor:
    """A ``[B, M, H]`` tensor whose row ``b`` starts at token ``starts[b]`` (a view when padded)."""
    if starts is None:
        return hidden
    flat = hidden.reshape(-1, hidden.shape[-1])
    m = max(int(lengths.max().item()) if lengths.numel() else 0, 1)
    idx = starts.to(torch.int64)[:, None] + torch.arange(m, device=hidden.device)[None, :]
    return flat[idx.clamp_(min=0, max=max(flat.shape[0] - 1, 0))]


_MAX_ROW_GROUPS = 8
_ELEMENTS_PER_ROW_GROUP = 1 << 21  # below ~2M elements per group, one more call costs more than its saved tail


def _span_max(x: torch.Tensor, lo: int, hi: torch.Tensor) -> torch.Tensor:
    """Max of ``x[b, lo:hi[b]]`` per row in float32 without copying the layer.

    Rows are cut into consecutive groups (one per ~2M elements, at most 8). In each group, the span all
    its rows share is reduced in one call on a view, and only the group's ragged tail (the tokens between its shortest
    and longest row) is masked and reduced. Batches are length-sorted, so the tails are short: this
    reads the layer about once with a handful of calls, where masking the whole layer costs a full
    copy (~4x slower on ``[13, 1200, 512]``) and one call per row costs Python overhead on small layers.
    """
    b, _, h = x.shape
    res = torch.full((b, h), float("-inf"), dtype=torch.float32, device=x.device)
    hi_list = hi.tolist()
    n_groups = max(1, min(b, _MAX_ROW_GROUPS, round(x.numel() / _ELEMENTS_PER_ROW_GROUP)))
    cuts = [round(g * b / n_groups) for g in range(n_groups + 1)]
    for r0, r1 in itertools.pairwise(cuts):
        ends = hi_list[r0:r1]
        common, top = max(min(ends), lo), max(ends)
        if common > lo:
            res[r0:r1] = x[r0:r1, lo:common].amax(1).to(torch.float32)
        if top > common:
            pos = torch.arange(common, top, device=x.device)
            outside = (pos[None, :] >= hi[r0:r1, None]) | (pos[None, :] < lo)
            tail = x[r0:r1, common:top].masked_fill(outside[..., None], float("-inf")).amax(1)
            res[r0:r1] = torch.maximum(res[r0:r1], tail.to(torch.float32))
    return res


def count_float16_overflow(res: torch.Tensor) -> torch.Tensor:
    """Number of float32 values that are finite but become inf in float16."""
    return (torch.isinf(res.to(torch.float16)) & torch.isfinite(res)).sum()


def _add_float16_overflow(overflow: torch.Tensor, res: torch.Tensor) -> None:
    """Count into ``overflow``; one cheap reduction decides whether the exact count is needed."""
    if res.device.type != "cpu" or bool(res.nan_to_num(0.0, 0.0, 0.0).abs().amax() >= 65520.0):
        overflow += count_float16_overflow(res)


def pool_cast_torch(
    hidden: torch.Tensor,
    starts: torch.Tensor | None,
    lengths: torch.Tensor,
    spec: PoolSpec,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    overflow: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch implementation of :func:`pool_cast` (vectorised; float32 accumulation)."""
    shape = check_args(hidden, starts, lengths, spec, out_dtype, out, overflow, layered=False)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=hidden.device)
    n_cells = shape[1]
    if n_cells == 0:
        return out
    x = _segments(hidden, starts, lengths)
    m = x.shape[1]
    lengths = lengths.to(device=hidden.device, dtype=torch.int64)
    pos = torch.arange(m, device=hidden.device)[None, :]
    gene = (pos >= spec.n_leading) & (pos < (lengths - spec.n_trailing)[:, None])
    n_gene = gene.sum(1, keepdim=True)
    empty = n_gene == 0
    rows = torch.arange(n_cells, device=hidden.device)
    # The pipeline pools inside the forward's bfloat16 autocast on CUDA, where ``bmm`` would run in bfloat16:
    # autocast off, so every op accumulates in float32 as documented (and as the Triton kernel does).
    with torch.autocast(hidden.device.type, enabled=False):
        for p, op in enumerate(spec.ops):
            if op in ("mean", "sum"):
                acc = torch.bmm(gene.to(torch.float32)[:, None, :], x.to(torch.float32)).squeeze(1)
                if op == "mean":
                    acc = acc / n_gene.clamp(min=1)
                res = acc.masked_fill(empty, float("nan"))
            elif op == "max":
                res = _span_max(x, spec.n_leading, lengths - spec.n_trailing).masked_fill(empty, float("nan"))
            elif op in ("first", "first_l2"):
                res = x[:, 0, :].to(torch.float32)
                if op == "first_l2":
                    res = res / res.norm(dim=-1, keepdim=True)
                res = res.masked_fill((lengths < 1)[:, None], float("nan"))
            else:
                k = int(op.split(":")[1])
                where = (lengths - k).clamp(min=0, max=m - 1)
                res = x[rows, where, :].to(torch.float32)
                res = res.masked_fill((lengths < k)[:, None], float("nan"))
            if overflow is not None and out_dtype == torch.float16:
                _add_float16_overflow(overflow[p], res)
            out[p].copy_(res)
    return out


def pool_cast_layers_torch(
    hidden: torch.Tensor,
    starts: torch.Tensor | None,
    lengths: torch.Tensor,
    spec: PoolSpec,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    overflow: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch implementation of :func:`pool_cast_layers` (a loop of :func:`pool_cast_torch`)."""
    shape = check_args(hidden, starts, lengths, spec, out_dtype, out, overflow, layered=True)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=hidden.device)
    for layer in range(hidden.shape[0]):
        ovf = overflow[layer] if overflow is not None else None
        pool_cast_torch(hidden[layer], starts, lengths, spec, out_dtype, out=out[layer], overflow=ovf)
    return out


# ---------------------------------------------------------------------------------------- dispatch
@cache
def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """``torch`` or ``triton`` for tensors on ``device`` (argument, then ``CELLSTRATA_POOL_BACKEND``, then auto)."""
    choice = backend or os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if choice not in BACKENDS:
        msg = f"{BACKEND_ENV}={choice!r} is not a pooling backend; use one of {', '.join(BACKENDS)}"
        raise ConfigError(msg)
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if choice == "triton" and not triton_installed():
        msg = "the triton pooling backend needs the triton package: pip install 'cellstrata[gpu]'"
        raise ConfigError(msg)
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
