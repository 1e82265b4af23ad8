"""scGPT (Cui et al. 2024): tokenizer, per-layer model and checkpoint reader/writer.

Reproduces the official embedding path of ``scgpt==0.2.4``
(``tasks/cell_emb.embed_data`` -> ``get_batch_cell_embeddings`` -> ``DataCollator(do_binning=True,
do_mlm=False, keep_first_n_tokens=1, sampling=True)`` -> ``preprocess.binning(n_bins=51)`` ->
``TransformerModel._encode``), with one deliberate difference: every random draw (the tie-break of
``_digitize(side="both")`` and the random subset of over-long cells) is a counter-based draw
(:mod:`.counter_rng`) keyed by (seed, stream, cell index, position in the cell's expressed genes), so a
cell's tokens do not depend on its batch, block or order. :meth:`ScGPTTokenizer.tokenize` works on the
whole block at once; :meth:`ScGPTTokenizer.tokenize_reference` restates the per-cell rule with the same
draws (tests and ``benchmarks/tokenizing.py`` compare the two).

Package layout: :mod:`.config` (settings, presets, the official key set), :mod:`.tokenizer`, :mod:`.modeling`
(the ``nn.Module``) and :mod:`.checkpoint` (the files and ``FAMILY``).

Checkpoint folder (as released): ``best_model.pt`` (a plain state dict, flash-attn ``Wqkv`` layout or
torch ``in_proj_`` layout), ``args.json`` (model settings) and ``vocab.json`` (token -> id).

Stored zeros: ``get_batch_cell_embeddings`` densifies ``adata.X`` (``toarray()``, which also sums
duplicate entries) and keeps ``np.nonzero(row)`` of each row, so an explicit zero stored in a sparse
matrix is no token and takes no part in the binning (``tokenize_and_pad_batch`` with its default
``include_zero_gene=False`` uses the same ``np.nonzero`` rule). cellstrata drops stored zeros too, on
in-memory and on-disk (h5ad, zarr) matrices alike; a cell storing only zeros is empty (NaN).
"""

from .checkpoint import FAMILY, ScGPTFamily, init_rule, random_state_dict, written_args
from .config import (
    ARGS_FILE,
    CLS_TOKEN,
    EOC_TOKEN,
    FAMILY_NAME,
    MODULE_PREFIXES,
    OFFICIAL_MAX_LENGTH,
    OFFICIAL_N_BINS,
    PAD_TOKEN,
    PRESET_ARG,
    PRESETS,
    REQUIRED_FILES,
    SPECIAL_TOKENS,
    SUBSET_STREAM,
    TIE_STREAM,
    TOKENIZER_VERSION,
    VOCAB_FILE,
    WEIGHTS_FILE,
    ScGPTConfig,
    match_preset,
    official_key_shapes,
)
from .modeling import ScGPTModel
from .tokenizer import ScGPTTokenizer, bin_edges_digits

__all__ = [
    "ARGS_FILE",
    "CLS_TOKEN",
    "EOC_TOKEN",
    "FAMILY",
    "FAMILY_NAME",
    "MODULE_PREFIXES",
    "OFFICIAL_MAX_LENGTH",
    "OFFICIAL_N_BINS",
    "PAD_TOKEN",
    "PRESETS",
    "PRESET_ARG",
    "REQUIRED_FILES",
    "SPECIAL_TOKENS",
    "SUBSET_STREAM",
    "TIE_STREAM",
    "TOKENIZER_VERSION",
    "VOCAB_FILE",
    "WEIGHTS_FILE",
    "ScGPTConfig",
    "ScGPTFamily",
    "ScGPTModel",
    "ScGPTTokenizer",
    "bin_edges_digits",
    "init_rule",
    "match_preset",
    "official_key_shapes",
    "random_state_dict",
    "written_args",
]
