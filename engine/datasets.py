"""Synthetic single-cell data for the demo, tests and benchmarks.

(Skeleton: gene naming is the contract shared with the random checkpoints.)
"""

from __future__ import annotations


def gene_symbols(n: int) -> list[str]:
    """``n`` synthetic gene symbols, the same ones the ``tiny`` random checkpoints put in their vocabulary."""
    return [f"SG{i:05d}" for i in range(n)]
