"""Cells in: AnnData row blocks (sources), the read-ahead of tokenized windows (prepare), synthetic data."""
