"""Self-attention over a padded or a packed (varlen) batch, for every model family.

A family's attention module computes ``q, k, v`` as ``[b, s, heads, head_dim]`` and calls
:func:`attend` with the batch's :class:`AttentionLayout`:

- **padded** (``[B, S]`` rows, right-padded): ``F.scaled_dot_product_attention`` with a boolean
  ``[B, 1, 1, S]`` key mask (True = attend), or no mask when no row is padded. Runs everywhere.
- **packed** (cells back to back in one ``[1, T]`` row, ``cu_seqlens`` marking where each starts): each
  token attends only to the tokens of its own cell, and no compute is spent on padding. On CUDA this is
  a varlen flash-attention kernel; which one is found once per device (:func:`varlen_backend`, in this
  order: flash-attn's ``flash_attn_varlen_func`` when installed, ``torch.nn.attention.varlen.varlen_attn``,
  ``torch.ops.aten._flash_attention_forward``, SDPA over a nested jagged tensor), each checked against
  the padded result on a small probe before it is used. Without CUDA the packed layout runs the
  ``reference``: SDPA cell by cell, which is what tests compare with the padded path.

The scale is SDPA's default ``1 / sqrt(head_dim)`` in every case, as in all four official models.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

log = logging.getLogger("cellstrata")

ATTENTION_CHOICES = ("auto", "packed", "padded")
VARLEN_ENV = "CELLSTRATA_VARLEN"  # force one CUDA varlen backend by name (see VARLEN_BACKENDS)
VARLEN_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class AttentionLayout:
    """How the tokens of one batch are laid out, as attention needs to know it.

    Padded: ``mask`` ``[B, 1, 1, S]`` bool (True = attend) or None when no row is padded.
    Packed: ``cu_seqlens`` int32 ``[B + 1]`` on the device, ``lengths`` the same on the host, ``max_len``
    the longest cell; ``backend`` names the varlen kernel (``reference`` = SDPA cell by cell).
    """

    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    lengths: tuple[int, ...] = ()
    max_len: int = 0
    backend: str = "sdpa"

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def cu(self) -> torch.Tensor:
        """``cu_seqlens`` of a packed layout."""
        if self.cu_seqlens is None:
            raise ValueError("a padded layout has no cu_seqlens; varlen attention needs a packed batch")
        return self.cu_seqlens


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """Bidirectional attention of ``q, k, v`` ``[b, s, heads, head_dim]``; returns ``[b, s, heads, head_dim]``."""
    if not layout.packed:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout.mask)
        return out.transpose(1, 2)
    if q.shape[0] != 1:
        msg = f"a packed batch has one row of tokens, got q of shape {tuple(q.shape)}"
        raise ValueError(msg)
    fn = VARLEN_BACKENDS.get(layout.backend)
    if fn is None:
        msg = f"unknown varlen attention backend {layout.backend!r}; choose from {', '.join(VARLEN_BACKENDS)}"
        raise ValueError(msg)
    return fn(q[0], k[0], v[0], layout).unsqueeze(0)


# ---------------------------------------------------------------------------------------- varlen kernels
# each takes q, k, v as [T, heads, head_dim] and returns [T, heads, head_dim]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """SDPA cell by cell (any device and dtype): the packed path's definition."""
    outs = [
        F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1)).transpose(0, 1)
        for qi, ki, vi in zip(q.split(layout.lengths), k.split(layout.lengths), v.split(layout.lengths))
    ]
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu, m = layout.cu, layout.max_len
    return flash_attn_varlen_func(q, k, v, cu, cu, m, m, 0.0, causal=False)


def _torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu, m = layout.cu, layout.max_len
    return cast(torch.Tensor, varlen_attn(q, k, v, cu, cu, m, m))  # no auxiliary outputs asked for


def _aten_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    cu, m = layout.cu, layout.max_len
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, m, m, 0.0, False, False)[0]


def _nested(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    offsets = layout.cu.to(torch.int64)
    m = layout.max_len

    def jag(t: torch.Tensor) -> torch.Tensor:
        nt = torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=1, max_seqlen=m)
        return nt.transpose(1, 2)  # [B, heads, j, head_dim]

    out = F.scaled_dot_product_attention(jag(q), jag(k), jag(v))
    return out.transpose(1, 2).values()


VARLEN_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "flash_attn": _flash_attn,
    "torch_varlen": _torch_varlen,
    "aten_flash": _aten_flash,
    "nested": _nested,
    "reference": _reference,
}
_FOUND: dict[tuple[str, int | None, torch.dtype, int], str | None] = {}


def make_layout(lengths: torch.Tensor, host_lengths: tuple[int, ...], backend: str) -> AttentionLayout:
    """The packed layout of cells with ``lengths`` (device) / ``host_lengths`` (the same, on the host)."""
    cu = torch.zeros(len(host_lengths) + 1, dtype=torch.int32, device=lengths.device)
    torch.cumsum(lengths, 0, out=cu[1:])
    return AttentionLayout(cu_seqlens=cu, lengths=host_lengths, max_len=max(host_lengths, default=0), backend=backend)


def _probe(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether backend ``name`` runs here and matches padded SDPA on a small random batch."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    lengths = (37, 5, 64, 1)
    heads = 2
    t = sum(lengths)
    q, k, v = (torch.randn(t, heads, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    layout = make_layout(torch.tensor(lengths, device=device), lengths, name)
    try:
        with torch.inference_mode():
            got = VARLEN_BACKENDS[name](q, k, v, layout).float()
            want = _reference(q, k, v, layout).float()
    except Exception as exc:  # a missing package, an unsupported op or card: try the next one
        log.debug("varlen attention backend %s unavailable: %s", name, exc)
        return False
    err = (got - want).norm() / want.norm()
    if not bool(torch.isfinite(got).all()) or float(err) > 2e-2:
        log.warning("varlen attention backend %s gave wrong numbers here (rel. error %.2g); not used", name, err)
        return False
    return True


def varlen_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """The varlen kernel to use on ``device`` for ``dtype`` / ``head_dim``, or None when packing can't run there.

    CPU: ``reference``. CUDA: the first of ``flash_attn``, ``torch_varlen``, ``aten_flash``, ``nested`` that
    runs and matches the padded path on a probe (cached), or the one named by ``CELLSTRATA_VARLEN``.
    """
    if device.type != "cuda":
        return "reference"
    if dtype not in VARLEN_DTYPES or head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return None
    key = (device.type, device.index, dtype, head_dim)
    if key not in _FOUND:
        forced = os.environ.get(VARLEN_ENV)
        if forced and forced not in VARLEN_BACKENDS:
            msg = f"{VARLEN_ENV}={forced!r} is not a varlen attention backend; choose from {', '.join(VARLEN_BACKENDS)}"
            raise ValueError(msg)
        names = (forced,) if forced else ("flash_attn", "torch_varlen", "aten_flash", "nested")
        _FOUND[key] = next((n for n in names if _probe(n, device, dtype, head_dim)), None)
        if _FOUND[key] is None:
            log.warning("no varlen attention kernel runs on %s for %s; using padded batches", device, dtype)
    return _FOUND[key]


def resolve_attention(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, str]:
    """``(layout, backend)``: ``packed`` with its varlen backend, or ``padded`` with ``sdpa``.

    ``auto`` packs on CUDA when a varlen kernel runs for the model's attention dtype and head size, and
    pads on CPU (where padded SDPA is faster than cell-by-cell attention). ``packed`` on CPU runs the
    reference (for tests); on CUDA without a varlen kernel it is refused.
    """
    if requested not in ATTENTION_CHOICES:
        msg = f"unknown attention layout {requested!r}; choose from {', '.join(ATTENTION_CHOICES)}"
        raise ValueError(msg)
    if requested == "padded" or (requested == "auto" and device.type != "cuda"):
        return "padded", "sdpa"
    backend = varlen_backend(device, dtype, head_dim)
    if backend is None:
        if requested == "packed":
            msg = (
                f"packed attention needs float16/bfloat16 and a head size that is a multiple of 8 up to "
                f"{MAX_HEAD_DIM} on {device} (got {dtype}, {head_dim}) and a varlen kernel; use --attention padded"
            )
            raise ValueError(msg)
        return "padded", "sdpa"
    return "packed", backend
