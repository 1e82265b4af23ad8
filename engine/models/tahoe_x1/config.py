"""Tahoe-X1 settings: constants, :class:`TahoeX1Config`, the presets, the official key set, config-file parsing.

Field names are those of the official ``model_config.yml`` / ``collator_config.yml`` (``tahoebio/tahoe-x1``);
:func:`check_supported` refuses settings that change the official computation in ways cellstrata does not
implement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import CheckpointError, ConfigError
from ..checkpoints import read_yaml
from ..family import check_sizes

FAMILY_NAME = "tahoe-x1"
PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)  # appended in this order when absent (prepare_for_inference)
WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.yml"
COLLATOR_CONFIG_FILE = "collator_config.yml"
VOCAB_FILE = "vocab.json"
REQUIRED_FILES = (WEIGHTS_FILE, MODEL_CONFIG_FILE, COLLATOR_CONFIG_FILE, VOCAB_FILE)
KEY_PREFIX = "model."  # ComposerTX wraps TXModel as ``self.model``
# heads and the drug encoder: in the released files, never used for embeddings (skip_decoders, use_chem_inf=False)
IGNORED_PREFIXES = ("expression_decoder.", "mvc_decoder.", "chem_encoder.")
INFERENCE_MAX_LENGTH = 2048  # scripts/inference/configs/predict.yaml: predict.seq_len_dataset
STORED_ZEROS = ("keep", "drop")  # keep: official CountDataset (every stored entry); drop: non-zero entries only
TOKENIZER_VERSION = "tahoe-x1-binning-3"  # 2: stored zeros are tokens in bin 1; 3: counter-based draws
SUBSET_STREAM = 1  # counter_rng stream of the random subset kept from an over-long cell
PRESET_FIELD = "cellstrata_preset"  # model_config.yml field written by init_checkpoint
# torch.nn.functional names the official ``resolve_ffn_act_fn({"name": ...})`` resolves (default arguments)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
}
_LAYERNORMS = ("layernorm", "low_precision_layernorm")  # identical in float32 (llm-foundry norms registry)


# ------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class TahoeX1Config:
    """Architecture and tokenization settings (official ``model_config.yml`` / ``collator_config.yml`` names)."""

    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int
    expansion_ratio: int = 4
    transformer_activation: str = "relu"
    expression_activation: str = "relu"
    decoder_activation: str = "leaky_relu"
    decoder_layers: int = 1
    norm_eps: float = 1e-5
    max_value: float = 512.0
    gene_norm: bool = True
    expression_norm: bool = True
    mvc: bool = True
    pad_value: float = -2.0
    num_bins: int = 51
    keep_first_n_tokens: int = 1
    train_max_length: int = 1024
    max_length: int = INFERENCE_MAX_LENGTH

    def __post_init__(self) -> None:
        sizes = ("d_model", "n_layers", "n_heads", "vocab_size", "expansion_ratio", "num_bins")
        check_sizes("Tahoe-X1", self, sizes, width="d_model", heads="n_heads")
        for name in ("transformer_activation", "expression_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                msg = f"Tahoe-X1 config: {name} {getattr(self, name)!r} is not one of {', '.join(ACTIVATIONS)}"
                raise ConfigError(msg)
        if self.num_bins < 3:
            msg = f"Tahoe-X1 config: num_bins must be >= 3, got {self.num_bins}"
            raise ConfigError(msg)
        if self.keep_first_n_tokens < 1:
            msg = (
                f"Tahoe-X1 config: keep_first_n_tokens {self.keep_first_n_tokens} is not supported "
                "(>= 1 keeps <cls> out of the binning, as every released model)"
            )
            raise ConfigError(msg)
        if self.max_length <= self.keep_first_n_tokens:
            msg = (
                f"Tahoe-X1 max_length must be > keep_first_n_tokens ({self.keep_first_n_tokens}), got {self.max_length}"
            )
            raise ConfigError(msg)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_size(self) -> int:
        return self.d_model * self.expansion_ratio

    def architecture(self) -> tuple[Any, ...]:
        return (self.d_model, self.n_layers, self.n_heads, self.expansion_ratio, self.transformer_activation)

    @classmethod
    def from_configs(
        cls, model_cfg: Mapping[str, Any], collator_cfg: Mapping[str, Any], vocab_size: int
    ) -> TahoeX1Config:
        """Build from the official YAML dicts; ``CheckpointError`` names missing or unsupported fields."""
        required = ("d_model", "n_layers", "n_heads", "expansion_ratio")
        missing = [k for k in required if k not in model_cfg]
        if missing:
            msg = f"Tahoe-X1 {MODEL_CONFIG_FILE} lacks {', '.join(missing)} (it must give {', '.join(required)})"
            raise CheckpointError(msg)
        check_supported(model_cfg, collator_cfg)
        norm = dict(model_cfg.get("norm_config") or {})
        expr = dict(model_cfg.get("expression_encoder") or {})
        gene = dict(model_cfg.get("gene_encoder") or {})
        dec = dict(model_cfg.get("expression_decoder") or {})
        try:
            return cls(
                d_model=int(model_cfg["d_model"]),
                n_layers=int(model_cfg["n_layers"]),
                n_heads=int(model_cfg["n_heads"]),
                vocab_size=int(vocab_size),
                expansion_ratio=_as_int(model_cfg["expansion_ratio"], "expansion_ratio"),
                transformer_activation=str(model_cfg.get("transformer_activation", "gelu")),
                expression_activation=str(expr.get("activation", "relu")),
                decoder_activation=str(dec.get("activation", "leaky_relu")),
                decoder_layers=int(dec.get("n_layers", 2)),
                norm_eps=float(norm.get("eps", 1e-5)),
                max_value=float(expr.get("max_value", 512)),
                gene_norm=bool(gene.get("use_norm", False)),
                expression_norm=bool(expr.get("use_norm", False)),
                mvc=model_cfg.get("mvc") is not None,
                pad_value=float(collator_cfg["pad_value"]),
                num_bins=int(collator_cfg.get("num_bins", 51)),
                keep_first_n_tokens=int(collator_cfg.get("keep_first_n_tokens", 1)),
                train_max_length=int(collator_cfg.get("max_length", 1024)),
            )
        except (TypeError, ValueError, KeyError) as exc:
            msg = f"Tahoe-X1 config has an invalid or missing value: {exc}"
            raise CheckpointError(msg) from None

    def to_configs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(model_config.yml, collator_config.yml)`` dicts for this config (fields of the released files)."""
        model_cfg: dict[str, Any] = {
            "name": "tahoe_x1",
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "init_device": "cpu",
            "expansion_ratio": self.expansion_ratio,
            "standard_scale_outputs": False,
            "transformer_activation": self.transformer_activation,
            "n_heads": self.n_heads,
            "norm_scheme": "pre",
            "use_generative_training": False,
            "use_glu": False,
            "cell_emb_style": "cls",
            "attn_config": {
                "attn_impl": "flash",
                "use_attn_mask": False,
                "attn_type": "grouped_query_attention",
                "kv_nheads": self.n_heads,
                "attn_pdrop": 0.0,
            },
            "norm_config": {"norm_type": "layernorm", "eps": self.norm_eps},
            "expression_encoder": {
                "input_emb_style": "continuous",
                "dropout": 0.1,
                "max_value": _yaml_number(self.max_value),
                "activation": self.expression_activation,
                "use_norm": self.expression_norm,
            },
            "gene_encoder": {"use_norm": self.gene_norm},
            "mvc": {"arch_style": "inner product", "query_activation": "sigmoid", "scaled_dot_product": True}
            if self.mvc
            else None,
            "expression_decoder": {
                "n_outputs": 1,
                "n_layers": self.decoder_layers,
                "activation": self.decoder_activation,
            },
            "vocab_size": self.vocab_size,
            "precision": "amp_bf16",
        }
        collator_cfg: dict[str, Any] = {
            "do_padding": True,
            "pad_value": _yaml_number(self.pad_value),
            "do_mlm": True,
            "do_binning": True,
            "mlm_probability": 0.5,
            "mask_value": -1,
            "max_length": self.train_max_length,
            "sampling": True,
            "num_bins": self.num_bins,
            "right_binning": False,
            "use_junk_tokens": False,
            "keep_first_n_tokens": self.keep_first_n_tokens,
        }
        return model_cfg, collator_cfg


def _as_int(x: Any, name: str) -> int:
    if float(x) != int(float(x)):
        msg = f"Tahoe-X1 {name} must be a whole number, got {x!r}"
        raise CheckpointError(msg)
    return int(float(x))


def _yaml_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def check_supported(model_cfg: Mapping[str, Any], collator_cfg: Mapping[str, Any]) -> None:
    """Refuse settings that change the official computation in ways this module does not implement."""
    problems = []
    if model_cfg.get("norm_scheme", "pre") != "pre":
        problems.append(f"norm_scheme {model_cfg.get('norm_scheme')!r} (only 'pre')")
    if model_cfg.get("use_glu", False):
        problems.append("use_glu: true")
    if model_cfg.get("cell_emb_style", "cls") != "cls":
        problems.append(f"cell_emb_style {model_cfg.get('cell_emb_style')!r} (only 'cls')")
    norm_type = str((model_cfg.get("norm_config") or {}).get("norm_type", "low_precision_layernorm")).lower()
    if norm_type not in _LAYERNORMS:
        problems.append(f"norm_config.norm_type {norm_type!r} (only {', '.join(_LAYERNORMS)})")
    attn = model_cfg.get("attn_config") or {}
    # TXBlock reads kv_n_heads (the released configs write kv_nheads, which it ignores)
    if "kv_n_heads" in attn and int(attn["kv_n_heads"]) != int(model_cfg["n_heads"]):
        problems.append(f"attn_config.kv_n_heads {attn['kv_n_heads']} != n_heads (grouped-query attention)")
    if (model_cfg.get("gene_encoder") or {}).get("embeddings"):
        problems.append("gene_encoder.embeddings (extra pretrained gene embeddings)")
    expr = model_cfg.get("expression_encoder") or {}
    if expr.get("input_emb_style", "continuous") != "continuous":
        problems.append(f"expression_encoder.input_emb_style {expr.get('input_emb_style')!r}")
    if not collator_cfg.get("do_binning", True) or collator_cfg.get("log_transform", False):
        problems.append("collator without do_binning (log_transform inputs)")
    if collator_cfg.get("right_binning", False):
        problems.append("right_binning: true")
    if "pad_value" not in collator_cfg:
        problems.append("collator pad_value missing")
    if problems:
        msg = f"Tahoe-X1 checkpoint settings not supported: {'; '.join(problems)}"
        raise CheckpointError(msg)


PRESETS: dict[str, TahoeX1Config] = {
    # configs/gcloud/tahoe_x1-70m-merged.yaml; vocab 62720 incl. specials (tutorial printout)
    "70m": TahoeX1Config(d_model=512, n_layers=12, n_heads=8, vocab_size=62720),
    # configs/gcloud/tahoe_x1-1_3b-merged.yaml (same vocabulary file)
    "1b": TahoeX1Config(d_model=2048, n_layers=24, n_heads=16, vocab_size=62720),
    # configs/mcli/tahoe_x1-3b-v2-cont-train.yaml: gelu everywhere, trained with the drug token after <cls>
    # (keep_first_n_tokens 2, vocabulary + <drug>)
    "3b": TahoeX1Config(
        d_model=2560,
        n_layers=32,
        n_heads=20,
        vocab_size=62721,
        transformer_activation="gelu",
        expression_activation="gelu",
        decoder_activation="gelu",
        keep_first_n_tokens=2,
        train_max_length=2048,
    ),
    # random test model over the synthetic Ensembl ids of engine/datasets.gene_ensembl_ids; its context is
    # 256 tokens (<cls> + 255 genes; the released models' is 2,048): longer cells keep a seeded random subset
    "tiny": TahoeX1Config(
        d_model=64, n_layers=4, n_heads=4, vocab_size=2000 + len(SPECIAL_TOKENS), train_max_length=256, max_length=256
    ),
}


def official_key_shapes(config: TahoeX1Config) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official ``ComposerTX`` state dict (``model.`` prefix, heads included).

    The drug encoder of a model trained with ``use_chem_token`` is not listed (it is dropped at inference).
    """
    d, f, v = config.d_model, config.ffn_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"gene_encoder.embedding.weight": (v, d)}
    if config.gene_norm:
        shapes.update({"gene_encoder.enc_norm.weight": (d,), "gene_encoder.enc_norm.bias": (d,)})
    shapes["flag_encoder.weight"] = (2, d)
    shapes.update(
        {
            "expression_encoder.linear1.weight": (d, 1),
            "expression_encoder.linear1.bias": (d,),
            "expression_encoder.linear2.weight": (d, d),
            "expression_encoder.linear2.bias": (d,),
        }
    )
    if config.expression_norm:
        shapes.update({"expression_encoder.norm.weight": (d,), "expression_encoder.norm.bias": (d,)})
    for i in range(config.n_layers):
        p = f"transformer_encoder.layers.{i}."
        for name, (o, n_in) in {
            "self_attn.Wqkv": (3 * d, d),
            "self_attn.out_proj": (d, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
        }.items():
            shapes[f"{p}{name}.weight"] = (o, n_in)
            shapes[f"{p}{name}.bias"] = (o,)
        for name in ("norm1", "norm2"):
            shapes[f"{p}{name}.weight"] = (d,)
            shapes[f"{p}{name}.bias"] = (d,)
    shapes["transformer_encoder.norm.weight"] = (d,)
    shapes["transformer_encoder.norm.bias"] = (d,)
    for j in range(config.decoder_layers):
        shapes[f"expression_decoder.linear_layers.{j}.weight"] = (d, d)
        shapes[f"expression_decoder.linear_layers.{j}.bias"] = (d,)
    shapes["expression_decoder.out_proj.weight"] = (1, d)
    shapes["expression_decoder.out_proj.bias"] = (1,)
    if config.mvc:
        shapes["mvc_decoder.gene2query.weight"] = (d, d)
        shapes["mvc_decoder.gene2query.bias"] = (d,)
        shapes["mvc_decoder.W.weight"] = (d, d)
    return {KEY_PREFIX + k: s for k, s in shapes.items()}


def read_config(path: Path, what: str) -> dict[str, Any]:
    """A YAML config file of the checkpoint folder; ``CheckpointError`` unless it is a mapping."""
    cfg = read_yaml(path, what)
    if not isinstance(cfg, dict):
        msg = f"Tahoe-X1 {path} must be a YAML mapping"
        raise CheckpointError(msg)
    return cfg


def match_preset(model_cfg: Mapping[str, Any], config: TahoeX1Config) -> str | None:
    """The preset named in ``model_config.yml`` (:data:`PRESET_FIELD`) if its architecture fits, else the first
    released preset with this architecture (``None``: none)."""
    named = model_cfg.get(PRESET_FIELD)
    if isinstance(named, str) and named in PRESETS and PRESETS[named].architecture() == config.architecture():
        return named
    for name, p in PRESETS.items():
        if name != "tiny" and p.architecture() == config.architecture():
            return name
    return None
