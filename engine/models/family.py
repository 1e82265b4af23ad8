"""The loading template every model family fills in, and the gene-vocabulary base of its tokenizer.

A family package (``engine/models/<family>/``) subclasses :class:`CheckpointFamily` and writes only what is
its own: how its files are read (:meth:`~CheckpointFamily.read_checkpoint`), how its weights are renamed
onto the module (:meth:`~CheckpointFamily.module_state`), which vocabulary a preset gets
(:meth:`~CheckpointFamily.preset_checkpoint`) and how the released files are written
(:meth:`~CheckpointFamily.write_files`). The steps every family shares live here once: refusing unknown
options, finding the folder, building the model, installing weights strictly, freezing it on its device,
hashing the files, assembling the :class:`~.base.LoadedModel`, and building a model with random weights
in memory (:meth:`~CheckpointFamily.build_random`, what benchmarks use instead of writing a checkpoint).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, GeneOverlapError
from .base import CustomPooling, GeneMapping, LoadedModel, SpecialLayout, Tokenizer
from .checkpoints import checkpoint_folder, describe_files, refuse_unknown_options

# the checkpoint record of a model built by :meth:`CheckpointFamily.build_random`
IN_MEMORY: dict[str, Any] = {
    "path": None,
    "sha256": None,
    "built": "in memory: random weights assigned to the meta-device model",
}


@dataclass
class FamilyCheckpoint:
    """What a family reads from a checkpoint folder (or derives for a preset) to build model and tokenizer.

    ``config`` is the family's config object, ``vocabulary`` what its tokenizer is built from (a token
    dictionary, a gene list, ...), ``settings`` the model settings recorded in the store (and hashed);
    ``layout``/``official_layer``/``pool_ops``/``default_poolings`` go to the :class:`~.base.LoadedModel`
    (``None``: the family's class defaults). ``files`` lists the files hashed into the checkpoint record
    and ``weights_file`` the one whose sha256 names the weights; ``info`` adds family facts to that record
    (ignored keys, appended tokens, ...). ``extra`` carries what :meth:`CheckpointFamily.module_state`
    needs from the reading step (e.g. weights read together with the config).
    """

    config: Any
    preset: str | None
    vocabulary: Any
    settings: dict[str, Any]
    layout: SpecialLayout
    official_layer: int | None
    weights_file: str = ""
    files: Sequence[str] = ()
    info: dict[str, Any] = field(default_factory=dict)
    pool_ops: Mapping[str, str] | None = None
    default_poolings: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class CheckpointFamily(ABC):
    """A model family: its presets, its files and the hooks the shared :meth:`load` calls.

    Class attributes: ``name`` (as on the command line), ``title`` (as in messages), ``presets``,
    ``default_poolings``, ``pool_ops`` (store pooling -> :class:`~cellstrata.kernels.PoolSpec` op),
    ``options`` (the tokenizer/loader options ``--model-option`` accepts), ``required_files`` and
    ``origin`` (where they come from, for the missing-file message).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    presets: ClassVar[Mapping[str, Any]]
    default_poolings: ClassVar[tuple[str, ...]]
    pool_ops: ClassVar[Mapping[str, str]]
    options: ClassVar[tuple[str, ...]] = ("max_length", "seed")
    required_files: ClassVar[tuple[str, ...]] = ()
    origin: ClassVar[str] = ""

    # ------------------------------------------------------------------------------ the template
    def load(self, checkpoint: str | Path, *, device: torch.device | str = "cpu", **options: Any) -> LoadedModel:
        """Load an official checkpoint folder (weights only, never pickled code) onto ``device``."""
        self.check_options(options)
        folder = self.locate(checkpoint, options)
        ckpt = self.read_checkpoint(folder, options)
        tokenizer = self.make_tokenizer(ckpt, options)
        model = self.build_model(ckpt)
        state = self.module_state(folder, ckpt, expected_shapes(model))
        model.load_state_dict(state, strict=True)
        del state
        ckpt.extra.clear()  # weights read with the config are not held twice
        freeze(model, device)
        files = describe_files(folder, list(ckpt.files or self.required_files))
        record = {
            "path": str(folder.resolve()),
            "sha256": files[ckpt.weights_file]["sha256"],
            "files": files,
            **ckpt.info,
        }
        return self.assemble(ckpt, model, tokenizer, record)

    def build_random(
        self,
        preset: str,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        weights: bool = True,
        **options: Any,
    ) -> LoadedModel:
        """What ``init_checkpoint(preset, seed=seed)`` then ``load`` give, built in memory without files.

        The module is built on the meta device and given the random tensors without a copy, so peak memory
        is one set of weights; ``weights=False`` leaves it on the meta device (counting parameters, shapes).
        """
        self.check_options(options)
        config, vocabulary = self.preset_vocabulary(preset, None, seed)
        ckpt = self.preset_checkpoint(preset, config, vocabulary, seed, options)
        tokenizer = self.make_tokenizer(ckpt, options)
        with torch.device("meta"):
            model = self.build_model(ckpt)
        if weights:
            state = self.random_module_state(ckpt, seed)
            expected = expected_shapes(model)
            missing = [k for k in expected if k not in state]
            misshaped = [k for k in expected if k in state and state[k].shape != expected[k]]
            if missing or misshaped:
                msg = f"{self.title} random weights do not match the module: missing {missing}, misshaped {misshaped}"
                raise RuntimeError(msg)
            model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
            del state
            freeze(model, device)
        return self.assemble(ckpt, model, tokenizer, dict(IN_MEMORY), custom=weights)

    def init_checkpoint(
        self, preset: str, out: str | Path, *, seed: int = 0, genes: Sequence[str] | None = None
    ) -> Path:
        """Write random weights for ``preset`` in the official file layout (vocabulary ``genes`` or the
        synthetic genes); return the folder."""
        config, vocabulary = self.preset_vocabulary(preset, genes, seed)
        folder = Path(out).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        self.write_files(folder, preset, config, vocabulary, int(seed))
        return folder

    def assemble(
        self,
        ckpt: FamilyCheckpoint,
        model: nn.Module,
        tokenizer: Tokenizer,
        record: dict[str, Any],
        *,
        custom: bool = True,
    ) -> LoadedModel:
        """The :class:`~.base.LoadedModel` of a built model (``custom=False``: no custom poolings, meta model)."""
        return LoadedModel(
            family=self.name,
            preset=ckpt.preset,
            model=model,
            tokenizer=tokenizer,
            config=ckpt.settings,
            layout=ckpt.layout,
            pool_ops=dict(self.pool_ops if ckpt.pool_ops is None else ckpt.pool_ops),
            default_poolings=self.default_poolings if ckpt.default_poolings is None else ckpt.default_poolings,
            checkpoint=record,
            custom_poolings=self.custom_poolings(model, ckpt) if custom else {},
            official_layer=ckpt.official_layer,
        )

    # ------------------------------------------------------------------------------ shared steps
    def check_options(self, options: Mapping[str, Any]) -> None:
        """``ConfigError`` for an option this family does not take."""
        refuse_unknown_options(self.name, {k: v for k, v in options.items() if k not in self.options}, self.options)

    def locate(self, checkpoint: str | Path, options: Mapping[str, Any]) -> Path:
        """The checkpoint folder holding :attr:`required_files` (one ``CheckpointError`` otherwise)."""
        return checkpoint_folder(checkpoint, self.required_files, model=self.title, origin=self.origin)

    def preset_config(self, preset: str) -> Any:
        """The config of a known preset; ``ConfigError`` naming the known ones otherwise."""
        if preset not in self.presets:
            msg = f"unknown {self.name} preset {preset!r}; known presets: {', '.join(self.presets)}"
            raise ConfigError(msg)
        return self.presets[preset]

    def custom_poolings(self, model: nn.Module, ckpt: FamilyCheckpoint) -> dict[str, CustomPooling]:
        """Poolings the fused kernel cannot compute alone (e.g. a final norm first); none by default."""
        return {}

    # ------------------------------------------------------------------------------ family hooks
    @abstractmethod
    def read_checkpoint(self, folder: Path, options: Mapping[str, Any]) -> FamilyCheckpoint:
        """Read settings and vocabulary from the folder, check them, match the preset."""

    @abstractmethod
    def make_tokenizer(self, ckpt: FamilyCheckpoint, options: Mapping[str, Any]) -> Tokenizer:
        """The family's tokenizer for this checkpoint and the user's options."""

    @abstractmethod
    def build_model(self, ckpt: FamilyCheckpoint) -> nn.Module:
        """The family's module for ``ckpt.config`` (weights not yet set)."""

    @abstractmethod
    def module_state(self, folder: Path, ckpt: FamilyCheckpoint, expected: Mapping[str, torch.Size]) -> dict:
        """The checkpoint's weights under the module's names, checked against ``expected`` (one
        ``CheckpointError`` naming every missing, mis-shaped or unexpected key); may add to ``ckpt.info``."""

    @abstractmethod
    def preset_vocabulary(self, preset: str, genes: Sequence[str] | None, seed: int) -> tuple[Any, Any]:
        """``(config, vocabulary)`` of a preset with the vocabulary ``genes`` (``None``: the synthetic genes);
        ``ConfigError`` for an unknown preset or unusable genes."""

    @abstractmethod
    def preset_checkpoint(
        self, preset: str, config: Any, vocabulary: Any, seed: int, options: Mapping[str, Any]
    ) -> FamilyCheckpoint:
        """What :meth:`read_checkpoint` returns for the files :meth:`write_files` writes (without them)."""

    @abstractmethod
    def random_module_state(self, ckpt: FamilyCheckpoint, seed: int) -> dict[str, torch.Tensor]:
        """The random weights :meth:`write_files` writes, under the module's names."""

    @abstractmethod
    def write_files(self, folder: Path, preset: str, config: Any, vocabulary: Any, seed: int) -> None:
        """Write the released files of a random-weight checkpoint into ``folder``."""


def expected_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Every state-dict key of ``model`` and its shape."""
    return {k: v.shape for k, v in model.state_dict().items()}


def freeze(model: nn.Module, device: torch.device | str) -> None:
    """No gradients, eval mode, on ``device``."""
    model.requires_grad_(False)
    model.eval()
    model.to(device)


# ---------------------------------------------------------------------------------------------------
# config sizes


def check_sizes(title: str, config: Any, positive: Sequence[str], *, width: str, heads: str) -> None:
    """One ``ConfigError`` for the first of ``positive`` that is not > 0, or a ``width`` its ``heads`` do not divide."""
    for name in positive:
        if int(getattr(config, name)) <= 0:
            msg = f"{title} config: {name} must be > 0, got {getattr(config, name)!r}"
            raise ConfigError(msg)
    w, h = getattr(config, width), getattr(config, heads)
    if w % h:
        msg = f"{title} config: {width} {w} is not divisible by {heads} {h}"
        raise ConfigError(msg)


# ---------------------------------------------------------------------------------------------------
# random weights

NORM_WEIGHT = "norm_weight"  # 1 + 0.1 N(0, 1)
FAN_IN = "fan_in"  # N(0, 1) / sqrt(last dim)

InitRule = Callable[[str, tuple[int, ...]], "str | float | torch.Tensor"]


def random_tensors(shapes: Mapping[str, tuple[int, ...]], seed: int, rule: InitRule) -> dict[str, torch.Tensor]:
    """Seeded random weights for ``shapes``, one ``torch.randn`` per key in order.

    ``rule(key, shape)`` says how each is scaled: :data:`NORM_WEIGHT`, :data:`FAN_IN`, a float ``s``
    (``s * N(0, 1)``), or a fixed tensor (no draw). Families pick scales so that activations are far from
    trivial and a swapped or ignored parameter shows in every layer.
    """
    gen = torch.Generator().manual_seed(int(seed))
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        how = rule(key, tuple(shape))
        if isinstance(how, torch.Tensor):
            t = how
        elif how == NORM_WEIGHT:
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif how == FAN_IN:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        else:
            t = float(how) * torch.randn(shape, generator=gen)
        state[key] = t.contiguous()
    return state


# ---------------------------------------------------------------------------------------------------
# gene vocabulary


def looks_like_ensembl(names: Sequence[Any], *, threshold: int | None = None) -> bool:
    """Do most of the first 100 identifiers start with ``ENS``? (``threshold``: more than this many must.)"""
    head = [str(g) for g in list(names)[:100]]
    n = sum(g.upper().startswith("ENS") for g in head)
    return n > (len(head) / 2 if threshold is None else threshold)


class VocabularyTokenizer:
    """Input genes -> vocabulary ids, shared by the tokenizers of every family.

    A subclass sets :attr:`title` and :attr:`vocabulary_name` (as in messages) and implements
    :meth:`gene_ids`, :meth:`vocabulary_examples`, :meth:`n_vocab_genes` and :meth:`matching_rule`; it may
    override :meth:`mismatch_hint` and :meth:`after_mapping` (e.g. to warn about duplicate columns).
    """

    title: ClassVar[str] = ""
    vocabulary_name: ClassVar[str] = "vocabulary"

    @property
    def n_vocab_genes(self) -> int:
        raise NotImplementedError

    def gene_ids(self, names: list[Any]) -> np.ndarray:
        """The vocabulary id of each input identifier (int64, ``-1`` = not in the vocabulary)."""
        raise NotImplementedError

    def vocabulary_examples(self) -> str:
        """A few vocabulary entries for the no-overlap message, e.g. ``"holds e.g.: A, B, C"``."""
        raise NotImplementedError

    def matching_rule(self) -> str:
        """How the family matches genes and which ``--gene-column`` to pick."""
        raise NotImplementedError

    def mismatch_hint(self, names: list[Any]) -> str:
        """A sentence on what the input looks like (leading space), or ``""``."""
        return ""

    def after_mapping(self, names: list[Any], mapping: GeneMapping) -> None:
        """Called with every mapping that matched at least one gene."""

    def map_genes(self, gene_names: Sequence[str]) -> GeneMapping:
        """Map input gene identifiers to vocabulary ids; ``GeneOverlapError`` when none match."""
        names = list(gene_names)
        mapping = GeneMapping.from_ids(self.gene_ids(names), names, self.n_vocab_genes)
        if mapping.n_matched == 0:
            raise GeneOverlapError(self.no_overlap_message(names, mapping))
        self.after_mapping(names, mapping)
        return mapping

    def no_overlap_message(self, names: list[Any], mapping: GeneMapping) -> str:
        """One message: what matched, what the input and the vocabulary look like, what to do."""
        ex_in = ", ".join(str(g) for g in names[:5]) or "(none)"
        return (
            f"no input gene is in the {self.title} {self.vocabulary_name}: {mapping.report()}. Input genes look "
            f"like: {ex_in}; the {self.vocabulary_name} {self.vocabulary_examples()}.{self.mismatch_hint(names)} "
            f"{self.matching_rule()}"
        )


__all__ = [
    "FAN_IN",
    "IN_MEMORY",
    "NORM_WEIGHT",
    "CheckpointFamily",
    "FamilyCheckpoint",
    "VocabularyTokenizer",
    "expected_shapes",
    "freeze",
    "looks_like_ensembl",
    "random_tensors",
]
