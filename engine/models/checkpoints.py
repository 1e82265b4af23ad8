"""Reading official checkpoint files safely, shared by every model family.

Nothing here can run code stored in a file: torch pickles are read with ``weights_only=True``,
safetensors are plain tensors, and Python pickles (Geneformer's gene dictionaries) go through a
restricted unpickler that only builds plain containers, strings and numbers.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {bytes, sha256}}`` of the files of a checkpoint folder that exist."""
    out = {}
    for name in names:
        p = Path(folder) / name
        if p.is_file():
            out[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def checkpoint_folder(checkpoint: str | Path, required: Sequence[str], *, model: str, origin: str) -> Path:
    """The checkpoint folder, or one ``CheckpointError`` naming what is missing and where it comes from."""
    folder = Path(checkpoint).expanduser()
    need = f"it must contain {', '.join(required)} ({origin})"
    if not folder.is_dir():
        msg = f"{model} checkpoint folder {folder} does not exist or is not a folder; {need}"
        raise CheckpointError(msg)
    absent = [f for f in required if not (folder / f).is_file()]
    if absent:
        msg = f"{model} checkpoint folder {folder} lacks {', '.join(absent)}; {need}"
        raise CheckpointError(msg)
    return folder


def refuse_unknown_options(model: str, unknown: Mapping[str, Any], accepted: Sequence[str]) -> None:
    """``ConfigError`` when a loader got options it does not know (they come from ``--model-option``)."""
    if unknown:
        msg = f"{model} does not take the option(s) {', '.join(sorted(unknown))}; it takes {', '.join(accepted)}"
        raise ConfigError(msg)


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file; ``CheckpointError`` naming ``what`` (e.g. "scGPT vocabulary") when it cannot."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"cannot read {what} {path}: {exc}"
        raise CheckpointError(msg) from None


def read_vocab_json(path: Path, what: str, specials: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """A ``vocab.json`` (token -> id 0..V-1) with ``specials`` appended in order when missing.

    Returns the vocabulary and the special tokens that were appended (scGPT's ``embed_data`` and
    Tahoe-X1's ``prepare_for_inference.py`` both append ``<pad>``, ``<cls>``, ``<eoc>`` this way).
    """
    raw = read_json(path, what)
    if not isinstance(raw, dict) or not raw:
        msg = f"{what} {path} must be a non-empty JSON object token -> id"
        raise CheckpointError(msg)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in raw.values()):
        msg = f"{what} {path}: every id must be an integer"
        raise CheckpointError(msg)
    if sorted(raw.values()) != list(range(len(raw))):
        msg = f"{what} {path}: ids must be 0..{len(raw) - 1}, each used once"
        raise CheckpointError(msg)
    vocab = dict(raw)
    appended = []
    for tok in specials:
        if tok not in vocab:
            vocab[tok] = len(vocab)
            appended.append(tok)
    return vocab, appended


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file (safe loader: plain data only)."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        msg = f"cannot read {what} {path}: {exc}"
        raise CheckpointError(msg) from None


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        msg = f"{path} is not a state dict (a mapping of parameter names to tensors)"
        raise CheckpointError(msg)
    return dict(obj)


def load_torch_weights(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; ``CheckpointError`` for code-bearing or corrupt files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code-bearing pickles, RuntimeError for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = (
            f"cannot read {path} as plain weights (torch.load(weights_only=True): {first}); "
            "cellstrata only loads tensors and plain data and never runs code stored in a checkpoint"
        )
        raise CheckpointError(msg) from None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat tensor state dict from ``.safetensors`` or a torch pickle (``weights_only=True``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (OSError, SafetensorError) as exc:
            msg = f"cannot read {path} as safetensors: {exc}"
            raise CheckpointError(msg) from None
    return _as_state_dict(load_torch_weights(path), path)


def save_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write a state dict as safetensors (contiguous copies; shared storage is not allowed there)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))


def check_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], *, what: str, hint: str
) -> None:
    """Raise one ``CheckpointError`` naming every missing, mis-shaped and unexpected key.

    ``state`` holds only the keys the model uses (after the family's renaming); keys the family
    deliberately ignores (decoder heads, ...) must be dropped before.
    """
    problems = []
    missing = [k for k in expected if k not in state]
    if missing:
        problems.append("missing: " + ", ".join(missing))
    misshaped = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(shape)})"
        for k, shape in expected.items()
        if k in state and state[k].shape != shape
    ]
    if misshaped:
        problems.append("wrong shape: " + ", ".join(misshaped))
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if problems:
        msg = f"{what} does not match the model ({'; '.join(problems)}). {hint}"
        raise CheckpointError(msg)


# Python pickles: only plain data. Geneformer's dictionaries are dicts of str -> int / float, where the
# floats may be numpy scalars.
_SAFE_GLOBALS = {
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "bool"),
    ("collections", "OrderedDict"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        msg = f"refusing to load {module}.{name}: only plain data (dicts, strings, numbers) is accepted"
        raise pickle.UnpicklingError(msg)


def load_plain_pickle(path: Path, what: str) -> Any:
    """Unpickle a file that may only contain plain data (no classes, no code)."""
    try:
        data = Path(path).read_bytes()
        return _PlainDataUnpickler(io.BytesIO(data)).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        msg = f"cannot read {what} {path}: {exc}"
        raise CheckpointError(msg) from None
