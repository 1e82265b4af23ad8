"""Registry of the model families cellstrata can extract (``get_family("scgpt")``).

Family modules are imported on first use, so a family's dependencies cost nothing until it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util

from ..errors import ConfigError
from .base import ModelFamily

# model name -> module under engine/models/
FAMILY_MODULES: dict[str, str] = {
    "scgpt": "scgpt",
    "tahoe-x1": "tahoe_x1",
    "scfoundation": "scfoundation",
    "geneformer": "geneformer",
}


def family_names() -> list[str]:
    """Names of the families whose module is present."""
    return [name for name, mod in FAMILY_MODULES.items() if importlib.util.find_spec(f"{__name__}.{mod}") is not None]


def get_family(name: str) -> ModelFamily:
    """The :class:`ModelFamily` called ``name`` (case-insensitive); ``ConfigError`` if unknown."""
    key = str(name).strip().lower()
    module = FAMILY_MODULES.get(key)
    if module is None or key not in family_names():
        msg = f"unknown model {name!r}; known models: {', '.join(family_names())}"
        raise ConfigError(msg)
    return importlib.import_module(f"{__name__}.{module}").FAMILY


__all__ = ["FAMILY_MODULES", "family_names", "get_family"]
