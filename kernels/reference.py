"""The torch path of :func:`~cellstrata.kernels.pool_cast`: the CPU backend and the reference of the Triton kernels.

Vectorised torch with float32 accumulation (autocast off): ``mean``/``sum`` as one batched matmul with
the gene mask, ``max`` over shared spans plus short ragged tails (:func:`_span_max`), the single-token
ops by gather. The Triton kernels (:mod:`.pool_cast_triton`) are tested against this module, and this
module against a float64 loop (``tests/kernels/test_pool_cast.py``).
"""

from __future__ import annotations

import itertools

import torch

from .spec import PoolSpec, check_args


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
