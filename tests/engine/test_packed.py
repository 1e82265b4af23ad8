"""Packed (varlen) batches: the same numbers as padded batches for every family, on CPU via the reference.

On CUDA the packed layout runs a varlen flash-attention kernel; its definition is the ``reference``
backend (SDPA cell by cell), which these tests compare with the padded path: per-layer hidden states
of every cell, and whole stores with every pooling. ``tests/engine/test_packed_cuda.py`` repeats the
comparison with the real kernels where a GPU is present.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.demo import GENE_COLUMN
from cellstrata.engine.device.batching import collate, collate_packed, iter_batches, plan_batches
from cellstrata.engine.device.budget import DEFAULT_MAX_TOKENS, MIN_TOKENS, auto_max_tokens, cpu_max_tokens, fit_budget
from cellstrata.engine.errors import ConfigError
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.input.sources import open_source
from cellstrata.engine.models import get_family
from cellstrata.engine.models.attention import AttentionLayout, attend, make_layout, resolve_attention
from cellstrata.engine.models.tahoe_x1 import PRESETS, TahoeX1Model

FAMILIES = ("scgpt", "tahoe-x1", "scfoundation", "geneformer")
N_CELLS = 70


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    # lognormal lengths from a few to a few hundred genes: cells of very different lengths share batches
    synthetic_dataset(N_CELLS, 2000, seed=11, genes_per_cell=120).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {f: get_family(f).init_checkpoint("tiny", root / f, seed=4) for f in FAMILIES}


def _tokens(family: str, ckpt: Path, h5ad: Path):
    loaded = get_family(family).load(ckpt)
    with open_source(h5ad, gene_column=GENE_COLUMN[family]) as src:
        mapping = loaded.tokenizer.map_genes(list(src.gene_names))
        tokens = loaded.tokenizer.tokenize(src.read(0, 24), mapping)
    keep = np.flatnonzero(~tokens.empty)
    return loaded, keep, tokens


def _states(model, batch) -> dict[int, torch.Tensor]:
    states: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        model.forward(batch, lambda layer, h: states.__setitem__(layer, h.double().clone()))
    return states


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_hidden_states_equal_padded(family, checkpoints, h5ad):
    loaded, keep, tokens = _tokens(family, checkpoints[family], h5ad)
    lengths = tokens.lengths[keep]
    assert lengths.min() < lengths.max()  # a real mix of lengths, so padding is exercised
    tok = loaded.tokenizer
    padded = collate(tokens, keep, tok.pad_id, tok.pad_value)
    packed = collate_packed(tokens, keep)
    ref, got = _states(loaded.model, padded), _states(loaded.model, packed)
    assert sorted(ref) == sorted(got) == list(range(loaded.n_layers + 1))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for layer in ref:
        assert got[layer].shape == (1, int(lengths.sum()), loaded.hidden_size)
        for row, (s, n) in enumerate(zip(starts, lengths)):
            want, have = ref[layer][row, :n], got[layer][0, s : s + n]
            err = float((have - want).norm() / want.norm())
            assert err < 1e-5, f"{family} layer {layer} cell {row}: relative error {err:.2e}"


@pytest.mark.parametrize(
    "family", [f if f in ("scgpt", "tahoe-x1") else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
)
def test_packed_store_equals_padded_store(family, checkpoints, h5ad, tmp_path):
    stores = {}
    for attention in ("padded", "packed"):
        stores[attention] = cs.extract(
            h5ad,
            model=family,
            checkpoint=checkpoints[family],
            gene_column=GENE_COLUMN[family],
            out=tmp_path / f"{attention}.zarr",
            poolings=["all"],
            dtype="float32",
            chunk_cells=32,
            max_tokens=600,  # several batches per chunk, and cells longer than a packed budget's share
            attention=attention,
            progress=False,
        )
    padded, packed = stores["padded"], stores["packed"]
    assert packed.attrs["telemetry"]["attention"] == "packed (reference)"
    assert padded.attrs["telemetry"]["attention"] == "padded"
    tp, tk = padded.attrs["telemetry"], packed.attrs["telemetry"]
    assert tk["tokens"] == tp["tokens"] and tk["padding_fraction"] == 0.0 < tp["padding_fraction"]
    assert (
        set(padded.poolings) == set(packed.poolings) == set(get_family(family).load(checkpoints[family]).pooling_names)
    )
    for name in padded.poolings:
        a, b = padded.layers(name).compute(), packed.layers(name).compute()
        assert np.isnan(a).sum() == np.isnan(b).sum()
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6, equal_nan=True, err_msg=f"{family} {name}")


def test_packed_batches_cover_every_cell_within_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=257)
    lengths[5] = 5000  # longer than the budget: a batch of its own
    batches = plan_batches(lengths, 1000, packed=True)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) >= 1 and (lengths[b].sum() <= 1000 or len(b) == 1)
    padded = plan_batches(lengths, 1000)
    assert len(batches) < len(padded)  # no padding: fewer, fuller batches
    capped = plan_batches(lengths, 10**6, packed=True, max_cells=7)
    assert max(len(b) for b in capped) == 7
    with pytest.raises(ValueError, match="max_tokens"):
        plan_batches(lengths, 0, packed=True)


def test_collate_packed_layout(checkpoints, h5ad):
    _, keep, tokens = _tokens("geneformer", checkpoints["geneformer"], h5ad)
    pos = keep[:5]
    batch = collate_packed(tokens, pos)
    lengths = tokens.lengths[pos]
    assert batch.packed and batch.genes.shape == (1, lengths.sum()) and batch.n_slots == lengths.sum()
    assert batch.host_lengths == tuple(lengths.tolist()) and batch.max_len == lengths.max()
    cu = batch.attention_layout().cu_seqlens
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *np.cumsum(lengths).tolist()]
    assert batch.starts.tolist() == cu[:-1].tolist()
    expected = np.concatenate([np.arange(n) for n in lengths])
    assert batch.position_ids()[0].tolist() == expected.tolist()
    np.testing.assert_array_equal(batch.genes[0].numpy(), np.concatenate([tokens.genes[p] for p in pos]))
    with pytest.raises(ValueError, match="no padding"):
        _ = batch.padding_mask
    padded = collate(tokens, pos, 0, 0.0)
    assert padded.attention_layout().mask is not None and padded.n_slots == len(pos) * lengths.max()
    full = collate(tokens, pos[:1], 0, 0.0)
    assert full.attention_layout().mask is None  # one row: nothing padded, no mask


def test_reference_attention_is_per_cell_sdpa():
    gen = torch.Generator().manual_seed(1)
    lengths = (7, 1, 13, 4)
    q, k, v = (torch.randn(1, sum(lengths), 3, 8, generator=gen) for _ in range(3))
    layout = make_layout(torch.tensor(lengths), lengths, "reference")
    out = attend(q, k, v, layout)
    start = 0
    for n in lengths:
        qi, ki, vi = (t[:, start : start + n] for t in (q, k, v))
        want = attend(qi, ki, vi, AttentionLayout())  # one unpadded cell
        torch.testing.assert_close(out[:, start : start + n], want)
        start += n
    with pytest.raises(ValueError, match="one row"):
        attend(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), layout)
    with pytest.raises(ValueError, match="unknown varlen"):
        attend(q, k, v, make_layout(torch.tensor(lengths), lengths, "nope"))


def test_attention_choice_on_cpu(checkpoints, h5ad, tmp_path, capsys):
    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, torch.float32, 16) == ("padded", "sdpa")
    assert resolve_attention("packed", cpu, torch.float32, 16) == ("packed", "reference")
    assert resolve_attention("padded", cpu, torch.float32, 16) == ("padded", "sdpa")
    with pytest.raises(ValueError, match="unknown attention layout"):
        resolve_attention("ragged", cpu, torch.float32, 16)
    with pytest.raises(ConfigError, match="unknown attention layout"):
        cs.extract(h5ad, model="scgpt", checkpoint=checkpoints["scgpt"], out=tmp_path / "x.zarr", attention="ragged")
    assert not (tmp_path / "x.zarr").exists()
    args = ["extract", str(h5ad), "--model", "scgpt", "--checkpoint", str(checkpoints["scgpt"])]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "y.zarr"), "--attention", "ragged", "--quiet"])
    assert exc.value.code != 0
    assert "ragged" in capsys.readouterr().err
    store = cs.extract(
        h5ad, model="scgpt", checkpoint=checkpoints["scgpt"], out=tmp_path / "z.zarr", limit=20, progress=False
    )
    tele = store.attrs["telemetry"]
    assert tele["attention"] == "padded" and tele["max_tokens"] == DEFAULT_MAX_TOKENS["cpu"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("packed", [False, True])
def test_each_layer_is_freed_once_the_next_is_computed(family, packed, checkpoints, h5ad):
    """Device memory does not grow with the number of layers: no layer's activation outlives the next one."""
    loaded, keep, tokens = _tokens(family, checkpoints[family], h5ad)
    tok = loaded.tokenizer
    batch = next(
        iter_batches(
            tokens.__class__(
                tokens.indices[keep],
                [tokens.genes[i] for i in keep],
                [tokens.values[i] for i in keep],
                tokens.truncated[keep],
                tokens.empty[keep],
            ),
            10**6,
            tok.pad_id,
            tok.pad_value,
            packed=packed,
        )
    )
    alive: list[weakref.ref] = []

    def tap(layer: int, hidden: torch.Tensor) -> None:
        if alive:
            assert alive[-1]() is None, f"layer {layer - 1}'s hidden state is still alive at layer {layer}"
        alive.append(weakref.ref(hidden))

    with torch.inference_mode():
        loaded.model.forward(batch, tap)
    assert len(alive) == loaded.n_layers + 1


def test_budget_fit_from_two_probes(checkpoints):
    # 40 KiB per token (a 2,048-wide model's activations), 100 MiB fixed, 10 GiB free
    per, fixed = 40 * 1024, 100 * 2**20
    chosen, per_token, fixed_bytes = fit_budget(fixed + per * 8192, 8192, fixed + per * 16384, 16384, 10 * 2**30)
    assert per_token == pytest.approx(per) and fixed_bytes == pytest.approx(fixed)
    assert chosen % 1024 == 0 and chosen <= (0.7 * 10 * 2**30 - fixed) / per < chosen + 1024
    tiny_free, *_ = fit_budget(fixed + per * 8192, 8192, fixed + per * 16384, 16384, 2**20)
    assert tiny_free == 2048  # never below the floor
    huge, *_ = fit_budget(8192, 8192, 16384, 16384, 2**40)
    assert huge == 1 << 20  # never above the cap
    loaded = get_family("scgpt").load(checkpoints["scgpt"])
    cpu = torch.device("cpu")
    assert auto_max_tokens(loaded, cpu, packed=False, varlen="reference", autocast=None) == DEFAULT_MAX_TOKENS["cpu"]
    # released sizes: about one cell per batch (counted on the meta device, no weights allocated)
    with torch.device("meta"):
        big = TahoeX1Model(replace(PRESETS["70m"], vocab_size=60000), pad_id=0)
        mid = TahoeX1Model(replace(PRESETS["tiny"], d_model=128, n_heads=4), pad_id=0)
    assert cpu_max_tokens(big) == MIN_TOKENS
    assert MIN_TOKENS < cpu_max_tokens(mid) <= DEFAULT_MAX_TOKENS["cpu"]
