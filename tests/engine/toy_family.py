"""A fifth model family in a few lines over the loading template (docs/design.md, "Adding a model family").

Toy: genes in column order behind a ``<cls>``, values ``log1p(count)``; the model embeds gene and value and
runs the shared post-norm encoder layers. Files: ``config.json``, ``vocab.json``, ``model.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from cellstrata.engine.errors import ConfigError
from cellstrata.engine.input.datasets import gene_symbols
from cellstrata.engine.input.sources import CellBlock, check_values
from cellstrata.engine.models.base import NO_TRUNCATION, SpecialLayout, canonical_rows, kept_entries
from cellstrata.engine.models.base import leading_token_block as lead
from cellstrata.engine.models.checkpoints import check_state_dict, load_state_dict, read_json, save_safetensors
from cellstrata.engine.models.family import (
    FAN_IN,
    NORM_WEIGHT,
    CheckpointFamily,
    FamilyCheckpoint,
    VocabularyTokenizer,
    expected_shapes,
    random_tensors,
)
from cellstrata.engine.models.layers import TorchEncoderLayer


class ToyTokenizer(VocabularyTokenizer):
    title, truncation_rule, pad_value = "Toy", NO_TRUNCATION, 0.0

    def __init__(self, vocab: Mapping[str, int], max_length: int | None = None) -> None:
        self.vocab, self.max_length = dict(vocab), max_length
        self.pad_id, self.cls_id = self.vocab["<pad>"], self.vocab["<cls>"]

    n_vocab_genes = property(lambda self: len(self.vocab) - 2)

    def gene_ids(self, names: list[Any]) -> np.ndarray:
        return np.array([-1 if str(g).startswith("<") else self.vocab.get(g, -1) for g in names], dtype=np.int64)

    def vocabulary_examples(self) -> str:
        return "holds e.g.: " + ", ".join(list(self.vocab)[:3])

    def matching_rule(self) -> str:
        return "Toy matches genes by symbol: pick the column of adata.var with --gene-column."

    def settings(self) -> dict[str, Any]:
        return {"family": "toy", "version": "toy-1", "vocab_size": len(self.vocab)}

    def tokenize(self, block: Any, mapping: Any) -> Any:
        X, cells = canonical_rows(block, mapping)
        check_values(CellBlock(cells, X), require_counts=False)
        ids = mapping.token_ids[X.indices]
        kept, counts = kept_entries(X.indptr, (ids >= 0) & (X.data > 0))
        genes, values = (ids, X.data) if kept is None else (ids[kept], X.data[kept])
        values = np.log1p(np.asarray(values, dtype=np.float32))  # float32 first: any input dtype, same tokens
        return lead(cells, self.cls_id, 0.0, genes, values, counts, truncated=counts < 0, empty=counts == 0)

    tokenize_reference = tokenize


class ToyModel(nn.Module):
    def __init__(self, c: Mapping[str, int]) -> None:
        super().__init__()
        self.n_layers, self.hidden_size = c["n_layers"], c["hidden"]
        self.genes, self.value = nn.Embedding(c["vocab_size"], c["hidden"]), nn.Linear(1, c["hidden"])
        self.layers = nn.ModuleList(
            TorchEncoderLayer(c["hidden"], 2, 2 * c["hidden"], 1e-5) for _ in range(c["n_layers"])
        )

    def forward(self, batch: Any, tap: Any) -> None:
        x = self.genes(batch.genes) + self.value(batch.values[..., None].to(self.value.weight.dtype))
        tap(0, x)
        for i, layer in enumerate(self.layers, 1):
            x = layer(x, batch.attention_layout())
            tap(i, x)


class ToyFamily(CheckpointFamily):
    name, title, origin = "toy", "Toy", "as written by init-checkpoint"
    presets: ClassVar = {"tiny": {"n_layers": 3, "hidden": 8, "n_genes": 120}}
    default_poolings, pool_ops = ("mean", "cls"), {"mean": "mean", "max": "max", "cls": "first"}
    required_files = ("config.json", "vocab.json", "model.safetensors")

    def read_checkpoint(self, folder: Path, options: Mapping[str, Any]) -> FamilyCheckpoint:
        config, vocab = read_json(folder / "config.json", "Toy settings"), read_json(folder / "vocab.json", "Toy vocab")
        return self.preset_checkpoint(config.get("preset"), config, vocab, 0, options)

    def preset_checkpoint(self, preset: Any, config: Any, vocab: Any, seed: int, options: Any) -> FamilyCheckpoint:
        return FamilyCheckpoint(config, preset, vocab, dict(config), SpecialLayout(1, 0, True), config["n_layers"],
                                weights_file="model.safetensors")  # fmt: skip

    def make_tokenizer(self, ckpt: FamilyCheckpoint, options: Mapping[str, Any]) -> ToyTokenizer:
        return ToyTokenizer(ckpt.vocabulary, options.get("max_length"))

    def build_model(self, ckpt: FamilyCheckpoint) -> ToyModel:
        return ToyModel(ckpt.config)

    def module_state(self, folder: Path, ckpt: FamilyCheckpoint, expected: Any) -> dict[str, torch.Tensor]:
        state = load_state_dict(folder / "model.safetensors")
        check_state_dict(state, expected, what="Toy weights", hint="Write them with init-checkpoint.")
        return state

    def preset_vocabulary(self, preset: str, genes: Any, seed: int) -> tuple[dict[str, Any], dict[str, int]]:
        config = dict(self.preset_config(preset))
        if genes is not None and len(set(genes)) != len(genes):
            raise ConfigError("genes must be unique")
        names = [*(genes or gene_symbols(config["n_genes"])), "<pad>", "<cls>"]
        return {**config, "vocab_size": len(names), "preset": preset}, {g: i for i, g in enumerate(names)}

    def random_module_state(self, ckpt: FamilyCheckpoint, seed: int) -> dict[str, torch.Tensor]:
        with torch.device("meta"):
            shapes = expected_shapes(ToyModel(ckpt.config))
        return random_tensors(shapes, seed, self.init_rule)

    @staticmethod
    def init_rule(key: str, shape: tuple[int, ...]) -> str | float:
        return NORM_WEIGHT if "norm" in key and key.endswith("weight") else 0.05 if key.endswith("bias") else FAN_IN

    def write_files(self, folder: Path, preset: str, config: Any, vocab: Any, seed: int) -> None:
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "vocab.json").write_text(json.dumps(vocab))
        ckpt = self.preset_checkpoint(preset, config, vocab, seed, {})
        save_safetensors(self.random_module_state(ckpt, seed), folder / "model.safetensors")
