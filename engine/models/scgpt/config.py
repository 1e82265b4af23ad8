"""scGPT's settings: file names, special tokens, the config of ``args.json``, the presets and the key set
of the official ``TransformerModel`` state dict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import CheckpointError
from ..family import check_sizes

FAMILY_NAME = "scgpt"
PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)
WEIGHTS_FILE = "best_model.pt"
ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
REQUIRED_FILES = (WEIGHTS_FILE, ARGS_FILE, VOCAB_FILE)
OFFICIAL_N_BINS = 51  # DataCollator hard-codes binning(n_bins=51), whatever args.json says
OFFICIAL_MAX_LENGTH = 1200  # embed_data's default
TOKENIZER_VERSION = "scgpt-binning-2"  # 2: counter-based draws (were numpy default_rng per cell)
TIE_STREAM = 0  # counter_rng stream of the binning tie-break
SUBSET_STREAM = 1  # counter_rng stream of the random subset kept from an over-long cell
# args.json key written by init_checkpoint so a random checkpoint is recognised as its preset
PRESET_ARG = "cellstrata_preset"
# the module's keys (the official state dict's first keys); decoder heads follow them in the file
MODULE_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.")


@dataclass(frozen=True)
class ScGPTConfig:
    """Architecture and tokenization settings (official ``args.json`` names in :meth:`to_args`)."""

    embsize: int
    nheads: int
    d_hid: int
    nlayers: int
    vocab_size: int
    n_layers_cls: int = 3
    n_bins: int = OFFICIAL_N_BINS
    dropout: float = 0.2
    pad_token: str = PAD_TOKEN
    pad_value: float = -2
    mask_value: float = -1
    max_length: int = OFFICIAL_MAX_LENGTH
    input_style: str = "binned"
    input_emb_style: str = "continuous"
    mvc: bool = True
    explicit_zero_prob: bool = False
    pre_norm: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        sizes = ("embsize", "nheads", "d_hid", "nlayers", "vocab_size")
        check_sizes("scGPT", self, sizes, width="embsize", heads="nheads")

    @property
    def head_dim(self) -> int:
        return self.embsize // self.nheads

    @classmethod
    def from_args(cls, args: Mapping[str, Any], vocab_size: int) -> ScGPTConfig:
        """Build from an official ``args.json`` dict; ``CheckpointError`` names missing fields."""
        required = ("embsize", "nheads", "d_hid", "nlayers")
        missing = [k for k in required if k not in args]
        if missing:
            msg = (
                f"scGPT {ARGS_FILE} lacks the field(s) {', '.join(missing)}; it must give "
                f"{', '.join(required)} (the model size)"
            )
            raise CheckpointError(msg)
        try:
            return cls(
                embsize=int(args["embsize"]),
                nheads=int(args["nheads"]),
                d_hid=int(args["d_hid"]),
                nlayers=int(args["nlayers"]),
                vocab_size=int(vocab_size),
                n_layers_cls=int(args.get("n_layers_cls", 3)),
                n_bins=int(args.get("n_bins", OFFICIAL_N_BINS)),
                dropout=float(args.get("dropout", 0.2)),
                pad_token=str(args.get("pad_token", PAD_TOKEN)),
                pad_value=float(args.get("pad_value", -2)),
                mask_value=float(args.get("mask_value", -1)),
                input_style=str(args.get("input_style", "binned")),
                input_emb_style=str(args.get("input_emb_style", "continuous")),
                mvc=bool(args.get("MVC", True)),
                explicit_zero_prob=bool(args.get("explicit_zero_prob", False)),
                pre_norm=bool(args.get("pre_norm", False)),
            )
        except (TypeError, ValueError) as exc:
            msg = f"scGPT {ARGS_FILE} has an invalid value: {exc}"
            raise CheckpointError(msg) from None

    def to_args(self) -> dict[str, Any]:
        """The official ``args.json`` fields for this config."""
        return {
            "embsize": self.embsize,
            "nheads": self.nheads,
            "d_hid": self.d_hid,
            "nlayers": self.nlayers,
            "n_layers_cls": self.n_layers_cls,
            "n_bins": self.n_bins,
            "dropout": self.dropout,
            "pad_token": self.pad_token,
            "pad_value": _json_number(self.pad_value),
            "mask_value": _json_number(self.mask_value),
            "max_seq_len": self.max_length,
            "input_style": self.input_style,
            "input_emb_style": self.input_emb_style,
            "MVC": self.mvc,
            "explicit_zero_prob": self.explicit_zero_prob,
            "pre_norm": self.pre_norm,
            "fast_transformer": True,
        }

    def architecture(self) -> tuple[int, ...]:
        return (self.embsize, self.nheads, self.d_hid, self.nlayers, self.vocab_size)


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


PRESETS: dict[str, ScGPTConfig] = {
    # the released whole-human model (and its organ-specific siblings): 60697 tokens incl. specials
    "whole-human": ScGPTConfig(embsize=512, nheads=8, d_hid=512, nlayers=12, vocab_size=60697),
    # random test model over the synthetic genes of engine/datasets.gene_symbols; its context is 256 tokens
    # (<cls> + 255 genes; the released model's is 1,200): longer cells keep a seeded random subset
    "tiny": ScGPTConfig(
        embsize=64, nheads=4, d_hid=128, nlayers=4, vocab_size=2000 + len(SPECIAL_TOKENS), max_length=256
    ),
}


def match_preset(args: Mapping[str, Any], config: ScGPTConfig) -> str | None:
    """The preset ``args.json`` names (``cellstrata_preset``, same model size), else the one of the same
    architecture and vocabulary size, else ``None``."""
    named = args.get(PRESET_ARG)
    if isinstance(named, str) and named in PRESETS:
        p = PRESETS[named]
        if p.architecture()[:4] == config.architecture()[:4]:
            return named
    for name, p in PRESETS.items():
        if p.architecture() == config.architecture():
            return name
    return None


def _linear(shapes: dict[str, tuple[int, ...]], name: str, n_out: int, n_in: int, *, bias: bool = True) -> None:
    """Add ``name.weight`` ``(n_out, n_in)`` and (``bias``) ``name.bias`` ``(n_out,)`` to ``shapes``."""
    shapes[f"{name}.weight"] = (n_out, n_in)
    if bias:
        shapes[f"{name}.bias"] = (n_out,)


def _norm(shapes: dict[str, tuple[int, ...]], name: str, d: int) -> None:
    """Add a LayerNorm's ``name.weight`` and ``name.bias``, both ``(d,)``."""
    shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (d,)


def official_key_shapes(config: ScGPTConfig, *, layout: str = "flash") -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of the official ``TransformerModel(..., do_mvc=config.mvc)``.

    ``layout="flash"`` gives the released file's ``self_attn.Wqkv.*`` names, ``"torch"`` gives
    ``self_attn.in_proj_*``. Heads (decoder, cls_decoder, mvc_decoder) are included.
    """
    if layout not in ("flash", "torch"):
        msg = f"layout must be 'flash' or 'torch', got {layout!r}"
        raise ValueError(msg)
    d, h, v = config.embsize, config.d_hid, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"encoder.embedding.weight": (v, d)}
    _norm(shapes, "encoder.enc_norm", d)
    _linear(shapes, "value_encoder.linear1", d, 1)
    _linear(shapes, "value_encoder.linear2", d, d)
    _norm(shapes, "value_encoder.norm", d)
    qkv_w, qkv_b = ("Wqkv.weight", "Wqkv.bias") if layout == "flash" else ("in_proj_weight", "in_proj_bias")
    for i in range(config.nlayers):
        p = f"transformer_encoder.layers.{i}."
        shapes[p + "self_attn." + qkv_w] = (3 * d, d)
        shapes[p + "self_attn." + qkv_b] = (3 * d,)
        _linear(shapes, p + "self_attn.out_proj", d, d)
        _linear(shapes, p + "linear1", h, d)
        _linear(shapes, p + "linear2", d, h)
        _norm(shapes, p + "norm1", d)
        _norm(shapes, p + "norm2", d)
    mlps = ["decoder.fc"] + (["decoder.zero_logit"] if config.explicit_zero_prob else [])
    for head in mlps:
        for j, (o, i_) in zip((0, 2, 4), ((d, d), (d, d), (1, d))):
            _linear(shapes, f"{head}.{j}", o, i_)
    for j in range(config.n_layers_cls - 1):
        _linear(shapes, f"cls_decoder._decoder.{3 * j}", d, d)
        _norm(shapes, f"cls_decoder._decoder.{3 * j + 2}", d)
    _linear(shapes, "cls_decoder.out_layer", 1, d)
    if config.mvc:
        _linear(shapes, "mvc_decoder.gene2query", d, d)
        _linear(shapes, "mvc_decoder.W", d, d, bias=False)
        if config.explicit_zero_prob:
            _linear(shapes, "mvc_decoder.W_zero_logit", d, d)
    return shapes
