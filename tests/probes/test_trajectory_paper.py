"""The trajectory task's defaults are the paper's pipeline: restated here with scanpy itself as the oracle.

Protocol §1.4: ``normalize_total(1e4)`` -> ``log1p`` -> ``highly_variable_genes(n_top_genes=2500, subset=True)``
-> ``pca(n_comps=50)``; root = the first cell at the earliest time; reference DPT =
``neighbors(use_rep="X_pca", n_neighbors=30)`` -> ``diffmap`` -> ``dpt``; per layer the same on the raw layer
activations (``use_rep=layer``); ``Pseudotime_Corr`` = Spearman(reference DPT, layer DPT). Also: the options
(``kernel``, ``features``, ``hvg_genes``, ``root``) against the matching scanpy runs, the HVG and PCA steps
gene for gene, the CLI settings, and a clear error for counts without expressed genes.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from cellstrata.engine.errors import ProbeError
from cellstrata.probes.base import ContextPlan, Metric
from cellstrata.probes.correlation import spearman
from cellstrata.probes.features import highly_variable_genes, hvg_pca, log1p_cpm
from cellstrata.probes.tasks import make_task
from cellstrata.probes.trajectory import TrajectoryTask

sc = pytest.importorskip("scanpy")
ad = pytest.importorskip("anndata")

N_CELLS = 600
N_GENES = 3000
LAYERS = ("early", "middle", "late")


def trajectory_data(n: int = N_CELLS, n_genes: int = N_GENES, seed: int = 0) -> dict:
    """Cells over six days along a curved programme and their raw counts (some genes never expressed, some in
    one cell only, one alone in its mean bin); three 64-wide "layers" encode progress with rising strength,
    each with one huge noise dimension (a residual-stream outlier that dominates raw Euclidean distances but
    not standardised ones)."""
    rng = np.random.default_rng(seed)
    day = rng.integers(0, 6, n).astype(float)
    s = (day + rng.uniform(-0.5, 0.5, n)) / 6.0
    curve = np.c_[np.cos(np.pi * s), np.sin(np.pi * s), s, s**2]
    loadings = rng.normal(size=(4, n_genes)) * (rng.random(n_genes) < 0.3)  # a third of the genes follow time
    rate = np.exp(rng.normal(-1.0, 1.2, n_genes) + 0.8 * curve @ loadings)
    counts = rng.poisson(rate).astype(np.float32)
    counts[:, :40] = 0  # never expressed
    counts[:, 40:45] = 0
    counts[np.arange(5), np.arange(40, 45)] = 3.0  # expressed in a single cell
    counts[:, 45] = rng.poisson(2000.0, n)  # alone in the top mean bin: normalised dispersion 1 (scanpy)
    layers = {}
    for i, (name, strength) in enumerate(zip(LAYERS, (0.3, 1.0, 2.0), strict=True)):
        basis = rng.normal(size=(4, 64))
        X = strength * curve @ basis + rng.normal(size=(n, 64))
        X[:, i] += 8.0 * rng.normal(size=n)  # one massive dimension
        layers[name] = X.astype(np.float32)
    return {"obs": pd.DataFrame({"day": day}), "counts": sp.csr_matrix(counts), "layers": layers}


def paper_pipeline(
    counts: sp.csr_matrix,
    day: np.ndarray,
    layers: dict[str, np.ndarray],
    *,
    n_top: int = 2500,
    method: str = "umap",
    roots: list[int] | None = None,
) -> dict:
    """The paper's trajectory pipeline with scanpy (protocol §1.4): DPT of the reference and of every layer.

    ``out[name]`` from the paper's root; with ``roots``, also ``out[name, r]`` from each of them.
    """
    a = ad.AnnData(counts.copy(), obs=pd.DataFrame({"day": day}, index=[f"c{i}" for i in range(len(day))]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        sc.pp.highly_variable_genes(a, n_top_genes=n_top, subset=True)
        sc.pp.pca(a, n_comps=50)
        for name, X in layers.items():
            a.obsm[name] = X
        root = int(np.flatnonzero(a.obs["day"] == a.obs["day"].min())[0])
        out: dict = {"X_pca": a.obsm["X_pca"]}
        for name in ("X_pca", *layers):
            key = "reference" if name == "X_pca" else name
            sc.pp.neighbors(a, use_rep=name, n_neighbors=30, method=method)
            sc.tl.diffmap(a)
            for r in [root, *(roots or [])]:
                a.uns["iroot"] = r
                sc.tl.dpt(a)
                out[key if r == root and key not in out else (key, r)] = a.obs["dpt_pseudotime"].to_numpy()
    return out


def by_name(metrics: list[Metric]) -> dict[str, Metric]:
    return {m.metric: m for m in metrics}


def run_task(task: TrajectoryTask, data: dict) -> tuple[ContextPlan, dict[str, dict[str, Metric]]]:
    (plan,) = task.plan(data["obs"], chunk_cells=1024)
    task.prepare(plan, data["counts"][plan.rows], [f"g{i}" for i in range(data["counts"].shape[1])])
    return plan, {name: by_name(task.evaluate(plan, X[plan.rows])) for name, X in data["layers"].items()}


@pytest.fixture(scope="module")
def data() -> dict:
    return trajectory_data()


@pytest.fixture(scope="module")
def paper(data: dict) -> dict[str, np.ndarray]:
    return paper_pipeline(data["counts"], data["obs"]["day"].to_numpy(), data["layers"])


# ---------------------------------------------------------------- the reference recipe, step by step


def test_log1p_cpm_is_normalize_total_then_log1p(data: dict) -> None:
    a = ad.AnnData(data["counts"].copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    ours = log1p_cpm(data["counts"])
    assert ours.dtype == np.float32
    assert abs(ours - a.X).max() == 0  # the same float32 arithmetic
    ints = log1p_cpm(data["counts"].astype(np.int64))  # integer counts become float32, as in scanpy
    assert ints.dtype == np.float32 and abs(ints - a.X).max() == 0


@pytest.mark.parametrize("n_top", [50, 500, 2500, 2990])
def test_highly_variable_genes_are_scanpys_seurat_genes(data: dict, n_top: int) -> None:
    logX = log1p_cpm(data["counts"])
    a = ad.AnnData(logX.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(a, n_top_genes=n_top)  # flavor="seurat", n_bins=20: the defaults
    theirs = np.flatnonzero(a.var["highly_variable"].to_numpy())
    ours = highly_variable_genes(logX, n_top=n_top)
    np.testing.assert_array_equal(ours, theirs)
    assert not set(range(40)) & set(ours)  # never-expressed genes are never chosen
    if n_top == 2990:  # more than have a dispersion: every gene with one, as scanpy
        assert len(ours) == N_GENES - 40


def test_reference_features_are_scanpys_pca(data: dict, paper: dict) -> None:
    Z = hvg_pca(data["counts"], n_top=2500)
    assert Z.shape == (N_CELLS, 50) and Z.dtype == np.float32
    np.testing.assert_allclose(Z, paper["X_pca"], atol=1e-5)  # centred, not scaled; arpack, seed 0


def test_counts_without_expressed_genes_are_refused() -> None:
    with pytest.raises(ProbeError, match=r"no expressed genes.*need raw counts.*--counts-layer"):
        hvg_pca(sp.csr_matrix((100, 30), dtype=np.float32))


# ---------------------------------------------------------------- the task's defaults are the paper's numbers


def test_defaults_are_the_papers_method() -> None:
    task = TrajectoryTask(time_key="day")
    got = {k: task.settings()[k] for k in ("root", "kernel", "features", "hvg_genes", "n_neighbors", "n_dcs")}
    assert got == {
        "root": "first",
        "kernel": "umap",
        "features": "raw",
        "hvg_genes": 2500,
        "n_neighbors": 30,
        "n_dcs": 10,
    }


def test_dpt_spearman_reference_equals_the_papers_pipeline(data: dict, paper: dict) -> None:
    task = TrajectoryTask(time_key="day", n_boot=20)
    plan, metrics = run_task(task, data)
    day = data["obs"]["day"].to_numpy()
    assert plan.reference["roots"].tolist() == [int(np.flatnonzero(day == 0)[0])]  # the first cell of day 0
    np.testing.assert_allclose(plan.reference["reference_dpt"], paper["reference"], atol=1e-5)
    for name in LAYERS:
        m = metrics[name]
        want = spearmanr(paper["reference"], paper[name]).statistic
        assert m["dpt_spearman_reference"].value == pytest.approx(want, abs=1e-6), name
        assert m["dpt_spearman_time"].value == pytest.approx(spearmanr(paper[name], day).statistic, abs=1e-6)
        assert m["dpt_spearman_reference"].features == "raw" and m["ridge_r2"].features == "std"
    # the ranking the paper would report
    ours = [metrics[n]["dpt_spearman_reference"].value for n in LAYERS]
    theirs = [spearmanr(paper["reference"], paper[n]).statistic for n in LAYERS]
    assert np.argmax(ours) == np.argmax(theirs)


def test_the_papers_root_survives_subsampling(data: dict) -> None:
    day = data["obs"]["day"].to_numpy().copy()
    day[[0, 1, 2]] = [3.0, 1.0, 0.0]  # the paper's root is cell 2
    obs = pd.DataFrame({"day": day})
    sub = {"obs": obs, "counts": data["counts"], "layers": data["layers"]}
    task = TrajectoryTask(time_key="day", max_cells=300, n_boot=0)
    plan, metrics = run_task(task, sub)
    assert plan.n_cells <= 301 and 2 in plan.rows and np.all(np.diff(plan.rows) > 0)  # the AnnData's order
    assert plan.rows[plan.reference["roots"][0]] == 2
    # scanpy on the same cells, in the same order, with its own "first cell at the earliest time"
    paper = paper_pipeline(
        data["counts"][plan.rows], day[plan.rows], {k: v[plan.rows] for k, v in data["layers"].items()}
    )
    for name in LAYERS:
        want = spearmanr(paper["reference"], paper[name]).statistic
        assert metrics[name]["dpt_spearman_reference"].value == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize(
    ("settings", "method", "n_top"),
    [
        ({"kernel": "gauss"}, "gauss", 2500),
        ({"hvg_genes": 2000}, "umap", 2000),
        ({"features": "pca50", "kernel": "gauss", "hvg_genes": 2000}, "gauss", 2000),
    ],
)
def test_options_equal_the_matching_scanpy_runs(data: dict, settings: dict, method: str, n_top: int) -> None:
    task = make_task("trajectory", {"time_key": "day", "n_boot": 0}, {k: str(v) for k, v in settings.items()})
    _, metrics = run_task(task, data)
    layers = data["layers"]
    if settings.get("features") == "pca50":  # StandardScaler -> PCA(50), the project's graph recipe
        layers = {
            k: PCA(50, random_state=0).fit_transform(StandardScaler().fit_transform(v)) for k, v in layers.items()
        }
    paper = paper_pipeline(data["counts"], data["obs"]["day"].to_numpy(), layers, n_top=n_top, method=method)
    for name in LAYERS:
        want = spearmanr(paper["reference"], paper[name]).statistic
        assert metrics[name]["dpt_spearman_reference"].value == pytest.approx(want, abs=1e-5), name
        assert metrics[name]["dpt_spearman_time"].features == settings.get("features", "raw")


def test_robust_roots_average_scanpys_per_root_pseudotimes_and_their_ci_covers_the_root(data: dict) -> None:
    task = TrajectoryTask(time_key="day", root="robust", n_roots=3, n_boot=6)
    plan, metrics = run_task(task, data)
    roots = plan.reference["roots"]
    boot, boot_roots = plan.reference["boot"], plan.reference["boot_roots"]
    day = data["obs"]["day"].to_numpy()
    assert len(roots) == 3 and (day[roots] == 0).all() and boot_roots.shape == (6, 3)
    needed = sorted({*roots.tolist(), *boot_roots.ravel().tolist()})
    runs = paper_pipeline(data["counts"], day, {"middle": data["layers"]["middle"]}, roots=needed)

    def mean_pt(key: str, rs: np.ndarray) -> np.ndarray:
        return np.mean([runs[key, r] for r in rs], axis=0)

    m = metrics["middle"]
    want = spearmanr(mean_pt("reference", roots), mean_pt("middle", roots)).statistic
    assert m["dpt_spearman_reference"].value == pytest.approx(want, abs=1e-5)
    # replicate b: the cells of boot[b] and the pseudotimes from the roots boot_roots[b]
    for b in range(6):
        i, rs = boot[b], boot_roots[b]
        want_ref = spearmanr(mean_pt("reference", rs)[i], mean_pt("middle", rs)[i]).statistic
        want_time = spearmanr(mean_pt("middle", rs)[i], day[i]).statistic
        assert m["dpt_spearman_reference"].replicates[b] == pytest.approx(want_ref, abs=1e-5)
        assert m["dpt_spearman_time"].replicates[b] == pytest.approx(want_time, abs=1e-5)
    # with the roots held fixed the replicates would differ: the interval covers the root choice
    fixed = [spearman(mean_pt("middle", roots)[i], day[i]) for i in boot]
    assert not np.allclose(m["dpt_spearman_time"].replicates, fixed, atol=1e-4)
