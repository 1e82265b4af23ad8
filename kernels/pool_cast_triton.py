"""The fused Triton kernel behind :func:`~cellstrata.kernels.pool_cast` (one launch per layer, or per stack).

One program reduces one cell x one block of hidden columns x one layer: it streams the cell's gene span
once in ``[BLOCK_T, BLOCK_H]`` tiles, accumulating the sum and the max in float32 registers at the same
time, picks the single-token ops (``first``, ``first_l2``, ``from_end:k``) from the cell's own
boundaries, casts every result once and stores it straight into ``out[layer, op, cell, :]``. No
intermediate tensor is allocated; values that become inf in float16 are counted with one atomic add
per program and op. The reference is :func:`~cellstrata.kernels.pool_cast.pool_cast_torch`.

Without CUDA, importing this module (before anything else imports triton) switches Triton to its
interpreter, as ``TRITON_INTERPRET=1`` would, so the same kernel runs on CPU tensors in tests and
with ``CELLSTRATA_POOL_BACKEND=triton``. ``tests/kernels/test_pool_cast_compiles.py`` compiles it for
NVIDIA targets without a GPU, so it stays valid GPU Triton.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    # No GPU: run the kernel in Triton's interpreter. The flag must be set before triton is imported,
    # because triton.language's own jit helpers are built at import.
    os.environ["TRITON_INTERPRET"] = "1"

import triton
import triton.language as tl

from .pool_cast import PoolSpec, check_args

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1" or bool(triton.knobs.runtime.interpret)


@triton.jit
def _store_op(out_op_ptr, res, mask_h, overflow_op_ptr, COUNT_OVERFLOW: tl.constexpr):
    """Cast ``res`` once into one op's output row; count values that become inf in float16."""
    tl.store(out_op_ptr, res.to(out_op_ptr.dtype.element_ty), mask=mask_h)
    if COUNT_OVERFLOW:
        # float32 values at or above 65520 round to inf in float16 (round to nearest even)
        over = (tl.abs(res) >= 65520.0) & (tl.abs(res) < float("inf")) & mask_h
        n_over = tl.sum(over.to(tl.int64), axis=0)
        tl.atomic_add(overflow_op_ptr, n_over, mask=n_over > 0)


@triton.jit
def _pool_cast_kernel(
    # pointers
    out_ptr,  # [L, P, B, H] output, any strides, float16 or float32
    overflow_ptr,  # [L, P] int64 counters of float16 overflows (read only when COUNT_OVERFLOW)
    hidden_ptr,  # [L, B, S, H] padded (PADDED) or [L, 1, T, H] packed hidden states, any strides
    starts_ptr,  # [B] first token of each cell in the T packed tokens (ignored when PADDED)
    lengths_ptr,  # [B] tokens of each cell
    picks_ptr,  # [N_PICKS, 4] int32 rows (slot, from_end, offset, l2) of the single-token ops
    # sizes
    seq_len,  # S (padded) or T (packed): tokens per row of hidden
    n_hidden,  # H
    n_leading,  # special tokens before the gene span
    n_trailing,  # special tokens after the gene span
    # strides
    stride_hl,
    stride_hb,
    stride_hs,
    stride_hh,
    stride_ol,
    stride_op,
    stride_ob,
    stride_oh,
    stride_fl,  # overflow counters: layer stride (op stride is 1)
    # meta-parameters
    SLOT_MEAN: tl.constexpr,  # output slot of each span op, -1 when not requested
    SLOT_SUM: tl.constexpr,
    SLOT_MAX: tl.constexpr,
    N_PICKS: tl.constexpr,
    PADDED: tl.constexpr,  # cell b is row b of hidden, starting at its token 0
    COUNT_OVERFLOW: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    cell = tl.program_id(0).to(tl.int64)
    hblock = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    offs_h = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < n_hidden
    col = offs_h.to(tl.int64) * stride_hh
    base = hidden_ptr + layer * stride_hl
    ovf_base = overflow_ptr + layer * stride_fl
    out_base = out_ptr + layer * stride_ol + cell * stride_ob + offs_h.to(tl.int64) * stride_oh
    length = tl.load(lengths_ptr + cell).to(tl.int64)
    if PADDED:  # the cell is its own row of hidden and starts at token 0
        base += cell * stride_hb
        start = cell * 0
    else:
        start = tl.load(starts_ptr + cell).to(tl.int64)
    lo = start + n_leading
    hi = start + length - n_trailing
    n_gene = tl.maximum(hi - lo, 0)

    if SLOT_MEAN >= 0 or SLOT_SUM >= 0 or SLOT_MAX >= 0:
        acc_sum = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        acc_max = tl.full([BLOCK_T, BLOCK_H], float("-inf"), dtype=tl.float32)
        for t0 in range(lo, hi, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            mask_t = (t < hi) & (t >= 0) & (t < seq_len)
            ptrs = base + t[:, None] * stride_hs + col[None, :]
            mask = mask_t[:, None] & mask_h[None, :]
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            if SLOT_MEAN >= 0 or SLOT_SUM >= 0:
                acc_sum += x
            if SLOT_MAX >= 0:
                acc_max = tl.maximum(acc_max, tl.where(mask, x, float("-inf")))
        empty = n_gene == 0
        if SLOT_SUM >= 0 or SLOT_MEAN >= 0:
            total = tl.sum(acc_sum, axis=0)
            total = tl.where(empty, float("nan"), total)
            if SLOT_SUM >= 0:
                _store_op(out_base + SLOT_SUM * stride_op, total, mask_h, ovf_base + SLOT_SUM, COUNT_OVERFLOW)
            if SLOT_MEAN >= 0:
                mean = total / tl.maximum(n_gene, 1).to(tl.float32)
                _store_op(out_base + SLOT_MEAN * stride_op, mean, mask_h, ovf_base + SLOT_MEAN, COUNT_OVERFLOW)
        if SLOT_MAX >= 0:
            peak = tl.max(acc_max, axis=0)
            peak = tl.where(empty, float("nan"), peak)
            _store_op(out_base + SLOT_MAX * stride_op, peak, mask_h, ovf_base + SLOT_MAX, COUNT_OVERFLOW)

    for i in tl.static_range(N_PICKS):
        slot = tl.load(picks_ptr + 4 * i)
        from_end = tl.load(picks_ptr + 4 * i + 1)
        offset = tl.load(picks_ptr + 4 * i + 2).to(tl.int64)
        l2 = tl.load(picks_ptr + 4 * i + 3)
        t = tl.where(from_end != 0, start + length - offset, start + offset)
        valid = tl.where(from_end != 0, length >= offset, length > offset) & (t >= 0) & (t < seq_len)
        tok = base + t * stride_hs
        x = tl.load(tok + col, mask=mask_h & valid, other=0.0).to(tl.float32)
        if l2 != 0:
            sq = tl.zeros([BLOCK_H], dtype=tl.float32)
            for h0 in range(0, n_hidden, BLOCK_H):
                offs = h0 + tl.arange(0, BLOCK_H)
                v = tl.load(tok + offs.to(tl.int64) * stride_hh, mask=(offs < n_hidden) & valid, other=0.0)
                v = v.to(tl.float32)
                sq += v * v
            x = x / tl.where(valid, tl.sqrt(tl.sum(sq, axis=0)), 1.0)
        x = tl.where(valid, x, float("nan"))
        _store_op(out_base + slot * stride_op, x, mask_h, ovf_base + slot, COUNT_OVERFLOW)


_PICKS: dict[tuple[PoolSpec, torch.device], torch.Tensor] = {}


def _picks(spec: PoolSpec, device: torch.device) -> torch.Tensor:
    """The spec's single-token ops as an int32 device table, built once per (spec, device)."""
    key = (spec, device)
    if key not in _PICKS:
        rows = [[slot, int(from_end), offset, int(l2)] for slot, from_end, offset, l2 in spec.picks] or [[0, 0, 0, 0]]
        _PICKS[key] = torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1)
    return _PICKS[key]


def block_sizes(n_hidden: int, element_size: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_H, num_warps)`` (powers of two) for a hidden size and input element size.

    GPU: 128 columns and an 8 KiB tile per loop step (32 tokens of 16-bit values, 16 of float32), so
    each thread of 4 warps issues 16-byte loads and keeps 2 x 32 float32 accumulators. Interpreter:
    the largest tiles, because its cost is per program and loop step.
    """
    h = triton.next_power_of_2(max(n_hidden, 1))
    if INTERPRETING:
        return 64, min(h, 512), 4
    return (32 if element_size <= 2 else 16), min(h, 128), 4


def pool_cast_triton(
    hidden: torch.Tensor,
    starts: torch.Tensor | None,
    lengths: torch.Tensor,
    spec: PoolSpec,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    overflow: torch.Tensor | None = None,
    *,
    block_t: int | None = None,
    block_h: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Pool stacked layers ``hidden`` (``[L, T, H]`` packed or ``[L, B, S, H]`` padded) into ``out[L, P, B, H]``.

    ``starts=None`` means the padded layout (cell ``b`` = row ``b``). Any strides are accepted for
    ``hidden`` and ``out``. ``overflow`` (``[L, P]`` int64) receives the float16 overflow counts.
    ``block_t``/``block_h``/``num_warps`` override the tile choice (powers of two; for benchmarks).
    """
    shape = check_args(hidden, starts, lengths, spec, out_dtype, out, overflow, layered=True)
    if hidden.device.type != "cuda" and not INTERPRETING:
        msg = (
            f"the triton pooling kernel needs CUDA tensors (got {hidden.device}); to run it on CPU, set "
            "TRITON_INTERPRET=1 before starting (or use CELLSTRATA_POOL_BACKEND=torch)"
        )
        raise ValueError(msg)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=hidden.device)
    n_layers, _, n_cells, n_hidden = shape
    if n_cells == 0 or n_layers == 0 or n_hidden == 0:
        return out
    if starts is None:
        view = hidden  # padded: cell b is row b
    elif hidden.dim() == 4:
        view = hidden.flatten(1, 2).unsqueeze(1)  # padded rows with explicit starts: one row of B*S tokens
    else:
        view = hidden.unsqueeze(1)  # packed: one row of T tokens
    bt, bh, warps = block_sizes(n_hidden, hidden.element_size())
    bt, bh, warps = block_t or bt, block_h or bh, num_warps or warps
    for name, v in (("block_t", bt), ("block_h", bh)):
        if v & (v - 1):
            msg = f"{name} must be a power of two, got {v}"
            raise ValueError(msg)
    count = overflow is not None and out_dtype == torch.float16
    ovf = overflow if count else out  # never read when COUNT_OVERFLOW is False
    grid = (n_cells, triton.cdiv(n_hidden, bh), n_layers)
    with torch.cuda.device(hidden.device) if hidden.device.type == "cuda" else contextlib.nullcontext():
        _pool_cast_kernel[grid](
            out,
            ovf,
            view,
            starts if starts is not None else lengths,
            lengths,
            _picks(spec, hidden.device),
            view.shape[2],
            n_hidden,
            spec.n_leading,
            spec.n_trailing,
            *view.stride(),
            *out.stride(),
            ovf.stride(0) if count else 0,
            SLOT_MEAN=spec.slot("mean"),
            SLOT_SUM=spec.slot("sum"),
            SLOT_MAX=spec.slot("max"),
            N_PICKS=len(spec.picks),
            PADDED=starts is None,
            COUNT_OVERFLOW=count,
            BLOCK_T=bt,
            BLOCK_H=bh,
            num_warps=warps,
        )
    return out
