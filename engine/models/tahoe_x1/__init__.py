"""Tahoe-X1 (Tahoe Therapeutics 2025): tokenizer, per-layer model and checkpoint reader/writer.

Reproduces the official embedding path of ``tahoebio/tahoe-x1`` (``scripts/inference/predict_embeddings.py``
-> ``utils.util.loader_from_adata`` -> ``data.dataloader.CountDataset`` -> ``data.collator.DataCollator``
(``do_mlm=False``, ``binning``) -> ``model.TXModel.transformer_generate`` -> ``cell_emb``), with one
deliberate difference: the random subset kept from an over-long cell is a counter-based draw
(:mod:`.counter_rng`, keyed by seed, stream, cell index and position) instead of an unseeded
``torch.randperm``, so a cell's tokens do not depend on its batch, block or order (the rule is the same,
the drawn subset differs from any one official run). :meth:`TahoeX1Tokenizer.tokenize` works on the whole
block at once; :meth:`TahoeX1Tokenizer.tokenize_reference` restates the per-cell rule with the same draws.
The chemical (drug) token of the 3b model is not used: ``ComposerTX.from_hf`` and
``utils.util.load_model`` switch it off by default (``use_chem_inf=False``), and so do we.

Checkpoint folder (as published on Hugging Face, ``tahoebio/Tahoe-x1/{70m,1b,3b}-model/``):
``model.safetensors`` (a ``ComposerTX`` state dict, every key prefixed ``model.``), ``model_config.yml``,
``collator_config.yml`` and ``vocab.json`` (Ensembl gene id -> index).

Stored zeros: ``CountDataset`` takes every entry a CSR row stores (``row.indices``, ``row.data``), so an
explicit zero is a gene token like any other: it lengthens the cell, can be drawn when an over-long cell
is subsampled, and ``binning`` gives it bin 1 (the quantile edges come from the cell's non-zero values
only, so the other genes' bins do not change). cellstrata does the same, on in-memory and on-disk
(h5ad, zarr) matrices alike; a dense matrix stores no zero. Two cases where the official code raises
instead of giving a number: a cell storing only zeros is stored as empty (NaN, as a cell with no
vocabulary gene), and with ``keep_first_n_tokens=2`` a cell whose genes after the first are all zero
gets bin 1 for each of them. Duplicate entries of one gene in a row are summed (canonical CSR). The
loading option ``stored_zeros="drop"`` (``--model-option stored_zeros=drop``) departs on purpose: it
reads only the non-zero entries, as if the matrix had been densified.
"""

from __future__ import annotations

from .checkpoint import FAMILY, TahoeX1Family, TahoeX1Vocabulary, init_rule, random_state_dict
from .config import (
    ACTIVATIONS,
    CLS_TOKEN,
    COLLATOR_CONFIG_FILE,
    EOC_TOKEN,
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
    STORED_ZEROS,
    SUBSET_STREAM,
    TOKENIZER_VERSION,
    VOCAB_FILE,
    WEIGHTS_FILE,
    TahoeX1Config,
    check_supported,
    match_preset,
    official_key_shapes,
    read_config,
)
from .modeling import OfficialPooling, TahoeX1Model
from .tokenizer import TahoeX1Tokenizer, bin_values, is_special, quantile_edges

__all__ = [
    "ACTIVATIONS",
    "CLS_TOKEN",
    "COLLATOR_CONFIG_FILE",
    "EOC_TOKEN",
    "FAMILY",
    "FAMILY_NAME",
    "IGNORED_PREFIXES",
    "INFERENCE_MAX_LENGTH",
    "KEY_PREFIX",
    "MODEL_CONFIG_FILE",
    "PAD_TOKEN",
    "PRESETS",
    "PRESET_FIELD",
    "REQUIRED_FILES",
    "SPECIAL_TOKENS",
    "STORED_ZEROS",
    "SUBSET_STREAM",
    "TOKENIZER_VERSION",
    "VOCAB_FILE",
    "WEIGHTS_FILE",
    "OfficialPooling",
    "TahoeX1Config",
    "TahoeX1Family",
    "TahoeX1Model",
    "TahoeX1Tokenizer",
    "TahoeX1Vocabulary",
    "bin_values",
    "check_supported",
    "init_rule",
    "is_special",
    "match_preset",
    "official_key_shapes",
    "quantile_edges",
    "random_state_dict",
    "read_config",
]
