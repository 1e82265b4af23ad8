"""Geneformer's constants, its ``config.json`` (:class:`GeneformerConfig`), presets and released key shapes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import CheckpointError, ConfigError
from ..family import check_sizes

FAMILY_NAME = "geneformer"
CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # first present wins
PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN = "<pad>", "<mask>", "<cls>", "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN)
TARGET_SUM = 10_000  # tokenize_anndata(target_sum=10_000)
TOKENIZER_VERSION = "geneformer-rank-value-2"  # 2: duplicate columns, stored zeros and case as tokenize_anndata
DUPLICATE_GENES = ("official", "sum")  # the duplicate_genes= option; official = sum_ensembl_ids' rule
STORED_ZEROS = ("keep", "drop")  # the stored_zeros= option; keep = tokenize_anndata, drop = tokenize_loom
PRESET_KEY = "cellstrata_preset"  # config.json key written by init_checkpoint
# the config.json fields every checkpoint must give (the model's sizes; GeneformerConfig's first fields)
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)
SUPPORTED_ACTS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh")

# Dictionary file names as shipped in the geneformer package, per generation: V2 (gc104M), the 2024
# 95M series (gc95M), V1 (gc30M, in gene_dictionaries_30m/) and the original V1 names (no suffix).
DICT_SUFFIXES = ("_gc104M", "_gc95M", "_gc30M", "")
DICT_ROLES = {
    "token_dictionary": "token_dictionary{}.pkl",
    "gene_median_dictionary": "gene_median_dictionary{}.pkl",
    "gene_name_id_dictionary": "gene_name_id_dict{}.pkl",
    "ensembl_mapping_dictionary": "ensembl_mapping_dict{}.pkl",
}
# where dictionaries are looked for, relative to the checkpoint folder (a Hugging Face snapshot keeps
# them in geneformer/ beside the model folders, V1's in geneformer/gene_dictionaries_30m/)
DICT_DIRS = (
    ".",
    "geneformer",
    "geneformer/gene_dictionaries_30m",
    "../geneformer",
    "../geneformer/gene_dictionaries_30m",
)


# ------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class GeneformerConfig:
    """The ``BertConfig`` fields the encoder needs (official ``config.json`` names)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.02
    initializer_range: float = 0.02
    position_embedding_type: str = "absolute"

    def __post_init__(self) -> None:
        sizes = (*SIZE_FIELDS, "type_vocab_size")
        check_sizes("Geneformer", self, sizes, width="hidden_size", heads="num_attention_heads")
        if self.hidden_act not in SUPPORTED_ACTS:
            msg = f"Geneformer config: hidden_act {self.hidden_act!r} is not supported; use one of {SUPPORTED_ACTS}"
            raise ConfigError(msg)
        if self.position_embedding_type != "absolute":
            msg = (
                f"Geneformer config: position_embedding_type {self.position_embedding_type!r} is not supported; "
                "the released models use 'absolute'"
            )
            raise ConfigError(msg)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> GeneformerConfig:
        """Build from an official ``config.json`` dict (missing optional fields take ``BertConfig``'s defaults)."""
        missing = [k for k in SIZE_FIELDS if k not in cfg]
        if missing:
            need = ", ".join(SIZE_FIELDS)
            msg = f"Geneformer {CONFIG_FILE} lacks the field(s) {', '.join(missing)}; it must give {need}"
            raise CheckpointError(msg)
        model_type = cfg.get("model_type", "bert")
        if model_type != "bert":
            msg = f"Geneformer {CONFIG_FILE} has model_type {model_type!r}; Geneformer checkpoints are 'bert'"
            raise CheckpointError(msg)
        try:
            sizes: dict[str, Any] = {k: int(cfg[k]) for k in SIZE_FIELDS}
            return cls(
                **sizes,
                hidden_act=str(cfg.get("hidden_act", "gelu")),  # BertConfig's default
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                type_vocab_size=int(cfg.get("type_vocab_size", 2)),
                pad_token_id=int(cfg.get("pad_token_id", 0) or 0),
                hidden_dropout_prob=float(cfg.get("hidden_dropout_prob", 0.1)),
                attention_probs_dropout_prob=float(cfg.get("attention_probs_dropout_prob", 0.1)),
                initializer_range=float(cfg.get("initializer_range", 0.02)),
                position_embedding_type=str(cfg.get("position_embedding_type", "absolute")),
            )
        except (TypeError, ValueError) as exc:
            msg = f"Geneformer {CONFIG_FILE} has an invalid value: {exc}"
            raise CheckpointError(msg) from None
        except ConfigError as exc:
            raise CheckpointError(f"{CONFIG_FILE}: {exc}") from None

    def to_config(self) -> dict[str, Any]:
        """The official ``config.json`` content (as ``BertForMaskedLM.save_pretrained`` writes it)."""
        return {
            "architectures": ["BertForMaskedLM"],
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "classifier_dropout": None,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "bert",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": self.position_embedding_type,
            "torch_dtype": "float32",
            "type_vocab_size": self.type_vocab_size,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def architecture(self) -> tuple[int, ...]:
        return (
            self.num_hidden_layers,
            self.hidden_size,
            self.num_attention_heads,
            self.intermediate_size,
            self.max_position_embeddings,
            self.vocab_size,
        )


PRESETS: dict[str, GeneformerConfig] = {
    # Geneformer-V1-10M (= gf-6L-30M-i2048): config.json verbatim; gc30M dictionaries, no special tokens
    "v1-10m": GeneformerConfig(
        vocab_size=25426,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=2048,
    ),
    # Geneformer-V2-104M / -316M: layers, hidden, heads, input size from the model card; intermediate
    # sizes and vocabulary reproduce the published model.safetensors byte sizes exactly (see tests)
    "v2-104m": GeneformerConfig(
        vocab_size=20275,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=4096,
    ),
    "v2-316m": GeneformerConfig(
        vocab_size=20275,
        hidden_size=1152,
        num_hidden_layers=18,
        num_attention_heads=18,
        intermediate_size=4608,
        max_position_embeddings=4096,
    ),
    # random test model: V2-style special tokens, vocabulary = the synthetic genes' Ensembl-style ids
    "tiny": GeneformerConfig(
        vocab_size=2000 + len(SPECIAL_TOKENS),
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=2048,
    ),
}
# which dictionary generation a preset's init_checkpoint writes
PRESET_SUFFIX = {"v1-10m": "_gc30M", "v2-104m": "_gc104M", "v2-316m": "_gc104M", "tiny": "_gc104M"}


def official_key_shapes(config: GeneformerConfig, *, position_ids: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``BertForMaskedLM``'s saved state dict (the released ``model.safetensors``).

    The MLM head keys ``cls.predictions.*`` are included (the decoder weight is tied to the word
    embeddings and not saved). ``position_ids=True`` adds the ``bert.embeddings.position_ids`` buffer
    (int64 ``[1, max_position_embeddings]``) that older files carry.
    """
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "bert.embeddings.word_embeddings.weight": (v, h),
        "bert.embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "bert.embeddings.LayerNorm.weight": (h,),
        "bert.embeddings.LayerNorm.bias": (h,),
    }
    if position_ids:
        shapes["bert.embeddings.position_ids"] = (1, config.max_position_embeddings)
    for layer in range(config.num_hidden_layers):
        p = f"bert.encoder.layer.{layer}."
        for name in ("query", "key", "value"):
            shapes[f"{p}attention.self.{name}.weight"] = (h, h)
            shapes[f"{p}attention.self.{name}.bias"] = (h,)
        shapes[p + "attention.output.dense.weight"] = (h, h)
        shapes[p + "attention.output.dense.bias"] = (h,)
        shapes[p + "attention.output.LayerNorm.weight"] = (h,)
        shapes[p + "attention.output.LayerNorm.bias"] = (h,)
        shapes[p + "intermediate.dense.weight"] = (i, h)
        shapes[p + "intermediate.dense.bias"] = (i,)
        shapes[p + "output.dense.weight"] = (h, i)
        shapes[p + "output.dense.bias"] = (h,)
        shapes[p + "output.LayerNorm.weight"] = (h,)
        shapes[p + "output.LayerNorm.bias"] = (h,)
    shapes["cls.predictions.bias"] = (v,)
    shapes["cls.predictions.transform.dense.weight"] = (h, h)
    shapes["cls.predictions.transform.dense.bias"] = (h,)
    shapes["cls.predictions.transform.LayerNorm.weight"] = (h,)
    shapes["cls.predictions.transform.LayerNorm.bias"] = (h,)
    return shapes


def match_preset(cfg: Mapping[str, Any], config: GeneformerConfig) -> str | None:
    """The preset a ``config.json`` names (``cellstrata_preset``, same architecture) or has the architecture of."""
    named = cfg.get(PRESET_KEY)
    if isinstance(named, str) and named in PRESETS and PRESETS[named].architecture()[:5] == config.architecture()[:5]:
        return named
    for name, p in PRESETS.items():
        if p.architecture() == config.architecture():
            return name
    return None
