"""scGPT's checkpoint folders: reading ``args.json``/``vocab.json``/``best_model.pt``, writing random ones,
and the family object.

:class:`ScGPTFamily` fills in the loading template (:class:`~cellstrata.engine.models.family.CheckpointFamily`).
The released ``best_model.pt`` is a plain state dict in the flash-attn layout (``self_attn.Wqkv.*``; GitHub
HEAD's ``self_attn._impl.*``) or the torch layout (``self_attn.in_proj_*``); :meth:`ScGPTFamily.module_state`
renames either onto the module and ignores the decoder heads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...errors import CheckpointError, ConfigError
from ...input.datasets import gene_symbols
from ..base import SpecialLayout
from ..checkpoints import load_state_dict, read_json, read_vocab_json
from ..family import FAN_IN, NORM_WEIGHT, CheckpointFamily, FamilyCheckpoint, random_tensors
from .config import (
    ARGS_FILE,
    FAMILY_NAME,
    MODULE_PREFIXES,
    OFFICIAL_MAX_LENGTH,
    OFFICIAL_N_BINS,
    PRESET_ARG,
    PRESETS,
    REQUIRED_FILES,
    SPECIAL_TOKENS,
    VOCAB_FILE,
    WEIGHTS_FILE,
    ScGPTConfig,
    match_preset,
    official_key_shapes,
)
from .modeling import ScGPTModel
from .tokenizer import ScGPTTokenizer


def _read_vocab(path: Path) -> tuple[dict[str, int], list[str]]:
    """``vocab.json`` with ``<pad>``, ``<cls>``, ``<eoc>`` appended when missing, as the official scripts do."""
    return read_vocab_json(path, "scGPT vocabulary", SPECIAL_TOKENS)


def _to_torch_layout(key: str) -> str:
    """Flash-attn names (PyPI ``self_attn.Wqkv``, GitHub HEAD ``self_attn._impl.*``) -> torch names."""
    key = key.replace("self_attn._impl.", "self_attn.")
    return key.replace("self_attn.Wqkv.", "self_attn.in_proj_")


def _check_and_convert(
    raw: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], path: Path
) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """Map ``raw`` onto the model's keys; raise naming every missing/mis-shaped key.

    Returns the state, the ignored keys (decoder heads) and the file's layout (``flash`` or ``torch``).
    An encoder key the model does not have is named by its name in the file.
    """
    converted: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    flash = any(".self_attn.Wqkv." in k or ".self_attn._impl." in k for k in raw)
    for key, tensor in raw.items():
        name = _to_torch_layout(key)
        if name in expected:
            converted[name] = tensor
        else:
            (unexpected if name.startswith(MODULE_PREFIXES) else ignored).append(key)
    found = {
        "missing": [k for k in expected if k not in converted],
        "wrong shape": [
            f"{k} {tuple(converted[k].shape)} (expected {tuple(shape)})"
            for k, shape in expected.items()
            if k in converted and converted[k].shape != shape
        ],
        "unexpected": unexpected,
    }
    problems = [f"{what}: {', '.join(keys)}" for what, keys in found.items() if keys]
    if problems:
        msg = (
            f"scGPT checkpoint {path} does not match the model described by {ARGS_FILE} and "
            f"{VOCAB_FILE} ({'; '.join(problems)}). Check that the three files come from the same "
            "model folder."
        )
        raise CheckpointError(msg)
    return converted, sorted(ignored), "flash" if flash else "torch"


def init_rule(key: str, shape: tuple[int, ...]) -> str | float:
    """LayerNorm weights 1 ± 0.1 and biases (every bias) ± 0.05, gene embeddings N(0, 0.1²), other weights
    N(0, 1/fan_in): non-trivial activations in every layer."""
    last = key.rsplit(".", 1)[-1]
    in_norm = ".norm" in key or "enc_norm" in key or key.startswith("cls_decoder._decoder")
    is_norm = len(shape) == 1 and in_norm
    if is_norm and last == "weight":
        return NORM_WEIGHT
    if is_norm or last.endswith("bias"):
        return 0.05
    return 0.1 if key == "encoder.embedding.weight" else FAN_IN


def random_state_dict(config: ScGPTConfig, *, seed: int = 0, layout: str = "flash") -> dict[str, torch.Tensor]:
    """Seeded random weights with the official key set (heads included) and non-trivial activations."""
    return random_tensors(official_key_shapes(config, layout=layout), seed, init_rule)


def written_args(config: ScGPTConfig, preset: str, seed: int) -> dict[str, Any]:
    """The ``args.json`` that :meth:`ScGPTFamily.init_checkpoint` writes."""
    args = config.to_args()
    args[PRESET_ARG] = preset
    args["random_init_seed"] = int(seed)
    return args


class ScGPTFamily(CheckpointFamily):
    """The ``FAMILY`` object of scGPT (see :class:`~cellstrata.engine.models.base.ModelFamily`).

    Options: ``max_length`` (default: the preset's context, else ``embed_data``'s 1,200) and ``seed`` (the
    tokenizer's random draws).
    """

    name = FAMILY_NAME
    title = "scGPT"
    presets: ClassVar[Mapping[str, ScGPTConfig]] = PRESETS
    default_poolings: ClassVar[tuple[str, ...]] = ("mean", "cls")
    pool_ops: ClassVar[Mapping[str, str]] = {"mean": "mean", "max": "max", "cls": "first", "official": "first_l2"}
    required_files = REQUIRED_FILES
    origin = f"{WEIGHTS_FILE} weights, {ARGS_FILE} settings, {VOCAB_FILE} gene vocabulary, as released"

    def read_checkpoint(self, folder: Path, options: Mapping[str, Any]) -> FamilyCheckpoint:
        args = read_json(folder / ARGS_FILE, "scGPT settings")
        if not isinstance(args, dict):
            msg = f"scGPT {folder / ARGS_FILE} must be a JSON object"
            raise CheckpointError(msg)
        vocab, appended = _read_vocab(folder / VOCAB_FILE)
        try:
            config = ScGPTConfig.from_args(args, vocab_size=len(vocab))
        except ConfigError as exc:
            raise CheckpointError(f"{folder / ARGS_FILE}: {exc}") from None
        ckpt = self._checkpoint(args, config, vocab, options)
        # the record's keys in the order of earlier stores; module_state fills in the first two
        ckpt.info.update({"weights_layout": None, "ignored_keys": None, "appended_special_tokens": appended})
        return ckpt

    def preset_checkpoint(
        self, preset: str, config: ScGPTConfig, vocabulary: dict[str, int], seed: int, options: Mapping[str, Any]
    ) -> FamilyCheckpoint:
        args = written_args(config, preset, seed)
        ckpt = self._checkpoint(args, ScGPTConfig.from_args(args, vocab_size=len(vocabulary)), vocabulary, options)
        # build_random(preset, seed=s) is load(init_checkpoint(preset, seed=s), seed=s): the build's seed is the
        # tokenizer's (the template's build_random keeps ``seed`` out of the options)
        ckpt.extra["seed"] = seed
        return ckpt

    @staticmethod
    def _checkpoint(
        args: dict[str, Any], config: ScGPTConfig, vocab: dict[str, int], options: Mapping[str, Any]
    ) -> FamilyCheckpoint:
        """The checkpoint of ``args.json`` and ``vocab.json``: preset, ``max_length`` option, settings."""
        preset = match_preset(args, config)
        max_length = options.get("max_length")
        if max_length is None:
            max_length = PRESETS[preset].max_length if preset else OFFICIAL_MAX_LENGTH
        config = replace(config, max_length=int(max_length))
        if config.pad_token not in vocab:
            msg = f"scGPT pad_token {config.pad_token!r} of {ARGS_FILE} is not in {VOCAB_FILE}"
            raise CheckpointError(msg)
        settings = dict(args)
        settings.update({"preset": preset, "vocab_size": len(vocab), "max_length": config.max_length})
        return FamilyCheckpoint(
            config=config,
            preset=preset,
            vocabulary=vocab,
            settings=settings,
            layout=SpecialLayout(n_leading=1, n_trailing=0, has_cls=True),
            official_layer=config.nlayers,
            weights_file=WEIGHTS_FILE,
        )

    def make_tokenizer(self, ckpt: FamilyCheckpoint, options: Mapping[str, Any]) -> ScGPTTokenizer:
        config: ScGPTConfig = ckpt.config
        return ScGPTTokenizer(
            ckpt.vocabulary,
            max_length=config.max_length,
            seed=options.get("seed", ckpt.extra.get("seed", 0)),
            n_bins=OFFICIAL_N_BINS,
            pad_token=config.pad_token,
            pad_value=config.pad_value,
        )

    def build_model(self, ckpt: FamilyCheckpoint) -> ScGPTModel:
        return ScGPTModel(ckpt.config)

    def module_state(self, folder: Path, ckpt: FamilyCheckpoint, expected: Mapping[str, torch.Size]) -> dict:
        path = folder / WEIGHTS_FILE
        state, ignored, layout = _check_and_convert(load_state_dict(path), expected, path)
        ckpt.info.update({"weights_layout": layout, "ignored_keys": ignored})
        return state

    def preset_vocabulary(
        self, preset: str, genes: Sequence[str] | None, seed: int
    ) -> tuple[ScGPTConfig, dict[str, int]]:
        """The preset's config and ``vocab.json``: ``genes`` (or the synthetic symbols), then the specials."""
        config = self.preset_config(preset)
        n_specials = len(SPECIAL_TOKENS)
        gene_list = list(genes) if genes is not None else gene_symbols(config.vocab_size - n_specials)
        if len(set(gene_list)) != len(gene_list) or set(gene_list) & set(SPECIAL_TOKENS):
            msg = "genes must be unique and must not contain the special tokens <pad>, <cls>, <eoc>"
            raise ConfigError(msg)
        vocab = {g: i for i, g in enumerate(gene_list)}
        for tok in SPECIAL_TOKENS:
            vocab[tok] = len(vocab)
        return replace(config, vocab_size=len(gene_list) + n_specials), vocab

    def random_module_state(self, ckpt: FamilyCheckpoint, seed: int) -> dict[str, torch.Tensor]:
        # the module's keys come first in the official key order, so leaving out the heads draws the same
        shapes = official_key_shapes(ckpt.config, layout="torch")
        return random_tensors({k: s for k, s in shapes.items() if k.startswith(MODULE_PREFIXES)}, seed, init_rule)

    def write_files(
        self, folder: Path, preset: str, config: ScGPTConfig, vocabulary: dict[str, int], seed: int
    ) -> None:
        """``vocab.json``, ``args.json`` (with the preset's name and the seed) and ``best_model.pt`` (flash layout)."""
        (folder / VOCAB_FILE).write_text(json.dumps(vocabulary, indent=2), encoding="utf-8")
        (folder / ARGS_FILE).write_text(json.dumps(written_args(config, preset, seed), indent=2), encoding="utf-8")
        torch.save(random_state_dict(config, seed=seed, layout="flash"), folder / WEIGHTS_FILE)


FAMILY = ScGPTFamily()

__all__ = [
    "FAMILY",
    "ScGPTFamily",
    "init_rule",
    "random_state_dict",
    "written_args",
]
