"""Semi-synthetic perturbation screen with a known answer (protocol §3), for the perturbation-task tests.

Background cells are the control cells of :func:`cellstrata.engine.input.datasets.synthetic_dataset` (raw
counts with cell types, donors, depth variation). They are split into a control pool and ``P``
perturbations. Perturbation ``p`` knocks its own target gene down by binomial thinning (keep 10 %,
CRISPRi-like) and drives one of ``K`` shared gene modules: up by Poisson resampling with ``lambda =
count * f_p`` (even modules) or down by binomial thinning with keep ``1 / f_p`` (odd modules),
``f_p`` uniform in ``fold`` (default ``[2, 4]``). Perturbations that share a module are similar, the others are not: the
ground-truth similarity is the shared-module indicator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA

from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.probes.features import log1p_cpm

CONTROL = "NTC"
KNOCKDOWN_KEEP = 0.1


@dataclass
class Screen:
    """Counts ``[n, genes]`` (CSR, float32), obs (``perturbation``, ``state``), and the planted truth."""

    counts: sp.csr_matrix
    obs: pd.DataFrame
    var_names: list[str]
    perturbations: list[str]
    module: np.ndarray  # [P] module of every perturbation (in ``perturbations`` order)
    module_genes: list[np.ndarray]
    targets: np.ndarray  # [P] gene index knocked down by each perturbation

    @property
    def truth(self) -> np.ndarray:
        """``[P, P]`` ground-truth similarity: 1 when two perturbations share a module, else 0."""
        return (self.module[:, None] == self.module[None, :]).astype(np.float64)


def semi_synthetic_screen(
    *,
    n_control: int = 400,
    n_per_perturbation: int = 80,
    n_modules: int = 4,
    per_module: int = 4,
    module_size: int = 50,
    n_genes: int = 1000,
    fold: tuple[float, float] = (2.0, 4.0),
    expressed_quantile: float = 0.5,
    effect: bool = True,
    seed: int = 0,
) -> Screen:
    """A screen of ``n_modules * per_module`` perturbations (named ``KO00``...) plus ``n_control`` controls.

    With ``effect=False`` the perturbation labels are assigned but nothing is changed (a null screen).
    """
    rng = np.random.default_rng(seed)
    P = n_modules * per_module
    n = n_control + P * n_per_perturbation
    base = synthetic_dataset(
        int(n * 1.1) + 50,
        n_genes,
        seed=seed,
        genes_per_cell=250,
        cell_states=("resting",),
        n_perturbations=1,
        n_modules=1,
        control_fraction=0.99,
    )
    keep = np.flatnonzero(base.obs["perturbation"].to_numpy() == "control")[:n]
    if len(keep) < n:
        raise ValueError("the background dataset has too few control cells")
    counts = sp.csr_matrix(base.X[rng.permutation(keep)], dtype=np.float32)

    mean = np.asarray(counts.mean(axis=0)).ravel()
    expressed = np.flatnonzero(mean >= np.quantile(mean, expressed_quantile))
    chosen = rng.choice(expressed, size=n_modules * module_size + P, replace=False)
    module_genes = [np.sort(g) for g in np.split(chosen[: n_modules * module_size], n_modules)]
    targets = chosen[n_modules * module_size :]
    module = rng.permutation(np.arange(P) % n_modules)
    names = [f"KO{p:02d}" for p in range(P)]

    labels = np.array([CONTROL] * n_control + [name for name in names for _ in range(n_per_perturbation)])
    if effect:
        dense = counts.toarray()
        for p in range(P):
            rows = slice(n_control + p * n_per_perturbation, n_control + (p + 1) * n_per_perturbation)
            block = dense[rows]
            genes = module_genes[module[p]]
            f = rng.uniform(*fold)
            if module[p] % 2 == 0:
                block[:, genes] = rng.poisson(block[:, genes] * f)
            else:
                block[:, genes] = rng.binomial(block[:, genes].astype(np.int64), 1.0 / f)
            block[:, targets[p]] = rng.binomial(block[:, targets[p]].astype(np.int64), KNOCKDOWN_KEEP)
            dense[rows] = block
        counts = sp.csr_matrix(dense)
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(labels), "state": "resting"},
        index=pd.Index([f"cell{i}" for i in range(n)]),
    )
    return Screen(
        counts=counts,
        obs=obs,
        var_names=list(base.var_names),
        perturbations=names,
        module=module,
        module_genes=module_genes,
        targets=targets,
    )


def expression_features(counts: sp.spmatrix, width: int = 128, offset: float = 3.0, seed: int = 0) -> np.ndarray:
    """Features that encode expression, like a denoising embedding: PCA(30) of log1p-CPM, rotated into
    ``width`` dimensions by a random orthonormal map, plus a common ``offset`` on every dimension.

    The offset mimics the large shared component of raw residual-stream activations.
    """
    logX = log1p_cpm(counts).toarray()
    scores = PCA(n_components=30, random_state=seed).fit_transform(logX)
    rotation = np.linalg.qr(np.random.default_rng([seed, 1]).normal(size=(width, 30)))[0]
    return (scores @ rotation.T + offset).astype(np.float32)


def noise_features(n_cells: int, width: int = 128, seed: int = 0) -> np.ndarray:
    """Features that know nothing about the cells."""
    return np.random.default_rng([seed, 2]).normal(size=(n_cells, width)).astype(np.float32)
