"""The torch pooling path against a float64 per-cell loop, on both layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellstrata.kernels import FLOAT16_MAX, PoolSpec, pool_cast

OPS = ("mean", "max", "sum", "first", "first_l2", "from_end:1", "from_end:2")


def reference(x: torch.Tensor, starts, lengths, spec: PoolSpec) -> np.ndarray:
    """Float64 loop over cells: the definition of every op."""
    flat = x.reshape(-1, x.shape[-1]).double()
    out = np.full((len(spec.ops), len(starts), x.shape[-1]), np.nan)
    for b, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        seg = flat[s : s + n]
        genes = seg[spec.n_leading : max(n - spec.n_trailing, spec.n_leading)]
        for p, op in enumerate(spec.ops):
            if op in ("mean", "max", "sum"):
                if len(genes):
                    out[p, b] = {"mean": genes.mean(0), "max": genes.amax(0), "sum": genes.sum(0)}[op].numpy()
            elif op == "first":
                out[p, b] = seg[0].numpy()
            elif op == "first_l2":
                out[p, b] = (seg[0] / seg[0].norm()).numpy()
            else:
                k = int(op.split(":")[1])
                if n >= k:
                    out[p, b] = seg[n - k].numpy()
    return out


@pytest.mark.parametrize("hidden", [8, 33, 512])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_padded_layout_matches_reference(hidden, out_dtype, in_dtype):
    g = torch.Generator().manual_seed(hidden)
    lengths = torch.tensor([1, 7, 3, 19, 2, 19])
    b, s = len(lengths), int(lengths.max())
    x = torch.randn(b, s, hidden, generator=g).to(in_dtype)
    x[torch.arange(s)[None, :] >= lengths[:, None]] = 1e4  # padding poison must never leak in
    starts = torch.arange(b) * s
    spec = PoolSpec(OPS, n_leading=1, n_trailing=0)
    out = torch.full((len(OPS), b, hidden), 123.0).to(out_dtype)
    pool_cast(x, starts, lengths, spec, out_dtype, out=out)
    ref = reference(x, starts, lengths, spec)
    tol = 1e-5 if out_dtype == torch.float32 else 2e-3
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=tol, atol=tol, equal_nan=True)
    assert out.dtype == out_dtype
    # cell of length 1 has an empty gene span -> NaN for gene poolings, real CLS
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[3, 0]).all()


def test_packed_layout_and_trailing_specials():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 2, 9, 3])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    x = torch.randn(int(cu[-1]), 24, generator=g)
    spec = PoolSpec(("mean", "max", "from_end:1", "from_end:2"), n_leading=0, n_trailing=2)
    out = pool_cast(x, cu[:-1], lengths, spec, torch.float32)
    ref = reference(x, cu[:-1], lengths, spec)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(out[0, 1]).all()  # length 2 minus 2 trailing specials: empty


def test_float16_overflow_is_counted():
    x = torch.randn(2, 4, 8)
    x[0, 2, 3] = 2 * FLOAT16_MAX
    spec = PoolSpec(("max", "mean"), n_leading=1)
    overflow = torch.zeros(2, dtype=torch.int64)
    out = pool_cast(x, torch.tensor([0, 4]), torch.tensor([4, 4]), spec, torch.float16, overflow=overflow)
    assert overflow.tolist() == [1, 0]
    assert torch.isinf(out[0, 0, 3])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown pooling op"):
        PoolSpec(("median",))
    with pytest.raises(ValueError, match="out must be"):
        pool_cast(
            torch.randn(2, 3, 4),
            torch.tensor([0, 3]),
            torch.tensor([3, 3]),
            PoolSpec(("mean",)),
            torch.float16,
            out=torch.empty(1, 2, 4),
        )
    with pytest.raises(TypeError):
        pool_cast(
            torch.randn(2, 3, 4), torch.tensor([0.0, 3.0]), torch.tensor([3, 3]), PoolSpec(("mean",)), torch.float32
        )
