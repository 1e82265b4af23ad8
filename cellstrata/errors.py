"""One error hierarchy for everything a user can get wrong.

Every error a user can cause is a :class:`CellstrataError`; the CLI prints its message as one line
and exits non-zero. Messages say what is wrong *and* what to do about it. This module imports nothing
from the package, so every part of it (``kernels/`` included) can raise these errors;
``cellstrata.engine.errors`` re-exports them under their former names.
"""

from __future__ import annotations


class CellstrataError(Exception):
    """Base class of every user-facing error; ``str(err)`` is the whole message."""

    exit_code: int = 2


class InputError(CellstrataError):
    """The input data cannot be read or is not what the model expects."""


class UnreadableInputError(InputError):
    """The input file does not exist, is not AnnData, or is corrupt."""


class GeneOverlapError(InputError):
    """Too few of the input's genes are in the model's vocabulary."""


class InvalidValuesError(InputError):
    """The expression matrix holds negative, NaN or infinite values."""


class NotCountsError(InputError):
    """A normalised or log-transformed matrix was given where raw counts are expected."""


class EmptyCellError(InputError):
    """A cell has no expressed gene in the model's vocabulary (with ``empty_cells='error'``)."""


class CellMismatchError(InputError):
    """A store's cells are not an AnnData's cells (different names, or repeated names that cannot be matched)."""


class CheckpointError(CellstrataError):
    """A checkpoint folder is missing files, has missing or mis-shaped keys, or is not the model asked for."""


class ConfigError(CellstrataError):
    """An option value is invalid (unknown model, pooling, preset, dtype, ...)."""


class StoreError(CellstrataError):
    """A store cannot be created, opened or trusted."""


class StoreConfigMismatchError(StoreError):
    """An existing store was written with another configuration."""


class IncompleteStoreError(StoreError):
    """A store has chunks whose ``done`` flag is not set."""


class StoreLockedError(StoreError):
    """Another extraction holds the store's lease."""


class WriteError(StoreError):
    """Writing a chunk failed (disk full, permissions, ...); committed chunks are intact."""


class StoreCorruptError(StoreError):
    """``cellstrata info --verify`` found chunks or arrays that do not match what was written."""

    exit_code = 3


class ProbeError(CellstrataError):
    """A probe cannot run on the given store and annotations (missing column, too few cells, ...)."""


class IncompleteStoreWarning(UserWarning):
    """A store is read before every chunk is committed: the cells of uncommitted chunks read as NaN."""
