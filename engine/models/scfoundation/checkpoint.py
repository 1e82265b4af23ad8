"""scFoundation's checkpoint: ``models.ckpt`` (config and weights of the entries cell, rde, gene) and the gene
list, read and written; the family object.

:class:`ScFoundationFamily` fills in the loading template
(:class:`~cellstrata.engine.models.family.CheckpointFamily`). Unlike the other families the config lives
inside the weights file, so :meth:`~ScFoundationFamily.read_checkpoint` reads the weights with it and hands
them to :meth:`~ScFoundationFamily.module_state` in :attr:`FamilyCheckpoint.extra`; the tokenizer options
are checked before the weights are read. The checkpoint may be given as the folder or as its
``models.ckpt`` itself (:meth:`~ScFoundationFamily.locate`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from ...input.datasets import gene_symbols
from ..base import CustomPooling, SpecialLayout
from ..checkpoints import check_state_dict, load_torch_weights
from ..family import FAN_IN, NORM_WEIGHT, CheckpointFamily, FamilyCheckpoint, random_tensors
from .config import (
    DECODER_PREFIXES,
    DEFAULT_TGTHIGHRES,
    ENTRIES,
    FAMILY_NAME,
    GENE_LIST_FILE,
    OFFICIAL_REPO,
    PRESET_KEY,
    PRESETS,
    STATE_PREFIX,
    VERSIONS,
    WEIGHTS_FILE,
    ScFoundationConfig,
    flatten_config,
    json_safe,
    match_preset,
    official_key_shapes,
)
from .modeling import OfficialPooling, ScFoundationModel
from .tokenizer import ScFoundationTokenizer, check_options

# ------------------------------------------------------------------------------------------------
# files


def read_gene_list(path: Path) -> list[str]:
    """``OS_scRNA_gene_index.19264.tsv``: columns ``gene_name`` and ``index`` (0..n-1 in order)."""
    import pandas as pd

    if not path.is_file():
        msg = (
            f"scFoundation gene list {path} is missing: copy {GENE_LIST_FILE} from the official scFoundation "
            f"repository ({OFFICIAL_REPO}, top level or model/) into the checkpoint folder beside {WEIGHTS_FILE}"
        )
        raise CheckpointError(msg)
    try:
        table = pd.read_csv(path, sep="\t", header=0, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        msg = f"cannot read scFoundation gene list {path}: {exc}"
        raise CheckpointError(msg) from None
    if not {"gene_name", "index"} <= set(table.columns):
        msg = f"scFoundation gene list {path} must have the columns gene_name and index (tab-separated)"
        raise CheckpointError(msg)
    if table["index"].tolist() != [str(i) for i in range(len(table))]:
        msg = f"scFoundation gene list {path}: the index column must be 0..{len(table) - 1} in order"
        raise CheckpointError(msg)
    genes = table["gene_name"].tolist()
    if len(set(genes)) != len(genes) or "" in genes:
        msg = f"scFoundation gene list {path}: gene names must be unique and non-empty"
        raise CheckpointError(msg)
    return genes


def write_gene_list(genes: Sequence[str], path: Path) -> None:
    lines = ["gene_name\tindex", *(f"{g}\t{i}" for i, g in enumerate(genes))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _read_entry(raw: Any, entry: str, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The flattened config and the ``model.``-stripped state dict of one entry of ``models.ckpt``."""
    if not isinstance(raw, Mapping) or not any(k in raw for k in ENTRIES):
        msg = (
            f"{path} is not scFoundation's models.ckpt: expected a dict with the entries "
            f"{', '.join(ENTRIES)} (each a config and a state_dict)"
        )
        raise CheckpointError(msg)
    if entry not in raw:
        msg = f"{path} has no {entry!r} weights (it holds {', '.join(map(str, raw))})"
        raise CheckpointError(msg)
    item = raw[entry]
    if not isinstance(item, Mapping) or "config" not in item or "state_dict" not in item:
        msg = f"{path} entry {entry!r} must be a dict with 'config' and 'state_dict'"
        raise CheckpointError(msg)
    state = item["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        msg = f"{path} entry {entry!r}: state_dict must map parameter names to tensors"
        raise CheckpointError(msg)
    stripped = {k[len(STATE_PREFIX) :] if k.startswith(STATE_PREFIX) else k: v for k, v in state.items()}
    return flatten_config(item["config"]), stripped


def _split_state(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encoder keys (kept, incl. unexpected ones so they are refused) and the decoder keys (ignored)."""
    ours: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, tensor in state.items():
        if key not in expected and key.startswith(DECODER_PREFIXES):
            ignored.append(key)
        else:
            ours[key] = tensor
    return ours, sorted(ignored)


# ------------------------------------------------------------------------------------------------
# the family


def tokenizer_options(options: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The tokenizer's options (``get_embedding.py``'s defaults), checked: ``ConfigError`` otherwise."""
    args = {
        "pre_normalized": options.get("pre_normalized", "F"),
        "tgthighres": options.get("tgthighres", DEFAULT_TGTHIGHRES),
        "max_length": options.get("max_length"),
    }
    check_options(seed=seed, **args)
    return {**args, "seed": seed}


def version_entry(options: Mapping[str, Any]) -> tuple[str, str]:
    """``(version, entry of models.ckpt)``; ``ConfigError`` for a version the official script has not."""
    version = options.get("version", "ce")
    if version not in VERSIONS:
        msg = f"scFoundation version must be ce (cell embeddings) or rde (read-depth enhancement), got {version!r}"
        raise ConfigError(msg)
    return version, VERSIONS[version]


class ScFoundationFamily(CheckpointFamily):
    """The ``FAMILY`` object of scFoundation (see :class:`~cellstrata.engine.models.base.ModelFamily`).

    Options: ``version`` ``ce`` (entry ``cell``, default) or ``rde`` (read-depth enhancement weights);
    ``pre_normalized`` / ``tgthighres``: as ``get_embedding.py`` (see :class:`ScFoundationTokenizer`).
    """

    name = FAMILY_NAME
    title = "scFoundation"
    presets: ClassVar[Mapping[str, ScFoundationConfig]] = PRESETS
    default_poolings: ClassVar[tuple[str, ...]] = ("mean", "official")
    pool_ops: ClassVar[Mapping[str, str]] = {
        "mean": "mean",
        "max": "max",
        "s_token": "from_end:1",
        "t_token": "from_end:2",
    }
    options = ("max_length", "seed", "version", "pre_normalized", "tgthighres")
    required_files = (WEIGHTS_FILE, GENE_LIST_FILE)
    origin = f"the released weights and the gene list of {OFFICIAL_REPO}"

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Unknown options, then the version (before the folder is looked at)."""
        super().check_options(options)
        version_entry(options)

    def locate(self, checkpoint: str | Path, options: Mapping[str, Any]) -> Path:
        """The folder holding ``models.ckpt``; the weights file itself may be given (then its folder)."""
        folder = Path(checkpoint).expanduser()
        if folder.is_file() and folder.name == WEIGHTS_FILE:
            folder = folder.parent
        if not folder.is_dir():
            msg = (
                f"scFoundation checkpoint folder {folder} does not exist or is not a folder; it must contain "
                f"{WEIGHTS_FILE} (the released weights) and {GENE_LIST_FILE} (from the official repository)"
            )
            raise CheckpointError(msg)
        if not (folder / WEIGHTS_FILE).is_file():
            msg = (
                f"scFoundation checkpoint folder {folder} lacks {WEIGHTS_FILE}; put the released weights "
                f"file there (download link in model/models/download.txt of {OFFICIAL_REPO})"
            )
            raise CheckpointError(msg)
        return folder

    def read_checkpoint(self, folder: Path, options: Mapping[str, Any]) -> FamilyCheckpoint:
        """The gene list, then the entry's config and weights (read together from ``models.ckpt``)."""
        tokenizer = tokenizer_options(options, int(options.get("seed", 0)))  # before reading the weights
        version, entry = version_entry(options)
        genes = read_gene_list(folder / GENE_LIST_FILE)
        raw = load_torch_weights(folder / WEIGHTS_FILE)
        flat, state = _read_entry(raw, entry, folder / WEIGHTS_FILE)
        marker = raw[entry]["config"].get(PRESET_KEY)
        del raw
        config = ScFoundationConfig.from_flat(flat)
        if config.n_genes != len(genes):
            msg = (
                f"{GENE_LIST_FILE} lists {len(genes)} genes but the checkpoint's seq_len {config.seq_len} "
                f"means {config.n_genes} genes (+ T and S); use the gene list that came with these weights"
            )
            raise CheckpointError(msg)
        ckpt = self._checkpoint(match_preset(marker, config), config, genes, flat, version, entry, tokenizer)
        ckpt.extra["state"] = state
        return ckpt

    def preset_checkpoint(
        self, preset: str, config: ScFoundationConfig, vocabulary: list[str], seed: int, options: Mapping[str, Any]
    ) -> FamilyCheckpoint:
        version, entry = version_entry(options)
        flat = flatten_config(config.to_nested())
        tokenizer = tokenizer_options(options, int(seed))
        return self._checkpoint(preset, config, vocabulary, flat, version, entry, tokenizer)

    def _checkpoint(
        self,
        preset: str | None,
        config: ScFoundationConfig,
        genes: list[str],
        flat: Mapping[str, Any],
        version: str,
        entry: str,
        tokenizer: dict[str, Any],
    ) -> FamilyCheckpoint:
        settings = json_safe(flat)
        settings.update({"preset": preset, "version": version, "entry": entry, "n_genes": config.n_genes})
        return FamilyCheckpoint(
            config=config,
            preset=preset,
            vocabulary=genes,
            settings=settings,
            layout=SpecialLayout(n_leading=0, n_trailing=2, has_cls=False),  # genes, then T and S
            official_layer=config.depth,
            weights_file=WEIGHTS_FILE,
            files=(WEIGHTS_FILE, GENE_LIST_FILE),
            info={"entry": entry},
            extra={"tokenizer": tokenizer},
        )

    def make_tokenizer(self, ckpt: FamilyCheckpoint, options: Mapping[str, Any]) -> ScFoundationTokenizer:
        config = ckpt.config
        return ScFoundationTokenizer(
            ckpt.vocabulary,
            pad_token_id=config.pad_token_id,
            mask_token_id=config.mask_token_id,
            **ckpt.extra["tokenizer"],
        )

    def build_model(self, ckpt: FamilyCheckpoint) -> ScFoundationModel:
        return ScFoundationModel(ckpt.config)

    def module_state(self, folder: Path, ckpt: FamilyCheckpoint, expected: Mapping[str, torch.Size]) -> dict:
        """The encoder's weights; the decoder's keys are checked for nothing and recorded as ignored."""
        ours, ignored = _split_state(ckpt.extra.pop("state"), expected)
        entry = ckpt.info["entry"]
        check_state_dict(
            ours,
            expected,
            what=f"scFoundation {folder / WEIGHTS_FILE} ({entry!r} weights)",
            hint="Check that the file is the released models.ckpt (or written by cellstrata init-checkpoint).",
        )
        ckpt.info["ignored_keys"] = ignored
        return ours

    def custom_poolings(self, model: nn.Module, ckpt: FamilyCheckpoint) -> dict[str, CustomPooling]:
        """``official``: the S-token embedding after the encoder's final norm (:class:`OfficialPooling`)."""
        assert isinstance(model, ScFoundationModel)
        return {"official": OfficialPooling(model.encoder.norm)}

    def preset_vocabulary(
        self, preset: str, genes: Sequence[str] | None, seed: int
    ) -> tuple[ScFoundationConfig, list[str]]:
        """The preset's config with ``seq_len`` = the gene list's length + T + S."""
        config = self.preset_config(preset)
        gene_list = list(genes) if genes is not None else gene_symbols(config.n_genes)
        if (
            not gene_list
            or len(set(gene_list)) != len(gene_list)
            or any(not str(g) or "\t" in str(g) for g in gene_list)
        ):
            msg = "genes must be a non-empty list of unique gene symbols (no tabs)"
            raise ConfigError(msg)
        return replace(config, seq_len=len(gene_list) + 2), [str(g) for g in gene_list]

    def random_module_state(self, ckpt: FamilyCheckpoint, seed: int) -> dict[str, torch.Tensor]:
        """The weights of the entry ``load`` reads: entry ``k`` of ``ENTRIES`` is seeded ``seed * 3 + k``."""
        return random_state_dict(ckpt.config, seed=entry_seed(seed, ckpt.info["entry"]))

    def write_files(self, folder: Path, preset: str, config: ScFoundationConfig, vocabulary: Any, seed: int) -> None:
        """``models.ckpt`` (entries cell, rde, gene with random weights) and the gene list."""
        write_gene_list(vocabulary, folder / GENE_LIST_FILE)
        ckpt = {}
        for entry in ENTRIES:
            cfg = config.to_nested()
            cfg[PRESET_KEY] = preset
            cfg["random_init_seed"] = int(seed)
            state = random_state_dict(config, seed=entry_seed(seed, entry))
            ckpt[entry] = {"config": cfg, "state_dict": OrderedDict((STATE_PREFIX + n, t) for n, t in state.items())}
        torch.save(ckpt, folder / WEIGHTS_FILE)


def entry_seed(seed: int, entry: str) -> int:
    """The seed of an entry's random weights: ``seed * len(ENTRIES) + its index``."""
    return int(seed) * len(ENTRIES) + ENTRIES.index(entry)


# ------------------------------------------------------------------------------------------------
# random weights


def init_rule(key: str, shape: tuple[int, ...]) -> str | float | torch.Tensor:
    """How :func:`random_state_dict` draws each key: norms ~1, biases small, embeddings 0.5, the rest fan-in."""
    last = key.rsplit(".", 1)[-1]
    is_norm = len(shape) == 1 and (".norm" in key or key.startswith("norm."))
    if key.endswith("calls_since_last_redraw"):
        return torch.tensor(0, dtype=torch.int64)
    if is_norm and last == "weight":
        return NORM_WEIGHT
    if is_norm or last.endswith("bias"):
        return 0.05
    if key.startswith(("token_emb.emb", "pos_emb.")) or last == "projection_matrix":
        return 0.5
    return FAN_IN


def random_state_dict(config: ScFoundationConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights with the official key set (decoder included) and non-trivial activations."""
    return random_tensors(official_key_shapes(config), seed, init_rule)


FAMILY = ScFoundationFamily()
