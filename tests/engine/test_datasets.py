"""Synthetic datasets: determinism, shape, count validity, and that the planted ground truth is really there."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr

from cellstrata.engine.input.datasets import (
    CONTROL,
    LABEL_SWITCH_TIME,
    PROGENITOR,
    gene_symbols,
    synthetic_dataset,
    write_synthetic_h5ad,
)
from cellstrata.engine.input.sources import check_values, open_source

N_GENES = 400


@pytest.fixture(scope="module")
def data() -> ad.AnnData:
    return synthetic_dataset(6000, N_GENES, seed=1, genes_per_cell=120)


@pytest.fixture(scope="module")
def lognorm(data: ad.AnnData) -> sp.csc_matrix:
    lib = np.asarray(data.X.sum(axis=1)).ravel()
    L = sp.csr_matrix(sp.diags(1e4 / np.maximum(lib, 1)) @ data.X)
    L.data = np.log1p(L.data)
    return L.tocsc()


def _score(data: ad.AnnData, L: sp.csc_matrix, genes: np.ndarray) -> np.ndarray:
    return np.asarray(L[:, data.var_names.get_indexer(genes)].mean(axis=1)).ravel()


def test_gene_symbols_contract():
    assert gene_symbols(3) == ["SG00000", "SG00001", "SG00002"]


def test_deterministic_and_prefix_stable():
    a = synthetic_dataset(300, 200, seed=4)
    b = synthetic_dataset(300, 200, seed=4)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs) and a.var.equals(b.var)
    c = synthetic_dataset(300, 200, seed=5)
    assert (a.X != c.X).nnz > 0
    prefix = synthetic_dataset(120, 200, seed=4)
    assert (a.X[:120] != prefix.X).nnz == 0 and prefix.obs.equals(a.obs.iloc[:120])


def test_shapes_names_and_counts(data):
    assert data.shape == (6000, N_GENES)
    assert list(data.var_names) == gene_symbols(N_GENES)
    assert data.obs_names.is_unique and data.obs_names.str.fullmatch(r"[ACGT]{16}-1").all()
    X = data.X
    assert isinstance(X, sp.csr_matrix) and X.dtype == np.float32
    assert (X.data > 0).all() and (X.data == np.rint(X.data)).all()
    assert X.has_canonical_format
    np.testing.assert_array_equal(data.obs["n_genes_by_counts"], np.diff(X.indptr))
    np.testing.assert_allclose(data.obs["total_counts"], np.asarray(X.sum(axis=1)).ravel())


def test_unknown_genes_are_interleaved():
    a = synthetic_dataset(50, 200, n_unknown_genes=6)
    names = list(a.var_names)
    assert a.n_vars == 206 and [n for n in names if n.startswith("SG")] == gene_symbols(200)
    unknown = [i for i, n in enumerate(names) if not n.startswith("SG")]
    assert len(unknown) == 6 and unknown[0] > 0 and unknown[-1] < 205
    assert np.asarray(a.X[:, unknown].sum()) > 0  # they are expressed, so mappers must drop them


def test_obs_columns(data):
    obs = data.obs
    gt = data.uns["synthetic"]
    assert list(obs["cell_type"].cat.categories) == [PROGENITOR, "erythroid", "myeloid", "T_cell", "B_cell", "NK_cell"]
    assert list(obs["cell_state"].cat.categories) == ["resting", "activated"]
    perts = list(obs["perturbation"].cat.categories)
    assert perts[0] == CONTROL and perts[1:] == list(gt["perturbations"]) and len(perts) == 13
    assert list(obs["donor"].cat.categories) == ["donor_1", "donor_2", "donor_3"]
    for column in ("cell_type", "cell_state", "perturbation", "donor"):
        assert obs[column].value_counts().min() > 50, column
    lineage = obs["cell_type"].isin([PROGENITOR, "erythroid", "myeloid"]).to_numpy()
    time = obs["time"].to_numpy()
    assert np.isnan(time[~lineage]).all() and not np.isnan(time[lineage]).any()
    assert (time[lineage] >= 0).all() and (time[lineage] <= 1).all()
    assert (time[(obs["cell_type"] == PROGENITOR).to_numpy()] < LABEL_SWITCH_TIME).all()
    assert 0.3 < lineage.mean() < 0.5
    assert 0.2 < (obs["perturbation"] == CONTROL).mean() < 0.3


def test_genes_per_cell_spread():
    a = synthetic_dataset(3000, 1000, genes_per_cell=200, genes_per_cell_sigma=0.6, seed=2)
    n = a.obs["n_genes_by_counts"].to_numpy()
    assert 0.8 * 200 < np.median(n) < 1.2 * 200
    lo, hi = np.percentile(n, [5, 95])
    assert hi / lo > 3 and n.max() <= 0.8 * 1000 + 50
    narrow = synthetic_dataset(1000, 1000, genes_per_cell=50, genes_per_cell_sigma=0.1).obs["n_genes_by_counts"]
    assert 40 < np.median(narrow) < 60


def test_markers_are_higher_in_their_type(data, lognorm):
    for cell_type, genes in data.uns["synthetic"]["marker_genes"].items():
        score = _score(data, lognorm, genes)
        inside = (data.obs["cell_type"] == cell_type).to_numpy()
        assert score[inside].mean() > score[~inside].mean() + 1.0, cell_type


def test_time_programs(data, lognorm):
    gt = data.uns["synthetic"]
    lineage = ~np.isnan(data.obs["time"].to_numpy())
    time = data.obs["time"].to_numpy()[lineage]
    up = _score(data, lognorm, gt["time_up_genes"])[lineage]
    assert spearmanr(up, time).statistic > 0.45
    progenitor = _score(data, lognorm, gt["marker_genes"][PROGENITOR])[lineage]
    assert spearmanr(progenitor, time).statistic < -0.6
    first = data.var_names.get_loc(gt["time_transient_genes"][0])  # peaks early, at the first center
    peak = np.asarray(lognorm[lineage][:, first].todense()).ravel()
    assert peak[time < 0.15].mean() > 2 * peak[time > 0.5].mean()


def test_activation_program(data, lognorm):
    score = _score(data, lognorm, data.uns["synthetic"]["activation_genes"])
    active = (data.obs["cell_state"] == "activated").to_numpy()
    assert score[active].mean() > score[~active].mean() + 1.0


def test_perturbations_recover_ground_truth(data, lognorm):
    """Per state, empirical DE similarity ranks like the planted one; targets are knocked down."""
    gt = data.uns["synthetic"]
    obs = data.obs
    perts = list(gt["perturbations"])
    targets = data.var_names.get_indexer(gt["perturbation_targets"])
    iu = np.triu_indices(len(perts), 1)
    truth = gt["perturbation_similarity"]
    assert truth.shape == (2, len(perts), len(perts))
    assert not np.allclose(truth[0], truth[1])  # the structure depends on the context
    for s, state in enumerate(gt["cell_states"]):
        in_state = (obs["cell_state"] == state).to_numpy()
        ctrl = np.asarray(lognorm[in_state & (obs["perturbation"] == CONTROL).to_numpy()].mean(axis=0)).ravel()
        delta = np.stack(
            [np.asarray(lognorm[in_state & (obs["perturbation"] == p).to_numpy()].mean(axis=0)).ravel() for p in perts]
        )
        delta -= ctrl
        unit = delta / np.linalg.norm(delta, axis=1, keepdims=True)
        assert spearmanr((unit @ unit.T)[iu], truth[s][iu]).statistic > 0.5, state
        assert (delta[np.arange(len(perts)), targets] < 0).all(), state
    effects = gt["perturbation_effects"]
    assert effects.shape == (2, len(perts), N_GENES)
    np.testing.assert_allclose(effects[:, np.arange(len(perts)), targets].max(), np.log(0.1), atol=1.5)


def test_ground_truth_survives_h5ad(tmp_path):
    kwargs = {"seed": 3, "n_unknown_genes": 4, "cell_states": ("rest", "stim8hr", "stim48hr")}
    mem = synthetic_dataset(700, 250, **kwargs)
    path = write_synthetic_h5ad(tmp_path / "sub" / "syn.h5ad", 700, 250, **kwargs)
    disk = ad.read_h5ad(path)
    assert (disk.X != mem.X).nnz == 0 and isinstance(disk.X, sp.csr_matrix)
    assert disk.obs.equals(mem.obs) and disk.var.equals(mem.var)
    gt, back = mem.uns["synthetic"], disk.uns["synthetic"]
    assert set(back) == set(gt)
    np.testing.assert_array_equal(back["perturbation_similarity"], gt["perturbation_similarity"])
    np.testing.assert_array_equal(back["marker_genes"]["T_cell"], gt["marker_genes"]["T_cell"])
    assert list(back["cell_states"]) == ["rest", "stim8hr", "stim48hr"]
    assert back["params"]["seed"] == 3
    mem.write_h5ad(tmp_path / "mem.h5ad")  # also writable through anndata itself
    with open_source(path) as src:
        assert (src.n_cells, src.n_genes) == (700, 254)
        for block in src.iter_blocks(97):
            check_values(block, require_counts=True)


def test_options_and_limits():
    one = synthetic_dataset(200, 300, n_fates=1, n_other_types=0, n_perturbations=3, n_modules=2, n_donors=1)
    assert set(one.obs["cell_type"].cat.categories) == {PROGENITOR, "erythroid"}
    assert not np.isnan(one.obs["time"]).any()
    assert one.uns["synthetic"]["perturbation_similarity"].shape == (2, 3, 3)
    with pytest.raises(ValueError, match="too small"):
        synthetic_dataset(10, 40)
    with pytest.raises(ValueError):
        synthetic_dataset(10, 300, n_fates=0)
    assert synthetic_dataset(0, 300).shape == (0, 300)
