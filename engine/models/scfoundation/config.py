"""scFoundation's constants, architecture config (``MaeAutobin``), presets and official key shapes.

The config is read from each entry of ``models.ckpt`` as the official ``load.convertconfig`` flattens it
(:func:`flatten_config`); :meth:`ScFoundationConfig.to_nested` writes it back in the released layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import CheckpointError, ConfigError

FAMILY_NAME = "scfoundation"
WEIGHTS_FILE = "models.ckpt"
GENE_LIST_FILE = "OS_scRNA_gene_index.19264.tsv"
OFFICIAL_REPO = "https://github.com/biomap-research/scFoundation"
# get_embedding.py --version -> entry of models.ckpt (output_type cell)
VERSIONS: dict[str, str] = {"ce": "cell", "rde": "rde"}
ENTRIES = ("cell", "rde", "gene")
PRE_NORMALIZED = ("F", "T", "A")
DEFAULT_TGTHIGHRES = "t4"
TOKENIZER_VERSION = "scfoundation-gather-2"  # 2: the subset kept over max_length from counter_rng draws
STATE_PREFIX = "model."
# keys of the MAE decoder side (read and ignored: cell embeddings use the encoder only)
DECODER_PREFIXES = ("decoder.", "decoder_embed.", "norm.", "to_final.")
# config key written by init_checkpoint so a random checkpoint is recognised as its preset
PRESET_KEY = "cellstrata_preset"
# counter_rng stream of the subset kept over max_length
SUBSET_STREAM = 0
# a T-mode input whose values exceed this is not log1p-normalised (log1p(1e13) ~ 30)
MAX_LOG1P_VALUE = 30.0


# ------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ScFoundationConfig:
    """Architecture of ``MaeAutobin`` (official flattened config names in :meth:`to_nested`).

    The encoder is ``pytorchTransformerModule``: ``select_module`` passes it only ``hidden_dim``,
    ``depth`` and ``heads``, so its FFN is always ``4 * hidden_dim`` (ReLU, post-norm, eps 1e-5) and
    ``dim_head``/``norm_first`` of the config do not change it. ``seq_len`` = genes + T + S.
    """

    hidden_dim: int
    depth: int
    heads: int
    seq_len: int
    dim_head: int = 64
    bin_num: int = 100
    bin_alpha: float = 1.0
    pad_token_id: int = 103
    mask_token_id: int = 102
    n_class: int = 104
    decoder_hidden_dim: int = 512
    decoder_depth: int = 6
    decoder_heads: int = 8
    decoder_dim_head: int = 64
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        problem = next(self.problems(), None)
        if problem is not None:
            msg = f"scFoundation config: {problem}"
            raise ConfigError(msg)

    def problems(self) -> Iterator[str]:
        """What makes this config unbuildable, in the order it is checked (lazily: ``heads > 0`` first)."""
        for name in ("hidden_dim", "depth", "heads", "bin_num", "decoder_hidden_dim", "decoder_heads"):
            if int(getattr(self, name)) <= 0:
                yield f"{name} must be > 0, got {getattr(self, name)!r}"
        if self.decoder_depth < 0 or self.decoder_dim_head <= 0:
            yield "decoder depth must be >= 0 and dim_head > 0"
        if self.seq_len < 3:
            yield f"seq_len must be >= 3 (genes + T + S), got {self.seq_len}"
        if self.hidden_dim % self.heads:
            yield f"hidden_dim {self.hidden_dim} is not divisible by heads {self.heads}"

    @property
    def n_genes(self) -> int:
        return self.seq_len - 2

    @property
    def ffn_dim(self) -> int:
        return 4 * self.hidden_dim  # pytorchTransformerModule(ff_mult=4)

    @property
    def pos_rows(self) -> int:
        return self.seq_len + 1  # nn.Embedding(max_seq_len + 1, dim)

    @property
    def nb_features(self) -> int:
        """Performer random features per decoder head (``FastAttention``: int(d * ln d))."""
        return int(self.decoder_dim_head * math.log(self.decoder_dim_head))

    @classmethod
    def from_flat(cls, config: Mapping[str, Any]) -> ScFoundationConfig:
        """Build from the config ``convertconfig`` flattens; ``CheckpointError`` names what is missing."""
        problems = []
        if config.get("model", "mae_autobin") != "mae_autobin":
            problems.append(f"model is {config.get('model')!r}, only 'mae_autobin' is released")
        enc, dec = config.get("encoder"), config.get("decoder")
        if not isinstance(enc, Mapping) or not isinstance(dec, Mapping):
            msg = "scFoundation config lacks the 'encoder'/'decoder' sections of model_config.mae_autobin"
            raise CheckpointError(msg)
        if enc.get("module_type", "transformer") != "transformer":
            problems.append(f"encoder module_type is {enc.get('module_type')!r}, cellstrata builds 'transformer'")
        required = {
            "encoder.hidden_dim": enc.get("hidden_dim"),
            "encoder.depth": enc.get("depth"),
            "encoder.heads": enc.get("heads"),
            "decoder.hidden_dim": dec.get("hidden_dim"),
            "decoder.depth": dec.get("depth"),
            "decoder.heads": dec.get("heads"),
            "seq_len": config.get("seq_len"),
            "bin_num": config.get("bin_num"),
            "bin_alpha": config.get("bin_alpha"),
            "pad_token_id": config.get("pad_token_id"),
            "mask_token_id": config.get("mask_token_id"),
        }
        missing = [k for k, v in required.items() if v is None]
        if missing:
            problems.append("missing field(s) " + ", ".join(missing))
        if problems:
            msg = f"scFoundation checkpoint config cannot be used: {'; '.join(problems)}"
            raise CheckpointError(msg)
        try:
            return cls(
                **{k: int(enc[k]) for k in ("hidden_dim", "depth", "heads")},
                seq_len=int(config["seq_len"]),
                dim_head=int(enc.get("dim_head", 64)),
                bin_num=int(config["bin_num"]),
                bin_alpha=float(config["bin_alpha"]),
                pad_token_id=int(config["pad_token_id"]),
                mask_token_id=int(config["mask_token_id"]),
                n_class=int(config.get("n_class", 104)),
                **{f"decoder_{k}": int(dec[k]) for k in ("hidden_dim", "depth", "heads")},
                decoder_dim_head=int(dec.get("dim_head", 64)),
            )
        except (TypeError, ValueError, ConfigError) as exc:
            msg = f"scFoundation checkpoint config has an invalid value: {exc}"
            raise CheckpointError(msg) from None

    def to_nested(self) -> dict[str, Any]:
        """The official per-entry ``config`` (``model``/``model_config``/``dataset_config``)."""
        model = {
            "model": "mae_autobin",
            "encoder": {
                "hidden_dim": self.hidden_dim,
                "depth": self.depth,
                "heads": self.heads,
                "dim_head": self.dim_head,
                "module_type": "transformer",
                "seq_len": self.seq_len,
                "norm_first": False,
            },
            "decoder": {
                "hidden_dim": self.decoder_hidden_dim,
                "depth": self.decoder_depth,
                "heads": self.decoder_heads,
                "dim_head": self.decoder_dim_head,
                "module_type": "performer",
                "seq_len": self.seq_len,
                "norm_first": False,
            },
            "n_class": self.n_class,
            "pad_token_id": self.pad_token_id,
            "mask_token_id": self.mask_token_id,
            "bin_num": self.bin_num,
            "bin_alpha": self.bin_alpha,
            "mask_gene_name": False,
        }
        dataset = {
            "seq_len": self.seq_len,
            "gene_num": self.seq_len,
            "mae_encoder_max_seq_len": 15000,
            "bin_num": self.bin_num,
            "bin_type": "auto_bin",
            "value_mask_prob": 0.3,
            "zero_mask_prob": 0.03,
            "replace_prob": 0.8,
            "random_token_prob": 0.1,
            "mask_ignore_token_ids": [0],
            "decoder_add_zero": True,
            "train_data_path": None,
        }
        return {"model": "mae_autobin", "model_config": {"mae_autobin": model}, "dataset_config": {"rnaseq": dataset}}

    def architecture(self) -> tuple[int, ...]:
        return (self.hidden_dim, self.depth, self.heads, self.seq_len, self.bin_num)


def flatten_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``load.convertconfig``: ``model_config[model]`` then ``dataset_config['rnaseq']`` in one dict."""
    if not isinstance(config, Mapping):
        msg = "scFoundation checkpoint entry's config must be a dict"
        raise CheckpointError(msg)
    model = config.get("model")
    sections = config.get("model_config")
    data = config.get("dataset_config")
    if not isinstance(sections, Mapping) or model not in sections or not isinstance(sections[model], Mapping):
        msg = f"scFoundation checkpoint config has no model_config[{model!r}] section"
        raise CheckpointError(msg)
    flat = dict(sections[model])
    rnaseq = data.get("rnaseq") if isinstance(data, Mapping) else None
    if isinstance(rnaseq, Mapping):
        flat.update(rnaseq)
    flat.setdefault("model", model)
    flat["model_type"] = model
    flat["pos_embed"] = False
    return flat


PRESETS: dict[str, ScFoundationConfig] = {
    # the released models.ckpt 'cell' (and 'rde', 'gene') weights: 19264 genes + T + S
    "100m": ScFoundationConfig(hidden_dim=768, depth=12, heads=12, seq_len=19266),
    # random test model over the synthetic genes of engine/datasets.gene_symbols (FFN 4 x 64, as official)
    "tiny": ScFoundationConfig(
        hidden_dim=64,
        depth=4,
        heads=4,
        seq_len=2000 + 2,
        dim_head=16,
        decoder_hidden_dim=32,
        decoder_depth=2,
        decoder_heads=2,
        decoder_dim_head=16,
    ),
}


def official_key_shapes(config: ScFoundationConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official ``MaeAutobin`` state dict (after ``convertconfig`` strips ``model.``).

    Encoder (``token_emb``, ``pos_emb``, ``encoder.*``) and decoder side (``decoder_embed``, the
    ``PerformerModule`` keys incl. its ``projection_matrix`` and ``calls_since_last_redraw`` buffers,
    ``norm``, ``to_final``).
    """
    d, f, b = config.hidden_dim, config.ffn_dim, config.bin_num
    shapes: dict[str, tuple[int, ...]] = {
        "token_emb.mlp.weight": (b, 1),
        "token_emb.mlp.bias": (b,),
        "token_emb.mlp2.weight": (b, b),
        "token_emb.mlp2.bias": (b,),
        "token_emb.emb.weight": (b, d),
        "token_emb.emb_mask.weight": (1, d),
        "token_emb.emb_pad.weight": (1, d),
        "pos_emb.weight": (config.pos_rows, d),
    }
    for i in range(config.depth):
        p = f"encoder.transformer_encoder.{i}."
        shapes[p + "self_attn.in_proj_weight"] = (3 * d, d)
        shapes[p + "self_attn.in_proj_bias"] = (3 * d,)
        shapes[p + "self_attn.out_proj.weight"] = (d, d)
        shapes[p + "self_attn.out_proj.bias"] = (d,)
        shapes[p + "linear1.weight"] = (f, d)
        shapes[p + "linear1.bias"] = (f,)
        shapes[p + "linear2.weight"] = (d, f)
        shapes[p + "linear2.bias"] = (d,)
        for n in ("norm1", "norm2"):
            shapes[p + n + ".weight"] = (d,)
            shapes[p + n + ".bias"] = (d,)
    shapes["encoder.norm.weight"] = (d,)
    shapes["encoder.norm.bias"] = (d,)
    e = config.decoder_hidden_dim
    inner = config.decoder_heads * config.decoder_dim_head
    shapes["decoder_embed.weight"] = (e, d)
    shapes["decoder_embed.bias"] = (e,)
    for i in range(config.decoder_depth):
        p = f"decoder.performer.net.layers.{i}."
        shapes[p + "0.norm.weight"] = (e,)
        shapes[p + "0.norm.bias"] = (e,)
        shapes[p + "0.fn.fast_attention.projection_matrix"] = (config.nb_features, config.decoder_dim_head)
        for proj in ("to_q", "to_k", "to_v"):
            shapes[p + f"0.fn.{proj}.weight"] = (inner, e)
            shapes[p + f"0.fn.{proj}.bias"] = (inner,)
        shapes[p + "0.fn.to_out.weight"] = (e, inner)
        shapes[p + "0.fn.to_out.bias"] = (e,)
        shapes[p + "1.norm.weight"] = (e,)
        shapes[p + "1.norm.bias"] = (e,)
        shapes[p + "1.fn.fn.w1.weight"] = (4 * e, e)
        shapes[p + "1.fn.fn.w1.bias"] = (4 * e,)
        shapes[p + "1.fn.fn.w2.weight"] = (e, 4 * e)
        shapes[p + "1.fn.fn.w2.bias"] = (e,)
    shapes["decoder.performer.calls_since_last_redraw"] = ()
    shapes["decoder.norm.weight"] = (e,)
    shapes["decoder.norm.bias"] = (e,)
    shapes["norm.weight"] = (e,)
    shapes["norm.bias"] = (e,)
    shapes["to_final.weight"] = (1, e)
    shapes["to_final.bias"] = (1,)
    return shapes


def json_safe(value: Any) -> Any:
    """Plain JSON data (config values go into store attributes)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def match_preset(marker: Any, config: ScFoundationConfig) -> str | None:
    """The preset a checkpoint's config is: the one ``init_checkpoint`` marked it with, else the first
    preset of the same architecture (``None``: none)."""
    if (
        isinstance(marker, str)
        and marker in PRESETS
        and PRESETS[marker].architecture()[:3] == config.architecture()[:3]
    ):
        return marker
    for name, p in PRESETS.items():
        if p.architecture() == config.architecture():
            return name
    return None
