"""The pooled-output buffer of a batch: one device buffer, one asynchronous copy to pinned host memory.

Every layer's poolings are written into ``device[L+1, B, F]`` (``F`` = the widths of all poolings side
by side, so a kernel writing several poolings of width ``H`` sees a ``[P, B, H]`` strided view of its
columns); after the forward pass the whole
buffer goes to the host in a single non-blocking copy (into pinned memory on CUDA, so the copy is
truly asynchronous). Two pinned host buffers alternate, so the host can put batch ``k``'s rows in
place while the device already runs batch ``k+1``. Buffers are allocated once and grow with the
largest batch seen; each batch uses a contiguous view of their first elements. On CPU the device
buffer is the host buffer and nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Transfer:
    """A batch's pooled values in flight to the host; :meth:`wait` returns them as ``[L+1, B, F]``."""

    host: torch.Tensor
    event: torch.cuda.Event | None

    def wait(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


class PooledBuffers:
    """Preallocated ``[L+1, B, F]`` device buffer and its pinned host twins (see the module docstring)."""

    def __init__(self, n_layers: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n_layers = n_layers
        self.width = width
        self.dtype = dtype
        self.device = device
        self.on_host = device.type == "cpu"
        self._device_flat = torch.empty(0, dtype=dtype, device=device)
        self._host_flat = [torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype)]
        self._turn = 0

    def _numel(self, n_cells: int) -> int:
        return self.n_layers * n_cells * self.width

    def device_view(self, n_cells: int) -> torch.Tensor:
        """The buffer for a batch of ``n_cells`` (contents undefined until the kernels write it)."""
        need = self._numel(n_cells)
        if self._device_flat.numel() < need:
            self._device_flat = torch.empty(need, dtype=self.dtype, device=self.device)
        return self._device_flat[:need].view(self.n_layers, n_cells, self.width)

    def to_host(self, view: torch.Tensor) -> Transfer:
        """Start the one copy of a batch's buffer to the host (no copy on CPU)."""
        if self.on_host:
            return Transfer(view, None)
        self._turn ^= 1
        need = view.numel()
        if self._host_flat[self._turn].numel() < need:
            self._host_flat[self._turn] = torch.empty(need, dtype=self.dtype, pin_memory=True)
        host = self._host_flat[self._turn][:need].view(view.shape)
        host.copy_(view, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return Transfer(host, event)
