"""Tahoe-X1's checkpoint folders: reading the published files, writing random ones, the family object.

:class:`TahoeX1Family` fills in the loading template (:class:`~cellstrata.engine.models.family.CheckpointFamily`):
a folder holds ``model.safetensors`` (a ``ComposerTX`` state dict, every key prefixed ``model.``), the two YAML
configs and ``vocab.json``; the heads and the drug encoder in the weights are ignored, and ``official`` is a
custom pooling (:class:`~.modeling.OfficialPooling`: the final norm first).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from ...input.datasets import gene_ensembl_ids
from ..base import CustomPooling, SpecialLayout
from ..checkpoints import check_state_dict, load_state_dict, read_vocab_json, save_safetensors
from ..family import FAN_IN, NORM_WEIGHT, CheckpointFamily, FamilyCheckpoint, random_tensors
from .config import (
    COLLATOR_CONFIG_FILE,
    FAMILY_NAME,
    IGNORED_PREFIXES,
    INFERENCE_MAX_LENGTH,
    KEY_PREFIX,
    MODEL_CONFIG_FILE,
    PAD_TOKEN,
    PRESET_FIELD,
    PRESETS,
    REQUIRED_FILES,
    SPECIAL_TOKENS,
    VOCAB_FILE,
    WEIGHTS_FILE,
    TahoeX1Config,
    match_preset,
    official_key_shapes,
    read_config,
)
from .modeling import OfficialPooling, TahoeX1Model
from .tokenizer import TahoeX1Tokenizer, is_special

LAYOUT = SpecialLayout(n_leading=1, n_trailing=0, has_cls=True)  # <cls> first, nothing after the genes


@dataclass(frozen=True)
class TahoeX1Vocabulary:
    """What the tokenizer and the gene embedding are built from: ``vocab.json`` (special tokens appended)
    and the padding id (``collator_config.yml``'s ``pad_token_id``, by default that of ``<pad>``)."""

    tokens: dict[str, int]
    pad_id: int


# ------------------------------------------------------------------------------------------------
# files


def _read_vocab(path: Path) -> tuple[dict[str, int], list[str]]:
    """``vocab.json`` with ``<pad>``, ``<cls>``, ``<eoc>`` appended when missing, as the official scripts do."""
    return read_vocab_json(path, "Tahoe-X1 vocabulary", SPECIAL_TOKENS)


def _config(
    folder: Path, model_cfg: Mapping[str, Any], collator_cfg: Mapping[str, Any], vocab: Mapping[str, int]
) -> TahoeX1Config:
    try:
        config = TahoeX1Config.from_configs(model_cfg, collator_cfg, vocab_size=len(vocab))
    except ConfigError as exc:
        raise CheckpointError(f"{folder / MODEL_CONFIG_FILE}: {exc}") from None
    declared = model_cfg.get("vocab_size")
    if declared is not None and int(declared) != len(vocab):
        msg = (
            f"Tahoe-X1 {MODEL_CONFIG_FILE} says vocab_size {declared} but {VOCAB_FILE} holds {len(vocab)} "
            "tokens (special tokens included); check that both files come from the same model folder"
        )
        raise CheckpointError(msg)
    return config


def _preset_configs(
    preset: str, config: TahoeX1Config, vocabulary: TahoeX1Vocabulary, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``model_config.yml`` and ``collator_config.yml`` that :meth:`TahoeX1Family.init_checkpoint` writes."""
    model_cfg, collator_cfg = config.to_configs()
    model_cfg[PRESET_FIELD] = preset
    model_cfg["random_init_seed"] = int(seed)
    collator_cfg["pad_token_id"] = vocabulary.pad_id
    return model_cfg, collator_cfg


def _split_state(raw: Mapping[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip ``model.``; drop the heads and the drug encoder (returned by their file names)."""
    unprefixed = [k for k in raw if not k.startswith(KEY_PREFIX)]
    if unprefixed:
        msg = (
            f"Tahoe-X1 checkpoint {path} has keys without the '{KEY_PREFIX}' prefix of a ComposerTX state dict "
            f"({', '.join(unprefixed[:5])}{', ...' if len(unprefixed) > 5 else ''}); use the model.safetensors "
            "published with the model"
        )
        raise CheckpointError(msg)
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, tensor in raw.items():
        name = key[len(KEY_PREFIX) :]
        if name.startswith(IGNORED_PREFIXES):
            ignored.append(key)
        else:
            state[name] = tensor
    return state, sorted(ignored)


# ------------------------------------------------------------------------------------------------
# random weights


def init_rule(key: str, shape: tuple[int, ...]) -> str | float:
    """Linear weights ~ N(0, 1/fan_in), biases and LayerNorm biases ~ N(0, 0.05), LayerNorm weights ~
    1 + N(0, 0.1), embeddings ~ N(0, 0.1)."""
    last = key.rsplit(".", 1)[-1]
    is_norm = len(shape) == 1 and ("norm" in key.rsplit(".", 2)[-2])
    if is_norm and last == "weight":
        return NORM_WEIGHT
    if last == "bias":
        return 0.05
    if key.endswith(("embedding.weight", "flag_encoder.weight")):
        return 0.1
    return FAN_IN


def random_state_dict(
    config: TahoeX1Config, *, seed: int = 0, pad_id: int | None = None, heads: bool = True
) -> dict[str, torch.Tensor]:
    """Seeded random weights with the official key set (``model.`` prefix, heads included).

    Scales as :func:`init_rule`; the padding row of the gene embedding is zero, as
    ``nn.Embedding(padding_idx=...)``. ``heads=False`` leaves out the heads, the last keys of the official
    order, so every other key gets the same tensor.
    """
    shapes = official_key_shapes(config)
    if not heads:
        shapes = {k: s for k, s in shapes.items() if not k[len(KEY_PREFIX) :].startswith(IGNORED_PREFIXES)}
    state = random_tensors(shapes, seed, init_rule)
    if pad_id is not None:
        state[f"{KEY_PREFIX}gene_encoder.embedding.weight"][pad_id] = 0.0
    return state


# ------------------------------------------------------------------------------------------------
# the family


class TahoeX1Family(CheckpointFamily):
    """The ``FAMILY`` object of Tahoe-X1 (see :class:`~cellstrata.engine.models.base.ModelFamily`).

    Options: ``max_length`` (default: the preset's, else 2,048 as ``predict.yaml``), ``seed`` (the random
    subset of an over-long cell) and ``stored_zeros``: ``keep`` (official: explicit zeros of a sparse input
    are tokens in bin 1) or ``drop`` (only the non-zero entries).
    """

    name = FAMILY_NAME
    title = "Tahoe-X1"
    presets: ClassVar[Mapping[str, TahoeX1Config]] = PRESETS
    default_poolings: ClassVar[tuple[str, ...]] = ("mean", "official")
    pool_ops: ClassVar[Mapping[str, str]] = {"mean": "mean", "max": "max", "cls": "first"}
    options = ("max_length", "seed", "stored_zeros")
    required_files = REQUIRED_FILES
    origin = "as tahoebio/Tahoe-x1/<size>-model on Hugging Face"

    def read_checkpoint(self, folder: Path, options: Mapping[str, Any]) -> FamilyCheckpoint:
        model_cfg = read_config(folder / MODEL_CONFIG_FILE, "Tahoe-X1 model config")
        collator_cfg = read_config(folder / COLLATOR_CONFIG_FILE, "Tahoe-X1 collator config")
        vocab, appended = _read_vocab(folder / VOCAB_FILE)
        config = _config(folder, model_cfg, collator_cfg, vocab)
        vocabulary = TahoeX1Vocabulary(vocab, int(collator_cfg.get("pad_token_id", vocab[PAD_TOKEN])))
        ckpt = self._checkpoint(model_cfg, config, match_preset(model_cfg, config), vocabulary, options)
        if not 0 <= vocabulary.pad_id < len(vocab):
            msg = (
                f"Tahoe-X1 {COLLATOR_CONFIG_FILE}: pad_token_id {vocabulary.pad_id} is outside the vocabulary "
                f"(0..{len(vocab) - 1})"
            )
            raise CheckpointError(msg)
        ckpt.info.update(
            appended_special_tokens=appended, chem_token_disabled=bool(collator_cfg.get("use_chem_token", False))
        )
        return ckpt

    def preset_checkpoint(
        self,
        preset: str,
        config: TahoeX1Config,
        vocabulary: TahoeX1Vocabulary,
        seed: int,
        options: Mapping[str, Any],
    ) -> FamilyCheckpoint:
        model_cfg, _ = _preset_configs(preset, config, vocabulary, seed)
        ckpt = self._checkpoint(model_cfg, config, preset, vocabulary, options)
        # build_random takes ``seed`` out of the options: it seeds the tokenizer's draws too, as
        # ``load(init_checkpoint(preset, seed=s), seed=s)`` (see make_tokenizer)
        ckpt.extra["seed"] = seed
        return ckpt

    @staticmethod
    def _checkpoint(
        model_cfg: Mapping[str, Any],
        config: TahoeX1Config,
        preset: str | None,
        vocabulary: TahoeX1Vocabulary,
        options: Mapping[str, Any],
    ) -> FamilyCheckpoint:
        """The checkpoint of ``model_config.yml`` and the ``max_length`` option (the preset's by default)."""
        max_length = options.get("max_length")
        if max_length is None:
            max_length = PRESETS[preset].max_length if preset else INFERENCE_MAX_LENGTH
        config = replace(config, max_length=int(max_length))
        settings = {k: v for k, v in model_cfg.items() if k != "chemical_encoder"}
        settings.update(
            {
                "preset": preset,
                "vocab_size": len(vocabulary.tokens),
                "max_length": config.max_length,
                "keep_first_n_tokens": config.keep_first_n_tokens,
                "num_bins": config.num_bins,
                "chem_token": False,
            }
        )
        # official layer: the last block (predict_embeddings.py's cell_emb is its final-norm CLS); weights file
        return FamilyCheckpoint(config, preset, vocabulary, settings, LAYOUT, config.n_layers, WEIGHTS_FILE)

    def make_tokenizer(self, ckpt: FamilyCheckpoint, options: Mapping[str, Any]) -> TahoeX1Tokenizer:
        config, vocabulary = ckpt.config, ckpt.vocabulary
        return TahoeX1Tokenizer(
            vocabulary.tokens,
            max_length=config.max_length,
            seed=options.get("seed", ckpt.extra.get("seed", 0)),
            num_bins=config.num_bins,
            keep_first_n_tokens=config.keep_first_n_tokens,
            pad_token_id=vocabulary.pad_id,
            pad_value=config.pad_value,
            stored_zeros=options.get("stored_zeros", "keep"),
        )

    def build_model(self, ckpt: FamilyCheckpoint) -> TahoeX1Model:
        return TahoeX1Model(ckpt.config, ckpt.vocabulary.pad_id)

    def module_state(self, folder: Path, ckpt: FamilyCheckpoint, expected: Mapping[str, torch.Size]) -> dict:
        path = folder / WEIGHTS_FILE
        state, ckpt.info["ignored_keys"] = _split_state(load_state_dict(path), path)
        check_state_dict(
            state,
            expected,
            what=f"Tahoe-X1 checkpoint {path} (keys without the '{KEY_PREFIX}' prefix)",
            hint=(
                f"Check that the four files come from the same model folder; the weights must be a ComposerTX "
                f"state dict (every key prefixed '{KEY_PREFIX}')."
            ),
        )
        return state

    def custom_poolings(self, model: nn.Module, ckpt: FamilyCheckpoint) -> dict[str, CustomPooling]:
        """``official``: the published cell embedding (the final norm first, :class:`OfficialPooling`)."""
        assert isinstance(model, TahoeX1Model)
        return {"official": OfficialPooling(model.final_norm)}

    def preset_vocabulary(
        self, preset: str, genes: Sequence[str] | None, seed: int
    ) -> tuple[TahoeX1Config, TahoeX1Vocabulary]:
        """The preset's config and vocabulary: ``genes`` (Ensembl ids) or the synthetic genes' ids
        (``gene_ensembl_ids``), then ``<pad>``, ``<cls>``, ``<eoc>``."""
        config = self.preset_config(preset)
        n_specials = len(SPECIAL_TOKENS)
        gene_list = list(genes) if genes is not None else gene_ensembl_ids(config.vocab_size - n_specials)
        if len(set(gene_list)) != len(gene_list) or any(is_special(str(g)) for g in gene_list):
            msg = "genes must be unique and must not start with '<' (reserved for special tokens)"
            raise ConfigError(msg)
        config = replace(config, vocab_size=len(gene_list) + n_specials)
        vocab = {str(g): i for i, g in enumerate(gene_list)}
        for tok in SPECIAL_TOKENS:
            vocab[tok] = len(vocab)
        return config, TahoeX1Vocabulary(vocab, vocab[PAD_TOKEN])

    def random_module_state(self, ckpt: FamilyCheckpoint, seed: int) -> dict[str, torch.Tensor]:
        state = random_state_dict(ckpt.config, seed=seed, pad_id=ckpt.vocabulary.pad_id, heads=False)
        return {k[len(KEY_PREFIX) :]: t for k, t in state.items()}

    def write_files(
        self, folder: Path, preset: str, config: TahoeX1Config, vocabulary: TahoeX1Vocabulary, seed: int
    ) -> None:
        """``vocab.json``, ``model_config.yml``, ``collator_config.yml`` and ``model.safetensors`` (heads included)."""
        import yaml

        (folder / VOCAB_FILE).write_text(json.dumps(vocabulary.tokens, indent=2), encoding="utf-8")
        model_cfg, collator_cfg = _preset_configs(preset, config, vocabulary, seed)
        (folder / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(model_cfg, sort_keys=False), encoding="utf-8")
        (folder / COLLATOR_CONFIG_FILE).write_text(yaml.safe_dump(collator_cfg, sort_keys=False), encoding="utf-8")
        save_safetensors(random_state_dict(config, seed=seed, pad_id=vocabulary.pad_id), folder / WEIGHTS_FILE)


FAMILY = TahoeX1Family()
