"""A toy family registered in a few lines (tests/engine/toy_family.py) loads, builds and extracts like the others."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits
from toy_family import ToyFamily

import cellstrata as cs
from cellstrata.engine.device.batching import collate
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.input.sources import CellBlock
from cellstrata.engine.models import family_names, get_family, register_family, unregister_family
from cellstrata.errors import CheckpointError, ConfigError, GeneOverlapError


@pytest.fixture
def toy():
    family = register_family(ToyFamily())
    yield family
    unregister_family("toy")


def test_registered_family_is_found_and_forgotten(toy):
    assert get_family("Toy") is toy and "toy" in family_names()
    unregister_family("toy")
    assert "toy" not in family_names()
    with pytest.raises(ConfigError, match="unknown model 'toy'"):
        get_family("toy")


def test_a_built_in_name_cannot_be_taken():
    class Clash(ToyFamily):
        name = "scgpt"

    with pytest.raises(ConfigError, match="built-in"):
        register_family(Clash())


def test_template_gives_load_build_random_and_errors(toy, tmp_path):
    folder = toy.init_checkpoint("tiny", tmp_path / "ckpt", seed=3)
    loaded = toy.load(folder, seed=0)
    built = toy.build_random("tiny", seed=3)
    a, b = loaded.model.state_dict(), built.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config == built.config and loaded.tokenizer.settings() == built.tokenizer.settings()
    assert (loaded.n_layers, loaded.hidden_size, loaded.official_layer) == (3, 8, 3)
    assert loaded.checkpoint["sha256"] == loaded.checkpoint["files"]["model.safetensors"]["sha256"]
    with pytest.raises(ConfigError, match="toy does not take the option"):
        toy.load(folder, colour="red")
    with pytest.raises(CheckpointError, match=r"lacks vocab\.json"):
        (folder / "vocab.json").unlink()
        toy.load(folder)
    with pytest.raises(GeneOverlapError, match="no input gene is in the Toy vocabulary"):
        loaded.tokenizer.map_genes(["NOPE1", "NOPE2"])


def test_extract_stores_what_the_toy_model_computes(toy, tmp_path):
    folder = toy.init_checkpoint("tiny", tmp_path / "ckpt", seed=1)
    adata = synthetic_dataset(90, n_genes=120, seed=2, genes_per_cell=30)
    with threadpool_limits(limits=1):
        store = cs.extract(adata, model="toy", checkpoint=folder, out=tmp_path / "s.zarr", dtype="float32",
                           chunk_cells=32, progress=False)  # fmt: skip
    assert store.n_layers == 3
    stored = np.asarray(store.layers("mean").compute())
    assert stored.shape == (4, 90, 8)

    loaded = toy.load(folder)
    tok = loaded.tokenizer
    mapping = tok.map_genes(list(adata.var_names))
    cells = np.sort(np.random.default_rng().choice(90, 5, replace=False))
    block = tok.tokenize(CellBlock(indices=cells, X=sp.csr_matrix(adata.X[cells])), mapping)
    batch = collate(block, np.arange(len(cells)), tok.pad_id, tok.pad_value)
    taps = {}
    loaded.model(batch, lambda layer, hidden: taps.__setitem__(layer, hidden.clone()))
    for i, n in enumerate(block.lengths):
        for layer in range(4):
            want = taps[layer][i, 1:n].mean(0).numpy()  # mean over gene tokens, <cls> left out
            np.testing.assert_allclose(stored[layer, cells[i]], want, rtol=1e-4, atol=1e-5)
