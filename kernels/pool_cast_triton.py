"""The fused Triton kernels behind :func:`~cellstrata.kernels.pool_cast` (one launch per layer, or per stack).

Each cell's gene span is reduced by ``n_seg`` programs per block of hidden columns, in two stages:

1. ``_pool_partial_kernel`` (grid ``cells * n_seg x hidden blocks x layers``): segment ``s`` of a cell
   streams its share of the span (``ceil(n_gene / n_seg)`` tokens rounded up to whole ``BLOCK_T`` tiles)
   once in ``[BLOCK_T, BLOCK_H]`` tiles, accumulating the sum and the max in float32 registers, and writes
   both into a float32 workspace ``[L, B, n_seg, H]`` (sum, and max; a segment past the cell's end writes
   0 and -inf, so no partial is ever left unwritten);
2. ``_pool_finalize_kernel`` (grid ``cells x hidden blocks x layers``): adds the partials and takes their
   max in segment order (deterministic), then does what the single pass does at its end.

With ``n_seg == 1`` one kernel, ``_pool_cast_kernel``, does both in one pass with no workspace. Either way
the end is the same code: NaN for an empty gene span, ``mean = sum / n_gene``, the single-token ops
(``first``, ``first_l2``, ``from_end:k``, once per cell) picked from the cell's own boundaries, every
result cast once and stored into ``out[layer, op, cell, :]``, and values that become inf in float16
counted with one atomic add per program and op. So max and the picks are bit-identical for every
``n_seg``; only the float32 summation order of sum/mean depends on it. The launcher splits when one
pass would give too few programs to fill the GPU (:func:`segment_count`). The reference is
:func:`~cellstrata.kernels.reference.pool_cast_torch`.

The kernels run compiled on CUDA tensors. On CPU tensors they run only in Triton's interpreter, which
``TRITON_INTERPRET=1`` selects when it is set before triton is first imported (triton builds its own
jit helpers at import): the test configuration (``tests/conftest.py``) and the benchmarks that check
the kernel on CPU set it; this module reads it (:data:`INTERPRETING`) and never sets it. Without it, a
call on CPU tensors is refused by :func:`require_runnable` with what to do, before any launch.
``tests/kernels/test_pool_cast_compiles.py`` compiles the kernels for NVIDIA targets without a GPU, so
they stay valid GPU Triton.
"""

from __future__ import annotations

import contextlib
from functools import cache
from typing import cast

import torch
import triton
import triton.language as tl

from ..errors import ConfigError
from .spec import PoolSpec, check_args

# Whether @triton.jit below builds interpreted kernels: triton decides at decoration, from TRITON_INTERPRET.
INTERPRETING = bool(triton.knobs.runtime.interpret)
# Split until a launch has about PROGRAMS_PER_SM programs per SM, in segments of at least MIN_SEGMENT_TILES tiles
# (GPU: 1,024 16-bit tokens). Measured on an H200 (bf16, 4 ops, profiler kernel times): 13 cells of 4,915 tokens,
# hidden 512: 95 us in one pass, 31 us in 4 segments; hidden 2048: 110 -> 79 us (2-4 segments). But the split's
# second launch and workspace cost ~70 us more host time per call (62 -> 136 us with Triton 3.6), and for cells of
# ~1,200 tokens it saves at most 4 us of GPU time (53 cells, hidden 512: 32 -> 28 us); hence the 32-tile floor.
PROGRAMS_PER_SM = 4
MIN_SEGMENT_TILES = 32
DEFAULT_SMS = 132  # the interpreter (and an unknown device) plans as for an H100


# ---------------------------------------------------------------------------------------------------- jit helpers
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
def _cell_span(
    hidden_ptr, starts_ptr, lengths_ptr, cell, layer, stride_hl, stride_hb, n_leading, n_trailing, PADDED: tl.constexpr
):
    """The cell's row pointer, first token, length and gene span ``[lo, hi)`` (int64)."""
    base = hidden_ptr + layer * stride_hl
    length = tl.load(lengths_ptr + cell).to(tl.int64)
    if PADDED:  # the cell is its own row of hidden and starts at token 0
        base += cell * stride_hb
        start = cell * 0
    else:
        start = tl.load(starts_ptr + cell).to(tl.int64)
    return base, start, length, start + n_leading, start + length - n_trailing


@triton.jit
def _reduce_tokens(
    base,
    col,
    mask_h,
    lo,
    hi,
    seq_len,
    stride_hs,
    DO_SUM: tl.constexpr,
    DO_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Float32 sum and max of tokens ``[lo, hi)`` per column (0 and -inf when the range is empty)."""
    acc_sum = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    acc_max = tl.full([BLOCK_T, BLOCK_H], float("-inf"), dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask_t = (t < hi) & (t >= 0) & (t < seq_len)
        ptrs = base + t[:, None] * stride_hs + col[None, :]
        mask = mask_t[:, None] & mask_h[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if DO_SUM:
            acc_sum += x
        if DO_MAX:
            acc_max = tl.maximum(acc_max, tl.where(mask, x, float("-inf")))
    return tl.sum(acc_sum, axis=0), tl.max(acc_max, axis=0)


@triton.jit
def _store_span_ops(
    out_base,
    ovf_base,
    total,
    peak,
    n_gene,
    mask_h,
    stride_op,
    SLOT_MEAN: tl.constexpr,
    SLOT_SUM: tl.constexpr,
    SLOT_MAX: tl.constexpr,
    COUNT_OVERFLOW: tl.constexpr,
):
    """Store ``mean``/``sum``/``max`` of a cell from its float32 span sum and max (NaN when ``n_gene == 0``)."""
    empty = n_gene == 0
    if SLOT_SUM >= 0 or SLOT_MEAN >= 0:
        total = tl.where(empty, float("nan"), total)
        if SLOT_SUM >= 0:
            _store_op(out_base + SLOT_SUM * stride_op, total, mask_h, ovf_base + SLOT_SUM, COUNT_OVERFLOW)
        if SLOT_MEAN >= 0:
            mean = total / tl.maximum(n_gene, 1).to(tl.float32)
            _store_op(out_base + SLOT_MEAN * stride_op, mean, mask_h, ovf_base + SLOT_MEAN, COUNT_OVERFLOW)
    if SLOT_MAX >= 0:
        peak = tl.where(empty, float("nan"), peak)
        _store_op(out_base + SLOT_MAX * stride_op, peak, mask_h, ovf_base + SLOT_MAX, COUNT_OVERFLOW)


@triton.jit
def _store_picks(
    out_base,
    ovf_base,
    picks_ptr,
    base,
    start,
    length,
    col,
    mask_h,
    seq_len,
    n_hidden,
    stride_hs,
    stride_hh,
    stride_op,
    N_PICKS: tl.constexpr,
    COUNT_OVERFLOW: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Store the single-token ops (``first``, ``first_l2``, ``from_end:k``) of one cell."""
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


# ---------------------------------------------------------------------------------------------------- kernels
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
    """Single pass (``n_seg == 1``): one program reduces a cell's whole span for one column block and layer."""
    cell = tl.program_id(0).to(tl.int64)
    hblock = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    offs_h = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < n_hidden
    col = offs_h.to(tl.int64) * stride_hh
    ovf_base = overflow_ptr + layer * stride_fl
    out_base = out_ptr + layer * stride_ol + cell * stride_ob + offs_h.to(tl.int64) * stride_oh
    base, start, length, lo, hi = _cell_span(
        hidden_ptr, starts_ptr, lengths_ptr, cell, layer, stride_hl, stride_hb, n_leading, n_trailing, PADDED
    )
    if SLOT_MEAN >= 0 or SLOT_SUM >= 0 or SLOT_MAX >= 0:
        total, peak = _reduce_tokens(
            base,
            col,
            mask_h,
            lo,
            hi,
            seq_len,
            stride_hs,
            SLOT_MEAN >= 0 or SLOT_SUM >= 0,
            SLOT_MAX >= 0,
            BLOCK_T,
            BLOCK_H,
        )
        n_gene = tl.maximum(hi - lo, 0)
        _store_span_ops(
            out_base, ovf_base, total, peak, n_gene, mask_h, stride_op, SLOT_MEAN, SLOT_SUM, SLOT_MAX, COUNT_OVERFLOW
        )
    _store_picks(
        out_base,
        ovf_base,
        picks_ptr,
        base,
        start,
        length,
        col,
        mask_h,
        seq_len,
        n_hidden,
        stride_hs,
        stride_hh,
        stride_op,
        N_PICKS,
        COUNT_OVERFLOW,
        BLOCK_H,
    )


@triton.jit
def _pool_partial_kernel(
    # pointers
    ws_sum_ptr,  # [L, B, n_seg, H] float32 partial sums (written only when DO_SUM)
    ws_max_ptr,  # [L, B, n_seg, H] float32 partial maxima (written only when DO_MAX)
    hidden_ptr,  # [L, B, S, H] padded (PADDED) or [L, 1, T, H] packed hidden states, any strides
    starts_ptr,  # [B] first token of each cell in the T packed tokens (ignored when PADDED)
    lengths_ptr,  # [B] tokens of each cell
    # sizes
    n_seg,  # segments per cell
    seq_len,  # S (padded) or T (packed): tokens per row of hidden
    n_hidden,  # H
    n_leading,  # special tokens before the gene span
    n_trailing,  # special tokens after the gene span
    # strides
    stride_hl,
    stride_hb,
    stride_hs,
    stride_hh,
    stride_wl,  # workspace (both planes): layer, cell, segment strides (column stride is 1)
    stride_wb,
    stride_ws,
    # meta-parameters
    DO_SUM: tl.constexpr,
    DO_MAX: tl.constexpr,
    PADDED: tl.constexpr,  # cell b is row b of hidden, starting at its token 0
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Stage 1: float32 sum and max of one segment of a cell's gene span, into the workspace."""
    pid = tl.program_id(0).to(tl.int64)
    cell = pid // n_seg
    seg = pid % n_seg
    hblock = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    offs_h = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < n_hidden
    col = offs_h.to(tl.int64) * stride_hh
    base, _start, _length, lo, hi = _cell_span(
        hidden_ptr, starts_ptr, lengths_ptr, cell, layer, stride_hl, stride_hb, n_leading, n_trailing, PADDED
    )
    n_gene = tl.maximum(hi - lo, 0)
    per_seg = (n_gene + n_seg - 1) // n_seg
    per_seg = (per_seg + BLOCK_T - 1) // BLOCK_T * BLOCK_T  # whole tiles: only a cell's last segment is ragged
    seg_lo = lo + seg * per_seg
    seg_hi = tl.minimum(seg_lo + per_seg, hi)
    total, peak = _reduce_tokens(
        base, col, mask_h, seg_lo, seg_hi, seq_len, stride_hs, DO_SUM, DO_MAX, BLOCK_T, BLOCK_H
    )
    ws = layer * stride_wl + cell * stride_wb + seg * stride_ws + offs_h.to(tl.int64)
    if DO_SUM:
        tl.store(ws_sum_ptr + ws, total, mask=mask_h)
    if DO_MAX:
        tl.store(ws_max_ptr + ws, peak, mask=mask_h)


@triton.jit
def _pool_finalize_kernel(
    # pointers
    out_ptr,  # [L, P, B, H] output, any strides, float16 or float32
    overflow_ptr,  # [L, P] int64 counters of float16 overflows (read only when COUNT_OVERFLOW)
    ws_sum_ptr,  # [L, B, n_seg, H] float32 partial sums from stage 1 (read only when a sum op is requested)
    ws_max_ptr,  # [L, B, n_seg, H] float32 partial maxima from stage 1 (read only when max is requested)
    hidden_ptr,  # [L, B, S, H] padded (PADDED) or [L, 1, T, H] packed hidden states (for the picks)
    starts_ptr,  # [B] first token of each cell in the T packed tokens (ignored when PADDED)
    lengths_ptr,  # [B] tokens of each cell
    picks_ptr,  # [N_PICKS, 4] int32 rows (slot, from_end, offset, l2) of the single-token ops
    # sizes
    n_seg,  # segments per cell
    seq_len,  # S (padded) or T (packed): tokens per row of hidden
    n_hidden,  # H
    n_leading,  # special tokens before the gene span
    n_trailing,  # special tokens after the gene span
    # strides
    stride_hl,
    stride_hb,
    stride_hs,
    stride_hh,
    stride_wl,  # workspace (both planes): layer, cell, segment strides (column stride is 1)
    stride_wb,
    stride_ws,
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
    BLOCK_H: tl.constexpr,
):
    """Stage 2: combine a cell's partials in segment order, store every op as the single pass does."""
    cell = tl.program_id(0).to(tl.int64)
    hblock = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    offs_h = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < n_hidden
    col = offs_h.to(tl.int64) * stride_hh
    ovf_base = overflow_ptr + layer * stride_fl
    out_base = out_ptr + layer * stride_ol + cell * stride_ob + offs_h.to(tl.int64) * stride_oh
    base, start, length, lo, hi = _cell_span(
        hidden_ptr, starts_ptr, lengths_ptr, cell, layer, stride_hl, stride_hb, n_leading, n_trailing, PADDED
    )
    if SLOT_MEAN >= 0 or SLOT_SUM >= 0 or SLOT_MAX >= 0:
        ws = layer * stride_wl + cell * stride_wb + offs_h.to(tl.int64)
        total = tl.zeros([BLOCK_H], dtype=tl.float32)
        peak = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        for s in range(0, n_seg):
            if SLOT_MEAN >= 0 or SLOT_SUM >= 0:
                total += tl.load(ws_sum_ptr + ws + s * stride_ws, mask=mask_h, other=0.0)
            if SLOT_MAX >= 0:
                peak = tl.maximum(peak, tl.load(ws_max_ptr + ws + s * stride_ws, mask=mask_h, other=float("-inf")))
        n_gene = tl.maximum(hi - lo, 0)
        _store_span_ops(
            out_base, ovf_base, total, peak, n_gene, mask_h, stride_op, SLOT_MEAN, SLOT_SUM, SLOT_MAX, COUNT_OVERFLOW
        )
    _store_picks(
        out_base,
        ovf_base,
        picks_ptr,
        base,
        start,
        length,
        col,
        mask_h,
        seq_len,
        n_hidden,
        stride_hs,
        stride_hh,
        stride_op,
        N_PICKS,
        COUNT_OVERFLOW,
        BLOCK_H,
    )


# ---------------------------------------------------------------------------------------------------- launch
def require_runnable(device: torch.device) -> None:
    """Refuse tensors on ``device`` that these kernels cannot run on (off CUDA, without the interpreter)."""
    if device.type != "cuda" and not INTERPRETING:
        msg = (
            f"the triton pooling backend runs on CUDA tensors, not {device}: use CELLSTRATA_POOL_BACKEND=torch "
            "(or leave it unset), or, to check the kernel on CPU in Triton's slow interpreter, start with "
            "TRITON_INTERPRET=1 in the environment"
        )
        raise ConfigError(msg)


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


@cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def segment_count(programs: int, max_gene: int | None, block_t: int, n_sm: int = DEFAULT_SMS) -> int:
    """Segments per cell: enough for ``PROGRAMS_PER_SM * n_sm`` programs, each of >= ``MIN_SEGMENT_TILES`` tiles.

    ``programs`` is the single-pass grid size (cells x column blocks x layers), ``max_gene`` the longest
    gene span (``None``: unknown, one segment).
    """
    if max_gene is None or programs <= 0:
        return 1
    by_length = max_gene // (MIN_SEGMENT_TILES * block_t)
    wanted = triton.cdiv(PROGRAMS_PER_SM * n_sm, programs)
    return max(1, min(wanted, by_length))


def auto_segments(
    hidden: torch.Tensor, n_cells: int, spec: PoolSpec, block_t: int, block_h: int, max_len: int | None = None
) -> int:
    """The launcher's ``n_seg`` for stacked ``hidden`` when none is forced (``max_len`` default: ``S`` when 4-D)."""
    if spec.slot("mean") < 0 and spec.slot("sum") < 0 and spec.slot("max") < 0:
        return 1  # picks only: no span to split
    if max_len is None and hidden.dim() == 4:
        max_len = hidden.shape[-2]
    max_gene = None if max_len is None else max_len - spec.n_leading - spec.n_trailing
    programs = n_cells * triton.cdiv(hidden.shape[-1], block_h) * hidden.shape[0]
    return segment_count(programs, max_gene, block_t, _sm_count(hidden.device))


def pool_cast_triton(
    hidden: torch.Tensor,
    starts: torch.Tensor | None,
    lengths: torch.Tensor,
    spec: PoolSpec,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    overflow: torch.Tensor | None = None,
    *,
    max_len: int | None = None,
    block_t: int | None = None,
    block_h: int | None = None,
    num_warps: int | None = None,
    n_seg: int | None = None,
) -> torch.Tensor:
    """Pool stacked layers ``hidden`` (``[L, T, H]`` packed or ``[L, B, S, H]`` padded) into ``out[L, P, B, H]``.

    ``starts=None`` means the padded layout (cell ``b`` = row ``b``). Any strides are accepted for
    ``hidden`` and ``out``. ``overflow`` (``[L, P]`` int64) receives the float16 overflow counts.
    ``max_len`` bounds the cells' lengths and sets the split (default: ``S`` for 4-D ``hidden``; packed,
    no split); it is a host integer, so no device sync. ``block_t``/``block_h``/``num_warps`` override the
    tile choice (powers of two) and ``n_seg`` the segments per cell (1: the single pass); for benchmarks.
    """
    shape = check_args(hidden, starts, lengths, spec, out_dtype, out, overflow, layered=True)
    require_runnable(hidden.device)
    if n_seg is not None and n_seg < 1:
        msg = f"n_seg must be >= 1, got {n_seg}"
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
    ovf = cast(torch.Tensor, overflow) if count else out  # count: overflow is given; never read when False
    slots = {"SLOT_MEAN": spec.slot("mean"), "SLOT_SUM": spec.slot("sum"), "SLOT_MAX": spec.slot("max")}
    do_sum = slots["SLOT_MEAN"] >= 0 or slots["SLOT_SUM"] >= 0
    do_max = slots["SLOT_MAX"] >= 0
    n_hblocks = triton.cdiv(n_hidden, bh)
    if n_seg is None:
        n_seg = auto_segments(hidden, n_cells, spec, bt, bh, max_len)
    if not (do_sum or do_max):
        n_seg = 1  # picks only: no span to split
    grid = (n_cells, n_hblocks, n_layers)
    picks = _picks(spec, hidden.device)
    sizes = (view.shape[2], n_hidden, spec.n_leading, spec.n_trailing)
    common = {"N_PICKS": len(spec.picks), "PADDED": starts is None, "COUNT_OVERFLOW": count, **slots}
    starts_arg = starts if starts is not None else lengths
    with torch.cuda.device(hidden.device) if hidden.device.type == "cuda" else contextlib.nullcontext():
        if n_seg == 1:
            _pool_cast_kernel[grid](
                out,
                ovf,
                view,
                starts_arg,
                lengths,
                picks,
                *sizes,
                *view.stride(),
                *out.stride(),
                ovf.stride(0) if count else 0,
                **common,
                BLOCK_T=bt,
                BLOCK_H=bh,
                num_warps=warps,
            )
            return out
        # workspace [planes, L, B, n_seg, H]: plane 0 sums (when needed), the last plane maxima (when needed)
        ws = torch.empty((int(do_sum) + int(do_max), n_layers, n_cells, n_seg, n_hidden), device=hidden.device)
        ws_sum, ws_max = ws[0], ws[-1]
        ws_strides = ws_sum.stride()[:3]
        _pool_partial_kernel[(n_cells * n_seg, n_hblocks, n_layers)](
            ws_sum,
            ws_max,
            view,
            starts_arg,
            lengths,
            n_seg,
            *sizes,
            *view.stride(),
            *ws_strides,
            DO_SUM=do_sum,
            DO_MAX=do_max,
            PADDED=starts is None,
            BLOCK_T=bt,
            BLOCK_H=bh,
            num_warps=warps,
        )
        _pool_finalize_kernel[grid](
            out,
            ovf,
            ws_sum,
            ws_max,
            view,
            starts_arg,
            lengths,
            picks,
            n_seg,
            *sizes,
            *view.stride(),
            *ws_strides,
            *out.stride(),
            ovf.stride(0) if count else 0,
            **common,
            BLOCK_H=bh,
            num_warps=warps,
        )
    return out
