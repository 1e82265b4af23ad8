"""Read cells from AnnData inputs as row blocks, never loading the whole matrix.

(Skeleton: CellBlock is the contract; the readers are being filled in.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class CellBlock:
    """Rows ``indices`` (global cell indices, ascending) of the input as CSR ``X [n, n_genes]``."""

    indices: np.ndarray
    X: sp.csr_matrix

    def __len__(self) -> int:
        return len(self.indices)
