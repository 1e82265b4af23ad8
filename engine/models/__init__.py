"""Registry of the model families cellstrata can extract (``get_family("scgpt")``).

The four built-in families are packages under ``engine/models/`` imported on first use, so a family's
dependencies cost nothing until it is asked for. Another family joins with :func:`register_family`
(a :class:`~.family.CheckpointFamily` subclass instance; see "Adding a model family" in docs/design.md).
"""

from __future__ import annotations

import importlib
import importlib.util

from ..errors import ConfigError
from .base import ModelFamily

# model name -> package under engine/models/
FAMILY_MODULES: dict[str, str] = {
    "scgpt": "scgpt",
    "tahoe-x1": "tahoe_x1",
    "scfoundation": "scfoundation",
    "geneformer": "geneformer",
}

# families registered at run time (name -> family object)
_REGISTERED: dict[str, ModelFamily] = {}


def family_names() -> list[str]:
    """Names of the built-in families whose package is present, then the registered ones."""
    built_in = [name for name, mod in FAMILY_MODULES.items() if importlib.util.find_spec(f"{__name__}.{mod}")]
    return built_in + [name for name in _REGISTERED if name not in FAMILY_MODULES]


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` available under ``family.name`` (lower case) to ``get_family``, ``extract`` and the CLI
    of this process; ``ConfigError`` if a built-in family has that name. Returns the family."""
    key = str(family.name).strip().lower()
    if key in FAMILY_MODULES:
        msg = f"{family.name!r} is a built-in model family; give the new family another name"
        raise ConfigError(msg)
    _REGISTERED[key] = family
    return family


def unregister_family(name: str) -> None:
    """Forget a family added with :func:`register_family` (no-op when absent)."""
    _REGISTERED.pop(str(name).strip().lower(), None)


def get_family(name: str) -> ModelFamily:
    """The :class:`ModelFamily` called ``name`` (case-insensitive); ``ConfigError`` if unknown."""
    key = str(name).strip().lower()
    if key in _REGISTERED:
        return _REGISTERED[key]
    module = FAMILY_MODULES.get(key)
    if module is None or key not in family_names():
        msg = f"unknown model {name!r}; known models: {', '.join(family_names())}"
        raise ConfigError(msg)
    return importlib.import_module(f"{__name__}.{module}").FAMILY


__all__ = ["FAMILY_MODULES", "family_names", "get_family", "register_family", "unregister_family"]
