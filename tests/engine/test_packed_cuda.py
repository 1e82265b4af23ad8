"""Packed (varlen) attention on a GPU: every varlen kernel found, every family, against the padded path.

Runs only where CUDA is present (the CPU suite checks the packed path through its reference in
``test_packed.py``). Numbers are compared under the pipeline's bfloat16 autocast, so tolerances are
bfloat16's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import cellstrata as cs
from cellstrata.demo import GENE_COLUMN
from cellstrata.engine.device.batching import collate, collate_packed
from cellstrata.engine.device.budget import MAX_TOKENS, MIN_TOKENS
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.input.sources import open_source
from cellstrata.engine.models import get_family
from cellstrata.engine.models.attention import VARLEN_BACKENDS, _probe, varlen_backend
from cellstrata.engine.models.tahoe_x1 import PRESETS, TahoeX1Model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FAMILIES = ("scgpt", "tahoe-x1", "scfoundation", "geneformer")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    synthetic_dataset(300, 2000, seed=12, genes_per_cell=150).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {f: get_family(f).init_checkpoint("tiny", root / f, seed=4) for f in FAMILIES}


def test_a_varlen_kernel_is_found_and_each_found_one_matches():
    found = varlen_backend(CUDA, torch.bfloat16, 64)
    assert found is not None and found != "reference"
    working = [n for n in VARLEN_BACKENDS if n != "reference" and _probe(n, CUDA, torch.bfloat16, 64)]
    print("varlen kernels that run here:", working)
    assert found in working


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_hidden_states_match_padded_on_cuda(family, checkpoints, h5ad):
    loaded = get_family(family).load(checkpoints[family], device=CUDA)
    with open_source(h5ad, gene_column=GENE_COLUMN[family]) as src:
        mapping = loaded.tokenizer.map_genes(list(src.gene_names))
        tokens = loaded.tokenizer.tokenize(src.read(0, 48), mapping)
    keep = np.flatnonzero(~tokens.empty)
    tok = loaded.tokenizer
    backend = varlen_backend(CUDA, torch.bfloat16, loaded.hidden_size // 4)
    padded = collate(tokens, keep, tok.pad_id, tok.pad_value).to(CUDA)
    packed = collate_packed(tokens, keep, backend).to(CUDA)
    states: dict[str, dict[int, torch.Tensor]] = {"padded": {}, "packed": {}}
    for name, batch in (("padded", padded), ("packed", packed)):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loaded.model.forward(batch, lambda layer, h, d=states[name]: d.__setitem__(layer, h.float().clone()))
    lengths = tokens.lengths[keep]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for layer, ref in states["padded"].items():
        got = states["packed"][layer]
        for row, (s, n) in enumerate(zip(starts, lengths)):
            want, have = ref[row, :n], got[0, s : s + n]
            err = float((have - want).norm() / want.norm())
            assert err < 3e-2, f"{family} layer {layer} cell {row}: relative error {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_store_matches_padded_store_on_cuda(family, checkpoints, h5ad, tmp_path):
    stores = {
        a: cs.extract(
            h5ad,
            model=family,
            checkpoint=checkpoints[family],
            gene_column=GENE_COLUMN[family],
            out=tmp_path / f"{a}.zarr",
            poolings=["all"],
            dtype="float32",
            device="cuda",
            attention=a,
            progress=False,
        )
        for a in ("padded", "packed")
    }
    tele = stores["packed"].attrs["telemetry"]
    assert tele["attention"].startswith("packed (") and tele["padding_fraction"] == 0.0
    assert MIN_TOKENS <= tele["max_tokens"] <= MAX_TOKENS  # chosen from the free device memory
    for name in stores["padded"].poolings:
        a = stores["padded"].layers(name).compute()
        b = stores["packed"].layers(name).compute()
        ok = np.isfinite(a)
        assert (ok == np.isfinite(b)).all()
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
        cos = cos[ok.all(-1)]
        assert cos.min() > 0.995, f"{family} {name}: min cosine {cos.min():.4f}"


def _peak_above_weights(n_layers: int, batch) -> int:
    torch.manual_seed(0)
    model = TahoeX1Model(replace(PRESETS["70m"], n_layers=n_layers), pad_id=0).to(CUDA).eval()
    out = torch.empty(n_layers + 1, batch.lengths.shape[0], 2, model.hidden_size, device=CUDA)

    def tap(layer: int, h: torch.Tensor) -> None:
        out[layer, :, 0] = h[0, batch.starts].float()
        out[layer, :, 1] = h.float().mean()

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        model.forward(batch, tap)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_peak_device_memory_does_not_grow_with_layers():
    rng = np.random.default_rng(0)
    lengths = rng.integers(200, 2048, size=24)
    from cellstrata.engine.models.base import TokenizedBlock

    block = TokenizedBlock(
        indices=np.arange(len(lengths)),
        genes=[rng.integers(10, 1000, n) for n in lengths],
        values=[rng.random(n).astype(np.float32) * 10 for n in lengths],
        truncated=np.zeros(len(lengths), bool),
        empty=np.zeros(len(lengths), bool),
    )
    batch = collate_packed(block, np.arange(len(lengths)), varlen_backend(CUDA, torch.bfloat16, 64)).to(CUDA)
    shallow, deep = _peak_above_weights(2, batch), _peak_above_weights(12, batch)
    print(f"peak activation memory: 2 layers {shallow / 2**20:.1f} MiB, 12 layers {deep / 2**20:.1f} MiB")
    assert deep <= 1.1 * shallow
