"""The run's plan without a model: poolings, buffer columns, PoolSpec and store attributes from plain facts."""

from __future__ import annotations

import numpy as np
import pytest

from cellstrata.engine.errors import ConfigError
from cellstrata.engine.plan import (
    ENGINE_VERSION,
    DevicePlan,
    ModelFacts,
    pool_layout,
    resolve_poolings,
    store_spec,
)
from cellstrata.engine.storage.store import store_attributes

OFFERED = ("mean", "max", "cls", "official", "wide")
# "official" aliases the kernel's mean op (as scGPT's does); "wide" is a custom pooling of its own width
POOL_OPS = {"mean": "mean", "max": "max", "cls": "first", "official": "mean"}


def test_poolings_resolve_defaults_all_and_refuse_unknown_or_repeated():
    assert resolve_poolings("fam", OFFERED, ("mean", "cls"), None) == ("mean", "cls")
    assert resolve_poolings("fam", OFFERED, ("mean",), ["all"]) == OFFERED
    assert resolve_poolings("fam", OFFERED, ("mean",), ["wide", "max"]) == ("wide", "max")
    with pytest.raises(ConfigError, match="fam has no pooling median, s_token; choose from mean, max"):
        resolve_poolings("fam", OFFERED, ("mean",), ["median", "mean", "s_token"])
    with pytest.raises(ConfigError, match="pooling listed twice in max,mean,max"):
        resolve_poolings("fam", OFFERED, ("mean",), ["max", "mean", "max"])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_layout_gives_each_op_its_columns_and_customs_theirs(seed):
    rng = np.random.default_rng(seed)
    hidden = int(rng.integers(3, 40))
    wide = int(rng.integers(1, 3 * hidden))
    names = tuple(rng.permutation(OFFERED)[: int(rng.integers(1, len(OFFERED) + 1))])
    layout = pool_layout(names, POOL_OPS, {"wide": wide}, hidden, n_leading=1, n_trailing=2)

    kernel = [n for n in names if n in POOL_OPS]
    ops = list(dict.fromkeys(POOL_OPS[n] for n in kernel))
    assert layout.poolings == names and layout.kernel_poolings == tuple(kernel)
    assert layout.custom_poolings == tuple(n for n in names if n not in POOL_OPS)
    if ops:
        assert layout.spec is not None and list(layout.spec.ops) == ops
        assert (layout.spec.n_leading, layout.spec.n_trailing) == (1, 2)
    else:
        assert layout.spec is None
    assert layout.n_kernel_ops == len(ops)
    assert layout.width == len(ops) * hidden + (wide if "wide" in names else 0)
    # names of one op share its columns, in op order; customs follow; together they tile the buffer
    for n in kernel:
        k = ops.index(POOL_OPS[n])
        assert layout.columns[n] == (k * hidden, (k + 1) * hidden) and layout.widths[n] == hidden
    if "wide" in names:
        assert layout.columns["wide"] == (len(ops) * hidden, len(ops) * hidden + wide) and layout.widths["wide"] == wide
    covered = np.zeros(layout.width, dtype=int)
    for lo, hi in {layout.columns[n] for n in names}:
        covered[lo:hi] += 1
    assert (covered == 1).all()
    # one overflow counter per op (its store names joined) then per custom
    assert layout.overflow_names == (
        *("/".join(n for n in kernel if POOL_OPS[n] == op) for op in ops),
        *layout.custom_poolings,
    )


def facts(**changes) -> ModelFacts:
    base = {
        "model": {
            "family": "fam",
            "preset": "tiny",
            "n_layers": 3,
            "hidden": 8,
            "config": {"n_heads": 2, "d": 8},
            "checkpoint": "/some/folder",
            "sha256": "ab" * 32,
        },
        "tokenizer": {"max_length": 64, "rule": "top", "seed": 0},
        "pool_ops": POOL_OPS,
        "layout": (1, 0),
        "official_layer": 3,
        "truncation": {"max_length": 64, "rule": "top"},
        "weights": {"weights": "as given"},
    }
    base.update(changes)
    return ModelFacts(**base)


SPEC_ARGS = {
    "dtype": "float16",
    "precision": "float32",
    "chunk_cells": 7,
    "n_cells": 45,
    "empty_cells": "nan",
    "source": {"path": "/data/x.h5ad", "n_cells": 45, "genes": "e3b0", "duplicate_obs_names": 0},
    "gene_overlap": {"n_input": 50, "n_matched": 41, "n_vocab_genes": 60},
    "pool_backend": "torch",
    "compression": "zstd",
}


def test_store_spec_is_store_attributes_of_the_plan():
    f = facts(hub={"hub": {"repo": "org/model", "commit": "c0ffee"}})
    layout = pool_layout(("wide", "max", "official"), POOL_OPS, {"wide": 13}, 8, n_leading=1, n_trailing=0)
    spec = store_spec(f, layout, **SPEC_ARGS)
    assert (spec.n_cells, spec.n_layers, spec.hidden, spec.chunk_cells, spec.n_chunks) == (45, 3, 8, 7, 7)
    assert list(spec.widths.items()) == [("wide", 13), ("max", 8), ("official", 8)]
    args = {k: v for k, v in SPEC_ARGS.items() if k != "compression"}
    expected = store_attributes(
        model=f.model,
        tokenizer=f.tokenizer,
        pool_ops={"wide": "custom", "max": "max", "official": "mean"},
        layout=[1, 0],
        official_layer=3,
        engine_version=ENGINE_VERSION,
        truncation=f.truncation,
        weights=f.weights,
        hub=f.hub["hub"],
        **args,
    )
    assert list(spec.attrs.items()) == list(expected.items())  # same keys in the same order: same JSON
    assert spec.attrs["hub"] == {"repo": "org/model", "commit": "c0ffee"}
    assert spec.attrs["poolings"] == ["wide", "max", "official"] and spec.compression == "zstd"


def test_config_hash_follows_the_numbers_not_the_paths():
    layout = pool_layout(("mean", "cls"), POOL_OPS, {}, 8, n_leading=1, n_trailing=0)
    base = store_spec(facts(), layout, **SPEC_ARGS).attrs["config_hash"]

    def hash_with(f=None, lay=layout, **changes):
        return store_spec(f or facts(), lay, **{**SPEC_ARGS, **changes}).attrs["config_hash"]

    moved = dict(facts().model, checkpoint="/elsewhere")
    # recorded, not hashed: checkpoint path, input path, repeated-name counts, backend, overlap, hub, weights
    assert hash_with(facts(model=moved)) == base
    assert hash_with(source={**SPEC_ARGS["source"], "path": "/moved.h5ad", "duplicate_obs_names": 3}) == base
    assert hash_with(pool_backend="triton", gene_overlap={"n_input": 1, "n_matched": 1, "n_vocab_genes": 1}) == base
    assert hash_with(facts(hub={"hub": {"repo": "a/b"}}, weights={"weights": "random", "seed": 1})) == base
    assert hash_with(compression="lz4") == base  # the codec does not change the numbers
    assert hash_with(lay=pool_layout(("cls", "mean"), POOL_OPS, {}, 8, n_leading=1, n_trailing=0)) == base  # a set
    # hashed: what changes the stored numbers
    changed = {
        hash_with(dtype="float32"),
        hash_with(precision="bfloat16"),
        hash_with(chunk_cells=8),
        hash_with(n_cells=44),
        hash_with(empty_cells="error"),
        hash_with(source={**SPEC_ARGS["source"], "genes": "ffff"}),
        hash_with(facts(tokenizer={"max_length": 65, "rule": "top", "seed": 0})),
        hash_with(facts(model=dict(facts().model, sha256="cd" * 32))),
        hash_with(lay=pool_layout(("mean", "max"), POOL_OPS, {}, 8, n_leading=1, n_trailing=0)),
        hash_with(facts(layout=(0, 0))),
    }
    assert base not in changed and len(changed) == 10


def test_device_plan_names_its_attention():
    layout = pool_layout(("mean",), POOL_OPS, {}, 4, n_leading=0, n_trailing=0)
    common = {"dtype": "float16", "max_tokens": 2048, "pool_backend": "torch", "empty_cells": "nan"}
    padded = DevicePlan(layout, precision="float32", attention="padded", varlen="sdpa", require_counts=True, **common)
    packed = DevicePlan(layout, precision="bfloat16", attention="packed", varlen="flash", require_counts=True, **common)
    assert padded.attention_label == "padded" and packed.attention_label == "packed (flash)"
    assert padded.input_workers is None
