"""The error hierarchy under its former name: everything here is :mod:`cellstrata.errors`, re-exported.

``from cellstrata.engine.errors import ConfigError`` keeps working and gives the same classes
(``cellstrata.engine.errors.ConfigError is cellstrata.errors.ConfigError``); new code imports
:mod:`cellstrata.errors`.
"""

from __future__ import annotations

from ..errors import (
    CellMismatchError,
    CellstrataError,
    CheckpointError,
    ConfigError,
    EmptyCellError,
    GeneOverlapError,
    IncompleteStoreError,
    IncompleteStoreWarning,
    InputError,
    InvalidValuesError,
    NotCountsError,
    ProbeError,
    StoreConfigMismatchError,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    UnreadableInputError,
    WriteError,
)

__all__ = [
    "CellMismatchError",
    "CellstrataError",
    "CheckpointError",
    "ConfigError",
    "EmptyCellError",
    "GeneOverlapError",
    "IncompleteStoreError",
    "IncompleteStoreWarning",
    "InputError",
    "InvalidValuesError",
    "NotCountsError",
    "ProbeError",
    "StoreConfigMismatchError",
    "StoreCorruptError",
    "StoreError",
    "StoreLockedError",
    "UnreadableInputError",
    "WriteError",
]
