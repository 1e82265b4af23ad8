"""Synthetic single-cell data for the demo, tests and benchmarks, with planted ground truth.

:func:`synthetic_dataset` builds a raw-count AnnData whose structure is known exactly:

- ``cell_type``: a differentiation lineage (``HSPC`` progenitors branching into one to four fates) plus
  mature types, each with a marker gene program;
- ``time`` in [0, 1] for lineage cells (NaN elsewhere): progenitor markers fade, fate markers rise
  (label switches at ``t = 0.45``), and "time" genes rise linearly or peak transiently;
- ``cell_state`` (e.g. resting/activated): an activation program whose strength grows along the list;
- ``perturbation``: ``control`` plus CRISPRi-like perturbations named by their target gene (knocked
  down to 10 %) that drive shared gene modules; a module is constitutive, activation-dependent or
  resting-specific, so the perturbations' effects and their similarity differ per ``cell_state``
  (the semi-synthetic fixture of ``reference/protocol.md`` §3, with the effect vectors known);
- ``donor``: a gene-wise batch effect and a depth shift.

Counts follow a negative binomial with shape 1 around a per-cell depth calibrated so that the number of
expressed genes per cell is lognormal around ``genes_per_cell``. Generation is chunked and vectorised
(no dense ``n_cells x n_genes`` matrix) and deterministic in ``seed``; every chunk draws from its own
stream, so a smaller dataset is a prefix of a larger one with the same settings.
:func:`write_synthetic_h5ad` streams the same data to an ``.h5ad`` without holding it in memory.
The ground truth is stored in ``uns["synthetic"]`` (plain arrays and dicts that survive ``write_h5ad``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

PROGENITOR = "HSPC"
CONTROL = "control"
FATE_NAMES = ("erythroid", "myeloid", "megakaryocyte", "lymphoid")
OTHER_TYPE_NAMES = ("T_cell", "B_cell", "NK_cell", "monocyte", "dendritic_cell", "plasma_cell", "mast_cell")
LABEL_SWITCH_TIME = 0.45  # lineage cells are labelled HSPC before this time, their fate after it

_MARKER_LFC = 2.5
_TIME_LFC = 2.0
_TRANSIENT_WIDTH = 0.12
_ACTIVATION_LFC = 2.0
_CYCLING_LFC = 2.0
_KNOCKDOWN = 0.1
_SECONDARY_WEIGHT = 0.4
_FADE = (0.2, 0.7)  # progenitor markers fade and fate markers rise over this time window
_ELEMENTS_PER_CHUNK = 1 << 22


def gene_symbols(n: int) -> list[str]:
    """``n`` synthetic gene symbols, the same ones the ``tiny`` random checkpoints put in their vocabulary."""
    return [f"SG{i:05d}" for i in range(n)]


def gene_ensembl_ids(n: int) -> list[str]:
    """Ensembl-style ids of the first ``n`` synthetic genes (``ENSG`` + 11 digits), for Ensembl-keyed vocabularies."""
    return [f"ENSG{i:011d}" for i in range(n)]


def ensembl_id_of(symbol: str) -> str:
    """The Ensembl-style id of a synthetic gene symbol (known ``SG...`` or unknown ``XG...`` genes)."""
    prefix, number = symbol[:2], int(symbol[2:])
    return f"ENSG{number:011d}" if prefix == "SG" else f"ENSG9{number:010d}"


def unknown_gene_symbols(n: int) -> list[str]:
    """``n`` gene symbols that are in no synthetic vocabulary (to exercise gene mapping)."""
    return [f"XG{i:05d}" for i in range(n)]


def synthetic_dataset(
    n_cells: int,
    n_genes: int = 2000,
    *,
    seed: int = 0,
    genes_per_cell: float = 500,
    genes_per_cell_sigma: float = 0.5,
    n_unknown_genes: int = 0,
    n_fates: int = 2,
    n_other_types: int = 3,
    trajectory_fraction: float = 0.4,
    cell_states: Sequence[str] = ("resting", "activated"),
    n_perturbations: int = 12,
    n_modules: int = 4,
    control_fraction: float = 0.25,
    n_donors: int = 3,
) -> Any:
    """A raw-count AnnData (CSR float32) of ``n_cells`` cells with planted, documented structure.

    ``var_names`` are ``gene_symbols(n_genes)`` with ``n_unknown_genes`` off-vocabulary symbols spread
    among them. ``genes_per_cell`` is the median number of expressed genes per cell (lognormal spread
    ``genes_per_cell_sigma``, clipped to 80 % of the genes). The obs columns are ``cell_type``, ``time``,
    ``cell_state``, ``perturbation``, ``donor``, ``n_genes_by_counts`` and ``total_counts``; var has
    ``gene_symbol`` and ``program`` (the planted program a gene belongs to, or ``""``).
    """
    import anndata as ad

    gen = _Generator(
        n_genes=n_genes,
        seed=seed,
        genes_per_cell=genes_per_cell,
        genes_per_cell_sigma=genes_per_cell_sigma,
        n_unknown_genes=n_unknown_genes,
        n_fates=n_fates,
        n_other_types=n_other_types,
        trajectory_fraction=trajectory_fraction,
        cell_states=tuple(cell_states),
        n_perturbations=n_perturbations,
        n_modules=n_modules,
        control_fraction=control_fraction,
        n_donors=n_donors,
    )
    blocks, cells = [], []
    for X, attrs in gen.chunks(n_cells):
        blocks.append(X)
        cells.append(attrs)
    X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, gen.n_vars), dtype=np.float32)
    X = sp.csr_matrix(X)
    return ad.AnnData(X=X, obs=gen.obs(cells), var=gen.var(), uns={"synthetic": gen.ground_truth()})


def write_synthetic_h5ad(
    path: str | os.PathLike[str],
    n_cells: int,
    n_genes: int = 2000,
    *,
    compression: str | None = None,
    **kwargs: Any,
) -> Path:
    """Write ``synthetic_dataset(n_cells, n_genes, **kwargs)`` to ``path`` chunk by chunk; returns the path.

    Memory stays bounded by one generation chunk plus the per-cell obs table, so multi-million-cell
    benchmark inputs can be written. ``compression`` is an h5py filter for ``X`` (e.g. ``"gzip"``).
    """
    import h5py
    from anndata.io import write_elem

    options = {**_defaults(), **kwargs}
    options["cell_states"] = tuple(options["cell_states"])
    gen = _Generator(n_genes=n_genes, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cells = []
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        X = f.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        opts = {"compression": compression, "chunks": (1 << 18,), "maxshape": (None,)}
        data = X.create_dataset("data", shape=(0,), dtype=np.float32, **opts)
        indices = X.create_dataset("indices", shape=(0,), dtype=np.int32, **opts)
        indptr_parts = [np.zeros(1, dtype=np.int64)]
        nnz = 0
        for block, attrs in gen.chunks(n_cells):
            k = block.nnz
            data.resize((nnz + k,))
            indices.resize((nnz + k,))
            data[nnz : nnz + k] = block.data
            indices[nnz : nnz + k] = block.indices
            indptr_parts.append(block.indptr[1:].astype(np.int64) + nnz)
            nnz += k
            cells.append(attrs)
        X.create_dataset("indptr", data=np.concatenate(indptr_parts))
        X.attrs["shape"] = np.array([n_cells, gen.n_vars], dtype=np.int64)
        write_elem(f, "obs", gen.obs(cells))
        write_elem(f, "var", gen.var())
        write_elem(f, "uns", {"synthetic": gen.ground_truth()})
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, key, {})
    return path


def _defaults() -> dict[str, Any]:
    """The keyword defaults of :func:`synthetic_dataset` (single source for the writer)."""
    import inspect

    sig = inspect.signature(synthetic_dataset)
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("n_genes",)
    }


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


@dataclass
class _Programs:
    """Gene index sets (into the full var axis) of every planted program."""

    markers: dict[str, np.ndarray] = field(default_factory=dict)
    time_up: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    transient: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    activation: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    modules: list[np.ndarray] = field(default_factory=list)
    targets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cycling: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class _Generator:
    """Draws the fixed model (programs, effects, donor shifts) from ``seed`` and then cells chunk by chunk."""

    def __init__(
        self,
        *,
        n_genes: int,
        seed: int,
        genes_per_cell: float,
        genes_per_cell_sigma: float,
        n_unknown_genes: int,
        n_fates: int,
        n_other_types: int,
        trajectory_fraction: float,
        cell_states: tuple[str, ...],
        n_perturbations: int,
        n_modules: int,
        control_fraction: float,
        n_donors: int,
    ) -> None:
        if not 1 <= n_fates <= len(FATE_NAMES):
            raise ValueError(f"n_fates must be in 1..{len(FATE_NAMES)}, got {n_fates}")
        if n_other_types < 0 or n_perturbations < 1 or n_modules < 1 or n_donors < 1 or not cell_states:
            raise ValueError("need n_other_types >= 0, n_perturbations >= 1, n_modules >= 1, n_donors >= 1, states")
        if not 0.0 <= trajectory_fraction <= 1.0:
            raise ValueError(f"trajectory_fraction must be in [0, 1], got {trajectory_fraction}")
        if n_other_types == 0:
            trajectory_fraction = 1.0
        if not 0.0 <= control_fraction < 1.0:
            raise ValueError(f"control_fraction must be in [0, 1), got {control_fraction}")
        if len(set(cell_states)) != len(cell_states):
            raise ValueError(f"cell_states must be distinct, got {cell_states}")
        self.seed = int(seed)
        self.params = {
            "seed": int(seed),
            "n_genes": int(n_genes),
            "n_unknown_genes": int(n_unknown_genes),
            "genes_per_cell": float(genes_per_cell),
            "genes_per_cell_sigma": float(genes_per_cell_sigma),
            "n_fates": int(n_fates),
            "n_other_types": int(n_other_types),
            "trajectory_fraction": float(trajectory_fraction),
            "n_perturbations": int(n_perturbations),
            "n_modules": int(n_modules),
            "control_fraction": float(control_fraction),
            "n_donors": int(n_donors),
        }
        rng = np.random.default_rng([self.seed, 0])
        self.n_vars = n_genes + n_unknown_genes
        self._names(n_genes, n_unknown_genes)
        self.fates = list(FATE_NAMES[:n_fates])
        others = list(OTHER_TYPE_NAMES[:n_other_types])
        others += [f"type_{i}" for i in range(len(others), n_other_types)]
        self.others = others
        self.cell_types = [PROGENITOR, *self.fates, *others]
        self.states = list(cell_states)
        self.activation = np.linspace(0.0, 1.0, len(self.states)) if len(self.states) > 1 else np.zeros(1)
        self.donors = [f"donor_{i + 1}" for i in range(n_donors)]
        self.n_perturbations, self.n_modules = n_perturbations, n_modules
        self.trajectory_fraction, self.control_fraction = trajectory_fraction, control_fraction
        self.genes_per_cell, self.genes_per_cell_sigma = float(genes_per_cell), float(genes_per_cell_sigma)

        self.base = rng.normal(0.0, 1.2, self.n_vars)  # log abundance of every gene
        self.programs = self._pick_programs(rng)
        self._perturbation_model(rng)
        self.donor_lfc = rng.normal(0.0, 0.2, (n_donors, self.n_vars))
        donor_shift = rng.normal(0.0, 0.15, n_donors)
        self.donor_depth = np.exp(donor_shift - donor_shift.mean())
        self.transient_centers = np.linspace(0.05, 0.95, len(self.programs.transient))
        self._build_table()
        self._calibrate()

    # -- fixed model ---------------------------------------------------------------------------
    def _names(self, n_genes: int, n_unknown: int) -> None:
        names = np.empty(self.n_vars, dtype=object)
        unknown_pos = (
            np.round(np.linspace(0, self.n_vars - 1, n_unknown + 2)[1:-1]).astype(np.int64)
            if n_unknown
            else np.zeros(0, np.int64)
        )
        is_unknown = np.zeros(self.n_vars, bool)
        is_unknown[unknown_pos] = True
        names[~is_unknown] = gene_symbols(n_genes)
        names[is_unknown] = unknown_gene_symbols(n_unknown)
        self.var_names, self.known = names, np.flatnonzero(~is_unknown)

    def _pick_programs(self, rng: np.random.Generator) -> _Programs:
        n_known = len(self.known)
        m = int(np.clip(n_known // 60, 4, 25))
        n_types = len(self.cell_types)
        need = m * (n_types + 2 + 2 + self.n_modules + 1) + self.n_perturbations
        if need > n_known:
            raise ValueError(f"n_genes={n_known} is too small for the planted programs: need at least {need} genes")
        known_base = self.base[self.known]
        upper = self.known[known_base > np.median(known_base)]
        lower = np.setdiff1d(self.known, upper)
        order = np.concatenate([rng.permutation(upper), rng.permutation(lower)])  # expressed genes first
        targets, rest = order[: self.n_perturbations], order[self.n_perturbations : need]
        it = iter(np.split(rest, np.cumsum([m] * (n_types + 5 + self.n_modules))))
        progs = _Programs(targets=targets)
        for name in self.cell_types:
            progs.markers[name] = np.sort(next(it))
        progs.time_up, progs.transient = np.sort(next(it)), next(it)
        progs.activation = np.sort(np.concatenate([next(it), next(it)]))
        progs.modules = [np.sort(next(it)) for _ in range(self.n_modules)]
        progs.cycling = np.sort(next(it))
        return progs

    def _perturbation_model(self, rng: np.random.Generator) -> None:
        P, K, S = self.n_perturbations, self.n_modules, len(self.states)
        self.perturbations = [str(self.var_names[g]) for g in self.programs.targets]
        self.module = np.arange(P) % K
        rng.shuffle(self.module)
        has_second = (rng.random(P) < 0.5) & (K > 1)
        self.secondary = np.where(has_second, (self.module + 1 + rng.integers(0, max(K - 1, 1), P)) % K, -1)
        self.strength = np.log(rng.uniform(1.5, 3.0, P))
        self.module_kind = np.array(["constitutive", "activation-dependent", "resting-specific"])[np.arange(K) % 3]
        a = self.activation
        gain = {
            "constitutive": np.ones(S),
            "activation-dependent": 0.15 + 0.85 * a,
            "resting-specific": 1.0 - 0.85 * a,
        }
        self.module_gain = np.stack([gain[k] for k in self.module_kind], axis=1)  # [S, K]
        weights = np.zeros((K, self.n_vars))
        for k, genes in enumerate(self.programs.modules):
            sign = np.where(rng.random(len(genes)) < 0.7, 1.0, -1.0)
            weights[k, genes] = sign * rng.uniform(0.6, 1.0, len(genes))
        effects = np.zeros((S, P, self.n_vars))
        for s in range(S):
            for p in range(P):
                k, k2 = self.module[p], self.secondary[p]
                effects[s, p] = self.strength[p] * self.module_gain[s, k] * weights[k]
                if k2 >= 0:
                    effects[s, p] += _SECONDARY_WEIGHT * self.strength[p] * self.module_gain[s, k2] * weights[k2]
                effects[s, p, self.programs.targets[p]] += np.log(_KNOCKDOWN)
        self.module_weights, self.effects = weights, effects
        unit = effects / np.linalg.norm(effects, axis=2, keepdims=True)
        self.similarity = np.einsum("spg,sqg->spq", unit, unit)

    def _build_table(self) -> None:
        """Per (compartment, donor, state, perturbation): normalised expression profile without dynamics."""
        C = len(self.fates)  # lineage compartments: one per fate branch, then the other types
        comps = C + len(self.others)
        D, S, Q = len(self.donors), len(self.states), self.n_perturbations + 1
        self.table_shape = (comps, D, S, Q)
        self.table: np.ndarray = np.empty((comps, D, S, Q, self.n_vars), np.float32)
        state_lfc = np.zeros((S, self.n_vars))
        state_lfc[:, self.programs.activation] = (_ACTIVATION_LFC * self.activation)[:, None]
        pert_lfc = np.concatenate([np.zeros((S, 1, self.n_vars)), self.effects], axis=1)  # [S, Q, G]
        for comp in range(comps):
            row = self.base.copy()
            if comp >= C:
                row[self.programs.markers[self.others[comp - C]]] += _MARKER_LFC
            logp = (
                row[None, None, None, :]
                + self.donor_lfc[:, None, None, :]
                + state_lfc[None, :, None, :]
                + pert_lfc[None, :, :, :]
            )
            logp -= logp.max(axis=-1, keepdims=True)
            p = np.exp(logp)
            self.table[comp] = p / p.sum(axis=-1, keepdims=True)
        self.table = self.table.reshape(-1, self.n_vars)
        progs = self.programs
        parts = {
            "progenitor": progs.markers[PROGENITOR],
            **{fate: progs.markers[fate] for fate in self.fates},
            "time_up": progs.time_up,
            "transient": progs.transient,
            "cycling": progs.cycling,
        }
        self.dyn_cols = np.concatenate(list(parts.values()))
        ends = np.cumsum([len(v) for v in parts.values()])
        self.dyn_slices = {k: slice(int(e - len(v)), int(e)) for (k, v), e in zip(parts.items(), ends)}

    def _calibrate(self) -> None:
        """Depth needed per (compartment, state) for a given expected number of expressed genes."""
        comps, D, S, Q = self.table_shape
        p = self.table.reshape(comps, D, S, Q, self.n_vars)[:, 0, :, 0, :].astype(np.float64)  # donor 1, control
        self.depth_grid = np.logspace(-1, np.log10(1e4 * self.n_vars), 160)
        lam = self.depth_grid[None, None, :, None] * p[:, :, None, :]
        self.expected_genes = (lam / (1.0 + lam)).sum(axis=-1)  # [comps, S, grid], increasing in depth
        self.max_genes = 0.8 * self.n_vars
        self.min_genes = max(1.0, min(10.0, self.n_vars / 20))

    # -- cells ---------------------------------------------------------------------------------
    def _chunk_size(self) -> int:
        return int(max(64, min(8192, _ELEMENTS_PER_CHUNK // max(self.n_vars, 1))))

    def chunks(self, n_cells: int) -> Iterator[tuple[sp.csr_matrix, dict[str, np.ndarray]]]:
        """CSR count blocks with their per-cell attributes, ``chunk_size`` cells at a time."""
        if n_cells < 0:
            raise ValueError(f"n_cells must be >= 0, got {n_cells}")
        size = self._chunk_size()
        buf = np.empty((size, self.n_vars), np.float32)
        tmp = np.empty_like(buf)
        mask = np.empty(buf.shape, bool)
        for c, start in enumerate(range(0, n_cells, size)):
            n = min(size, n_cells - start)
            rng = np.random.default_rng([self.seed, 1, c])
            # attributes are drawn for a full chunk, so a shorter dataset is an exact prefix of a longer one
            attrs = {k: v[:n] for k, v in self._attributes(rng, size, start).items()}
            X = self._counts(rng, np.random.default_rng([self.seed, 2, c]), attrs, buf[:n], tmp[:n], mask[:n])
            attrs["n_genes"] = np.diff(X.indptr)
            attrs["total_counts"] = np.asarray(X.sum(axis=1)).ravel()
            yield X, attrs

    def _attributes(self, rng: np.random.Generator, n: int, start: int) -> dict[str, np.ndarray]:
        C, n_other = len(self.fates), len(self.others)
        lineage = rng.random(n) < self.trajectory_fraction
        branch = rng.integers(0, C, n)
        w = 1.0 / np.sqrt(np.arange(1, n_other + 1)) if n_other else np.ones(1)
        other = rng.choice(max(n_other, 1), n, p=w / w.sum())
        time = rng.random(n)
        comp = np.where(lineage, branch, C + other)
        cell_type = np.where(lineage, np.where(time < LABEL_SWITCH_TIME, 0, 1 + branch), 1 + C + other)
        state = rng.integers(0, len(self.states), n)
        perturbed = rng.random(n) >= self.control_fraction
        pert = np.where(perturbed, 1 + rng.integers(0, self.n_perturbations, n), 0)
        donor = rng.integers(0, len(self.donors), n)
        target = self.genes_per_cell * np.exp(self.genes_per_cell_sigma * rng.standard_normal(n))
        target = np.clip(target * self.donor_depth[donor], self.min_genes, self.max_genes)
        cycling = rng.random(n) ** 3
        return {
            "index": np.arange(start, start + n, dtype=np.int64),
            "lineage": lineage,
            "comp": comp,
            "cell_type": cell_type,
            "time": np.where(lineage, time, np.nan),
            "state": state,
            "perturbation": pert,
            "donor": donor,
            "target_genes": target,
            "cycling": cycling,
        }

    def _depth(self, attrs: dict[str, np.ndarray]) -> np.ndarray:
        depth = np.empty(len(attrs["comp"]))
        log_grid = np.log(self.depth_grid)
        for comp in np.unique(attrs["comp"]):
            for s in np.unique(attrs["state"]):
                sel = (attrs["comp"] == comp) & (attrs["state"] == s)
                if sel.any():
                    depth[sel] = np.exp(np.interp(attrs["target_genes"][sel], self.expected_genes[comp, s], log_grid))
        return depth.astype(np.float32)

    def _dynamics(self, attrs: dict[str, np.ndarray]) -> np.ndarray:
        """Per-cell log fold changes on ``dyn_cols``: lineage programs over time, and cycling."""
        n = len(attrs["comp"])
        out = np.zeros((n, len(self.dyn_cols)), np.float32)
        lin = np.flatnonzero(attrs["lineage"])
        if len(lin):
            t = attrs["time"][lin]
            rise = _smoothstep(t, *_FADE)
            ds = self.dyn_slices
            out[lin, ds["progenitor"]] = (_MARKER_LFC * (1.0 - rise))[:, None]
            for i, fate in enumerate(self.fates):
                on = attrs["comp"][lin] == i
                out[lin[on], ds[fate]] = (_MARKER_LFC * rise[on])[:, None]
            out[lin, ds["time_up"]] = (_TIME_LFC * t)[:, None]
            out[lin, ds["transient"]] = _TIME_LFC * np.exp(
                -(((t[:, None] - self.transient_centers[None, :]) / _TRANSIENT_WIDTH) ** 2)
            )
        out[:, self.dyn_slices["cycling"]] = (_CYCLING_LFC * attrs["cycling"])[:, None]
        return out

    def _counts(
        self,
        rng: np.random.Generator,
        count_rng: np.random.Generator,
        attrs: dict[str, np.ndarray],
        buf: np.ndarray,
        tmp: np.ndarray,
        mask: np.ndarray,
    ) -> sp.csr_matrix:
        """Negative binomial (shape 1) counts: expressed with p = mu/(1+mu), then 1 + geometric(p)."""
        n, G = buf.shape
        _, D, S, Q = self.table_shape
        group = ((attrs["comp"] * D + attrs["donor"]) * S + attrs["state"]) * Q + attrs["perturbation"]
        np.take(self.table, group, axis=0, out=buf)
        buf[:, self.dyn_cols] *= np.exp(self._dynamics(attrs))
        buf *= self._depth(attrs)[:, None]
        np.add(buf, 1.0, out=tmp)
        np.divide(buf, tmp, out=buf)  # buf = P(count > 0) = mu / (1 + mu)
        rng.random(out=tmp, dtype=np.float32)
        np.less(tmp, buf, out=mask)
        per_row = np.count_nonzero(mask, axis=1)
        flat = np.flatnonzero(mask)
        prob = np.minimum(np.take(buf.reshape(-1), flat), np.float32(1.0 - 2.0**-23))
        u = np.float32(1.0) - count_rng.random(len(flat), dtype=np.float32)  # (0, 1]
        counts = np.floor(np.log(u) / np.log(prob)) + np.float32(1.0)
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(per_row, out=indptr[1:])
        indices = (flat % G).astype(np.int32)
        return sp.csr_matrix((counts.astype(np.float32), indices, indptr), shape=(n, G))

    # -- AnnData parts -------------------------------------------------------------------------
    def obs(self, cells: list[dict[str, np.ndarray]]) -> pd.DataFrame:
        def cat(key: str) -> np.ndarray:
            return np.concatenate([c[key] for c in cells]) if cells else np.zeros(0, np.int64)

        index = cat("index")
        perts = [CONTROL, *self.perturbations]
        frame = pd.DataFrame(
            {
                "cell_type": pd.Categorical.from_codes(cat("cell_type"), self.cell_types),
                "time": cat("time").astype(np.float32),
                "cell_state": pd.Categorical.from_codes(cat("state"), self.states),
                "perturbation": pd.Categorical.from_codes(cat("perturbation"), perts),
                "donor": pd.Categorical.from_codes(cat("donor"), self.donors),
            },
            index=pd.Index(_barcodes(index, self.seed)),
        )
        if cells and "n_genes" in cells[0]:
            frame["n_genes_by_counts"] = cat("n_genes").astype(np.int32)
            frame["total_counts"] = cat("total_counts").astype(np.float32)
        return frame

    def var(self) -> pd.DataFrame:
        program = np.full(self.n_vars, "", dtype=object)
        progs = self.programs
        for name, genes in progs.markers.items():
            program[genes] = f"marker:{name}"
        program[progs.time_up] = "time_up"
        program[progs.transient] = "time_transient"
        program[progs.activation] = "activation"
        for k, genes in enumerate(progs.modules):
            program[genes] = f"module_{k}"
        program[progs.cycling] = "cycling"
        program[progs.targets] = "perturbation_target"
        return pd.DataFrame(
            {
                "gene_symbol": self.var_names.astype(str),
                "ensembl_id": [ensembl_id_of(g) for g in self.var_names.astype(str)],
                "program": program.astype(str),
            },
            index=pd.Index(self.var_names.astype(str)),
        )

    def ground_truth(self) -> dict[str, Any]:
        progs = self.programs
        names = self.var_names.astype(str)
        module_sim = (self.module[:, None] == self.module[None, :]).astype(np.float32)
        return {
            "params": dict(self.params),
            "cell_types": np.array(self.cell_types),
            "progenitor": PROGENITOR,
            "fates": np.array(self.fates),
            "marker_genes": {k: names[v] for k, v in progs.markers.items()},
            "label_switch_time": LABEL_SWITCH_TIME,
            "fate_window": np.array(_FADE),
            "time_up_genes": names[progs.time_up],
            "time_transient_genes": names[progs.transient],
            "time_transient_centers": self.transient_centers.astype(np.float32),
            "cell_states": np.array(self.states),
            "activation_strength": self.activation.astype(np.float32),
            "activation_genes": names[progs.activation],
            "cycling_genes": names[progs.cycling],
            "control": CONTROL,
            "perturbations": np.array(self.perturbations),
            "perturbation_targets": np.array(self.perturbations),
            "perturbation_module": self.module.astype(np.int64),
            "perturbation_secondary_module": self.secondary.astype(np.int64),
            "perturbation_strength": self.strength.astype(np.float32),
            "module_genes": {f"module_{k}": names[g] for k, g in enumerate(progs.modules)},
            "module_kind": self.module_kind.astype(str),
            "module_gain": self.module_gain.astype(np.float32),
            "perturbation_effects": self.effects.astype(np.float32),
            "perturbation_similarity": self.similarity.astype(np.float32),
            "module_similarity": module_sim,
            "donors": np.array(self.donors),
        }


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    z = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return z * z * (3.0 - 2.0 * z)


def _barcodes(index: np.ndarray, seed: int) -> np.ndarray:
    """Unique 10x-like barcodes ``ACGT...-1``: a bijective scramble of the cell index into 16 bases."""
    x = (index.astype(np.uint64) * np.uint64(2654435761) + np.uint64((seed % (1 << 32) + 1) * 40503)) % np.uint64(
        1 << 32
    )
    shifts = np.arange(30, -1, -2, dtype=np.uint64)
    codes = ((x[:, None] >> shifts[None, :]) & np.uint64(3)).astype(np.int64)
    letters = np.array(list("ACGT"), dtype="<U1")[codes]
    chars = np.concatenate([letters, np.broadcast_to(np.array(["-", "1"], dtype="<U1"), (len(x), 2))], axis=1)
    return np.ascontiguousarray(chars).view("<U18").ravel().astype(object)
