"""Geneformer (Theodoris et al. 2023; V2: Chen et al. 2024): tokenizer, per-layer model, checkpoint reader/writer.

The model is ``transformers.BertForMaskedLM`` (post-LN BERT) run on rank-value-encoded cells. This package
reproduces the official ``geneformer`` package (Hugging Face ``ctheodoris/Geneformer``, 2025-06 code):

- tokenization = ``tokenizer.TranscriptomeTokenizer.tokenize_anndata`` (+ ``sum_ensembl_ids`` with
  ``collapse_gene_ids=True``, ``rank_genes`` and ``create_dataset``'s ``format_cell_features``);
- the layers are those of ``BertForMaskedLM(output_hidden_states=True)``: layer 0 is
  ``hidden_states[0]`` (the embedding output), layer k is ``hidden_states[k]``;
- the published cell embedding is ``EmbExtractor``'s default, read at ``hidden_states[N - 1]``
  (``quant_layers(model) + emb_layer``, ``emb_layer=-1``), stored as ``official`` with
  ``official_layer = N - 1``. Since October 2024 ``EmbExtractor`` defaults to ``emb_mode="cls"`` and
  ``model_version="V2"``: for V2 (a dictionary with ``<cls>``/``<eos>``) ``official`` is the ``<cls>``
  token as it is (pool op ``first``, the same numbers as ``cls``); ``model_version="V1"`` switches
  ``"cls"`` to ``"cell"``, so for V1 ``official`` is the mean over the gene tokens (the same numbers as
  ``mean``). The V2 gene-token mean (``emb_mode="cell"``, the default before October 2024) is ``mean``.

Input rules, as ``tokenize_anndata`` (each restated in tests/engine/test_geneformer_parity.py):

- stored zeros: every stored entry of a vocabulary gene is ranked, so an explicitly stored zero
  (``data == 0`` in the CSR) is a token, ranked after every expressed gene (ties in ``np.argsort(-x)``
  order). A summed duplicate whose sum is zero holds no entry. ``tokenize_loom``'s ``tokenize_cell``
  drops zeros (``np.nonzero``): option ``stored_zeros="drop"``. A cell whose stored values are all zero
  (``n_counts`` 0, where the official code ranks ``0 / 0``) is an empty cell.
- duplicate genes: ``sum_ensembl_ids`` sums columns only when its Ensembl mapping merges different input
  ids (then every duplicate, identical ids too, is summed into one column appended after the others);
  otherwise every column is its own token, so an id given twice is two tokens (adjacent when their values
  tie). Option ``duplicate_genes="sum"`` always sums. Either way a warning names the duplicates.
- case: input ids are matched upper-cased, as ``ensembl_id.str.upper().map(...)``; the vocabulary (and the
  symbol dictionary) is compared upper-cased too, an exact match first, so identifiers with lower-case
  letters in a custom vocabulary (``C20orf96``) are found. Identifiers that differ only by case map by exact
  match only.

Checkpoint folder (as published): ``config.json`` (``BertConfig`` fields), ``model.safetensors`` or
``pytorch_model.bin`` and the gene dictionaries of the model's generation, found by :func:`find_dictionaries`.

The package: ``config`` (constants, :class:`GeneformerConfig`, presets, released key shapes), ``tokenizer``
(:class:`GeneformerTokenizer`), ``modeling`` (:class:`GeneformerModel`) and ``checkpoint`` (the dictionaries,
the weights and :class:`GeneformerFamily` over the loading template).
"""

from .checkpoint import (
    FAMILY,
    V1_POOL_OPS,
    V2_POOL_OPS,
    GeneformerFamily,
    find_dictionaries,
    init_rule,
    random_state_dict,
    read_dictionaries,
)
from .config import (
    CLS_TOKEN,
    CONFIG_FILE,
    DICT_DIRS,
    DICT_ROLES,
    DICT_SUFFIXES,
    DUPLICATE_GENES,
    EOS_TOKEN,
    FAMILY_NAME,
    MASK_TOKEN,
    PAD_TOKEN,
    PRESET_KEY,
    PRESET_SUFFIX,
    PRESETS,
    SPECIAL_TOKENS,
    STORED_ZEROS,
    SUPPORTED_ACTS,
    TARGET_SUM,
    TOKENIZER_VERSION,
    WEIGHTS_FILES,
    GeneformerConfig,
    match_preset,
    official_key_shapes,
)
from .modeling import GeneformerModel
from .tokenizer import DuplicateGenesWarning, GeneDictionaries, GeneformerTokenizer, has_special_tokens

_PRESET_SUFFIX = PRESET_SUFFIX  # the former private name (benchmarks/throughput.py reads it)

__all__ = [
    "CLS_TOKEN",
    "CONFIG_FILE",
    "DICT_DIRS",
    "DICT_ROLES",
    "DICT_SUFFIXES",
    "DUPLICATE_GENES",
    "EOS_TOKEN",
    "FAMILY",
    "FAMILY_NAME",
    "MASK_TOKEN",
    "PAD_TOKEN",
    "PRESETS",
    "PRESET_KEY",
    "PRESET_SUFFIX",
    "SPECIAL_TOKENS",
    "STORED_ZEROS",
    "SUPPORTED_ACTS",
    "TARGET_SUM",
    "TOKENIZER_VERSION",
    "V1_POOL_OPS",
    "V2_POOL_OPS",
    "WEIGHTS_FILES",
    "DuplicateGenesWarning",
    "GeneDictionaries",
    "GeneformerConfig",
    "GeneformerFamily",
    "GeneformerModel",
    "GeneformerTokenizer",
    "find_dictionaries",
    "has_special_tokens",
    "init_rule",
    "match_preset",
    "official_key_shapes",
    "random_state_dict",
    "read_dictionaries",
]
