"""Geneformer's checkpoint folders: finding the gene dictionaries, reading the weights, the family object.

:class:`GeneformerFamily` fills in the loading template (:class:`~cellstrata.engine.models.family.CheckpointFamily`):
a folder holds ``config.json``, ``model.safetensors`` or ``pytorch_model.bin`` (first present wins) and the
gene dictionaries of the model's generation (:func:`find_dictionaries`). The dictionaries decide the layout:
with ``<cls>``/``<eos>`` (V2) cells are ``<cls> genes <eos>`` and ``official`` is the ``<cls>`` token, without
them (V1, preset ``v1-10m``) cells are the ranked genes alone and ``official`` is their mean.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from ...input.datasets import gene_ensembl_ids
from ..base import LoadedModel, SpecialLayout, Tokenizer
from ..checkpoints import (
    check_state_dict,
    describe_files,
    load_plain_pickle,
    load_state_dict,
    read_json,
    save_safetensors,
)
from ..family import FAN_IN, NORM_WEIGHT, CheckpointFamily, FamilyCheckpoint, random_tensors
from .config import (
    CONFIG_FILE,
    DICT_DIRS,
    DICT_ROLES,
    DICT_SUFFIXES,
    FAMILY_NAME,
    MASK_TOKEN,
    PAD_TOKEN,
    PRESET_KEY,
    PRESET_SUFFIX,
    PRESETS,
    SPECIAL_TOKENS,
    WEIGHTS_FILES,
    GeneformerConfig,
    match_preset,
    official_key_shapes,
)
from .modeling import GeneformerModel
from .tokenizer import GeneDictionaries, GeneformerTokenizer, has_special_tokens

# official: EmbExtractor's default, emb_mode="cls" for V2 (the <cls> token, an alias of cls) and "cell" for V1
# (model_version="V1" switches cls to cell: the mean over gene tokens, an alias of mean)
V1_POOL_OPS = {"mean": "mean", "max": "max", "official": "mean"}
V2_POOL_OPS = {"mean": "mean", "max": "max", "cls": "first", "official": "first"}


# ------------------------------------------------------------------------------------------------
# gene dictionaries


def _read_dictionary(path: Path, what: str, value: type) -> dict[str, Any]:
    """A pickled ``dict`` of str -> ``value`` (numpy scalars are converted); refuses anything else."""
    raw = load_plain_pickle(path, what)
    if not isinstance(raw, dict) or not raw:
        msg = f"{what} {path} must be a non-empty pickled dict"
        raise CheckpointError(msg)
    out: dict[str, Any] = {}
    for key, val in raw.items():
        if not isinstance(key, str):
            msg = f"{what} {path}: keys must be strings, found {key!r}"
            raise CheckpointError(msg)
        try:
            if value is str:
                if not isinstance(val, str):
                    raise TypeError(f"value of {key!r} is not a string")
                out[key] = val
            elif value is int:
                if isinstance(val, bool) or int(val) != val:
                    raise TypeError(f"value of {key!r} is not an integer")
                out[key] = int(val)
            else:
                out[key] = float(val)
        except (TypeError, ValueError) as exc:
            msg = f"{what} {path}: {exc}"
            raise CheckpointError(msg) from None
    return out


def find_dictionaries(
    folder: Path, vocab_size: int, overrides: Mapping[str, str | Path | None] | None = None
) -> dict[str, Path]:
    """Locate the dictionaries of a checkpoint folder; ``{role: path}`` for the roles found.

    Rule: an explicit option (``token_dictionary=``, ``gene_median_dictionary=``,
    ``gene_name_id_dictionary=``, ``ensembl_mapping_dictionary=``) wins. Otherwise the token dictionary
    is the first file named ``token_dictionary{suffix}.pkl`` (suffix ``_gc104M``, ``_gc95M``, ``_gc30M``,
    none) in the folder, its ``geneformer/`` and ``geneformer/gene_dictionaries_30m/`` subfolders, or those
    of its parent (a Hugging Face snapshot), whose size equals ``config.json``'s ``vocab_size``; the other
    dictionaries are taken from the same folder with the same suffix.
    """
    given = {k: Path(v).expanduser() for k, v in (overrides or {}).items() if v is not None}
    found: dict[str, Path] = {}
    for role, path in given.items():
        if not path.is_file():
            msg = f"Geneformer {role.replace('_', ' ')} {path} does not exist"
            raise CheckpointError(msg)
        found[role] = path
    if "token_dictionary" in found:
        base, name = found["token_dictionary"].parent, found["token_dictionary"].name
        suffix = next((sfx for sfx in DICT_SUFFIXES if name == DICT_ROLES["token_dictionary"].format(sfx)), None)
    else:
        base, suffix, seen = None, None, []
        for rel in DICT_DIRS:
            d = (folder / rel).resolve()
            for sfx in DICT_SUFFIXES:
                p = d / DICT_ROLES["token_dictionary"].format(sfx)
                if p.is_file():
                    n = len(load_plain_pickle(p, "Geneformer token dictionary") or {})
                    seen.append(f"{p} ({n} tokens)")
                    if n == vocab_size and base is None:
                        base, suffix = d, sfx
        if base is None:
            found_txt = "; found " + ", ".join(seen) if seen else ""
            msg = (
                f"no Geneformer token dictionary with {vocab_size} tokens (config.json vocab_size) next to "
                f"{folder}{found_txt}. Copy the dictionaries of this model's generation from the geneformer "
                "package (V2: token_dictionary_gc104M.pkl and gene_median_dictionary_gc104M.pkl; V1: "
                "gene_dictionaries_30m/token_dictionary_gc30M.pkl and gene_median_dictionary_gc30M.pkl) into "
                "the checkpoint folder, or pass token_dictionary= and gene_median_dictionary="
            )
            raise CheckpointError(msg)
        found["token_dictionary"] = base / DICT_ROLES["token_dictionary"].format(suffix)
    assert base is not None  # the token dictionary's folder, from either branch
    for role, pattern in DICT_ROLES.items():
        if role in found:
            continue
        sfxs = (suffix,) if suffix is not None else DICT_SUFFIXES
        for sfx in sfxs:
            p = base / pattern.format(sfx)
            if p.is_file():
                found[role] = p
                break
    if "gene_median_dictionary" not in found:
        msg = (
            f"no Geneformer gene median dictionary beside {found['token_dictionary']}; expected "
            f"{DICT_ROLES['gene_median_dictionary'].format(suffix or '')} there (from the same geneformer "
            "package release), or pass gene_median_dictionary="
        )
        raise CheckpointError(msg)
    return found


def read_dictionaries(paths: Mapping[str, Path]) -> GeneDictionaries:
    """Read the dictionaries found by :func:`find_dictionaries` (plain data only)."""
    token = _read_dictionary(paths["token_dictionary"], "Geneformer token dictionary", int)
    median = _read_dictionary(paths["gene_median_dictionary"], "Geneformer gene median dictionary", float)
    symbols = ensembl = None
    if "gene_name_id_dictionary" in paths:
        symbols = _read_dictionary(paths["gene_name_id_dictionary"], "Geneformer gene name dictionary", str)
    if "ensembl_mapping_dictionary" in paths:
        ensembl = _read_dictionary(paths["ensembl_mapping_dictionary"], "Geneformer Ensembl mapping dictionary", str)
    return GeneDictionaries(token, median, symbols, ensembl, dict(paths))


# ------------------------------------------------------------------------------------------------
# weights


def _encoder_state(
    raw: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], path: Path
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keys of ``raw`` under ``bert.`` (or a bare ``BertModel`` file) -> the model's; the rest is ignored.

    Encoder keys (``embeddings.*``, ``encoder.*``) are checked by name and shape; the MLM head
    (``cls.*``), a pooler and the ``position_ids``/``token_type_ids`` buffers of old files are ignored.
    """
    prefix = "bert." if any(k.startswith("bert.") for k in raw) else ""
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    buffers = ("embeddings.position_ids", "embeddings.token_type_ids")
    for key, tensor in raw.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name is None or name in buffers or not name.startswith(("embeddings.", "encoder.")):
            ignored.append(key)
        else:
            state[name] = tensor
    check_state_dict(
        state,
        expected,
        what=f"Geneformer checkpoint {path}",
        hint=f"Check that {CONFIG_FILE} and the weights come from the same model folder.",
    )
    return state, sorted(ignored)


def init_rule(key: str, shape: tuple[int, ...]) -> str | float:
    """Linear weights ~ N(0, 1/fan_in) (so attention is far from uniform), embeddings ~ N(0, 0.5²),
    LayerNorm weights 1 ± 0.1 and biases ± 0.05, so a swapped or ignored parameter shows in every layer."""
    last = key.rsplit(".", 1)[-1]
    if "LayerNorm" in key and last == "weight":
        return NORM_WEIGHT
    if last == "bias":
        return 0.05
    return 0.5 if "embeddings" in key else FAN_IN


def random_state_dict(config: GeneformerConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights with the released key set and non-trivial activations (:func:`init_rule`)."""
    return random_tensors(official_key_shapes(config), seed, init_rule)


def _max_length(config: GeneformerConfig, options: Mapping[str, Any]) -> int:
    """The ``max_length`` option, by default ``max_position_embeddings`` (the tokenizer's ``model_input_size``)."""
    max_length = options.get("max_length")
    if max_length is None:
        max_length = config.max_position_embeddings
    if not 1 <= int(max_length) <= config.max_position_embeddings:
        msg = f"Geneformer max_length must be between 1 and {config.max_position_embeddings}, got {max_length}"
        raise ConfigError(msg)
    return int(max_length)


# ------------------------------------------------------------------------------------------------
# the family


class GeneformerFamily(CheckpointFamily):
    """The ``FAMILY`` object of Geneformer (see :class:`~cellstrata.engine.models.base.ModelFamily`).

    Options: ``max_length`` (the model input size; default ``max_position_embeddings``, as the official
    tokenizer's ``model_input_size``), ``seed`` (accepted for the common interface; no randomness), the four
    dictionary paths of :func:`find_dictionaries`, and the tokenizer's ``duplicate_genes`` (``official`` or
    ``sum``) and ``stored_zeros`` (``keep`` or ``drop``; see :class:`GeneformerTokenizer`). Layout, pool ops
    and default poolings follow the checkpoint's dictionary (V1 or V2); the class defaults are V1's.
    """

    name = FAMILY_NAME
    title = "Geneformer"
    presets: ClassVar[Mapping[str, GeneformerConfig]] = PRESETS
    default_poolings: ClassVar[tuple[str, ...]] = ("mean",)
    pool_ops: ClassVar[Mapping[str, str]] = V1_POOL_OPS
    options = ("max_length", "seed", *DICT_ROLES, "duplicate_genes", "stored_zeros")

    def locate(self, checkpoint: str | Path, options: Mapping[str, Any]) -> Path:
        """The folder, holding ``config.json`` and one of the two weight files (one ``CheckpointError`` otherwise)."""
        folder = Path(checkpoint).expanduser()
        weights = " or ".join(WEIGHTS_FILES)
        if not folder.is_dir():
            problem = (
                f"does not exist or is not a folder; it must contain {CONFIG_FILE} and {weights} "
                "(a released model folder such as Geneformer-V2-104M)"
            )
        else:
            present = {
                CONFIG_FILE: (folder / CONFIG_FILE).is_file(),
                weights: any(folder.joinpath(f).is_file() for f in WEIGHTS_FILES),
            }
            if all(present.values()):
                return folder
            absent = ", ".join(name for name, here in present.items() if not here)
            problem = f"lacks {absent}; it must contain {CONFIG_FILE} (model settings) and {weights} (weights)"
        raise CheckpointError(f"Geneformer checkpoint folder {folder} {problem}")

    def read_checkpoint(self, folder: Path, options: Mapping[str, Any]) -> FamilyCheckpoint:
        weights = next(f for f in WEIGHTS_FILES if (folder / f).is_file())
        cfg = read_json(folder / CONFIG_FILE, "Geneformer settings")
        if not isinstance(cfg, dict):
            msg = f"Geneformer {folder / CONFIG_FILE} must be a JSON object"
            raise CheckpointError(msg)
        config = GeneformerConfig.from_config(cfg)
        max_length = _max_length(config, options)
        paths = find_dictionaries(folder, config.vocab_size, {role: options.get(role) for role in DICT_ROLES})
        dictionaries = read_dictionaries(paths)
        if max(dictionaries.token.values()) >= config.vocab_size or min(dictionaries.token.values()) < 0:
            msg = (
                f"the Geneformer token dictionary {paths['token_dictionary']} holds ids outside 0.."
                f"{config.vocab_size - 1} ({CONFIG_FILE} vocab_size); use the dictionary of this model's generation"
            )
            raise CheckpointError(msg)
        ckpt = self._checkpoint(config, match_preset(cfg, config), dictionaries, max_length)
        ckpt.weights_file, ckpt.files = weights, (CONFIG_FILE, weights)
        ckpt.info["weights_file"] = weights
        return ckpt

    def preset_checkpoint(
        self, preset: str, config: GeneformerConfig, vocabulary: GeneDictionaries, seed: int, options: Mapping[str, Any]
    ) -> FamilyCheckpoint:
        return self._checkpoint(config, preset, vocabulary, _max_length(config, options))

    @staticmethod
    def _checkpoint(
        config: GeneformerConfig, preset: str | None, dictionaries: GeneDictionaries, max_length: int
    ) -> FamilyCheckpoint:
        special = has_special_tokens(dictionaries.token)
        settings = dict(config.to_config())
        settings.update({"preset": preset, "max_length": max_length})
        return FamilyCheckpoint(
            config=config,
            preset=preset,
            vocabulary=dictionaries,
            settings=settings,
            layout=SpecialLayout(n_leading=1, n_trailing=1, has_cls=True) if special else SpecialLayout(0, 0, False),
            official_layer=config.num_hidden_layers - 1,  # hidden_states[quant_layers + emb_layer(-1)], V1 and V2
            pool_ops=V2_POOL_OPS if special else V1_POOL_OPS,
            default_poolings=("mean", "cls") if special else ("mean",),
        )

    def make_tokenizer(self, ckpt: FamilyCheckpoint, options: Mapping[str, Any]) -> GeneformerTokenizer:
        tokenizer = GeneformerTokenizer(
            ckpt.vocabulary,
            max_length=ckpt.settings["max_length"],
            pad_token_id=ckpt.config.pad_token_id,
            duplicate_genes=str(options.get("duplicate_genes", "official")),
            stored_zeros=str(options.get("stored_zeros", "keep")),
        )
        ckpt.info["genes_without_median"] = tokenizer.n_without_median
        return tokenizer

    def build_model(self, ckpt: FamilyCheckpoint) -> GeneformerModel:
        return GeneformerModel(ckpt.config)

    def module_state(self, folder: Path, ckpt: FamilyCheckpoint, expected: Mapping[str, torch.Size]) -> dict:
        path = folder / ckpt.weights_file
        state, ckpt.info["ignored_keys"] = _encoder_state(load_state_dict(path), expected, path)
        return state

    def assemble(
        self, ckpt: FamilyCheckpoint, model: nn.Module, tokenizer: Tokenizer, record: dict, **kw: Any
    ) -> LoadedModel:
        """The template's, with each dictionary read listed in the record's files by role (with its path)."""
        if record.get("files") is not None:  # read from a folder (not built in memory)
            for role, p in (ckpt.vocabulary.paths or {}).items():
                record["files"][role] = {"path": str(p.resolve()), **describe_files(p.parent, [p.name])[p.name]}
        return super().assemble(ckpt, model, tokenizer, record, **kw)

    def preset_vocabulary(
        self, preset: str, genes: Sequence[str] | None, seed: int
    ) -> tuple[GeneformerConfig, GeneDictionaries]:
        """The preset's config and dictionaries: ``genes`` (Ensembl ids) or the synthetic genes' ids
        (``gene_ensembl_ids``) after the special tokens of its generation (``<cls>``/``<eos>`` for V2 and
        ``tiny``, none for V1); medians are random (seeded)."""
        config = self.preset_config(preset)
        specials = (PAD_TOKEN, MASK_TOKEN) if PRESET_SUFFIX[preset] == "_gc30M" else SPECIAL_TOKENS
        gene_list = list(genes) if genes is not None else gene_ensembl_ids(config.vocab_size - len(specials))
        if len(set(gene_list)) != len(gene_list) or set(gene_list) & set(SPECIAL_TOKENS):
            msg = "genes must be unique and must not contain the special tokens <pad>, <mask>, <cls>, <eos>"
            raise ConfigError(msg)
        if not gene_list:
            raise ConfigError("genes must not be empty")
        config = replace(config, vocab_size=len(gene_list) + len(specials))
        token = {t: i for i, t in enumerate(specials)}
        token.update({g: len(specials) + i for i, g in enumerate(gene_list)})
        rng = np.random.default_rng((int(seed), 7))
        medians = np.exp(rng.normal(0.5, 0.7, len(gene_list)))
        return config, GeneDictionaries(token=token, median={g: float(m) for g, m in zip(gene_list, medians)})

    def random_module_state(self, ckpt: FamilyCheckpoint, seed: int) -> dict[str, torch.Tensor]:
        # the encoder keys come first in the released key order, so leaving out the MLM head draws the same
        shapes = {k: s for k, s in official_key_shapes(ckpt.config).items() if k.startswith("bert.")}
        return {k[len("bert.") :]: t for k, t in random_tensors(shapes, seed, init_rule).items()}

    def write_files(
        self, folder: Path, preset: str, config: GeneformerConfig, vocabulary: GeneDictionaries, seed: int
    ) -> None:
        """``config.json``, ``model.safetensors`` and the token and median dictionaries, named after the
        preset's generation (``*_gc104M.pkl`` for V2 and ``tiny``, ``*_gc30M.pkl`` for V1)."""
        suffix = PRESET_SUFFIX[preset]
        for role, d in (("token_dictionary", vocabulary.token), ("gene_median_dictionary", vocabulary.median)):
            with (folder / DICT_ROLES[role].format(suffix)).open("wb") as f:
                pickle.dump(d, f, protocol=4)
        cfg = config.to_config()
        cfg[PRESET_KEY] = preset
        cfg["random_init_seed"] = int(seed)
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        save_safetensors(random_state_dict(config, seed=seed), folder / WEIGHTS_FILES[0])


FAMILY = GeneformerFamily()

__all__ = [
    "FAMILY",
    "V1_POOL_OPS",
    "V2_POOL_OPS",
    "GeneformerFamily",
    "find_dictionaries",
    "init_rule",
    "random_state_dict",
    "read_dictionaries",
]
