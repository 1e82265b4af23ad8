"""scFoundation (xTrimoGene, Hao et al. 2024): tokenizer, per-layer encoder and checkpoint reader/writer.

Reproduces the official single-cell cell-embedding path of ``biomap-research/scFoundation``
(``model/get_embedding.py`` with ``--input_type singlecell --output_type cell``: ``main_gene_selection``
-> per-cell normalisation and the T/S resolution tokens -> ``load.gatherData`` -> ``token_emb`` +
``pos_emb`` -> ``pytorchTransformerModule``), batched with a key-padding mask instead of one cell at a
time. Only the encoder is built; the MAE decoder's keys are read, checked for presence and ignored.

Checkpoint folder: ``models.ckpt`` as released (a torch pickle holding the three weight sets ``cell``,
``rde`` and ``gene``, each ``{'config': {...}, 'state_dict': {'model.<key>': tensor}}``; read with
``weights_only=True``) and the gene list ``OS_scRNA_gene_index.19264.tsv`` (columns ``gene_name``,
``index``) copied beside it from the official repository.

Departures from the official script (each documented where it is implemented):

- genes are always matched by symbol (the script only reorders inputs with fewer than 19264 columns);
  a symbol repeated in the input is read from its first column only;
- the T and S tokens are always kept; ``gatherData`` drops any token whose value is <= 0, which for
  T/S only happens in degenerate cells (a total count <= 1, or a ``tgthighres`` that makes T <= 0), and
  would shift the official S/T pooling onto a gene token;
- ``max_length`` (off by default, as the official code never truncates) keeps a random subset of a
  cell's genes drawn from :mod:`.counter_rng` (keyed by seed, cell index and position, so a cell's subset
  does not depend on its block).

Stored zeros: the script densifies the input (``adata.X.toarray()`` into a DataFrame, which also sums
duplicate entries) and ``gatherData`` keeps the positions whose value is > 0, so an explicit zero stored
in a sparse matrix is no token and adds nothing to the total count. cellstrata drops stored zeros too
(``value > 0`` after normalisation), on in-memory and on-disk (h5ad, zarr) matrices alike; a cell storing
only zeros is empty (NaN).
"""

from .checkpoint import (
    FAMILY,
    ScFoundationFamily,
    entry_seed,
    init_rule,
    random_state_dict,
    read_gene_list,
    tokenizer_options,
    version_entry,
    write_gene_list,
)
from .config import (
    DECODER_PREFIXES,
    DEFAULT_TGTHIGHRES,
    ENTRIES,
    FAMILY_NAME,
    GENE_LIST_FILE,
    MAX_LOG1P_VALUE,
    OFFICIAL_REPO,
    PRE_NORMALIZED,
    PRESET_KEY,
    PRESETS,
    STATE_PREFIX,
    SUBSET_STREAM,
    TOKENIZER_VERSION,
    VERSIONS,
    WEIGHTS_FILE,
    ScFoundationConfig,
    flatten_config,
    json_safe,
    match_preset,
    official_key_shapes,
)
from .modeling import OFFICIAL_SPEC, AutoDiscretizationEmbedding, OfficialPooling, ScFoundationModel
from .tokenizer import ScFoundationTokenizer, check_options, sort_by_gene
from .tokenizer import sort_by_gene as _sort_by_gene  # noqa: F401 (its name before the package)

__all__ = [
    "DECODER_PREFIXES",
    "DEFAULT_TGTHIGHRES",
    "ENTRIES",
    "FAMILY",
    "FAMILY_NAME",
    "GENE_LIST_FILE",
    "MAX_LOG1P_VALUE",
    "OFFICIAL_REPO",
    "OFFICIAL_SPEC",
    "PRESETS",
    "PRESET_KEY",
    "PRE_NORMALIZED",
    "STATE_PREFIX",
    "SUBSET_STREAM",
    "TOKENIZER_VERSION",
    "VERSIONS",
    "WEIGHTS_FILE",
    "AutoDiscretizationEmbedding",
    "OfficialPooling",
    "ScFoundationConfig",
    "ScFoundationFamily",
    "ScFoundationModel",
    "ScFoundationTokenizer",
    "check_options",
    "entry_seed",
    "flatten_config",
    "init_rule",
    "json_safe",
    "match_preset",
    "official_key_shapes",
    "random_state_dict",
    "read_gene_list",
    "sort_by_gene",
    "tokenizer_options",
    "version_entry",
    "write_gene_list",
]
