"""Family loading options through the command line (``--model-option KEY=VALUE``)."""

from __future__ import annotations

import numpy as np
import pytest

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.models import get_family


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return get_family("scfoundation").init_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "scf", seed=1)


@pytest.fixture(scope="module")
def lognorm_h5ad(tmp_path_factory):
    adata = synthetic_dataset(24, 2000, seed=4, genes_per_cell=60)
    x = adata.X.astype(np.float64)
    sums = np.asarray(x.sum(1)).ravel()
    x = x.multiply(1e4 / sums[:, None]).tocsr()
    x.data = np.log1p(x.data)
    adata.X = x.astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "lognorm.h5ad"
    adata.write_h5ad(path)
    return path


def test_normalised_input_needs_the_models_own_option(ckpt, lognorm_h5ad, tmp_path, capsys):
    base = ["extract", str(lognorm_h5ad), "--model", "scfoundation", "--checkpoint", str(ckpt), "--quiet"]
    # counts mode (the default) refuses a log-normalised matrix with one clear line
    assert main([*base, "--out", str(tmp_path / "a.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cellstrata: error:")
    assert not (tmp_path / "a.zarr").exists()
    # the model's own option says the input is normalised: no --allow-noncounts needed
    out = tmp_path / "b.zarr"
    assert (
        main([*base, "--out", str(out), "--model-option", "pre_normalized=T", "--model-option", "tgthighres=a5"]) == 0
    )
    store = cs.open_store(out)
    assert store.is_complete
    assert store.attrs["tokenizer"]["pre_normalized"] == "T"
    assert store.attrs["tokenizer"]["tgthighres"] == "a5"


def test_unknown_or_malformed_option(ckpt, lognorm_h5ad, tmp_path, capsys):
    base = ["extract", str(lognorm_h5ad), "--model", "scfoundation", "--checkpoint", str(ckpt), "--quiet"]
    assert main([*base, "--out", str(tmp_path / "c.zarr"), "--model-option", "colour=blue"]) == 2
    assert "colour" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*base, "--out", str(tmp_path / "d.zarr"), "--model-option", "novalue"])
    assert exc.value.code == 2
