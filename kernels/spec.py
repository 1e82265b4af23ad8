"""What a pooling call asks for and may be given: :class:`PoolSpec`, the dtypes, and the argument checks.

Both backends (:mod:`.reference`, :mod:`.pool_cast_triton`) and the dispatch (:mod:`.pool_cast`) check
a call with :func:`check_args` before touching memory, so a wrong shape, dtype or device is refused
with the values it got, whichever path runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

FLOAT16_MAX = 65504.0
_FROM_END = re.compile(r"^from_end:([1-9][0-9]*)$")
_SIMPLE_OPS = frozenset({"mean", "max", "sum", "first", "first_l2"})
OUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
