"""Run the Triton kernels through the interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before triton is first imported, so this happens here, before any
test module is collected. On a machine with CUDA the kernels run compiled on the GPU instead.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
