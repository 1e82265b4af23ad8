"""Registry of the model families cellstrata can extract (``get_family("scgpt")``)."""

from __future__ import annotations

from ..errors import ConfigError
from .base import ModelFamily
from .scgpt import FAMILY as _SCGPT

FAMILIES: dict[str, ModelFamily] = {_SCGPT.name: _SCGPT}


def get_family(name: str) -> ModelFamily:
    """The :class:`ModelFamily` called ``name`` (case-insensitive); ``ConfigError`` if unknown."""
    key = str(name).strip().lower()
    try:
        return FAMILIES[key]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        msg = f"unknown model {name!r}; known models: {known}"
        raise ConfigError(msg) from None


__all__ = ["FAMILIES", "get_family"]
