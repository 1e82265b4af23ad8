"""The batch buffer: one allocation reused across batches, one copy to the host per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellstrata.engine.device.transfer import PooledBuffers

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_buffer_is_reused_grown_and_copied_whole(device):
    bufs = PooledBuffers(5, 3 * 24, torch.float16, torch.device(device))
    big = bufs.device_view(40)
    assert big.shape == (5, 40, 72) and big.is_contiguous() and big.dtype == torch.float16
    small = bufs.device_view(7)
    assert small.is_contiguous() and small.data_ptr() == big.data_ptr()  # no new allocation
    grown = bufs.device_view(41)
    assert grown.shape[1] == 41
    pending = []
    for b in (9, 13):  # two batches in flight alternate between the host buffers
        view = bufs.device_view(b)
        values = torch.randn(view.shape, generator=torch.Generator().manual_seed(b)).to(torch.float16)
        view.copy_(values.to(device))
        transfer = bufs.to_host(view)
        if bufs.on_host:
            np.testing.assert_array_equal(transfer.wait(), values.numpy())
        else:
            pending.append((transfer, values))
    for transfer, values in pending:
        assert transfer.host.is_pinned()
        np.testing.assert_array_equal(transfer.wait(), values.numpy())
