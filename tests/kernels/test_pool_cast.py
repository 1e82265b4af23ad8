"""``pool_cast`` on both backends against a float64 per-cell loop.

The ``triton`` backend runs the fused kernel: compiled on a GPU when there is one, otherwise through
the Triton interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is imported).
Inputs are fresh random values with padding poisoned, and outputs are poisoned before each call so an
element the kernel forgets to write shows up.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellstrata.errors import ConfigError
from cellstrata.kernels import BACKEND_ENV, FLOAT16_MAX, PoolSpec, pool_cast, pool_cast_layers, resolve_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ("torch", "triton")
ALL_OPS = ("mean", "max", "sum", "first", "first_l2", "from_end:1", "from_end:2")
POISON = -4321.0  # representable in float16; never a pooled value of N(0, 1) inputs
PAD_POISON = 3e4  # written into padding: a kernel that reads padding gets visibly wrong results
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def reference(x: torch.Tensor, starts, lengths, spec: PoolSpec) -> np.ndarray:
    """Float64 loop over cells: the definition of every op. ``x`` is ``[T, H]`` or ``[B, S, H]``."""
    flat = x.detach().cpu().reshape(-1, x.shape[-1]).double()
    out = np.full((len(spec.ops), len(lengths), x.shape[-1]), np.nan)
    for b, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        seg = flat[s : s + n]
        genes = seg[spec.n_leading : max(n - spec.n_trailing, spec.n_leading)]
        for p, op in enumerate(spec.ops):
            if op in ("mean", "max", "sum"):
                if len(genes):
                    out[p, b] = {"mean": genes.mean(0), "max": genes.amax(0), "sum": genes.sum(0)}[op].numpy()
            elif op in ("first", "first_l2"):
                if n >= 1:
                    out[p, b] = (seg[0] / (seg[0].norm() if op == "first_l2" else 1.0)).numpy()
            else:
                k = int(op.split(":")[1])
                if n >= k:
                    out[p, b] = seg[n - k].numpy()
    return out


def padded_batch(lengths: list[int], hidden: int, dtype: torch.dtype, seed: int, width: int | None = None):
    """``[B, S, H]`` random hidden states (padding poisoned) and int64 lengths on ``DEVICE``."""
    g = torch.Generator().manual_seed(seed)
    s = max(width or 0, max(lengths), 1)
    x = torch.randn(len(lengths), s, hidden, generator=g)
    lens = torch.tensor(lengths, dtype=torch.int64)
    x[torch.arange(s)[None, :] >= lens[:, None]] = PAD_POISON
    return x.to(dtype).to(DEVICE), lens.to(DEVICE)


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, POISON, dtype=dtype, device=DEVICE)


def check(out: torch.Tensor, ref: np.ndarray, out_dtype: torch.dtype) -> None:
    assert out.dtype == out_dtype
    got = out.double().cpu().numpy()
    assert not (got == POISON).any(), "an output element was never written"
    np.testing.assert_allclose(got, ref, rtol=TOL[out_dtype], atol=TOL[out_dtype], equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden", [8, 33, 512, 2560])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_padded_all_ops_match_reference(backend, hidden, out_dtype):
    # lengths: one token (CLS only), only specials, empty row (all padding), odd sizes, one longer than a tile
    lengths = [1, 7, 3, 70, 2, 0, 19]
    x, lens = padded_batch(lengths, hidden, torch.float32, seed=hidden)
    spec = PoolSpec(ALL_OPS, n_leading=1, n_trailing=1)
    out = poisoned((len(ALL_OPS), len(lengths), hidden), out_dtype)
    pool_cast(x, None, lens, spec, out_dtype, out=out, backend=backend)
    starts = torch.arange(len(lengths)) * x.shape[1]
    check(out, reference(x, starts, lens.cpu(), spec), out_dtype)
    # the cell of length 0 is NaN everywhere; length 1 has a CLS but no genes
    assert torch.isnan(out[:, 5]).all()
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[3, 0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_half_inputs_accumulate_in_float32(backend, in_dtype, out_dtype):
    x, lens = padded_batch([5, 300, 41], 96, in_dtype, seed=3)
    x = x + 100.0  # a float16 accumulator would lose these sums
    spec = PoolSpec(("mean", "sum", "max", "first_l2"), n_leading=1)
    out = poisoned((4, 3, 96), out_dtype)
    pool_cast(x, None, lens, spec, out_dtype, out=out, backend=backend)
    ref = reference(x, torch.arange(3) * x.shape[1], lens.cpu(), spec)
    got = out.double().cpu().numpy()
    assert not (got == POISON).any()
    np.testing.assert_allclose(got, ref, rtol=TOL[out_dtype], atol=TOL[out_dtype], equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS)
def test_each_op_alone(backend, op):
    x, lens = padded_batch([4, 1, 9, 2], 24, torch.float32, seed=7)
    spec = PoolSpec((op,), n_leading=1)
    out = poisoned((1, 4, 24), torch.float32)
    pool_cast(x, None, lens, spec, torch.float32, out=out, backend=backend)
    check(out, reference(x, torch.arange(4) * x.shape[1], lens.cpu(), spec), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden", [24, 200])
def test_packed_layout_with_cu_seqlens(backend, hidden):
    g = torch.Generator().manual_seed(hidden)
    lengths = torch.tensor([5, 2, 130, 3, 1, 0, 4])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    x = torch.randn(int(cu[-1]), hidden, generator=g).to(DEVICE)
    # scFoundation-like: gene span excludes the T and S tokens at the end; both picked per cell
    spec = PoolSpec(("mean", "max", "from_end:1", "from_end:2"), n_leading=0, n_trailing=2)
    out = poisoned((4, len(lengths), hidden), torch.float32)
    starts, lens = cu[:-1].to(DEVICE, torch.int32), lengths.to(DEVICE, torch.int32)
    pool_cast(x, starts, lens, spec, torch.float32, out=out, backend=backend)
    check(out, reference(x, cu[:-1], lengths, spec), torch.float32)
    assert torch.isnan(out[0, 1]).all()  # two tokens, both special: no gene span
    assert torch.isnan(out[3, 4]).all() and torch.isfinite(out[2, 4]).all()  # one token: S exists, T does not


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_in_and_out(backend):
    x, lens = padded_batch([6, 17, 2, 11], 2 * 40, torch.float32, seed=11)
    view = x[:, :, ::2]  # hidden stride 2
    assert not view.is_contiguous()
    spec = PoolSpec(("mean", "max", "first"), n_leading=1)
    big = poisoned((3, 3, 8, 40), torch.float16)  # a [L, P, Bmax, H] buffer; write layer 1, rows 0..3
    out = big[1, :, :4]
    pool_cast(view, None, lens, spec, torch.float16, out=out, backend=backend)
    check(out, reference(view.contiguous(), torch.arange(4) * x.shape[1], lens.cpu(), spec), torch.float16)
    untouched = torch.cat([big[0].flatten(), big[2].flatten(), big[1, :, 4:].flatten()])
    assert (untouched == POISON).all(), "wrote outside its output view"
    # padded input with explicit starts (a token-major view) gives the same result
    starts = torch.arange(4, device=DEVICE) * x.shape[1]
    out2 = pool_cast(x[:, :, ::2].contiguous(), starts, lens, spec, torch.float16, backend=backend)
    torch.testing.assert_close(out2, out, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", [True, False])
def test_one_launch_for_several_layers(backend, padded):
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([3, 9, 1, 14])
    spec = PoolSpec(("mean", "max", "first", "first_l2"), n_leading=1)
    if padded:
        stack = torch.randn(5, 4, 14, 48, generator=g)[::2].to(DEVICE)  # layer-strided view of 3 layers
        starts = None
        ref_starts = torch.arange(4) * 14
    else:
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        stack = torch.randn(3, int(cu[-1]), 48, generator=g).to(DEVICE)
        starts, ref_starts = cu[:-1].to(DEVICE), cu[:-1]
    out = poisoned((3, 4, 4, 48), torch.float16)
    overflow = torch.zeros(3, 4, dtype=torch.int64, device=DEVICE)
    pool_cast_layers(
        stack, starts, lengths.to(DEVICE), spec, torch.float16, out=out, overflow=overflow, backend=backend
    )
    for layer in range(3):
        check(out[layer], reference(stack[layer], ref_starts, lengths, spec), torch.float16)
    assert overflow.sum() == 0


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's cast
@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_overflow_is_counted_per_layer_and_op(backend):
    x, lens = padded_batch([4, 4, 4], 8, torch.float32, seed=2)
    x[0, 2, 3] = 2 * FLOAT16_MAX  # in cell 0's gene span: max and sum overflow, mean does not
    x[1, 0, 5] = 1e5  # cell 1's CLS token
    x[2, 1, 1] = 65519.0  # rounds to 65504 in float16: not an overflow
    x[2, 2, 1] = 65519.0
    stack = torch.stack([x, x * 0.25])
    spec = PoolSpec(("max", "mean", "sum", "first"), n_leading=1)
    overflow = torch.zeros(2, 4, dtype=torch.int64, device=DEVICE)
    out = pool_cast_layers(stack, None, lens, spec, torch.float16, overflow=overflow, backend=backend)
    # layer 0: max (cell 0; the 65519s stay finite), sum (cell 0 and cell 2's ~131038), first (cell 1)
    assert overflow.tolist() == [[1, 0, 2, 1], [0, 0, 0, 0]]
    ref = reference(x, torch.arange(3) * x.shape[1], lens.cpu(), spec)
    assert overflow[0].tolist() == ((np.abs(ref) >= 65520) & np.isfinite(ref)).sum(axis=(1, 2)).tolist()
    assert torch.isinf(out[0, 0, 0, 3]) and out[0, 0, 2, 1] == 65504.0
    # float32 output: nothing to count, values kept
    overflow.zero_()
    out32 = pool_cast_layers(stack, None, lens, spec, torch.float32, overflow=overflow, backend=backend)
    assert overflow.sum() == 0 and out32[0, 0, 0, 3] == 2 * FLOAT16_MAX


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_batches_agree_between_backends(backend):
    """Fresh random shapes: both backends equal the float64 definition (and so each other)."""
    rng = np.random.default_rng(0)
    for trial in range(3):
        n = int(rng.integers(1, 9))
        lengths = rng.integers(0, 90, size=n).tolist()
        hidden = int(rng.integers(8, 300))
        x, lens = padded_batch(lengths, hidden, torch.float32, seed=100 + trial)
        spec = PoolSpec(ALL_OPS, n_leading=int(rng.integers(0, 2)), n_trailing=int(rng.integers(0, 3)))
        out = poisoned((len(ALL_OPS), n, hidden), torch.float32)
        pool_cast(x, None, lens.to(torch.int32), spec, torch.float32, out=out, backend=backend)
        check(out, reference(x, torch.arange(n) * x.shape[1], lens.cpu(), spec), torch.float32)


def test_bad_arguments():
    spec = PoolSpec(("mean",))
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="unknown pooling op"):
        PoolSpec(("median",))
    with pytest.raises(ValueError, match="distinct"):
        PoolSpec(("mean", "mean"))
    with pytest.raises(ValueError, match="out must be"):
        pool_cast(x, None, torch.tensor([3, 3]), spec, torch.float16, out=torch.empty(1, 2, 4))
    with pytest.raises(ValueError, match="starts must be"):
        pool_cast(x, torch.tensor([0.0, 3.0]), torch.tensor([3, 3]), spec, torch.float32)
    with pytest.raises(ValueError, match="packed layout needs starts"):
        pool_cast(torch.randn(6, 4), None, torch.tensor([3, 3]), spec, torch.float32)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        pool_cast(x.double(), None, torch.tensor([3, 3]), spec, torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        pool_cast(x, None, torch.tensor([3, 3]), spec, torch.bfloat16)
    with pytest.raises(ValueError, match="overflow must be"):
        pool_cast(x, None, torch.tensor([3, 3]), spec, torch.float16, overflow=torch.zeros(3, dtype=torch.int64))


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert resolve_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert resolve_backend(torch.device("cpu")) == "triton"
    assert resolve_backend(torch.device("cpu"), "torch") == "torch"
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ConfigError, match="not a pooling backend"):
        resolve_backend(torch.device("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_autocast_keeps_float32_accumulation(backend, in_dtype):
    """The pipeline pools inside the forward's bf16 autocast (CUDA): sums must stay float32 all the same."""
    x, lens = padded_batch([5, 300, 41], 64, in_dtype, seed=13)
    x = x + 100.0  # a bfloat16 matmul loses these sums by whole units
    spec = PoolSpec(("mean", "sum", "max", "first_l2"), n_leading=1)
    out = poisoned((4, 3, 64), torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        pool_cast(x, None, lens, spec, torch.float32, out=out, backend=backend)
    ref = reference(x, torch.arange(3) * x.shape[1], lens.cpu(), spec)
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, rtol=2e-5, atol=2e-5, equal_nan=True)


# ---------------------------------------------------------------------------------------------- CUDA only
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")


@pytest.mark.gpu
@cuda_only
def test_triton_runs_compiled_on_cuda():
    """With a GPU the kernel runs compiled, not in the interpreter (conftest leaves TRITON_INTERPRET unset)."""
    from cellstrata.kernels import pool_cast_triton as m

    assert not m.INTERPRETING
    assert resolve_backend(DEVICE) == "triton"


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [512, 2560])
def test_released_shapes_match_torch_path_on_cuda(in_dtype, hidden):
    """Released-model shapes (long cells, many tiles per program, hidden > one column block) on the GPU."""
    g = torch.Generator(device=DEVICE).manual_seed(hidden)
    lengths = torch.tensor([1200, 1199, 1024, 777, 513, 64, 2, 1, 0], device=DEVICE)
    x = torch.randn(len(lengths), 1200, hidden, generator=g, device=DEVICE).to(in_dtype)
    spec = PoolSpec(ALL_OPS, n_leading=1, n_trailing=1)
    for out_dtype in (torch.float32, torch.float16):
        got = pool_cast(x, None, lengths, spec, out_dtype, backend="triton")
        want = pool_cast(x, None, lengths, spec, out_dtype, backend="torch")
        # float32: sums of ~1,200 values in another order; float16: one rounding step
        rtol, atol = (1e-5, 1e-4) if out_dtype == torch.float32 else (1e-3, 1e-3)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)
    check(
        pool_cast(x, None, lengths, spec, torch.float32, backend="triton")[:, -3:],
        reference(x[-3:], torch.arange(3) * x.shape[1], lengths[-3:].cpu(), spec),
        torch.float32,
    )


@pytest.mark.gpu
@cuda_only
def test_offsets_beyond_int32_on_cuda():
    """A packed layer of more than 2**31 elements: cells at its end are addressed with 64-bit offsets."""
    hidden = 256
    n_tokens = 2**31 // hidden + 4096
    if torch.cuda.mem_get_info(DEVICE)[0] < 3 * n_tokens * hidden * 2:
        pytest.skip("not enough free GPU memory for a 4 GiB layer")
    x = torch.empty(n_tokens, hidden, dtype=torch.bfloat16, device=DEVICE)
    x[:-8192].fill_(7.0)
    tail = torch.randn(8192, hidden, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE)
    x[-8192:] = tail.to(torch.bfloat16)
    lengths = torch.tensor([3000, 2000, 3192, 5], device=DEVICE)
    starts = torch.tensor([n_tokens - 8192, n_tokens - 5192, n_tokens - 3192, 0], device=DEVICE)
    spec = PoolSpec(("mean", "max", "first", "from_end:1"), n_leading=1)
    out = poisoned((4, 4, hidden), torch.float32)
    pool_cast(x, starts, lengths, spec, torch.float32, out=out, backend="triton")
    ref = reference(x[-8192:], torch.tensor([0, 3000, 5000]), lengths[:3].cpu(), spec)
    check(out[:, :3], ref, torch.float32)
    assert (out[:, 3] == 7.0).all()


# ---------------------------------------------------------------------------------------------- split token axis
SPLIT_LENGTHS = [0, 1, 2, 3, 70, 33, 129, 17, 8]  # empty, specials only, shorter than a segment, ragged tiles


def split_inputs(
    layout: str, in_dtype: torch.dtype = torch.float32, seed: int = 21, hidden: int = 40, width: int | None = None
):
    """Two stacked layers of ``SPLIT_LENGTHS`` cells as ``(hidden, starts, lengths, ref_x, ref_starts)``."""
    xs = [padded_batch(SPLIT_LENGTHS, hidden, in_dtype, seed=seed + layer, width=width)[0] for layer in range(2)]
    lens = torch.tensor(SPLIT_LENGTHS, dtype=torch.int64)
    s = xs[0].shape[1]
    padded_starts = torch.arange(len(lens)) * s
    if layout == "padded":
        return torch.stack(xs), None, lens.to(DEVICE), xs, padded_starts
    if layout == "padded_starts":
        return torch.stack(xs), padded_starts.to(DEVICE), lens.to(DEVICE), xs, padded_starts
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    keep = (torch.arange(s)[None, :] < lens[:, None]).flatten().to(DEVICE)
    packed = [x.flatten(0, 1)[keep] for x in xs]  # only the real tokens, cell after cell
    return torch.stack(packed), cu[:-1].to(DEVICE, torch.int32), lens.to(DEVICE, torch.int32), packed, cu[:-1]


def pipeline_out(n_layers: int, n_ops: int, n_cells: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """The pipeline's ``[L, B, P*H]`` batch buffer (here wider, and with spare rows) seen as ``[L, P, B, H]``."""
    buf = poisoned((n_layers, n_cells + 3, n_ops * hidden + 8), dtype)
    return buf[:, :n_cells, : n_ops * hidden].unflatten(-1, (n_ops, hidden)).transpose(1, 2)


@pytest.mark.parametrize(
    "n_seg", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow), 5]
)
@pytest.mark.parametrize("layout", ["padded", "padded_starts", "packed"])
@pytest.mark.parametrize("out_dtype", [torch.float32, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_split_segments_match_reference(n_seg, layout, out_dtype):
    """Forced splits (odd, ending mid-tile, more segments than a cell has tiles) into the pipeline's strided view."""
    from cellstrata.kernels.pool_cast_triton import pool_cast_triton

    stack, starts, lens, xs, ref_starts = split_inputs(layout)
    spec = PoolSpec(ALL_OPS, n_leading=1, n_trailing=1)
    out = pipeline_out(2, len(ALL_OPS), len(SPLIT_LENGTHS), 40, out_dtype)
    overflow = torch.zeros(2, len(ALL_OPS), dtype=torch.int64, device=DEVICE)
    pool_cast_triton(stack, starts, lens, spec, out_dtype, out=out, overflow=overflow, n_seg=n_seg, block_t=8)
    for layer in range(2):
        check(out[layer], reference(xs[layer], ref_starts, lens.cpu(), spec), out_dtype)
    assert torch.isnan(out[:, :, 0]).all()  # the empty cell
    assert torch.isnan(out[:, :3, 1:3]).all()  # one and two tokens: no gene span (mean, max, sum)
    assert torch.isfinite(out[:, :3, 3]).all()  # three tokens: one gene
    assert overflow.sum() == 0
    assert (out.transpose(1, 2).flatten(2).isfinite() | out.transpose(1, 2).flatten(2).isnan()).all()


@pytest.mark.parametrize("in_dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_split_keeps_max_and_picks_bit_identical(in_dtype):
    """Max and the single-token ops do not depend on the split; sum/mean only by float32 summation order."""
    from cellstrata.kernels.pool_cast_triton import pool_cast_triton

    stack, starts, lens, _, _ = split_inputs("padded", in_dtype, seed=31, hidden=40)
    spec = PoolSpec(("sum", "max", "mean", "first", "first_l2", "from_end:2"), n_leading=1)
    res = {n: pool_cast_triton(stack, starts, lens, spec, torch.float32, n_seg=n, block_t=16) for n in (1, 3, 5)}
    exact = [1, 3, 4, 5]  # max and the picks
    for n in (3, 5):
        torch.testing.assert_close(res[n][:, exact], res[1][:, exact], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(res[n], res[1], rtol=2e-5, atol=2e-5, equal_nan=True)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_max_len_only_changes_the_split(layout, monkeypatch):
    """``max_len`` given or not (padded: S; packed: no split) gives the same numbers, through ``pool_cast``."""
    from cellstrata.kernels import pool_cast_triton as m

    monkeypatch.setattr(m, "MIN_SEGMENT_TILES", 1)  # split these short cells as the GPU splits long ones
    stack, starts, lens, _, _ = split_inputs(layout, seed=41, width=300)
    x = stack[0]
    spec = PoolSpec(ALL_OPS, n_leading=1)
    bt, bh, _ = m.block_sizes(x.shape[-1], x.element_size())
    n_max = max(SPLIT_LENGTHS)
    auto = (m.auto_segments(stack, 9, spec, bt, bh), m.auto_segments(stack, 9, spec, bt, bh, max_len=n_max))
    assert auto == ((299 // bt, 128 // bt) if layout == "padded" else (1, 128 // bt))
    plain = pool_cast(x, starts, lens, spec, torch.float32, backend="triton")
    bounded = poisoned(plain.shape, torch.float32)
    pool_cast(x, starts, lens, spec, torch.float32, out=bounded, backend="triton", max_len=n_max)
    on_torch = pool_cast(x, starts, lens, spec, torch.float32, backend="torch", max_len=3)  # ignored
    exact = [1, 3, 4, 5, 6]  # max and the picks
    torch.testing.assert_close(bounded[exact], plain[exact], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(bounded, plain, rtol=2e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(on_torch, plain, rtol=2e-5, atol=2e-5, equal_nan=True)


def test_segment_count_rule():
    """Enough programs for the GPU, segments of at least MIN_SEGMENT_TILES tiles, one when the length is unknown."""
    from cellstrata.kernels.pool_cast_triton import MIN_SEGMENT_TILES, segment_count

    floor = MIN_SEGMENT_TILES * 32  # tokens per segment at least, with 32-token tiles
    assert segment_count(programs=13 * 4, max_gene=None, block_t=32) == 1
    assert segment_count(programs=10_000, max_gene=100 * floor, block_t=32) == 1  # the grid is full already
    assert segment_count(programs=13 * 4, max_gene=floor - 1, block_t=32) == 1  # too short to split
    assert segment_count(programs=13 * 4, max_gene=100 * floor, block_t=32, n_sm=132) == 11  # 4 x 132 / 52
    assert segment_count(programs=13 * 4, max_gene=3 * floor + 5, block_t=32, n_sm=132) == 3  # length-bound


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's cast
@pytest.mark.parametrize("n_seg", [1, 3, 5])
def test_split_counts_float16_overflow_of_combined_partials(n_seg):
    """A sum that overflows float16 only once the segments' partials are added is still counted once."""
    from cellstrata.kernels.pool_cast_triton import pool_cast_triton

    x, lens = padded_batch([42, 42, 42], 16, torch.float32, seed=5)
    x[0, 2, 3] = 40000.0  # two halves in different segments: each partial finite, the sum overflows
    x[0, 38, 3] = 40000.0
    x[1, 20, 7] = 65519.0  # rounds to 65504: not an overflow (and the cell's sum stays below it)
    x[1, 30, 7] = -1000.0
    x[2, 30, 9] = 65520.0  # the smallest overflow: max overflows, and the sum with the 10000
    x[2, 5, 9] = 10000.0
    spec = PoolSpec(("max", "mean", "sum", "first"), n_leading=1)
    overflow = torch.zeros(1, 4, dtype=torch.int64, device=DEVICE)
    out = pool_cast_triton(x[None], None, lens, spec, torch.float16, overflow=overflow, n_seg=n_seg, block_t=8)
    ref = reference(x, torch.arange(3) * x.shape[1], lens.cpu(), spec)
    assert overflow[0].tolist() == ((np.abs(ref) >= 65520) & np.isfinite(ref)).sum(axis=(1, 2)).tolist()
    assert overflow[0].tolist() == [1, 0, 2, 0]
    assert torch.isinf(out[0, 2, 0, 3]) and out[0, 0, 1, 7] == 65504.0


def test_split_bad_n_seg():
    from cellstrata.kernels.pool_cast_triton import pool_cast_triton

    x, lens = padded_batch([3, 4], 8, torch.float32, seed=1)
    with pytest.raises(ValueError, match="n_seg must be >= 1"):
        pool_cast_triton(x[None], None, lens, PoolSpec(("mean",)), torch.float32, n_seg=0)
