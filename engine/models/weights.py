"""Where a store's weights come from: released checkpoints, or random weights from ``init-checkpoint``.

``cellstrata init-checkpoint`` (and the demo) write :data:`MARKER` into the folder they create, and every
family's ``init_checkpoint`` writes ``random_init_seed`` into the checkpoint's own config file
(``args.json``, ``model_config.yml``, ``config.json``, or the config inside scFoundation's
``models.ckpt``). An extraction records :func:`random_init_of` of its checkpoint folder in the store's
``weights`` attribute; :func:`weights_provenance` reads a store's attributes (and, for stores written
before that attribute, the recorded config and the checkpoint folder if it still exists), so the probe
report can say "random weights".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MARKER = "cellstrata_random_init.json"
SEED_KEY = "random_init_seed"
CONFIG_FILES = ("args.json", "config.json", "model_config.yml")  # scGPT, Geneformer, Tahoe-X1
MAX_CONFIG_BYTES = 1 << 20


def mark_random_init(folder: str | Path, *, family: str, preset: str, seed: int) -> Path:
    """Write :data:`MARKER` into ``folder`` (a checkpoint written with random weights); return its path."""
    path = Path(folder) / MARKER
    record = {"weights": "random", "family": family, "preset": preset, "seed": int(seed)}
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def random_init_of(folder: str | Path | None) -> dict[str, Any] | None:
    """``{"weights": "random", "seed": ..., "evidence": ...}`` when ``folder`` holds random weights, else None.

    Evidence: the marker, or ``random_init_seed`` at the top of a small config file of the folder.
    """
    if folder is None:
        return None
    root = Path(str(folder)).expanduser()
    if not root.is_dir():
        return None
    marker = root / MARKER
    if marker.is_file():
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            record = {}
        seed = record.get("seed") if isinstance(record, dict) else None
        return {"weights": "random", "seed": seed, "evidence": MARKER}
    for name in CONFIG_FILES:
        path = root / name
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            continue
        config = _read_config(path)
        if isinstance(config, Mapping) and config.get(SEED_KEY) is not None:
            return {"weights": "random", "seed": int(config[SEED_KEY]), "evidence": f"{name} {SEED_KEY}"}
    return None


def weights_provenance(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """A store's weights record from its ``cellstrata`` attributes (None: as given, nothing says otherwise)."""
    recorded = attrs.get("weights")
    if isinstance(recorded, Mapping):
        return dict(recorded)
    model = attrs.get("model") or {}
    seed = (model.get("config") or {}).get(SEED_KEY)
    if seed is not None:
        return {"weights": "random", "seed": int(seed), "evidence": f"model config {SEED_KEY}"}
    return random_init_of(model.get("checkpoint"))


def _read_config(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception:  # an unreadable config says nothing about the weights
        return None
